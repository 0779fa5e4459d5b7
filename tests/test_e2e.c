/* End to end: the real server hosting the example services, the real client
 * calling them through the stubs protoc-c generated, over every endpoint
 * kind, synchronously and asynchronously. This is the user's view from
 * README.md and issue 3. */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "demo_services.h"
#include "pbrpc/pbrpc.h"
#include "testutil.h"

/* ---- a server on its own thread ---- */

typedef struct e2e_server {
	pbrpc_server *srv;
	Demo__Kv_Service *kv;
	Demo__Echo_Service *echo;
	pthread_t thr;
	char addr[PBRPC_ENDPOINT_STRLEN];
	int rc;
} e2e_server;

static char tmpdir[64];

static void *run_server(void *arg)
{
	e2e_server *s = arg;
	s->rc = pbrpc_server_run(s->srv);
	return NULL;
}

static const char *unix_endpoint(void)
{
	static char ep[128];
	if (!tmpdir[0]) {
		snprintf(tmpdir, sizeof(tmpdir), "/tmp/pbrpc-e2e-XXXXXX");
		cr_assert_not_null(mkdtemp(tmpdir));
	}
	snprintf(ep, sizeof(ep), "unix:%s/kv.sock", tmpdir);
	return ep;
}

static void server_start(e2e_server *s, const char *endpoint, const pbrpc_server_opts *opts)
{
	memset(s, 0, sizeof(*s));
	s->kv = demo_kv_new();
	s->echo = demo_echo_new();
	cr_assert_eq(pbrpc_server_new(&s->srv, opts), 0);
	cr_assert_eq(demo_kv_add(s->srv, s->kv), 0);
	cr_assert_eq(pbrpc_server_add_service(s->srv, &s->echo->base), 0);
	int idx = pbrpc_server_listen(s->srv, endpoint);
	cr_assert_geq(idx, 0, "listen %s: %s", endpoint, pbrpc_strerror(idx));
	pbrpc_server_address(s->srv, idx, s->addr, sizeof(s->addr));
	cr_assert_eq(pthread_create(&s->thr, NULL, run_server, s), 0);
}

static void server_stop(e2e_server *s, int drain_ms)
{
	pbrpc_server_shutdown(s->srv, drain_ms);
	pthread_join(s->thr, NULL);
	cr_assert_eq(s->rc, 0);
	demo_echo_free(s->echo);
	pbrpc_server_free(s->srv);
	demo_kv_free(s->kv);
}

static void cleanup(void)
{
	if (tmpdir[0]) {
		char path[128];
		snprintf(path, sizeof(path), "%s/kv.sock", tmpdir);
		unlink(path);
		rmdir(tmpdir);
		tmpdir[0] = 0;
	}
}

TestSuite(e2e, .init = tu_setup, .fini = cleanup, .timeout = 90);

/* ---- closures ---- */

typedef struct outcome {
	int calls;
	int status;
	char message[128];
	char text[256]; /* a copy of the interesting reply field */
	size_t len;
} outcome;

static void record_status(outcome *o)
{
	const char *msg = NULL;
	o->calls++;
	o->status = pbrpc_client_status(&msg);
	snprintf(o->message, sizeof(o->message), "%s", msg ? msg : "");
}

static void on_put(const Demo__PutReply *r, void *data)
{
	outcome *o = data;
	record_status(o);
	if (r)
		snprintf(o->text, sizeof(o->text), "%s", r->created ? "created" : "replaced");
}

static void on_get(const Demo__GetReply *r, void *data)
{
	outcome *o = data;
	record_status(o);
	if (r)
		snprintf(o->text, sizeof(o->text), "%.*s", (int)r->value.len, (const char *)r->value.data);
}

static void on_delete(const Demo__DeleteReply *r, void *data)
{
	outcome *o = data;
	record_status(o);
	if (r)
		snprintf(o->text, sizeof(o->text), "%s", r->deleted ? "deleted" : "absent");
}

static void on_list(const Demo__ListReply *r, void *data)
{
	outcome *o = data;
	record_status(o);
	o->text[0] = 0;
	if (r)
		for (size_t i = 0; i < r->n_entries; i++) {
			strncat(o->text, r->entries[i]->key, sizeof(o->text) - strlen(o->text) - 2);
			strcat(o->text, ",");
		}
}

