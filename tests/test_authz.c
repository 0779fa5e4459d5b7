/* Who may call what (issue 11, item 1): policies per service and per method,
 * checked before a request is unpacked; TCP peers; the per-uid connection
 * cap; the pbrpc-server flags (--allow, --max-connections-per-uid,
 * --socket-group) with the real daemon and the real CLI.
 *
 * The real server runs in a thread of the test process; callers are forked
 * children that drop to nobody (uid 65534) with chosen groups and use the real
 * client. That needs root (CI runs the suite as root); as anyone else those
 * tests skip and say so. Children end with _exit() and report through their
 * exit status and a shared page. $PBRPC_SERVER and $PBRPC_CLI name the
 * programs (tests/meson.build). */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "demo_services.h"
#include "echo.pb-c.h"
#include "kv.pb-c.h"
#include "pbrpc/pbrpc.h"
#include "stats.pb-c.h"

#define NOBODY 65534
#define GID_ADM 4   /* Debian's base-passwd: fixed ids */
#define GID_SUDO 27

/* Child exit codes beyond the RPC statuses (0..16). */
#define X_CONNECT 100  /* connect failed otherwise */
#define X_GOAWAY 101   /* connect: PBRPC_EGOAWAY (refused with a reason) */
#define X_EACCES 102   /* connect: -EACCES (the socket file's mode) */
#define X_SETUP 120    /* could not drop privileges */
#define X_UNEXPECTED 121

/* ---- the server under test ---- */

static atomic_int echo_runs;

/* What the handler and the callback saw, for the assertions. */
static struct {
	pbrpc_peer peer;
	gid_t groups[8];
	char pidfd_pid[32]; /* the "Pid:" of the pidfd's fdinfo */
	char method[64];
	int rc;
} seen;

static void pidfd_pid(int pidfd, char *out, size_t len)
{
	char path[64], line[128];
	snprintf(out, len, "none");
	if (pidfd < 0)
		return;
	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", pidfd);
	FILE *f = fopen(path, "r");
	if (!f)
		return;
	while (fgets(line, sizeof(line), f))
		if (strncmp(line, "Pid:", 4) == 0) {
			snprintf(out, len, "%d", atoi(line + 4));
			break;
		}
	fclose(f);
}

static void record_peer(const pbrpc_peer *p)
{
	seen.peer = *p;
	size_t n = p->n_groups < 8 ? p->n_groups : 8;
	if (n)
		memcpy(seen.groups, p->groups, n * sizeof(gid_t));
	seen.peer.groups = seen.groups;
	pidfd_pid(p->pidfd, seen.pidfd_pid, sizeof(seen.pidfd_pid));
}

static void t_echo(Demo__Echo_Service *svc, const Demo__EchoRequest *req, Demo__EchoReply_Closure closure, void *data)
{
	(void)svc;
	atomic_fetch_add(&echo_runs, 1);
	pbrpc_peer p;
	seen.rc = pbrpc_call_peer(data, &p);
	if (seen.rc == 0)
		record_peer(&p);
	Demo__EchoReply r = DEMO__ECHO_REPLY__INIT;
	r.payload = req->payload;
	closure(&r, data);
}

static Demo__Echo_Service echo_svc = DEMO__ECHO__INIT(t_);

typedef struct tsrv {
	pbrpc_server *srv;
	Demo__Kv_Service *kv;
	pthread_t thr;
	char addr[PBRPC_ENDPOINT_STRLEN];
} tsrv;

static void *run(void *arg)
{
	pbrpc_server_run(((tsrv *)arg)->srv);
	return NULL;
}

/* A server hosting the counting demo.Echo and the example demo.Kv; its
 * policies are set by the test between srv_new and srv_start. */
static void srv_new(tsrv *t, const pbrpc_server_opts *o)
{
	memset(t, 0, sizeof(*t));
	atomic_store(&echo_runs, 0);
	memset(&seen, 0, sizeof(seen));
	t->kv = demo_kv_new();
	cr_assert_not_null(t->kv);
	pbrpc_server_opts lo = o ? *o : (pbrpc_server_opts){ 0 };
	if (!lo.loop_threads)
		lo.loop_threads = getenv("PBRPC_TEST_LOOP_THREADS") ? (unsigned)atoi(getenv("PBRPC_TEST_LOOP_THREADS")) : 0;
	cr_assert_eq(pbrpc_server_new(&t->srv, &lo), 0);
	cr_assert_eq(pbrpc_server_add_service(t->srv, &echo_svc.base), 0);
	cr_assert_eq(demo_kv_add(t->srv, t->kv), 0);
	cr_assert_eq(pbrpc_server_enable_stats(t->srv), 0);
}

static void srv_start(tsrv *t, const char *endpoint)
{
	int idx = pbrpc_server_listen(t->srv, endpoint);
	cr_assert_geq(idx, 0, "listen %s: %s", endpoint, pbrpc_strerror(idx));
	pbrpc_server_address(t->srv, idx, t->addr, sizeof(t->addr));
	cr_assert_eq(pthread_create(&t->thr, NULL, run, t), 0);
}

