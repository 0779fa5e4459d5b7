/* One connection for both roles: the fd, the handshake, the decoder and the
 * writer, the peer's HELLO, the call-id map, and every connection-level frame
 * (header checks, HELLO, PING/PONG, GOAWAY, oversized frames). The server and
 * the client embed a pbrpc__conn in their own connection record and plug in
 * through pbrpc__conn_ops; they add policy (who reads when, threads, retries)
 * and nothing of the protocol's connection layer.
 *
 * Steps return > 0 progress, 0 would block, < 0 error (sd-varlink's
 * contract). Poll events and the next deadline are derived from the state
 * (pbrpc__conn_events, pbrpc__conn_deadline), never cached here.
 *
 * Closing: pbrpc__conn_fail sends GOAWAY(status, why) best effort, then
 * closes; pbrpc__conn_close closes without a word (the peer is gone). Both end
 * in ops->on_close, exactly once. on_close must not free the connection (the
 * conn function that closed it may still read its fields): the role frees it,
 * with pbrpc__conn_fini, once that call has returned.
 *
 * Not thread-safe: one thread at a time calls into a connection (the client
 * serialises with its mutex; only pbrpc__conn_recv may run outside it, by the
 * connection's one reader).
 */
#ifndef PBRPC_CONN_CONN_H
#define PBRPC_CONN_CONN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "pbrpc/common.h"
#include "proto/frame.h"
#include "proto/wire.h"
#include "util/clock.h"
#include "util/idmap.h"
#include "util/io.h"

typedef enum pbrpc__conn_state {
	PBRPC__CONN_PREFACE, /* waiting for the peer's 8-byte preface */
	PBRPC__CONN_HELLO,   /* waiting for the peer's HELLO */
	PBRPC__CONN_OPEN,
	PBRPC__CONN_CLOSED,
} pbrpc__conn_state;

typedef enum pbrpc__conn_role {
	PBRPC__CONN_CLIENT, /* sends REQUEST/CANCEL, receives RESPONSE */
	PBRPC__CONN_SERVER, /* receives REQUEST/CANCEL, sends RESPONSE */
} pbrpc__conn_role;

typedef struct pbrpc__conn pbrpc__conn;
struct pbrpc__tls;

/* fds that arrived with one read, and the stream range [start, end) of the
 * bytes that read gave the decoder: they belong to the one frame with an fd
 * count whose first byte lies in that range (PROTOCOL.md section 12). */
typedef struct pbrpc__conn_fdbatch {
	uint64_t start, end;
	unsigned n;
} pbrpc__conn_fdbatch;
#define PBRPC__CONN_FD_BATCHES 4

/* How the role hears of what arrives. Each runs inside a conn call, on the
 * thread that made it; any may close the connection. `arg` is what the role
 * passed to pbrpc__conn_dispatch. */
typedef struct pbrpc__conn_ops {
	void (*on_open)(pbrpc__conn *c);                       /* the peer's HELLO arrived */
	void (*on_request)(pbrpc__conn *c, const pbrpc__frame *f); /* server: a REQUEST */
	void (*on_cancel)(pbrpc__conn *c, uint32_t call_id);   /* server: a CANCEL */
	/* client: a decoded RESPONSE. Returns true to stop dispatching: its
	 * views stay valid in the decoder until the next call on c. */
	bool (*on_response)(pbrpc__conn *c, const pbrpc__wire_response *r, void *arg);
	void (*on_goaway)(pbrpc__conn *c); /* GOAWAY(OK): c is draining now */
	/* Streams (PBRPC_FEATURE_STREAMS in effect): a MESSAGE or WINDOW, or
	 * (server) a HALF_CLOSE, its header checked. Returns true to stop
	 * dispatching, as on_response. NULL: such frames are unexpected. */
	bool (*on_stream)(pbrpc__conn *c, const pbrpc__frame *f, void *arg);
	/* c is CLOSED. err: local code (PBRPC_EOF, PBRPC_EPROTO, -ECONNRESET,
	 * ...); why: what happened, as the peer would be told. The fd is still
	 * open; see the file comment about freeing. */
	void (*on_close)(pbrpc__conn *c, int err, const char *why);
} pbrpc__conn_ops;

