/* pbrpc client: calls from any number of threads over one connection (plus
 * connections still draining after a graceful GOAWAY).
 *
 * Threads. One mutex guards the client. Per connection, one thread at a time
 * is the reader: it owns the decoder and reads the socket without holding the
 * mutex (a blocking recv for a synchronous caller, MSG_DONTWAIT from
 * pbrpc_client_process), then dispatches frames under the mutex. Other
 * synchronous callers wait on their call's condvar: the reader copies their
 * reply into the call record and wakes them, or, when it leaves, wakes one of
 * them to take over (leader/follower). A reader that finds its own reply
 * unpacks it straight from the decoder's buffer before giving up the role, so
 * an uncontended call costs one sendmsg and one recvmsg and allocates nothing.
 *
 * Calls. Records come from slabs through a free list; call ids map to records
 * through an open-addressing table. A record has two owners: the id (until the
 * RESPONSE arrives or the connection is gone) and the caller (until the
 * synchronous stub returns or the async closure has run). A call given up on
 * (deadline, cancel) keeps its id reserved until the server answers it.
 *
 * Async completions wait in a queue for pbrpc_client_process(); an eventfd in
 * the client's epoll set wakes a poller when another thread queues one.
 */
#include "pbrpc/client.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "internal.h"
#include "pbrpc/endpoint.h"
#include "pbrpc/frame.h"
#include "pbrpc/wire.h"

#define AGENT "pbrpc-c/0.1.0"
#define NS_PER_MS 1000000LL
#define NS_PER_S 1000000000LL

#define DEFAULT_CONNECT_TIMEOUT_MS 5000
#define DEFAULT_CALL_TIMEOUT_MS 30000
#define DEFAULT_BACKOFF_MIN_MS 50
#define DEFAULT_BACKOFF_MAX_MS 2000

/* Buffers: each is kept at the size of the largest recent message, so that a
 * busy connection allocates nothing per call, however large its messages.
 * Above the SMALL sizes below a buffer is "large": the client notes the time
 * (the start of the latest call, c->now) whenever it uses one, and gives
 * every large buffer back once none was used for BIG_IDLE_NS: at the start of
 * the next call, or from pbrpc_client_process() (which wakes up for it). The
 * fast path pays one store and one compare per call. */
#define ARENA_MIN 4096u
#define ARENA_KEEP_MAX (32u << 20)     /* an arena keeps a buffer up to this size */
#define ARENA_SMALL (256u << 10)       /* an arena buffer above this is large */
#define UNPACK_LOCKED_MAX 1024u        /* replies up to this are unpacked under the lock */
#define IDLE_ARENAS_MAX 4
#define CALL_BUF_SMALL (64u << 10) /* a call record's reply buffer above this is large */
#define WRITER_SMALL (256u << 10)  /* the writer is trimmed to this when idle */
#define BIG_FRAME (256u << 10)     /* a decoder that held a frame this big is large */
#define BIG_IDLE_NS NS_PER_S       /* large buffers go after this long unused */
#define CALL_SLAB_SIZE 64
#define TABLE_MIN 64u
#define READ_BUDGET 16 /* non-blocking reads per connection per process() round */
#define LOCAL_MSG_MAX 256

/* ---- reply arena ------------------------------------------------------------
 * A ProtobufCAllocator that bumps a pointer in a retained buffer; free is a
 * no-op and the whole arena is reset after the closure returns. Overflow goes
 * to malloc'd blocks, and the next reset grows the buffer (up to
 * ARENA_KEEP_MAX) so that steady state allocates nothing. */

typedef union arena_block {
	union arena_block *next;
	max_align_t align; /* the block's data follows, suitably aligned */
} arena_block;

typedef struct arena {
	ProtobufCAllocator pa;
	uint8_t *buf;
	size_t cap, used, want;
	size_t keep; /* largest buffer kept across resets */
	int64_t big_at; /* when a buffer above ARENA_SMALL was last used */
	arena_block *extra;
	bool failed;
	struct arena *next;
} arena;

static void *arena_alloc(void *data, size_t size)
{
	arena *a = data;
	const size_t al = _Alignof(max_align_t);
	if (size > SIZE_MAX / 2) {
		a->failed = true;
		return NULL;
	}
	size_t n = (size + al - 1) & ~(al - 1);
	if (n == 0)
		n = al;
	a->want += n;
	if (a->cap - a->used >= n) {
		void *p = a->buf + a->used;
		a->used += n;
		return p;
	}
	arena_block *b = malloc(sizeof(*b) + n);
	if (!b) {
		a->failed = true;
		return NULL;
	}
	b->next = a->extra;
	a->extra = b;
	return b + 1;
}

static void arena_free(void *data, void *p)
{
	(void)data;
	(void)p;
}

static void arena_reset(arena *a)
{
	while (a->extra) {
		arena_block *b = a->extra;
		a->extra = b->next;
		free(b);
	}
	if (a->want > a->cap && a->cap < a->keep) {
		size_t cap = a->cap ? a->cap : ARENA_MIN;
		while (cap < a->want && cap < a->keep)
			cap *= 2;
		uint8_t *nb = malloc(cap);
		if (nb) {
			free(a->buf);
			a->buf = nb;
			a->cap = cap;
		}
	}
	a->used = a->want = 0;
	a->failed = false;
}

/* Drops a large buffer (the arena is reset and empty). */
static void arena_shrink(arena *a)
{
	if (a->cap > ARENA_SMALL) {
		free(a->buf);
		a->buf = NULL;
		a->cap = 0;
	}
}

static void arena_destroy(arena *a)
{
	if (!a)
		return;
	arena_reset(a);
	free(a->buf);
	free(a);
}

static arena *arena_new(size_t keep)
{
	arena *a = calloc(1, sizeof(*a));
	if (!a)
		return NULL;
	a->pa.alloc = arena_alloc;
	a->pa.free = arena_free;
	a->pa.allocator_data = a;
	a->keep = keep;
	return a;
}

/* ---- thread-local state ----
 * The fields every call touches sit in a small initial-exec block (a plain
 * %fs-relative access, no __tls_get_addr call); the status message buffer
 * and the next call's options are touched only when used. */

typedef struct tls_hot {
	int status;
	unsigned gen; /* bumped by every status change */
	uint32_t msg_len;
	uint32_t last_call;
	bool has_next;
	bool arena_busy;
	pbrpc_client *in_process; /* the client whose process() runs on this thread */
	arena *arena;             /* this thread's arena for synchronous replies */
} tls_hot;

typedef struct tls_cold {
	char msg[PBRPC_WIRE_MESSAGE_MAX + 1];
	pbrpc_call_opts next;
} tls_cold;

static _Thread_local tls_hot th __attribute__((tls_model("initial-exec")));
static _Thread_local tls_cold tc;

static void set_status(int status, const char *msg, size_t len)
{
	if (!msg)
		len = 0;
	if (len > PBRPC_WIRE_MESSAGE_MAX)
		len = PBRPC_WIRE_MESSAGE_MAX;
	th.status = status;
	th.gen++;
	th.msg_len = (uint32_t)len;
	if (len) {
		if (msg != tc.msg)
			memmove(tc.msg, msg, len);
		tc.msg[len] = '\0';
	}
}

__attribute__((format(printf, 2, 3))) static void set_statusf(int status, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(tc.msg, sizeof(tc.msg), fmt, ap);
	va_end(ap);
	th.status = status;
	th.gen++;
	th.msg_len = n < 0 ? 0 : (n < (int)sizeof(tc.msg) ? (uint32_t)n : (uint32_t)sizeof(tc.msg) - 1);
}

static const char *status_msg(void)
{
	return th.msg_len ? tc.msg : "";
}

/* The options set by pbrpc_client_next_call(), copied to *buf, or NULL (the
 * common case: no copy, and tc is not touched). */
static const pbrpc_call_opts *take_opts(pbrpc_call_opts *buf)
{
	if (__builtin_expect(!th.has_next, 1))
		return NULL;
	*buf = tc.next;
	th.has_next = false;
	return buf;
}

/* Each thread keeps one arena for the replies of its synchronous calls, so
 * the fast path takes no lock for it; the key frees it when the thread ends. */
static pthread_key_t arena_key;
static pthread_once_t arena_key_once = PTHREAD_ONCE_INIT;
static bool arena_key_ok;

static void arena_key_free(void *a)
{
	arena_destroy(a);
}

static void arena_key_init(void)
{
	arena_key_ok = pthread_key_create(&arena_key, arena_key_free) == 0;
}

__attribute__((destructor)) static void arena_key_fini(void)
{
	if (arena_key_ok)
		pthread_key_delete(arena_key); /* the library may be unloaded */
}

/* This thread's arena, or NULL when an outer call's closure still uses it
 * (a call made from a closure) or on allocation failure. A large buffer not
 * used for BIG_IDLE_NS before `now` is dropped first. */
static arena *thread_arena_take(int64_t now)
{
	if (th.arena_busy)
		return NULL;
	if (th.arena && th.arena->cap > ARENA_SMALL && now - th.arena->big_at >= BIG_IDLE_NS)
		arena_shrink(th.arena);
	if (!th.arena) {
		pthread_once(&arena_key_once, arena_key_init);
		arena *a = arena_key_ok ? arena_new(ARENA_KEEP_MAX) : NULL;
		if (!a)
			return NULL;
		if (pthread_setspecific(arena_key, a) != 0) {
			arena_destroy(a);
			return NULL;
		}
		th.arena = a;
	}
	th.arena_busy = true;
	return th.arena;
}

/* `now`: the start of the call that used it. */
static void thread_arena_give(arena *a, int64_t now)
{
	arena_reset(a);
	if (a->cap > ARENA_SMALL)
		a->big_at = now;
	th.arena_busy = false;
}

/* ---- objects ---- */

enum { CALL_SYNC, CALL_ASYNC };
#define REF_TABLE 0x1u /* the id is reserved: no RESPONSE yet */
#define REF_OWNER 0x2u /* the caller (sync) or the pending closure (async) */

struct conn;

typedef struct call {
	uint32_t id;
	uint8_t kind;
	uint8_t refs;
	bool done;       /* status is final */
	bool abandoned;  /* timed out or cancelled; a late RESPONSE is dropped */
	bool retry;      /* UNAVAILABLE from a draining server: never ran */
	bool retried;
	bool in_decoder; /* reply bytes are in rconn's decoder; the caller is its reader */
	bool waiting;    /* on conn->waiters */
	bool timed;      /* on the client's timer list */
	struct conn *conn;  /* while REF_TABLE */
	struct conn *rconn; /* while in_decoder */
	struct call *cprev, *cnext; /* conn->calls */
	struct call *tprev, *tnext; /* client timers (async calls with a deadline) */
	struct call *next;          /* free list, done queue */
	struct call *wnext;         /* conn->waiters */
	int64_t deadline;           /* CLOCK_MONOTONIC ns; 0: none */
	int status;
	int err; /* local error code; 0 when the status came from the server */
	const char *msg;
	size_t msg_len;
	const uint8_t *body;
	size_t body_len;
	const ProtobufCMessageDescriptor *out_desc;
	ProtobufCClosure closure;
	void *closure_data;
	/* call_get() zeroes everything above; what follows is kept. */
	uint8_t *buf; /* reply copy: message, then body */
	size_t cap;
	pthread_cond_t cond;
	char lmsg[LOCAL_MSG_MAX];
} call;

