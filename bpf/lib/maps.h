/* Map definitions. All maps are pinned under SG_PIN_DIR so that a later
 * `sgctl` process (or a restarted daemon) finds them, and so that programs
 * reloaded with new code keep their state. Sizes can be overridden with -D. */
#ifndef SG_MAPS_H
#define SG_MAPS_H

#include "types.h"
#include "reasons.h"

#ifndef SG_PIN_DIR
#error "SG_PIN_DIR must be defined (the bpffs directory of the maps)"
#endif
#ifndef SG_CT_MAX
#define SG_CT_MAX 1048576
#endif
#ifndef SG_CT_RING
#define SG_CT_RING (SG_CT_MAX / 2) /* half-open slots shared out among the interfaces */
#endif
#ifndef SG_ENDPOINTS_MAX
#define SG_ENDPOINTS_MAX 4096
#endif
#ifndef SG_PEER_MAX
#define SG_PEER_MAX 2097152
#endif
#ifndef SG_PLENS_MAX
#define SG_PLENS_MAX 65536
#endif
#ifndef SG_CLASS_MAX
#define SG_CLASS_MAX 2097152
#endif
#ifndef SG_PORT_MAX
#define SG_PORT_MAX 4194304
#endif
#define SG_EP_INDEX_SLOTS 65536 /* a power of two: entries ifindex + k & (SLOTS - 1) ... */
#define SG_EP_INDEX_TRIES 8     /* ... for k < TRIES (endpoint.h) */
#define SG_EP_SLOTS (2 * (SG_ENDPOINTS_MAX + 2)) /* two per endpoint id (ids 1..MAX + 1) */
#define SG_COUNTER_SLOTS 1024 /* endpoint ids 1..1023 get their own counters; 0 = other */

/* An endpoint's slot of the per-endpoint arrays (as counters.py's counter_slot) */
static __always_inline __u32 sg_counter_slot(__u32 ep_id)
{
	return ep_id < SG_COUNTER_SLOTS ? ep_id : 0;
}
#define SG_RULE_SLOTS 65536   /* rule numbers 1..65535 get their own hit counters; 0 = other */
#define SG_EXEMPT_MAX 1024
#ifndef SG_LOCAL_MAX
#define SG_LOCAL_MAX 65536
#endif
#ifndef SG_FLOW_RING_BYTES
#define SG_FLOW_RING_BYTES (4 << 20) /* ~58k flow events */
#endif

/* bound devices, every one: ifindex -> endpoint value (the controller's record;
 * the datapath reads the same value through sg_ep_index, endpoint.h) */
BPF_TABLE_PINNED("hash", __u32, struct sg_endpoint, sg_endpoints, SG_ENDPOINTS_MAX,
		 SG_PIN_DIR "/sg_endpoints");
/* the datapath's way to them: (ifindex + k) mod SG_EP_INDEX_SLOTS -> (ifindex, slot) */
BPF_TABLE_PINNED("array", __u32, struct sg_ep_ref, sg_ep_index, SG_EP_INDEX_SLOTS,
		 SG_PIN_DIR "/sg_ep_index", BPF_F_MMAPABLE);
/* endpoint values the index points at: slots 2 * ep_id and 2 * ep_id + 1 */
BPF_TABLE_PINNED("array", __u32, struct sg_endpoint, sg_ep_slots, SG_EP_SLOTS,
		 SG_PIN_DIR "/sg_ep_slots");
/* classification 1: prefix lengths present per (policy, dir, family) */
BPF_TABLE_PINNED("hash", struct sg_plens_key, struct sg_plens, sg_plens, SG_PLENS_MAX,
		 SG_PIN_DIR "/sg_plens", BPF_F_NO_PREALLOC);
/* classification 2: (policy, dir, family, plen, masked remote address) -> class */
BPF_TABLE_PINNED("hash", struct sg_peer_key, __u32, sg_peers, SG_PEER_MAX,
		 SG_PIN_DIR "/sg_peers", BPF_F_NO_PREALLOC);
/* ... the same for IPv4 remote addresses */
BPF_TABLE_PINNED("hash", struct sg_peer4_key, __u32, sg_peers4, SG_PEER_MAX,
		 SG_PIN_DIR "/sg_peers4", BPF_F_NO_PREALLOC);
