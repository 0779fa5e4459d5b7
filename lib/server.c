/* pbrpc server: an epoll loop, connections, the dispatch table and calls.
 *
 * Threading: one loop thread owns every connection, call table and timer.
 * Other threads touch only (a) a call's `cancelled` flag, (b) the completion
 * queue, guarded by cq_mu, through which closures called off the loop thread
 * hand their packed replies back, and (c) the worker queue.
 *
 * Memory: reads land in one loop-wide scratch buffer and are decoded in place;
 * only a frame split across reads is copied into the connection's decoder.
 * Call records come from a free list and unpack their request into a retained
 * per-call arena, so a steady stream of small calls allocates nothing.
 */
#include "pbrpc/server.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "internal.h"
#include "pbrpc/endpoint.h"
#include "server_internal.h"

#define CALL_MAGIC 0x7062726bu
#define SCRATCH_SIZE (256u * 1024u)
#define READS_PER_WAKEUP 16
#define ARENA_FIRST 4096u
#define ARENA_KEEP (64u * 1024u)
#define CALL_POOL_MAX 1024
#define SWEEP_INTERVAL_NS 1000000000LL
#define AGENT "pbrpc-c/" "0.1.0"

#define container_of(p, type, member) ((type *)(void *)((char *)(p)-offsetof(type, member)))

/* ---- timers: a binary min-heap of embedded nodes ---- */

enum timer_kind { TIMER_CALL, TIMER_CONN, TIMER_STALL, TIMER_SWEEP, TIMER_DRAIN };

struct timer {
	int64_t when;
	size_t idx; /* position in the heap, SIZE_MAX when not armed */
	enum timer_kind kind;
};

struct heap {
	struct timer **v;
	size_t n, cap;
};

static void heap_swap(struct heap *h, size_t a, size_t b)
{
	struct timer *t = h->v[a];
	h->v[a] = h->v[b];
	h->v[b] = t;
	h->v[a]->idx = a;
	h->v[b]->idx = b;
}

static void heap_up(struct heap *h, size_t i)
{
	while (i > 0 && h->v[(i - 1) / 2]->when > h->v[i]->when) {
		heap_swap(h, i, (i - 1) / 2);
		i = (i - 1) / 2;
	}
}

static void heap_down(struct heap *h, size_t i)
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

