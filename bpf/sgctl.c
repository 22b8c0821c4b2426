/* sgctl datapath: AWS security groups at XDP (receive) and tc egress.
 *
 * One code path for both hooks: the hook and the endpoint's
 * mode give the direction, sg_verdict() decides, step by step;
 * controller/policy/evaluator.py is the same logic in Python and the two
 * are tested against each other. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#include "lib/types.h"
#include "lib/reasons.h"
#include "lib/maps.h"
#include "lib/endpoint.h"
#include "lib/parse.h"
#include "lib/policy.h"
#include "lib/conntrack.h"
#include "lib/addrcheck.h"
#include "lib/counters.h"
#include "lib/flowlog.h"
#include "lib/frags.h"

#define SG_HOOK_XDP 0
#define SG_HOOK_TC_EGRESS 1
#define SG_NSEC_PER_SEC 1000000000ULL

static __always_inline __u64 sg_now(struct sg_config *cfg)
{
	if (cfg && cfg->now_override)
		return cfg->now_override;
	return bpf_ktime_get_coarse_ns() / SG_NSEC_PER_SEC;
}

/* Is an ICMP error about a connection of this endpoint, and consistent
 * with it (1.4)? The error goes to the embedded packet's source; leaving a
 * source-checked instance, it comes from the embedded packet's destination. */
static __always_inline int sg_related(struct sg_endpoint *ep, struct sg_config *cfg, __u8 dir,
				      struct sg_pkt *p)
{
	if (!addr_eq(p->f.dst, p->inner.src))
		return 0;
	if (dir == SG_DIR_EGRESS && (ep->flags & SG_EP_SRC_CHECK) && !addr_eq(p->f.src, p->inner.dst))
		return 0;
	struct sg_ct_key ik = {};
	ct_key_of(&ik, ep->ep_id, dir ^ 1, &p->inner);
	struct sg_ct_entry *ie = sg_conntrack.lookup(&ik);
	return ie && !ct_expired(ep, &ik, ie, sg_now(cfg));
}

/* Exempt traffic (1.3) that opens a connection for its replies: a request
 * to an infrastructure service or a DHCP request. */
static __always_inline int sg_exempt_open(struct sg_endpoint *ep, struct sg_ct_key *key,
					  int exists, __u8 dir, struct sg_pkt *p, __u64 now,
					  __u8 flags)
{
	if (ep->flags & SG_EP_PROBE)
		return SG_ALLOW_EXEMPT;
	if (ct_create(key, exists, dir, p, ep, 0, now, SG_CT_F_EXEMPT | flags))
		return SG_DROP_CT_FULL;
	return SG_ALLOW_EXEMPT;
}

/* The verdict of one parsed IP packet (fragments handled by the caller). */
static __always_inline int sg_decide(struct sg_endpoint *ep, struct sg_config *cfg, __u8 dir,
				     struct sg_scratch *s)
{
	struct sg_pkt *p = &s->p;
	__u64 now;  /* read only where needed: a dropped packet never needs the clock */

	/* 1. a tracked connection of this endpoint, either direction. Its
	 *    addresses passed the source/destination check when it opened (the
	 *    key holds them; the controller cuts connections on addresses the
	 *    interface loses), so its packets need no second look. */
	struct sg_ct_key key = {};
	ct_key_of(&key, ep->ep_id, dir, &p->f);
	struct sg_ct_entry *e = 0;
	int exists = 0;
	if (!p->icmp_error && ct_trackable(&p->f)) {
		e = sg_conntrack.lookup(&key);
		exists = e != 0;
		if (e && !(e->flags & SG_CT_F_DHCP)) {
			now = sg_now(cfg);
			if (!ct_expired(ep, &key, e, now) && !ct_fresh_syn(p, e)) {
				ct_update(e, dir, p, now);
				if (cfg && (cfg->flags & SG_CFG_FLOW_LOG))
					flow_account(e, dir, p);
				s->rule = e->rule_index;
				s->now = now;
				return SG_ALLOW_ESTABLISHED;
			}
		}
	}

