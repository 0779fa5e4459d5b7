/* Reliability scenarios of shared/RELIABILITY.md that issue 9 names as weak or
 * missing, each against the real server (in process, on its own thread) and
 * the real client, with a raw peer (frame + wire layers only) where the exact
 * bytes matter. Where a scenario is about bad input, a bystander connection
 * keeps being served. The helpers are small copies of those in
 * test_server.c and test_e2e.c (those files belong to other work).
 *
 * docs/RELIABILITY-COVERAGE.md names each test here by its scenario number. */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "client/client_impl.h"
#include "echo.pb-c.h"
#include "pbrpc/client.h"
#include "pbrpc/endpoint.h"
#include "pbrpc/server.h"
#include "proto/wire.h"
#include "testutil.h"

/* ---- a test service: demo.Echo, behaviour chosen by the payload ---- */

#define HELD_MAX 64
static pthread_mutex_t held_mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
	Demo__EchoReply_Closure closure;
	void *data;
} held[HELD_MAX];
static atomic_int n_held;
static atomic_int n_invoked;
static _Atomic int64_t seen_deadline;
static struct {
	int rc;
	pid_t pid;
	uid_t uid;
	gid_t gid;
} seen_cred;
static int seen_status_rc[4];
static char md_key[300]; /* the key the "md" behaviour looks up */
static _Atomic long seen_md_len;

static int64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void reply_bytes(Demo__EchoReply_Closure closure, void *data, const void *p, size_t len)
{
	Demo__EchoReply r = DEMO__ECHO_REPLY__INIT;
	r.payload.data = (uint8_t *)p;
	r.payload.len = len;
	closure(&r, data);
}

static void reply_with(Demo__EchoReply_Closure closure, void *data, const char *text)
{
	reply_bytes(closure, data, text, strlen(text));
}

static bool is(const Demo__EchoRequest *req, const char *word)
{
	size_t n = strlen(word);
	return req->payload.len >= n && memcmp(req->payload.data, word, n) == 0;
}

static void t_echo(Demo__Echo_Service *service, const Demo__EchoRequest *req, Demo__EchoReply_Closure closure, void *data)
{
	(void)service;
	atomic_fetch_add(&n_invoked, 1);
	if (req->fail_status) {
		pbrpc_call_set_status(data, (int)req->fail_status, "%s", req->fail_message);
		closure(NULL, data);
	} else if (is(req, "hold")) {
		pthread_mutex_lock(&held_mu);
		int i = atomic_load(&n_held);
		cr_assert_lt(i, HELD_MAX);
		held[i].closure = closure;
		held[i].data = data;
		atomic_store(&n_held, i + 1);
		pthread_mutex_unlock(&held_mu);
	} else if (is(req, "deadline")) {
		atomic_store(&seen_deadline, pbrpc_call_deadline(data));
		reply_with(closure, data, "deadline");
	} else if (is(req, "cred")) {
		seen_cred.rc = pbrpc_call_peer_cred(data, &seen_cred.pid, &seen_cred.uid, &seen_cred.gid);
		reply_with(closure, data, "cred");
	} else if (is(req, "twice")) {
		reply_with(closure, data, "first");
		reply_with(closure, data, "second"); /* misuse: must be ignored */
	} else if (is(req, "badstatus")) {
		seen_status_rc[0] = pbrpc_call_set_status(data, 17, "seventeen");
		seen_status_rc[1] = pbrpc_call_set_status(data, -1, "minus one");
		seen_status_rc[2] = pbrpc_call_set_status(data, 1000, NULL);
		seen_status_rc[3] = pbrpc_call_set_status(data, 16, "in range");
		pbrpc_call_set_status(data, 0, NULL);
		reply_with(closure, data, "badstatus");
	} else if (is(req, "big:")) {
		/* The payload is not NUL-terminated: copy the digits out. */
		char digits[24] = "";
		size_t nd = req->payload.len - 4 < sizeof(digits) - 1 ? req->payload.len - 4 : sizeof(digits) - 1;
		memcpy(digits, req->payload.data + 4, nd);
		size_t n = (size_t)strtoul(digits, NULL, 10);
		uint8_t *b = malloc(n + 1);
		memset(b, 'b', n);
		reply_bytes(closure, data, b, n);
		free(b);
	} else if (is(req, "md")) {
		size_t len = 0;
		const void *v = pbrpc_call_metadata(data, md_key, &len);
		atomic_store(&seen_md_len, v ? (long)len : -1L);
		reply_with(closure, data, "md");
	} else {
		reply_bytes(closure, data, req->payload.data, req->payload.len);
	}
}

static Demo__Echo_Service echo_svc = DEMO__ECHO__INIT(t_);

/* Answers every held call (closures may be called from any thread). */
static void release_held(const char *text)
{
	pthread_mutex_lock(&held_mu);
	int n = atomic_load(&n_held);
	for (int i = 0; i < n; i++)
		reply_with(held[i].closure, held[i].data, text);
	atomic_store(&n_held, 0);
	pthread_mutex_unlock(&held_mu);
}

static void forget_held(void)
{
	pthread_mutex_lock(&held_mu);
	atomic_store(&n_held, 0);
	pthread_mutex_unlock(&held_mu);
}

static void wait_held(int n)
{
	int64_t until = tu_now_ms() + 10000;
	while (atomic_load(&n_held) < n && tu_now_ms() < until)
		usleep(1000);
	cr_assert_eq(atomic_load(&n_held), n);
}

/* ---- the real server on its own thread ---- */

typedef struct rsrv {
	pbrpc_server *srv;
	pthread_t thr;
	atomic_bool stop; /* leave the loop without a shutdown (for an abrupt close) */
	char addr[PBRPC_ENDPOINT_STRLEN];
	int rc;
} rsrv;

static char tmpdir[64];

/* A fresh directory per test process, for Unix socket paths. */
static const char *unix_path(const char *name)
{
	static char ep[128];
	if (!tmpdir[0]) {
		snprintf(tmpdir, sizeof(tmpdir), "/tmp/pbrpc-rel-XXXXXX");
		cr_assert_not_null(mkdtemp(tmpdir));
	}
	snprintf(ep, sizeof(ep), "unix:%s/%s", tmpdir, name);
	return ep;
}

