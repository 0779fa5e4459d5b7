/* The client's private objects, shared by the files of lib/client/:
 *   client.c   construction, services and stubs, explicit calls, call records
 *   channel.c  connections: dial and handshake through conn, reconnect and
 *              backoff, the reader role, closing, large-buffer release
 *   sync.c     the synchronous path and the per-thread state
 *   async.c    asynchronous calls, deadlines, completions, process()
 *
 * Threads. One mutex guards the client. Per connection, one thread at a time
 * is the reader: it owns the decoder and reads the socket without holding the
 * mutex (a blocking recv for a synchronous caller, MSG_DONTWAIT from
 * pbrpc_client_process), then dispatches frames under the mutex. Other
 * synchronous callers wait on their call's condvar: the reader copies their
 * reply into the call record and wakes them, or, when it leaves, wakes one of
 * them to take over (leader/follower). A reader that finds its own reply
 * unpacks it straight from the decoder's buffer before giving up the role, so
 * an uncontended call costs one send and one recv and allocates nothing.
 *
 * Calls. Records come from slabs through a free list; call ids map to records
 * through each connection's id map (conn.h). A record has two owners: the id
 * (until the RESPONSE arrives or the connection is gone) and the caller (until
 * the synchronous stub returns or the async closure has run). A call given up
 * on (deadline, cancel) keeps its id reserved until the server answers it.
 *
 * Connections. A chan lives while a thread does I/O on it (refs) or it is
 * open; every path that may close one holds a reference, so on_close never
 * frees: chan_unref() does, for the last holder of a closed chan.
 */
#ifndef PBRPC_CLIENT_IMPL_H
#define PBRPC_CLIENT_IMPL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "conn/conn.h"
#include "conn/tls.h"
#include "pbrpc/client.h"
#include "pbrpc/endpoint.h"
#include "util/arena.h"
#include "util/clock.h"
#include "util/heap.h"
#include "util/list.h"

#define CL_DEFAULT_CONNECT_TIMEOUT_MS 5000
#define CL_DEFAULT_CALL_TIMEOUT_MS 30000
#define CL_DEFAULT_BACKOFF_MIN_MS 50
#define CL_DEFAULT_BACKOFF_MAX_MS 2000

/* Buffers: each is kept at the size of the largest recent message, so that a
 * busy connection allocates nothing per call, however large its messages.
 * Above the SMALL sizes below a buffer is "large": the client notes the time
 * (the start of the latest call, c->now) whenever it uses one, and gives
 * every large buffer back once none was used for CL_BIG_IDLE_NS: at the start
 * of the next call, or from pbrpc_client_process() (which wakes up for it).
 * The fast path pays one store and one compare per call. */
#define CL_ARENA_KEEP_MAX (32u << 20)   /* an arena keeps a buffer up to this size */
#define CL_ARENA_SMALL (256u << 10)     /* an arena buffer above this is large */
#define CL_UNPACK_LOCKED_MAX 1024u      /* replies up to this are unpacked under the lock */
#define CL_IDLE_ARENAS_MAX 4
#define CL_CALL_BUF_SMALL (64u << 10)   /* a call record's reply buffer above this is large */
#define CL_WRITER_SMALL (256u << 10)    /* the writer is trimmed to this when idle */
#define CL_BIG_FRAME (256u << 10)       /* a decoder that held a frame this big is large */
#define CL_BIG_IDLE_NS PBRPC__NS_PER_S  /* large buffers go after this long unused */
#define CL_CALL_SLAB_SIZE 64
#define CL_READ_BUDGET 16 /* non-blocking reads per connection per process() round */
#define CL_LOCAL_MSG_MAX 256
#define CL_MAX_ATTEMPTS 5            /* sends of a call the server did not run */
#define CL_RETRY_COPY_MAX (64u << 10) /* async requests up to this can be re-sent */
#define CL_PROBE_IDLE_NS PBRPC__NS_PER_S /* a connection unused this long is read before use */
#define CL_DEFER_MAX (64u << 10) /* async requests queued unsent up to this (pbrpc__cl_chan_flush_later) */
#define CL_BURST_NS (50 * 1000)  /* an async request this soon after the last one may wait for more */
extern int64_t pbrpc__cl_burst_ns; /* CL_BURST_NS; tests set it to make bursts certain, or none */

