/* One map from u32 ids to pointers, used for every kind of id (call ids on
 * both sides). Open addressing with linear probing and backward-shift
 * deletion; the id is stored in the slot, so a lookup never touches the
 * record it finds (nng's idhash, libwayland's wl_map). Slots are placed by
 * the high bits of a multiplicative (Fibonacci) hash, so sequential ids
 * spread evenly and ids that share their low bits do not pile up. Load
 * factor at most 1/2. Not thread-safe. */
#ifndef PBRPC_UTIL_IDMAP_H
#define PBRPC_UTIL_IDMAP_H

#include <stddef.h>
#include <stdint.h>

typedef struct pbrpc__idmap_slot {
	uint32_t id;
	void *ptr; /* NULL: the slot is empty */
} pbrpc__idmap_slot;

typedef struct pbrpc__idmap {
	pbrpc__idmap_slot *v; /* NULL until the first put */
	uint32_t mask;        /* capacity - 1 */
	uint32_t shift;       /* 32 - log2(capacity) */
	uint32_t count;
	uint32_t take_at; /* where pbrpc__idmap_take_any resumes its scan */
} pbrpc__idmap;

static inline uint32_t pbrpc__idmap_home(const pbrpc__idmap *m, uint32_t id)
{
	return (uint32_t)(id * 2654435769u) >> m->shift;
}

/* The pointer stored for id, or NULL. */
static inline void *pbrpc__idmap_get(const pbrpc__idmap *m, uint32_t id)
{
	if (!m->v)
		return NULL;
	for (uint32_t i = pbrpc__idmap_home(m, id);; i = (i + 1) & m->mask) {
		const pbrpc__idmap_slot *s = &m->v[i];
		if (!s->ptr)
			return NULL;
		if (s->id == id)
			return s->ptr;
	}
}

static inline uint32_t pbrpc__idmap_count(const pbrpc__idmap *m)
{
	return m->count;
}

/* An empty map; allocates nothing. */
void pbrpc__idmap_init(pbrpc__idmap *m);

/* Frees the slots (not what they point at). The map may be used again. */
void pbrpc__idmap_fini(pbrpc__idmap *m);

int pbrpc__idmap_grow(pbrpc__idmap *m);

/* Makes room so that the next put cannot fail. Returns 0 or -ENOMEM. */
static inline int pbrpc__idmap_reserve(pbrpc__idmap *m)
{
	if (m->v && (m->count + 1) * 2 <= m->mask + 1)
		return 0;
	return pbrpc__idmap_grow(m);
}

/* Stores ptr (not NULL) for id, which must not be present. Returns 0 or
 * -ENOMEM (the map is unchanged). */
static inline int pbrpc__idmap_put(pbrpc__idmap *m, uint32_t id, void *ptr)
{
	int rc = pbrpc__idmap_reserve(m);
	if (rc < 0)
		return rc;
	uint32_t i = pbrpc__idmap_home(m, id);
	while (m->v[i].ptr)
		i = (i + 1) & m->mask;
	m->v[i].id = id;
	m->v[i].ptr = ptr;
	m->count++;
	return 0;
}

/* Removes id; returns what was stored, or NULL if it was absent. */
void *pbrpc__idmap_del(pbrpc__idmap *m, uint32_t id);

/* Iteration in slot order: *pos starts at 0; returns the next stored pointer
 * (and its id in *id when not NULL), or NULL at the end. Deleting the
 * returned entry during iteration may shift a later entry into an earlier
 * slot: to visit everything while deleting, restart from 0 or use
 * pbrpc__idmap_take_any(). */
void *pbrpc__idmap_next(const pbrpc__idmap *m, uint32_t *pos, uint32_t *id);

/* Removes and returns some entry (NULL when empty), for emptying a map one
 * entry at a time while the entries' owners react (each may delete others).
 * It scans downwards from where the previous one was found (a deletion
 * shifts entries down into the hole, never above it, but for a probe run
 * that wraps around the end), so emptying a whole map scans it about once. */
void *pbrpc__idmap_take_any(pbrpc__idmap *m, uint32_t *id);

#endif