static void on_echo(const Demo__EchoReply *r, void *data)
{
	outcome *o = data;
	record_status(o);
	if (r) {
		o->len = r->payload.len;
		snprintf(o->text, sizeof(o->text), "%.*s", (int)(r->payload.len < 200 ? r->payload.len : 200),
			 (const char *)r->payload.data);
	}
}

static void kv_put(ProtobufCService *kv, const char *key, const char *value, outcome *o)
{
	Demo__PutRequest req = DEMO__PUT_REQUEST__INIT;
	req.key = (char *)key;
	req.value.data = (uint8_t *)value;
	req.value.len = strlen(value);
	demo__kv__put(kv, &req, on_put, o);
}

static void kv_get(ProtobufCService *kv, const char *key, outcome *o)
{
	Demo__GetRequest req = DEMO__GET_REQUEST__INIT;
	req.key = (char *)key;
	demo__kv__get(kv, &req, on_get, o);
}

static void echo_call(ProtobufCService *svc, const char *payload, uint32_t delay_ms, outcome *o)
{
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)payload;
	req.payload.len = strlen(payload);
	req.delay_ms = delay_ms;
	demo__echo__echo(svc, &req, on_echo, o);
}

/* ---- the user's view, over every endpoint kind ---- */

static void kv_session(const char *endpoint)
{
	e2e_server s;
	server_start(&s, endpoint, NULL);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0, "connect %s", s.addr);
	ProtobufCService *kv = pbrpc_client_service(c, &demo__kv__descriptor);
	cr_assert_not_null(kv);

	outcome o = { 0 };
	kv_put(kv, "b", "2", &o);
	cr_assert_eq(o.calls, 1, "the sync stub returns after its closure ran");
	cr_assert_eq(o.status, PBRPC_STATUS_OK);
	cr_assert_str_eq(o.text, "created");
	kv_put(kv, "a", "1", &o);
	kv_put(kv, "a", "one", &o);
	cr_assert_str_eq(o.text, "replaced");
	kv_get(kv, "a", &o);
	cr_assert_eq(o.status, PBRPC_STATUS_OK);
	cr_assert_str_eq(o.text, "one");

	Demo__ListRequest lr = DEMO__LIST_REQUEST__INIT;
	demo__kv__list(kv, &lr, on_list, &o);
	cr_assert_str_eq(o.text, "a,b,");

	Demo__DeleteRequest dr = DEMO__DELETE_REQUEST__INIT;
	dr.key = "a";
	demo__kv__delete(kv, &dr, on_delete, &o);
	cr_assert_str_eq(o.text, "deleted");

	memset(&o, 0, sizeof(o));
	kv_get(kv, "a", &o);
	cr_assert_eq(o.calls, 1);
	cr_assert_eq(o.status, PBRPC_STATUS_NOT_FOUND);
	cr_assert_str_eq(o.message, "no key \"a\"");
	const char *msg;
	cr_assert_eq(pbrpc_client_status(&msg), PBRPC_STATUS_NOT_FOUND, "status survives the closure");

	/* Asynchronously on the same connection. */
	ProtobufCService *akv = pbrpc_client_service_async(c, &demo__kv__descriptor);
	outcome ao = { 0 };
	kv_get(akv, "b", &ao);
	cr_assert_eq(pbrpc_client_drain(c, 5000), 0);
	cr_assert_eq(ao.calls, 1);
	cr_assert_str_eq(ao.text, "2");

	pbrpc_client_free(c);
	server_stop(&s, 1000);
}

Test(e2e, kv_over_unix_path)
{
	kv_session(unix_endpoint());
}

Test(e2e, kv_over_abstract)
{
	char ep[64];
	snprintf(ep, sizeof(ep), "unix:@pbrpc-e2e-%d", getpid());
	kv_session(ep);
}

Test(e2e, kv_over_tcp4)
{
	kv_session("tcp:127.0.0.1:0");
}

Test(e2e, kv_over_tcp6)
{
	kv_session("tcp:[::1]:0");
}

/* ---- many calls in flight ---- */