/* Stops the loop, then returns its counters (read on no other thread). */
static pbrpc_server_stats srv_stop(tsrv *t)
{
	pbrpc_server_shutdown(t->srv, 0);
	pthread_join(t->thr, NULL);
	pbrpc_server_stats st;
	pbrpc_server_get_stats(t->srv, &st);
	pbrpc_server_free(t->srv);
	demo_kv_free(t->kv);
	return st;
}

/* An abstract socket: no file whose mode could keep nobody out. */
static const char *abstract_endpoint(void)
{
	static char ep[64];
	static int n;
	snprintf(ep, sizeof(ep), "unix:@pbrpc-authz-%d-%d", (int)getpid(), n++);
	return ep;
}

/* ---- callers: forked children as another user ---- */

typedef struct who {
	uid_t uid;
	gid_t gid;
	gid_t groups[4];
	size_t n_groups;
} who;

static const who nobody = { NOBODY, NOBODY, { 0 }, 0 };

static void need_root(void)
{
	if (geteuid() != 0)
		cr_skip_test("needs root to setuid() to nobody (CI runs this suite as root)");
}

/* What a child reports besides its exit status: the last status message. */
static char *shared_msg;

static void shared_init(void)
{
	shared_msg = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	cr_assert_neq(shared_msg, MAP_FAILED);
	shared_msg[0] = '\0';
}

static void shared_fini(void)
{
	munmap(shared_msg, 4096);
}

TestSuite(authz, .init = shared_init, .fini = shared_fini, .timeout = 30);

/* Runs fn(arg) in a child with w's ids (groups first: setgroups needs root);
 * returns its exit status. */
static int as_user(const who *w, int (*fn)(void *), void *arg)
{
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		if (setgroups(w->n_groups, w->groups) < 0 || setgid(w->gid) < 0 || setuid(w->uid) < 0)
			_exit(X_SETUP);
		_exit(fn(arg));
	}
	int st;
	cr_assert_eq(waitpid(pid, &st, 0), pid);
	cr_assert(WIFEXITED(st), "child died of signal %d", WTERMSIG(st));
	return WEXITSTATUS(st);
}

static int connect_code(int rc)
{
	if (rc == PBRPC_EGOAWAY)
		return X_GOAWAY;
	if (rc == -EACCES)
		return X_EACCES;
	return X_CONNECT;
}

/* One call of `method` with a request packed from `body` (raw bytes: the
 * server's refusal must not depend on them). */
static int call_raw(const char *endpoint, const char *method, const void *body, size_t len)
{
	pbrpc_client *c;
	int rc = pbrpc_client_connect(&c, endpoint, NULL);
	if (rc < 0)
		return connect_code(rc);
	uint8_t *reply = NULL;
	size_t rlen = 0;
	pbrpc_call_result res;
	pbrpc_client_call_raw(c, method, body, len, &reply, &rlen, NULL, &res);
	snprintf(shared_msg, 4096, "%s", res.message);
	free(reply);
	pbrpc_client_free(c);
	return res.status;
}

typedef struct call_args {
	const char *endpoint;
	const char *method;
	const void *body;
	size_t len;
} call_args;

static int child_call(void *arg)
{
	const call_args *a = arg;
	return call_raw(a->endpoint, a->method, a->body, a->len);
}

/* demo.Echo/Echo with payload "hi" (0a 02 68 69). */
static const uint8_t echo_body[] = { 0x0a, 0x02, 'h', 'i' };
/* demo.Kv/Put key "k" value "v"; demo.Kv/Get key "k". */
static const uint8_t put_body[] = { 0x0a, 0x01, 'k', 0x12, 0x01, 'v' };
static const uint8_t get_body[] = { 0x0a, 0x01, 'k' };
/* Not a valid encoding of any message: a length past the end. */
static const uint8_t bad_body[] = { 0x0a, 0x7f, 'x' };

static int call_as(const who *w, const char *endpoint, const char *method, const void *body, size_t len)
{
	call_args a = { endpoint, method, body, len };
	shared_msg[0] = '\0';
	return as_user(w, child_call, &a);
}

/* ---- policies ---- */

