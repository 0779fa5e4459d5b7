/* The connection core shared by the server and the client (see conn.h). */
#include "conn/conn.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include <stdlib.h>
#include <sys/socket.h>

#include "conn/tls.h"
#include "util/io.h"

#define WHY_MAX 256

/* The payload of the PING that follows our drain GOAWAY. */
static const uint8_t drain_ping[PBRPC_WIRE_PING_SIZE] = { 'p', 'b', 'r', 'p', 'c', '-', 'd', 'r' };
/* The payload of a keepalive PING. */
static const uint8_t ka_ping[PBRPC_WIRE_PING_SIZE] = { 'p', 'b', 'r', 'p', 'c', '-', 'k', 'a' };

int pbrpc__conn_init(pbrpc__conn *c, int fd, pbrpc__conn_role role, const pbrpc__conn_ops *ops,
		     const pbrpc_hello *ours)
{
	memset(c, 0, sizeof(*c));
	c->fd = fd;
	c->state = PBRPC__CONN_PREFACE;
	c->closed_in = PBRPC__CONN_PREFACE;
	c->role = (uint8_t)role;
	c->goaway_sent = -1;
	c->ops = ops;
	c->our_features = ours->features;
	c->max_frame = ours->max_frame ? ours->max_frame : PBRPC_MAX_FRAME_DEFAULT;
	if (c->max_frame > PBRPC_MAX_FRAME_LIMIT)
		c->max_frame = PBRPC_MAX_FRAME_LIMIT;
	c->peer_max_frame = PBRPC_MAX_FRAME_DEFAULT;
	c->stream_window = ours->stream_window ? ours->stream_window : PBRPC_STREAM_WINDOW_DEFAULT;
	pbrpc__frame_decoder_init(&c->dec, c->max_frame);
	pbrpc__frame_writer_init(&c->out);
	pbrpc__idmap_init(&c->calls);
	/* fds travel over Unix sockets only: elsewhere the features are not
	 * even announced, so that a peer never tries (PROTOCOL.md section 12). */
	int dom = 0;
	socklen_t dl = sizeof(dom);
	c->unix_sock = getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &dom, &dl) == 0 && dom == AF_UNIX;
	pbrpc_hello h = *ours;
	if (!c->unix_sock)
		h.features &= ~PBRPC_FEATURES_UNIX;
	c->our_features = h.features;
	c->fd_rx = c->unix_sock && (h.features & PBRPC_FEATURE_FDS);
	return pbrpc__wire_write_preface(&c->out, &h);
}

static void close_rx_fds(pbrpc__conn *c);
static void frame_fds_drop(pbrpc__conn *c);

void pbrpc__conn_fini(pbrpc__conn *c)
{
	close_rx_fds(c);
	if (c->fdx) {
		frame_fds_drop(c);
		free(c->fdx->rx_fds);
		free(c->fdx);
		c->fdx = NULL;
	}
	pbrpc__frame_decoder_fini(&c->dec);
	pbrpc__frame_writer_fini(&c->out);
	pbrpc__idmap_fini(&c->calls);
	if (c->tls)
		pbrpc__tls_free(c->tls);
	c->tls = NULL;
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
}

/* ---- closing ---- */

__attribute__((format(printf, 3, 0))) static void conn_vclose(pbrpc__conn *c, int err, const char *fmt, va_list ap)
{
	char why[WHY_MAX];
	vsnprintf(why, sizeof(why), fmt, ap);
	c->closed_in = c->state;
	c->state = PBRPC__CONN_CLOSED;
	c->read_paused = false;
	c->resume = false;
	if (c->tls)
		pbrpc__tls_close(c->tls);
	c->ops->on_close(c, err, why); /* the role clears mem_paused, its own flag */
}

void pbrpc__conn_close(pbrpc__conn *c, int err, const char *fmt, ...)
{
	if (c->state == PBRPC__CONN_CLOSED)
		return;
	va_list ap;
	va_start(ap, fmt);
	conn_vclose(c, err, fmt, ap);
	va_end(ap);
}

/* The one "GOAWAY, then close" path. */
void pbrpc__conn_fail(pbrpc__conn *c, int status, int err, const char *fmt, ...)
{
	if (c->state == PBRPC__CONN_CLOSED)
		return;
	char why[WHY_MAX];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	char said[WHY_MAX];
	size_t room = c->peer_max_frame > 4 ? c->peer_max_frame - 4 : 0; /* what the peer accepts */
	snprintf(said, sizeof(said), "%.*s", (int)pbrpc__wire_message_len(why, strlen(why), room), why);
	if (pbrpc__wire_write_goaway(&c->out, status, said) == 0) {
		c->goaway_sent = status;
		if (c->tls)
			pbrpc__conn_tls_flush(c);
		else
			pbrpc__frame_writer_flush(&c->out, c->fd, MSG_DONTWAIT);
	}
	pbrpc__conn_close(c, err, "%s", why);
}

