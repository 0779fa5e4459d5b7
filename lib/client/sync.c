/* The synchronous path: a stub call that sends its REQUEST, reads its own
 * RESPONSE (as the connection's reader, or as a follower woken by it), runs
 * the closure on the calling thread and returns. Also the per-thread state. */
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>

#include "client/client_impl.h"
#include "proto/memfd.h"
#include "util/io.h"

_Thread_local cl_tls_hot pbrpc__cl_th __attribute__((tls_model("initial-exec")));
_Thread_local cl_tls_cold pbrpc__cl_tc;

#define th pbrpc__cl_th

/* ---- reply arenas ---- */

void pbrpc__cl_arena_destroy(cl_arena *a)
{
	if (!a)
		return;
	pbrpc__arena_fini(&a->a);
	free(a);
}

static cl_arena *arena_new(void)
{
	cl_arena *a = calloc(1, sizeof(*a));
	if (a)
		pbrpc__arena_init(&a->a, CL_ARENA_KEEP_MAX, NULL);
	return a;
}

cl_arena *pbrpc__cl_arena_get(pbrpc_client *c)
{
	cl_arena *a = c->arenas;
	if (a) {
		c->arenas = a->next;
		c->idle_arenas--;
		return a;
	}
	return arena_new();
}

void pbrpc__cl_arena_put(pbrpc_client *c, cl_arena *a)
{
	if (!a)
		return;
	if (c->idle_arenas >= CL_IDLE_ARENAS_MAX) {
		pbrpc__cl_arena_destroy(a);
		return;
	}
	if (a->a.cap > CL_ARENA_SMALL)
		big_touch(c);
	a->next = c->arenas;
	c->arenas = a;
	c->idle_arenas++;
}

/* Each thread keeps one arena for the replies of its synchronous calls, so
 * the fast path takes no lock for it; the key frees it when the thread ends. */
static pthread_key_t arena_key;
static pthread_once_t arena_key_once = PTHREAD_ONCE_INIT;
static bool arena_key_ok;