	/* SourceDestCheck: nothing new from or to an address not the interface's */
	int bad = sg_addr_check(ep, dir, p);
	if (bad)
		return bad;

	/* 2. an ICMP error about a tracked connection (the embedded packet went
	 *    the other way) */
	if (p->icmp_error && sg_related(ep, cfg, dir, p))
		return SG_ALLOW_RELATED;

	/* exemptions nobody can borrow (after conntrack: established flows
	 * skip these checks) */
	if (sg_nd_exempt(ep, p))
		return SG_ALLOW_EXEMPT;
	int dhcp = sg_dhcp_kind(cfg, dir, p);
	if (dhcp == SG_DHCP_REQUEST) {
		struct sg_ct_key dk = {};
		ct_dhcp_key(&dk, ep->ep_id, p->f.family);
		return sg_exempt_open(ep, &dk, sg_conntrack.lookup(&dk) != 0, dir, p, sg_now(cfg),
				      SG_CT_F_DHCP);
	}
	if (dhcp == SG_DHCP_REPLY) {
		struct sg_ct_key dk = {};
		ct_dhcp_key(&dk, ep->ep_id, p->f.family);
		struct sg_ct_entry *de = sg_conntrack.lookup(&dk);
		if (de && !ct_expired(ep, &dk, de, sg_now(cfg)))
			return SG_ALLOW_EXEMPT;
	}
	/* The prefix bitmap covers the exempt addresses too: a remote address
	 * outside it can be neither exempt nor allowed, and is dropped here. */
	struct sg_plens *pl = policy_plens(ep->policy_id, dir, &p->f);
	if (pl && !policy_top16(pl, dir, &p->f))
		return SG_DROP_NO_RULE;
	if (dir == SG_DIR_EGRESS && (exempt_bits(p->f.family, p->f.dst) & SG_EXEMPT_SERVICE)) {
		if (!ct_opens(&p->f))  /* e.g. an ICMP reply: exempt, nothing to track */
			return SG_ALLOW_EXEMPT;
		return sg_exempt_open(ep, &key, exists, dir, p, sg_now(cfg), 0);
	}

	/* 3. the rules */
	struct sg_match *m = &s->m;
	if (!pl || !policy_match(pl, ep->policy_id, dir, s))
		return SG_DROP_NO_RULE;
	s->rule = m->rule_index;
	s->now = sg_now(cfg);
	if (!ct_opens(&p->f))  /* ICMP errors, replies and other types: per packet */
		return SG_ALLOW_UNTRACKED;
	if (policy_untracked(ep, dir, &p->f, m, &s->wm))
		return SG_ALLOW_UNTRACKED;
	if (ep->flags & SG_EP_PROBE)
		return SG_ALLOW_NEW;
	if (ct_create(&key, exists, dir, p, ep, m->rule_index, s->now, 0)) {
		s->rule = 0;
		return SG_DROP_CT_FULL;
	}
	return SG_ALLOW_NEW;
}

static __always_inline int sg_verdict(struct sg_endpoint *ep, struct sg_config *cfg, __u8 dir,
				      struct sg_scratch *s, void *data, void *end, __u32 bytes)
{
	struct sg_pkt *p = &s->p;
	int rc = parse_packet(data, end, bytes, p);
	if (rc)
		return rc;
	rc = sg_mac_check(ep, dir, p);
	if (rc)
		return rc;
	if (p->is_arp) {  /* never filtered by the rules; only its claim is checked */
		rc = sg_addr_check(ep, dir, p);
		return rc ? rc : SG_ALLOW_EXEMPT;
	}
	if (p->frag == SG_FRAG_LATER) {  /* (its first fragment passed the checks) */
		struct sg_frag_key fk = {};
		frag_key_of(&fk, ep->ep_id, p);
		if (frag_known(&fk, sg_now(cfg)))
			return SG_ALLOW_FRAGMENT;
		rc = sg_addr_check(ep, dir, p);  /* the more telling reason, when it applies */
		return rc ? rc : SG_DROP_FRAG_UNKNOWN;
	}
	rc = sg_decide(ep, cfg, dir, s);
	if (p->frag == SG_FRAG_FIRST && SG_IS_ALLOWED(rc)) {
		struct sg_frag_key fk = {};
		frag_key_of(&fk, ep->ep_id, p);
		frag_remember(&fk, sg_now(cfg));
	}
	return rc;
}