void pbrpc__conn_goaway(pbrpc__conn *c, const char *why)
{
	if (c->draining || c->state == PBRPC__CONN_CLOSED)
		return;
	c->draining = true;
	pbrpc__wire_write_goaway(&c->out, PBRPC_STATUS_OK, why);
	pbrpc__wire_write_ping(&c->out, PBRPC_FRAME_PING, drain_ping);
}

/* A plaintext pbrpc client on a TLS port: it is told so in plaintext, in
 * place of our HELLO (docs/PROTOCOL.md, "TLS"). */
static void refuse_plaintext(pbrpc__conn *c)
{
	pbrpc__tls_free(c->tls);
	c->tls = NULL;
	pbrpc__frame_writer_fini(&c->out);
	pbrpc__frame_writer_init(&c->out);
	pbrpc__frame_writer_append_raw(&c->out, PBRPC_WIRE_PREFACE, PBRPC_WIRE_PREFACE_SIZE);
	pbrpc__conn_fail(c, PBRPC_STATUS_UNAVAILABLE, PBRPC_ENOTLS, "the client sent a plaintext pbrpc preface: this port expects TLS (connect with tls:HOST:PORT)");
}

static void tls_failed(pbrpc__conn *c, int err)
{
	if (err == PBRPC_ENOTLS && c->role == PBRPC__CONN_SERVER && !pbrpc__tls_established(c->tls)) {
		refuse_plaintext(c);
		return;
	}
	const char *why = pbrpc__tls_why(c->tls);
	if (pbrpc__tls_usable(c->tls))
		pbrpc__conn_fail(c, PBRPC_STATUS_UNAVAILABLE, err, "TLS: %s", why);
	else
		pbrpc__conn_close(c, err, "TLS: %s", why);
}

/* Reads and drops what the peer sent (a ClientHello on a plaintext port):
 * closing with bytes unread would send a reset that may overtake our GOAWAY. */
static void drain_input(pbrpc__conn *c)
{
	uint8_t buf[2048];
	for (int i = 0; i < 1024 && pbrpc__io_recv(c->fd, buf, sizeof(buf), MSG_DONTWAIT) > 0; i++)
		;
}

void pbrpc__conn_read_failed(pbrpc__conn *c, int err)
{
	const char *peer = pbrpc__conn_peer_name(c);
	if (c->tls && (err == PBRPC_ETLS || err == PBRPC_ENOTLS || (err > -4096 && err < 0 && c->state != PBRPC__CONN_OPEN)))
		tls_failed(c, err); /* a socket error in the handshakes too: TLS knows more */
	else if (err == PBRPC_ETLSPEER) {
		drain_input(c);
		pbrpc__conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, err,
				 "bad preface: the %s speaks TLS and this port is plaintext (use tcp:, or serve tls:)", peer);
	} else if (err == PBRPC_EBADMAGIC)
		pbrpc__conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, err, "bad preface: peer is not a pbrpc %s", peer);
	else if ((err == PBRPC_EOF || err == PBRPC_ETRUNCATED) && c->state != PBRPC__CONN_OPEN)
		pbrpc__conn_close(c, err, "connection closed by %s during the handshake", peer);
	else if (err == PBRPC_EOF && c->role == PBRPC__CONN_SERVER && pbrpc__idmap_count(&c->calls) && !c->read_eof) {
		/* A half-close at a frame boundary: the client sends no more, its
		 * calls in flight are still answered, then the server closes. */
		c->read_eof = true;
		c->draining = true;
		c->peer_quiet = true;
	} else if (err == PBRPC_EOF)
		pbrpc__conn_close(c, err, "connection closed by %s", peer);
	else if (err == PBRPC_ETRUNCATED)
		pbrpc__conn_close(c, err, "connection closed by %s in the middle of a frame", peer);
	else if (err == PBRPC_EPROTO && c->fd_why)
		pbrpc__conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, err, "%s", c->fd_why);
	else
		pbrpc__conn_close(c, err, "connection lost: read failed: %s", pbrpc_strerror(err));
}

/* ---- reading ---- */

