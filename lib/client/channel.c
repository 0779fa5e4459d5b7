/* The client's connections: dial and handshake through the connection core,
 * reconnect with backoff, the reader role, closing, and the release of large
 * buffers. Every function here runs with the client's mutex held, except
 * where a comment says it drops it. */
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "client/client_impl.h"
#include "proto/memfd.h"
#include "util/dial.h"
#include "util/io.h"

/* ---- lifetime ---- */

static __attribute__((noinline)) void chan_destroy(chan *k)
{
	pbrpc__list_remove(&k->link);
	pbrpc__conn_fini(&k->base);
	free(k);
}

void pbrpc__cl_chan_ref(chan *k)
{
	k->refs++;
}

void pbrpc__cl_chan_unref(pbrpc_client *c, chan *k)
{
	(void)c;
	if (__builtin_expect(--k->refs == 0, 0) && chan_dead(k))
		chan_destroy(k);
}

void pbrpc__cl_chan_close(pbrpc_client *c, chan *k, int err, const char *msg)
{
	pbrpc__cl_chan_ref(k);
	pbrpc__conn_close(&k->base, err, "%s", msg);
	pbrpc__cl_chan_unref(c, k);
}

void pbrpc__cl_chan_fail(pbrpc_client *c, chan *k, int status, int err, const char *msg)
{
	pbrpc__cl_chan_ref(k);
	pbrpc__conn_fail(&k->base, status, err, "%s", msg);
	pbrpc__cl_chan_unref(c, k);
}

/* ---- what the connection core reports ---- */

/* A RESPONSE with fds: the user's become x's, a memfd body is checked and
 * mapped (x->map; r's body points there). Returns false with x failed: the
 * limits (PROTOCOL.md section 12) or a memfd not sealed as it must be. The
 * fds not taken are closed by the connection. */
