/* Header-cursor parsing. Each parse_* checks its own bounds and returns 0 or
 * the named drop reason; nothing past data_end is ever read. */
#ifndef SG_PARSE_H
#define SG_PARSE_H

#include "reasons.h"

#define VLAN_MAX_DEPTH 2   /* 802.1ad outer + 802.1Q inner */
#define IPV6_EXT_MAX   8   /* extension headers walked before giving up */

#define SG_ETH_P_IP    0x0800
#define SG_ETH_P_ARP   0x0806
#define SG_ETH_P_IPV6  0x86DD
#define SG_ETH_P_8021Q 0x8100
#define SG_ETH_P_8021AD 0x88A8

#define SG_IPPROTO_ICMP   1
#define SG_IPPROTO_TCP    6
#define SG_IPPROTO_UDP    17
#define SG_IPPROTO_ICMPV6 58
#define SG_NEXTHDR_HOP    0
#define SG_NEXTHDR_ROUTING 43
#define SG_NEXTHDR_FRAGMENT 44
#define SG_NEXTHDR_AUTH   51
#define SG_NEXTHDR_DEST   60

#define SG_FRAG_NONE  0
#define SG_FRAG_FIRST 1    /* offset 0, more fragments follow: carries the ports */
#define SG_FRAG_LATER 2    /* offset > 0: no L4 header */

#define TCP_F_FIN 0x01
#define TCP_F_SYN 0x02
#define TCP_F_RST 0x04
#define TCP_F_ACK 0x10
#define TCP_F_URG 0x20
/* Valid flag combinations with PSH/ECE/CWR masked out (bit n = flags value n),
 * the table Linux nf_conntrack uses: SYN, SYN|URG, SYN|ACK, RST, RST|ACK,
 * FIN|ACK, FIN|ACK|URG, ACK, ACK|URG. */
#define TCP_VALID_FLAGS_MASK ((1ULL << 2) | (1ULL << 34) | (1ULL << 18) | (1ULL << 4) | \
			      (1ULL << 20) | (1ULL << 17) | (1ULL << 49) | (1ULL << 16) | \
			      (1ULL << 48))

#define SG_ARP_LEN     28  /* Ethernet/IPv4 ARP */
#define SG_ND_TARGET_END 24 /* NS/NA: 8 bytes of header, then the target address */

struct hdr_cursor {
	void *pos;
	void *start;
	__u32 wire_len;  /* whole packet: tc sees only the linear part in [data, end) */
	__u32 ip_end;    /* offset where the IP packet ends (Ethernet padding follows) */
};

/* Bytes of the packet from the cursor to its end on the wire. */
static __always_inline __u32 cursor_wire_left(struct hdr_cursor *c)
{
	__u32 off = c->pos - c->start;
	return off < c->wire_len ? c->wire_len - off : 0;
}

/* Do n more bytes from the cursor belong to the IP packet? (Bytes past its
 * total length are link padding: never read as headers.) */
static __always_inline int cursor_in_ip(struct hdr_cursor *c, __u32 n)
{
	__u32 off = c->pos - c->start;
	return off + n <= c->ip_end;
}

struct sg_vlan_hdr {
	__be16 tci;
	__be16 encap_proto;
};

/* What one IP packet looks like to the policy. Addresses stay in network
 * order; IPv4 uses word 0 of the 4-word arrays. */
struct sg_flow {
	__be32 src[4];
	__be32 dst[4];
	__be16 sport;      /* TCP/UDP */
	__be16 dport;
	__be16 rule_port;  /* what port rules compare: dport, or ICMP type<<8|code */
	__be16 echo_id;    /* ICMP query identifier (echo, timestamp, ...) */
	__u8 family;       /* 4 or 6 */
	__u8 proto;
	__u8 icmp_type;
	__u8 icmp_code;
};

struct sg_pkt {
	struct sg_flow f;      /* ARP: sender address in src, target in dst */
	struct sg_flow inner;  /* the header inside an ICMP error */
	__be32 nd_target[4];   /* NS/NA target address (has_target) */
	__u32 frag_id;
	__u32 ip_len;          /* IP bytes on the wire (header included) */
	__u8 frag;             /* SG_FRAG_* */
	__u8 frag_proto;       /* protocol of the fragmentable part: the same in
				* every fragment of a datagram (fragment key) */
	__u8 tcp_flags;
	__u8 icmp_error;       /* inner is valid */
	__u8 is_arp;
	__u8 arp_ipv4;         /* ARP for IPv4 over Ethernet: addresses are valid */
	__u8 hop_limit;        /* IPv6 hop limit (neighbour discovery needs 255) */
	__u8 l2_mcast;         /* Ethernet destination is broadcast/multicast */
	__u8 l2_src[6];        /* Ethernet source */
	__u8 arp_sha[6];       /* ARP sender hardware address (arp_ipv4) */
	__u8 has_target;
};

