/* Asynchronous calls: the stub queues the REQUEST and returns; the closure
 * runs later from pbrpc_client_process() (or the client's I/O thread).
 * Deadlines of async calls wait in the client's timer heap. */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "client/client_impl.h"
#include "util/bytes.h"

#define th pbrpc__cl_th

/* Gives up on x (deadline or cancel): its status is final now, a CANCEL tells
 * the server, and its id stays reserved until the server's RESPONSE. */
void pbrpc__cl_abandon(pbrpc_client *c, call *x, int status, int err, const char *what)
{
	chan *k = x->conn;
	x->abandoned = true;
	pbrpc__cl_call_fail(x, status, err, "%s", what);
	size_t before = k ? pbrpc__conn_pending_out(&k->base) : 0;
	if (k && !chan_dead(k) && pbrpc__wire_write_cancel(&k->base.out, x->id) == 0) {
		if (x->kind == CALL_ASYNC)
			pbrpc__cl_chan_flush_later(c, k, before, false); /* as its REQUEST was */
		else
			pbrpc__cl_chan_flush(c, k);
	}
	pbrpc__cl_call_finish(c, x);
}

/* A connection for an asynchronous call: fails fast (UNAVAILABLE) while the
 * reconnect backoff runs, and with RESOURCE_EXHAUSTED when the server's
 * max_calls are all in flight. */
static chan *async_conn(pbrpc_client *c, call *x, int64_t *now_io)
{
	for (;;) {
		if (c->closing) {
			pbrpc__cl_call_fail(x, PBRPC_STATUS_CANCELLED, PBRPC_ECLOSED, "client is shutting down");
			return NULL;
		}
		chan *k = c->cur;
		if (k && __builtin_expect(*now_io - k->used_at >= CL_PROBE_IDLE_NS, 0) &&
		    pbrpc__cl_probe_idle(c, k, *now_io))
			continue;
		if (k) {
			if (k->base.peer_max_calls && chan_inflight(k) >= k->base.peer_max_calls) {
				pbrpc__cl_call_fail(x, PBRPC_STATUS_RESOURCE_EXHAUSTED, PBRPC_EQUEUEFULL,
						    "too many calls in flight: the server accepts at most %u",
						    (unsigned)k->base.peer_max_calls);
				return NULL;
			}
			return k;
		}
		if (c->connecting) {
			struct timespec ts = pbrpc__deadline_timespec(x->deadline);
			if (x->deadline)
				pthread_cond_timedwait(&c->cond, &c->mu, &ts);
			else
				pthread_cond_wait(&c->cond, &c->mu);
			*now_io = pbrpc__now_ns();
			if (x->deadline && *now_io >= x->deadline) {
				pbrpc__cl_call_fail(x, PBRPC_STATUS_DEADLINE_EXCEEDED, -ETIMEDOUT,
						    "deadline exceeded while connecting");
				return NULL;
			}
			continue;
		}
		int64_t now = *now_io;
		if (now < c->next_attempt) {
			pbrpc__cl_call_fail(x, PBRPC_STATUS_UNAVAILABLE, c->last_err ? c->last_err : -ENOTCONN,
					    "not connected (%s); next attempt in %lld ms",
					    c->last_msg[0] ? c->last_msg : "no connection",
					    (long long)((c->next_attempt - now + PBRPC__NS_PER_MS - 1) / PBRPC__NS_PER_MS));
			return NULL;
		}
		int rc = pbrpc__cl_connect_locked(c, x->deadline);
		*now_io = pbrpc__now_ns();
		if (rc < 0) {
			pbrpc__cl_call_fail(x, PBRPC_STATUS_UNAVAILABLE, c->last_err, "%s", c->last_msg);
			return NULL;
		}
	}
}

/* Out of line so that the service's invoke stays a check and a jump on the
 * sync path. */
