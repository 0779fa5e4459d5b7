/* Streams (issue 10, docs/PROTOCOL.md section 11): the real server (in
 * process, on its own thread) and the real client, plus a raw peer (frame
 * and wire layers only) for the protocol's violations and for what a
 * well-behaved client library would never send.
 *
 * The methods (registered by name, demo.EchoRequest in, demo.EchoReply out):
 *   t.S/Count  server stream: sends N numbered messages (N = the request's
 *              delay_ms), then OK; delay_ms 0: sends for ever, counting what
 *              pbrpc_stream_send accepted (the flow-control test)
 *   t.S/Sum    client stream: counts the client's messages, answers one
 *              reply with the count and the bytes at the half-close
 *   t.S/Echo   bidi: echoes each message; payload "end" ends it OK,
 *              "fail" ends it with PERMISSION_DENIED; half-close ends OK
 *   t.S/Hold   bidi: holds the stream open, reads nothing (paused), and
 *              records how it ended (on_cancel)
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "echo.pb-c.h"
#include "pbrpc/client.h"
#include "pbrpc/endpoint.h"
#include "pbrpc/server.h"
#include "pbrpc/stream.h"
#include "proto/frame.h"
#include "proto/wire.h"
#include "testutil.h"

#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif
#ifndef UNDER_ASAN
#define UNDER_ASAN 0
#endif

static const pbrpc_stream_desc d_count = { "t.S/Count", PBRPC_STREAM_SERVER, &demo__echo_request__descriptor,
					   &demo__echo_reply__descriptor };
static const pbrpc_stream_desc d_sum = { "t.S/Sum", PBRPC_STREAM_CLIENT, &demo__echo_request__descriptor,
					 &demo__echo_reply__descriptor };
static const pbrpc_stream_desc d_echo = { "t.S/Echo", PBRPC_STREAM_BIDI, &demo__echo_request__descriptor,
					  &demo__echo_reply__descriptor };
static const pbrpc_stream_desc d_hold = { "t.S/Hold", PBRPC_STREAM_BIDI, &demo__echo_request__descriptor,
					  &demo__echo_reply__descriptor };

/* ---- what the server saw ---- */
static atomic_long sent_bytes;    /* Count forever: bytes accepted by pbrpc_stream_send */
static atomic_int n_eagain;       /* ...and how often it was told to wait */
static atomic_int hold_open;      /* Hold streams live */
static atomic_int hold_over;      /* Hold streams that ended by on_cancel */
static atomic_int hold_status;    /* pbrpc_stream_status() of the last one */
static atomic_int hold_msgs;      /* messages delivered to Hold (paused: none) */

/* ---- t.S/Count ---- */

typedef struct count_st {
	uint32_t n, sent; /* n 0: for ever */
} count_st;

static void count_pump(pbrpc_stream *st, void *user)
{
	count_st *s = user;
	uint8_t buf[32] = { 0 };
	Demo__EchoReply r = DEMO__ECHO_REPLY__INIT;
	r.payload.data = buf;
	r.payload.len = sizeof(buf) - 4; /* a 30-byte message with the tag and length */
	while (!s->n || s->sent < s->n) {
		buf[0] = (uint8_t)(s->sent >> 24);
		buf[1] = (uint8_t)(s->sent >> 16);
		buf[2] = (uint8_t)(s->sent >> 8);
		buf[3] = (uint8_t)s->sent;
		int rc = pbrpc_stream_send(st, &r.base);
		if (rc == -EAGAIN) {
			atomic_fetch_add(&n_eagain, 1);
			return; /* on_writable comes back */
		}
		if (rc < 0)
			return; /* over: on_cancel ends it */
		if (!s->n)
			atomic_fetch_add(&sent_bytes, (long)PBRPC_WIRE_MESSAGE_COST(protobuf_c_message_get_packed_size(&r.base)));
		s->sent++;
	}
	free(s);
	pbrpc_stream_end(st, PBRPC_STATUS_OK, NULL, NULL);
}

static void count_cancel(pbrpc_stream *st, void *user)
{
	free(user);
	pbrpc_stream_end(st, 0, NULL, NULL);
}

static const pbrpc_stream_ops count_ops = { .on_writable = count_pump, .on_cancel = count_cancel };

static void count_handler(pbrpc_stream *st, const ProtobufCMessage *req, void *user)
{
	(void)user;
	const Demo__EchoRequest *q = (const Demo__EchoRequest *)req;
	cr_assert(req && req->descriptor == &demo__echo_request__descriptor);
	count_st *s = calloc(1, sizeof(*s));
	s->n = q->delay_ms;
	pbrpc_stream_set_ops(st, &count_ops, s);
	count_pump(st, s);
}

/* ---- t.S/Sum ---- */

typedef struct sum_st {
	uint32_t n;
	uint64_t bytes;
	uint32_t last; /* ordering: each message carries its index */
	bool bad_order;
} sum_st;

static void sum_msg(pbrpc_stream *st, const ProtobufCMessage *m, void *user)
{
	(void)st;
	sum_st *s = user;
	const Demo__EchoRequest *q = (const Demo__EchoRequest *)m;
	if (q->delay_ms != s->n)
		s->bad_order = true;
	s->n++;
	s->bytes += q->payload.len;
}

static void sum_done(pbrpc_stream *st, void *user)
{
	sum_st *s = user;
	char text[64];
	snprintf(text, sizeof(text), "%u %llu%s", s->n, (unsigned long long)s->bytes, s->bad_order ? " disorder" : "");
	Demo__EchoReply r = DEMO__ECHO_REPLY__INIT;
	r.payload.data = (uint8_t *)text;
	r.payload.len = strlen(text);
	free(s);
	pbrpc_stream_end(st, PBRPC_STATUS_OK, &r.base, NULL);
}

static const pbrpc_stream_ops sum_ops = { .on_message = sum_msg, .on_half_close = sum_done, .on_cancel = count_cancel };

static void sum_handler(pbrpc_stream *st, const ProtobufCMessage *req, void *user)
{
	(void)user;
	cr_assert_null(req);
	pbrpc_stream_set_ops(st, &sum_ops, calloc(1, sizeof(sum_st)));
}

/* ---- t.S/Echo ---- */

static void echo_msg(pbrpc_stream *st, const ProtobufCMessage *m, void *user)
{
	(void)user;
	const Demo__EchoRequest *q = (const Demo__EchoRequest *)m;
	if (q->payload.len == 3 && memcmp(q->payload.data, "end", 3) == 0) {
		pbrpc_stream_end(st, PBRPC_STATUS_OK, NULL, NULL);
		return;
	}
	if (q->payload.len == 4 && memcmp(q->payload.data, "fail", 4) == 0) {
		pbrpc_stream_end(st, PBRPC_STATUS_PERMISSION_DENIED, NULL, "no %s", "way");
		return;
	}
	Demo__EchoReply r = DEMO__ECHO_REPLY__INIT;
	r.payload = q->payload;
	int rc = pbrpc_stream_send(st, &r.base);
	if (rc < 0 && rc != PBRPC_ECLOSED)
		pbrpc_stream_end(st, PBRPC_STATUS_INTERNAL, NULL, "send: %s", pbrpc_strerror(rc));
}

static void echo_half(pbrpc_stream *st, void *user)
{
	(void)user;
	pbrpc_stream_end(st, PBRPC_STATUS_OK, NULL, NULL);
}

static void echo_cancel(pbrpc_stream *st, void *user)
{
	(void)user;
	pbrpc_stream_end(st, 0, NULL, NULL);
}

static const pbrpc_stream_ops echo_ops = { .on_message = echo_msg, .on_half_close = echo_half,
					   .on_cancel = echo_cancel };

