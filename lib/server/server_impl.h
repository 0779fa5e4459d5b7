/* The server's private objects, shared by the files of lib/server/.
 *
 * Threading: a `struct pbrpc_server` is one loop (opts.loop_threads, default
 * 1): its thread owns its connections, call tables and timers. Loop 0 is the
 * handle the user holds (`root`); it alone owns what the loops share: the
 * options, the registry (`reg` points at root's), the listeners (it accepts
 * for every loop), the TLS context, the worker pool, the connection counts
 * (max_connections, per uid: uid_mu) and the sibling loops. Other threads
 * touch only (a) a call's `cancelled` flag, (b) a loop's completion queue,
 * guarded by cq_mu, through which closures called off the call's loop thread
 * hand their packed replies back, (c) root's worker queue (wq_mu), (d) a
 * loop's handoff queue (hand_mu: fds root accepted for it), (e) the stats
 * counters (one writer each, SRV_STAT_ADD; read with relaxed atomics).
 *
 * Memory: reads land in one loop-wide scratch buffer and are decoded in place;
 * only a frame split across reads is copied into the connection's decoder.
 * Call records come from a free list and unpack their request into a retained
 * per-call arena, so a steady stream of small calls allocates nothing.
 */
#ifndef PBRPC_SERVER_IMPL_H
#define PBRPC_SERVER_IMPL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "conn/conn.h"
#include "conn/tls.h"
#include "pbrpc/endpoint.h"
#include "pbrpc/server.h"
#include "server/registry.h"
#include "util/arena.h"
#include "util/heap.h"
#include "util/list.h"

#define SRV_CALL_MAGIC 0x7062726bu
#define SRV_ARENA_KEEP (64u * 1024u)  /* a call's arena keeps up to this */
#define SRV_SCRATCH_SIZE (256u * 1024u) /* the loop's read buffer */
#define SRV_SCRATCH_MAX (4u << 20)      /* it grows for large requests up to this */
#define SRV_BUF_KEEP (1u << 20)         /* a decoder or writer keeps up to this between frames */
#define SRV_MEM_MIN (64u * 1024u)       /* a connection is read while this much budget is left */
#define SRV_MEM_FLOOR (4u << 20)       /* opts.max_memory is at least this */
#define SRV_CONN_MEM_FLOOR (1u << 20)  /* opts.max_conn_memory is at least this */
#define SRV_UNPACK_FACTOR 8u            /* default opts.unpack_factor (docs/MEMORY.md) */
#define SRV_WORKER_UNPACK (64u * 1024u) /* with workers, larger bodies are unpacked there */
#define SRV_SMALL_BODY 4096u            /* bodies up to this unpack within SRV_SMALL_LIMIT */
#define SRV_SMALL_LIMIT (SRV_UNPACK_FACTOR * SRV_SMALL_BODY + SRV_ARENA_KEEP)

/* A connection's counters have one writer, its loop; pbrpc_server_get_stats
 * reads them from any thread. */
#define SRV_STAT_ADD(srv, field, n) \
	__atomic_store_n(&(srv)->stats.field, (srv)->stats.field + (uint64_t)(n), __ATOMIC_RELAXED)

/* An fd root accepted for another loop (pbrpc__srv_conn_adopt there). */
typedef struct srv_handoff {
	pbrpc__list link;
	int fd;
	const struct srv_listener *l;
	bool has_cred;
	bool uid_counted;
	struct ucred cred;
} srv_handoff;

/* A function another thread asked this loop to run (pbrpc_stream_post). */
typedef struct srv_post {
	pbrpc__list link;
	void (*fn)(void *arg);
	void *arg;
} srv_post;

/* What an epoll event's data.ptr points at: the first member of each. */
enum srv_src { SRV_SRC_LISTENER, SRV_SRC_CONN, SRV_SRC_WAKE, SRV_SRC_TICK };

enum srv_timer { SRV_TIMER_CALL, SRV_TIMER_CONN, SRV_TIMER_SWEEP, SRV_TIMER_DRAIN, SRV_TIMER_ACCEPT };

typedef struct srv_listener {
	enum srv_src src;
	int fd; /* -1 once closed */
	pbrpc_endpoint ep;
	bool owns_path; /* we created the socket file and unlink it */
	dev_t dev;
	ino_t ino;
} srv_listener;

/* A Unix peer's supplementary groups and pidfd (authz.c), read at accept
 * and shared by its connection and its calls, which may outlive it. Only the
 * loop thread changes refs; handlers read the rest. Allocated only when
 * there is something to hold (a group, a pidfd). */
typedef struct srv_peer {
	unsigned refs;
	int pidfd; /* -1: none; closed with the last reference */
	uint32_t n_groups;
	gid_t groups[];
} srv_peer;