/* Returns 1 to pass, 0 to drop. ``bytes`` is the whole frame's length. */
static __always_inline int sg_process(__u32 ifindex, int hook, void *data, void *end, __u32 bytes)
{
	struct sg_endpoint *ep = sg_endpoint_of(ifindex);
	if (!ep) {
		count_verdict(0, hook == SG_HOOK_XDP ? SG_DIR_EGRESS : SG_DIR_INGRESS,
			      SG_PASS_UNBOUND, bytes);
		return 1;
	}
	/* workload: XDP sees the instance's egress; host: XDP sees ingress */
	__u8 dir;
	if (hook == SG_HOOK_XDP)
		dir = ep->mode == SG_MODE_HOST ? SG_DIR_INGRESS : SG_DIR_EGRESS;
	else
		dir = ep->mode == SG_MODE_HOST ? SG_DIR_EGRESS : SG_DIR_INGRESS;
	__u32 zero = 0;
	struct sg_scratch *s = sg_scratch.lookup(&zero);
	if (!s)  /* cannot happen: an array slot always exists */
		return 0;
	__builtin_memset(&s->p, 0, sizeof(s->p));  /* the rest is set before it is read */
	__builtin_memset(&s->m, 0, sizeof(s->m));
	s->rule = 0;
	struct sg_config *cfg = sg_config.lookup(&zero);
	int reason = sg_verdict(ep, cfg, dir, s, data, end, bytes);
	count_verdict(ep->ep_id, dir, reason, bytes);
	if (!(ep->flags & SG_EP_PROBE)) {
		if (s->rule)
			count_rule(s->rule, bytes, s->now);
		if (cfg && (cfg->flags & SG_CFG_FLOW_LOG) && flow_logged(reason, &s->p))
			flow_event(cfg, ep->ep_id, dir, reason, s);
	}
	return SG_IS_ALLOWED(reason);
}

int xdp_sg(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	return sg_process(ctx->ingress_ifindex, SG_HOOK_XDP, data, end, end - data) ?
	       XDP_PASS : XDP_DROP;
}

/* Do the linear bytes already hold a plain TCP/UDP packet's headers
 * (Ethernet, IPv4 without fragmenting or IPv6 without extension headers,
 * the L4 header)? The common case of big GSO skbs: no pull needed. */
static __always_inline int sg_headers_linear(void *data, void *end)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return 0;
	void *l3 = eth + 1;
	__u8 proto;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = l3;
		if ((void *)(ip + 1) > end || (ip->frag_off & bpf_htons(0x3FFF)))
			return 0;
		proto = ip->protocol;
		l3 += ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = l3;
		if ((void *)(ip6 + 1) > end)
			return 0;
		proto = ip6->nexthdr;
		l3 = ip6 + 1;
	} else {
		return 0;
	}
	if (proto == IPPROTO_TCP)
		return l3 + sizeof(struct tcphdr) <= end;
	if (proto == IPPROTO_UDP)
		return l3 + sizeof(struct udphdr) <= end;
	return 0;
}

int tc_sg(struct __sk_buff *skb)
{
	/* headers of locally built packets can sit in paged data: unless a
	 * plain TCP/UDP header is already linear, pull enough for Ethernet +
	 * VLANs + IPv6 + extension headers + an ICMP error */
	long linear = (long)skb->data_end - (long)skb->data;
	if (linear < skb->len && linear < 256 &&
	    !sg_headers_linear((void *)(long)skb->data, (void *)(long)skb->data_end))
		bpf_skb_pull_data(skb, skb->len < 256 ? skb->len : 256);
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	return sg_process(skb->ifindex, SG_HOOK_TC_EGRESS, data, end, skb->len) ?
	       TC_ACT_OK : TC_ACT_SHOT;
}
