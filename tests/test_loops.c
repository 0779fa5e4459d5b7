/* Several event loops in one server (pbrpc_server_opts.loop_threads, issue
 * 14 item 3): the real server, run by pbrpc_server_run on its own thread,
 * and real clients, one connection each. Placement (the loop with the
 * fewest connections), calls from many threads, closures from workers and
 * foreign threads answered by the call's own loop, shutdown with calls in
 * flight on every loop, the connection caps across loops, streams on a loop
 * other than loop 0 and pbrpc_stream_post from another thread. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "demo_services.h"
#include "echo.pb-c.h"
#include "kv.pb-c.h"
#include "pbrpc/client.h"
#include "pbrpc/endpoint.h"
#include "pbrpc/server.h"
#include "pbrpc/stream.h"
#include "server/server_impl.h"
#include "testutil.h"

/* ---- demo.Echo: echoes; "hold" keeps the call for the test to answer ---- */

#define HELD_MAX 64
static pthread_mutex_t held_mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
	Demo__EchoReply_Closure closure;
	void *data;
	char payload[32];
} held[HELD_MAX];
static atomic_int n_held;
static atomic_int off_loop; /* handlers that ran on no loop thread (workers) */

static void reply_bytes(Demo__EchoReply_Closure closure, void *data, const void *p, size_t len)
{
	Demo__EchoReply r = DEMO__ECHO_REPLY__INIT;
	r.payload.data = (uint8_t *)p;
	r.payload.len = len;
	closure(&r, data);
}

static void t_echo(Demo__Echo_Service *service, const Demo__EchoRequest *req, Demo__EchoReply_Closure closure,
		   void *data)
{
	(void)service;
	if (!pbrpc__srv_tl_loop)
		atomic_fetch_add(&off_loop, 1);
	if (req->payload.len >= 4 && memcmp(req->payload.data, "hold", 4) == 0) {
		pthread_mutex_lock(&held_mu);
		int i = atomic_load(&n_held);
		cr_assert_lt(i, HELD_MAX);
		held[i].closure = closure;
		held[i].data = data;
		snprintf(held[i].payload, sizeof(held[i].payload), "%.*s", (int)req->payload.len,
			 (const char *)req->payload.data);
		atomic_store(&n_held, i + 1);
		pthread_mutex_unlock(&held_mu);
		return;
	}
	reply_bytes(closure, data, req->payload.data, req->payload.len);
}

static Demo__Echo_Service echo_svc = DEMO__ECHO__INIT(t_);

/* Answers every held call from this (foreign) thread. */
static void release_held(void)
{
	pthread_mutex_lock(&held_mu);
	int n = atomic_load(&n_held);
	for (int i = 0; i < n; i++)
		reply_bytes(held[i].closure, held[i].data, held[i].payload, strlen(held[i].payload));
	atomic_store(&n_held, 0);
	pthread_mutex_unlock(&held_mu);
}

/* ---- a bidi stream, t.S/Echo: echoes each message with the loop's index ---- */

static const pbrpc_stream_desc d_echo = { "t.S/Echo", PBRPC_STREAM_BIDI, &demo__echo_request__descriptor,
					  &demo__echo_reply__descriptor };
static atomic_int stream_loop = -1; /* the loop its handler ran on */

static void s_msg(pbrpc_stream *st, const ProtobufCMessage *m, void *user)
{
	(void)user;
	const Demo__EchoRequest *q = (const Demo__EchoRequest *)m;
	char text[64];
	snprintf(text, sizeof(text), "%.*s@%u", (int)q->payload.len, (const char *)q->payload.data,
		 pbrpc__srv_tl_loop ? pbrpc__srv_tl_loop->loop_index : 999u);
	Demo__EchoReply r = DEMO__ECHO_REPLY__INIT;
	r.payload.data = (uint8_t *)text;
	r.payload.len = strlen(text);
	int rc = pbrpc_stream_send(st, &r.base);
	if (rc < 0 && rc != PBRPC_ECLOSED)
		pbrpc_stream_end(st, PBRPC_STATUS_INTERNAL, NULL, "send: %s", pbrpc_strerror(rc));
}

static void s_half(pbrpc_stream *st, void *user)
{
	(void)user;
	pbrpc_stream_end(st, PBRPC_STATUS_OK, NULL, NULL);
}

static void s_cancel(pbrpc_stream *st, void *user)
{
	(void)user;
	pbrpc_stream_end(st, 0, NULL, NULL);
}

