/* Requests become calls, calls reach handlers (inline or on a worker), and
 * their closures come back as RESPONSE frames. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "proto/memfd.h"
#include "server/server_impl.h"
#include "util/io.h"

#define CALL_POOL_MAX 1024

/* Which server's loop runs on this thread (closures compare it to take the
 * direct path). initial-exec: read on every reply, no __tls_get_addr call. */
_Thread_local pbrpc_server *pbrpc__srv_tl_loop __attribute__((tls_model("initial-exec")));

/* ---- call records ---- */

static srv_call *call_get(pbrpc_server *srv)
{
	srv_call *call;
	pbrpc__list *l = pbrpc__list_first(&srv->free_calls);
	if (l) {
		pbrpc__list_remove(l);
		srv->n_free_calls--;
		call = pbrpc__container_of(l, srv_call, qlink);
	} else {
		call = calloc(1, sizeof(*call));
		if (!call)
			return NULL;
		pbrpc__arena_init(&call->arena, SRV_ARENA_KEEP, &srv->spare_big);
		pbrpc__timer_init(&call->timer, SRV_TIMER_CALL);
		pbrpc__list_init(&call->qlink);
	}
	call->magic = SRV_CALL_MAGIC;
	call->srv = srv;
	call->status = PBRPC_STATUS_OK;
	call->answered = false;
	call->not_run = false;
	call->deadline_ns = 0;
	call->md_len = 0;
	call->input = NULL;
	call->nfds = call->nrfds = 0;
	call->done_memfd = -1;
	atomic_store(&call->cancelled, false);
	pbrpc__list_insert(&srv->live, &call->live);
	SRV_STAT_ADD(srv, calls_in_flight, 1);
	return call;
}

/* The fds a call still holds: the request's not taken, the reply's not sent. */
static void call_fds_close(srv_call *call)
{
	if (call->nfds)
		pbrpc__io_close_fds(call->fds, call->nfds);
	if (call->nrfds)
		pbrpc__io_close_fds(call->rfds, call->nrfds);
	if (call->done_memfd >= 0)
		close(call->done_memfd);
	call->nfds = call->nrfds = 0;
	call->done_memfd = -1;
}

static void call_destroy(srv_call *call)
{
	if (call->stream)
		pbrpc__srv_stream_destroy(call);
	call_fds_close(call);
	free(call->fds);
	free(call->rfds);
	pbrpc__authz_peer_unref(call->peer_ext);
	pbrpc__tls_peer_unref(call->tls_peer);
	pbrpc__arena_fini(&call->arena);
	free(call->status_msg);
	free(call->done_msg);
	free(call->done_body);
	free(call->md);
	free(call->raw);
	free(call);
}

static void call_put(pbrpc_server *srv, srv_call *call)
{
	pbrpc__heap_stop(&srv->timers, &call->timer);
	if (__builtin_expect(call->nfds | call->nrfds, 0) || call->done_memfd >= 0)
		call_fds_close(call);
	pbrpc__tls_peer_unref(call->tls_peer);
	call->tls_peer = NULL;
	free(call->status_msg);
	call->status_msg = NULL;
	free(call->done_msg);
	call->done_msg = NULL;
	free(call->done_body);
	call->done_body = NULL;
	call->done_len = 0;
	if (call->peer_ext) {
		pbrpc__authz_peer_unref(call->peer_ext);
		call->peer_ext = NULL;
	}
	if (!call->arena.spare) {
		/* it was (to be) unpacked on a worker */
		free(call->raw);
		call->raw = NULL;
		call->raw_len = 0;
		call->refused = false;
		call->arena.spare = &srv->spare_big;
	}
	pbrpc__arena_reset(&call->arena);
	srv->mem_used -= call->mem;
	if (call->mem > SRV_BUF_KEEP)
		srv->trim = true;
	call->mem = 0;
	call->magic = 0;
	pbrpc__list_remove(&call->live);
	SRV_STAT_ADD(srv, calls_in_flight, -1);
	SRV_STAT_ADD(srv, calls_completed, 1);
	if (srv->n_free_calls >= CALL_POOL_MAX || call->md_cap > SRV_ARENA_KEEP) {
		call_destroy(call);
		return;
	}
	pbrpc__list_insert(&srv->free_calls, &call->qlink);
	srv->n_free_calls++;
}

void pbrpc__srv_calls_free(pbrpc_server *srv)
{
	pbrpc__list_init(&srv->cq); /* completed calls are on the live list too */
	pbrpc__list_for_each_safe(call, &srv->live, srv_call, live)
		call_destroy(call);
	pbrpc__list_for_each_safe(call, &srv->free_calls, srv_call, qlink)
		call_destroy(call);
	pbrpc__list_init(&srv->live);
	pbrpc__list_init(&srv->free_calls);
	srv->n_free_calls = 0;
}

/* ---- observing: opts.call_log and pbrpc.Stats (srv->reg->observe) ----
 * Off the call path's straight line: dispatch tests one flag and calls these
 * only when someone watches, so the clock is read only then. */

