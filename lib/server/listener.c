/* Endpoints: listening sockets, accepting connections, and the rule for the
 * Unix socket files a server creates. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <unistd.h>

#include "server/server_impl.h"

#define ACCEPTS_PER_WAKEUP 64

/* Closes every listener. A socket file we created is unlinked now, while the
 * path still names our socket (same device and inode), so that a
 * replacement server that binds the path afterwards keeps its file. */
void pbrpc__srv_listeners_close(pbrpc_server *srv)
{
	for (size_t i = 0; i < srv->n_listeners; i++) {
		srv_listener *l = srv->listeners[i];
		if (l->fd < 0)
			continue;
		struct stat st;
		if (l->owns_path && lstat(l->ep.path, &st) == 0 && st.st_dev == l->dev && st.st_ino == l->ino)
			unlink(l->ep.path);
		l->owns_path = false;
		epoll_ctl(srv->epfd, EPOLL_CTL_DEL, l->fd, NULL);
		close(l->fd);
		l->fd = -1;
	}
	pbrpc__heap_stop(&srv->timers, &srv->accept_timer);
	srv->accept_paused = false;
}

/* Over the connection limit, out of file descriptors or shutting down: say
 * why before closing, so the client reports something useful (preface,
 * HELLO, GOAWAY, close). */
static void refused_close(pbrpc__conn *c, int err, const char *why)
{
	(void)c, (void)err, (void)why; /* counted and logged by the caller */
}

static const pbrpc__conn_ops refused_ops = { .on_close = refused_close };

static void refuse_with(pbrpc_server *srv, int fd, int status, const char *why)
{
	pbrpc__conn c;
	if (pbrpc__conn_init(&c, fd, PBRPC__CONN_SERVER, &refused_ops, &srv->hello) == 0)
		pbrpc__conn_fail(&c, status, 0, "%s", why);
	else
		c.fd = fd; /* closed by fini */
	pbrpc__conn_fini(&c);
	SRV_STAT_ADD(srv, connections_refused, 1);
}

/* The same for authz.c's per-uid cap. */
void pbrpc__srv_refuse_with(pbrpc_server *srv, int fd, int status, const char *why)
{
	refuse_with(srv, fd, status, why);
}

static void refuse(pbrpc_server *srv, int fd)
{
	bool down = srv->shutting_down;
	refuse_with(srv, fd, down ? PBRPC_STATUS_UNAVAILABLE : PBRPC_STATUS_RESOURCE_EXHAUSTED,
		    down ? "server is shutting down" : "too many connections");
	pbrpc__srv_log(srv, PBRPC_LOG_WARN, "refused a connection: %s", down ? "shutting down" : "too many connections");
}

/* Keepalive and connection age: the connection core derives its timer from
 * these. The age gets +-10% of jitter, so that the connections a balancer
 * opened at once are not all drained at once. */
static void conn_set_keepalive(pbrpc_server *srv, pbrpc__conn *b)
{
	const pbrpc_server_opts *o = &srv->o;
	b->last_read = b->last_active;
	if (o->keepalive_interval_ms > 0) {
		b->ka_interval_ns = (int64_t)o->keepalive_interval_ms * PBRPC__NS_PER_MS;
		b->ka_timeout_ns = (int64_t)o->keepalive_timeout_ms * PBRPC__NS_PER_MS;
	}
	if (o->ping_min_interval_ms > 0)
		b->ping_min_ns = (int64_t)o->ping_min_interval_ms * PBRPC__NS_PER_MS;
	if (o->max_connection_age_ms > 0) {
		uint64_t x = srv->rng;
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		srv->rng = x;
		int64_t age = (int64_t)o->max_connection_age_ms * PBRPC__NS_PER_MS;
		int64_t span = age / 10;
		int64_t jitter = span > 0 ? (int64_t)(x % (uint64_t)(2 * span + 1)) - span : 0;
		b->age_at = b->last_active + age + jitter;
		b->drain_grace_ns = (int64_t)o->max_connection_age_grace_ms * PBRPC__NS_PER_MS;
	}
}