/* ICMP query/reply pairs (1.4): echo, timestamp, information, address mask;
 * ICMPv6 echo. Returns the pair's request type, 0 for any other type. */
static __always_inline __u8 sg_icmp_query(__u8 proto, __u8 type)
{
	if (proto == SG_IPPROTO_ICMP) {
		if (type == 8 || type == 0)
			return 8;
		if (type >= 13 && type <= 18)
			return type & 1 ? type : type - 1;  /* 13/14, 15/16, 17/18 */
		return 0;
	}
	if (proto == SG_IPPROTO_ICMPV6 && (type == 128 || type == 129))
		return 128;
	return 0;
}

static __always_inline int sg_is_icmp_error(__u8 proto, __u8 type)
{
	if (proto == SG_IPPROTO_ICMP)
		return type == 3 || type == 11 || type == 12;
	if (proto == SG_IPPROTO_ICMPV6)
		return type >= 1 && type <= 4;
	return 0;
}

/* Ethernet + up to VLAN_MAX_DEPTH tags. *eth_type gets the inner type (host order). */
static __always_inline int parse_ethhdr(struct hdr_cursor *c, void *end, __u16 *eth_type,
					struct sg_pkt *p)
{
	struct ethhdr *eth = c->pos;
	if ((void *)(eth + 1) > end)
		return SG_DROP_L2_MALFORMED;
	c->pos = eth + 1;
	p->l2_mcast = eth->h_dest[0] & 1;
	__builtin_memcpy(p->l2_src, eth->h_source, 6);
	__u16 type = bpf_ntohs(eth->h_proto);
#pragma unroll
	for (int i = 0; i < VLAN_MAX_DEPTH; i++) {
		if (type != SG_ETH_P_8021Q && type != SG_ETH_P_8021AD)
			break;
		struct sg_vlan_hdr *vh = c->pos;
		if ((void *)(vh + 1) > end)
			return SG_DROP_L2_MALFORMED;
		c->pos = vh + 1;
		type = bpf_ntohs(vh->encap_proto);
	}
	if (type == SG_ETH_P_8021Q || type == SG_ETH_P_8021AD)
		return SG_DROP_VLAN_DEPTH;
	*eth_type = type;
	return 0;
}

/* IPv4 header with options. Sets addresses, protocol and fragment state. */
static __always_inline int parse_ipv4(struct hdr_cursor *c, void *end, struct sg_pkt *p)
{
	struct iphdr *ip = c->pos;
	if ((void *)(ip + 1) > end)
		return SG_DROP_IPV4_MALFORMED;
	__u32 hlen = ip->ihl * 4;
	if (ip->version != 4 || hlen < sizeof(*ip))
		return SG_DROP_IPV4_MALFORMED;
	if (c->pos + hlen > end)
		return SG_DROP_IPV4_MALFORMED;
	__u32 tot = bpf_ntohs(ip->tot_len);
	if (tot < hlen || tot > cursor_wire_left(c))
		return SG_DROP_IPV4_MALFORMED;
	p->f.family = 4;
	p->ip_len = tot;
	c->ip_end = (c->pos - c->start) + tot;
	p->f.proto = ip->protocol;
	p->frag_proto = ip->protocol;
	p->hop_limit = ip->ttl;
	p->f.src[0] = ip->saddr;
	p->f.dst[0] = ip->daddr;
	__u16 frag = bpf_ntohs(ip->frag_off);
	p->frag_id = bpf_ntohs(ip->id);
	if (frag & 0x1FFF)
		p->frag = SG_FRAG_LATER;
	else if (frag & 0x2000)
		p->frag = SG_FRAG_FIRST;
	c->pos += hlen;
	return 0;
}