static void thousand_async(const char *endpoint)
{
	e2e_server s;
	server_start(&s, endpoint, NULL);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service_async(c, &demo__echo__descriptor);
	const int n = 1000;
	outcome *o = calloc((size_t)n, sizeof(*o));
	char payload[32];
	tu_rng rng = { tu_seed() };
	for (int i = 0; i < n; i++) {
		snprintf(payload, sizeof(payload), "call-%d", i);
		/* Random delays make the server answer out of order. */
		echo_call(echo, payload, (uint32_t)tu_rand_range(&rng, 0, 30), &o[i]);
	}
	cr_assert_gt(pbrpc_client_pending(c), 0);
	cr_assert_eq(pbrpc_client_drain(c, 20000), 0);
	for (int i = 0; i < n; i++) {
		snprintf(payload, sizeof(payload), "call-%d", i);
		cr_assert_eq(o[i].calls, 1, "call %d completed %d times", i, o[i].calls);
		cr_assert_eq(o[i].status, PBRPC_STATUS_OK, "call %d: %s", i, o[i].message);
		cr_assert_str_eq(o[i].text, payload);
	}
	free(o);
	pbrpc_client_free(c);
	server_stop(&s, 1000);
}

Test(e2e, thousand_async_calls_out_of_order_unix)
{
	thousand_async(unix_endpoint());
}

Test(e2e, thousand_async_calls_out_of_order_tcp)
{
	thousand_async("tcp:127.0.0.1:0");
}

typedef struct worker {
	const char *addr;
	pbrpc_client *shared;
	int id, calls, ok;
} worker;

static void *client_thread(void *arg)
{
	worker *w = arg;
	pbrpc_client *c = w->shared;
	if (!c && pbrpc_client_connect(&c, w->addr, NULL) < 0)
		return NULL;
	ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);
	for (int i = 0; i < w->calls; i++) {
		char p[48];
		snprintf(p, sizeof(p), "t%d-%d", w->id, i);
		outcome o = { 0 };
		echo_call(echo, p, 0, &o);
		if (o.calls == 1 && o.status == PBRPC_STATUS_OK && strcmp(o.text, p) == 0)
			w->ok++;
	}
	if (!w->shared)
		pbrpc_client_free(c);
	return NULL;
}

Test(e2e, sixty_four_concurrent_clients)
{
	e2e_server s;
	server_start(&s, unix_endpoint(), NULL);
	enum { N = 64 };
	pthread_t t[N];
	worker w[N];
	for (int i = 0; i < N; i++) {
		w[i] = (worker){ .addr = s.addr, .id = i, .calls = (int)tu_scale(50) };
		pthread_create(&t[i], NULL, client_thread, &w[i]);
	}
	for (int i = 0; i < N; i++) {
		pthread_join(t[i], NULL);
		cr_assert_eq(w[i].ok, w[i].calls, "client %d: %d of %d calls ok", i, w[i].ok, w[i].calls);
	}
	server_stop(&s, 1000);
}

Test(e2e, one_client_shared_by_eight_threads_with_worker_pool)
{
	e2e_server s;
	pbrpc_server_opts so = { .workers = 4 };
	server_start(&s, "tcp:127.0.0.1:0", &so);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	enum { N = 8 };
	pthread_t t[N];
	worker w[N];
	for (int i = 0; i < N; i++) {
		w[i] = (worker){ .shared = c, .id = i, .calls = (int)tu_scale(200) };
		pthread_create(&t[i], NULL, client_thread, &w[i]);
	}
	for (int i = 0; i < N; i++) {
		pthread_join(t[i], NULL);
		cr_assert_eq(w[i].ok, w[i].calls, "thread %d: %d of %d ok", i, w[i].ok, w[i].calls);
	}
	pbrpc_client_free(c);
	server_stop(&s, 1000);
}

/* ---- payload sizes (RELIABILITY 16) ---- */

static void big_echo_done(const Demo__EchoReply *r, void *data)
{
	uint8_t *want = data;
	outcome *o = (outcome *)(void *)(want + (16u << 20));
	record_status(o);
	o->len = r ? r->payload.len : (size_t)-1;
	if (r && r->payload.len && memcmp(r->payload.data, want, r->payload.len) != 0)
		o->len = (size_t)-2;
}