Test(authz, foreign_uid_refused_before_unpack)
{
	need_root();
	tsrv t;
	srv_new(&t, NULL);
	uid_t root = 0;
	pbrpc_policy p = { .uids = &root, .n_uids = 1 };
	cr_assert_eq(pbrpc_server_set_policy(t.srv, "demo.Echo/Echo", &p), 0);
	srv_start(&t, abstract_endpoint());

	int st = call_as(&nobody, t.addr, "demo.Echo/Echo", echo_body, sizeof(echo_body));
	cr_assert_eq(st, PBRPC_STATUS_PERMISSION_DENIED, "status %d: %s", st, shared_msg);
	cr_assert_str_eq(shared_msg, "uid 65534 may not call demo.Echo/Echo");
	/* A body that cannot be unpacked is refused the same way: it is never read. */
	st = call_as(&nobody, t.addr, "demo.Echo/Echo", bad_body, sizeof(bad_body));
	cr_assert_eq(st, PBRPC_STATUS_PERMISSION_DENIED, "status %d: %s", st, shared_msg);
	cr_assert_eq(atomic_load(&echo_runs), 0, "the handler ran for a refused call");
	/* Other methods have no policy. */
	st = call_as(&nobody, t.addr, "demo.Kv/Put", put_body, sizeof(put_body));
	cr_assert_eq(st, PBRPC_STATUS_OK, "status %d: %s", st, shared_msg);

	/* Root is admitted, on the same server, and the handler sees its peer. */
	cr_assert_eq(call_raw(t.addr, "demo.Echo/Echo", echo_body, sizeof(echo_body)), PBRPC_STATUS_OK);
	cr_assert_eq(atomic_load(&echo_runs), 1);
	cr_assert_eq(seen.rc, 0);
	cr_assert(seen.peer.has_cred);
	cr_assert_eq(seen.peer.uid, 0);
	cr_assert_eq(seen.peer.pid, getpid());
	cr_assert_eq(seen.peer.pidfd, -1, "no policy has a callback: no pidfd is taken");
	/* And a root call with the bad body gets to unpacking: INVALID_ARGUMENT. */
	cr_assert_eq(call_raw(t.addr, "demo.Echo/Echo", bad_body, sizeof(bad_body)), PBRPC_STATUS_INVALID_ARGUMENT);

	pbrpc_server_stats s = srv_stop(&t);
	cr_assert_eq(s.calls_denied, 2);
}

Test(authz, denied_calls_counted_in_stats_service)
{
	need_root();
	tsrv t;
	srv_new(&t, NULL);
	pbrpc_policy p = { 0 }; /* admits nobody at all */
	cr_assert_eq(pbrpc_server_set_policy(t.srv, "demo.Kv", &p), 0);
	srv_start(&t, abstract_endpoint());
	for (int i = 0; i < 3; i++)
		cr_assert_eq(call_as(&nobody, t.addr, "demo.Kv/Get", get_body, sizeof(get_body)),
			     PBRPC_STATUS_PERMISSION_DENIED);
	cr_assert_eq(call_raw(t.addr, "demo.Kv/Put", put_body, sizeof(put_body)), PBRPC_STATUS_PERMISSION_DENIED,
		     "an empty policy refuses root too");

	/* pbrpc.Stats counts them under their method, status 7. */
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, t.addr, NULL), 0);
	Pbrpc__StatsRequest req = PBRPC__STATS_REQUEST__INIT;
	ProtobufCMessage *reply = NULL;
	pbrpc_call_result res;
	cr_assert_eq(pbrpc_client_call(c, "pbrpc.Stats/Get", &req.base, &pbrpc__stats_reply__descriptor, &reply, NULL,
				       &res),
		     0, "%s", res.message);
	const Pbrpc__StatsReply *sr = (const Pbrpc__StatsReply *)reply;
	uint64_t get_denied = 0, put_denied = 0;
	for (size_t i = 0; i < sr->n_methods; i++)
		for (size_t j = 0; j < sr->methods[i]->n_calls; j++)
			if (sr->methods[i]->calls[j]->status == PBRPC_STATUS_PERMISSION_DENIED) {
				if (strcmp(sr->methods[i]->method, "demo.Kv/Get") == 0)
					get_denied = sr->methods[i]->calls[j]->count;
				if (strcmp(sr->methods[i]->method, "demo.Kv/Put") == 0)
					put_denied = sr->methods[i]->calls[j]->count;
			}
	cr_assert_eq(get_denied, 3);
	cr_assert_eq(put_denied, 1);
	protobuf_c_message_free_unpacked(reply, NULL);
	pbrpc_client_free(c);
	cr_assert_eq(srv_stop(&t).calls_denied, 4);
}

/* On one connection: Echo (admitted), Put (refused by another policy),
 * twice each: an admission is remembered per policy, never across them. */
static int child_alternate(void *arg)
{
	pbrpc_client *c;
	if (pbrpc_client_connect(&c, arg, NULL) < 0)
		return X_CONNECT;
	int rc = 0;
	for (int i = 0; i < 4 && !rc; i++) {
		bool echo = i % 2 == 0;
		uint8_t *reply = NULL;
		size_t rlen;
		pbrpc_call_result res;
		pbrpc_client_call_raw(c, echo ? "demo.Echo/Echo" : "demo.Kv/Put", echo ? echo_body : put_body,
				      echo ? sizeof(echo_body) : sizeof(put_body), &reply, &rlen, NULL, &res);
		free(reply);
		if (res.status != (echo ? PBRPC_STATUS_OK : PBRPC_STATUS_PERMISSION_DENIED))
			rc = X_UNEXPECTED + i + 1;
	}
	pbrpc_client_free(c);
	return rc;
}

