/* Flow logs, the datapath's half: packets of tracked connections
 * are counted in their conntrack entry (flow_account); every other logged
 * packet becomes one event in the sg_flow_events ring, at most
 * 1e9 / flow_cost_ns a second per CPU, so a flood cannot bury the
 * controller, and at most 1e9 / flow_ep_cost_ns of them from one endpoint,
 * so a flood on one interface cannot silence the others' logs. Each limit
 * is a token bucket in nanoseconds of credit on the coarse clock (it
 * advances a tick, a few ms, at a time; the precise clock cost ~30 ns a
 * packet). What the limits or a full ring hold back is counted per
 * endpoint and reported as SKIPDATA. */
#ifndef SG_FLOWLOG_H
#define SG_FLOWLOG_H

#include "maps.h"
#include "scratch.h"

#define SG_RB_NO_WAKEUP 1  /* BPF_RB_NO_WAKEUP: the controller drains on a timer */

/* per-CPU token bucket; private to the datapath */
struct sg_flow_budget {
	__u64 last_ns;
	__u64 credit_ns;
};

#define SG_FLOW_HOST_BUDGET SG_COUNTER_SLOTS /* the slot after the endpoints' */

/* per CPU: each endpoint slot's flow-event budget, then the host's */
BPF_PERCPU_ARRAY(sg_flow_budget, struct sg_flow_budget, SG_COUNTER_SLOTS + 1);

static __always_inline __u8 flow_tcp_flags(__u8 tcp)
{
	__u8 out = tcp & (SG_FL_TCP_FIN | SG_FL_TCP_SYN | SG_FL_TCP_RST);
	if ((tcp & (TCP_F_SYN | TCP_F_ACK)) == (TCP_F_SYN | TCP_F_ACK))
		out |= SG_FL_TCP_SYNACK;
	return out;
}

/* A packet of a tracked connection. Atomic adds: the two directions of one
 * connection are often decided on different CPUs. */
static __always_inline void flow_account(struct sg_ct_entry *e, __u8 dir, struct sg_pkt *p)
{
	__u8 d = dir & 1;
	__sync_fetch_and_add(&e->packets[d], 1);
	__sync_fetch_and_add(&e->bytes[d], p->ip_len);
	if (p->f.proto == SG_IPPROTO_TCP) {
		__u8 fl = flow_tcp_flags(p->tcp_flags);
		if ((e->tcp_flags[d] | fl) != e->tcp_flags[d])
			e->tcp_flags[d] |= fl;
	}
}

/* Take one event's credit from budget ``slot`` of this CPU, if it has it. */
static __always_inline int flow_take(__u32 slot, __u64 cost, __u64 burst, __u64 now)
{
	struct sg_flow_budget *b = sg_flow_budget.lookup(&slot);
	if (!b)
		return 0;
	__u64 credit = b->credit_ns + (now - b->last_ns);
	if (credit > burst)
		credit = burst;
	b->last_ns = now;
	if (credit < cost) {
		b->credit_ns = credit;
		return 0;
	}
	b->credit_ns = credit - cost;
	return 1;
}

/* Is there credit for one more event of this endpoint on this CPU? Its own
 * budget first: an endpoint over its share never draws on the host's. */
static __always_inline int flow_budget(struct sg_config *cfg, __u32 ep_id, __u64 now)
{
	return flow_take(sg_counter_slot(ep_id), cfg->flow_ep_cost_ns, cfg->flow_ep_burst_ns,
			 now) &&
	       flow_take(SG_FLOW_HOST_BUDGET, cfg->flow_cost_ns, cfg->flow_burst_ns, now);
}

static __always_inline void flow_skip(__u32 ep_id)
{
	__u32 slot = sg_counter_slot(ep_id);
	__u64 *n = sg_flow_skips.lookup(&slot);
	if (n)
		*n += 1;
}

/* Packets that are logged as events: those with addresses that neither
 * belong to a tracked connection (counted there) nor are infrastructure
 * traffic (which AWS does not log either). */
static __always_inline int flow_logged(int reason, struct sg_pkt *p)
{
	return p->f.family && !p->is_arp && reason != SG_ALLOW_ESTABLISHED && reason != SG_ALLOW_EXEMPT &&
	       reason != SG_PASS_UNBOUND;
}

static __always_inline void flow_event(struct sg_config *cfg, __u32 ep_id, __u8 dir, int reason,
				       struct sg_scratch *s)
{
	struct sg_pkt *p = &s->p;
	__u64 now = bpf_ktime_get_coarse_ns();
	if (!flow_budget(cfg, ep_id, now)) {
		flow_skip(ep_id);
		return;
	}
	struct sg_flow_event *ev = sg_flow_events.ringbuf_reserve(sizeof(*ev));
	if (!ev) {
		flow_skip(ep_id);
		return;
	}
	ev->ts_ns = now;
	ev->ep_id = ep_id;
	ev->rule_index = s->rule;
	ev->bytes = p->ip_len;
	ev->dir = dir;
	ev->reason = reason;
	ev->family = p->f.family;
	ev->proto = p->f.proto;
	ev->tcp_flags = p->f.proto == SG_IPPROTO_TCP ? flow_tcp_flags(p->tcp_flags) : 0;
	ev->icmp_type = p->f.icmp_type;
	ev->icmp_code = p->f.icmp_code;
	ev->tracked = reason == SG_ALLOW_NEW && !p->icmp_error;
	ev->sport = p->f.sport;
	ev->dport = p->f.dport;
	__builtin_memcpy(ev->src, p->f.src, 16);
	__builtin_memcpy(ev->dst, p->f.dst, 16);
	sg_flow_events.ringbuf_submit(ev, SG_RB_NO_WAKEUP);
}

#endif
