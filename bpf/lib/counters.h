/* Verdict counters: per CPU, per (endpoint slot, direction, reason). */
#ifndef SG_COUNTERS_H
#define SG_COUNTERS_H

#include "maps.h"

static __always_inline void count_verdict(__u32 ep_id, __u8 dir, int reason, __u32 bytes)
{
	__u32 idx = (sg_counter_slot(ep_id) * 2 + (dir & 1)) * SG_REASON_MAX +
		    (reason & (SG_REASON_MAX - 1));
	struct sg_counter *c = sg_verdicts.lookup(&idx);
	if (c) {
		c->packets += 1;
		c->bytes += bytes;
	}
}

static __always_inline void count_rule(__u32 rule_index, __u32 bytes, __u64 now)
{
	__u32 idx = rule_index < SG_RULE_SLOTS ? rule_index : 0;
	struct sg_rule_hit *h = sg_rule_hits.lookup(&idx);
	if (h) {
		h->packets += 1;
		h->bytes += bytes;
		if (h->last_seen != now)
			h->last_seen = now;
	}
}

#endif
