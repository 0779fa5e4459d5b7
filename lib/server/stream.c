/* Server streams (docs/PROTOCOL.md section 11): a stream is a call (an
 * srv_call in the connection's id map, counted against max_calls, answered
 * once by its final RESPONSE) with a pbrpc_stream beside it holding the
 * flow-control state, the messages held for the handler and its callbacks.
 *
 * Everything here runs on the loop thread. User callbacks run either inside
 * a frame's dispatch (a message, a WINDOW: as a unary handler runs) or from
 * pbrpc__srv_stream_events(), at the end of a loop round, for what was
 * noticed in places that must not call out: a stream over (cancel, deadline,
 * drain, connection closed), held messages to deliver after set_ops or a
 * resume.
 *
 * Ownership: the stream and its call belong to the handler from the
 * handler's call to pbrpc_stream_end(); end inside a callback is noted and
 * the stream freed when the outermost callback returns (in_cb). Held
 * messages are malloc'd copies of MESSAGE payloads, counted against the
 * memory budget (call->mem) and bounded by the window we granted.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pbrpc/stream.h"
#include "server/server_impl.h"

#define SRV_STREAM_MAGIC 0x70627374u
#define HELD_OVERHEAD 32u /* counted per held message besides its bytes */
#define CREDIT_MAX ((int64_t)1 << 62)

typedef struct srv_stream_method {
	pbrpc_stream_kind kind;
	const ProtobufCMessageDescriptor *input, *output;
	pbrpc_stream_handler_cb handler;
	void *user;
} srv_stream_method;

typedef struct held_msg {
	struct held_msg *next;
	size_t len;
	uint8_t data[];
} held_msg;

struct pbrpc_stream {
	uint32_t magic;
	srv_call *call;
	pbrpc_server *srv;
	const srv_stream_method *sm;
	const pbrpc_stream_ops *ops;
	void *user;
	ProtobufCMessage *request; /* SERVER streams: in call->arena */
	int64_t send_credit;       /* bytes we may still send */
	int64_t recv_credit;       /* bytes the client may still send, as we count */
	int64_t to_return;         /* consumed, not yet granted back */
	uint32_t recv_window;
	held_msg *head, **tail;
	size_t held_bytes; /* counted in call->mem */
	int over_status;   /* -1 while live */
	int in_cb;
	bool ended;        /* pbrpc_stream_end() was called */
	bool paused;
	bool client_done;  /* HALF_CLOSE arrived (or a SERVER stream) */
	bool half_close_told;
	bool want_writable;
	bool over_pending; /* on_cancel to run */
	bool queued;       /* on srv->stream_events */
	pbrpc__list elink;
};

/* ---- registration ---- */

static int add_stream(pbrpc_server *srv, const char *name, pbrpc_stream_kind kind,
		      const ProtobufCMessageDescriptor *in, const ProtobufCMessageDescriptor *out,
		      pbrpc_stream_handler_cb handler, void *user)
{
	if (!srv || !name || !handler || !in || !out || kind < PBRPC_STREAM_CLIENT || kind > PBRPC_STREAM_BIDI)
		return PBRPC_EINVALID;
	srv_stream_method *sm = malloc(sizeof(*sm));
	if (!sm)
		return -ENOMEM;
	*sm = (srv_stream_method){ kind, in, out, handler, user };
	return pbrpc__registry_add_stream(srv->reg, name, (uint8_t)kind, sm);
}

PBRPC_EXPORT int pbrpc_server_add_stream(pbrpc_server *srv, const pbrpc_stream_desc *desc,
					 pbrpc_stream_handler_cb handler, void *user)
{
	if (!desc)
		return PBRPC_EINVALID;
	return add_stream(srv, desc->method, desc->kind, desc->input, desc->output, handler, user);
}

