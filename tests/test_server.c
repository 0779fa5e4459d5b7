/* Server tests, driven by a raw peer that speaks docs/PROTOCOL.md byte by
 * byte (frame + wire layers only), so that every bad input can be sent
 * exactly. Each bad-input test also checks that a second, well-behaved client
 * connected at the same time keeps being served. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "echo.pb-c.h"
#include "kv.pb-c.h"
#include "pbrpc/client.h"
#include "pbrpc/endpoint.h"
#include "pbrpc/server.h"
#include "proto/wire.h"
#include "util/clock.h"
#include "testutil.h"

/* ---- a test service: demo.Echo with behaviours chosen by the payload ---- */

#define HELD_MAX 2048
static struct held {
	Demo__EchoReply_Closure closure;
	void *data;
	char payload[64];
} held[HELD_MAX];
static atomic_int n_held;
static atomic_int n_invoked;
static char seen_md[64];
static uid_t seen_uid = (uid_t)-1;
static int64_t seen_deadline;

static void reply_with(Demo__EchoReply_Closure closure, void *data, const char *payload)
{
	Demo__EchoReply r = DEMO__ECHO_REPLY__INIT;
	r.payload.data = (uint8_t *)payload;
	r.payload.len = strlen(payload);
	closure(&r, data);
}

static void *late_reply(void *arg)
{
	struct held *h = arg;
	usleep(20000);
	reply_with(h->closure, h->data, h->payload);
	free(h);
	return NULL;
}

static void t_echo(Demo__Echo_Service *svc, const Demo__EchoRequest *req, Demo__EchoReply_Closure closure, void *data)
{
	(void)svc;
	atomic_fetch_add(&n_invoked, 1);
	char p[64] = "";
	snprintf(p, sizeof(p), "%.*s", (int)req->payload.len, (const char *)req->payload.data);
	size_t mdlen;
	const void *md = pbrpc_call_metadata(data, "x-test", &mdlen);
	if (md)
		snprintf(seen_md, sizeof(seen_md), "%.*s", (int)mdlen, (const char *)md);
	seen_deadline = pbrpc_call_deadline(data);
	if (req->fail_status) {
		pbrpc_call_set_status(data, (int)req->fail_status, "%s", req->fail_message);
		closure(NULL, data);
	} else if (strncmp(p, "hold", 4) == 0) {
		int i = atomic_fetch_add(&n_held, 1);
		held[i].closure = closure;
		held[i].data = data;
		snprintf(held[i].payload, sizeof(held[i].payload), "%s", p);
	} else if (strcmp(p, "sleep") == 0) {
		usleep(300000); /* blocks its worker */
		reply_with(closure, data, "slept");
	} else if (strcmp(p, "thread") == 0) {
		struct held *h = calloc(1, sizeof(*h));
		h->closure = closure;
		h->data = data;
		snprintf(h->payload, sizeof(h->payload), "from-thread");
		pthread_t t;
		pthread_create(&t, NULL, late_reply, h);
		pthread_detach(t);
	} else if (strcmp(p, "cred") == 0) {
		pid_t pid;
		gid_t gid;
		uid_t uid;
		if (pbrpc_call_peer_cred(data, &pid, &uid, &gid) == 0)
			seen_uid = uid;
		else
			cr_assert_eq(pbrpc_call_peer_cred(data, &pid, &uid, &gid), -ENOTSUP);
		reply_with(closure, data, "cred");
	} else if (strcmp(p, "null") == 0) {
		closure(NULL, data);
	} else if (strcmp(p, "big") == 0) {
		Demo__EchoReply r = DEMO__ECHO_REPLY__INIT;
		static uint8_t blob[256 * 1024];
		r.payload.data = blob;
		r.payload.len = sizeof(blob);
		closure(&r, data);
	} else {
		Demo__EchoReply r = DEMO__ECHO_REPLY__INIT;
		r.payload = req->payload;
		closure(&r, data);
	}
}

static Demo__Echo_Service echo_svc = DEMO__ECHO__INIT(t_);

/* Held calls are answered on the loop thread through this hook. */
static atomic_int release_req; /* 1: release all in reverse order */

/* ---- a server on its own thread ---- */

typedef struct tsrv {
	pbrpc_server *srv;
	pthread_t thr;
	char addr[PBRPC_ENDPOINT_STRLEN];
	char dir[64];
	int rc;
	atomic_bool done;
} tsrv;

/* PBRPC_TEST_LOOP_THREADS: release_req is served from this thread, beside
 * pbrpc_server_run (closures from a foreign thread). */
static void *release_main(void *arg)
{
	tsrv *t = arg;
	while (!atomic_load(&t->done)) {
		if (atomic_exchange(&release_req, 0)) {
			for (int i = atomic_load(&n_held) - 1; i >= 0; i--)
				reply_with(held[i].closure, held[i].data, held[i].payload);
			atomic_store(&n_held, 0);
		}
		usleep(2000);
	}
	return NULL;
}

static void *srv_main(void *arg)
{
	tsrv *t = arg;
	if (tu_loop_threads() > 1) {
		pthread_t rel;
		pthread_create(&rel, NULL, release_main, t);
		int rc = pbrpc_server_run(t->srv);
		atomic_store(&t->done, true);
		pthread_join(rel, NULL);
		t->rc = rc;
		return NULL;
	}
	for (;;) {
		int rc = pbrpc_server_process(t->srv, 20);
		if (atomic_exchange(&release_req, 0)) {
			for (int i = atomic_load(&n_held) - 1; i >= 0; i--)
				reply_with(held[i].closure, held[i].data, held[i].payload);
			atomic_store(&n_held, 0);
		}
		if (rc != 0) {
			t->rc = rc < 0 ? rc : 0;
			return NULL;
		}
	}
}

/* Starts a server on a thread running loop_main (srv_main: pbrpc_server_process). */
static void start_server_on(tsrv *t, const char *endpoint, const pbrpc_server_opts *opts, void *(*loop_main)(void *))
{
	memset(t, 0, sizeof(*t));
	atomic_store(&n_held, 0);
	atomic_store(&n_invoked, 0);
	pbrpc_server_opts lo = opts ? *opts : (pbrpc_server_opts){ 0 };
	if (!lo.loop_threads)
		lo.loop_threads = tu_loop_threads();
	cr_assert_eq(pbrpc_server_new(&t->srv, &lo), 0);
	cr_assert_eq(pbrpc_server_add_service(t->srv, &echo_svc.base), 0);
	char ep[160];
	if (!endpoint) {
		snprintf(t->dir, sizeof(t->dir), "/tmp/pbrpc-test-XXXXXX");
		cr_assert_not_null(mkdtemp(t->dir));
		snprintf(ep, sizeof(ep), "unix:%s/s.sock", t->dir);
		endpoint = ep;
	}
	int idx = pbrpc_server_listen(t->srv, endpoint);
	cr_assert_geq(idx, 0, "listen %s: %s", endpoint, pbrpc_strerror(idx));
	pbrpc_server_address(t->srv, idx, t->addr, sizeof(t->addr));
	pthread_create(&t->thr, NULL, loop_main, t);
}

static void start_server(tsrv *t, const char *endpoint, const pbrpc_server_opts *opts)
{
	start_server_on(t, endpoint, opts, srv_main);
}

static void stop_server(tsrv *t)
{
	pbrpc_server_shutdown(t->srv, 1000);
	pthread_join(t->thr, NULL);
	pbrpc_server_free(t->srv);
	if (t->dir[0])
		rmdir(t->dir);
}

/* ---- a raw peer ---- */

typedef struct peer {
	int fd;
	pbrpc__frame_decoder dec;
	pbrpc_hello server_hello;
	bool answer_pings; /* as a conforming peer does; off to play a silent one */
} peer;

static int peer_open(peer *p, const char *addr)
{
	pbrpc_endpoint ep;
	cr_assert_eq(pbrpc_endpoint_parse(addr, &ep), 0);
	p->fd = pbrpc_endpoint_connect(&ep, 2000);
	cr_assert_geq(p->fd, 0, "connect %s: %s", addr, pbrpc_strerror(p->fd));
	struct timeval tv = { .tv_sec = 5 };
	setsockopt(p->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	pbrpc__frame_decoder_init(&p->dec, 64u << 20);
	p->answer_pings = true;
	return p->fd;
}

static void peer_send_raw(peer *p, const void *data, size_t len)
{
	tu_write_full(p->fd, data, len);
}

static void peer_send_writer(peer *p, pbrpc__frame_writer *w)
{
	while (pbrpc__frame_writer_pending(w)) {
		ssize_t n = pbrpc__frame_writer_flush(w, p->fd, 0);
		cr_assert_geq(n, 0, "flush: %s", pbrpc_strerror((int)n));
	}
}

static void peer_send_hello(peer *p, uint32_t version)
{
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc_hello h = { .version = version, .max_frame = 64u << 20, .agent = "test" };
	cr_assert_eq(pbrpc__wire_write_preface(&w, &h), 0);
	peer_send_writer(p, &w);
	pbrpc__frame_writer_fini(&w);
}

/* Reads the server's preface and HELLO. */
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
	peer_send_hello(p, 1);
	peer_read_hello(p);
}

static void peer_close(peer *p)
{
	close(p->fd);
	pbrpc__frame_decoder_fini(&p->dec);
}

static void peer_request_ex(peer *p, uint32_t id, const char *method, const char *payload, uint32_t fail,
			    const pbrpc__wire_request *extra)
{
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)payload;
	req.payload.len = strlen(payload);
	req.fail_status = fail;
	if (fail)
		req.fail_message = (char *)"failing as asked";
	pbrpc__wire_request r = { 0 };
	if (extra)
		r = *extra;
	r.call_id = id;
	r.method = method;
	r.method_len = strlen(method);
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	cr_assert_eq(pbrpc__wire_write_request(&w, &r, &req.base, 0), 0);
	peer_send_writer(p, &w);
	pbrpc__frame_writer_fini(&w);
}

static void peer_request(peer *p, uint32_t id, const char *payload)
{
	peer_request_ex(p, id, "demo.Echo/Echo", payload, 0, NULL);
}

