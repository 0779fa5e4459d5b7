/* One bump arena, usable as a ProtobufCAllocator: unpacked messages are
 * allocated from it and dropped in one go by a reset. free() is a no-op.
 *
 * The arena retains one buffer across resets and grows it (up to `keep`
 * bytes) to what the last use needed, so a steady stream of the same shape
 * of message allocates nothing. What does not fit goes to extra chunks,
 * freed at reset, except that the largest may become the owner's shared
 * spare block (`spare`, optional): the server's loop keeps one, so that a
 * run of 1 MiB requests reuses it instead of allocating each time. Chunks
 * above PBRPC__ARENA_SPARE_MAX are never kept: they go back at reset.
 *
 * An optional limit bounds the bytes handed out between resets: an
 * allocation past it fails (NULL, `limited` set), so that protobuf-c's
 * unpack gives up instead of growing without bound.
 *
 * Not thread-safe: one thread at a time uses an arena (and its spare). */
#ifndef PBRPC_UTIL_ARENA_H
#define PBRPC_UTIL_ARENA_H

#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct pbrpc__arena_chunk pbrpc__arena_chunk;

typedef struct pbrpc__arena {
	ProtobufCAllocator pa; /* pass &a->pa to protobuf-c */
	uint8_t *p, *end;      /* free space of the chunk being filled */
	uint8_t *buf;          /* the retained buffer */
	size_t cap;
	size_t want;           /* bytes asked for since the last reset */
	size_t keep;           /* the retained buffer grows up to this */
	pbrpc__arena_chunk *extra;
	pbrpc__arena_chunk **spare;
	size_t limit;          /* bytes handed out between resets; SIZE_MAX: none */
	bool failed;           /* an allocation failed since the last reset */
	bool limited;          /* ...because it would have passed `limit` */
} pbrpc__arena;

#define PBRPC__ARENA_SPARE_MAX (4u << 20) /* largest chunk kept as the spare */

/* Bytes the next allocations may take in all (SIZE_MAX: no limit); holds
 * across resets until changed. Exact when the limit is at least `keep`
 * (allocations inside the retained buffer are not checked). */
static inline void pbrpc__arena_set_limit(pbrpc__arena *a, size_t limit)
{
	a->limit = limit;
}

/* keep: largest buffer retained across resets (0: none, every use allocates
 * chunks). spare: where the largest extra chunk is kept at reset, or NULL. */
void pbrpc__arena_init(pbrpc__arena *a, size_t keep, pbrpc__arena_chunk **spare);

__attribute__((noinline)) void *pbrpc__arena_grow(pbrpc__arena *a, size_t n); /* the slow path */

/* size bytes aligned for any type, or NULL (a->failed is then set). */
static inline void *pbrpc__arena_alloc(pbrpc__arena *a, size_t size)
{
	size_t n = (size + 15) & ~(size_t)15;
	if (n < size || n == 0)
		n = size ? SIZE_MAX : 16;
	if ((size_t)(a->end - a->p) >= n) {
		void *r = a->p;
		a->p += n;
		a->want += n;
		return r;
	}
	return pbrpc__arena_grow(a, n);
}

void pbrpc__arena_reset_slow(pbrpc__arena *a);

/* Forgets every allocation. Extra chunks are freed (or kept as the spare);
 * the retained buffer grows to fit what this use needed, up to `keep`. The
 * common case, everything fitted in the buffer, is a few stores. */
static inline void pbrpc__arena_reset(pbrpc__arena *a)
{
	if (!a->extra && a->want <= a->cap) {
		a->p = a->buf;
		a->want = 0;
		a->failed = false;
		a->limited = false;
		return;
	}
	pbrpc__arena_reset_slow(a);
}

/* After a reset: frees the retained buffer if it is larger than `limit`. */
void pbrpc__arena_shrink(pbrpc__arena *a, size_t limit);

/* Frees everything the arena holds (the shared spare stays its owner's). */
void pbrpc__arena_fini(pbrpc__arena *a);

/* Frees a spare block kept by arenas; *spare becomes NULL. */
void pbrpc__arena_spare_free(pbrpc__arena_chunk **spare);

#endif