typedef struct call_slab {
	struct call_slab *next;
	call calls[CALL_SLAB_SIZE];
} call_slab;

typedef struct conn {
	int fd;
	pbrpc_frame_decoder dec;
	pbrpc_frame_writer w;
	pbrpc_wire_hello hello;
	uint32_t max_frame; /* the server's: largest REQUEST payload we may send */
	uint32_t max_calls; /* the server's; 0: no limit */
	uint32_t inflight;  /* ids reserved on this connection, abandoned ones included */
	uint32_t async_inflight;
	int refs; /* threads doing I/O on it without the mutex */
	bool dead, draining, goaway_ok, reading, pumping;
	bool in_epoll, epollout;
	int64_t rcvtimeo; /* cached SO_RCVTIMEO in ns; 0: none */
	call *calls;
	call *waiters; /* sync callers that may become the reader */
	struct conn *next;
} conn;

typedef struct method_name {
	const char *s;
	size_t len;
	bool valid; /* checked once here, not on every call */
} method_name;

typedef struct svc {
	ProtobufCService base;
	pbrpc_client *c;
	bool async;
	struct svc *next;
	method_name m[];
} svc;

struct pbrpc_client {
	pthread_mutex_t mu;
	pthread_cond_t cond; /* connection state changed, a call slot freed */
	pthread_condattr_t cattr;
	pbrpc_endpoint ep;
	char ep_str[PBRPC_ENDPOINT_STRLEN];
	uint32_t max_frame;
	int connect_timeout_ms, call_timeout_ms, backoff_min_ms, backoff_max_ms;

	conn *cur;   /* takes new calls; NULL when disconnected or draining */
	conn *conns; /* every open connection */
	bool connecting, closing, stopping;
	int slot_waiters;
	int64_t next_attempt;
	int backoff_ms;
	int last_err;
	char last_msg[LOCAL_MSG_MAX];
	uint64_t rng;
	pbrpc_wire_hello hello;

	uint32_t next_id;
	call **table;
	uint32_t table_mask, table_count;
	call *free_calls;
	call_slab *slabs;
	arena *arenas;
	unsigned idle_arenas;
	int64_t now;    /* start of the latest call (or process() round) */
	int64_t big_at; /* a large buffer was last used then; 0: none is held */

	call *done_head, *done_tail;
	size_t async_pending;
	call *timers_head, *timers_tail;

	int epfd, efd;
	bool watching; /* sockets are in epfd: async calls or a poller exist */
	bool efd_signaled;
	int proc_efd_only; /* process() callers waiting on the eventfd alone */
	pthread_t io;
	bool io_started;
	svc *services;
};

/* ---- small helpers ---- */

/* pbrpc_frame_writer_pending() and pbrpc_frame_decoder_pending() without the
 * calls into frame.c (the same library): the fast path asks several times. */
static inline size_t w_pending(const pbrpc_frame_writer *w)
{
	return w->tail - w->head;
}

static inline size_t dec_pending(const pbrpc_frame_decoder *d)
{
	return d->tail - d->head + d->in_len + (size_t)d->discard;
}

static int ms_until(int64_t deadline)
{
	if (!deadline)
		return -1;
	int64_t ns = deadline - pbrpc__now_ns();
	if (ns <= 0)
		return 0;
	int64_t ms = (ns + NS_PER_MS - 1) / NS_PER_MS;
	return ms > INT_MAX ? INT_MAX : (int)ms;
}

static void cond_wait_until(pthread_cond_t *cv, pthread_mutex_t *mu, int64_t deadline)
{
	if (!deadline) {
		pthread_cond_wait(cv, mu);
		return;
	}
	struct timespec ts = { .tv_sec = deadline / NS_PER_S, .tv_nsec = deadline % NS_PER_S };
	pthread_cond_timedwait(cv, mu, &ts);
}

static int wait_fd(int fd, short events, int64_t deadline)
{
	struct pollfd p = { .fd = fd, .events = events };
	int r;
	do
		r = poll(&p, 1, ms_until(deadline));
	while (r < 0 && errno == EINTR);
	if (r < 0)
		return -errno;
	return r == 0 ? -ETIMEDOUT : 0;
}

static uint64_t rng_next(pbrpc_client *c)
{
	uint64_t x = c->rng;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return c->rng = x;
}

__attribute__((format(printf, 4, 5))) static void call_fail(call *x, int status, int err, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(x->lmsg, sizeof(x->lmsg), fmt, ap);
	va_end(ap);
	x->status = status;
	x->err = err;
	x->msg = x->lmsg;
	x->msg_len = n < 0 ? 0 : ((size_t)n < sizeof(x->lmsg) ? (size_t)n : sizeof(x->lmsg) - 1);
	x->body = NULL;
	x->body_len = 0;
}

static void efd_signal(pbrpc_client *c)
{
	if (c->efd_signaled)
		return;
	uint64_t one = 1;
	if (write(c->efd, &one, sizeof(one)) == (ssize_t)sizeof(one))
		c->efd_signaled = true;
}

/* ---- call records ---- */

__attribute__((noinline)) static int grow_calls(pbrpc_client *c)
{
	call_slab *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	for (int i = 0; i < CALL_SLAB_SIZE; i++) {
		pthread_cond_init(&s->calls[i].cond, &c->cattr);
		s->calls[i].next = c->free_calls;
		c->free_calls = &s->calls[i];
	}
	s->next = c->slabs;
	c->slabs = s;
	return 0;
}

static call *call_get(pbrpc_client *c, int kind)
{
	if (!c->free_calls && grow_calls(c) < 0)
		return NULL;
	call *x = c->free_calls;
	c->free_calls = x->next;
	/* Everything above `buf`, in layout order so that the compiler merges
	 * the stores (a memset here becomes `rep stos`); buf, cap, cond stay. */
	x->id = 0;
	x->kind = (uint8_t)kind;
	x->refs = REF_OWNER;
	x->done = x->abandoned = x->retry = x->retried = x->in_decoder = x->waiting = x->timed = false;
	x->conn = x->rconn = NULL;
	x->cprev = x->cnext = NULL;
	x->tprev = x->tnext = NULL;
	x->next = x->wnext = NULL;
	x->deadline = 0;
	x->status = PBRPC_STATUS_OK;
	x->err = 0;
	x->msg = NULL;
	x->msg_len = 0;
	x->body = NULL;
	x->body_len = 0;
	x->out_desc = NULL;
	x->closure = NULL;
	x->closure_data = NULL;
	return x;
}

/* Notes that a large buffer was just used (see BIG_IDLE_NS). */
static inline void big_touch(pbrpc_client *c)
{
	c->big_at = c->now;
}

static void call_put(pbrpc_client *c, call *x)
{
	if (x->cap > CALL_BUF_SMALL)
		big_touch(c);
	x->next = c->free_calls;
	c->free_calls = x;
}

static void call_release(pbrpc_client *c, call *x)
{
	x->refs &= (uint8_t)~REF_OWNER;
	if (!x->refs)
		call_put(c, x);
}

static int store_reply(call *x, const pbrpc_wire_response *r)
{
	size_t need = r->message_len + r->body_len;
	if (need > x->cap) {
		size_t cap = x->cap ? x->cap : 256;
		while (cap < need)
			cap *= 2;
		uint8_t *nb = malloc(cap);
		if (!nb)
			return -ENOMEM;
		free(x->buf);
		x->buf = nb;
		x->cap = cap;
	}
	if (r->message_len)
		memcpy(x->buf, r->message, r->message_len);
	if (r->body_len)
		memcpy(x->buf + r->message_len, r->body, r->body_len);
	x->msg = (const char *)x->buf;
	x->msg_len = r->message_len;
	x->body = x->buf + r->message_len;
	x->body_len = r->body_len;
	return 0;
}

/* ---- id table: open addressing, linear probing, backward-shift deletion ---- */

static call *table_find(const pbrpc_client *c, uint32_t id)
{
	for (uint32_t i = id & c->table_mask;; i = (i + 1) & c->table_mask) {
		call *x = c->table[i];
		if (!x || x->id == id)
			return x;
	}
}

static void table_put(call **t, uint32_t mask, call *x)
{
	uint32_t i = x->id & mask;
	while (t[i])
		i = (i + 1) & mask;
	t[i] = x;
}

__attribute__((noinline)) static int table_grow(pbrpc_client *c);

/* Makes room for one more entry (load factor at most 1/2). */
static inline int table_reserve(pbrpc_client *c)
{
	if ((c->table_count + 1) * 2 <= c->table_mask + 1)
		return 0;
	return table_grow(c);
}

static int table_grow(pbrpc_client *c)
{
	uint32_t cap = c->table_mask + 1;
	if (cap > (UINT32_MAX >> 2))
		return -ENOMEM;
	uint32_t ncap = cap * 2;
	call **nt = calloc(ncap, sizeof(*nt));
	if (!nt)
		return -ENOMEM;
	for (uint32_t i = 0; i < cap; i++)
		if (c->table[i])
			table_put(nt, ncap - 1, c->table[i]);
	free(c->table);
	c->table = nt;
	c->table_mask = ncap - 1;
	return 0;
}

static void table_remove(pbrpc_client *c, uint32_t id)
{
	uint32_t m = c->table_mask, i = id & m;
	while (c->table[i]->id != id)
		i = (i + 1) & m;
	c->table_count--;
	for (uint32_t j = i;;) {
		c->table[i] = NULL;
		for (;;) {
			j = (j + 1) & m;
			if (!c->table[j])
				return;
			uint32_t home = c->table[j]->id & m;
			/* The entry at j may stay unless its home lies cyclically in (i, j]. */
			bool stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
			if (!stays)
				break;
		}
		c->table[i] = c->table[j];
		i = j;
	}
}

/* Next call id: non-zero, wraps around 2^32, never one still reserved. */
static uint32_t alloc_id(pbrpc_client *c)
{
	for (;;) {
		uint32_t id = c->next_id++;
		if (id != 0 && !table_find(c, id))
			return id;
	}
}

/* ---- timers for async calls, sorted by deadline ---- */

static void timer_add(pbrpc_client *c, call *x)
{
	call *p = c->timers_tail;
	while (p && p->deadline > x->deadline)
		p = p->tprev;
	x->tprev = p;
	x->tnext = p ? p->tnext : c->timers_head;
	if (x->tnext)
		x->tnext->tprev = x;
	else
		c->timers_tail = x;
	if (p)
		p->tnext = x;
	else
		c->timers_head = x;
	x->timed = true;
}

