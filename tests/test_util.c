/* Tests for lib/util/: the intrusive list, the timer heap, the id map, the
 * bump arena and the deadline helpers.
 *
 * The randomised tests check each structure against a plain reference (a
 * flag per element, a sorted array) after every batch of operations. They
 * use a fixed seed (PBRPC_TEST_SEED overrides it) and print it in every
 * failure message.
 */
#include <criterion/criterion.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "echo.pb-c.h"
#include "testutil.h"
#include "util/arena.h"
#include "util/clock.h"
#include "util/heap.h"
#include "util/idmap.h"
#include "util/list.h"

#define SEED_FMT "seed=%#llx"
#define SEED(s) ((unsigned long long)(s))

TestSuite(util, .init = tu_setup, .timeout = 60);

/* ======================================================================== */
/* list.h                                                                   */
/* ======================================================================== */

typedef struct item {
	int v;
	pbrpc__list link;
} item;

/* Asserts that list l holds exactly want[0..n) in order, walking both ways. */
static void list_expect(const pbrpc__list *l, const int *want, size_t n)
{
	size_t i = 0;
	pbrpc__list_for_each(it, l, item, link)
	{
		cr_assert_lt(i, n, "list longer than %zu", n);
		cr_assert_eq(it->v, want[i], "element %zu: %d, want %d", i, it->v, want[i]);
		i++;
	}
	cr_assert_eq(i, n, "list has %zu elements, want %zu", i, n);
	/* Backwards through prev, and every link consistent. */
	const pbrpc__list *p = l->prev;
	for (size_t k = n; k-- > 0; p = p->prev) {
		cr_assert_neq(p, l);
		cr_assert_eq(p->next->prev, p);
		cr_assert_eq(pbrpc__container_of(p, item, link)->v, want[k]);
	}
	cr_assert_eq(p, l);
	cr_assert_eq(pbrpc__list_empty(l), n == 0);
}

Test(util, list_init_insert_append_remove)
{
	pbrpc__list l;
	pbrpc__list_init(&l);
	cr_assert(pbrpc__list_empty(&l));
	cr_assert_null(pbrpc__list_first(&l));
	cr_assert_eq(l.next, &l);
	cr_assert_eq(l.prev, &l);

	item it[5];
	for (int i = 0; i < 5; i++) {
		it[i].v = i;
		pbrpc__list_init(&it[i].link);
		cr_assert_not(pbrpc__list_linked(&it[i].link));
	}
	pbrpc__list_append(&l, &it[1].link);
	pbrpc__list_append(&l, &it[2].link);
	pbrpc__list_insert(&l, &it[0].link);         /* at the head */
	pbrpc__list_insert(&it[2].link, &it[4].link); /* after 2 */
	pbrpc__list_insert(&it[2].link, &it[3].link); /* after 2, before 4 */
	list_expect(&l, (int[]){ 0, 1, 2, 3, 4 }, 5);
	for (int i = 0; i < 5; i++)
		cr_assert(pbrpc__list_linked(&it[i].link));
	cr_assert_eq(pbrpc__list_first(&l), &it[0].link);
	cr_assert_not(pbrpc__list_empty(&l));

	pbrpc__list_remove(&it[2].link);
	cr_assert_not(pbrpc__list_linked(&it[2].link));
	cr_assert_eq(it[2].link.next, &it[2].link);
	cr_assert_eq(it[2].link.prev, &it[2].link);
	list_expect(&l, (int[]){ 0, 1, 3, 4 }, 4);

	pbrpc__list_remove(&it[0].link); /* head */
	pbrpc__list_remove(&it[4].link); /* tail */
	list_expect(&l, (int[]){ 1, 3 }, 2);
	cr_assert_eq(pbrpc__list_first(&l), &it[1].link);

	/* Removing an unlinked element again is harmless: it points at itself. */
	pbrpc__list_remove(&it[4].link);
	cr_assert_not(pbrpc__list_linked(&it[4].link));
	list_expect(&l, (int[]){ 1, 3 }, 2);

	pbrpc__list_remove(&it[1].link);
	pbrpc__list_remove(&it[3].link);
	list_expect(&l, NULL, 0);
	cr_assert_null(pbrpc__list_first(&l));

	/* An element can be re-inserted after removal. */
	pbrpc__list_append(&l, &it[3].link);
	list_expect(&l, (int[]){ 3 }, 1);
}

Test(util, list_splice)
{
	item a[3], b[3];
	pbrpc__list la, lb;
	pbrpc__list_init(&la);
	pbrpc__list_init(&lb);

	/* empty into empty */
	pbrpc__list_splice(&la, &lb);
	list_expect(&la, NULL, 0);
	list_expect(&lb, NULL, 0);

	for (int i = 0; i < 3; i++) {
		a[i].v = i;
		b[i].v = 10 + i;
		pbrpc__list_init(&a[i].link);
		pbrpc__list_init(&b[i].link);
	}

	/* non-empty src into empty dst */
	for (int i = 0; i < 2; i++)
		pbrpc__list_append(&lb, &b[i].link);
	pbrpc__list_splice(&la, &lb);
	list_expect(&la, (int[]){ 10, 11 }, 2);
	list_expect(&lb, NULL, 0);

	/* empty src into non-empty dst: nothing changes */
	pbrpc__list_splice(&la, &lb);
	list_expect(&la, (int[]){ 10, 11 }, 2);
	list_expect(&lb, NULL, 0);

	/* non-empty into non-empty: appended at the tail, order kept */
	for (int i = 0; i < 3; i++)
		pbrpc__list_append(&lb, &a[i].link);
	pbrpc__list_splice(&la, &lb);
	list_expect(&la, (int[]){ 10, 11, 0, 1, 2 }, 5);
	list_expect(&lb, NULL, 0);

	/* the source head is usable again */
	pbrpc__list_append(&lb, &b[2].link);
	list_expect(&lb, (int[]){ 12 }, 1);
	pbrpc__list_remove(&a[0].link);
	list_expect(&la, (int[]){ 10, 11, 1, 2 }, 4);

	/* single element into non-empty */
	pbrpc__list_splice(&la, &lb);
	list_expect(&la, (int[]){ 10, 11, 1, 2, 12 }, 5);
	list_expect(&lb, NULL, 0);
}

