#include "util/arena.h"

#include <stdalign.h>
#include <stdlib.h>

#define ARENA_FIRST 1024u  /* first retained buffer; it grows to fit at reset */
#define ARENA_CHUNK 8192u  /* smallest extra chunk */

struct pbrpc__arena_chunk {
	pbrpc__arena_chunk *next;
	size_t size;
	alignas(16) uint8_t data[];
};

static void *pa_alloc(void *ud, size_t size)
{
	return pbrpc__arena_alloc(ud, size);
}

static void pa_free(void *ud, void *p)
{
	(void)ud;
	(void)p;
}

void pbrpc__arena_init(pbrpc__arena *a, size_t keep, pbrpc__arena_chunk **spare)
{
	a->pa.alloc = pa_alloc;
	a->pa.free = pa_free;
	a->pa.allocator_data = a;
	a->p = a->end = a->buf = NULL;
	a->cap = a->want = 0;
	a->keep = keep;
	a->extra = NULL;
	a->spare = spare;
	a->limit = SIZE_MAX;
	a->failed = false;
	a->limited = false;
}

static size_t pow2_at_least(size_t n, size_t from)
{
	size_t c = from;
	while (c < n && c <= SIZE_MAX / 2)
		c *= 2;
	return c;
}

void *pbrpc__arena_grow(pbrpc__arena *a, size_t n)
{
	if (n > SIZE_MAX / 2) {
		a->failed = true;
		return NULL;
	}
	if (a->want > a->limit || n > a->limit - a->want) {
		a->failed = true;
		a->limited = true;
		return NULL;
	}
	if (!a->buf && n <= a->keep) {
		size_t cap = pow2_at_least(n, ARENA_FIRST);
		if (cap > a->keep)
			cap = a->keep;
		if (cap > a->limit - a->want)
			cap = a->limit - a->want;
		a->buf = malloc(cap);
		if (a->buf) {
			a->cap = cap;
			a->p = a->buf + n;
			a->end = a->buf + cap;
			a->want += n;
			return a->buf;
		}
	}
	size_t size = n > ARENA_CHUNK ? n : ARENA_CHUNK;
	if (size > a->limit - a->want)
		size = a->limit - a->want; /* no slack past the limit (>= n, checked above) */
	pbrpc__arena_chunk *c;
	if (a->spare && *a->spare && (*a->spare)->size >= size) {
		c = *a->spare;
		*a->spare = NULL;
	} else {
		c = malloc(sizeof(*c) + size);
		if (!c) {
			a->failed = true;
			return NULL;
		}
		c->size = size;
	}
	c->next = a->extra;
	a->extra = c;
	a->p = c->data + n;
	a->end = c->data + (c->size < a->limit - a->want ? c->size : a->limit - a->want); /* a spare may be larger */
	a->want += n; /* only what was had: a failed request must not grow the buffer */
	return c->data;
}

void pbrpc__arena_reset_slow(pbrpc__arena *a)
{
	while (a->extra) {
		pbrpc__arena_chunk *c = a->extra;
		a->extra = c->next;
		if (a->spare && c->size <= PBRPC__ARENA_SPARE_MAX && (!*a->spare || (*a->spare)->size < c->size)) {
			free(*a->spare);
			*a->spare = c;
		} else {
			free(c);
		}
	}
	if (a->want > a->cap && a->cap < a->keep) {
		size_t cap = pow2_at_least(a->want, a->cap ? a->cap : ARENA_FIRST);
		if (cap > a->keep)
			cap = a->keep;
		uint8_t *nb = malloc(cap);
		if (nb) {
			free(a->buf);
			a->buf = nb;
			a->cap = cap;
		}
	}
	a->p = a->buf;
	a->end = a->buf ? a->buf + a->cap : NULL;
	a->want = 0;
	a->failed = false;
	a->limited = false;
}

void pbrpc__arena_shrink(pbrpc__arena *a, size_t limit)
{
	if (a->cap > limit && a->p == a->buf && !a->extra) {
		free(a->buf);
		a->p = a->end = a->buf = NULL;
		a->cap = 0;
	}
}

void pbrpc__arena_fini(pbrpc__arena *a)
{
	a->spare = NULL;
	a->want = 0; /* no point growing a buffer about to be freed */
	pbrpc__arena_reset(a);
	free(a->buf);
	a->p = a->end = a->buf = NULL;
	a->cap = 0;
}

void pbrpc__arena_spare_free(pbrpc__arena_chunk **spare)
{
	free(*spare);
	*spare = NULL;
}
