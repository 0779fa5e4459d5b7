/* pbrpc client: construction and teardown, services handed to the
 * generated stubs, explicit calls, call records and ids. See client_impl.h
 * for how the files of lib/client/ divide the work. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "pbrpc/schema.h"
#include "client/client_impl.h"
#include "proto/memfd.h"
#include "util/io.h"

#define th pbrpc__cl_th
#define tc pbrpc__cl_tc

/* ---- this thread's status ---- */

void pbrpc__cl_set_status(int status, const char *msg, size_t len)
{
	if (!msg)
		len = 0;
	if (len > PBRPC_STATUS_MESSAGE_MAX)
		len = PBRPC_STATUS_MESSAGE_MAX;
	th.status = status;
	th.gen++;
	th.msg_len = (uint32_t)len;
	if (len) {
		if (msg != tc.msg)
			memmove(tc.msg, msg, len);
		tc.msg[len] = '\0';
	}
}

void pbrpc__cl_set_statusf(int status, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(tc.msg, sizeof(tc.msg), fmt, ap);
	va_end(ap);
	th.status = status;
	th.gen++;
	th.msg_len = n < 0 ? 0 : (n < (int)sizeof(tc.msg) ? (uint32_t)n : (uint32_t)sizeof(tc.msg) - 1);
}

void pbrpc__cl_efd_signal(pbrpc_client *c)
{
	if (c->efd_signaled)
		return;
	uint64_t one = 1;
	if (write(c->efd, &one, sizeof(one)) == (ssize_t)sizeof(one))
		c->efd_signaled = true;
}

/* ---- call records ---- */

int pbrpc__cl_grow_calls(pbrpc_client *c)
{
	call_slab *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	for (int i = 0; i < CL_CALL_SLAB_SIZE; i++) {
		call *x = &s->calls[i];
		pthread_cond_init(&x->cond, &c->cattr);
		pbrpc__timer_init(&x->timer, 0);
		pbrpc__list_init(&x->wlink);
		pbrpc__list_insert(&c->free_calls, &x->qlink);
	}
	s->next = c->slabs;
	c->slabs = s;
	return 0;
}

/* Out of line, so that pbrpc__cl_call_put needs no stack frame for it. */
static __attribute__((noinline)) void call_drop_fds(call *x)
{
	pbrpc__io_close_fds(x->fds, x->nfds);
	x->nfds = 0;
	pbrpc__memfd_unmap(x->map, x->map_len);
	x->map = NULL;
	x->map_len = 0;
}

void pbrpc__cl_call_put(pbrpc_client *c, call *x)
{
	if (x->cap > CL_CALL_BUF_SMALL)
		big_touch(c);
	if (__builtin_expect(x->nfds || x->map, 0))
		call_drop_fds(x);
	pbrpc__list_insert(&c->free_calls, &x->qlink);
}

void pbrpc__cl_call_fail(call *x, int status, int err, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(x->lmsg, sizeof(x->lmsg), fmt, ap);
	va_end(ap);
	x->status = status;
	x->err = err;
	x->msg = x->lmsg;
	x->msg_len = n < 0 ? 0 : ((size_t)n < sizeof(x->lmsg) ? (size_t)n : sizeof(x->lmsg) - 1);
	x->body = NULL;
	x->body_len = 0;
}

int pbrpc__cl_store_reply(call *x, const pbrpc__wire_response *r)
{
	size_t need = r->message_len + r->body_len;
	if (need == 0) {
		x->msg = NULL; /* no buffer needed, and no NULL + 0 */
		x->msg_len = 0;
		x->body = NULL;
		x->body_len = 0;
		return 0;
	}
	if (need > x->cap) {
		size_t cap = x->cap ? x->cap : 256;
		while (cap < need)
			cap *= 2;
		uint8_t *nb = malloc(cap);
		if (!nb)
			return -ENOMEM;
		free(x->buf);
		x->buf = nb;
		x->cap = cap;
	}
	if (r->message_len)
		memcpy(x->buf, r->message, r->message_len);
	if (r->body_len)
		memcpy(x->buf + r->message_len, r->body, r->body_len);
	x->msg = (const char *)x->buf;
	x->msg_len = r->message_len;
	x->body = x->buf + r->message_len;
	x->body_len = r->body_len;
	return 0;
}