static void echo_handler(pbrpc_stream *st, const ProtobufCMessage *req, void *user)
{
	(void)user;
	(void)req;
	cr_assert_eq(pbrpc_stream_get_kind(st), PBRPC_STREAM_BIDI);
	cr_assert_str_eq(pbrpc_stream_method(st), "t.S/Echo");
	size_t len = 0;
	const void *v = pbrpc_stream_metadata(st, "x-fail", &len);
	if (v) {
		pbrpc_stream_end(st, PBRPC_STATUS_FAILED_PRECONDITION, NULL, "%.*s", (int)len, (const char *)v);
		return;
	}
	pbrpc_stream_set_ops(st, &echo_ops, NULL);
}

/* ---- t.S/Hold ---- */

static void hold_msg(pbrpc_stream *st, const ProtobufCMessage *m, void *user)
{
	(void)st;
	(void)m;
	(void)user;
	atomic_fetch_add(&hold_msgs, 1);
}

static void hold_cancel(pbrpc_stream *st, void *user)
{
	(void)user;
	atomic_store(&hold_status, pbrpc_stream_status(st));
	cr_assert(pbrpc_stream_cancelled(st));
	atomic_fetch_add(&hold_over, 1);
	atomic_fetch_sub(&hold_open, 1);
	cr_assert_eq(pbrpc_stream_end(st, 0, NULL, NULL), PBRPC_ECLOSED);
}

static const pbrpc_stream_ops hold_ops = { .on_message = hold_msg, .on_cancel = hold_cancel };

static void hold_handler(pbrpc_stream *st, const ProtobufCMessage *req, void *user)
{
	(void)req;
	(void)user;
	atomic_fetch_add(&hold_open, 1);
	pbrpc_stream_pause(st, true);
	pbrpc_stream_set_ops(st, &hold_ops, NULL);
}

/* ---- a unary service beside them: demo.Echo ---- */

static void unary_echo(Demo__Echo_Service *svc, const Demo__EchoRequest *req, Demo__EchoReply_Closure closure,
		       void *data)
{
	(void)svc;
	Demo__EchoReply r = DEMO__ECHO_REPLY__INIT;
	r.payload = req->payload;
	closure(&r, data);
}
static Demo__Echo_Service echo_svc = DEMO__ECHO__INIT(unary_);

/* ---- the server on its thread ---- */

typedef struct tsrv {
	pbrpc_server *srv;
	pthread_t thr;
	atomic_bool stop;
	char addr[128];
	int rc;
} tsrv;

static char sock_dir[64];

static void *srv_main(void *arg)
{
	tsrv *t = arg;
	if (tu_loop_threads() > 1) {
		t->rc = pbrpc_server_run(t->srv);
		return NULL;
	}
	while (!atomic_load(&t->stop)) {
		int rc = pbrpc_server_process(t->srv, 20);
		if (rc != 0) {
			t->rc = rc < 0 ? rc : 0;
			break;
		}
	}
	return NULL;
}

static void srv_start(tsrv *t, const pbrpc_server_opts *opts)
{
	memset(t, 0, sizeof(*t));
	snprintf(sock_dir, sizeof(sock_dir), "/tmp/pbrpc-stream-XXXXXX");
	cr_assert_not_null(mkdtemp(sock_dir));
	char ep[128];
	snprintf(ep, sizeof(ep), "unix:%s/s.sock", sock_dir);
	pbrpc_server_opts lo = opts ? *opts : (pbrpc_server_opts){ 0 };
	if (!lo.loop_threads)
		lo.loop_threads = tu_loop_threads();
	cr_assert_eq(pbrpc_server_new(&t->srv, &lo), 0);
	cr_assert_eq(pbrpc_server_add_service(t->srv, &echo_svc.base), 0);
	cr_assert_eq(pbrpc_server_add_stream(t->srv, &d_count, count_handler, NULL), 0);
	cr_assert_eq(pbrpc_server_add_stream(t->srv, &d_sum, sum_handler, NULL), 0);
	cr_assert_eq(pbrpc_server_add_stream(t->srv, &d_echo, echo_handler, NULL), 0);
	cr_assert_eq(pbrpc_server_add_stream(t->srv, &d_hold, hold_handler, NULL), 0);
	cr_assert_eq(pbrpc_server_add_stream(t->srv, &d_hold, hold_handler, NULL), PBRPC_EDUPLICATE);
	int idx = pbrpc_server_listen(t->srv, ep);
	cr_assert_geq(idx, 0);
	pbrpc_server_address(t->srv, idx, t->addr, sizeof(t->addr));
	cr_assert_eq(pthread_create(&t->thr, NULL, srv_main, t), 0);
}

static void srv_stop(tsrv *t)
{
	pbrpc_server_shutdown(t->srv, 1000);
	pthread_join(t->thr, NULL);
	cr_assert_eq(t->rc, 0);
	pbrpc_server_free(t->srv);
	char p[128];
	snprintf(p, sizeof(p), "%s/s.sock", sock_dir);
	unlink(p);
	rmdir(sock_dir);
}

/* The server vanishes without a word. */
static void srv_kill(tsrv *t)
{
	atomic_store(&t->stop, true);
	if (tu_loop_threads() > 1)
		pbrpc_server_shutdown(t->srv, 0); /* pbrpc_server_run: no vanishing */
	pthread_join(t->thr, NULL);
	pbrpc_server_free(t->srv);
}

static void setup(void)
{
	tu_setup();
	atomic_store(&sent_bytes, 0);
	atomic_store(&n_eagain, 0);
	atomic_store(&hold_open, 0);
	atomic_store(&hold_over, 0);
	atomic_store(&hold_status, -1);
	atomic_store(&hold_msgs, 0);
}

TestSuite(stream, .init = setup, .timeout = 60);

static pbrpc_client *client(const tsrv *t)
{
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, t->addr, NULL), 0);
	return c;
}

static Demo__EchoRequest req_of(const char *payload, uint32_t n)
{
	Demo__EchoRequest q = DEMO__ECHO_REQUEST__INIT;
	q.payload.data = (uint8_t *)payload;
	q.payload.len = payload ? strlen(payload) : 0;
	q.delay_ms = n;
	return q;
}

static int status_of(pbrpc_client_stream *s, const char **msg)
{
	return pbrpc_client_stream_status(s, msg);
}

/* Waits (up to 5 s) until *v reaches want. */
static bool wait_int(atomic_int *v, int want)
{
	for (int i = 0; i < 500 && atomic_load(v) != want; i++)
		usleep(10000);
	return atomic_load(v) == want;
}

/* ---- the three kinds, in order ---- */

