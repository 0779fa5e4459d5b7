/* pbrpc server: hosts protoc-c generated services on any number of endpoints.
 *
 *   static Demo__Kv_Service kv = DEMO__KV__INIT(kv_);
 *   pbrpc_server *srv;
 *   pbrpc_server_new(&srv, NULL);
 *   pbrpc_server_add_service(srv, &kv.base);
 *   pbrpc_server_listen(srv, "unix:/run/kv.sock");
 *   pbrpc_server_run(srv);
 *
 * Handlers are the generated *_Service functions:
 *   void kv_get(Demo__Kv_Service *svc, const Demo__GetRequest *req,
 *               Demo__GetReply_Closure closure, void *closure_data);
 * A handler answers exactly once, by calling closure(reply, closure_data)
 * before returning (synchronous) or later from any thread (asynchronous). The
 * reply is packed during the closure call: it may live on the handler's stack
 * and the handler frees it, if it must, after the closure returns. To fail a
 * call, set a status with pbrpc_call_set_status(closure_data, ...) and call
 * closure(NULL, closure_data). The request message is owned by pbrpc and valid
 * until the closure has been called.
 *
 * Threads: everything but the closure, pbrpc_server_get_stats() and
 * pbrpc_server_shutdown() runs on the thread that drives the loop
 * (pbrpc_server_run or pbrpc_server_process), or with opts.loop_threads > 1
 * on the thread of the loop that owns the call's connection.
 */
#ifndef PBRPC_SERVER_H
#define PBRPC_SERVER_H

#include <protobuf-c/protobuf-c.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "pbrpc/error.h"
#include "pbrpc/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pbrpc_server pbrpc_server;

/* Zero is not a level, so that a zeroed options struct means the default. */
typedef enum pbrpc_log_level {
	PBRPC_LOG_ERROR = 1,
	PBRPC_LOG_WARN = 2,
	PBRPC_LOG_INFO = 3,
	PBRPC_LOG_DEBUG = 4,
} pbrpc_log_level;

/* A log sink: one event per call, no trailing newline. */
typedef void (*pbrpc_log_cb)(void *user, pbrpc_log_level level, const char *msg);

/* What the server reports of each REQUEST it answers, to opts.call_log. The
 * pointers are valid during the callback only. */
typedef struct pbrpc_call_info {
	const char *method;    /* as requested: not NUL-terminated, any bytes */
	size_t method_len;
	uint32_t call_id;
	int status;            /* PBRPC_STATUS_* sent in the RESPONSE */
	const char *message;   /* its message, or NULL */
	int64_t duration_ns;   /* from the loop's wake-up that read the request
	                        * to the reply being queued */
	size_t bytes_in;       /* REQUEST payload bytes (PROTOCOL.md section 5) */
	size_t bytes_out;      /* RESPONSE payload bytes */
	bool ran;              /* a handler was invoked (false: refused before) */
	bool has_cred;         /* Unix peers: SO_PEERCRED of the client */
	pid_t pid;
	uid_t uid;
	gid_t gid;
	const char *peer;      /* "unix", or "tcp:ADDR:PORT" of the client */
} pbrpc_call_info;

/* Called on the loop thread once per REQUEST the server answers: calls a
 * handler answered (or that were cancelled or timed out) and requests refused
 * before reaching one (unknown method, bad body, too many calls, shutting
 * down, ...). Keep it short: the loop waits for it. With loop_threads > 1
 * it is called from every loop's thread, concurrently (so is opts.log). */
typedef void (*pbrpc_call_log_cb)(void *user, const pbrpc_call_info *info);

