/* pbrpc client: a channel to one server, used through protoc-c's stubs.
 *
 *   pbrpc_client *c;
 *   pbrpc_client_connect(&c, "unix:/run/kv.sock", NULL);
 *   ProtobufCService *kv = pbrpc_client_service(c, &demo__kv__descriptor);
 *   demo__kv__get(kv, &req, on_reply, &ctx);     // returns after on_reply ran
 *
 * The closure gets the reply, or NULL when the call failed; inside the closure
 * (and after a synchronous stub returns) pbrpc_client_status() tells why. The
 * reply is owned by pbrpc and freed when the closure returns.
 *
 * Synchronous services (pbrpc_client_service): the stub sends the request,
 * waits for the answer, runs the closure on the calling thread and returns.
 * Asynchronous services (pbrpc_client_service_async): the stub queues the
 * request and returns; the closure runs later, on the thread that calls
 * pbrpc_client_process() (drive it from a poll loop with pbrpc_client_fd()),
 * or on the client's own I/O thread when opts.io_thread is set.
 *
 * When async requests are sent: the stub sends a lone one itself (nothing
 * else in flight or queued, or the previous request was more than 50 us
 * ago). The requests of a burst after the first, and those made by closures
 * that pbrpc_client_process() runs, wait in the connection's buffer so that
 * they leave together in one write (and the server answers them in one);
 * they go out no later than
 *   - the end of the pbrpc_client_process() round, for calls made by a
 *     closure that round ran;
 *   - the next pbrpc_client_process() or pbrpc_client_drain() call, or
 *     synchronous call, on the client;
 *   - at once when a loop watches pbrpc_client_fd(): the fd is readable while
 *     a request waits, so the loop calls pbrpc_client_process(), which sends;
 *   - at once from the I/O thread with opts.io_thread;
 *   - when 64 KiB are queued.
 * The CANCEL frames of pbrpc_client_cancel() and of deadlines follow the same
 * rules. So a request is never held back waiting for an unrelated reply.
 *
 * A client is safe to use from several threads at once. Calls made while the
 * connection is down reconnect (with backoff); calls in flight when it drops
 * fail with UNAVAILABLE.
 *
 * Connection loss and limits:
 * - A synchronous call waits, within its deadline, for a connection (retrying
 *   with backoff) and for a free call slot when the server's max_calls are all
 *   in flight; if no connection comes up in time it fails with UNAVAILABLE and
 *   the last connect error as the message.
 * - An asynchronous call fails at once (its closure still runs from
 *   pbrpc_client_process) with UNAVAILABLE while the reconnect backoff runs,
 *   and with RESOURCE_EXHAUSTED when the server's max_calls are in flight.
 *   When the backoff has elapsed it dials (blocking up to connect_timeout_ms).
 * - A request larger than the server's max_frame fails locally with
 *   RESOURCE_EXHAUSTED; nothing is sent.
 * - After a graceful GOAWAY, calls in flight finish on the old connection and
 *   new calls open a new one. A synchronous call the draining server answered
 *   UNAVAILABLE (it arrived after the GOAWAY, so it never ran) is retried once
 *   on the new connection.
 *
 * Replies to synchronous calls are read by the calling threads themselves (no
 * I/O thread is involved); the PINGs of an idle server are answered at the
 * next call, or at once by pbrpc_client_process / opts.io_thread.
 */
#ifndef PBRPC_CLIENT_H
#define PBRPC_CLIENT_H

#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pbrpc/error.h"
#include "pbrpc/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pbrpc_client pbrpc_client;

/* Options; zero means the default for every field. */
typedef struct pbrpc_client_opts {
	uint32_t max_frame;       /* largest reply payload accepted; default 16 MiB */
	int connect_timeout_ms;   /* default 5000 */
	int call_timeout_ms;      /* default per call: 30000; < 0 none */
	bool lazy;                /* don't connect until the first call */
	bool io_thread;           /* run async closures on a client-owned thread */
	int backoff_min_ms;       /* first reconnect delay; default 50 */
	int backoff_max_ms;       /* reconnect delay cap; default 2000 */
	/* File descriptors and memfd bodies (Unix sockets only; PROTOCOL.md
	 * section 12). A reply with more fds than max_fds fails the call with
	 * RESOURCE_EXHAUSTED (the fds are closed). */
	unsigned max_fds;         /* per reply; default 16, at most PBRPC_FDS_MAX */
	size_t memfd_threshold;   /* requests whose body is larger go in a sealed
	                           * memfd where the server supports it; default
	                           * PBRPC_MEMFD_THRESHOLD_DEFAULT (never) */
	/* TLS for a tls: endpoint (common.h): ca (default: the system store),
	 * cert and key for mutual TLS, server_name. */
	pbrpc_tls_opts tls;
	uint32_t stream_window;   /* streams (stream.h): bytes of the server's
	                           * messages each stream may hold unread,
	                           * announced in HELLO; default 64 KiB */
} pbrpc_client_opts;