/* Reads frames until a RESPONSE and returns its status; a GOAWAY with a
 * non-OK status returns -1000 - status. Copies message and payload. */
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
		if (f.hdr.type == PBRPC_FRAME_PING && p->answer_pings) {
			/* A server that has closed meanwhile (a drain cut short)
			 * refuses the PONG; what it sent before is still to read. */
			pbrpc__frame_header h = { .type = PBRPC_FRAME_PONG };
			int wrc = pbrpc__frame_write(p->fd, &h, f.payload, PBRPC_WIRE_PING_SIZE, 5000);
			cr_assert(wrc == 0 || wrc == -EPIPE || wrc == -ECONNRESET, "PONG: %s", pbrpc_strerror(wrc));
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

/* One echo round trip on an open peer; asserts success. */
static void peer_ping_echo(peer *p, uint32_t id)
{
	char pl[64], got[64];
	snprintf(pl, sizeof(pl), "ok-%u", id);
	peer_request(p, id, pl);
	uint32_t rid;
	cr_assert_eq(peer_response(p, &rid, NULL, 0, got, sizeof(got)), PBRPC_STATUS_OK);
	cr_assert_eq(rid, id);
	cr_assert_str_eq(got, pl);
}

/* Expects a GOAWAY with `status`, then the close. */
static void peer_expect_goaway(peer *p, int status, char *msg, size_t msglen)
{
	int rc = peer_response(p, NULL, msg, msglen, NULL, 0);
	cr_assert_eq(rc, -1000 - status, "expected GOAWAY %s, got %d", pbrpc_status_name(status), rc);
	pbrpc__frame f;
	rc = pbrpc__frame_read(&p->dec, p->fd, &f, 5000);
	cr_assert(rc == PBRPC_EOF || rc == -ECONNRESET, "expected close, got %s", pbrpc_strerror(rc));
}

static void send_request_bytes(peer *p, uint32_t id, uint8_t flags, const void *payload, size_t len)
{
	pbrpc__frame_header h = { .type = PBRPC_FRAME_REQUEST, .flags = flags, .stream = id };
	cr_assert_eq(pbrpc__frame_write(p->fd, &h, payload, len, 5000), 0);
}

static void wait_held(int n)
{
	int64_t until = tu_now_ms() + 10000;
	while (atomic_load(&n_held) < n && tu_now_ms() < until)
		usleep(1000);
	cr_assert_eq(atomic_load(&n_held), n);
}

TestSuite(server, .init = tu_setup, .timeout = 60);

/* ---- the happy path over every endpoint kind ---- */

static void roundtrip_on(const char *endpoint)
{
	tsrv t;
	start_server(&t, endpoint, NULL);
	peer p;
	peer_handshake(&p, t.addr);
	cr_assert_eq(p.server_hello.version, 1);
	cr_assert_eq(p.server_hello.max_frame, PBRPC_MAX_FRAME_DEFAULT);
	cr_assert_eq(p.server_hello.max_calls, 1024);
	for (uint32_t id = 1; id <= 20; id++)
		peer_ping_echo(&p, id);
	peer_close(&p);
	stop_server(&t);
}

Test(server, unix_path)
{
	roundtrip_on(NULL);
}

Test(server, abstract)
{
	char ep[64];
	snprintf(ep, sizeof(ep), "unix:@pbrpc-test-%d", getpid());
	roundtrip_on(ep);
}

Test(server, tcp4)
{
	roundtrip_on("tcp:127.0.0.1:0");
}

Test(server, tcp6)
{
	roundtrip_on("tcp:[::1]:0");
}

Test(server, address_reports_chosen_port)
{
	tsrv t;
	start_server(&t, "tcp:127.0.0.1:0", NULL);
	cr_assert(strncmp(t.addr, "tcp:127.0.0.1:", 14) == 0);
	cr_assert_neq(atoi(t.addr + 14), 0, "port 0 must be replaced: %s", t.addr);
	stop_server(&t);
}

Test(server, duplicate_service_rejected)
{
	pbrpc_server *srv;
	cr_assert_eq(pbrpc_server_new(&srv, NULL), 0);
	cr_assert_eq(pbrpc_server_add_service(srv, &echo_svc.base), 0);
	cr_assert_eq(pbrpc_server_add_service(srv, &echo_svc.base), PBRPC_EDUPLICATE);
	cr_assert_eq(pbrpc_server_add_service(srv, NULL), PBRPC_EINVALID);
	pbrpc_server_free(srv);
}

/* ---- statuses and bad requests, each with a bystander ---- */

Test(server, handler_status_and_message)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p;
	peer_handshake(&p, t.addr);
	char msg[128];
	peer_request_ex(&p, 7, "demo.Echo/Echo", "x", PBRPC_STATUS_NOT_FOUND, NULL);
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_NOT_FOUND);
	cr_assert_str_eq(msg, "failing as asked");
	peer_request(&p, 8, "null");
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_UNKNOWN);
	peer_ping_echo(&p, 9);
	peer_close(&p);
	stop_server(&t);
}

/* protoc-c's generated *_init() zeroes the handler slots and its invoke calls
 * them unchecked: a method whose slot is NULL is answered UNIMPLEMENTED, to a
 * raw peer and to the real client, and the connection stays usable. */
Test(server, null_handler_slot_is_unimplemented)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	Demo__Kv_Service kv;
	demo__kv__init(&kv, NULL);
	cr_assert_eq(pbrpc_server_add_service(t.srv, &kv.base), 0);
	peer p, bystander;
	peer_handshake(&p, t.addr);
	peer_handshake(&bystander, t.addr);
	char msg[128];
	peer_request_ex(&p, 1, "demo.Kv/Put", "", 0, NULL);
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_UNIMPLEMENTED);
	cr_assert_str_eq(msg, "method demo.Kv/Put is not implemented by this server");
	peer_ping_echo(&p, 2);
	peer_ping_echo(&bystander, 1);

	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, t.addr, NULL), 0);
	Demo__GetRequest req = DEMO__GET_REQUEST__INIT;
	req.key = "k";
	ProtobufCMessage *reply = NULL;
	pbrpc_call_result res;
	int rc = pbrpc_client_call(c, "demo.Kv/Get", &req.base, &demo__get_reply__descriptor, &reply, NULL, &res);
	cr_assert_eq(rc, PBRPC_ESTATUS);
	cr_assert_eq(res.status, PBRPC_STATUS_UNIMPLEMENTED);
	cr_assert_str_eq(res.message, "method demo.Kv/Get is not implemented by this server");
	cr_assert_null(reply);
	pbrpc_client_free(c);
	peer_close(&p);
	peer_close(&bystander);
	stop_server(&t);
}

Test(server, unknown_method_and_service)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p, bystander;
	peer_handshake(&p, t.addr);
	peer_handshake(&bystander, t.addr);
	char msg[128];
	peer_request_ex(&p, 1, "demo.Echo/Nope", "x", 0, NULL);
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_UNIMPLEMENTED);
	cr_assert_str_eq(msg, "unknown method demo.Echo/Nope");
	peer_request_ex(&p, 2, "demo.Nope/Echo", "x", 0, NULL);
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_UNIMPLEMENTED);
	cr_assert_str_eq(msg, "unknown service demo.Nope");
	peer_ping_echo(&p, 3);
	peer_ping_echo(&bystander, 1);
	peer_close(&p);
	peer_close(&bystander);
	stop_server(&t);
}

Test(server, undecodable_body_is_invalid_argument)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p, bystander;
	peer_handshake(&p, t.addr);
	peer_handshake(&bystander, t.addr);
	/* "demo.Echo/Echo", then field 1 claiming 100 bytes with 1 present. */
	uint8_t buf[2 + 14 + 3] = { 0, 14 };
	memcpy(buf + 2, "demo.Echo/Echo", 14);
	buf[16] = 0x0a;
	buf[17] = 100;
	buf[18] = 'x';
	send_request_bytes(&p, 5, 0, buf, sizeof(buf));
	char msg[128];
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_INVALID_ARGUMENT);
	cr_assert_str_eq(msg, "request body is not a valid demo.EchoRequest");
	peer_ping_echo(&p, 6);
	peer_ping_echo(&bystander, 1);
	cr_assert_eq(atomic_load(&n_invoked), 2);
	peer_close(&p);
	peer_close(&bystander);
	stop_server(&t);
}

Test(server, malformed_request_header)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p;
	peer_handshake(&p, t.addr);
	char msg[128];
	uint8_t lies[] = { 0, 200, 'a' }; /* method length past the end */
	send_request_bytes(&p, 1, 0, lies, sizeof(lies));
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_INVALID_ARGUMENT);
	cr_assert_str_eq(msg, "malformed request header");
	uint8_t badname[] = { 0, 4, 'a', '/', '/', 'b' };
	send_request_bytes(&p, 2, 0, badname, sizeof(badname));
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_INVALID_ARGUMENT);
	uint8_t short_timeout[] = { 0, 3, 'a', '/', 'b', 0, 0 }; /* 2 of the 8 timeout bytes */
	send_request_bytes(&p, 3, PBRPC_REQUEST_TIMEOUT, short_timeout, sizeof(short_timeout));
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_INVALID_ARGUMENT);
	uint8_t bad_md[] = { 0, 3, 'a', '/', 'b', 0, 1, 3, 'K', 'E', 'Y', 0, 0 }; /* uppercase key */
	send_request_bytes(&p, 4, PBRPC_REQUEST_METADATA, bad_md, sizeof(bad_md));
	cr_assert_eq(peer_response(&p, NULL, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_INVALID_ARGUMENT);
	peer_ping_echo(&p, 5);
	cr_assert_eq(atomic_load(&n_invoked), 1);
	peer_close(&p);
	stop_server(&t);
}

Test(server, oversized_request_answered_and_conn_reusable)
{
	tsrv t;
	pbrpc_server_opts o = { .max_frame = 1000 };
	start_server(&t, NULL, &o);
	peer p, bystander;
	peer_handshake(&p, t.addr);
	peer_handshake(&bystander, t.addr);
	cr_assert_eq(p.server_hello.max_frame, 1000);
	static char payload[1200];
	size_t overhead = 2 + 14 + 1 + 2; /* method, field tag, 2-byte length */
	/* Exactly at the limit passes. */
	memset(payload, 'a', 1000 - overhead);
	payload[1000 - overhead] = 0;
	peer_request(&p, 1, payload);
	cr_assert_eq(peer_response(&p, NULL, NULL, 0, NULL, 0), PBRPC_STATUS_OK);
	/* One byte over is refused, naming both sizes, and skipped unread. */
	memset(payload, 'a', 1001 - overhead);
	payload[1001 - overhead] = 0;
	peer_request(&p, 2, payload);
	char msg[128];
	uint32_t id;
	cr_assert_eq(peer_response(&p, &id, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_RESOURCE_EXHAUSTED);
	cr_assert_eq(id, 2);
	cr_assert_str_eq(msg, "request is 1001 bytes, server accepts at most 1000");
	peer_ping_echo(&p, 3);
	peer_ping_echo(&bystander, 1);
	peer_close(&p);
	peer_close(&bystander);
	stop_server(&t);
}

Test(server, huge_declared_lengths_rejected)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer bystander;
	peer_handshake(&bystander, t.addr);
	uint32_t lens[] = { PBRPC_MAX_FRAME_DEFAULT + 1, 0x80000000u, 0xffffffffu };
	for (size_t i = 0; i < 3; i++) {
		peer p;
		peer_handshake(&p, t.addr);
		uint8_t hdr[12];
		pbrpc__frame_header_encode(&(pbrpc__frame_header){ .length = lens[i], .type = PBRPC_FRAME_PING }, hdr);
		peer_send_raw(&p, hdr, sizeof(hdr));
		peer_expect_goaway(&p, PBRPC_STATUS_RESOURCE_EXHAUSTED, NULL, 0);
		peer_close(&p);
		peer_ping_echo(&bystander, (uint32_t)i + 1);
	}
	peer_close(&bystander);
	stop_server(&t);
}