/* IPv6 header and extension-header chain (bounded by IPV6_EXT_MAX). */
static __always_inline int parse_ipv6(struct hdr_cursor *c, void *end, struct sg_pkt *p)
{
	struct ipv6hdr *ip6 = c->pos;
	if ((void *)(ip6 + 1) > end)
		return SG_DROP_IPV6_MALFORMED;
	if (ip6->version != 6 ||
	    sizeof(*ip6) + bpf_ntohs(ip6->payload_len) > cursor_wire_left(c))
		return SG_DROP_IPV6_MALFORMED;
	p->f.family = 6;
	p->ip_len = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	c->ip_end = (c->pos - c->start) + p->ip_len;
	p->hop_limit = ip6->hop_limit;
	__builtin_memcpy(p->f.src, &ip6->saddr, 16);
	__builtin_memcpy(p->f.dst, &ip6->daddr, 16);
	__u8 nexthdr = ip6->nexthdr;
	c->pos = ip6 + 1;
#pragma unroll
	for (int i = 0; i < IPV6_EXT_MAX; i++) {
		if (nexthdr == SG_NEXTHDR_HOP || nexthdr == SG_NEXTHDR_ROUTING ||
		    nexthdr == SG_NEXTHDR_DEST) {
			__u8 *opt = c->pos;
			if ((void *)(opt + 2) > end)
				return SG_DROP_IPV6_MALFORMED;
			__u32 len = ((__u32)opt[1] + 1) * 8;
			if (c->pos + len > end)
				return SG_DROP_IPV6_MALFORMED;
			nexthdr = opt[0];
			c->pos += len;
		} else if (nexthdr == SG_NEXTHDR_AUTH) {
			__u8 *ah = c->pos;
			if ((void *)(ah + 2) > end)
				return SG_DROP_IPV6_MALFORMED;
			__u32 len = ((__u32)ah[1] + 2) * 4;
			if (c->pos + len > end)
				return SG_DROP_IPV6_MALFORMED;
			nexthdr = ah[0];
			c->pos += len;
		} else if (nexthdr == SG_NEXTHDR_FRAGMENT) {
			struct frag_hdr { __u8 nexthdr; __u8 res; __be16 off; __be32 id; } *fh = c->pos;
			if ((void *)(fh + 1) > end)
				return SG_DROP_IPV6_MALFORMED;
			__u16 off = bpf_ntohs(fh->off);
			p->frag_id = bpf_ntohl(fh->id);
			nexthdr = fh->nexthdr;
			p->frag_proto = nexthdr;
			c->pos = fh + 1;
			if (off & 0xFFF8) {
				p->frag = SG_FRAG_LATER;
				p->f.proto = nexthdr;
				return 0;
			}
			if (off & 1)
				p->frag = SG_FRAG_FIRST;
		} else {
			p->f.proto = nexthdr;
			return 0;
		}
	}
	if (nexthdr == SG_NEXTHDR_HOP || nexthdr == SG_NEXTHDR_ROUTING || nexthdr == SG_NEXTHDR_DEST ||
	    nexthdr == SG_NEXTHDR_AUTH || nexthdr == SG_NEXTHDR_FRAGMENT)
		return SG_DROP_EXTHDR_LIMIT;
	p->f.proto = nexthdr;
	return 0;
}

/* The IP header + first 8 bytes carried inside an ICMP error (RFC 792/4443). */
static __always_inline int parse_icmp_inner(struct hdr_cursor *c, void *end, struct sg_pkt *p)
{
	struct sg_flow *in = &p->inner;
	in->family = p->f.family;
	if (p->f.family == 4) {
		struct iphdr *ip = c->pos;
		if ((void *)(ip + 1) > end || ip->version != 4 || ip->ihl < 5)
			return SG_DROP_ICMP_EMBEDDED;
		in->proto = ip->protocol;
		in->src[0] = ip->saddr;
		in->dst[0] = ip->daddr;
		c->pos += ip->ihl * 4;
	} else {
		struct ipv6hdr *ip6 = c->pos;
		if ((void *)(ip6 + 1) > end || ip6->version != 6)
			return SG_DROP_ICMP_EMBEDDED;
		in->proto = ip6->nexthdr;
		__builtin_memcpy(in->src, &ip6->saddr, 16);
		__builtin_memcpy(in->dst, &ip6->daddr, 16);
		c->pos = ip6 + 1;
	}
	__u8 *l4 = c->pos;
	if ((void *)(l4 + 8) > end || !cursor_in_ip(c, 8))
		return SG_DROP_ICMP_EMBEDDED;
	if (in->proto == SG_IPPROTO_TCP || in->proto == SG_IPPROTO_UDP) {
		in->sport = *(__be16 *)l4;
		in->dport = *(__be16 *)(l4 + 2);
	} else if (in->proto == SG_IPPROTO_ICMP || in->proto == SG_IPPROTO_ICMPV6) {
		in->icmp_type = l4[0];
		in->echo_id = *(__be16 *)(l4 + 4);
	}
	p->icmp_error = 1;
	return 0;
}