/* A pooled reply arena (util/arena.h) and when it last held a large buffer. */
typedef struct cl_arena {
	pbrpc__arena a;
	int64_t big_at;
	struct cl_arena *next;
} cl_arena;

/* ---- per-thread state ----
 * The fields every call touches sit in a small initial-exec block (a plain
 * %fs-relative access, no __tls_get_addr call); the status message buffer
 * and the next call's options are touched only when used. */
typedef struct cl_tls_hot {
	int status;
	unsigned gen; /* bumped by every status change */
	uint32_t msg_len;
	uint32_t last_call;
	bool has_next;
	bool arena_busy;
	pbrpc_client *in_process; /* the client whose process() runs on this thread */
	pbrpc_client *round;      /* the client whose process() runs closures on this thread */
	cl_arena *arena;          /* this thread's arena for synchronous replies */
	unsigned nrfds;           /* reply fds held for pbrpc_client_reply_fds (cold.rfds) */
} cl_tls_hot;

typedef struct cl_tls_cold {
	char msg[PBRPC_STATUS_MESSAGE_MAX + 1];
	pbrpc_call_opts next;
	unsigned rfds_at;         /* rfds[rfds_at, nrfds) are still to take */
	int rfds[PBRPC_FDS_MAX];
} cl_tls_cold;

extern _Thread_local cl_tls_hot pbrpc__cl_th __attribute__((tls_model("initial-exec")));
extern _Thread_local cl_tls_cold pbrpc__cl_tc;

/* ---- objects ---- */

enum { CALL_SYNC, CALL_ASYNC, CALL_STREAM /* stream.c: the id of a stream */ };
#define REF_TABLE 0x1u /* the id is reserved: no RESPONSE yet */
#define REF_OWNER 0x2u /* the caller (sync) or the pending closure (async) */

typedef struct chan chan;

typedef struct call {
	uint32_t id;
	uint8_t kind;
	uint8_t refs;
	bool done;       /* status is final */
	bool abandoned;  /* timed out or cancelled; a late RESPONSE is dropped */
	bool retry;      /* the server provably did not run it: may be sent again */
	uint8_t attempts; /* sends so far */
	bool in_decoder; /* reply bytes are in rconn's decoder; the caller is its reader */
	chan *conn;      /* while REF_TABLE */
	chan *rconn;     /* while in_decoder */
	pbrpc__list qlink; /* free list or done queue */
	pbrpc__list wlink; /* conn->waiters while waiting to read */
	int64_t deadline;  /* CLOCK_MONOTONIC ns; 0: none */
	int status;
	int err; /* local error code; 0 when the status came from the server */
	const char *msg;
	size_t msg_len;
	const uint8_t *body;
	size_t body_len;
	const ProtobufCMessageDescriptor *out_desc;
	ProtobufCClosure closure;
	void *closure_data;
	/* call_get() resets everything above; what follows is kept. */
	pbrpc__timer timer; /* async calls with a deadline, in c->timers */
	struct pbrpc_client_stream *stream; /* CALL_STREAM: its stream, NULL once freed */
	/* The reply's fds and its memfd body's mapping (PROTOCOL.md section
	 * 12): the call's until taken; pbrpc__cl_call_put closes and unmaps. */
	int *fds;
	unsigned nfds, fds_cap;
	const uint8_t *map;
	size_t map_len;
	uint8_t *buf;       /* reply copy: message, then body */
	size_t cap;
	/* An async call's encoded REQUEST payload, kept to re-send it (the
	 * caller may free its message once the stub returns). */
	uint8_t *req;
	size_t req_cap, req_len; /* req_len 0: no copy, not re-sendable */
	uint8_t req_flags;
	size_t req_timeout_at; /* offset of timeout_us in the payload, or SIZE_MAX */
	pthread_cond_t cond;
	char lmsg[CL_LOCAL_MSG_MAX];
} call;

typedef struct call_slab {
	struct call_slab *next;
	call calls[CL_CALL_SLAB_SIZE];
} call_slab;