Test(server, garbage_instead_of_preface)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p, bystander;
	peer_handshake(&bystander, t.addr);
	peer_open(&p, t.addr);
	peer_send_raw(&p, "GET / HTTP/1.1\r\n\r\n", 18);
	peer_read_hello(&p);
	char msg[128];
	peer_expect_goaway(&p, PBRPC_STATUS_INVALID_ARGUMENT, msg, sizeof(msg));
	cr_assert_str_eq(msg, "bad preface: peer is not a pbrpc client");
	peer_close(&p);
	peer_ping_echo(&bystander, 1);
	peer_close(&bystander);
	stop_server(&t);
}

Test(server, wrong_version)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p, bystander;
	peer_handshake(&bystander, t.addr);
	peer_open(&p, t.addr);
	peer_send_hello(&p, 2);
	peer_read_hello(&p);
	char msg[128];
	peer_expect_goaway(&p, PBRPC_STATUS_FAILED_PRECONDITION, msg, sizeof(msg));
	cr_assert_str_eq(msg, "unsupported protocol version 2, this peer speaks 1");
	peer_close(&p);
	peer_ping_echo(&bystander, 1);
	peer_close(&bystander);
	pbrpc_server_stats st;
	pbrpc_server_get_stats(t.srv, &st);
	cr_assert_geq(st.protocol_errors, 1);
	stop_server(&t);
}

Test(server, every_handshake_prefix_then_eof)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer bystander;
	peer_handshake(&bystander, t.addr);
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc_hello h = { .version = 1 };
	pbrpc__wire_write_preface(&w, &h);
	size_t total = pbrpc__frame_writer_pending(&w);
	uint8_t all[64];
	cr_assert_leq(total, sizeof(all));
	memcpy(all, w.buf + w.head, total);
	pbrpc__frame_writer_fini(&w);
	for (size_t k = 0; k < total; k++) {
		peer p;
		peer_open(&p, t.addr);
		if (k)
			peer_send_raw(&p, all, k);
		shutdown(p.fd, SHUT_WR);
		peer_read_hello(&p);
		pbrpc__frame f;
		int64_t t0 = tu_now_ms();
		int rc = pbrpc__frame_read(&p.dec, p.fd, &f, 5000);
		cr_assert(rc == PBRPC_EOF || rc == -ECONNRESET, "prefix %zu: %s", k, pbrpc_strerror(rc));
		cr_assert_lt(tu_now_ms() - t0, 1000, "prefix %zu: close took too long", k);
		peer_close(&p);
	}
	peer_ping_echo(&bystander, 1);
	cr_assert_eq(atomic_load(&n_invoked), 1);
	peer_close(&bystander);
	stop_server(&t);
}

Test(server, truncated_frame_then_close)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p, bystander;
	peer_handshake(&bystander, t.addr);
	peer_handshake(&p, t.addr);
	uint8_t hdr[12];
	pbrpc__frame_header_encode(&(pbrpc__frame_header){ .length = 100, .type = PBRPC_FRAME_REQUEST, .stream = 1 }, hdr);
	peer_send_raw(&p, hdr, sizeof(hdr));
	peer_send_raw(&p, "\0\x0e"
			  "demo.Echo/Echo",
		      16);
	peer_close(&p);
	usleep(20000);
	peer_ping_echo(&bystander, 1);
	cr_assert_eq(atomic_load(&n_invoked), 1, "the truncated call must not reach a handler");
	peer_close(&bystander);
	stop_server(&t);
}

Test(server, duplicate_call_id_closes_connection)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p, bystander;
	peer_handshake(&bystander, t.addr);
	peer_handshake(&p, t.addr);
	peer_request(&p, 42, "hold");
	peer_request(&p, 42, "again");
	char msg[128];
	peer_expect_goaway(&p, PBRPC_STATUS_INVALID_ARGUMENT, msg, sizeof(msg));
	cr_assert_str_eq(msg, "call id 42 is already in flight");
	peer_close(&p);
	peer_ping_echo(&bystander, 1);
	atomic_store(&release_req, 1); /* the orphaned handler answers into the void */
	usleep(100000);
	peer_ping_echo(&bystander, 2);
	peer_close(&bystander);
	stop_server(&t);
}

Test(server, bad_frames_are_protocol_errors)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer bystander;
	peer_handshake(&bystander, t.addr);
	const pbrpc__frame_header bad[] = {
		{ .type = PBRPC_FRAME_REQUEST, .stream = 0 },             /* call id 0 */
		{ .type = 0x00 },                                         /* unknown types */
		{ .type = 0x08 },
		{ .type = 0xff, .stream = 1 },
		{ .type = PBRPC_FRAME_REQUEST, .flags = 0x80, .stream = 1 }, /* undefined flag */
		{ .type = PBRPC_FRAME_RESPONSE, .flags = 1, .stream = 1 },   /* servers get no replies */
		{ .type = PBRPC_FRAME_CANCEL, .stream = 0 },
		{ .type = PBRPC_FRAME_CANCEL, .stream = 1, .length = 4 },
		{ .type = PBRPC_FRAME_PING, .length = 4 },
		{ .type = PBRPC_FRAME_HELLO },                              /* a second HELLO */
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		peer p;
		peer_handshake(&p, t.addr);
		uint8_t buf[12 + 8] = { 0 };
		pbrpc__frame_header_encode(&bad[i], buf);
		peer_send_raw(&p, buf, 12 + bad[i].length);
		peer_expect_goaway(&p, PBRPC_STATUS_INVALID_ARGUMENT, NULL, 0);
		peer_close(&p);
		peer_ping_echo(&bystander, (uint32_t)i + 1);
	}
	/* Every type byte outside 1..7 gets the same answer. */
	for (unsigned type = 0x08; type <= 0xff; type++) {
		peer p;
		peer_handshake(&p, t.addr);
		uint8_t hdr[12];
		pbrpc__frame_header_encode(&(pbrpc__frame_header){ .type = (uint8_t)type }, hdr);
		peer_send_raw(&p, hdr, sizeof(hdr));
		peer_expect_goaway(&p, PBRPC_STATUS_INVALID_ARGUMENT, NULL, 0);
		peer_close(&p);
	}
	/* Non-zero reserved header bits. */
	peer p;
	peer_handshake(&p, t.addr);
	uint8_t hdr[12];
	pbrpc__frame_header_encode(&(pbrpc__frame_header){ .type = PBRPC_FRAME_PING, .reserved = 1 }, hdr);
	peer_send_raw(&p, hdr, sizeof(hdr));
	peer_expect_goaway(&p, PBRPC_STATUS_INVALID_ARGUMENT, NULL, 0);
	peer_close(&p);
	peer_ping_echo(&bystander, 100);
	peer_close(&bystander);
	stop_server(&t);
}

Test(server, client_goaway_closes_after_calls_in_flight)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p;
	peer_handshake(&p, t.addr);
	peer_request(&p, 1, "thread"); /* answered 20 ms later */
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc__wire_write_goaway(&w, PBRPC_STATUS_OK, "bye");
	peer_send_writer(&p, &w);
	pbrpc__frame_writer_fini(&w);
	uint32_t id;
	cr_assert_eq(peer_response(&p, &id, NULL, 0, NULL, 0), PBRPC_STATUS_OK);
	cr_assert_eq(id, 1);
	pbrpc__frame f;
	int rc = pbrpc__frame_read(&p.dec, p.fd, &f, 5000);
	cr_assert_eq(rc, PBRPC_EOF, "server closes once idle, got %s", pbrpc_strerror(rc));
	peer_close(&p);
	stop_server(&t);
}

Test(server, ping_gets_pong)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p;
	peer_handshake(&p, t.addr);
	const uint8_t data[8] = { 1, 2, 3, 4, 5, 6, 7, 8 };
	pbrpc__frame_header h = { .type = PBRPC_FRAME_PING };
	cr_assert_eq(pbrpc__frame_write(p.fd, &h, data, 8, 1000), 0);
	pbrpc__frame f;
	cr_assert_eq(pbrpc__frame_read(&p.dec, p.fd, &f, 5000), 1);
	cr_assert_eq(f.hdr.type, PBRPC_FRAME_PONG);
	cr_assert_eq(f.hdr.length, 8);
	cr_assert_eq(memcmp(f.payload, data, 8), 0);
	peer_close(&p);
	stop_server(&t);
}

/* ---- calls in flight ---- */

Test(server, thousand_calls_out_of_order)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p;
	peer_handshake(&p, t.addr);
	const int n = 1000;
	for (int i = 1; i <= n; i++) {
		char pl[32];
		snprintf(pl, sizeof(pl), "hold-%d", i);
		peer_request(&p, (uint32_t)i, pl);
	}
	wait_held(n);
	atomic_store(&release_req, 1); /* answered newest first */
	for (int k = 0; k < n; k++) {
		uint32_t id;
		char got[32], want[32];
		cr_assert_eq(peer_response(&p, &id, NULL, 0, got, sizeof(got)), PBRPC_STATUS_OK);
		cr_assert_eq(id, (uint32_t)(n - k), "reply %d has id %u", k, id);
		snprintf(want, sizeof(want), "hold-%u", id);
		cr_assert_str_eq(got, want);
	}
	peer_close(&p);
	stop_server(&t);
}

Test(server, call_ids_near_wrap)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p;
	peer_handshake(&p, t.addr);
	uint32_t ids[] = { 0xfffffffbu, 0xfffffffcu, 0xfffffffdu, 0xfffffffeu, 0xffffffffu, 1, 2, 3, 4, 5 };
	for (size_t i = 0; i < 10; i++)
		peer_ping_echo(&p, ids[i]);
	peer_close(&p);
	stop_server(&t);
}

Test(server, async_reply_from_other_thread)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p;
	peer_handshake(&p, t.addr);
	char got[64];
	peer_request(&p, 1, "thread");
	peer_ping_echo(&p, 2); /* answered while call 1 waits */
	uint32_t id;
	cr_assert_eq(peer_response(&p, &id, NULL, 0, got, sizeof(got)), PBRPC_STATUS_OK);
	cr_assert_eq(id, 1);
	cr_assert_str_eq(got, "from-thread");
	peer_close(&p);
	stop_server(&t);
}

Test(server, worker_pool)
{
	tsrv t;
	pbrpc_server_opts o = { .workers = 4 };
	start_server(&t, NULL, &o);
	peer p;
	peer_handshake(&p, t.addr);
	for (uint32_t i = 1; i <= 200; i++)
		peer_request(&p, i, "w");
	int seen[201] = { 0 };
	for (int i = 0; i < 200; i++) {
		uint32_t id;
		char got[16];
		cr_assert_eq(peer_response(&p, &id, NULL, 0, got, sizeof(got)), PBRPC_STATUS_OK);
		cr_assert(id >= 1 && id <= 200 && !seen[id]);
		seen[id] = 1;
		cr_assert_str_eq(got, "w");
	}
	peer_close(&p);
	stop_server(&t);
}