Test(authz, group_policy_admits_primary_and_supplementary_groups)
{
	need_root();
	tsrv t;
	srv_new(&t, NULL);
	gid_t adm = GID_ADM;
	pbrpc_policy p = { .gids = &adm, .n_gids = 1 };
	cr_assert_eq(pbrpc_server_set_policy(t.srv, "demo.Echo", &p), 0);
	srv_start(&t, abstract_endpoint());

	who in_adm = { NOBODY, NOBODY, { 100, GID_ADM }, 2 };
	int st = call_as(&in_adm, t.addr, "demo.Echo/Echo", echo_body, sizeof(echo_body));
	cr_assert_eq(st, PBRPC_STATUS_OK, "supplementary adm: status %d: %s", st, shared_msg);
	cr_assert_eq(seen.peer.uid, NOBODY);
	cr_assert_eq(seen.peer.n_groups, 2);
	cr_assert(seen.groups[0] == GID_ADM || seen.groups[1] == GID_ADM);

	who primary_adm = { NOBODY, GID_ADM, { 0 }, 0 };
	st = call_as(&primary_adm, t.addr, "demo.Echo/Echo", echo_body, sizeof(echo_body));
	cr_assert_eq(st, PBRPC_STATUS_OK, "primary adm: status %d: %s", st, shared_msg);

	who other = { NOBODY, NOBODY, { GID_SUDO }, 1 };
	st = call_as(&other, t.addr, "demo.Echo/Echo", echo_body, sizeof(echo_body));
	cr_assert_eq(st, PBRPC_STATUS_PERMISSION_DENIED, "status %d: %s", st, shared_msg);
	cr_assert_eq(atomic_load(&echo_runs), 2);
	srv_stop(&t);

	srv_new(&t, NULL);
	uid_t root = 0;
	pbrpc_policy put = { .uids = &root, .n_uids = 1 };
	cr_assert_eq(pbrpc_server_set_policy(t.srv, "demo.Echo", &p), 0);
	cr_assert_eq(pbrpc_server_set_policy(t.srv, "demo.Kv/Put", &put), 0);
	srv_start(&t, abstract_endpoint());
	cr_assert_eq(as_user(&in_adm, child_alternate, t.addr), 0);
	cr_assert_eq(atomic_load(&echo_runs), 2);
	cr_assert_eq(srv_stop(&t).calls_denied, 2);
}

/* Admits demo.Kv/Get for everyone, nothing else; records what it saw. */
static atomic_int checks;

static bool only_get(void *user, const pbrpc_peer *peer, const char *method)
{
	atomic_fetch_add((atomic_int *)user, 1);
	record_peer(peer);
	snprintf(seen.method, sizeof(seen.method), "%s", method);
	return strcmp(method, "demo.Kv/Get") == 0;
}

static int child_get_and_put(void *arg)
{
	const char *ep = arg;
	/* NOT_FOUND: admitted, and the handler ran. */
	int get = call_raw(ep, "demo.Kv/Get", get_body, sizeof(get_body));
	int put = call_raw(ep, "demo.Kv/Put", put_body, sizeof(put_body));
	return get == PBRPC_STATUS_NOT_FOUND && put == PBRPC_STATUS_PERMISSION_DENIED ? 0 : X_UNEXPECTED;
}

Test(authz, callback_policy_sees_pid_uid_gid_pidfd_and_method)
{
	need_root();
	tsrv t;
	srv_new(&t, NULL);
	atomic_store(&checks, 0);
	pbrpc_policy p = { .check = only_get, .check_user = &checks };
	cr_assert_eq(pbrpc_server_set_policy(t.srv, "demo.Kv", &p), 0);
	srv_start(&t, abstract_endpoint());

	who w = { NOBODY, GID_SUDO, { GID_ADM }, 1 };
	cr_assert_eq(as_user(&w, child_get_and_put, t.addr), 0, "Get admitted, Put refused");
	cr_assert_eq(atomic_load(&checks), 2);
	cr_assert_str_eq(seen.method, "demo.Kv/Put");
	cr_assert(seen.peer.has_cred);
	cr_assert_eq(seen.peer.uid, NOBODY);
	cr_assert_eq(seen.peer.gid, GID_SUDO);
	cr_assert_eq(seen.peer.n_groups, 1);
	cr_assert_eq(seen.groups[0], GID_ADM);
	cr_assert_neq(seen.peer.pid, 0);
	/* SO_PEERPIDFD (Linux 6.5): a pidfd of the child; older kernels: none. */
	if (seen.peer.pidfd >= 0) {
		char want[32];
		snprintf(want, sizeof(want), "%d", (int)seen.peer.pid);
		cr_assert_str_eq(seen.pidfd_pid, want, "the pidfd names pid %s, the peer is %s", seen.pidfd_pid, want);
	} else {
		cr_log_info("this kernel gives no SO_PEERPIDFD: the callback saw pidfd -1");
	}
	/* Root is refused Put by the same callback: nobody is special. */
	cr_assert_eq(call_raw(t.addr, "demo.Kv/Put", put_body, sizeof(put_body)), PBRPC_STATUS_PERMISSION_DENIED);
	cr_assert_eq(srv_stop(&t).calls_denied, 2);
}