static void cleanup(void)
{
	if (!tmpdir[0])
		return;
	DIR *d = opendir(tmpdir);
	struct dirent *e;
	while (d && (e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		char p[400];
		snprintf(p, sizeof(p), "%s/%s", tmpdir, e->d_name);
		unlink(p);
	}
	if (d)
		closedir(d);
	rmdir(tmpdir);
	tmpdir[0] = 0;
}

static void *srv_main(void *arg)
{
	rsrv *t = arg;
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

static void srv_start(rsrv *t, const char *endpoint, const pbrpc_server_opts *opts)
{
	memset(t, 0, sizeof(*t));
	if (!endpoint)
		endpoint = unix_path("s.sock");
	pbrpc_server_opts lo = opts ? *opts : (pbrpc_server_opts){ 0 };
	if (!lo.loop_threads)
		lo.loop_threads = tu_loop_threads();
	cr_assert_eq(pbrpc_server_new(&t->srv, &lo), 0);
	cr_assert_eq(pbrpc_server_add_service(t->srv, &echo_svc.base), 0);
	int idx = pbrpc_server_listen(t->srv, endpoint);
	cr_assert_geq(idx, 0, "listen %s: %s", endpoint, pbrpc_strerror(idx));
	pbrpc_server_address(t->srv, idx, t->addr, sizeof(t->addr));
	cr_assert_eq(pthread_create(&t->thr, NULL, srv_main, t), 0);
}

/* Graceful stop; *st (if not NULL) gets the final counters. */
static void srv_stop_stats(rsrv *t, pbrpc_server_stats *st)
{
	pbrpc_server_shutdown(t->srv, 1000);
	pthread_join(t->thr, NULL);
	cr_assert_eq(t->rc, 0);
	if (st)
		pbrpc_server_get_stats(t->srv, st);
	pbrpc_server_free(t->srv);
}

static void srv_stop(rsrv *t)
{
	srv_stop_stats(t, NULL);
}

/* The server vanishes: its loop stops and pbrpc_server_free() closes every
 * connection with no answer to the calls in flight. */
static void srv_kill(rsrv *t)
{
	atomic_store(&t->stop, true);
	if (tu_loop_threads() > 1)
		pbrpc_server_shutdown(t->srv, 0); /* pbrpc_server_run: no vanishing */
	pthread_join(t->thr, NULL);
	pbrpc_server_free(t->srv);
	forget_held();
}

/* ---- a raw peer ---- */

typedef struct peer {
	int fd;
	pbrpc__frame_decoder dec;
	pbrpc_hello server_hello;
} peer;

static void peer_open(peer *p, const char *addr)
{
	pbrpc_endpoint ep;
	cr_assert_eq(pbrpc_endpoint_parse(addr, &ep), 0);
	p->fd = pbrpc_endpoint_connect(&ep, 2000);
	cr_assert_geq(p->fd, 0, "connect %s: %s", addr, pbrpc_strerror(p->fd));
	struct timeval tv = { .tv_sec = 5 };
	setsockopt(p->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	pbrpc__frame_decoder_init(&p->dec, 64u << 20);
}

static void peer_send_writer(peer *p, pbrpc__frame_writer *w)
{
	while (pbrpc__frame_writer_pending(w)) {
		ssize_t n = pbrpc__frame_writer_flush(w, p->fd, 0);
		cr_assert_geq(n, 0, "flush: %s", pbrpc_strerror((int)n));
	}
}

/* Our preface and HELLO, as bytes. */
static size_t client_preface_bytes(uint8_t *out, size_t cap)
{
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc_hello h = { .version = 1, .max_frame = 64u << 20, .agent = "test" };
	cr_assert_eq(pbrpc__wire_write_preface(&w, &h), 0);
	size_t n = pbrpc__frame_writer_pending(&w);
	cr_assert_leq(n, cap);
	memcpy(out, w.buf + w.head, n);
	pbrpc__frame_writer_fini(&w);
	return n;
}

static void peer_read_hello(peer *p)
{
	uint8_t pre[PBRPC_WIRE_PREFACE_SIZE];
	cr_assert_eq(tu_read_full(p->fd, pre, sizeof(pre)), sizeof(pre));
	cr_assert_eq(memcmp(pre, PBRPC_WIRE_PREFACE, sizeof(pre)), 0);
	pbrpc__frame f;
	cr_assert_eq(pbrpc__frame_read(&p->dec, p->fd, &f, 5000), 1);
	cr_assert_eq(pbrpc__wire_read_hello(&f, &p->server_hello), 0);
}

static void peer_handshake(peer *p, const char *addr)
{
	peer_open(p, addr);
	uint8_t pre[128];
	size_t n = client_preface_bytes(pre, sizeof(pre));
	tu_write_full(p->fd, pre, n);
	peer_read_hello(p);
}

static void peer_close(peer *p)
{
	close(p->fd);
	pbrpc__frame_decoder_fini(&p->dec);
}

static void peer_request_md(peer *p, uint32_t id, const char *payload, const pbrpc_metadata *md, size_t md_count)
{
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)payload;
	req.payload.len = strlen(payload);
	pbrpc__wire_request r = { .call_id = id, .method = "demo.Echo/Echo", .method_len = 14,
				  .metadata = md, .metadata_count = md_count };
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	cr_assert_eq(pbrpc__wire_write_request(&w, &r, &req.base, 0), 0);
	peer_send_writer(p, &w);
	pbrpc__frame_writer_fini(&w);
}

static void peer_request(peer *p, uint32_t id, const char *payload)
{
	peer_request_md(p, id, payload, NULL, 0);
}

/* A REQUEST frame with exactly these payload bytes. */
static void send_request_bytes(peer *p, uint32_t id, uint8_t flags, const void *payload, size_t len)
{
	pbrpc__frame_header h = { .type = PBRPC_FRAME_REQUEST, .flags = flags, .stream = id };
	cr_assert_eq(pbrpc__frame_write(p->fd, &h, payload, len, 5000), 0);
}

/* A REQUEST for demo.Echo/Echo with these body bytes. */
static void send_echo_body(peer *p, uint32_t id, const void *body, size_t len)
{
	uint8_t buf[256] = { 0, 14 };
	cr_assert_leq(len, sizeof(buf) - 16);
	memcpy(buf + 2, "demo.Echo/Echo", 14);
	memcpy(buf + 16, body, len);
	send_request_bytes(p, id, 0, buf, 16 + len);
}

/* Reads frames until a RESPONSE and returns its status (a GOAWAY: -1000 -
 * status). Copies the message and up to plen bytes of the reply payload. */
static int peer_response(peer *p, uint32_t *id, char *msg, size_t msglen, char *payload, size_t plen)
{
	for (;;) {
		pbrpc__frame f;
		int rc = pbrpc__frame_read(&p->dec, p->fd, &f, 5000);
		if (rc < 0)
			return rc;
		if (f.hdr.type == PBRPC_FRAME_GOAWAY) {
			int st;
			const char *m;
			size_t ml;
			cr_assert_eq(pbrpc__wire_read_goaway(&f, &st, &m, &ml), 0);
			if (msg)
				snprintf(msg, msglen, "%.*s", (int)ml, m);
			if (st != 0)
				return -1000 - st;
			continue;
		}
		if (f.hdr.type == PBRPC_FRAME_PING) {
			pbrpc__frame_header h = { .type = PBRPC_FRAME_PONG };
			cr_assert_eq(pbrpc__frame_write(p->fd, &h, f.payload, PBRPC_WIRE_PING_SIZE, 5000), 0);
			continue;
		}
		cr_assert_eq(f.hdr.type, PBRPC_FRAME_RESPONSE, "unexpected frame type %d", f.hdr.type);
		pbrpc__wire_response r;
		cr_assert_eq(pbrpc__wire_read_response(&f, &r), 0);
		if (id)
			*id = r.call_id;
		if (msg)
			snprintf(msg, msglen, "%.*s", (int)r.message_len, r.message ? r.message : "");
		if (payload) {
			payload[0] = 0;
			Demo__EchoReply *er = demo__echo_reply__unpack(NULL, r.body_len, r.body);
			cr_assert_not_null(er);
			snprintf(payload, plen, "%.*s", (int)er->payload.len, (const char *)er->payload.data);
			demo__echo_reply__free_unpacked(er, NULL);
		}
		return r.status;
	}
}

static void peer_ping_echo(peer *p, uint32_t id)
{
	char pl[64], got[64];
	snprintf(pl, sizeof(pl), "ok-%u", id);
	peer_request(p, id, pl);
	uint32_t rid = 0;
	cr_assert_eq(peer_response(p, &rid, NULL, 0, got, sizeof(got)), PBRPC_STATUS_OK);
	cr_assert_eq(rid, id);
	cr_assert_str_eq(got, pl);
}

/* ---- the real client ---- */

typedef struct outcome {
	int calls;
	int status;
	char message[256];
	char text[128];
	size_t len;
} outcome;

static void on_echo(const Demo__EchoReply *r, void *data)
{
	outcome *o = data;
	const char *msg = NULL;
	o->calls++;
	o->status = pbrpc_client_status(&msg);
	snprintf(o->message, sizeof(o->message), "%s", msg ? msg : "");
	o->text[0] = 0;
	o->len = r ? r->payload.len : 0;
	if (r)
		snprintf(o->text, sizeof(o->text), "%.*s", (int)(r->payload.len < 100 ? r->payload.len : 100),
			 (const char *)r->payload.data);
}

static outcome echo_call(ProtobufCService *service, const char *payload)
{
	outcome o = { 0 };
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)payload;
	req.payload.len = strlen(payload);
	demo__echo__echo(service, &req, on_echo, &o);
	return o;
}

static void echo_ok(ProtobufCService *service, const char *payload)
{
	outcome o = echo_call(service, payload);
	cr_assert_eq(o.calls, 1);
	cr_assert_eq(o.status, PBRPC_STATUS_OK, "%s: %s %s", payload, pbrpc_status_name(o.status), o.message);
	cr_assert_eq(o.len, strlen(payload), "%s: reply of %zu bytes", payload, o.len);
	cr_assert_eq(strncmp(o.text, payload, 100), 0, "%s: got %s", payload, o.text); /* text keeps 100 */
}

/* A real client on its own connection that must keep being served. */
typedef struct bystander {
	pbrpc_client *c;
	ProtobufCService *echo;
	int n;
} bystander;

static void bystander_open(bystander *b, const char *addr)
{
	cr_assert_eq(pbrpc_client_connect(&b->c, addr, NULL), 0);
	b->echo = pbrpc_client_service(b->c, &demo__echo__descriptor);
	b->n = 0;
}

static void bystander_ok(bystander *b)
{
	char p[32];
	snprintf(p, sizeof(p), "bystander-%d", b->n++);
	echo_ok(b->echo, p);
}

static int count_fds(void)
{
	int n = 0;
	DIR *d = opendir("/proc/self/fd");
	cr_assert_not_null(d);
	while (readdir(d))
		n++;
	closedir(d);
	return n;
}

static void wait_fds(int want, const char *what)
{
	/* The server thread may hold a transient fd (an accept) at any read:
	 * the count must come back to the baseline, asserted on what was seen. */
	int64_t until = tu_now_ms() + 3000;
	int n;
	while ((n = count_fds()) != want && tu_now_ms() < until)
		usleep(5000);
	cr_assert_eq(n, want, "%s: %d fds open, baseline %d", what, n, want);
}

TestSuite(reliability, .init = tu_setup, .fini = cleanup, .timeout = 90);

/* ==== 9: overlong varints, duplicate fields, bad method names, malformed deadlines ==== */

/* A body with an 11-byte varint (PROTOCOL.md section 5: longer than 10 bytes
 * is invalid) is answered INVALID_ARGUMENT; a 10-byte one is accepted. The
 * connection stays usable, from a raw peer and from the real client. */
Test(reliability, overlong_varint_in_body_is_invalid_argument)
{
	rsrv t;
	srv_start(&t, NULL, NULL);
	bystander b;
	bystander_open(&b, t.addr);
	peer p;
	peer_handshake(&p, t.addr);
	/* delay_ms (field 2, varint) as 0 in 11 bytes; payload's length as 1 in 11 bytes. */
	static const uint8_t long_varint[] = { 0x10, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00 };
	static const uint8_t long_length[] = { 0x0a, 0x81, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00, 'x' };
	/* 10 bytes: the longest valid varint. */
	static const uint8_t ten[] = { 0x0a, 0x02, 'o', 'k', 0x10, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00 };
	const struct {
		const uint8_t *b;
		size_t len;
	} bad[] = { { long_varint, sizeof(long_varint) }, { long_length, sizeof(long_length) } };
	char msg[128], got[64];
	uint32_t id = 1;
	for (size_t i = 0; i < 2; i++) {
		send_echo_body(&p, id, bad[i].b, bad[i].len);
		cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_INVALID_ARGUMENT, "case %zu", i);
		cr_assert_str_eq(msg, "request body is not a valid demo.EchoRequest");
		peer_ping_echo(&p, ++id);
		bystander_ok(&b);
		id++;
	}
	send_echo_body(&p, id, ten, sizeof(ten));
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), got, sizeof(got)), PBRPC_STATUS_OK, "%s", msg);
	cr_assert_str_eq(got, "ok");
	int invoked = atomic_load(&n_invoked);

	/* The same bytes through the real client's raw call. */
	for (size_t i = 0; i < 2; i++) {
		uint8_t *reply = NULL;
		size_t rlen = 0;
		pbrpc_call_result res;
		int rc = pbrpc_client_call_raw(b.c, "demo.Echo/Echo", bad[i].b, bad[i].len, &reply, &rlen, NULL, &res);
		cr_assert_eq(rc, PBRPC_ESTATUS);
		cr_assert_eq(res.status, PBRPC_STATUS_INVALID_ARGUMENT);
		cr_assert_str_eq(res.message, "request body is not a valid demo.EchoRequest");
		free(reply);
		bystander_ok(&b);
	}
	cr_assert_eq(atomic_load(&n_invoked), invoked + 2, "only the two good calls ran");
	pbrpc_client_free(b.c);
	peer_close(&p);
	srv_stop(&t);
}