/* RELIABILITY 22: a call whose deadline passes while it waits for a worker
 * is answered DEADLINE_EXCEEDED and never reaches its handler. */
Test(server, call_expiring_in_worker_queue_is_never_dispatched)
{
	tsrv t;
	pbrpc_server_opts o = { .workers = 1 };
	start_server(&t, NULL, &o);
	peer p;
	peer_handshake(&p, t.addr);
	peer_request(&p, 1, "sleep");
	usleep(20000);
	pbrpc__wire_request extra = { .has_timeout = true, .timeout_us = 50000 };
	peer_request_ex(&p, 2, "demo.Echo/Echo", "queued", 0, &extra);
	uint32_t id;
	cr_assert_eq(peer_response(&p, &id, NULL, 0, NULL, 0), PBRPC_STATUS_DEADLINE_EXCEEDED);
	cr_assert_eq(id, 2);
	cr_assert_eq(peer_response(&p, &id, NULL, 0, NULL, 0), PBRPC_STATUS_OK);
	cr_assert_eq(id, 1);
	peer_ping_echo(&p, 3); /* the worker has moved past call 2 */
	cr_assert_eq(atomic_load(&n_invoked), 2, "call 2 never ran: only calls 1 and 3 did");
	peer_close(&p);
	stop_server(&t);
}

Test(server, deadline_exceeded_when_handler_is_slow)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p;
	peer_handshake(&p, t.addr);
	pbrpc__wire_request extra = { .has_timeout = true, .timeout_us = 100000 };
	int64_t t0 = tu_now_ms();
	peer_request_ex(&p, 1, "demo.Echo/Echo", "hold", 0, &extra);
	char msg[64];
	uint32_t id;
	cr_assert_eq(peer_response(&p, &id, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_DEADLINE_EXCEEDED);
	int64_t dt = tu_now_ms() - t0;
	cr_assert(dt >= 90 && dt < 3000, "deadline fired after %lld ms", (long long)dt);
	cr_assert_neq(seen_deadline, 0);
	/* The handler answers late: dropped, no second RESPONSE, connection fine. */
	atomic_store(&release_req, 1);
	usleep(50000);
	peer_ping_echo(&p, 2);
	/* Timeout 0: answered without dispatch. */
	extra.timeout_us = 0;
	int before = atomic_load(&n_invoked);
	peer_request_ex(&p, 3, "demo.Echo/Echo", "x", 0, &extra);
	cr_assert_eq(peer_response(&p, NULL, NULL, 0, NULL, 0), PBRPC_STATUS_DEADLINE_EXCEEDED);
	cr_assert_eq(atomic_load(&n_invoked), before);
	peer_close(&p);
	stop_server(&t);
}

Test(server, cancel_answers_cancelled)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p;
	peer_handshake(&p, t.addr);
	peer_request(&p, 9, "hold");
	wait_held(1);
	pbrpc__frame_header h = { .type = PBRPC_FRAME_CANCEL, .stream = 9 };
	cr_assert_eq(pbrpc__frame_write(p.fd, &h, NULL, 0, 1000), 0);
	uint32_t id;
	cr_assert_eq(peer_response(&p, &id, NULL, 0, NULL, 0), PBRPC_STATUS_CANCELLED);
	cr_assert_eq(id, 9);
	cr_assert(pbrpc_call_cancelled(held[0].data));
	atomic_store(&release_req, 1);
	/* A CANCEL for an id not in flight is ignored. */
	h.stream = 12345;
	cr_assert_eq(pbrpc__frame_write(p.fd, &h, NULL, 0, 1000), 0);
	peer_ping_echo(&p, 10);
	peer_close(&p);
	stop_server(&t);
}

Test(server, max_calls_enforced)
{
	tsrv t;
	pbrpc_server_opts o = { .max_calls = 2 };
	start_server(&t, NULL, &o);
	peer p;
	peer_handshake(&p, t.addr);
	cr_assert_eq(p.server_hello.max_calls, 2);
	peer_request(&p, 1, "hold");
	peer_request(&p, 2, "hold");
	peer_request(&p, 3, "x");
	char msg[128];
	uint32_t id;
	cr_assert_eq(peer_response(&p, &id, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_RESOURCE_EXHAUSTED);
	cr_assert_eq(id, 3);
	cr_assert_str_eq(msg, "too many calls in flight on this connection (limit 2)");
	wait_held(2);
	atomic_store(&release_req, 1);
	cr_assert_eq(peer_response(&p, NULL, NULL, 0, NULL, 0), PBRPC_STATUS_OK);
	cr_assert_eq(peer_response(&p, NULL, NULL, 0, NULL, 0), PBRPC_STATUS_OK);
	peer_ping_echo(&p, 4);
	peer_close(&p);
	stop_server(&t);
}

static void copy_payload_cb(const Demo__EchoReply *reply, void *data)
{
	char *out = data;
	if (reply)
		snprintf(out, 64, "%.*s", (int)reply->payload.len, (const char *)reply->payload.data);
	else
		snprintf(out, 64, "(failed)");
}

static void stub_echo(ProtobufCService *svc, const char *text, char out[64])
{
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)text;
	req.payload.len = strlen(text);
	seen_md[0] = '\0';
	demo__echo__echo(svc, &req, copy_payload_cb, out);
	cr_assert_str_eq(out, text);
}

/* Per-call options without hidden state (issue 13): a service handle bound to
 * options sends them on every call (copied when it was made); options set
 * with pbrpc_client_next_call() are consumed by the very next call, so none
 * leaks into a later, unrelated one. Real client, real server. */
Test(server, call_options_bound_to_a_service_never_leak)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, t.addr, NULL), 0);
	char out[64];
	char value[16] = "bound-v";
	pbrpc_metadata md = { .key = "x-test", .value = value, .value_len = strlen(value) };
	ProtobufCService *bound = pbrpc_client_service_with(
		c, &demo__echo__descriptor, &(pbrpc_call_opts){ .timeout_ms = 4000, .metadata = &md, .metadata_count = 1 });
	cr_assert_not_null(bound);
	memset(value, 'X', sizeof(value) - 1); /* the handle keeps its own copy */
	for (int i = 0; i < 2; i++) {
		int64_t before = pbrpc__now_ns();
		stub_echo(bound, "through the bound handle", out);
		cr_assert_str_eq(seen_md, "bound-v");
		cr_assert(seen_deadline > before && seen_deadline <= before + 4100 * PBRPC__NS_PER_MS,
			  "the bound 4 s timeout, not the default 30 s");
	}
	ProtobufCService *plain = pbrpc_client_service(c, &demo__echo__descriptor);
	cr_assert_neq(plain, bound);
	stub_echo(plain, "plain", out);
	cr_assert_str_eq(seen_md, "", "the plain handle sends no metadata");

	/* Set for the next call, which is an explicit call with its own options:
	 * consumed there, so the stub call after it sends nothing. */
	pbrpc_metadata leak = { .key = "x-test", .value = "leaked", .value_len = 6 };
	pbrpc_client_next_call(&(pbrpc_call_opts){ .metadata = &leak, .metadata_count = 1 });
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)"explicit";
	req.payload.len = 8;
	ProtobufCMessage *reply = NULL;
	pbrpc_call_result res;
	seen_md[0] = '\0';
	cr_assert_eq(pbrpc_client_call(c, "demo.Echo/Echo", &req.base, &demo__echo_reply__descriptor, &reply, NULL, &res), 0);
	protobuf_c_message_free_unpacked(reply, NULL);
	cr_assert_str_eq(seen_md, "", "an explicit call uses its own options only");
	stub_echo(plain, "after", out);
	cr_assert_str_eq(seen_md, "", "options meant for an earlier call did not leak into this one");

	/* ...and consumed by a stub call that fails before sending. */
	pbrpc_client_next_call(&(pbrpc_call_opts){ .metadata = &leak, .metadata_count = 1 });
	plain->invoke(plain, 99, &req.base, (ProtobufCClosure)copy_payload_cb, out);
	cr_assert_str_eq(out, "(failed)");
	stub_echo(plain, "later", out);
	cr_assert_str_eq(seen_md, "");

	/* Next-call options still win over a bound handle's, for that call. */
	pbrpc_client_next_call(&(pbrpc_call_opts){ .metadata = &leak, .metadata_count = 1 });
	stub_echo(bound, "override", out);
	cr_assert_str_eq(seen_md, "leaked");

	protobuf_c_service_destroy(bound); /* a bound handle is freed here */
	pbrpc_client_free(c);
	stop_server(&t);
}

static bool utf8_whole(const char *s, size_t len)
{
	for (size_t i = 0; i < len;) {
		unsigned char b = (unsigned char)s[i];
		size_t n = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
		if (!n || i + n > len)
			return false;
		for (size_t k = 1; k < n; k++)
			if (((unsigned char)s[i + k] & 0xC0) != 0x80)
				return false;
		i += n;
	}
	return true;
}

/* Status messages longer than 4096 bytes are cut between characters, never
 * inside one; so is the client's 256-byte copy in pbrpc_call_result. */
Test(server, long_status_message_cut_between_utf8_characters)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, t.addr, NULL), 0);
	char msg[6001] = "";
	for (int i = 0; i < 2000; i++)
		strcat(msg, "\xe2\x82\xac"); /* U+20AC, 3 bytes: 4096 is not a multiple */
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.fail_status = PBRPC_STATUS_FAILED_PRECONDITION;
	req.fail_message = msg;
	ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);
	char out[64];
	demo__echo__echo(echo, &req, copy_payload_cb, out);
	const char *got;
	cr_assert_eq(pbrpc_client_status(&got), PBRPC_STATUS_FAILED_PRECONDITION);
	cr_assert_eq(strlen(got), 4095, "cut to the last whole character within 4096 bytes");
	cr_assert(utf8_whole(got, strlen(got)));
	pbrpc_call_result res;
	ProtobufCMessage *reply = NULL;
	cr_assert_eq(pbrpc_client_call(c, "demo.Echo/Echo", &req.base, &demo__echo_reply__descriptor, &reply, NULL, &res),
		     PBRPC_ESTATUS);
	cr_assert_eq(strlen(res.message), 255);
	cr_assert(utf8_whole(res.message, strlen(res.message)));
	pbrpc_client_free(c);
	stop_server(&t);
}

/* A HELLO announcing a max_frame no status answer fits in is refused. */
Test(server, hello_below_minimum_max_frame_refused)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p, bystander;
	peer_handshake(&bystander, t.addr);
	peer_open(&p, t.addr);
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc_hello h = { .version = 1, .max_frame = 1, .agent = "tiny" };
	cr_assert_eq(pbrpc__wire_write_preface(&w, &h), 0);
	peer_send_writer(&p, &w);
	pbrpc__frame_writer_fini(&w);
	peer_read_hello(&p);
	char msg[96];
	peer_expect_goaway(&p, PBRPC_STATUS_INVALID_ARGUMENT, msg, sizeof(msg));
	cr_assert_str_eq(msg, "max_frame 1 is below the minimum of 64");
	peer_close(&p);
	peer_ping_echo(&bystander, 1);
	peer_close(&bystander);
	stop_server(&t);
}