/* Checks preface bytes; returns how many of n it used, or -1 on a mismatch. */
static ssize_t eat_preface(pbrpc__conn *c, const uint8_t *p, size_t n)
{
	size_t used = 0;
	while (c->state == PBRPC__CONN_PREFACE && used < n) {
		if (p[used] != (uint8_t)PBRPC_WIRE_PREFACE[c->preface_got])
			return -1;
		used++;
		if (++c->preface_got == PBRPC_WIRE_PREFACE_SIZE)
			c->state = PBRPC__CONN_HELLO;
	}
	return (ssize_t)used;
}

/* ---- fds that arrive (PROTOCOL.md section 12) ---- */

/* Notes the fds one read brought; `len` bytes of it went to the decoder.
 * Returns 0 or PBRPC_EPROTO with fd_why set (the fds are closed). */
static __attribute__((noinline)) int rx_note_slow(pbrpc__conn *c, pbrpc__io_fds *rx, uint64_t start, size_t len)
{
	const char *peer = pbrpc__conn_peer_name(c);
	if (!c->fdx && !(c->fdx = calloc(1, sizeof(*c->fdx)))) {
		c->fd_why = "out of memory for received file descriptors";
		goto fail;
	}
	pbrpc__conn_fdx *x = c->fdx;
	if (rx->truncated) {
		snprintf(x->why, sizeof(x->why), "file descriptors from the %s were lost (MSG_CTRUNC)", peer);
		goto why;
	}
	if (c->rx_nb == PBRPC__CONN_FD_BATCHES || x->rx_nfds + rx->n > 4 * PBRPC__IO_FDS_MAX) {
		snprintf(x->why, sizeof(x->why), "too many file descriptors from the %s not claimed by a frame", peer);
		goto why;
	}
	if (x->rx_nfds + rx->n > x->rx_cap) {
		unsigned cap = x->rx_cap ? x->rx_cap : 16;
		while (cap < x->rx_nfds + rx->n)
			cap *= 2;
		int *nb = realloc(x->rx_fds, cap * sizeof(int));
		if (!nb) {
			c->fd_why = "out of memory for received file descriptors";
			goto fail;
		}
		x->rx_fds = nb;
		x->rx_cap = cap;
	}
	memcpy(x->rx_fds + x->rx_nfds, rx->fds, rx->n * sizeof(int));
	x->rx_nfds += rx->n;
	x->rx_b[c->rx_nb++] = (pbrpc__conn_fdbatch){ .start = start, .end = start + len, .n = rx->n };
	return 0;
why:
	c->fd_why = x->why;
fail:
	pbrpc__io_close_fds(rx->fds, rx->n);
	return PBRPC_EPROTO;
}

static inline int rx_note(pbrpc__conn *c, pbrpc__io_fds *rx, size_t len)
{
	uint64_t start = c->rx_pos;
	c->rx_pos += len;
	if (__builtin_expect(!rx->n && !rx->truncated, 1))
		return 0;
	return rx_note_slow(c, rx, start, len);
}

static void close_rx_fds(pbrpc__conn *c)
{
	if (c->fdx) {
		pbrpc__io_close_fds(c->fdx->rx_fds, c->fdx->rx_nfds);
		c->fdx->rx_nfds = 0;
	}
	c->rx_nb = 0;
}

ssize_t pbrpc__conn_recv_open_fds(pbrpc__conn *c, int flags)
{
	pbrpc__io_fds rx;
	ssize_t n = pbrpc__frame_decoder_recv_fds(&c->dec, c->fd, flags, &rx);
	if (n > 0 && rx_note(c, &rx, (size_t)n) < 0)
		return PBRPC_EPROTO;
	return n;
}

/* Bytes given to the decoder and not yet yielded as frames. */
static uint64_t dec_held(const pbrpc__conn *c)
{
	return (c->dec.tail - c->dec.head) + c->dec.in_len;
}

__attribute__((format(printf, 2, 3))) static bool fd_fail(pbrpc__conn *c, const char *fmt, ...)
{
	char why[WHY_MAX];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	close_rx_fds(c);
	pbrpc__conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO, "%s", why);
	return false;
}

/* Fds no frame claimed: every frame that began among the bytes they came
 * with has been handled (`done`: the stream position before which all
 * frames are). */
static bool rx_orphans(pbrpc__conn *c, uint64_t done)
{
	if (c->rx_nb && c->fdx->rx_b[0].end <= done)
		return fd_fail(c, "%u file descriptors arrived with no frame that declared them", c->fdx->rx_b[0].n);
	return true;
}

/* Binds the fds that came with the frame at [start, end) to it (into
 * frame_fds), or fails the connection: they must have arrived with its first
 * byte, as many as its header says. A sender ends the write that carries
 * fds with their frame, so the frame that owns a batch is the last one
 * beginning among the bytes that came with it: a frame there without a
 * count that reaches the end of those bytes has fds it did not declare. */