static __attribute__((noinline)) bool reply_take_fds(pbrpc__conn *b, call *x, pbrpc__wire_response *r,
						     const pbrpc_client *c)
{
	unsigned skip = r->body_fd ? 1 : 0, n = b->frame_nfds - skip;
	if (n > c->max_fds) {
		pbrpc__cl_call_fail(x, PBRPC_STATUS_RESOURCE_EXHAUSTED, PBRPC_ETOOBIG,
				    "reply carries %u file descriptors, client accepts at most %u", n, c->max_fds);
		return false;
	}
	if (r->body_fd) {
		uint64_t size = 4 + r->message_len + r->body_fd_len;
		if (size > b->max_frame) {
			pbrpc__cl_call_fail(x, PBRPC_STATUS_RESOURCE_EXHAUSTED, PBRPC_ETOOBIG,
					    "reply is %llu bytes, client accepts at most %u", (unsigned long long)size,
					    (unsigned)b->max_frame);
			return false;
		}
		char why[160];
		const uint8_t *map;
		if (pbrpc__memfd_map(pbrpc__conn_frame_fds(b)[0], r->body_fd_len, &map, why, sizeof(why)) < 0) {
			pbrpc__cl_call_fail(x, PBRPC_STATUS_INTERNAL, PBRPC_EPROTO, "%s", why);
			return false;
		}
		x->map = map;
		x->map_len = (size_t)r->body_fd_len;
		r->body = map;
		r->body_len = x->map_len;
	}
	if (n) {
		if (n > x->fds_cap) {
			int *p = realloc(x->fds, n * sizeof(int));
			if (!p) {
				pbrpc__cl_call_fail(x, PBRPC_STATUS_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory");
				return false;
			}
			x->fds = p;
			x->fds_cap = n;
		}
		int *ff = pbrpc__conn_frame_fds(b);
		memcpy(x->fds, ff + skip, n * sizeof(int));
		for (unsigned i = skip; i < b->frame_nfds; i++)
			ff[i] = -1;
		x->nfds = n;
	}
	return true;
}

/* A RESPONSE: the reader's own (`me`) stays in the decoder and stops the
 * dispatch; any other is copied into its call record. */
static bool on_response(pbrpc__conn *b, const pbrpc__wire_response *r, void *arg)
{
	chan *k = pbrpc__container_of(b, chan, base);
	pbrpc_client *c = k->c;
	call *me = arg;
	call *x = pbrpc__idmap_get(&b->calls, r->call_id);
	if (!x) {
		pbrpc__conn_fail(b, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO, "RESPONSE for unknown call id %u",
				 (unsigned)r->call_id);
		return false;
	}
	if (__builtin_expect(x->kind == CALL_STREAM, 0))
		return pbrpc__cl_stream_response(c, k, x, r);
	if (r->message_len + r->body_len > CL_BIG_FRAME)
		big_touch(c);
	pbrpc__cl_call_unlink(c, x);
	if (x->abandoned) {
		if (!x->refs)
			pbrpc__cl_call_put(c, x);
		return false;
	}
	int st = (r->status < 0 || r->status >= PBRPC_STATUS_COUNT) ? PBRPC_STATUS_UNKNOWN : r->status;
	x->status = st;
	x->err = 0;
	/* A call the server says it did not run (or, from a server without the
	 * NOT_RUN feature, one refused after its drain GOAWAY) may be sent again
	 * on a new connection. */
	bool not_run = (b->features & PBRPC_FEATURE_NOT_RUN) ? r->not_run : b->draining;
	x->retry = st == PBRPC_STATUS_UNAVAILABLE && not_run && x->attempts < CL_MAX_ATTEMPTS;
	if (x->retry && x->kind == CALL_ASYNC && x->req_len) {
		pbrpc__list_append(&c->retry, &x->qlink);
		if (pbrpc__cl_th.in_process != c)
			pbrpc__cl_efd_signal(c);
		return false;
	}
	pbrpc__wire_response fr;
	if (__builtin_expect(b->frame_nfds != 0, 0)) {
		fr = *r;
		r = &fr;
		if (!reply_take_fds(b, x, &fr, c)) {
			x->retry = false;
			if (x != me) {
				pbrpc__cl_call_finish(c, x);
				return false;
			}
			x->done = true;
			return true;
		}
	}
	if (x == me) {
		x->msg = r->message;
		x->msg_len = r->message_len;
		x->body = r->body;
		x->body_len = r->body_len;
		x->in_decoder = true;
		x->rconn = k;
		x->done = true;
		return true;
	}
	if (x->map) {
		/* The body stays in its mapping: store only the message. */
		pbrpc__wire_response m = *r;
		m.body_len = 0;
		if (pbrpc__cl_store_reply(x, &m) < 0)
			pbrpc__cl_call_fail(x, PBRPC_STATUS_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory");
		else {
			x->body = x->map;
			x->body_len = x->map_len;
		}
		pbrpc__cl_call_finish(c, x);
		return false;
	}
	if (pbrpc__cl_store_reply(x, r) < 0)
		pbrpc__cl_call_fail(x, PBRPC_STATUS_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory storing a %zu-byte reply",
				    r->body_len);
	pbrpc__cl_call_finish(c, x);
	return false;
}

/* GOAWAY(OK): calls in flight finish here, new calls go to a new connection. */
static void on_goaway(pbrpc__conn *b)
{
	chan *k = pbrpc__container_of(b, chan, base);
	pbrpc_client *c = k->c;
	if (!pbrpc__list_linked(&k->link))
		return; /* still handshaking, without the mutex: handshake() reports it */
	if (c->cur == k) {
		c->cur = NULL;
		c->next_attempt = 0;
	}
	pthread_cond_broadcast(&c->cond);
	if (chan_inflight(k) == 0)
		pbrpc__conn_close(b, 0, "server is draining");
}

/* Fails every call still in flight with the reason. The fd is closed when
 * the last thread doing I/O on it lets go (the shutdown() wakes a reader
 * blocked in recv). */
static void on_close(pbrpc__conn *b, int err, const char *why)
{
	chan *k = pbrpc__container_of(b, chan, base);
	pbrpc_client *c = k->c;
	k->close_err = err;
	if (err == PBRPC_EPROTO)
		snprintf(k->close_msg, sizeof(k->close_msg), "protocol error by the server: %s", why);
	else
		snprintf(k->close_msg, sizeof(k->close_msg), "%s", why);
	if (!pbrpc__list_linked(&k->link))
		return; /* still handshaking: chan_open reports it */
	if (c->cur == k) {
		c->cur = NULL;
		c->next_attempt = 0; /* a lost connection is re-dialled at the next call */
	}
	if (err) {
		c->last_err = err;
		snprintf(c->last_msg, sizeof(c->last_msg), "%s", k->close_msg);
	}
	int status = err == PBRPC_ECLOSED ? PBRPC_STATUS_CANCELLED : PBRPC_STATUS_UNAVAILABLE;
	call *x;
	while ((x = pbrpc__idmap_take_any(&b->calls, NULL)) != NULL) {
		pbrpc__cl_call_unlink(c, x); /* the id is already out of the map */
		if (x->abandoned) {
			if (!x->refs)
				pbrpc__cl_call_put(c, x);
			continue;
		}
		pbrpc__cl_call_fail(x, status, err, "%s", k->close_msg);
		pbrpc__cl_call_finish(c, x);
	}
	if (k->in_epoll)
		epoll_ctl(c->epfd, EPOLL_CTL_DEL, b->fd, NULL);
	k->in_epoll = false;
	if (k->deferred) {
		k->deferred = false;
		c->deferred--;
	}
	if (k->refs)
		shutdown(b->fd, SHUT_RDWR);
	pthread_cond_broadcast(&c->cond);
}

static const pbrpc__conn_ops chan_ops = {
	.on_response = on_response,
	.on_goaway = on_goaway,
	.on_close = on_close,
	.on_stream = pbrpc__cl_on_stream,
};

/* ---- the reader role ---- */

void pbrpc__cl_reader_enter(chan *k)
{
	k->reading = true;
	k->refs++;
}

/* Hands the reading on: to slot waiters, the first follower, or a poller. */
static __attribute__((noinline)) void reader_pass_on(pbrpc_client *c, chan *k)
{
	if (c->slot_waiters)
		pthread_cond_broadcast(&c->cond); /* one of them may read now */
	pbrpc__list *w = pbrpc__list_first(&k->waiters);
	if (w)
		pthread_cond_signal(&pbrpc__container_of(w, call, wlink)->cond);
	else if (c->proc_efd_only || (k->async_inflight && pbrpc__cl_th.in_process != c &&
				      pbrpc__conn_pending_in(&k->base) + pbrpc__conn_buffered(&k->base)))
		pbrpc__cl_efd_signal(c); /* a poller must take over the reading */
}

void pbrpc__cl_reader_leave(pbrpc_client *c, chan *k)
{
	k->reading = false;
	/* Nobody to hand over to (a lone synchronous caller): nothing to do. */
	if (!chan_dead(k) && (c->slot_waiters || !pbrpc__list_empty(&k->waiters) || c->proc_efd_only || k->async_inflight))
		reader_pass_on(c, k);
	pbrpc__cl_chan_unref(c, k);
}

/* Dispatches what is buffered (see on_response for `me`), then sends what the
 * frames asked for (PONGs). Returns true when it stopped at me's RESPONSE. */
bool pbrpc__cl_dispatch(pbrpc_client *c, chan *k, call *me)
{
	bool stop = pbrpc__conn_dispatch(&k->base, me) > 0;
	if (!chan_dead(k) && pbrpc__conn_pending_out(&k->base))
		pbrpc__cl_chan_flush(c, k);
	return stop;
}

void pbrpc__cl_read_failed(pbrpc_client *c, chan *k, int err)
{
	pbrpc__cl_chan_ref(k);
	pbrpc__conn_read_failed(&k->base, err);
	pbrpc__cl_chan_unref(c, k);
}

/* Non-blocking reads and dispatch, for process() and error paths. */
void pbrpc__cl_read_nb(pbrpc_client *c, chan *k, int budget)
{
	for (int i = 0; i < budget; i++) {
		pbrpc__cl_dispatch(c, k, NULL);
		if (chan_dead(k))
			return;
		ssize_t n = pbrpc__conn_recv(&k->base, NULL, 0, MSG_DONTWAIT);
		if (n == 0)
			return;
		if (n < 0) {
			pbrpc__cl_read_failed(c, k, (int)n);
			return;
		}
	}
	pbrpc__cl_dispatch(c, k, NULL);
}

/* ---- writing ---- */

/* A write failed: the server may have said why before closing, so read what
 * it sent (when nobody else is reading), then close the connection. */
__attribute__((cold, noinline)) static void write_error(pbrpc_client *c, chan *k, int err)
{
	pbrpc__cl_chan_ref(k);
	if (!k->reading) {
		pbrpc__cl_reader_enter(k);
		pbrpc__cl_read_nb(c, k, 4);
		pbrpc__cl_reader_leave(c, k);
	}
	char msg[CL_LOCAL_MSG_MAX];
	snprintf(msg, sizeof(msg), "connection lost: write failed: %s", pbrpc_strerror(err));
	pbrpc__cl_chan_close(c, k, err, msg);
	pbrpc__cl_chan_unref(c, k);
}

/* Sends what is queued without blocking. Leftover bytes are flushed later by
 * the connection's reader, a waiting caller or process() (EPOLLOUT). */
int pbrpc__cl_chan_flush(pbrpc_client *c, chan *k)
{
	if (k->deferred) {
		k->deferred = false;
		c->deferred--;
	}
	if (chan_dead(k))
		return PBRPC_ECLOSED;
	if (pbrpc__conn_pending_out(&k->base)) {
		ssize_t n = pbrpc__conn_flush(&k->base, c->now);
		if (n < 0) {
			write_error(c, k, (int)n);
			return (int)n;
		}
	}
	bool left = pbrpc__conn_pending_out(&k->base) > 0;
	if (k->in_epoll && left != k->epollout) {
		struct epoll_event ev = { .events = EPOLLIN | (left ? EPOLLOUT : 0), .data.ptr = k };
		if (epoll_ctl(c->epfd, EPOLL_CTL_MOD, k->base.fd, &ev) == 0)
			k->epollout = left;
	}
	if (!left && k->base.out.cap > CL_WRITER_SMALL)
		big_touch(c); /* kept while busy: see CL_BIG_IDLE_NS */
	return 0;
}

int64_t pbrpc__cl_burst_ns = CL_BURST_NS;

/* What an asynchronous call (or its CANCEL) just queued on k, `before` being
 * the bytes queued before it, `burst` whether the previous REQUEST on k was
 * queued less than CL_BURST_NS ago. Waits for the next flush point
 * (client.h) when that costs nothing: output already waits, or this
 * process() round queued it (a closure: `th.round`; a deadline:
 * `th.in_process`) and sends it before it waits. From elsewhere, within a
 * burst on a busy connection: k watches EPOLLOUT, which makes
 * pbrpc_client_fd() readable at once, so that a user's loop or the I/O
 * thread calls process() and the bytes go out. Otherwise (a lone call, one
 * after a pause, CL_DEFER_MAX queued, no poller that would notice) it is
 * sent at once, as a synchronous call's is. A burst of calls thus leaves in
 * two writes: the first call's, then the rest. */
int pbrpc__cl_chan_flush_later(pbrpc_client *c, chan *k, size_t before, bool burst)
{
	if (chan_dead(k))
		return PBRPC_ECLOSED;
	if (pbrpc__conn_pending_out(&k->base) >= CL_DEFER_MAX || !k->in_epoll || c->proc_efd_only)
		return pbrpc__cl_chan_flush(c, k);
	if (k->deferred)
		return 0;
	if (pbrpc__cl_th.round != c && pbrpc__cl_th.in_process != c) {
		if (before == 0 && (!burst || chan_inflight(k) <= 1))
			return pbrpc__cl_chan_flush(c, k);
		if (!k->epollout) {
			struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT, .data.ptr = k };
			if (epoll_ctl(c->epfd, EPOLL_CTL_MOD, k->base.fd, &ev) < 0)
				return pbrpc__cl_chan_flush(c, k);
			k->epollout = true;
		}
	}
	k->deferred = true;
	c->deferred++;
	return 0;
}

/* Sends what every connection holds back (see pbrpc__cl_chan_flush_later). */
void pbrpc__cl_flush_deferred(pbrpc_client *c)
{
	pbrpc__list_for_each_safe(k, &c->conns, chan, link) {
		if (!k->deferred)
			continue;
		pbrpc__cl_chan_ref(k);
		pbrpc__cl_chan_flush(c, k);
		pbrpc__cl_chan_unref(c, k);
		if (!c->deferred)
			break;
	}
}

static int watch(pbrpc_client *c, chan *k)
{
	bool out = pbrpc__conn_pending_out(&k->base) > 0;
	struct epoll_event ev = { .events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = k };
	if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, k->base.fd, &ev) < 0)
		return -errno;
	k->in_epoll = true;
	k->epollout = out;
	return 0;
}