PBRPC_EXPORT int pbrpc_server_add_stream_method(pbrpc_server *srv, const ProtobufCServiceDescriptor *service,
						const char *method, pbrpc_stream_kind kind,
						pbrpc_stream_handler_cb handler, void *user)
{
	if (!service || !method || !service->name)
		return PBRPC_EINVALID;
	for (unsigned i = 0; i < service->n_methods; i++) {
		const ProtobufCMethodDescriptor *md = &service->methods[i];
		if (strcmp(md->name, method) != 0)
			continue;
		char name[PBRPC_METHOD_MAX + 1];
		int n = snprintf(name, sizeof(name), "%s/%s", service->name, md->name);
		if (n < 0 || (size_t)n >= sizeof(name))
			return PBRPC_EINVALID;
		return add_stream(srv, name, kind, md->input, md->output, handler, user);
	}
	return PBRPC_EINVALID;
}

/* ---- memory and events ---- */

static void mem_add(pbrpc_stream *st, size_t n)
{
	srv_call *call = st->call;
	call->mem += n;
	st->srv->mem_used += n;
	if (call->conn)
		call->conn->mem_used += n;
}

static void mem_sub(pbrpc_stream *st, size_t n)
{
	srv_call *call = st->call;
	call->mem -= n;
	st->srv->mem_used -= n;
	if (call->conn)
		call->conn->mem_used -= n;
}

static void schedule(pbrpc_stream *st)
{
	if (st->queued || st->ended)
		return;
	st->queued = true;
	pbrpc__list_append(&st->srv->stream_events, &st->elink);
}

static void held_drop_all(pbrpc_stream *st)
{
	while (st->head) {
		held_msg *h = st->head;
		st->head = h->next;
		mem_sub(st, h->len + HELD_OVERHEAD);
		free(h);
	}
	st->tail = &st->head;
	st->held_bytes = 0;
}

static void stream_free(pbrpc_stream *st)
{
	pbrpc_server *srv = st->srv;
	srv_call *call = st->call;
	held_drop_all(st);
	if (st->queued)
		pbrpc__list_remove(&st->elink);
	mem_sub(st, sizeof(*st));
	st->magic = 0;
	call->stream = NULL;
	free(st);
	pbrpc__srv_call_put(srv, call);
}

/* After a callback: free the stream if the handler ended it meanwhile.
 * Returns true when st is gone. */
static bool cb_leave(pbrpc_stream *st)
{
	if (--st->in_cb == 0 && st->ended) {
		stream_free(st);
		return true;
	}
	return false;
}

void pbrpc__srv_stream_destroy(srv_call *call)
{
	pbrpc_stream *st = call->stream;
	while (st->head) {
		held_msg *h = st->head;
		st->head = h->next;
		free(h);
	}
	st->magic = 0;
	free(st);
	call->stream = NULL;
}

void pbrpc__srv_stream_over(srv_call *call, int status)
{
	pbrpc_stream *st = call->stream;
	if (!st || st->over_status >= 0 || st->ended)
		return;
	st->over_status = status;
	st->over_pending = true;
	held_drop_all(st);
	schedule(st);
}

/* ---- receiving ---- */

static bool stream_live(const pbrpc_stream *st)
{
	const srv_call *call = st->call;
	return !call->answered && call->conn && !pbrpc__conn_closed(&call->conn->base);
}

/* The client consumed `cost` bytes: grant them back once half the window
 * has been used, so that a WINDOW goes out every few messages, not each. */
static void credit_return(pbrpc_stream *st, int64_t cost)
{
	st->to_return += cost;
	if (st->to_return < (int64_t)(st->recv_window / 2 ? st->recv_window / 2 : 1) || !stream_live(st))
		return;
	srv_conn *c = st->call->conn;
	uint32_t inc = st->to_return > UINT32_MAX ? UINT32_MAX : (uint32_t)st->to_return;
	if (pbrpc__wire_write_window(&c->base.out, st->call->id, inc) < 0)
		return;
	st->to_return -= inc;
	st->recv_credit += inc;
	pbrpc__srv_mark_dirty(c);
}

/* Unpacks one message and hands it to on_message. Returns true when st is
 * gone (ended inside the callback). */
