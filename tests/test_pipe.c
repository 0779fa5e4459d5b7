/* Pipelined async calls (issue 14 item 4): a burst of async calls leaves the
 * client in a few writes, and every deferred request still goes out at a
 * flush point (lib/include/pbrpc/client.h): the end of the process() round
 * whose closure queued it, the next process() or synchronous call, at once
 * when a user's loop watches pbrpc_client_fd(), or from the I/O thread. The
 * real server on its own thread, the real client on the test's thread (whose
 * sendmsg calls tu_io_thread_sends() counts). */
#include <criterion/criterion.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "demo_services.h"
#include "pbrpc/pbrpc.h"
#include "testutil.h"

/* lib/client: an async call within this many ns of the previous one is part
 * of a burst. An hour here, so that the calls each test makes back to back
 * are a burst however slowly this machine runs them. */
extern int64_t pbrpc__cl_burst_ns;

typedef struct pipe_server {
	pbrpc_server *srv;
	Demo__Echo_Service *echo;
	pthread_t thr;
	char addr[PBRPC_ENDPOINT_STRLEN];
	int rc;
} pipe_server;

static char tmpdir[64];

static void *run_server(void *arg)
{
	pipe_server *s = arg;
	s->rc = pbrpc_server_run(s->srv);
	return NULL;
}

static const char *unix_endpoint(void)
{
	static char ep[128];
	if (!tmpdir[0]) {
		snprintf(tmpdir, sizeof(tmpdir), "/tmp/pbrpc-pipe-XXXXXX");
		cr_assert_not_null(mkdtemp(tmpdir));
	}
	snprintf(ep, sizeof(ep), "unix:%s/pipe.sock", tmpdir);
	return ep;
}

static void server_start(pipe_server *s, const char *endpoint)
{
	memset(s, 0, sizeof(*s));
	s->echo = demo_echo_new();
	cr_assert_eq(pbrpc_server_new(&s->srv, NULL), 0);
	cr_assert_eq(pbrpc_server_add_service(s->srv, &s->echo->base), 0);
	int idx = pbrpc_server_listen(s->srv, endpoint);
	cr_assert_geq(idx, 0, "listen %s: %s", endpoint, pbrpc_strerror(idx));
	pbrpc_server_address(s->srv, idx, s->addr, sizeof(s->addr));
	cr_assert_eq(pthread_create(&s->thr, NULL, run_server, s), 0);
}

static void server_stop(pipe_server *s)
{
	pbrpc_server_shutdown(s->srv, 0);
	pthread_join(s->thr, NULL);
	cr_assert_eq(s->rc, 0);
	demo_echo_free(s->echo);
	pbrpc_server_free(s->srv);
}

static void setup(void)
{
	tu_setup();
	tu_io_counting();
	pbrpc__cl_burst_ns = 3600 * (int64_t)1000000000;
}

static void cleanup(void)
{
	if (tmpdir[0]) {
		char path[128];
		snprintf(path, sizeof(path), "%s/pipe.sock", tmpdir);
		unlink(path);
		rmdir(tmpdir);
		tmpdir[0] = 0;
	}
	tu_io_default();
}

TestSuite(pipe, .init = setup, .fini = cleanup, .timeout = 60);

/* ---- closures ---- */

typedef struct outcome {
	pthread_mutex_t *mu; /* io_thread tests: the closure runs there */
	pthread_cond_t *cv;
	int calls;
	int status;
	char text[64];
	ProtobufCService *then; /* a service to call from the closure */
	struct outcome *then_o;
	int then_n;
} outcome;

static void echo_call(ProtobufCService *svc, const char *payload, uint32_t delay_ms, outcome *o);

static void on_echo(const Demo__EchoReply *r, void *data)
{
	outcome *o = data;
	if (o->mu)
		pthread_mutex_lock(o->mu);
	o->calls++;
	o->status = pbrpc_client_status(NULL);
	if (r)
		snprintf(o->text, sizeof(o->text), "%.*s", (int)r->payload.len, (const char *)r->payload.data);
	for (int i = 0; i < o->then_n; i++) {
		char p[32];
		snprintf(p, sizeof(p), "then-%d", i);
		echo_call(o->then, p, 0, &o->then_o[i]);
	}
	if (o->cv)
		pthread_cond_broadcast(o->cv);
	if (o->mu)
		pthread_mutex_unlock(o->mu);
}

