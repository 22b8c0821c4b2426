/* IPv4/IPv6 fragments (1.5): a later fragment passes when its datagram's
 * first fragment was allowed within SG_FRAG_TIMEOUT. The first fragments
 * are remembered per endpoint: each endpoint slot owns SG_FRAG_PER_EP
 * entries of sg_frags, and a datagram sits in the one its hash names, so a
 * newer datagram can replace an older one of the same endpoint there but
 * never another endpoint's (a shared LRU let one instance's flood of first
 * fragments evict everybody's). */
#ifndef SG_FRAGS_H
#define SG_FRAGS_H

#include "maps.h"
#include "parse.h"

#define SG_FRAG_TIMEOUT 30   /* seconds */
#define SG_FRAG_HASH_MUL 0x01000193 /* FNV's 32-bit prime (abi.frag_hash mirrors this) */
#define SG_FRAG_KEY_WORDS (sizeof(struct sg_frag_key) / 4)

static __always_inline void frag_key_of(struct sg_frag_key *k, __u32 ep_id, struct sg_pkt *p)
{
	k->ep_id = ep_id;
	k->family = p->f.family;
	k->proto = p->frag_proto;
	__builtin_memcpy(k->src, p->f.src, 16);
	__builtin_memcpy(k->dst, p->f.dst, 16);
	k->id = p->frag_id;
}

/* Which of its endpoint's entries a datagram uses: a hash of the datagram
 * (not of the endpoint id: the region is the endpoint's already). */
static __always_inline __u32 frag_index(struct sg_frag_key *k)
{
	__u32 h = k->id ^ k->proto;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		h = (h ^ k->src[i]) * SG_FRAG_HASH_MUL;
		h = (h ^ k->dst[i]) * SG_FRAG_HASH_MUL;
	}
	h ^= h >> 16;
	return sg_counter_slot(k->ep_id) * SG_FRAG_PER_EP + (h & (SG_FRAG_PER_EP - 1));
}

/* Was this later fragment's first one allowed, recently enough? */
static __always_inline int frag_known(struct sg_frag_key *k, __u64 now)
{
	__u32 i = frag_index(k);
	struct sg_frag_slot *s = sg_frags.lookup(&i);
	if (!s || now - s->seen > SG_FRAG_TIMEOUT)
		return 0;
	__u32 *a = (__u32 *)&s->key, *b = (__u32 *)k;
#pragma unroll
	for (int w = 0; w < SG_FRAG_KEY_WORDS; w++)
		if (a[w] != b[w])
			return 0;
	return 1;
}

/* An allowed first fragment: its datagram's later ones may follow. */
static __always_inline void frag_remember(struct sg_frag_key *k, __u64 now)
{
	__u32 i = frag_index(k);
	struct sg_frag_slot *s = sg_frags.lookup(&i);
	if (!s)
		return;
	__builtin_memcpy(&s->key, k, sizeof(*k));
	s->seen = now;
}

#endif