struct pbrpc__conn {
	int fd;
	uint8_t state;       /* pbrpc__conn_state */
	uint8_t role;        /* pbrpc__conn_role */
	uint8_t preface_got; /* bytes of the peer's preface checked so far */
	uint8_t closed_in;   /* the state the connection was closed in */
	bool draining;       /* no new calls: GOAWAY(OK) sent or received */
	bool peer_quiet;     /* draining, and the peer has shown it sends no more
	                      * requests: it answered our drain PING, sent GOAWAY */
	bool read_paused;    /* output above max_output: stop reading */
	bool resume;         /* just unpaused: frames stashed in the decoder wait */
	bool read_eof;       /* server: the client half-closed with calls in flight */
	bool mem_paused;     /* the role's memory budget is spent: stop reading */
	bool unix_sock;      /* AF_UNIX: the fd features may be announced */
	bool fd_rx;          /* reads have room for SCM_RIGHTS (see below) */
	int goaway_sent;     /* status of the GOAWAY pbrpc__conn_fail sent, or -1 */
	                     /* (>= 0: the connection was closed by a failure) */
	uint32_t max_frame;      /* ours: largest payload we accept */
	uint32_t peer_max_frame; /* the peer's HELLO, clamped: largest we may send */
	uint32_t peer_max_calls; /* the peer's HELLO; 0: no limit */
	uint64_t our_features;   /* what our HELLO announced */
	uint64_t features;       /* in effect: announced by both */
	uint32_t stream_window;      /* ours as announced, defaulted: what each stream
	                              * may send us unread (streams) */
	uint32_t peer_stream_window; /* the peer's, defaulted: what we may send */
	pbrpc_hello peer;        /* the peer's HELLO as received (agent cut) */
	pbrpc__frame_decoder dec;
	pbrpc__frame_writer out;
	pbrpc__idmap calls; /* call id -> the role's call record */
	const pbrpc__conn_ops *ops;

	/* Policy the role sets (0: off); pbrpc__conn_deadline derives from them. */
	size_t max_output;                  /* bound on queued output bytes */
	pbrpc__deadline handshake_deadline; /* HELLO must arrive by then */
	int64_t idle_ns;                    /* no calls and no bytes for this long */
	int64_t stall_ns;                   /* paused and the peer reads nothing */
	int64_t last_active;                /* last read, or last call answered */
	int64_t stalled_since;              /* while paused: last write progress */

	/* fds (features FDS and MEMFD; Unix sockets only). Received fds are
	 * the connection's until a frame claims them, then the frame's
	 * (fdx->frame_fds) while its handler runs: the role takes what it
	 * keeps, the rest is closed when the handler returns. The record for
	 * them is allocated when fds first arrive. */
	uint8_t rx_nb;       /* batches of fds not yet claimed (in fdx) */
	unsigned frame_nfds; /* fds of the frame being handled */
	uint64_t rx_pos;     /* bytes given to the decoder so far (while fd_rx) */
	struct pbrpc__conn_fdx *fdx;
	const char *fd_why;  /* why received fds broke the protocol (read_failed says it) */
	/* Keepalive and connection age (PROTOCOL.md section 7; 0: off), set by
	 * the role like the policy above; pbrpc__conn_deadline derives from them. */
	int64_t last_read;      /* the role's clock at the last read (also "now" for strikes) */
	int64_t ka_interval_ns; /* PING after this long without reading anything */
	int64_t ka_timeout_ns;  /* ...and close if nothing comes back within this */
	int64_t ka_ping_at;     /* our keepalive PING went out then; 0: none outstanding */
	int64_t ping_min_ns;    /* peer PINGs closer than this, no REQUEST between: strikes */
	int64_t peer_ping_at;   /* the peer's last PING came then (last_read) */
	uint8_t ping_strikes;   /* so far; more than PBRPC__CONN_PING_STRIKES closes */
	bool request_since_ping;  /* a REQUEST came after the peer's last PING */
	pbrpc__deadline age_at;   /* OPEN at then: begin a drain ("max connection age") */
	int64_t drain_grace_ns;   /* a drain begun by age closes this long after */
	pbrpc__deadline drain_close_at; /* ...then (calls still in flight fail) */
	/* TLS (conn/tls.h): NULL for plaintext. Set by the role right after
	 * pbrpc__conn_init; owned: pbrpc__conn_fini frees it. */
	struct pbrpc__tls *tls;
	int64_t recv_timeout_ns; /* TLS: how long a blocking read waits (0: for
	                          * ever), as SO_RCVTIMEO does for plaintext */
};

/* A peer may send this many PINGs too soon (see ping_min_ns); the next one
 * is answered GOAWAY(RESOURCE_EXHAUSTED, "too many pings") and a close. */