static void echo_call(ProtobufCService *svc, const char *payload, uint32_t delay_ms, outcome *o)
{
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)payload;
	req.payload.len = strlen(payload);
	req.delay_ms = delay_ms;
	demo__echo__echo(svc, &req, on_echo, o);
}

/* ---- a burst ---- */

static void burst(const char *endpoint)
{
	pipe_server s;
	server_start(&s, endpoint);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service_async(c, &demo__echo__descriptor);
	const int n = 128;
	outcome *o = calloc((size_t)n, sizeof(*o));
	tu_rng rng = { tu_seed() };
	char p[32];
	unsigned long sends0 = tu_io_thread_sends();
	for (int i = 0; i < n; i++) {
		snprintf(p, sizeof(p), "call-%d", i);
		/* Random delays: the server answers out of order. */
		echo_call(echo, p, (uint32_t)tu_rand_range(&rng, 0, 3), &o[i]);
	}
	cr_assert_eq(pbrpc_client_drain(c, 20000), 0);
	unsigned long sends = tu_io_thread_sends() - sends0;
	/* One write for the first call, one for the rest (1-byte mode: the
	 * burst's bytes in 143-byte writes, still far fewer than one a call). */
	cr_assert_lt(sends, (unsigned long)n / 2, "%lu writes for %d calls", sends, n);
	for (int i = 0; i < n; i++) {
		snprintf(p, sizeof(p), "call-%d", i);
		cr_assert_eq(o[i].calls, 1, "call %d completed %d times", i, o[i].calls);
		cr_assert_eq(o[i].status, PBRPC_STATUS_OK, "call %d: %s", i, pbrpc_status_name(o[i].status));
		cr_assert_str_eq(o[i].text, p);
	}
	free(o);
	pbrpc_client_free(c);
	server_stop(&s);
}

Test(pipe, burst_leaves_in_few_writes_unix)
{
	burst(unix_endpoint());
}

Test(pipe, burst_leaves_in_few_writes_tcp)
{
	burst("tcp:127.0.0.1:0");
}

/* What the stub sends itself: the first call on an idle connection, and
 * (bursts off) one made while another is in flight; in a burst it sends
 * only the first. */
Test(pipe, stub_sends_lone_calls_at_once)
{
	pipe_server s;
	server_start(&s, unix_endpoint());
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service_async(c, &demo__echo__descriptor);
	outcome o[4];
	memset(o, 0, sizeof(o));
	pbrpc__cl_burst_ns = 0; /* every call comes after a pause */
	unsigned long s0 = tu_io_thread_sends();
	echo_call(echo, "idle", 20000, &o[0]);
	uint32_t slow_id = pbrpc_client_last_call();
	unsigned long s1 = tu_io_thread_sends();
	cr_assert_gt(s1, s0, "the first call on an idle connection waited");
	echo_call(echo, "after-a-pause", 0, &o[1]);
	unsigned long s2 = tu_io_thread_sends();
	cr_assert_gt(s2, s1, "a call after a pause waited");
	pbrpc__cl_burst_ns = 3600 * (int64_t)1000000000;
	echo_call(echo, "burst-1", 0, &o[2]);
	echo_call(echo, "burst-2", 0, &o[3]);
	cr_assert_eq(tu_io_thread_sends(), s2, "a call in a burst was sent by its stub");
	while (o[3].calls == 0 || o[1].calls == 0 || o[2].calls == 0)
		cr_assert_geq(pbrpc_client_process(c, 30000), 0);
	cr_assert_eq(o[0].calls, 0);
	cr_assert_str_eq(o[1].text, "after-a-pause");
	cr_assert_str_eq(o[3].text, "burst-2");
	cr_assert_eq(pbrpc_client_cancel(c, slow_id), 0);
	cr_assert_eq(pbrpc_client_drain(c, 5000), 0);
	pbrpc_client_free(c);
	server_stop(&s);
}

/* Large requests: the writer sends once 64 KiB are queued, and every reply
 * still comes back whole. */
Test(pipe, burst_of_large_requests)
{
	pipe_server s;
	server_start(&s, unix_endpoint());
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service_async(c, &demo__echo__descriptor);
	const int n = (int)tu_scale(32);
	const size_t len = 20000;
	outcome *o = calloc((size_t)n, sizeof(*o));
	char *big = malloc(len + 1);
	for (int i = 0; i < n; i++) {
		memset(big, 'a' + i % 26, len);
		big[len] = 0;
		echo_call(echo, big, 0, &o[i]);
	}
	cr_assert_eq(pbrpc_client_drain(c, 20000), 0);
	for (int i = 0; i < n; i++) {
		cr_assert_eq(o[i].status, PBRPC_STATUS_OK, "call %d: %s", i, pbrpc_status_name(o[i].status));
		cr_assert_eq(o[i].text[0], 'a' + i % 26); /* text keeps the first 63 bytes */
		cr_assert_eq(strlen(o[i].text), sizeof(o[i].text) - 1);
	}
	free(big);
	free(o);
	pbrpc_client_free(c);
	server_stop(&s);
}

