/* Connection tracking (1.4): one table for all endpoints, keyed per endpoint;
 * a connection that has seen traffic both ways is never evicted, a
 * half-open one only by a newer one of its own interface (types.h,
 * sg_ct_quota). */
#ifndef SG_CONNTRACK_H
#define SG_CONNTRACK_H

#include "maps.h"
#include "parse.h"
#include "flowlog.h"

static __always_inline void ct_key_of(struct sg_ct_key *k, __u32 ep_id, __u8 dir,
				      struct sg_flow *f)
{
	k->ep_id = ep_id;
	k->family = f->family;
	k->proto = f->proto;
	int in = dir == SG_DIR_INGRESS;
	__builtin_memcpy(k->local, in ? f->dst : f->src, 16);
	__builtin_memcpy(k->remote, in ? f->src : f->dst, 16);
	if (f->proto == SG_IPPROTO_TCP || f->proto == SG_IPPROTO_UDP) {
		k->lport = in ? f->dport : f->sport;
		k->rport = in ? f->sport : f->dport;
	} else if (f->proto == SG_IPPROTO_ICMP || f->proto == SG_IPPROTO_ICMPV6) {
		/* a query and its reply find one entry; the two sides' own
		 * queries with the same id are two entries */
		__u8 req = sg_icmp_query(f->proto, f->icmp_type);
		__u8 req_dir = f->icmp_type == req ? dir : dir ^ 1;
		k->lport = f->echo_id;
		k->rport = bpf_htons(req | ((__u16)req_dir << 8));
	}
}

/* Can this packet belong to a connection? ICMP: only queries and their
 * replies (errors are related, other types are judged per packet). */
static __always_inline int ct_trackable(struct sg_flow *f)
{
	if (f->proto == SG_IPPROTO_ICMP || f->proto == SG_IPPROTO_ICMPV6)
		return sg_icmp_query(f->proto, f->icmp_type) != 0;
	return 1;
}

/* Can this packet open one? Not an ICMP reply, nor a packet that cannot
 * belong to one. */
static __always_inline int ct_opens(struct sg_flow *f)
{
	if (f->proto == SG_IPPROTO_ICMP || f->proto == SG_IPPROTO_ICMPV6) {
		__u8 req = sg_icmp_query(f->proto, f->icmp_type);
		return req && req == f->icmp_type;
	}
	return 1;
}

/* The DHCP client's pseudo-connection (1.3): refreshed by each request the
 * interface sends, it lets the replies in for the UDP timeout whatever
 * server address they come from. */
static __always_inline void ct_dhcp_key(struct sg_ct_key *k, __u32 ep_id, __u8 family)
{
	k->ep_id = ep_id;
	k->family = family;
	k->proto = SG_IPPROTO_UDP;
	k->lport = bpf_htons(family == 4 ? 68 : 546);
	k->rport = bpf_htons(family == 4 ? 67 : 547);
}

static __always_inline __u32 ct_timeout(struct sg_endpoint *ep, __u8 proto, __u8 state)
{
	if (proto == SG_IPPROTO_TCP) {
		if (state == SG_CT_NEW)
			return ep->timeouts[SG_TO_TCP_SYN];
		if (state == SG_CT_CLOSING)
			return ep->timeouts[SG_TO_TCP_CLOSING];
		return ep->timeouts[SG_TO_TCP_ESTABLISHED];
	}
	if (proto == SG_IPPROTO_UDP)
		return ep->timeouts[state == SG_CT_STREAM ? SG_TO_UDP_STREAM : SG_TO_UDP_OTHER];
	if (proto == SG_IPPROTO_ICMP || proto == SG_IPPROTO_ICMPV6)
		return ep->timeouts[SG_TO_ICMP];
	return ep->timeouts[SG_TO_OTHER];
}

static __always_inline int ct_expired(struct sg_endpoint *ep, struct sg_ct_key *k,
				      struct sg_ct_entry *e, __u64 now)
{
	return now > e->last_seen && now - e->last_seen > ct_timeout(ep, k->proto, e->state);
}

/* State transitions for one packet. Plain stores: two CPUs racing on one
 * flow can at worst lose a transition that the flow's next packet redoes. */
