/* TLS end to end: the real server and the real client over tls: endpoints,
 * with certificates made at test time (certs.h). Mutual TLS and what the
 * handler sees of its peer, every misconfiguration's words on both sides,
 * plaintext and TLS peers on the wrong ports, many calls in flight, a
 * 16 MiB message, deadlines, cancel and drain over TLS. The suite runs
 * again through the short-I/O shim, which cuts the TLS records too. */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "certs.h"
#include "demo_services.h"
#include "pbrpc/pbrpc.h"
#include "proto/wire.h"
#include "server/server_impl.h" /* pbrpc__server_loop_conns */
#include "testutil.h"

static char dir[64];
static char path_buf[16][160];
static int path_n;

static const char *cert(const char *name)
{
	char *p = path_buf[path_n++ % 16];
	snprintf(p, 160, "%s/%s", dir, name);
	return p;
}

static void setup(void)
{
	tu_setup();
	snprintf(dir, sizeof(dir), "/tmp/pbrpc-tls-XXXXXX");
	cr_assert_not_null(mkdtemp(dir));
	tu_certs_make(dir);
}

static void teardown(void)
{
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	if (dir[0] && system(cmd) != 0)
		fprintf(stderr, "could not remove %s\n", dir);
}

TestSuite(tls, .init = setup, .fini = teardown, .timeout = 60);

/* ---- a server on its own thread, with a log we can read ---- */

typedef struct tserver {
	pbrpc_server *srv;
	Demo__Echo_Service *inner; /* demo.Echo: delays, failures */
	Demo__Echo_Service svc;    /* ours: "whoami" answers the TLS peer */
	pthread_t thr;
	char addr[PBRPC_ENDPOINT_STRLEN];
	int rc;
	pthread_mutex_t mu;
	char log[8192];
} tserver;

static tserver *the_server;

static void log_cb(void *user, pbrpc_log_level lvl, const char *msg)
{
	(void)lvl;
	tserver *s = user;
	pthread_mutex_lock(&s->mu);
	size_t n = strlen(s->log);
	snprintf(s->log + n, sizeof(s->log) - n, "%s\n", msg);
	pthread_mutex_unlock(&s->mu);
}

static bool log_has(tserver *s, const char *what)
{
	for (int i = 0; i < 200; i++) {
		pthread_mutex_lock(&s->mu);
		bool has = strstr(s->log, what) != NULL;
		pthread_mutex_unlock(&s->mu);
		if (has)
			return true;
		usleep(10000);
	}
	return false;
}

static void my_echo(Demo__Echo_Service *svc, const Demo__EchoRequest *req, Demo__EchoReply_Closure closure,
		    void *cd)
{
	tserver *s = the_server;
	(void)svc;
	if (req->payload.len == 6 && memcmp(req->payload.data, "whoami", 6) == 0) {
		const pbrpc_tls_peer *p = NULL;
		char text[1024];
		int rc = pbrpc_call_peer_tls(cd, &p);
		if (rc < 0) {
			snprintf(text, sizeof(text), "error %d", rc);
		} else {
			int n = snprintf(text, sizeof(text), "%s|%s|%s|", p->subject ? p->subject : "(none)", p->version,
					 p->cipher);
			for (size_t i = 0; i < p->n_sans && n < (int)sizeof(text); i++)
				n += snprintf(text + n, sizeof(text) - (size_t)n, "%s;", p->sans[i]);
		}
		Demo__EchoReply r = DEMO__ECHO_REPLY__INIT;
		r.payload.data = (uint8_t *)text;
		r.payload.len = strlen(text);
		closure(&r, cd);
		return;
	}
	s->inner->echo(s->inner, req, closure, cd);
}

static void *run_server(void *arg)
{
	tserver *s = arg;
	s->rc = pbrpc_server_run(s->srv);
	return NULL;
}

/* opts may carry tls; the log is always ours. Returns the new server's
 * pbrpc_server_new code when `fail_ok`. */
