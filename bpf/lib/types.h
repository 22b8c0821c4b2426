/* Every struct that crosses the kernel/user boundary, and nothing else.
 * Mirrored field by field in controller/abi/__init__.py; tests/test_abi.py compares
 * the mirror with the layout bcc derives from this header. */
#ifndef SG_TYPES_H
#define SG_TYPES_H

#define SG_DIR_INGRESS 0   /* towards the instance */
#define SG_DIR_EGRESS  1   /* from the instance */

#define SG_MODE_WORKLOAD 0 /* device = host end of an instance's veth/tap */
#define SG_MODE_HOST     1 /* device = this host's own interface */

#define SG_PROTO_ANY 256   /* port-table key for rules of protocol -1 */
#define SG_FLAG_WORLD 0x1  /* segment has a rule with peer 0.0.0.0/0 or ::/0 */

/* sg_config.flags */
#define SG_CFG_EXEMPT_DHCP  0x1 /* DHCP client traffic is exempt (1.3) */
#define SG_CFG_FLOW_LOG     0x2 /* flow logs on: connection accounting and flow events */
#define SG_CFG_DHCP_SERVERS 0x4 /* DHCP servers are configured: only they may answer */

/* sg_exempt_lpm values: what an infrastructure address is */
#define SG_EXEMPT_SERVICE     0x1 /* DNS, metadata, time: exempt as a destination */
#define SG_EXEMPT_DHCP_SERVER 0x2 /* a configured DHCP server */

/* sg_endpoint.flags */
#define SG_EP_PROBE 0x1    /* `sgctl explain`'s probe: decide, but create no
			    * conntrack entry and count no rule hit */
#define SG_EP_SRC_CHECK 0x2 /* SourceDestCheck (1.6): the instance may send only
			     * from, and receive only at, its own addresses */
#define SG_EP_MAC 0x4       /* ... and only from its own MAC (mac is valid) */

/* sg_ct_entry.flags */
#define SG_CT_F_EXEMPT 0x1 /* opened by exempt traffic (infrastructure, DHCP):
			    * not a flow-log record, never revalidated */
#define SG_CT_F_DHCP   0x2 /* the DHCP client's pseudo-connection: looked up by
			    * DHCP answers only, never by a packet's own key */
#define SG_CT_F_REPLIED 0x4 /* TCP: the reply side answered (SYN-ACK); the
			     * origin's next packet establishes the connection */

/* A half-open (SG_CT_NEW) connection of an interface with an allowance
 * holds a slot of that interface's range of sg_ct_ring. Each new
 * connection takes the next slot of the range (sg_ct_quota.next, modulo the
 * range's size); if the slot's connection is still half-open, it is the
 * interface's oldest one and is deleted first. So an interface never holds
 * more half-open connections than its allowance, a flood of forged SYNs
 * reclaims only its own interface's oldest half-open entries, and a
 * connection that has seen traffic both ways (SG_CT_ESTABLISHED or later;
 * for TCP: the origin spoke after the reply, the handshake's ACK) is never
 * evicted. Two CPUs taking slots at once may each evict; the bound holds
 * per slot.
 *
 * An interface also holds at most sg_endpoint.ct_limit connections in all
 * (half-open or not), so one interface's two-way flows cannot fill the
 * host's table. Its count is kept by whoever adds or deletes its entries:
 * created - evicted (the datapath's, here) - sg_ct_removed (the
 * controller's deletions: GC, flush, cuts). A new connection past the
 * limit is dropped (SG_DROP_CT_FULL) after the ring reclaimed its oldest
 * half-open one, if it had one. The count can lag by the rare entry the
 * GC deletes while a packet revives it (then uncounted): small, and only
 * ever in the interface's favour. */
struct sg_ct_quota {
	__u64 next;           /* slots taken so far (atomic) */
	__u64 evicted;        /* half-open connections deleted to make room (atomic) */
	__u64 created;        /* entries of new keys inserted (atomic) */
};