static void timer_del(pbrpc_client *c, call *x)
{
	if (!x->timed)
		return;
	if (x->tprev)
		x->tprev->tnext = x->tnext;
	else
		c->timers_head = x->tnext;
	if (x->tnext)
		x->tnext->tprev = x->tprev;
	else
		c->timers_tail = x->tprev;
	x->tprev = x->tnext = NULL;
	x->timed = false;
}

/* ---- completion ---- */

static void done_push(pbrpc_client *c, call *x)
{
	x->next = NULL;
	if (c->done_tail)
		c->done_tail->next = x;
	else
		c->done_head = x;
	c->done_tail = x;
	if (th.in_process != c)
		efd_signal(c);
}

/* x's status is final: wake its synchronous caller or queue its closure. */
static void call_finish(pbrpc_client *c, call *x)
{
	x->done = true;
	if (x->kind == CALL_SYNC) {
		pthread_cond_signal(&x->cond);
	} else {
		timer_del(c, x);
		done_push(c, x);
	}
}

/* ---- connections ---- */

__attribute__((format(printf, 5, 6))) static void conn_fail(pbrpc_client *c, conn *k, int status, int err,
							    const char *fmt, ...);

static void conn_destroy(pbrpc_client *c, conn *k)
{
	for (conn **p = &c->conns; *p; p = &(*p)->next) {
		if (*p == k) {
			*p = k->next;
			break;
		}
	}
	if (k->fd >= 0)
		close(k->fd);
	pbrpc_frame_decoder_fini(&k->dec);
	pbrpc_frame_writer_fini(&k->w);
	free(k);
}

static void conn_unref(pbrpc_client *c, conn *k)
{
	if (--k->refs == 0 && k->dead)
		conn_destroy(c, k);
}

/* Releases x's id (RESPONSE received or connection gone). */
static void call_unlink(pbrpc_client *c, call *x)
{
	conn *k = x->conn;
	table_remove(c, x->id);
	if (x->cprev)
		x->cprev->cnext = x->cnext;
	else
		k->calls = x->cnext;
	if (x->cnext)
		x->cnext->cprev = x->cprev;
	x->cprev = x->cnext = NULL;
	x->conn = NULL;
	x->refs &= (uint8_t)~REF_TABLE;
	k->inflight--;
	if (x->kind == CALL_ASYNC)
		k->async_inflight--;
	if (c->slot_waiters)
		pthread_cond_broadcast(&c->cond);
	if (k->draining && k->inflight == 0)
		conn_fail(c, k, PBRPC_STATUS_OK, 0, "server finished draining");
}

/* Closes k and fails every call still in flight on it with `status`. The fd
 * is closed at once, or by the last thread doing I/O on it (which the
 * shutdown() wakes). */
static void conn_fail(pbrpc_client *c, conn *k, int status, int err, const char *fmt, ...)
{
	if (k->dead)
		return;
	char msg[LOCAL_MSG_MAX];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);

	k->dead = true;
	if (c->cur == k) {
		c->cur = NULL;
		c->next_attempt = 0; /* a lost connection is re-dialled at the next call */
	}
	if (status != PBRPC_STATUS_OK) {
		c->last_err = err;
		snprintf(c->last_msg, sizeof(c->last_msg), "%s", msg);
	}
	while (k->calls) {
		call *x = k->calls;
		call_unlink(c, x);
		if (x->abandoned) {
			if (!x->refs)
				call_put(c, x);
			continue;
		}
		call_fail(x, status, err, "%s", msg);
		call_finish(c, x);
	}
	if (k->in_epoll)
		epoll_ctl(c->epfd, EPOLL_CTL_DEL, k->fd, NULL);
	k->in_epoll = false;
	if (k->refs)
		shutdown(k->fd, SHUT_RDWR);
	else
		conn_destroy(c, k);
	pthread_cond_broadcast(&c->cond);
}

static void read_nb(pbrpc_client *c, conn *k, int budget);

static void reader_enter(conn *k)
{
	k->reading = true;
	k->refs++;
}

static void reader_leave(pbrpc_client *c, conn *k)
{
	k->reading = false;
	if (!k->dead) {
		size_t pending = dec_pending(&k->dec);
		if (c->slot_waiters)
			pthread_cond_broadcast(&c->cond); /* one of them may read now */
		if (k->waiters)
			pthread_cond_signal(&k->waiters->cond);
		else if (c->proc_efd_only || (pending && k->async_inflight && th.in_process != c))
			efd_signal(c); /* a poller must take over the reading */
	}
	conn_unref(c, k);
}

/* A write failed: the server may have said why before closing, so read what
 * it sent (when nobody else is reading), then fail the connection. */
static void write_error(pbrpc_client *c, conn *k, int err)
{
	k->refs++;
	if (!k->reading) {
		reader_enter(k);
		read_nb(c, k, 4);
		reader_leave(c, k);
	}
	conn_fail(c, k, PBRPC_STATUS_UNAVAILABLE, err, "connection lost: write failed: %s", pbrpc_strerror(err));
	conn_unref(c, k);
}

/* Sends what is queued without blocking. Leftover bytes are flushed later by
 * the connection's reader, a waiting caller or process() (EPOLLOUT). */
static int conn_flush(pbrpc_client *c, conn *k)
{
	if (k->dead)
		return PBRPC_ECLOSED;
	if (w_pending(&k->w)) {
		ssize_t n = pbrpc_frame_writer_flush(&k->w, k->fd, MSG_DONTWAIT);
		if (n < 0) {
			write_error(c, k, (int)n);
			return (int)n;
		}
	}
	bool left = w_pending(&k->w) > 0;
	if (k->in_epoll && left != k->epollout) {
		struct epoll_event ev = { .events = EPOLLIN | (left ? EPOLLOUT : 0), .data.ptr = k };
		if (epoll_ctl(c->epfd, EPOLL_CTL_MOD, k->fd, &ev) == 0)
			k->epollout = left;
	}
	if (!left && k->w.cap > WRITER_SMALL)
		big_touch(c); /* kept while busy: see BIG_IDLE_NS */
	return 0;
}

/* Puts the sockets into the epoll set from now on. A client used only
 * synchronously keeps them out: each reply would also run epoll's wakeup. */
static void watch_enable(pbrpc_client *c)
{
	if (c->watching)
		return;
	c->watching = true;
	for (conn *k = c->conns, *next; k; k = next) {
		next = k->next;
		if (k->dead)
			continue;
		bool out = w_pending(&k->w) > 0;
		struct epoll_event ev = { .events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = k };
		if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, k->fd, &ev) == 0) {
			k->in_epoll = true;
			k->epollout = out;
		} else {
			int err = -errno;
			conn_fail(c, k, PBRPC_STATUS_UNAVAILABLE, err, "cannot watch the connection: %s",
				  pbrpc_strerror(err));
		}
	}
}

__attribute__((format(printf, 3, 4))) static void protocol_error(pbrpc_client *c, conn *k, const char *fmt, ...)
{
	char msg[LOCAL_MSG_MAX];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (pbrpc_wire_write_goaway(&k->w, PBRPC_STATUS_INVALID_ARGUMENT, msg) == 0)
		pbrpc_frame_writer_flush(&k->w, k->fd, MSG_DONTWAIT);
	conn_fail(c, k, PBRPC_STATUS_UNAVAILABLE, PBRPC_EPROTO, "protocol error by the server: %s", msg);
}

static void decoder_error(pbrpc_client *c, conn *k, int r)
{
	if (r == PBRPC_ETOOBIG) {
		const pbrpc_frame_header *h = pbrpc_frame_decoder_rejected(&k->dec);
		unsigned len = h ? h->length : 0;
		char m[96];
		snprintf(m, sizeof(m), "frame of %u bytes is above the limit of %u", len, c->max_frame);
		if (pbrpc_wire_write_goaway(&k->w, PBRPC_STATUS_RESOURCE_EXHAUSTED, m) == 0)
			pbrpc_frame_writer_flush(&k->w, k->fd, MSG_DONTWAIT);
		conn_fail(c, k, PBRPC_STATUS_UNAVAILABLE, PBRPC_ETOOBIG,
			  "server sent a %u-byte frame, above this client's limit of %u", len, c->max_frame);
	} else if (r == PBRPC_EPROTO) {
		protocol_error(c, k, "reserved bits set in a frame header");
	} else {
		conn_fail(c, k, PBRPC_STATUS_UNAVAILABLE, r, "connection lost: %s", pbrpc_strerror(r));
	}
}

static void read_error(pbrpc_client *c, conn *k, int r)
{
	if (r == PBRPC_EOF)
		conn_fail(c, k, PBRPC_STATUS_UNAVAILABLE, r, "connection closed by server");
	else if (r == PBRPC_ETRUNCATED)
		conn_fail(c, k, PBRPC_STATUS_UNAVAILABLE, r, "connection closed by server in the middle of a frame");
	else
		conn_fail(c, k, PBRPC_STATUS_UNAVAILABLE, r, "connection lost: read failed: %s", pbrpc_strerror(r));
}

/* ---- dispatch (locked, by the connection's reader) ---- */

/* Returns true when f is the RESPONSE of `me`, the reader's own call: its
 * payload is left in the decoder and the reader keeps its role. */
static bool handle_response(pbrpc_client *c, conn *k, const pbrpc_frame *f, call *me)
{
	pbrpc_wire_response r;
	if (pbrpc_wire_read_response(f, &r) < 0) {
		protocol_error(c, k, "malformed RESPONSE for call %u", (unsigned)f->hdr.stream);
		return false;
	}
	call *x = table_find(c, r.call_id);
	if (!x || x->conn != k) {
		protocol_error(c, k, "RESPONSE for unknown call id %u", (unsigned)r.call_id);
		return false;
	}
	call_unlink(c, x);
	if (x->abandoned) {
		if (!x->refs)
			call_put(c, x);
		return false;
	}
	int st = (r.status < 0 || r.status >= PBRPC_STATUS_COUNT) ? PBRPC_STATUS_UNKNOWN : r.status;
	x->status = st;
	x->err = 0;
	/* A REQUEST that reached a draining server after its GOAWAY was not run. */
	x->retry = st == PBRPC_STATUS_UNAVAILABLE && k->goaway_ok && x->kind == CALL_SYNC && !x->retried;
	if (x == me) {
		x->msg = r.message;
		x->msg_len = r.message_len;
		x->body = r.body;
		x->body_len = r.body_len;
		x->in_decoder = true;
		x->rconn = k;
		x->done = true;
		return true;
	}
	if (store_reply(x, &r) < 0)
		call_fail(x, PBRPC_STATUS_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory storing a %zu-byte reply",
			  r.body_len);
	call_finish(c, x);
	return false;
}