static bool rx_claim(pbrpc__conn *c, const pbrpc__frame_header *h, uint64_t start, uint64_t end)
{
	if (!rx_orphans(c, start))
		return false;
	unsigned n = h->reserved;
	pbrpc__conn_fdx *x = c->fdx;
	if (!n) {
		if (c->rx_nb && x->rx_b[0].start <= start && end >= x->rx_b[0].end)
			return fd_fail(c, "%u file descriptors arrived with a %s frame that declared none", x->rx_b[0].n,
				       pbrpc__wire_frame_name(h->type));
		return true;
	}
	if (h->type != PBRPC_FRAME_REQUEST && h->type != PBRPC_FRAME_RESPONSE)
		return fd_fail(c, "%s frame with a file descriptor count (%u)", pbrpc__wire_frame_name(h->type), n);
	if (!c->rx_nb || x->rx_b[0].start > start)
		return fd_fail(c, "%s frame declares %u file descriptors, none arrived with it",
			       pbrpc__wire_frame_name(h->type), n);
	if (x->rx_b[0].n != n)
		return fd_fail(c, "%s frame declares %u file descriptors, %u arrived with it",
			       pbrpc__wire_frame_name(h->type), n, x->rx_b[0].n);
	memcpy(x->frame_fds, x->rx_fds, n * sizeof(int));
	c->frame_nfds = n;
	x->rx_nfds -= n;
	memmove(x->rx_fds, x->rx_fds + n, x->rx_nfds * sizeof(int));
	c->rx_nb--;
	memmove(x->rx_b, x->rx_b + 1, c->rx_nb * sizeof(x->rx_b[0]));
	return true;
}

static void frame_fds_drop(pbrpc__conn *c)
{
	if (c->frame_nfds)
		pbrpc__io_close_fds(c->fdx->frame_fds, c->frame_nfds);
	c->frame_nfds = 0;
}

ssize_t pbrpc__conn_recv(pbrpc__conn *c, uint8_t *scratch, size_t cap, int flags)
{
	if (c->state == PBRPC__CONN_CLOSED)
		return PBRPC_ECLOSED;
	if (c->state != PBRPC__CONN_PREFACE && (!scratch || pbrpc__frame_decoder_pending(&c->dec)))
		return pbrpc__conn_recv_open(c, flags); /* the rest of a split frame */

	/* Preface bytes never enter the decoder: read them (and what follows)
	 * into a buffer of our own, check them, and feed the rest. */
	uint8_t small[256];
	bool own = !scratch;
	if (own) {
		scratch = small;
		cap = sizeof(small);
	}
	pbrpc__io_fds rx;
	ssize_t n = c->tls ? pbrpc__conn_tls_recv(c, scratch, cap)
		    : c->fd_rx ? pbrpc__io_recv_fds(c->fd, scratch, cap, flags, &rx)
			       : pbrpc__io_recv(c->fd, scratch, cap, flags);
	if (n <= 0)
		return n == PBRPC_EOF && c->state == PBRPC__CONN_PREFACE && c->preface_got ? PBRPC_ETRUNCATED : n;
	const uint8_t *p = scratch;
	size_t len = (size_t)n;
	if (c->state == PBRPC__CONN_PREFACE) {
		bool first = c->preface_got == 0;
		ssize_t used = eat_preface(c, p, len);
		if (used < 0)
			return first && p[0] == 0x16 && !c->tls ? PBRPC_ETLSPEER : PBRPC_EBADMAGIC; /* 0x16: a TLS handshake record */
		p += used;
		len -= (size_t)used;
	}
	if (c->fd_rx && rx_note(c, &rx, len) < 0)
		return PBRPC_EPROTO;
	pbrpc__frame_decoder_feed(&c->dec, p, len);
	if (own && pbrpc__frame_decoder_stash(&c->dec) < 0)
		return -ENOMEM;
	return n;
}

/* ---- frames ---- */