__attribute__((noinline, cold)) static void observe(pbrpc_server *srv, const srv_conn *c, const pbrpc__method *m,
						    const char *method, size_t method_len, uint32_t id, int status,
						    const char *message, int64_t t0, size_t bytes_in, size_t bytes_out,
						    bool ran, bool started)
{
	pbrpc_call_info info = {
		.method = method ? method : "",
		.method_len = method ? method_len : 0,
		.call_id = id,
		.status = status,
		.message = message,
		.duration_ns = pbrpc__now_ns() - t0,
		.bytes_in = bytes_in,
		.bytes_out = bytes_out,
		.ran = ran,
		.has_cred = c->has_cred,
		.peer = c->peer,
	};
	if (c->has_cred) {
		info.pid = c->cred.pid;
		info.uid = c->cred.uid;
		info.gid = c->cred.gid;
	}
	pbrpc__registry_observe(srv->reg, m, &info, started);
}

/* RESPONSE payload bytes queued since the writer held `before` bytes. */
static size_t queued_payload(const srv_conn *c, size_t before)
{
	size_t now = pbrpc__frame_writer_pending(&c->base.out);
	return now >= before + PBRPC_FRAME_HEADER_SIZE ? now - before - PBRPC_FRAME_HEADER_SIZE : 0;
}

__attribute__((noinline, cold)) static void observe_answer(const srv_call *call, const srv_conn *c, int status,
							   const char *message, size_t before)
{
	observe(call->srv, c, call->m, call->m->name, call->m->len, call->id, status, message, call->t0,
		call->bytes_in, queued_payload(c, before), !call->not_run, call->started);
}

/* ---- answering ---- */

/* A RESPONSE with fds: the handler's (OK replies only) and, for a body above
 * the threshold where memfds may travel, a sealed memfd holding it (packed
 * here, or on the worker: done_memfd). Each fd goes to the writer or is
 * closed. Returns what pbrpc__wire_write_response returns; r->body_fd says
 * whether the body went by memfd. */
static __attribute__((noinline)) int answer_fds(srv_call *call, srv_conn *c, pbrpc__wire_response *r,
						const ProtobufCMessage *msg, uint32_t limit, size_t before)
{
	int fds[1 + PBRPC_FDS_MAX];
	unsigned n = 0;
	bool ok = r->status == PBRPC_STATUS_OK;
	int memfd = call->done_memfd;
	call->done_memfd = -1;
	if (ok && memfd < 0 && call->memfd_ok) {
		size_t size = msg ? protobuf_c_message_get_packed_size(msg) : r->body_len;
		if (size > r->memfd_above)
			memfd = pbrpc__memfd_pack(size, msg, r->body); /* < 0: it goes inline */
		if (memfd >= 0)
			r->body_fd_len = size;
	} else if (memfd >= 0) {
		r->body_fd_len = call->done_len;
	}
	if (memfd >= 0 && ok && pbrpc__conn_memfd_ok(&c->base)) {
		fds[n++] = memfd;
		r->body_fd = true;
	} else if (memfd >= 0) {
		close(memfd);
	}
	bool with = ok && call->nrfds && pbrpc__conn_fds_ok(&c->base);
	if (with) {
		memcpy(fds + n, call->rfds, call->nrfds * sizeof(int));
		n += call->nrfds;
	} else if (call->nrfds) {
		pbrpc__io_close_fds(call->rfds, call->nrfds);
	}
	call->nrfds = 0;
	r->nfds = n;
	r->memfd_above = 0;
	int rc = pbrpc__wire_write_response(&c->base.out, r, r->body_fd ? NULL : msg, limit);
	if (rc == 0 && n)
		rc = pbrpc__frame_writer_attach_fds(&c->base.out, before, fds, n);
	else if (n)
		pbrpc__io_close_fds(fds, n);
	return rc;
}

/* Queues the RESPONSE for a call and takes it out of its connection's map.
 * Exactly one per call id (PROTOCOL.md section 4). */
void pbrpc__srv_call_answer(srv_call *call, int status, const char *message, const ProtobufCMessage *msg,
			    const uint8_t *body, size_t body_len)
{
	srv_conn *c = call->conn;
	if (call->answered)
		return;
	call->answered = true;
	pbrpc__heap_stop(&call->srv->timers, &call->timer);
	if (!c)
		return;
	call->conn = NULL;
	c->mem_used -= call->mem; /* the server counts it until call_put */
	c->fds_held -= call->nfds;
	pbrpc__idmap_del(&c->base.calls, call->id);
	c->base.last_active = call->srv->now;

	pbrpc__wire_response r = { .call_id = call->id, .status = status, .body = body, .body_len = body_len };
	r.not_run = call->not_run && (c->base.features & PBRPC_FEATURE_NOT_RUN);
	r.message = message;
	r.message_len = message ? strlen(message) : 0;
	uint32_t limit = c->base.peer_max_frame;
	size_t before = pbrpc__frame_writer_pending(&c->base.out);
	char text[160];
	int rc;
	if (call->memfd_ok)
		r.memfd_above = call->srv->o.memfd_threshold;
	if (__builtin_expect(call->nrfds || call->done_memfd >= 0, 0))
		rc = answer_fds(call, c, &r, status == PBRPC_STATUS_OK ? msg : NULL, limit, before);
	else if ((rc = pbrpc__wire_write_response(&c->base.out, &r, status == PBRPC_STATUS_OK ? msg : NULL, limit)) ==
		 PBRPC__WIRE_USE_MEMFD)
		rc = answer_fds(call, c, &r, msg, limit, before);
	if (rc == PBRPC_ETOOBIG) {
		/* The frame's payload, as the limit counts it: status, message, body. */
		size_t size = 4 + r.message_len +
			      (r.body_fd ? r.body_fd_len : msg ? protobuf_c_message_get_packed_size(msg) : body_len);
		snprintf(text, sizeof(text), "reply is %zu bytes, client accepts at most %u", size, (unsigned)limit);
		status = PBRPC_STATUS_RESOURCE_EXHAUSTED;
		message = text;
		rc = pbrpc__conn_reply_status(&c->base, call->id, status, text, false);
	}
	if (rc < 0)
		pbrpc__srv_log(call->srv, PBRPC_LOG_ERROR, "cannot queue reply for call %u: %s", call->id,
			       pbrpc_strerror(rc));
	if (__builtin_expect(call->srv->reg->observe, 0))
		observe_answer(call, c, status, message, before);
	pbrpc__srv_mark_dirty(c);
}