/* Puts the sockets into the epoll set from now on. A client used only
 * synchronously keeps them out: each reply would also run epoll's wakeup. */
void pbrpc__cl_watch_enable(pbrpc_client *c)
{
	if (c->watching)
		return;
	c->watching = true;
	pbrpc__list_for_each_safe(k, &c->conns, chan, link) {
		if (chan_dead(k))
			continue;
		int err = watch(c, k);
		if (err < 0) {
			char msg[CL_LOCAL_MSG_MAX];
			snprintf(msg, sizeof(msg), "cannot watch the connection: %s", pbrpc_strerror(err));
			pbrpc__cl_chan_close(c, k, err, msg);
		}
	}
}

/* ---- connecting ---- */

/* How a handshake that closed the connection is reported to the caller. */
static int handshake_error(pbrpc_client *c, chan *k, char *msg, size_t len)
{
	int err = k->close_err ? k->close_err : PBRPC_EPROTO;
	const char *why = k->close_msg;
	/* Endpoint strings are short; the reason keeps what room is left. */
	if (err == PBRPC_EBADMAGIC)
		snprintf(msg, len, "%.100s is not a pbrpc server (bad preface)", c->ep_str);
	else if (err == PBRPC_EOF || err == PBRPC_ETRUNCATED)
		snprintf(msg, len, "connection closed by %.100s during the handshake", c->ep_str);
	else if (strncmp(why, "refused", 7) == 0)
		snprintf(msg, len, "%.100s %.150s", c->ep_str, why);
	else
		snprintf(msg, len, "handshake with %.80s failed: %.150s", c->ep_str, why);
	return err;
}

