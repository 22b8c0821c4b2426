/* Which endpoint a packet's device is: two array lookups through sg_ep_index
 * (the verifier inlines both), or the sg_endpoints hash when the index does
 * not name the device (types.h, struct sg_ep_ref). */
#ifndef SG_ENDPOINT_H
#define SG_ENDPOINT_H

#include "types.h"
#include "maps.h"

static __always_inline struct sg_endpoint *sg_endpoint_of(__u32 ifindex)
{
	__u32 i = ifindex & (SG_EP_INDEX_SLOTS - 1);
	struct sg_ep_ref *ref = sg_ep_index.lookup(&i);
	if (ref) {
		__u64 raw = *(volatile __u64 *)ref;  /* one load: the controller's one store */
		struct sg_ep_ref r;
		__builtin_memcpy(&r, &raw, sizeof(r));
		if (r.ifindex == ifindex) {
			struct sg_endpoint *ep = sg_ep_slots.lookup(&r.slot);
			if (ep)
				return ep;
		}
	}
	return sg_endpoints.lookup(&ifindex);
}

#endif
