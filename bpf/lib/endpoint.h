/* Which endpoint a packet's device is: array lookups only (the verifier
 * inlines them), types.h struct sg_ep_ref. A device's index entry is the
 * first free one of ifindex, ifindex + 1, ... (mod SG_EP_INDEX_SLOTS);
 * the controller fails a bind rather than go past SG_EP_INDEX_TRIES. */
#ifndef SG_ENDPOINT_H
#define SG_ENDPOINT_H

#include "types.h"
#include "maps.h"

static __always_inline struct sg_endpoint *sg_endpoint_of(__u32 ifindex)
{
	for (int k = 0; k < SG_EP_INDEX_TRIES; k++) {
		__u32 i = (ifindex + k) & (SG_EP_INDEX_SLOTS - 1);
		struct sg_ep_ref *ref = sg_ep_index.lookup(&i);
		if (!ref)
			return 0;
		__u64 raw = *(volatile __u64 *)ref;  /* one load: the controller's one store */
		struct sg_ep_ref r;
		__builtin_memcpy(&r, &raw, sizeof(r));
		if (r.ifindex == ifindex)
			return sg_ep_slots.lookup(&r.slot);
	}
	return 0;  /* not bound */
}

#endif