/* pbrpc__cl_alloc_id once the counter has wrapped (or is about to). */
uint32_t pbrpc__cl_alloc_id_slow(pbrpc_client *c)
{
	for (;;) {
		uint32_t id = c->next_id++;
		if (id == 0) {
			c->ids_wrapped = true;
			continue;
		}
		bool live = false;
		pbrpc__list_for_each(k, &c->conns, chan, link) {
			if (pbrpc__idmap_get(&k->base.calls, id)) {
				live = true;
				break;
			}
		}
		if (!live)
			return id;
	}
}

/* x's status is final: wake its synchronous caller or queue its closure. */
void pbrpc__cl_call_finish(pbrpc_client *c, call *x)
{
	x->done = true;
	if (x->kind == CALL_SYNC) {
		pthread_cond_signal(&x->cond);
		return;
	}
	if (x->kind == CALL_STREAM) {
		pbrpc__cl_stream_finished(c, x);
		return;
	}
	pbrpc__heap_stop(&c->timers, &x->timer);
	if (pbrpc__list_linked(&x->qlink))
		pbrpc__list_remove(&x->qlink); /* waiting on c->retry */
	pbrpc__list_append(&c->done, &x->qlink);
	if (th.in_process != c)
		pbrpc__cl_efd_signal(c);
}

/* Releases x's id (RESPONSE received or connection gone). */
void pbrpc__cl_call_unlink(pbrpc_client *c, call *x)
{
	chan *k = x->conn;
	pbrpc__idmap_del(&k->base.calls, x->id);
	x->conn = NULL;
	x->refs &= (uint8_t)~REF_TABLE;
	if (x->kind == CALL_ASYNC)
		k->async_inflight--;
	if (c->slot_waiters)
		pthread_cond_broadcast(&c->cond);
	if (k->base.draining && chan_inflight(k) == 0)
		pbrpc__conn_close(&k->base, 0, "server finished draining");
}

/* ---- services for the generated stubs ---- */

static void svc_invoke(ProtobufCService *service, unsigned idx, const ProtobufCMessage *input,
		       ProtobufCClosure closure, void *closure_data)
{
	svc *s = (svc *)service;
	if (idx >= s->base.descriptor->n_methods || !input) {
		pbrpc_call_opts unused;
		pbrpc__cl_take_opts(&unused); /* meant for this call: never for a later one */
		pbrpc__cl_set_statusf(PBRPC_STATUS_INVALID_ARGUMENT, "no method %u in %s", idx, s->base.descriptor->name);
		if (closure)
			closure(NULL, closure_data);
		return;
	}
	if (s->m[idx].stream) {
		/* protoc-c's stub of a method the .proto declares with `stream`
		 * (pbrpc-gen registered it): a unary call cannot do it. */
		pbrpc_call_opts unused;
		pbrpc__cl_take_opts(&unused);
		pbrpc__cl_set_statusf(PBRPC_STATUS_FAILED_PRECONDITION,
				      "%s is a stream method in its .proto: call it with the functions pbrpc-gen wrote",
				      s->m[idx].s);
		if (closure)
			closure(NULL, closure_data);
		return;
	}
	if (s->async)
		pbrpc__cl_async_invoke(s, idx, input, closure, closure_data);
	else
		pbrpc__cl_sync_invoke(s, idx, input, closure, closure_data);
}

/* A cached service lives as long as its client; one bound to options
 * (pbrpc_client_service_with) goes when destroyed. */
static void svc_destroy(ProtobufCService *service)
{
	svc *s = (svc *)service;
	if (!s->bound)
		return;
	pbrpc_client *c = s->c;
	pthread_mutex_lock(&c->mu);
	for (svc **p = &c->services; *p; p = &(*p)->next) {
		if (*p == s) {
			*p = s->next;
			break;
		}
	}
	pthread_mutex_unlock(&c->mu);
	free(s);
}