__attribute__((noinline)) void pbrpc__cl_async_invoke(svc *s, unsigned idx, const ProtobufCMessage *input,
						      ProtobufCClosure closure, void *closure_data)
{
	pbrpc_client *c = s->c;
	pbrpc_call_opts o;
	call_args a;
	pbrpc__cl_args_init(&a, c, s->m[idx].s, s->m[idx].len, pbrpc__cl_svc_opts(s, &o));
	a.method_checked = s->m[idx].valid;
	a.msg = input;
	th.last_call = 0;

	pthread_mutex_lock(&c->mu);
	big_check(c, a.start);
	call *x = call_get(c, CALL_ASYNC);
	if (!x) {
		pthread_mutex_unlock(&c->mu);
		pbrpc__cl_set_statusf(PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		closure(NULL, closure_data);
		return;
	}
	x->out_desc = s->base.descriptor->methods[idx].output;
	x->closure = closure;
	x->closure_data = closure_data;
	x->deadline = a.deadline;
	c->async_pending++;

	chan *k = NULL;
	int rc = -1;
	int64_t now = a.start;
	if (a.deadline && now >= a.deadline)
		pbrpc__cl_call_fail(x, PBRPC_STATUS_DEADLINE_EXCEEDED, -ETIMEDOUT, "deadline exceeded before the call was sent");
	else if ((k = async_conn(c, x, &now)) != NULL)
		rc = pbrpc__cl_send_request(c, k, x, &a, now);
	if (rc < 0)
		pbrpc__cl_call_finish(c, x);
	else if (!x->done && x->deadline && pbrpc__heap_start(&c->timers, &x->timer, x->deadline) < 0)
		pbrpc__cl_abandon(c, x, PBRPC_STATUS_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory arming the deadline");
	th.last_call = x->id;
	pthread_mutex_unlock(&c->mu);
}

/* ---- sending again what the server did not run ---- */

/* Keeps a copy of the REQUEST payload just queued for x (`before`: the
 * writer's pending bytes before it), so that x can be sent again. */
void pbrpc__cl_keep_request(call *x, const chan *k, size_t before, const call_args *a)
{
	const pbrpc__frame_writer *w = &k->base.out;
	size_t frame = pbrpc__conn_pending_out(&k->base) - before;
	size_t len = frame - PBRPC_FRAME_HEADER_SIZE;
	x->req_len = 0;
	if (len > CL_RETRY_COPY_MAX)
		return; /* not re-sendable: too large to copy on every call */
	if (len > x->req_cap) {
		uint8_t *nb = realloc(x->req, len);
		if (!nb)
			return;
		x->req = nb;
		x->req_cap = len;
	}
	const uint8_t *f = w->buf + w->tail - frame;
	x->req_flags = f[5];
	memcpy(x->req, f + PBRPC_FRAME_HEADER_SIZE, len);
	x->req_len = len;
	x->req_timeout_at = (x->req_flags & PBRPC_REQUEST_TIMEOUT) ? 2 + a->method_len : SIZE_MAX;
}

/* Sends x's kept REQUEST again on k, with a new id and the time it has left.
 * Returns 0, or a negative code with x's status set. */
static int resend(pbrpc_client *c, chan *k, call *x, int64_t now)
{
	if (x->req_timeout_at != SIZE_MAX) {
		int64_t left = x->deadline - now;
		if (left <= 0) {
			pbrpc__cl_call_fail(x, PBRPC_STATUS_DEADLINE_EXCEEDED, -ETIMEDOUT, "deadline exceeded");
			return -ETIMEDOUT;
		}
		pbrpc__put_u64(x->req + x->req_timeout_at, (uint64_t)left / 1000);
	}
	if (x->req_len > k->base.peer_max_frame) {
		pbrpc__cl_call_fail(x, PBRPC_STATUS_RESOURCE_EXHAUSTED, PBRPC_ETOOBIG,
				    "request is %zu bytes, server accepts at most %u", x->req_len,
				    (unsigned)k->base.peer_max_frame);
		return PBRPC_ETOOBIG;
	}
	if (pbrpc__idmap_reserve(&k->base.calls) < 0) {
		pbrpc__cl_call_fail(x, PBRPC_STATUS_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	x->id = pbrpc__cl_alloc_id(c);
	pbrpc__frame_header h = { .type = PBRPC_FRAME_REQUEST, .flags = x->req_flags, .stream = x->id };
	if (pbrpc__frame_writer_append(&k->base.out, &h, x->req, x->req_len) < 0) {
		pbrpc__cl_call_fail(x, PBRPC_STATUS_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	pbrpc__idmap_put(&k->base.calls, x->id, x);
	x->attempts++;
	x->retry = false;
	x->refs |= REF_TABLE;
	x->conn = k;
	k->async_inflight++;
	pbrpc__cl_chan_flush(c, k);
	return 0;
}

/* Sends again the async calls on c->retry (locked; may drop the mutex to
 * dial). Calls wait there, within their deadline, for a connection. */
void pbrpc__cl_retry_calls(pbrpc_client *c)
{
	pbrpc__list *l;
	while ((l = pbrpc__list_first(&c->retry)) != NULL) {
		call *x = pbrpc__container_of(l, call, qlink);
		int64_t now = pbrpc__now_ns();
		if (c->closing || (x->deadline && now >= x->deadline)) {
			pbrpc__list_remove(l);
			if (c->closing)
				pbrpc__cl_call_fail(x, PBRPC_STATUS_CANCELLED, PBRPC_ECLOSED, "client is shutting down");
			else
				pbrpc__cl_call_fail(x, PBRPC_STATUS_DEADLINE_EXCEEDED, -ETIMEDOUT, "deadline exceeded");
			pbrpc__cl_call_finish(c, x);
			continue;
		}
		chan *k = c->cur;
		if (!k) {
			if (c->connecting || now < c->next_attempt)
				return; /* process() wakes up for the next attempt */
			if (pbrpc__cl_connect_locked(c, x->deadline) < 0)
				return;
			continue; /* the mutex was dropped: look again */
		}
		if (k->base.peer_max_calls && chan_inflight(k) >= k->base.peer_max_calls)
			return;
		pbrpc__list_remove(l);
		if (resend(c, k, x, now) < 0)
			pbrpc__cl_call_finish(c, x);
	}
}

/* ---- completions ---- */

/* Runs the queued async closures (locked on entry and exit; unlocked while
 * they run). Returns how many ran. */
int pbrpc__cl_run_done(pbrpc_client *c)
{
	int ns = pbrpc__list_empty(&c->stream_ready) ? 0 : pbrpc__cl_streams_run(c);
	if (pbrpc__list_empty(&c->done))
		return ns;
	pbrpc__list list;
	pbrpc__list_init(&list);
	pbrpc__list_splice(&list, &c->done);
	cl_arena *a = pbrpc__cl_arena_get(c);
	pthread_mutex_unlock(&c->mu);

	pbrpc_client *outer = th.in_process;
	th.in_process = NULL; /* calls made by closures must signal pollers */
	pbrpc_client *outer_round = th.round;
	th.round = c; /* their requests go out at the end of the round */
	int n = 0;
	pbrpc__list_for_each(x, &list, call, qlink) {
		const ProtobufCMessage *reply = NULL;
		if (x->status == PBRPC_STATUS_OK && x->out_desc) {
			reply = pbrpc__cl_unpack_reply(x->out_desc, a, x->body, x->body_len);
			if (reply)
				pbrpc__cl_set_status(x->status, x->msg, x->msg_len);
		} else {
			pbrpc__cl_set_status(x->status, x->msg, x->msg_len);
		}
		if (__builtin_expect(x->nfds, 0))
			pbrpc__cl_th_fds_set(x);
		x->closure(reply, x->closure_data);
		if (__builtin_expect(th.nrfds, 0))
			pbrpc__cl_th_fds_drop();
		pbrpc__cl_reply_free(reply, a);
		n++;
	}
	th.in_process = outer;
	th.round = outer_round;

	pthread_mutex_lock(&c->mu);
	pbrpc__list_for_each_safe(x, &list, call, qlink) {
		pbrpc__list_remove(&x->qlink);
		c->async_pending--;
		call_release(c, x);
	}
	pbrpc__cl_arena_put(c, a);
	return n + ns;
}

static void expire_timers(pbrpc_client *c)
{
	int64_t now = pbrpc__now_ns();
	big_check(c, now);
	pbrpc__timer *t;
	while ((t = pbrpc__heap_pop_due(&c->timers, now)) != NULL)
		pbrpc__cl_abandon(c, pbrpc__container_of(t, call, timer), PBRPC_STATUS_DEADLINE_EXCEEDED, -ETIMEDOUT,
				  "deadline exceeded");
}

/* One round over the connections: flush, read what nobody else reads.
 * Returns whether the sockets need watching. */
static bool process_conns(pbrpc_client *c)
{
	bool watch = false;
	pbrpc__list_for_each_safe(k, &c->conns, chan, link) {
		if (chan_dead(k))
			continue;
		pbrpc__cl_chan_ref(k);
		pbrpc__cl_chan_flush(c, k);
		if (!chan_dead(k) && !k->reading) {
			pbrpc__cl_reader_enter(k);
			pbrpc__cl_read_nb(c, k, CL_READ_BUDGET);
			pbrpc__cl_reader_leave(c, k);
			watch = true;
		}
		if (!chan_dead(k) && pbrpc__conn_pending_out(&k->base))
			watch = true;
		pbrpc__cl_chan_unref(c, k);
	}
	return watch;
}

/* Waits (unlocked) for the sockets, or only the eventfd when each socket is
 * read by a synchronous caller (then only its hand-over matters). */
static void process_wait(pbrpc_client *c, bool watch, int64_t deadline)
{
	int64_t wake = deadline;
	pbrpc__timer *t = pbrpc__heap_top(&c->timers);
	if (t)
		wake = pbrpc__deadline_min(wake, t->when);
	if (c->big_at)
		wake = pbrpc__deadline_min(wake, c->big_at + CL_BIG_IDLE_NS); /* to give large buffers back */
	if (!pbrpc__list_empty(&c->retry) && !c->cur)
		wake = pbrpc__deadline_min(wake, c->next_attempt ? c->next_attempt : pbrpc__now_ns());
	int ms = pbrpc__ms_until(wake);
	if (c->tls_ctx) {
		/* Bytes inside OpenSSL make no socket readable: read them now. */
		pbrpc__list_for_each(k, &c->conns, chan, link)
			if (!chan_dead(k) && !k->reading && pbrpc__conn_buffered(&k->base))
				ms = 0;
	}
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

int pbrpc__cl_process_run(pbrpc_client *c, int timeout_ms, bool forever)
{
	int64_t deadline = timeout_ms > 0 ? pbrpc__now_ns() + (int64_t)timeout_ms * PBRPC__NS_PER_MS : 0;
	int ran = 0;
	pbrpc_client *outer = th.in_process;
	th.in_process = c;
	pthread_mutex_lock(&c->mu);
	pbrpc__cl_watch_enable(c);
	for (;;) {
		if (c->efd_signaled) {
			uint64_t v;
			ssize_t r = read(c->efd, &v, sizeof(v));
			(void)r; /* EAGAIN: already drained */
			c->efd_signaled = false;
		}
		expire_timers(c);
		pbrpc__cl_retry_calls(c);
		bool watch = process_conns(c);
		ran += pbrpc__cl_run_done(c);
		if (c->deferred)
			pbrpc__cl_flush_deferred(c); /* what the closures called, in one write */
		if (forever) {
			if (c->stopping)
				break;
		} else if (ran > 0 || timeout_ms == 0 || (timeout_ms < 0 && c->async_pending == 0) ||
			   (deadline && pbrpc__now_ns() >= deadline)) {
			break;
		}
		process_wait(c, watch, deadline);
	}
	pthread_mutex_unlock(&c->mu);
	th.in_process = outer;
	return ran;
}

void *pbrpc__cl_io_main(void *arg)
{
	pbrpc__cl_process_run(arg, -1, true);
	return NULL;
}