/* The client's address, as pbrpc_call_info.peer reports it: read once here. */
static void conn_set_peer(srv_conn *c, int fd, bool tcp)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	char host[INET6_ADDRSTRLEN] = "?";
	unsigned port = 0;
	const char *scheme = c->base.tls ? "tls" : "tcp";
	snprintf(c->peer, sizeof(c->peer), "%s", !tcp ? "unix" : c->base.tls ? "tls:?" : "tcp:?");
	if (!tcp || getpeername(fd, (struct sockaddr *)&ss, &sl) < 0)
		return;
	if (ss.ss_family == AF_INET) {
		const struct sockaddr_in *a = (const struct sockaddr_in *)&ss;
		inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
		port = ntohs(a->sin_port);
		snprintf(c->peer, sizeof(c->peer), "%s:%s:%u", scheme, host, port);
	} else if (ss.ss_family == AF_INET6) {
		const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&ss;
		inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
		port = ntohs(a->sin6_port);
		snprintf(c->peer, sizeof(c->peer), "%s:[%s]:%u", scheme, host, port);
	}
}

/* ---- out of file descriptors ----
 * A level-triggered listener with a connection waiting and no fd to take it
 * wakes the loop for ever. So at EMFILE or ENFILE (and ENOBUFS, ENOMEM) the
 * listeners leave the epoll set for a backoff, 100 ms doubling to 1 s, reset
 * by the next successful accept, and come back early when a connection
 * closes. Before pausing, the one reserved fd is given up to accept what
 * waits (at most REFUSE_PER_PAUSE) and answer it GOAWAY(RESOURCE_EXHAUSTED,
 * "out of file descriptors"), so the client is told why; then it is taken
 * again. One log line a second at most, with a count. */

#define ACCEPT_BACKOFF_MIN_MS 100
#define ACCEPT_BACKOFF_MAX_MS 1000
#define REFUSE_PER_PAUSE 64

/* Takes the reserved fd if it is not held; returns it or -1. */
int pbrpc__srv_reserve_fd(pbrpc_server *srv)
{
	if (srv->reserve_fd < 0)
		srv->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	return srv->reserve_fd;
}

static void listeners_watch(pbrpc_server *srv, bool on)
{
	for (size_t i = 0; i < srv->n_listeners; i++) {
		srv_listener *l = srv->listeners[i];
		if (l->fd < 0)
			continue;
		struct epoll_event e = { .events = EPOLLIN, .data.ptr = l };
		epoll_ctl(srv->epfd, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, l->fd, on ? &e : NULL);
	}
	srv->accept_paused = !on;
}

/* The backoff is over, or a connection closed and freed its fd. */
void pbrpc__srv_accept_resume(pbrpc_server *srv)
{
	pbrpc__heap_stop(&srv->timers, &srv->accept_timer);
	if (!srv->accept_paused)
		return;
	pbrpc__srv_reserve_fd(srv);
	listeners_watch(srv, true);
}

