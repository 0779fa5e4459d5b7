/* Local trust: a Unix peer's credentials (read once, at accept), the
 * policies of services and methods (checked in dispatch before a request is
 * unpacked), and the count of connections per uid
 * (opts.max_connections_per_uid). Everything here runs on the loop thread
 * (the per-uid table: root's, under uid_mu). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "server/server_impl.h"

/* Linux 6.5; glibc's and the kernel headers of Debian 12 predate it. */
#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif
#ifndef SO_PEERGROUPS
#define SO_PEERGROUPS 59
#endif

#define GROUPS_ON_STACK 64

/* ---- a peer's groups and pidfd ---- */

void pbrpc__authz_peer_unref(srv_peer *p)
{
	if (!p || --p->refs)
		return;
	if (p->pidfd >= 0)
		close(p->pidfd);
	free(p);
}

/* SO_PEERGROUPS into buf (room for *n); on ERANGE the kernel says how many
 * there are. Returns the count, or -1 (no groups to report). */
static int peer_groups(int fd, gid_t **out, gid_t *stack)
{
	socklen_t len = GROUPS_ON_STACK * sizeof(gid_t);
	*out = stack;
	if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, stack, &len) == 0)
		return (int)(len / sizeof(gid_t));
	if (errno != ERANGE || len <= GROUPS_ON_STACK * sizeof(gid_t))
		return -1;
	gid_t *heap = malloc(len);
	if (!heap || getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, heap, &len) < 0) {
		free(heap);
		return -1;
	}
	*out = heap;
	return (int)(len / sizeof(gid_t));
}

static int peer_pidfd(int fd)
{
	int pidfd;
	socklen_t len = sizeof(pidfd);
	/* ENOPROTOOPT before Linux 6.5, ESRCH when the peer has exited: none. */
	if (getsockopt(fd, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) < 0 || len != sizeof(pidfd))
		return -1;
	return pidfd; /* the kernel makes it close-on-exec */
}

/* ---- connections per uid: open addressing on the uid, no tombstones ---- */

typedef struct srv_uid_count {
	uid_t uid;
	uint32_t n; /* 0: free slot */
} srv_uid_count;

static size_t uid_slot(uid_t uid, size_t cap)
{
	return (size_t)(((uint64_t)uid * 0x9e3779b97f4a7c15ull) >> 32) & (cap - 1);
}

static srv_uid_count *uid_find(pbrpc_server *srv, uid_t uid)
{
	if (!srv->uids_cap)
		return NULL;
	for (size_t i = uid_slot(uid, srv->uids_cap);; i = (i + 1) & (srv->uids_cap - 1)) {
		srv_uid_count *e = &srv->uids[i];
		if (!e->n || e->uid == uid)
			return e;
	}
}

static int uid_grow(pbrpc_server *srv)
{
	size_t cap = srv->uids_cap ? srv->uids_cap * 2 : 16;
	srv_uid_count *v = calloc(cap, sizeof(*v));
	if (!v)
		return -ENOMEM;
	for (size_t i = 0; i < srv->uids_cap; i++) {
		if (!srv->uids[i].n)
			continue;
		size_t j = uid_slot(srv->uids[i].uid, cap);
		while (v[j].n)
			j = (j + 1) & (cap - 1);
		v[j] = srv->uids[i];
	}
	free(srv->uids);
	srv->uids = v;
	srv->uids_cap = cap;
	return 0;
}

/* Removes slot i and shifts back the entries of its run that hashed before it. */
static void uid_remove(pbrpc_server *srv, size_t i)
{
	size_t mask = srv->uids_cap - 1;
	srv->uids[i].n = 0;
	srv->n_uids--;
	for (size_t j = (i + 1) & mask; srv->uids[j].n; j = (j + 1) & mask) {
		size_t home = uid_slot(srv->uids[j].uid, srv->uids_cap);
		/* j may move to i when home is not in (i, j] (cyclically) */
		if ((j > i && (home <= i || home > j)) || (j < i && home <= i && home > j)) {
			srv->uids[i] = srv->uids[j];
			srv->uids[j].n = 0;
			i = j;
		}
	}
}

/* The table is root's, under uid_mu: root counts at accept, each loop
 * releases when its connection closes. Returns -1 (at the cap: refuse), 0
 * (not counted: the table cannot grow, the global cap holds) or 1. */
int pbrpc__authz_uid_take(pbrpc_server *srv, uid_t uid)
{
	srv = srv->root;
	int rc = 1;
	pthread_mutex_lock(&srv->uid_mu);
	srv_uid_count *e = uid_find(srv, uid);
	if (e && e->n && e->n >= srv->o.max_connections_per_uid) {
		rc = -1;
	} else if (srv->n_uids * 2 >= srv->uids_cap && uid_grow(srv) < 0) {
		rc = 0;
	} else {
		e = uid_find(srv, uid);
		if (!e->n) {
			e->uid = uid;
			srv->n_uids++;
		}
		e->n++;
	}
	pthread_mutex_unlock(&srv->uid_mu);
	return rc;
}