Test(util, list_for_each_safe_removes)
{
	enum { N = 20 };
	item it[N];
	pbrpc__list l;
	pbrpc__list_init(&l);
	for (int i = 0; i < N; i++) {
		it[i].v = i;
		pbrpc__list_init(&it[i].link);
		pbrpc__list_append(&l, &it[i].link);
	}

	/* Remove every odd element while iterating. */
	int visited = 0;
	pbrpc__list_for_each_safe(pos, &l, item, link)
	{
		cr_assert_eq(pos->v, visited, "visited %d, want %d", pos->v, visited);
		visited++;
		if (pos->v % 2)
			pbrpc__list_remove(&pos->link);
	}
	cr_assert_eq(visited, N);
	int even[N / 2];
	for (int i = 0; i < N / 2; i++)
		even[i] = 2 * i;
	list_expect(&l, even, N / 2);
	for (int i = 1; i < N; i += 2)
		cr_assert_not(pbrpc__list_linked(&it[i].link));

	/* Move everything to another list while iterating (remove + append). */
	pbrpc__list other;
	pbrpc__list_init(&other);
	visited = 0;
	pbrpc__list_for_each_safe(pos, &l, item, link)
	{
		pbrpc__list_remove(&pos->link);
		pbrpc__list_append(&other, &pos->link);
		visited++;
	}
	cr_assert_eq(visited, N / 2);
	list_expect(&l, NULL, 0);
	list_expect(&other, even, N / 2);

	/* Plain for_each sums what is there; on an empty list it runs zero times. */
	int sum = 0;
	pbrpc__list_for_each(pos, &other, item, link) sum += pos->v;
	cr_assert_eq(sum, 90); /* 0 + 2 + ... + 18 */
	int runs = 0;
	pbrpc__list_for_each(pos, &l, item, link)
	{
		(void)pos;
		runs++;
	}
	cr_assert_eq(runs, 0);

	/* Removing all with the safe form leaves every element unlinked. */
	pbrpc__list_for_each_safe(pos, &other, item, link) pbrpc__list_remove(&pos->link);
	list_expect(&other, NULL, 0);
	for (int i = 0; i < N; i++)
		cr_assert_not(pbrpc__list_linked(&it[i].link));
}

/* ======================================================================== */
/* heap                                                                     */
/* ======================================================================== */

typedef struct ref_timer {
	pbrpc__timer t;
	bool armed;
	pbrpc__deadline when;
} ref_timer;

static void heap_check(const pbrpc__heap *h, const ref_timer *r, size_t n, uint64_t seed)
{
	size_t armed = 0;
	pbrpc__deadline min = INT64_MAX;
	for (size_t i = 0; i < n; i++) {
		cr_assert_eq(pbrpc__timer_armed(&r[i].t), r[i].armed, "timer %zu armed %d, want %d " SEED_FMT, i,
			     pbrpc__timer_armed(&r[i].t), r[i].armed, SEED(seed));
		if (!r[i].armed)
			continue;
		armed++;
		cr_assert_eq(r[i].t.when, r[i].when, "timer %zu " SEED_FMT, i, SEED(seed));
		cr_assert_lt(r[i].t.idx, h->n);
		cr_assert_eq(h->v[r[i].t.idx], &r[i].t, "timer %zu not where its idx says " SEED_FMT, i, SEED(seed));
		if (r[i].when < min)
			min = r[i].when;
	}
	cr_assert_eq(h->n, armed, "heap has %zu, want %zu " SEED_FMT, h->n, armed, SEED(seed));
	/* The heap property. */
	for (size_t i = 1; i < h->n; i++)
		cr_assert_leq(h->v[(i - 1) / 2]->when, h->v[i]->when, "heap order at %zu " SEED_FMT, i, SEED(seed));
	if (armed)
		cr_assert_eq(pbrpc__heap_top(h)->when, min, SEED_FMT, SEED(seed));
	else
		cr_assert_null(pbrpc__heap_top(h));
}

static int cmp_i64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