static void at_limit(pbrpc_server *srv, srv_listener *l, int err)
{
	bool fds = err == EMFILE || err == ENFILE;
	uint64_t refused = 0;
	while (fds && refused < REFUSE_PER_PAUSE && srv->reserve_fd >= 0) {
		close(srv->reserve_fd);
		srv->reserve_fd = -1;
		int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		int aerr = errno;
		if (fd >= 0) {
			refuse_with(srv, fd, PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of file descriptors");
			refused++;
		}
		pbrpc__srv_reserve_fd(srv);
		if (fd < 0 && aerr != EINTR && aerr != ECONNABORTED)
			break; /* EAGAIN: nothing waits any more */
	}
	srv->accept_refused += refused;

	int ms = srv->accept_backoff_ms ? srv->accept_backoff_ms * 2 : ACCEPT_BACKOFF_MIN_MS;
	srv->accept_backoff_ms = ms > ACCEPT_BACKOFF_MAX_MS ? ACCEPT_BACKOFF_MAX_MS : ms;
	int64_t now = pbrpc__now_ns();
	if (now >= srv->accept_log_next) {
		pbrpc__srv_log(srv, PBRPC_LOG_WARN, "accept: %s (%" PRIu64 " refused in the last second)",
			       fds ? "out of file descriptors" : "out of memory", srv->accept_refused);
		srv->accept_refused = 0;
		srv->accept_log_next = now + PBRPC__NS_PER_S;
	}
	/* Without a timer the listeners would never come back: keep them. */
	if (pbrpc__heap_start(&srv->timers, &srv->accept_timer,
			      now + (int64_t)srv->accept_backoff_ms * PBRPC__NS_PER_MS) == 0 &&
	    !srv->accept_paused)
		listeners_watch(srv, false);
}

/* Accepting works again. */
static void accept_recovered(pbrpc_server *srv)
{
	srv->accept_backoff_ms = 0;
	if (srv->accept_refused)
		pbrpc__srv_log(srv, PBRPC_LOG_WARN, "accept: accepting again (%" PRIu64
			       " refused since the last report)", srv->accept_refused);
	srv->accept_refused = 0;
	srv->accept_log_next = 0;
}

static srv_conn *conn_new(pbrpc_server *srv, int fd, const srv_listener *l, const struct ucred *cred)
{
	srv_conn *c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	if (pbrpc__conn_init(&c->base, fd, PBRPC__CONN_SERVER, &pbrpc__srv_conn_ops, &srv->hello) < 0) {
		c->base.fd = -1; /* the caller closes fd */
		pbrpc__conn_fini(&c->base);
		free(c);
		return NULL;
	}
	if (l->ep.tls && pbrpc__tls_new(&c->base.tls, srv->tls_ctx, fd, NULL, false) < 0) {
		c->base.fd = -1; /* the caller closes fd */
		pbrpc__conn_fini(&c->base);
		free(c);
		return NULL;
	}
	c->src = SRV_SRC_CONN;
	c->srv = srv;
	pbrpc__list_init(&c->again);
	pbrpc__timer_init(&c->timer, SRV_TIMER_CONN);
	pbrpc__list_init(&c->link);
	pbrpc__list_init(&c->dirty);
	c->base.max_output = srv->o.max_output_queue;
	c->base.stall_ns = srv->o.write_stall_timeout_ms > 0 ? (int64_t)srv->o.write_stall_timeout_ms * PBRPC__NS_PER_MS : 0;
	c->base.idle_ns = srv->o.idle_timeout_ms > 0 ? (int64_t)srv->o.idle_timeout_ms * PBRPC__NS_PER_MS : 0;
	c->base.last_active = pbrpc__now_ns();
	if (srv->o.handshake_timeout_ms > 0)
		c->base.handshake_deadline = c->base.last_active + (int64_t)srv->o.handshake_timeout_ms * PBRPC__NS_PER_MS;
	conn_set_keepalive(srv, &c->base);
	if (l->ep.kind == PBRPC_ENDPOINT_TCP) {
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	} else if (cred) {
		c->has_cred = true;
		c->cred = *cred;
		pbrpc__authz_conn_open(c, fd);
	}
	conn_set_peer(c, fd, l->ep.kind == PBRPC_ENDPOINT_TCP);
	return c;
}

/* The loop with the fewest connections (the lowest index among equals), so
 * that connections spread evenly: 16 over 2 loops are 8 and 8. */
static pbrpc_server *pick_loop(pbrpc_server *root)
{
	pbrpc_server *best = root;
	unsigned min = atomic_load_explicit(&root->n_conns, memory_order_relaxed);
	for (unsigned i = 1; i < root->n_loops && min; i++) {
		unsigned n = atomic_load_explicit(&root->loops[i]->n_conns, memory_order_relaxed);
		if (n < min) {
			min = n;
			best = root->loops[i];
		}
	}
	return best;
}

void pbrpc__srv_conn_gone(pbrpc_server *srv)
{
	atomic_fetch_sub_explicit(&srv->n_conns, 1, memory_order_relaxed);
	atomic_fetch_sub_explicit(&srv->root->conns_all, 1, memory_order_relaxed);
}

/* conn_new's failure: the counts the accept took go back. */
static void adopt_failed(pbrpc_server *srv, int fd, const struct ucred *cred, bool uid_counted)
{
	close(fd);
	if (uid_counted)
		pbrpc__authz_uid_release(srv->root, cred->uid);
	pbrpc__srv_conn_gone(srv);
}

int pbrpc__srv_conn_adopt(pbrpc_server *srv, int fd, const srv_listener *l, const struct ucred *cred,
			  bool uid_counted)
{
	srv_conn *c = conn_new(srv, fd, l, cred);
	if (!c) {
		adopt_failed(srv, fd, cred, uid_counted);
		return -ENOMEM;
	}
	c->uid_counted = uid_counted;
	c->events = EPOLLIN;
	struct epoll_event e = { .events = EPOLLIN, .data.ptr = c };
	if (epoll_ctl(srv->epfd, EPOLL_CTL_ADD, fd, &e) < 0) {
		int err = errno;
		c->uid_counted = false;
		pbrpc__authz_conn_closed(c);
		pbrpc__conn_fini(&c->base);
		free(c);
		adopt_failed(srv, fd, cred, uid_counted);
		return err == ENOSPC ? -ENOMEM : -err; /* max_user_watches: no memory for it */
	}
	pbrpc__list_insert(&srv->conns, &c->link);
	SRV_STAT_ADD(srv, connections_accepted, 1);
	SRV_STAT_ADD(srv, connections_open, 1);
	/* Our preface and HELLO go out at once; the timer and events
	 * follow from the state. */
	pbrpc__srv_mark_dirty(c);
	char name[64];
	pbrpc__srv_log(srv, PBRPC_LOG_DEBUG, "accepted connection %s", pbrpc__srv_conn_name(c, name, sizeof(name)));
	return 0;
}

/* On a sibling loop, woken: the fds root accepted for it. */
void pbrpc__srv_take_handoffs(pbrpc_server *srv)
{
	pbrpc__list l;
	pbrpc__list_init(&l);
	pthread_mutex_lock(&srv->hand_mu);
	pbrpc__list_splice(&l, &srv->hand);
	pthread_mutex_unlock(&srv->hand_mu);
	pbrpc__list_for_each_safe(h, &l, srv_handoff, link) {
		pbrpc__list_remove(&h->link);
		if (srv->shutting_down) {
			if (h->uid_counted)
				pbrpc__authz_uid_release(srv->root, h->cred.uid);
			pbrpc__srv_conn_gone(srv);
			refuse(srv, h->fd);
		} else if (pbrpc__srv_conn_adopt(srv, h->fd, h->l, h->has_cred ? &h->cred : NULL, h->uid_counted) < 0) {
			SRV_STAT_ADD(srv, connections_refused, 1);
			pbrpc__srv_log(srv, PBRPC_LOG_WARN, "accept: out of memory");
		}
		free(h);
	}
}

static int hand_over(pbrpc_server *to, int fd, const srv_listener *l, const struct ucred *cred, bool uid_counted)
{
	srv_handoff *h = malloc(sizeof(*h));
	if (!h)
		return -ENOMEM;
	h->fd = fd;
	h->l = l;
	h->has_cred = cred != NULL;
	if (cred)
		h->cred = *cred;
	h->uid_counted = uid_counted;
	pthread_mutex_lock(&to->hand_mu);
	pbrpc__list_append(&to->hand, &h->link);
	pthread_mutex_unlock(&to->hand_mu);
	pbrpc__srv_wake(to);
	return 0;
}

void pbrpc__srv_accept(pbrpc_server *srv, srv_listener *l)
{
	if (l->fd < 0 || srv->accept_paused)
		return; /* closed or paused earlier in this batch of events */
	for (int i = 0; i < ACCEPTS_PER_WAKEUP; i++) {
		int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
				at_limit(srv, l, errno);
			else if (errno != EAGAIN && errno != EWOULDBLOCK)
				pbrpc__srv_log(srv, PBRPC_LOG_ERROR, "accept: %s", strerror(errno));
			return;
		}
		if (srv->accept_backoff_ms)
			accept_recovered(srv);
		if (atomic_load_explicit(&srv->conns_all, memory_order_relaxed) >= srv->o.max_connections ||
		    srv->shutting_down) {
			refuse(srv, fd);
			continue;
		}
		struct ucred cred;
		socklen_t sl = sizeof(cred);
		bool has_cred = l->ep.kind != PBRPC_ENDPOINT_TCP &&
				getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &sl) == 0;
		bool uid_counted = false;
		if (has_cred && srv->o.max_connections_per_uid) {
			int t = pbrpc__authz_uid_take(srv, cred.uid);
			if (t < 0) {
				pbrpc__authz_refuse_uid(srv, fd, cred.uid);
				continue;
			}
			uid_counted = t > 0;
		}
		/* Counted now, on this thread: the next accept sees it. */
		pbrpc_server *to = srv->n_loops > 1 ? pick_loop(srv) : srv;
		atomic_fetch_add_explicit(&to->n_conns, 1, memory_order_relaxed);
		atomic_fetch_add_explicit(&srv->conns_all, 1, memory_order_relaxed);
		if (to != srv) {
			if (hand_over(to, fd, l, has_cred ? &cred : NULL, uid_counted) < 0) {
				adopt_failed(to, fd, &cred, uid_counted);
				at_limit(srv, l, ENOMEM);
				return;
			}
			continue;
		}
		int err = pbrpc__srv_conn_adopt(srv, fd, l, has_cred ? &cred : NULL, uid_counted);
		if (err < 0) {
			at_limit(srv, l, -err);
			return;
		}
	}
}

