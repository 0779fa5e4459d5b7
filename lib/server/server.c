/* pbrpc server: construction, options, registration, logging, counters.
 * The loop is loop.c, connections and listeners listener.c, calls
 * dispatch.c, the handler's API call_api.c. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "pbrpc/schema.h"
#include "server/server_impl.h"

#define SWEEP_INTERVAL_NS PBRPC__NS_PER_S

void pbrpc__srv_log(pbrpc_server *srv, pbrpc_log_level lvl, const char *fmt, ...)
{
	if (!srv->o.log || lvl > srv->o.log_level)
		return;
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	srv->o.log(srv->o.log_user, lvl, buf);
}

const char *pbrpc__srv_conn_name(const srv_conn *c, char *buf, size_t len)
{
	if (c->has_cred)
		snprintf(buf, len, "fd %d (pid %d uid %u)", c->base.fd, (int)c->cred.pid, (unsigned)c->cred.uid);
	else
		snprintf(buf, len, "fd %d", c->base.fd);
	return buf;
}

static void opts_defaults(pbrpc_server_opts *o)
{
	if (!o->max_frame)
		o->max_frame = PBRPC_MAX_FRAME_DEFAULT;
	if (o->max_frame > PBRPC_MAX_FRAME_LIMIT)
		o->max_frame = PBRPC_MAX_FRAME_LIMIT;
	if (!o->max_calls)
		o->max_calls = 1024;
	if (!o->max_connections)
		o->max_connections = 4096;
	if (!o->handshake_timeout_ms)
		o->handshake_timeout_ms = 10000;
	if (!o->max_output_queue)
		o->max_output_queue = 4u << 20;
	if (!o->write_stall_timeout_ms)
		o->write_stall_timeout_ms = 30000;
	if (!o->log_level)
		o->log_level = PBRPC_LOG_WARN;
	if (!o->max_memory)
		o->max_memory = (size_t)512 << 20;
	if (o->max_memory < SRV_MEM_FLOOR)
		o->max_memory = SRV_MEM_FLOOR;
	if (!o->max_conn_memory)
		o->max_conn_memory = (size_t)10 * o->max_frame;
	if (o->max_conn_memory < SRV_CONN_MEM_FLOOR)
		o->max_conn_memory = SRV_CONN_MEM_FLOOR;
	if (o->max_conn_memory > o->max_memory)
		o->max_conn_memory = o->max_memory;
	if (!o->unpack_factor)
		o->unpack_factor = SRV_UNPACK_FACTOR;
	if (!o->max_fds)
		o->max_fds = 16;
	if (o->max_fds > PBRPC_FDS_MAX)
		o->max_fds = PBRPC_FDS_MAX;
	if (!o->max_conn_fds)
		o->max_conn_fds = 256;
	if (!o->memfd_threshold)
		o->memfd_threshold = PBRPC_MEMFD_THRESHOLD_DEFAULT;
	if (o->keepalive_timeout_ms <= 0)
		o->keepalive_timeout_ms = 20000;
	if (!o->ping_min_interval_ms)
		o->ping_min_interval_ms = 1000;
	if (o->max_connection_age_grace_ms <= 0)
		o->max_connection_age_grace_ms = 30000;
}

/* While usage is under these, every frame up to max_frame is admitted and a
 * read needs no exact count (loop.c, mem_admit). */
static void budget_init(pbrpc_server *srv)
{
	const pbrpc_server_opts *o = &srv->o;
	srv->easy_room = o->max_frame > SRV_BUF_KEEP ? o->max_frame : SRV_BUF_KEEP;
	srv->mem_easy = o->max_memory > srv->easy_room ? o->max_memory - srv->easy_room : 0;
	srv->conn_easy = o->max_conn_memory > srv->easy_room ? o->max_conn_memory - srv->easy_room : 0;
}

/* One loop's own state (every loop, root included): epoll set, wake-up
 * eventfd, scratch buffer, lists, timers, queues. srv->o, ->root and ->reg
 * are set. */