/* Bytes for a copy of opts' metadata (entries, then keys and values). */
static size_t metadata_size(const pbrpc_call_opts *o)
{
	if (!o || !o->metadata)
		return 0;
	size_t n = o->metadata_count * sizeof(pbrpc_metadata);
	for (size_t i = 0; i < o->metadata_count; i++) {
		const pbrpc_metadata *m = &o->metadata[i];
		n += (m->key_len ? m->key_len : strlen(m->key)) + m->value_len;
	}
	return n;
}

static void bind_opts(svc *s, const pbrpc_call_opts *o, uint8_t *p)
{
	s->bound_opts = *o;
	s->bound = &s->bound_opts;
	if (!o->metadata) {
		s->bound_opts.metadata_count = 0;
		return;
	}
	pbrpc_metadata *md = (pbrpc_metadata *)(void *)p;
	p += o->metadata_count * sizeof(*md);
	for (size_t i = 0; i < o->metadata_count; i++) {
		const pbrpc_metadata *m = &o->metadata[i];
		size_t kl = m->key_len ? m->key_len : strlen(m->key);
		memcpy(p, m->key, kl);
		md[i].key = (const char *)p;
		md[i].key_len = kl;
		p += kl;
		if (m->value_len)
			memcpy(p, m->value, m->value_len);
		md[i].value = p;
		md[i].value_len = m->value_len;
		p += m->value_len;
	}
	s->bound_opts.metadata = md;
}

static ProtobufCService *service_get(pbrpc_client *c, const ProtobufCServiceDescriptor *desc, bool async,
				     const pbrpc_call_opts *opts)
{
	if (!c || !desc || !desc->name)
		return NULL;
	pthread_mutex_lock(&c->mu);
	for (svc *s = c->services; s && !opts; s = s->next) {
		if (s->base.descriptor == desc && s->async == async && !s->bound) {
			pthread_mutex_unlock(&c->mu);
			return &s->base;
		}
	}
	size_t nl = strlen(desc->name), size = sizeof(svc) + desc->n_methods * sizeof(method_name);
	for (unsigned i = 0; i < desc->n_methods; i++)
		size += nl + 1 + strlen(desc->methods[i].name) + 1;
	size = (size + 15) & ~(size_t)15;
	size_t md_at = size;
	size += metadata_size(opts);
	svc *s = calloc(1, size);
	if (!s) {
		pthread_mutex_unlock(&c->mu);
		return NULL;
	}
	char *p = (char *)&s->m[desc->n_methods];
	const pbrpc_schema_service *ss = pbrpc_schema_find_service(desc->name, NULL);
	for (unsigned i = 0; i < desc->n_methods; i++) {
		int fl = pbrpc_schema_method_flags(ss, desc->methods[i].name);
		s->m[i].stream = fl > 0 ? (uint8_t)fl : 0;
		int n = sprintf(p, "%s/%s", desc->name, desc->methods[i].name);
		s->m[i].s = p;
		s->m[i].len = (size_t)n;
		s->m[i].valid = pbrpc_method_valid(p, (size_t)n);
		p += n + 1;
	}
	if (opts)
		bind_opts(s, opts, (uint8_t *)s + md_at);
	s->base.descriptor = desc;
	s->base.invoke = svc_invoke;
	s->base.destroy = svc_destroy;
	s->c = c;
	s->async = async;
	s->next = c->services;
	c->services = s;
	if (async)
		pbrpc__cl_watch_enable(c);
	pthread_mutex_unlock(&c->mu);
	return &s->base;
}

/* ---- public API ---- */