#define PBRPC__CONN_PING_STRIKES 2

typedef struct pbrpc__conn_fdx {
	pbrpc__conn_fdbatch rx_b[PBRPC__CONN_FD_BATCHES];
	int *rx_fds;
	unsigned rx_nfds, rx_cap;
	int frame_fds[PBRPC__IO_FDS_MAX];
	char why[128];
} pbrpc__conn_fdx;

/* The fds of the frame being handled (frame_nfds of them); the role may
 * take one by copying it and writing -1 in its place. */
static inline int *pbrpc__conn_frame_fds(pbrpc__conn *c)
{
	return c->fdx->frame_fds;
}

/* Sets up c on a connected fd (taken over: pbrpc__conn_fini closes it) and
 * queues our preface and HELLO (ours; its max_frame, 0 for the default, is
 * also the decoder's limit). Returns 0 or -ENOMEM. */
int pbrpc__conn_init(pbrpc__conn *c, int fd, pbrpc__conn_role role, const pbrpc__conn_ops *ops,
		     const pbrpc_hello *ours);

/* Frees the buffers and the id map (not the records it points at) and
 * closes the fd. Does not call on_close. */
void pbrpc__conn_fini(pbrpc__conn *c);

/* One read without blocking (flags: MSG_DONTWAIT, or 0 to block on a
 * blocking socket). With scratch, the bytes land there and are offered to
 * the decoder in place: call pbrpc__conn_dispatch before reusing scratch.
 * Without (or while a frame is split across reads), they land in the
 * decoder's own buffer. Preface bytes are checked here. Returns the bytes
 * read (> 0), 0 if it would block, or < 0 with nothing closed yet: the
 * caller passes the code to pbrpc__conn_read_failed (it may hold no lock
 * here; that call needs one). */
ssize_t pbrpc__conn_recv(pbrpc__conn *c, uint8_t *scratch, size_t cap, int flags);

/* pbrpc__conn_recv for an OPEN connection's one reader, which may hold no
 * lock: reads into the decoder and touches nothing another thread writes
 * (a concurrent close only shuts the socket down, so this returns EOF). */
ssize_t pbrpc__conn_recv_open_fds(pbrpc__conn *c, int flags);
ssize_t pbrpc__conn_tls_recv_open(pbrpc__conn *c, int flags);
static inline ssize_t pbrpc__conn_recv_open(pbrpc__conn *c, int flags)
{
	if (__builtin_expect(c->tls != NULL, 0))
		return pbrpc__conn_tls_recv_open(c, flags);
	if (__builtin_expect(c->fd_rx, 0))
		return pbrpc__conn_recv_open_fds(c, flags);
	return pbrpc__frame_decoder_recv(&c->dec, c->fd, flags);
}

/* True when fds may travel on c (both sides announced FDS). */
static inline bool pbrpc__conn_fds_ok(const pbrpc__conn *c)
{
	return (c->features & PBRPC_FEATURE_FDS) != 0;
}

/* True when bodies may travel in sealed memfds (FDS and MEMFD in effect). */
static inline bool pbrpc__conn_memfd_ok(const pbrpc__conn *c)
{
	return (c->features & (PBRPC_FEATURE_FDS | PBRPC_FEATURE_MEMFD)) == (PBRPC_FEATURE_FDS | PBRPC_FEATURE_MEMFD);
}

/* Closes c after a failed read, with the words for it: a clean end of
 * stream, one inside a frame, a bad preface, or the error. */
void pbrpc__conn_read_failed(pbrpc__conn *c, int err);

/* Handles the complete frames buffered in the decoder. Stops early while
 * output is over max_output (the rest stays stashed in the decoder: see
 * `resume`). Returns 1 when on_response asked to stop, 0 otherwise (more
 * bytes needed, paused, or closed). */
int pbrpc__conn_dispatch(pbrpc__conn *c, void *arg);

/* Writes queued output without blocking and keeps read_paused and
 * stalled_since up to date against max_output. `now` is a recent clock
 * reading. Returns bytes written (> 0), 0 (nothing written), or -errno;
 * a failed write closes nothing: the caller decides (the server closes,
 * the client first reads what the peer said). */
ssize_t pbrpc__conn_flush(pbrpc__conn *c, int64_t now);

/* Begins a graceful drain from our side: GOAWAY(OK, why), then a PING whose
 * PONG proves the peer has read the GOAWAY: every request it sent before
 * has arrived by then, and it sends no more (peer_quiet). */