static int server_try(tserver *s, const char *endpoint, pbrpc_server_opts *o)
{
	memset(s, 0, sizeof(*s));
	pthread_mutex_init(&s->mu, NULL);
	the_server = s;
	o->log = log_cb;
	o->log_user = s;
	o->log_level = PBRPC_LOG_DEBUG;
	if (!o->loop_threads)
		o->loop_threads = tu_loop_threads(); /* tls-loops: sibling loops share one SSL_CTX */
	int rc = pbrpc_server_new(&s->srv, o);
	if (rc < 0)
		return rc;
	s->inner = demo_echo_new();
	s->svc = (Demo__Echo_Service)DEMO__ECHO__INIT(my_);
	cr_assert_eq(pbrpc_server_add_service(s->srv, &s->svc.base), 0);
	int idx = pbrpc_server_listen(s->srv, endpoint);
	cr_assert_geq(idx, 0, "listen %s: %s\n%s", endpoint, pbrpc_strerror(idx), s->log);
	pbrpc_server_address(s->srv, idx, s->addr, sizeof(s->addr));
	cr_assert_eq(pthread_create(&s->thr, NULL, run_server, s), 0);
	return 0;
}

static void server_start(tserver *s, const char *endpoint, pbrpc_server_opts *o)
{
	int rc = server_try(s, endpoint, o);
	cr_assert_eq(rc, 0, "server_new: %s\n%s", pbrpc_strerror(rc), s->log);
}

static pbrpc_server_opts server_tls(const char *ca)
{
	return (pbrpc_server_opts){ .tls = { .cert = cert("server.pem"), .key = cert("server.key"), .ca = ca } };
}

static void server_stop(tserver *s, int drain_ms)
{
	pbrpc_server_shutdown(s->srv, drain_ms);
	pthread_join(s->thr, NULL);
	cr_assert_eq(s->rc, 0);
	demo_echo_free(s->inner);
	pbrpc_server_free(s->srv);
	pthread_mutex_destroy(&s->mu);
}

/* "tls:127.0.0.1:PORT" -> the same port under another host or scheme. */
static const char *with_host(const tserver *s, const char *scheme_host)
{
	static char buf[160];
	const char *port = strrchr(s->addr, ':');
	snprintf(buf, sizeof(buf), "%s%s", scheme_host, port);
	return buf;
}

/* ---- calls ---- */

typedef struct result {
	int status;
	char msg[512];
	char text[1024];
	size_t len;
} result;

static void on_echo(const Demo__EchoReply *r, void *data)
{
	result *res = data;
	const char *m = NULL;
	res->status = pbrpc_client_status(&m);
	snprintf(res->msg, sizeof(res->msg), "%s", m ? m : "");
	if (r) {
		res->len = r->payload.len;
		snprintf(res->text, sizeof(res->text), "%.*s", (int)(r->payload.len < 1000 ? r->payload.len : 1000),
			 (const char *)r->payload.data);
	}
}

static result echo(pbrpc_client *c, const char *payload)
{
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)payload;
	req.payload.len = strlen(payload);
	result r = { .status = -1 };
	demo__echo__echo(svc, &req, on_echo, &r);
	return r;
}

static pbrpc_client_opts client_tls(const char *ca)
{
	return (pbrpc_client_opts){ .tls = { .ca = ca } };
}

/* Connects; on failure *msg gets what pbrpc_client_status says. */
static int connect_msg(pbrpc_client **c, const char *ep, const pbrpc_client_opts *o, char *msg, size_t len)
{
	int rc = pbrpc_client_connect(c, ep, o);
	const char *m = NULL;
	if (rc < 0) {
		pbrpc_client_status(&m);
		snprintf(msg, len, "%s", m ? m : "");
	}
	return rc;
}

/* ---- the happy paths ---- */

