/* Verdict reasons: every packet is counted under exactly one.
 * Mirrored by controller/abi/reasons.py (checked by tests/test_abi.py). */
#ifndef SG_REASONS_H
#define SG_REASONS_H

enum sg_reason {
	/* allowed */
	SG_ALLOW_ESTABLISHED   = 0,  /* packet of a tracked connection */
	SG_ALLOW_RELATED       = 1,  /* ICMP error about a tracked connection */
	SG_ALLOW_NEW           = 2,  /* allowed by a rule, now tracked */
	SG_ALLOW_UNTRACKED     = 3,  /* allowed by a rule, untracked flow */
	SG_ALLOW_EXEMPT        = 4,  /* ARP, ND, DHCP, infrastructure address */
	SG_ALLOW_FRAGMENT      = 5,  /* later fragment of an allowed datagram */
	SG_PASS_UNBOUND        = 6,  /* device not bound to an interface */
	/* dropped */
	SG_DROP_NO_RULE        = 16, /* no rule of any group allows it */
	SG_DROP_L2_MALFORMED   = 17, /* truncated Ethernet or VLAN header */
	SG_DROP_VLAN_DEPTH     = 18, /* more than VLAN_MAX_DEPTH tags */
	SG_DROP_L3_UNSUPPORTED = 19, /* neither IPv4, IPv6 nor ARP */
	SG_DROP_IPV4_MALFORMED = 20, /* bad version/IHL/total length */
	SG_DROP_IPV6_MALFORMED = 21, /* truncated header or extension header */
	SG_DROP_EXTHDR_LIMIT   = 22, /* more than IPV6_EXT_MAX extension headers */
	SG_DROP_L4_TRUNCATED   = 23, /* TCP/UDP/ICMP header cut short */
	SG_DROP_TCP_FLAGS      = 24, /* illegal TCP flag combination */
	SG_DROP_FRAG_UNKNOWN   = 25, /* fragment of a datagram never allowed */
	SG_DROP_ICMP_EMBEDDED  = 26, /* ICMP error with truncated embedded header */
	SG_DROP_CT_FULL        = 27, /* new connection, conntrack table full */
	SG_DROP_SRC_SPOOF      = 28, /* from the instance, source not its address (1.6) */
	SG_DROP_DST_FOREIGN    = 29, /* to the instance, destination not its address (1.6) */
	SG_DROP_NEIGH_SPOOF    = 30, /* ARP/ND from the instance claiming another's address */
	SG_DROP_ND_ROUTER      = 31, /* router advertisement or redirect from an instance */
};

#define SG_REASON_MAX 32
#define SG_IS_ALLOWED(r) ((r) < 16)

#endif
