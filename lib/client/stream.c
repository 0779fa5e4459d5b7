/* Client streams (docs/PROTOCOL.md section 11, include/pbrpc/stream.h).
 *
 * A stream owns two call records: `x`, a CALL_STREAM in the connection's id
 * map from the REQUEST to the RESPONSE (so that the id, max_calls, GOAWAY,
 * connection loss and cancel work as for any call), and `w`, never in a map,
 * whose condvar and waiter link a sending thread uses while a receiving one
 * waits on x's. Threads that wait become the connection's reader when nobody
 * reads (leader/follower, as synchronous calls do): every frame for the
 * stream is handled by whichever thread reads, under the client's mutex.
 *
 * Messages from the server are copied out of the decoder into `head`
 * (malloc'd, bounded by the window we grant) and unpacked by next() into the
 * stream's arena, valid until the next next(). Everything here runs with the
 * client's mutex held, except where it says it drops it.
 *
 * Asynchronous streams (opts.on_message): what arrives marks the stream
 * ready (c->stream_ready, and the eventfd); pbrpc_client_process() runs its
 * callbacks through pbrpc__cl_run_done -> pbrpc__cl_streams_run, without the
 * mutex, one thread per stream at a time (`running`). They count in
 * c->async_pending and their connection's async_inflight until the final
 * callback, after which pbrpc frees them.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "client/client_impl.h"
#include "pbrpc/stream.h"

#define CREDIT_MAX ((int64_t)1 << 62)

/* The queue of a stream's messages: one buffer of records, each a u32
 * length, a byte saying whether it counts against the window (a MESSAGE) or
 * not (a client stream's reply from the RESPONSE), 3 bytes of padding, and
 * the message's bytes. */
#define QREC_HDR 8

struct pbrpc_client_stream {
	pbrpc_client *c;
	call *x; /* the id (CALL_STREAM); ours until free (REF_OWNER) */
	call *w; /* the sender's condvar */
	chan *k; /* referenced from the REQUEST on, until free */
	pbrpc_stream_kind kind;
	const ProtobufCMessageDescriptor *input, *output;
	int64_t deadline;
	int64_t send_credit, recv_credit, to_return;
	uint32_t recv_window;
	uint8_t *q; /* queued records are q[qhead, qtail) */
	size_t qhead, qtail, qcap;
	bool sent_close, done;
	int status;
	char *msg; /* the final status message, malloc'd */
	pbrpc__arena arena; /* next()'s message */
	pbrpc__list link;   /* c->streams */
	bool orphan;        /* its client was freed: only status and free work */
	/* asynchronous streams */
	pbrpc_client_stream_message_cb on_message;
	pbrpc_client_stream_event_cb on_writable;
	void *user;
	pbrpc__list rlink;  /* c->stream_ready */
	bool running;       /* a thread runs its callbacks */
	bool want_writable; /* a send returned -EAGAIN */
	bool tell_writable; /* credit came back: on_writable to run */
	bool told;          /* the final callback has run */
	bool counted;       /* in c->async_pending and k->async_inflight */
};

static void mark_ready(pbrpc_client *c, pbrpc_client_stream *st)
{
	if (!st->on_message || st->told)
		return;
	if (!pbrpc__list_linked(&st->rlink))
		pbrpc__list_append(&c->stream_ready, &st->rlink);
	if (pbrpc__cl_th.in_process != c)
		pbrpc__cl_efd_signal(c);
}

/* ---- what the reader hands us ---- */

static void wake(pbrpc_client_stream *st)
{
	pthread_cond_broadcast(&st->x->cond);
	pthread_cond_broadcast(&st->w->cond);
	mark_ready(st->c, st);
}

static void drop_queue(pbrpc_client_stream *st)
{
	free(st->q);
	st->q = NULL;
	st->qhead = st->qtail = st->qcap = 0;
}

static bool queued(const pbrpc_client_stream *st)
{
	return st->qhead != st->qtail;
}