static void client_teardown(pbrpc_client *c)
{
	pbrpc__list_for_each_safe(k, &c->conns, chan, link) {
		if (k->in_epoll)
			epoll_ctl(c->epfd, EPOLL_CTL_DEL, k->base.fd, NULL);
		pbrpc__list_remove(&k->link);
		pbrpc__conn_fini(&k->base);
		free(k);
	}
	while (c->slabs) {
		call_slab *s = c->slabs;
		c->slabs = s->next;
		for (int i = 0; i < CL_CALL_SLAB_SIZE; i++) {
			pthread_cond_destroy(&s->calls[i].cond);
			pbrpc__io_close_fds(s->calls[i].fds, s->calls[i].nfds);
			free(s->calls[i].fds);
			pbrpc__memfd_unmap(s->calls[i].map, s->calls[i].map_len);
			free(s->calls[i].buf);
			free(s->calls[i].req);
		}
		free(s);
	}
	while (c->arenas) {
		cl_arena *a = c->arenas;
		c->arenas = a->next;
		pbrpc__cl_arena_destroy(a);
	}
	while (c->services) {
		svc *s = c->services;
		c->services = s->next;
		free(s);
	}
	pbrpc__heap_fini(&c->timers);
	pbrpc__tls_ctx_free(c->tls_ctx);
	if (c->efd >= 0)
		close(c->efd);
	if (c->epfd >= 0)
		close(c->epfd);
	pthread_cond_destroy(&c->cond);
	pthread_condattr_destroy(&c->cattr);
	pthread_mutex_destroy(&c->mu);
	free(c);
}

PBRPC_EXPORT int pbrpc_client_connect(pbrpc_client **out, const char *endpoint, const pbrpc_client_opts *opts)
{
	if (!out)
		return PBRPC_EINVALID;
	*out = NULL;
	pbrpc_client_opts o = { 0 };
	if (opts)
		o = *opts;
	pbrpc_client *c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->epfd = c->efd = -1;
	pbrpc__list_init(&c->conns);
	pbrpc__list_init(&c->free_calls);
	pbrpc__list_init(&c->done);
	pbrpc__list_init(&c->streams);
	pbrpc__list_init(&c->stream_ready);
	pbrpc__list_init(&c->retry);
	pthread_mutex_init(&c->mu, NULL);
	pthread_condattr_init(&c->cattr);
	pthread_condattr_setclock(&c->cattr, CLOCK_MONOTONIC);
	pthread_cond_init(&c->cond, &c->cattr);

	int rc = pbrpc_endpoint_parse(endpoint, &c->ep);
	if (rc < 0)
		goto err_client;
	snprintf(c->ep_str, sizeof(c->ep_str), "%s", endpoint);
	if (c->ep.tls) {
		char why[256];
		rc = pbrpc__tls_ctx_new(&c->tls_ctx, false, &o.tls, why, sizeof(why));
		if (rc < 0) {
			snprintf(c->last_msg, sizeof(c->last_msg), "tls: %.240s", why[0] ? why : pbrpc_strerror(rc));
			goto err_client;
		}
		snprintf(c->tls_host, sizeof(c->tls_host), "%s", o.tls.server_name ? o.tls.server_name : c->ep.host);
	}
	c->max_frame = o.max_frame ? o.max_frame : PBRPC_MAX_FRAME_DEFAULT;
	if (c->max_frame > PBRPC_MAX_FRAME_LIMIT)
		c->max_frame = PBRPC_MAX_FRAME_LIMIT;
	c->stream_window = o.stream_window;
	c->connect_timeout_ms = o.connect_timeout_ms ? o.connect_timeout_ms : CL_DEFAULT_CONNECT_TIMEOUT_MS;
	c->call_timeout_ms = o.call_timeout_ms ? o.call_timeout_ms : CL_DEFAULT_CALL_TIMEOUT_MS;
	c->backoff_min_ms = o.backoff_min_ms > 0 ? o.backoff_min_ms : CL_DEFAULT_BACKOFF_MIN_MS;
	c->backoff_max_ms = o.backoff_max_ms > 0 ? o.backoff_max_ms : CL_DEFAULT_BACKOFF_MAX_MS;
	if (c->backoff_max_ms < c->backoff_min_ms)
		c->backoff_max_ms = c->backoff_min_ms;
	c->max_fds = o.max_fds ? (o.max_fds > PBRPC_FDS_MAX ? PBRPC_FDS_MAX : o.max_fds) : 16;
	c->memfd_threshold = o.memfd_threshold ? o.memfd_threshold : PBRPC_MEMFD_THRESHOLD_DEFAULT;
	c->backoff_ms = c->backoff_min_ms;
	c->now = pbrpc__now_ns();
	c->next_id = 1;
	c->rng = (uint64_t)pbrpc__now_ns() ^ ((uint64_t)(uintptr_t)c << 16) ^ 0x9e3779b97f4a7c15ull;
	if (!c->rng)
		c->rng = 1;

	c->epfd = epoll_create1(EPOLL_CLOEXEC);
	c->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (c->epfd < 0 || c->efd < 0) {
		rc = -errno;
		goto err_client;
	}
	struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL };
	if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, c->efd, &ev) < 0) {
		rc = -errno;
		goto err_client;
	}
	c->watching = o.io_thread;
	if (!o.lazy) {
		pthread_mutex_lock(&c->mu);
		rc = pbrpc__cl_connect_locked(c, 0);
		pthread_mutex_unlock(&c->mu);
		if (rc < 0)
			goto err_client;
	}
	if (o.io_thread) {
		rc = -pthread_create(&c->io, NULL, pbrpc__cl_io_main, c);
		if (rc < 0)
			goto err_client;
		c->io_started = true;
	}
	*out = c;
	return 0;