/* Answers a request that reached no handler. */
static void reply_status(srv_conn *c, uint32_t id, int status, const char *message)
{
	if (pbrpc__conn_reply_status(&c->base, id, status, message, true) == 0)
		pbrpc__srv_mark_dirty(c);
}

/* reply_status for a request refused before dispatch, which the observers
 * see too (m: the method it names, if hosted). */
static void refuse_request(srv_conn *c, const pbrpc__frame *f, const pbrpc__wire_request *req,
			   const pbrpc__method *m, int status, const char *message)
{
	size_t before = pbrpc__frame_writer_pending(&c->base.out);
	reply_status(c, req->call_id, status, message);
	if (__builtin_expect(c->srv->reg->observe, 0))
		observe(c->srv, c, m, req->method, req->method_len, req->call_id, status, message, c->srv->now,
			f->hdr.length, queued_payload(c, before), false, false);
}

void pbrpc__srv_wake(pbrpc_server *srv)
{
	uint64_t one = 1;
	ssize_t n = write(srv->wake.fd, &one, sizeof(one));
	(void)n;
}

/* Hands a finished call to the loop thread (from any other thread). The call
 * stops being a valid closure_data here: a second closure call is ignored. */
static void cq_push(pbrpc_server *srv, srv_call *call)
{
	call->magic = 0;
	pthread_mutex_lock(&srv->cq_mu);
	pbrpc__list_append(&srv->cq, &call->qlink);
	pthread_mutex_unlock(&srv->cq_mu);
	pbrpc__srv_wake(srv);
}

/* The closure handed to every handler. */
static void call_closure(const ProtobufCMessage *msg, void *closure_data)
{
	srv_call *call = closure_data;
	if (!call || call->magic != SRV_CALL_MAGIC)
		return;
	pbrpc_server *srv = call->srv;
	int status = call->status;
	const char *text = call->status_msg;
	char buf[256];
	const ProtobufCMessageDescriptor *want = pbrpc__registry_method_desc(srv->reg, call->m)->output;

	if (status == PBRPC_STATUS_OK && !msg) {
		status = PBRPC_STATUS_UNKNOWN;
		text = "handler failed without setting a status";
	} else if (status == PBRPC_STATUS_OK && msg->descriptor != want) {
		snprintf(buf, sizeof(buf), "handler replied with a %s, expected %s", msg->descriptor->name, want->name);
		status = PBRPC_STATUS_INTERNAL;
		text = buf;
		msg = NULL;
	}

	if (pbrpc__srv_tl_loop == srv) {
		call->magic = 0;
		if (srv->dispatching == call)
			srv->dispatching = NULL; /* answered inside the handler */
		pbrpc__srv_call_answer(call, status, text, status == PBRPC_STATUS_OK ? msg : NULL, NULL, 0);
		call_put(srv, call);
		return;
	}

	/* Off the loop thread: pack here, hand the bytes to the loop. */
	call->done_status = status;
	call->done_msg = text ? strdup(text) : NULL;
	if (status == PBRPC_STATUS_OK && msg) {
		call->done_len = protobuf_c_message_get_packed_size(msg);
		if (call->memfd_ok && call->done_len > srv->o.memfd_threshold &&
		    (call->done_memfd = pbrpc__memfd_pack(call->done_len, msg, NULL)) >= 0) {
			cq_push(srv, call); /* packed straight into a sealed memfd, here */
			return;
		}
		call->done_body = malloc(call->done_len ? call->done_len : 1);
		if (call->done_body) {
			protobuf_c_message_pack(msg, call->done_body);
		} else {
			call->done_status = PBRPC_STATUS_RESOURCE_EXHAUSTED;
			call->done_len = 0;
		}
	}
	cq_push(srv, call);
}

static void run_posts(pbrpc__list *l);

/* Runs what other threads posted (pbrpc_stream_post), then delivers the
 * completions they handed over. */