static const pbrpc_stream_ops s_ops = { .on_message = s_msg, .on_half_close = s_half, .on_cancel = s_cancel };

static _Atomic(pbrpc_stream *) open_stream; /* the last one opened */

/* Posted from the test thread: runs on the stream's loop. */
static void s_posted(void *arg)
{
	Demo__EchoRequest q = DEMO__ECHO_REQUEST__INIT;
	q.payload.data = (uint8_t *)arg;
	q.payload.len = strlen(arg);
	s_msg(atomic_load(&open_stream), &q.base, NULL);
}

static void s_handler(pbrpc_stream *st, const ProtobufCMessage *req, void *user)
{
	(void)req;
	(void)user;
	atomic_store(&open_stream, st);
	atomic_store(&stream_loop, pbrpc__srv_tl_loop ? (int)pbrpc__srv_tl_loop->loop_index : -2);
	pbrpc_stream_set_ops(st, &s_ops, NULL);
}

/* ---- the server, run by pbrpc_server_run on its thread ---- */

typedef struct tsrv {
	pbrpc_server *srv;
	Demo__Kv_Service *kv;
	pthread_t thr;
	char addr[PBRPC_ENDPOINT_STRLEN];
	char dir[64];
	atomic_int rc;
	atomic_bool done;
} tsrv;

static void *srv_main(void *arg)
{
	tsrv *t = arg;
	atomic_store(&t->rc, pbrpc_server_run(t->srv));
	atomic_store(&t->done, true);
	return NULL;
}

static void start_server(tsrv *t, pbrpc_server_opts o)
{
	memset(t, 0, sizeof(*t));
	atomic_store(&n_held, 0);
	atomic_store(&off_loop, 0);
	cr_assert_eq(pbrpc_server_new(&t->srv, &o), 0);
	cr_assert_eq(pbrpc_server_add_service(t->srv, &echo_svc.base), 0);
	cr_assert_eq(pbrpc_server_add_stream(t->srv, &d_echo, s_handler, NULL), 0);
	t->kv = demo_kv_new();
	cr_assert_not_null(t->kv);
	cr_assert_eq(demo_kv_add(t->srv, t->kv), 0);
	snprintf(t->dir, sizeof(t->dir), "/tmp/pbrpc-loops-XXXXXX");
	cr_assert_not_null(mkdtemp(t->dir));
	char ep[160];
	snprintf(ep, sizeof(ep), "unix:%s/s.sock", t->dir);
	int idx = pbrpc_server_listen(t->srv, ep);
	cr_assert_geq(idx, 0, "listen %s: %s", ep, pbrpc_strerror(idx));
	pbrpc_server_address(t->srv, idx, t->addr, sizeof(t->addr));
	cr_assert_eq(pthread_create(&t->thr, NULL, srv_main, t), 0);
}

static pbrpc_server_stats stats(const tsrv *t)
{
	pbrpc_server_stats s;
	pbrpc_server_get_stats(t->srv, &s);
	return s;
}

/* Graceful stop; returns the final counters. */
static pbrpc_server_stats stop_server(tsrv *t)
{
	pbrpc_server_shutdown(t->srv, 2000);
	pthread_join(t->thr, NULL);
	cr_assert_eq(atomic_load(&t->rc), 0);
	pbrpc_server_stats s = stats(t);
	pbrpc_server_free(t->srv);
	demo_kv_free(t->kv);
	rmdir(t->dir);
	return s;
}

/* Waits (up to 3 s) until the server has `open` connections open. */
static void wait_open(const tsrv *t, uint64_t open)
{
	int64_t until = tu_now_ms() + 3000;
	while (stats(t).connections_open != open && tu_now_ms() < until)
		usleep(2000);
	cr_assert_eq(stats(t).connections_open, open);
}

/* ---- the client side ---- */

static int echo(ProtobufCService *svc, const char *payload, char *got, size_t got_len);

typedef struct outcome {
	int status;
	char text[64];
} outcome;

static void on_echo(const Demo__EchoReply *r, void *data)
{
	outcome *o = data;
	o->status = pbrpc_client_status(NULL);
	o->text[0] = 0;
	if (r)
		snprintf(o->text, sizeof(o->text), "%.*s", (int)r->payload.len, (const char *)r->payload.data);
}

static int echo(ProtobufCService *svc, const char *payload, char *got, size_t got_len)
{
	outcome o = { .status = -1 };
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)payload;
	req.payload.len = strlen(payload);
	demo__echo__echo(svc, &req, on_echo, &o);
	if (got)
		snprintf(got, got_len, "%s", o.text);
	return o.status;
}