Test(authz, method_policy_overrides_service_policy)
{
	need_root();
	tsrv t;
	srv_new(&t, NULL);
	uid_t u = NOBODY;
	pbrpc_policy svc = { .any_local = true };
	pbrpc_policy put = { .uids = &u, .n_uids = 1 };
	pbrpc_policy none = { 0 };
	cr_assert_eq(pbrpc_server_set_policy(t.srv, "demo.Kv", &none), 0);
	cr_assert_eq(pbrpc_server_set_policy(t.srv, "demo.Kv/Put", &put), 0);
	cr_assert_eq(pbrpc_server_set_policy(t.srv, "demo.Kv", &svc), 0); /* replaces the service's, keeps Put's */
	cr_assert_eq(pbrpc_server_set_policy(t.srv, "demo.Kv/Delete", &none), 0);
	cr_assert_eq(pbrpc_server_set_policy(t.srv, "demo.Kv/Delete", NULL), 0); /* back to the service's */
	srv_start(&t, abstract_endpoint());
	cr_assert_eq(call_raw(t.addr, "demo.Kv/Put", put_body, sizeof(put_body)), PBRPC_STATUS_PERMISSION_DENIED);
	cr_assert_eq(call_as(&nobody, t.addr, "demo.Kv/Put", put_body, sizeof(put_body)), PBRPC_STATUS_OK);
	cr_assert_eq(call_raw(t.addr, "demo.Kv/Get", get_body, sizeof(get_body)), PBRPC_STATUS_OK);
	cr_assert_eq(call_raw(t.addr, "demo.Kv/Delete", get_body, sizeof(get_body)), PBRPC_STATUS_OK);
	srv_stop(&t);
}

/* Needs no root. */
Test(authz, set_policy_names_and_removal)
{
	tsrv t;
	srv_new(&t, NULL);
	pbrpc_policy p = { .any_local = true };
	cr_assert_eq(pbrpc_server_set_policy(t.srv, "demo.Nope", &p), PBRPC_EINVALID);
	cr_assert_eq(pbrpc_server_set_policy(t.srv, "demo.Kv/Nope", &p), PBRPC_EINVALID);
	cr_assert_eq(pbrpc_server_set_policy(t.srv, "demo.Kv/", &p), PBRPC_EINVALID);
	cr_assert_eq(pbrpc_server_set_policy(t.srv, "", &p), PBRPC_EINVALID);
	cr_assert_eq(pbrpc_server_set_policy(t.srv, NULL, &p), PBRPC_EINVALID);
	pbrpc_policy none = { 0 };
	cr_assert_eq(pbrpc_server_set_policy(t.srv, "demo.Echo", &none), 0);
	cr_assert_eq(pbrpc_server_set_policy(t.srv, "demo.Echo", NULL), 0);
	srv_start(&t, abstract_endpoint());
	cr_assert_eq(call_raw(t.addr, "demo.Echo/Echo", echo_body, sizeof(echo_body)), PBRPC_STATUS_OK);
	cr_assert_eq(srv_stop(&t).calls_denied, 0);
}

/* ---- TCP peers have no credentials: the policy says whether they may call ---- */

static void tcp_case(bool allow_tcp)
{
	tsrv t;
	srv_new(&t, NULL);
	pbrpc_policy p = { .any_local = true, .allow_tcp = allow_tcp };
	cr_assert_eq(pbrpc_server_set_policy(t.srv, "demo.Echo/Echo", &p), 0);
	srv_start(&t, "tcp:127.0.0.1:0");
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, t.addr, NULL), 0);
	uint8_t *reply = NULL;
	size_t rlen;
	pbrpc_call_result res;
	pbrpc_client_call_raw(c, "demo.Echo/Echo", echo_body, sizeof(echo_body), &reply, &rlen, NULL, &res);
	free(reply);
	if (allow_tcp) {
		cr_assert_eq(res.status, PBRPC_STATUS_OK, "%s", res.message);
		cr_assert_eq(atomic_load(&echo_runs), 1);
		cr_assert_eq(seen.rc, 0);
		cr_assert_not(seen.peer.has_cred);
		cr_assert_eq(seen.peer.pidfd, -1);
	} else {
		cr_assert_eq(res.status, PBRPC_STATUS_PERMISSION_DENIED);
		cr_assert_str_eq(res.message, "demo.Echo/Echo may not be called over TCP");
		cr_assert_eq(atomic_load(&echo_runs), 0);
	}
	/* Methods without a policy stay open to TCP peers. */
	pbrpc_client_call_raw(c, "demo.Kv/Put", put_body, sizeof(put_body), &reply, &rlen, NULL, &res);
	free(reply);
	cr_assert_eq(res.status, PBRPC_STATUS_OK, "%s", res.message);
	pbrpc_client_free(c);
	cr_assert_eq(srv_stop(&t).calls_denied, allow_tcp ? 0 : 1);
}