struct chan {
	pbrpc__conn base;
	pbrpc_client *c;
	uint32_t async_inflight;
	int refs; /* threads doing I/O on it without the mutex */
	bool reading, pumping;
	bool in_epoll, epollout;
	bool deferred;        /* holds async output back for a flush point (c->deferred counts) */
	int64_t rcvtimeo;     /* cached SO_RCVTIMEO in ns; 0: none */
	pbrpc__list waiters;  /* sync callers that may become the reader */
	pbrpc__list link;     /* c->conns */
	int64_t used_at;      /* a REQUEST was last sent then (see CL_PROBE_IDLE_NS) */
	int close_err;        /* why it closed (the handshake reports it) */
	char close_msg[CL_LOCAL_MSG_MAX];
};

typedef struct method_name {
	const char *s;
	size_t len;
	bool valid; /* checked once here, not on every call */
	uint8_t stream; /* PBRPC_SCHEMA_* bits from pbrpc-gen's table, if any */
} method_name;

typedef struct svc {
	ProtobufCService base;
	pbrpc_client *c;
	bool async;
	const pbrpc_call_opts *bound; /* pbrpc_client_service_with: &bound_opts */
	pbrpc_call_opts bound_opts;   /* its metadata copied into this block */
	struct svc *next;
	method_name m[];
} svc;

/* The options of a call through s: those set for the next call on this
 * thread (consumed here, whatever happens to the call), else s's own. */
static inline const pbrpc_call_opts *pbrpc__cl_svc_opts(const svc *s, pbrpc_call_opts *buf);

struct pbrpc_client {
	pthread_mutex_t mu;
	pthread_cond_t cond; /* connection state changed, a call slot freed */
	pthread_condattr_t cattr;
	pbrpc_endpoint ep;
	char ep_str[PBRPC_ENDPOINT_STRLEN];
	pbrpc__tls_ctx *tls_ctx; /* tls: endpoints; NULL: plaintext */
	char tls_host[256];      /* the name verified (opts.tls.server_name or the host) */
	uint32_t max_frame;
	uint32_t stream_window; /* opts.stream_window, 0: the default */
	int connect_timeout_ms, call_timeout_ms, backoff_min_ms, backoff_max_ms;
	unsigned max_fds;       /* per reply */
	size_t memfd_threshold; /* request bodies above go in a sealed memfd */

	chan *cur;         /* takes new calls; NULL when disconnected or draining */
	pbrpc__list conns; /* every open connection */
	bool connecting, closing, stopping;
	int slot_waiters;
	int64_t next_attempt;
	int backoff_ms;
	int last_err;
	char last_msg[CL_LOCAL_MSG_MAX];
	uint64_t rng;
	pbrpc_hello hello;

	uint32_t next_id;
	bool ids_wrapped; /* next_id went past 2^32: an id may still be live */
	pbrpc__list free_calls;
	call_slab *slabs;
	cl_arena *arenas;
	unsigned idle_arenas;
	int64_t now;    /* start of the latest call (or process() round) */
	int64_t big_at; /* a large buffer was last used then; 0: none is held */

	pbrpc__list done;
	pbrpc__list streams; /* stream.c: every stream not yet freed */
	pbrpc__list stream_ready; /* stream.c: async streams with callbacks to run */
	pbrpc__list retry; /* async calls the server did not run, to send again */
	unsigned deferred; /* connections whose output waits for a flush point */
	size_t async_pending;
	pbrpc__heap timers;

	int epfd, efd;
	bool watching; /* sockets are in epfd: async calls or a poller exist */
	bool efd_signaled;
	int proc_efd_only; /* process() callers waiting on the eventfd alone */
	pthread_t io;
	bool io_started;
	svc *services;
};

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
	uint8_t stream_kind; /* REQUEST stream flags (stream.c); 0 for calls */
	const int *fds;      /* to send with it (borrowed: duplicates are sent) */
	size_t fd_count;
} call_args;

/* ---- small helpers ---- */

static inline bool chan_dead(const chan *k)
{
	return pbrpc__conn_closed(&k->base);
}

static inline uint32_t chan_inflight(const chan *k)
{
	return pbrpc__idmap_count(&k->base.calls);
}

/* Notes that a large buffer was just used (see CL_BIG_IDLE_NS). */
static inline void big_touch(pbrpc_client *c)
{
	c->big_at = c->now;
}