Test(util, heap_random_against_reference)
{
	enum { N = 1000 };
	uint64_t seed = tu_seed();
	tu_rng rng = { seed };
	ref_timer *r = calloc(N, sizeof(*r));
	cr_assert(r);
	pbrpc__heap h = { 0 };
	cr_assert_null(pbrpc__heap_top(&h));
	cr_assert_null(pbrpc__heap_pop_due(&h, INT64_MAX));
	for (size_t i = 0; i < N; i++) {
		pbrpc__timer_init(&r[i].t, (unsigned)i);
		cr_assert_not(pbrpc__timer_armed(&r[i].t));
		cr_assert_eq(r[i].t.tag, (unsigned)i);
	}

	/* Stopping an unarmed timer is a no-op. */
	pbrpc__heap_stop(&h, &r[0].t);
	cr_assert_eq(h.n, 0);
	cr_assert_not(pbrpc__timer_armed(&r[0].t));

	for (int round = 0; round < 20; round++) {
		for (int op = 0; op < 2000; op++) {
			size_t i = (size_t)tu_rand_range(&rng, 0, N - 1);
			switch (tu_rand(&rng) % 4) {
			case 0:
			case 1: { /* start or re-arm, earlier or later */
				pbrpc__deadline when = (pbrpc__deadline)tu_rand_range(&rng, 1, 1000000);
				cr_assert_eq(pbrpc__heap_start(&h, &r[i].t, when), 0);
				r[i].armed = true;
				r[i].when = when;
				break;
			}
			case 2: /* stop (armed or not) */
				pbrpc__heap_stop(&h, &r[i].t);
				r[i].armed = false;
				break;
			default: /* re-arm relative to the current deadline */
				if (r[i].armed) {
					int64_t d = (int64_t)tu_rand_range(&rng, 0, 20000) - 10000;
					pbrpc__deadline when = r[i].when + d;
					if (when < 1)
						when = 1;
					cr_assert_eq(pbrpc__heap_start(&h, &r[i].t, when), 0);
					r[i].when = when;
				}
				break;
			}
		}
		heap_check(&h, r, N, seed);

		/* Pop everything due at some point: exactly the reference's timers
		 * with when <= now, in deadline order. */
		pbrpc__deadline now = (pbrpc__deadline)tu_rand_range(&rng, 0, 1000000);
		int64_t want[N];
		size_t nwant = 0;
		for (size_t i = 0; i < N; i++)
			if (r[i].armed && r[i].when <= now)
				want[nwant++] = r[i].when;
		qsort(want, nwant, sizeof(want[0]), cmp_i64);
		size_t got = 0;
		pbrpc__timer *t;
		while ((t = pbrpc__heap_pop_due(&h, now))) {
			cr_assert_lt(got, nwant, "popped more than due " SEED_FMT, SEED(seed));
			cr_assert_eq(t->when, want[got], "pop %zu: %lld, want %lld " SEED_FMT, got, (long long)t->when,
				     (long long)want[got], SEED(seed));
			cr_assert_not(pbrpc__timer_armed(t));
			ref_timer *rt = pbrpc__container_of(t, ref_timer, t);
			cr_assert_eq(t->tag, (unsigned)(rt - r));
			cr_assert(rt->armed);
			rt->armed = false;
			got++;
		}
		cr_assert_eq(got, nwant, "popped %zu, want %zu " SEED_FMT, got, nwant, SEED(seed));
		heap_check(&h, r, N, seed);
		if (pbrpc__heap_top(&h))
			cr_assert_gt(pbrpc__heap_top(&h)->when, now);
	}

	/* Arm all, then drain completely in order. */
	for (size_t i = 0; i < N; i++) {
		r[i].when = (pbrpc__deadline)tu_rand_range(&rng, 1, 1000);
		r[i].armed = true;
		cr_assert_eq(pbrpc__heap_start(&h, &r[i].t, r[i].when), 0);
	}
	heap_check(&h, r, N, seed);
	pbrpc__deadline last = 0;
	size_t popped = 0;
	for (pbrpc__timer *t; (t = pbrpc__heap_pop_due(&h, INT64_MAX)); popped++) {
		cr_assert_geq(t->when, last, SEED_FMT, SEED(seed));
		last = t->when;
	}
	cr_assert_eq(popped, N);
	cr_assert_eq(h.n, 0);

	/* fini disarms the timers still in the heap. */
	cr_assert_eq(pbrpc__heap_start(&h, &r[1].t, 5), 0);
	cr_assert_eq(pbrpc__heap_start(&h, &r[2].t, 6), 0);
	pbrpc__heap_fini(&h);
	cr_assert_not(pbrpc__timer_armed(&r[1].t));
	cr_assert_not(pbrpc__timer_armed(&r[2].t));
	cr_assert_null(h.v);
	cr_assert_eq(h.n, 0);
	free(r);
}

Test(util, heap_rearm_earlier_and_later)
{
	pbrpc__timer a, b, c;
	pbrpc__timer_init(&a, 1);
	pbrpc__timer_init(&b, 2);
	pbrpc__timer_init(&c, 3);
	pbrpc__heap h = { 0 };
	cr_assert_eq(pbrpc__heap_start(&h, &a, 100), 0);
	cr_assert_eq(pbrpc__heap_start(&h, &b, 200), 0);
	cr_assert_eq(pbrpc__heap_start(&h, &c, 300), 0);
	cr_assert(pbrpc__timer_armed(&a) && pbrpc__timer_armed(&b) && pbrpc__timer_armed(&c));
	cr_assert_eq(pbrpc__heap_top(&h), &a);

	/* c earlier than everything: it becomes the top; no duplicate entry. */
	cr_assert_eq(pbrpc__heap_start(&h, &c, 50), 0);
	cr_assert_eq(h.n, 3);
	cr_assert_eq(pbrpc__heap_top(&h), &c);
	/* c later than everything again. */
	cr_assert_eq(pbrpc__heap_start(&h, &c, 400), 0);
	cr_assert_eq(h.n, 3);
	cr_assert_eq(pbrpc__heap_top(&h), &a);
	/* the top later: b becomes the top. */
	cr_assert_eq(pbrpc__heap_start(&h, &a, 250), 0);
	cr_assert_eq(pbrpc__heap_top(&h), &b);
	/* same deadline: nothing moves */
	cr_assert_eq(pbrpc__heap_start(&h, &b, 200), 0);
	cr_assert_eq(pbrpc__heap_top(&h), &b);

	cr_assert_null(pbrpc__heap_pop_due(&h, 199));
	cr_assert_eq(pbrpc__heap_pop_due(&h, 200), &b);
	cr_assert_not(pbrpc__timer_armed(&b));
	cr_assert_null(pbrpc__heap_pop_due(&h, 249));
	cr_assert_eq(pbrpc__heap_pop_due(&h, 1000), &a);
	cr_assert_eq(pbrpc__heap_pop_due(&h, 1000), &c);
	cr_assert_null(pbrpc__heap_pop_due(&h, 1000));
	cr_assert_eq(h.n, 0);

	/* stop of an unarmed timer is a no-op, also with others armed */
	cr_assert_eq(pbrpc__heap_start(&h, &a, 10), 0);
	pbrpc__heap_stop(&h, &b);
	cr_assert_eq(h.n, 1);
	cr_assert_eq(pbrpc__heap_top(&h), &a);
	pbrpc__heap_stop(&h, &a);
	pbrpc__heap_stop(&h, &a);
	cr_assert_eq(h.n, 0);
	cr_assert_not(pbrpc__timer_armed(&a));
	pbrpc__heap_fini(&h);
}