/* A singular field that occurs twice takes the last value (protobuf rules,
 * PROTOCOL.md section 5). */
Test(reliability, duplicate_fields_last_wins)
{
	rsrv t;
	srv_start(&t, NULL, NULL);
	bystander b;
	bystander_open(&b, t.addr);
	peer p;
	peer_handshake(&p, t.addr);
	static const uint8_t two_payloads[] = { 0x0a, 5, 'f', 'i', 'r', 's', 't', 0x0a, 6, 's', 'e', 'c', 'o', 'n', 'd' };
	/* fail_status 5 then 0: not failed. */
	static const uint8_t unfail[] = { 0x18, 5, 0x18, 0, 0x0a, 2, 'o', 'k' };
	/* fail_status 0 then 5 (NOT_FOUND), message "m1" then "m2". */
	static const uint8_t fail[] = { 0x18, 0, 0x22, 2, 'm', '1', 0x18, 5, 0x22, 2, 'm', '2' };
	char msg[64], got[64];
	send_echo_body(&p, 1, two_payloads, sizeof(two_payloads));
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), got, sizeof(got)), PBRPC_STATUS_OK);
	cr_assert_str_eq(got, "second");
	send_echo_body(&p, 2, unfail, sizeof(unfail));
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), got, sizeof(got)), PBRPC_STATUS_OK);
	cr_assert_str_eq(got, "ok");
	send_echo_body(&p, 3, fail, sizeof(fail));
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_NOT_FOUND);
	cr_assert_str_eq(msg, "m2");
	peer_ping_echo(&p, 4);
	bystander_ok(&b);

	/* The real client sends the same bytes and unpacks the reply. */
	uint8_t *reply = NULL;
	size_t rlen = 0;
	pbrpc_call_result res;
	cr_assert_eq(pbrpc_client_call_raw(b.c, "demo.Echo/Echo", two_payloads, sizeof(two_payloads), &reply, &rlen,
					   NULL, &res), 0, "%s", res.message);
	Demo__EchoReply *er = demo__echo_reply__unpack(NULL, rlen, reply);
	cr_assert_not_null(er);
	cr_assert_eq(er->payload.len, 6);
	cr_assert_eq(memcmp(er->payload.data, "second", 6), 0);
	demo__echo_reply__free_unpacked(er, NULL);
	free(reply);
	reply = NULL;
	cr_assert_eq(pbrpc_client_call_raw(b.c, "demo.Echo/Echo", fail, sizeof(fail), &reply, &rlen, NULL, &res),
		     PBRPC_ESTATUS);
	cr_assert_eq(res.status, PBRPC_STATUS_NOT_FOUND);
	cr_assert_str_eq(res.message, "m2");
	free(reply);
	bystander_ok(&b);
	pbrpc_client_free(b.c);
	peer_close(&p);
	srv_stop(&t);
}

/* Every shape of bad method name is answered INVALID_ARGUMENT ("invalid
 * method name in request") by the server, without running a handler, and
 * refused locally by the client; 1024 bytes is still a valid name. */
Test(reliability, bad_method_names_each_shape)
{
	rsrv t;
	srv_start(&t, NULL, NULL);
	bystander b;
	bystander_open(&b, t.addr);
	peer p;
	peer_handshake(&p, t.addr);
	static char long_name[1026], max_name[1025];
	memcpy(long_name, "demo.Echo/", 10);
	memset(long_name + 10, 'x', 1015); /* 1025 bytes */
	memcpy(max_name, "demo.Echo/", 10);
	memset(max_name + 10, 'x', 1014); /* 1024 bytes */
	const char *names[] = {
		"demoEchoEcho",      /* no slash */
		"demo.Echo/Echo/x",  /* two slashes */
		"demo.Echo//Echo",   /* two slashes, empty middle */
		"/Echo",             /* empty service */
		"demo.Echo/",        /* empty method */
		"/",                 /* both empty */
		"demo.Echo/Ec-ho",   /* bad characters */
		"demo.Echo/Ec ho",
		"demo.Echo/Ec\xc3\xa9",
		"demo.Echo/Ech\x7f",
		"a/",                /* below 3 bytes... */
		"ab",
		long_name,           /* 1025 bytes */
	};
	size_t n = sizeof(names) / sizeof(names[0]);
	static uint8_t buf[2 + 1100];
	char msg[128];
	uint32_t id = 1;
	for (size_t i = 0; i < n; i++) {
		size_t len = strlen(names[i]);
		buf[0] = (uint8_t)(len >> 8);
		buf[1] = (uint8_t)len;
		memcpy(buf + 2, names[i], len);
		send_request_bytes(&p, id, 0, buf, 2 + len);
		uint32_t rid = 0;
		cr_assert_eq(peer_response(&p, &rid, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_INVALID_ARGUMENT,
			     "name %zu (%zu bytes)", i, len);
		cr_assert_eq(rid, id);
		cr_assert_str_eq(msg, "invalid method name in request", "name %zu", i);
		peer_ping_echo(&p, ++id);
		id++;
	}
	/* A NUL inside and the empty name. */
	uint8_t nul[] = { 0, 5, 'a', '/', 'b', 0, 'c' };
	send_request_bytes(&p, id++, 0, nul, sizeof(nul));
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_INVALID_ARGUMENT);
	uint8_t empty[] = { 0, 0 };
	send_request_bytes(&p, id++, 0, empty, sizeof(empty));
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_INVALID_ARGUMENT);
	/* 1024 bytes is valid: the method is simply unknown. */
	buf[0] = 1024 >> 8;
	buf[1] = 0;
	memcpy(buf + 2, max_name, 1024);
	send_request_bytes(&p, id++, 0, buf, 2 + 1024);
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_UNIMPLEMENTED);
	peer_ping_echo(&p, id++);
	bystander_ok(&b);
	int invoked = atomic_load(&n_invoked);

	/* The real client refuses the same names before sending anything. */
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	for (size_t i = 0; i < n; i++) {
		ProtobufCMessage *reply = NULL;
		pbrpc_call_result res;
		int rc = pbrpc_client_call(b.c, names[i], &req.base, &demo__echo_reply__descriptor, &reply, NULL, &res);
		cr_assert_neq(rc, 0, "name %zu", i);
		cr_assert_eq(res.status, PBRPC_STATUS_INVALID_ARGUMENT, "name %zu: %s", i, res.message);
		cr_assert_null(reply);
	}
	ProtobufCMessage *reply = NULL;
	pbrpc_call_result res;
	cr_assert_eq(pbrpc_client_call(b.c, max_name, &req.base, &demo__echo_reply__descriptor, &reply, NULL, &res),
		     PBRPC_ESTATUS);
	cr_assert_eq(res.status, PBRPC_STATUS_UNIMPLEMENTED, "%s", res.message);
	cr_assert_eq(atomic_load(&n_invoked), invoked, "no handler ran");
	bystander_ok(&b);
	pbrpc_client_free(b.c);
	peer_close(&p);
	srv_stop(&t);
}

/* The TIMEOUT flag with fewer than the 8 timeout bytes is a broken layout:
 * INVALID_ARGUMENT ("malformed request header"), the connection stays. The
 * largest timeout is clamped, not overflowed. */
Test(reliability, malformed_deadlines)
{
	rsrv t;
	srv_start(&t, NULL, NULL);
	bystander b;
	bystander_open(&b, t.addr);
	peer p;
	peer_handshake(&p, t.addr);
	uint8_t buf[64] = { 0, 14 };
	memcpy(buf + 2, "demo.Echo/Echo", 14);
	memset(buf + 16, 0x01, 8);
	char msg[128];
	uint32_t id = 1;
	for (size_t k = 0; k < 8; k++) {
		send_request_bytes(&p, id, PBRPC_REQUEST_TIMEOUT, buf, 16 + k);
		cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_INVALID_ARGUMENT,
			     "%zu timeout bytes", k);
		cr_assert_str_eq(msg, "malformed request header");
		peer_ping_echo(&p, ++id);
		id++;
	}
	/* TIMEOUT and METADATA, with the timeout whole but no metadata count. */
	send_request_bytes(&p, id++, PBRPC_REQUEST_TIMEOUT | PBRPC_REQUEST_METADATA, buf, 16 + 8);
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_INVALID_ARGUMENT);
	cr_assert_str_eq(msg, "malformed request header");
	/* ...and with 7 of the 8 bytes, then a count that would fit. */
	send_request_bytes(&p, id++, PBRPC_REQUEST_TIMEOUT | PBRPC_REQUEST_METADATA, buf, 16 + 7);
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_INVALID_ARGUMENT);
	cr_assert_eq(atomic_load(&n_invoked), 8, "only the good calls ran");
	/* The largest timeout: a deadline far away, not an overflow into the past. */
	memset(buf + 16, 0xff, 8);
	memcpy(buf + 24, "\x0a\x08" "deadline", 10);
	send_request_bytes(&p, id++, PBRPC_REQUEST_TIMEOUT, buf, 16 + 8 + 10);
	char got[64];
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), got, sizeof(got)), PBRPC_STATUS_OK, "%s", msg);
	cr_assert_gt(atomic_load(&seen_deadline), mono_ns() + 1000ll * 1000000000, "deadline is in the future");
	peer_ping_echo(&p, id++);
	bystander_ok(&b);
	pbrpc_client_free(b.c);
	peer_close(&p);
	srv_stop(&t);
}

/* ==== 11: close during the handshake, from either side ==== */

/* The client closes (a full close, not a half-close, without reading the
 * server's HELLO) after each prefix of its preface + HELLO, the whole of it
 * included: the server closes its end (fd count back to the baseline), the
 * bystander is served throughout and a new real client connects after. */
