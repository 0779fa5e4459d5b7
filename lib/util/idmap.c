#include "util/idmap.h"

#include <errno.h>
#include <stdlib.h>

#define IDMAP_MIN_BITS 4

void pbrpc__idmap_init(pbrpc__idmap *m)
{
	m->v = NULL;
	m->mask = 0;
	m->shift = 32;
	m->count = 0;
	m->take_at = 0;
}

void pbrpc__idmap_fini(pbrpc__idmap *m)
{
	free(m->v);
	pbrpc__idmap_init(m);
}

static void place(pbrpc__idmap *m, uint32_t id, void *ptr)
{
	uint32_t i = pbrpc__idmap_home(m, id);
	while (m->v[i].ptr)
		i = (i + 1) & m->mask;
	m->v[i].id = id;
	m->v[i].ptr = ptr;
}

int pbrpc__idmap_grow(pbrpc__idmap *m)
{
	uint32_t bits = m->v ? 32 - m->shift + 1 : IDMAP_MIN_BITS;
	if (bits > 30)
		return -ENOMEM;
	pbrpc__idmap_slot *nv = calloc((size_t)1 << bits, sizeof(*nv));
	if (!nv)
		return -ENOMEM;
	pbrpc__idmap old = *m;
	m->v = nv;
	m->mask = ((uint32_t)1 << bits) - 1;
	m->shift = 32 - bits;
	m->take_at = m->mask;
	for (uint32_t i = 0; old.v && i <= old.mask; i++)
		if (old.v[i].ptr)
			place(m, old.v[i].id, old.v[i].ptr);
	free(old.v);
	return 0;
}

/* Empties slot i and shifts back the entries of its probe run that would
 * no longer be found past the hole. */
static void del_slot(pbrpc__idmap *m, uint32_t i)
{
	m->count--;
	for (uint32_t j = i;;) {
		m->v[i].ptr = NULL;
		for (;;) {
			j = (j + 1) & m->mask;
			if (!m->v[j].ptr)
				return;
			uint32_t home = pbrpc__idmap_home(m, m->v[j].id);
			/* The entry at j may stay unless its home lies cyclically in (i, j]. */
			int stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
			if (!stays)
				break;
		}
		m->v[i] = m->v[j];
		i = j;
	}
}

void *pbrpc__idmap_del(pbrpc__idmap *m, uint32_t id)
{
	if (!m->v)
		return NULL;
	for (uint32_t i = pbrpc__idmap_home(m, id);; i = (i + 1) & m->mask) {
		void *p = m->v[i].ptr;
		if (!p)
			return NULL;
		if (m->v[i].id == id) {
			del_slot(m, i);
			return p;
		}
	}
}

void *pbrpc__idmap_next(const pbrpc__idmap *m, uint32_t *pos, uint32_t *id)
{
	for (; m->v && *pos <= m->mask; (*pos)++) {
		const pbrpc__idmap_slot *s = &m->v[*pos];
		if (s->ptr) {
			(*pos)++;
			if (id)
				*id = s->id;
			return s->ptr;
		}
	}
	return NULL;
}

static void *take_at(pbrpc__idmap *m, uint32_t i, uint32_t *id)
{
	void *p = m->v[i].ptr;
	if (id)
		*id = m->v[i].id;
	del_slot(m, i);
	m->take_at = i; /* a shifted entry may now sit at i: look there first */
	return p;
}

void *pbrpc__idmap_take_any(pbrpc__idmap *m, uint32_t *id)
{
	if (!m->count)
		return NULL;
	uint32_t from = m->take_at > m->mask ? m->mask : m->take_at;
	for (uint32_t i = from + 1; i-- > 0;)
		if (m->v[i].ptr)
			return take_at(m, i, id);
	/* Only a run that wrapped around the end can have left entries above. */
	for (uint32_t i = m->mask; i > from; i--)
		if (m->v[i].ptr)
			return take_at(m, i, id);
	return NULL;
}