static bool deliver(pbrpc_stream *st, const uint8_t *data, size_t len)
{
	pbrpc_server *srv = st->srv;
	srv_call *call = st->call;
	pbrpc__arena_set_limit(&call->arena, (size_t)srv->o.unpack_factor * len + SRV_ARENA_KEEP);
	ProtobufCMessage *m = protobuf_c_message_unpack(st->sm->input, &call->arena.pa, len, data);
	if (!m) {
		/* The client's fault: end the stream for it, the handler hears it
		 * as a cancel. */
		char text[256];
		if (call->arena.limited)
			snprintf(text, sizeof(text), "stream message of %zu bytes needs more than %zu bytes to unpack", len,
				 call->arena.limit);
		else
			snprintf(text, sizeof(text), "stream message is not a valid %s", st->sm->input->name);
		pbrpc__arena_reset(&call->arena);
		atomic_store(&call->cancelled, true);
		pbrpc__srv_call_answer(call, call->arena.limited ? PBRPC_STATUS_RESOURCE_EXHAUSTED
								 : PBRPC_STATUS_INVALID_ARGUMENT,
				       text, NULL, NULL, 0);
		pbrpc__srv_stream_over(call, PBRPC_STATUS_INVALID_ARGUMENT);
		return false;
	}
	st->in_cb++;
	st->ops->on_message(st, m, st->user);
	pbrpc__arena_reset(&call->arena);
	if (cb_leave(st))
		return true;
	credit_return(st, PBRPC_WIRE_MESSAGE_COST(len));
	return false;
}

static bool can_deliver(const pbrpc_stream *st)
{
	return !st->ended && !st->paused && st->over_status < 0 && st->ops && st->ops->on_message;
}

/* Delivers held messages, then the half-close. Returns true when st is gone. */
static bool deliver_held(pbrpc_stream *st)
{
	while (st->head && can_deliver(st)) {
		held_msg *h = st->head;
		st->head = h->next;
		if (!st->head)
			st->tail = &st->head;
		st->held_bytes -= h->len;
		mem_sub(st, h->len + HELD_OVERHEAD);
		bool gone = deliver(st, h->data, h->len);
		free(h);
		if (gone)
			return true;
	}
	if (st->client_done && !st->half_close_told && !st->head && !st->ended && !st->paused && st->over_status < 0 &&
	    st->ops) {
		st->half_close_told = true;
		if (st->ops->on_half_close) {
			st->in_cb++;
			st->ops->on_half_close(st, st->user);
			return cb_leave(st);
		}
	}
	return false;
}

static bool hold(pbrpc_stream *st, const uint8_t *data, size_t len)
{
	held_msg *h = malloc(sizeof(*h) + len);
	if (!h)
		return false;
	h->next = NULL;
	h->len = len;
	memcpy(h->data, data, len);
	*st->tail = h;
	st->tail = &h->next;
	st->held_bytes += len;
	mem_add(st, len + HELD_OVERHEAD);
	return true;
}

static void writable(pbrpc_stream *st)
{
	if (!st->want_writable || st->send_credit <= 0 || !stream_live(st))
		return;
	st->want_writable = false;
	if (st->ops && st->ops->on_writable) {
		st->in_cb++;
		st->ops->on_writable(st, st->user);
		cb_leave(st);
	}
}