/* After the client's own GOAWAY, a request is refused with that reason (it
 * was not run), the calls before it are answered, then the server closes. */
Test(server, request_after_client_goaway_refused)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p;
	peer_handshake(&p, t.addr);
	peer_request(&p, 1, "hold");
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc__wire_write_goaway(&w, PBRPC_STATUS_OK, "client leaving");
	peer_send_writer(&p, &w);
	pbrpc__frame_writer_fini(&w);
	peer_request(&p, 2, "too late");
	char msg[96];
	uint32_t id = 0;
	cr_assert_eq(peer_response(&p, &id, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_UNAVAILABLE);
	cr_assert_eq(id, 2);
	cr_assert_str_eq(msg, "no new calls after the client's GOAWAY");
	atomic_store(&release_req, 1);
	cr_assert_eq(peer_response(&p, &id, NULL, 0, NULL, 0), PBRPC_STATUS_OK);
	cr_assert_eq(id, 1);
	pbrpc__frame f;
	int rc = pbrpc__frame_read(&p.dec, p.fd, &f, 5000);
	cr_assert(rc == PBRPC_EOF || rc == -ECONNRESET, "closed once the call is done: %s", pbrpc_strerror(rc));
	peer_close(&p);
	stop_server(&t);
}

/* A client that half-closes after sending its requests still gets their
 * replies; then the server closes. (PROTOCOL.md section 8.) */
Test(server, half_close_still_answers_calls_in_flight)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p, bystander;
	peer_handshake(&p, t.addr);
	peer_handshake(&bystander, t.addr);
	peer_request(&p, 1, "hold");
	peer_request(&p, 2, "plain");
	cr_assert_eq(shutdown(p.fd, SHUT_WR), 0);
	uint32_t id = 0;
	cr_assert_eq(peer_response(&p, &id, NULL, 0, NULL, 0), PBRPC_STATUS_OK);
	cr_assert_eq(id, 2);
	usleep(100 * 1000); /* the server must neither close nor spin meanwhile */
	peer_ping_echo(&bystander, 1);
	atomic_store(&release_req, 1);
	cr_assert_eq(peer_response(&p, &id, NULL, 0, NULL, 0), PBRPC_STATUS_OK);
	cr_assert_eq(id, 1);
	pbrpc__frame f;
	int rc = pbrpc__frame_read(&p.dec, p.fd, &f, 5000);
	cr_assert(rc == PBRPC_EOF || rc == -ECONNRESET, "closed once answered: %s", pbrpc_strerror(rc));
	pbrpc_server_stats st;
	peer_close(&p);
	peer_ping_echo(&bystander, 2);
	/* With two loops (server-loops) the bystander's loop answers without
	 * waiting for the other to have seen p close: wait for it. */
	int64_t until = tu_now_ms() + 3000;
	do
		pbrpc_server_get_stats(t.srv, &st);
	while (st.connections_open != 1 && tu_loop_threads() > 1 && tu_now_ms() < until && usleep(2000) == 0);
	cr_assert_eq(st.connections_open, 1);
	peer_close(&bystander);
	stop_server(&t);
}

Test(server, metadata_and_peer_credentials_reach_handler)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p;
	peer_handshake(&p, t.addr);
	pbrpc_metadata md[] = { { .key = "x-test", .value = "hello", .value_len = 5 } };
	pbrpc__wire_request extra = { .metadata = md, .metadata_count = 1 };
	peer_request_ex(&p, 1, "demo.Echo/Echo", "cred", 0, &extra);
	cr_assert_eq(peer_response(&p, NULL, NULL, 0, NULL, 0), PBRPC_STATUS_OK);
	cr_assert_str_eq(seen_md, "hello");
	cr_assert_eq(seen_uid, getuid());
	peer_close(&p);
	stop_server(&t);
}

/* ---- connections and limits ---- */

Test(server, max_connections_refused_with_reason)
{
	tsrv t;
	pbrpc_server_opts o = { .max_connections = 2 };
	start_server(&t, NULL, &o);
	peer a, b, c;
	peer_handshake(&a, t.addr);
	peer_handshake(&b, t.addr);
	peer_open(&c, t.addr);
	peer_read_hello(&c);
	char msg[64];
	peer_expect_goaway(&c, PBRPC_STATUS_RESOURCE_EXHAUSTED, msg, sizeof(msg));
	cr_assert_str_eq(msg, "too many connections");
	peer_close(&c);
	peer_ping_echo(&a, 1);
	peer_ping_echo(&b, 1);
	peer_close(&a);
	peer_close(&b);
	stop_server(&t);
}

/* The real client against the real server over its limit: connect fails
 * with the GOAWAY's reason instead of succeeding on a connection about to
 * close. (Under the 1-byte shim the GOAWAY is not yet read when the HELLO
 * completes, so only the ordinary I/O run asserts the code.) */
Test(server, real_client_over_connection_limit_is_told_why)
{
	tsrv t;
	pbrpc_server_opts o = { .max_connections = 1 };
	start_server(&t, NULL, &o);
	pbrpc_client *first, *second = NULL;
	cr_assert_eq(pbrpc_client_connect(&first, t.addr, NULL), 0);
	int rc = pbrpc_client_connect(&second, t.addr, NULL);
	if (!tu_short_io()) {
		cr_assert_eq(rc, PBRPC_EGOAWAY, "connect: %s", pbrpc_strerror(rc));
		cr_assert_null(second);
	}
	pbrpc_client_free(second);
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)"still served";
	req.payload.len = strlen("still served");
	ProtobufCMessage *reply = NULL;
	pbrpc_call_result res;
	cr_assert_eq(pbrpc_client_call(first, "demo.Echo/Echo", &req.base, &demo__echo_reply__descriptor, &reply, NULL,
				       &res),
		     0, "%s", res.message);
	Demo__EchoReply *er = (Demo__EchoReply *)reply;
	cr_assert(er->payload.len == 12 && memcmp(er->payload.data, "still served", 12) == 0);
	protobuf_c_message_free_unpacked(reply, NULL);
	pbrpc_client_free(first);
	stop_server(&t);
}

Test(server, handshake_timeout_closes_silent_client)
{
	tsrv t;
	pbrpc_server_opts o = { .handshake_timeout_ms = 200 };
	start_server(&t, NULL, &o);
	peer p;
	peer_open(&p, t.addr);
	int64_t t0 = tu_now_ms();
	peer_read_hello(&p);
	char msg[64];
	peer_expect_goaway(&p, PBRPC_STATUS_UNAVAILABLE, msg, sizeof(msg));
	cr_assert_str_eq(msg, "handshake timed out");
	int64_t dt = tu_now_ms() - t0;
	cr_assert(dt >= 150 && dt < 3000, "closed after %lld ms", (long long)dt);
	peer_close(&p);
	stop_server(&t);
}

/* A peer that makes one call and then nothing is told "idle timeout" and
 * closed by the server at addr (idle_timeout_ms 200). */
static void expect_idle_close(const char *addr)
{
	peer p;
	peer_handshake(&p, addr);
	peer_ping_echo(&p, 1);
	char msg[64];
	peer_expect_goaway(&p, PBRPC_STATUS_UNAVAILABLE, msg, sizeof(msg));
	cr_assert_str_eq(msg, "idle timeout");
	peer_close(&p);
}

Test(server, idle_timeout)
{
	tsrv t;
	pbrpc_server_opts o = { .idle_timeout_ms = 200 };
	start_server(&t, NULL, &o);
	expect_idle_close(t.addr);
	stop_server(&t);
}

/* An embedder that waits on pbrpc_server_fd() with no timeout of its own
 * still has the server's timers run: the fd becomes readable when one is
 * due (the idle timeout here), not only on socket events. */
static void *embedded_main(void *arg)
{
	tsrv *t = arg;
	for (;;) {
		struct pollfd pfd = { .fd = pbrpc_server_fd(t->srv), .events = POLLIN };
		if (poll(&pfd, 1, -1) < 0 && errno != EINTR) {
			t->rc = -errno;
			return NULL;
		}
		int rc = pbrpc_server_process(t->srv, 0);
		if (rc != 0) {
			t->rc = rc < 0 ? rc : 0;
			return NULL;
		}
	}
}

Test(server, embedded_loop_runs_timers_without_a_timeout)
{
	tsrv t;
	pbrpc_server_opts o = { .idle_timeout_ms = 200, .loop_threads = 1 }; /* embedding is for one loop */
	start_server_on(&t, NULL, &o, embedded_main);
	expect_idle_close(t.addr);
	stop_server(&t); /* the shutdown's wake-up reaches the embedded loop too */
	cr_assert_eq(t.rc, 0);
}

Test(server, client_that_never_reads_is_bounded)
{
	tsrv t;
	pbrpc_server_opts o = { .max_output_queue = 512 * 1024 };
	start_server(&t, NULL, &o);
	peer hog, bystander;
	peer_handshake(&hog, t.addr);
	peer_handshake(&bystander, t.addr);
	tu_small_buffers(hog.fd);
	/* Each request asks for a 256 KiB reply; the hog never reads them. */
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)"big";
	req.payload.len = 3;
	for (uint32_t id = 1; id <= 200000; id++) {
		pbrpc__wire_request r = { .call_id = id, .method = "demo.Echo/Echo", .method_len = 14 };
		pbrpc__wire_write_request(&w, &r, &req.base, 0);
	}
	int64_t until = tu_now_ms() + 1500;
	while (pbrpc__frame_writer_pending(&w) && tu_now_ms() < until) {
		if (pbrpc__frame_writer_flush(&w, hog.fd, MSG_DONTWAIT) == 0)
			usleep(5000);
	}
	cr_assert_gt(pbrpc__frame_writer_pending(&w), 0, "the server must stop reading from the hog");
	pbrpc__frame_writer_fini(&w);
	int invoked = atomic_load(&n_invoked);
	cr_assert_lt(invoked, 200, "server kept reading: %d calls dispatched", invoked);
	peer_ping_echo(&bystander, 1);
	peer_close(&hog);
	usleep(20000);
	peer_ping_echo(&bystander, 2);
	peer_close(&bystander);
	stop_server(&t);
}

Test(server, peer_that_never_reads_is_dropped_after_stall_timeout)
{
	tsrv t;
	pbrpc_server_opts o = { .max_output_queue = 256 * 1024, .write_stall_timeout_ms = 300 };
	start_server(&t, NULL, &o);
	peer hog, bystander;
	peer_handshake(&hog, t.addr);
	peer_handshake(&bystander, t.addr);
	tu_small_buffers(hog.fd);
	for (uint32_t id = 1; id <= 8; id++)
		peer_request(&hog, id, "big");
	int64_t t0 = tu_now_ms();
	pbrpc_server_stats st;
	int64_t until = t0 + 5000;
	do {
		usleep(20000);
		peer_ping_echo(&bystander, (uint32_t)(tu_now_ms() - t0) + 1);
		pbrpc_server_get_stats(t.srv, &st);
	} while (st.connections_open > 1 && tu_now_ms() < until);
	cr_assert_eq(st.connections_open, 1, "the hog was dropped, the bystander kept");
	int64_t dt = tu_now_ms() - t0;
	cr_assert(dt >= 250, "dropped after %lld ms, before the stall timeout", (long long)dt);
	peer_close(&hog);
	peer_close(&bystander);
	stop_server(&t);
}