Test(tls, call_by_ip_and_by_name)
{
	tserver s;
	pbrpc_server_opts so = server_tls(NULL);
	server_start(&s, "tls:127.0.0.1:0", &so);
	cr_assert(strncmp(s.addr, "tls:127.0.0.1:", 14) == 0, "%s", s.addr);
	const char *eps[] = { s.addr, with_host(&s, "tls:localhost") };
	for (int i = 0; i < 2; i++) {
		pbrpc_client *c;
		pbrpc_client_opts co = client_tls(cert("ca.pem"));
		char msg[512] = "";
		int rc = connect_msg(&c, eps[i], &co, msg, sizeof(msg));
		cr_assert_eq(rc, 0, "%s: %s: %s", eps[i], pbrpc_strerror(rc), msg);
		result r = echo(c, "hello");
		cr_assert_eq(r.status, 0, "%s", r.msg);
		cr_assert_str_eq(r.text, "hello");
		r = echo(c, "whoami"); /* TLS, and no client certificate */
		cr_assert_eq(r.status, 0, "%s", r.msg);
		cr_assert(strncmp(r.text, "(none)|TLSv1.3|TLS_", 19) == 0, "%s", r.text);
		pbrpc_client_free(c);
	}
	server_stop(&s, 1000);
}

Test(tls, ipv6)
{
	int fd = socket(AF_INET6, SOCK_STREAM, 0);
	struct sockaddr_in6 a = { .sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT };
	bool v6 = fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
	if (fd >= 0)
		close(fd);
	if (!v6)
		cr_skip_test("no IPv6 loopback here");
	tserver s;
	pbrpc_server_opts so = server_tls(NULL);
	server_start(&s, "tls:[::1]:0", &so);
	pbrpc_client *c;
	pbrpc_client_opts co = client_tls(cert("ca.pem"));
	char msg[512] = "";
	int rc = connect_msg(&c, s.addr, &co, msg, sizeof(msg));
	cr_assert_eq(rc, 0, "%s: %s", s.addr, msg);
	result r = echo(c, "six");
	cr_assert_eq(r.status, 0, "%s", r.msg);
	pbrpc_client_free(c);
	server_stop(&s, 1000);
}

Test(tls, mutual_tls_subject_and_sans_reach_the_handler)
{
	tserver s;
	pbrpc_server_opts so = server_tls(cert("ca.pem"));
	server_start(&s, "tls:127.0.0.1:0", &so);
	pbrpc_client *c;
	pbrpc_client_opts co = client_tls(cert("ca.pem"));
	co.tls.cert = cert("client.pem");
	co.tls.key = cert("client.key");
	char msg[512] = "";
	cr_assert_eq(connect_msg(&c, s.addr, &co, msg, sizeof(msg)), 0, "%s", msg);
	result r = echo(c, "whoami");
	cr_assert_eq(r.status, 0, "%s", r.msg);
	cr_assert(strncmp(r.text, "CN=alice,O=pbrpc tests|TLSv1.3|", 31) == 0, "%s", r.text);
	cr_assert(strstr(r.text, "|URI:spiffe://pbrpc.test/alice;DNS:alice.example;email:alice@pbrpc.test;"), "%s",
		  r.text);
	pbrpc_client_free(c);
	server_stop(&s, 1000);
}

Test(tls, request_mode_accepts_clients_without_a_certificate)
{
	tserver s;
	pbrpc_server_opts so = server_tls(cert("ca.pem"));
	so.tls.verify = PBRPC_TLS_VERIFY_REQUEST;
	server_start(&s, "tls:127.0.0.1:0", &so);
	pbrpc_client *c;
	pbrpc_client_opts co = client_tls(cert("ca.pem"));
	char msg[512] = "";
	cr_assert_eq(connect_msg(&c, s.addr, &co, msg, sizeof(msg)), 0, "%s", msg);
	result r = echo(c, "whoami");
	cr_assert_eq(r.status, 0, "%s", r.msg);
	cr_assert(strncmp(r.text, "(none)|", 7) == 0, "%s", r.text);
	pbrpc_client_free(c);
	co.tls.cert = cert("client.pem");
	co.tls.key = cert("client.key");
	cr_assert_eq(connect_msg(&c, s.addr, &co, msg, sizeof(msg)), 0, "%s", msg);
	r = echo(c, "whoami");
	cr_assert(strncmp(r.text, "CN=alice", 8) == 0, "%s", r.text);
	pbrpc_client_free(c);
	server_stop(&s, 1000);
}