Test(reliability, client_closes_after_each_handshake_prefix)
{
	rsrv t;
	srv_start(&t, NULL, NULL);
	bystander b;
	bystander_open(&b, t.addr);
	bystander_ok(&b);
	uint8_t all[128];
	size_t total = client_preface_bytes(all, sizeof(all));
	int base = count_fds();
	for (size_t k = 0; k <= total; k++) {
		peer p;
		peer_open(&p, t.addr);
		if (k)
			tu_write_full(p.fd, all, k);
		if (k % 2) /* odd prefixes: let the server's preface and HELLO arrive unread */
			usleep(2000);
		peer_close(&p);
		wait_fds(base, "after a client closed mid-handshake");
		if (k % 8 == 0)
			bystander_ok(&b);
	}
	bystander_ok(&b);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, t.addr, NULL), 0);
	echo_ok(pbrpc_client_service(c, &demo__echo__descriptor), "after");
	pbrpc_client_free(c);
	pbrpc_client_free(b.c);
	pbrpc_server_stats st;
	srv_stop_stats(&t, &st);
	cr_assert_eq(st.calls_started, st.calls_completed);
}

/* A fake server that accepts one connection, reads the client's preface and
 * HELLO, sends the first `k` bytes of a real server's preface + HELLO and
 * closes. */
typedef struct fake_hs {
	int lfd;
	size_t k;
	const uint8_t *bytes;
	bool read_client;
} fake_hs;

static void *fake_hs_main(void *arg)
{
	fake_hs *f = arg;
	int fd = accept4(f->lfd, NULL, NULL, SOCK_CLOEXEC);
	if (fd < 0)
		return NULL;
	if (f->read_client) {
		uint8_t hdr[PBRPC_WIRE_PREFACE_SIZE + PBRPC_FRAME_HEADER_SIZE];
		if (tu_read_full(fd, hdr, sizeof(hdr)) == sizeof(hdr)) {
			pbrpc__frame_header h;
			pbrpc__frame_header_decode(hdr + PBRPC_WIRE_PREFACE_SIZE, &h);
			uint8_t body[512];
			if (h.length <= sizeof(body))
				tu_read_full(fd, body, h.length);
		}
	}
	if (f->k)
		tu_write_full(fd, f->bytes, f->k);
	shutdown(fd, SHUT_WR);
	close(fd);
	return NULL;
}

/* The server side closes after each prefix of its preface + HELLO:
 * pbrpc_client_connect fails with a clear code (the connection closed during
 * the handshake), no fd is left behind, and the next connect to the real
 * server works. */
Test(reliability, server_closes_during_client_handshake_each_prefix)
{
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc_hello h = { .version = 1, .max_frame = PBRPC_MAX_FRAME_DEFAULT, .max_calls = 1024,
			  .features = PBRPC_FEATURES, .agent = "fake" };
	cr_assert_eq(pbrpc__wire_write_preface(&w, &h), 0);
	size_t total = pbrpc__frame_writer_pending(&w);
	uint8_t srv_bytes[128];
	cr_assert_leq(total, sizeof(srv_bytes));
	memcpy(srv_bytes, w.buf + w.head, total);
	pbrpc__frame_writer_fini(&w);

	pbrpc_endpoint ep;
	const char *fake_addr = unix_path("fake.sock");
	cr_assert_eq(pbrpc_endpoint_parse(fake_addr, &ep), 0);
	int lfd = pbrpc_endpoint_listen(&ep, NULL);
	cr_assert_geq(lfd, 0);
	pbrpc_client_opts o = { .connect_timeout_ms = 3000 };
	int base = count_fds();
	for (int pass = 0; pass < 2; pass++) {
		/* pass 0: the fake reads the client's bytes first (a clean EOF);
		 * pass 1: it closes with them unread (a reset may come instead). */
		for (size_t k = 0; k <= total; k++) {
			fake_hs f = { .lfd = lfd, .k = k, .bytes = srv_bytes, .read_client = pass == 0 };
			pthread_t thr;
			pthread_create(&thr, NULL, fake_hs_main, &f);
			pbrpc_client *c = (pbrpc_client *)1;
			int64_t t0 = tu_now_ms();
			int rc = pbrpc_client_connect(&c, fake_addr, &o);
			pthread_join(thr, NULL);
			if (k < total) {
				cr_assert_null(c, "k=%zu", k);
				if (pass == 0)
					cr_assert(rc == PBRPC_EOF || rc == PBRPC_ETRUNCATED, "k=%zu: %d %s", k, rc,
						  pbrpc_strerror(rc));
				else
					cr_assert(rc == PBRPC_EOF || rc == PBRPC_ETRUNCATED || rc == -ECONNRESET || rc == -EPIPE,
						  "k=%zu: %d %s", k, rc, pbrpc_strerror(rc));
				cr_assert_lt(tu_now_ms() - t0, 2000, "k=%zu: failed fast, not at the timeout", k);
			} else if (rc == 0) {
				/* The whole HELLO came: connected; the close shows at the first call. */
				pbrpc_call_opts co = { .timeout_ms = 300 };
				ProtobufCService *e = pbrpc_client_service_with(c, &demo__echo__descriptor, &co);
				outcome r = echo_call(e, "x");
				cr_assert_neq(r.status, PBRPC_STATUS_OK);
				pbrpc_client_free(c);
				/* That call dialled again, into the listener's backlog: drop it. */
				int fd;
				tu_set_nonblock(lfd, true);
				while ((fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC)) >= 0)
					close(fd);
				tu_set_nonblock(lfd, false);
			} else {
				cr_assert_null(c);
			}
			wait_fds(base, "after a failed handshake");
		}
	}
	close(lfd);
	unlink(ep.path);
	rsrv t;
	srv_start(&t, NULL, NULL);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, t.addr, NULL), 0);
	echo_ok(pbrpc_client_service(c, &demo__echo__descriptor), "real server");
	pbrpc_client_free(c);
	srv_stop(&t);
}

/* ==== 17: the client's own call ids wrap ==== */

static void set_next_id(pbrpc_client *c, uint32_t id)
{
	pthread_mutex_lock(&c->mu);
	c->next_id = id;
	pthread_mutex_unlock(&c->mu);
}

Test(reliability, client_call_ids_wrap_past_zero)
{
	rsrv t;
	srv_start(&t, NULL, NULL);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, t.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);
	set_next_id(c, 0xfffffff0u);
	uint32_t ids[40];
	for (int i = 0; i < 40; i++) {
		char p[32];
		snprintf(p, sizeof(p), "sync-%d", i);
		echo_ok(echo, p);
		ids[i] = pbrpc_client_last_call();
		cr_assert_neq(ids[i], 0, "call %d", i);
	}
	cr_assert_eq(ids[0], 0xfffffff0u);
	cr_assert_eq(ids[15], 0xffffffffu);
	cr_assert_eq(ids[16], 1, "0 is skipped");
	cr_assert_eq(ids[39], 24);

	/* 40 asynchronous calls in flight at once across the wrap: distinct ids,
	 * each reply reaches its own closure. */
	ProtobufCService *aecho = pbrpc_client_service_async(c, &demo__echo__descriptor);
	set_next_id(c, 0xfffffff0u);
	static outcome o[40];
	char pl[40][32];
	for (int i = 0; i < 40; i++) {
		memset(&o[i], 0, sizeof(o[i]));
		snprintf(pl[i], sizeof(pl[i]), "async-%d", i);
		Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
		req.payload.data = (uint8_t *)pl[i];
		req.payload.len = strlen(pl[i]);
		demo__echo__echo(aecho, &req, on_echo, &o[i]);
		ids[i] = pbrpc_client_last_call();
		cr_assert_neq(ids[i], 0);
		for (int j = 0; j < i; j++)
			cr_assert_neq(ids[i], ids[j], "calls %d and %d share id %u", i, j, ids[i]);
	}
	cr_assert_eq(pbrpc_client_drain(c, 5000), 0);
	for (int i = 0; i < 40; i++) {
		cr_assert_eq(o[i].calls, 1);
		cr_assert_eq(o[i].status, PBRPC_STATUS_OK, "call %d (id %u): %s", i, ids[i], o[i].message);
		cr_assert_str_eq(o[i].text, pl[i]);
	}
	pbrpc_client_free(c);
	pbrpc_server_stats st;
	srv_stop_stats(&t, &st);
	cr_assert_eq(st.protocol_errors, 0);
	cr_assert_eq(st.calls_completed, 80);
}

/* Once the counter has wrapped, an id still in flight is skipped: the
 * client checks the call tables only after the first wrap, so the check
 * must start then. */
Test(reliability, client_call_ids_skip_a_live_id_after_wrapping)
{
	rsrv t;
	srv_start(&t, NULL, NULL);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, t.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);
	ProtobufCService *aecho = pbrpc_client_service_async(c, &demo__echo__descriptor);
	set_next_id(c, 0xffffffffu);
	echo_ok(echo, "last before the wrap");
	cr_assert_eq(pbrpc_client_last_call(), 0xffffffffu);
	echo_ok(echo, "first after the wrap");
	cr_assert_eq(pbrpc_client_last_call(), 1);

	/* A call held in flight by the server's timer, then the counter put
	 * back onto its id. */
	static outcome slow;
	memset(&slow, 0, sizeof(slow));
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)"slow";
	req.payload.len = 4;
	req.delay_ms = 300;
	demo__echo__echo(aecho, &req, on_echo, &slow);
	uint32_t live = pbrpc_client_last_call();
	cr_assert_eq(live, 2);
	set_next_id(c, live);
	echo_ok(echo, "beside the slow one");
	cr_assert_eq(pbrpc_client_last_call(), live + 1, "id %u is in flight", live);

	cr_assert_eq(pbrpc_client_drain(c, 5000), 0);
	cr_assert_eq(slow.calls, 1);
	cr_assert_eq(slow.status, PBRPC_STATUS_OK, "%s", slow.message);
	cr_assert_str_eq(slow.text, "slow");
	pbrpc_client_free(c);
	pbrpc_server_stats st;
	srv_stop_stats(&t, &st);
	cr_assert_eq(st.protocol_errors, 0);
	cr_assert_eq(st.calls_completed, 4);
}