Test(server, slow_reader_gets_every_reply_in_order)
{
	tsrv t;
	pbrpc_server_opts o = { .max_output_queue = 300 * 1024 };
	start_server(&t, NULL, &o);
	peer p;
	peer_handshake(&p, t.addr);
	tu_small_buffers(p.fd);
	const uint32_t n = (uint32_t)tu_scale(40);
	for (uint32_t id = 1; id <= n; id++)
		peer_request(&p, id, "big"); /* 256 KiB replies, nobody reading yet */
	usleep(100000);
	for (uint32_t id = 1; id <= n; id++) {
		uint32_t got;
		cr_assert_eq(peer_response(&p, &got, NULL, 0, NULL, 0), PBRPC_STATUS_OK);
		cr_assert_eq(got, id);
	}
	peer_ping_echo(&p, n + 1);
	peer_close(&p);
	stop_server(&t);
}

static int count_fds(void)
{
	int n = 0;
	for (int fd = 0; fd < 4096; fd++)
		if (fcntl(fd, F_GETFD) >= 0)
			n++;
	return n;
}

Test(server, fd_count_returns_to_baseline)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer warm;
	peer_handshake(&warm, t.addr);
	peer_ping_echo(&warm, 1);
	peer_close(&warm);
	usleep(50000);
	int base = count_fds();
	peer p[20];
	for (int i = 0; i < 20; i++) {
		peer_handshake(&p[i], t.addr);
		peer_request(&p[i], 1, i % 2 ? "hold" : "x"); /* some with calls in flight */
	}
	cr_assert_geq(count_fds(), base + 40, "client and server ends are open");
	for (int i = 0; i < 20; i++)
		peer_close(&p[i]);
	int64_t until = tu_now_ms() + 3000;
	while (count_fds() > base && tu_now_ms() < until)
		usleep(10000);
	cr_assert_eq(count_fds(), base, "the server closed every connection it accepted");
	atomic_store(&release_req, 1);
	stop_server(&t);
}

Test(server, peer_credentials_absent_on_tcp)
{
	tsrv t;
	start_server(&t, "tcp:127.0.0.1:0", NULL);
	peer p;
	peer_handshake(&p, t.addr);
	seen_uid = (uid_t)12345;
	peer_request(&p, 1, "cred");
	cr_assert_eq(peer_response(&p, NULL, NULL, 0, NULL, 0), PBRPC_STATUS_OK);
	cr_assert_eq(seen_uid, (uid_t)12345, "no credentials over TCP");
	peer_close(&p);
	stop_server(&t);
}

Test(server, stale_socket_reclaimed_live_one_refused)
{
	char dir[] = "/tmp/pbrpc-test-XXXXXX";
	cr_assert_not_null(mkdtemp(dir));
	char path[100], ep[160];
	snprintf(path, sizeof(path), "%s/s.sock", dir);
	snprintf(ep, sizeof(ep), "unix:%s", path);
	/* A stale socket file: bound, then its owner closed without unlinking. */
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", path);
	cr_assert_eq(bind(fd, (struct sockaddr *)&sun, sizeof(sun)), 0);
	close(fd);
	pbrpc_server *a, *b;
	cr_assert_eq(pbrpc_server_new(&a, NULL), 0);
	cr_assert_geq(pbrpc_server_listen(a, ep), 0);
	cr_assert_eq(pbrpc_server_new(&b, NULL), 0);
	cr_assert_eq(pbrpc_server_listen(b, ep), -EADDRINUSE);
	pbrpc_server_free(b);
	pbrpc_server_free(a);
	struct stat st;
	cr_assert_eq(lstat(path, &st), -1, "the socket file is removed on free");
	/* A regular file at the path is never deleted. */
	FILE *f = fopen(path, "w");
	fclose(f);
	cr_assert_eq(pbrpc_server_new(&a, NULL), 0);
	cr_assert_eq(pbrpc_server_listen(a, ep), -EEXIST);
	pbrpc_server_free(a);
	cr_assert_eq(lstat(path, &st), 0);
	unlink(path);
	rmdir(dir);
}

Test(server, socket_mode_applied)
{
	char dir[] = "/tmp/pbrpc-test-XXXXXX";
	cr_assert_not_null(mkdtemp(dir));
	char path[100], ep[160];
	snprintf(path, sizeof(path), "%s/s.sock", dir);
	snprintf(ep, sizeof(ep), "unix:%s", path);
	pbrpc_server *srv;
	pbrpc_server_opts o = { .socket_mode = 0600 };
	cr_assert_eq(pbrpc_server_new(&srv, &o), 0);
	cr_assert_geq(pbrpc_server_listen(srv, ep), 0);
	struct stat st;
	cr_assert_eq(stat(path, &st), 0);
	cr_assert_eq(st.st_mode & 0777, 0600);
	pbrpc_server_free(srv);
	rmdir(dir);
}

Test(server, listen_errors_are_clear)
{
	pbrpc_server *srv;
	cr_assert_eq(pbrpc_server_new(&srv, NULL), 0);
	cr_assert_eq(pbrpc_server_listen(srv, "bogus"), PBRPC_EADDRESS);
	cr_assert_eq(pbrpc_server_listen(srv, "tcp:127.0.0.1"), PBRPC_EADDRESS);
	cr_assert_eq(pbrpc_server_listen(srv, "tcp:127.0.0.1:99999"), PBRPC_EADDRESS);
	cr_assert_eq(pbrpc_server_listen(srv, "unix:/nonexistent-dir/x.sock"), -ENOENT);
	char longp[200];
	memset(longp, 'a', sizeof(longp));
	memcpy(longp, "unix:/", 6);
	longp[199] = 0;
	cr_assert_eq(pbrpc_server_listen(srv, longp), -ENAMETOOLONG);
	pbrpc_server_free(srv);
}

/* ---- shutdown ---- */

Test(server, graceful_drain_finishes_calls_in_flight)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p;
	peer_handshake(&p, t.addr);
	peer_request(&p, 1, "thread"); /* answers after 20 ms */
	usleep(5000);
	pbrpc_server_shutdown(t.srv, 2000);
	/* The GOAWAY(OK), and the call's reply (usually after it; on a loaded
	 * machine the 20 ms reply may come first); a new call is refused. */
	int got_ok = 0, got_unavail = 0;
	for (bool goaway = false; !goaway;) {
		pbrpc__frame f;
		cr_assert_eq(pbrpc__frame_read(&p.dec, p.fd, &f, 5000), 1);
		if (f.hdr.type == PBRPC_FRAME_GOAWAY) {
			goaway = true;
			continue;
		}
		pbrpc__wire_response r;
		cr_assert_eq(f.hdr.type, PBRPC_FRAME_RESPONSE, "frame type %d before the GOAWAY", f.hdr.type);
		cr_assert_eq(pbrpc__wire_read_response(&f, &r), 0);
		cr_assert(r.call_id == 1 && r.status == PBRPC_STATUS_OK);
		got_ok++;
	}
	peer_request(&p, 2, "late");
	while (got_ok + got_unavail < 2) {
		uint32_t id = 0;
		int st = peer_response(&p, &id, NULL, 0, NULL, 0);
		if (id == 1 && st == PBRPC_STATUS_OK)
			got_ok++;
		else if (id == 2 && st == PBRPC_STATUS_UNAVAILABLE)
			got_unavail++;
		else
			cr_assert_fail("unexpected answer: id %u status %d", id, st);
	}
	cr_assert_eq(got_ok, 1);
	cr_assert_eq(got_unavail, 1);
	pthread_join(t.thr, NULL);
	cr_assert_eq(t.rc, 0);
	pbrpc_server_free(t.srv);
	rmdir(t.dir);
	peer_close(&p);
}

/* The exact drain: after its GOAWAY the server keeps reading until the
 * client has shown it read the GOAWAY (the PONG to the drain PING), so a
 * request that was on the wire is answered (UNAVAILABLE, not run), never
 * lost to a close; with no PONG the drain deadline closes. */
Test(server, drain_reads_until_the_client_has_seen_goaway)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p, q;
	peer_handshake(&p, t.addr);
	peer_handshake(&q, t.addr);
	p.answer_pings = false;
	int rc;
	int64_t t0 = tu_now_ms();
	pbrpc_server_shutdown(t.srv, 2500);
	pbrpc__frame f;
	cr_assert_eq(pbrpc__frame_read(&p.dec, p.fd, &f, 5000), 1);
	cr_assert_eq(f.hdr.type, PBRPC_FRAME_GOAWAY);
	cr_assert_eq(pbrpc__frame_read(&p.dec, p.fd, &f, 5000), 1);
	cr_assert_eq(f.hdr.type, PBRPC_FRAME_PING, "the drain GOAWAY is followed by a PING");
	usleep(150 * 1000); /* no call in flight: the old server had closed by now */
	peer_request(&p, 7, "on the wire");
	char msg[64];
	uint32_t id = 0;
	cr_assert_eq(peer_response(&p, &id, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_UNAVAILABLE);
	cr_assert_eq(id, 7);
	cr_assert_str_eq(msg, "server is shutting down");
	/* q answers the PING: closed as soon as it has. */
	rc = peer_response(&q, NULL, NULL, 0, NULL, 0);
	cr_assert(rc == PBRPC_EOF || rc == -ECONNRESET, "q: expected close, got %s", pbrpc_strerror(rc));
	cr_assert_lt(tu_now_ms() - t0, 2000, "a client that answered the PING is closed before the deadline");
	/* p stays silent: closed at the drain deadline. */
	rc = pbrpc__frame_read(&p.dec, p.fd, &f, 5000);
	cr_assert(rc == PBRPC_EOF || rc == -ECONNRESET, "expected close, got %s", pbrpc_strerror(rc));
	cr_assert_geq(tu_now_ms() - t0, 2400, "the silent client was kept until the drain deadline");
	pthread_join(t.thr, NULL);
	pbrpc_server_free(t.srv);
	rmdir(t.dir);
	peer_close(&p);
	peer_close(&q);
}

/* A connection still in its handshake when the drain begins drains too:
 * the server's HELLO is out, so the client may have sent its HELLO and a
 * request behind it before it sees the GOAWAY. That request is answered
 * UNAVAILABLE with NOT_RUN (safe to retry elsewhere), not lost to a close. */