/* A handshake write failed (wrc) and nothing the server sent says why: over
 * TLS, the session's own words (a reset after our certificate says the
 * server may have refused it), else the errno's. */
static void write_failed(pbrpc_client *c, const pbrpc__conn *b, int wrc, char *msg, size_t len)
{
	const char *why = b->tls ? pbrpc__tls_why(b->tls) : NULL;
	if (why && why[0])
		snprintf(msg, len, "handshake with %.80s failed: %.150s", c->ep_str, why);
	else
		snprintf(msg, len, "handshake with %s failed: %s", c->ep_str, pbrpc_strerror(wrc));
}

/* Our preface and HELLO out, the server's in, through the connection core
 * (which checks and clamps it). Whatever came with the HELLO is dispatched
 * too: a server over its connection limit sends GOAWAY right after it. */
static int handshake(pbrpc_client *c, chan *k, int64_t deadline, char *msg, size_t len)
{
	pbrpc__conn *b = &k->base;
	int wrc = 0; /* a failed write: the server may still say why it refused us */
	while (b->state != PBRPC__CONN_OPEN) {
		if (chan_dead(k))
			return handshake_error(c, k, msg, len);
		bool out = pbrpc__conn_pending_out(b) && !wrc;
		if (out) {
			ssize_t n = pbrpc__conn_flush(b, 0);
			if (n < 0)
				wrc = (int)n;
			out = (pbrpc__conn_events(b) & EPOLLOUT) && !wrc; /* TLS: what its handshake waits for */
		}
		int r = pbrpc__conn_buffered(b) ? 0 : pbrpc__io_wait(b->fd, (short)(POLLIN | (out ? POLLOUT : 0)), deadline);
		if (r < 0) {
			snprintf(msg, len, "handshake with %s failed: %s", c->ep_str, pbrpc_strerror(r));
			return r;
		}
		ssize_t n = pbrpc__conn_recv(b, NULL, 0, MSG_DONTWAIT);
		if (n < 0 && wrc && n != PBRPC_EBADMAGIC) {
			write_failed(c, b, wrc, msg, len);
			return wrc;
		}
		if (n < 0)
			pbrpc__conn_read_failed(b, (int)n);
		else if (n > 0)
			pbrpc__conn_dispatch(b, NULL);
	}
	if (chan_dead(k))
		return handshake_error(c, k, msg, len);
	if (b->draining) {
		/* It sent GOAWAY(OK) with its HELLO: it takes no calls. */
		snprintf(msg, len, "%.100s is shutting down (GOAWAY with its HELLO)", c->ep_str);
		return PBRPC_EGOAWAY;
	}
	if (wrc < 0) {
		write_failed(c, b, wrc, msg, len);
		return wrc;
	}
	return 0;
}

