/* Per-CPU scratch memory for the packet being decided.
 *
 * The parsed packet and the rule match live in a map value, not on the
 * stack, on purpose: the verifier tracks stack contents exactly, so every
 * parse path (protocol, VLANs, extension headers, ICMP error or not) would
 * reach the classifier's prefix-length loop as a distinct state and the
 * states multiply past the verifier's limit. Map memory is untracked, so
 * all paths converge once the packet pointers are dead. A program run is
 * never interrupted by another on the same CPU (XDP in softirq, tc with BH
 * disabled), so one slot per CPU is enough. */
#ifndef SG_SCRATCH_H
#define SG_SCRATCH_H

#include "parse.h"

/* What the rules say about one packet: found, lowest rule index, flags OR'd. */
struct sg_match {
	__u32 found;
	__u32 rule_index;
	__u32 flags;
};

struct sg_scratch {
	struct sg_pkt p;
	struct sg_match m;   /* the packet against the rules */
	struct sg_match wm;  /* the reversed packet against the world rules (1.4) */
	__u32 cls[SG_CHAIN_MAX]; /* classes of the prefixes containing the remote address */
	__u32 ncls;
	__u32 rule;          /* rule that allowed the packet (or admitted its connection), 0 = none */
	__u64 now;           /* the clock, when the decision read it */
};

/* one per CPU: the packet being decided */
BPF_PERCPU_ARRAY(sg_scratch, struct sg_scratch, 1);

#endif