/* sg_ct_entry.fin for UDP: the origin spoke again after the reply (the
 * second transaction's request; its reply makes the flow a stream) */
#define SG_CT_UDP_ASKED 0x1

/* conntrack states */
#define SG_CT_NEW         1 /* one direction seen (TCP: until the handshake's ACK) */
#define SG_CT_ESTABLISHED 2 /* reply seen */
#define SG_CT_STREAM      3 /* UDP: traffic after the reply (stream timeout) */
#define SG_CT_CLOSING     4 /* TCP: RST, or FIN both ways */

/* indexes of sg_endpoint.timeouts */
enum sg_timeout {
	SG_TO_TCP_ESTABLISHED = 0,
	SG_TO_UDP_STREAM      = 1,
	SG_TO_UDP_OTHER       = 2,
	SG_TO_TCP_SYN         = 3,
	SG_TO_TCP_CLOSING     = 4,
	SG_TO_ICMP            = 5,
	SG_TO_OTHER           = 6,
	SG_TO_MAX             = 7,
};

/* sg_endpoints value. Written by the controller in one map update, which is
 * what makes a policy switch atomic: policy_id, open_all and
 * world_class always belong to the same compiled policy. */
struct sg_endpoint {
	__u32 ep_id;          /* conntrack and counter identity; never reused while bound */
	__u32 policy_id;      /* generation-unique id of the compiled group set */
	__u8  mode;           /* SG_MODE_* */
	__u8  flags;
	__u16 open_all;       /* bit ((dir*2+fam)*2 + is_udp): world-open on all ports */
	__u32 world_class[4]; /* [dir*2+fam]: class of the 0/0 rules, 0 = none */
	__u32 timeouts[SG_TO_MAX]; /* seconds */
	__u32 addr_id;        /* sg_local_addrs identity: ep_id (explain's probe keeps
			       * the real interface's) */
	__u8  mac[6];         /* the instance's MAC, when declared (SG_EP_MAC) */
	__u16 pad;
	__u32 ring_base;      /* its half-open allowance: slots ring_base .. */
	__u32 ring_size;      /* ... + ring_size - 1 of sg_ct_ring (0: none) */
	__be32 addr4;         /* one of its IPv4 addresses (0: none) and one of its */
	__be32 addr6[4];      /* IPv6 (zero: none): the address check compares them
			       * before it looks in sg_local_addrs (addrcheck.h) */
	__u32 ct_limit;       /* connections it may hold in all (0: no limit; sg_ct_quota) */
};

/* sg_ep_index value: which sg_ep_slots entry holds the endpoint of device
 * ``ifindex`` (endpoint.h: where in the index). Endpoint id e owns slots 2e
 * and 2e+1 and alternates between them: the controller writes the slot the
 * index does not name, then the index's 8 bytes in one store through the
 * map's mmap; the datapath reads them in one load, so a packet sees the old
 * endpoint value or the new one, never a mix. The slot a switch left is
 * written again only after an RCU grace period (Dataplane.quiesce): a
 * packet still reading it finishes first. No hash map on this path: a
 * preallocated hash element replaced is reused at once (SLAB_TYPESAFE_BY_RCU
 * for the others), so a reader could see another key's value. */
struct sg_ep_ref {
	__u32 ifindex;        /* 0: empty */
	__u32 slot;
};

/* sg_local_addrs key (1.6): an address of an endpoint's interface (primary
 * and secondary IPv4, IPv6, its IPv6 link-local), or one of its IPv6 /64
 * on-link prefixes (neighbour discovery to a global neighbour). One hash
 * lookup decides "is this address the interface's", however many it has. */
#define SG_LOCAL_ADDR     0
#define SG_LOCAL_ONLINK64 1

struct sg_local_key {
	__u32 addr_id;
	__u8  family;
	__u8  kind;           /* SG_LOCAL_* */
	__u16 pad;
	__be32 addr[4];       /* IPv4 in addr[0]; ONLINK64: the /64, rest zero */
};