static void timer_stop(struct heap *h, struct timer *t)
{
	if (t->idx == SIZE_MAX)
		return;
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

static int timer_start(struct heap *h, struct timer *t, int64_t when)
{
	timer_stop(h, t);
	if (h->n == h->cap) {
		size_t cap = h->cap ? h->cap * 2 : 64;
		struct timer **v = realloc(h->v, cap * sizeof(*v));
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

/* ---- arena: a bump allocator for unpacked requests ---- */

struct arena_big {
	struct arena_big *next;
	size_t size;
	max_align_t data[];
};

struct arena {
	uint8_t *buf;
	size_t cap, used, overflow;
	struct arena_big *bigs;
	/* The loop's one spare large block, shared by every call's arena: a
	 * stream of 1 MiB requests reuses it instead of allocating each time.
	 * Only the loop thread allocates from or resets an arena. */
	struct arena_big **spare;
};

static void *arena_alloc(void *ud, size_t size)
{
	struct arena *a = ud;
	size = (size + 15) & ~(size_t)15;
	if (!a->buf && size <= ARENA_KEEP) {
		size_t cap = ARENA_FIRST;
		while (cap < size)
			cap *= 2;
		a->buf = malloc(cap);
		if (a->buf)
			a->cap = cap;
	}
	if (a->buf && a->cap - a->used >= size) {
		void *p = a->buf + a->used;
		a->used += size;
		return p;
	}
	struct arena_big *b;
	if (a->spare && *a->spare && (*a->spare)->size >= size) {
		b = *a->spare;
		*a->spare = NULL;
	} else {
		b = malloc(sizeof(*b) + size);
		if (!b)
			return NULL;
		b->size = size;
	}
	b->next = a->bigs;
	a->bigs = b;
	if (size <= ARENA_KEEP)
		a->overflow += size;
	return b->data;
}

static void arena_free(void *ud, void *p)
{
	(void)ud;
	(void)p;
}

/* Forgets everything allocated; grows the buffer (up to ARENA_KEEP) when the
 * last use overflowed, so that the same shape of request fits next time. The
 * largest big block becomes the loop's spare. */
static void arena_reset(struct arena *a)
{
	while (a->bigs) {
		struct arena_big *b = a->bigs;
		a->bigs = b->next;
		if (a->spare && (!*a->spare || (*a->spare)->size < b->size)) {
			free(*a->spare);
			*a->spare = b;
		} else {
			free(b);
		}
	}
	if (a->overflow && a->used + a->overflow <= ARENA_KEEP) {
		size_t cap = a->cap ? a->cap : ARENA_FIRST;
		while (cap < a->used + a->overflow)
			cap *= 2;
		uint8_t *nb = realloc(a->buf, cap);
		if (nb) {
			a->buf = nb;
			a->cap = cap;
		}
	}
	a->used = a->overflow = 0;
}

static void arena_fini(struct arena *a)
{
	a->spare = NULL; /* the spare goes with the server, not with this call */
	arena_reset(a);
	free(a->buf);
	a->buf = NULL;
	a->cap = 0;
}

/* ---- objects ---- */

enum src_kind { SRC_LISTENER, SRC_CONN, SRC_WAKE };

struct service_entry {
	ProtobufCService *service;
	bool owned; /* built-in: destroyed with the server */
	bool serving;
};

struct method_entry {
	char *name; /* "pkg.Service/Method" */
	size_t len;
	uint64_t hash;
	size_t service; /* index into srv->services */
	unsigned index; /* method index within the service */
};

struct listener {
	enum src_kind kind;
	int fd;
	pbrpc_endpoint ep;
	bool owns_path;
	dev_t dev;
	ino_t ino;
};

enum conn_state { CONN_PREFACE, CONN_HELLO, CONN_OPEN, CONN_CLOSED };

struct call;

struct conn {
	enum src_kind kind;
	pbrpc_server *srv;
	int fd;
	enum conn_state state;
	size_t preface_got;
	bool draining;     /* GOAWAY(OK) sent */
	bool read_paused;  /* output above the bound */
	bool dirty;        /* on srv->dirty: output waits for a flush */
	bool resume;       /* unpaused: decode what was stashed before reading */
	bool is_unix;
	bool has_cred;
	uint32_t events; /* registered with epoll */
	uint32_t peer_max_frame;
	struct ucred cred;
	pbrpc_frame_decoder dec;
	pbrpc_frame_writer out;
	struct call **tab; /* open addressing on call id */
	uint32_t tab_cap, n_calls;
	struct timer timer; /* handshake, then idle */
	struct timer stall; /* reading paused and the peer reads nothing */
	int64_t last_active;
	struct conn *prev, *next;
	struct conn *dirty_next;
};

struct call {
	uint32_t magic;
	uint32_t id;
	pbrpc_server *srv;
	struct conn *conn; /* NULL once answered or the connection is gone */
	const struct method_entry *m;
	ProtobufCMessage *input;
	int status;
	char *status_msg;
	atomic_bool cancelled;
	bool answered; /* its RESPONSE has been queued (or can no longer be) */
	int64_t deadline_ns;
	struct timer timer;
	bool has_cred;
	struct ucred cred; /* copied from the connection: it may close first */
	uint8_t *md; /* copy of the request's metadata block */
	size_t md_len, md_cap;
	struct arena arena;
	ProtobufCAllocator alloc;
	struct call *live_prev, *live_next; /* all calls not yet completed */
	struct call *next;                  /* free list, worker or completion queue */
	/* completion handed over from another thread */
	int done_status;
	char *done_msg;
	uint8_t *done_body;
	size_t done_len;
	bool not_run;
};

/* A FIFO of calls linked through call->next; the caller holds its lock. */
struct call_queue {
	struct call *head, *tail;
};

static void queue_push(struct call_queue *q, struct call *call)
{
	call->next = NULL;
	if (q->tail)
		q->tail->next = call;
	else
		q->head = call;
	q->tail = call;
}

struct pbrpc_server {
	pbrpc_server_opts o;
	int epfd;
	struct {
		enum src_kind kind;
		int fd;
	} wake;
	uint8_t *scratch;
	size_t scratch_cap;  /* SCRATCH_SIZE, or a large request's size while they arrive */
	size_t scratch_used; /* largest read since the last sweep */
	size_t scratch_want; /* twice the largest request just received whole */

	struct service_entry *services;
	size_t n_services;
	struct method_entry *methods; /* open addressing, cap power of two */
	size_t methods_cap, n_methods;
	bool overall_serving;

	struct listener **listeners;
	size_t n_listeners;

	struct conn *conns;
	struct conn *dirty;
	struct heap timers;
	struct timer sweep;
	struct timer drain;

	struct call *free_calls;
	size_t n_free_calls;
	struct arena_big *spare_big; /* see struct arena */
	struct call *live;

	pthread_mutex_t cq_mu;
	struct call_queue cq;

	pthread_mutex_t wq_mu;
	pthread_cond_t wq_cv;
	struct call_queue wq;
	bool wq_stop;
	pthread_t *workers;
	unsigned n_workers;

	int64_t now;               /* CLOCK_MONOTONIC at the last wake-up */
	struct call *dispatching;  /* the call whose handler runs inline right now */
	atomic_int shutdown_req; /* drain ms + 2; 0 = none, 1 = wait forever */
	bool shutting_down;
	bool shutdown_done;
	pbrpc_server_stats stats;
};

/* Which server's loop runs on this thread (closures compare it to take the
 * direct path). initial-exec: read on every reply, no __tls_get_addr call. */
static _Thread_local pbrpc_server *tl_loop __attribute__((tls_model("initial-exec")));

/* ---- logging ---- */

__attribute__((format(printf, 3, 4))) static void srv_log(pbrpc_server *srv, pbrpc_log_level lvl, const char *fmt, ...)
{
	if (!srv->o.log || lvl > srv->o.log_level)
		return;
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	srv->o.log(srv->o.log_user, lvl, buf);
}

static const char *conn_name(const struct conn *c, char *buf, size_t len)
{
	if (c->has_cred)
		snprintf(buf, len, "fd %d (pid %d uid %u)", c->fd, (int)c->cred.pid, (unsigned)c->cred.uid);
	else
		snprintf(buf, len, "fd %d", c->fd);
	return buf;
}

/* ---- method table ---- */

static uint64_t hash_name(const char *s, size_t n)
{
	uint64_t h = 1469598103934665603ULL;
	for (size_t i = 0; i < n; i++) {
		h ^= (uint8_t)s[i];
		h *= 1099511628211ULL;
	}
	return h;
}

static const struct method_entry *method_find(const pbrpc_server *srv, const char *name, size_t len)
{
	if (!srv->methods_cap)
		return NULL;
	uint64_t h = hash_name(name, len);
	size_t mask = srv->methods_cap - 1;
	for (size_t i = h & mask;; i = (i + 1) & mask) {
		const struct method_entry *e = &srv->methods[i];
		if (!e->name)
			return NULL;
		if (e->hash == h && e->len == len && memcmp(e->name, name, len) == 0)
			return e->service < srv->n_services ? e : NULL;
	}
}

static int methods_insert(pbrpc_server *srv, struct method_entry *ne)
{
	if ((srv->n_methods + 1) * 2 > srv->methods_cap) {
		size_t cap = srv->methods_cap ? srv->methods_cap * 2 : 32;
		struct method_entry *v = calloc(cap, sizeof(*v));
		if (!v)
			return -ENOMEM;
		for (size_t i = 0; i < srv->methods_cap; i++) {
			struct method_entry *e = &srv->methods[i];
			if (!e->name)
				continue;
			size_t j = e->hash & (cap - 1);
			while (v[j].name)
				j = (j + 1) & (cap - 1);
			v[j] = *e;
		}
		free(srv->methods);
		srv->methods = v;
		srv->methods_cap = cap;
	}
	size_t j = ne->hash & (srv->methods_cap - 1);
	while (srv->methods[j].name)
		j = (j + 1) & (srv->methods_cap - 1);
	srv->methods[j] = *ne;
	srv->n_methods++;
	return 0;
}

/* ---- call table per connection: linear probing, backward-shift delete ---- */

static struct call **tab_slot(struct conn *c, uint32_t id)
{
	uint32_t mask = c->tab_cap - 1;
	for (uint32_t i = (id * 2654435761u) & mask;; i = (i + 1) & mask) {
		if (!c->tab[i] || c->tab[i]->id == id)
			return &c->tab[i];
	}
}

static struct call *tab_get(struct conn *c, uint32_t id)
{
	return c->tab_cap ? *tab_slot(c, id) : NULL;
}

static int tab_put(struct conn *c, struct call *call)
{
	if ((c->n_calls + 1) * 2 > c->tab_cap) {
		uint32_t cap = c->tab_cap ? c->tab_cap * 2 : 16;
		struct call **old = c->tab;
		uint32_t old_cap = c->tab_cap;
		c->tab = calloc(cap, sizeof(*c->tab));
		if (!c->tab) {
			c->tab = old;
			return -ENOMEM;
		}
		c->tab_cap = cap;
		for (uint32_t i = 0; i < old_cap; i++)
			if (old[i])
				*tab_slot(c, old[i]->id) = old[i];
		free(old);
	}
	*tab_slot(c, call->id) = call;
	c->n_calls++;
	return 0;
}

static void tab_del(struct conn *c, uint32_t id)
{
	uint32_t mask = c->tab_cap - 1;
	struct call **slot = tab_slot(c, id);
	if (!*slot)
		return;
	uint32_t i = (uint32_t)(slot - c->tab);
	c->tab[i] = NULL;
	c->n_calls--;
	for (uint32_t j = (i + 1) & mask; c->tab[j]; j = (j + 1) & mask) {
		uint32_t home = (c->tab[j]->id * 2654435761u) & mask;
		/* Move j back to i if i lies cyclically in [home, j). */
		if (((j - home) & mask) >= ((j - i) & mask)) {
			c->tab[i] = c->tab[j];
			c->tab[j] = NULL;
			i = j;
		}
	}
}

/* ---- epoll registration ---- */

static void conn_update_events(struct conn *c)
{
	uint32_t ev = 0;
	if (!c->read_paused)
		ev |= EPOLLIN;
	if (pbrpc_frame_writer_pending(&c->out))
		ev |= EPOLLOUT;
	if (ev == c->events)
		return;
	struct epoll_event e = { .events = ev, .data.ptr = c };
	epoll_ctl(c->srv->epfd, EPOLL_CTL_MOD, c->fd, &e);
	c->events = ev;
}

static void mark_dirty(struct conn *c)
{
	if (!c->dirty) {
		c->dirty = true;
		c->dirty_next = c->srv->dirty;
		c->srv->dirty = c;
	}
}

/* ---- calls ---- */

static struct call *call_get(pbrpc_server *srv)
{
	struct call *call = srv->free_calls;
	if (call) {
		srv->free_calls = call->next;
		srv->n_free_calls--;
	} else {
		call = calloc(1, sizeof(*call));
		if (!call)
			return NULL;
		call->alloc.alloc = arena_alloc;
		call->alloc.free = arena_free;
		call->alloc.allocator_data = &call->arena;
		call->arena.spare = &srv->spare_big;
		call->timer.kind = TIMER_CALL;
	}
	call->magic = CALL_MAGIC;
	call->srv = srv;
	call->timer.idx = SIZE_MAX;
	call->status = PBRPC_STATUS_OK;
	call->answered = false;
	call->not_run = false;
	call->deadline_ns = 0;
	call->md_len = 0;
	call->input = NULL;
	call->next = NULL;
	atomic_store(&call->cancelled, false);
	call->live_prev = NULL;
	call->live_next = srv->live;
	if (srv->live)
		srv->live->live_prev = call;
	srv->live = call;
	srv->stats.calls_in_flight++;
	return call;
}

static void call_release_mem(struct call *call)
{
	free(call->status_msg);
	call->status_msg = NULL;
	free(call->done_msg);
	call->done_msg = NULL;
	free(call->done_body);
	call->done_body = NULL;
	call->done_len = 0;
	arena_reset(&call->arena);
}

static void call_put(pbrpc_server *srv, struct call *call)
{
	timer_stop(&srv->timers, &call->timer);
	call_release_mem(call);
	call->magic = 0;
	if (call->live_prev)
		call->live_prev->live_next = call->live_next;
	else
		srv->live = call->live_next;
	if (call->live_next)
		call->live_next->live_prev = call->live_prev;
	srv->stats.calls_in_flight--;
	srv->stats.calls_completed++;
	if (srv->n_free_calls >= CALL_POOL_MAX || call->md_cap > ARENA_KEEP) {
		arena_fini(&call->arena);
		free(call->md);
		free(call);
		return;
	}
	call->next = srv->free_calls;
	srv->free_calls = call;
	srv->n_free_calls++;
}

static void call_destroy(struct call *call)
{
	arena_fini(&call->arena);
	free(call->status_msg);
	free(call->done_msg);
	free(call->done_body);
	free(call->md);
	free(call);
}

/* Queues the RESPONSE for a call and takes it out of its connection's table.
 * Exactly one per call id (PROTOCOL.md section 4). */
static void call_answer(struct call *call, int status, const char *message, const ProtobufCMessage *msg,
			const uint8_t *body, size_t body_len)
{
	struct conn *c = call->conn;
	if (call->answered)
		return;
	call->answered = true;
	timer_stop(&call->srv->timers, &call->timer);
	if (!c)
		return;
	call->conn = NULL;
	tab_del(c, call->id);

	pbrpc_wire_response r = { .call_id = call->id, .status = status, .body = body, .body_len = body_len };
	r.message = message;
	r.message_len = message ? strlen(message) : 0;
	int rc = pbrpc_wire_write_response(&c->out, &r, status == PBRPC_STATUS_OK ? msg : NULL, c->peer_max_frame);
	if (rc == PBRPC_ETOOBIG) {
		char text[160];
		size_t size = msg ? protobuf_c_message_get_packed_size(msg) : body_len;
		snprintf(text, sizeof(text), "reply is %zu bytes, client accepts at most %u", size, c->peer_max_frame);
		pbrpc_wire_response e = { .call_id = call->id, .status = PBRPC_STATUS_RESOURCE_EXHAUSTED };
		e.message = text;
		e.message_len = strlen(text);
		rc = pbrpc_wire_write_response(&c->out, &e, NULL, 0);
	}
	if (rc < 0)
		srv_log(call->srv, PBRPC_LOG_ERROR, "cannot queue reply for call %u: %s", call->id, pbrpc_strerror(rc));
	mark_dirty(c);
}

/* Answers a call that was never handed to a handler, and frees it. */
static void call_reject(struct call *call, int status, const char *message)
{
	call_answer(call, status, message, NULL, NULL, 0);
	call_put(call->srv, call);
}

static const ProtobufCMethodDescriptor *method_desc(const pbrpc_server *srv, const struct method_entry *m)
{
	return &srv->services[m->service].service->descriptor->methods[m->index];
}

static const ProtobufCMessageDescriptor *method_output(const pbrpc_server *srv, const struct method_entry *m)
{
	return method_desc(srv, m)->output;
}

static void wake(pbrpc_server *srv)
{
	uint64_t one = 1;
	ssize_t n = write(srv->wake.fd, &one, sizeof(one));
	(void)n;
}

/* Hands a finished call to the loop thread (from any other thread). The call
 * stops being a valid closure_data here: a second closure call is ignored. */
static void cq_push(pbrpc_server *srv, struct call *call)
{
	call->magic = 0;
	pthread_mutex_lock(&srv->cq_mu);
	queue_push(&srv->cq, call);
	pthread_mutex_unlock(&srv->cq_mu);
	wake(srv);
}

/* The closure handed to every handler. */
static void call_closure(const ProtobufCMessage *msg, void *closure_data)
{
	struct call *call = closure_data;
	if (!call || call->magic != CALL_MAGIC)
		return;
	pbrpc_server *srv = call->srv;
	int status = call->status;
	const char *text = call->status_msg;
	char buf[256];

	if (status == PBRPC_STATUS_OK && !msg) {
		status = PBRPC_STATUS_UNKNOWN;
		text = "handler failed without setting a status";
	} else if (status == PBRPC_STATUS_OK && msg->descriptor != method_output(srv, call->m)) {
		snprintf(buf, sizeof(buf), "handler replied with a %s, expected %s", msg->descriptor->name,
			 method_output(srv, call->m)->name);
		status = PBRPC_STATUS_INTERNAL;
		text = buf;
		msg = NULL;
	}

	if (tl_loop == srv) {
		call->magic = 0;
		if (srv->dispatching == call)
			srv->dispatching = NULL; /* answered inside the handler */
		call_answer(call, status, text, status == PBRPC_STATUS_OK ? msg : NULL, NULL, 0);
		call_put(srv, call);
		return;
	}

	/* Off the loop thread: pack here, hand the bytes to the loop. */
	call->done_status = status;
	call->done_msg = text ? strdup(text) : NULL;
	if (status == PBRPC_STATUS_OK && msg) {
		call->done_len = protobuf_c_message_get_packed_size(msg);
		call->done_body = malloc(call->done_len ? call->done_len : 1);
		if (call->done_body) {
			protobuf_c_message_pack(msg, call->done_body);
		} else {
			call->done_status = PBRPC_STATUS_RESOURCE_EXHAUSTED;
			call->done_len = 0;
		}
	}
	cq_push(srv, call);
}

/* Delivers completions handed over by other threads. */
static void drain_completions(pbrpc_server *srv)
{
	pthread_mutex_lock(&srv->cq_mu);
	struct call *call = srv->cq.head;
	srv->cq.head = srv->cq.tail = NULL;
	pthread_mutex_unlock(&srv->cq_mu);
	while (call) {
		struct call *next = call->next;
		if (call->not_run)
			call_answer(call, PBRPC_STATUS_DEADLINE_EXCEEDED, "deadline passed before the call was dispatched",
				    NULL, NULL, 0);
		else
			call_answer(call, call->done_status, call->done_msg, NULL, call->done_body, call->done_len);
		call_put(srv, call);
		call = next;
	}
}

/* ---- worker pool ---- */

static void invoke(pbrpc_server *srv, struct call *call)
{
	ProtobufCService *svc = srv->services[call->m->service].service;
	svc->invoke(svc, call->m->index, call->input, call_closure, call);
}

static void *worker_main(void *arg)
{
	pbrpc_server *srv = arg;
	pthread_mutex_lock(&srv->wq_mu);
	for (;;) {
		while (!srv->wq.head && !srv->wq_stop)
			pthread_cond_wait(&srv->wq_cv, &srv->wq_mu);
		if (srv->wq_stop)
			break;
		struct call *call = srv->wq.head;
		srv->wq.head = call->next;
		if (!srv->wq.head)
			srv->wq.tail = NULL;
		pthread_mutex_unlock(&srv->wq_mu);
		if (atomic_load(&call->cancelled)) {
			/* Expired or cancelled while queued: never dispatched. */
			call->not_run = true;
			cq_push(srv, call);
		} else {
			invoke(srv, call);
		}
		pthread_mutex_lock(&srv->wq_mu);
	}
	pthread_mutex_unlock(&srv->wq_mu);
	return NULL;
}

static void dispatch(pbrpc_server *srv, struct call *call)
{
	srv->stats.calls_started++;
	/* Built-in services read server state: they stay on the loop thread. */
	if (!srv->n_workers || srv->services[call->m->service].owned) {
		/* Most handlers answer before returning: arm the deadline timer
		 * only for those that did not. */
		srv->dispatching = call;
		invoke(srv, call);
		if (srv->dispatching == call && call->deadline_ns && !call->answered)
			timer_start(&srv->timers, &call->timer, call->deadline_ns);
		srv->dispatching = NULL;
		return;
	}
	if (call->deadline_ns)
		timer_start(&srv->timers, &call->timer, call->deadline_ns);
	pthread_mutex_lock(&srv->wq_mu);
	queue_push(&srv->wq, call);
	pthread_cond_signal(&srv->wq_cv);
	pthread_mutex_unlock(&srv->wq_mu);
}

/* ---- connections ---- */

static void conn_close(struct conn *c)
{
	if (c->state == CONN_CLOSED)
		return;
	c->state = CONN_CLOSED;
	/* Calls whose handler still runs are orphaned; their closure frees them. */
	for (uint32_t i = 0; i < c->tab_cap; i++) {
		struct call *call = c->tab[i];
		if (!call)
			continue;
		call->conn = NULL;
		call->answered = true;
		timer_stop(&c->srv->timers, &call->timer);
		atomic_store(&call->cancelled, true);
	}
	c->n_calls = 0;
	epoll_ctl(c->srv->epfd, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	c->fd = -1;
	timer_stop(&c->srv->timers, &c->timer);
	timer_stop(&c->srv->timers, &c->stall);
	c->srv->stats.connections_open--;
}

/* Frees a closed connection; called where nothing refers to it any more. */
static void conn_free(struct conn *c)
{
	pbrpc_server *srv = c->srv;
	if (c->prev)
		c->prev->next = c->next;
	else
		srv->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	pbrpc_frame_decoder_fini(&c->dec);
	pbrpc_frame_writer_fini(&c->out);
	free(c->tab);
	free(c);
}

/* Best-effort GOAWAY, then close: the connection is beyond repair. */
static void conn_fail(struct conn *c, int status, const char *why)
{
	char name[64];
	if (c->state == CONN_CLOSED)
		return;
	srv_log(c->srv, PBRPC_LOG_WARN, "closing connection %s: %s", conn_name(c, name, sizeof(name)), why);
	if (status != PBRPC_STATUS_OK && c->state != CONN_PREFACE)
		c->srv->stats.protocol_errors++;
	if (pbrpc_wire_write_goaway(&c->out, status, why) == 0)
		pbrpc_frame_writer_flush(&c->out, c->fd, MSG_DONTWAIT);
	conn_close(c);
}

/* Writes what is queued; pauses reading while the queue is over the bound. */
static void conn_flush(struct conn *c)
{
	if (c->state == CONN_CLOSED)
		return;
	ssize_t n = pbrpc_frame_writer_flush(&c->out, c->fd, MSG_DONTWAIT);
	if (n < 0) {
		char name[64];
		srv_log(c->srv, PBRPC_LOG_INFO, "connection %s lost while writing: %s", conn_name(c, name, sizeof(name)),
			pbrpc_strerror((int)n));
		conn_close(c);
		return;
	}
	pbrpc_server *srv = c->srv;
	size_t pending = pbrpc_frame_writer_pending(&c->out);
	if (pending > srv->o.max_output_queue) {
		/* A peer that reads nothing for write_stall_timeout_ms is dropped;
		 * any progress starts the wait again. */
		if ((!c->read_paused || n > 0) && srv->o.write_stall_timeout_ms > 0)
			timer_start(&srv->timers, &c->stall,
				    srv->now + (int64_t)srv->o.write_stall_timeout_ms * 1000000);
		c->read_paused = true;
	} else if (c->read_paused && pending <= srv->o.max_output_queue / 2) {
		c->read_paused = false;
		c->resume = true; /* requests stashed while paused wait in the decoder */
		timer_stop(&srv->timers, &c->stall);
	}
	if (c->draining && c->n_calls == 0 && pending == 0) {
		conn_close(c);
		return;
	}
	conn_update_events(c);
}

static void decode_frames(struct conn *c);

static void flush_dirty(pbrpc_server *srv)
{
	while (srv->dirty) {
		struct conn *c = srv->dirty;
		srv->dirty = c->dirty_next;
		c->dirty = false;
		conn_flush(c);
		if (c->resume && c->state != CONN_CLOSED) {
			/* Requests stashed while paused: they may be all the peer
			 * sends, so no read event would bring them back. */
			c->resume = false;
			decode_frames(c);
		}
	}
}

static void conn_send_goaway(struct conn *c, const char *why)
{
	if (c->draining || c->state == CONN_CLOSED)
		return;
	c->draining = true;
	pbrpc_wire_write_goaway(&c->out, PBRPC_STATUS_OK, why);
	mark_dirty(c);
}

static void reply_status(struct conn *c, uint32_t id, int status, const char *message)
{
	pbrpc_wire_response r = { .call_id = id, .status = status, .message = message };
	r.message_len = message ? strlen(message) : 0;
	if (pbrpc_wire_write_response(&c->out, &r, NULL, 0) == 0)
		mark_dirty(c);
}

static bool service_known(const pbrpc_server *srv, const char *name, size_t len)
{
	for (size_t i = 0; i < srv->n_services; i++) {
		const char *s = srv->services[i].service->descriptor->name;
		if (strlen(s) == len && memcmp(s, name, len) == 0)
			return true;
	}
	return false;
}

static void handle_request(struct conn *c, const pbrpc_frame *f)
{
	pbrpc_server *srv = c->srv;
	size_t total = PBRPC_FRAME_HEADER_SIZE + (size_t)f->hdr.length;
	if (total > srv->scratch_cap / 2 && 2 * total > srv->scratch_want)
		srv->scratch_want = 2 * total; /* see scratch_fit() */
	pbrpc_wire_request req;
	char text[PBRPC_WIRE_METHOD_MAX + 128];
	int rc = pbrpc_wire_read_request(f, &req);

	if (tab_get(c, req.call_id)) {
		snprintf(text, sizeof(text), "call id %u is already in flight", req.call_id);
		conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, text);
		return;
	}
	if (rc == PBRPC_EPROTO) {
		reply_status(c, req.call_id, PBRPC_STATUS_INVALID_ARGUMENT, "malformed request header");
		return;
	}
	if (rc == PBRPC_EINVALID) {
		reply_status(c, req.call_id, PBRPC_STATUS_INVALID_ARGUMENT,
			     "invalid metadata key in request");
		return;
	}
	if (c->draining || srv->shutting_down) {
		reply_status(c, req.call_id, PBRPC_STATUS_UNAVAILABLE, "server is shutting down");
		return;
	}
	if (c->n_calls >= srv->o.max_calls) {
		snprintf(text, sizeof(text), "too many calls in flight on this connection (limit %u)", srv->o.max_calls);
		reply_status(c, req.call_id, PBRPC_STATUS_RESOURCE_EXHAUSTED, text);
		return;
	}
	const struct method_entry *m = method_find(srv, req.method, req.method_len);
	if (!m && !pbrpc_wire_method_valid(req.method, req.method_len)) {
		reply_status(c, req.call_id, PBRPC_STATUS_INVALID_ARGUMENT, "invalid method name in request");
		return;
	}
	if (!m) {
		const char *slash = memchr(req.method, '/', req.method_len);
		size_t svc_len = (size_t)(slash - req.method);
		if (service_known(srv, req.method, svc_len))
			snprintf(text, sizeof(text), "unknown method %.*s", (int)req.method_len, req.method);
		else
			snprintf(text, sizeof(text), "unknown service %.*s", (int)svc_len, req.method);
		reply_status(c, req.call_id, PBRPC_STATUS_UNIMPLEMENTED, text);
		return;
	}
	if (req.has_timeout && req.timeout_us == 0) {
		reply_status(c, req.call_id, PBRPC_STATUS_DEADLINE_EXCEEDED, "deadline passed before the call was dispatched");
		return;
	}

	struct call *call = call_get(srv);
	if (!call) {
		reply_status(c, req.call_id, PBRPC_STATUS_RESOURCE_EXHAUSTED, "server out of memory");
		return;
	}
	call->id = req.call_id;
	call->m = m;
	const ProtobufCMethodDescriptor *md = method_desc(srv, m);
	call->input = protobuf_c_message_unpack(md->input, &call->alloc, req.body_len, req.body);
	if (!call->input) {
		snprintf(text, sizeof(text), "request body is not a valid %s", md->input->name);
		call->answered = true;
		reply_status(c, req.call_id, PBRPC_STATUS_INVALID_ARGUMENT, text);
		call_put(srv, call);
		return;
	}
	if (req.metadata_raw_len) {
		if (call->md_cap < req.metadata_raw_len) {
			uint8_t *p = realloc(call->md, req.metadata_raw_len);
			if (!p) {
				call_reject(call, PBRPC_STATUS_RESOURCE_EXHAUSTED, "server out of memory");
				return;
			}
			call->md = p;
			call->md_cap = req.metadata_raw_len;
		}
		memcpy(call->md, req.metadata_raw, req.metadata_raw_len);
		call->md_len = req.metadata_raw_len;
	}
	if (tab_put(c, call) < 0) {
		call->answered = true;
		reply_status(c, req.call_id, PBRPC_STATUS_RESOURCE_EXHAUSTED, "server out of memory");
		call_put(srv, call);
		return;
	}
	call->conn = c;
	call->has_cred = c->has_cred;
	call->cred = c->cred;
	if (req.has_timeout) {
		int64_t us = req.timeout_us > (uint64_t)INT64_MAX / 2000 ? INT64_MAX / 2000 : (int64_t)req.timeout_us;
		call->deadline_ns = srv->now + us * 1000;
	}
	dispatch(srv, call);
}

static void handle_cancel(struct conn *c, uint32_t id)
{
	struct call *call = tab_get(c, id);
	if (!call)
		return; /* it may have crossed our RESPONSE */
	atomic_store(&call->cancelled, true);
	call_answer(call, PBRPC_STATUS_CANCELLED, "cancelled by the client", NULL, NULL, 0);
}

static void handle_frame(struct conn *c, const pbrpc_frame *f)
{
	char text[160];
	if (c->state == CONN_HELLO) {
		pbrpc_wire_hello hello;
		int rc = pbrpc_wire_read_hello(f, &hello);
		if (rc == PBRPC_EVERSION) {
			snprintf(text, sizeof(text), "unsupported protocol version %u, this peer speaks %u", hello.version,
				 PBRPC_WIRE_VERSION);
			conn_fail(c, PBRPC_STATUS_FAILED_PRECONDITION, text);
			return;
		}
		if (rc < 0) {
			snprintf(text, sizeof(text), "expected HELLO, got a malformed %s frame", pbrpc_wire_frame_name(f->hdr.type));
			conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, text);
			return;
		}
		c->peer_max_frame = hello.max_frame ? hello.max_frame : PBRPC_FRAME_MAX_DEFAULT;
		c->state = CONN_OPEN;
		timer_stop(&c->srv->timers, &c->timer);
		if (c->srv->o.idle_timeout_ms > 0)
			timer_start(&c->srv->timers, &c->timer,
				    pbrpc__now_ns() + (int64_t)c->srv->o.idle_timeout_ms * 1000000);
		return;
	}
	if (pbrpc_wire_check_header(&f->hdr) < 0) {
		snprintf(text, sizeof(text), "bad frame header (type 0x%02x, flags 0x%02x, stream %u, length %u)",
			 f->hdr.type, f->hdr.flags, f->hdr.stream, f->hdr.length);
		conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, text);
		return;
	}
	switch (f->hdr.type) {
	case PBRPC_FRAME_REQUEST:
		handle_request(c, f);
		break;
	case PBRPC_FRAME_CANCEL:
		handle_cancel(c, f->hdr.stream);
		break;
	case PBRPC_FRAME_PING:
		if (pbrpc_wire_write_ping(&c->out, PBRPC_FRAME_PONG, f->payload) == 0)
			mark_dirty(c);
		break;
	case PBRPC_FRAME_PONG:
		break;
	case PBRPC_FRAME_GOAWAY:
		/* The client is leaving; answer what is in flight, then close
		 * (conn_flush closes a draining connection once it is idle). */
		c->draining = true;
		mark_dirty(c);
		break;
	default:
		snprintf(text, sizeof(text), "unexpected %s frame from a client", pbrpc_wire_frame_name(f->hdr.type));
		conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, text);
		break;
	}
}