/* ======================================================================== */
/* idmap                                                                    */
/* ======================================================================== */

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return (x > y) - (x < y);
}

/* Checks m against the reference: id[i] maps to &val[i] exactly when
 * present[i]; iteration with next() visits every entry once. */
static void idmap_check(const pbrpc__idmap *m, const uint32_t *id, const bool *present, const int *val, size_t n,
			uint64_t seed)
{
	uint32_t count = 0;
	for (size_t i = 0; i < n; i++) {
		void *p = pbrpc__idmap_get(m, id[i]);
		if (present[i]) {
			count++;
			cr_assert_eq(p, (void *)&val[i], "id %#x: %p, want %p " SEED_FMT, id[i], p, (void *)&val[i],
				     SEED(seed));
		} else {
			cr_assert_null(p, "id %#x absent, got %p " SEED_FMT, id[i], p, SEED(seed));
		}
	}
	cr_assert_eq(pbrpc__idmap_count(m), count, "count %u, want %u " SEED_FMT, pbrpc__idmap_count(m), count,
		     SEED(seed));
	if (m->v)
		cr_assert_leq((uint64_t)m->count * 2, (uint64_t)m->mask + 1, "load factor above 1/2");

	/* next() visits each entry exactly once, with its id. */
	bool *seen = calloc(n ? n : 1, 1);
	cr_assert(seen);
	uint32_t pos = 0, got_id = 0, visits = 0;
	void *p;
	while ((p = pbrpc__idmap_next(m, &pos, &got_id))) {
		size_t i = (size_t)((const int *)p - val);
		cr_assert_lt(i, n);
		cr_assert(present[i]);
		cr_assert_eq(got_id, id[i]);
		cr_assert_not(seen[i], "id %#x visited twice " SEED_FMT, id[i], SEED(seed));
		seen[i] = true;
		visits++;
	}
	cr_assert_eq(visits, count, "next visited %u of %u " SEED_FMT, visits, count, SEED(seed));
	/* At the end it stays at the end. */
	cr_assert_null(pbrpc__idmap_next(m, &pos, NULL));
	free(seen);
}

/* Puts all, deletes a random half, puts back, checks; then empties with
 * take_any. The ids must be distinct. */
static void idmap_exercise(uint32_t *id, size_t n, uint64_t seed)
{
	tu_rng rng = { seed };
	int *val = calloc(n, sizeof(*val));
	bool *present = calloc(n, sizeof(*present));
	cr_assert(val && present);
	pbrpc__idmap m;
	pbrpc__idmap_init(&m);
	cr_assert_null(m.v);
	cr_assert_eq(pbrpc__idmap_count(&m), 0);
	cr_assert_null(pbrpc__idmap_get(&m, id[0]));
	cr_assert_null(pbrpc__idmap_del(&m, id[0]));
	uint32_t pos = 0;
	cr_assert_null(pbrpc__idmap_next(&m, &pos, NULL));
	cr_assert_null(pbrpc__idmap_take_any(&m, NULL));

	for (size_t i = 0; i < n; i++) {
		cr_assert_eq(pbrpc__idmap_put(&m, id[i], &val[i]), 0);
		present[i] = true;
		cr_assert_eq(pbrpc__idmap_count(&m), (uint32_t)(i + 1));
	}
	idmap_check(&m, id, present, val, n, seed);

	for (int round = 0; round < 4; round++) {
		for (size_t k = 0; k < n; k++) {
			size_t i = (size_t)tu_rand_range(&rng, 0, n - 1);
			if (present[i]) {
				cr_assert_eq(pbrpc__idmap_del(&m, id[i]), (void *)&val[i], "del %#x " SEED_FMT, id[i],
					     SEED(seed));
				present[i] = false;
				/* deleting again: absent */
				cr_assert_null(pbrpc__idmap_del(&m, id[i]));
			} else {
				cr_assert_eq(pbrpc__idmap_put(&m, id[i], &val[i]), 0);
				present[i] = true;
			}
		}
		idmap_check(&m, id, present, val, n, seed);
	}

	/* take_any empties the map; each entry comes out once. */
	uint32_t count = pbrpc__idmap_count(&m), taken = 0, tid = 0;
	void *p;
	while ((p = pbrpc__idmap_take_any(&m, &tid))) {
		size_t i = (size_t)((int *)p - val);
		cr_assert_lt(i, n);
		cr_assert(present[i], "id %#x taken twice or never put " SEED_FMT, tid, SEED(seed));
		cr_assert_eq(tid, id[i]);
		present[i] = false;
		taken++;
		cr_assert_eq(pbrpc__idmap_count(&m), count - taken);
		/* what remains is still all findable (backward shift kept runs) */
		if (taken % 997 == 0)
			idmap_check(&m, id, present, val, n, seed);
	}
	cr_assert_eq(taken, count);
	cr_assert_eq(pbrpc__idmap_count(&m), 0);
	idmap_check(&m, id, present, val, n, seed);

	/* fini: reusable */
	pbrpc__idmap_fini(&m);
	cr_assert_null(m.v);
	cr_assert_eq(pbrpc__idmap_put(&m, id[0], &val[0]), 0);
	cr_assert_eq(pbrpc__idmap_get(&m, id[0]), (void *)&val[0]);
	pbrpc__idmap_fini(&m);
	free(val);
	free(present);
}