/* Connects and handshakes without the client's mutex (touches only c's
 * read-only fields and the new connection). */
static int chan_open(pbrpc_client *c, int timeout_ms, chan **out, char *msg, size_t len)
{
	int64_t deadline = pbrpc__deadline_in(pbrpc__now_ns(), timeout_ms);
	pbrpc_endpoint ep = c->ep; /* a host name is resolved again at each dial */
	int fd = pbrpc__endpoint_dial(&ep, c->ep_str, timeout_ms);
	if (fd < 0) {
		snprintf(msg, len, "cannot connect to %s: %s", c->ep_str, pbrpc_strerror(fd));
		return fd;
	}
	chan *k = calloc(1, sizeof(*k));
	pbrpc_hello h = { .version = PBRPC_WIRE_VERSION, .max_frame = c->max_frame, .features = PBRPC_FEATURES,
			  .agent = PBRPC_WIRE_AGENT, .stream_window = c->stream_window };
	if (!k || pbrpc__conn_init(&k->base, fd, PBRPC__CONN_CLIENT, &chan_ops, &h) < 0) {
		if (k)
			pbrpc__conn_fini(&k->base);
		else
			close(fd);
		free(k);
		snprintf(msg, len, "out of memory");
		return -ENOMEM;
	}
	if (c->tls_ctx && pbrpc__tls_new(&k->base.tls, c->tls_ctx, fd, c->tls_host, true) < 0) {
		pbrpc__conn_fini(&k->base);
		free(k);
		snprintf(msg, len, "out of memory");
		return -ENOMEM;
	}
	k->c = c;
	pbrpc__list_init(&k->waiters);
	pbrpc__list_init(&k->link);
	int rc = handshake(c, k, deadline, msg, len);
	if (rc < 0) {
		pbrpc__conn_fini(&k->base);
		free(k);
		return rc;
	}
	*out = k;
	return 0;
}