/* A REQUEST over the limit is skipped and answered; anything else that large
 * is fatal (PROTOCOL.md section 2). */
static void handle_toobig(struct conn *c)
{
	const pbrpc_frame_header *h = pbrpc_frame_decoder_rejected(&c->dec);
	char text[160];
	if (c->state == CONN_OPEN && h->type == PBRPC_FRAME_REQUEST && h->stream != 0 && !tab_get(c, h->stream)) {
		snprintf(text, sizeof(text), "request is %u bytes, server accepts at most %u", h->length, c->srv->o.max_frame);
		uint32_t id = h->stream;
		pbrpc_frame_decoder_skip(&c->dec);
		reply_status(c, id, PBRPC_STATUS_RESOURCE_EXHAUSTED, text);
		return;
	}
	snprintf(text, sizeof(text), "%s frame of %u bytes exceeds the limit of %u", pbrpc_wire_frame_name(h->type),
		 h->length, c->srv->o.max_frame);
	conn_fail(c, PBRPC_STATUS_RESOURCE_EXHAUSTED, text);
}

/* Consumes preface bytes; returns how many of `n` it used, or -1 on mismatch. */
static ssize_t eat_preface(struct conn *c, const uint8_t *p, size_t n)
{
	size_t used = 0;
	while (c->state == CONN_PREFACE && used < n) {
		if (p[used] != (uint8_t)PBRPC_WIRE_PREFACE[c->preface_got])
			return -1;
		used++;
		if (++c->preface_got == PBRPC_WIRE_PREFACE_SIZE)
			c->state = CONN_HELLO;
	}
	return (ssize_t)used;
}