typedef struct srv_conn {
	enum srv_src src;
	pbrpc__conn base;
	pbrpc_server *srv;
	bool has_cred;
	bool uid_counted; /* counted in srv->uids (max_connections_per_uid) */
	uint32_t events; /* what epoll has registered */
	struct ucred cred;
	char peer[64]; /* "unix" or "tcp:ADDR:PORT", for pbrpc_call_info */
	pbrpc__timer timer; /* armed at pbrpc__conn_deadline(&base) */
	pbrpc__list link;   /* srv->conns */
	pbrpc__list dirty;  /* srv->dirty while output waits for a flush */
	pbrpc__list again;  /* srv->again: TLS bytes buffered that no epoll
	                     * event will report (pbrpc__conn_buffered) */
	size_t mem_io;      /* decoder footprint + writer capacity, last sampled */
	size_t mem_used;    /* mem_io + the mem of its calls not yet answered */
	unsigned fds_held;  /* request fds of its calls not yet answered */
	srv_peer *peer_ext; /* groups and pidfd, or NULL (authz.c) */
	const pbrpc__policy *admitted; /* the last policy without a check that
	                                * admitted this peer (cleared when any
	                                * policy changes): no second look */
} srv_conn;

typedef struct srv_call {
	uint32_t magic; /* SRV_CALL_MAGIC while it is a valid closure_data */
	uint32_t id;
	pbrpc_server *srv;
	srv_conn *conn; /* NULL once answered or the connection is gone */
	const pbrpc__method *m;
	ProtobufCMessage *input;
	int status;
	char *status_msg;
	atomic_bool cancelled;
	bool answered; /* its RESPONSE has been queued (or can no longer be) */
	bool not_run;  /* expired while queued for a worker, or refused there */
	bool refused;  /* its request could not be unpacked on the worker */
	size_t mem;    /* bytes counted against the budget (arena, copies) */
	uint8_t *raw;  /* the request body, copied for a worker to unpack */
	size_t raw_len;
	int64_t deadline_ns;
	int64_t t0;      /* srv->now when its REQUEST was read (duration_ns) */
	size_t bytes_in; /* its REQUEST's payload */
	bool started;    /* counted in flight (pbrpc__registry_observe_start) */
	pbrpc__timer timer;
	bool has_cred;
	struct ucred cred; /* copied from the connection: it may close first */
	srv_peer *peer_ext; /* a reference to the connection's, or NULL */
	pbrpc__tls_peer *tls_peer; /* a reference, for pbrpc_call_peer_tls; NULL: not TLS */
	uint8_t *md; /* copy of the request's metadata block */
	size_t md_len, md_cap;
	pbrpc__arena arena;
	struct pbrpc_stream *stream; /* a stream (stream.c), or NULL: a unary call */
	pbrpc__list live;  /* srv->live: every call not yet completed */
	pbrpc__list qlink; /* free list, worker or completion queue */
	/* a completion handed over from another thread */
	int done_status;
	char *done_msg;
	uint8_t *done_body;
	size_t done_len;
	/* fds (PROTOCOL.md section 12). The request's (-1 once taken) are the
	 * call's until call_put closes them; the reply's are the call's until
	 * its RESPONSE takes them (or call_put closes them). */
	int *fds;
	unsigned nfds;
	int *rfds;
	unsigned nrfds, rfds_cap;
	bool fds_ok;     /* its connection can carry fds */
	bool memfd_ok;   /* ... and memfd bodies */
	int done_memfd;  /* off the loop thread: the reply packed in a sealed memfd (done_len bytes), or -1 */
} srv_call;

struct pbrpc_server {
	pbrpc_server_opts o;
	int epfd;
	struct {
		enum srv_src src;
		int fd;
	} wake;
	/* The timer heap's earliest deadline, as a timerfd in the epoll set:
	 * epoll_wait itself never gets a timeout (on a VM, arming and
	 * cancelling an hrtimer on every wait cost about 8% of the server's
	 * CPU per 32-byte call). The timerfd is set again only when the heap's
	 * top comes before `armed`; a later top lets it fire early once, for
	 * nothing (loop.c, tick_arm). */
	struct {
		enum srv_src src;
		int fd;
		int64_t armed; /* when it fires (CLOCK_MONOTONIC ns); 0: disarmed */
	} tick;
	uint8_t *scratch;
	size_t scratch_cap;  /* SRV_SCRATCH_SIZE, or a large request's size while they arrive */
	size_t scratch_used; /* largest read since the last sweep */
	size_t scratch_want; /* twice the largest request just received whole */
	pbrpc_hello hello;   /* what we announce */

	pbrpc__registry *reg; /* root's reg_store */
	pbrpc__registry reg_store;
	srv_listener **listeners; /* root only */
	size_t n_listeners;