/* Creates a client for `endpoint` and, unless opts->lazy, connects and
 * completes the handshake. Returns 0 or a negative code: PBRPC_EADDRESS,
 * -ECONNREFUSED, -ENOENT, -ETIMEDOUT, PBRPC_EBADMAGIC (not a pbrpc server),
 * PBRPC_EVERSION; for tls: PBRPC_ETLS (certificate, host name, ALPN; also when
 * the opts.tls files do not load), PBRPC_ENOTLS (the server speaks plaintext).
 * After a failure, pbrpc_client_status() on this thread gives UNAVAILABLE and
 * the reason in words ("... server certificate rejected: hostname mismatch"). On failure *out is NULL. */
PBRPC_EXPORT int pbrpc_client_connect(pbrpc_client **out, const char *endpoint, const pbrpc_client_opts *opts);

/* Fails every asynchronous call in flight with CANCELLED (their closures run
 * here), stops the I/O thread, closes the connection, and frees the client
 * and every service it handed out. No other thread may be inside a call on
 * this client, or call it afterwards. NULL is a no-op. */
PBRPC_EXPORT void pbrpc_client_free(pbrpc_client *c);

/* A ProtobufCService whose methods call the server; pass it to the generated
 * stubs. Synchronous or asynchronous as described above. Owned by the client
 * (freed with it); calling protobuf_c_service_destroy() on it is harmless.
 * Returns NULL on allocation failure. */
PBRPC_EXPORT ProtobufCService *pbrpc_client_service(pbrpc_client *c, const ProtobufCServiceDescriptor *desc);
PBRPC_EXPORT ProtobufCService *pbrpc_client_service_async(pbrpc_client *c,
							   const ProtobufCServiceDescriptor *desc);

/* Per-call options for the next call made by this thread (the generated
 * stubs have no room for them). The very next call consumes them, whatever
 * becomes of it: a stub call uses them; pbrpc_client_call and
 * pbrpc_client_call_raw, which take options of their own, discard them; so
 * options never reach a later, unrelated call. To give calls options without
 * thread-local state, use a service bound to them (pbrpc_client_service_with).
 *
 * The deadline is sent to the server as the remaining time. When it passes,
 * the call fails with DEADLINE_EXCEEDED, a CANCEL tells the server, and the
 * call's id stays reserved until the server's RESPONSE. A call whose deadline
 * has already passed fails with DEADLINE_EXCEEDED without sending anything. */
typedef struct pbrpc_call_opts {
	int timeout_ms;                 /* 0: the client's default; < 0: none */
	const pbrpc_metadata *metadata; /* copied when the call is made */
	size_t metadata_count;
	/* Absolute deadline, CLOCK_MONOTONIC nanoseconds (as pbrpc_call_deadline()
	 * returns inside a handler, so a server can pass its caller's deadline on).
	 * 0: unset; when set it takes precedence over timeout_ms. */
	int64_t deadline_ns;
	/* File descriptors to send with the request (Unix sockets whose server
	 * announced FDS; else the call fails with FAILED_PRECONDITION and sends
	 * nothing). Borrowed: pbrpc sends duplicates and the caller keeps, and
	 * closes, its own; they must stay open until the call is made. At most
	 * PBRPC_FDS_MAX. A call with fds is not sent again after a GOAWAY. */
	const int *fds;
	size_t fd_count;
} pbrpc_call_opts;

PBRPC_EXPORT void pbrpc_client_next_call(const pbrpc_call_opts *opts);

/* A service like pbrpc_client_service(_async)'s whose every call uses opts
 * (timeout_ms counts from each call; metadata is copied now; deadline_ns, if
 * set, is absolute and applies to every call). Options set with
 * pbrpc_client_next_call() still take precedence for that one call. Each
 * call returns a new handle, owned by the client; protobuf_c_service_destroy()
 * frees it sooner (no call may then be using it). NULL on allocation failure
 * or when opts is NULL. */