static void echo_ok(ProtobufCService *svc, const char *payload)
{
	char got[64];
	int st = echo(svc, payload, got, sizeof(got));
	cr_assert_eq(st, PBRPC_STATUS_OK, "%s: %s", payload, pbrpc_status_name(st));
	cr_assert_str_eq(got, payload);
}

typedef struct cl {
	pbrpc_client *c;
	ProtobufCService *svc;
} cl;

/* Connects and makes one call, so that its loop has adopted it. */
static void cl_open(cl *k, const tsrv *t)
{
	cr_assert_eq(pbrpc_client_connect(&k->c, t->addr, NULL), 0);
	k->svc = pbrpc_client_service(k->c, &demo__echo__descriptor);
	echo_ok(k->svc, "hello");
}

static void cl_close(cl *k)
{
	pbrpc_client_free(k->c);
	k->c = NULL;
}

TestSuite(loops, .init = tu_setup, .timeout = 60);

/* ---- placement ---- */

static void spread(unsigned loops)
{
	tsrv t;
	start_server(&t, (pbrpc_server_opts){ .loop_threads = loops });
	cr_assert_eq(pbrpc_server_process(t.srv, 0), PBRPC_EINVALID);
	cr_assert_eq(pbrpc_server_fd(t.srv), PBRPC_EINVALID);
	enum { N = 16 };
	cl k[N];
	for (int i = 0; i < N; i++)
		cl_open(&k[i], &t);
	for (unsigned i = 0; i < loops; i++)
		cr_assert_eq(pbrpc__server_loop_conns(t.srv, i), N / loops, "loop %u has %u connections", i,
			     pbrpc__server_loop_conns(t.srv, i));
	cr_assert_eq(stats(&t).connections_open, N);
	cr_assert_eq(stats(&t).connections_accepted, N);
	/* Every one is still served, and one closed leaves room where it was. */
	for (int i = 0; i < N; i++)
		echo_ok(k[i].svc, "again");
	cl_close(&k[1]); /* on loop 1 */
	wait_open(&t, N - 1);
	cl_open(&k[1], &t);
	for (unsigned i = 0; i < loops; i++)
		cr_assert_eq(pbrpc__server_loop_conns(t.srv, i), N / loops);
	for (int i = 0; i < N; i++)
		cl_close(&k[i]);
	cr_assert_eq(stop_server(&t).calls_completed, 2 * N + 1); /* read after the loops ended */
}

Test(loops, connections_spread_over_2_loops)
{
	spread(2);
}

Test(loops, connections_spread_over_4_loops)
{
	spread(4);
}

/* ---- many threads ---- */

typedef struct worker_arg {
	const tsrv *t;
	int id, calls, bad;
} worker_arg;

static void *client_thread(void *arg)
{
	worker_arg *a = arg;
	cl k;
	if (pbrpc_client_connect(&k.c, a->t->addr, NULL) != 0) {
		a->bad = -1;
		return NULL;
	}
	k.svc = pbrpc_client_service(k.c, &demo__echo__descriptor);
	for (int i = 0; i < a->calls; i++) {
		char p[32], got[64];
		snprintf(p, sizeof(p), "t%d-%d", a->id, i);
		if (echo(k.svc, p, got, sizeof(got)) != PBRPC_STATUS_OK || strcmp(got, p) != 0)
			a->bad++;
	}
	pbrpc_client_free(k.c);
	return NULL;
}

static void many_threads(pbrpc_server_opts o)
{
	tsrv t;
	start_server(&t, o);
	enum { T = 8, CALLS = 300 };
	pthread_t thr[T];
	worker_arg a[T];
	for (int i = 0; i < T; i++) {
		a[i] = (worker_arg){ .t = &t, .id = i, .calls = CALLS };
		cr_assert_eq(pthread_create(&thr[i], NULL, client_thread, &a[i]), 0);
	}
	for (int i = 0; i < T; i++) {
		pthread_join(thr[i], NULL);
		cr_assert_eq(a[i].bad, 0, "thread %d: %d wrong replies", i, a[i].bad);
	}
	wait_open(&t, 0);
	pbrpc_server_stats s = stats(&t);
	cr_assert_eq(s.calls_completed, T * CALLS);
	cr_assert_eq(s.calls_in_flight, 0);
	if (o.workers)
		cr_assert_eq(atomic_load(&off_loop), T * CALLS);
	stop_server(&t);
}