/* TCP/UDP/ICMP header of an unfragmented packet or a first fragment. */
static __always_inline int parse_l4(struct hdr_cursor *c, void *end, struct sg_pkt *p)
{
	__u8 proto = p->f.proto;
	if (proto == SG_IPPROTO_TCP) {
		struct tcphdr *th = c->pos;
		if ((void *)(th + 1) > end || !cursor_in_ip(c, sizeof(*th)) || th->doff < 5)
			return SG_DROP_L4_TRUNCATED;
		p->f.sport = th->source;
		p->f.dport = th->dest;
		p->f.rule_port = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		if (!((TCP_VALID_FLAGS_MASK >> (p->tcp_flags & 0x37)) & 1))
			return SG_DROP_TCP_FLAGS;
	} else if (proto == SG_IPPROTO_UDP) {
		struct udphdr *uh = c->pos;
		if ((void *)(uh + 1) > end || !cursor_in_ip(c, sizeof(*uh)))
			return SG_DROP_L4_TRUNCATED;
		p->f.sport = uh->source;
		p->f.dport = uh->dest;
		p->f.rule_port = uh->dest;
	} else if (proto == SG_IPPROTO_ICMP || proto == SG_IPPROTO_ICMPV6) {
		__u8 *ic = c->pos;
		if ((void *)(ic + 8) > end || !cursor_in_ip(c, 8))
			return SG_DROP_L4_TRUNCATED;
		p->f.icmp_type = ic[0];
		p->f.icmp_code = ic[1];
		p->f.rule_port = *(__be16 *)ic;  /* type, code: already type<<8|code in network order */
		p->f.echo_id = *(__be16 *)(ic + 4);
		if (proto == SG_IPPROTO_ICMPV6 && (ic[0] == 135 || ic[0] == 136) &&
		    (void *)(ic + SG_ND_TARGET_END) <= end && cursor_in_ip(c, SG_ND_TARGET_END)) {
			__builtin_memcpy(p->nd_target, ic + 8, 16);
			p->has_target = 1;
		}
		c->pos = ic + 8;
		if (sg_is_icmp_error(proto, ic[0]))
			return parse_icmp_inner(c, end, p);
	}
	return 0;
}

/* ARP: the sender and target protocol addresses when it is IPv4 over
 * Ethernet (anything else has arp_ipv4 = 0). */
static __always_inline int parse_arp(struct hdr_cursor *c, void *end, struct sg_pkt *p)
{
	__u8 *a = c->pos;
	p->is_arp = 1;
	if ((void *)(a + 8) > end)
		return SG_DROP_L2_MALFORMED;
	if (a[0] != 0 || a[1] != 1 || a[2] != 0x08 || a[3] != 0 || a[4] != 6 || a[5] != 4)
		return 0;
	if ((void *)(a + SG_ARP_LEN) > end)
		return SG_DROP_L2_MALFORMED;
	p->arp_ipv4 = 1;
	p->f.family = 4;
	__builtin_memcpy(p->arp_sha, a + 8, 6);
	__builtin_memcpy(p->f.src, a + 14, 4);
	__builtin_memcpy(p->f.dst, a + 24, 4);
	return 0;
}

/* The whole frame. Returns 0 for an IP or ARP packet to judge, or a drop
 * reason. */
static __always_inline int parse_packet(void *data, void *end, __u32 wire_len, struct sg_pkt *p)
{
	struct hdr_cursor c = { .pos = data, .start = data, .wire_len = wire_len };
	__u16 eth_type = 0;
	int rc = parse_ethhdr(&c, end, &eth_type, p);
	if (rc)
		return rc;
	if (eth_type == SG_ETH_P_ARP)
		return parse_arp(&c, end, p);
	if (eth_type == SG_ETH_P_IP)
		rc = parse_ipv4(&c, end, p);
	else if (eth_type == SG_ETH_P_IPV6)
		rc = parse_ipv6(&c, end, p);
	else
		return SG_DROP_L3_UNSUPPORTED;
	if (rc)
		return rc;
	if (p->frag == SG_FRAG_LATER)
		return 0;
	return parse_l4(&c, end, p);
}

#endif