static uint64_t rng_next(pbrpc_client *c)
{
	uint64_t x = c->rng;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return c->rng = x;
}

/* Dials a new connection (locked on entry and exit; one thread at a time;
 * the mutex is dropped while dialling). On failure the next attempt waits for
 * a jittered, doubling backoff. */
int pbrpc__cl_connect_locked(pbrpc_client *c, int64_t deadline)
{
	c->connecting = true;
	int ms = c->connect_timeout_ms;
	if (deadline) {
		int left = pbrpc__ms_until(deadline);
		if (left < 1)
			left = 1;
		if (ms < 0 || left < ms)
			ms = left;
	}
	pthread_mutex_unlock(&c->mu);
	chan *k = NULL;
	char msg[CL_LOCAL_MSG_MAX];
	int rc = chan_open(c, ms, &k, msg, sizeof(msg));
	pthread_mutex_lock(&c->mu);
	c->connecting = false;
	if (rc == 0 && c->watching && (rc = watch(c, k)) < 0) {
		snprintf(msg, sizeof(msg), "cannot watch the connection: %s", pbrpc_strerror(rc));
		pbrpc__conn_fini(&k->base);
		free(k);
	}
	if (rc == 0) {
		pbrpc__list_insert(&c->conns, &k->link);
		k->used_at = pbrpc__now_ns();
		c->cur = k;
		c->hello = k->base.peer;
		c->backoff_ms = c->backoff_min_ms;
		c->next_attempt = 0;
		c->last_err = 0;
		c->last_msg[0] = '\0';
		if (c->proc_efd_only)
			pbrpc__cl_efd_signal(c);
	} else {
		c->last_err = rc;
		snprintf(c->last_msg, sizeof(c->last_msg), "%s", msg);
		int b = c->backoff_ms;
		int span = b / 5; /* +-20% */
		int64_t d = (int64_t)b - span + (int64_t)(rng_next(c) % (uint64_t)(2 * span + 1));
		if (d > c->backoff_max_ms)
			d = c->backoff_max_ms;
		c->next_attempt = pbrpc__now_ns() + d * PBRPC__NS_PER_MS;
		c->backoff_ms = b > c->backoff_max_ms / 2 ? c->backoff_max_ms : b * 2;
	}
	pthread_cond_broadcast(&c->cond);
	return rc;
}

