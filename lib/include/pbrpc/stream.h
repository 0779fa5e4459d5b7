/* pbrpc streams: client, server and bidirectional streaming calls, with
 * flow control (docs/PROTOCOL.md section 11).
 *
 * A stream is a call: the client opens it with a REQUEST naming the method,
 * messages follow in the directions its kind allows, and the server ends it
 * with one final status. The call's deadline covers the whole stream; either
 * side may end it early (the client cancels, the server ends with a status).
 *
 *   kind                    client sends            server sends
 *   PBRPC_STREAM_CLIENT     many, then half-close   one reply with the status
 *   PBRPC_STREAM_SERVER     one request (at open)   many, then the status
 *   PBRPC_STREAM_BIDI       many, then half-close   many, then the status
 *
 * Messages are ProtobufCMessage values, packed and unpacked by pbrpc with the
 * descriptors of the method (pbrpc_stream_desc). The untyped functions here
 * are what generated typed wrappers call (protoc-gen-pbrpc); they can also be
 * used directly.
 *
 * Flow control. Each side grants, per stream, a window of bytes it is ready
 * to hold unread (announced in its HELLO: pbrpc_server_opts.stream_window,
 * pbrpc_client_opts.stream_window; default 64 KiB) and grants more as the
 * application consumes messages. A sender with no credit left on a stream
 * does not queue: pbrpc_stream_send() returns -EAGAIN (and the on_writable
 * callback runs once credit is back), pbrpc_client_stream_send() waits for
 * credit up to its timeout. So a fast producer never grows its peer's memory
 * (nor its own), and a stream whose consumer stalls stalls alone: other
 * streams and unary calls on the connection keep flowing.
 *
 * Both peers must support streams (Hello.features bit 0x8); this library
 * always does. A stream opened to a server without them ends with
 * UNIMPLEMENTED. A unary call (protoc-c's stub) to a stream method, or a
 * stream of the wrong kind, is refused with UNIMPLEMENTED, nothing run.
 *
 * Return codes: 0 (or a count where said) on success, negative codes
 * (pbrpc_strerror()) otherwise. RPC outcomes are PBRPC_STATUS_* values.
 */
#ifndef PBRPC_STREAM_H
#define PBRPC_STREAM_H

#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "pbrpc/error.h"
#include "pbrpc/common.h"
#include "pbrpc/server.h"
#include "pbrpc/client.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Which sides send a stream of messages. The values are bits: 1 the client
 * streams, 2 the server streams. 0 (unary) is not a stream kind. */
typedef enum pbrpc_stream_kind {
	PBRPC_STREAM_CLIENT = 1, /* rpc M(stream A) returns (B) */
	PBRPC_STREAM_SERVER = 2, /* rpc M(A) returns (stream B) */
	PBRPC_STREAM_BIDI = 3,   /* rpc M(stream A) returns (stream B) */
} pbrpc_stream_kind;

/* A stream method as both sides see it. Generated code emits one static
 * const per streaming method; the functions below copy what they need, so
 * a pbrpc_stream_desc may live on the stack (the descriptors it points to
 * must outlive the server or the stream: protoc-c's are static). */
typedef struct pbrpc_stream_desc {
	const char *method;                       /* "package.Service/Method" */
	pbrpc_stream_kind kind;
	const ProtobufCMessageDescriptor *input;  /* what the client sends */
	const ProtobufCMessageDescriptor *output; /* what the server sends */
} pbrpc_stream_desc;

/* ======================================================================
 * Server side
 *
 * Threads: every pbrpc_stream_* function, the handler and every stream
 * callback run on the server's loop thread (the thread that runs
 * pbrpc_server_run/pbrpc_server_process), also when opts.workers > 0: the
 * handler must not block. pbrpc_stream_cancelled() alone is safe from any
 * thread.
 *
 * Lifetime: a pbrpc_stream is created by pbrpc when the REQUEST opening it
 * arrives, handed to the method's handler, and stays valid until the
 * handler's code calls pbrpc_stream_end() on it, exactly once (as a unary
 * handler calls its closure once). After that no callback runs and the
 * pointer is dangling. A stream that is cancelled, expires or loses its
 * connection stays valid, too, until pbrpc_stream_end(): its on_cancel
 * callback says so, and pbrpc_stream_end() then only frees it.
 * pbrpc_server_free() runs on_cancel (UNAVAILABLE) of the streams still open,
 * then frees every stream not yet ended.
 * ====================================================================== */