Test(loops, concurrent_calls_from_many_threads_2_loops)
{
	many_threads((pbrpc_server_opts){ .loop_threads = 2 });
}

Test(loops, concurrent_calls_from_many_threads_4_loops_with_workers)
{
	many_threads((pbrpc_server_opts){ .loop_threads = 4, .workers = 2 });
}

/* A call is counted by the loop that owns its connection: client i (on loop
 * i) makes 3 * (i + 1) calls answered from a worker or a foreign thread;
 * a completion handed to another loop would be counted there. */
static void routed(pbrpc_server_opts o, bool foreign)
{
	tsrv t;
	start_server(&t, o);
	unsigned loops = o.loop_threads;
	cl k[4];
	for (unsigned i = 0; i < loops; i++)
		cl_open(&k[i], &t);
	for (unsigned i = 0; i < loops; i++)
		cr_assert_eq(pbrpc__server_loop_conns(t.srv, i), 1);
	uint64_t before[4];
	for (unsigned i = 0; i < loops; i++)
		before[i] = __atomic_load_n(&t.srv->loops[i]->stats.calls_completed, __ATOMIC_RELAXED);
	for (unsigned i = 0; i < loops; i++) {
		ProtobufCService *as = foreign ? pbrpc_client_service_async(k[i].c, &demo__echo__descriptor) : NULL;
		for (unsigned j = 0; j < 3 * (i + 1); j++) {
			if (!foreign) {
				echo_ok(k[i].svc, "work");
				continue;
			}
			/* held on the loop, answered from this thread: async call,
			 * released once the handler has it */
			outcome oc = { .status = -1 };
			Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
			req.payload.data = (uint8_t *)"hold-f";
			req.payload.len = 6;
			demo__echo__echo(as, &req, on_echo, &oc);
			int64_t until = tu_now_ms() + 3000;
			while (atomic_load(&n_held) == 0 && tu_now_ms() < until)
				usleep(1000);
			cr_assert_eq(atomic_load(&n_held), 1);
			release_held();
			until = tu_now_ms() + 3000;
			while (oc.status < 0 && tu_now_ms() < until)
				pbrpc_client_process(k[i].c, 20);
			cr_assert_eq(oc.status, PBRPC_STATUS_OK);
			cr_assert_str_eq(oc.text, "hold-f");
		}
	}
	for (unsigned i = 0; i < loops; i++) {
		uint64_t n = __atomic_load_n(&t.srv->loops[i]->stats.calls_completed, __ATOMIC_RELAXED) - before[i];
		cr_assert_eq(n, 3 * (i + 1), "loop %u completed %llu calls", i, (unsigned long long)n);
	}
	for (unsigned i = 0; i < loops; i++)
		cl_close(&k[i]);
	stop_server(&t);
}

Test(loops, worker_closures_answered_by_the_calls_loop)
{
	routed((pbrpc_server_opts){ .loop_threads = 4, .workers = 3 }, false);
	cr_assert_gt(atomic_load(&off_loop), 0);
}

Test(loops, foreign_thread_closures_answered_by_the_calls_loop)
{
	routed((pbrpc_server_opts){ .loop_threads = 2 }, true);
}

/* ---- shutdown ---- */

typedef struct hold_arg {
	const tsrv *t;
	int id;
	int status;
	char got[64];
} hold_arg;

static void *hold_thread(void *arg)
{
	hold_arg *a = arg;
	pbrpc_client *c;
	a->status = -1;
	if (pbrpc_client_connect(&c, a->t->addr, NULL) != 0)
		return NULL;
	char p[32];
	snprintf(p, sizeof(p), "hold-%d", a->id);
	a->status = echo(pbrpc_client_service(c, &demo__echo__descriptor), p, a->got, sizeof(a->got));
	pbrpc_client_free(c);
	return NULL;
}