Test(tls, plaintext_call_has_no_tls_peer)
{
	tserver s;
	pbrpc_server_opts so = { 0 };
	server_start(&s, "tcp:127.0.0.1:0", &so);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	result r = echo(c, "whoami");
	cr_assert_str_eq(r.text, "error -95"); /* -ENOTSUP */
	pbrpc_client_free(c);
	server_stop(&s, 1000);
}

/* ---- the client refuses the server ---- */

static void client_refuses(const char *server_cert, const char *server_key, const char *server_name,
			   const char *expect)
{
	tserver s;
	pbrpc_server_opts so = { .tls = { .cert = cert(server_cert), .key = cert(server_key) } };
	server_start(&s, "tls:127.0.0.1:0", &so);
	pbrpc_client *c = NULL;
	pbrpc_client_opts co = client_tls(cert("ca.pem"));
	co.tls.server_name = server_name;
	char msg[512] = "";
	int rc = connect_msg(&c, s.addr, &co, msg, sizeof(msg));
	cr_assert_eq(rc, PBRPC_ETLS, "%s: %s", pbrpc_strerror(rc), msg);
	cr_assert_null(c);
	cr_assert(strstr(msg, expect), "expected \"%s\" in: %s", expect, msg);
	cr_assert(log_has(&s, "TLS"), "server log: %s", s.log);
	server_stop(&s, 1000);
}

Test(tls, expired_server_certificate)
{
	client_refuses("expired.pem", "expired.key", NULL, "server certificate rejected: certificate has expired");
}

Test(tls, server_certificate_from_another_ca)
{
	client_refuses("other.pem", "other.key", NULL, "server certificate rejected: unable to get local issuer certificate");
}

Test(tls, self_signed_server_certificate)
{
	client_refuses("selfsigned.pem", "selfsigned.key", NULL, "server certificate rejected: self-signed certificate");
}

Test(tls, wrong_host_name)
{
	client_refuses("server.pem", "server.key", "wrong.example",
		       "server certificate rejected: hostname mismatch (it is not valid for wrong.example)");
}

Test(tls, wrong_ip_address)
{
	tserver s;
	pbrpc_server_opts so = server_tls(NULL);
	server_start(&s, "tls:127.0.0.1:0", &so);
	pbrpc_client *c = NULL;
	pbrpc_client_opts co = client_tls(cert("ca.pem"));
	co.tls.server_name = "127.0.0.2";
	char msg[512] = "";
	cr_assert_eq(connect_msg(&c, s.addr, &co, msg, sizeof(msg)), PBRPC_ETLS);
	cr_assert(strstr(msg, "IP address mismatch (it is not valid for 127.0.0.2)"), "%s", msg);
	server_stop(&s, 1000);
}

/* ---- the server refuses the client ---- */

static void server_refuses(const char *client_cert, const char *client_key, const char *client_expect,
			   const char *server_expect)
{
	tserver s;
	pbrpc_server_opts so = server_tls(cert("ca.pem"));
	server_start(&s, "tls:127.0.0.1:0", &so);
	pbrpc_client *c = NULL;
	pbrpc_client_opts co = client_tls(cert("ca.pem"));
	co.tls.cert = client_cert ? cert(client_cert) : NULL;
	co.tls.key = client_key ? cert(client_key) : NULL;
	char msg[512] = "";
	int rc = connect_msg(&c, s.addr, &co, msg, sizeof(msg));
	/* The alert that says why can lose the race with the reset of the
	 * server's close (its peer's last bytes arrived after it): then the
	 * client says what it can. */
	bool reset = (rc == -ECONNRESET || rc == -EPIPE) && strstr(msg, "the server may have refused our certificate");
	cr_assert(rc == PBRPC_ETLS || reset, "%s: %s", pbrpc_strerror(rc), msg);
	cr_assert(reset || strstr(msg, client_expect), "expected \"%s\" in: %s", client_expect, msg);
	cr_assert(log_has(&s, server_expect), "expected \"%s\" in the server log:\n%s", server_expect, s.log);
	server_stop(&s, 1000);
}