	pbrpc__list conns;
	pbrpc__list dirty;
	pbrpc__list again; /* TLS connections to read without waiting (srv_conn.again) */
	pbrpc__tls_ctx *tls_ctx; /* from o.tls, for tls: listeners; NULL: none */
	pbrpc__heap timers;
	pbrpc__timer sweep;
	pbrpc__timer drain;

	/* Out of file descriptors (or memory) in accept: the listeners leave
	 * the epoll set for a backoff (listener.c), and one reserved fd lets
	 * the server accept a connection at the limit to say why it refuses. */
	pbrpc__timer accept_timer; /* SRV_TIMER_ACCEPT: watch the listeners again */
	int reserve_fd;            /* /dev/null, or -1 */
	int accept_backoff_ms;     /* 0 while accepting works */
	bool accept_paused;        /* the listeners are out of the epoll set */
	uint64_t accept_refused;   /* refused at the limit since the last log line */
	int64_t accept_log_next;   /* no "out of file descriptors" line before this */

	pbrpc__list stream_events; /* streams with callbacks to run (stream.c) */
	pbrpc__list free_calls;
	size_t n_free_calls;
	pbrpc__arena_chunk *spare_big; /* shared by every call's arena */
	pbrpc__list live;

	pthread_mutex_t cq_mu;
	pbrpc__list cq;
	pbrpc__list posts; /* srv_post: pbrpc_stream_post's functions, under cq_mu */

	pthread_mutex_t wq_mu;
	pthread_cond_t wq_cv;
	pbrpc__list wq;
	bool wq_stop;
	pthread_t *workers;
	unsigned n_workers;

	int64_t now;              /* CLOCK_MONOTONIC at the last wake-up */
	srv_call *dispatching;    /* the call whose handler runs inline right now */
	atomic_int shutdown_req;  /* the shortest drain asked for: ms + 1; 0 = none,
	                           * INT_MAX = wait forever */
	int shutdown_seen;        /* the shutdown_req the loop acted on */
	bool shutting_down;
	bool shutdown_done;
	bool reap_pending; /* a connection closed: free it at the end of the round */
	pbrpc_server_stats stats;
	/* the memory budget (opts.max_memory): sum of connections' mem_io, of
	 * calls' mem, and scratch_cap */
	size_t mem_used;
	size_t mem_easy, conn_easy; /* below these, at least easy_room is left */
	size_t easy_room;           /* max(max_frame, 1 MiB) */
	unsigned mem_paused; /* connections not read for want of memory */
	bool trim;           /* large blocks were freed: malloc_trim at the sweep */
	/* authz.c: connections per uid (max_connections_per_uid), an open
	 * addressing table; pidfds wanted (a policy has a check); the
	 * rate-limited "permission denied" and "too many connections for uid"
	 * lines */
	struct srv_uid_count *uids;
	size_t uids_cap, n_uids;
	bool want_pidfd;
	uint64_t denied_quiet, uid_refused_quiet; /* not logged yet */
	int64_t denied_log_next, uid_log_next;
	uint64_t rng;        /* xorshift state: the connection age's jitter */

	/* Loops (opts.loop_threads). */
	pbrpc_server *root;     /* loop 0, the user's handle (itself for loop 0) */
	pbrpc_server **loops;   /* root: the n_loops loops, loops[0] == root */
	unsigned n_loops;       /* root: 1 or more; siblings: 0 */
	unsigned loop_index;
	pthread_t thread;       /* siblings: runs the loop in pbrpc_server_run */
	bool thread_started;
	int run_rc;             /* siblings: what their loop returned */
	atomic_uint n_conns;    /* connections given to this loop, not closed yet
	                         * (root's placement reads it) */
	pthread_mutex_t hand_mu;
	pbrpc__list hand;       /* srv_handoff: accepted for this loop */
	/* root only */
	atomic_uint conns_all;  /* open over every loop (max_connections) */
	atomic_bool accept_closed; /* shutting down: root's listeners are closed,
	                         * no handoff comes any more */
	pthread_mutex_t uid_mu; /* the per-uid table (authz.c) */
};

/* The bytes a connection may still take: the smaller of its share's and the
 * server's room. */
static inline size_t pbrpc__srv_mem_avail(const srv_conn *c)
{
	const pbrpc_server *srv = c->srv;
	size_t used = srv->mem_used, cused = c->mem_used;
	size_t s = used < srv->o.max_memory ? srv->o.max_memory - used : 0;
	size_t cs = cused < srv->o.max_conn_memory ? srv->o.max_conn_memory - cused : 0;
	return s < cs ? s : cs;
}

/* server.c */
__attribute__((format(printf, 3, 4))) void pbrpc__srv_log(pbrpc_server *srv, pbrpc_log_level lvl,
							  const char *fmt, ...);