typedef struct pbrpc_stream pbrpc_stream;

/* The handler of a stream method, called on the loop thread when a stream
 * opens. `user` is what was given at registration.
 * - PBRPC_STREAM_SERVER: `request` is the client's one message, owned by
 *   pbrpc and valid until pbrpc_stream_end(st). The handler sends replies
 *   (now, or later from callbacks or other handlers on the loop thread) and
 *   ends the stream.
 * - PBRPC_STREAM_CLIENT, PBRPC_STREAM_BIDI: `request` is NULL; the
 *   handler sets callbacks with pbrpc_stream_set_ops() to receive the
 *   client's messages. Messages that arrive before that are held (within
 *   the stream's window) and delivered once on_message is set. */
typedef void (*pbrpc_stream_handler_cb)(pbrpc_stream *st, const ProtobufCMessage *request, void *user);

/* Stream callbacks; any may be NULL. Each runs on the loop thread with the
 * `user` given to pbrpc_stream_set_ops(), and may call any pbrpc_stream_*
 * function on st, including pbrpc_stream_end() (then no other callback
 * follows). */
typedef struct pbrpc_stream_ops {
	/* A message from the client (CLIENT and BIDI streams), in order. msg is
	 * pbrpc's, valid until the callback returns; the window is credited back
	 * once it has returned. */
	void (*on_message)(pbrpc_stream *st, const ProtobufCMessage *msg, void *user);
	/* The client has ended its sending (half-close): no on_message follows.
	 * The stream stays open for the server's messages and status. */
	void (*on_half_close)(pbrpc_stream *st, void *user);
	/* Credit is back after pbrpc_stream_send() returned -EAGAIN. */
	void (*on_writable)(pbrpc_stream *st, void *user);
	/* The stream is over without the handler's word: the client cancelled
	 * it, its deadline passed, the connection closed, or the server's drain
	 * deadline came. The client has been answered (CANCELLED,
	 * DEADLINE_EXCEEDED, UNAVAILABLE) or is gone; pbrpc_stream_status()
	 * tells which. Sends now fail with PBRPC_ECLOSED. The handler must still
	 * call pbrpc_stream_end() (here or later); its status is then ignored.
	 * Called at most once. */
	void (*on_cancel)(pbrpc_stream *st, void *user);
} pbrpc_stream_ops;

/* Registers a stream method. desc is copied (its descriptors are borrowed);
 * user is passed to every call of handler. A method of that name in a
 * service given to pbrpc_server_add_service() (protoc-c's descriptors show
 * a streaming method as a unary one) is served by this handler, whichever is
 * registered first. Call before serving. Returns 0, PBRPC_EINVALID (no
 * handler, a bad kind or name, a NULL descriptor), PBRPC_EDUPLICATE (a
 * stream method of this name is registered), -ENOMEM. */
PBRPC_EXPORT int pbrpc_server_add_stream(pbrpc_server *srv, const pbrpc_stream_desc *desc,
					 pbrpc_stream_handler_cb handler, void *user);

/* The same, naming the method by its service's descriptor and the method's
 * name in it ("Watch"); input and output come from the method's descriptor,
 * the kind from the caller (protoc-c's descriptors do not record it).
 * Returns as above, PBRPC_EINVALID also when the service has no such
 * method. */
PBRPC_EXPORT int pbrpc_server_add_stream_method(pbrpc_server *srv, const ProtobufCServiceDescriptor *service,
						const char *method, pbrpc_stream_kind kind,
						pbrpc_stream_handler_cb handler, void *user);

/* Sets the stream's callbacks and their user pointer. ops is borrowed: it
 * must stay valid until pbrpc_stream_end() (usually a static const). May be
 * called again to change them. */
PBRPC_EXPORT void pbrpc_stream_set_ops(pbrpc_stream *st, const pbrpc_stream_ops *ops, void *user);