/* Options; zero means the default for every field. */
typedef struct pbrpc_server_opts {
	uint32_t max_frame;          /* largest request payload; default 16 MiB */
	uint32_t max_calls;          /* calls in flight per connection; default 1024 */
	uint32_t max_connections;    /* default 4096; one more is refused with GOAWAY */
	int handshake_timeout_ms;    /* default 10000; < 0 none */
	int idle_timeout_ms;         /* close connections with no call in flight that
	                              * read nothing and answered nothing for this
	                              * long; default none */
	size_t max_output_queue;     /* per connection, bytes; default 4 MiB. Above
	                              * it the server stops reading the connection */
	int write_stall_timeout_ms;  /* ...and drops it if the peer then reads none
	                              * of its replies for this long; default 30000,
	                              * < 0 never */
	unsigned workers;            /* > 0: run handlers on a pool of this many threads
	                              * (the built-in Health and Reflection always run
	                              * on the loop thread) */
	unsigned socket_mode;        /* chmod for unix:/path sockets; default from umask */
	pbrpc_log_cb log;            /* default: none (the library never prints) */
	void *log_user;
	pbrpc_log_level log_level;   /* events up to this level reach log; default WARN */
	pbrpc_call_log_cb call_log;  /* default: none (then the clock is not read
	                              * for it) */
	void *call_log_user;
	/* The memory budget (docs/MEMORY.md): bytes
	 * read (decoder buffers, counted from a frame's header on), requests
	 * held and unpacked (call arenas, request copies, metadata) and queued
	 * replies (writers), plus the loop's read buffer. A request that does not
	 * fit is answered RESOURCE_EXHAUSTED; a connection over its share, or any
	 * connection while the server is over its budget, is not read until
	 * memory comes back. */
	size_t max_memory;           /* server-wide, bytes; default 512 MiB, at
	                              * least 4 MiB */
	size_t max_conn_memory;      /* per connection, bytes; default 10 x max_frame
	                              * (160 MiB); at least 1 MiB, at most max_memory */
	unsigned unpack_factor;      /* a request may take this many times its wire
	                              * size (+ 64 KiB) once unpacked; default 8 */
	/* File descriptors and memfd bodies (Unix sockets only; PROTOCOL.md
	 * section 12). A request with more fds than max_fds, or that would make
	 * its connection's calls in flight hold more than max_conn_fds, is
	 * answered RESOURCE_EXHAUSTED (its fds closed). */
	unsigned max_fds;            /* per request; default 16, at most PBRPC_FDS_MAX */
	unsigned max_conn_fds;       /* per connection, held by calls in flight;
	                              * default 256 */
	size_t memfd_threshold;      /* replies whose body is larger go in a sealed
	                              * memfd where the client supports it; default
	                              * PBRPC_MEMFD_THRESHOLD_DEFAULT (never) */
	/* Local trust (pbrpc_server_set_policy): */
	uint32_t max_connections_per_uid; /* Unix peers of one uid open at once;
	                              * one more is refused as max_connections
	                              * refuses; default 0: no cap but the global */
	/* Keepalive and connection age (docs/PROTOCOL.md sections 7 and 8). */
	int keepalive_interval_ms;   /* PING a connection that sent nothing for this
	                              * long; default none */
	int keepalive_timeout_ms;    /* ...and close it when nothing comes back
	                              * within this; default 20000 */
	int ping_min_interval_ms;    /* a client's PINGs less than this apart with no
	                              * call between are strikes; the third closes
	                              * it; default 1000; < 0 no limit */
	int max_connection_age_ms;   /* drain a connection this old (+-10%, random)
	                              * with GOAWAY; default none */
	int max_connection_age_grace_ms; /* ...and close it this long after, calls
	                              * still in flight failing; default 30000 */
	/* TLS for tls: listeners (common.h): cert and key are required for
	 * them; ca turns on client certificates (mutual TLS). Read by
	 * pbrpc_server_new, which fails with PBRPC_ETLS (and logs why) when
	 * they do not load. */
	pbrpc_tls_opts tls;
	uint32_t stream_window;      /* streams (stream.h): bytes of the client's
	                              * messages each stream may hold unread,
	                              * announced in HELLO; default 64 KiB */
	/* Event loops (docs/ARCHITECTURE.md, "Loops"). 0 or 1: one loop, on the
	 * thread that calls pbrpc_server_run or pbrpc_server_process; inline
	 * handlers (workers == 0) never run concurrently. N > 1:
	 * pbrpc_server_run runs loop 0 on its thread and N - 1 more on threads
	 * of their own; each connection belongs to one loop (the one with the
	 * fewest connections when it was accepted), and its handlers, stream
	 * callbacks, policy checks and call_log run there, so handlers of
	 * different connections run concurrently and must guard what they
	 * share. max_memory is split evenly between the loops (each at least
	 * 4 MiB), and max_conn_memory is at most one loop's share (8 loops of
	 * the default 512 MiB: 64 MiB a connection, below 10 x max_frame). pbrpc_server_fd and pbrpc_server_process are for one loop
	 * only: with more they return PBRPC_EINVALID. Set policies and serving
	 * states before pbrpc_server_run. Default 1. */
	unsigned loop_threads;
} pbrpc_server_opts;

