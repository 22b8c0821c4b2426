/* Rule classification: a fixed number of lookups whatever the rule count
 * (DESIGN 2.2; the compiler side is controller/compiler.py). */
#ifndef SG_POLICY_H
#define SG_POLICY_H

#include "maps.h"
#include "parse.h"

static __always_inline struct sg_port_val *
port_lookup(__u32 policy_id, __u32 cls, __u8 proto, __be16 port)
{
	struct sg_port_key k = {
		.prefixlen = 96, .policy_id = policy_id, .cls = cls, .proto = proto, .port = port,
	};
	struct sg_port_val *v = sg_port_lpm.lookup(&k);
	if (v)
		return v;
	k.proto = SG_PROTO_ANY;
	k.port = 0;
	return sg_port_lpm.lookup(&k);
}

/* remote address -> peer class (0 = no rule mentions it) */
static __always_inline __u32 peer_class(__u32 policy_id, __u8 dir, struct sg_flow *f)
{
	struct sg_peer_key k = {
		.prefixlen = f->family == 4 ? 96 : 192,
		.policy_id = policy_id, .dir = dir, .family = f->family,
	};
	__be32 *remote = dir == SG_DIR_INGRESS ? f->src : f->dst;
	__builtin_memcpy(k.addr, remote, 16);
	__u32 *cls = sg_peer_lpm.lookup(&k);
	return cls ? *cls : 0;
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
					    struct sg_port_val *v)
{
	if (f->proto != SG_IPPROTO_TCP && f->proto != SG_IPPROTO_UDP)
		return 0;
	__u8 back = dir ^ 1;
	if ((v->flags & SG_FLAG_WORLD) && open_all(ep, back, f->family, f->proto))
		return 1;
	if (!open_all(ep, dir, f->family, f->proto))
		return 0;
	__u32 idx = back * 2 + (f->family == 6);
	if (idx >= 4)
		return 0;
	__u32 wcls = ep->world_class[idx];
	if (!wcls)
		return 0;
	return port_lookup(ep->policy_id, wcls, f->proto, f->sport) != 0;
}

/* Step 3 of the verdict: does any rule of the endpoint's groups allow it? */
static __always_inline struct sg_port_val *
policy_match(struct sg_endpoint *ep, __u8 dir, struct sg_flow *f)
{
	__u32 cls = peer_class(ep->policy_id, dir, f);
	if (!cls)
		return 0;
	return port_lookup(ep->policy_id, cls, f->proto, f->rule_port);
}

#endif