static void handle_goaway(pbrpc_client *c, conn *k, const pbrpc_frame *f)
{
	int st;
	const char *m;
	size_t ml;
	if (pbrpc_wire_read_goaway(f, &st, &m, &ml) < 0) {
		protocol_error(c, k, "malformed GOAWAY");
		return;
	}
	if (st != PBRPC_STATUS_OK) {
		conn_fail(c, k, PBRPC_STATUS_UNAVAILABLE, PBRPC_EGOAWAY, "server sent GOAWAY: %s: %.*s",
			  pbrpc_status_name(st), (int)ml, m);
		return;
	}
	/* Drain: calls in flight finish here, new calls go to a new connection. */
	k->goaway_ok = true;
	k->draining = true;
	if (c->cur == k) {
		c->cur = NULL;
		c->next_attempt = 0;
	}
	pthread_cond_broadcast(&c->cond);
	if (k->inflight == 0)
		conn_fail(c, k, PBRPC_STATUS_OK, 0, "server is draining");
}

static bool handle_frame(pbrpc_client *c, conn *k, const pbrpc_frame *f, call *me)
{
	if (pbrpc_wire_check_header(&f->hdr) < 0) {
		protocol_error(c, k, "bad %s frame header (type 0x%02x, flags 0x%02x, stream %u, length %u)",
			       pbrpc_wire_frame_name(f->hdr.type), f->hdr.type, f->hdr.flags,
			       (unsigned)f->hdr.stream, (unsigned)f->hdr.length);
		return false;
	}
	switch (f->hdr.type) {
	case PBRPC_FRAME_RESPONSE:
		return handle_response(c, k, f, me);
	case PBRPC_FRAME_PING:
		if (pbrpc_wire_write_ping(&k->w, PBRPC_FRAME_PONG, f->payload) == 0)
			conn_flush(c, k);
		return false;
	case PBRPC_FRAME_PONG:
		return false;
	case PBRPC_FRAME_GOAWAY:
		handle_goaway(c, k, f);
		return false;
	default:
		protocol_error(c, k, "unexpected %s frame from the server", pbrpc_wire_frame_name(f->hdr.type));
		return false;
	}
}

/* Dispatches the complete frames in k's decoder. Returns true when it stopped
 * at me's RESPONSE (see handle_response). */
static bool dispatch_buffered(pbrpc_client *c, conn *k, call *me)
{
	while (!k->dead) {
		pbrpc_frame f;
		int r = pbrpc_frame_decoder_next(&k->dec, &f);
		if (r == 0)
			return false;
		if (r < 0) {
			decoder_error(c, k, r);
			return false;
		}
		if (f.hdr.length > BIG_FRAME)
			big_touch(c);
		if (handle_frame(c, k, &f, me))
			return true;
	}
	return false;
}

/* Non-blocking reads and dispatch, for process() and error paths. */
static void read_nb(pbrpc_client *c, conn *k, int budget)
{
	for (int i = 0; i < budget; i++) {
		dispatch_buffered(c, k, NULL);
		if (k->dead)
			return;
		ssize_t n = pbrpc_frame_decoder_recv(&k->dec, k->fd, MSG_DONTWAIT);
		if (n == 0)
			return;
		if (n < 0) {
			read_error(c, k, (int)n);
			return;
		}
	}
	dispatch_buffered(c, k, NULL);
}

/* Sets SO_RCVTIMEO to `need` ns (0: none) unless the cached value is close
 * enough, so that a stream of calls with the same timeout costs no syscall. */
static void set_rcvtimeo(conn *k, int64_t need)
{
	int64_t cur = k->rcvtimeo;
	if (need == 0) {
		if (cur == 0)
			return;
	} else if (cur != 0) {
		int64_t slack = need / 64;
		if (slack > 20 * NS_PER_MS)
			slack = 20 * NS_PER_MS;
		if (slack < NS_PER_MS)
			slack = NS_PER_MS;
		if (cur <= need + slack && cur >= need / 2)
			return;
	}
	struct timeval tv = { .tv_sec = (time_t)(need / NS_PER_S), .tv_usec = (suseconds_t)((need % NS_PER_S) / 1000) };
	if (need && tv.tv_sec == 0 && tv.tv_usec == 0)
		tv.tv_usec = 1; /* zero would mean "no timeout" */
	if (setsockopt(k->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) == 0)
		k->rcvtimeo = need;
}

/* One step of a synchronous reader: dispatch what is buffered, else flush
 * pending output or block in recv until data arrives or the deadline. `me`
 * (may be NULL) is the reader's own call. */
static void reader_step(pbrpc_client *c, conn *k, call *me, int64_t deadline, int64_t now)
{
	if (dec_pending(&k->dec) && dispatch_buffered(c, k, me))
		return;
	if (k->dead || (me && me->done))
		return;
	if (w_pending(&k->w)) {
		if (conn_flush(c, k) < 0)
			return;
		if (w_pending(&k->w)) {
			/* Output is stuck: wait for either direction (the slow path). */
			int ms = ms_until(deadline);
			struct pollfd p = { .fd = k->fd, .events = POLLIN | POLLOUT };
			ssize_t n = 0;
			pthread_mutex_unlock(&c->mu);
			int r = poll(&p, 1, ms < 0 || ms > 1000 ? 1000 : ms);
			if (r > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR)))
				n = pbrpc_frame_decoder_recv(&k->dec, k->fd, MSG_DONTWAIT);
			pthread_mutex_lock(&c->mu);
			if (n < 0)
				read_error(c, k, (int)n);
			else if (n > 0)
				dispatch_buffered(c, k, me);
			return;
		}
	}
	int64_t need = 0;
	if (deadline) {
		need = deadline - (now ? now : pbrpc__now_ns());
		if (need <= 0)
			return;
	}
	set_rcvtimeo(k, need);
	pthread_mutex_unlock(&c->mu);
	ssize_t n = pbrpc_frame_decoder_recv(&k->dec, k->fd, 0);
	pthread_mutex_lock(&c->mu);
	if (n < 0)
		read_error(c, k, (int)n);
	else if (n > 0)
		dispatch_buffered(c, k, me);
}

/* A follower whose request is still queued waits for the socket to take it. */
static void pump_write(pbrpc_client *c, conn *k, int64_t deadline)
{
	k->pumping = true;
	k->refs++;
	int ms = ms_until(deadline);
	struct pollfd p = { .fd = k->fd, .events = POLLOUT };
	pthread_mutex_unlock(&c->mu);
	poll(&p, 1, ms < 0 || ms > 200 ? 200 : ms); /* then look at our call again */
	pthread_mutex_lock(&c->mu);
	k->pumping = false;
	if (!k->dead)
		conn_flush(c, k);
	conn_unref(c, k);
}

/* Gives up on x (deadline or cancel): its status is final now, a CANCEL tells
 * the server, and its id stays reserved until the server's RESPONSE. */
static void abandon(pbrpc_client *c, call *x, int status, int err, const char *what)
{
	conn *k = x->conn;
	x->abandoned = true;
	call_fail(x, status, err, "%s", what);
	if (k && !k->dead && pbrpc_wire_write_cancel(&k->w, x->id) == 0)
		conn_flush(c, k);
	call_finish(c, x);
}

/* Waits (locked) until x is done: as the connection's reader or as a
 * follower. If x->in_decoder on return, the caller is still x->rconn's reader
 * and must call reader_leave() once it has used the reply bytes. */
static void sync_wait(pbrpc_client *c, call *x, int64_t now)
{
	conn *k = x->conn;
	k->refs++;
	/* The deadline was checked when the request was sent (at `now`, which
	 * also sets the first recv timeout); the reader's recv timeout and the
	 * followers' timed wait catch it from there. */
	for (bool first = true; !x->done; first = false) {
		if (!first && x->deadline && pbrpc__now_ns() >= x->deadline) {
			abandon(c, x, PBRPC_STATUS_DEADLINE_EXCEEDED, -ETIMEDOUT, "deadline exceeded");
			break;
		}
		if (!k->reading) {
			reader_enter(k);
			reader_step(c, k, x, x->deadline, first ? now : 0);
			if (x->in_decoder)
				break;
			reader_leave(c, k);
			continue;
		}
		if (w_pending(&k->w) && !k->pumping && !k->dead) {
			pump_write(c, k, x->deadline);
			continue;
		}
		x->wnext = k->waiters;
		k->waiters = x;
		x->waiting = true;
		cond_wait_until(&x->cond, &c->mu, x->deadline);
		for (call **p = &k->waiters; *p; p = &(*p)->wnext) {
			if (*p == x) {
				*p = x->wnext;
				break;
			}
		}
		x->waiting = false;
	}
	/* We may have been woken to take over the reading: pass that on. */
	if (!k->dead && !k->reading && k->waiters)
		pthread_cond_signal(&k->waiters->cond);
	conn_unref(c, k);
}

/* ---- connecting ---- */

static int write_all(conn *k, int64_t deadline)
{
	while (w_pending(&k->w)) {
		ssize_t n = pbrpc_frame_writer_flush(&k->w, k->fd, MSG_DONTWAIT);
		if (n < 0)
			return (int)n;
		if (w_pending(&k->w)) {
			int r = wait_fd(k->fd, POLLOUT, deadline);
			if (r < 0)
				return r;
		}
	}
	return 0;
}

/* Reads the server's 8-byte preface, checking each byte as it arrives. */
static int read_preface(int fd, int64_t deadline)
{
	uint8_t b[PBRPC_WIRE_PREFACE_SIZE];
	size_t got = 0;
	while (got < sizeof(b)) {
		struct iovec iov = { b + got, sizeof(b) - got };
		struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
		ssize_t n = pbrpc__recvmsg(fd, &m, MSG_DONTWAIT);
		if (n > 0) {
			for (size_t i = got; i < got + (size_t)n; i++)
				if (b[i] != (uint8_t)PBRPC_WIRE_PREFACE[i])
					return PBRPC_EBADMAGIC;
			got += (size_t)n;
			continue;
		}
		if (n == 0)
			return got ? PBRPC_ETRUNCATED : PBRPC_EOF;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			return -errno;
		int r = wait_fd(fd, POLLIN, deadline);
		if (r < 0)
			return r;
	}
	return 0;
}

static void goaway_best_effort(conn *k, int status, const char *msg)
{
	if (pbrpc_wire_write_goaway(&k->w, status, msg) == 0)
		pbrpc_frame_writer_flush(&k->w, k->fd, MSG_DONTWAIT);
}