/* Creates a server. opts may be NULL. Returns 0, -ENOMEM, -EMFILE, ... */
PBRPC_EXPORT int pbrpc_server_new(pbrpc_server **out, const pbrpc_server_opts *opts);

/* Closes every endpoint and connection, removes the Unix socket files it
 * created, joins the worker threads and frees the server. Calls still waiting
 * for their closure are dropped: no closure may be called after this returns.
 * NULL is a no-op. */
PBRPC_EXPORT void pbrpc_server_free(pbrpc_server *srv);

/* Registers a service (the `base` of a generated *_Service struct). The
 * server borrows it: it must outlive the server. Every method becomes
 * reachable as "package.Service/Method". Returns 0, PBRPC_EDUPLICATE when a
 * service of that name is already registered, PBRPC_EINVALID when the
 * service has no descriptor or no invoke, -ENOMEM. Call before serving. */
PBRPC_EXPORT int pbrpc_server_add_service(pbrpc_server *srv, ProtobufCService *service);

/* Registers pbrpc.Health and pbrpc.Reflection, which describe the services
 * added before and after this call. Returns 0 or a negative code. */
PBRPC_EXPORT int pbrpc_server_enable_health(pbrpc_server *srv);
PBRPC_EXPORT int pbrpc_server_enable_reflection(pbrpc_server *srv);

/* Registers pbrpc.Stats (proto/pbrpc/stats.proto): per method, calls by
 * status, a latency histogram, bytes in and out, calls in flight; and the
 * server's connection counters. Counting starts with this call. Returns 0 or
 * a negative code. */
PBRPC_EXPORT int pbrpc_server_enable_stats(pbrpc_server *srv);

/* Marks a registered service (or "" for the whole server) SERVING or not, as
 * pbrpc.Health reports it. Returns 0 or PBRPC_EINVALID for an unknown name. */
PBRPC_EXPORT int pbrpc_server_set_serving(pbrpc_server *srv, const char *service, bool serving);

/* ---- who may call what ----
 * A Unix peer's credentials are read once, when its connection is accepted:
 * SO_PEERCRED (pid, uid, gid), its supplementary groups (SO_PEERGROUPS) and,
 * when a policy has a callback and the kernel offers SO_PEERPIDFD (Linux
 * 6.5), a pidfd of the connecting process. A TCP peer has none. */
typedef struct pbrpc_peer {
	bool has_cred;         /* false on TCP: nothing below is set */
	pid_t pid;
	uid_t uid;
	gid_t gid;             /* primary group */
	const gid_t *groups;   /* supplementary groups, as the kernel reported
	                        * them when the peer connected */
	size_t n_groups;
	int pidfd;             /* of pid, or -1 (no callback policy when the
	                        * connection came, or an older kernel); owned
	                        * by pbrpc: do not close it */
} pbrpc_peer;

/* A policy's own test: true lets the call through. Runs on the loop thread
 * before the request is unpacked, for Unix peers the lists did not admit;
 * `method` is "package.Service/Method". Keep it short (the loop waits). */
typedef bool (*pbrpc_authz_cb)(void *user, const pbrpc_peer *peer, const char *method);

/* Who may call a service or a method. A Unix peer is admitted when any_local
 * is set, its uid is in uids, its primary gid or one of its supplementary
 * groups is in gids, or check returns true; a TCP peer when allow_tcp is set
 * (the lists and check are not consulted for it). A policy that admits
 * nothing refuses every call. */
typedef struct pbrpc_policy {
	const uid_t *uids;
	size_t n_uids;
	const gid_t *gids;
	size_t n_gids;
	pbrpc_authz_cb check;  /* may be NULL */
	void *check_user;
	bool any_local;        /* every Unix peer */
	bool allow_tcp;        /* peers without credentials (TCP) */
} pbrpc_policy;