/* Sends one message to the client (SERVER and BIDI streams). msg is packed
 * before this returns and stays the caller's. Returns:
 *   0               queued for the client, in order;
 *   -EAGAIN         the stream has no credit: nothing was queued; on_writable
 *                   runs when the client has consumed enough to take more;
 *   PBRPC_ECLOSED   the stream is cancelled, expired or its connection gone
 *                   (see on_cancel); the handler still ends it;
 *   PBRPC_ETOOBIG   msg is larger than the client's max_frame (the stream
 *                   is unaffected);
 *   PBRPC_EINVALID  a CLIENT stream (its one reply goes to pbrpc_stream_end),
 *                   or msg is not of the method's output type;
 *   -ENOMEM.
 * A message may be sent while credit is positive, whatever its size, so one
 * message may take the credit below zero. */
PBRPC_EXPORT int pbrpc_stream_send(pbrpc_stream *st, const ProtobufCMessage *msg);

/* True while pbrpc_stream_send() would take a message now (credit left and
 * the stream live). */
PBRPC_EXPORT bool pbrpc_stream_writable(const pbrpc_stream *st);

/* Ends the stream with a status (PBRPC_STATUS_*) and a printf-style message
 * (may be NULL), and frees st. For a CLIENT stream with status OK, reply is
 * the one reply (NULL: an empty message); otherwise reply must be NULL and
 * is ignored. Messages sent before reach the client first. Ending does not
 * wait for the client's half-close: messages it sends later are dropped.
 * Called exactly once per stream, on the loop thread. Returns 0; or
 * PBRPC_EINVALID for a status outside 0..16 (sent as UNKNOWN), PBRPC_ECLOSED
 * when the stream was already over (see on_cancel: nothing is sent), -ENOMEM
 * (the client gets INTERNAL or a closed connection). st is freed whatever
 * this returns. */
PBRPC_EXPORT int pbrpc_stream_end(pbrpc_stream *st, int status, const ProtobufCMessage *reply, const char *fmt,
				  ...) __attribute__((format(printf, 4, 5)));

/* Stops (paused) or resumes delivering the client's messages. While paused,
 * arriving messages are held within the stream's window and no credit goes
 * back, so the client's sends wait: the application's own backpressure (a
 * slow disk behind an upload). Resuming delivers the held ones, from the
 * loop. */
PBRPC_EXPORT void pbrpc_stream_pause(pbrpc_stream *st, bool paused);

/* Runs fn(arg) on the stream's loop thread, soon (from that loop's next
 * round), where the stream functions may be called: the way another thread
 * (a worker, another loop with pbrpc_server_opts.loop_threads > 1) reaches
 * a stream. Safe from any thread while st is valid; the caller makes sure
 * of that (e.g. under a lock that its on_cancel also takes). fn is called
 * exactly once, also when the stream has ended meanwhile (the caller's
 * records say so) and, at pbrpc_server_free, after the streams' on_cancel.
 * Returns 0, PBRPC_EINVALID, -ENOMEM (fn will not run). */
PBRPC_EXPORT int pbrpc_stream_post(pbrpc_stream *st, void (*fn)(void *arg), void *arg);

/* True once the stream is over without the handler's word (on_cancel has
 * run or is about to). Safe from any thread. */
PBRPC_EXPORT bool pbrpc_stream_cancelled(const pbrpc_stream *st);

/* The status the client was given when the stream ended without the
 * handler (CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE), or -1 while it is
 * live. */
PBRPC_EXPORT int pbrpc_stream_status(const pbrpc_stream *st);

/* The stream's kind, as registered. */
PBRPC_EXPORT pbrpc_stream_kind pbrpc_stream_get_kind(const pbrpc_stream *st);

/* The stream's deadline, CLOCK_MONOTONIC nanoseconds, or 0 if the client
 * set none. */
PBRPC_EXPORT int64_t pbrpc_stream_deadline(const pbrpc_stream *st);

/* "package.Service/Method", NUL-terminated, valid until pbrpc_stream_end(). */
PBRPC_EXPORT const char *pbrpc_stream_method(const pbrpc_stream *st);

/* Value of a metadata key of the opening REQUEST, or NULL; *len (if not
 * NULL) gets its length. Valid until pbrpc_stream_end(). */
PBRPC_EXPORT const void *pbrpc_stream_metadata(const pbrpc_stream *st, const char *key, size_t *len);

/* The client's credentials (SO_PEERCRED) on Unix sockets, as they were when
 * the stream opened. Returns 0, -ENOTSUP on TCP. */