Test(util, idmap_random_ids)
{
	enum { N = 10000 };
	uint64_t seed = tu_seed();
	tu_rng rng = { seed ^ 0x1d };
	uint32_t *id = malloc(N * sizeof(*id));
	cr_assert(id);
	/* distinct random ids */
	size_t n = 0;
	while (n < N) {
		for (size_t i = n; i < N; i++)
			id[i] = (uint32_t)tu_rand(&rng);
		qsort(id, N, sizeof(*id), cmp_u32);
		n = 0;
		for (size_t i = 0; i < N; i++)
			if (n == 0 || id[i] != id[n - 1])
				id[n++] = id[i];
	}
	uint32_t *sorted = malloc(N * sizeof(*id));
	cr_assert(sorted);
	memcpy(sorted, id, N * sizeof(*id));
	/* shuffle the insertion order */
	for (size_t i = N - 1; i > 0; i--) {
		size_t j = (size_t)tu_rand_range(&rng, 0, i);
		uint32_t t = id[i];
		id[i] = id[j];
		id[j] = t;
	}
	idmap_exercise(id, N, seed);

	/* Ids never put are absent, and deleting them returns NULL. */
	pbrpc__idmap m;
	pbrpc__idmap_init(&m);
	static int dummy[N];
	for (size_t i = 0; i < N; i++)
		cr_assert_eq(pbrpc__idmap_put(&m, id[i], &dummy[i]), 0);
	for (int k = 0; k < 10000; k++) {
		uint32_t x = (uint32_t)tu_rand(&rng);
		if (bsearch(&x, sorted, N, sizeof(*sorted), cmp_u32))
			continue;
		cr_assert_null(pbrpc__idmap_get(&m, x));
		cr_assert_null(pbrpc__idmap_del(&m, x));
	}
	cr_assert_eq(pbrpc__idmap_count(&m), N);
	pbrpc__idmap_fini(&m);
	free(id);
	free(sorted);
}

Test(util, idmap_sequential_ids)
{
	enum { N = 10000 };
	uint32_t *id = malloc(N * sizeof(*id));
	cr_assert(id);
	for (uint32_t i = 0; i < N; i++)
		id[i] = i + 1;
	idmap_exercise(id, N, tu_seed());
	free(id);
}

Test(util, idmap_ids_sharing_low_bits)
{
	enum { N = 10000 };
	uint32_t *id = malloc(N * sizeof(*id));
	cr_assert(id);
	for (uint32_t i = 0; i < N; i++)
		id[i] = (i << 16) | 0xbeefu;
	idmap_exercise(id, N, tu_seed());
	/* and sharing the low 24 bits (only 256 of them) */
	for (uint32_t i = 0; i < 256; i++)
		id[i] = (i << 24) | 0xabcdefu;
	idmap_exercise(id, 256, tu_seed() + 1);
	free(id);
}

Test(util, idmap_extreme_ids)
{
	uint32_t id[] = { 0xFFFFFFFFu, 0xFFFFFFFEu, 0xFFFFFFFDu, 0xFFFF0000u, 0xFFFFFFF0u, 0x7FFFFFFFu,
			  0x80000000u, 0x80000001u, 0u,          1u,          2u,          0xFFFFu,
			  0x10000u,    0xFFFFFFFCu };
	idmap_exercise(id, sizeof(id) / sizeof(id[0]), tu_seed());

	/* One at a time: the largest id alone, then its neighbours. */
	pbrpc__idmap m;
	pbrpc__idmap_init(&m);
	int x = 1, y = 2;
	cr_assert_eq(pbrpc__idmap_put(&m, 0xFFFFFFFFu, &x), 0);
	cr_assert_eq(pbrpc__idmap_get(&m, 0xFFFFFFFFu), &x);
	cr_assert_null(pbrpc__idmap_get(&m, 0xFFFFFFFEu));
	cr_assert_null(pbrpc__idmap_get(&m, 0x7FFFFFFFu));
	cr_assert_null(pbrpc__idmap_get(&m, 0));
	cr_assert_eq(pbrpc__idmap_put(&m, 0, &y), 0);
	cr_assert_eq(pbrpc__idmap_get(&m, 0), &y);
	cr_assert_eq(pbrpc__idmap_del(&m, 0xFFFFFFFFu), &x);
	cr_assert_null(pbrpc__idmap_get(&m, 0xFFFFFFFFu));
	cr_assert_eq(pbrpc__idmap_get(&m, 0), &y);
	cr_assert_eq(pbrpc__idmap_count(&m), 1);
	pbrpc__idmap_fini(&m);
}

Test(util, idmap_reserve_then_put_does_not_grow)
{
	pbrpc__idmap m;
	pbrpc__idmap_init(&m);
	static int val[5000];
	cr_assert_eq(pbrpc__idmap_reserve(&m), 0);
	cr_assert_not_null(m.v, "reserve on an empty map allocates the first slots");
	cr_assert_eq(pbrpc__idmap_count(&m), 0);
	for (uint32_t i = 0; i < 5000; i++) {
		cr_assert_eq(pbrpc__idmap_reserve(&m), 0);
		const pbrpc__idmap_slot *v = m.v;
		uint32_t mask = m.mask;
		/* a second reserve changes nothing either */
		cr_assert_eq(pbrpc__idmap_reserve(&m), 0);
		cr_assert_eq(m.v, v);
		cr_assert_eq(pbrpc__idmap_put(&m, i * 7919u, &val[i]), 0);
		cr_assert_eq(m.v, v, "put after reserve reallocated at %u entries", i);
		cr_assert_eq(m.mask, mask);
		cr_assert_eq(pbrpc__idmap_count(&m), i + 1);
	}
	for (uint32_t i = 0; i < 5000; i++)
		cr_assert_eq(pbrpc__idmap_get(&m, i * 7919u), &val[i]);
	pbrpc__idmap_fini(&m);
}

Test(util, idmap_iterate_with_restart_while_deleting)
{
	/* The documented way to delete during next(): restart from 0. */
	enum { N = 3000 };
	static int val[N];
	pbrpc__idmap m;
	pbrpc__idmap_init(&m);
	for (uint32_t i = 0; i < N; i++)
		cr_assert_eq(pbrpc__idmap_put(&m, i * 2654435761u, &val[i]), 0);
	bool seen[N] = { false };
	uint32_t n = 0, pos = 0, id;
	void *p;
	while ((p = pbrpc__idmap_next(&m, &pos, &id))) {
		size_t i = (size_t)((int *)p - val);
		cr_assert_not(seen[i]);
		seen[i] = true;
		cr_assert_eq(pbrpc__idmap_del(&m, id), p);
		n++;
		pos = 0;
	}
	cr_assert_eq(n, N);
	cr_assert_eq(pbrpc__idmap_count(&m), 0);
	pbrpc__idmap_fini(&m);
}

