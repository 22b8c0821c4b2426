/* SourceDestCheck (1.6) and the exemptions nobody can borrow (1.3): what
 * an instance may claim as its own address, and which traffic is never
 * judged by the rules. Every check is a fixed number of map lookups. */
#ifndef SG_ADDRCHECK_H
#define SG_ADDRCHECK_H

#include "maps.h"
#include "parse.h"

#define SG_ICMPV6_RS       133
#define SG_ICMPV6_RA       134
#define SG_ICMPV6_NS       135
#define SG_ICMPV6_NA       136
#define SG_ICMPV6_REDIRECT 137
#define SG_ICMPV6_MLD2_REPORT 143
#define SG_ND_HOP_LIMIT    255

static __always_inline int local_lookup(struct sg_endpoint *ep, __u8 family, __u8 kind,
					__be32 *addr)
{
	if (kind == SG_LOCAL_ADDR) {  /* the address the endpoint value holds: no lookup */
		if (family == 4 && ep->addr4 && addr[0] == ep->addr4)
			return 1;
		if (family == 6 && ep->addr6[0] && addr[0] == ep->addr6[0] &&
		    addr[1] == ep->addr6[1] && addr[2] == ep->addr6[2] && addr[3] == ep->addr6[3])
			return 1;
	}
	/* IPv4 addresses sit in word 0 with the rest zero, as the parser leaves them */
	struct sg_local_key k = { .addr_id = ep->addr_id, .family = family, .kind = kind };
	k.addr[0] = addr[0];
	k.addr[1] = addr[1];
	if (kind == SG_LOCAL_ADDR) {
		k.addr[2] = addr[2];
		k.addr[3] = addr[3];
	}
	return sg_local_addrs.lookup(&k) != 0;
}

static __always_inline int addr_eq(__be32 *a, __be32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline int addr_unspecified(__u8 family, __be32 *a)
{
	return a[0] == 0 && (family == 4 || (a[1] == 0 && a[2] == 0 && a[3] == 0));
}

static __always_inline int ip6_linklocal(__be32 *a)   /* fe80::/10 */
{
	return (bpf_ntohl(a[0]) & 0xFFC00000) == 0xFE800000;
}

static __always_inline int ip6_mcast_link(__be32 *a)  /* ff02::/16 */
{
	return (bpf_ntohl(a[0]) >> 16) == 0xFF02;
}

/* broadcast or multicast: the only destinations an interface accepts that
 * are not its own addresses */
static __always_inline int dst_group(struct sg_pkt *p)
{
	__u32 d = bpf_ntohl(p->f.dst[0]);
	if (p->f.family == 4)
		return (d >> 28) == 0xE || d == 0xFFFFFFFF || p->l2_mcast;
	return (d >> 24) == 0xFF;
}

/* An unspecified source is how DHCP discovery (v4) and duplicate address
 * detection (v6: its NS and MLD reports) start; nothing else may use it. */
static __always_inline int unspecified_ok(struct sg_pkt *p)
{
	struct sg_flow *f = &p->f;
	if (p->frag)
		return 0;
	if (f->family == 4)
		return f->proto == SG_IPPROTO_UDP && f->sport == bpf_htons(68) &&
		       f->dport == bpf_htons(67);
	return f->proto == SG_IPPROTO_ICMPV6 &&
	       (f->icmp_type == SG_ICMPV6_NS || f->icmp_type == SG_ICMPV6_MLD2_REPORT);
}

static __always_inline int mac_eq(__u8 *a, __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] &&
	       a[5] == b[5];
}

/* Every frame the instance sends, connection or not, must carry its MAC
 * when one is declared: a forged one would teach the bridge to deliver
 * another instance's traffic here. ARP must name it as the sender too. */
static __always_inline int sg_mac_check(struct sg_endpoint *ep, __u8 dir, struct sg_pkt *p)
{
	if (dir != SG_DIR_EGRESS || (ep->flags & (SG_EP_SRC_CHECK | SG_EP_MAC)) !=
	    (SG_EP_SRC_CHECK | SG_EP_MAC))
		return 0;
	if (!mac_eq(p->l2_src, ep->mac))
		return p->is_arp ? SG_DROP_NEIGH_SPOOF : SG_DROP_SRC_SPOOF;
	if (p->is_arp && p->arp_ipv4 && !mac_eq(p->arp_sha, ep->mac))
		return SG_DROP_NEIGH_SPOOF;
	return 0;
}

/* SourceDestCheck: 0, or the drop reason. ARP and ND from the instance may
 * claim only its own addresses; it may not act as a router. */