static int loop_init(pbrpc_server *srv)
{
	budget_init(srv);
	srv->hello = (pbrpc_hello){ .version = PBRPC_WIRE_VERSION, .max_frame = srv->o.max_frame,
				    .max_calls = srv->o.max_calls, .features = PBRPC_FEATURES,
				    .agent = PBRPC_WIRE_AGENT, .stream_window = srv->o.stream_window };
	pbrpc__list_init(&srv->conns);
	pbrpc__list_init(&srv->dirty);
	pbrpc__list_init(&srv->again);
	pbrpc__list_init(&srv->free_calls);
	pbrpc__list_init(&srv->live);
	pbrpc__list_init(&srv->stream_events);
	pbrpc__list_init(&srv->cq);
	pbrpc__list_init(&srv->posts);
	pbrpc__list_init(&srv->wq);
	pbrpc__list_init(&srv->hand);
	pbrpc__timer_init(&srv->sweep, SRV_TIMER_SWEEP);
	pbrpc__timer_init(&srv->drain, SRV_TIMER_DRAIN);
	pbrpc__timer_init(&srv->accept_timer, SRV_TIMER_ACCEPT);
	srv->reserve_fd = -1;
	srv->rng = (uint64_t)pbrpc__now_ns() ^ ((uint64_t)getpid() << 32) ^ (uintptr_t)srv;
	if (!srv->rng)
		srv->rng = 1;
	srv->wake.src = SRV_SRC_WAKE;
	srv->wake.fd = -1;
	srv->tick.src = SRV_SRC_TICK;
	srv->tick.fd = -1;
	pthread_mutex_init(&srv->cq_mu, NULL);
	pthread_mutex_init(&srv->wq_mu, NULL);
	pthread_mutex_init(&srv->hand_mu, NULL);
	pthread_mutex_init(&srv->uid_mu, NULL);
	pthread_cond_init(&srv->wq_cv, NULL);

	int err;
	srv->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (srv->epfd < 0) {
		err = -errno;
		goto err_mu;
	}
	srv->wake.fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (srv->wake.fd < 0) {
		err = -errno;
		goto err_ep;
	}
	struct epoll_event e = { .events = EPOLLIN, .data.ptr = &srv->wake };
	if (epoll_ctl(srv->epfd, EPOLL_CTL_ADD, srv->wake.fd, &e) < 0) {
		err = -errno;
		goto err_wake;
	}
	srv->tick.fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	e.data.ptr = &srv->tick;
	if (srv->tick.fd < 0 || epoll_ctl(srv->epfd, EPOLL_CTL_ADD, srv->tick.fd, &e) < 0) {
		err = -errno;
		goto err_wake;
	}
	srv->scratch = malloc(SRV_SCRATCH_SIZE);
	srv->scratch_cap = SRV_SCRATCH_SIZE;
	srv->mem_used = SRV_SCRATCH_SIZE;
	if (!srv->scratch) {
		err = -ENOMEM;
		goto err_wake;
	}
	if (pbrpc__heap_start(&srv->timers, &srv->sweep, pbrpc__now_ns() + SWEEP_INTERVAL_NS) < 0) {
		err = -ENOMEM;
		goto err_scratch;
	}
	return 0;

err_scratch:
	free(srv->scratch);
err_wake:
	if (srv->tick.fd >= 0)
		close(srv->tick.fd);
	close(srv->wake.fd);
err_ep:
	close(srv->epfd);
err_mu:
	pthread_mutex_destroy(&srv->cq_mu);
	pthread_mutex_destroy(&srv->wq_mu);
	pthread_mutex_destroy(&srv->hand_mu);
	pthread_mutex_destroy(&srv->uid_mu);
	pthread_cond_destroy(&srv->wq_cv);
	return err;
}