/* ---- large buffers ---- */

/* Gives back the large buffers nobody is using (locked): decoders of
 * connections no thread reads, empty writers, pooled arenas, free call
 * records. One still in use is looked at again CL_BIG_IDLE_NS later. */
void pbrpc__cl_release_big(pbrpc_client *c)
{
	bool left = false;
	pbrpc__list_for_each(k, &c->conns, chan, link) {
		if (chan_dead(k))
			continue;
		if (k->base.dec.cap > CL_BIG_FRAME) {
			if (!k->reading && pbrpc__conn_pending_in(&k->base) == 0)
				pbrpc__frame_decoder_release(&k->base.dec);
			else
				left = true;
		}
		pbrpc__frame_writer_trim(&k->base.out, CL_WRITER_SMALL);
		if (k->base.out.cap > CL_WRITER_SMALL)
			left = true;
	}
	for (cl_arena *a = c->arenas; a; a = a->next)
		pbrpc__arena_shrink(&a->a, CL_ARENA_SMALL);
	pbrpc__list_for_each(x, &c->free_calls, call, qlink) {
		if (x->cap > CL_CALL_BUF_SMALL) {
			free(x->buf);
			x->buf = NULL;
			x->cap = 0;
		}
	}
	c->big_at = left ? c->now : 0;
}

/* ---- idle connections ---- */

/* A connection nobody has used for CL_PROBE_IDLE_NS may hold what the
 * server sent meanwhile: keepalive PINGs (answered here), a drain GOAWAY, or
 * the GOAWAY and end of stream of a connection it closed (keepalive timeout,
 * connection age, idle timeout). Reading that without blocking before the
 * next REQUEST lets the call go to a new connection instead of failing on a
 * dead one. Returns true when it read (c->cur may have changed). */
bool pbrpc__cl_probe_idle(pbrpc_client *c, chan *k, int64_t now)
{
	k->used_at = now;
	if (k->reading || chan_inflight(k))
		return false; /* its reader sees all of it */
	pbrpc__cl_reader_enter(k); /* holds a reference */
	pbrpc__cl_read_nb(c, k, 4096); /* until it would block: a few frames, maybe 1 byte per read */
	pbrpc__cl_reader_leave(c, k);
	return true;
}