err_client:
	/* pbrpc_client_status() tells this thread why (client.h). */
	pbrpc__cl_set_statusf(PBRPC_STATUS_UNAVAILABLE, "%s", c->last_msg[0] ? c->last_msg : pbrpc_strerror(rc));
	client_teardown(c);
	return rc;
}

PBRPC_EXPORT void pbrpc_client_free(pbrpc_client *c)
{
	if (!c)
		return;
	pthread_mutex_lock(&c->mu);
	c->stopping = true;
	pbrpc__cl_efd_signal(c);
	pthread_mutex_unlock(&c->mu);
	if (c->io_started)
		pthread_join(c->io, NULL);

	pbrpc_client *outer = th.in_process;
	th.in_process = c;
	pthread_mutex_lock(&c->mu);
	c->closing = true;
	pbrpc__list_for_each_safe(k, &c->conns, chan, link)
		pbrpc__cl_chan_close(c, k, PBRPC_ECLOSED, "client closed");
	pbrpc__cl_retry_calls(c); /* closing: fails them */
	while (!pbrpc__list_empty(&c->done))
		pbrpc__cl_run_done(c);
	pbrpc__cl_streams_orphan(c);
	pthread_mutex_unlock(&c->mu);
	th.in_process = outer;
	client_teardown(c);
}

PBRPC_EXPORT ProtobufCService *pbrpc_client_service(pbrpc_client *c, const ProtobufCServiceDescriptor *desc)
{
	return service_get(c, desc, false, NULL);
}

PBRPC_EXPORT ProtobufCService *pbrpc_client_service_async(pbrpc_client *c, const ProtobufCServiceDescriptor *desc)
{
	return service_get(c, desc, true, NULL);
}

PBRPC_EXPORT ProtobufCService *pbrpc_client_service_with(pbrpc_client *c, const ProtobufCServiceDescriptor *desc,
							 const pbrpc_call_opts *opts)
{
	if (!opts)
		return NULL;
	return service_get(c, desc, false, opts);
}

PBRPC_EXPORT ProtobufCService *pbrpc_client_service_async_with(pbrpc_client *c,
							       const ProtobufCServiceDescriptor *desc,
							       const pbrpc_call_opts *opts)
{
	if (!opts)
		return NULL;
	return service_get(c, desc, true, opts);
}

PBRPC_EXPORT void pbrpc_client_next_call(const pbrpc_call_opts *opts)
{
	th.has_next = opts != NULL;
	if (opts)
		tc.next = *opts;
}