/* True when the connection's output is over its bound even after a flush:
 * stop taking requests from it until the peer reads. */
static bool output_full(struct conn *c)
{
	if (pbrpc_frame_writer_pending(&c->out) <= c->srv->o.max_output_queue)
		return false;
	conn_flush(c);
	return c->read_paused;
}

static void decode_frames(struct conn *c)
{
	pbrpc_frame f;
	int rc;
	while (c->state != CONN_CLOSED) {
		if (output_full(c)) {
			if (pbrpc_frame_decoder_stash(&c->dec) < 0)
				conn_fail(c, PBRPC_STATUS_RESOURCE_EXHAUSTED, "server out of memory");
			return;
		}
		rc = pbrpc_frame_decoder_next(&c->dec, &f);
		if (rc == 0)
			break;
		if (rc == PBRPC_ETOOBIG) {
			handle_toobig(c);
			continue;
		}
		if (rc < 0) {
			conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT,
				  rc == PBRPC_EPROTO ? "bad frame header (reserved bits set)" : pbrpc_strerror(rc));
			return;
		}
		handle_frame(c, &f);
	}
}

/* A request larger than the scratch buffer is split between it and the
 * connection's decoder: a copy and more, smaller reads, and at 1 MiB over TCP
 * a third more CPU on both sides (docs/BENCHMARKS.md). Once such a request has
 * arrived whole (so memory follows bytes a peer sent, not lengths it
 * announced), the scratch buffer grows to twice its size, so that the next one
 * is read in one go, as a baseline's 2x buffer does; the sweep gives the
 * memory back once large requests stop. Called when the scratch buffer holds
 * nothing still needed. */