/* ==== 21: the handler's deadline is the client's ==== */

#define DEADLINE_TOLERANCE_NS (100ll * 1000000)

Test(reliability, handler_deadline_equals_client_deadline)
{
	rsrv t;
	srv_start(&t, NULL, NULL);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, t.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);

	/* An absolute deadline for the next call. */
	int64_t d = mono_ns() + 3000ll * 1000000;
	pbrpc_client_next_call(&(pbrpc_call_opts){ .deadline_ns = d });
	echo_ok(echo, "deadline");
	int64_t got = atomic_load(&seen_deadline);
	cr_assert(llabs(got - d) < DEADLINE_TOLERANCE_NS, "handler %lld, client %lld: %lld ms apart", (long long)got,
		  (long long)d, (long long)(got - d) / 1000000);

	/* A service bound to a deadline. */
	int64_t d2 = mono_ns() + 5000ll * 1000000;
	ProtobufCService *bound = pbrpc_client_service_with(c, &demo__echo__descriptor, &(pbrpc_call_opts){ .deadline_ns = d2 });
	for (int i = 0; i < 3; i++) {
		echo_ok(bound, "deadline");
		got = atomic_load(&seen_deadline);
		cr_assert(llabs(got - d2) < DEADLINE_TOLERANCE_NS, "bound: %lld ms apart", (long long)(got - d2) / 1000000);
	}

	/* A relative timeout: the deadline is the call's start plus it. */
	int64_t before = mono_ns();
	pbrpc_client_next_call(&(pbrpc_call_opts){ .timeout_ms = 2000 });
	echo_ok(echo, "deadline");
	int64_t after = mono_ns();
	got = atomic_load(&seen_deadline);
	cr_assert_geq(got, before + 2000ll * 1000000 - DEADLINE_TOLERANCE_NS);
	cr_assert_leq(got, after + 2000ll * 1000000 + DEADLINE_TOLERANCE_NS);

	/* No deadline: the handler sees none. */
	pbrpc_client_next_call(&(pbrpc_call_opts){ .timeout_ms = -1 });
	echo_ok(echo, "deadline");
	cr_assert_eq(atomic_load(&seen_deadline), 0);

	/* The same through an asynchronous call. */
	ProtobufCService *aecho = pbrpc_client_service_async(c, &demo__echo__descriptor);
	int64_t d3 = mono_ns() + 4000ll * 1000000;
	pbrpc_client_next_call(&(pbrpc_call_opts){ .deadline_ns = d3 });
	outcome o = { 0 };
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)"deadline";
	req.payload.len = 8;
	demo__echo__echo(aecho, &req, on_echo, &o);
	cr_assert_eq(pbrpc_client_drain(c, 5000), 0);
	cr_assert_eq(o.status, PBRPC_STATUS_OK);
	got = atomic_load(&seen_deadline);
	cr_assert(llabs(got - d3) < DEADLINE_TOLERANCE_NS, "async: %lld ms apart", (long long)(got - d3) / 1000000);
	pbrpc_client_free(c);
	srv_stop(&t);
}

/* ==== 24: size limits at each side ==== */

static size_t varint_len(size_t n)
{
	size_t l = 1;
	while (n >= 0x80) {
		n >>= 7;
		l++;
	}
	return l;
}

/* The payload length n whose Echo REQUEST (method demo.Echo/Echo, field 1)
 * is exactly `size` bytes. */
static size_t request_payload_for(size_t size)
{
	for (size_t n = 0; n < size; n++)
		if (2 + 14 + 1 + varint_len(n) + n == size)
			return n;
	cr_assert_fail("no payload makes a %zu-byte request", size);
	return 0;
}

/* The reply payload length n whose OK RESPONSE is exactly `size` bytes. */
static size_t reply_payload_for(size_t size)
{
	for (size_t n = 0; n < size; n++)
		if (4 + 1 + varint_len(n) + n == size)
			return n;
	cr_assert_fail("no payload makes a %zu-byte reply", size);
	return 0;
}

static void limits_at(uint32_t limit)
{
	/* Sides 1 and 2: the server accepts requests up to `limit`. */
	rsrv t;
	pbrpc_server_opts so = { .max_frame = limit };
	srv_start(&t, NULL, &so);
	bystander b;
	bystander_open(&b, t.addr);
	peer p;
	peer_handshake(&p, t.addr);
	cr_assert_eq(p.server_hello.max_frame, limit);
	static char payload[4096];
	char msg[128], want[128];
	size_t n = request_payload_for(limit);
	memset(payload, 'a', n);
	payload[n] = 0;
	peer_request(&p, 1, payload); /* exactly the limit */
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_OK, "%s", msg);
	n = request_payload_for(limit + 1);
	memset(payload, 'a', n);
	payload[n] = 0;
	peer_request(&p, 2, payload); /* one byte over, from a peer that ignores the HELLO */
	uint32_t id = 0;
	cr_assert_eq(peer_response(&p, &id, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_RESOURCE_EXHAUSTED);
	cr_assert_eq(id, 2);
	snprintf(want, sizeof(want), "request is %u bytes, server accepts at most %u", limit + 1, limit);
	cr_assert_str_eq(msg, want);
	peer_ping_echo(&p, 3);
	bystander_ok(&b);

	/* The real client knows the limit from the HELLO and refuses locally.
	 * Its requests carry the 8-byte timeout (the default call timeout). */
	pbrpc_hello sh;
	pbrpc_client_server_hello(b.c, &sh);
	cr_assert_eq(sh.max_frame, limit);
	n = request_payload_for(limit - 8);
	memset(payload, 'c', n);
	payload[n] = 0;
	echo_ok(b.echo, payload); /* exactly the limit */
	int invoked = atomic_load(&n_invoked);
	n = request_payload_for(limit + 1 - 8);
	memset(payload, 'c', n);
	payload[n] = 0;
	outcome o = echo_call(b.echo, payload);
	cr_assert_eq(o.status, PBRPC_STATUS_RESOURCE_EXHAUSTED);
	cr_assert_str_eq(o.message, want);
	cr_assert_eq(atomic_load(&n_invoked), invoked, "nothing was sent");
	bystander_ok(&b);
	pbrpc_client_free(b.c);
	peer_close(&p);
	srv_stop(&t);

	/* Sides 3 and 4: the client accepts replies up to `limit`; the server
	 * refuses to send a larger one and says so. */
	srv_start(&t, NULL, NULL);
	pbrpc_client *c;
	pbrpc_client_opts co = { .max_frame = limit };
	cr_assert_eq(pbrpc_client_connect(&c, t.addr, &co), 0);
	ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);
	char req[32];
	snprintf(req, sizeof(req), "big:%zu", reply_payload_for(limit));
	o = echo_call(echo, req);
	cr_assert_eq(o.status, PBRPC_STATUS_OK, "exactly the limit: %s", o.message);
	cr_assert_eq(o.len, reply_payload_for(limit));
	snprintf(req, sizeof(req), "big:%zu", reply_payload_for(limit + 1));
	o = echo_call(echo, req);
	cr_assert_eq(o.status, PBRPC_STATUS_RESOURCE_EXHAUSTED);
	snprintf(want, sizeof(want), "reply is %u bytes, client accepts at most %u", limit + 1, limit);
	cr_assert_str_eq(o.message, want);
	echo_ok(echo, "still usable");
	/* A raw peer announcing the same limit gets the same answer. */
	peer_open(&p, t.addr);
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc_hello h = { .version = 1, .max_frame = limit, .agent = "test" };
	cr_assert_eq(pbrpc__wire_write_preface(&w, &h), 0);
	peer_send_writer(&p, &w);
	pbrpc__frame_writer_fini(&w);
	peer_read_hello(&p);
	peer_request(&p, 9, req);
	pbrpc__frame f;
	cr_assert_eq(pbrpc__frame_read(&p.dec, p.fd, &f, 5000), 1);
	cr_assert_eq(f.hdr.type, PBRPC_FRAME_RESPONSE);
	cr_assert_leq(f.hdr.length, limit, "the status answer itself fits the limit");
	pbrpc__wire_response r;
	cr_assert_eq(pbrpc__wire_read_response(&f, &r), 0);
	cr_assert_eq(r.status, PBRPC_STATUS_RESOURCE_EXHAUSTED);
	cr_assert_eq(r.message_len, strlen(want));
	peer_ping_echo(&p, 10);
	peer_close(&p);
	pbrpc_client_free(c);
	srv_stop(&t);
}

Test(reliability, limits_at_each_side_minimum_64)
{
	limits_at(PBRPC_MAX_FRAME_MIN);
}

Test(reliability, limits_at_each_side_1000)
{
	limits_at(1000);
}

/* ==== 28: one unread call does not stall others ==== */

typedef struct caller {
	ProtobufCService *svc;
	const char *payload;
	outcome o;
	int64_t done_ms;
} caller;

static void *caller_main(void *arg)
{
	caller *k = arg;
	k->o = echo_call(k->svc, k->payload);
	k->done_ms = tu_now_ms();
	return NULL;
}

/* A call held by its handler on one connection and a 1 MiB REQUEST of which
 * only a part has arrived on another: calls on other connections, and on the
 * held call's own connection, complete meanwhile. Then both finish. */