/* Classification (as measured better here): the remote address
 * is looked up in one hash per prefix length present in the policy, longest
 * first; each hit is the class of *that prefix's own* rules. The first
 * SG_CHAIN_MAX hits are checked against their classes' port segments. The
 * compiler folds the rules of all ancestors into any prefix that could be
 * the last one checked, so an address inside more nested prefixes loses
 * nothing; rules are never copied into the more specific prefixes otherwise,
 * which keeps entries linear in the rule count. */
#define SG_PLEN_SLOTS  129 /* prefix lengths 0..128 */
#define SG_PLEN4_SLOTS 33  /* IPv4: 0..32 */
#define SG_CHAIN_MAX   4   /* matching prefixes whose classes are checked */
#define SG_SEGS_INLINE 8   /* port segments kept in a class's value */
#define SG_SEGS_LPM    0xFF /* sg_ports.n: more segments; see sg_ports_lpm */

/* sg_peers key: the remote IPv6 address masked to plen bits */
struct sg_peer_key {
	__u32 policy_id;
	__u8  dir;
	__u8  family;         /* 6 (IPv4 prefixes are in sg_peers4) */
	__u8  plen;
	__u8  pad;
	__be32 addr[4];
};

/* sg_peers4 key: the same for IPv4 in half the bytes (a hash costs by the
 * key's words: 24-byte keys ~37 ns a hit here, 12-byte ~30) */
struct sg_peer4_key {
	__u32 policy_id;
	__u8  dir;
	__u8  plen;
	__u16 pad;
	__be32 addr;
};

/* sg_plens: the prefix lengths present for (policy, dir, family), longest first */
struct sg_plens_key {
	__u32 policy_id;
	__u8  dir;
	__u8  family;
	__u16 pad;
};

struct sg_plen {
	__be32 mask[4];       /* the prefix length as an address mask */
	__u8  plen;
	__u8  pad[3];
};

#define SG_TOP16_WORDS 1024 /* 65536 bits: one per value of an address's top 16 bits */

struct sg_plens {
	__u32 n;
	struct sg_plen len[SG_PLEN_SLOTS];
	/* bit b set: some prefix contains addresses whose top 16 bits are b.
	 * A clear bit ends classification before any prefix lookup (floods of
	 * addresses no rule mentions cost one lookup). */
	__u64 top16[SG_TOP16_WORDS];
};

/* A port interval of one class and protocol with a constant rule set.
 * Ports (or ICMP type<<8|code) in host order. */
struct sg_seg {
	__u16 lo;
	__u16 hi;
	__u32 rule_index;     /* lowest rule index of the interval (counters) */
	__u32 flags;          /* SG_FLAG_* */
};

/* sg_ports key: classes are shared by every policy (content-addressed) */
struct sg_ports_key {
	__u32 cls;
	__u16 proto;          /* 0-255 or SG_PROTO_ANY */
	__u16 pad;
};

struct sg_ports {
	__u32 n;              /* segments used, or SG_SEGS_LPM */
	struct sg_seg seg[SG_SEGS_INLINE]; /* sorted, disjoint */
};

/* sg_ports_lpm key (classes with more than SG_SEGS_INLINE segments):
 * prefixlen = 48 + port prefix length */
struct sg_port_key {
	__u32 prefixlen;
	__u32 cls;
	__u16 proto;
	__be16 port;          /* network order */
};

struct sg_port_val {
	__u32 rule_index;
	__u32 flags;
};

/* Connection key: always (instance side, remote side), so both directions
 * of a flow find the same entry without comparing addresses. */
struct sg_ct_key {
	__u32 ep_id;
	__u8  family;
	__u8  proto;
	__u16 pad;
	__be32 local[4];
	__be32 remote[4];
	__be16 lport;         /* TCP/UDP port; ICMP query id; 0 otherwise */
	__be16 rport;         /* TCP/UDP port; ICMP query: request type | request dir << 8 */
};