static int handshake(pbrpc_client *c, conn *k, int64_t deadline, char *msg, size_t len)
{
	pbrpc_wire_hello h = { .version = PBRPC_WIRE_VERSION, .max_frame = c->max_frame };
	snprintf(h.agent, sizeof(h.agent), "%s", AGENT);
	int rc = pbrpc_wire_write_preface(&k->w, &h);
	if (rc < 0) {
		snprintf(msg, len, "out of memory");
		return rc;
	}
	/* If the server refuses us it may close before reading our preface: a
	 * failed write still reads what it sent, which says why. */
	int wrc = write_all(k, deadline);
	if (wrc == -ETIMEDOUT) {
		snprintf(msg, len, "handshake with %s failed: %s", c->ep_str, pbrpc_strerror(wrc));
		return wrc;
	}
	rc = read_preface(k->fd, deadline);
	pbrpc_frame f;
	if (rc == 0)
		rc = pbrpc_frame_read(&k->dec, k->fd, &f, ms_until(deadline));
	if (wrc < 0 && (rc < 0 || f.hdr.type != PBRPC_FRAME_GOAWAY)) {
		snprintf(msg, len, "handshake with %s failed: %s", c->ep_str, pbrpc_strerror(wrc));
		return wrc;
	}
	if (rc == PBRPC_EBADMAGIC) {
		snprintf(msg, len, "%s is not a pbrpc server (bad preface)", c->ep_str);
		return rc;
	}
	if (rc == PBRPC_EOF || rc == PBRPC_ETRUNCATED) {
		snprintf(msg, len, "connection closed by %s during the handshake", c->ep_str);
		return rc;
	}
	if (rc < 0) {
		snprintf(msg, len, "handshake with %s failed: %s", c->ep_str, pbrpc_strerror(rc));
		return rc;
	}
	if (pbrpc_wire_check_header(&f.hdr) < 0 ||
	    (f.hdr.type != PBRPC_FRAME_HELLO && f.hdr.type != PBRPC_FRAME_GOAWAY)) {
		goaway_best_effort(k, PBRPC_STATUS_INVALID_ARGUMENT, "expected HELLO");
		snprintf(msg, len, "%s sent %s instead of HELLO", c->ep_str, pbrpc_wire_frame_name(f.hdr.type));
		return PBRPC_EPROTO;
	}
	if (f.hdr.type == PBRPC_FRAME_GOAWAY) {
		int st;
		const char *m;
		size_t ml;
		if (pbrpc_wire_read_goaway(&f, &st, &m, &ml) < 0) {
			snprintf(msg, len, "%s sent a malformed GOAWAY during the handshake", c->ep_str);
			return PBRPC_EPROTO;
		}
		snprintf(msg, len, "%s refused the connection: GOAWAY %s: %.*s", c->ep_str, pbrpc_status_name(st),
			 (int)ml, m);
		return st == PBRPC_STATUS_FAILED_PRECONDITION ? PBRPC_EVERSION : PBRPC_EGOAWAY;
	}
	rc = pbrpc_wire_read_hello(&f, &k->hello);
	if (rc == PBRPC_EVERSION) {
		char m[96];
		snprintf(m, sizeof(m), "unsupported protocol version %u, this peer speaks %d", (unsigned)k->hello.version,
			 PBRPC_WIRE_VERSION);
		goaway_best_effort(k, PBRPC_STATUS_FAILED_PRECONDITION, m);
		snprintf(msg, len, "%s speaks protocol version %u, this client speaks %d", c->ep_str,
			 (unsigned)k->hello.version, PBRPC_WIRE_VERSION);
		return rc;
	}
	if (rc < 0) {
		goaway_best_effort(k, PBRPC_STATUS_INVALID_ARGUMENT, "malformed HELLO");
		snprintf(msg, len, "%s sent a malformed HELLO", c->ep_str);
		return rc;
	}
	k->max_frame = k->hello.max_frame ? k->hello.max_frame : PBRPC_FRAME_MAX_DEFAULT;
	if (k->max_frame > PBRPC_FRAME_MAX_LIMIT)
		k->max_frame = PBRPC_FRAME_MAX_LIMIT;
	k->max_calls = k->hello.max_calls;
	return 0;
}

/* Connects and handshakes without the client's mutex (touches only c's
 * read-only fields and the new connection). */
static int conn_open(pbrpc_client *c, int timeout_ms, conn **out, char *msg, size_t len)
{
	int64_t deadline = timeout_ms >= 0 ? pbrpc__now_ns() + (int64_t)timeout_ms * NS_PER_MS : 0;
	int fd = pbrpc_endpoint_connect(&c->ep, timeout_ms);
	if (fd < 0) {
		snprintf(msg, len, "cannot connect to %s: %s", c->ep_str, pbrpc_strerror(fd));
		return fd;
	}
	conn *k = calloc(1, sizeof(*k));
	if (!k) {
		close(fd);
		snprintf(msg, len, "out of memory");
		return -ENOMEM;
	}
	k->fd = fd;
	pbrpc_frame_decoder_init(&k->dec, c->max_frame);
	pbrpc_frame_writer_init(&k->w);
	int rc = handshake(c, k, deadline, msg, len);
	if (rc < 0) {
		close(fd);
		pbrpc_frame_decoder_fini(&k->dec);
		pbrpc_frame_writer_fini(&k->w);
		free(k);
		return rc;
	}
	*out = k;
	return 0;
}

/* Dials a new connection (locked on entry and exit; one thread at a time).
 * On failure the next attempt waits for a jittered, doubling backoff. */
static int connect_locked(pbrpc_client *c, int64_t deadline)
{
	c->connecting = true;
	int ms = c->connect_timeout_ms;
	if (deadline) {
		int left = ms_until(deadline);
		if (left < 1)
			left = 1;
		if (ms < 0 || left < ms)
			ms = left;
	}
	pthread_mutex_unlock(&c->mu);
	conn *k = NULL;
	char msg[LOCAL_MSG_MAX];
	int rc = conn_open(c, ms, &k, msg, sizeof(msg));
	pthread_mutex_lock(&c->mu);
	c->connecting = false;
	if (rc == 0 && c->watching) {
		struct epoll_event ev = { .events = EPOLLIN, .data.ptr = k };
		if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, k->fd, &ev) == 0) {
			k->in_epoll = true;
		} else {
			rc = -errno;
			snprintf(msg, sizeof(msg), "cannot watch the connection: %s", pbrpc_strerror(rc));
			close(k->fd);
			pbrpc_frame_decoder_fini(&k->dec);
			pbrpc_frame_writer_fini(&k->w);
			free(k);
		}
	}
	if (rc == 0) {
		k->next = c->conns;
		c->conns = k;
		c->cur = k;
		c->hello = k->hello;
		c->backoff_ms = c->backoff_min_ms;
		c->next_attempt = 0;
		c->last_err = 0;
		c->last_msg[0] = '\0';
		if (c->proc_efd_only)
			efd_signal(c);
	} else {
		c->last_err = rc;
		snprintf(c->last_msg, sizeof(c->last_msg), "%s", msg);
		int b = c->backoff_ms;
		int span = b / 5; /* +-20% */
		int64_t d = (int64_t)b - span + (int64_t)(rng_next(c) % (uint64_t)(2 * span + 1));
		if (d > c->backoff_max_ms)
			d = c->backoff_max_ms;
		c->next_attempt = pbrpc__now_ns() + d * NS_PER_MS;
		c->backoff_ms = b > c->backoff_max_ms / 2 ? c->backoff_max_ms : b * 2;
	}
	pthread_cond_broadcast(&c->cond);
	return rc;
}

/* A connection for a synchronous call, waiting (within x's deadline) for a
 * connection, a reconnect backoff or a free call slot. *now is refreshed
 * whenever it waits. NULL: x has failed. */
static conn *sync_conn(pbrpc_client *c, call *x, int64_t *now_io)
{
	for (bool waited = false;; waited = true) {
		if (c->closing) {
			call_fail(x, PBRPC_STATUS_CANCELLED, PBRPC_ECLOSED, "client is shutting down");
			return NULL;
		}
		conn *k = c->cur;
		if (k && (!k->max_calls || k->inflight < k->max_calls))
			return k; /* the fast path reads no clock */
		int64_t now = *now_io = waited ? pbrpc__now_ns() : *now_io;
		bool expired = x->deadline && now >= x->deadline;
		if (k) {
			if (expired) {
				call_fail(x, PBRPC_STATUS_DEADLINE_EXCEEDED, -ETIMEDOUT,
					  "deadline exceeded waiting for a call slot (the server allows %u in flight)",
					  (unsigned)k->max_calls);
				return NULL;
			}
			if (!k->reading) {
				/* Nobody reads the replies that would free a slot. */
				k->refs++;
				reader_enter(k);
				reader_step(c, k, NULL, x->deadline, 0);
				reader_leave(c, k);
				conn_unref(c, k);
				continue;
			}
			c->slot_waiters++;
			cond_wait_until(&c->cond, &c->mu, x->deadline);
			c->slot_waiters--;
			continue;
		}
		if (expired) {
			if (c->last_err)
				call_fail(x, PBRPC_STATUS_UNAVAILABLE, c->last_err, "%s", c->last_msg);
			else
				call_fail(x, PBRPC_STATUS_UNAVAILABLE, -ETIMEDOUT,
					  "no connection to %s before the deadline", c->ep_str);
			return NULL;
		}
		if (c->connecting) {
			cond_wait_until(&c->cond, &c->mu, x->deadline);
			continue;
		}
		if (now < c->next_attempt) {
			int64_t until = c->next_attempt;
			if (x->deadline && x->deadline < until)
				until = x->deadline;
			cond_wait_until(&c->cond, &c->mu, until);
			continue;
		}
		connect_locked(c, x->deadline);
	}
}

/* A connection for an asynchronous call: fails fast (UNAVAILABLE) while the
 * reconnect backoff runs, and with RESOURCE_EXHAUSTED when the server's
 * max_calls are all in flight. */
static conn *async_conn(pbrpc_client *c, call *x, int64_t *now_io)
{
	for (;;) {
		if (c->closing) {
			call_fail(x, PBRPC_STATUS_CANCELLED, PBRPC_ECLOSED, "client is shutting down");
			return NULL;
		}
		conn *k = c->cur;
		if (k) {
			if (k->max_calls && k->inflight >= k->max_calls) {
				call_fail(x, PBRPC_STATUS_RESOURCE_EXHAUSTED, PBRPC_EQUEUEFULL,
					  "too many calls in flight: the server accepts at most %u", (unsigned)k->max_calls);
				return NULL;
			}
			return k;
		}
		if (c->connecting) {
			cond_wait_until(&c->cond, &c->mu, x->deadline);
			*now_io = pbrpc__now_ns();
			if (x->deadline && *now_io >= x->deadline) {
				call_fail(x, PBRPC_STATUS_DEADLINE_EXCEEDED, -ETIMEDOUT, "deadline exceeded while connecting");
				return NULL;
			}
			continue;
		}
		int64_t now = *now_io;
		if (now < c->next_attempt) {
			call_fail(x, PBRPC_STATUS_UNAVAILABLE, c->last_err ? c->last_err : -ENOTCONN,
				  "not connected (%s); next attempt in %lld ms", c->last_msg[0] ? c->last_msg : "no connection",
				  (long long)((c->next_attempt - now + NS_PER_MS - 1) / NS_PER_MS));
			return NULL;
		}
		int rc = connect_locked(c, x->deadline);
		*now_io = pbrpc__now_ns();
		if (rc < 0) {
			call_fail(x, PBRPC_STATUS_UNAVAILABLE, c->last_err, "%s", c->last_msg);
			return NULL;
		}
	}
}