PBRPC_EXPORT int pbrpc_client_status(const char **message)
{
	if (message)
		*message = status_msg();
	return th.status;
}

PBRPC_EXPORT uint32_t pbrpc_client_last_call(void)
{
	return th.last_call;
}

PBRPC_EXPORT int pbrpc_client_cancel(pbrpc_client *c, uint32_t call_id)
{
	if (!c || call_id == 0)
		return PBRPC_EINVALID;
	pthread_mutex_lock(&c->mu);
	call *x = NULL;
	pbrpc__list_for_each(k, &c->conns, chan, link) {
		if ((x = pbrpc__idmap_get(&k->base.calls, call_id)) != NULL)
			break;
	}
	if (!x) {
		pbrpc__list_for_each(r, &c->retry, call, qlink) {
			if (r->id == call_id) {
				x = r;
				break;
			}
		}
	}
	if (!x || x->kind != CALL_ASYNC || x->abandoned) {
		pthread_mutex_unlock(&c->mu);
		return PBRPC_EINVALID;
	}
	pbrpc__cl_abandon(c, x, PBRPC_STATUS_CANCELLED, PBRPC_ECLOSED, "call cancelled by the client");
	pthread_mutex_unlock(&c->mu);
	return 0;
}

PBRPC_EXPORT int pbrpc_client_fd(pbrpc_client *c)
{
	if (!c)
		return PBRPC_EINVALID;
	pthread_mutex_lock(&c->mu);
	pbrpc__cl_watch_enable(c);
	pthread_mutex_unlock(&c->mu);
	return c->epfd;
}

PBRPC_EXPORT int pbrpc_client_process(pbrpc_client *c, int timeout_ms)
{
	if (!c)
		return PBRPC_EINVALID;
	return pbrpc__cl_process_run(c, timeout_ms, false);
}

PBRPC_EXPORT size_t pbrpc_client_pending(pbrpc_client *c)
{
	if (!c)
		return 0;
	pthread_mutex_lock(&c->mu);
	size_t n = c->async_pending;
	pthread_mutex_unlock(&c->mu);
	return n;
}

PBRPC_EXPORT int pbrpc_client_drain(pbrpc_client *c, int timeout_ms)
{
	int64_t deadline = timeout_ms >= 0 ? pbrpc__now_ns() + (int64_t)timeout_ms * PBRPC__NS_PER_MS : 0;
	for (;;) {
		if (pbrpc_client_pending(c) == 0)
			return 0;
		int ms = -1;
		if (deadline) {
			ms = pbrpc__ms_until(deadline);
			if (ms == 0 && timeout_ms != 0)
				return -ETIMEDOUT;
		}
		int r = pbrpc__cl_process_run(c, ms, false);
		if (r < 0)
			return r;
		if (timeout_ms == 0)
			return pbrpc_client_pending(c) ? -ETIMEDOUT : 0;
	}
}

static void result_fill(pbrpc_call_result *res, int status, const char *msg)
{
	if (!res)
		return;
	res->status = status;
	size_t n = msg ? pbrpc__wire_message_len(msg, strlen(msg), sizeof(res->message) - 1) : 0; /* whole characters */
	if (n)
		memcpy(res->message, msg, n);
	res->message[n] = '\0';
}

/* Return code of a finished explicit call. */
static int call_rc(const call *x)
{
	if (x->err)
		return x->err;
	return x->status == PBRPC_STATUS_OK ? 0 : PBRPC_ESTATUS;
}

/* Shared start of pbrpc_client_call and _call_raw: runs the synchronous call
 * and sets this thread's status from it. Returns the finished call with c->mu
 * held (finish with explicit_end), or NULL with *rc and *result set. */