static int add_listener(pbrpc_server *srv, int fd, const pbrpc_endpoint *ep, bool owns_path)
{
	srv_listener *l = calloc(1, sizeof(*l));
	srv_listener **v = realloc(srv->listeners, (srv->n_listeners + 1) * sizeof(*v));
	if (!l || !v) {
		free(l);
		if (v)
			srv->listeners = v;
		return -ENOMEM;
	}
	srv->listeners = v;
	l->src = SRV_SRC_LISTENER;
	l->fd = fd;
	l->ep = *ep;
	l->owns_path = owns_path;
	struct stat st;
	if (owns_path && lstat(ep->path, &st) == 0) {
		l->dev = st.st_dev;
		l->ino = st.st_ino;
	}
	struct epoll_event e = { .events = EPOLLIN, .data.ptr = l };
	if (epoll_ctl(srv->epfd, EPOLL_CTL_ADD, fd, &e) < 0) {
		int err = -errno;
		free(l);
		return err;
	}
	srv->listeners[srv->n_listeners] = l;
	return (int)srv->n_listeners++;
}

PBRPC_EXPORT int pbrpc_server_listen(pbrpc_server *srv, const char *endpoint)
{
	pbrpc_endpoint ep;
	int rc = pbrpc_endpoint_parse(endpoint, &ep);
	if (rc < 0)
		return rc;
	if (ep.tls && !srv->tls_ctx) {
		pbrpc__srv_log(srv, PBRPC_LOG_ERROR, "tls: %s needs a certificate and key (opts.tls)", endpoint);
		return PBRPC_ETLS;
	}
	pbrpc_listen_opts lo = { .mode = srv->o.socket_mode, .nonblock = true };
	int fd = pbrpc_endpoint_listen(&ep, &lo);
	if (fd < 0)
		return fd;
	rc = add_listener(srv, fd, &ep, ep.kind == PBRPC_ENDPOINT_UNIX);
	if (rc < 0) {
		close(fd);
		if (ep.kind == PBRPC_ENDPOINT_UNIX)
			unlink(ep.path);
		return rc;
	}
	char name[PBRPC_ENDPOINT_STRLEN];
	pbrpc_endpoint_format(&ep, name, sizeof(name));
	pbrpc__srv_log(srv, PBRPC_LOG_INFO, "listening on %s", name);
	return rc;
}

PBRPC_EXPORT int pbrpc_server_listen_fd(pbrpc_server *srv, int fd)
{
	pbrpc_endpoint ep;
	int rc = pbrpc_endpoint_from_fd(fd, &ep);
	if (rc < 0)
		return rc;
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return -errno;
	fcntl(fd, F_SETFD, FD_CLOEXEC);
	return add_listener(srv, fd, &ep, false);
}

PBRPC_EXPORT int pbrpc_server_address(const pbrpc_server *srv, int index, char *buf, size_t len)
{
	if (index < 0 || (size_t)index >= srv->n_listeners)
		return PBRPC_EINVALID;
	pbrpc_endpoint_format(&srv->listeners[index]->ep, buf, len);
	return 0;
}