Test(authz, tcp_peers_refused_without_allow_tcp)
{
	tcp_case(false);
}

Test(authz, tcp_peers_admitted_with_allow_tcp)
{
	tcp_case(true);
}

/* ---- connections per uid ---- */

typedef struct cap_args {
	const char *endpoint;
	int cap;
	int ready[2], go[2]; /* child -> parent: holding; parent -> child: done */
} cap_args;

/* Opens `cap` connections that work, then one more that must be refused,
 * holds them while the parent checks another uid, then closes them. */
static int child_cap(void *arg)
{
	cap_args *a = arg;
	pbrpc_client *c[8] = { 0 };
	int rc = 0;
	for (int i = 0; i < a->cap; i++) {
		if (pbrpc_client_connect(&c[i], a->endpoint, NULL) < 0) {
			rc = X_CONNECT;
			goto out;
		}
		uint8_t *reply = NULL;
		size_t rlen;
		pbrpc_call_result res;
		pbrpc_client_call_raw(c[i], "demo.Echo/Echo", echo_body, sizeof(echo_body), &reply, &rlen, NULL, &res);
		free(reply);
		if (res.status != 0) {
			rc = X_UNEXPECTED;
			goto out;
		}
	}
	pbrpc_client *extra = NULL;
	int erc = pbrpc_client_connect(&extra, a->endpoint, NULL);
	pbrpc_client_free(extra);
	if (erc != PBRPC_EGOAWAY) {
		rc = erc == 0 ? X_UNEXPECTED : connect_code(erc);
		goto out;
	}
out:;
	char b = rc ? 'x' : 'r';
	(void)!write(a->ready[1], &b, 1);
	(void)!read(a->go[0], &b, 1);
	for (int i = 0; i < a->cap; i++)
		pbrpc_client_free(c[i]);
	return rc;
}

static void *cap_child_thread(void *arg)
{
	cap_args *a = arg;
	who w = nobody;
	intptr_t st = as_user(&w, child_cap, a);
	return (void *)st;
}

/* A nobody caller that retries while the server takes the previous child's
 * connections down (they close at that child's exit, the server notices in
 * its next round). */
static int child_retry_echo(void *arg)
{
	int st = X_CONNECT;
	for (int i = 0; i < 100; i++) {
		st = call_raw(arg, "demo.Echo/Echo", echo_body, sizeof(echo_body));
		if (st != X_GOAWAY)
			break;
		usleep(20000);
	}
	return st;
}

Test(authz, per_uid_connection_cap)
{
	need_root();
	tsrv t;
	pbrpc_server_opts o = { .max_connections_per_uid = 2 };
	srv_new(&t, &o);
	srv_start(&t, abstract_endpoint());
	cap_args a = { .endpoint = t.addr, .cap = 2 };
	cr_assert_eq(pipe2(a.ready, O_CLOEXEC), 0);
	cr_assert_eq(pipe2(a.go, O_CLOEXEC), 0);
	pthread_t thr;
	cr_assert_eq(pthread_create(&thr, NULL, cap_child_thread, &a), 0);
	char b = 0;
	cr_assert_eq(read(a.ready[0], &b, 1), 1);
	/* nobody holds its 2 and was refused a third: root still gets in, twice. */
	pbrpc_client *r1, *r2;
	cr_assert_eq(pbrpc_client_connect(&r1, t.addr, NULL), 0);
	cr_assert_eq(pbrpc_client_connect(&r2, t.addr, NULL), 0);
	cr_assert_eq(write(a.go[1], "g", 1), 1);
	void *st;
	pthread_join(thr, &st);
	cr_assert_eq(b, 'r', "child: %d", (int)(intptr_t)st);
	cr_assert_eq((intptr_t)st, 0);
	/* Once nobody's connections are gone, nobody may connect again. */
	who w = nobody;
	cr_assert_eq(as_user(&w, child_retry_echo, t.addr), PBRPC_STATUS_OK);
	pbrpc_client_free(r1);
	pbrpc_client_free(r2);
	close(a.ready[0]), close(a.ready[1]), close(a.go[0]), close(a.go[1]);
	pbrpc_server_stats s = srv_stop(&t);
	cr_assert_geq(s.connections_refused, 1);
}

/* ---- the daemon: --allow, --max-connections-per-uid, --socket-group ---- */

static char tmpdir[64];

static void shared_dir(void)
{
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/pbrpc-authz-XXXXXX");
	cr_assert_not_null(mkdtemp(tmpdir));
	cr_assert_eq(chmod(tmpdir, 0755), 0); /* nobody must reach the socket */
}