Test(e2e, payloads_0_1mib_10mib_byte_identical)
{
	e2e_server s;
	server_start(&s, unix_endpoint(), NULL);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);
	uint8_t *buf = malloc((16u << 20) + sizeof(outcome));
	tu_rng rng = { tu_seed() };
	tu_rand_bytes(&rng, buf, 10u << 20);
	outcome *o = (outcome *)(void *)(buf + (16u << 20));
	size_t sizes[] = { 0, 1u << 20, 1u << 20, 1u << 20, 1u << 20, 1u << 20,
			   1u << 20, 1u << 20, 1u << 20, 1u << 20, 1u << 20, 10u << 20 };
	size_t count = tu_short_io() ? 3 : sizeof(sizes) / sizeof(sizes[0]);
	for (size_t i = 0; i < count; i++) {
		memset(o, 0, sizeof(*o));
		Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
		req.payload.data = buf;
		req.payload.len = sizes[i];
		demo__echo__echo(echo, &req, big_echo_done, buf);
		cr_assert_eq(o->status, PBRPC_STATUS_OK, "size %zu: %s", sizes[i], o->message);
		cr_assert_eq(o->len, sizes[i], "size %zu came back as %zd", sizes[i], (ssize_t)o->len);
	}
	free(buf);
	pbrpc_client_free(c);
	server_stop(&s, 1000);
}

Test(e2e, request_over_server_limit_refused_locally)
{
	e2e_server s;
	pbrpc_server_opts so = { .max_frame = 4096 };
	server_start(&s, unix_endpoint(), &so);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);
	static char big[8192];
	memset(big, 'x', sizeof(big) - 1);
	outcome o = { 0 };
	echo_call(echo, big, 0, &o);
	cr_assert_eq(o.status, PBRPC_STATUS_RESOURCE_EXHAUSTED);
	cr_assert(strstr(o.message, "4096") != NULL, "message names the limit: %s", o.message);
	pbrpc_server_stats st;
	pbrpc_server_get_stats(s.srv, &st);
	cr_assert_eq(st.calls_started, 0, "nothing was sent");
	echo_call(echo, "small", 0, &o);
	cr_assert_eq(o.status, PBRPC_STATUS_OK);
	pbrpc_client_free(c);
	server_stop(&s, 1000);
}

/* ---- deadlines, cancel ---- */

Test(e2e, deadline_exceeded_then_connection_still_works)
{
	e2e_server s;
	server_start(&s, unix_endpoint(), NULL);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);
	outcome o = { 0 };
	pbrpc_client_next_call(&(pbrpc_call_opts){ .timeout_ms = 100 });
	int64_t t0 = tu_now_ms();
	echo_call(echo, "slow", 2000, &o);
	int64_t dt = tu_now_ms() - t0;
	cr_assert_eq(o.status, PBRPC_STATUS_DEADLINE_EXCEEDED, "got %s: %s", pbrpc_status_name(o.status), o.message);
	cr_assert(dt >= 90 && dt < 1500, "returned after %lld ms", (long long)dt);
	echo_call(echo, "fast", 0, &o);
	cr_assert_eq(o.status, PBRPC_STATUS_OK);
	cr_assert_str_eq(o.text, "fast");
	pbrpc_client_free(c);
	server_stop(&s, 0);
}

Test(e2e, cancel_async_call)
{
	e2e_server s;
	server_start(&s, unix_endpoint(), NULL);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service_async(c, &demo__echo__descriptor);
	outcome o = { 0 };
	echo_call(echo, "doomed", 5000, &o);
	uint32_t id = pbrpc_client_last_call();
	cr_assert_neq(id, 0);
	cr_assert_eq(pbrpc_client_cancel(c, id), 0);
	cr_assert_eq(pbrpc_client_drain(c, 2000), 0);
	cr_assert_eq(o.calls, 1);
	cr_assert_eq(o.status, PBRPC_STATUS_CANCELLED);
	cr_assert_eq(pbrpc_client_cancel(c, id), PBRPC_EINVALID, "not in flight any more");
	outcome o2 = { 0 };
	echo_call(echo, "next", 0, &o2);
	cr_assert_eq(pbrpc_client_drain(c, 2000), 0);
	cr_assert_eq(o2.status, PBRPC_STATUS_OK);
	pbrpc_client_free(c);
	server_stop(&s, 0);
}