static call *explicit_begin(pbrpc_client *c, call_args *a, pbrpc_call_result *result, int *rc)
{
	if (__builtin_expect(th.nrfds, 0))
		pbrpc__cl_th_fds_drop(); /* the last explicit call's, not taken */
	call *x = pbrpc__cl_sync_call(c, a);
	if (!x) {
		pthread_mutex_unlock(&c->mu);
		pbrpc__cl_set_statusf(PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		result_fill(result, th.status, status_msg());
		*rc = -ENOMEM;
		return NULL;
	}
	th.last_call = x->id;
	*rc = call_rc(x);
	pbrpc__cl_set_status(x->status, x->msg, x->msg_len);
	if (__builtin_expect(x->nfds, 0))
		pbrpc__cl_th_fds_set(x); /* for pbrpc_client_reply_fds until the next call */
	return x;
}

static int explicit_end(pbrpc_client *c, call *x, pbrpc_call_result *result, int rc)
{
	pbrpc__cl_sync_release(c, x);
	pthread_mutex_unlock(&c->mu);
	result_fill(result, th.status, status_msg());
	return rc;
}

static int explicit_bad_args(pbrpc_call_result *result)
{
	pbrpc__cl_set_statusf(PBRPC_STATUS_INVALID_ARGUMENT, "missing client, method or request");
	result_fill(result, th.status, status_msg());
	return PBRPC_EINVALID;
}

PBRPC_EXPORT int pbrpc_client_call(pbrpc_client *c, const char *method, const ProtobufCMessage *request,
				   const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **reply,
				   const pbrpc_call_opts *opts, pbrpc_call_result *result)
{
	pbrpc_call_opts unused;
	pbrpc__cl_take_opts(&unused); /* next-call options never outlive the next call */
	if (reply)
		*reply = NULL;
	if (!c || !method || !request)
		return explicit_bad_args(result);
	call_args a;
	pbrpc__cl_args_init(&a, c, method, strlen(method), opts);
	a.msg = request;
	int rc;
	call *x = explicit_begin(c, &a, result, &rc);
	if (!x)
		return rc;
	if (rc == 0 && reply_desc && reply) {
		pthread_mutex_unlock(&c->mu);
		*reply = protobuf_c_message_unpack(reply_desc, NULL, x->body_len, x->body);
		pthread_mutex_lock(&c->mu);
		if (!*reply) {
			pbrpc__cl_set_statusf(PBRPC_STATUS_INTERNAL, "reply is not a valid %s", reply_desc->name);
			rc = PBRPC_EDECODE;
		}
	}
	return explicit_end(c, x, result, rc);
}

PBRPC_EXPORT int pbrpc_client_call_raw(pbrpc_client *c, const char *method, const void *request,
				       size_t request_len, uint8_t **reply, size_t *reply_len,
				       const pbrpc_call_opts *opts, pbrpc_call_result *result)
{
	pbrpc_call_opts unused;
	pbrpc__cl_take_opts(&unused); /* next-call options never outlive the next call */
	if (reply)
		*reply = NULL;
	if (reply_len)
		*reply_len = 0;
	if (!c || !method || (!request && request_len))
		return explicit_bad_args(result);
	call_args a;
	pbrpc__cl_args_init(&a, c, method, strlen(method), opts);
	a.raw = request;
	a.raw_len = request_len;
	int rc;
	call *x = explicit_begin(c, &a, result, &rc);
	if (!x)
		return rc;
	if (rc == 0 && reply) {
		uint8_t *p = malloc(x->body_len ? x->body_len : 1);
		if (p) {
			if (x->body_len)
				memcpy(p, x->body, x->body_len);
			*reply = p;
			if (reply_len)
				*reply_len = x->body_len;
		} else {
			pbrpc__cl_set_statusf(PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory copying a %zu-byte reply", x->body_len);
			rc = -ENOMEM;
		}
	}
	return explicit_end(c, x, result, rc);
}

PBRPC_EXPORT void pbrpc_client_server_hello(pbrpc_client *c, pbrpc_hello *out)
{
	if (!c) {
		memset(out, 0, sizeof(*out));
		return;
	}
	pthread_mutex_lock(&c->mu);
	*out = c->hello;
	pthread_mutex_unlock(&c->mu);
}