bool pbrpc__srv_on_stream(pbrpc__conn *base, const pbrpc__frame *f, void *arg)
{
	(void)arg;
	srv_call *call = pbrpc__idmap_get(&base->calls, f->hdr.stream);
	if (!call)
		return false; /* it crossed our RESPONSE */
	pbrpc_stream *st = call->stream;
	const char *type = pbrpc__wire_frame_name(f->hdr.type);
	if (!st) {
		pbrpc__conn_fail(base, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO, "%s for call %u, which is not a stream",
				 type, (unsigned)f->hdr.stream);
		return false;
	}
	switch (f->hdr.type) {
	case PBRPC_FRAME_WINDOW: {
		uint32_t inc = pbrpc__wire_read_window(f);
		if (inc == 0) {
			pbrpc__conn_fail(base, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO, "WINDOW of 0 for stream %u",
					 (unsigned)f->hdr.stream);
			return false;
		}
		if (st->send_credit < CREDIT_MAX)
			st->send_credit += inc;
		writable(st);
		return false;
	}
	case PBRPC_FRAME_MESSAGE:
	case PBRPC_FRAME_HALF_CLOSE:
		if (!(st->sm->kind & PBRPC_STREAM_CLIENT) || st->client_done) {
			pbrpc__conn_fail(base, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO, "%s for stream %u %s", type,
					 (unsigned)f->hdr.stream,
					 st->client_done && (st->sm->kind & PBRPC_STREAM_CLIENT)
						 ? "after its HALF_CLOSE"
						 : "of a method whose client does not stream");
			return false;
		}
		break;
	}
	if (f->hdr.type == PBRPC_FRAME_HALF_CLOSE) {
		st->client_done = true;
		if (!st->head && can_deliver(st))
			deliver_held(st);
		else if (can_deliver(st))
			schedule(st);
		return false;
	}
	if (st->recv_credit <= 0) {
		pbrpc__conn_fail(base, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO,
				 "stream %u sent a MESSAGE past its flow-control window", (unsigned)f->hdr.stream);
		return false;
	}
	st->recv_credit -= PBRPC_WIRE_MESSAGE_COST(f->hdr.length);
	if (st->over_status >= 0 || st->ended)
		return false;
	if (!st->head && can_deliver(st)) {
		deliver(st, f->payload, f->hdr.length);
		return false;
	}
	if (!hold(st, f->payload, f->hdr.length)) {
		atomic_store(&call->cancelled, true);
		pbrpc__srv_call_answer(call, PBRPC_STATUS_RESOURCE_EXHAUSTED, "server out of memory", NULL, NULL, 0);
		pbrpc__srv_stream_over(call, PBRPC_STATUS_RESOURCE_EXHAUSTED);
	} else if (can_deliver(st)) {
		schedule(st);
	}
	return false;
}

void pbrpc__srv_stream_events(pbrpc_server *srv)
{
	pbrpc__list *l;
	while ((l = pbrpc__list_first(&srv->stream_events)) != NULL) {
		pbrpc__list_remove(l);
		pbrpc_stream *st = pbrpc__container_of(l, pbrpc_stream, elink);
		st->queued = false;
		st->in_cb++;
		if (st->over_pending) {
			st->over_pending = false;
			if (st->ops && st->ops->on_cancel)
				st->ops->on_cancel(st, st->user);
		} else if (!deliver_held(st)) {
			writable(st);
		} else {
			continue; /* gone */
		}
		cb_leave(st);
	}
}

/* ---- opening ---- */