/* ======================================================================== */
/* arena                                                                    */
/* ======================================================================== */

typedef struct alloc_rec {
	uint8_t *p;
	size_t size;
} alloc_rec;

static int cmp_rec(const void *a, const void *b)
{
	uintptr_t x = (uintptr_t)((const alloc_rec *)a)->p, y = (uintptr_t)((const alloc_rec *)b)->p;
	return (x > y) - (x < y);
}

/* n allocations of random sizes; each 16-byte aligned, filled with its own
 * pattern, then all checked intact and non-overlapping. */
static void arena_fill_check(pbrpc__arena *a, tu_rng *rng, size_t n, size_t max, uint64_t seed)
{
	alloc_rec *rec = calloc(n, sizeof(*rec));
	cr_assert(rec);
	for (size_t i = 0; i < n; i++) {
		size_t size = (size_t)tu_rand_range(rng, 0, max);
		uint8_t *p = pbrpc__arena_alloc(a, size);
		cr_assert_not_null(p, "alloc %zu of %zu bytes " SEED_FMT, i, size, SEED(seed));
		cr_assert_eq((uintptr_t)p % 16, 0, "alloc %zu (%zu bytes) at %p not 16-aligned", i, size, (void *)p);
		memset(p, (int)(i * 31 + 7) & 0xff, size);
		rec[i].p = p;
		rec[i].size = size;
	}
	cr_assert_not(a->failed);
	for (size_t i = 0; i < n; i++)
		for (size_t k = 0; k < rec[i].size; k++)
			cr_assert_eq(rec[i].p[k], (uint8_t)((i * 31 + 7) & 0xff), "alloc %zu byte %zu overwritten " SEED_FMT,
				     i, k, SEED(seed));
	qsort(rec, n, sizeof(*rec), cmp_rec);
	for (size_t i = 1; i < n; i++) {
		cr_assert_neq(rec[i - 1].p, rec[i].p, "two allocations at %p", (void *)rec[i].p);
		cr_assert_leq((uintptr_t)rec[i - 1].p + rec[i - 1].size, (uintptr_t)rec[i].p, "allocations overlap");
	}
	free(rec);
}

static size_t arena_extra_count(const pbrpc__arena *a)
{
	/* The chunk layout is private; count through the first field (next). */
	size_t n = 0;
	for (const pbrpc__arena_chunk *c = a->extra; c; c = *(pbrpc__arena_chunk *const *)c)
		n++;
	return n;
}

Test(util, arena_aligned_distinct)
{
	uint64_t seed = tu_seed();
	tu_rng rng = { seed };
	pbrpc__arena a;
	pbrpc__arena_init(&a, 64 * 1024, NULL);
	arena_fill_check(&a, &rng, 3000, 300, seed);
	/* and with some allocations larger than any chunk */
	arena_fill_check(&a, &rng, 50, 20000, seed);
	pbrpc__arena_reset(&a);
	arena_fill_check(&a, &rng, 3000, 100, seed);
	/* zero-byte allocations are distinct non-NULL pointers too */
	void *z1 = pbrpc__arena_alloc(&a, 0), *z2 = pbrpc__arena_alloc(&a, 0);
	cr_assert_not_null(z1);
	cr_assert_not_null(z2);
	cr_assert_neq(z1, z2);
	pbrpc__arena_fini(&a);
	cr_assert_null(a.buf);
	cr_assert_null(a.extra);
}

Test(util, arena_reset_reuses_buffer)
{
	/* The same sequence after a reset fits in the retained buffer. */
	static const size_t sizes[] = { 24, 100, 3000, 7, 5000, 16, 640, 1, 2048, 333 };
	enum { NS = sizeof(sizes) / sizeof(sizes[0]) };
	size_t total = 0;
	for (size_t i = 0; i < NS; i++)
		total += (sizes[i] + 15) & ~(size_t)15;

	pbrpc__arena a;
	pbrpc__arena_init(&a, 1 << 20, NULL);
	cr_assert_null(a.buf);
	for (size_t i = 0; i < NS; i++)
		cr_assert_not_null(pbrpc__arena_alloc(&a, sizes[i]));
	cr_assert_eq(a.want, total);
	cr_assert_not_null(a.buf);
	cr_assert_not_null(a.extra, "the first run (%zu bytes) overflows the first buffer", total);
	pbrpc__arena_reset(&a);
	cr_assert_null(a.extra);
	cr_assert_eq(a.want, 0);
	cr_assert_geq(a.cap, total, "reset grows the buffer to what the run needed");
	uint8_t *buf = a.buf;
	size_t cap = a.cap;

	for (int run = 0; run < 3; run++) {
		for (size_t i = 0; i < NS; i++) {
			uint8_t *p = pbrpc__arena_alloc(&a, sizes[i]);
			cr_assert_not_null(p);
			cr_assert(p >= buf && p + sizes[i] <= buf + cap, "run %d alloc %zu outside the buffer", run, i);
		}
		cr_assert_null(a.extra, "run %d needed an extra chunk", run);
		cr_assert_eq(arena_extra_count(&a), 0);
		cr_assert_eq(a.want, total);
		pbrpc__arena_reset(&a);
		cr_assert_eq(a.buf, buf, "run %d: the buffer was replaced", run);
		cr_assert_eq(a.cap, cap);
		cr_assert_eq(a.p, a.buf);
	}

	/* shrink: a buffer above the limit goes; below it stays */
	pbrpc__arena_shrink(&a, cap);
	cr_assert_eq(a.buf, buf);
	pbrpc__arena_shrink(&a, cap - 1);
	cr_assert_null(a.buf);
	cr_assert_eq(a.cap, 0);
	/* and the arena still works */
	cr_assert_not_null(pbrpc__arena_alloc(&a, 10));
	pbrpc__arena_fini(&a);
}

