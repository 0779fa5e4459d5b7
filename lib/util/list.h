/* One intrusive, circular, doubly linked list (libwayland's wl_list, in our
 * words). A list head and the links embedded in elements are the same type;
 * an element's link is "unlinked" when it points at itself, so membership is
 * derived from the link, never kept in a separate flag. No allocation. */
#ifndef PBRPC_UTIL_LIST_H
#define PBRPC_UTIL_LIST_H

#include <stdbool.h>
#include <stddef.h>

typedef struct pbrpc__list {
	struct pbrpc__list *prev, *next;
} pbrpc__list;

#define pbrpc__container_of(ptr, type, member) ((type *)(void *)((char *)(ptr)-offsetof(type, member)))

static inline void pbrpc__list_init(pbrpc__list *l)
{
	l->prev = l->next = l;
}

static inline bool pbrpc__list_empty(const pbrpc__list *l)
{
	return l->next == l;
}

/* True when the element link `e` is on some list (it was initialised, then
 * inserted, and not removed since). */
static inline bool pbrpc__list_linked(const pbrpc__list *e)
{
	return e->next != e;
}

/* Inserts e after `at` (at the head when `at` is the list). */
static inline void pbrpc__list_insert(pbrpc__list *at, pbrpc__list *e)
{
	e->prev = at;
	e->next = at->next;
	at->next->prev = e;
	at->next = e;
}

/* Appends e at the tail of list l. */
static inline void pbrpc__list_append(pbrpc__list *l, pbrpc__list *e)
{
	pbrpc__list_insert(l->prev, e);
}

/* Unlinks e and leaves it unlinked (pointing at itself). */
static inline void pbrpc__list_remove(pbrpc__list *e)
{
	e->prev->next = e->next;
	e->next->prev = e->prev;
	e->prev = e->next = e;
}

/* The first element's link, or NULL when the list is empty. */
static inline pbrpc__list *pbrpc__list_first(const pbrpc__list *l)
{
	return l->next == l ? NULL : l->next;
}

/* Moves every element of src to the tail of dst; src becomes empty. */
static inline void pbrpc__list_splice(pbrpc__list *dst, pbrpc__list *src)
{
	if (pbrpc__list_empty(src))
		return;
	src->next->prev = dst->prev;
	dst->prev->next = src->next;
	src->prev->next = dst;
	dst->prev = src->prev;
	pbrpc__list_init(src);
}

/* Iterates the elements of `head` as `type *pos` through `member`. The _safe
 * form allows removing pos inside the loop. */
#define pbrpc__list_for_each(pos, head, type, member)                                   \
	for (type *pos = pbrpc__container_of((head)->next, type, member);               \
	     &pos->member != (head); pos = pbrpc__container_of(pos->member.next, type, member))

#define pbrpc__list_for_each_safe(pos, head, type, member)                             \
	for (type *pos = pbrpc__container_of((head)->next, type, member),               \
		  *pos##_next = pbrpc__container_of(pos->member.next, type, member);     \
	     &pos->member != (head);                                                     \
	     pos = pos##_next, pos##_next = pbrpc__container_of(pos->member.next, type, member))

#endif