static bool enqueue(pbrpc_client_stream *st, const uint8_t *data, size_t len, bool credited)
{
	size_t need = QREC_HDR + len;
	if (st->qtail + need > st->qcap && st->qhead) {
		memmove(st->q, st->q + st->qhead, st->qtail - st->qhead);
		st->qtail -= st->qhead;
		st->qhead = 0;
	}
	if (st->qtail + need > st->qcap) {
		size_t cap = st->qcap ? st->qcap * 2 : 4096;
		while (cap < st->qtail + need)
			cap *= 2;
		uint8_t *nq = realloc(st->q, cap);
		if (!nq)
			return false;
		st->q = nq;
		st->qcap = cap;
	}
	uint8_t *r = st->q + st->qtail;
	uint32_t l = (uint32_t)len;
	memcpy(r, &l, 4);
	r[4] = credited;
	if (len)
		memcpy(r + QREC_HDR, data, len);
	st->qtail += need;
	return true;
}

/* The oldest record: its bytes stay valid until dequeue() or enqueue(). */
static const uint8_t *q_front(const pbrpc_client_stream *st, size_t *len, bool *credited)
{
	const uint8_t *r = st->q + st->qhead;
	uint32_t l;
	memcpy(&l, r, 4);
	*len = l;
	*credited = r[4] != 0;
	return r + QREC_HDR;
}

static void dequeue(pbrpc_client_stream *st, size_t len)
{
	st->qhead += QREC_HDR + len;
	if (st->qhead == st->qtail)
		st->qhead = st->qtail = 0;
}

/* x's status is final (RESPONSE, connection lost, cancel, deadline). */
void pbrpc__cl_stream_finished(pbrpc_client *c, call *x)
{
	(void)c;
	pbrpc_client_stream *st = x->stream;
	if (!st || st->done)
		return;
	st->done = true;
	st->status = x->status;
	free(st->msg);
	st->msg = malloc(x->msg_len + 1);
	if (st->msg) {
		if (x->msg_len)
			memcpy(st->msg, x->msg, x->msg_len);
		st->msg[x->msg_len] = 0;
	}
	if (st->status != PBRPC_STATUS_OK)
		drop_queue(st);
	pbrpc__heap_stop(&c->timers, &x->timer);
	if (st->counted && st->k)
		st->k->async_inflight--;
	wake(st);
}