/* ---- large buffers ---- */

/* Gives back the large buffers nobody is using (locked): decoders of
 * connections no thread reads, empty writers, pooled arenas, free call
 * records. One still in use is looked at again BIG_IDLE_NS later. */
static void release_big(pbrpc_client *c)
{
	bool left = false;
	for (conn *k = c->conns; k; k = k->next) {
		if (k->dead)
			continue;
		if (k->dec.cap > BIG_FRAME) {
			if (!k->reading && dec_pending(&k->dec) == 0)
				pbrpc_frame_decoder_release(&k->dec);
			else
				left = true;
		}
		pbrpc_frame_writer_trim(&k->w, WRITER_SMALL);
		if (k->w.cap > WRITER_SMALL)
			left = true;
	}
	for (arena *a = c->arenas; a; a = a->next)
		arena_shrink(a);
	for (call *x = c->free_calls; x; x = x->next) {
		if (x->cap > CALL_BUF_SMALL) {
			free(x->buf);
			x->buf = NULL;
			x->cap = 0;
		}
	}
	c->big_at = left ? c->now : 0;
}

/* At the start of a call or a process() round (locked): `now` is the clock. */
static inline void big_check(pbrpc_client *c, int64_t now)
{
	c->now = now;
	if (c->big_at && now - c->big_at >= BIG_IDLE_NS)
		release_big(c);
}

/* ---- sending ---- */

typedef struct call_args {
	const char *method;
	size_t method_len;
	const ProtobufCMessage *msg; /* packed in place, or */
	const uint8_t *raw;          /* already packed bytes */
	size_t raw_len;
	const pbrpc_metadata *md;
	size_t md_count;
	int64_t deadline;
	int64_t start;       /* clock when the call was made */
	bool method_checked; /* the name came from a checked service */
} call_args;

static int64_t call_deadline(const pbrpc_client *c, const pbrpc_call_opts *o, int64_t now)
{
	if (o && o->deadline_ns)
		return o->deadline_ns;
	int ms = o && o->timeout_ms ? o->timeout_ms : c->call_timeout_ms;
	if (ms < 0)
		return 0;
	return now + (int64_t)ms * NS_PER_MS;
}

static void args_init(call_args *a, const pbrpc_client *c, const char *method, size_t method_len,
		      const pbrpc_call_opts *o)
{
	memset(a, 0, sizeof(*a));
	a->method = method;
	a->method_len = method_len;
	if (o) {
		a->md = o->metadata;
		a->md_count = o->metadata ? o->metadata_count : 0;
	}
	a->start = pbrpc__now_ns();
	a->deadline = call_deadline(c, o, a->start);
}

static size_t request_size(const pbrpc_wire_request *req, const ProtobufCMessage *msg)
{
	size_t n = 2 + req->method_len + (req->has_timeout ? 8 : 0);
	if (req->metadata_count) {
		n += 2;
		for (size_t i = 0; i < req->metadata_count; i++) {
			const pbrpc_metadata *m = &req->metadata[i];
			n += 1 + (m->key_len ? m->key_len : strlen(m->key)) + 2 + m->value_len;
		}
	}
	return n + (msg ? protobuf_c_message_get_packed_size(msg) : req->body_len);
}

/* Encodes x's REQUEST into k's writer, reserves its id and sends without
 * blocking. `now` is a recent clock reading. Returns 0 (x is in flight, or
 * already failed with the connection) or a negative code with x's status set
 * (nothing was sent). */