Test(tls, client_certificate_missing_when_required)
{
	server_refuses(NULL, NULL, "the server requires a client certificate",
		       "the client sent no certificate and this server requires one");
}

Test(tls, client_certificate_from_another_ca)
{
	server_refuses("client-other.pem", "client-other.key", "not signed by a CA it trusts",
		       "client certificate rejected: unable to get local issuer certificate");
}

Test(tls, expired_client_certificate)
{
	server_refuses("client-expired.pem", "client-expired.key", "it has expired",
		       "client certificate rejected: certificate has expired");
}

/* ---- the wrong protocol on each side ---- */

Test(tls, plaintext_client_on_a_tls_port)
{
	tserver s;
	pbrpc_server_opts so = server_tls(NULL);
	server_start(&s, "tls:127.0.0.1:0", &so);
	pbrpc_client *c = NULL;
	char msg[512] = "";
	int rc = connect_msg(&c, with_host(&s, "tcp:127.0.0.1"), NULL, msg, sizeof(msg));
	cr_assert_eq(rc, PBRPC_EGOAWAY, "%s: %s", pbrpc_strerror(rc), msg);
	cr_assert(strstr(msg, "refused the connection: GOAWAY UNAVAILABLE: the client sent a plaintext pbrpc preface: this port expects TLS"), "%s", msg);
	cr_assert(log_has(&s, "plaintext pbrpc preface: this port expects TLS"), "%s", s.log);
	server_stop(&s, 1000);
}

Test(tls, tls_client_on_a_plaintext_port)
{
	tserver s;
	pbrpc_server_opts so = { 0 };
	server_start(&s, "tcp:127.0.0.1:0", &so);
	pbrpc_client *c = NULL;
	pbrpc_client_opts co = client_tls(cert("ca.pem"));
	char msg[512] = "";
	int rc = connect_msg(&c, with_host(&s, "tls:127.0.0.1"), &co, msg, sizeof(msg));
	cr_assert_eq(rc, PBRPC_ENOTLS, "%s: %s", pbrpc_strerror(rc), msg);
	cr_assert(strstr(msg, "server does not speak TLS"), "%s", msg);
	/* what its plaintext GOAWAY said, when it came before the close */
	cr_assert(!strstr(msg, "GOAWAY") ||
			  strstr(msg, "it answered in plaintext pbrpc: GOAWAY INVALID_ARGUMENT: bad preface: the client "
				      "speaks TLS and this port is plaintext"),
		  "%s", msg);
	cr_assert(log_has(&s, "the client speaks TLS and this port is plaintext"), "%s", s.log);
	server_stop(&s, 1000);
}

/* Over max_connections, a TLS listener's refusal is pbrpc's plaintext one
 * (the server refuses before any TLS): the client quotes it. */
Test(tls, refused_over_the_connection_limit)
{
	tserver s;
	pbrpc_server_opts so = server_tls(NULL);
	so.max_connections = 1;
	server_start(&s, "tls:127.0.0.1:0", &so);
	pbrpc_client *c1, *c2 = NULL;
	pbrpc_client_opts co = client_tls(cert("ca.pem"));
	char msg[512] = "";
	cr_assert_eq(connect_msg(&c1, s.addr, &co, msg, sizeof(msg)), 0, "%s", msg);
	int rc = connect_msg(&c2, s.addr, &co, msg, sizeof(msg));
	cr_assert_eq(rc, PBRPC_ENOTLS, "%s: %s", pbrpc_strerror(rc), msg);
	cr_assert(strstr(msg, "GOAWAY RESOURCE_EXHAUSTED: too many connections") || strstr(msg, "plaintext pbrpc preface"),
		  "%s", msg);
	pbrpc_client_free(c1);
	server_stop(&s, 1000);
}

/* A TLS client without ALPN (not pbrpc's): the server says why, in a GOAWAY
 * through the session, and closes. */