/* Sets the policy of a registered service ("demo.Kv") or method
 * ("demo.Kv/Put"); a method's own policy takes precedence over its
 * service's. NULL removes it (then the service's, or none: everyone may
 * call). The lists are copied; check_user is borrowed. Without any policy a
 * request costs nothing more. A refused request is answered
 * PERMISSION_DENIED before its body is unpacked (the handler never runs),
 * counted in pbrpc_server_stats.calls_denied and in pbrpc.Stats under its
 * method, and logged (WARN, at most one line a second, with a count).
 * Set policies before listening: a connection accepted before the first
 * policy with a check has no pidfd. Returns 0, PBRPC_EINVALID for a name not
 * registered, -ENOMEM. */
PBRPC_EXPORT int pbrpc_server_set_policy(pbrpc_server *srv, const char *name, const pbrpc_policy *policy);

/* Starts listening on an endpoint string (see endpoint.h). Returns the
 * listener's index (>= 0) or a negative code: PBRPC_EADDRESS, -EADDRINUSE,
 * -EACCES, -ENOSPC, ... */
PBRPC_EXPORT int pbrpc_server_listen(pbrpc_server *srv, const char *endpoint);

/* Adopts an already listening socket (e.g. from systemd). Takes ownership of
 * fd. Returns the listener's index or a negative code. */
PBRPC_EXPORT int pbrpc_server_listen_fd(pbrpc_server *srv, int fd);

/* Writes listener `index`'s actual address ("tcp:127.0.0.1:43121") into buf.
 * Returns 0 or PBRPC_EINVALID. */
PBRPC_EXPORT int pbrpc_server_address(const pbrpc_server *srv, int index, char *buf, size_t len);

/* An fd that becomes readable when pbrpc_server_process() has work, for
 * embedding the server in another event loop: a socket event, a closure
 * called from another thread, a shutdown request, or a timer due (a call's
 * deadline, an idle or stalled connection, a keepalive, the drain), so an
 * embedder may wait on it with no timeout of its own. PBRPC_EINVALID
 * with loop_threads > 1. */
PBRPC_EXPORT int pbrpc_server_fd(const pbrpc_server *srv);

/* Runs one round of the loop: waits up to timeout_ms (0: don't wait, < 0:
 * forever) for events, then accepts, reads, dispatches, writes and expires
 * timers. Returns 0, 1 once a shutdown has completed, or a negative code;
 * PBRPC_EINVALID with loop_threads > 1 (use pbrpc_server_run). */
PBRPC_EXPORT int pbrpc_server_process(pbrpc_server *srv, int timeout_ms);

/* Runs the loop until a shutdown completes: with loop_threads > 1, loop 0
 * here and the others on threads it starts, and returns once every loop has
 * finished (their threads joined). Returns 0 or a negative code. */
PBRPC_EXPORT int pbrpc_server_run(pbrpc_server *srv);

/* Begins a graceful shutdown: stop accepting, send GOAWAY to every
 * connection, let calls in flight finish for up to drain_ms (then they are
 * answered UNAVAILABLE and connections closed). drain_ms < 0 waits for ever;
 * 0 closes at once. Called again, the shortest drain asked for wins: a later
 * 0 ends a drain at once (a second SIGTERM), a longer one changes nothing.
 * Safe from any thread and from a signal handler. */
PBRPC_EXPORT void pbrpc_server_shutdown(pbrpc_server *srv, int drain_ms);

/* Counters, for tests and monitoring: the sum over the loops, each read
 * with relaxed atomics, so safe from any thread (a snapshot taken while
 * loops run need not be consistent between fields). */
typedef struct pbrpc_server_stats {
	uint64_t connections_accepted;
	uint64_t connections_refused;  /* told why and closed: over max_connections,
	                                * out of file descriptors, shutting down */
	uint64_t connections_open;
	uint64_t protocol_errors;      /* connections closed for bad bytes */
	uint64_t calls_started;
	uint64_t calls_completed;
	uint64_t calls_in_flight;
	uint64_t calls_denied;         /* refused by a policy: PERMISSION_DENIED */
} pbrpc_server_stats;