PBRPC_EXPORT ProtobufCService *pbrpc_client_service_with(pbrpc_client *c, const ProtobufCServiceDescriptor *desc,
							 const pbrpc_call_opts *opts);
PBRPC_EXPORT ProtobufCService *pbrpc_client_service_async_with(pbrpc_client *c,
							       const ProtobufCServiceDescriptor *desc,
							       const pbrpc_call_opts *opts);

/* Status of the call whose closure is running on this thread, or else of the
 * last synchronous call this thread made. *message (if not NULL) gets the
 * status message, valid until this thread's next call. */
PBRPC_EXPORT int pbrpc_client_status(const char **message);

/* The fds that came with the reply (PROTOCOL.md section 12). Inside a
 * stub's closure (synchronous or asynchronous): the reply's. After
 * pbrpc_client_call or pbrpc_client_call_raw has returned: that call's,
 * until this thread's next call. Moves up to max of them into fds (the
 * caller owns those and closes them) and returns how many it moved; the
 * reply's fds not taken by then are closed when the closure returns (or at
 * this thread's next call, or when the thread exits). Received
 * close-on-exec. A call made inside the closure replaces them: take the
 * reply's fds before making one. */
PBRPC_EXPORT size_t pbrpc_client_reply_fds(int *fds, size_t max);

/* Id of the last call this thread started (for pbrpc_client_cancel), 0 if none. */
PBRPC_EXPORT uint32_t pbrpc_client_last_call(void);

/* Cancels an asynchronous call: its closure runs with status CANCELLED (at the
 * latest from the next pbrpc_client_process) and a CANCEL frame tells the
 * server. Returns 0, or PBRPC_EINVALID if the call is not in flight. */
PBRPC_EXPORT int pbrpc_client_cancel(pbrpc_client *c, uint32_t call_id);

/* An fd that becomes readable when pbrpc_client_process() has work. */
PBRPC_EXPORT int pbrpc_client_fd(pbrpc_client *c);

/* Reads replies, runs the closures of completed asynchronous calls on this
 * thread, expires timeouts. Waits up to timeout_ms for something to do (0:
 * don't wait; < 0: until at least one closure ran or nothing is in flight).
 * Returns the number of closures run, or a negative code. */
PBRPC_EXPORT int pbrpc_client_process(pbrpc_client *c, int timeout_ms);

/* Number of asynchronous calls whose closure has not run yet. */
PBRPC_EXPORT size_t pbrpc_client_pending(pbrpc_client *c);

/* Runs pbrpc_client_process() until no asynchronous call is pending or
 * timeout_ms passes. Returns 0 or -ETIMEDOUT. */
PBRPC_EXPORT int pbrpc_client_drain(pbrpc_client *c, int timeout_ms);

/* ---- explicit calls, without generated stubs ---- */

typedef struct pbrpc_call_result {
	int status;        /* pbrpc_status */
	char message[256]; /* status message, NUL-terminated (cut if longer) */
} pbrpc_call_result;

/* Synchronous call with explicit types: packs `request`, waits, unpacks the
 * reply as `reply_desc` into *reply (free with protobuf_c_message_free_unpacked
 * and NULL allocator). Returns 0 when the call completed with status OK;
 * PBRPC_ESTATUS when the server answered with another status (see *result);
 * or a local error (-ETIMEDOUT is reported as status DEADLINE_EXCEEDED, a lost
 * connection as UNAVAILABLE; *result is filled in every case). */
PBRPC_EXPORT int pbrpc_client_call(pbrpc_client *c, const char *method, const ProtobufCMessage *request,
				   const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **reply,
				   const pbrpc_call_opts *opts, pbrpc_call_result *result);

/* The same with packed bytes both ways (for tools that know schemas only at
 * run time). *reply is malloc'd (free()); *reply_len its size. */
PBRPC_EXPORT int pbrpc_client_call_raw(pbrpc_client *c, const char *method, const void *request, size_t request_len,
				       uint8_t **reply, size_t *reply_len, const pbrpc_call_opts *opts,
				       pbrpc_call_result *result);

/* What the server announced in its HELLO (zeros before the first connection). */
PBRPC_EXPORT void pbrpc_client_server_hello(pbrpc_client *c, pbrpc_hello *out);

#ifdef __cplusplus
}
#endif
#endif