const char *pbrpc__srv_conn_name(const srv_conn *c, char *buf, size_t len);
/* Test hook: connections open on loop i (0 past the last loop). */
unsigned pbrpc__server_loop_conns(const pbrpc_server *srv, unsigned i);

/* dispatch.c: requests to calls, calls to handlers and back */
extern _Thread_local pbrpc_server *pbrpc__srv_tl_loop __attribute__((tls_model("initial-exec")));
extern const pbrpc__conn_ops pbrpc__srv_conn_ops;
void pbrpc__srv_call_answer(srv_call *call, int status, const char *message, const ProtobufCMessage *msg,
			    const uint8_t *body, size_t body_len);
void pbrpc__srv_drain_completions(pbrpc_server *srv);
void pbrpc__srv_run_posts(pbrpc_server *srv); /* on the loop thread, and at free */
int pbrpc__srv_post(pbrpc_server *srv, void (*fn)(void *arg), void *arg);
void pbrpc__srv_wake(pbrpc_server *srv);
int pbrpc__srv_workers_start(pbrpc_server *srv);
void pbrpc__srv_workers_stop(pbrpc_server *srv);
void pbrpc__srv_calls_free(pbrpc_server *srv);

srv_call *pbrpc__srv_call_get(pbrpc_server *srv);
void pbrpc__srv_call_put(pbrpc_server *srv, srv_call *call);
void pbrpc__srv_refuse(srv_conn *c, const pbrpc__frame *f, const pbrpc__wire_request *req, const pbrpc__method *m,
		       int status, const char *message);

/* stream.c: server streams. A stream is an srv_call with call->stream set. */
void pbrpc__srv_stream_open(srv_conn *c, const pbrpc__frame *f, const pbrpc__wire_request *req,
			    const pbrpc__method *m);
bool pbrpc__srv_on_stream(pbrpc__conn *base, const pbrpc__frame *f, void *arg);
/* The stream's call was answered without its handler (cancel, deadline,
 * drain, connection closed): on_cancel runs from pbrpc__srv_stream_events. */
void pbrpc__srv_stream_over(srv_call *call, int status);
static inline void pbrpc__srv_stream_check_over(srv_call *call, int status)
{
	if (__builtin_expect(call->stream != NULL, 0))
		pbrpc__srv_stream_over(call, status);
}
void pbrpc__srv_stream_events(pbrpc_server *srv);
void pbrpc__srv_stream_destroy(srv_call *call); /* pbrpc_server_free */

/* loop.c */
void pbrpc__srv_loops_join(pbrpc_server *root); /* shuts down and joins sibling loops still running */
void pbrpc__srv_mark_dirty(srv_conn *c);
void pbrpc__srv_conn_closed(srv_conn *c);
void pbrpc__srv_conn_free(srv_conn *c);

/* authz.c: peers' credentials, policies, connections per uid */
const char *pbrpc__authz_refusal(srv_conn *c, const pbrpc__method *m, char *text, size_t len);
void pbrpc__authz_refuse_uid(pbrpc_server *srv, int fd, uid_t uid);
void pbrpc__authz_conn_open(srv_conn *c, int fd);
/* Root, at accept: counts a connection of uid unless its cap is reached
 * (-1: refuse it; 0: not counted; 1: counted). */
int pbrpc__authz_uid_take(pbrpc_server *srv, uid_t uid);
void pbrpc__authz_uid_release(pbrpc_server *srv, uid_t uid);
void pbrpc__authz_conn_closed(srv_conn *c);
void pbrpc__authz_peer_unref(srv_peer *p);
void pbrpc__authz_fini(pbrpc_server *srv);

/* listener.c */
void pbrpc__srv_accept(pbrpc_server *srv, srv_listener *l);
void pbrpc__srv_accept_resume(pbrpc_server *srv);
int pbrpc__srv_reserve_fd(pbrpc_server *srv);
void pbrpc__srv_refuse_with(pbrpc_server *srv, int fd, int status, const char *why);
void pbrpc__srv_listeners_close(pbrpc_server *srv);
/* A loop registers an accepted fd as its connection (listener.c); takes the
 * fd whatever it returns. */
int pbrpc__srv_conn_adopt(pbrpc_server *srv, int fd, const srv_listener *l, const struct ucred *cred,
			  bool uid_counted);
/* The loop's handoff queue: fds root accepted for it. */
void pbrpc__srv_take_handoffs(pbrpc_server *srv);
/* The connection left its loop: the counts root places and limits by. */
void pbrpc__srv_conn_gone(pbrpc_server *srv);

/* call_api.c: the call's peer credentials (pbrpc_call_peer_cred's contract),
 * for calls and streams alike. */
int pbrpc__srv_call_peer_cred(const srv_call *call, pid_t *pid, uid_t *uid, gid_t *gid);

#endif