Test(loops, shutdown_drains_every_loop_with_calls_in_flight)
{
	tsrv t;
	start_server(&t, (pbrpc_server_opts){ .loop_threads = 4 });
	enum { T = 8 };
	pthread_t thr[T];
	hold_arg a[T];
	for (int i = 0; i < T; i++) {
		a[i] = (hold_arg){ .t = &t, .id = i };
		cr_assert_eq(pthread_create(&thr[i], NULL, hold_thread, &a[i]), 0);
	}
	int64_t until = tu_now_ms() + 3000;
	while (atomic_load(&n_held) < T && tu_now_ms() < until)
		usleep(1000);
	cr_assert_eq(atomic_load(&n_held), T);
	for (unsigned i = 0; i < 4; i++)
		cr_assert_eq(pbrpc__server_loop_conns(t.srv, i), 2);
	pbrpc_server_shutdown(t.srv, -1); /* waits for every call */
	/* The loops drain but cannot finish: every one has calls in flight. */
	usleep(50 * 1000);
	cr_assert_not(atomic_load(&t.done));
	release_held();
	for (int i = 0; i < T; i++) {
		pthread_join(thr[i], NULL);
		char want[32];
		snprintf(want, sizeof(want), "hold-%d", i);
		cr_assert_eq(a[i].status, PBRPC_STATUS_OK, "call %d: %s", i, pbrpc_status_name(a[i].status));
		cr_assert_str_eq(a[i].got, want);
	}
	pthread_join(t.thr, NULL);
	cr_assert_eq(atomic_load(&t.rc), 0);
	cr_assert_eq(stats(&t).calls_completed, T);
	cr_assert_eq(stats(&t).connections_open, 0);
	pbrpc_server_free(t.srv);
	demo_kv_free(t.kv);
	rmdir(t.dir);
}

Test(loops, free_without_run_and_shutdown_before_run)
{
	pbrpc_server *s;
	cr_assert_eq(pbrpc_server_new(&s, &(pbrpc_server_opts){ .loop_threads = 3 }), 0);
	pbrpc_server_free(s);
	tsrv t;
	start_server(&t, (pbrpc_server_opts){ .loop_threads = 3 });
	stop_server(&t);
}

/* ---- the caps count every loop's connections ---- */

Test(loops, max_connections_across_loops)
{
	tsrv t;
	start_server(&t, (pbrpc_server_opts){ .loop_threads = 4, .max_connections = 5 });
	cl k[5];
	for (int i = 0; i < 5; i++)
		cl_open(&k[i], &t);
	pbrpc_client *extra = NULL;
	int rc = pbrpc_client_connect(&extra, t.addr, NULL);
	if (!tu_short_io())
		cr_assert_eq(rc, PBRPC_EGOAWAY, "connect: %s", pbrpc_strerror(rc));
	pbrpc_client_free(extra);
	cl_close(&k[3]); /* loop 3's */
	wait_open(&t, 4);
	cl_open(&k[3], &t);
	for (int i = 0; i < 5; i++)
		echo_ok(k[i].svc, "served");
	for (int i = 0; i < 5; i++)
		cl_close(&k[i]);
	cr_assert_geq(stop_server(&t).connections_refused, 1);
}

Test(loops, per_uid_cap_across_loops)
{
	tsrv t;
	start_server(&t, (pbrpc_server_opts){ .loop_threads = 4, .max_connections_per_uid = 3 });
	cl k[3];
	for (int i = 0; i < 3; i++)
		cl_open(&k[i], &t);
	pbrpc_client *extra = NULL;
	int rc = pbrpc_client_connect(&extra, t.addr, NULL);
	if (!tu_short_io())
		cr_assert_eq(rc, PBRPC_EGOAWAY, "connect: %s", pbrpc_strerror(rc));
	pbrpc_client_free(extra);
	wait_open(&t, 3);
	/* Closed on loop 2, released in root's table: room for one more. */
	cl_close(&k[2]);
	wait_open(&t, 2);
	cl_open(&k[2], &t);
	for (int i = 0; i < 3; i++)
		echo_ok(k[i].svc, "served");
	for (int i = 0; i < 3; i++)
		cl_close(&k[i]);
	cr_assert_geq(stop_server(&t).connections_refused, 1);
}

/* ---- streams on a loop other than 0 ---- */