static void remove_dir(void)
{
	if (!tmpdir[0])
		return;
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
	if (system(cmd) != 0)
		cr_log_warn("could not remove %s", tmpdir);
}

typedef struct tdaemon {
	pid_t pid;
	char endpoint[256];
	char errlog[128];
} daemon_t;

static const char *env_path(const char *name)
{
	const char *p = getenv(name);
	cr_assert_not_null(p, "%s is not set (run through meson test)", name);
	return p;
}

/* Starts pbrpc-server with args (NULL-terminated), stderr to a file, and
 * waits for its "listening on" line. */
static void daemon_start(daemon_t *d, const char *const *args)
{
	int out[2];
	cr_assert_eq(pipe2(out, O_CLOEXEC), 0);
	snprintf(d->errlog, sizeof(d->errlog), "%s/stderr", tmpdir);
	const char *argv[24] = { env_path("PBRPC_SERVER") };
	size_t n = 1;
	for (; args[n - 1]; n++)
		argv[n] = args[n - 1];
	argv[n] = NULL;
	d->pid = fork();
	cr_assert_geq(d->pid, 0);
	if (d->pid == 0) {
		int err = open(d->errlog, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
		if (err < 0 || dup2(out[1], 1) < 0 || dup2(err, 2) < 0)
			_exit(127);
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	close(out[1]);
	char line[256];
	size_t got = 0;
	while (got < sizeof(line) - 1) {
		ssize_t r = read(out[0], line + got, 1);
		if (r <= 0 || line[got] == '\n')
			break;
		got++;
	}
	line[got] = '\0';
	close(out[0]);
	cr_assert(strncmp(line, "listening on ", 13) == 0, "pbrpc-server said '%s'", line);
	snprintf(d->endpoint, sizeof(d->endpoint), "%s", line + 13);
}

static int daemon_stop(daemon_t *d)
{
	kill(d->pid, SIGTERM);
	int st;
	cr_assert_eq(waitpid(d->pid, &st, 0), d->pid);
	return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static bool file_has(const char *path, const char *needle)
{
	char buf[8192];
	FILE *f = fopen(path, "r");
	if (!f)
		return false;
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	return strstr(buf, needle) != NULL;
}

/* The pbrpc CLI: `pbrpc call ENDPOINT demo.Kv/Put JSON`; its exit status
 * (64 + status for a failed call, pbrpc(1)). */
static int child_cli_put(void *arg)
{
	const char *ep = arg;
	int null = open("/dev/null", O_WRONLY);
	if (null >= 0)
		dup2(null, 1), dup2(null, 2);
	const char *cli = getenv("PBRPC_CLI");
	execl(cli, cli, "call", ep, "demo.Kv/Put", "{\"key\":\"k\",\"value\":\"dg==\"}", (char *)NULL);
	return 127;
}

static int child_two_connections(void *arg)
{
	pbrpc_client *a, *b = NULL;
	if (pbrpc_client_connect(&a, arg, NULL) < 0)
		return X_CONNECT;
	int rc = pbrpc_client_connect(&b, arg, NULL);
	pbrpc_client_free(b);
	pbrpc_client_free(a);
	return rc == PBRPC_EGOAWAY ? 0 : rc == 0 ? X_UNEXPECTED : connect_code(rc);
}

Test(authz, daemon_allow_socket_group_and_uid_cap, .fini = remove_dir)
{
	need_root();
	env_path("PBRPC_SERVER");
	env_path("PBRPC_CLI");
	shared_dir();
	char lep[128];
	snprintf(lep, sizeof(lep), "unix:%s/d.sock", tmpdir);
	const char *args[] = { "--listen", lep, "--socket-group", "adm", "--allow", "demo.Kv/Put=uid:root",
			       "--allow", "demo.Kv/Put=group:sudo", "--max-connections-per-uid", "1", "-L", "warn",
			       NULL };
	daemon_t d;
	daemon_start(&d, args);

	struct stat st;
	cr_assert_eq(stat(lep + 5, &st), 0);
	cr_assert_eq(st.st_gid, GID_ADM, "socket group %u", (unsigned)st.st_gid);
	cr_assert_eq(st.st_mode & 0777, 0660, "socket mode %o", (unsigned)(st.st_mode & 0777));

	/* Not in adm: the socket file keeps nobody out. */
	cr_assert_eq(call_as(&nobody, d.endpoint, "demo.Echo/Echo", echo_body, sizeof(echo_body)), X_EACCES);
	/* In adm: connects; Echo is open, Put is not. */
	who adm = { NOBODY, NOBODY, { GID_ADM }, 1 };
	int s = call_as(&adm, d.endpoint, "demo.Echo/Echo", echo_body, sizeof(echo_body));
	cr_assert_eq(s, PBRPC_STATUS_OK, "status %d: %s", s, shared_msg);
	s = call_as(&adm, d.endpoint, "demo.Kv/Put", put_body, sizeof(put_body));
	cr_assert_eq(s, PBRPC_STATUS_PERMISSION_DENIED, "status %d: %s", s, shared_msg);
	cr_assert_str_eq(shared_msg, "uid 65534 may not call demo.Kv/Put");
	/* The same through the CLI: exit status 64 + 7. */
	cr_assert_eq(as_user(&adm, child_cli_put, d.endpoint), 64 + PBRPC_STATUS_PERMISSION_DENIED);
	/* adm and sudo: admitted by the second --allow. */
	who adm_sudo = { NOBODY, NOBODY, { GID_ADM, GID_SUDO }, 2 };
	s = call_as(&adm_sudo, d.endpoint, "demo.Kv/Put", put_body, sizeof(put_body));
	cr_assert_eq(s, PBRPC_STATUS_OK, "status %d: %s", s, shared_msg);
	/* Root by name. */
	cr_assert_eq(call_raw(d.endpoint, "demo.Kv/Put", put_body, sizeof(put_body)), PBRPC_STATUS_OK);
	/* One connection per uid. */
	cr_assert_eq(as_user(&adm, child_two_connections, d.endpoint), 0);

	cr_assert_eq(daemon_stop(&d), 0);
	cr_assert(file_has(d.errlog, "permission denied: uid 65534"), "no log line in %s", d.errlog);
	cr_assert(file_has(d.errlog, "too many connections for uid 65534 (limit 1)"));
}

/* Needs no root: bad flags are refused before anything listens. */
static int daemon_exit(const char *const *args, const char *needle)
{
	const char *argv[16] = { env_path("PBRPC_SERVER") };
	size_t n = 1;
	for (; args[n - 1]; n++)
		argv[n] = args[n - 1];
	argv[n] = NULL;
	char errlog[128];
	snprintf(errlog, sizeof(errlog), "%s/bad", tmpdir);
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		int err = open(errlog, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
		if (err < 0 || dup2(err, 2) < 0)
			_exit(127);
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	int st;
	cr_assert_eq(waitpid(pid, &st, 0), pid);
	cr_assert(file_has(errlog, needle), "stderr lacks '%s'", needle);
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

Test(authz, daemon_rejects_bad_allow_flags, .fini = remove_dir)
{
	shared_dir();
	char lep[128];
	snprintf(lep, sizeof(lep), "unix:%s/x.sock", tmpdir);
	const char *a1[] = { "-l", lep, "--allow", "demo.Kv/Put=uid:no-such-user-x", NULL };
	cr_assert_eq(daemon_exit(a1, "no user named 'no-such-user-x'"), 2);
	const char *a2[] = { "-l", lep, "--allow", "demo.Kv/Put=group:no-such-group-x", NULL };
	cr_assert_eq(daemon_exit(a2, "no group named 'no-such-group-x'"), 2);
	const char *a3[] = { "-l", lep, "--allow", "demo.Kv/Put=everyone", NULL };
	cr_assert_eq(daemon_exit(a3, "'everyone' is not uid:USER"), 2);
	const char *a4[] = { "-l", lep, "--allow", "demo.Nope=uid:0", NULL };
	cr_assert_eq(daemon_exit(a4, "no service or method 'demo.Nope'"), 2);
	const char *a5[] = { "-l", lep, "--allow", "demo.Kv", NULL };
	cr_assert_eq(daemon_exit(a5, "expected NAME=WHO"), 2);
	const char *a6[] = { "-l", lep, "--socket-group", "no-such-group-x", NULL };
	cr_assert_eq(daemon_exit(a6, "no group named"), 2);
	const char *a7[] = { "-l", lep, "--max-connections-per-uid", "0", NULL };
	cr_assert_eq(daemon_exit(a7, "must be at least 1"), 2);
}

/* Needs no root: TCP peers and the daemon's "local" and "tcp" words. */
Test(authz, daemon_tcp_peers_follow_allow, .fini = remove_dir)
{
	shared_dir();
	const char *args[] = { "--listen", "tcp:127.0.0.1:0", "--allow", "demo.Echo=local", "--allow",
			       "demo.Kv/Get=local,tcp", "-L", "warn", NULL };
	daemon_t d;
	daemon_start(&d, args);
	cr_assert_eq(call_raw(d.endpoint, "demo.Echo/Echo", echo_body, sizeof(echo_body)),
		     PBRPC_STATUS_PERMISSION_DENIED);
	cr_assert_str_eq(shared_msg, "demo.Echo/Echo may not be called over TCP");
	cr_assert_eq(call_raw(d.endpoint, "demo.Kv/Get", get_body, sizeof(get_body)), PBRPC_STATUS_NOT_FOUND);
	cr_assert_eq(call_raw(d.endpoint, "demo.Kv/Put", put_body, sizeof(put_body)), PBRPC_STATUS_OK);
	cr_assert_eq(daemon_stop(&d), 0);
	cr_assert(file_has(d.errlog, "permission denied: tcp:127.0.0.1:"), "no log line in %s", d.errlog);
}