/* ---- flush points ---- */

/* Rule (c): a user's loop that only polls pbrpc_client_fd() sees it readable
 * while a request waits, calls process() and the request goes out: the fast
 * call completes while the slow one (sent first, at once) is still running. */
Test(pipe, external_loop_sends_deferred_call)
{
	pipe_server s;
	server_start(&s, unix_endpoint());
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service_async(c, &demo__echo__descriptor);
	int fd = pbrpc_client_fd(c);
	cr_assert_geq(fd, 0);
	outcome slow = { 0 }, fast = { 0 };
	echo_call(echo, "slow", 20000, &slow);
	uint32_t slow_id = pbrpc_client_last_call();
	echo_call(echo, "fast", 0, &fast);
	while (fast.calls == 0) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		cr_assert_eq(poll(&p, 1, 30000), 1, "the client's fd never became readable");
		cr_assert_geq(pbrpc_client_process(c, 0), 0);
	}
	cr_assert_eq(slow.calls, 0, "the fast request waited for the slow reply");
	cr_assert_eq(fast.status, PBRPC_STATUS_OK);
	cr_assert_str_eq(fast.text, "fast");
	cr_assert_eq(pbrpc_client_cancel(c, slow_id), 0);
	cr_assert_eq(pbrpc_client_drain(c, 5000), 0);
	cr_assert_eq(slow.status, PBRPC_STATUS_CANCELLED);
	pbrpc_client_free(c);
	server_stop(&s);
}

/* Rule (b): a synchronous call sends what async calls left queued. */
Test(pipe, sync_call_sends_deferred_call)
{
	pipe_server s;
	server_start(&s, unix_endpoint());
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service_async(c, &demo__echo__descriptor);
	ProtobufCService *secho = pbrpc_client_service(c, &demo__echo__descriptor);
	outcome slow = { 0 }, fast = { 0 }, sync = { 0 };
	echo_call(echo, "slow", 20000, &slow);
	uint32_t slow_id = pbrpc_client_last_call();
	echo_call(echo, "fast", 0, &fast);
	echo_call(secho, "sync", 0, &sync);
	cr_assert_eq(sync.status, PBRPC_STATUS_OK);
	cr_assert_str_eq(sync.text, "sync");
	while (fast.calls == 0)
		cr_assert_geq(pbrpc_client_process(c, 30000), 0);
	cr_assert_eq(slow.calls, 0, "the fast request waited for the slow reply");
	cr_assert_str_eq(fast.text, "fast");
	cr_assert_eq(pbrpc_client_cancel(c, slow_id), 0);
	cr_assert_eq(pbrpc_client_drain(c, 5000), 0);
	pbrpc_client_free(c);
	server_stop(&s);
}

/* Rule (a): calls made by a closure inside process() leave together when
 * the round ends: once process() returns, their replies come while nothing
 * else is sent (a slow call keeps the connection busy, so that none of them
 * is sent at once as the first call on an idle connection would be). */
Test(pipe, closure_calls_leave_at_end_of_round)
{
	pipe_server s;
	server_start(&s, unix_endpoint());
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service_async(c, &demo__echo__descriptor);
	int fd = pbrpc_client_fd(c);
	const int k = 32;
	outcome then[32];
	memset(then, 0, sizeof(then));
	outcome slow = { 0 }, first = { .then = echo, .then_o = then, .then_n = k };
	echo_call(echo, "slow", 20000, &slow);
	uint32_t slow_id = pbrpc_client_last_call();
	echo_call(echo, "first", 0, &first);
	while (first.calls == 0)
		cr_assert_geq(pbrpc_client_process(c, 30000), 0);
	unsigned long sends0 = tu_io_thread_sends();
	/* The user's loop from here on: the fd turns readable only if the
	 * requests went out (their replies) or still wait (EPOLLOUT). */
	while (then[k - 1].calls == 0) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		cr_assert_eq(poll(&p, 1, 30000), 1, "the closure's requests were not sent");
		cr_assert_geq(pbrpc_client_process(c, 0), 0);
	}
	cr_assert_eq(slow.calls, 0, "the closure's requests waited for the slow reply");
	cr_assert_eq(tu_io_thread_sends() - sends0, 0, "sent by the user's loop, not at the end of the round");
	for (int i = 0; i < k; i++) {
		char want[32];
		snprintf(want, sizeof(want), "then-%d", i);
		cr_assert_eq(then[i].status, PBRPC_STATUS_OK, "call %d: %s", i, pbrpc_status_name(then[i].status));
		cr_assert_str_eq(then[i].text, want);
	}
	cr_assert_eq(pbrpc_client_cancel(c, slow_id), 0);
	cr_assert_eq(pbrpc_client_drain(c, 5000), 0);
	pbrpc_client_free(c);
	server_stop(&s);
}