static void handle_hello(pbrpc__conn *c, const pbrpc__frame *f)
{
	if (f->hdr.type == PBRPC_FRAME_GOAWAY && c->role == PBRPC__CONN_CLIENT) {
		/* Refused before the HELLO (e.g. a peer of an older version). */
		int st;
		const char *m;
		size_t ml;
		if (pbrpc__wire_read_goaway(f, &st, &m, &ml) < 0)
			pbrpc__conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO,
					 "malformed GOAWAY during the handshake");
		else
			pbrpc__conn_close(c, st == PBRPC_STATUS_FAILED_PRECONDITION ? PBRPC_EVERSION : PBRPC_EGOAWAY,
					  "refused the connection: GOAWAY %s: %.*s", pbrpc_status_name(st), (int)ml, m);
		return;
	}
	pbrpc_hello h;
	int rc = f->hdr.type == PBRPC_FRAME_HELLO ? pbrpc__wire_read_hello(f, &h) : PBRPC_EPROTO;
	if (rc == PBRPC_EVERSION) {
		pbrpc__conn_fail(c, PBRPC_STATUS_FAILED_PRECONDITION, rc,
				 "unsupported protocol version %u, this peer speaks %u", (unsigned)h.version,
				 PBRPC_WIRE_VERSION);
		return;
	}
	if (rc < 0) {
		pbrpc__conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO, "expected HELLO, got a malformed %s frame",
				 pbrpc__wire_frame_name(f->hdr.type));
		return;
	}
	if (h.max_frame && h.max_frame < PBRPC_MAX_FRAME_MIN) {
		pbrpc__conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO, "max_frame %u is below the minimum of %u",
				 (unsigned)h.max_frame, PBRPC_MAX_FRAME_MIN);
		return;
	}
	/* Validated and clamped here, once, for both roles. */
	c->peer = h;
	c->peer_max_frame = h.max_frame ? h.max_frame : PBRPC_MAX_FRAME_DEFAULT;
	if (c->peer_max_frame > PBRPC_MAX_FRAME_LIMIT)
		c->peer_max_frame = PBRPC_MAX_FRAME_LIMIT;
	c->peer_max_calls = h.max_calls;
	c->features = c->our_features & h.features;
	c->peer_stream_window = h.stream_window ? h.stream_window : PBRPC_STREAM_WINDOW_DEFAULT;
	if (c->features & PBRPC_FEATURE_FDS) {
		c->dec.fd_counts = true; /* `reserved` is an fd count from now on */
	} else if (c->fd_rx) {
		if (c->rx_nb) {
			fd_fail(c, "file descriptors from the %s without the FDS feature", pbrpc__conn_peer_name(c));
			return;
		}
		c->fd_rx = false; /* the kernel drops any fds sent from now on */
	}
	c->state = PBRPC__CONN_OPEN;
	c->handshake_deadline = 0;
	if (c->ops->on_open)
		c->ops->on_open(c);
}

static void handle_goaway(pbrpc__conn *c, const pbrpc__frame *f)
{
	int st;
	const char *m;
	size_t ml;
	if (pbrpc__wire_read_goaway(f, &st, &m, &ml) < 0) {
		pbrpc__conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO, "malformed GOAWAY");
		return;
	}
	if (st != PBRPC_STATUS_OK) {
		/* A connection error: the peer closes right after it. */
		pbrpc__conn_close(c, PBRPC_EGOAWAY, "%s sent GOAWAY: %s: %.*s", pbrpc__conn_peer_name(c),
				  pbrpc_status_name(st), (int)ml, m);
		return;
	}
	/* Drain: calls in flight finish, no new ones start here. A client's
	 * GOAWAY also says it sends no more requests. */
	c->draining = true;
	if (c->role == PBRPC__CONN_SERVER)
		c->peer_quiet = true;
	if (c->ops->on_goaway)
		c->ops->on_goaway(c);
}

static void unexpected(pbrpc__conn *c, const pbrpc__frame *f)
{
	pbrpc__conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO, "unexpected %s frame from the %s",
			 pbrpc__wire_frame_name(f->hdr.type), pbrpc__conn_peer_name(c));
}

/* A PING within ping_min_ns of the peer's previous one, with no REQUEST
 * between, is a strike (gRPC's ping strikes); past PBRPC__CONN_PING_STRIKES
 * the connection is closed. A REQUEST forgives them. Returns true when it
 * closed c. */
static bool too_many_pings(pbrpc__conn *c)
{
	int64_t now = c->last_read;
	if (c->peer_ping_at && now - c->peer_ping_at < c->ping_min_ns && !c->request_since_ping &&
	    ++c->ping_strikes > PBRPC__CONN_PING_STRIKES) {
		pbrpc__conn_fail(c, PBRPC_STATUS_RESOURCE_EXHAUSTED, PBRPC_EPROTO,
				 "too many pings: more than %d PINGs less than %lld ms apart without a call",
				 PBRPC__CONN_PING_STRIKES + 1, (long long)(c->ping_min_ns / PBRPC__NS_PER_MS));
		return true;
	}
	c->peer_ping_at = now;
	c->request_since_ping = false;
	return false;
}