static void scratch_fit(pbrpc_server *srv)
{
	size_t want = srv->scratch_want;
	srv->scratch_want = 0;
	if (want <= srv->scratch_cap)
		return;
	uint8_t *nb = malloc(want);
	if (!nb)
		return;
	free(srv->scratch);
	srv->scratch = nb;
	srv->scratch_cap = want;
}

static void scratch_sweep(pbrpc_server *srv)
{
	if (srv->scratch_cap > SCRATCH_SIZE && srv->scratch_used <= SCRATCH_SIZE) {
		uint8_t *nb = malloc(SCRATCH_SIZE);
		if (nb) {
			free(srv->scratch);
			srv->scratch = nb;
			srv->scratch_cap = SCRATCH_SIZE;
		}
	}
	srv->scratch_used = 0;
}

static void conn_read(struct conn *c)
{
	pbrpc_server *srv = c->srv;
	for (int round = 0; round < READS_PER_WAKEUP && c->state != CONN_CLOSED && !c->read_paused; round++) {
		ssize_t n;
		const uint8_t *p = NULL;
		if (pbrpc_frame_decoder_pending(&c->dec) && c->state != CONN_PREFACE) {
			/* The rest of a split frame goes straight into its buffer. */
			n = pbrpc_frame_decoder_recv(&c->dec, c->fd, MSG_DONTWAIT);
		} else {
			struct iovec iov = { srv->scratch, srv->scratch_cap };
			struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
			do
				n = pbrpc__recvmsg(c->fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
			while (n < 0 && errno == EINTR);
			if (n < 0)
				n = (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -errno;
			else if (n == 0)
				n = PBRPC_EOF;
			p = srv->scratch;
		}
		if (n == 0)
			break;
		if (n < 0) {
			char name[64];
			if (n == PBRPC_EOF && c->state == CONN_OPEN)
				srv_log(srv, PBRPC_LOG_DEBUG, "connection %s closed by peer", conn_name(c, name, sizeof(name)));
			else
				srv_log(srv, PBRPC_LOG_INFO, "connection %s: %s", conn_name(c, name, sizeof(name)),
					n == PBRPC_EOF && c->state != CONN_OPEN ? "closed during handshake"
										 : pbrpc_strerror((int)n));
			conn_close(c);
			break;
		}
		c->last_active = srv->now;
		if (p) {
			size_t len = (size_t)n;
			if (c->state == CONN_PREFACE) {
				ssize_t used = eat_preface(c, p, len);
				if (used < 0) {
					conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, "bad preface: peer is not a pbrpc client");
					break;
				}
				p += used;
				len -= (size_t)used;
			}
			pbrpc_frame_decoder_feed(&c->dec, p, len);
			decode_frames(c);
			if ((size_t)n > srv->scratch_used)
				srv->scratch_used = (size_t)n;
		} else {
			decode_frames(c);
		}
		scratch_fit(srv);
		if ((size_t)n < srv->scratch_cap / 2)
			break; /* the socket is very likely drained */
	}
	/* A buffer grown for a large frame is kept while the connection is busy
	 * (the next large frame reuses it); the sweep timer frees it once idle. */
	flush_dirty(srv);
}

static void accept_conns(pbrpc_server *srv, struct listener *l)
{
	for (int i = 0; i < 64; i++) {
		int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				srv_log(srv, PBRPC_LOG_ERROR, "accept: %s", strerror(errno));
			return;
		}
		if (srv->stats.connections_open >= srv->o.max_connections || srv->shutting_down) {
			/* Say why before closing, so the client reports something useful. */
			pbrpc_frame_writer w;
			pbrpc_frame_writer_init(&w);
			pbrpc_wire_hello hello = { .version = PBRPC_WIRE_VERSION, .max_frame = srv->o.max_frame,
						   .max_calls = srv->o.max_calls, .agent = AGENT };
			pbrpc_wire_write_preface(&w, &hello);
			pbrpc_wire_write_goaway(&w, srv->shutting_down ? PBRPC_STATUS_UNAVAILABLE : PBRPC_STATUS_RESOURCE_EXHAUSTED,
						srv->shutting_down ? "server is shutting down" : "too many connections");
			pbrpc_frame_writer_flush(&w, fd, MSG_DONTWAIT);
			pbrpc_frame_writer_fini(&w);
			close(fd);
			srv->stats.connections_refused++;
			srv_log(srv, PBRPC_LOG_WARN, "refused a connection: %s",
				srv->shutting_down ? "shutting down" : "too many connections");
			continue;
		}
		struct conn *c = calloc(1, sizeof(*c));
		if (!c) {
			close(fd);
			continue;
		}
		c->kind = SRC_CONN;
		c->srv = srv;
		c->fd = fd;
		c->state = CONN_PREFACE;
		c->timer.kind = TIMER_CONN;
		c->timer.idx = SIZE_MAX;
		c->stall.kind = TIMER_STALL;
		c->stall.idx = SIZE_MAX;
		c->last_active = pbrpc__now_ns();
		c->peer_max_frame = PBRPC_FRAME_MAX_DEFAULT;
		pbrpc_frame_decoder_init(&c->dec, srv->o.max_frame);
		pbrpc_frame_writer_init(&c->out);
		if (l->ep.kind == PBRPC_ENDPOINT_TCP) {
			int one = 1;
			setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		} else {
			socklen_t sl = sizeof(c->cred);
			c->is_unix = true;
			c->has_cred = getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &c->cred, &sl) == 0;
		}
		c->events = EPOLLIN;
		struct epoll_event e = { .events = EPOLLIN, .data.ptr = c };
		if (epoll_ctl(srv->epfd, EPOLL_CTL_ADD, fd, &e) < 0) {
			pbrpc_frame_decoder_fini(&c->dec);
			free(c);
			close(fd);
			continue;
		}
		c->next = srv->conns;
		if (srv->conns)
			srv->conns->prev = c;
		srv->conns = c;
		srv->stats.connections_accepted++;
		srv->stats.connections_open++;
		if (srv->o.handshake_timeout_ms > 0)
			timer_start(&srv->timers, &c->timer,
				    pbrpc__now_ns() + (int64_t)srv->o.handshake_timeout_ms * 1000000);
		pbrpc_wire_hello hello = { .version = PBRPC_WIRE_VERSION, .max_frame = srv->o.max_frame,
					   .max_calls = srv->o.max_calls, .agent = AGENT };
		pbrpc_wire_write_preface(&c->out, &hello);
		conn_flush(c);
		pbrpc_frame_writer_trim(&c->out, 0);
		char name[64];
		srv_log(srv, PBRPC_LOG_DEBUG, "accepted connection %s", conn_name(c, name, sizeof(name)));
	}
}