PBRPC_EXPORT int pbrpc_stream_peer_cred(const pbrpc_stream *st, pid_t *pid, uid_t *uid, gid_t *gid);

/* The application's pointer for this stream (set with pbrpc_stream_set_ops
 * or pbrpc_stream_set_user); NULL at first. */
PBRPC_EXPORT void *pbrpc_stream_user(const pbrpc_stream *st);
PBRPC_EXPORT void pbrpc_stream_set_user(pbrpc_stream *st, void *user);

/* ======================================================================
 * Client side
 *
 * A stream is opened on a pbrpc_client and is either synchronous (no
 * on_message in its options: the application receives with
 * pbrpc_client_stream_next()) or asynchronous (messages, the end and
 * writability arrive through callbacks, run where async closures run: on
 * the thread calling pbrpc_client_process(), or on the client's I/O thread
 * with opts.io_thread).
 *
 * Threads: a stream may be sent on by one thread and received on by
 * another at once (a bidirectional session); each of send/close_send and
 * next is for one thread at a time. cancel and status are safe from any
 * thread. A blocked send or next wakes when the stream ends, whoever ends it.
 *
 * Lifetime: a synchronous stream belongs to the application, which frees it
 * with pbrpc_client_stream_free() (no other thread may then use it). An
 * asynchronous stream belongs to pbrpc: it is freed after its final
 * on_message(st, NULL, user) has returned; pbrpc_client_stream_free() on it
 * only cancels it. Streams must be done before pbrpc_client_free(), which
 * ends the open ones with CANCELLED (async final callbacks run there).
 * ====================================================================== */

typedef struct pbrpc_client_stream pbrpc_client_stream;

/* Async streams: a message from the server, in order (msg pbrpc's, valid
 * until the callback returns; the window is credited back after it), or,
 * exactly once and last, msg == NULL: the stream has ended, and
 * pbrpc_client_stream_status() gives its final status. For a CLIENT stream
 * the server's one reply arrives here as a message, before the end. */
typedef void (*pbrpc_client_stream_message_cb)(pbrpc_client_stream *st, const ProtobufCMessage *msg, void *user);
/* Async streams: credit is back after a send returned -EAGAIN. */
typedef void (*pbrpc_client_stream_event_cb)(pbrpc_client_stream *st, void *user);

/* Options of one stream; zero means the default for every field. */
typedef struct pbrpc_stream_opts {
	/* Over the whole stream. Unlike unary calls, a stream does not take
	 * the client's call_timeout_ms: 0 or < 0 means no deadline. */
	int timeout_ms;
	int64_t deadline_ns;            /* absolute, CLOCK_MONOTONIC; takes
	                                 * precedence over timeout_ms when set */
	const pbrpc_metadata *metadata; /* copied at open */
	size_t metadata_count;
	uint32_t recv_window;           /* bytes of the server's messages this
	                                 * stream may hold unread; 0: the
	                                 * client's stream_window */
	pbrpc_client_stream_message_cb on_message; /* set: an async stream */
	pbrpc_client_stream_event_cb on_writable;  /* async streams only */
	void *user;                                /* passed to both */
} pbrpc_stream_opts;

/* Opens a stream for desc's method. desc is copied, its descriptors
 * borrowed (they must outlive the stream). For a SERVER stream, request is
 * the client's one message (packed now, stays the caller's) and the stream
 * is half-closed from the start; for CLIENT and BIDI streams it must be
 * NULL. opts may be NULL.
 *
 * The open waits (within the deadline) for a connection and a free call
 * slot, as a synchronous call does, and returns once the REQUEST is sent; it
 * does not wait for the server's answer. (An asynchronous stream's open
 * waits the same way.)
 *
 * Returns 0 with *out set; or, with *out NULL: PBRPC_EINVALID (a bad
 * method name or kind, a NULL descriptor, request given or missing
 * wrongly, request not of desc->input), PBRPC_ETOOBIG (request above the
 * server's max_frame), -ENOMEM. Every other failure (no connection, the
 * server refuses the method or lacks streams, deadline passed) still gives
 * a stream, already ended: its status says why (UNAVAILABLE,
 * UNIMPLEMENTED, DEADLINE_EXCEEDED, ...), next() returns PBRPC_ESTATUS, an
 * async stream gets its final callback. */