static uint32_t index_of(const ProtobufCMessage *m)
{
	const Demo__EchoReply *r = (const Demo__EchoReply *)m;
	cr_assert_geq(r->payload.len, 4);
	const uint8_t *b = r->payload.data;
	return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

Test(stream, server_stream_in_order)
{
	tsrv t;
	srv_start(&t, NULL);
	pbrpc_client *c = client(&t);
	uint32_t n = (uint32_t)tu_scale(20000);
	Demo__EchoRequest q = req_of(NULL, n);
	pbrpc_client_stream *s;
	cr_assert_eq(pbrpc_client_stream_open(c, &d_count, &q.base, NULL, &s), 0);
	const ProtobufCMessage *m;
	uint32_t got = 0;
	int rc;
	while ((rc = pbrpc_client_stream_next(s, &m, 5000)) == 1) {
		cr_assert_eq(index_of(m), got, "message %u came as %u", got, index_of(m));
		got++;
	}
	cr_assert_eq(rc, 0, "next: %s", pbrpc_strerror(rc));
	cr_assert_eq(got, n);
	cr_assert_eq(status_of(s, NULL), PBRPC_STATUS_OK);
	/* A server stream has nothing to send, and its sending is closed. */
	cr_assert_eq(pbrpc_client_stream_send(s, &q.base, 0), PBRPC_EINVALID);
	cr_assert_eq(pbrpc_client_stream_close_send(s), 0);
	pbrpc_client_stream_free(s);
	pbrpc_client_free(c);
	srv_stop(&t);
}

Test(stream, client_stream_in_order)
{
	tsrv t;
	srv_start(&t, NULL);
	pbrpc_client *c = client(&t);
	pbrpc_client_stream *s;
	cr_assert_eq(pbrpc_client_stream_open(c, &d_sum, NULL, NULL, &s), 0);
	uint32_t n = (uint32_t)tu_scale(10000);
	for (uint32_t i = 0; i < n; i++) {
		Demo__EchoRequest q = req_of("abcd", i);
		int rc = pbrpc_client_stream_send(s, &q.base, -1);
		cr_assert_eq(rc, 0, "send %u: %s", i, pbrpc_strerror(rc));
	}
	cr_assert_eq(pbrpc_client_stream_close_send(s), 0);
	Demo__EchoRequest q = req_of("x", 0);
	cr_assert_eq(pbrpc_client_stream_send(s, &q.base, 0), PBRPC_EINVALID, "no send after close_send");
	const ProtobufCMessage *m;
	cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), 1);
	const Demo__EchoReply *r = (const Demo__EchoReply *)m;
	char want[64];
	snprintf(want, sizeof(want), "%u %u", n, n * 4);
	cr_assert_eq(r->payload.len, strlen(want));
	cr_assert_arr_eq(r->payload.data, want, strlen(want));
	cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), 0);
	cr_assert_eq(status_of(s, NULL), PBRPC_STATUS_OK);
	pbrpc_client_stream_free(s);
	pbrpc_client_free(c);
	srv_stop(&t);
}

Test(stream, bidi_echo_and_statuses)
{
	tsrv t;
	srv_start(&t, NULL);
	pbrpc_client *c = client(&t);
	pbrpc_client_stream *s;
	cr_assert_eq(pbrpc_client_stream_open(c, &d_echo, NULL, NULL, &s), 0);
	for (int i = 0; i < 100; i++) {
		char p[16];
		snprintf(p, sizeof(p), "m%d", i);
		Demo__EchoRequest q = req_of(p, 0);
		cr_assert_eq(pbrpc_client_stream_send(s, &q.base, -1), 0);
		const ProtobufCMessage *m;
		cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), 1);
		const Demo__EchoReply *r = (const Demo__EchoReply *)m;
		cr_assert_eq(r->payload.len, strlen(p));
		cr_assert_arr_eq(r->payload.data, p, strlen(p));
	}
	cr_assert_eq(status_of(s, NULL), -EINPROGRESS);
	cr_assert_eq(pbrpc_client_stream_close_send(s), 0);
	const ProtobufCMessage *m;
	cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), 0);
	cr_assert_eq(status_of(s, NULL), PBRPC_STATUS_OK);
	pbrpc_client_stream_free(s);

	/* The server ends with a status of its own mid-stream. */
	cr_assert_eq(pbrpc_client_stream_open(c, &d_echo, NULL, NULL, &s), 0);
	Demo__EchoRequest q = req_of("fail", 0);
	cr_assert_eq(pbrpc_client_stream_send(s, &q.base, -1), 0);
	cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), PBRPC_ESTATUS);
	const char *msg;
	cr_assert_eq(status_of(s, &msg), PBRPC_STATUS_PERMISSION_DENIED);
	cr_assert_str_eq(msg, "no way");
	cr_assert_eq(pbrpc_client_stream_send(s, &q.base, 0), PBRPC_ESTATUS);
	pbrpc_client_stream_free(s);

	/* Metadata reaches the handler, which refuses at once. */
	pbrpc_metadata md = { .key = "x-fail", .value = "nope", .value_len = 4 };
	pbrpc_stream_opts o = { .metadata = &md, .metadata_count = 1 };
	cr_assert_eq(pbrpc_client_stream_open(c, &d_echo, NULL, &o, &s), 0);
	cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), PBRPC_ESTATUS);
	cr_assert_eq(status_of(s, &msg), PBRPC_STATUS_FAILED_PRECONDITION);
	cr_assert_str_eq(msg, "nope");
	pbrpc_client_stream_free(s);
	pbrpc_client_free(c);
	srv_stop(&t);
}

Test(stream, wrong_kind_and_unknown_method_refused)
{
	tsrv t;
	srv_start(&t, NULL);
	pbrpc_client *c = client(&t);
	const ProtobufCMessage *m;
	const char *msg;
	pbrpc_client_stream *s;
	/* Echo is bidirectional: opening it as a client stream is refused. */
	pbrpc_stream_desc wrong = d_echo;
	wrong.kind = PBRPC_STREAM_CLIENT;
	cr_assert_eq(pbrpc_client_stream_open(c, &wrong, NULL, NULL, &s), 0);
	cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), PBRPC_ESTATUS);
	cr_assert_eq(status_of(s, &msg), PBRPC_STATUS_UNIMPLEMENTED);
	cr_assert(strstr(msg, "bidirectional"), "%s", msg);
	pbrpc_client_stream_free(s);
	/* A unary call to a stream method (as protoc-c's stub would make). */
	Demo__EchoRequest q = req_of("x", 0);
	ProtobufCMessage *reply = NULL;
	pbrpc_call_result res;
	cr_assert_eq(pbrpc_client_call(c, "t.S/Echo", &q.base, &demo__echo_reply__descriptor, &reply, NULL, &res),
		     PBRPC_ESTATUS);
	cr_assert_eq(res.status, PBRPC_STATUS_UNIMPLEMENTED);
	cr_assert(strstr(res.message, "called as unary"), "%s", res.message);
	/* A stream to a unary method. */
	pbrpc_stream_desc un = { "demo.Echo/Echo", PBRPC_STREAM_SERVER, &demo__echo_request__descriptor,
				 &demo__echo_reply__descriptor };
	cr_assert_eq(pbrpc_client_stream_open(c, &un, &q.base, NULL, &s), 0);
	cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), PBRPC_ESTATUS);
	cr_assert_eq(status_of(s, &msg), PBRPC_STATUS_UNIMPLEMENTED);
	pbrpc_client_stream_free(s);
	pbrpc_stream_desc none = { "t.S/Nope", PBRPC_STREAM_BIDI, &demo__echo_request__descriptor,
				   &demo__echo_reply__descriptor };
	cr_assert_eq(pbrpc_client_stream_open(c, &none, NULL, NULL, &s), 0);
	cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), PBRPC_ESTATUS);
	cr_assert_eq(status_of(s, NULL), PBRPC_STATUS_UNIMPLEMENTED);
	pbrpc_client_stream_free(s);
	/* Bad arguments fail locally. */
	cr_assert_eq(pbrpc_client_stream_open(c, &d_count, NULL, NULL, &s), PBRPC_EINVALID);
	cr_assert_null(s);
	cr_assert_eq(pbrpc_client_stream_open(c, &d_echo, &q.base, NULL, &s), PBRPC_EINVALID);
	pbrpc_stream_desc bad = { "nope", PBRPC_STREAM_BIDI, &demo__echo_request__descriptor,
				  &demo__echo_reply__descriptor };
	cr_assert_eq(pbrpc_client_stream_open(c, &bad, NULL, NULL, &s), PBRPC_EINVALID);
	pbrpc_client_free(c);
	srv_stop(&t);
}