/* ---- timers ---- */

static void begin_shutdown(pbrpc_server *srv, int drain_ms);

static void finish_drain(pbrpc_server *srv)
{
	for (struct conn *c = srv->conns; c; c = c->next) {
		if (c->state == CONN_CLOSED)
			continue;
		/* Answering deletes from the table, whose backward shift may move a
		 * later entry into slot i: look at slot i again before moving on.
		 * Slots already passed stay empty, so one pass answers them all. */
		for (uint32_t i = 0; i < c->tab_cap && c->n_calls;) {
			struct call *call = c->tab[i];
			if (!call) {
				i++;
				continue;
			}
			atomic_store(&call->cancelled, true);
			call_answer(call, PBRPC_STATUS_UNAVAILABLE, "server shut down before the call completed", NULL, NULL,
				    0);
		}
		pbrpc_frame_writer_flush(&c->out, c->fd, MSG_DONTWAIT);
		conn_close(c);
	}
}

static void run_timers(pbrpc_server *srv)
{
	int64_t now = pbrpc__now_ns();
	while (srv->timers.n && srv->timers.v[0]->when <= now) {
		struct timer *t = srv->timers.v[0];
		timer_stop(&srv->timers, t);
		switch (t->kind) {
		case TIMER_CALL: {
			struct call *call = container_of(t, struct call, timer);
			atomic_store(&call->cancelled, true);
			call_answer(call, PBRPC_STATUS_DEADLINE_EXCEEDED, "deadline exceeded", NULL, NULL, 0);
			break;
		}
		case TIMER_CONN: {
			struct conn *c = container_of(t, struct conn, timer);
			if (c->state != CONN_OPEN) {
				conn_fail(c, PBRPC_STATUS_UNAVAILABLE, "handshake timed out");
			} else if (c->n_calls == 0 && now - c->last_active >= (int64_t)srv->o.idle_timeout_ms * 1000000) {
				conn_fail(c, PBRPC_STATUS_UNAVAILABLE, "idle timeout");
			} else {
				timer_start(&srv->timers, t, c->last_active + (int64_t)srv->o.idle_timeout_ms * 1000000);
				if (t->when <= now)
					timer_start(&srv->timers, t, now + (int64_t)srv->o.idle_timeout_ms * 1000000);
			}
			break;
		}
		case TIMER_STALL: {
			struct conn *c = container_of(t, struct conn, stall);
			if (c->read_paused) {
				char text[128];
				snprintf(text, sizeof(text), "client read none of its %zu queued reply bytes for %d ms",
					 pbrpc_frame_writer_pending(&c->out), srv->o.write_stall_timeout_ms);
				conn_fail(c, PBRPC_STATUS_RESOURCE_EXHAUSTED, text);
			}
			break;
		}
		case TIMER_SWEEP:
			/* Idle connections give their buffers back. */
			for (struct conn *c = srv->conns; c; c = c->next) {
				if (c->state != CONN_CLOSED && now - c->last_active >= SWEEP_INTERVAL_NS) {
					pbrpc_frame_decoder_release(&c->dec);
					pbrpc_frame_writer_trim(&c->out, 0);
				}
			}
			scratch_sweep(srv);
			if (!srv->live) {
				/* No call holds big blocks: the spare goes too. */
				free(srv->spare_big);
				srv->spare_big = NULL;
			}
			timer_start(&srv->timers, t, now + SWEEP_INTERVAL_NS);
			break;
		case TIMER_DRAIN:
			srv_log(srv, PBRPC_LOG_WARN, "drain deadline passed; closing remaining connections");
			finish_drain(srv);
			break;
		}
	}
}

static int next_timeout(pbrpc_server *srv, int timeout_ms)
{
	if (!srv->timers.n)
		return timeout_ms;
	int64_t ms = (srv->timers.v[0]->when - pbrpc__now_ns() + 999999) / 1000000;
	if (ms < 0)
		ms = 0;
	if (timeout_ms < 0 || ms < timeout_ms)
		return (int)ms;
	return timeout_ms;
}

/* ---- shutdown ---- */

static void begin_shutdown(pbrpc_server *srv, int drain_ms)
{
	if (srv->shutting_down)
		return;
	srv->shutting_down = true;
	srv->overall_serving = false;
	srv_log(srv, PBRPC_LOG_INFO, "shutting down (drain %d ms)", drain_ms);
	for (size_t i = 0; i < srv->n_listeners; i++) {
		struct listener *l = srv->listeners[i];
		if (l->fd >= 0) {
			epoll_ctl(srv->epfd, EPOLL_CTL_DEL, l->fd, NULL);
			close(l->fd);
			l->fd = -1;
		}
	}
	for (struct conn *c = srv->conns; c; c = c->next) {
		if (c->state == CONN_OPEN)
			conn_send_goaway(c, "server is shutting down");
		else
			conn_close(c);
	}
	if (drain_ms == 0)
		finish_drain(srv);
	else if (drain_ms > 0)
		timer_start(&srv->timers, &srv->drain, pbrpc__now_ns() + (int64_t)drain_ms * 1000000);
	flush_dirty(srv);
}

PBRPC_EXPORT void pbrpc_server_shutdown(pbrpc_server *srv, int drain_ms)
{
	int v = drain_ms < 0 ? 1 : (drain_ms > INT32_MAX - 2 ? INT32_MAX : drain_ms + 2);
	int expected = 0;
	atomic_compare_exchange_strong(&srv->shutdown_req, &expected, v);
	wake(srv);
}

/* ---- the loop ---- */

static void reap_closed(pbrpc_server *srv)
{
	struct conn *c = srv->conns;
	while (c) {
		struct conn *next = c->next;
		if (c->state == CONN_CLOSED && !c->dirty)
			conn_free(c);
		c = next;
	}
}