Test(reliability, held_call_and_half_sent_request_do_not_stall_others)
{
	rsrv t;
	srv_start(&t, NULL, NULL);
	pbrpc_client *held_c, *other_c;
	cr_assert_eq(pbrpc_client_connect(&held_c, t.addr, NULL), 0);
	cr_assert_eq(pbrpc_client_connect(&other_c, t.addr, NULL), 0);
	ProtobufCService *held_echo = pbrpc_client_service(held_c, &demo__echo__descriptor);
	ProtobufCService *other_echo = pbrpc_client_service(other_c, &demo__echo__descriptor);
	caller hc = { .svc = held_echo, .payload = "hold" };
	pthread_t thr;
	pthread_create(&thr, NULL, caller_main, &hc);
	wait_held(1);

	/* A 1 MiB REQUEST, of which a third is sent, then nothing. */
	peer big;
	peer_handshake(&big, t.addr);
	size_t plen = (1u << 20) - 2 - 14 - 1 - 3;
	char *payload = malloc(plen + 1);
	memset(payload, 'z', plen);
	payload[plen] = 0;
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)payload;
	req.payload.len = plen;
	pbrpc__wire_request r = { .call_id = 1, .method = "demo.Echo/Echo", .method_len = 14 };
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	cr_assert_eq(pbrpc__wire_write_request(&w, &r, &req.base, 0), 0);
	size_t total = pbrpc__frame_writer_pending(&w);
	cr_assert_eq(total, PBRPC_FRAME_HEADER_SIZE + (1u << 20));
	size_t part = total / 3;
	tu_write_full(big.fd, w.buf + w.head, part);

	/* Other connections, and the held call's own, are served. */
	peer bys;
	peer_handshake(&bys, t.addr);
	int64_t t0 = tu_now_ms();
	for (int i = 0; i < 20; i++) {
		char p[32];
		snprintf(p, sizeof(p), "other-%d", i);
		echo_ok(other_echo, p);
		snprintf(p, sizeof(p), "same-%d", i);
		echo_ok(held_echo, p);
		peer_ping_echo(&bys, (uint32_t)i + 1);
	}
	cr_assert_lt(tu_now_ms() - t0, 10000);
	cr_assert_eq(hc.o.calls, 0, "the held call is still waiting");

	/* The rest of the big request arrives: it is answered in full. */
	tu_write_full(big.fd, w.buf + w.head + part, total - part);
	pbrpc__frame_writer_fini(&w);
	pbrpc__frame f;
	cr_assert_eq(pbrpc__frame_read(&big.dec, big.fd, &f, 10000), 1);
	cr_assert_eq(f.hdr.type, PBRPC_FRAME_RESPONSE);
	pbrpc__wire_response resp;
	cr_assert_eq(pbrpc__wire_read_response(&f, &resp), 0);
	cr_assert_eq(resp.status, PBRPC_STATUS_OK);
	Demo__EchoReply *er = demo__echo_reply__unpack(NULL, resp.body_len, resp.body);
	cr_assert_not_null(er);
	cr_assert_eq(er->payload.len, plen);
	cr_assert_eq(memcmp(er->payload.data, payload, plen), 0);
	demo__echo_reply__free_unpacked(er, NULL);
	free(payload);

	release_held("released");
	pthread_join(thr, NULL);
	cr_assert_eq(hc.o.status, PBRPC_STATUS_OK, "%s", hc.o.message);
	cr_assert_str_eq(hc.o.text, "released");
	peer_close(&big);
	peer_close(&bys);
	pbrpc_client_free(held_c);
	pbrpc_client_free(other_c);
	srv_stop(&t);
}

/* ==== 33: the reconnect backoff cap ==== */

typedef struct acceptor {
	int lfd;
	atomic_bool stop;
	int64_t at[256];
	int n;
} acceptor;

/* Accepts and closes at once, noting when: each accept is one dial. */
static void *acceptor_main(void *arg)
{
	acceptor *a = arg;
	while (!atomic_load(&a->stop)) {
		struct pollfd pfd = { .fd = a->lfd, .events = POLLIN };
		if (poll(&pfd, 1, 10) <= 0)
			continue;
		int fd = accept4(a->lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0)
			continue;
		if (a->n < 256)
			a->at[a->n++] = tu_now_ms();
		close(fd);
	}
	return NULL;
}

/* A client with backoff_max_ms 100 calls an endpoint where nothing listens
 * for 600 ms (its backoff has doubled past the cap by then); then a listener
 * that accepts and drops every connection counts its dials: they come no
 * further apart than the cap plus 20% jitter (plus a generous margin for a
 * loaded machine). Finally the real server listens there and the same call,
 * still within its deadline, completes. */
Test(reliability, backoff_cap_honoured)
{
	const char *addr = unix_path("late.sock");
	char saved[128];
	snprintf(saved, sizeof(saved), "%s", addr);
	pbrpc_client *c;
	pbrpc_client_opts co = { .lazy = true, .backoff_min_ms = 10, .backoff_max_ms = 100, .connect_timeout_ms = 500 };
	cr_assert_eq(pbrpc_client_connect(&c, saved, &co), 0);
	pbrpc_call_opts callo = { .timeout_ms = 8000 };
	ProtobufCService *echo = pbrpc_client_service_with(c, &demo__echo__descriptor, &callo);
	caller k = { .svc = echo, .payload = "eventually" };
	pthread_t thr;
	pthread_create(&thr, NULL, caller_main, &k);
	usleep(600 * 1000);

	pbrpc_endpoint ep;
	cr_assert_eq(pbrpc_endpoint_parse(saved, &ep), 0);
	acceptor a = { .lfd = pbrpc_endpoint_listen(&ep, NULL) };
	cr_assert_geq(a.lfd, 0);
	pthread_t athr;
	pthread_create(&athr, NULL, acceptor_main, &a);
	usleep(1000 * 1000);
	atomic_store(&a.stop, true);
	pthread_join(athr, NULL);
	close(a.lfd);
	unlink(ep.path);
	cr_assert_eq(k.o.calls, 0, "the call is still waiting");
	cr_assert_geq(a.n, 5, "only %d dials in 1 s with a 100 ms cap", a.n);
	int64_t worst = 0;
	for (int i = 1; i < a.n; i++)
		if (a.at[i] - a.at[i - 1] > worst)
			worst = a.at[i] - a.at[i - 1];
	/* Uncapped, the 7th backoff from 10 ms would be 640 ms: 120 + 300 of
	 * scheduling slack on a loaded machine still tells the two apart. */
	cr_assert_leq(worst, 100 * 12 / 10 + 300, "dials %lld ms apart with backoff_max_ms 100", (long long)worst);

	rsrv t;
	srv_start(&t, saved, NULL);
	pthread_join(thr, NULL);
	cr_assert_eq(k.o.calls, 1);
	cr_assert_eq(k.o.status, PBRPC_STATUS_OK, "%s", k.o.message);
	cr_assert_str_eq(k.o.text, "eventually");
	pbrpc_client_free(c);
	srv_stop(&t);
}

/* ==== 34: the peer closes with calls pending ==== */

/* Synchronous calls on four threads and four asynchronous ones wait in the
 * server's handler when the server vanishes (its connections closed, no
 * answer sent): every one fails UNAVAILABLE at once; a new asynchronous call
 * fails at once, a synchronous one within its own short deadline; when a
 * server listens again the next call works. */
Test(reliability, peer_close_fails_all_pending_calls_fast)
{
	const char *addr = unix_path("gone.sock");
	char saved[128];
	snprintf(saved, sizeof(saved), "%s", addr);
	rsrv t;
	srv_start(&t, saved, NULL);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, saved, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);
	ProtobufCService *aecho = pbrpc_client_service_async(c, &demo__echo__descriptor);
	enum { SYNC = 4, ASYNC = 4 };
	caller k[SYNC];
	pthread_t thr[SYNC];
	for (int i = 0; i < SYNC; i++) {
		k[i] = (caller){ .svc = echo, .payload = "hold" };
		pthread_create(&thr[i], NULL, caller_main, &k[i]);
	}
	static outcome ao[ASYNC + 1];
	memset(ao, 0, sizeof(ao));
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)"hold";
	req.payload.len = 4;
	for (int i = 0; i < ASYNC; i++)
		demo__echo__echo(aecho, &req, on_echo, &ao[i]);
	int64_t until = tu_now_ms() + 10000;
	while (atomic_load(&n_held) < SYNC + ASYNC && tu_now_ms() < until)
		pbrpc_client_process(c, 10);
	cr_assert_eq(atomic_load(&n_held), SYNC + ASYNC);

	int64_t t0 = tu_now_ms();
	srv_kill(&t);
	for (int i = 0; i < SYNC; i++) {
		pthread_join(thr[i], NULL);
		cr_assert_eq(k[i].o.status, PBRPC_STATUS_UNAVAILABLE, "sync %d: %s %s", i,
			     pbrpc_status_name(k[i].o.status), k[i].o.message);
		cr_assert_lt(k[i].done_ms - t0, 2000, "sync %d failed after %lld ms", i, (long long)(k[i].done_ms - t0));
	}
	cr_assert_eq(pbrpc_client_drain(c, 2000), 0, "async calls failed within 2 s");
	for (int i = 0; i < ASYNC; i++) {
		cr_assert_eq(ao[i].calls, 1);
		cr_assert_eq(ao[i].status, PBRPC_STATUS_UNAVAILABLE, "async %d: %s", i, ao[i].message);
	}
	cr_assert_lt(tu_now_ms() - t0, 2500);

	/* New calls: no server. */
	int64_t t1 = tu_now_ms();
	req.payload.data = (uint8_t *)"new";
	req.payload.len = 3;
	demo__echo__echo(aecho, &req, on_echo, &ao[ASYNC]);
	cr_assert_eq(pbrpc_client_drain(c, 2000), 0);
	cr_assert_eq(ao[ASYNC].status, PBRPC_STATUS_UNAVAILABLE, "%s", ao[ASYNC].message);
	cr_assert_lt(tu_now_ms() - t1, 1000, "a new async call fails at once");
	int64_t t2 = tu_now_ms();
	pbrpc_client_next_call(&(pbrpc_call_opts){ .timeout_ms = 300 });
	outcome o = echo_call(echo, "new sync");
	cr_assert(o.status == PBRPC_STATUS_UNAVAILABLE || o.status == PBRPC_STATUS_DEADLINE_EXCEEDED, "%s: %s",
		  pbrpc_status_name(o.status), o.message);
	cr_assert_lt(tu_now_ms() - t2, 2000, "a new sync call fails within its deadline");

	/* A server again: the next call reconnects. */
	srv_start(&t, saved, NULL);
	echo_ok(echo, "back");
	pbrpc_client_free(c);
	srv_stop(&t);
}