Test(tls, client_without_alpn_is_told)
{
	tserver s;
	pbrpc_server_opts so = server_tls(NULL);
	server_start(&s, "tls:127.0.0.1:0", &so);
	pbrpc_endpoint ep;
	cr_assert_eq(pbrpc_endpoint_parse(s.addr, &ep), 0);
	int fd = pbrpc_endpoint_connect(&ep, 2000);
	cr_assert_geq(fd, 0);
	SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
	SSL_CTX_load_verify_locations(ctx, cert("ca.pem"), NULL);
	SSL *ssl = SSL_new(ctx);
	SSL_set_fd(ssl, fd);
	cr_assert_eq(SSL_connect(ssl), 1);
	char buf[4096];
	size_t got = 0, n;
	while (got < sizeof(buf) && SSL_read_ex(ssl, buf + got, sizeof(buf) - got, &n) == 1)
		got += n;
	cr_assert(memmem(buf, got, "the client did not offer ALPN pbrpc/1", 37), "%zu bytes", got);
	cr_assert(log_has(&s, "did not offer ALPN"), "%s", s.log);
	SSL_free(ssl);
	SSL_CTX_free(ctx);
	close(fd);
	server_stop(&s, 1000);
}

/* ---- configuration errors ---- */

Test(tls, bad_files_fail_creation_with_words)
{
	tserver s;
	pbrpc_server_opts so = { .tls = { .cert = cert("server.pem"), .key = cert("client.key") } };
	cr_assert_eq(server_try(&s, "tls:127.0.0.1:0", &so), PBRPC_ETLS);
	cr_assert(strstr(s.log, "it does not match the certificate"), "%s", s.log);
	so = (pbrpc_server_opts){ .tls = { .cert = cert("nope.pem") } };
	cr_assert_eq(server_try(&s, "tls:127.0.0.1:0", &so), PBRPC_ETLS);
	cr_assert(strstr(s.log, "cannot load the certificate chain"), "%s", s.log);
	pthread_mutex_destroy(&s.mu);

	/* a tls: listener without a certificate */
	pbrpc_server *srv;
	cr_assert_eq(pbrpc_server_new(&srv, NULL), 0);
	cr_assert_eq(pbrpc_server_listen(srv, "tls:127.0.0.1:0"), PBRPC_ETLS);
	pbrpc_server_free(srv);

	pbrpc_client *c = NULL;
	pbrpc_client_opts co = client_tls(cert("missing-ca.pem"));
	co.lazy = true;
	char msg[512] = "";
	cr_assert_eq(connect_msg(&c, "tls:127.0.0.1:1", &co, msg, sizeof(msg)), PBRPC_ETLS);
	cr_assert(strstr(msg, "cannot load the CA certificates"), "%s", msg);
}

/* ---- the transport under load ---- */

typedef struct worker {
	const char *ep;
	pbrpc_client *c;
	int ok, calls;
} worker;

static void *sync_worker(void *arg)
{
	worker *w = arg;
	char payload[64];
	for (int i = 0; i < w->calls; i++) {
		snprintf(payload, sizeof(payload), "call %d", i);
		result r = echo(w->c, payload);
		if (r.status == 0 && strcmp(r.text, payload) == 0)
			w->ok++;
	}
	return NULL;
}

static void on_async(const Demo__EchoReply *r, void *data)
{
	atomic_int *ok = data;
	if (r && pbrpc_client_status(NULL) == 0)
		atomic_fetch_add(ok, 1);
}

/* Two loops share the server's one SSL_CTX: four clients, two per loop,
 * each with threads calling at once, every call answered. */