void pbrpc__conn_goaway(pbrpc__conn *c, const char *why);

/* Sends GOAWAY(status, why) best effort, then closes (on_close with err). */
__attribute__((format(printf, 4, 5))) void pbrpc__conn_fail(pbrpc__conn *c, int status, int err, const char *fmt,
							   ...);

/* Closes without sending anything (on_close with err). */
__attribute__((format(printf, 3, 4))) void pbrpc__conn_close(pbrpc__conn *c, int err, const char *fmt, ...);

/* Queues a RESPONSE with a status and no body. not_run: no handler ran for
 * the call (flagged on the wire where PBRPC_FEATURE_NOT_RUN is in effect, so
 * that the client may retry it). Returns 0 or a negative code. */
int pbrpc__conn_reply_status(pbrpc__conn *c, uint32_t call_id, int status, const char *message, bool not_run);

/* Expires the policy timeouts due at `now`: no HELLO in time ("handshake
 * timed out"), the peer reading nothing while paused, idleness, a keepalive
 * PING unanswered, the end of an age drain's grace: each closes c with
 * GOAWAY. It also queues what is due without closing: a keepalive PING after
 * ka_interval_ns of silence, the drain GOAWAY at age_at (the role flushes). */
void pbrpc__conn_expire(pbrpc__conn *c, int64_t now);

/* When pbrpc__conn_expire has something to do next (0: nothing pending). */
pbrpc__deadline pbrpc__conn_deadline(const pbrpc__conn *c);

/* Frames larger than `avail` bytes (and than max_frame) are refused from
 * their header on: a REQUEST is skipped as it arrives and answered
 * RESOURCE_EXHAUSTED, as one over max_frame is. The role's memory budget. */
static inline void pbrpc__conn_admit(pbrpc__conn *c, size_t avail)
{
	c->dec.max_payload = avail < c->max_frame ? (uint32_t)avail : c->max_frame;
}

/* EPOLLIN unless paused (output or memory) or closed, EPOLLOUT while output
 * is queued; during a TLS handshake, what the handshake waits for. */
uint32_t pbrpc__conn_events(const pbrpc__conn *c);

/* ---- the TLS transport (conn/tls.c; only when c->tls is set) ---- */

/* One read of decrypted bytes into buf, without blocking (after the
 * handshake, which it drives). Returns as pbrpc__io_recv does, or
 * PBRPC_ETLS / PBRPC_ENOTLS (pbrpc__tls_why says why). */
ssize_t pbrpc__conn_tls_recv(pbrpc__conn *c, uint8_t *buf, size_t cap);
/* Writes queued output (after the handshake, which it drives). Returns as
 * pbrpc__frame_writer_flush does, or PBRPC_ETLS. */
ssize_t pbrpc__conn_tls_flush(pbrpc__conn *c);
uint32_t pbrpc__conn_tls_events(const pbrpc__conn *c, uint32_t plain);
bool pbrpc__conn_tls_buffered(const pbrpc__conn *c);

/* Bytes that no poll will report: decrypted or buffered inside OpenSSL, or
 * an error waiting to be read. The role reads again without waiting. */
static inline bool pbrpc__conn_buffered(const pbrpc__conn *c)
{
	return c->tls && pbrpc__conn_tls_buffered(c);
}

static inline bool pbrpc__conn_closed(const pbrpc__conn *c)
{
	return c->state == PBRPC__CONN_CLOSED;
}

static inline size_t pbrpc__conn_pending_out(const pbrpc__conn *c)
{
	return c->out.tail - c->out.head;
}

/* Bytes buffered in the decoder (frames not yet dispatched, or a part). */
static inline size_t pbrpc__conn_pending_in(const pbrpc__conn *c)
{
	const pbrpc__frame_decoder *d = &c->dec;
	return d->tail - d->head + d->in_len + (size_t)d->discard;
}

/* Draining, the peer quiet (a server waits for that: requests may still be
 * on the wire), no call in flight, nothing left to write: time to close. */
static inline bool pbrpc__conn_drained(const pbrpc__conn *c)
{
	return c->draining && (c->peer_quiet || c->role == PBRPC__CONN_CLIENT) &&
	       pbrpc__idmap_count(&c->calls) == 0 && pbrpc__conn_pending_out(c) == 0;
}

/* "client" or "server": the other side, for messages. */
static inline const char *pbrpc__conn_peer_name(const pbrpc__conn *c)
{
	return c->role == PBRPC__CONN_CLIENT ? "server" : "client";
}

#endif
