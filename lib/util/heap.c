#include "util/heap.h"

#include <errno.h>
#include <stdlib.h>

static void heap_swap(pbrpc__heap *h, size_t a, size_t b)
{
	pbrpc__timer *t = h->v[a];
	h->v[a] = h->v[b];
	h->v[b] = t;
	h->v[a]->idx = a;
	h->v[b]->idx = b;
}

static void heap_up(pbrpc__heap *h, size_t i)
{
	while (i > 0 && h->v[(i - 1) / 2]->when > h->v[i]->when) {
		heap_swap(h, i, (i - 1) / 2);
		i = (i - 1) / 2;
	}
}

static void heap_down(pbrpc__heap *h, size_t i)
{
	for (;;) {
		size_t l = 2 * i + 1, r = l + 1, m = i;
		if (l < h->n && h->v[l]->when < h->v[m]->when)
			m = l;
		if (r < h->n && h->v[r]->when < h->v[m]->when)
			m = r;
		if (m == i)
			return;
		heap_swap(h, i, m);
		i = m;
	}
}

void pbrpc__heap_remove(pbrpc__heap *h, pbrpc__timer *t)
{
	size_t i = t->idx;
	h->n--;
	if (i != h->n) {
		h->v[i] = h->v[h->n];
		h->v[i]->idx = i;
		heap_down(h, i);
		heap_up(h, i);
	}
	t->idx = SIZE_MAX;
}

int pbrpc__heap_start(pbrpc__heap *h, pbrpc__timer *t, pbrpc__deadline when)
{
	if (t->idx != SIZE_MAX) {
		/* Re-arm in place: no removal, no growth. */
		pbrpc__deadline old = t->when;
		t->when = when;
		if (when < old)
			heap_up(h, t->idx);
		else
			heap_down(h, t->idx);
		return 0;
	}
	if (h->n == h->cap) {
		size_t cap = h->cap ? h->cap * 2 : 64;
		pbrpc__timer **v = realloc(h->v, cap * sizeof(*v));
		if (!v)
			return -ENOMEM;
		h->v = v;
		h->cap = cap;
	}
	t->when = when;
	t->idx = h->n;
	h->v[h->n++] = t;
	heap_up(h, t->idx);
	return 0;
}

pbrpc__timer *pbrpc__heap_pop_due(pbrpc__heap *h, pbrpc__deadline now)
{
	if (!h->n || h->v[0]->when > now)
		return NULL;
	pbrpc__timer *t = h->v[0];
	pbrpc__heap_stop(h, t);
	return t;
}

void pbrpc__heap_fini(pbrpc__heap *h)
{
	for (size_t i = 0; i < h->n; i++)
		h->v[i]->idx = SIZE_MAX;
	free(h->v);
	h->v = NULL;
	h->n = h->cap = 0;
}