/* What loop_init made, and the loop's connections and calls. */
static void loop_fini(pbrpc_server *srv)
{
	pbrpc__list_for_each_safe(c, &srv->conns, srv_conn, link) {
		pbrpc__conn_close(&c->base, 0, "server freed");
		pbrpc__srv_conn_free(c);
	}
	/* Accepted for this loop, never adopted. */
	pbrpc__list_for_each_safe(h, &srv->hand, srv_handoff, link) {
		pbrpc__list_remove(&h->link);
		close(h->fd);
		free(h);
	}
	/* Streams still open heard of it in on_close: their on_cancel runs now,
	 * so that their handlers can let go of what they hold. */
	pbrpc__srv_stream_events(srv);
	pbrpc__srv_run_posts(srv); /* so that their arguments can be freed */
	/* Calls waiting for a closure, completed ones not yet collected, pooled ones. */
	pthread_mutex_lock(&srv->cq_mu);
	pbrpc__srv_calls_free(srv);
	pthread_mutex_unlock(&srv->cq_mu);
	pbrpc__arena_spare_free(&srv->spare_big);
	pbrpc__heap_fini(&srv->timers);
	free(srv->scratch);
	if (srv->reserve_fd >= 0)
		close(srv->reserve_fd);
	close(srv->wake.fd);
	close(srv->tick.fd);
	close(srv->epfd);
	pthread_mutex_destroy(&srv->cq_mu);
	pthread_mutex_destroy(&srv->wq_mu);
	pthread_mutex_destroy(&srv->hand_mu);
	pthread_mutex_destroy(&srv->uid_mu);
	pthread_cond_destroy(&srv->wq_cv);
}

#define LOOPS_MAX 256

/* Loops 1..n-1 (opts.loop_threads): the memory budget split evenly. */
static int siblings_new(pbrpc_server *root, unsigned n)
{
	root->loops = calloc(n, sizeof(*root->loops));
	if (!root->loops)
		return -ENOMEM;
	root->loops[0] = root;
	root->n_loops = 1;
	for (unsigned i = 1; i < n; i++) {
		pbrpc_server *l = calloc(1, sizeof(*l));
		if (!l)
			return -ENOMEM;
		l->o = root->o;
		l->root = root;
		l->reg = root->reg;
		l->tls_ctx = root->tls_ctx; /* root's */
		l->loop_index = i;
		int err = loop_init(l);
		if (err < 0) {
			free(l);
			return err;
		}
		root->loops[root->n_loops++] = l;
	}
	return 0;
}

PBRPC_EXPORT int pbrpc_server_new(pbrpc_server **out, const pbrpc_server_opts *opts)
{
	*out = NULL;
	pbrpc_server *srv = calloc(1, sizeof(*srv));
	if (!srv)
		return -ENOMEM;
	if (opts)
		srv->o = *opts;
	unsigned n = srv->o.loop_threads ? srv->o.loop_threads : 1;
	if (n > LOOPS_MAX)
		n = LOOPS_MAX;
	srv->o.loop_threads = n;
	if (n > 1 && srv->o.max_memory)
		srv->o.max_memory /= n; /* each loop's share; opts_defaults floors it */
	else if (n > 1)
		srv->o.max_memory = ((size_t)512 << 20) / n;
	opts_defaults(&srv->o);
	srv->root = srv;
	srv->reg = &srv->reg_store;
	srv->n_loops = 1;
	pbrpc__registry_init(srv->reg);
	srv->reg->call_log = srv->o.call_log;
	srv->reg->call_log_user = srv->o.call_log_user;
	srv->reg->observe = srv->o.call_log != NULL;

	int err;
	if (srv->o.tls.cert || srv->o.tls.ca) {
		char why[256];
		err = pbrpc__tls_ctx_new(&srv->tls_ctx, true, &srv->o.tls, why, sizeof(why));
		if (err < 0) {
			pbrpc__srv_log(srv, PBRPC_LOG_ERROR, "tls: %s", why[0] ? why : pbrpc_strerror(err));
			goto err_srv;
		}
	}
	err = loop_init(srv);
	if (err < 0)
		goto err_srv;
	pbrpc__srv_reserve_fd(srv); /* best effort: taken again when needed */
	if (n > 1 && (err = siblings_new(srv, n)) < 0)
		goto err_loop;
	err = pbrpc__srv_workers_start(srv);
	if (err < 0)
		goto err_loop;
	*out = srv;
	return 0;

err_loop:
	for (unsigned i = 1; i < srv->n_loops; i++) {
		loop_fini(srv->loops[i]);
		free(srv->loops[i]);
	}
	free(srv->loops);
	loop_fini(srv);
err_srv:
	pbrpc__registry_fini(srv->reg);
	pbrpc__tls_ctx_free(srv->tls_ctx);
	free(srv);
	return err;
}