static __always_inline void ct_update(struct sg_ct_entry *e, __u8 dir, struct sg_pkt *p, __u64 now)
{
	int reply = dir != e->origin;
	__u8 state = e->state;
	if (p->f.proto == SG_IPPROTO_TCP) {
		if (p->tcp_flags & TCP_F_RST) {
			state = SG_CT_CLOSING;
		} else if (state != SG_CT_CLOSING) {
			__u8 fin = e->fin;
			if (p->tcp_flags & TCP_F_FIN)
				fin |= reply ? 2 : 1;
			if (fin != e->fin)
				e->fin = fin;
			if (fin == 3)
				state = SG_CT_CLOSING;
			else if (state == SG_CT_NEW && reply && !(e->flags & SG_CT_F_REPLIED))
				e->flags |= SG_CT_F_REPLIED;
			else if (state == SG_CT_NEW && !reply && (e->flags & SG_CT_F_REPLIED))
				state = SG_CT_ESTABLISHED;  /* the handshake's ACK */
		}
	} else if (reply && state == SG_CT_NEW) {
		state = SG_CT_ESTABLISHED;
	} else if (state == SG_CT_ESTABLISHED && p->f.proto == SG_IPPROTO_UDP) {
		/* a stream: more than one request-response transaction */
		if (!reply && !(e->fin & SG_CT_UDP_ASKED))
			e->fin |= SG_CT_UDP_ASKED;
		else if (reply && (e->fin & SG_CT_UDP_ASKED))
			state = SG_CT_STREAM;
	}
	if (state != e->state)
		e->state = state;
	if (e->last_seen != now)  /* at most one write a second for an idle-free flow */
		e->last_seen = now;
}

/* A SYN (without ACK) on a closing entry starts a fresh connection. */
static __always_inline int ct_fresh_syn(struct sg_pkt *p, struct sg_ct_entry *e)
{
	return p->f.proto == SG_IPPROTO_TCP && e->state == SG_CT_CLOSING &&
	       (p->tcp_flags & (TCP_F_SYN | TCP_F_ACK)) == TCP_F_SYN;
}

/* Give a new connection the next slot of its interface's half-open range,
 * deleting the slot's connection if it is still half-open there (types.h,
 * sg_ct_quota). */
static __always_inline void ct_claim_slot(struct sg_endpoint *ep, struct sg_ct_quota *q,
					  struct sg_ct_key *k, struct sg_ct_entry *e)
{
	__u32 size = ep->ring_size;
	if (!size)
		return;
	__u32 slot = ep->ring_base + (__u32)(__sync_fetch_and_add(&q->next, 1) % size);
	struct sg_ct_key *held = sg_ct_ring.lookup(&slot);
	if (!held)
		return;
	if (held->ep_id == k->ep_id) {
		struct sg_ct_entry *old = sg_conntrack.lookup(held);
		if (old && old->slot == slot + 1 && old->state == SG_CT_NEW) {
			sg_conntrack.delete(held);
			__sync_fetch_and_add(&q->evicted, 1);
		}
	}
	__builtin_memcpy(held, k, sizeof(*k));
	e->slot = slot + 1;
}

/* Does the interface hold its limit of connections (types.h, sg_ct_quota)?
 * Signed: a count that lags below zero is no count at all. */
static __always_inline int ct_at_limit(struct sg_endpoint *ep, struct sg_ct_quota *q)
{
	__u32 idx = ep->ep_id;
	if (!ep->ct_limit)
		return 0;
	__u64 *removed = sg_ct_removed.lookup(&idx);
	if (!removed)
		return 0;
	return (__s64)(q->created - q->evicted - *removed) >= (__s64)ep->ct_limit;
}

/* Create (or reuse an expired/closing) entry. Returns 0 or SG_DROP_CT_FULL. */
static __always_inline int ct_create(struct sg_ct_key *k, int exists, __u8 dir, struct sg_pkt *p,
				     struct sg_endpoint *ep, __u32 rule_index, __u64 now, __u8 flags)
{
	struct sg_ct_entry e = {};
	e.origin = dir;
	e.flags = flags;
	if (p->f.proto == SG_IPPROTO_ICMP || p->f.proto == SG_IPPROTO_ICMPV6) {
		e.icmp_type = p->f.icmp_type;
		e.icmp_code = p->f.icmp_code;
	}
	e.state = SG_CT_NEW;
	e.last_seen = now;
	e.rule_index = rule_index;
	e.policy_id = ep->policy_id;
	e.packets[dir & 1] = 1;  /* accounting starts with the first packet (flow logs) */
	e.bytes[dir & 1] = p->ip_len;
	if (p->f.proto == SG_IPPROTO_TCP)
		e.tcp_flags[dir & 1] = flow_tcp_flags(p->tcp_flags);
	ct_update(&e, dir, p, now);
	__u32 idx = ep->ep_id;
	struct sg_ct_quota *q = sg_ct_quota.lookup(&idx);  /* none past SG_COUNTER_SLOTS */
	if (q) {
		ct_claim_slot(ep, q, k, &e);
		if (!exists && ct_at_limit(ep, q))
			return SG_DROP_CT_FULL;
	}
	int err = exists ? sg_conntrack.update(k, &e) : sg_conntrack.insert(k, &e);
	if (err && err != -17 /* EEXIST: another CPU created it first */)
		return SG_DROP_CT_FULL;
	if (q && !exists && !err)
		__sync_fetch_and_add(&q->created, 1);
	return 0;
}

#endif