/* ---- flow control ---- */

/* A consumer that does not read: the producer's accepted bytes stay within
 * the window (without flow control they grow for as long as the socket and
 * the client take them: megabytes), while another stream and unary calls
 * on the same connection keep flowing. */
Test(stream, stalled_consumer_bounds_producer_others_flow)
{
	const uint32_t window = 16384;
	pbrpc_server_opts so = { .stream_window = window };
	tsrv t;
	srv_start(&t, &so);
	pbrpc_client_opts co = { .stream_window = window };
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, t.addr, &co), 0);
	Demo__EchoRequest q = req_of(NULL, 0); /* for ever */
	pbrpc_client_stream *stalled;
	cr_assert_eq(pbrpc_client_stream_open(c, &d_count, &q.base, NULL, &stalled), 0);

	/* Meanwhile, on the same connection: a whole stream and unary calls. */
	ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);
	for (int round = 0; round < 20; round++) {
		pbrpc_client_stream *s;
		Demo__EchoRequest n = req_of(NULL, 500);
		cr_assert_eq(pbrpc_client_stream_open(c, &d_count, &n.base, NULL, &s), 0);
		const ProtobufCMessage *m;
		uint32_t got = 0;
		int rc;
		while ((rc = pbrpc_client_stream_next(s, &m, 5000)) == 1)
			got++;
		cr_assert_eq(rc, 0, "round %d: %s", round, pbrpc_strerror(rc));
		cr_assert_eq(got, 500);
		pbrpc_client_stream_free(s);
		Demo__EchoRequest u = req_of("ping", 0);
		ProtobufCMessage *reply = NULL;
		pbrpc_call_result res;
		cr_assert_eq(pbrpc_client_call(c, "demo.Echo/Echo", &u.base, &demo__echo_reply__descriptor, &reply, NULL,
					       &res),
			     0, "%s", res.message);
		protobuf_c_message_free_unpacked(reply, NULL);
	}
	(void)echo;
	usleep(200000);
	long sent = atomic_load(&sent_bytes);
	/* The window plus one message: a sender may start a message while its
	 * credit is positive. */
	cr_assert_leq(sent, (long)window + 64, "producer sent %ld bytes into a %u-byte window", sent, window);
	cr_assert_geq(sent, (long)window / 2, "the window was not used: %ld", sent);
	cr_assert_geq(atomic_load(&n_eagain), 1);
	/* Now read: everything flows again, and in order. */
	const ProtobufCMessage *m;
	for (uint32_t i = 0; i < 5000; i++) {
		cr_assert_eq(pbrpc_client_stream_next(stalled, &m, 5000), 1);
		cr_assert_eq(index_of(m), i);
	}
	cr_assert_gt(atomic_load(&sent_bytes), 5000L * 40);
	pbrpc_client_stream_cancel(stalled);
	cr_assert_eq(pbrpc_client_stream_next(stalled, &m, 5000), PBRPC_ESTATUS);
	cr_assert_eq(status_of(stalled, NULL), PBRPC_STATUS_CANCELLED);
	pbrpc_client_stream_free(stalled);
	pbrpc_client_free(c);
	srv_stop(&t);
}

/* The other way: a handler that stops reading (paused) stops the client's
 * sender at the server's window; a blocking send then waits and times out. */
Test(stream, paused_handler_bounds_client_sender)
{
	const uint32_t window = 8192;
	pbrpc_server_opts so = { .stream_window = window };
	tsrv t;
	srv_start(&t, &so);
	pbrpc_client *c = client(&t);
	pbrpc_client_stream *s;
	cr_assert_eq(pbrpc_client_stream_open(c, &d_hold, NULL, NULL, &s), 0);
	Demo__EchoRequest q = req_of("0123456789012345678901234567", 0);
	size_t cost = (size_t)PBRPC_WIRE_MESSAGE_COST(protobuf_c_message_get_packed_size(&q.base));
	size_t sent = 0;
	int rc;
	while ((rc = pbrpc_client_stream_send(s, &q.base, 0)) == 0)
		sent += cost;
	cr_assert_eq(rc, -EAGAIN);
	cr_assert_leq(sent, window + cost);
	cr_assert_geq(sent, window);
	int64_t t0 = tu_now_ms();
	cr_assert_eq(pbrpc_client_stream_send(s, &q.base, 100), -ETIMEDOUT);
	cr_assert_geq(tu_now_ms() - t0, 90);
	cr_assert_eq(atomic_load(&hold_msgs), 0);
	pbrpc_client_stream_free(s); /* cancels it */
	cr_assert(wait_int(&hold_over, 1));
	cr_assert_eq(atomic_load(&hold_status), PBRPC_STATUS_CANCELLED);
	pbrpc_client_free(c);
	srv_stop(&t);
}

/* ---- ending early ---- */

Test(stream, client_cancel_at_each_phase)
{
	tsrv t;
	srv_start(&t, NULL);
	pbrpc_client *c = client(&t);
	const ProtobufCMessage *m;
	for (int phase = 0; phase < 3; phase++) {
		atomic_store(&hold_over, 0);
		pbrpc_client_stream *s;
		cr_assert_eq(pbrpc_client_stream_open(c, &d_hold, NULL, NULL, &s), 0);
		Demo__EchoRequest q = req_of("x", 0);
		if (phase >= 1)
			cr_assert_eq(pbrpc_client_stream_send(s, &q.base, -1), 0);
		if (phase >= 2)
			cr_assert_eq(pbrpc_client_stream_close_send(s), 0);
		cr_assert(wait_int(&hold_open, 1));
		pbrpc_client_stream_cancel(s);
		pbrpc_client_stream_cancel(s); /* again: harmless */
		cr_assert_eq(pbrpc_client_stream_next(s, &m, 0), PBRPC_ESTATUS);
		cr_assert_eq(status_of(s, NULL), PBRPC_STATUS_CANCELLED);
		cr_assert_eq(pbrpc_client_stream_send(s, &q.base, 0), PBRPC_ESTATUS);
		cr_assert(wait_int(&hold_over, 1), "phase %d: the handler heard no cancel", phase);
		cr_assert_eq(atomic_load(&hold_status), PBRPC_STATUS_CANCELLED);
		pbrpc_client_stream_free(s);
	}
	/* A cancelled stream's id comes back: the connection still serves. */
	Demo__EchoRequest n = req_of(NULL, 3);
	pbrpc_client_stream *s;
	cr_assert_eq(pbrpc_client_stream_open(c, &d_count, &n.base, NULL, &s), 0);
	int got = 0;
	while (pbrpc_client_stream_next(s, &m, 5000) == 1)
		got++;
	cr_assert_eq(got, 3);
	pbrpc_client_stream_free(s);
	pbrpc_client_free(c);
	srv_stop(&t);
}

Test(stream, server_cancels_midstream)
{
	tsrv t;
	srv_start(&t, NULL);
	pbrpc_client *c = client(&t);
	pbrpc_client_stream *s;
	cr_assert_eq(pbrpc_client_stream_open(c, &d_echo, NULL, NULL, &s), 0);
	Demo__EchoRequest a = req_of("a", 0), fail = req_of("fail", 0);
	const ProtobufCMessage *m;
	cr_assert_eq(pbrpc_client_stream_send(s, &a.base, -1), 0);
	cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), 1);
	cr_assert_eq(pbrpc_client_stream_send(s, &fail.base, -1), 0);
	cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), PBRPC_ESTATUS);
	cr_assert_eq(status_of(s, NULL), PBRPC_STATUS_PERMISSION_DENIED);
	/* The client's later messages cross the end and are dropped. */
	cr_assert_eq(pbrpc_client_stream_send(s, &a.base, 0), PBRPC_ESTATUS);
	cr_assert_eq(pbrpc_client_stream_close_send(s), PBRPC_ESTATUS);
	pbrpc_client_stream_free(s);
	pbrpc_client_free(c);
	srv_stop(&t);
}