bool pbrpc__cl_stream_response(pbrpc_client *c, chan *k, call *x, const pbrpc__wire_response *r)
{
	(void)k;
	pbrpc__cl_call_unlink(c, x);
	pbrpc_client_stream *st = x->stream;
	if (x->abandoned || !st) {
		if (!x->refs)
			pbrpc__cl_call_put(c, x);
		return false;
	}
	int status = (r->status < 0 || r->status >= PBRPC_STATUS_COUNT) ? PBRPC_STATUS_UNKNOWN : r->status;
	if (status == PBRPC_STATUS_OK && st->kind == PBRPC_STREAM_CLIENT && !enqueue(st, r->body, r->body_len, false)) {
		pbrpc__cl_call_fail(x, PBRPC_STATUS_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory storing the reply");
	} else {
		x->status = status;
		x->err = 0;
		x->msg = r->message;
		x->msg_len = r->message_len;
	}
	pbrpc__cl_call_finish(c, x);
	return false;
}

bool pbrpc__cl_on_stream(pbrpc__conn *b, const pbrpc__frame *f, void *arg)
{
	(void)arg;
	chan *k = pbrpc__container_of(b, chan, base);
	pbrpc_client *c = k->c;
	call *x = pbrpc__idmap_get(&b->calls, f->hdr.stream);
	const char *type = pbrpc__wire_frame_name(f->hdr.type);
	if (!x || x->kind != CALL_STREAM) {
		/* We keep a stream's id until its RESPONSE, which comes last. */
		pbrpc__conn_fail(b, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO, "%s for call %u, which is not a stream",
				 type, (unsigned)f->hdr.stream);
		return false;
	}
	pbrpc_client_stream *st = x->stream;
	if (!st || x->abandoned)
		return false; /* given up on: the server's RESPONSE follows */
	if (f->hdr.type == PBRPC_FRAME_WINDOW) {
		uint32_t inc = pbrpc__wire_read_window(f);
		if (inc == 0) {
			pbrpc__conn_fail(b, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO, "WINDOW of 0 for stream %u",
					 (unsigned)f->hdr.stream);
			return false;
		}
		if (st->send_credit < CREDIT_MAX)
			st->send_credit += inc;
		pthread_cond_broadcast(&st->w->cond);
		if (st->want_writable && st->send_credit > 0) {
			st->want_writable = false;
			st->tell_writable = true;
			mark_ready(c, st);
		}
		return false;
	}
	if (!(st->kind & PBRPC_STREAM_SERVER)) {
		pbrpc__conn_fail(b, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO,
				 "MESSAGE for stream %u of a method whose server does not stream", (unsigned)f->hdr.stream);
		return false;
	}
	if (st->recv_credit <= 0) {
		pbrpc__conn_fail(b, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO,
				 "stream %u sent a MESSAGE past its flow-control window", (unsigned)f->hdr.stream);
		return false;
	}
	st->recv_credit -= PBRPC_WIRE_MESSAGE_COST(f->hdr.length);
	if (!enqueue(st, f->payload, f->hdr.length, true)) {
		pbrpc__cl_abandon(c, x, PBRPC_STATUS_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory storing a stream message");
		return false;
	}
	pthread_cond_broadcast(&x->cond);
	mark_ready(c, st);
	return false;
}

/* ---- waiting ---- */

/* Waits once for news on st until `until` (0: none): as the connection's
 * reader (one read, dropping the mutex meanwhile) if nobody reads, else on
 * `me`'s condvar. The caller looks again at what it waits for. */
static void stream_wait(pbrpc_client *c, pbrpc_client_stream *st, call *me, int64_t until)
{
	chan *k = st->k;
	if (!k || chan_dead(k)) {
		pbrpc__cl_cond_wait_until(&me->cond, &c->mu, until);
		return;
	}
	if (!k->reading) {
		pbrpc__cl_chan_ref(k);
		pbrpc__cl_reader_enter(k);
		size_t before = pbrpc__conn_pending_in(&k->base);
		if (before)
			pbrpc__cl_dispatch(c, k, NULL); /* frames a previous reader left */
		if (!before || pbrpc__conn_pending_in(&k->base) == before)
			pbrpc__cl_reader_step(c, k, NULL, until, 0);
		pbrpc__cl_reader_leave(c, k);
		pbrpc__cl_chan_unref(c, k);
		return;
	}
	pbrpc__list_append(&k->waiters, &me->wlink);
	pbrpc__cl_cond_wait_until(&me->cond, &c->mu, until);
	pbrpc__list_remove(&me->wlink);
}

/* The deadline passed: the stream ends DEADLINE_EXCEEDED (CANCEL sent). */
static bool expired(pbrpc_client *c, pbrpc_client_stream *st, int64_t now)
{
	if (st->done || !st->deadline || now < st->deadline)
		return false;
	pbrpc__cl_abandon(c, st->x, PBRPC_STATUS_DEADLINE_EXCEEDED, -ETIMEDOUT, "deadline exceeded");
	return true;
}

static int64_t op_until(int64_t now, int timeout_ms)
{
	return timeout_ms > 0 ? now + (int64_t)timeout_ms * PBRPC__NS_PER_MS : 0;
}

/* ---- opening ---- */

static void finish_local(pbrpc_client *c, pbrpc_client_stream *st)
{
	st->x->done = true;
	pbrpc__cl_stream_finished(c, st->x);
}

PBRPC_EXPORT int pbrpc_client_stream_open(pbrpc_client *c, const pbrpc_stream_desc *desc,
					  const ProtobufCMessage *request, const pbrpc_stream_opts *opts,
					  pbrpc_client_stream **out)
{
	if (out)
		*out = NULL;
	if (!c || !desc || !out || !desc->method || !desc->input || !desc->output || desc->kind < PBRPC_STREAM_CLIENT ||
	    desc->kind > PBRPC_STREAM_BIDI)
		return PBRPC_EINVALID;
	size_t ml = strlen(desc->method);
	if (!pbrpc_method_valid(desc->method, ml))
		return PBRPC_EINVALID;
	bool one = !(desc->kind & PBRPC_STREAM_CLIENT);
	if (one ? !request || request->descriptor != desc->input : request != NULL)
		return PBRPC_EINVALID;
	pbrpc_stream_opts o = { 0 };
	if (opts)
		o = *opts;
	if (!o.on_message && o.on_writable)
		return PBRPC_EINVALID;
	pbrpc_client_stream *st = calloc(1, sizeof(*st));
	if (!st)
		return -ENOMEM;
	st->c = c;
	st->kind = desc->kind;
	st->input = desc->input;
	st->output = desc->output;
	st->sent_close = one;
	st->on_message = o.on_message;
	st->on_writable = o.on_writable;
	st->user = o.user;
	pbrpc__list_init(&st->rlink);
	pbrpc__arena_init(&st->arena, 64u << 10, NULL);

	pthread_mutex_lock(&c->mu);
	int64_t now = pbrpc__now_ns();
	big_check(c, now);
	st->x = call_get(c, CALL_STREAM);
	st->w = st->x ? call_get(c, CALL_SYNC) : NULL;
	if (!st->w) {
		if (st->x)
			call_release(c, st->x);
		pthread_mutex_unlock(&c->mu);
		pbrpc__arena_fini(&st->arena);
		free(st);
		return -ENOMEM;
	}
	call *x = st->x;
	x->stream = st;
	if (o.deadline_ns)
		st->deadline = o.deadline_ns;
	else if (o.timeout_ms > 0)
		st->deadline = now + (int64_t)o.timeout_ms * PBRPC__NS_PER_MS;
	x->deadline = st->deadline;
	int rc = 0;
	chan *k = NULL;
	if (st->deadline && now >= st->deadline) {
		pbrpc__cl_call_fail(x, PBRPC_STATUS_DEADLINE_EXCEEDED, -ETIMEDOUT,
				    "deadline exceeded before the stream was opened");
		finish_local(c, st);
	} else if (!(k = pbrpc__cl_sync_conn(c, x, &now))) {
		finish_local(c, st);
	} else if (!(k->base.features & PBRPC_FEATURE_STREAMS)) {
		pbrpc__cl_call_fail(x, PBRPC_STATUS_UNIMPLEMENTED, -ENOTSUP, "the server (%s) does not support streams",
				    k->base.peer.agent);
		finish_local(c, st);
	} else {
		call_args a;
		memset(&a, 0, sizeof(a));
		a.method = desc->method;
		a.method_len = ml;
		a.msg = request;
		a.md = o.metadata;
		a.md_count = o.metadata ? o.metadata_count : 0;
		a.deadline = st->deadline;
		a.start = now;
		a.stream_kind = (uint8_t)desc->kind;
		st->k = k;
		pbrpc__cl_chan_ref(k);
		st->send_credit = k->base.peer_stream_window;
		st->recv_window = o.recv_window > k->base.stream_window ? o.recv_window : k->base.stream_window;
		st->recv_credit = st->recv_window;
		rc = pbrpc__cl_send_request(c, k, x, &a, now);
		if (rc == PBRPC_ETOOBIG || rc == PBRPC_EINVALID || rc == -ENOMEM) {
			x->stream = NULL;
			call_release(c, x);
			call_release(c, st->w);
			pbrpc__cl_chan_unref(c, k);
			pthread_mutex_unlock(&c->mu);
			pbrpc__arena_fini(&st->arena);
			free(st->msg);
			free(st);
			return rc;
		}
		if (rc < 0)
			finish_local(c, st);
		else if (!st->done && st->recv_window > k->base.stream_window &&
			 pbrpc__wire_write_window(&k->base.out, x->id, st->recv_window - k->base.stream_window) == 0)
			pbrpc__cl_chan_flush(c, k);
	}
	pbrpc__list_append(&c->streams, &st->link);
	if (st->on_message) {
		/* Its callbacks run from pbrpc_client_process, which must now read
		 * the socket; a deadline is a timer there. */
		c->async_pending++;
		pbrpc__cl_watch_enable(c);
		if (!st->done) {
			st->counted = true;
			st->k->async_inflight++;
			if (st->deadline)
				pbrpc__heap_start(&c->timers, &x->timer, st->deadline);
		}
		mark_ready(c, st);
	}
	pthread_mutex_unlock(&c->mu);
	*out = st;
	return 0;
}

/* ---- asynchronous streams' callbacks ---- */

static void stream_release(pbrpc_client *c, pbrpc_client_stream *st);
static void credit_return(pbrpc_client *c, pbrpc_client_stream *st, int64_t cost);

/* Runs st's callbacks until nothing is left (locked; drops the mutex around
 * each). Returns how many ran; st is freed after its final one. */
static int stream_run(pbrpc_client *c, pbrpc_client_stream *st)
{
	int n = 0;
	for (;;) {
		if (queued(st)) {
			size_t mlen;
			bool credited;
			const uint8_t *data = q_front(st, &mlen, &credited);
			pbrpc__arena_reset(&st->arena);
			ProtobufCMessage *u = protobuf_c_message_unpack(st->output, &st->arena.pa, mlen, data);
			int64_t cost = credited ? PBRPC_WIRE_MESSAGE_COST(mlen) : 0;
			dequeue(st, mlen);
			if (!u) {
				if (!st->done)
					pbrpc__cl_abandon(c, st->x, PBRPC_STATUS_INTERNAL, PBRPC_EDECODE,
							  "stream message is not a valid message of its type");
				continue;
			}
			pthread_mutex_unlock(&c->mu);
			st->on_message(st, u, st->user);
			pthread_mutex_lock(&c->mu);
			pbrpc__arena_reset(&st->arena);
			if (cost)
				credit_return(c, st, cost);
			n++;
			continue;
		}
		if (st->tell_writable && !st->done) {
			st->tell_writable = false;
			if (st->on_writable) {
				pthread_mutex_unlock(&c->mu);
				st->on_writable(st, st->user);
				pthread_mutex_lock(&c->mu);
				n++;
			}
			continue;
		}
		if (st->done && !st->told) {
			st->told = true;
			pthread_mutex_unlock(&c->mu);
			st->on_message(st, NULL, st->user);
			pthread_mutex_lock(&c->mu);
			c->async_pending--;
			stream_release(c, st);
			return n + 1;
		}
		break;
	}
	st->running = false;
	return n;
}

int pbrpc__cl_streams_run(pbrpc_client *c)
{
	pbrpc__list list;
	pbrpc__list_init(&list);
	pbrpc__list_splice(&list, &c->stream_ready);
	pbrpc_client *outer = pbrpc__cl_th.in_process;
	pbrpc__cl_th.in_process = NULL; /* what callbacks do must signal pollers */
	int n = 0;
	pbrpc__list *l;
	while ((l = pbrpc__list_first(&list)) != NULL) {
		pbrpc__list_remove(l);
		pbrpc_client_stream *st = pbrpc__container_of(l, pbrpc_client_stream, rlink);
		if (st->running)
			continue; /* its runner looks again before it stops */
		st->running = true;
		n += stream_run(c, st);
	}
	pbrpc__cl_th.in_process = outer;
	return n;
}

/* The client is being freed with streams not yet freed: they keep their
 * final status (the connections are closed: CANCELLED) and let go of the
 * client's records, which go with it. */
void pbrpc__cl_streams_orphan(pbrpc_client *c)
{
	/* Asynchronous streams get their final callbacks here. */
	pbrpc__list_for_each_safe(st, &c->streams, pbrpc_client_stream, link) {
		if (st->on_message && !st->done) {
			pbrpc__cl_call_fail(st->x, PBRPC_STATUS_CANCELLED, PBRPC_ECLOSED, "client freed");
			finish_local(c, st);
		}
	}
	while (!pbrpc__list_empty(&c->stream_ready))
		pbrpc__cl_streams_run(c);
	pbrpc__list_for_each_safe(st, &c->streams, pbrpc_client_stream, link) {
		if (!st->done) {
			pbrpc__cl_call_fail(st->x, PBRPC_STATUS_CANCELLED, PBRPC_ECLOSED, "client freed");
			finish_local(c, st);
		}
		pbrpc__list_remove(&st->link);
		st->x->stream = NULL;
		st->orphan = true;
		st->x = st->w = NULL;
		st->k = NULL;
		st->c = NULL;
	}
}

/* ---- sending ---- */

PBRPC_EXPORT int pbrpc_client_stream_send(pbrpc_client_stream *st, const ProtobufCMessage *msg, int timeout_ms)
{
	if (!st || !msg || !(st->kind & PBRPC_STREAM_CLIENT) || msg->descriptor != st->input)
		return PBRPC_EINVALID;
	if (st->orphan)
		return PBRPC_ESTATUS;
	pbrpc_client *c = st->c;
	pthread_mutex_lock(&c->mu);
	int64_t now = pbrpc__now_ns();
	int64_t until = op_until(now, timeout_ms);
	int rc;
	for (;;) {
		if (st->done || expired(c, st, now)) {
			rc = PBRPC_ESTATUS;
			break;
		}
		if (st->sent_close) {
			rc = PBRPC_EINVALID;
			break;
		}
		if (st->send_credit > 0) {
			chan *k = st->k;
			long n = pbrpc__wire_write_message(&k->base.out, st->x->id, msg, k->base.peer_max_frame);
			if (n < 0) {
				rc = (int)n;
				break;
			}
			st->send_credit -= PBRPC_WIRE_MESSAGE_COST(n);
			pbrpc__cl_chan_flush(c, k);
			rc = 0;
			break;
		}
		if (timeout_ms == 0) {
			st->want_writable = true;
			rc = -EAGAIN;
			break;
		}
		if (until && now >= until) {
			rc = -ETIMEDOUT;
			break;
		}
		stream_wait(c, st, st->w, pbrpc__deadline_min(until, st->deadline));
		now = pbrpc__now_ns();
	}
	pthread_mutex_unlock(&c->mu);
	return rc;
}

PBRPC_EXPORT int pbrpc_client_stream_close_send(pbrpc_client_stream *st)
{
	if (!st)
		return PBRPC_EINVALID;
	if (st->orphan)
		return st->sent_close ? 0 : PBRPC_ESTATUS;
	pbrpc_client *c = st->c;
	pthread_mutex_lock(&c->mu);
	int rc = 0;
	if (st->sent_close) {
		rc = 0;
	} else if (st->done) {
		rc = PBRPC_ESTATUS;
	} else if ((rc = pbrpc__wire_write_half_close(&st->k->base.out, st->x->id)) == 0) {
		st->sent_close = true;
		pbrpc__cl_chan_flush(c, st->k);
	}
	pthread_mutex_unlock(&c->mu);
	return rc;
}

/* ---- receiving ---- */

/* The application consumed `cost` bytes: grant them back once half the
 * window is used. */
static void credit_return(pbrpc_client *c, pbrpc_client_stream *st, int64_t cost)
{
	st->to_return += cost;
	if (st->done || st->x->abandoned || st->to_return < (int64_t)(st->recv_window / 2 ? st->recv_window / 2 : 1))
		return;
	chan *k = st->k;
	uint32_t inc = st->to_return > UINT32_MAX ? UINT32_MAX : (uint32_t)st->to_return;
	if (chan_dead(k) || pbrpc__wire_write_window(&k->base.out, st->x->id, inc) < 0)
		return;
	st->to_return -= inc;
	st->recv_credit += inc;
	pbrpc__cl_chan_flush(c, k);
}

PBRPC_EXPORT int pbrpc_client_stream_next(pbrpc_client_stream *st, const ProtobufCMessage **msg, int timeout_ms)
{
	if (msg)
		*msg = NULL;
	if (!st || !msg)
		return PBRPC_EINVALID;
	if (st->on_message)
		return PBRPC_EINVALID;
	if (st->orphan)
		return PBRPC_ESTATUS;
	pbrpc_client *c = st->c;
	pthread_mutex_lock(&c->mu);
	pbrpc__arena_reset(&st->arena);
	int64_t now = 0;
	int64_t until = 0;
	int rc;
	for (bool first = true;; first = false) {
		if (queued(st)) {
			size_t mlen;
			bool credited;
			const uint8_t *data = q_front(st, &mlen, &credited);
			ProtobufCMessage *u = protobuf_c_message_unpack(st->output, &st->arena.pa, mlen, data);
			int64_t cost = credited ? PBRPC_WIRE_MESSAGE_COST(mlen) : 0;
			dequeue(st, mlen);
			if (!u) {
				if (!st->done)
					pbrpc__cl_abandon(c, st->x, PBRPC_STATUS_INTERNAL, PBRPC_EDECODE,
							  st->arena.failed ? "out of memory unpacking a stream message"
									   : "stream message is not a valid message of its type");
				rc = PBRPC_ESTATUS;
				break;
			}
			if (cost)
				credit_return(c, st, cost);
			*msg = u;
			rc = 1;
			break;
		}
		if (st->done) {
			rc = st->status == PBRPC_STATUS_OK ? 0 : PBRPC_ESTATUS;
			break;
		}
		if (first) {
			now = pbrpc__now_ns();
			until = op_until(now, timeout_ms);
		} else {
			now = pbrpc__now_ns();
		}
		if (expired(c, st, now)) {
			rc = PBRPC_ESTATUS;
			break;
		}
		if (timeout_ms == 0) {
			rc = -EAGAIN;
			break;
		}
		if (until && now >= until) {
			rc = -ETIMEDOUT;
			break;
		}
		stream_wait(c, st, st->x, pbrpc__deadline_min(until, st->deadline));
	}
	pthread_mutex_unlock(&c->mu);
	return rc;
}

/* ---- the end ---- */

PBRPC_EXPORT void pbrpc_client_stream_cancel(pbrpc_client_stream *st)
{
	if (!st || st->orphan)
		return;
	pbrpc_client *c = st->c;
	pthread_mutex_lock(&c->mu);
	if (!st->done)
		pbrpc__cl_abandon(c, st->x, PBRPC_STATUS_CANCELLED, PBRPC_ECLOSED, "cancelled by the client");
	pthread_mutex_unlock(&c->mu);
}

PBRPC_EXPORT int pbrpc_client_stream_status(const pbrpc_client_stream *st, const char **message)
{
	if (message)
		*message = "";
	if (!st)
		return PBRPC_EINVALID;
	if (st->orphan) {
		if (message && st->msg)
			*message = st->msg;
		return st->status;
	}
	pbrpc_client *c = st->c;
	pthread_mutex_lock(&c->mu);
	int rc = -EINPROGRESS;
	if (st->done) {
		rc = st->status;
		if (message && st->msg)
			*message = st->msg;
	}
	pthread_mutex_unlock(&c->mu);
	return rc;
}

PBRPC_EXPORT void pbrpc_client_stream_free(pbrpc_client_stream *st)
{
	if (!st)
		return;
	if (st->on_message && !st->orphan) {
		pbrpc_client_stream_cancel(st); /* pbrpc frees it after its final callback */
		return;
	}
	if (!st->orphan) {
		pbrpc_client *c = st->c;
		pthread_mutex_lock(&c->mu);
		if (!st->done)
			pbrpc__cl_abandon(c, st->x, PBRPC_STATUS_CANCELLED, PBRPC_ECLOSED, "stream freed");
		stream_release(c, st);
		pthread_mutex_unlock(&c->mu);
		return;
	}
	drop_queue(st);
	pbrpc__arena_fini(&st->arena);
	free(st->msg);
	free(st);
}

/* Frees st (locked): its records, its connection reference, its memory. */
static void stream_release(pbrpc_client *c, pbrpc_client_stream *st)
{
	st->x->stream = NULL;
	call_release(c, st->x);
	call_release(c, st->w);
	if (st->k)
		pbrpc__cl_chan_unref(c, st->k);
	pbrpc__list_remove(&st->link);
	if (pbrpc__list_linked(&st->rlink))
		pbrpc__list_remove(&st->rlink);
	drop_queue(st);
	pbrpc__arena_fini(&st->arena);
	free(st->msg);
	free(st);
}