Test(util, arena_limit_fails_allocations_past_it)
{
	pbrpc__arena_chunk *spare = NULL;
	pbrpc__arena a;
	pbrpc__arena_init(&a, 4096, &spare);
	pbrpc__arena_set_limit(&a, 100000);
	size_t got = 0;
	while (pbrpc__arena_alloc(&a, 1000))
		got += 1008; /* rounded to 16 */
	cr_assert(a.failed && a.limited);
	cr_assert_leq(a.want, 100000);
	cr_assert_geq(got, 100000 - 1008 - 8192, "the limit, not less, bounds the arena: %zu", got);
	/* exactly at the limit passes */
	pbrpc__arena_reset(&a);
	cr_assert(!a.failed && !a.limited);
	pbrpc__arena_set_limit(&a, 50000);
	cr_assert_not_null(pbrpc__arena_alloc(&a, 50000 - 16));
	cr_assert_not_null(pbrpc__arena_alloc(&a, 16));
	cr_assert_null(pbrpc__arena_alloc(&a, 1));
	/* a chunk larger than PBRPC__ARENA_SPARE_MAX is freed at reset, not kept */
	pbrpc__arena_reset(&a);
	pbrpc__arena_spare_free(&spare);
	pbrpc__arena_set_limit(&a, SIZE_MAX);
	cr_assert_not_null(pbrpc__arena_alloc(&a, PBRPC__ARENA_SPARE_MAX + 1));
	pbrpc__arena_reset(&a);
	cr_assert_null(spare);
	cr_assert_not_null(pbrpc__arena_alloc(&a, 100000));
	pbrpc__arena_reset(&a);
	cr_assert_not_null(spare);
	pbrpc__arena_fini(&a);
	pbrpc__arena_spare_free(&spare);
}

Test(util, arena_keep_is_an_upper_bound)
{
	pbrpc__arena a;
	pbrpc__arena_init(&a, 8192, NULL);
	for (int i = 0; i < 100; i++)
		cr_assert_not_null(pbrpc__arena_alloc(&a, 1000));
	pbrpc__arena_reset(&a);
	cr_assert_leq(a.cap, 8192);
	cr_assert_not_null(a.buf);
	pbrpc__arena_fini(&a);
}

Test(util, arena_keep_zero)
{
	uint64_t seed = tu_seed();
	tu_rng rng = { seed };
	pbrpc__arena a;
	pbrpc__arena_init(&a, 0, NULL);
	for (int run = 0; run < 3; run++) {
		arena_fill_check(&a, &rng, 500, 200, seed);
		cr_assert_null(a.buf, "keep=0 never retains a buffer");
		cr_assert_not_null(a.extra);
		cr_assert_geq(arena_extra_count(&a), 1);
		pbrpc__arena_reset(&a);
		cr_assert_null(a.buf);
		cr_assert_null(a.extra);
		cr_assert_eq(a.cap, 0);
	}
	pbrpc__arena_fini(&a);
}

Test(util, arena_spare_chunk)
{
	enum { BIG = 1 << 20 };
	pbrpc__arena_chunk *spare = NULL;
	pbrpc__arena a, b;
	pbrpc__arena_init(&a, 4096, &spare);
	pbrpc__arena_init(&b, 4096, &spare);

	uint8_t *p1 = pbrpc__arena_alloc(&a, BIG);
	cr_assert_not_null(p1);
	memset(p1, 0xa5, BIG);
	cr_assert_null(spare);
	pbrpc__arena_reset(&a);
	cr_assert_not_null(spare, "reset keeps the big chunk as the spare");
	cr_assert_null(a.extra);

	/* b's big allocation takes the spare: the same memory. */
	uint8_t *p2 = pbrpc__arena_alloc(&b, BIG);
	cr_assert_eq(p2, p1, "the second arena did not reuse the spare");
	cr_assert_null(spare, "the spare was taken");
	/* a allocating big now gets fresh memory */
	uint8_t *p3 = pbrpc__arena_alloc(&a, BIG);
	cr_assert_not_null(p3);
	cr_assert_neq(p3, p2);
	memset(p2, 1, BIG);
	memset(p3, 2, BIG);
	cr_assert_eq(p2[BIG - 1], 1);

	/* A spare too small for the request is not taken. */
	pbrpc__arena_reset(&b); /* spare = b's 1 MiB chunk */
	cr_assert_not_null(spare);
	pbrpc__arena_chunk *s = spare;
	uint8_t *p4 = pbrpc__arena_alloc(&b, 2 * BIG);
	cr_assert_not_null(p4);
	cr_assert_eq(spare, s, "a too-small spare stays");
	/* at reset the larger chunk replaces the spare */
	pbrpc__arena_reset(&b);
	cr_assert_neq(spare, s);
	/* ... and serves a's next big allocation */
	uint8_t *p5 = pbrpc__arena_alloc(&a, 2 * BIG - 64);
	cr_assert_eq(p5, p4);
	cr_assert_null(spare);
	/* a's reset keeps the largest of its chunks, frees the rest */
	pbrpc__arena_reset(&a);
	cr_assert_eq(pbrpc__arena_alloc(&b, 2 * BIG), p4);
	pbrpc__arena_reset(&b);
	cr_assert_not_null(spare);

	pbrpc__arena_fini(&a);
	pbrpc__arena_fini(&b);
	cr_assert_not_null(spare, "fini leaves the shared spare to its owner");
	pbrpc__arena_spare_free(&spare);
	cr_assert_null(spare);
}