void pbrpc__srv_drain_completions(pbrpc_server *srv)
{
	pbrpc__list done, posts;
	pbrpc__list_init(&done);
	pbrpc__list_init(&posts);
	pthread_mutex_lock(&srv->cq_mu);
	pbrpc__list_splice(&done, &srv->cq);
	pbrpc__list_splice(&posts, &srv->posts);
	pthread_mutex_unlock(&srv->cq_mu);
	if (!pbrpc__list_empty(&posts))
		run_posts(&posts);
	pbrpc__list_for_each_safe(call, &done, srv_call, qlink) {
		pbrpc__list_remove(&call->qlink);
		if (call->not_run && !call->refused)
			pbrpc__srv_call_answer(call, PBRPC_STATUS_DEADLINE_EXCEEDED,
					       "deadline passed before the call was dispatched", NULL, NULL, 0);
		else
			pbrpc__srv_call_answer(call, call->done_status, call->done_msg, NULL, call->done_body,
					       call->done_len);
		call_put(srv, call);
	}
}

/* pbrpc_stream_post's functions, in the order they came. */
static void run_posts(pbrpc__list *l)
{
	pbrpc__list_for_each_safe(p, l, srv_post, link) {
		pbrpc__list_remove(&p->link);
		p->fn(p->arg);
		free(p);
	}
}

void pbrpc__srv_run_posts(pbrpc_server *srv)
{
	pbrpc__list l;
	pbrpc__list_init(&l);
	pthread_mutex_lock(&srv->cq_mu);
	pbrpc__list_splice(&l, &srv->posts);
	pthread_mutex_unlock(&srv->cq_mu);
	run_posts(&l);
}