Test(stream, deadline_expires_midstream)
{
	tsrv t;
	srv_start(&t, NULL);
	pbrpc_client *c = client(&t);
	pbrpc_stream_opts o = { .timeout_ms = 300 };
	pbrpc_client_stream *s;
	cr_assert_eq(pbrpc_client_stream_open(c, &d_hold, NULL, &o, &s), 0);
	Demo__EchoRequest q = req_of("x", 0);
	cr_assert_eq(pbrpc_client_stream_send(s, &q.base, -1), 0);
	const ProtobufCMessage *m;
	cr_assert_eq(pbrpc_client_stream_next(s, &m, 50), -ETIMEDOUT, "a short wait ends, the stream goes on");
	int64_t t0 = tu_now_ms();
	cr_assert_eq(pbrpc_client_stream_next(s, &m, -1), PBRPC_ESTATUS);
	int64_t took = tu_now_ms() - t0;
	cr_assert_eq(status_of(s, NULL), PBRPC_STATUS_DEADLINE_EXCEEDED);
	cr_assert_lt(took, 2000);
	/* The server's deadline ended it too (its timer, or our CANCEL). */
	cr_assert(wait_int(&hold_over, 1));
	int hs = atomic_load(&hold_status);
	cr_assert(hs == PBRPC_STATUS_DEADLINE_EXCEEDED || hs == PBRPC_STATUS_CANCELLED, "%d", hs);
	pbrpc_client_stream_free(s);
	pbrpc_client_free(c);
	srv_stop(&t);
}

/* ---- drain and connection loss ---- */

typedef struct stopper {
	tsrv *t;
} stopper;

Test(stream, drain_lets_open_streams_finish_refuses_new)
{
	tsrv t;
	srv_start(&t, NULL);
	pbrpc_client *c = client(&t);
	pbrpc_client_stream *s;
	cr_assert_eq(pbrpc_client_stream_open(c, &d_echo, NULL, NULL, &s), 0);
	Demo__EchoRequest a = req_of("a", 0), end = req_of("end", 0);
	const ProtobufCMessage *m;
	cr_assert_eq(pbrpc_client_stream_send(s, &a.base, -1), 0);
	cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), 1);
	pbrpc_server_shutdown(t.srv, 5000);
	usleep(100000); /* the GOAWAY is out */
	/* The open stream goes on through the drain. */
	for (int i = 0; i < 10; i++) {
		cr_assert_eq(pbrpc_client_stream_send(s, &a.base, -1), 0);
		cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), 1);
	}
	/* A new one is refused (the listener is gone: no connection). */
	pbrpc_client_stream *s2;
	pbrpc_stream_opts o = { .timeout_ms = 500 };
	cr_assert_eq(pbrpc_client_stream_open(c, &d_echo, NULL, &o, &s2), 0);
	cr_assert_eq(pbrpc_client_stream_next(s2, &m, 5000), PBRPC_ESTATUS);
	int st2 = status_of(s2, NULL);
	cr_assert(st2 == PBRPC_STATUS_UNAVAILABLE || st2 == PBRPC_STATUS_DEADLINE_EXCEEDED, "%d", st2);
	pbrpc_client_stream_free(s2);
	cr_assert_eq(pbrpc_client_stream_send(s, &end.base, -1), 0);
	cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), 0);
	cr_assert_eq(status_of(s, NULL), PBRPC_STATUS_OK);
	pbrpc_client_stream_free(s);
	pthread_join(t.thr, NULL); /* the drain completes once the stream is done */
	cr_assert_eq(t.rc, 0);
	pbrpc_server_free(t.srv);
	pbrpc_client_free(c);
}

Test(stream, drain_deadline_ends_streams_unavailable)
{
	tsrv t;
	srv_start(&t, NULL);
	pbrpc_client *c = client(&t);
	pbrpc_client_stream *s;
	cr_assert_eq(pbrpc_client_stream_open(c, &d_hold, NULL, NULL, &s), 0);
	cr_assert(wait_int(&hold_open, 1));
	pbrpc_server_shutdown(t.srv, 200);
	const ProtobufCMessage *m;
	cr_assert_eq(pbrpc_client_stream_next(s, &m, 5000), PBRPC_ESTATUS);
	cr_assert_eq(status_of(s, NULL), PBRPC_STATUS_UNAVAILABLE);
	cr_assert(wait_int(&hold_over, 1));
	cr_assert_eq(atomic_load(&hold_status), PBRPC_STATUS_UNAVAILABLE);
	pbrpc_client_stream_free(s);
	pthread_join(t.thr, NULL);
	pbrpc_server_free(t.srv);
	pbrpc_client_free(c);
}

Test(stream, connection_loss_ends_streams_unavailable_both_sides)
{
	tsrv t;
	srv_start(&t, NULL);
	/* The server goes away: the client's streams end UNAVAILABLE. */
	pbrpc_client *c = client(&t);
	pbrpc_client_stream *s[3];
	Demo__EchoRequest fe = req_of(NULL, 0);
	cr_assert_eq(pbrpc_client_stream_open(c, &d_hold, NULL, NULL, &s[0]), 0);
	cr_assert_eq(pbrpc_client_stream_open(c, &d_echo, NULL, NULL, &s[1]), 0);
	cr_assert_eq(pbrpc_client_stream_open(c, &d_count, &fe.base, NULL, &s[2]), 0);
	cr_assert(wait_int(&hold_open, 1));
	srv_kill(&t);
	const ProtobufCMessage *m;
	for (int i = 0; i < 3; i++) {
		int rc;
		while ((rc = pbrpc_client_stream_next(s[i], &m, 5000)) == 1)
			;
		cr_assert_eq(rc, PBRPC_ESTATUS, "stream %d: %s", i, pbrpc_strerror(rc));
		cr_assert_eq(status_of(s[i], NULL), PBRPC_STATUS_UNAVAILABLE, "stream %d", i);
		pbrpc_client_stream_free(s[i]);
	}
	pbrpc_client_free(c);

	/* The client goes away: the server's streams end UNAVAILABLE. */
	setup();
	srv_start(&t, NULL);
	c = client(&t);
	for (int i = 0; i < 3; i++)
		cr_assert_eq(pbrpc_client_stream_open(c, &d_hold, NULL, NULL, &s[i]), 0);
	cr_assert(wait_int(&hold_open, 3));
	pbrpc_client_free(c); /* with its streams open: they end with it */
	cr_assert(wait_int(&hold_over, 3));
	cr_assert_eq(atomic_load(&hold_status), PBRPC_STATUS_UNAVAILABLE);
	for (int i = 0; i < 3; i++)
		pbrpc_client_stream_free(s[i]);
	srv_stop(&t);
}

/* ---- scale ---- */

