/* Rule classification with a bounded number of hash lookups whatever the
 * rule count (the layout is explained on the structs in
 * types.h, the compiler side is controller/policy/compiler.py). */
#ifndef SG_POLICY_H
#define SG_POLICY_H

#include "maps.h"
#include "parse.h"
#include "scratch.h"

static __always_inline void match_take(struct sg_match *m, __u32 rule_index, __u32 flags)
{
	if (!m->found || rule_index < m->rule_index)
		m->rule_index = rule_index;
	m->found = 1;
	m->flags |= flags;
}

/* Port check of one class: the protocol's segments (which include the
 * class's protocol -1 rules), else the class's protocol -1 entry. */
static __always_inline int class_match(__u32 cls, __u8 proto, __be16 port_be, struct sg_match *m)
{
	struct sg_ports_key k = { .cls = cls, .proto = proto };
	struct sg_ports *ps = sg_ports.lookup(&k);
	if (!ps) {
		k.proto = SG_PROTO_ANY;
		ps = sg_ports.lookup(&k);
		if (!ps || ps->n == 0)
			return 0;
		match_take(m, ps->seg[0].rule_index, ps->seg[0].flags);
		return 1;
	}
	if (ps->n == SG_SEGS_LPM) {
		struct sg_port_key lk = { .prefixlen = 64, .cls = cls, .proto = proto, .port = port_be };
		struct sg_port_val *v = sg_ports_lpm.lookup(&lk);
		if (!v)
			return 0;
		match_take(m, v->rule_index, v->flags);
		return 1;
	}
	__u16 port = bpf_ntohs(port_be);
#pragma unroll
	for (int i = 0; i < SG_SEGS_INLINE; i++) {
		if (i >= ps->n)
			break;
		if (port >= ps->seg[i].lo && port <= ps->seg[i].hi) {
			match_take(m, ps->seg[i].rule_index, ps->seg[i].flags);
			return 1;
		}
	}
	return 0;
}

/* Step 3 of the verdict: does any rule of the endpoint's groups allow the
 * packet? Remote address -> classes of the prefixes containing it (longest
 * first, at most SG_CHAIN_MAX) -> their port segments. */
static __always_inline struct sg_plens *policy_plens(__u32 policy_id, __u8 dir, struct sg_flow *f)
{
	struct sg_plens_key pk = { .policy_id = policy_id, .dir = dir, .family = f->family };
	return sg_plens.lookup(&pk);
}

/* Could any prefix of the policy (or an exempt address) contain the remote
 * address? One bit test on its top 16 bits. */
static __always_inline int policy_top16(struct sg_plens *pl, __u8 dir, struct sg_flow *f)
{
	__be32 *remote = dir == SG_DIR_INGRESS ? f->src : f->dst;
	__u32 top = bpf_ntohl(remote[0]) >> 16;
	return (pl->top16[(top >> 6) & (SG_TOP16_WORDS - 1)] >> (top & 63)) & 1;
}

/* A prefix containing the remote address had class *c: 0 to go on with the
 * next (shorter) prefix length, 1 when the chain is full. */
static __always_inline int peer_hit(struct sg_scratch *s, __u32 *c)
{
	__u32 n = s->ncls;
	if (n >= SG_CHAIN_MAX)
		return 1;
	s->cls[n & (SG_CHAIN_MAX - 1)] = *c;
	s->ncls = n + 1;
	return 0;
}

static __always_inline int policy_match(struct sg_plens *pl, __u32 policy_id, __u8 dir,
					struct sg_scratch *s)
{
	struct sg_flow *f = &s->p.f;
	__be32 *remote = dir == SG_DIR_INGRESS ? f->src : f->dst;
	/* 1. the classes of the (at most SG_CHAIN_MAX longest) prefixes that
	 *    contain the remote address; one hash lookup per prefix length */
	s->ncls = 0;
	if (f->family == 4) {
		struct sg_peer4_key k4 = { .policy_id = policy_id, .dir = dir };
		for (int i = 0; i < SG_PLEN4_SLOTS; i++) {
			if (i >= pl->n)
				break;
			struct sg_plen *l = &pl->len[i];
			k4.addr = remote[0] & l->mask[0];
			k4.plen = l->plen;
			__u32 *c = sg_peers4.lookup(&k4);
			if (c && peer_hit(s, c))
				break;
		}
	} else {
		struct sg_peer_key k = { .policy_id = policy_id, .dir = dir, .family = f->family };
		for (int i = 0; i < SG_PLEN_SLOTS; i++) {
			if (i >= pl->n)
				break;
			struct sg_plen *l = &pl->len[i];
			k.addr[0] = remote[0] & l->mask[0];
			k.addr[1] = remote[1] & l->mask[1];
			k.addr[2] = remote[2] & l->mask[2];
			k.addr[3] = remote[3] & l->mask[3];
			k.plen = l->plen;
			__u32 *c = sg_peers.lookup(&k);
			if (c && peer_hit(s, c))
				break;
		}
	}
	/* 2. their port segments */
#pragma unroll
	for (int j = 0; j < SG_CHAIN_MAX; j++) {
		if (j >= s->ncls)
			break;
		class_match(s->cls[j], f->proto, f->rule_port, &s->m);
	}
	return s->m.found;
}

static __always_inline int open_all(struct sg_endpoint *ep, __u8 dir, __u8 family, __u8 proto)
{
	__u32 bit = ((dir * 2 + (family == 6)) * 2) + (proto == SG_IPPROTO_UDP);
	return (ep->open_all >> bit) & 1;
}

/* Untracked flows (1.4): allowed here by a world rule and the other
 * direction is world-open on all ports -- or, seen from the reply side,
 * this direction is world-open and a world rule of the other direction
 * allows the reversed packet. */
static __always_inline int policy_untracked(struct sg_endpoint *ep, __u8 dir, struct sg_flow *f,
					    struct sg_match *m, struct sg_match *wm)
{
	if (f->proto != SG_IPPROTO_TCP && f->proto != SG_IPPROTO_UDP)
		return 0;
	__u8 back = dir ^ 1;
	if ((m->flags & SG_FLAG_WORLD) && open_all(ep, back, f->family, f->proto))
		return 1;
	if (!open_all(ep, dir, f->family, f->proto))
		return 0;
	__u32 idx = back * 2 + (f->family == 6);
	if (idx >= 4)
		return 0;
	__u32 wcls = ep->world_class[idx];
	if (!wcls)
		return 0;
	wm->found = 0;
	return class_match(wcls, f->proto, f->sport, wm);
}

#endif