int pbrpc__srv_post(pbrpc_server *srv, void (*fn)(void *arg), void *arg)
{
	srv_post *p = malloc(sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->fn = fn;
	p->arg = arg;
	pthread_mutex_lock(&srv->cq_mu);
	pbrpc__list_append(&srv->posts, &p->link);
	pthread_mutex_unlock(&srv->cq_mu);
	pbrpc__srv_wake(srv);
	return 0;
}

/* ---- handlers: inline or on the worker pool ---- */

static void invoke(pbrpc_server *srv, srv_call *call)
{
	ProtobufCService *svc = pbrpc__registry_service(srv->reg, call->m);
	svc->invoke(svc, call->m->index, call->input, call_closure, call);
}

/* What protobuf-c's unpack allocates at least for a message's top level:
 * its scan keeps 32 bytes per field occurrence (a ScannedMember), an unknown
 * field 24 bytes and a copy of its value, a string or bytes field a copy.
 * Counts until past `limit`; bytes it cannot parse are left to unpack. Run
 * before unpacking a large body, so that one of millions of tiny fields is
 * refused without allocating. */
static size_t unpack_estimate(const ProtobufCMessageDescriptor *d, const uint8_t *p, size_t len, size_t limit)
{
	size_t est = d->sizeof_message, i = 0;
	while (i < len && est <= limit) {
		uint64_t tag = 0, vlen = 0;
		int shift = 0;
		do {
			if (i == len || shift > 63)
				return est;
			tag |= (uint64_t)(p[i] & 0x7f) << shift;
			shift += 7;
		} while (p[i++] & 0x80);
		switch (tag & 7) {
		case 0:
			while (i + vlen < len && (p[i + vlen] & 0x80))
				vlen++;
			vlen++;
			break;
		case 1:
			vlen = 8;
			break;
		case 5:
			vlen = 4;
			break;
		case 2:
			shift = 0;
			do {
				if (i == len || shift > 63)
					return est;
				vlen |= (uint64_t)(p[i] & 0x7f) << shift;
				shift += 7;
			} while (p[i++] & 0x80);
			break;
		default:
			return est;
		}
		if (vlen > len - i)
			return est;
		const ProtobufCFieldDescriptor *f =
			tag >> 3 <= UINT32_MAX ? protobuf_c_message_descriptor_get_field(d, (unsigned)(tag >> 3)) : NULL;
		est += 32;
		if (!f)
			est += 24 + (((size_t)vlen + 15) & ~(size_t)15);
		else if ((tag & 7) == 2 && (f->type == PROTOBUF_C_TYPE_STRING || f->type == PROTOBUF_C_TYPE_BYTES))
			est += ((size_t)vlen + 16) & ~(size_t)15;
		i += (size_t)vlen;
	}
	return est;
}

/* The words for a request over its unpack limit. */
static int unpack_refused(pbrpc_server *srv, const srv_call *call, size_t len, char *text, size_t tlen)
{
	size_t limit = call->arena.limit;
	if (limit < (size_t)srv->o.unpack_factor * len + SRV_ARENA_KEEP) /* what the budget had left */
		snprintf(text, tlen,
			 "request needs more than the %zu bytes left in the server's memory budget to unpack (its size: "
			 "%zu bytes)",
			 limit, len);
	else
		snprintf(text, tlen, "request needs more than %zu bytes to unpack (%u x its %zu-byte size)", limit,
			 srv->o.unpack_factor, len);
	return PBRPC_STATUS_RESOURCE_EXHAUSTED;
}

/* protobuf-c's unpack returned NULL: over the limit, or not a valid message. */
static int unpack_failed(pbrpc_server *srv, const srv_call *call, size_t len, char *text, size_t tlen)
{
	if (call->arena.limited)
		return unpack_refused(srv, call, len, text, tlen);
	snprintf(text, tlen, "request body is not a valid %s",
		 pbrpc__registry_method_desc(srv->reg, call->m)->input->name);
	return PBRPC_STATUS_INVALID_ARGUMENT;
}

/* Unpacks a large body into the call's arena within its limit,
 * after a scan that refuses one of millions of tiny fields without
 * allocating (on the loop thread, or on a worker). Returns 0, or the status
 * to answer with and its words in text. */
static int call_unpack(pbrpc_server *srv, srv_call *call, const uint8_t *body, size_t len, char *text, size_t tlen)
{
	const ProtobufCMessageDescriptor *in = pbrpc__registry_method_desc(srv->reg, call->m)->input;
	if (unpack_estimate(in, body, len, call->arena.limit) > call->arena.limit)
		return unpack_refused(srv, call, len, text, tlen);
	call->input = protobuf_c_message_unpack(in, &call->arena.pa, len, body);
	return call->input ? 0 : unpack_failed(srv, call, len, text, tlen);
}

/* A body above SRV_SMALL_BODY: its limit is unpack_factor x its size
 * (+ 64 KiB), or what the budget has left, counted exactly; it is scanned
 * before it is unpacked. Above SRV_WORKER_UNPACK and with workers (for a
 * service that may run there), it is copied into the call and unpacked on the
 * worker, so that the loop goes on serving others; the copy comes out of the
 * room too. */
static __attribute__((noinline)) int large_request(srv_conn *c, srv_call *call, const pbrpc__wire_request *req,
						   char *text, size_t tlen)
{
	pbrpc_server *srv = c->srv;
	size_t len = req->body_len, room = pbrpc__srv_mem_avail(c);
	size_t lim = (size_t)srv->o.unpack_factor * len + SRV_ARENA_KEEP;
	bool on_worker = len > SRV_WORKER_UNPACK && srv->root->n_workers && !srv->reg->services[call->m->service].owned;
	if (on_worker) {
		if (room <= len) {
			snprintf(text, tlen, "request of %zu bytes does not fit in the server's memory budget now", len);
			return PBRPC_STATUS_RESOURCE_EXHAUSTED;
		}
		room -= len;
	}
	pbrpc__arena_set_limit(&call->arena, lim < room ? lim : room);
	if (!on_worker)
		return call_unpack(srv, call, req->body, len, text, tlen);
	call->raw = malloc(len);
	if (!call->raw) {
		snprintf(text, tlen, "server out of memory");
		return PBRPC_STATUS_RESOURCE_EXHAUSTED;
	}
	memcpy(call->raw, req->body, len);
	call->raw_len = len;
	call->arena.spare = NULL; /* the loop's spare is not the worker's to take */
	call->mem = len + call->arena.limit; /* the worker's arena is not the loop's to read */
	return 0;
}


static void *worker_main(void *arg)
{
	pbrpc_server *srv = arg;
	pthread_mutex_lock(&srv->wq_mu);
	for (;;) {
		while (pbrpc__list_empty(&srv->wq) && !srv->wq_stop)
			pthread_cond_wait(&srv->wq_cv, &srv->wq_mu);
		if (srv->wq_stop)
			break;
		pbrpc__list *l = pbrpc__list_first(&srv->wq);
		pbrpc__list_remove(l);
		pthread_mutex_unlock(&srv->wq_mu);
		srv_call *call = pbrpc__container_of(l, srv_call, qlink);
		pbrpc_server *loop = call->srv; /* one pool for every loop */
		if (call->raw && !atomic_load(&call->cancelled)) {
			char text[256];
			int st = call_unpack(loop, call, call->raw, call->raw_len, text, sizeof(text));
			free(call->raw);
			call->raw = NULL;
			if (st) {
				call->not_run = true;
				call->refused = true;
				call->done_status = st;
				call->done_msg = strdup(text);
				cq_push(loop, call);
				pthread_mutex_lock(&srv->wq_mu);
				continue;
			}
		}
		if (atomic_load(&call->cancelled)) {
			/* Expired or cancelled while queued: never dispatched. */
			call->not_run = true;
			cq_push(loop, call);
		} else {
			invoke(loop, call);
		}
		pthread_mutex_lock(&srv->wq_mu);
	}
	pthread_mutex_unlock(&srv->wq_mu);
	return NULL;
}

int pbrpc__srv_workers_start(pbrpc_server *srv)
{
	if (!srv->o.workers)
		return 0;
	srv->workers = calloc(srv->o.workers, sizeof(*srv->workers));
	if (!srv->workers)
		return -ENOMEM;
	for (; srv->n_workers < srv->o.workers; srv->n_workers++) {
		int err = pthread_create(&srv->workers[srv->n_workers], NULL, worker_main, srv);
		if (err) {
			pbrpc__srv_workers_stop(srv);
			return -err;
		}
	}
	return 0;
}

void pbrpc__srv_workers_stop(pbrpc_server *srv)
{
	if (!srv->workers)
		return;
	pthread_mutex_lock(&srv->wq_mu);
	srv->wq_stop = true;
	pthread_cond_broadcast(&srv->wq_cv);
	pthread_mutex_unlock(&srv->wq_mu);
	for (unsigned i = 0; i < srv->n_workers; i++)
		pthread_join(srv->workers[i], NULL);
	free(srv->workers);
	srv->workers = NULL;
	srv->n_workers = 0;
}

static void dispatch(pbrpc_server *srv, srv_call *call)
{
	SRV_STAT_ADD(srv, calls_started, 1);
	if (__builtin_expect(srv->reg->observe, 0)) {
		call->started = true;
		pbrpc__registry_observe_start(srv->reg, call->m);
	}
	/* Built-in services read server state: they stay on the loop thread. */
	pbrpc_server *pool = srv->root; /* the worker pool is root's, for every loop */
	if (!pool->n_workers || srv->reg->services[call->m->service].owned) {
		/* Most handlers answer before returning: arm the deadline timer
		 * only for those that did not. */
		srv->dispatching = call;
		invoke(srv, call);
		if (srv->dispatching == call && call->deadline_ns && !call->answered)
			pbrpc__heap_start(&srv->timers, &call->timer, call->deadline_ns);
		srv->dispatching = NULL;
		return;
	}
	if (call->deadline_ns)
		pbrpc__heap_start(&srv->timers, &call->timer, call->deadline_ns);
	pthread_mutex_lock(&pool->wq_mu);
	pbrpc__list_append(&pool->wq, &call->qlink);
	pthread_cond_signal(&pool->wq_cv);
	pthread_mutex_unlock(&pool->wq_mu);
}

/* ---- the connection's REQUEST and CANCEL frames ---- */

/* Why a request cannot be dispatched, in PROTOCOL.md section 5's order, or
 * NULL with *m set. */
static const char *request_refusal(srv_conn *c, const pbrpc__wire_request *req, int rc, const pbrpc__method **m,
				   int *status, char *text, size_t len)
{
	pbrpc_server *srv = c->srv;
	*status = PBRPC_STATUS_INVALID_ARGUMENT;
	if (rc == PBRPC_EPROTO)
		return "malformed request header";
	if (rc == PBRPC_EINVALID)
		return "invalid metadata key in request";
	*status = PBRPC_STATUS_UNAVAILABLE;
	if (srv->shutting_down)
		return "server is shutting down";
	if (c->base.draining)
		return c->base.peer_quiet ? "no new calls after the client's GOAWAY"
		       : c->base.drain_close_at ? "connection is draining (max connection age)"
						: "server is shutting down";
	*status = PBRPC_STATUS_RESOURCE_EXHAUSTED;
	if (pbrpc__idmap_count(&c->base.calls) >= srv->o.max_calls) {
		snprintf(text, len, "too many calls in flight on this connection (limit %u)", srv->o.max_calls);
		return text;
	}
	*m = pbrpc__registry_find(srv->reg, req->method, req->method_len);
	*status = PBRPC_STATUS_INVALID_ARGUMENT;
	if (!*m && !pbrpc_method_valid(req->method, req->method_len))
		return "invalid method name in request";
	*status = PBRPC_STATUS_UNIMPLEMENTED;
	if (!*m) {
		const char *slash = memchr(req->method, '/', req->method_len);
		size_t svc_len = (size_t)(slash - req->method);
		if (pbrpc__registry_service_known(srv->reg, req->method, svc_len))
			snprintf(text, len, "unknown method %.*s", (int)req->method_len, req->method);
		else
			snprintf(text, len, "unknown service %.*s", (int)svc_len, req->method);
		return text;
	}
	if ((*m)->missing) {
		snprintf(text, len, "method %s is not implemented by this server", (*m)->name);
		return text;
	}
	if (__builtin_expect(req->stream_kind != (*m)->kind, 0)) {
		static const char *const kinds[] = { "unary", "client-streaming", "server-streaming",
						     "bidirectional streaming" };
		snprintf(text, len, "method %s is %s, called as %s", (*m)->name, kinds[(*m)->kind & 3],
			 kinds[req->stream_kind & 3]);
		return text;
	}
	*status = PBRPC_STATUS_PERMISSION_DENIED;
	if (__builtin_expect((*m)->policy != NULL, 0) && (*m)->policy != c->admitted) {
		const char *why = pbrpc__authz_refusal(c, *m, text, len);
		if (why)
			return why;
	}
	*status = PBRPC_STATUS_DEADLINE_EXCEEDED;
	if (req->has_timeout && req->timeout_us == 0)
		return "deadline passed before the call was dispatched";
	return NULL;
}

/* A request with fds: the caps, and a body in a memfd checked (its size
 * against the limits, then its seals) and mapped into *map (req->body points
 * there). Returns why it is refused, or NULL. */
static __attribute__((noinline)) const char *request_fds_refusal(srv_conn *c, pbrpc__wire_request *req,
								 const pbrpc__frame *f, int *status, char *text,
								 size_t len, const uint8_t **map)
{
	pbrpc_server *srv = c->srv;
	unsigned user = c->base.frame_nfds - (req->body_fd ? 1 : 0);
	*status = PBRPC_STATUS_RESOURCE_EXHAUSTED;
	if (user > srv->o.max_fds) {
		snprintf(text, len, "request carries %u file descriptors, server accepts at most %u", user,
			 srv->o.max_fds);
		return text;
	}
	if (c->fds_held + user > srv->o.max_conn_fds) {
		snprintf(text, len, "too many file descriptors held by calls on this connection (limit %u)",
			 srv->o.max_conn_fds);
		return text;
	}
	if (!req->body_fd)
		return NULL;
	uint64_t size = f->hdr.length - PBRPC_WIRE_BODY_FD_SIZE + req->body_fd_len;
	if (size > c->base.max_frame) {
		snprintf(text, len, "request is %llu bytes, server accepts at most %u", (unsigned long long)size,
			 (unsigned)c->base.max_frame);
		return text;
	}
	if (size > c->base.dec.max_payload) {
		snprintf(text, len, "request is %llu bytes, the server's memory budget has room for %u now",
			 (unsigned long long)size, (unsigned)c->base.dec.max_payload);
		return text;
	}
	*status = PBRPC_STATUS_INVALID_ARGUMENT;
	if (pbrpc__memfd_map(pbrpc__conn_frame_fds(&c->base)[0], req->body_fd_len, map, text, len) < 0)
		return text;
	req->body = *map;
	req->body_len = (size_t)req->body_fd_len;
	return NULL;
}

/* The request's fds (after a memfd body, if any) become the call's. */
static int call_take_fds(srv_conn *c, srv_call *call, bool body_fd)
{
	pbrpc__conn *b = &c->base;
	unsigned skip = body_fd ? 1 : 0, n = b->frame_nfds - skip;
	if (!n)
		return 0;
	int *p = realloc(call->fds, n * sizeof(int));
	if (!p)
		return -ENOMEM;
	call->fds = p;
	int *ff = pbrpc__conn_frame_fds(b);
	memcpy(p, ff + skip, n * sizeof(int));
	for (unsigned i = skip; i < b->frame_nfds; i++)
		ff[i] = -1; /* the call's now; the memfd stays the conn's, which closes it */
	call->nfds = n;
	c->fds_held += n;
	return 0;
}

static void on_request(pbrpc__conn *base, const pbrpc__frame *f)
{
	srv_conn *c = pbrpc__container_of(base, srv_conn, base);
	pbrpc_server *srv = c->srv;
	size_t total = PBRPC_FRAME_HEADER_SIZE + (size_t)f->hdr.length;
	if (total > srv->scratch_cap / 2 && 2 * total > srv->scratch_want && 2 * total <= SRV_SCRATCH_MAX)
		srv->scratch_want = 2 * total; /* see scratch_fit() in loop.c */
	pbrpc__wire_request req;
	char text[PBRPC_METHOD_MAX + 128];
	int rc = pbrpc__wire_read_request(f, &req);

	if (pbrpc__idmap_get(&base->calls, req.call_id)) {
		pbrpc__conn_fail(base, PBRPC_STATUS_INVALID_ARGUMENT, PBRPC_EPROTO, "call id %u is already in flight",
				 req.call_id);
		return;
	}
	const pbrpc__method *m = NULL;
	int status;
	const uint8_t *map = NULL;
	const char *why = request_refusal(c, &req, rc, &m, &status, text, sizeof(text));
	if (!why && __builtin_expect(base->frame_nfds, 0))
		why = request_fds_refusal(c, &req, f, &status, text, sizeof(text), &map);
	if (why) {
		refuse_request(c, f, &req, m, status, why);
		return;
	}
	if (__builtin_expect(m->kind != 0, 0)) {
		pbrpc__srv_stream_open(c, f, &req, m);
		return;
	}
	srv_call *call = call_get(srv);
	if (!call) {
		pbrpc__memfd_unmap(map, req.body_len);
		refuse_request(c, f, &req, m, PBRPC_STATUS_RESOURCE_EXHAUSTED, "server out of memory");
		return;
	}
	call->id = req.call_id;
	call->m = m;
	call->t0 = srv->now;
	call->bytes_in = f->hdr.length;
	call->started = false;
	/* Unpacked, the request may take unpack_factor x its size (+ 64 KiB),
	 * and no more than the budget has left. A small body's bound is fixed:
	 * the read that brought it had SRV_MEM_MIN of room at least, and the
	 * calls it unpacks count from here on. */
	int st;
	if (req.body_len <= SRV_SMALL_BODY) {
		pbrpc__arena_set_limit(&call->arena, SRV_SMALL_LIMIT);
		const ProtobufCMessageDescriptor *in = pbrpc__registry_method_desc(srv->reg, m)->input;
		call->input = protobuf_c_message_unpack(in, &call->arena.pa, req.body_len, req.body);
		st = call->input ? 0 : unpack_failed(srv, call, req.body_len, text, sizeof(text));
	} else {
		st = large_request(c, call, &req, text, sizeof(text));
	}
	if (__builtin_expect(map != NULL, 0))
		pbrpc__memfd_unmap(map, req.body_len); /* unpacked (or copied for a worker) */
	if (st) {
		call->answered = true;
		call->mem = 0;
		refuse_request(c, f, &req, m, st, text);
		call_put(srv, call);
		return;
	}
	if (req.metadata_raw_len) {
		if (call->md_cap < req.metadata_raw_len) {
			uint8_t *p = realloc(call->md, req.metadata_raw_len);
			if (!p) {
				/* Not yet in the map nor on the connection: answer here. */
				call->mem = 0;
				call->answered = true;
				refuse_request(c, f, &req, m, PBRPC_STATUS_RESOURCE_EXHAUSTED, "server out of memory");
				call_put(srv, call);
				return;
			}
			call->md = p;
			call->md_cap = req.metadata_raw_len;
		}
		memcpy(call->md, req.metadata_raw, req.metadata_raw_len);
		call->md_len = req.metadata_raw_len;
	}
	call->fds_ok = pbrpc__conn_fds_ok(base);
	call->memfd_ok = pbrpc__conn_memfd_ok(base);
	if ((__builtin_expect(base->frame_nfds, 0) && call_take_fds(c, call, req.body_fd) < 0) ||
	    pbrpc__idmap_put(&base->calls, call->id, call) < 0) {
		call->answered = true;
		call->mem = 0;
		c->fds_held -= call->nfds; /* call_put closes them */
		refuse_request(c, f, &req, m, PBRPC_STATUS_RESOURCE_EXHAUSTED, "server out of memory");
		call_put(srv, call);
		return;
	}
	call->conn = c;
	/* Counted by the connection until answered, by the server until put
	 * back; a worker's arena is not the loop's to read: its limit counts. */
	size_t mem = call->mem + call->arena.want + call->md_len;
	call->mem = mem;
	c->mem_used += mem;
	srv->mem_used += mem;
	call->has_cred = c->has_cred;
	call->cred = c->cred;
	if (c->peer_ext) {
		c->peer_ext->refs++;
		call->peer_ext = c->peer_ext;
	}
	if (__builtin_expect(c->base.tls != NULL, 0))
		call->tls_peer = pbrpc__tls_peer_ref(c->base.tls);
	if (req.has_timeout) {
		int64_t us = req.timeout_us > (uint64_t)INT64_MAX / 2000 ? INT64_MAX / 2000 : (int64_t)req.timeout_us;
		call->deadline_ns = srv->now + us * 1000;
	}
	dispatch(srv, call);
}

static void on_cancel(pbrpc__conn *base, uint32_t id)
{
	srv_call *call = pbrpc__idmap_get(&base->calls, id);
	if (!call)
		return; /* it may have crossed our RESPONSE */
	atomic_store(&call->cancelled, true);
	pbrpc__srv_call_answer(call, PBRPC_STATUS_CANCELLED, "cancelled by the client", NULL, NULL, 0);
	pbrpc__srv_stream_check_over(call, PBRPC_STATUS_CANCELLED);
}

static void on_open(pbrpc__conn *base)
{
	(void)base; /* the idle deadline follows from the state (pbrpc__conn_deadline) */
}

static void on_goaway(pbrpc__conn *base)
{
	/* The client is leaving: answer what is in flight, then close (the loop
	 * closes a drained connection). */
	pbrpc__srv_mark_dirty(pbrpc__container_of(base, srv_conn, base));
}

static void on_close(pbrpc__conn *base, int err, const char *why)
{
	srv_conn *c = pbrpc__container_of(base, srv_conn, base);
	pbrpc_server *srv = c->srv;
	char name[64];
	pbrpc__srv_conn_name(c, name, sizeof(name));
	if (base->goaway_sent > 0 && base->closed_in != PBRPC__CONN_PREFACE)
		SRV_STAT_ADD(srv, protocol_errors, 1);
	if (base->goaway_sent >= 0)
		pbrpc__srv_log(srv, PBRPC_LOG_WARN, "closing connection %s: %s", name, why);
	else if (err == 0)
		pbrpc__srv_log(srv, PBRPC_LOG_DEBUG, "connection %s closed: %s", name, why);
	else if (err == PBRPC_EOF && base->closed_in == PBRPC__CONN_OPEN)
		pbrpc__srv_log(srv, PBRPC_LOG_DEBUG, "connection %s closed by peer", name);
	else
		pbrpc__srv_log(srv, PBRPC_LOG_INFO, "connection %s: %s", name, why);
	/* Calls whose handler still runs are orphaned; their closure frees them. */
	uint32_t id;
	srv_call *call;
	while ((call = pbrpc__idmap_take_any(&base->calls, &id)) != NULL) {
		if (call->started && !call->answered)
			pbrpc__registry_observe_orphan(srv->reg, call->m);
		call->conn = NULL;
		call->answered = true;
		pbrpc__heap_stop(&srv->timers, &call->timer);
		atomic_store(&call->cancelled, true);
		pbrpc__srv_stream_check_over(call, PBRPC_STATUS_UNAVAILABLE);
	}
	c->mem_used = c->mem_io;
	c->fds_held = 0;
	pbrpc__authz_conn_closed(c);
	pbrpc__srv_conn_closed(c);
}

const pbrpc__conn_ops pbrpc__srv_conn_ops = {
	.on_open = on_open,
	.on_request = on_request,
	.on_cancel = on_cancel,
	.on_goaway = on_goaway,
	.on_close = on_close,
	.on_stream = pbrpc__srv_on_stream,
};

/* For stream.c: the call records and refusals of unary calls. */
srv_call *pbrpc__srv_call_get(pbrpc_server *srv)
{
	srv_call *call = call_get(srv);
	if (call)
		call->stream = NULL;
	return call;
}

void pbrpc__srv_call_put(pbrpc_server *srv, srv_call *call)
{
	call_put(srv, call);
}

void pbrpc__srv_refuse(srv_conn *c, const pbrpc__frame *f, const pbrpc__wire_request *req, const pbrpc__method *m,
		       int status, const char *message)
{
	refuse_request(c, f, req, m, status, message);
}