/* Returns true when on_response asked to stop. */
static bool handle_frame(pbrpc__conn *c, const pbrpc__frame *f, void *arg)
{
	if (c->state == PBRPC__CONN_HELLO) {
		handle_hello(c, f);
		return false;
	}
	if (pbrpc__wire_check_header(&f->hdr) < 0) {
		pbrpc__conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO,
				 "bad frame header (type 0x%02x, flags 0x%02x, stream %u, length %u)", f->hdr.type,
				 f->hdr.flags, (unsigned)f->hdr.stream, (unsigned)f->hdr.length);
		return false;
	}
	if (__builtin_expect(f->hdr.flags & PBRPC_REQUEST_BODY_FD, 0) && !pbrpc__conn_memfd_ok(c) &&
	    (f->hdr.type == PBRPC_FRAME_REQUEST || f->hdr.type == PBRPC_FRAME_RESPONSE)) {
		pbrpc__conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO, "%s flag BODY_FD without the MEMFD feature",
				 pbrpc__wire_frame_name(f->hdr.type));
		return false;
	}
	bool server = c->role == PBRPC__CONN_SERVER;
	switch (f->hdr.type) {
	case PBRPC_FRAME_REQUEST:
		if (!server)
			break;
		if (__builtin_expect((f->hdr.flags & (PBRPC_REQUEST_CLIENT_STREAM | PBRPC_REQUEST_SERVER_STREAM)) &&
					     !(c->features & PBRPC_FEATURE_STREAMS),
				     0)) {
			pbrpc__conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO,
					 "REQUEST stream flags without the streams feature negotiated");
			return false;
		}
		c->request_since_ping = true;
		c->ping_strikes = 0;
		c->ops->on_request(c, f);
		return false;
	case PBRPC_FRAME_RESPONSE: {
		if (server)
			break;
		pbrpc__wire_response r;
		if (pbrpc__wire_read_response(f, &r) < 0) {
			pbrpc__conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO, "malformed RESPONSE for call %u",
					 (unsigned)f->hdr.stream);
			return false;
		}
		if (r.not_run && !(c->features & PBRPC_FEATURE_NOT_RUN)) {
			pbrpc__conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO,
					 "RESPONSE flag NOT_RUN without the feature negotiated");
			return false;
		}
		return c->ops->on_response(c, &r, arg);
	}
	case PBRPC_FRAME_CANCEL:
		if (!server)
			break;
		c->ops->on_cancel(c, f->hdr.stream);
		return false;
	case PBRPC_FRAME_PING:
		if (c->ping_min_ns > 0 && too_many_pings(c))
			return false;
		pbrpc__wire_write_ping(&c->out, PBRPC_FRAME_PONG, f->payload); /* the role flushes */
		return false;
	case PBRPC_FRAME_PONG:
		if (c->draining && memcmp(f->payload, drain_ping, sizeof(drain_ping)) == 0)
			c->peer_quiet = true; /* it has read our GOAWAY and everything before */
		else if (memcmp(f->payload, ka_ping, sizeof(ka_ping)) == 0)
			c->ka_ping_at = 0;
		return false;
	case PBRPC_FRAME_GOAWAY:
		handle_goaway(c, f);
		return false;
	case PBRPC_FRAME_HALF_CLOSE:
		if (!server)
			break;
		/* fall through */
	case PBRPC_FRAME_MESSAGE:
	case PBRPC_FRAME_WINDOW:
		if (!(c->features & PBRPC_FEATURE_STREAMS) || !c->ops->on_stream)
			break;
		return c->ops->on_stream(c, f, arg);
	}
	unexpected(c, f);
	return false;
}

/* A REQUEST over the limit is skipped and answered; anything else that large
 * is fatal (PROTOCOL.md section 2). */
static void handle_toobig(pbrpc__conn *c)
{
	const pbrpc__frame_header *h = pbrpc__frame_decoder_rejected(&c->dec);
	if (c->role == PBRPC__CONN_SERVER && c->state == PBRPC__CONN_OPEN && h->type == PBRPC_FRAME_REQUEST &&
	    h->stream != 0 && !pbrpc__idmap_get(&c->calls, h->stream)) {
		char text[160];
		if (h->length > c->max_frame)
			snprintf(text, sizeof(text), "request is %u bytes, server accepts at most %u", (unsigned)h->length,
				 (unsigned)c->max_frame);
		else
			snprintf(text, sizeof(text),
				 "request is %u bytes, the server's memory budget has room for %u now",
				 (unsigned)h->length, (unsigned)c->dec.max_payload);
		uint32_t id = h->stream;
		pbrpc__frame_decoder_skip(&c->dec);
		pbrpc__conn_reply_status(c, id, PBRPC_STATUS_RESOURCE_EXHAUSTED, text, true);
		return;
	}
	pbrpc__conn_fail(c, PBRPC_STATUS_RESOURCE_EXHAUSTED, PBRPC_ETOOBIG, "%s frame of %u bytes exceeds the limit of %u",
			 pbrpc__wire_frame_name(h->type), (unsigned)h->length, (unsigned)c->max_frame);
}