Test(stream, thousand_concurrent_streams_one_connection)
{
	tsrv t;
	srv_start(&t, NULL);
	pbrpc_client *c = client(&t);
	enum { N = 1000 };
	pbrpc_client_stream **s = calloc(N, sizeof(*s));
	for (int i = 0; i < N; i++)
		cr_assert_eq(pbrpc_client_stream_open(c, &d_echo, NULL, NULL, &s[i]), 0);
	for (int round = 0; round < 2; round++) {
		for (int i = 0; i < N; i++) {
			char p[16];
			snprintf(p, sizeof(p), "%d.%d", i, round);
			Demo__EchoRequest q = req_of(p, 0);
			cr_assert_eq(pbrpc_client_stream_send(s[i], &q.base, -1), 0);
		}
		for (int i = N - 1; i >= 0; i--) {
			char p[16];
			snprintf(p, sizeof(p), "%d.%d", i, round);
			const ProtobufCMessage *m;
			cr_assert_eq(pbrpc_client_stream_next(s[i], &m, 5000), 1, "stream %d", i);
			const Demo__EchoReply *r = (const Demo__EchoReply *)m;
			cr_assert_eq(r->payload.len, strlen(p));
			cr_assert_arr_eq(r->payload.data, p, strlen(p));
		}
	}
	pbrpc_server_stats st;
	for (int i = 0; i < N; i++) {
		cr_assert_eq(pbrpc_client_stream_close_send(s[i]), 0);
		const ProtobufCMessage *m;
		cr_assert_eq(pbrpc_client_stream_next(s[i], &m, 5000), 0);
		pbrpc_client_stream_free(s[i]);
	}
	free(s);
	pbrpc_client_free(c);
	srv_stop(&t);
	(void)st;
}

/* A million 30-byte messages on one stream, in order (fewer through the
 * 1-byte I/O shim, where each one costs dozens of syscalls, and under ASan,
 * which makes each several times slower: the point there is the same code
 * path, not the count). */
Test(stream, million_messages_one_stream, .timeout = 120)
{
	tsrv t;
	srv_start(&t, NULL);
	pbrpc_client *c = client(&t);
	uint32_t n = tu_short_io() ? 20000 : UNDER_ASAN ? 200000 : 1000000;
	Demo__EchoRequest q = req_of(NULL, n);
	pbrpc_client_stream *s;
	cr_assert_eq(pbrpc_client_stream_open(c, &d_count, &q.base, NULL, &s), 0);
	const ProtobufCMessage *m;
	uint32_t got = 0;
	int rc;
	int64_t t0 = tu_now_ms();
	while ((rc = pbrpc_client_stream_next(s, &m, 10000)) == 1) {
		if (index_of(m) != got)
			cr_assert_fail("message %u came as %u", got, index_of(m));
		got++;
	}
	cr_assert_eq(rc, 0, "%s", pbrpc_strerror(rc));
	cr_assert_eq(got, n);
	cr_log_info("%u messages in %lld ms", n, (long long)(tu_now_ms() - t0));
	pbrpc_client_stream_free(s);
	pbrpc_client_free(c);
	srv_stop(&t);
}

/* ---- a raw peer: bytes a well-behaved client never sends ---- */

typedef struct raw {
	int fd;
	pbrpc__frame_decoder dec;
	pbrpc_hello hello; /* the server's */
} raw;

static void raw_write(raw *r, pbrpc__frame_writer *w)
{
	while (pbrpc__frame_writer_pending(w))
		cr_assert_geq(pbrpc__frame_writer_flush(w, r->fd, 0), 0);
	pbrpc__frame_writer_fini(w);
	pbrpc__frame_writer_init(w);
}

static void raw_open_w(raw *r, const tsrv *t, uint64_t features, uint32_t window)
{
	pbrpc_endpoint ep;
	cr_assert_eq(pbrpc_endpoint_parse(t->addr, &ep), 0);
	r->fd = pbrpc_endpoint_connect(&ep, 2000);
	cr_assert_geq(r->fd, 0);
	pbrpc__frame_decoder_init(&r->dec, 0);
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc_hello h = { .version = 1, .features = features, .agent = "raw", .stream_window = window };
	cr_assert_eq(pbrpc__wire_write_preface(&w, &h), 0);
	raw_write(r, &w);
	uint8_t pre[8];
	cr_assert_eq(tu_read_full(r->fd, pre, 8), 8);
	pbrpc__frame f;
	cr_assert_eq(pbrpc__frame_read(&r->dec, r->fd, &f, 2000), 1);
	cr_assert_eq(pbrpc__wire_read_hello(&f, &r->hello), 0);
}

static void raw_open(raw *r, const tsrv *t, uint64_t features)
{
	raw_open_w(r, t, features, 0);
}

static void raw_close(raw *r)
{
	close(r->fd);
	pbrpc__frame_decoder_fini(&r->dec);
}

static void raw_frame(raw *r, uint8_t type, uint8_t flags, uint32_t id, const void *p, size_t len)
{
	pbrpc__frame_header h = { .type = type, .flags = flags, .stream = id };
	cr_assert_eq(pbrpc__frame_write(r->fd, &h, p, len, 2000), 0);
}

static void raw_request(raw *r, uint32_t id, const char *method, uint8_t kind, const ProtobufCMessage *body)
{
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc__wire_request q = { .call_id = id, .method = method, .method_len = strlen(method), .stream_kind = kind };
	cr_assert_eq(pbrpc__wire_write_request(&w, &q, body, 0), 0);
	raw_write(r, &w);
}

/* Reads frames until one of `type` for `id` (or a GOAWAY); returns it. */
static pbrpc__frame raw_expect(raw *r, uint8_t type, uint32_t id)
{
	for (;;) {
		pbrpc__frame f;
		int rc = pbrpc__frame_read(&r->dec, r->fd, &f, 3000);
		cr_assert_eq(rc, 1, "waiting for %s: %s", pbrpc__wire_frame_name(type), pbrpc_strerror(rc));
		if (f.hdr.type == PBRPC_FRAME_GOAWAY || (f.hdr.type == type && f.hdr.stream == id))
			return f;
	}
}

static void expect_goaway(raw *r, const char *words)
{
	pbrpc__frame f = raw_expect(r, PBRPC_FRAME_GOAWAY, 0);
	cr_assert_eq(f.hdr.type, PBRPC_FRAME_GOAWAY);
	int st;
	const char *m;
	size_t ml;
	cr_assert_eq(pbrpc__wire_read_goaway(&f, &st, &m, &ml), 0);
	cr_assert_eq(st, PBRPC_STATUS_INVALID_ARGUMENT);
	cr_assert(memmem(m, ml, words, strlen(words)), "GOAWAY said: %.*s", (int)ml, m);
}

static int expect_status(raw *r, uint32_t id)
{
	pbrpc__frame f = raw_expect(r, PBRPC_FRAME_RESPONSE, id);
	cr_assert_eq(f.hdr.type, PBRPC_FRAME_RESPONSE);
	pbrpc__wire_response resp;
	cr_assert_eq(pbrpc__wire_read_response(&f, &resp), 0);
	return resp.status;
}

Test(stream, raw_server_announces_streams_and_window)
{
	pbrpc_server_opts so = { .stream_window = 12345 };
	tsrv t;
	srv_start(&t, &so);
	raw r;
	raw_open(&r, &t, PBRPC_FEATURES);
	cr_assert(r.hello.features & PBRPC_FEATURE_STREAMS);
	cr_assert_eq(r.hello.stream_window, 12345);
	raw_close(&r);
	srv_stop(&t);
}

Test(stream, raw_stream_flags_without_feature)
{
	tsrv t;
	srv_start(&t, NULL);
	raw r;
	raw_open(&r, &t, PBRPC_FEATURE_NOT_RUN); /* a version-1 peer without streams */
	raw_request(&r, 1, "t.S/Echo", PBRPC_STREAM_BIDI, NULL);
	expect_goaway(&r, "without the streams feature");
	raw_close(&r);
	/* ...and a stream frame at all. */
	raw_open(&r, &t, PBRPC_FEATURE_NOT_RUN);
	uint8_t inc[4] = { 0, 0, 1, 0 };
	raw_frame(&r, PBRPC_FRAME_WINDOW, 0, 1, inc, 4);
	expect_goaway(&r, "unexpected WINDOW");
	raw_close(&r);
	srv_stop(&t);
}