/* client.c: call records, ids, status */
__attribute__((noinline)) int pbrpc__cl_grow_calls(pbrpc_client *c);
void pbrpc__cl_call_put(pbrpc_client *c, call *x);
__attribute__((format(printf, 4, 5))) void pbrpc__cl_call_fail(call *x, int status, int err, const char *fmt, ...);
int pbrpc__cl_store_reply(call *x, const pbrpc__wire_response *r);
__attribute__((noinline)) uint32_t pbrpc__cl_alloc_id_slow(pbrpc_client *c);
/* Next call id: non-zero, wraps around 2^32, never one still reserved on
 * any of the client's connections (so that an id names one call). Until the
 * counter first wraps every id is new, so no connection needs a look. */
static inline uint32_t pbrpc__cl_alloc_id(pbrpc_client *c)
{
	if (__builtin_expect(!c->ids_wrapped && c->next_id != 0, 1))
		return c->next_id++;
	return pbrpc__cl_alloc_id_slow(c);
}
void pbrpc__cl_call_finish(pbrpc_client *c, call *x);
void pbrpc__cl_call_unlink(pbrpc_client *c, call *x);
void pbrpc__cl_set_status(int status, const char *msg, size_t len);
__attribute__((format(printf, 2, 3))) void pbrpc__cl_set_statusf(int status, const char *fmt, ...);
void pbrpc__cl_efd_signal(pbrpc_client *c);

/* ---- per-call arguments (inline: every call starts here) ---- */

static inline int64_t pbrpc__cl_call_deadline(const pbrpc_client *c, const pbrpc_call_opts *o, int64_t now)
{
	if (o && o->deadline_ns)
		return o->deadline_ns;
	int ms = o && o->timeout_ms ? o->timeout_ms : c->call_timeout_ms;
	return pbrpc__deadline_in(now, ms);
}

static inline void pbrpc__cl_args_init(call_args *a, const pbrpc_client *c, const char *method, size_t method_len,
				       const pbrpc_call_opts *o)
{
	memset(a, 0, sizeof(*a));
	a->method = method;
	a->method_len = method_len;
	if (o) {
		a->md = o->metadata;
		a->md_count = o->metadata ? o->metadata_count : 0;
		a->fds = o->fds;
		a->fd_count = o->fds ? o->fd_count : 0;
	}
	a->start = pbrpc__now_ns();
	a->deadline = pbrpc__cl_call_deadline(c, o, a->start);
}

static inline call *call_get(pbrpc_client *c, int kind)
{
	if (pbrpc__list_empty(&c->free_calls) && pbrpc__cl_grow_calls(c) < 0)
		return NULL;
	pbrpc__list *l = c->free_calls.next;
	pbrpc__list_remove(l);
	call *x = pbrpc__container_of(l, call, qlink);
	/* Everything above `timer`, in layout order so that the compiler merges
	 * the stores (a memset here becomes `rep stos`). */
	x->id = 0;
	x->kind = (uint8_t)kind;
	x->refs = REF_OWNER;
	x->done = x->abandoned = x->retry = x->in_decoder = false;
	x->attempts = 0;
	x->conn = x->rconn = NULL;
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
	x->req_len = 0;
	return x;
}

static inline void call_release(pbrpc_client *c, call *x)
{
	x->refs &= (uint8_t)~REF_OWNER;
	if (!x->refs)
		pbrpc__cl_call_put(c, x);
}

/* The options set by pbrpc_client_next_call(), copied to *buf, or NULL (the
 * common case: no copy, and the cold block is not touched). */
static inline const pbrpc_call_opts *pbrpc__cl_take_opts(pbrpc_call_opts *buf)
{
	if (__builtin_expect(!pbrpc__cl_th.has_next, 1))
		return NULL;
	*buf = pbrpc__cl_tc.next;
	pbrpc__cl_th.has_next = false;
	return buf;
}

static inline const pbrpc_call_opts *pbrpc__cl_svc_opts(const svc *s, pbrpc_call_opts *buf)
{
	const pbrpc_call_opts *o = pbrpc__cl_take_opts(buf);
	return o ? o : s->bound;
}

static inline const char *status_msg(void)
{
	return pbrpc__cl_th.msg_len ? pbrpc__cl_tc.msg : "";
}