/* classification 3: (class, protocol) -> port segments */
BPF_TABLE_PINNED("hash", struct sg_ports_key, struct sg_ports, sg_ports, SG_CLASS_MAX,
		 SG_PIN_DIR "/sg_ports", BPF_F_NO_PREALLOC);
/* ... or, for classes with many segments, (class, protocol, port) -> rule index + flags */
BPF_TABLE_PINNED("lpm_trie", struct sg_port_key, struct sg_port_val, sg_ports_lpm, SG_PORT_MAX,
		 SG_PIN_DIR "/sg_ports_lpm", BPF_F_NO_PREALLOC);
/* tracked connections of every endpoint; never evicted while live (1.4) */
BPF_TABLE_PINNED("hash", struct sg_ct_key, struct sg_ct_entry, sg_conntrack, SG_CT_MAX,
		 SG_PIN_DIR "/sg_conntrack");
/* the interfaces' half-open allowances (types.h, sg_ct_quota): slot -> key */
BPF_TABLE_PINNED("array", __u32, struct sg_ct_key, sg_ct_ring, SG_CT_RING,
		 SG_PIN_DIR "/sg_ct_ring");
/* per endpoint slot: slots taken, connections evicted and created */
BPF_TABLE_PINNED("array", __u32, struct sg_ct_quota, sg_ct_quota, SG_COUNTER_SLOTS,
		 SG_PIN_DIR "/sg_ct_quota");
/* per endpoint slot: its connections the controller deleted (types.h, sg_ct_quota) */
BPF_TABLE_PINNED("array", __u32, __u64, sg_ct_removed, SG_COUNTER_SLOTS,
		 SG_PIN_DIR "/sg_ct_removed");
/* first fragments that were allowed: SG_FRAG_PER_EP entries per endpoint slot (frags.h) */
BPF_TABLE_PINNED("array", __u32, struct sg_frag_slot, sg_frags,
		 SG_COUNTER_SLOTS * SG_FRAG_PER_EP, SG_PIN_DIR "/sg_frags");
/* infrastructure services and DHCP servers (1.3) -> SG_EXEMPT_* bits */
BPF_TABLE_PINNED("lpm_trie", struct sg_exempt_key, __u8, sg_exempt_lpm, SG_EXEMPT_MAX,
		 SG_PIN_DIR "/sg_exempt_lpm", BPF_F_NO_PREALLOC);
/* each bound interface's own addresses and IPv6 /64s (SourceDestCheck, 1.6) */
BPF_TABLE_PINNED("hash", struct sg_local_key, __u8, sg_local_addrs, SG_LOCAL_MAX,
		 SG_PIN_DIR "/sg_local_addrs", BPF_F_NO_PREALLOC);
/* global switches and the test clock */
BPF_TABLE_PINNED("array", __u32, struct sg_config, sg_config, 1, SG_PIN_DIR "/sg_config");
/* packets/bytes per (endpoint slot, direction, reason) */
BPF_TABLE_PINNED("percpu_array", __u32, struct sg_counter, sg_verdicts,
		 SG_COUNTER_SLOTS * 2 * SG_REASON_MAX, SG_PIN_DIR "/sg_verdicts");

/* packets/bytes/last hit per rule number (per CPU) */
BPF_TABLE_PINNED("percpu_array", __u32, struct sg_rule_hit, sg_rule_hits, SG_RULE_SLOTS,
		 SG_PIN_DIR "/sg_rule_hits");

/* flow-log events to the controller (flowlog.h); bcc's BPF_RINGBUF_OUTPUT
 * with a pin, so that reloaded programs and a restarted daemon share it */
struct sg_flow_events_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/ringbuf:" SG_PIN_DIR "/sg_flow_events")))
struct sg_flow_events_table_t sg_flow_events = { .max_entries = SG_FLOW_RING_BYTES };

/* flow events not sent (rate limit or ring full) per endpoint slot, per CPU:
 * the flow logger turns them into SKIPDATA records */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, sg_flow_skips, SG_COUNTER_SLOTS,
		 SG_PIN_DIR "/sg_flow_skips");

#endif