/* Rule (d): with opts.io_thread the I/O thread sends a deferred request
 * without waiting for an unrelated reply. */
Test(pipe, io_thread_sends_deferred_call)
{
	pipe_server s;
	server_start(&s, unix_endpoint());
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, &(pbrpc_client_opts){ .io_thread = true }), 0);
	ProtobufCService *echo = pbrpc_client_service_async(c, &demo__echo__descriptor);
	pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
	pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
	outcome lone = { .mu = &mu, .cv = &cv }, slow = { .mu = &mu, .cv = &cv }, fast = { .mu = &mu, .cv = &cv };
	/* A lone call on an idle connection. */
	echo_call(echo, "lone", 0, &lone);
	pthread_mutex_lock(&mu);
	while (lone.calls == 0)
		pthread_cond_wait(&cv, &mu);
	pthread_mutex_unlock(&mu);
	cr_assert_str_eq(lone.text, "lone");
	/* One queued behind a call in flight. */
	echo_call(echo, "slow", 20000, &slow);
	uint32_t slow_id = pbrpc_client_last_call();
	echo_call(echo, "fast", 0, &fast);
	pthread_mutex_lock(&mu);
	while (fast.calls == 0)
		pthread_cond_wait(&cv, &mu);
	int slow_calls = slow.calls;
	pthread_mutex_unlock(&mu);
	cr_assert_eq(slow_calls, 0, "the fast request waited for the slow reply");
	cr_assert_str_eq(fast.text, "fast");
	cr_assert_eq(pbrpc_client_cancel(c, slow_id), 0);
	pthread_mutex_lock(&mu);
	while (slow.calls == 0)
		pthread_cond_wait(&cv, &mu);
	pthread_mutex_unlock(&mu);
	cr_assert_eq(slow.status, PBRPC_STATUS_CANCELLED);
	pbrpc_client_free(c);
	server_stop(&s);
}

/* Deadlines and cancels of requests still queued: the deadline fires, the
 * cancel (its CANCEL frame queued behind the REQUEST) runs the closure with
 * CANCELLED, and the connection goes on serving. */
Test(pipe, deadline_and_cancel_of_deferred_calls)
{
	pipe_server s;
	server_start(&s, unix_endpoint());
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service_async(c, &demo__echo__descriptor);
	outcome slow = { 0 }, timed = { 0 }, cancelled = { 0 }, after = { 0 };
	echo_call(echo, "slow", 20000, &slow);
	uint32_t slow_id = pbrpc_client_last_call();
	pbrpc_client_next_call(&(pbrpc_call_opts){ .timeout_ms = 50 });
	echo_call(echo, "timed", 20000, &timed);
	echo_call(echo, "cancelled", 20000, &cancelled);
	cr_assert_eq(pbrpc_client_cancel(c, pbrpc_client_last_call()), 0);
	cr_assert_eq(pbrpc_client_cancel(c, slow_id), 0);
	cr_assert_eq(pbrpc_client_drain(c, 10000), 0);
	cr_assert_eq(timed.calls, 1);
	cr_assert_eq(timed.status, PBRPC_STATUS_DEADLINE_EXCEEDED, "got %s", pbrpc_status_name(timed.status));
	cr_assert_eq(cancelled.status, PBRPC_STATUS_CANCELLED, "got %s", pbrpc_status_name(cancelled.status));
	cr_assert_eq(slow.status, PBRPC_STATUS_CANCELLED);
	echo_call(echo, "after", 0, &after);
	cr_assert_eq(pbrpc_client_drain(c, 10000), 0);
	cr_assert_eq(after.status, PBRPC_STATUS_OK);
	cr_assert_str_eq(after.text, "after");
	pbrpc_client_free(c);
	server_stop(&s);
}