PBRPC_EXPORT int pbrpc_client_stream_open(pbrpc_client *c, const pbrpc_stream_desc *desc,
					  const ProtobufCMessage *request, const pbrpc_stream_opts *opts,
					  pbrpc_client_stream **out);

/* Sends one message (CLIENT and BIDI streams). msg is packed before this
 * returns and stays the caller's. Without credit, waits for it up to
 * timeout_ms (< 0: until the stream's deadline; 0: not at all); the waiting
 * thread reads the connection meanwhile. Returns:
 *   0               sent (queued on the connection, in order);
 *   -EAGAIN         no credit and timeout_ms was 0 (async: on_writable will
 *                   run); nothing sent;
 *   -ETIMEDOUT      no credit within timeout_ms; nothing sent, the stream
 *                   goes on;
 *   PBRPC_ESTATUS   the stream has ended (the server's status, a cancel,
 *                   the deadline, the connection lost): see
 *                   pbrpc_client_stream_status();
 *   PBRPC_EINVALID  a SERVER stream, after close_send, or msg not of
 *                   desc->input;
 *   PBRPC_ETOOBIG   msg above the server's max_frame (nothing sent, the
 *                   stream goes on);
 *   -ENOMEM.
 * Inside async callbacks use timeout_ms 0. */
PBRPC_EXPORT int pbrpc_client_stream_send(pbrpc_client_stream *st, const ProtobufCMessage *msg, int timeout_ms);

/* Ends the client's sending (half-close); the server still sends and ends
 * the stream. Not flow-controlled: never waits. A no-op (0) for a SERVER
 * stream and when already done. Returns 0, PBRPC_ESTATUS when the stream has
 * ended (nothing to close), -ENOMEM. */
PBRPC_EXPORT int pbrpc_client_stream_close_send(pbrpc_client_stream *st);

/* Receives the next message of a synchronous stream, waiting up to
 * timeout_ms (< 0: until one arrives or the stream ends; the stream's
 * deadline still applies). The waiting thread reads the connection. On 1,
 * *msg is the message, owned by the stream and valid until the next
 * pbrpc_client_stream_next() or pbrpc_client_stream_free() on it. Returns:
 *   1               a message in *msg;
 *   0               the stream has ended with status OK (*msg NULL);
 *   PBRPC_ESTATUS   it has ended with another status: see
 *                   pbrpc_client_stream_status() (a message that does not
 *                   unpack as desc->output ends it with INTERNAL and a
 *                   CANCEL to the server);
 *   -EAGAIN         nothing yet and timeout_ms was 0;
 *   -ETIMEDOUT      nothing within timeout_ms; the stream goes on;
 *   PBRPC_EINVALID  an asynchronous stream. */
PBRPC_EXPORT int pbrpc_client_stream_next(pbrpc_client_stream *st, const ProtobufCMessage **msg, int timeout_ms);

/* Cancels the stream: a CANCEL tells the server, the status becomes
 * CANCELLED unless the stream has already ended, blocked send/next return
 * PBRPC_ESTATUS, an async stream's final callback runs (where its callbacks
 * run, never inside this call). Safe from any thread, any number of times,
 * until the stream is freed. */
PBRPC_EXPORT void pbrpc_client_stream_cancel(pbrpc_client_stream *st);

/* The final status (PBRPC_STATUS_*, >= 0) once the stream has ended, or
 * -EINPROGRESS while it is open. *message (if not NULL) gets the status
 * message, NUL-terminated, "" if none, valid until the stream is freed. The
 * status messages of local failures are the client's (e.g. "deadline
 * exceeded after 200 ms"). Messages still queued may be read with next()
 * after an OK end; a failure drops them. */
PBRPC_EXPORT int pbrpc_client_stream_status(const pbrpc_client_stream *st, const char **message);

/* Frees a synchronous stream, first cancelling it if it has not ended (the
 * call id stays reserved until the server answers). An asynchronous stream
 * is cancelled instead (pbrpc frees it after its final callback). NULL is a
 * no-op. */
PBRPC_EXPORT void pbrpc_client_stream_free(pbrpc_client_stream *st);

#ifdef __cplusplus
}
#endif
#endif