/* ---- connection faults ---- */

Test(e2e, server_restart_then_client_reconnects)
{
	e2e_server s;
	const char *ep = unix_endpoint();
	server_start(&s, ep, NULL);
	pbrpc_client *c;
	pbrpc_client_opts co = { .backoff_min_ms = 10, .backoff_max_ms = 50 };
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, &co), 0);
	ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);
	ProtobufCService *aecho = pbrpc_client_service_async(c, &demo__echo__descriptor);
	outcome o = { 0 }, inflight = { 0 };
	echo_call(echo, "before", 0, &o);
	cr_assert_eq(o.status, PBRPC_STATUS_OK);

	/* A call in flight when the server goes away fails with UNAVAILABLE. */
	echo_call(aecho, "lost", 5000, &inflight);
	usleep(50000);
	server_stop(&s, 0);
	cr_assert_eq(pbrpc_client_drain(c, 3000), 0);
	cr_assert_eq(inflight.calls, 1);
	cr_assert_eq(inflight.status, PBRPC_STATUS_UNAVAILABLE, "got %s", pbrpc_status_name(inflight.status));

	/* While it is down, a call fails within its deadline. */
	pbrpc_client_next_call(&(pbrpc_call_opts){ .timeout_ms = 200 });
	echo_call(echo, "down", 0, &o);
	cr_assert_eq(o.status, PBRPC_STATUS_UNAVAILABLE, "got %s", pbrpc_status_name(o.status));

	server_start(&s, ep, NULL);
	pbrpc_client_next_call(&(pbrpc_call_opts){ .timeout_ms = 3000 });
	echo_call(echo, "after", 0, &o);
	cr_assert_eq(o.status, PBRPC_STATUS_OK, "got %s: %s", pbrpc_status_name(o.status), o.message);
	cr_assert_str_eq(o.text, "after");
	pbrpc_client_free(c);
	server_stop(&s, 0);
}

typedef struct late_start {
	e2e_server *s;
	const char *ep;
} late_start;

static void *start_later(void *arg)
{
	late_start *l = arg;
	usleep(300000);
	server_start(l->s, l->ep, NULL);
	return NULL;
}

Test(e2e, call_before_server_listens_completes_once_it_does)
{
	const char *ep = unix_endpoint();
	pbrpc_client *c;
	pbrpc_client_opts co = { .lazy = true, .backoff_min_ms = 20, .backoff_max_ms = 100 };
	cr_assert_eq(pbrpc_client_connect(&c, ep, &co), 0);
	ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);
	e2e_server s;
	late_start l = { &s, ep };
	pthread_t t;
	pthread_create(&t, NULL, start_later, &l);
	outcome o = { 0 };
	pbrpc_client_next_call(&(pbrpc_call_opts){ .timeout_ms = 5000 });
	echo_call(echo, "patient", 0, &o);
	pthread_join(t, NULL);
	cr_assert_eq(o.status, PBRPC_STATUS_OK, "got %s: %s", pbrpc_status_name(o.status), o.message);
	cr_assert_str_eq(o.text, "patient");
	pbrpc_client_free(c);
	server_stop(&s, 0);
}

Test(e2e, graceful_drain_lets_calls_finish)
{
	e2e_server s;
	server_start(&s, unix_endpoint(), NULL);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service_async(c, &demo__echo__descriptor);
	outcome o = { 0 };
	echo_call(echo, "finishing", 200, &o);
	usleep(50000);
	pbrpc_server_shutdown(s.srv, 3000);
	cr_assert_eq(pbrpc_client_drain(c, 3000), 0);
	cr_assert_eq(o.status, PBRPC_STATUS_OK, "got %s: %s", pbrpc_status_name(o.status), o.message);
	cr_assert_str_eq(o.text, "finishing");
	pthread_join(s.thr, NULL);
	demo_echo_free(s.echo);
	pbrpc_server_free(s.srv);
	demo_kv_free(s.kv);
	pbrpc_client_free(c);
}