Test(loops, stream_on_a_non_zero_loop)
{
	tsrv t;
	start_server(&t, (pbrpc_server_opts){ .loop_threads = 2 });
	cl first;
	cl_open(&first, &t); /* loop 0 */
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, t.addr, NULL), 0); /* loop 1 */
	pbrpc_client_stream *s;
	cr_assert_eq(pbrpc_client_stream_open(c, &d_echo, NULL, NULL, &s), 0);
	for (int i = 0; i < 50; i++) {
		char p[16], want[32];
		snprintf(p, sizeof(p), "m%d", i);
		snprintf(want, sizeof(want), "m%d@1", i);
		Demo__EchoRequest q = DEMO__ECHO_REQUEST__INIT;
		q.payload.data = (uint8_t *)p;
		q.payload.len = strlen(p);
		cr_assert_eq(pbrpc_client_stream_send(s, &q.base, -1), 0);
		const ProtobufCMessage *m;
		cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), 1);
		const Demo__EchoReply *r = (const Demo__EchoReply *)m;
		cr_assert_eq(r->payload.len, strlen(want));
		cr_assert_arr_eq(r->payload.data, want, strlen(want));
	}
	cr_assert_eq(atomic_load(&stream_loop), 1);
	/* Another thread reaches the stream through its loop. */
	cr_assert_eq(pbrpc_stream_post(atomic_load(&open_stream), s_posted, "posted"), 0);
	const ProtobufCMessage *m;
	cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), 1);
	const Demo__EchoReply *r = (const Demo__EchoReply *)m;
	cr_assert_eq(r->payload.len, strlen("posted@1"));
	cr_assert_arr_eq(r->payload.data, "posted@1", strlen("posted@1"));
	cr_assert_eq(pbrpc_client_stream_close_send(s), 0);
	cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), 0);
	pbrpc_client_stream_free(s);
	echo_ok(first.svc, "still");
	pbrpc_client_free(c);
	cl_close(&first);
	stop_server(&t);
}

/* ---- the example demo.Kv: a Watch on one loop sees Puts made on others ---- */

static const pbrpc_stream_desc d_watch = { "demo.Kv/Watch", PBRPC_STREAM_SERVER, &demo__watch_request__descriptor,
					   &demo__change__descriptor };

static void kv_put(pbrpc_client *c, const char *key, const char *val)
{
	Demo__PutRequest req = DEMO__PUT_REQUEST__INIT;
	req.key = (char *)key;
	req.value.data = (uint8_t *)val;
	req.value.len = strlen(val);
	ProtobufCMessage *reply = NULL;
	pbrpc_call_result res;
	cr_assert_eq(pbrpc_client_call(c, "demo.Kv/Put", &req.base, &demo__put_reply__descriptor, &reply, NULL, &res),
		     0, "Put %s: %s", key, res.message);
	protobuf_c_message_free_unpacked(reply, NULL);
}

static void watch_across(pbrpc_server_opts o)
{
	tsrv t;
	start_server(&t, o);
	enum { N = 4 };
	cl k[N]; /* one per loop: k[0] watches, the others put */
	for (int i = 0; i < N; i++)
		cl_open(&k[i], &t);
	for (unsigned i = 0; i < o.loop_threads; i++)
		cr_assert_eq(pbrpc__server_loop_conns(t.srv, i), N / o.loop_threads);
	Demo__WatchRequest wr = DEMO__WATCH_REQUEST__INIT;
	wr.prefix = "w/";
	pbrpc_client_stream *s;
	cr_assert_eq(pbrpc_client_stream_open(k[0].c, &d_watch, &wr.base, NULL, &s), 0);
	/* The watcher registers once the stream has opened: put until it sees one. */
	const ProtobufCMessage *m = NULL;
	int rc = 0;
	for (int tries = 0; tries < 100 && rc != 1; tries++) {
		kv_put(k[1].c, "w/ready", "r");
		rc = pbrpc_client_stream_next(s, &m, 50);
	}
	cr_assert_eq(rc, 1);
	/* Drain the extra "ready"s, then each loop's Put arrives, in order per putter. */
	kv_put(k[1].c, "w/mark", "m");
	do {
		cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), 1);
	} while (strcmp(((const Demo__Change *)m)->key, "w/mark") != 0);
	for (int i = 1; i < N; i++) {
		char key[16];
		snprintf(key, sizeof(key), "w/%d", i);
		kv_put(k[i].c, key, "v");
		kv_put(k[i].c, "x/ignored", "v");
		cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), 1);
		const Demo__Change *ch = (const Demo__Change *)m;
		cr_assert_str_eq(ch->key, key);
		cr_assert_eq(ch->kind, DEMO__CHANGE__KIND__PUT);
	}
	pbrpc_client_stream_free(s);
	for (int i = 0; i < N; i++)
		cl_close(&k[i]);
	stop_server(&t);
}

Test(loops, kv_watch_sees_puts_from_every_loop)
{
	watch_across((pbrpc_server_opts){ .loop_threads = 4 });
}

Test(loops, kv_watch_sees_puts_from_workers)
{
	watch_across((pbrpc_server_opts){ .loop_threads = 2, .workers = 2 });
}