static void arena_key_free(void *a)
{
	pbrpc__cl_arena_destroy(a);
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
 * used for CL_BIG_IDLE_NS before `now` is dropped first. */
static cl_arena *thread_arena_take(int64_t now)
{
	if (th.arena_busy)
		return NULL;
	if (th.arena && th.arena->a.cap > CL_ARENA_SMALL && now - th.arena->big_at >= CL_BIG_IDLE_NS)
		pbrpc__arena_shrink(&th.arena->a, CL_ARENA_SMALL);
	if (!th.arena) {
		pthread_once(&arena_key_once, arena_key_init);
		cl_arena *a = arena_key_ok ? arena_new() : NULL;
		if (!a)
			return NULL;
		if (pthread_setspecific(arena_key, a) != 0) {
			pbrpc__cl_arena_destroy(a);
			return NULL;
		}
		th.arena = a;
	}
	th.arena_busy = true;
	return th.arena;
}

/* `now`: the start of the call that used it. */
static void thread_arena_give(cl_arena *a, int64_t now)
{
	pbrpc__arena_reset(&a->a);
	if (a->a.cap > CL_ARENA_SMALL)
		a->big_at = now;
	th.arena_busy = false;
}

/* Unpacks a reply; on failure sets this thread's status. */
const ProtobufCMessage *pbrpc__cl_unpack_reply(const ProtobufCMessageDescriptor *d, cl_arena *a, const uint8_t *body,
					       size_t len)
{
	ProtobufCMessage *m = protobuf_c_message_unpack(d, a ? &a->a.pa : NULL, len, body);
	if (!m) {
		if (a && a->a.failed)
			pbrpc__cl_set_statusf(PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory unpacking a %s", d->name);
		else
			pbrpc__cl_set_statusf(PBRPC_STATUS_INTERNAL, "reply is not a valid %s", d->name);
	}
	return m;
}

void pbrpc__cl_reply_free(const ProtobufCMessage *m, cl_arena *a)
{
	if (a)
		pbrpc__arena_reset(&a->a);
	else if (m)
		protobuf_c_message_free_unpacked((ProtobufCMessage *)m, NULL);
}

/* ---- reply fds, for pbrpc_client_reply_fds ---- */

static pthread_key_t fds_key;
static pthread_once_t fds_key_once = PTHREAD_ONCE_INIT;
static bool fds_key_ok;

static void fds_key_free(void *unused)
{
	(void)unused;
	pbrpc__cl_th_fds_drop(); /* the thread ends with fds it never took */
}

static void fds_key_init(void)
{
	fds_key_ok = pthread_key_create(&fds_key, fds_key_free) == 0;
}

__attribute__((destructor)) static void fds_key_fini(void)
{
	if (fds_key_ok)
		pthread_key_delete(fds_key);
}

void pbrpc__cl_th_fds_drop(void)
{
	pbrpc__io_close_fds(pbrpc__cl_tc.rfds + pbrpc__cl_tc.rfds_at, th.nrfds - pbrpc__cl_tc.rfds_at);
	th.nrfds = 0;
	pbrpc__cl_tc.rfds_at = 0;
}

/* x's reply fds become this thread's, for pbrpc_client_reply_fds. */
void pbrpc__cl_th_fds_set(call *x)
{
	pbrpc__cl_th_fds_drop();
	memcpy(pbrpc__cl_tc.rfds, x->fds, x->nfds * sizeof(int));
	th.nrfds = x->nfds;
	x->nfds = 0;
	pthread_once(&fds_key_once, fds_key_init);
	if (fds_key_ok)
		pthread_setspecific(fds_key, &th); /* any non-NULL value: the destructor runs */
}

PBRPC_EXPORT size_t pbrpc_client_reply_fds(int *fds, size_t max)
{
	size_t n = th.nrfds - pbrpc__cl_tc.rfds_at;
	if (n > max)
		n = max;
	if (!fds)
		n = 0;
	if (n) {
		memcpy(fds, pbrpc__cl_tc.rfds + pbrpc__cl_tc.rfds_at, n * sizeof(int));
		pbrpc__cl_tc.rfds_at += (unsigned)n;
	}
	if (pbrpc__cl_tc.rfds_at == th.nrfds)
		th.nrfds = pbrpc__cl_tc.rfds_at = 0;
	return n;
}

/* ---- sending ---- */

static size_t request_size(const pbrpc__wire_request *req, const ProtobufCMessage *msg)
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

static void request_failed(call *x, const pbrpc__wire_request *req, const call_args *a, uint32_t limit, int rc)
{
	if (rc == PBRPC_ETOOBIG)
		pbrpc__cl_call_fail(x, PBRPC_STATUS_RESOURCE_EXHAUSTED, rc, "request is %zu bytes, server accepts at most %u",
				    request_size(req, a->msg), (unsigned)limit);
	else if (rc == PBRPC_EINVALID)
		pbrpc__cl_call_fail(x, PBRPC_STATUS_INVALID_ARGUMENT, rc, "invalid method name \"%.*s\" or metadata",
				    (int)(a->method_len > 200 ? 200 : a->method_len), a->method);
	else
		pbrpc__cl_call_fail(x, PBRPC_STATUS_RESOURCE_EXHAUSTED, rc, "cannot encode the request: %s",
				    pbrpc_strerror(rc));
}

#define PBRPC_ENOFDS (-ENOTSUP) /* send_fds failed x itself */

/* A REQUEST with fds: duplicates of the caller's, after a sealed memfd
 * holding the body when it is above the threshold (req->memfd_above). */
static __attribute__((noinline)) int send_fds(chan *k, call *x, pbrpc__wire_request *req, const call_args *a,
					      size_t before)
{
	int fds[1 + PBRPC_FDS_MAX];
	unsigned n = 0;
	if (a->fd_count && !pbrpc__conn_fds_ok(&k->base)) {
		pbrpc__cl_call_fail(x, PBRPC_STATUS_FAILED_PRECONDITION, PBRPC_ENOFDS,
				    "this connection cannot carry file descriptors (%s)",
				    k->base.unix_sock ? "the server did not announce the FDS feature" : "not a Unix socket");
		return PBRPC_ENOFDS;
	}
	if (a->fd_count > PBRPC_FDS_MAX - 1) {
		pbrpc__cl_call_fail(x, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_ENOFDS,
				    "%zu file descriptors: a call carries at most %u", a->fd_count, PBRPC_FDS_MAX - 1);
		return PBRPC_ENOFDS;
	}
	size_t size = a->msg ? protobuf_c_message_get_packed_size(a->msg) : a->raw_len;
	if (req->memfd_above && size > req->memfd_above) {
		int m = pbrpc__memfd_pack(size, a->msg, a->raw);
		if (m >= 0) {
			fds[n++] = m;
			req->body_fd = true;
			req->body_fd_len = size;
		}
	}
	for (size_t i = 0; i < a->fd_count; i++) {
		int d = fcntl(a->fds[i], F_DUPFD_CLOEXEC, 0);
		if (d < 0) {
			int err = errno;
			pbrpc__io_close_fds(fds, n);
			pbrpc__cl_call_fail(x, err == EBADF ? PBRPC_STATUS_INVALID_ARGUMENT : PBRPC_STATUS_RESOURCE_EXHAUSTED,
					    PBRPC_ENOFDS, "cannot send file descriptor %d: %s", a->fds[i], strerror(err));
			return PBRPC_ENOFDS;
		}
		fds[n++] = d;
	}
	req->nfds = n;
	req->memfd_above = 0;
	int rc = pbrpc__wire_write_request(&k->base.out, req, req->body_fd ? NULL : a->msg, k->base.peer_max_frame);
	if (rc == 0 && n)
		rc = pbrpc__frame_writer_attach_fds(&k->base.out, before, fds, n);
	else if (n)
		pbrpc__io_close_fds(fds, n);
	return rc;
}

/* Encodes x's REQUEST into k's writer, reserves its id and sends without
 * blocking. `now` is a recent clock reading. Returns 0 (x is in flight, or
 * already failed with the connection) or a negative code with x's status set
 * (nothing was sent). */
int pbrpc__cl_send_request(pbrpc_client *c, chan *k, call *x, const call_args *a, int64_t now)
{
	/* Field by field: an initializer that zeroes the rest compiles to
	 * `rep stos`, slow to start for a hundred bytes. */
	pbrpc__wire_request req;
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
	req.stream_kind = a->stream_kind;
	if (x->deadline) {
		int64_t left = x->deadline - now;
		if (left <= 0) {
			pbrpc__cl_call_fail(x, PBRPC_STATUS_DEADLINE_EXCEEDED, -ETIMEDOUT,
					    "deadline exceeded before the call was sent");
			return -ETIMEDOUT;
		}
		req.has_timeout = true;
		req.timeout_us = (uint64_t)left / 1000;
	}
	if (pbrpc__idmap_reserve(&k->base.calls) < 0) {
		pbrpc__cl_call_fail(x, PBRPC_STATUS_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	bool burst = now - k->used_at < pbrpc__cl_burst_ns;
	k->used_at = now;
	x->id = pbrpc__cl_alloc_id(c);
	req.call_id = x->id;
	req.nfds = 0;
	req.body_fd = false;
	req.body_fd_len = 0;
	req.memfd_above = pbrpc__conn_memfd_ok(&k->base) ? c->memfd_threshold : 0;
	size_t before = pbrpc__conn_pending_out(&k->base);
	int rc = a->fd_count ? PBRPC__WIRE_USE_MEMFD
			     : pbrpc__wire_write_request(&k->base.out, &req, a->msg, k->base.peer_max_frame);
	if (__builtin_expect(rc == PBRPC__WIRE_USE_MEMFD, 0))
		rc = send_fds(k, x, &req, a, before);
	if (rc < 0) {
		if (rc != PBRPC_ENOFDS)
			request_failed(x, &req, a, k->base.peer_max_frame, rc);
		x->id = 0;
		return rc;
	}
	if (x->kind == CALL_ASYNC && !req.nfds)
		pbrpc__cl_keep_request(x, k, before, a); /* fds cannot be sent again */
	pbrpc__idmap_put(&k->base.calls, x->id, x); /* reserved above: cannot fail */
	x->attempts++;
	x->refs |= REF_TABLE;
	x->conn = k;
	if (x->kind == CALL_ASYNC) {
		k->async_inflight++;
		pbrpc__cl_chan_flush_later(c, k, before, burst); /* may wait for a flush point */
		return 0;
	}
	/* A failed flush wrote none of the queued bytes, so the server never saw
	 * this request: a synchronous call may try again on a new connection. */
	if (pbrpc__cl_chan_flush(c, k) < 0 && x->done && x->kind == CALL_SYNC)
		x->retry = x->attempts < CL_MAX_ATTEMPTS;
	if (__builtin_expect(c->deferred != 0, 0))
		pbrpc__cl_flush_deferred(c); /* async output held back on another connection */
	return 0;
}

/* ---- reading ---- */

/* Sets SO_RCVTIMEO to `need` ns (0: none) unless the cached value is close
 * enough, so that a stream of calls with the same timeout costs no syscall. */
static void set_rcvtimeo(chan *k, int64_t need)
{
	k->base.recv_timeout_ns = need; /* TLS waits in poll (conn/tls.c) */
	int64_t cur = k->rcvtimeo;
	if (need == 0) {
		if (cur == 0)
			return;
	} else if (cur != 0) {
		int64_t slack = need / 64;
		if (slack > 20 * PBRPC__NS_PER_MS)
			slack = 20 * PBRPC__NS_PER_MS;
		if (slack < PBRPC__NS_PER_MS)
			slack = PBRPC__NS_PER_MS;
		if (cur <= need + slack && cur >= need / 2)
			return;
	}
	struct timeval tv = { .tv_sec = (time_t)(need / PBRPC__NS_PER_S),
			      .tv_usec = (suseconds_t)((need % PBRPC__NS_PER_S) / 1000) };
	if (need && tv.tv_sec == 0 && tv.tv_usec == 0)
		tv.tv_usec = 1; /* zero would mean "no timeout" */
	if (setsockopt(k->base.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) == 0)
		k->rcvtimeo = need;
}

/* Output is stuck: wait for either direction, then read what came (the slow
 * path; the mutex is dropped while waiting). */
static void reader_wait_both(pbrpc_client *c, chan *k, call *me, int64_t deadline)
{
	int ms = pbrpc__ms_until(deadline);
	struct pollfd p = { .fd = k->base.fd, .events = POLLIN | POLLOUT };
	ssize_t n = 0;
	pthread_mutex_unlock(&c->mu);
	int r = pbrpc__conn_buffered(&k->base) ? (p.revents = POLLIN, 1) : poll(&p, 1, ms < 0 || ms > 1000 ? 1000 : ms);
	if (r > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR)))
		n = pbrpc__conn_recv_open(&k->base, MSG_DONTWAIT);
	pthread_mutex_lock(&c->mu);
	if (n < 0)
		pbrpc__cl_read_failed(c, k, (int)n);
	else if (n > 0)
		pbrpc__cl_dispatch(c, k, me);
}

/* One step of a synchronous reader: dispatch what is buffered, else flush
 * pending output or block in recv until data arrives or the deadline. `me`
 * (may be NULL) is the reader's own call. */
void pbrpc__cl_reader_step(pbrpc_client *c, chan *k, call *me, int64_t deadline, int64_t now)
{
	if (pbrpc__conn_pending_in(&k->base) && pbrpc__cl_dispatch(c, k, me))
		return;
	if (chan_dead(k) || (me && me->done))
		return;
	if (pbrpc__conn_pending_out(&k->base)) {
		if (pbrpc__cl_chan_flush(c, k) < 0)
			return;
		if (pbrpc__conn_pending_out(&k->base)) {
			reader_wait_both(c, k, me, deadline);
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
	ssize_t n = pbrpc__conn_recv_open(&k->base, 0);
	pthread_mutex_lock(&c->mu);
	if (n < 0)
		pbrpc__cl_read_failed(c, k, (int)n);
	else if (n > 0)
		pbrpc__cl_dispatch(c, k, me);
}

/* A follower whose request is still queued waits for the socket to take it. */
static void pump_write(pbrpc_client *c, chan *k, int64_t deadline)
{
	k->pumping = true;
	pbrpc__cl_chan_ref(k);
	int ms = pbrpc__ms_until(deadline);
	struct pollfd p = { .fd = k->base.fd, .events = POLLOUT };
	pthread_mutex_unlock(&c->mu);
	poll(&p, 1, ms < 0 || ms > 200 ? 200 : ms); /* then look at our call again */
	pthread_mutex_lock(&c->mu);
	k->pumping = false;
	if (!chan_dead(k))
		pbrpc__cl_chan_flush(c, k);
	pbrpc__cl_chan_unref(c, k);
}

/* Waits as a follower until woken (to take over reading, or done). */
static void follow(pbrpc_client *c, chan *k, call *x)
{
	pbrpc__list_append(&k->waiters, &x->wlink);
	pbrpc__cl_cond_wait_until(&x->cond, &c->mu, x->deadline);
	pbrpc__list_remove(&x->wlink);
}

/* Waits (locked) until x is done: as the connection's reader or as a
 * follower. If x->in_decoder on return, the caller is still x->rconn's reader
 * and must call reader_leave() once it has used the reply bytes. */
static void sync_wait(pbrpc_client *c, call *x, int64_t now)
{
	chan *k = x->conn;
	pbrpc__cl_chan_ref(k);
	/* The deadline was checked when the request was sent (at `now`, which
	 * also sets the first recv timeout); the reader's recv timeout and the
	 * followers' timed wait catch it from there. */
	for (bool first = true; !x->done; first = false) {
		if (!first && x->deadline && pbrpc__now_ns() >= x->deadline) {
			pbrpc__cl_abandon(c, x, PBRPC_STATUS_DEADLINE_EXCEEDED, -ETIMEDOUT, "deadline exceeded");
			break;
		}
		if (!k->reading) {
			pbrpc__cl_reader_enter(k);
			pbrpc__cl_reader_step(c, k, x, x->deadline, first ? now : 0);
			if (x->in_decoder)
				break;
			pbrpc__cl_reader_leave(c, k);
			continue;
		}
		if (pbrpc__conn_pending_out(&k->base) && !k->pumping && !chan_dead(k)) {
			pump_write(c, k, x->deadline);
			continue;
		}
		follow(c, k, x);
	}
	/* We may have been woken to take over the reading: pass that on. */
	pbrpc__list *w = pbrpc__list_first(&k->waiters);
	if (!chan_dead(k) && !k->reading && w)
		pthread_cond_signal(&pbrpc__container_of(w, call, wlink)->cond);
	pbrpc__cl_chan_unref(c, k);
}

/* The current connection when it takes a call at once: the client is not
 * closing, the connection was used within CL_PROBE_IDLE_NS of `now` and has
 * a free call slot. Else NULL (sync_conn decides). Inline: every call asks. */
static inline chan *ready_conn(const pbrpc_client *c, int64_t now)
{
	chan *k = c->cur;
	if (__builtin_expect(c->closing || !k || now - k->used_at >= CL_PROBE_IDLE_NS, 0))
		return NULL;
	if (k->base.peer_max_calls && chan_inflight(k) >= k->base.peer_max_calls)
		return NULL;
	return k;
}

/* A connection for a synchronous call, waiting (within x's deadline) for a
 * connection, a reconnect backoff or a free call slot. *now is refreshed
 * whenever it waits. NULL: x has failed. */
static chan *sync_conn(pbrpc_client *c, call *x, int64_t *now_io)
{
	for (bool waited = false;; waited = true) {
		if (c->closing) {
			pbrpc__cl_call_fail(x, PBRPC_STATUS_CANCELLED, PBRPC_ECLOSED, "client is shutting down");
			return NULL;
		}
		chan *k = c->cur;
		if (k && __builtin_expect(*now_io - k->used_at >= CL_PROBE_IDLE_NS, 0) &&
		    pbrpc__cl_probe_idle(c, k, *now_io))
			continue;
		if (k && (!k->base.peer_max_calls || chan_inflight(k) < k->base.peer_max_calls))
			return k; /* the fast path reads no clock */
		int64_t now = *now_io = waited ? pbrpc__now_ns() : *now_io;
		bool expired = x->deadline && now >= x->deadline;
		if (k) {
			if (expired) {
				pbrpc__cl_call_fail(x, PBRPC_STATUS_DEADLINE_EXCEEDED, -ETIMEDOUT,
						    "deadline exceeded waiting for a call slot (the server allows %u in flight)",
						    (unsigned)k->base.peer_max_calls);
				return NULL;
			}
			if (!k->reading) {
				/* Nobody reads the replies that would free a slot. */
				pbrpc__cl_chan_ref(k);
				pbrpc__cl_reader_enter(k);
				pbrpc__cl_reader_step(c, k, NULL, x->deadline, 0);
				pbrpc__cl_reader_leave(c, k);
				pbrpc__cl_chan_unref(c, k);
				continue;
			}
			c->slot_waiters++;
			pbrpc__cl_cond_wait_until(&c->cond, &c->mu, x->deadline);
			c->slot_waiters--;
			continue;
		}
		if (expired) {
			if (c->last_err)
				pbrpc__cl_call_fail(x, PBRPC_STATUS_UNAVAILABLE, c->last_err, "%s", c->last_msg);
			else
				pbrpc__cl_call_fail(x, PBRPC_STATUS_UNAVAILABLE, -ETIMEDOUT,
						    "no connection to %s before the deadline", c->ep_str);
			return NULL;
		}
		if (c->connecting) {
			pbrpc__cl_cond_wait_until(&c->cond, &c->mu, x->deadline);
			continue;
		}
		if (now < c->next_attempt) {
			pbrpc__cl_cond_wait_until(&c->cond, &c->mu, pbrpc__deadline_min(c->next_attempt, x->deadline));
			continue;
		}
		pbrpc__cl_connect_locked(c, x->deadline);
	}
}

chan *pbrpc__cl_sync_conn(pbrpc_client *c, call *x, int64_t *now_io)
{
	return sync_conn(c, x, now_io);
}

/* Releases what a finished synchronous call holds (locked). */
void pbrpc__cl_sync_release(pbrpc_client *c, call *x)
{
	if (x->in_decoder) {
		x->in_decoder = false;
		pbrpc__cl_reader_leave(c, x->rconn);
		x->rconn = NULL;
	}
	call_release(c, x);
}

/* Runs a synchronous call. Returns with the mutex held and x done, or NULL
 * (out of memory). A call the server cannot have run (answered UNAVAILABLE
 * and NOT_RUN, e.g. by a draining server, or its REQUEST could not be
 * written) is sent again on a new connection, up to CL_MAX_ATTEMPTS sends
 * within its deadline. */
call *pbrpc__cl_sync_call(pbrpc_client *c, const call_args *a)
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
		x->attempts = (uint8_t)attempt;
		if (attempt > 0)
			now = pbrpc__now_ns();
		if (a->deadline && now >= a->deadline) {
			/* Already expired: fail without sending a byte. */
			pbrpc__cl_call_fail(x, PBRPC_STATUS_DEADLINE_EXCEEDED, -ETIMEDOUT,
					    "deadline exceeded before the call was sent");
			return x;
		}
		chan *k = ready_conn(c, now);
		if (__builtin_expect(!k, 0))
			k = sync_conn(c, x, &now);
		if (!k || pbrpc__cl_send_request(c, k, x, a, now) < 0)
			return x;
		if (!x->done) /* else the connection failed while sending */
			sync_wait(c, x, now);
		if (!x->retry || attempt + 1 >= CL_MAX_ATTEMPTS)
			return x;
		pbrpc__cl_sync_release(c, x);
	}
}

/* ---- the synchronous stub ---- */

/* Runs a closure and then restores this thread's status and message (set by
 * the call whose reply it gets) if the closure changed them. Out of line: the
 * copy needs a message-sized buffer, and a successful call has no message. */
__attribute__((noinline)) static void closure_keep_status(ProtobufCClosure closure, const ProtobufCMessage *reply,
							  void *closure_data)
{
	int st = th.status;
	unsigned gen = th.gen;
	size_t saved_len = th.msg_len;
	char saved[PBRPC_STATUS_MESSAGE_MAX + 1];
	memcpy(saved, pbrpc__cl_tc.msg, saved_len);

	closure(reply, closure_data);

	if (th.gen != gen)
		pbrpc__cl_set_status(st, saved, saved_len);
}

/* Unpacks x's reply into a thread (or pooled) arena. */
static const ProtobufCMessage *sync_unpack(pbrpc_client *c, call *x, const ProtobufCMessageDescriptor *out,
					   int64_t start, cl_arena **ar, bool *pooled)
{
	*ar = thread_arena_take(start);
	if (!*ar) {
		*ar = pbrpc__cl_arena_get(c);
		*pooled = true;
	}
	/* A small reply is unpacked under the lock we hold anyway; a big one
	 * without it (the call record, or the reader role for bytes still in
	 * the decoder, keeps them in place). */
	const ProtobufCMessage *reply;
	if (x->body_len > CL_UNPACK_LOCKED_MAX) {
		pthread_mutex_unlock(&c->mu);
		reply = pbrpc__cl_unpack_reply(out, *ar, x->body, x->body_len);
		pthread_mutex_lock(&c->mu);
	} else {
		reply = pbrpc__cl_unpack_reply(out, *ar, x->body, x->body_len);
	}
	if (reply)
		pbrpc__cl_set_status(x->status, x->msg, x->msg_len);
	return reply;
}

void pbrpc__cl_sync_invoke(svc *s, unsigned idx, const ProtobufCMessage *input, ProtobufCClosure closure,
			   void *closure_data)
{
	pbrpc_client *c = s->c;
	const ProtobufCMessageDescriptor *out = s->base.descriptor->methods[idx].output;
	pbrpc_call_opts o;
	call_args a;
	pbrpc__cl_args_init(&a, c, s->m[idx].s, s->m[idx].len, pbrpc__cl_svc_opts(s, &o));
	a.method_checked = s->m[idx].valid;
	a.msg = input;

	call *x = pbrpc__cl_sync_call(c, &a);
	if (!x) {
		pthread_mutex_unlock(&c->mu);
		th.last_call = 0;
		pbrpc__cl_set_statusf(PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		closure(NULL, closure_data);
		pbrpc__cl_set_statusf(PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		return;
	}
	th.last_call = x->id;
	const ProtobufCMessage *reply = NULL;
	cl_arena *ar = NULL;
	bool pooled = false;
	if (x->status == PBRPC_STATUS_OK)
		reply = sync_unpack(c, x, out, a.start, &ar, &pooled);
	else
		pbrpc__cl_set_status(x->status, x->msg, x->msg_len);
	bool fds = x->nfds != 0;
	if (__builtin_expect(fds, 0))
		pbrpc__cl_th_fds_set(x); /* pbrpc_client_reply_fds, in the closure */
	pbrpc__cl_sync_release(c, x);
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
			pbrpc__cl_set_status(st, NULL, 0);
	}
	if (__builtin_expect(fds, 0))
		pbrpc__cl_th_fds_drop(); /* those the closure did not take */
	if (ar && pooled) {
		pbrpc__arena_reset(&ar->a);
		pthread_mutex_lock(&c->mu);
		pbrpc__cl_arena_put(c, ar);
		pthread_mutex_unlock(&c->mu);
	} else if (ar) {
		thread_arena_give(ar, a.start);
	} else if (reply) {
		protobuf_c_message_free_unpacked((ProtobufCMessage *)reply, NULL);
	}
}