/* ==== 42: 200 clients ==== */

#define CLIENT_THREADS 8
#define CLIENTS_EACH 25

typedef struct crowd {
	const char *addr;
	pthread_barrier_t *all_connected;
	int ok, connected;
	char why[320];
} crowd;

static void *crowd_main(void *arg)
{
	crowd *w = arg;
	pbrpc_client *c[CLIENTS_EACH] = { 0 };
	for (int i = 0; i < CLIENTS_EACH; i++) {
		int rc = pbrpc_client_connect(&c[i], w->addr, NULL);
		if (rc == 0)
			w->connected++;
		else
			snprintf(w->why, sizeof(w->why), "connect: %s", pbrpc_strerror(rc));
	}
	pthread_barrier_wait(w->all_connected); /* all 200 connections open at once */
	for (int i = 0; i < CLIENTS_EACH; i++) {
		if (!c[i])
			continue;
		char p[32];
		snprintf(p, sizeof(p), "client-%d", i);
		outcome o = echo_call(pbrpc_client_service(c[i], &demo__echo__descriptor), p);
		if (o.status == PBRPC_STATUS_OK && strcmp(o.text, p) == 0)
			w->ok++;
		else
			snprintf(w->why, sizeof(w->why), "%s: %s", pbrpc_status_name(o.status), o.message);
	}
	for (int i = 0; i < CLIENTS_EACH; i++)
		pbrpc_client_free(c[i]);
	return NULL;
}

Test(reliability, two_hundred_clients_one_call_each)
{
	rsrv t;
	srv_start(&t, NULL, NULL);
	pthread_barrier_t bar;
	pthread_barrier_init(&bar, NULL, CLIENT_THREADS);
	crowd w[CLIENT_THREADS];
	pthread_t thr[CLIENT_THREADS];
	for (int i = 0; i < CLIENT_THREADS; i++) {
		w[i] = (crowd){ .addr = t.addr, .all_connected = &bar };
		pthread_create(&thr[i], NULL, crowd_main, &w[i]);
	}
	int ok = 0, connected = 0;
	for (int i = 0; i < CLIENT_THREADS; i++) {
		pthread_join(thr[i], NULL);
		ok += w[i].ok;
		connected += w[i].connected;
		cr_expect_eq(w[i].ok, CLIENTS_EACH, "thread %d: %s", i, w[i].why);
	}
	pthread_barrier_destroy(&bar);
	cr_assert_eq(connected, CLIENT_THREADS * CLIENTS_EACH);
	cr_assert_eq(ok, CLIENT_THREADS * CLIENTS_EACH);
	pbrpc_server_stats st;
	srv_stop_stats(&t, &st);
	cr_assert_eq(st.connections_accepted, CLIENT_THREADS * CLIENTS_EACH);
	cr_assert_eq(st.calls_completed, CLIENT_THREADS * CLIENTS_EACH);
	cr_assert_eq(st.connections_refused, 0);
}

/* ==== 45: peer credentials ==== */

Test(reliability, peer_credentials_pid_uid_gid)
{
	rsrv t;
	srv_start(&t, NULL, NULL);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, t.addr, NULL), 0);
	memset(&seen_cred, 0xff, sizeof(seen_cred));
	echo_ok(pbrpc_client_service(c, &demo__echo__descriptor), "cred");
	cr_assert_eq(seen_cred.rc, 0);
	cr_assert_eq(seen_cred.pid, getpid(), "pid %d, ours %d", (int)seen_cred.pid, (int)getpid());
	cr_assert_eq(seen_cred.uid, geteuid());
	cr_assert_eq(seen_cred.gid, getegid());
	pbrpc_client_free(c);
	srv_stop(&t);

	/* Over TCP there are none. */
	srv_start(&t, "tcp:127.0.0.1:0", NULL);
	cr_assert_eq(pbrpc_client_connect(&c, t.addr, NULL), 0);
	memset(&seen_cred, 0, sizeof(seen_cred));
	echo_ok(pbrpc_client_service(c, &demo__echo__descriptor), "cred");
	cr_assert_eq(seen_cred.rc, -ENOTSUP);
	pbrpc_client_free(c);
	srv_stop(&t);
}

/* ==== 18: API misuse ==== */

Test(reliability, api_misuse_is_refused_or_ignored)
{
	rsrv t;
	srv_start(&t, NULL, NULL);
	bystander b;
	bystander_open(&b, t.addr);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, t.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);
	ProtobufCService *aecho = pbrpc_client_service_async(c, &demo__echo__descriptor);

	/* A handler that calls its closure twice: the first answer stands. */
	for (int i = 0; i < 3; i++) {
		outcome o = echo_call(echo, "twice");
		cr_assert_eq(o.calls, 1);
		cr_assert_eq(o.status, PBRPC_STATUS_OK);
		cr_assert_str_eq(o.text, "first");
		echo_ok(echo, "after twice");
		bystander_ok(&b);
	}
	/* A raw peer sees exactly one RESPONSE for the call. */
	peer p;
	peer_handshake(&p, t.addr);
	peer_request(&p, 1, "twice");
	peer_request(&p, 2, "next");
	char got[64];
	uint32_t id = 0;
	cr_assert_eq(peer_response(&p, &id, NULL, 0, got, sizeof(got)), PBRPC_STATUS_OK);
	cr_assert_eq(id, 1);
	cr_assert_str_eq(got, "first");
	cr_assert_eq(peer_response(&p, &id, NULL, 0, got, sizeof(got)), PBRPC_STATUS_OK);
	cr_assert_eq(id, 2, "no second RESPONSE for call 1");
	cr_assert_str_eq(got, "next");
	peer_close(&p);

	/* pbrpc_call_set_status outside 0..16. */
	echo_ok(echo, "badstatus");
	cr_assert_eq(seen_status_rc[0], PBRPC_EINVALID, "status 17");
	cr_assert_eq(seen_status_rc[1], PBRPC_EINVALID, "status -1");
	cr_assert_eq(seen_status_rc[2], PBRPC_EINVALID, "status 1000");
	cr_assert_eq(seen_status_rc[3], 0, "status 16 is valid");
	cr_assert_eq(pbrpc_call_set_status(NULL, 0, NULL), PBRPC_EINVALID);

	/* A stub call with a method index out of range fails locally. */
	int invoked = atomic_load(&n_invoked);
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	outcome o = { 0 };
	echo->invoke(echo, 1, &req.base, (ProtobufCClosure)on_echo, &o);
	cr_assert_eq(o.calls, 1);
	cr_assert_eq(o.status, PBRPC_STATUS_INVALID_ARGUMENT, "%s", o.message);
	memset(&o, 0, sizeof(o));
	echo->invoke(echo, 99, &req.base, (ProtobufCClosure)on_echo, &o);
	cr_assert_eq(o.status, PBRPC_STATUS_INVALID_ARGUMENT);
	memset(&o, 0, sizeof(o));
	aecho->invoke(aecho, 7, &req.base, (ProtobufCClosure)on_echo, &o);
	pbrpc_client_drain(c, 1000);
	cr_assert_eq(o.calls, 1);
	cr_assert_eq(o.status, PBRPC_STATUS_INVALID_ARGUMENT);
	cr_assert_eq(atomic_load(&n_invoked), invoked, "nothing reached the server");

	/* Cancelling an id that is not in flight. */
	cr_assert_eq(pbrpc_client_cancel(c, 0), PBRPC_EINVALID);
	cr_assert_eq(pbrpc_client_cancel(c, 123456), PBRPC_EINVALID);
	echo_ok(echo, "done");
	cr_assert_eq(pbrpc_client_cancel(c, pbrpc_client_last_call()), PBRPC_EINVALID, "a finished call");
	echo_ok(echo, "still fine");
	bystander_ok(&b);
	pbrpc_client_free(c);
	pbrpc_client_free(b.c);
	srv_stop(&t);
}

/* ==== 25: metadata limits ==== */

static outcome md_call(ProtobufCService *echo, const pbrpc_metadata *md, size_t n)
{
	pbrpc_client_next_call(&(pbrpc_call_opts){ .metadata = md, .metadata_count = n });
	return echo_call(echo, "md");
}