Test(e2e, garbage_peer_does_not_disturb_a_client)
{
	e2e_server s;
	server_start(&s, "tcp:127.0.0.1:0", NULL);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);
	pbrpc_endpoint ep;
	cr_assert_eq(pbrpc_endpoint_parse(s.addr, &ep), 0);
	tu_rng rng = { tu_seed() };
	for (int i = 0; i < 20; i++) {
		int fd = pbrpc_endpoint_connect(&ep, 1000);
		cr_assert_geq(fd, 0);
		uint8_t junk[512];
		tu_rand_bytes(&rng, junk, sizeof(junk));
		ssize_t n = send(fd, junk, sizeof(junk), MSG_NOSIGNAL);
		(void)n;
		outcome o = { 0 };
		echo_call(echo, "still here", 0, &o);
		cr_assert_eq(o.status, PBRPC_STATUS_OK);
		close(fd);
	}
	pbrpc_client_free(c);
	server_stop(&s, 0);
}

typedef struct churn {
	const char *addr;
	atomic_bool stop;
	int connects, failures;
} churn;

static void *churn_main(void *arg)
{
	churn *ch = arg;
	while (!atomic_load(&ch->stop)) {
		pbrpc_client *c;
		if (pbrpc_client_connect(&c, ch->addr, NULL) < 0) {
			ch->failures++;
			continue;
		}
		ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);
		outcome o = { 0 };
		echo_call(echo, "churn", 0, &o);
		if (o.status != PBRPC_STATUS_OK)
			ch->failures++;
		pbrpc_client_free(c);
		ch->connects++;
	}
	return NULL;
}

/* RELIABILITY 43: connections come and go for 3 s while calls run. */
Test(e2e, reconnect_churn_while_calls_run)
{
	e2e_server s;
	server_start(&s, unix_endpoint(), NULL);
	churn ch = { .addr = s.addr };
	pthread_t t;
	pthread_create(&t, NULL, churn_main, &ch);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);
	int calls = 0;
	int64_t until = tu_now_ms() + 3000;
	while (tu_now_ms() < until) {
		outcome o = { 0 };
		echo_call(echo, "steady", 0, &o);
		cr_assert_eq(o.status, PBRPC_STATUS_OK, "call %d: %s", calls, o.message);
		calls++;
	}
	atomic_store(&ch.stop, true);
	pthread_join(t, NULL);
	cr_assert_eq(ch.failures, 0);
	cr_assert_gt(ch.connects, 10, "only %d connections churned", ch.connects);
	pbrpc_server_stats st;
	int64_t settle = tu_now_ms() + 2000;
	do {
		usleep(10000);
		pbrpc_server_get_stats(s.srv, &st); /* a racy read is fine for polling */
	} while (st.connections_open != 1 && tu_now_ms() < settle);
	cr_assert_eq(st.connections_open, 1, "churned connections are all closed");
	pbrpc_client_free(c);
	server_stop(&s, 1000);
}

Test(e2e, not_a_pbrpc_server)
{
	/* A listener that answers with something else entirely. */
	int fds[2];
	tu_socketpair(fds);
	close(fds[1]);
	close(fds[0]);
	pbrpc_endpoint ep;
	const char *addr = "tcp:127.0.0.1:0";
	cr_assert_eq(pbrpc_endpoint_parse(addr, &ep), 0);
	int lfd = pbrpc_endpoint_listen(&ep, NULL);
	cr_assert_geq(lfd, 0);
	char name[PBRPC_ENDPOINT_STRLEN];
	pbrpc_endpoint_format(&ep, name, sizeof(name));
	pid_t pid = fork();
	if (pid == 0) {
		int fd = accept(lfd, NULL, NULL);
		const char *http = "HTTP/1.1 400 Bad Request\r\n\r\n";
		ssize_t n = write(fd, http, strlen(http));
		(void)n;
		usleep(200000);
		_exit(0);
	}
	pbrpc_client *c = NULL;
	int rc = pbrpc_client_connect(&c, name, NULL);
	cr_assert_eq(rc, PBRPC_EBADMAGIC, "got %s", pbrpc_strerror(rc));
	cr_assert_null(c);
	close(lfd);
}