PBRPC_EXPORT int pbrpc_server_process(pbrpc_server *srv, int timeout_ms)
{
	if (srv->shutdown_done)
		return 1;
	struct epoll_event evs[64];
	pbrpc_server *prev = tl_loop;
	tl_loop = srv;
	int n = epoll_wait(srv->epfd, evs, 64, next_timeout(srv, timeout_ms));
	if (n < 0 && errno != EINTR) {
		tl_loop = prev;
		return -errno;
	}
	srv->now = pbrpc__now_ns();
	bool closed_any = false;
	for (int i = 0; i < n; i++) {
		enum src_kind *kind = evs[i].data.ptr;
		switch (*kind) {
		case SRC_LISTENER:
			accept_conns(srv, (struct listener *)kind);
			break;
		case SRC_WAKE: {
			uint64_t v;
			ssize_t r = read(srv->wake.fd, &v, sizeof(v));
			(void)r;
			drain_completions(srv);
			int req = atomic_load(&srv->shutdown_req);
			if (req && !srv->shutting_down)
				begin_shutdown(srv, req == 1 ? -1 : req - 2);
			break;
		}
		case SRC_CONN: {
			struct conn *c = (struct conn *)kind;
			if (c->state == CONN_CLOSED)
				break;
			if (evs[i].events & EPOLLOUT) {
				mark_dirty(c);
				flush_dirty(srv);
			}
			if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
				conn_read(c);
			if (c->state == CONN_CLOSED)
				closed_any = true;
			break;
		}
		}
	}
	run_timers(srv);
	flush_dirty(srv);
	tl_loop = prev;
	if (closed_any || srv->shutting_down)
		reap_closed(srv);
	if (srv->shutting_down) {
		bool open = false;
		for (struct conn *c = srv->conns; c; c = c->next)
			if (c->state != CONN_CLOSED) {
				if (c->n_calls == 0 && !pbrpc_frame_writer_pending(&c->out)) {
					conn_close(c);
					continue;
				}
				open = true;
			}
		reap_closed(srv);
		if (!open) {
			timer_stop(&srv->timers, &srv->drain);
			srv->shutdown_done = true;
			srv_log(srv, PBRPC_LOG_INFO, "shutdown complete");
			return 1;
		}
	}
	return 0;
}

PBRPC_EXPORT int pbrpc_server_run(pbrpc_server *srv)
{
	for (;;) {
		int rc = pbrpc_server_process(srv, -1);
		if (rc != 0)
			return rc > 0 ? 0 : rc;
	}
}

PBRPC_EXPORT int pbrpc_server_fd(const pbrpc_server *srv)
{
	return srv->epfd;
}

/* ---- construction ---- */

PBRPC_EXPORT int pbrpc_server_new(pbrpc_server **out, const pbrpc_server_opts *opts)
{
	*out = NULL;
	pbrpc_server *srv = calloc(1, sizeof(*srv));
	if (!srv)
		return -ENOMEM;
	if (opts)
		srv->o = *opts;
	pbrpc_server_opts *o = &srv->o;
	if (!o->max_frame)
		o->max_frame = PBRPC_FRAME_MAX_DEFAULT;
	if (o->max_frame > PBRPC_FRAME_MAX_LIMIT)
		o->max_frame = PBRPC_FRAME_MAX_LIMIT;
	if (!o->max_calls)
		o->max_calls = 1024;
	if (!o->max_connections)
		o->max_connections = 4096;
	if (!o->handshake_timeout_ms)
		o->handshake_timeout_ms = 10000;
	if (!o->max_output_queue)
		o->max_output_queue = 4u << 20;
	if (!o->write_stall_timeout_ms)
		o->write_stall_timeout_ms = 30000;
	if (!o->log_level)
		o->log_level = PBRPC_LOG_WARN;
	srv->overall_serving = true;
	srv->sweep.kind = TIMER_SWEEP;
	srv->sweep.idx = SIZE_MAX;
	srv->drain.kind = TIMER_DRAIN;
	srv->drain.idx = SIZE_MAX;
	srv->wake.kind = SRC_WAKE;
	srv->wake.fd = -1;
	pthread_mutex_init(&srv->cq_mu, NULL);
	pthread_mutex_init(&srv->wq_mu, NULL);
	pthread_cond_init(&srv->wq_cv, NULL);

	int err;
	srv->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (srv->epfd < 0) {
		err = -errno;
		goto err_srv;
	}
	srv->wake.fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (srv->wake.fd < 0) {
		err = -errno;
		goto err_ep;
	}
	struct epoll_event e = { .events = EPOLLIN, .data.ptr = &srv->wake };
	if (epoll_ctl(srv->epfd, EPOLL_CTL_ADD, srv->wake.fd, &e) < 0) {
		err = -errno;
		goto err_wake;
	}
	srv->scratch = malloc(SCRATCH_SIZE);
	srv->scratch_cap = SCRATCH_SIZE;
	if (!srv->scratch) {
		err = -ENOMEM;
		goto err_wake;
	}
	if (timer_start(&srv->timers, &srv->sweep, pbrpc__now_ns() + SWEEP_INTERVAL_NS) < 0) {
		err = -ENOMEM;
		goto err_scratch;
	}
	if (o->workers) {
		srv->workers = calloc(o->workers, sizeof(*srv->workers));
		if (!srv->workers) {
			err = -ENOMEM;
			goto err_timers;
		}
		for (; srv->n_workers < o->workers; srv->n_workers++) {
			err = -pthread_create(&srv->workers[srv->n_workers], NULL, worker_main, srv);
			if (err < 0)
				goto err_workers;
		}
	}
	*out = srv;
	return 0;

err_workers:
	pthread_mutex_lock(&srv->wq_mu);
	srv->wq_stop = true;
	pthread_cond_broadcast(&srv->wq_cv);
	pthread_mutex_unlock(&srv->wq_mu);
	for (unsigned i = 0; i < srv->n_workers; i++)
		pthread_join(srv->workers[i], NULL);
	free(srv->workers);
err_timers:
	free(srv->timers.v);
err_scratch:
	free(srv->scratch);
err_wake:
	close(srv->wake.fd);
err_ep:
	close(srv->epfd);
err_srv:
	free(srv);
	return err;
}

PBRPC_EXPORT void pbrpc_server_free(pbrpc_server *srv)
{
	if (!srv)
		return;
	if (srv->n_workers) {
		pthread_mutex_lock(&srv->wq_mu);
		srv->wq_stop = true;
		pthread_cond_broadcast(&srv->wq_cv);
		pthread_mutex_unlock(&srv->wq_mu);
		for (unsigned i = 0; i < srv->n_workers; i++)
			pthread_join(srv->workers[i], NULL);
		free(srv->workers);
	}
	for (size_t i = 0; i < srv->n_listeners; i++) {
		struct listener *l = srv->listeners[i];
		if (l->fd >= 0)
			close(l->fd);
		struct stat st;
		if (l->owns_path && lstat(l->ep.path, &st) == 0 && st.st_dev == l->dev && st.st_ino == l->ino)
			unlink(l->ep.path);
		free(l);
	}
	free(srv->listeners);
	while (srv->conns) {
		struct conn *c = srv->conns;
		conn_close(c);
		conn_free(c);
	}
	/* Calls waiting for a closure, completed ones not yet collected, pooled ones. */
	pthread_mutex_lock(&srv->cq_mu);
	srv->cq.head = srv->cq.tail = NULL;
	pthread_mutex_unlock(&srv->cq_mu);
	while (srv->live) {
		struct call *call = srv->live;
		srv->live = call->live_next;
		call_destroy(call);
	}
	while (srv->free_calls) {
		struct call *call = srv->free_calls;
		srv->free_calls = call->next;
		call_destroy(call);
	}
	for (size_t i = 0; i < srv->n_services; i++)
		if (srv->services[i].owned)
			protobuf_c_service_destroy(srv->services[i].service);
	free(srv->services);
	for (size_t i = 0; i < srv->methods_cap; i++)
		free(srv->methods[i].name);
	free(srv->methods);
	free(srv->spare_big);
	free(srv->timers.v);
	free(srv->scratch);
	close(srv->wake.fd);
	close(srv->epfd);
	pthread_mutex_destroy(&srv->cq_mu);
	pthread_mutex_destroy(&srv->wq_mu);
	pthread_cond_destroy(&srv->wq_cv);
	free(srv);
}