/* channel.c */
void pbrpc__cl_chan_ref(chan *k);
void pbrpc__cl_chan_unref(pbrpc_client *c, chan *k);
void pbrpc__cl_chan_close(pbrpc_client *c, chan *k, int err, const char *msg);
void pbrpc__cl_chan_fail(pbrpc_client *c, chan *k, int status, int err, const char *msg);
void pbrpc__cl_reader_enter(chan *k);
void pbrpc__cl_reader_leave(pbrpc_client *c, chan *k);
int pbrpc__cl_chan_flush(pbrpc_client *c, chan *k);
int pbrpc__cl_chan_flush_later(pbrpc_client *c, chan *k, size_t before, bool burst);
void pbrpc__cl_flush_deferred(pbrpc_client *c);
void pbrpc__cl_watch_enable(pbrpc_client *c);
void pbrpc__cl_read_nb(pbrpc_client *c, chan *k, int budget);
void pbrpc__cl_read_failed(pbrpc_client *c, chan *k, int err);
int pbrpc__cl_connect_locked(pbrpc_client *c, int64_t deadline);
void pbrpc__cl_release_big(pbrpc_client *c);
bool pbrpc__cl_dispatch(pbrpc_client *c, chan *k, call *me);
bool pbrpc__cl_probe_idle(pbrpc_client *c, chan *k, int64_t now);

/* At the start of a call or a process() round (locked): `now` is the clock. */
static inline void big_check(pbrpc_client *c, int64_t now)
{
	c->now = now;
	if (c->big_at && now - c->big_at >= CL_BIG_IDLE_NS)
		pbrpc__cl_release_big(c);
}

/* sync.c: reply fds for pbrpc_client_reply_fds */
void pbrpc__cl_th_fds_set(call *x);
void pbrpc__cl_th_fds_drop(void);

/* sync.c */
call *pbrpc__cl_sync_call(pbrpc_client *c, const call_args *a);
void pbrpc__cl_sync_release(pbrpc_client *c, call *x);
void pbrpc__cl_sync_invoke(svc *s, unsigned idx, const ProtobufCMessage *input, ProtobufCClosure closure,
			   void *closure_data);
int pbrpc__cl_send_request(pbrpc_client *c, chan *k, call *x, const call_args *a, int64_t now);
void pbrpc__cl_reader_step(pbrpc_client *c, chan *k, call *me, int64_t deadline, int64_t now);
const ProtobufCMessage *pbrpc__cl_unpack_reply(const ProtobufCMessageDescriptor *d, cl_arena *a, const uint8_t *body,
					       size_t len);
void pbrpc__cl_reply_free(const ProtobufCMessage *m, cl_arena *a);
cl_arena *pbrpc__cl_arena_get(pbrpc_client *c);
void pbrpc__cl_arena_put(pbrpc_client *c, cl_arena *a);
void pbrpc__cl_arena_destroy(cl_arena *a);

chan *pbrpc__cl_sync_conn(pbrpc_client *c, call *x, int64_t *now_io);

/* stream.c: client streams, each a CALL_STREAM record in the id map */
bool pbrpc__cl_on_stream(pbrpc__conn *b, const pbrpc__frame *f, void *arg);
bool pbrpc__cl_stream_response(pbrpc_client *c, chan *k, call *x, const pbrpc__wire_response *r);
void pbrpc__cl_stream_finished(pbrpc_client *c, call *x);
void pbrpc__cl_streams_orphan(pbrpc_client *c); /* pbrpc_client_free */
int pbrpc__cl_streams_run(pbrpc_client *c);     /* from pbrpc__cl_run_done */

/* async.c */
void pbrpc__cl_retry_calls(pbrpc_client *c);
void pbrpc__cl_keep_request(call *x, const chan *k, size_t before, const call_args *a);
void pbrpc__cl_async_invoke(svc *s, unsigned idx, const ProtobufCMessage *input, ProtobufCClosure closure,
			    void *closure_data);
void pbrpc__cl_abandon(pbrpc_client *c, call *x, int status, int err, const char *what);
int pbrpc__cl_run_done(pbrpc_client *c);
int pbrpc__cl_process_run(pbrpc_client *c, int timeout_ms, bool forever);
void *pbrpc__cl_io_main(void *arg);

/* Waits on cv (mu held) until signalled or the deadline (0: none) passes. */
static inline void pbrpc__cl_cond_wait_until(pthread_cond_t *cv, pthread_mutex_t *mu, pbrpc__deadline deadline)
{
	if (!deadline) {
		pthread_cond_wait(cv, mu);
		return;
	}
	struct timespec ts = pbrpc__deadline_timespec(deadline);
	pthread_cond_timedwait(cv, mu, &ts);
}

#endif