Test(util, arena_protobuf_allocator)
{
	Demo__EchoRequest in = DEMO__ECHO_REQUEST__INIT;
	uint8_t payload[3000];
	for (size_t i = 0; i < sizeof(payload); i++)
		payload[i] = (uint8_t)(i * 7);
	in.payload.data = payload;
	in.payload.len = sizeof(payload);
	in.delay_ms = 42;
	in.fail_status = 5;
	in.fail_message = "not here";
	size_t len = demo__echo_request__get_packed_size(&in);
	uint8_t *packed = malloc(len);
	cr_assert(packed);
	cr_assert_eq(demo__echo_request__pack(&in, packed), len);

	pbrpc__arena a;
	pbrpc__arena_init(&a, 64 * 1024, NULL);
	for (int run = 0; run < 3; run++) {
		Demo__EchoRequest *m = demo__echo_request__unpack(&a.pa, len, packed);
		cr_assert_not_null(m, "run %d", run);
		cr_assert_gt(a.want, sizeof(*m), "the message came from the arena");
		cr_assert_eq(m->delay_ms, 42);
		cr_assert_eq(m->fail_status, 5);
		cr_assert_str_eq(m->fail_message, "not here");
		cr_assert_eq(m->payload.len, sizeof(payload));
		cr_assert_arr_eq(m->payload.data, payload, sizeof(payload));
		cr_assert_eq((uintptr_t)m % 16, 0);
		if (run > 0) /* second and later runs fit in the retained buffer */
			cr_assert((uint8_t *)m >= a.buf && (uint8_t *)m < a.buf + a.cap);
		demo__echo_request__free_unpacked(m, &a.pa); /* a no-op */
		cr_assert_not(a.failed);
		pbrpc__arena_reset(&a);
	}
	pbrpc__arena_fini(&a);
	free(packed);
}

Test(util, arena_failed_flag)
{
	pbrpc__arena a;
	pbrpc__arena_init(&a, 4096, NULL);
	cr_assert_not_null(pbrpc__arena_alloc(&a, 100));
	cr_assert_not(a.failed);
	cr_assert_null(pbrpc__arena_alloc(&a, SIZE_MAX));
	cr_assert(a.failed);
	cr_assert_null(pbrpc__arena_alloc(&a, SIZE_MAX - 15));
	cr_assert_null(pbrpc__arena_alloc(&a, SIZE_MAX / 2 + 1));
	cr_assert(a.failed);
	/* it still serves small allocations, and the flag stays until reset */
	cr_assert_not_null(pbrpc__arena_alloc(&a, 100));
	cr_assert(a.failed);
	pbrpc__arena_reset(&a);
	cr_assert_not(a.failed);
	cr_assert_not_null(pbrpc__arena_alloc(&a, 100));
	pbrpc__arena_fini(&a);

	/* Through protobuf-c: a failed allocation makes unpack fail cleanly. */
	pbrpc__arena b;
	pbrpc__arena_init(&b, 4096, NULL);
	cr_assert_null(b.pa.alloc(b.pa.allocator_data, SIZE_MAX));
	cr_assert(b.failed);
	pbrpc__arena_fini(&b);
}

/* ======================================================================== */
/* clock.h                                                                  */
/* ======================================================================== */

Test(util, clock_helpers)
{
	int64_t now = pbrpc__now_ns();
	cr_assert_gt(now, 0);
	cr_assert_eq(pbrpc__deadline_in(now, -1), 0);
	cr_assert_eq(pbrpc__deadline_in(now, INT_MIN), 0);
	cr_assert_eq(pbrpc__deadline_in(now, 0), now);
	cr_assert_eq(pbrpc__deadline_in(now, 250), now + 250 * PBRPC__NS_PER_MS);
	cr_assert_eq(pbrpc__deadline_in(now, INT_MAX), now + (int64_t)INT_MAX * PBRPC__NS_PER_MS);

	cr_assert_eq(pbrpc__ms_until(0), -1);
	cr_assert_eq(pbrpc__ms_until(1), 0); /* long past */
	cr_assert_eq(pbrpc__ms_until(now - PBRPC__NS_PER_S), 0);
	cr_assert_eq(pbrpc__ms_until(pbrpc__now_ns()), 0);
	int ms = pbrpc__ms_until(pbrpc__now_ns() + 10 * PBRPC__NS_PER_S);
	cr_assert(ms > 9000 && ms <= 10000, "ms_until(now + 10 s) = %d", ms);
	/* rounded up: a deadline 1 ns away is 1 ms away */
	ms = pbrpc__ms_until(pbrpc__now_ns() + PBRPC__NS_PER_S / 2 + 1);
	cr_assert(ms >= 1 && ms <= 501, "%d", ms);
	cr_assert_eq(pbrpc__ms_until(INT64_MAX), INT_MAX);

	cr_assert_eq(pbrpc__deadline_min(0, 0), 0);
	cr_assert_eq(pbrpc__deadline_min(0, 5), 5);
	cr_assert_eq(pbrpc__deadline_min(5, 0), 5);
	cr_assert_eq(pbrpc__deadline_min(3, 5), 3);
	cr_assert_eq(pbrpc__deadline_min(5, 3), 3);
	cr_assert_eq(pbrpc__deadline_min(7, 7), 7);

	struct timespec ts = pbrpc__deadline_timespec(3 * PBRPC__NS_PER_S + 123);
	cr_assert_eq(ts.tv_sec, 3);
	cr_assert_eq(ts.tv_nsec, 123);
}

/* A failed allocation is not something the use needed: the next reset does
 * not grow the retained buffer for it (found by this suite: want was counted
 * before the allocation was known to succeed). */
Test(util, arena_failed_alloc_does_not_grow_buffer)
{
	pbrpc__arena a;
	pbrpc__arena_init(&a, 1 << 20, NULL);
	cr_assert_not_null(pbrpc__arena_alloc(&a, 100));
	cr_assert_null(pbrpc__arena_alloc(&a, SIZE_MAX / 2 + 1));
	cr_assert(a.failed);
	pbrpc__arena_reset(&a);
	cr_assert_leq(a.cap, 4096, "retained buffer grew to %zu after a failed allocation", a.cap);
	pbrpc__arena_fini(&a);
}