Test(tls, sessions_on_every_loop)
{
	tserver s;
	pbrpc_server_opts so = server_tls(NULL);
	so.loop_threads = 2;
	server_start(&s, "tls:127.0.0.1:0", &so);
	pbrpc_client_opts co = client_tls(cert("ca.pem"));
	enum { NC = 4 };
	pbrpc_client *c[NC];
	for (int i = 0; i < NC; i++)
		cr_assert_eq(pbrpc_client_connect(&c[i], s.addr, &co), 0);
	int64_t until = tu_now_ms() + 3000;
	while (pbrpc__server_loop_conns(s.srv, 1) < NC / 2 && tu_now_ms() < until)
		usleep(1000);
	cr_assert_eq(pbrpc__server_loop_conns(s.srv, 0), NC / 2);
	cr_assert_eq(pbrpc__server_loop_conns(s.srv, 1), NC / 2);
	int per = (int)(tu_short_io() ? 10 : 200);
	worker w[NC * 2];
	pthread_t t[NC * 2];
	for (int i = 0; i < NC * 2; i++) {
		w[i] = (worker){ .c = c[i % NC], .calls = per };
		pthread_create(&t[i], NULL, sync_worker, &w[i]);
	}
	for (int i = 0; i < NC * 2; i++) {
		pthread_join(t[i], NULL);
		cr_assert_eq(w[i].ok, per, "thread %d: %d of %d", i, w[i].ok, per);
	}
	for (int i = 0; i < NC; i++)
		pbrpc_client_free(c[i]);
	server_stop(&s, 1000);
}

Test(tls, many_calls_in_flight)
{
	tserver s;
	pbrpc_server_opts so = server_tls(NULL);
	so.workers = 2;
	server_start(&s, "tls:127.0.0.1:0", &so);
	pbrpc_client *c;
	pbrpc_client_opts co = client_tls(cert("ca.pem"));
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, &co), 0);

	/* 4 threads of synchronous calls on one connection (leader/follower
	 * reading while others write through the session's mutex) */
	int per = (int)(tu_short_io() ? 20 : 300);
	worker w[4];
	pthread_t t[4];
	for (int i = 0; i < 4; i++) {
		w[i] = (worker){ .c = c, .calls = per };
		pthread_create(&t[i], NULL, sync_worker, &w[i]);
	}
	for (int i = 0; i < 4; i++) {
		pthread_join(t[i], NULL);
		cr_assert_eq(w[i].ok, per, "thread %d: %d of %d", i, w[i].ok, per);
	}

	/* then 500 asynchronous ones at once, some delayed */
	ProtobufCService *as = pbrpc_client_service_async(c, &demo__echo__descriptor);
	atomic_int ok = 0;
	int n = tu_short_io() ? 50 : 500;
	for (int i = 0; i < n; i++) {
		Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
		req.payload.data = (uint8_t *)"async";
		req.payload.len = 5;
		req.delay_ms = (uint32_t)(i % 5);
		demo__echo__echo(as, &req, on_async, &ok);
	}
	cr_assert_eq(pbrpc_client_drain(c, 20000), 0);
	cr_assert_eq(atomic_load(&ok), n);
	pbrpc_client_free(c);
	server_stop(&s, 1000);
}

Test(tls, sixteen_mib_message)
{
	tserver s;
	pbrpc_server_opts so = server_tls(NULL);
	so.max_frame = 17u << 20;
	server_start(&s, "tls:127.0.0.1:0", &so);
	pbrpc_client *c;
	pbrpc_client_opts co = client_tls(cert("ca.pem"));
	co.max_frame = 17u << 20;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, &co), 0);
	size_t len = tu_short_io() ? (256u << 10) : (16u << 20);
	uint8_t *big = malloc(len);
	tu_rng rng = { tu_seed() };
	tu_rand_bytes(&rng, big, len);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = big;
	req.payload.len = len;
	for (int round = 0; round < 2; round++) {
		result r = { .status = -1 };
		demo__echo__echo(svc, &req, on_echo, &r);
		cr_assert_eq(r.status, 0, "%s", r.msg);
		cr_assert_eq(r.len, len);
	}
	/* async, so that process() reads it (bytes inside OpenSSL included) */
	ProtobufCService *as = pbrpc_client_service_async(c, &demo__echo__descriptor);
	atomic_int ok = 0;
	demo__echo__echo(as, &req, on_async, &ok);
	demo__echo__echo(as, &req, on_async, &ok);
	cr_assert_eq(pbrpc_client_drain(c, 30000), 0);
	cr_assert_eq(atomic_load(&ok), 2);
	free(big);
	pbrpc_client_free(c);
	server_stop(&s, 1000);
}