Test(reliability, metadata_limits)
{
	rsrv t;
	srv_start(&t, NULL, NULL);
	bystander b;
	bystander_open(&b, t.addr);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, t.addr, NULL), 0);
	ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);
	static char key[300];
	memset(key, 'k', sizeof(key) - 1);
	static uint8_t value[65536];
	memset(value, 'v', sizeof(value));

	/* A 255-byte key with a 65535-byte value arrives whole. */
	snprintf(md_key, sizeof(md_key), "%.*s", 255, key);
	pbrpc_metadata m = { .key = key, .key_len = 255, .value = value, .value_len = 65535 };
	outcome o = md_call(echo, &m, 1);
	cr_assert_eq(o.status, PBRPC_STATUS_OK, "%s", o.message);
	cr_assert_eq(atomic_load(&seen_md_len), 65535);
	int invoked = atomic_load(&n_invoked);

	/* Refused locally: a 256-byte key, a 65536-byte value, a bad key, 65536 entries. */
	m.key_len = 256;
	m.value_len = 1;
	o = md_call(echo, &m, 1);
	cr_assert_eq(o.status, PBRPC_STATUS_INVALID_ARGUMENT, "256-byte key: %s", o.message);
	m.key_len = 3;
	m.value_len = 65536;
	o = md_call(echo, &m, 1);
	cr_assert_eq(o.status, PBRPC_STATUS_INVALID_ARGUMENT, "65536-byte value");
	pbrpc_metadata upper = { .key = "Key", .value = "v", .value_len = 1 };
	o = md_call(echo, &upper, 1);
	cr_assert_eq(o.status, PBRPC_STATUS_INVALID_ARGUMENT, "uppercase key");
	pbrpc_metadata *many = calloc(65536, sizeof(*many));
	for (size_t i = 0; i < 65536; i++)
		many[i] = (pbrpc_metadata){ .key = "k", .key_len = 1 };
	o = md_call(echo, many, 65536);
	cr_assert_eq(o.status, PBRPC_STATUS_INVALID_ARGUMENT, "65536 entries: %s", o.message);
	cr_assert_eq(atomic_load(&n_invoked), invoked, "nothing was sent");

	/* 65535 entries (the count's limit) pass. */
	snprintf(md_key, sizeof(md_key), "k");
	o = md_call(echo, many, 65535);
	cr_assert_eq(o.status, PBRPC_STATUS_OK, "65535 entries: %s", o.message);
	cr_assert_eq(atomic_load(&seen_md_len), 0);
	bystander_ok(&b);
	pbrpc_client_free(c);
	srv_stop(&t);

	/* Entries up to the frame limit: a server accepting 4096 bytes. The
	 * request is 2 + 14 (method) + 8 (timeout) + 2 (count) + 1000 * 4 ("k",
	 * empty) + (1 + 3 + 2 + v) ("pad") + 4 (body "md") = 4036 + v bytes. */
	pbrpc_server_opts so = { .max_frame = 4096 };
	srv_start(&t, NULL, &so);
	cr_assert_eq(pbrpc_client_connect(&c, t.addr, NULL), 0);
	echo = pbrpc_client_service(c, &demo__echo__descriptor);
	many[1000] = (pbrpc_metadata){ .key = "pad", .value = value, .value_len = 60 };
	snprintf(md_key, sizeof(md_key), "pad");
	o = md_call(echo, many, 1001);
	cr_assert_eq(o.status, PBRPC_STATUS_OK, "exactly 4096 bytes: %s", o.message);
	cr_assert_eq(atomic_load(&seen_md_len), 60);
	many[1000].value_len = 61;
	o = md_call(echo, many, 1001);
	cr_assert_eq(o.status, PBRPC_STATUS_RESOURCE_EXHAUSTED);
	cr_assert_str_eq(o.message, "request is 4097 bytes, server accepts at most 4096");
	echo_ok(echo, "fine");
	pbrpc_client_free(c);
	free(many);
	pbrpc_client_free(b.c);
	srv_stop(&t);
}

/* The server's view of metadata bytes from a raw peer: a 255-byte key
 * passes; a key length of 0 (what 256 becomes in the one-byte length) or a
 * key with bad characters is INVALID_ARGUMENT ("invalid metadata key in
 * request"); a count larger than the entries present, or a value running
 * past the end, is a broken layout. The connection stays usable. */
Test(reliability, metadata_bytes_checked_by_server)
{
	rsrv t;
	srv_start(&t, NULL, NULL);
	bystander b;
	bystander_open(&b, t.addr);
	peer p;
	peer_handshake(&p, t.addr);
	static uint8_t buf[2 + 14 + 2 + 1 + 255 + 2 + 8 + 4];
	size_t off = 0;
	buf[off++] = 0;
	buf[off++] = 14;
	memcpy(buf + off, "demo.Echo/Echo", 14);
	off += 14;
	size_t md_at = off;
	char msg[128], got[64];

	/* count 1, key 255 x 'k', value "val", body "md". */
	buf[off++] = 0;
	buf[off++] = 1;
	buf[off++] = 255;
	memset(buf + off, 'k', 255);
	off += 255;
	buf[off++] = 0;
	buf[off++] = 3;
	memcpy(buf + off, "val", 3);
	off += 3;
	memcpy(buf + off, "\x0a\x02md", 4);
	off += 4;
	memset(md_key, 'k', 255);
	md_key[255] = 0;
	send_request_bytes(&p, 1, PBRPC_REQUEST_METADATA, buf, off);
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), got, sizeof(got)), PBRPC_STATUS_OK, "%s", msg);
	cr_assert_eq(atomic_load(&seen_md_len), 3);

	const struct {
		uint8_t bytes[16];
		size_t len;
		const char *want;
	} bad[] = {
		{ { 0, 1, 0, 0, 0 }, 5, "invalid metadata key in request" },                  /* key length 0 */
		{ { 0, 1, 3, 'K', 'e', 'y', 0, 0 }, 8, "invalid metadata key in request" },  /* uppercase */
		{ { 0, 1, 3, 'k', ' ', 'y', 0, 0 }, 8, "invalid metadata key in request" },  /* a space */
		{ { 0, 2, 1, 'k', 0, 0 }, 6, "malformed request header" },                   /* 2 entries, 1 there */
		{ { 0, 1, 1, 'k', 0, 9, 'v' }, 7, "malformed request header" },              /* value past the end */
		{ { 0, 1, 200, 'k' }, 4, "malformed request header" },                       /* key past the end */
		{ { 0 }, 1, "malformed request header" },                                    /* half a count */
	};
	uint32_t id = 2;
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		memcpy(buf + md_at, bad[i].bytes, bad[i].len);
		send_request_bytes(&p, id, PBRPC_REQUEST_METADATA, buf, md_at + bad[i].len);
		cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_INVALID_ARGUMENT, "case %zu", i);
		cr_assert_str_eq(msg, bad[i].want, "case %zu", i);
		peer_ping_echo(&p, ++id);
		id++;
		bystander_ok(&b);
	}
	pbrpc_client_free(b.c);
	peer_close(&p);
	srv_stop(&t);
}

/* Side 4: a RESPONSE over the client's own max_frame (no real server sends
 * one: a fake does) is a connection error. The client refuses it on the
 * header, before reading the payload: GOAWAY(RESOURCE_EXHAUSTED) naming both
 * sizes, close; the call fails and the next call dials again. */
typedef struct fake_big {
	int lfd;
	uint32_t size;
	int goaway_status;
	char goaway_msg[128];
	int conns;
} fake_big;

static void *fake_big_main(void *arg)
{
	fake_big *f = arg;
	for (int n = 0; n < 2; n++) {
		int fd = accept4(f->lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0)
			return NULL;
		f->conns++;
		struct timeval tv = { .tv_sec = 5 };
		setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
		pbrpc__frame_writer w;
		pbrpc__frame_writer_init(&w);
		pbrpc_hello h = { .version = 1, .max_calls = 16, .features = PBRPC_FEATURES, .agent = "fake" };
		pbrpc__wire_write_preface(&w, &h);
		while (pbrpc__frame_writer_pending(&w))
			if (pbrpc__frame_writer_flush(&w, fd, 0) < 0)
				break;
		pbrpc__frame_writer_fini(&w);
		uint8_t pre[PBRPC_WIRE_PREFACE_SIZE];
		tu_read_full(fd, pre, sizeof(pre));
		pbrpc__frame_decoder dec;
		pbrpc__frame_decoder_init(&dec, 1u << 20);
		pbrpc__frame fr;
		while (pbrpc__frame_read(&dec, fd, &fr, 5000) == 1) {
			if (fr.hdr.type == PBRPC_FRAME_REQUEST) {
				if (n == 0) {
					/* A RESPONSE one byte over the client's limit. */
					uint8_t *body = calloc(1, f->size);
					pbrpc__frame_header rh = { .type = PBRPC_FRAME_RESPONSE, .flags = PBRPC_RESPONSE_END,
								   .stream = fr.hdr.stream };
					pbrpc__frame_write(fd, &rh, body, f->size, 5000);
					free(body);
				} else {
					pbrpc__frame_writer_init(&w);
					Demo__EchoReply r = DEMO__ECHO_REPLY__INIT;
					r.payload.data = (uint8_t *)"fine";
					r.payload.len = 4;
					pbrpc__wire_response resp = { .call_id = fr.hdr.stream };
					pbrpc__wire_write_response(&w, &resp, &r.base, 0);
					while (pbrpc__frame_writer_pending(&w))
						if (pbrpc__frame_writer_flush(&w, fd, 0) < 0)
							break;
					pbrpc__frame_writer_fini(&w);
				}
			} else if (fr.hdr.type == PBRPC_FRAME_GOAWAY) {
				const char *m;
				size_t ml;
				pbrpc__wire_read_goaway(&fr, &f->goaway_status, &m, &ml);
				snprintf(f->goaway_msg, sizeof(f->goaway_msg), "%.*s", (int)ml, m);
			}
		}
		pbrpc__frame_decoder_fini(&dec);
		close(fd);
	}
	return NULL;
}

Test(reliability, reply_over_client_limit_from_a_peer_is_refused_on_the_header)
{
	pbrpc_endpoint ep;
	const char *addr = unix_path("big.sock");
	char saved[128];
	snprintf(saved, sizeof(saved), "%s", addr);
	cr_assert_eq(pbrpc_endpoint_parse(saved, &ep), 0);
	fake_big f = { .lfd = pbrpc_endpoint_listen(&ep, NULL), .size = 1001, .goaway_status = -1 };
	cr_assert_geq(f.lfd, 0);
	pthread_t thr;
	pthread_create(&thr, NULL, fake_big_main, &f);
	pbrpc_client *c;
	pbrpc_client_opts co = { .max_frame = 1000 };
	cr_assert_eq(pbrpc_client_connect(&c, saved, &co), 0);
	ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);
	outcome o = echo_call(echo, "x");
	cr_assert_neq(o.status, PBRPC_STATUS_OK);
	cr_assert(o.status == PBRPC_STATUS_UNAVAILABLE || o.status == PBRPC_STATUS_RESOURCE_EXHAUSTED, "%s: %s",
		  pbrpc_status_name(o.status), o.message);
	o = echo_call(echo, "y"); /* a new connection */
	cr_assert_eq(o.status, PBRPC_STATUS_OK, "%s", o.message);
	cr_assert_str_eq(o.text, "fine");
	pbrpc_client_free(c);
	pthread_join(thr, NULL);
	close(f.lfd);
	unlink(ep.path);
	cr_assert_eq(f.conns, 2);
	cr_assert_eq(f.goaway_status, PBRPC_STATUS_RESOURCE_EXHAUSTED);
	cr_assert_str_eq(f.goaway_msg, "RESPONSE frame of 1001 bytes exceeds the limit of 1000");
}