void pbrpc__srv_stream_open(srv_conn *c, const pbrpc__frame *f, const pbrpc__wire_request *req,
			    const pbrpc__method *m)
{
	pbrpc_server *srv = c->srv;
	const srv_stream_method *sm = m->stream;
	char text[256] = "server out of memory";
	if ((sm->kind & PBRPC_STREAM_CLIENT) && req->body_len) {
		pbrpc__srv_refuse(c, f, req, m, PBRPC_STATUS_INVALID_ARGUMENT,
				  "the REQUEST of a client or bidirectional stream carries no body");
		return;
	}
	srv_call *call = pbrpc__srv_call_get(srv);
	pbrpc_stream *st = call ? calloc(1, sizeof(*st)) : NULL;
	if (!st) {
		if (call) {
			call->answered = true;
			pbrpc__srv_call_put(srv, call);
		}
		pbrpc__srv_refuse(c, f, req, m, PBRPC_STATUS_RESOURCE_EXHAUSTED, "server out of memory");
		return;
	}
	call->magic = SRV_STREAM_MAGIC; /* not a closure_data */
	call->id = req->call_id;
	call->m = m;
	call->t0 = srv->now;
	call->bytes_in = f->hdr.length;
	call->started = false;
	call->mem = 0;
	int status = 0;
	if (!(sm->kind & PBRPC_STREAM_CLIENT)) {
		size_t room = pbrpc__srv_mem_avail(c), lim = (size_t)srv->o.unpack_factor * req->body_len + SRV_ARENA_KEEP;
		pbrpc__arena_set_limit(&call->arena, lim < room ? lim : room);
		st->request = protobuf_c_message_unpack(sm->input, &call->arena.pa, req->body_len, req->body);
		if (!st->request) {
			status = call->arena.limited ? PBRPC_STATUS_RESOURCE_EXHAUSTED : PBRPC_STATUS_INVALID_ARGUMENT;
			if (call->arena.limited)
				snprintf(text, sizeof(text), "request needs more than %zu bytes to unpack",
					 call->arena.limit);
			else
				snprintf(text, sizeof(text), "request body is not a valid %s", sm->input->name);
		}
	}
	if (!status && req->metadata_raw_len) {
		if (call->md_cap < req->metadata_raw_len) {
			uint8_t *p = realloc(call->md, req->metadata_raw_len);
			if (!p) {
				status = PBRPC_STATUS_RESOURCE_EXHAUSTED;
				snprintf(text, sizeof(text), "server out of memory");
			}
			else {
				call->md = p;
				call->md_cap = req->metadata_raw_len;
			}
		}
		if (!status) {
			memcpy(call->md, req->metadata_raw, req->metadata_raw_len);
			call->md_len = req->metadata_raw_len;
		}
	}
	if (!status && pbrpc__idmap_put(&c->base.calls, call->id, call) < 0) {
		status = PBRPC_STATUS_RESOURCE_EXHAUSTED;
		snprintf(text, sizeof(text), "server out of memory");
	}
	if (status) {
		free(st);
		call->answered = true;
		pbrpc__srv_call_put(srv, call);
		pbrpc__srv_refuse(c, f, req, m, status, text);
		return;
	}
	st->magic = SRV_STREAM_MAGIC;
	st->call = call;
	st->srv = srv;
	st->sm = sm;
	st->over_status = -1;
	st->tail = &st->head;
	st->send_credit = c->base.peer_stream_window;
	st->recv_window = c->base.stream_window;
	st->recv_credit = st->recv_window;
	st->client_done = !(sm->kind & PBRPC_STREAM_CLIENT);
	st->half_close_told = st->client_done;
	pbrpc__list_init(&st->elink);
	call->stream = st;
	call->conn = c;
	call->has_cred = c->has_cred;
	call->cred = c->cred;
	mem_add(st, call->arena.want + call->md_len + sizeof(*st));
	if (req->has_timeout) {
		int64_t us = req->timeout_us > (uint64_t)INT64_MAX / 2000 ? INT64_MAX / 2000 : (int64_t)req->timeout_us;
		call->deadline_ns = srv->now + us * 1000;
	}
	SRV_STAT_ADD(srv, calls_started, 1);
	if (__builtin_expect(srv->reg->observe, 0)) {
		call->started = true;
		pbrpc__registry_observe_start(srv->reg, m);
	}
	st->in_cb++;
	sm->handler(st, st->request, sm->user);
	bool answered = call->answered;
	if (cb_leave(st))
		return;
	if (call->deadline_ns && !answered)
		pbrpc__heap_start(&srv->timers, &call->timer, call->deadline_ns);
}

/* ---- the handler's API ---- */

static pbrpc_stream *as_stream(const pbrpc_stream *st)
{
	return st && st->magic == SRV_STREAM_MAGIC && !st->ended ? (pbrpc_stream *)st : NULL;
}

PBRPC_EXPORT void pbrpc_stream_set_ops(pbrpc_stream *st, const pbrpc_stream_ops *ops, void *user)
{
	if (!as_stream(st))
		return;
	st->ops = ops;
	st->user = user;
	if ((st->head || (st->client_done && !st->half_close_told)) && can_deliver(st))
		schedule(st);
}

PBRPC_EXPORT void pbrpc_stream_set_user(pbrpc_stream *st, void *user)
{
	if (as_stream(st))
		st->user = user;
}

PBRPC_EXPORT void *pbrpc_stream_user(const pbrpc_stream *st)
{
	return as_stream(st) ? st->user : NULL;
}

PBRPC_EXPORT int pbrpc_stream_send(pbrpc_stream *st, const ProtobufCMessage *msg)
{
	if (!as_stream(st) || !msg || !(st->sm->kind & PBRPC_STREAM_SERVER) || msg->descriptor != st->sm->output)
		return PBRPC_EINVALID;
	if (!stream_live(st))
		return PBRPC_ECLOSED;
	if (st->send_credit <= 0) {
		st->want_writable = true;
		return -EAGAIN;
	}
	srv_conn *c = st->call->conn;
	long n = pbrpc__wire_write_message(&c->base.out, st->call->id, msg, c->base.peer_max_frame);
	if (n < 0)
		return (int)n;
	st->send_credit -= PBRPC_WIRE_MESSAGE_COST(n);
	pbrpc__srv_mark_dirty(c);
	return 0;
}