/* The accounting fields are indexed by SG_DIR_* and cumulative since the
 * connection was created; the flow logger reports their growth per capture
 * window. Written for every packet only while flow logs are on. */
struct sg_ct_entry {
	__u64 last_seen;      /* seconds; written at most once a second */
	__u32 rule_index;     /* rule that admitted the connection */
	__u32 policy_id;      /* policy that admitted it */
	__u8  state;          /* SG_CT_* */
	__u8  origin;         /* SG_DIR_* of the first packet */
	__u8  fin;            /* TCP: bit 0 FIN from origin, bit 1 from the reply side;
			       * UDP: SG_CT_UDP_ASKED */
	__u8  flags;          /* SG_CT_F_* */
	__u8  tcp_flags[2];   /* flow-log TCP flags seen (SG_FL_TCP_*), OR'd */
	__u8  icmp_type;      /* ICMP: the opening packet's type and code (revalidate */
	__u8  icmp_code;      /* judges a connection by what opened it) */
	__u32 slot;           /* 1 + its sg_ct_ring slot while half-open, 0 = none */
	__u32 pad;
	__u64 packets[2];
	__u64 bytes[2];       /* IP bytes (header included) */
};

struct sg_frag_key {
	__u32 ep_id;
	__u8  family;
	__u8  proto;
	__u16 pad;
	__be32 src[4];
	__be32 dst[4];
	__u32 id;
};

/* sg_frags value: an allowed first fragment (frags.h: which entry) */
#define SG_FRAG_PER_EP 64 /* entries per endpoint slot, a power of two */

struct sg_frag_slot {
	struct sg_frag_key key;
	__u32 pad;
	__u64 seen;           /* seconds */
};

struct sg_exempt_key {
	__u32 prefixlen;      /* 32 + address prefix length */
	__u32 family;
	__be32 addr[4];
};

struct sg_config {
	__u64 now_override;   /* seconds; 0 = use the kernel clock (tests set it) */
	__u32 flags;          /* SG_CFG_* */
	__u32 pad;
	__u64 flow_cost_ns;   /* flow events: one costs this much credit (1e9 / rate) */
	__u64 flow_burst_ns;  /* ... and a CPU saves at most this much (burst * cost) */
	__u64 flow_ep_cost_ns;  /* the same for each interface's own share of a CPU */
	__u64 flow_ep_burst_ns;
};

struct sg_counter {
	__u64 packets;
	__u64 bytes;
};

/* sg_rule_hits value, per CPU, indexed by rule number: the packets of the
 * connections a rule admitted (both directions) and of the untracked flows
 * it allowed. */
struct sg_rule_hit {
	__u64 packets;
	__u64 bytes;
	__u64 last_seen;      /* datapath clock, seconds */
};

/* Flow-log TCP flags, as AWS VPC Flow Logs counts them: SYN-ACK is its own
 * value (SYN | 16), a plain ACK is not recorded. */
#define SG_FL_TCP_FIN    0x01
#define SG_FL_TCP_SYN    0x02
#define SG_FL_TCP_RST    0x04
#define SG_FL_TCP_SYNACK 0x12

/* sg_flow_events record: a packet that is not part of a tracked connection
 * (those are counted in their conntrack entry), or the first packet of one
 * (tracked = 1: for its time and rule only; it is counted in the entry). */
struct sg_flow_event {
	__u64 ts_ns;          /* bpf_ktime_get_coarse_ns() */
	__u32 ep_id;
	__u32 rule_index;     /* rule that allowed it, 0 = none */
	__u32 bytes;          /* IP bytes */
	__u8  dir;            /* SG_DIR_* */
	__u8  reason;         /* enum sg_reason */
	__u8  family;
	__u8  proto;
	__u8  tcp_flags;      /* SG_FL_TCP_* */
	__u8  icmp_type;
	__u8  icmp_code;
	__u8  tracked;
	__be16 sport;         /* 0 for ICMP and fragments */
	__be16 dport;
	__be32 src[4];        /* as on the wire */
	__be32 dst[4];
};

#endif