Test(tls, deadline_and_cancel)
{
	tserver s;
	pbrpc_server_opts so = server_tls(NULL);
	server_start(&s, "tls:127.0.0.1:0", &so);
	pbrpc_client *c;
	pbrpc_client_opts co = client_tls(cert("ca.pem"));
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, &co), 0);
	ProtobufCService *svc =
		pbrpc_client_service_with(c, &demo__echo__descriptor, &(pbrpc_call_opts){ .timeout_ms = 100 });
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.delay_ms = 2000;
	result r = { .status = -1 };
	int64_t t0 = tu_now_ms();
	demo__echo__echo(svc, &req, on_echo, &r);
	cr_assert_eq(r.status, PBRPC_STATUS_DEADLINE_EXCEEDED, "%d %s", r.status, r.msg);
	cr_assert_lt(tu_now_ms() - t0, 1500);

	ProtobufCService *as = pbrpc_client_service_async(c, &demo__echo__descriptor);
	result ar = { .status = -1 };
	demo__echo__echo(as, &req, on_echo, &ar);
	uint32_t id = pbrpc_client_last_call();
	cr_assert_eq(pbrpc_client_cancel(c, id), 0);
	cr_assert_eq(pbrpc_client_drain(c, 5000), 0);
	cr_assert_eq(ar.status, PBRPC_STATUS_CANCELLED, "%d %s", ar.status, ar.msg);

	/* the connection is still good */
	r = echo(c, "after");
	cr_assert_eq(r.status, 0, "%s", r.msg);
	pbrpc_client_free(c);
	server_stop(&s, 1000);
}

static void *slow_call(void *arg)
{
	worker *w = arg;
	ProtobufCService *svc = pbrpc_client_service(w->c, &demo__echo__descriptor);
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)"slow";
	req.payload.len = 4;
	req.delay_ms = 300;
	result r = { .status = -1 };
	demo__echo__echo(svc, &req, on_echo, &r);
	w->ok = r.status == 0 && strcmp(r.text, "slow") == 0;
	return NULL;
}

Test(tls, drain_finishes_calls_in_flight)
{
	tserver s;
	pbrpc_server_opts so = server_tls(NULL);
	server_start(&s, "tls:127.0.0.1:0", &so);
	pbrpc_client *c;
	pbrpc_client_opts co = client_tls(cert("ca.pem"));
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, &co), 0);
	worker w = { .c = c };
	pthread_t t;
	pthread_create(&t, NULL, slow_call, &w);
	usleep(100000);
	pbrpc_server_shutdown(s.srv, 5000); /* GOAWAY through TLS, then the call finishes */
	pthread_join(t, NULL);
	cr_assert(w.ok, "the call in flight failed during the drain");
	pthread_join(s.thr, NULL);
	cr_assert_eq(s.rc, 0);
	cr_assert(log_has(&s, "shutdown complete"), "%s", s.log);
	/* the listener is gone: no connection within the call's deadline */
	pbrpc_client_next_call(&(pbrpc_call_opts){ .timeout_ms = 300 });
	result r = echo(c, "late");
	cr_assert_eq(r.status, PBRPC_STATUS_UNAVAILABLE, "%d %s", r.status, r.msg);
	pbrpc_client_free(c);
	demo_echo_free(s.inner);
	pbrpc_server_free(s.srv);
	pthread_mutex_destroy(&s.mu);
}

/* The server closes connections that never finish the TLS handshake. */
Test(tls, handshake_timeout)
{
	tserver s;
	pbrpc_server_opts so = server_tls(NULL);
	so.handshake_timeout_ms = 200;
	server_start(&s, "tls:127.0.0.1:0", &so);
	pbrpc_endpoint ep;
	cr_assert_eq(pbrpc_endpoint_parse(s.addr, &ep), 0);
	int fd = pbrpc_endpoint_connect(&ep, 2000);
	cr_assert_geq(fd, 0);
	char b;
	ssize_t n = read(fd, &b, 1); /* nothing sent: the server gives up */
	cr_assert_leq(n, 0);
	close(fd);
	server_stop(&s, 1000);
}