Test(stream, raw_protocol_violations)
{
	tsrv t;
	srv_start(&t, NULL);
	raw r;
	Demo__EchoRequest q = req_of("x", 0);
	uint8_t body[64];
	size_t blen = protobuf_c_message_pack(&q.base, body);

	/* A MESSAGE on a server stream (its client does not stream). A small
	 * window: Count sends no more than that before the GOAWAY. */
	raw_open_w(&r, &t, PBRPC_FEATURES, 100);
	Demo__EchoRequest forever = req_of(NULL, 0);
	raw_request(&r, 1, "t.S/Count", PBRPC_STREAM_SERVER, &forever.base);
	raw_frame(&r, PBRPC_FRAME_MESSAGE, 0, 1, body, blen);
	expect_goaway(&r, "does not stream");
	raw_close(&r);

	/* A MESSAGE after the HALF_CLOSE. */
	raw_open(&r, &t, PBRPC_FEATURES);
	raw_request(&r, 1, "t.S/Hold", PBRPC_STREAM_BIDI, NULL);
	raw_frame(&r, PBRPC_FRAME_HALF_CLOSE, 0, 1, NULL, 0);
	raw_frame(&r, PBRPC_FRAME_MESSAGE, 0, 1, body, blen);
	expect_goaway(&r, "after its HALF_CLOSE");
	raw_close(&r);

	/* Past the window: Hold reads nothing, so nothing is granted back. */
	raw_open(&r, &t, PBRPC_FEATURES);
	raw_request(&r, 1, "t.S/Hold", PBRPC_STREAM_BIDI, NULL);
	uint32_t win = r.hello.stream_window ? r.hello.stream_window : PBRPC_STREAM_WINDOW_DEFAULT;
	for (uint32_t used = 0; used < win; used += (uint32_t)PBRPC_WIRE_MESSAGE_COST(blen))
		raw_frame(&r, PBRPC_FRAME_MESSAGE, 0, 1, body, blen);
	raw_frame(&r, PBRPC_FRAME_MESSAGE, 0, 1, body, blen);
	expect_goaway(&r, "past its flow-control window");
	raw_close(&r);

	/* A stream frame for a unary call; a WINDOW of 0. */
	raw_open(&r, &t, PBRPC_FEATURES);
	raw_request(&r, 1, "t.S/Hold", PBRPC_STREAM_BIDI, NULL);
	uint8_t zero[4] = { 0 };
	raw_frame(&r, PBRPC_FRAME_WINDOW, 0, 1, zero, 4);
	expect_goaway(&r, "WINDOW of 0");
	raw_close(&r);

	/* A client stream's REQUEST with a body; a stream REQUEST to a unary
	 * method; frames for ids not in flight are ignored. */
	raw_open(&r, &t, PBRPC_FEATURES);
	raw_request(&r, 1, "t.S/Sum", PBRPC_STREAM_CLIENT, &q.base);
	cr_assert_eq(expect_status(&r, 1), PBRPC_STATUS_INVALID_ARGUMENT);
	raw_request(&r, 2, "demo.Echo/Echo", PBRPC_STREAM_SERVER, &q.base);
	cr_assert_eq(expect_status(&r, 2), PBRPC_STATUS_UNIMPLEMENTED);
	raw_frame(&r, PBRPC_FRAME_MESSAGE, 0, 77, body, blen);
	raw_frame(&r, PBRPC_FRAME_HALF_CLOSE, 0, 77, NULL, 0);
	/* A bad message body ends that stream INVALID_ARGUMENT; the connection
	 * stays. */
	raw_request(&r, 3, "t.S/Sum", PBRPC_STREAM_CLIENT, NULL);
	uint8_t junk[3] = { 0x0a, 0x09, 0x01 };
	raw_frame(&r, PBRPC_FRAME_MESSAGE, 0, 3, junk, 3);
	cr_assert_eq(expect_status(&r, 3), PBRPC_STATUS_INVALID_ARGUMENT);
	/* A whole client stream by hand: the reply comes in the RESPONSE. */
	raw_request(&r, 4, "t.S/Sum", PBRPC_STREAM_CLIENT, NULL);
	raw_frame(&r, PBRPC_FRAME_MESSAGE, 0, 4, body, blen);
	Demo__EchoRequest q1 = req_of("x", 1);
	blen = protobuf_c_message_pack(&q1.base, body);
	raw_frame(&r, PBRPC_FRAME_MESSAGE, 0, 4, body, blen);
	raw_frame(&r, PBRPC_FRAME_HALF_CLOSE, 0, 4, NULL, 0);
	pbrpc__frame f = raw_expect(&r, PBRPC_FRAME_RESPONSE, 4);
	pbrpc__wire_response resp;
	cr_assert_eq(pbrpc__wire_read_response(&f, &resp), 0);
	cr_assert_eq(resp.status, 0);
	Demo__EchoReply *rep = demo__echo_reply__unpack(NULL, resp.body_len, resp.body);
	cr_assert_not_null(rep);
	cr_assert_eq(rep->payload.len, 3);
	cr_assert_arr_eq(rep->payload.data, "2 2", 3);
	demo__echo_reply__free_unpacked(rep, NULL);
	/* A server stream by hand: MESSAGEs, then the final RESPONSE. */
	Demo__EchoRequest three = req_of(NULL, 3);
	raw_request(&r, 5, "t.S/Count", PBRPC_STREAM_SERVER, &three.base);
	for (int i = 0; i < 3; i++) {
		f = raw_expect(&r, PBRPC_FRAME_MESSAGE, 5);
		cr_assert_eq(f.hdr.type, PBRPC_FRAME_MESSAGE);
	}
	cr_assert_eq(expect_status(&r, 5), 0);
	raw_close(&r);
	srv_stop(&t);
}

/* A server that sends past the client's window is cut off by the client. */
typedef struct fake_srv {
	int lfd;
	char addr[128];
	pthread_t thr;
	int mode; /* 0: flood MESSAGEs past the window */
} fake_srv;

static void *fake_main(void *arg)
{
	fake_srv *f = arg;
	int fd = accept(f->lfd, NULL, NULL);
	if (fd < 0)
		return NULL;
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc_hello h = { .version = 1, .features = PBRPC_FEATURES, .stream_window = 1000, .agent = "fake" };
	pbrpc__wire_write_preface(&w, &h);
	while (pbrpc__frame_writer_pending(&w))
		if (pbrpc__frame_writer_flush(&w, fd, 0) < 0)
			break;
	pbrpc__frame_decoder d;
	pbrpc__frame_decoder_init(&d, 0);
	uint8_t pre[8];
	tu_read_full(fd, pre, 8);
	pbrpc__frame fr;
	uint32_t id = 0;
	while (pbrpc__frame_read(&d, fd, &fr, 3000) == 1) {
		if (fr.hdr.type == PBRPC_FRAME_REQUEST) {
			id = fr.hdr.stream;
			break;
		}
	}
	uint8_t body[100] = { 0x0a, 98 };
	for (int i = 0; id && i < 4000; i++) {
		pbrpc__frame_header hh = { .type = PBRPC_FRAME_MESSAGE, .stream = id };
		if (pbrpc__frame_write(fd, &hh, body, sizeof(body), 1000) < 0)
			break;
	}
	/* Wait for the client to close. */
	while (pbrpc__frame_read(&d, fd, &fr, 3000) == 1)
		;
	pbrpc__frame_decoder_fini(&d);
	pbrpc__frame_writer_fini(&w);
	close(fd);
	return NULL;
}