/* Over the cap: told why, as max_connections refuses (listener.c). */
void pbrpc__authz_refuse_uid(pbrpc_server *srv, int fd, uid_t uid)
{
	char why[96];
	snprintf(why, sizeof(why), "too many connections for uid %u (limit %" PRIu32 ")", (unsigned)uid,
		 srv->o.max_connections_per_uid);
	pbrpc__srv_refuse_with(srv, fd, PBRPC_STATUS_RESOURCE_EXHAUSTED, why);
	int64_t now = pbrpc__now_ns();
	if (now < srv->uid_log_next) {
		srv->uid_refused_quiet++;
		return;
	}
	if (srv->uid_refused_quiet)
		pbrpc__srv_log(srv, PBRPC_LOG_WARN, "refused a connection: %s (%" PRIu64 " more since the last report)",
			       why, srv->uid_refused_quiet);
	else
		pbrpc__srv_log(srv, PBRPC_LOG_WARN, "refused a connection: %s", why);
	srv->uid_refused_quiet = 0;
	srv->uid_log_next = now + PBRPC__NS_PER_S;
}

/* A Unix connection with credentials was accepted: its groups, its pidfd
 * when a policy may want it, its place in the per-uid count. Failures leave
 * less to see (no groups, no pidfd), never a refusal. */
void pbrpc__authz_conn_open(srv_conn *c, int fd)
{
	pbrpc_server *srv = c->srv;
	gid_t stack[GROUPS_ON_STACK], *groups;
	int n = peer_groups(fd, &groups, stack);
	int pidfd = srv->root->want_pidfd ? peer_pidfd(fd) : -1;
	if (n > 0 || pidfd >= 0) {
		size_t ng = n > 0 ? (size_t)n : 0;
		srv_peer *p = malloc(sizeof(*p) + ng * sizeof(gid_t));
		if (p) {
			p->refs = 1;
			p->pidfd = pidfd;
			p->n_groups = (uint32_t)ng;
			if (ng)
				memcpy(p->groups, groups, ng * sizeof(gid_t));
			c->peer_ext = p;
		} else if (pidfd >= 0) {
			close(pidfd);
		}
	}
	if (groups != stack)
		free(groups);
}

void pbrpc__authz_conn_closed(srv_conn *c)
{
	pbrpc__authz_peer_unref(c->peer_ext);
	c->peer_ext = NULL;
	if (!c->uid_counted)
		return;
	c->uid_counted = false;
	pbrpc__authz_uid_release(c->srv, c->cred.uid);
}

void pbrpc__authz_uid_release(pbrpc_server *srv, uid_t uid)
{
	srv = srv->root;
	pthread_mutex_lock(&srv->uid_mu);
	srv_uid_count *e = uid_find(srv, uid);
	if (e && e->n && --e->n == 0)
		uid_remove(srv, (size_t)(e - srv->uids));
	pthread_mutex_unlock(&srv->uid_mu);
}

void pbrpc__authz_fini(pbrpc_server *srv)
{
	free(srv->uids);
	srv->uids = NULL;
	srv->uids_cap = srv->n_uids = 0;
}

/* ---- policies ---- */

void pbrpc__policy_free(pbrpc__policy *p)
{
	if (!p)
		return;
	free((void *)p->p.uids);
	free((void *)p->p.gids);
	free(p);
}

static pbrpc__policy *policy_copy(const pbrpc_policy *in)
{
	pbrpc__policy *p = calloc(1, sizeof(*p));
	if (!p)
		return NULL;
	p->p = *in;
	p->p.uids = NULL;
	p->p.gids = NULL;
	if (in->n_uids) {
		uid_t *u = malloc(in->n_uids * sizeof(*u));
		if (!u)
			goto fail;
		memcpy(u, in->uids, in->n_uids * sizeof(*u));
		p->p.uids = u;
	}
	if (in->n_gids) {
		gid_t *g = malloc(in->n_gids * sizeof(*g));
		if (!g)
			goto fail;
		memcpy(g, in->gids, in->n_gids * sizeof(*g));
		p->p.gids = g;
	}
	return p;
fail:
	pbrpc__policy_free(p);
	return NULL;
}

/* Every method of service `svc` without its own policy follows the
 * service's. */
static void service_apply(pbrpc__registry *r, size_t svc)
{
	for (size_t i = 0; i < r->methods_cap; i++) {
		pbrpc__method *m = &r->methods[i];
		if (m->name && m->service == svc && !m->own_policy)
			m->policy = r->services[svc].policy;
	}
}