static int add_service(pbrpc_server *srv, ProtobufCService *service, bool owned)
{
	if (!service || !service->descriptor || !service->invoke || !service->descriptor->name)
		return PBRPC_EINVALID;
	const ProtobufCServiceDescriptor *d = service->descriptor;
	if (pbrpc__server_find_service(srv, d->name))
		return PBRPC_EDUPLICATE;
	/* Validate everything first so that a failure leaves no trace. */
	char name[PBRPC_WIRE_METHOD_MAX + 1];
	for (unsigned i = 0; i < d->n_methods; i++) {
		int len = snprintf(name, sizeof(name), "%s/%s", d->name, d->methods[i].name);
		if (len < 0 || (size_t)len >= sizeof(name) || !pbrpc_wire_method_valid(name, (size_t)len))
			return PBRPC_EINVALID;
		for (unsigned j = 0; j < i; j++)
			if (strcmp(d->methods[i].name, d->methods[j].name) == 0)
				return PBRPC_EDUPLICATE;
	}
	struct service_entry *v = realloc(srv->services, (srv->n_services + 1) * sizeof(*v));
	if (!v)
		return -ENOMEM;
	srv->services = v;
	for (unsigned i = 0; i < d->n_methods; i++) {
		struct method_entry e = { .service = srv->n_services, .index = i };
		int len = snprintf(name, sizeof(name), "%s/%s", d->name, d->methods[i].name);
		e.len = (size_t)len;
		e.name = strdup(name);
		e.hash = hash_name(name, e.len);
		if (!e.name || methods_insert(srv, &e) < 0) {
			free(e.name);
			/* Entries inserted so far name a service slot that is never
			 * filled; method_find() ignores them. */
			return -ENOMEM;
		}
	}
	srv->services[srv->n_services++] = (struct service_entry){ service, owned, true };
	return 0;
}

PBRPC_EXPORT int pbrpc_server_add_service(pbrpc_server *srv, ProtobufCService *service)
{
	return add_service(srv, service, false);
}

/* Registers a built-in service the server owns (destroyed with it). */
static int add_builtin(pbrpc_server *srv, ProtobufCService *s)
{
	if (!s)
		return -ENOMEM;
	int rc = add_service(srv, s, true);
	if (rc < 0)
		protobuf_c_service_destroy(s);
	return rc;
}

PBRPC_EXPORT int pbrpc_server_enable_health(pbrpc_server *srv)
{
	return add_builtin(srv, pbrpc__health_service_new(srv));
}

PBRPC_EXPORT int pbrpc_server_enable_reflection(pbrpc_server *srv)
{
	return add_builtin(srv, pbrpc__reflection_service_new(srv));
}

PBRPC_EXPORT int pbrpc_server_set_serving(pbrpc_server *srv, const char *service, bool serving)
{
	if (!service || !*service) {
		srv->overall_serving = serving;
		return 0;
	}
	for (size_t i = 0; i < srv->n_services; i++)
		if (strcmp(srv->services[i].service->descriptor->name, service) == 0) {
			srv->services[i].serving = serving;
			return 0;
		}
	return PBRPC_EINVALID;
}

static int add_listener(pbrpc_server *srv, int fd, const pbrpc_endpoint *ep, bool owns_path)
{
	struct listener *l = calloc(1, sizeof(*l));
	struct listener **v = realloc(srv->listeners, (srv->n_listeners + 1) * sizeof(*v));
	if (!l || !v) {
		free(l);
		if (v)
			srv->listeners = v;
		return -ENOMEM;
	}
	srv->listeners = v;
	l->kind = SRC_LISTENER;
	l->fd = fd;
	l->ep = *ep;
	l->owns_path = owns_path;
	struct stat st;
	if (owns_path && lstat(ep->path, &st) == 0) {
		l->dev = st.st_dev;
		l->ino = st.st_ino;
	}
	struct epoll_event e = { .events = EPOLLIN, .data.ptr = l };
	if (epoll_ctl(srv->epfd, EPOLL_CTL_ADD, fd, &e) < 0) {
		int err = -errno;
		free(l);
		return err;
	}
	srv->listeners[srv->n_listeners] = l;
	return (int)srv->n_listeners++;
}

PBRPC_EXPORT int pbrpc_server_listen(pbrpc_server *srv, const char *endpoint)
{
	pbrpc_endpoint ep;
	int rc = pbrpc_endpoint_parse(endpoint, &ep);
	if (rc < 0)
		return rc;
	pbrpc_listen_opts lo = { .mode = srv->o.socket_mode, .nonblock = true };
	int fd = pbrpc_endpoint_listen(&ep, &lo);
	if (fd < 0)
		return fd;
	rc = add_listener(srv, fd, &ep, ep.kind == PBRPC_ENDPOINT_UNIX);
	if (rc < 0) {
		close(fd);
		if (ep.kind == PBRPC_ENDPOINT_UNIX)
			unlink(ep.path);
		return rc;
	}
	char name[PBRPC_ENDPOINT_STRLEN];
	pbrpc_endpoint_format(&ep, name, sizeof(name));
	srv_log(srv, PBRPC_LOG_INFO, "listening on %s", name);
	return rc;
}

PBRPC_EXPORT int pbrpc_server_listen_fd(pbrpc_server *srv, int fd)
{
	pbrpc_endpoint ep;
	int rc = pbrpc_endpoint_from_fd(fd, &ep);
	if (rc < 0)
		return rc;
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return -errno;
	fcntl(fd, F_SETFD, FD_CLOEXEC);
	return add_listener(srv, fd, &ep, false);
}

PBRPC_EXPORT int pbrpc_server_address(const pbrpc_server *srv, int index, char *buf, size_t len)
{
	if (index < 0 || (size_t)index >= srv->n_listeners)
		return PBRPC_EINVALID;
	pbrpc_endpoint_format(&srv->listeners[index]->ep, buf, len);
	return 0;
}

PBRPC_EXPORT void pbrpc_server_get_stats(const pbrpc_server *srv, pbrpc_server_stats *out)
{
	*out = srv->stats;
}

/* ---- internals for the built-in services ---- */

size_t pbrpc__server_service_count(const pbrpc_server *srv)
{
	return srv->n_services;
}

const ProtobufCService *pbrpc__server_service_at(const pbrpc_server *srv, size_t i)
{
	return i < srv->n_services ? srv->services[i].service : NULL;
}

const ProtobufCService *pbrpc__server_find_service(const pbrpc_server *srv, const char *name)
{
	for (size_t i = 0; i < srv->n_services; i++)
		if (strcmp(srv->services[i].service->descriptor->name, name) == 0)
			return srv->services[i].service;
	return NULL;
}

int pbrpc__server_serving(const pbrpc_server *srv, const char *name)
{
	if (!name || !*name)
		return srv->overall_serving && !srv->shutting_down;
	for (size_t i = 0; i < srv->n_services; i++)
		if (strcmp(srv->services[i].service->descriptor->name, name) == 0)
			return srv->services[i].serving && !srv->shutting_down;
	return -1;
}

/* ---- the handler's view of a call ---- */

static struct call *as_call(void *closure_data)
{
	struct call *call = closure_data;
	return call && call->magic == CALL_MAGIC ? call : NULL;
}

PBRPC_EXPORT int pbrpc_call_set_status(void *closure_data, int status, const char *fmt, ...)
{
	struct call *call = as_call(closure_data);
	if (!call || status < 0 || status >= PBRPC_STATUS_COUNT)
		return PBRPC_EINVALID;
	call->status = status;
	free(call->status_msg);
	call->status_msg = NULL;
	if (fmt) {
		va_list ap;
		va_start(ap, fmt);
		if (vasprintf(&call->status_msg, fmt, ap) < 0)
			call->status_msg = NULL;
		va_end(ap);
	}
	return 0;
}

PBRPC_EXPORT bool pbrpc_call_cancelled(void *closure_data)
{
	struct call *call = closure_data;
	return call ? atomic_load(&call->cancelled) : true;
}

PBRPC_EXPORT int64_t pbrpc_call_deadline(void *closure_data)
{
	struct call *call = as_call(closure_data);
	return call ? call->deadline_ns : 0;
}

PBRPC_EXPORT const char *pbrpc_call_method(void *closure_data)
{
	struct call *call = as_call(closure_data);
	return call ? call->m->name : NULL;
}

PBRPC_EXPORT const void *pbrpc_call_metadata(void *closure_data, const char *key, size_t *len)
{
	struct call *call = as_call(closure_data);
	if (!call || !call->md_len)
		return NULL;
	pbrpc_wire_request view = { .metadata_raw = call->md, .metadata_raw_len = call->md_len };
	return pbrpc_wire_metadata_get(&view, key, len);
}

PBRPC_EXPORT int pbrpc_call_peer_cred(void *closure_data, pid_t *pid, uid_t *uid, gid_t *gid)
{
	struct call *call = as_call(closure_data);
	if (!call)
		return PBRPC_EINVALID;
	/* Credentials are copied at dispatch time: the connection may be gone. */
	if (!call->has_cred)
		return -ENOTSUP;
	if (pid)
		*pid = call->cred.pid;
	if (uid)
		*uid = call->cred.uid;
	if (gid)
		*gid = call->cred.gid;
	return 0;
}