Test(stream, client_cuts_off_a_server_past_its_window)
{
	fake_srv f = { 0 };
	snprintf(sock_dir, sizeof(sock_dir), "/tmp/pbrpc-stream-XXXXXX");
	cr_assert_not_null(mkdtemp(sock_dir));
	snprintf(f.addr, sizeof(f.addr), "unix:%s/f.sock", sock_dir);
	pbrpc_endpoint ep;
	cr_assert_eq(pbrpc_endpoint_parse(f.addr, &ep), 0);
	f.lfd = pbrpc_endpoint_listen(&ep, NULL);
	cr_assert_geq(f.lfd, 0);
	cr_assert_eq(pthread_create(&f.thr, NULL, fake_main, &f), 0);
	pbrpc_client_opts co = { .stream_window = 4096 };
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, f.addr, &co), 0);
	Demo__EchoRequest q = req_of(NULL, 1);
	pbrpc_client_stream *s, *b;
	cr_assert_eq(pbrpc_client_stream_open(c, &d_count, &q.base, NULL, &s), 0);
	/* Read through another stream, so that s's messages arrive but are not
	 * consumed (which would grant the window again). */
	cr_assert_eq(pbrpc_client_stream_open(c, &d_count, &q.base, NULL, &b), 0);
	const ProtobufCMessage *m;
	cr_assert_eq(pbrpc_client_stream_next(b, &m, 10000), PBRPC_ESTATUS);
	const char *msg;
	cr_assert_eq(status_of(b, &msg), PBRPC_STATUS_UNAVAILABLE);
	cr_assert(strstr(msg, "flow-control window"), "%s", msg);
	int rc, got = 0;
	while ((rc = pbrpc_client_stream_next(s, &m, 5000)) == 1)
		got++;
	cr_assert_eq(rc, PBRPC_ESTATUS);
	cr_assert_eq(status_of(s, NULL), PBRPC_STATUS_UNAVAILABLE);
	cr_assert_eq(got, 0, "a failure drops what was queued");
	pbrpc_client_stream_free(b);
	pbrpc_client_stream_free(s);
	pbrpc_client_free(c);
	pthread_join(f.thr, NULL);
	close(f.lfd);
	char p[128];
	snprintf(p, sizeof(p), "%s/f.sock", sock_dir);
	unlink(p);
	rmdir(sock_dir);
}

/* ---- asynchronous client streams ---- */

typedef struct async_rx {
	uint32_t got;
	bool disorder;
	int ended;        /* final callbacks */
	int final_status;
	pbrpc_client_stream *s;
	uint32_t to_send, sent; /* bidi: messages to send from on_writable */
	int writable;
} async_rx;

static void async_msg(pbrpc_client_stream *s, const ProtobufCMessage *m, void *user)
{
	async_rx *rx = user;
	if (!m) {
		rx->ended++;
		rx->final_status = pbrpc_client_stream_status(s, NULL);
		return;
	}
	if (m->descriptor == &demo__echo_reply__descriptor && ((const Demo__EchoReply *)m)->payload.len >= 4 &&
	    index_of(m) != rx->got)
		rx->disorder = true;
	rx->got++;
}

Test(stream, async_server_stream_from_process)
{
	tsrv t;
	srv_start(&t, NULL);
	pbrpc_client *c = client(&t);
	async_rx rx = { 0 };
	pbrpc_stream_opts o = { .on_message = async_msg, .user = &rx };
	uint32_t n = (uint32_t)tu_scale(5000);
	Demo__EchoRequest q = req_of(NULL, n);
	pbrpc_client_stream *s;
	cr_assert_eq(pbrpc_client_stream_open(c, &d_count, &q.base, &o, &s), 0);
	const ProtobufCMessage *m;
	cr_assert_eq(pbrpc_client_stream_next(s, &m, 0), PBRPC_EINVALID, "async streams have no next()");
	cr_assert_geq(pbrpc_client_pending(c), 1);
	cr_assert_eq(pbrpc_client_drain(c, 10000), 0);
	cr_assert_eq(rx.got, n);
	cr_assert_not(rx.disorder);
	cr_assert_eq(rx.ended, 1);
	cr_assert_eq(rx.final_status, PBRPC_STATUS_OK);
	cr_assert_eq(pbrpc_client_pending(c), 0);
	/* Cancelled: the final callback runs from process, then it is freed. */
	memset(&rx, 0, sizeof(rx));
	Demo__EchoRequest forever = req_of(NULL, 0);
	cr_assert_eq(pbrpc_client_stream_open(c, &d_count, &forever.base, &o, &s), 0);
	while (rx.got < 100)
		pbrpc_client_process(c, 100);
	pbrpc_client_stream_free(s); /* an async stream: cancels it */
	cr_assert_eq(pbrpc_client_drain(c, 5000), 0);
	cr_assert_eq(rx.ended, 1);
	cr_assert_eq(rx.final_status, PBRPC_STATUS_CANCELLED);
	/* A deadline. */
	memset(&rx, 0, sizeof(rx));
	o.timeout_ms = 200;
	cr_assert_eq(pbrpc_client_stream_open(c, &d_hold, NULL, &o, &s), 0);
	cr_assert_eq(pbrpc_client_drain(c, 5000), 0);
	cr_assert_eq(rx.ended, 1);
	cr_assert_eq(rx.final_status, PBRPC_STATUS_DEADLINE_EXCEEDED);
	/* Open at the client's end: the final callback runs in pbrpc_client_free. */
	memset(&rx, 0, sizeof(rx));
	o.timeout_ms = 0;
	cr_assert_eq(pbrpc_client_stream_open(c, &d_hold, NULL, &o, &s), 0);
	pbrpc_client_free(c);
	cr_assert_eq(rx.ended, 1);
	cr_assert_eq(rx.final_status, PBRPC_STATUS_CANCELLED);
	srv_stop(&t);
}

static void async_writable(pbrpc_client_stream *s, void *user)
{
	async_rx *rx = user;
	rx->writable++;
	Demo__EchoRequest q = req_of("0123456789012345678901234567", 0);
	while (rx->sent < rx->to_send) {
		q.delay_ms = rx->sent;
		int rc = pbrpc_client_stream_send(s, &q.base, 0);
		if (rc == -EAGAIN)
			return;
		cr_assert_eq(rc, 0);
		rx->sent++;
	}
	cr_assert_eq(pbrpc_client_stream_close_send(s), 0);
}

Test(stream, async_client_stream_with_writable)
{
	const uint32_t window = 4096;
	pbrpc_server_opts so = { .stream_window = window };
	tsrv t;
	srv_start(&t, &so);
	pbrpc_client *c = client(&t);
	async_rx rx = { .to_send = 2000 };
	pbrpc_stream_opts o = { .on_message = async_msg, .on_writable = async_writable, .user = &rx };
	pbrpc_client_stream *s;
	cr_assert_eq(pbrpc_client_stream_open(c, &d_sum, NULL, &o, &s), 0);
	async_writable(s, &rx); /* sends until the window is used */
	cr_assert_lt(rx.sent, rx.to_send);
	cr_assert_eq(pbrpc_client_drain(c, 10000), 0);
	cr_assert_eq(rx.sent, rx.to_send);
	cr_assert_geq(rx.writable, 2);
	cr_assert_eq(rx.got, 1, "the one reply");
	cr_assert_eq(rx.ended, 1);
	cr_assert_eq(rx.final_status, PBRPC_STATUS_OK);
	pbrpc_client_free(c);
	srv_stop(&t);
}