Test(server, drain_answers_a_connection_still_in_its_handshake)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p;
	peer_open(&p, t.addr);
	peer_read_hello(&p); /* the server's HELLO; ours is not sent yet */
	pbrpc_server_shutdown(t.srv, 2500);
	pbrpc__frame f;
	cr_assert_eq(pbrpc__frame_read(&p.dec, p.fd, &f, 5000), 1);
	cr_assert_eq(f.hdr.type, PBRPC_FRAME_GOAWAY, "a handshaking connection gets the drain GOAWAY");
	cr_assert_eq(pbrpc__frame_read(&p.dec, p.fd, &f, 5000), 1);
	cr_assert_eq(f.hdr.type, PBRPC_FRAME_PING);
	uint8_t ping[PBRPC_WIRE_PING_SIZE];
	memcpy(ping, f.payload, sizeof(ping));
	/* Our HELLO and a request, as a client that had not read the GOAWAY yet. */
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc_hello h = { .version = 1, .max_frame = 64u << 20, .agent = "test", .features = PBRPC_FEATURE_NOT_RUN };
	cr_assert_eq(pbrpc__wire_write_preface(&w, &h), 0);
	peer_send_writer(&p, &w);
	pbrpc__frame_writer_fini(&w);
	peer_request(&p, 9, "sent before the GOAWAY was read");
	cr_assert_eq(pbrpc__frame_read(&p.dec, p.fd, &f, 5000), 1);
	cr_assert_eq(f.hdr.type, PBRPC_FRAME_RESPONSE);
	pbrpc__wire_response r;
	cr_assert_eq(pbrpc__wire_read_response(&f, &r), 0);
	cr_assert_eq(r.call_id, 9);
	cr_assert_eq(r.status, PBRPC_STATUS_UNAVAILABLE);
	cr_assert(r.not_run, "the refused request is marked NOT_RUN");
	/* The PONG shows we read the GOAWAY: the server closes. */
	pbrpc__frame_header ph = { .type = PBRPC_FRAME_PONG };
	cr_assert_eq(pbrpc__frame_write(p.fd, &ph, ping, sizeof(ping), 5000), 0);
	int rc = pbrpc__frame_read(&p.dec, p.fd, &f, 5000);
	cr_assert(rc == PBRPC_EOF || rc == -ECONNRESET, "expected close, got %s", pbrpc_strerror(rc));
	pthread_join(t.thr, NULL);
	pbrpc_server_free(t.srv);
	rmdir(t.dir);
	peer_close(&p);
}

Test(server, forced_drain_answers_unavailable)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p;
	peer_handshake(&p, t.addr);
	/* Many calls, so that answering them shifts entries around the call table. */
	enum { N = 300 };
	for (uint32_t i = 1; i <= N; i++)
		peer_request(&p, i * 2654435761u % 0xfffffffbu + 1, "hold");
	wait_held(N);
	int64_t t0 = tu_now_ms();
	pbrpc_server_shutdown(t.srv, 100);
	for (int k = 0; k < N; k++) {
		uint32_t id;
		cr_assert_eq(peer_response(&p, &id, NULL, 0, NULL, 0), PBRPC_STATUS_UNAVAILABLE, "reply %d", k);
	}
	pthread_join(t.thr, NULL);
	cr_assert_lt(tu_now_ms() - t0, 3000);
	pbrpc_server_free(t.srv);
	rmdir(t.dir);
	peer_close(&p);
}

/* Issue 9, defect 3: while a drain runs, a later pbrpc_server_shutdown() with
 * a shorter drain shortens it (0: at once); a longer one changes nothing. */
Test(server, shorter_shutdown_shortens_a_drain)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p;
	peer_handshake(&p, t.addr);
	peer_request(&p, 1, "hold");
	wait_held(1);
	pbrpc_server_shutdown(t.srv, 30000);
	usleep(100000);
	pbrpc_server_shutdown(t.srv, 60000); /* longer: ignored */
	usleep(100000);
	int64_t t0 = tu_now_ms();
	pbrpc_server_shutdown(t.srv, 0);
	uint32_t id = 0;
	cr_assert_eq(peer_response(&p, &id, NULL, 0, NULL, 0), PBRPC_STATUS_UNAVAILABLE);
	cr_assert_eq(id, 1);
	pthread_join(t.thr, NULL);
	cr_assert_lt(tu_now_ms() - t0, 1000, "the second shutdown took %lld ms", (long long)(tu_now_ms() - t0));
	cr_assert_eq(t.rc, 0);
	pbrpc_server_free(t.srv);
	rmdir(t.dir);
	peer_close(&p);
}

/* A drain without a deadline, then one with: the deadline applies. */
Test(server, deadline_after_an_endless_drain)
{
	tsrv t;
	start_server(&t, NULL, NULL);
	peer p;
	peer_handshake(&p, t.addr);
	peer_request(&p, 1, "hold");
	wait_held(1);
	pbrpc_server_shutdown(t.srv, -1);
	usleep(100000);
	int64_t t0 = tu_now_ms();
	pbrpc_server_shutdown(t.srv, 300);
	uint32_t id = 0;
	cr_assert_eq(peer_response(&p, &id, NULL, 0, NULL, 0), PBRPC_STATUS_UNAVAILABLE);
	pthread_join(t.thr, NULL);
	int64_t took = tu_now_ms() - t0;
	cr_assert_geq(took, 250);
	cr_assert_lt(took, 2000);
	pbrpc_server_free(t.srv);
	rmdir(t.dir);
	peer_close(&p);
}

/* ---- the memory budget (issue 9, defect 5) and large unpacks off the loop (defect 6) ----
 * These measure this process's own memory from /proc/self/status: the server
 * runs on a thread here, and the peers' buffers are allocated before the
 * baseline is read. */

#include <malloc.h>

/* Under ASan, freed memory sits in its quarantine and every byte has a shadow:
 * the behaviour is checked, the RSS figures only reported. */
#if defined(__SANITIZE_ADDRESS__)
#define RSS_CHECKED 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define RSS_CHECKED 0
#endif
#endif
#ifndef RSS_CHECKED
#define RSS_CHECKED 1
#endif

/* Megabytes in 1-byte reads take minutes: these run at full I/O size only. */
#define SKIP_IF_SHORT_IO() \
	do { \
		if (tu_short_io()) \
			cr_skip_test("megabytes in pieces of a few bytes take too long"); \
	} while (0)

#define MiB (1024L * 1024L)

static long status_kib(const char *key)
{
	FILE *f = fopen("/proc/self/status", "r");
	cr_assert_not_null(f);
	char line[256];
	long v = -1;
	size_t kl = strlen(key);
	while (fgets(line, sizeof(line), f))
		if (strncmp(line, key, kl) == 0 && line[kl] == ':')
			v = atol(line + kl + 1);
	fclose(f);
	cr_assert_geq(v, 0, "%s not in /proc/self/status", key);
	return v;
}

static long rss_bytes(void)
{
	return status_kib("VmRSS") * 1024;
}

static long hwm_bytes(void)
{
	return status_kib("VmHWM") * 1024;
}

/* Resets VmHWM to the current RSS (Linux >= 4.0). */
static void hwm_reset(void)
{
	int fd = open("/proc/self/clear_refs", O_WRONLY);
	cr_assert_geq(fd, 0);
	cr_assert_eq(write(fd, "5", 1), 1);
	close(fd);
}

/* A whole REQUEST frame for demo.Echo/Echo whose payload is exactly
 * `frame_len` bytes: the body is `pattern` repeated (then padded with
 * zero-length field 1, 0a 00, for an even fit). Returns a malloc'd buffer. */
static uint8_t *big_request(uint32_t id, const char *method, const uint8_t *pattern, size_t plen, size_t frame_len,
			    size_t *out_len)
{
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc__wire_request r = { .call_id = id, .method = method, .method_len = strlen(method) };
	cr_assert_eq(pbrpc__wire_write_request(&w, &r, NULL, 0), 0);
	size_t hdr = pbrpc__frame_writer_pending(&w); /* 12-byte header + request fields, empty body */
	pbrpc__frame_writer_fini(&w);
	size_t body_len = frame_len - (hdr - PBRPC_FRAME_HEADER_SIZE);
	uint8_t *body = malloc(body_len);
	cr_assert_not_null(body);
	size_t i = 0;
	for (; i + plen <= body_len; i += plen)
		memcpy(body + i, pattern, plen);
	for (; i + 2 <= body_len; i += 2)
		memcpy(body + i, "\x0a\x00", 2);
	cr_assert_eq(i, body_len, "pattern does not tile the body");
	pbrpc__frame_writer_init(&w);
	r.body = body;
	r.body_len = body_len;
	cr_assert_eq(pbrpc__wire_write_request(&w, &r, NULL, 0), 0);
	free(body);
	*out_len = pbrpc__frame_writer_pending(&w);
	cr_assert_eq(*out_len, PBRPC_FRAME_HEADER_SIZE + frame_len);
	uint8_t *out = malloc(*out_len);
	memcpy(out, w.buf + w.head, *out_len);
	pbrpc__frame_writer_fini(&w);
	return out;
}

static const uint8_t unknown_78_00[] = { 0x78, 0x00 };    /* field 15, varint 0: unknown to demo.EchoRequest */
static const uint8_t payload_0a_01_58[] = { 0x0a, 0x01, 0x58 }; /* payload = "X", again and again */

/* One 16 MiB request of tiny fields: answered RESOURCE_EXHAUSTED while a
 * bystander is served; peak growth <= 3x its size, back within 64 MiB of the
 * baseline 3 s after. */
static void one_tiny_fields_request(const uint8_t *pattern, size_t plen, unsigned workers)
{
	tsrv t;
	pbrpc_server_opts o = { .workers = workers };
	start_server(&t, NULL, &o);
	peer p, bystander;
	peer_handshake(&p, t.addr);
	peer_handshake(&bystander, t.addr);
	size_t len;
	const size_t size = (size_t)PBRPC_MAX_FRAME_DEFAULT; /* a 16 MiB REQUEST */
	uint8_t *frame = big_request(1, "demo.Echo/Echo", pattern, plen, size, &len);
	peer_ping_echo(&bystander, 1);
	malloc_trim(0);
	long base = rss_bytes();
	hwm_reset();
	tu_write_full(p.fd, frame, len);
	char msg[256];
	uint32_t id;
	cr_assert_eq(peer_response(&p, &id, msg, sizeof(msg), NULL, 0), PBRPC_STATUS_RESOURCE_EXHAUSTED, "%s", msg);
	cr_assert_eq(id, 1);
	/* refused for its factor (8 x its size), or on a worker, whose copy of
	 * the body leaves less than that in the connection's share */
	cr_assert(strstr(msg, "request needs more than") && (strstr(msg, "8 x its") || workers), "%s", msg);
	peer_ping_echo(&bystander, 2);
	peer_ping_echo(&p, 3); /* the connection is still usable */
	long peak = hwm_bytes() - base;
	cr_log_info("16 MiB request of %02x %02x...: peak growth %.1f MiB (%s)", pattern[0], pattern[1],
		    (double)peak / MiB, msg);
	if (RSS_CHECKED)
		cr_assert_leq(peak, 3 * (long)size, "peak RSS growth %ld MiB > 3 x 16 MiB", peak / MiB);
	free(frame);
	peer_close(&p);
	usleep(3000 * 1000);
	long after = rss_bytes() - base;
	cr_log_info("3 s after: %+.1f MiB from the baseline", (double)after / MiB);
	if (RSS_CHECKED)
		cr_assert_leq(after, 64 * MiB, "RSS 3 s after is %ld MiB above the baseline", after / MiB);
	peer_ping_echo(&bystander, 4);
	peer_close(&bystander);
	stop_server(&t);
}