static void want_pidfd(pbrpc_server *srv)
{
	const pbrpc__registry *r = srv->reg;
	bool want = false;
	for (size_t i = 0; i < r->n_services && !want; i++)
		want = r->services[i].policy && r->services[i].policy->p.check;
	for (size_t i = 0; i < r->methods_cap && !want; i++)
		want = r->methods[i].own_policy && r->methods[i].own_policy->p.check;
	srv->want_pidfd = want;
}

PBRPC_EXPORT int pbrpc_server_set_policy(pbrpc_server *srv, const char *name, const pbrpc_policy *policy)
{
	if (!srv || !name)
		return PBRPC_EINVALID;
	pbrpc__registry *r = srv->reg;
	pbrpc__method *m = NULL;
	size_t svc = r->n_services;
	if (strchr(name, '/')) {
		m = (pbrpc__method *)pbrpc__registry_find(r, name, strlen(name));
		if (!m)
			return PBRPC_EINVALID;
	} else {
		for (svc = 0; svc < r->n_services; svc++)
			if (strcmp(r->services[svc].service->descriptor->name, name) == 0)
				break;
		if (svc == r->n_services)
			return PBRPC_EINVALID;
	}
	pbrpc__policy *p = NULL;
	if (policy && !(p = policy_copy(policy)))
		return -ENOMEM;
	if (m) {
		pbrpc__policy_free(m->own_policy);
		m->own_policy = p;
		m->policy = p ? p : m->service < r->n_services ? r->services[m->service].policy : NULL;
	} else {
		pbrpc__policy_free(r->services[svc].policy);
		r->services[svc].policy = p;
		service_apply(r, svc);
	}
	want_pidfd(srv);
	for (unsigned i = 0; i < (srv->n_loops > 1 ? srv->n_loops : 1); i++) {
		pbrpc_server *l = srv->n_loops > 1 ? srv->loops[i] : srv;
		pbrpc__list_for_each(c, &l->conns, srv_conn, link)
			c->admitted = NULL;
	}
	return 0;
}

_Static_assert(sizeof(uid_t) == sizeof(uint32_t) && sizeof(gid_t) == sizeof(uint32_t), "32-bit ids");

static bool has_id(const uint32_t *v, size_t n, uint32_t id)
{
	for (size_t i = 0; i < n; i++)
		if (v[i] == id)
			return true;
	return false;
}

static bool admits(const srv_conn *c, const pbrpc__method *m)
{
	const pbrpc_policy *p = &m->policy->p;
	if (!c->has_cred)
		return p->allow_tcp;
	if (p->any_local || has_id(p->uids, p->n_uids, c->cred.uid) || has_id(p->gids, p->n_gids, c->cred.gid))
		return true;
	const srv_peer *x = c->peer_ext;
	if (x)
		for (size_t i = 0; i < p->n_gids; i++)
			if (has_id(x->groups, x->n_groups, p->gids[i]))
				return true;
	if (!p->check)
		return false;
	pbrpc_peer peer = {
		.has_cred = true,
		.pid = c->cred.pid,
		.uid = c->cred.uid,
		.gid = c->cred.gid,
		.groups = x ? x->groups : NULL,
		.n_groups = x ? x->n_groups : 0,
		.pidfd = x ? x->pidfd : -1,
	};
	return p->check(p->check_user, &peer, m->name);
}

/* One line a second at most, with how many were refused since the last. */
static void log_denied(pbrpc_server *srv, const srv_conn *c, const pbrpc__method *m)
{
	int64_t now = srv->now;
	if (now < srv->denied_log_next) {
		srv->denied_quiet++;
		return;
	}
	char who[64], more[64] = "";
	if (c->has_cred)
		snprintf(who, sizeof(who), "uid %u (pid %d)", (unsigned)c->cred.uid, (int)c->cred.pid);
	else
		snprintf(who, sizeof(who), "%s", c->peer);
	if (srv->denied_quiet)
		snprintf(more, sizeof(more), " (%" PRIu64 " more refused since the last report)", srv->denied_quiet);
	pbrpc__srv_log(srv, PBRPC_LOG_WARN, "permission denied: %s may not call %s%s", who, m->name, more);
	srv->denied_quiet = 0;
	srv->denied_log_next = now + PBRPC__NS_PER_S;
}

/* m has a policy. NULL when it admits the connection's peer, else the
 * words for PERMISSION_DENIED (the refusal is counted and logged here). */
__attribute__((noinline)) const char *pbrpc__authz_refusal(srv_conn *c, const pbrpc__method *m, char *text,
							   size_t len)
{
	if (admits(c, m)) {
		if (!m->policy->p.check)
			c->admitted = m->policy; /* the same answer next time */
		return NULL;
	}
	pbrpc_server *srv = c->srv;
	SRV_STAT_ADD(srv, calls_denied, 1);
	log_denied(srv, c, m);
	if (c->has_cred)
		snprintf(text, len, "uid %u may not call %s", (unsigned)c->cred.uid, m->name);
	else
		snprintf(text, len, "%s may not be called over TCP", m->name);
	return text;
}