/* Over the output bound even after a flush: stop taking frames until the
 * peer reads. */
static bool output_full(pbrpc__conn *c)
{
	if (!c->max_output || pbrpc__conn_pending_out(c) <= c->max_output)
		return false;
	ssize_t n = pbrpc__conn_flush(c, pbrpc__now_ns()); /* rare: a clock read is fine */
	if (n < 0) {
		/* The peer is gone: run none of the requests still buffered. */
		pbrpc__conn_close(c, (int)n, "connection lost: write failed: %s", pbrpc_strerror((int)n));
		return true;
	}
	return c->read_paused;
}

int pbrpc__conn_dispatch(pbrpc__conn *c, void *arg)
{
	c->resume = false;
	while (c->state != PBRPC__CONN_CLOSED) {
		if (output_full(c)) {
			if (c->state != PBRPC__CONN_CLOSED && pbrpc__frame_decoder_stash(&c->dec) < 0)
				pbrpc__conn_fail(c, PBRPC_STATUS_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory");
			return 0;
		}
		pbrpc__frame f;
		int rc = pbrpc__frame_decoder_next(&c->dec, &f);
		if (rc == 0) {
			if (__builtin_expect(c->rx_nb, 0))
				rx_orphans(c, c->rx_pos - dec_held(c));
			return 0;
		}
		if (rc == PBRPC_ETOOBIG) {
			if (c->fd_rx) {
				const pbrpc__frame_header *h = pbrpc__frame_decoder_rejected(&c->dec);
				uint64_t start = c->rx_pos - dec_held(c) - PBRPC_FRAME_HEADER_SIZE;
				if (!rx_claim(c, h, start, start + PBRPC_FRAME_HEADER_SIZE + h->length))
					return 0;
			}
			handle_toobig(c); /* its fds are closed below, never delivered */
			frame_fds_drop(c);
			continue;
		}
		if (rc < 0) {
			pbrpc__conn_fail(c, PBRPC_STATUS_INVALID_ARGUMENT, rc, "%s",
					 rc == PBRPC_EPROTO ? "bad frame header (reserved bits set)" : pbrpc_strerror(rc));
			return 0;
		}
		if (__builtin_expect(c->rx_nb | f.hdr.reserved, 0) &&
		    !rx_claim(c, &f.hdr, c->rx_pos - dec_held(c) - PBRPC_FRAME_HEADER_SIZE - f.hdr.length,
			      c->rx_pos - dec_held(c)))
			return 0;
		bool stop = handle_frame(c, &f, arg);
		if (__builtin_expect(c->frame_nfds, 0))
			frame_fds_drop(c); /* what the role did not take */
		if (stop)
			return 1;
	}
	return 0;
}

/* ---- writing ---- */

ssize_t pbrpc__conn_flush(pbrpc__conn *c, int64_t now)
{
	if (c->state == PBRPC__CONN_CLOSED)
		return 0;
	ssize_t n = 0;
	if (pbrpc__conn_pending_out(c)) {
		n = c->tls ? pbrpc__conn_tls_flush(c) : pbrpc__frame_writer_flush(&c->out, c->fd, MSG_DONTWAIT);
		if (n < 0)
			return n;
	}
	if (!c->max_output)
		return n;
	size_t pending = pbrpc__conn_pending_out(c);
	if (pending > c->max_output) {
		/* A peer that reads nothing for stall_ns is dropped; any progress
		 * starts the wait again. */
		if (!c->read_paused || n > 0)
			c->stalled_since = now;
		c->read_paused = true;
	} else if (c->read_paused && pending <= c->max_output / 2) {
		c->read_paused = false;
		c->resume = true;
	}
	return n;
}

int pbrpc__conn_reply_status(pbrpc__conn *c, uint32_t call_id, int status, const char *message, bool not_run)
{
	pbrpc__wire_response r = { .call_id = call_id, .status = status, .message = message };
	r.not_run = not_run && (c->features & PBRPC_FEATURE_NOT_RUN);
	r.message_len = message ? strlen(message) : 0;
	return pbrpc__wire_write_response(&c->out, &r, NULL, c->peer_max_frame);
}

/* ---- timeouts and events ---- */

/* Our keepalive PING is out and nothing has been read since: any bytes
 * from the peer show it is alive, as its PONG does. */
static inline bool ka_waiting(const pbrpc__conn *c)
{
	return c->ka_ping_at && c->last_read <= c->ka_ping_at;
}

/* Keepalive and age: what is due at `now` that does not close c. */
static void expire_queue(pbrpc__conn *c, int64_t now)
{
	if (c->age_at && !c->draining && now >= c->age_at) {
		pbrpc__conn_goaway(c, "max connection age reached");
		if (c->drain_grace_ns > 0)
			c->drain_close_at = now + c->drain_grace_ns;
	}
	if (c->ka_interval_ns > 0 && !ka_waiting(c) && now >= c->last_read + c->ka_interval_ns &&
	    pbrpc__wire_write_ping(&c->out, PBRPC_FRAME_PING, ka_ping) == 0)
		c->ka_ping_at = now;
}

pbrpc__deadline pbrpc__conn_deadline(const pbrpc__conn *c)
{
	if (c->state == PBRPC__CONN_CLOSED)
		return 0;
	if (c->state != PBRPC__CONN_OPEN)
		return c->handshake_deadline;
	pbrpc__deadline d = 0;
	if (c->idle_ns > 0 && pbrpc__idmap_count(&c->calls) == 0)
		d = c->last_active + c->idle_ns;
	if (c->read_paused && c->stall_ns > 0)
		d = pbrpc__deadline_min(d, c->stalled_since + c->stall_ns);
	if (c->ka_interval_ns > 0)
		d = pbrpc__deadline_min(d, ka_waiting(c) ? c->ka_ping_at + c->ka_timeout_ns
							 : c->last_read + c->ka_interval_ns);
	if (c->age_at && !c->draining)
		d = pbrpc__deadline_min(d, c->age_at);
	if (c->drain_close_at)
		d = pbrpc__deadline_min(d, c->drain_close_at);
	return d;
}

void pbrpc__conn_expire(pbrpc__conn *c, int64_t now)
{
	if (c->state == PBRPC__CONN_CLOSED)
		return;
	if (c->state != PBRPC__CONN_OPEN) {
		if (c->handshake_deadline && now >= c->handshake_deadline)
			pbrpc__conn_fail(c, PBRPC_STATUS_UNAVAILABLE, -ETIMEDOUT, "handshake timed out");
		return;
	}
	if (c->read_paused && c->stall_ns > 0 && now >= c->stalled_since + c->stall_ns) {
		pbrpc__conn_fail(c, PBRPC_STATUS_RESOURCE_EXHAUSTED, -ETIMEDOUT,
				 "%s read none of its %zu queued reply bytes for %lld ms", pbrpc__conn_peer_name(c),
				 pbrpc__conn_pending_out(c), (long long)(c->stall_ns / PBRPC__NS_PER_MS));
		return;
	}
	if (c->drain_close_at && now >= c->drain_close_at) {
		pbrpc__conn_fail(c, PBRPC_STATUS_UNAVAILABLE, -ETIMEDOUT,
				 "max connection age: drain grace of %lld ms ended with %u calls in flight",
				 (long long)(c->drain_grace_ns / PBRPC__NS_PER_MS), (unsigned)pbrpc__idmap_count(&c->calls));
		return;
	}
	if (c->ka_interval_ns > 0 && ka_waiting(c) && now >= c->ka_ping_at + c->ka_timeout_ns) {
		pbrpc__conn_fail(c, PBRPC_STATUS_UNAVAILABLE, -ETIMEDOUT,
				 "keepalive timeout: %s sent nothing for %lld ms after a PING", pbrpc__conn_peer_name(c),
				 (long long)(c->ka_timeout_ns / PBRPC__NS_PER_MS));
		return;
	}
	if (c->idle_ns > 0 && pbrpc__idmap_count(&c->calls) == 0 && now >= c->last_active + c->idle_ns) {
		pbrpc__conn_fail(c, PBRPC_STATUS_UNAVAILABLE, -ETIMEDOUT, "idle timeout");
		return;
	}
	expire_queue(c, now);
}

uint32_t pbrpc__conn_events(const pbrpc__conn *c)
{
	if (c->state == PBRPC__CONN_CLOSED)
		return 0;
	uint32_t ev = c->read_paused || c->read_eof || c->mem_paused ? 0 : EPOLLIN;
	if (pbrpc__conn_pending_out(c))
		ev |= EPOLLOUT;
	return c->tls ? pbrpc__conn_tls_events(c, ev) : ev;
}