Test(server, unknown_fields_request_refused_within_memory_bounds, .timeout = 60)
{
	SKIP_IF_SHORT_IO();
	one_tiny_fields_request(unknown_78_00, sizeof(unknown_78_00), 0);
}

Test(server, repeated_field_request_refused_within_memory_bounds, .timeout = 60)
{
	SKIP_IF_SHORT_IO();
	one_tiny_fields_request(payload_0a_01_58, sizeof(payload_0a_01_58), 0);
}

Test(server, unknown_fields_request_refused_on_a_worker, .timeout = 60)
{
	SKIP_IF_SHORT_IO();
	one_tiny_fields_request(unknown_78_00, sizeof(unknown_78_00), 2);
}

struct sender {
	int fd;
	const uint8_t *buf;
	size_t len;
};

static void *send_thread(void *arg)
{
	struct sender *s = arg;
	tu_write_full(s->fd, s->buf, s->len);
	return NULL;
}

/* Any number of them on any number of connections: RSS <= budget + 64 MiB,
 * each one answered, a bystander served. */
Test(server, many_tiny_fields_requests_stay_in_the_budget, .timeout = 90)
{
	SKIP_IF_SHORT_IO();
	enum { NCONN = 8, PER = 2 };
	const size_t budget = 96 * MiB;
	tsrv t;
	pbrpc_server_opts o = { .max_memory = budget };
	start_server(&t, NULL, &o);
	peer p[NCONN], bystander;
	for (int i = 0; i < NCONN; i++)
		peer_handshake(&p[i], t.addr);
	peer_handshake(&bystander, t.addr);
	size_t len;
	uint8_t *one = big_request(1, "demo.Echo/Echo", unknown_78_00, 2, PBRPC_MAX_FRAME_DEFAULT, &len);
	uint8_t *frames = malloc(PER * len); /* PER requests back to back, ids 1..PER */
	for (int k = 0; k < PER; k++) {
		memcpy(frames + k * len, one, len);
		uint8_t *st = frames + k * len + 8;
		st[3] = (uint8_t)(k + 1);
	}
	free(one);
	malloc_trim(0);
	long base = rss_bytes();
	hwm_reset();
	pthread_t thr[NCONN];
	struct sender s[NCONN];
	for (int i = 0; i < NCONN; i++) {
		s[i] = (struct sender){ p[i].fd, frames, PER * len };
		pthread_create(&thr[i], NULL, send_thread, &s[i]);
	}
	peer_ping_echo(&bystander, 1);
	int exhausted = 0;
	for (int i = 0; i < NCONN; i++) {
		for (int k = 0; k < PER; k++) {
			char msg[256];
			int st = peer_response(&p[i], NULL, msg, sizeof(msg), NULL, 0);
			cr_assert_eq(st, PBRPC_STATUS_RESOURCE_EXHAUSTED, "conn %d: %d %s", i, st, msg);
			exhausted++;
		}
		peer_ping_echo(&bystander, (uint32_t)i + 2);
	}
	for (int i = 0; i < NCONN; i++)
		pthread_join(thr[i], NULL);
	long peak = hwm_bytes() - base;
	cr_log_info("%d x 16 MiB on %d connections, budget %zu MiB: peak growth %.1f MiB", NCONN * PER, NCONN,
		    budget / MiB, (double)peak / MiB);
	cr_assert_eq(exhausted, NCONN * PER);
	if (RSS_CHECKED)
		cr_assert_leq(peak, (long)budget + 64 * MiB, "peak growth %ld MiB over budget + 64 MiB", peak / MiB);
	free(frames);
	for (int i = 0; i < NCONN; i++)
		peer_close(&p[i]);
	peer_close(&bystander);
	stop_server(&t);
}

/* Requests that unpack fine but are held: the budget admits what fits,
 * answers the rest RESOURCE_EXHAUSTED, and stays within budget + 64 MiB;
 * once they are answered, memory comes back and large requests pass again. */
Test(server, held_requests_share_the_budget, .timeout = 90)
{
	SKIP_IF_SHORT_IO();
	/* Its premise is one budget for all six. Split between two loops, a
	 * 12 MiB request sent alone after six refused ones was once not held
	 * within 10 s (CI, server-loops, 1 run in about 6): open, see the
	 * closing note of issue 14. */
	if (tu_loop_threads() > 1)
		cr_skip_test("one budget shared by every connection: one loop only");
	enum { NCONN = 6 };
	const size_t budget = 64 * MiB;
	tsrv t;
	pbrpc_server_opts o = { .max_memory = budget, .max_conn_memory = 32 * MiB };
	start_server(&t, NULL, &o);
	peer p[NCONN], bystander;
	for (int i = 0; i < NCONN; i++)
		peer_handshake(&p[i], t.addr);
	peer_handshake(&bystander, t.addr);
	/* payload "hold" then 12 MiB: the handler keeps the call open */
	size_t plen = 12 * MiB;
	uint8_t *payload = malloc(plen);
	memset(payload, 'h', plen);
	memcpy(payload, "hold", 4);
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = payload;
	req.payload.len = plen;
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc__wire_request r = { .call_id = 1, .method = "demo.Echo/Echo", .method_len = 14 };
	cr_assert_eq(pbrpc__wire_write_request(&w, &r, &req.base, 0), 0);
	free(payload);
	size_t len = pbrpc__frame_writer_pending(&w);
	malloc_trim(0);
	long base = rss_bytes();
	hwm_reset();
	pthread_t thr[NCONN];
	struct sender s[NCONN];
	for (int i = 0; i < NCONN; i++) {
		s[i] = (struct sender){ p[i].fd, w.buf + w.head, len };
		pthread_create(&thr[i], NULL, send_thread, &s[i]);
	}
	for (int i = 0; i < NCONN; i++)
		pthread_join(thr[i], NULL);
	/* Each one is held or refused; wait until all are one or the other. */
	int refused = 0;
	bool got[NCONN] = { false };
	int64_t until = tu_now_ms() + 20000;
	while (tu_now_ms() < until) {
		for (int i = 0; i < NCONN; i++) {
			struct pollfd pfd = { .fd = p[i].fd, .events = POLLIN };
			if (got[i] || poll(&pfd, 1, 0) != 1)
				continue;
			char msg[256];
			int st = peer_response(&p[i], NULL, msg, sizeof(msg), NULL, 0);
			if (st >= 0) {
				cr_assert_eq(st, PBRPC_STATUS_RESOURCE_EXHAUSTED, "%d %s", st, msg);
				cr_log_info("refused %d: %s", i, msg);
				got[i] = true;
				refused++;
			}
		}
		if (refused + atomic_load(&n_held) == NCONN)
			break;
		usleep(10000);
	}
	int held_now = atomic_load(&n_held);
	cr_log_info("held %d, refused %d", held_now, refused);
	cr_assert_eq(held_now + refused, NCONN);
	cr_assert_geq(refused, 1);
	if (held_now == 0) {
		/* Frames that arrive together are each counted whole from their
		 * header on, so a budget split between loops (server-loops), or
		 * reads slowed by ASan, can refuse all six at once: safe, and no
		 * sign of a budget that never admits one. Alone, one must be. */
		s[0] = (struct sender){ p[0].fd, w.buf + w.head, len };
		send_thread(&s[0]);
		int64_t end = tu_now_ms() + 10000;
		while (atomic_load(&n_held) < 1 && tu_now_ms() < end) {
			struct pollfd pfd = { .fd = p[0].fd, .events = POLLIN };
			if (poll(&pfd, 1, 10) == 1) {
				char msg[256] = "";
				int st = peer_response(&p[0], NULL, msg, sizeof(msg), NULL, 0);
				cr_assert_fail("sent alone, it was answered %d: %s", st, msg);
			}
		}
		wait_held(1);
		got[0] = false;
		refused--;
		held_now = 1;
	}
	peer_ping_echo(&bystander, 1);
	long peak = hwm_bytes() - base;
	cr_log_info("%d x 12 MiB held, budget %zu MiB: peak growth %.1f MiB", NCONN, budget / MiB, (double)peak / MiB);
	if (RSS_CHECKED)
		cr_assert_leq(peak, (long)budget + 64 * MiB, "peak growth %ld MiB over budget + 64 MiB", peak / MiB);
	/* answer the held ones: their memory goes back and a large one passes again */
	atomic_store(&release_req, 1);
	for (int i = 0; i < NCONN; i++) {
		if (!got[i])
			cr_assert_eq(peer_response(&p[i], NULL, NULL, 0, NULL, 0), PBRPC_STATUS_OK);
	}
	while (atomic_load(&release_req))
		usleep(1000);
	r.call_id = 2;
	pbrpc__frame_writer_fini(&w);
	pbrpc__frame_writer_init(&w);
	req.payload.data = (uint8_t *)calloc(1, 8 * MiB);
	req.payload.len = 8 * MiB;
	cr_assert_eq(pbrpc__wire_write_request(&w, &r, &req.base, 0), 0);
	free(req.payload.data);
	peer_send_writer(&p[0], &w);
	cr_assert_eq(peer_response(&p[0], NULL, NULL, 0, NULL, 0), PBRPC_STATUS_OK);
	pbrpc__frame_writer_fini(&w);
	for (int i = 0; i < NCONN; i++)
		peer_close(&p[i]);
	peer_close(&bystander);
	stop_server(&t);
}

/* The largest legitimate request (16 MiB frame, one bytes field) passes
 * under the default budget, on the loop and on a worker. */
static void largest_request_passes(unsigned workers)
{
	tsrv t;
	pbrpc_server_opts o = { .workers = workers };
	start_server(&t, NULL, &o);
	peer p;
	peer_handshake(&p, t.addr);
	size_t plen = PBRPC_MAX_FRAME_DEFAULT - 32;
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = calloc(1, plen);
	req.payload.len = plen;
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc__wire_request r = { .call_id = 1, .method = "demo.Echo/Echo", .method_len = 14 };
	cr_assert_eq(pbrpc__wire_write_request(&w, &r, &req.base, 0), 0);
	free(req.payload.data);
	peer_send_writer(&p, &w);
	pbrpc__frame_writer_fini(&w);
	char msg[256];
	int st = peer_response(&p, NULL, msg, sizeof(msg), NULL, 0);
	cr_assert_eq(st, PBRPC_STATUS_OK, "%d %s", st, msg);
	peer_ping_echo(&p, 2);
	peer_close(&p);
	stop_server(&t);
}

Test(server, largest_request_passes_the_budget, .timeout = 60)
{
	SKIP_IF_SHORT_IO();
	largest_request_passes(0);
	largest_request_passes(2);
}