static int send_request(pbrpc_client *c, conn *k, call *x, const call_args *a, int64_t now)
{
	/* Field by field: an initializer that zeroes the rest compiles to
	 * `rep stos`, slow to start for a hundred bytes. */
	pbrpc_wire_request req;
	req.call_id = 0;
	req.method = a->method;
	req.method_len = a->method_len;
	req.has_timeout = false;
	req.timeout_us = 0;
	req.metadata = a->md;
	req.metadata_count = a->md_count;
	req.metadata_raw = NULL;
	req.metadata_raw_len = 0;
	req.body = a->raw;
	req.body_len = a->raw_len;
	req.method_checked = a->method_checked;
	if (x->deadline) {
		int64_t left = x->deadline - now;
		if (left <= 0) {
			call_fail(x, PBRPC_STATUS_DEADLINE_EXCEEDED, -ETIMEDOUT, "deadline exceeded before the call was sent");
			return -ETIMEDOUT;
		}
		req.has_timeout = true;
		req.timeout_us = (uint64_t)left / 1000;
	}
	if (table_reserve(c) < 0) {
		call_fail(x, PBRPC_STATUS_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	x->id = alloc_id(c);
	req.call_id = x->id;
	int rc = pbrpc_wire_write_request(&k->w, &req, a->msg, k->max_frame);
	if (rc < 0) {
		if (rc == PBRPC_ETOOBIG)
			call_fail(x, PBRPC_STATUS_RESOURCE_EXHAUSTED, rc, "request is %zu bytes, server accepts at most %u",
				  request_size(&req, a->msg), (unsigned)k->max_frame);
		else if (rc == PBRPC_EINVALID)
			call_fail(x, PBRPC_STATUS_INVALID_ARGUMENT, rc, "invalid method name \"%.*s\" or metadata",
				  (int)(a->method_len > 200 ? 200 : a->method_len), a->method);
		else
			call_fail(x, PBRPC_STATUS_RESOURCE_EXHAUSTED, rc, "cannot encode the request: %s",
				  pbrpc_strerror(rc));
		x->id = 0;
		return rc;
	}
	table_put(c->table, c->table_mask, x);
	c->table_count++;
	x->refs |= REF_TABLE;
	x->conn = k;
	x->cnext = k->calls;
	if (k->calls)
		k->calls->cprev = x;
	k->calls = x;
	k->inflight++;
	if (x->kind == CALL_ASYNC)
		k->async_inflight++;
	/* A failed flush wrote none of the queued bytes, so the server never saw
	 * this request: a synchronous call may try again on a new connection. */
	if (conn_flush(c, k) < 0 && x->done && x->kind == CALL_SYNC)
		x->retry = !x->retried;
	return 0;
}

/* Releases what a finished synchronous call holds (locked). */
static void sync_release(pbrpc_client *c, call *x)
{
	if (x->in_decoder) {
		x->in_decoder = false;
		reader_leave(c, x->rconn);
		x->rconn = NULL;
	}
	call_release(c, x);
}

/* Runs a synchronous call. Returns with the mutex held and x done, or NULL
 * (out of memory). A call the server cannot have run (answered UNAVAILABLE by
 * a draining server, or its REQUEST could not be written) is retried once on
 * a new connection. */
static call *sync_call(pbrpc_client *c, const call_args *a)
{
	/* `now` serves the deadline checks and the first recv timeout until the
	 * call waits for something: the clock is read again only after waiting
	 * (for the mutex too, so the timeout stays within a few microseconds). */
	int64_t now = a->start;
	if (pthread_mutex_trylock(&c->mu) != 0) {
		pthread_mutex_lock(&c->mu);
		now = pbrpc__now_ns();
	}
	big_check(c, now);
	for (int attempt = 0;; attempt++) {
		call *x = call_get(c, CALL_SYNC);
		if (!x)
			return NULL;
		x->deadline = a->deadline;
		x->retried = attempt > 0;
		if (attempt > 0)
			now = pbrpc__now_ns();
		if (a->deadline && now >= a->deadline) {
			/* Already expired: fail without sending a byte. */
			call_fail(x, PBRPC_STATUS_DEADLINE_EXCEEDED, -ETIMEDOUT, "deadline exceeded before the call was sent");
			return x;
		}
		conn *k = sync_conn(c, x, &now);
		if (!k || send_request(c, k, x, a, now) < 0)
			return x;
		if (!x->done) /* else the connection failed while sending */
			sync_wait(c, x, now);
		if (!x->retry || attempt > 0)
			return x;
		sync_release(c, x);
	}
}

/* Unpacks a reply; on failure sets this thread's status. */
static const ProtobufCMessage *unpack_reply(const ProtobufCMessageDescriptor *d, arena *a, const uint8_t *body,
					    size_t len)
{
	ProtobufCMessage *m = protobuf_c_message_unpack(d, a ? &a->pa : NULL, len, body);
	if (!m) {
		if (a && a->failed)
			set_statusf(PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory unpacking a %s", d->name);
		else
			set_statusf(PBRPC_STATUS_INTERNAL, "reply is not a valid %s", d->name);
	}
	return m;
}

static void reply_free(const ProtobufCMessage *m, arena *a)
{
	if (a)
		arena_reset(a);
	else if (m)
		protobuf_c_message_free_unpacked((ProtobufCMessage *)m, NULL);
}

static arena *arena_get(pbrpc_client *c)
{
	arena *a = c->arenas;
	if (a) {
		c->arenas = a->next;
		c->idle_arenas--;
		return a;
	}
	return arena_new(ARENA_KEEP_MAX);
}

static void arena_put(pbrpc_client *c, arena *a)
{
	if (!a)
		return;
	if (c->idle_arenas >= IDLE_ARENAS_MAX) {
		arena_destroy(a);
		return;
	}
	if (a->cap > ARENA_SMALL)
		big_touch(c);
	a->next = c->arenas;
	c->arenas = a;
	c->idle_arenas++;
}

/* ---- process ---- */

/* Runs the queued async closures (locked on entry and exit; unlocked while
 * they run). Returns how many ran. */
static int run_done(pbrpc_client *c)
{
	call *list = c->done_head;
	if (!list)
		return 0;
	c->done_head = c->done_tail = NULL;
	arena *a = arena_get(c);
	pthread_mutex_unlock(&c->mu);

	pbrpc_client *outer = th.in_process;
	th.in_process = NULL; /* calls made by closures must signal pollers */
	int n = 0;
	for (call *x = list; x; x = x->next) {
		const ProtobufCMessage *reply = NULL;
		if (x->status == PBRPC_STATUS_OK && x->out_desc) {
			reply = unpack_reply(x->out_desc, a, x->body, x->body_len);
			if (reply)
				set_status(x->status, x->msg, x->msg_len);
		} else {
			set_status(x->status, x->msg, x->msg_len);
		}
		x->closure(reply, x->closure_data);
		reply_free(reply, a);
		n++;
	}
	th.in_process = outer;

	pthread_mutex_lock(&c->mu);
	for (call *x = list, *next; x; x = next) {
		next = x->next;
		c->async_pending--;
		call_release(c, x);
	}
	arena_put(c, a);
	return n;
}

static void expire_timers(pbrpc_client *c)
{
	int64_t now = pbrpc__now_ns();
	big_check(c, now);
	while (c->timers_head && c->timers_head->deadline <= now)
		abandon(c, c->timers_head, PBRPC_STATUS_DEADLINE_EXCEEDED, -ETIMEDOUT, "deadline exceeded");
}

static int process_run(pbrpc_client *c, int timeout_ms, bool forever)
{
	int64_t deadline = timeout_ms > 0 ? pbrpc__now_ns() + (int64_t)timeout_ms * NS_PER_MS : 0;
	int ran = 0;
	pbrpc_client *outer = th.in_process;
	th.in_process = c;
	pthread_mutex_lock(&c->mu);
	watch_enable(c);
	for (;;) {
		if (c->efd_signaled) {
			uint64_t v;
			ssize_t r = read(c->efd, &v, sizeof(v));
			(void)r; /* EAGAIN: already drained */
			c->efd_signaled = false;
		}
		expire_timers(c);
		/* Watch the sockets unless each is being read by a synchronous caller
		 * (then only its hand-over, through the eventfd, matters). */
		bool watch = false;
		for (conn *k = c->conns, *next; k; k = next) {
			next = k->next;
			if (k->dead)
				continue;
			k->refs++;
			conn_flush(c, k);
			if (!k->dead && !k->reading) {
				reader_enter(k);
				read_nb(c, k, READ_BUDGET);
				reader_leave(c, k);
				watch = true;
			}
			if (!k->dead && w_pending(&k->w))
				watch = true;
			conn_unref(c, k);
		}
		ran += run_done(c);
		if (forever) {
			if (c->stopping)
				break;
		} else if (ran > 0 || timeout_ms == 0 || (timeout_ms < 0 && c->async_pending == 0) ||
			   (deadline && pbrpc__now_ns() >= deadline)) {
			break;
		}
		int64_t wake = deadline;
		if (c->timers_head && (!wake || c->timers_head->deadline < wake))
			wake = c->timers_head->deadline;
		if (c->big_at && (!wake || c->big_at + BIG_IDLE_NS < wake))
			wake = c->big_at + BIG_IDLE_NS; /* to give large buffers back */
		int ms = ms_until(wake);
		if (!watch)
			c->proc_efd_only++;
		pthread_mutex_unlock(&c->mu);
		if (watch) {
			struct epoll_event ev[8];
			epoll_wait(c->epfd, ev, 8, ms);
		} else {
			struct pollfd p = { .fd = c->efd, .events = POLLIN };
			poll(&p, 1, ms);
		}
		pthread_mutex_lock(&c->mu);
		if (!watch)
			c->proc_efd_only--;
	}
	pthread_mutex_unlock(&c->mu);
	th.in_process = outer;
	return ran;
}

static void *io_main(void *arg)
{
	process_run(arg, -1, true);
	return NULL;
}

/* ---- stubs ---- */

/* Runs a closure and then restores this thread's status and message (set by
 * the call whose reply it gets) if the closure changed them. Out of line: the
 * copy needs a message-sized buffer, and a successful call has no message. */
__attribute__((noinline)) static void closure_keep_status(ProtobufCClosure closure, const ProtobufCMessage *reply,
							  void *closure_data)
{
	int st = th.status;
	unsigned gen = th.gen;
	size_t saved_len = th.msg_len;
	char saved[PBRPC_WIRE_MESSAGE_MAX + 1];
	memcpy(saved, tc.msg, saved_len);

	closure(reply, closure_data);

	if (th.gen != gen)
		set_status(st, saved, saved_len);
}

static void sync_invoke(svc *s, unsigned idx, const ProtobufCMessage *input, ProtobufCClosure closure,
			void *closure_data)
{
	pbrpc_client *c = s->c;
	const ProtobufCMessageDescriptor *out = s->base.descriptor->methods[idx].output;
	pbrpc_call_opts o;
	call_args a;
	args_init(&a, c, s->m[idx].s, s->m[idx].len, take_opts(&o));
	a.method_checked = s->m[idx].valid;
	a.msg = input;

	call *x = sync_call(c, &a);
	if (!x) {
		pthread_mutex_unlock(&c->mu);
		th.last_call = 0;
		set_statusf(PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		closure(NULL, closure_data);
		set_statusf(PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		return;
	}
	th.last_call = x->id;
	const ProtobufCMessage *reply = NULL;
	arena *ar = NULL;
	bool pooled = false;
	if (x->status == PBRPC_STATUS_OK) {
		ar = thread_arena_take(a.start);
		if (!ar) {
			ar = arena_get(c);
			pooled = true;
		}
		/* A small reply is unpacked under the lock we hold anyway; a big one
		 * without it (the call record, or the reader role for bytes still in
		 * the decoder, keeps them in place). */
		if (x->body_len > UNPACK_LOCKED_MAX) {
			pthread_mutex_unlock(&c->mu);
			reply = unpack_reply(out, ar, x->body, x->body_len);
			pthread_mutex_lock(&c->mu);
		} else {
			reply = unpack_reply(out, ar, x->body, x->body_len);
		}
		if (reply)
			set_status(x->status, x->msg, x->msg_len);
	} else {
		set_status(x->status, x->msg, x->msg_len);
	}
	sync_release(c, x);
	pthread_mutex_unlock(&c->mu);

	/* Keep this call's status for after the closure, which may make calls:
	 * the status and, in the rare case there is one, the message. */
	if (__builtin_expect(th.msg_len != 0, 0)) {
		closure_keep_status(closure, reply, closure_data);
	} else {
		int st = th.status;
		unsigned gen = th.gen;
		closure(reply, closure_data);
		if (th.gen != gen)
			set_status(st, NULL, 0);
	}
	if (ar && pooled) {
		arena_reset(ar);
		pthread_mutex_lock(&c->mu);
		arena_put(c, ar);
		pthread_mutex_unlock(&c->mu);
	} else if (ar) {
		thread_arena_give(ar, a.start);
	} else if (reply) {
		protobuf_c_message_free_unpacked((ProtobufCMessage *)reply, NULL);
	}
}

/* Out of line so that svc_invoke stays a check and a jump on the sync path. */
__attribute__((noinline)) static void async_invoke(svc *s, unsigned idx, const ProtobufCMessage *input,
						   ProtobufCClosure closure, void *closure_data)
{
	pbrpc_client *c = s->c;
	pbrpc_call_opts o;
	call_args a;
	args_init(&a, c, s->m[idx].s, s->m[idx].len, take_opts(&o));
	a.method_checked = s->m[idx].valid;
	a.msg = input;
	th.last_call = 0;

	pthread_mutex_lock(&c->mu);
	big_check(c, a.start);
	call *x = call_get(c, CALL_ASYNC);
	if (!x) {
		pthread_mutex_unlock(&c->mu);
		set_statusf(PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		closure(NULL, closure_data);
		return;
	}
	x->out_desc = s->base.descriptor->methods[idx].output;
	x->closure = closure;
	x->closure_data = closure_data;
	x->deadline = a.deadline;
	c->async_pending++;

	conn *k = NULL;
	int rc = -1;
	int64_t now = a.start;
	if (a.deadline && now >= a.deadline)
		call_fail(x, PBRPC_STATUS_DEADLINE_EXCEEDED, -ETIMEDOUT, "deadline exceeded before the call was sent");
	else if ((k = async_conn(c, x, &now)) != NULL)
		rc = send_request(c, k, x, &a, now);
	if (rc < 0)
		call_finish(c, x);
	else if (!x->done && x->deadline)
		timer_add(c, x);
	th.last_call = x->id;
	pthread_mutex_unlock(&c->mu);
}

static void svc_invoke(ProtobufCService *service, unsigned idx, const ProtobufCMessage *input,
		       ProtobufCClosure closure, void *closure_data)
{
	svc *s = (svc *)service;
	if (idx >= s->base.descriptor->n_methods || !input) {
		set_statusf(PBRPC_STATUS_INVALID_ARGUMENT, "no method %u in %s", idx, s->base.descriptor->name);
		if (closure)
			closure(NULL, closure_data);
		return;
	}
	if (s->async)
		async_invoke(s, idx, input, closure, closure_data);
	else
		sync_invoke(s, idx, input, closure, closure_data);
}

static void svc_destroy(ProtobufCService *service)
{
	(void)service; /* owned by the client, freed with it */
}

static ProtobufCService *service_get(pbrpc_client *c, const ProtobufCServiceDescriptor *desc, bool async)
{
	if (!c || !desc || !desc->name)
		return NULL;
	pthread_mutex_lock(&c->mu);
	for (svc *s = c->services; s; s = s->next) {
		if (s->base.descriptor == desc && s->async == async) {
			pthread_mutex_unlock(&c->mu);
			return &s->base;
		}
	}
	size_t nl = strlen(desc->name), size = sizeof(svc) + desc->n_methods * sizeof(method_name);
	for (unsigned i = 0; i < desc->n_methods; i++)
		size += nl + 1 + strlen(desc->methods[i].name) + 1;
	svc *s = calloc(1, size);
	if (!s) {
		pthread_mutex_unlock(&c->mu);
		return NULL;
	}
	char *p = (char *)&s->m[desc->n_methods];
	for (unsigned i = 0; i < desc->n_methods; i++) {
		int n = sprintf(p, "%s/%s", desc->name, desc->methods[i].name);
		s->m[i].s = p;
		s->m[i].len = (size_t)n;
		s->m[i].valid = pbrpc_wire_method_valid(p, (size_t)n);
		p += n + 1;
	}
	s->base.descriptor = desc;
	s->base.invoke = svc_invoke;
	s->base.destroy = svc_destroy;
	s->c = c;
	s->async = async;
	s->next = c->services;
	c->services = s;
	if (async)
		watch_enable(c);
	pthread_mutex_unlock(&c->mu);
	return &s->base;
}

/* ---- public API ---- */

static void client_teardown(pbrpc_client *c)
{
	while (c->conns) {
		conn *k = c->conns;
		if (k->in_epoll)
			epoll_ctl(c->epfd, EPOLL_CTL_DEL, k->fd, NULL);
		conn_destroy(c, k);
	}
	while (c->slabs) {
		call_slab *s = c->slabs;
		c->slabs = s->next;
		for (int i = 0; i < CALL_SLAB_SIZE; i++) {
			pthread_cond_destroy(&s->calls[i].cond);
			free(s->calls[i].buf);
		}
		free(s);
	}
	while (c->arenas) {
		arena *a = c->arenas;
		c->arenas = a->next;
		arena_destroy(a);
	}
	while (c->services) {
		svc *s = c->services;
		c->services = s->next;
		free(s);
	}
	free(c->table);
	if (c->efd >= 0)
		close(c->efd);
	if (c->epfd >= 0)
		close(c->epfd);
	pthread_cond_destroy(&c->cond);
	pthread_condattr_destroy(&c->cattr);
	pthread_mutex_destroy(&c->mu);
	free(c);
}

PBRPC_EXPORT int pbrpc_client_connect(pbrpc_client **out, const char *endpoint, const pbrpc_client_opts *opts)
{
	if (!out)
		return PBRPC_EINVALID;
	*out = NULL;
	pbrpc_client_opts o = { 0 };
	if (opts)
		o = *opts;
	pbrpc_client *c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->epfd = c->efd = -1;
	pthread_mutex_init(&c->mu, NULL);
	pthread_condattr_init(&c->cattr);
	pthread_condattr_setclock(&c->cattr, CLOCK_MONOTONIC);
	pthread_cond_init(&c->cond, &c->cattr);

	int rc = pbrpc_endpoint_parse(endpoint, &c->ep);
	if (rc < 0)
		goto err_client;
	snprintf(c->ep_str, sizeof(c->ep_str), "%s", endpoint);
	c->max_frame = o.max_frame ? o.max_frame : PBRPC_FRAME_MAX_DEFAULT;
	if (c->max_frame > PBRPC_FRAME_MAX_LIMIT)
		c->max_frame = PBRPC_FRAME_MAX_LIMIT;
	c->connect_timeout_ms = o.connect_timeout_ms ? o.connect_timeout_ms : DEFAULT_CONNECT_TIMEOUT_MS;
	c->call_timeout_ms = o.call_timeout_ms ? o.call_timeout_ms : DEFAULT_CALL_TIMEOUT_MS;
	c->backoff_min_ms = o.backoff_min_ms > 0 ? o.backoff_min_ms : DEFAULT_BACKOFF_MIN_MS;
	c->backoff_max_ms = o.backoff_max_ms > 0 ? o.backoff_max_ms : DEFAULT_BACKOFF_MAX_MS;
	if (c->backoff_max_ms < c->backoff_min_ms)
		c->backoff_max_ms = c->backoff_min_ms;
	c->backoff_ms = c->backoff_min_ms;
	c->now = pbrpc__now_ns();
	c->next_id = 1;
	c->rng = (uint64_t)pbrpc__now_ns() ^ ((uint64_t)(uintptr_t)c << 16) ^ 0x9e3779b97f4a7c15ull;
	if (!c->rng)
		c->rng = 1;

	c->table = calloc(TABLE_MIN, sizeof(*c->table));
	if (!c->table) {
		rc = -ENOMEM;
		goto err_client;
	}
	c->table_mask = TABLE_MIN - 1;
	c->epfd = epoll_create1(EPOLL_CLOEXEC);
	c->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (c->epfd < 0 || c->efd < 0) {
		rc = -errno;
		goto err_client;
	}
	struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL };
	if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, c->efd, &ev) < 0) {
		rc = -errno;
		goto err_client;
	}
	c->watching = o.io_thread;
	if (!o.lazy) {
		pthread_mutex_lock(&c->mu);
		rc = connect_locked(c, 0);
		pthread_mutex_unlock(&c->mu);
		if (rc < 0)
			goto err_client;
	}
	if (o.io_thread) {
		rc = -pthread_create(&c->io, NULL, io_main, c);
		if (rc < 0)
			goto err_client;
		c->io_started = true;
	}
	*out = c;
	return 0;

err_client:
	client_teardown(c);
	return rc;
}

PBRPC_EXPORT void pbrpc_client_free(pbrpc_client *c)
{
	if (!c)
		return;
	pthread_mutex_lock(&c->mu);
	c->stopping = true;
	efd_signal(c);
	pthread_mutex_unlock(&c->mu);
	if (c->io_started)
		pthread_join(c->io, NULL);

	pbrpc_client *outer = th.in_process;
	th.in_process = c;
	pthread_mutex_lock(&c->mu);
	c->closing = true;
	for (conn *k = c->conns, *next; k; k = next) {
		next = k->next;
		conn_fail(c, k, PBRPC_STATUS_CANCELLED, PBRPC_ECLOSED, "client closed");
	}
	while (c->done_head)
		run_done(c);
	pthread_mutex_unlock(&c->mu);
	th.in_process = outer;
	client_teardown(c);
}

PBRPC_EXPORT ProtobufCService *pbrpc_client_service(pbrpc_client *c, const ProtobufCServiceDescriptor *desc)
{
	return service_get(c, desc, false);
}

PBRPC_EXPORT ProtobufCService *pbrpc_client_service_async(pbrpc_client *c, const ProtobufCServiceDescriptor *desc)
{
	return service_get(c, desc, true);
}

PBRPC_EXPORT void pbrpc_client_next_call(const pbrpc_call_opts *opts)
{
	th.has_next = opts != NULL;
	if (opts)
		tc.next = *opts;
}

PBRPC_EXPORT int pbrpc_client_status(const char **message)
{
	if (message)
		*message = status_msg();
	return th.status;
}

PBRPC_EXPORT uint32_t pbrpc_client_last_call(void)
{
	return th.last_call;
}

PBRPC_EXPORT int pbrpc_client_cancel(pbrpc_client *c, uint32_t call_id)
{
	if (!c || call_id == 0)
		return PBRPC_EINVALID;
	pthread_mutex_lock(&c->mu);
	call *x = table_find(c, call_id);
	if (!x || x->kind != CALL_ASYNC || x->abandoned) {
		pthread_mutex_unlock(&c->mu);
		return PBRPC_EINVALID;
	}
	abandon(c, x, PBRPC_STATUS_CANCELLED, PBRPC_ECLOSED, "call cancelled by the client");
	pthread_mutex_unlock(&c->mu);
	return 0;
}

PBRPC_EXPORT int pbrpc_client_fd(pbrpc_client *c)
{
	if (!c)
		return PBRPC_EINVALID;
	pthread_mutex_lock(&c->mu);
	watch_enable(c);
	pthread_mutex_unlock(&c->mu);
	return c->epfd;
}

PBRPC_EXPORT int pbrpc_client_process(pbrpc_client *c, int timeout_ms)
{
	if (!c)
		return PBRPC_EINVALID;
	return process_run(c, timeout_ms, false);
}

PBRPC_EXPORT size_t pbrpc_client_pending(pbrpc_client *c)
{
	if (!c)
		return 0;
	pthread_mutex_lock(&c->mu);
	size_t n = c->async_pending;
	pthread_mutex_unlock(&c->mu);
	return n;
}

PBRPC_EXPORT int pbrpc_client_drain(pbrpc_client *c, int timeout_ms)
{
	int64_t deadline = timeout_ms >= 0 ? pbrpc__now_ns() + (int64_t)timeout_ms * NS_PER_MS : 0;
	for (;;) {
		if (pbrpc_client_pending(c) == 0)
			return 0;
		int ms = -1;
		if (deadline) {
			ms = ms_until(deadline);
			if (ms == 0 && timeout_ms != 0)
				return -ETIMEDOUT;
		}
		int r = process_run(c, ms, false);
		if (r < 0)
			return r;
		if (timeout_ms == 0)
			return pbrpc_client_pending(c) ? -ETIMEDOUT : 0;
	}
}

static void result_fill(pbrpc_call_result *res, int status, const char *msg)
{
	if (!res)
		return;
	res->status = status;
	size_t n = msg ? strnlen(msg, sizeof(res->message) - 1) : 0;
	if (n)
		memcpy(res->message, msg, n);
	res->message[n] = '\0';
}

/* Return code of a finished explicit call. */
static int call_rc(const call *x)
{
	if (x->err)
		return x->err;
	return x->status == PBRPC_STATUS_OK ? 0 : PBRPC_ESTATUS;
}

/* Shared start of pbrpc_client_call and _call_raw: runs the synchronous call
 * and sets this thread's status from it. Returns the finished call with c->mu
 * held (finish with explicit_end), or NULL with *rc and *result set. */
static call *explicit_begin(pbrpc_client *c, call_args *a, pbrpc_call_result *result, int *rc)
{
	call *x = sync_call(c, a);
	if (!x) {
		pthread_mutex_unlock(&c->mu);
		set_statusf(PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		result_fill(result, th.status, status_msg());
		*rc = -ENOMEM;
		return NULL;
	}
	th.last_call = x->id;
	*rc = call_rc(x);
	set_status(x->status, x->msg, x->msg_len);
	return x;
}

static int explicit_end(pbrpc_client *c, call *x, pbrpc_call_result *result, int rc)
{
	sync_release(c, x);
	pthread_mutex_unlock(&c->mu);
	result_fill(result, th.status, status_msg());
	return rc;
}

static int explicit_bad_args(pbrpc_call_result *result)
{
	set_statusf(PBRPC_STATUS_INVALID_ARGUMENT, "missing client, method or request");
	result_fill(result, th.status, status_msg());
	return PBRPC_EINVALID;
}

PBRPC_EXPORT int pbrpc_client_call(pbrpc_client *c, const char *method, const ProtobufCMessage *request,
				   const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **reply,
				   const pbrpc_call_opts *opts, pbrpc_call_result *result)
{
	if (reply)
		*reply = NULL;
	if (!c || !method || !request)
		return explicit_bad_args(result);
	call_args a;
	args_init(&a, c, method, strlen(method), opts);
	a.msg = request;
	int rc;
	call *x = explicit_begin(c, &a, result, &rc);
	if (!x)
		return rc;
	if (rc == 0 && reply_desc && reply) {
		pthread_mutex_unlock(&c->mu);
		*reply = protobuf_c_message_unpack(reply_desc, NULL, x->body_len, x->body);
		pthread_mutex_lock(&c->mu);
		if (!*reply) {
			set_statusf(PBRPC_STATUS_INTERNAL, "reply is not a valid %s", reply_desc->name);
			rc = PBRPC_EDECODE;
		}
	}
	return explicit_end(c, x, result, rc);
}

PBRPC_EXPORT int pbrpc_client_call_raw(pbrpc_client *c, const char *method, const void *request,
				       size_t request_len, uint8_t **reply, size_t *reply_len,
				       const pbrpc_call_opts *opts, pbrpc_call_result *result)
{
	if (reply)
		*reply = NULL;
	if (reply_len)
		*reply_len = 0;
	if (!c || !method || (!request && request_len))
		return explicit_bad_args(result);
	call_args a;
	args_init(&a, c, method, strlen(method), opts);
	a.raw = request;
	a.raw_len = request_len;
	int rc;
	call *x = explicit_begin(c, &a, result, &rc);
	if (!x)
		return rc;
	if (rc == 0 && reply) {
		uint8_t *p = malloc(x->body_len ? x->body_len : 1);
		if (p) {
			if (x->body_len)
				memcpy(p, x->body, x->body_len);
			*reply = p;
			if (reply_len)
				*reply_len = x->body_len;
		} else {
			set_statusf(PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory copying a %zu-byte reply", x->body_len);
			rc = -ENOMEM;
		}
	}
	return explicit_end(c, x, result, rc);
}

PBRPC_EXPORT void pbrpc_client_server_hello(pbrpc_client *c, pbrpc_wire_hello *out)
{
	if (!c) {
		memset(out, 0, sizeof(*out));
		return;
	}
	pthread_mutex_lock(&c->mu);
	*out = c->hello;
	pthread_mutex_unlock(&c->mu);
}