PBRPC_EXPORT void pbrpc_server_free(pbrpc_server *srv)
{
	if (!srv)
		return;
	pbrpc__srv_loops_join(srv);
	pbrpc__srv_workers_stop(srv);
	pbrpc__srv_listeners_close(srv);
	for (size_t i = 0; i < srv->n_listeners; i++)
		free(srv->listeners[i]);
	free(srv->listeners);
	for (unsigned i = 1; i < srv->n_loops; i++) {
		loop_fini(srv->loops[i]);
		free(srv->loops[i]);
	}
	free(srv->loops);
	loop_fini(srv);
	pbrpc__registry_fini(srv->reg);
	pbrpc__authz_fini(srv);
	pbrpc__tls_ctx_free(srv->tls_ctx);
	free(srv);
}

pbrpc__registry *pbrpc__server_registry(pbrpc_server *srv)
{
	return srv->reg;
}

PBRPC_EXPORT int pbrpc_server_add_service(pbrpc_server *srv, ProtobufCService *service)
{
	int rc = pbrpc__registry_add(srv->reg, service, false);
	int fl = 0;
	const char *m = rc == PBRPC_EINVALID && service && service->descriptor && service->descriptor->name
				? pbrpc__registry_stream_method(srv->reg, service->descriptor, &fl)
				: NULL;
	if (m)
		pbrpc__srv_log(srv, PBRPC_LOG_ERROR,
			       "%s/%s is a %s method in its .proto: register %s with the function pbrpc-gen wrote "
			       "(its stream methods first), not as a protoc-c service alone",
			       service->descriptor->name, m,
			       fl == 3 ? "bidirectional" : fl & PBRPC_SCHEMA_SERVER_STREAMING ? "server-streaming"
											: "client-streaming",
			       service->descriptor->name);
	return rc;
}

PBRPC_EXPORT int pbrpc_server_set_serving(pbrpc_server *srv, const char *service, bool serving)
{
	return pbrpc__registry_set_serving(srv->reg, service, serving);
}

PBRPC_EXPORT void pbrpc_server_get_stats(const pbrpc_server *srv, pbrpc_server_stats *out)
{
	*out = (pbrpc_server_stats){ 0 };
	unsigned n = srv->n_loops > 1 ? srv->n_loops : 1;
	for (unsigned i = 0; i < n; i++) {
		const pbrpc_server_stats *s = n > 1 ? &srv->loops[i]->stats : &srv->stats;
		out->connections_accepted += __atomic_load_n(&s->connections_accepted, __ATOMIC_RELAXED);
		out->connections_refused += __atomic_load_n(&s->connections_refused, __ATOMIC_RELAXED);
		out->connections_open += __atomic_load_n(&s->connections_open, __ATOMIC_RELAXED);
		out->protocol_errors += __atomic_load_n(&s->protocol_errors, __ATOMIC_RELAXED);
		out->calls_started += __atomic_load_n(&s->calls_started, __ATOMIC_RELAXED);
		out->calls_completed += __atomic_load_n(&s->calls_completed, __ATOMIC_RELAXED);
		out->calls_in_flight += __atomic_load_n(&s->calls_in_flight, __ATOMIC_RELAXED);
		out->calls_denied += __atomic_load_n(&s->calls_denied, __ATOMIC_RELAXED);
	}
}

unsigned pbrpc__server_loop_conns(const pbrpc_server *srv, unsigned i)
{
	if (i >= (srv->n_loops > 1 ? srv->n_loops : 1))
		return 0;
	const pbrpc_server *l = srv->n_loops > 1 ? srv->loops[i] : srv;
	return (unsigned)__atomic_load_n(&l->stats.connections_open, __ATOMIC_RELAXED);
}