PBRPC_EXPORT bool pbrpc_stream_writable(const pbrpc_stream *st)
{
	return as_stream(st) && (st->sm->kind & PBRPC_STREAM_SERVER) && st->send_credit > 0 && stream_live(st);
}

PBRPC_EXPORT int pbrpc_stream_end(pbrpc_stream *st, int status, const ProtobufCMessage *reply, const char *fmt, ...)
{
	if (!as_stream(st))
		return PBRPC_EINVALID;
	srv_call *call = st->call;
	int rc = 0;
	st->ended = true;
	if (call->answered) {
		rc = PBRPC_ECLOSED;
	} else {
		char *text = NULL;
		if (fmt) {
			va_list ap;
			va_start(ap, fmt);
			if (vasprintf(&text, fmt, ap) < 0)
				text = NULL;
			va_end(ap);
		}
		if (status < 0 || status >= PBRPC_STATUS_COUNT) {
			status = PBRPC_STATUS_UNKNOWN;
			rc = PBRPC_EINVALID;
		}
		const ProtobufCMessage *body = NULL;
		if (status == PBRPC_STATUS_OK && st->sm->kind == PBRPC_STREAM_CLIENT) {
			body = reply;
			if (reply && reply->descriptor != st->sm->output) {
				free(text);
				if (asprintf(&text, "handler replied with a %s, expected %s", reply->descriptor->name,
					     st->sm->output->name) < 0)
					text = NULL;
				status = PBRPC_STATUS_INTERNAL;
				body = NULL;
			}
		}
		pbrpc__srv_call_answer(call, status, text, body, NULL, 0);
		free(text);
	}
	if (st->in_cb == 0)
		stream_free(st);
	return rc;
}

PBRPC_EXPORT int pbrpc_stream_post(pbrpc_stream *st, void (*fn)(void *arg), void *arg)
{
	if (!st || st->magic != SRV_STREAM_MAGIC || !fn)
		return PBRPC_EINVALID;
	return pbrpc__srv_post(st->srv, fn, arg);
}

PBRPC_EXPORT void pbrpc_stream_pause(pbrpc_stream *st, bool paused)
{
	if (!as_stream(st) || st->paused == paused)
		return;
	st->paused = paused;
	if (!paused && can_deliver(st) && (st->head || (st->client_done && !st->half_close_told)))
		schedule(st);
}

PBRPC_EXPORT bool pbrpc_stream_cancelled(const pbrpc_stream *st)
{
	return !st || atomic_load(&st->call->cancelled);
}

PBRPC_EXPORT int pbrpc_stream_status(const pbrpc_stream *st)
{
	return as_stream(st) ? st->over_status : -1;
}

PBRPC_EXPORT pbrpc_stream_kind pbrpc_stream_get_kind(const pbrpc_stream *st)
{
	return as_stream(st) ? st->sm->kind : (pbrpc_stream_kind)0;
}

PBRPC_EXPORT int64_t pbrpc_stream_deadline(const pbrpc_stream *st)
{
	return as_stream(st) ? st->call->deadline_ns : 0;
}

PBRPC_EXPORT const char *pbrpc_stream_method(const pbrpc_stream *st)
{
	return as_stream(st) ? st->call->m->name : NULL;
}

PBRPC_EXPORT const void *pbrpc_stream_metadata(const pbrpc_stream *st, const char *key, size_t *len)
{
	if (!as_stream(st) || !st->call->md_len || !key)
		return NULL;
	pbrpc__wire_request view = { .metadata_raw = st->call->md, .metadata_raw_len = st->call->md_len };
	size_t l = 0;
	const void *v = pbrpc__wire_metadata_get(&view, key, &l);
	if (len)
		*len = l;
	return v;
}

PBRPC_EXPORT int pbrpc_stream_peer_cred(const pbrpc_stream *st, pid_t *pid, uid_t *uid, gid_t *gid)
{
	if (!as_stream(st))
		return PBRPC_EINVALID;
	return pbrpc__srv_call_peer_cred(st->call, pid, uid, gid);
}