static __always_inline int sg_addr_check(struct sg_endpoint *ep, __u8 dir, struct sg_pkt *p)
{
	struct sg_flow *f = &p->f;
	if (!(ep->flags & SG_EP_SRC_CHECK))
		return 0;
	if (p->is_arp) {
		if (dir != SG_DIR_EGRESS)
			return 0;
		if (p->arp_ipv4 && (f->src[0] == 0 || local_lookup(ep, 4, SG_LOCAL_ADDR, f->src)))
			return 0;
		return SG_DROP_NEIGH_SPOOF;
	}
	if (dir == SG_DIR_INGRESS) {
		if (dst_group(p) || local_lookup(ep, f->family, SG_LOCAL_ADDR, f->dst))
			return 0;
		return SG_DROP_DST_FOREIGN;
	}
	if (!local_lookup(ep, f->family, SG_LOCAL_ADDR, f->src) &&
	    !(addr_unspecified(f->family, f->src) && unspecified_ok(p)))
		return SG_DROP_SRC_SPOOF;
	if (f->family == 6 && f->proto == SG_IPPROTO_ICMPV6 && !p->frag) {
		if (f->icmp_type == SG_ICMPV6_RA || f->icmp_type == SG_ICMPV6_REDIRECT)
			return SG_DROP_ND_ROUTER;
		if (f->icmp_type == SG_ICMPV6_NA &&
		    !(p->has_target && local_lookup(ep, 6, SG_LOCAL_ADDR, p->nd_target)))
			return SG_DROP_NEIGH_SPOOF;
	}
	return 0;
}

/* Neighbour discovery (1.3): IPv6 only, hop limit 255, code 0, unfragmented,
 * router messages from a link-local source, and on the link: to a
 * link-local or link-scope multicast address or within one of the
 * interface's /64s. Anything else of types 133-137 is judged by the rules. */
static __always_inline int sg_nd_exempt(struct sg_endpoint *ep, struct sg_pkt *p)
{
	struct sg_flow *f = &p->f;
	if (f->family != 6 || f->proto != SG_IPPROTO_ICMPV6 || f->icmp_type < SG_ICMPV6_RS ||
	    f->icmp_type > SG_ICMPV6_REDIRECT || f->icmp_code || p->frag ||
	    p->hop_limit != SG_ND_HOP_LIMIT)
		return 0;
	if ((f->icmp_type == SG_ICMPV6_RA || f->icmp_type == SG_ICMPV6_REDIRECT) &&
	    !ip6_linklocal(f->src))
		return 0;
	if (ip6_linklocal(f->dst) || ip6_mcast_link(f->dst))
		return 1;
	return local_lookup(ep, 6, SG_LOCAL_ONLINK64, f->dst);
}

static __always_inline __u8 exempt_bits(__u8 family, __be32 *addr)
{
	struct sg_exempt_key k = { .prefixlen = family == 4 ? 64 : 160, .family = family };
	__builtin_memcpy(k.addr, addr, 16);
	__u8 *v = sg_exempt_lpm.lookup(&k);
	return v ? *v : 0;
}

#define SG_DHCP_NONE    0
#define SG_DHCP_REQUEST 1  /* the interface asks: exempt, refreshes its pseudo-connection */
#define SG_DHCP_REPLY   2  /* an answer to the interface: exempt if it asked */

/* DHCP, client side only (1.3): requests from the interface's client port
 * to the server port, sent to broadcast / ff02::1:2 or a configured
 * server; and answers from the server port to the client port. */
static __always_inline int sg_dhcp_kind(struct sg_config *cfg, __u8 dir, struct sg_pkt *p)
{
	struct sg_flow *f = &p->f;
	if (!cfg || !(cfg->flags & SG_CFG_EXEMPT_DHCP) || f->proto != SG_IPPROTO_UDP || p->frag)
		return SG_DHCP_NONE;
	__be16 client = bpf_htons(f->family == 4 ? 68 : 546);
	__be16 server = bpf_htons(f->family == 4 ? 67 : 547);
	if (dir == SG_DIR_EGRESS) {
		if (f->sport != client || f->dport != server)
			return SG_DHCP_NONE;
		int group = f->family == 4 ? f->dst[0] == 0xFFFFFFFF :
			    (f->dst[0] == bpf_htonl(0xFF020000) && f->dst[1] == 0 &&
			     f->dst[2] == 0 && f->dst[3] == bpf_htonl(0x00010002));
		if (group || (exempt_bits(f->family, f->dst) & SG_EXEMPT_DHCP_SERVER))
			return SG_DHCP_REQUEST;
		return SG_DHCP_NONE;
	}
	if (f->sport != server || f->dport != client)
		return SG_DHCP_NONE;
	if ((cfg->flags & SG_CFG_DHCP_SERVERS) &&
	    !(exempt_bits(f->family, f->src) & SG_EXEMPT_DHCP_SERVER))
		return SG_DHCP_NONE;
	return SG_DHCP_REPLY;
}

#endif