PBRPC_EXPORT void pbrpc_server_get_stats(const pbrpc_server *srv, pbrpc_server_stats *out);

/* ---- inside a handler: closure_data is the call ----
 * These may be called from whichever thread is handling the call, until the
 * closure has been called; pbrpc_call_cancelled() from any thread. */

/* Sets the status the next closure(NULL, closure_data) reports, with a
 * printf-style message (may be NULL). With a non-OK status, a reply passed to
 * the closure is ignored. Returns 0, or PBRPC_EINVALID if closure_data is not a
 * live pbrpc call or status is outside 0..16. */
PBRPC_EXPORT int pbrpc_call_set_status(void *closure_data, int status, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* True once the client cancelled the call, its deadline passed, or the
 * connection closed. Safe from any thread. The handler must still answer. */
PBRPC_EXPORT bool pbrpc_call_cancelled(void *closure_data);

/* The call's deadline as a CLOCK_MONOTONIC time in nanoseconds, or 0 if the
 * client set none. */
PBRPC_EXPORT int64_t pbrpc_call_deadline(void *closure_data);

/* "package.Service/Method", NUL-terminated, valid until the closure runs. */
PBRPC_EXPORT const char *pbrpc_call_method(void *closure_data);

/* Value of a request metadata key, or NULL; *len gets its length. Valid until
 * the closure runs. */
PBRPC_EXPORT const void *pbrpc_call_metadata(void *closure_data, const char *key, size_t *len);

/* The peer's credentials (SO_PEERCRED) on Unix sockets. Returns 0, or
 * -ENOTSUP on TCP. */
PBRPC_EXPORT int pbrpc_call_peer_cred(void *closure_data, pid_t *pid, uid_t *uid, gid_t *gid);

/* File descriptors (Unix sockets, PROTOCOL.md section 12).
 *
 * The fds that came with the request: returns their count (0 if none) and
 * points *fds (may be NULL) at them. They are the call's: closed when the
 * closure has been called (or the server frees the call), unless taken with
 * pbrpc_call_take_fd(). Received close-on-exec. */
PBRPC_EXPORT int pbrpc_call_fds(void *closure_data, const int **fds);

/* Takes request fd `index`: the caller owns it from now on and closes it.
 * Returns the fd, or PBRPC_EINVALID (no such fd, or already taken). */
PBRPC_EXPORT int pbrpc_call_take_fd(void *closure_data, unsigned index);

/* Attaches fd to the reply. pbrpc owns fd from this call on, whatever it
 * returns: it is sent with an OK reply and then closed (the client gets its
 * own copy), or closed when the call fails in any other way. Returns 0;
 * -ENOTSUP when this connection cannot carry fds (TCP, or a client that did
 * not announce the FDS feature); PBRPC_ETOOBIG past PBRPC_FDS_MAX fds;
 * PBRPC_EINVALID, -ENOMEM. Call before the closure. */
PBRPC_EXPORT int pbrpc_call_attach_fd(void *closure_data, int fd);
/* The peer of the call, groups and pidfd included (see pbrpc_peer), valid
 * until the closure has been called. Returns 0 (for a TCP peer too, with
 * has_cred false) or PBRPC_EINVALID. */
PBRPC_EXPORT int pbrpc_call_peer(void *closure_data, pbrpc_peer *out);
/* What a TLS connection's client proved (docs/PROTOCOL.md, "TLS"). */
typedef struct pbrpc_tls_peer {
	const char *subject;     /* its certificate's subject, RFC 2253
	                          * ("CN=alice,O=Example"); NULL: it sent none */
	const char *const *sans; /* its subjectAltNames: "DNS:name", "IP:addr",
	                          * "URI:uri", "email:addr" */
	size_t n_sans;
	const char *version;     /* "TLSv1.3" */
	const char *cipher;      /* "TLS_AES_256_GCM_SHA384" */
} pbrpc_tls_peer;

/* The TLS peer of the call's connection. *out stays valid until the
 * closure has been called. Returns 0, -ENOTSUP when the call did not come
 * over TLS, or PBRPC_EINVALID. */
PBRPC_EXPORT int pbrpc_call_peer_tls(void *closure_data, const pbrpc_tls_peer **out);

#ifdef __cplusplus
}
#endif
#endif
