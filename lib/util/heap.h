/* One timer structure: a binary min-heap of timers embedded in their owners
 * (a call, a connection, the server). Starting, stopping and re-arming are
 * O(log n); the earliest timer is O(1). Not thread-safe: each heap belongs to
 * one loop (the server's) or is used under one mutex (the client's). */
#ifndef PBRPC_UTIL_HEAP_H
#define PBRPC_UTIL_HEAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/clock.h"

typedef struct pbrpc__timer {
	pbrpc__deadline when;
	size_t idx; /* position in the heap; SIZE_MAX while not armed */
	unsigned tag; /* the owner's: what kind of timer this is */
} pbrpc__timer;

typedef struct pbrpc__heap {
	pbrpc__timer **v;
	size_t n, cap;
} pbrpc__heap;

static inline void pbrpc__timer_init(pbrpc__timer *t, unsigned tag)
{
	t->when = 0;
	t->idx = SIZE_MAX;
	t->tag = tag;
}

static inline bool pbrpc__timer_armed(const pbrpc__timer *t)
{
	return t->idx != SIZE_MAX;
}

/* The earliest armed timer, or NULL. */
static inline pbrpc__timer *pbrpc__heap_top(const pbrpc__heap *h)
{
	return h->n ? h->v[0] : NULL;
}

/* Arms t for `when` (re-arms it if armed). Returns 0 or -ENOMEM (t is then
 * not armed). */
int pbrpc__heap_start(pbrpc__heap *h, pbrpc__timer *t, pbrpc__deadline when);

void pbrpc__heap_remove(pbrpc__heap *h, pbrpc__timer *t);

/* Disarms t; a no-op when it is not armed (the common case: inline). */
static inline void pbrpc__heap_stop(pbrpc__heap *h, pbrpc__timer *t)
{
	if (t->idx != SIZE_MAX)
		pbrpc__heap_remove(h, t);
}

/* Pops and returns the earliest timer if it is due at `now`, else NULL. */
pbrpc__timer *pbrpc__heap_pop_due(pbrpc__heap *h, pbrpc__deadline now);

/* Frees the heap's array; the timers themselves belong to their owners. */
void pbrpc__heap_fini(pbrpc__heap *h);

#endif
