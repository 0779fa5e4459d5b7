/* Client tests against a fake server written here with the frame and wire
 * layers only (it speaks docs/PROTOCOL.md on a Unix socket in a temporary
 * directory, one thread per connection).
 *
 * The fake server implements demo.Echo and obeys commands in the request's
 * payload: "never" (hold the call; answer CANCELLED on CANCEL), "close",
 * "badbody", "unknown-id", "badframe", "ping", "drain", "drain-hold",
 * "goaway-error". delay_ms delays the answer, fail_status/fail_message fail
 * it. With cfg.reverse_batch = N it holds N requests and answers them in
 * reverse order.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "echo.pb-c.h"
#include "pbrpc/client.h"
#include "proto/frame.h"
#include "proto/wire.h"
#include "testutil.h"

/* ---- counting allocator: proves the synchronous fast path allocates nothing.
 * Interposes malloc & co. in this executable; counts only on threads that ask.
 * Not under ASan, which owns malloc. */
#if defined(__SANITIZE_ADDRESS__)
#define HAVE_ALLOC_COUNT 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define HAVE_ALLOC_COUNT 0
#endif
#endif
#ifndef HAVE_ALLOC_COUNT
#define HAVE_ALLOC_COUNT 1
#endif

#if HAVE_ALLOC_COUNT
static _Thread_local bool alloc_counting;
static _Thread_local long alloc_count;

extern void *__libc_malloc(size_t n);
extern void *__libc_calloc(size_t n, size_t m);
extern void *__libc_realloc(void *p, size_t n);

void *malloc(size_t n)
{
	if (alloc_counting)
		alloc_count++;
	return __libc_malloc(n);
}

void *calloc(size_t n, size_t m)
{
	if (alloc_counting)
		alloc_count++;
	return __libc_calloc(n, m);
}

void *realloc(void *p, size_t n)
{
	if (alloc_counting)
		alloc_count++;
	return __libc_realloc(p, n);
}
#endif

/* ---- fake server ---- */

typedef struct fake_cfg {
	uint32_t version; /* 0: 1 */
	uint32_t max_frame;
	uint32_t max_calls;
	bool bad_preface;
	bool goaway_hello; /* GOAWAY(RESOURCE_EXHAUSTED) instead of HELLO */
	int reverse_batch;
} fake_cfg;

#define MAX_CONNS 16
#define MAX_IDS 4096

typedef struct fake {
	fake_cfg cfg;
	char dir[80];
	char path[108];
	char endpoint[128];
	int lfd;
	pthread_t acceptor;
	bool accepting;
	atomic_bool stop;
	pthread_mutex_t mu;
	pthread_t threads[MAX_CONNS];
	int fds[MAX_CONNS];
	/* statistics, under mu */
	int conns;
	int requests;
	int cancels;
	uint32_t cancel_ids[MAX_IDS];
	int goaways;
	int goaway_status;
	int pongs_ok;
	int dup_ids; /* REQUESTs reusing an id still in flight */
	int bad_frames;
	bool last_has_timeout;
	uint64_t last_timeout_us;
	char last_md[64];
	pbrpc_hello client_hello;
} fake;

typedef struct held {
	uint32_t id;
	int64_t due; /* ms; 0: never */
	bool ping;   /* answer when the PONG arrives */
} held;

typedef struct fconn {
	fake *fs;
	int fd;
	pbrpc__frame_writer w;
	pbrpc__frame_decoder d;
	held held[MAX_IDS];
	int nheld;
	bool draining;
	bool closing;
	uint8_t ping[8];
	int batch_n;
	uint32_t batch_ids[MAX_IDS];
	ProtobufCBinaryData batch_payloads[MAX_IDS];
} fconn;

static void fc_flush(fconn *fc)
{
	pbrpc__frame_writer_flush(&fc->w, fc->fd, 0);
}

static void fc_answer(fconn *fc, uint32_t id, int status, const char *msg, const ProtobufCBinaryData *payload)
{
	pbrpc__wire_response r = { .call_id = id, .status = status, .message = msg, .message_len = msg ? strlen(msg) : 0 };
	Demo__EchoReply rep = DEMO__ECHO_REPLY__INIT;
	if (payload)
		rep.payload = *payload;
	pbrpc__wire_write_response(&fc->w, &r, status == 0 ? &rep.base : NULL, 0);
	fc_flush(fc);
}

static void fc_hold(fconn *fc, uint32_t id, int64_t due, bool ping)
{
	fc->held[fc->nheld++] = (held){ .id = id, .due = due, .ping = ping };
}

static bool fc_unhold(fconn *fc, uint32_t id)
{
	for (int i = 0; i < fc->nheld; i++) {
		if (fc->held[i].id == id) {
			fc->held[i] = fc->held[--fc->nheld];
			return true;
		}
	}
	return false;
}

static bool fc_is_held(fconn *fc, uint32_t id)
{
	for (int i = 0; i < fc->nheld; i++)
		if (fc->held[i].id == id)
			return true;
	return false;
}

static void fc_goaway(fconn *fc, int status, const char *msg)
{
	pbrpc__wire_write_goaway(&fc->w, status, msg);
	fc_flush(fc);
}

static void fc_request(fconn *fc, const pbrpc__frame *f)
{
	fake *fs = fc->fs;
	pbrpc__wire_request req;
	int rc = pbrpc__wire_read_request(f, &req);
	pthread_mutex_lock(&fs->mu);
	fs->requests++;
	if (fc_is_held(fc, req.call_id))
		fs->dup_ids++;
	fs->last_has_timeout = req.has_timeout;
	fs->last_timeout_us = req.timeout_us;
	size_t ml = 0;
	const void *md = rc == 0 ? pbrpc__wire_metadata_get(&req, "x-test", &ml) : NULL;
	snprintf(fs->last_md, sizeof(fs->last_md), "%.*s", md ? (int)ml : 0, md ? (const char *)md : "");
	pthread_mutex_unlock(&fs->mu);

	if (rc < 0) {
		fc_answer(fc, req.call_id, PBRPC_STATUS_INVALID_ARGUMENT, "malformed request", NULL);
		return;
	}
	if (fc->draining) {
		fc_answer(fc, req.call_id, PBRPC_STATUS_UNAVAILABLE, "server is shutting down", NULL);
		return;
	}
	if (req.method_len != 14 || memcmp(req.method, "demo.Echo/Echo", 14) != 0) {
		fc_answer(fc, req.call_id, PBRPC_STATUS_UNIMPLEMENTED, "unknown method", NULL);
		return;
	}
	Demo__EchoRequest *m = demo__echo_request__unpack(NULL, req.body_len, req.body);
	if (!m) {
		fc_answer(fc, req.call_id, PBRPC_STATUS_INVALID_ARGUMENT, "bad body", NULL);
		return;
	}
	char cmd[32] = "";
	if (m->payload.len < sizeof(cmd))
		memcpy(cmd, m->payload.data, m->payload.len);

	if (fs->cfg.reverse_batch) {
		fc->batch_ids[fc->batch_n] = req.call_id;
		fc->batch_payloads[fc->batch_n].len = m->payload.len;
		fc->batch_payloads[fc->batch_n].data = malloc(m->payload.len + 1);
		memcpy(fc->batch_payloads[fc->batch_n].data, m->payload.data, m->payload.len);
		fc->batch_n++;
		fc_hold(fc, req.call_id, 0, false);
		if (fc->batch_n == fs->cfg.reverse_batch) {
			for (int i = fc->batch_n - 1; i >= 0; i--) {
				fc_unhold(fc, fc->batch_ids[i]);
				fc_answer(fc, fc->batch_ids[i], 0, NULL, &fc->batch_payloads[i]);
				free(fc->batch_payloads[i].data);
			}
			fc->batch_n = 0;
		}
	} else if (!strcmp(cmd, "never")) {
		fc_hold(fc, req.call_id, 0, false);
	} else if (!strcmp(cmd, "close")) {
		fc->closing = true;
	} else if (!strcmp(cmd, "badbody")) {
		static const uint8_t junk[] = { 0x0a, 0x7f, 0x01 }; /* length 127, 1 byte present */
		pbrpc__wire_response r = { .call_id = req.call_id, .body = junk, .body_len = sizeof(junk) };
		pbrpc__wire_write_response(&fc->w, &r, NULL, 0);
		fc_flush(fc);
	} else if (!strcmp(cmd, "unknown-id")) {
		fc_answer(fc, req.call_id + 1000, 0, NULL, &m->payload);
		fc_hold(fc, req.call_id, 0, false);
	} else if (!strcmp(cmd, "badframe")) {
		pbrpc__frame_header h = { .type = 0x09 };
		pbrpc__frame_writer_append(&fc->w, &h, "x", 1);
		fc_flush(fc);
		fc_hold(fc, req.call_id, 0, false);
	} else if (!strcmp(cmd, "ping")) {
		memcpy(fc->ping, "pingpong", 8);
		pbrpc__wire_write_ping(&fc->w, PBRPC_FRAME_PING, fc->ping);
		fc_flush(fc);
		fc_hold(fc, req.call_id, 0, true);
	} else if (!strcmp(cmd, "drain")) {
		fc_goaway(fc, PBRPC_STATUS_OK, "");
		fc->draining = true;
		fc_hold(fc, req.call_id, tu_now_ms() + 50, false);
	} else if (!strcmp(cmd, "drain-hold")) {
		fc_goaway(fc, PBRPC_STATUS_OK, "");
		fc->draining = true;
		fc_hold(fc, req.call_id, tu_now_ms() + 300, false);
	} else if (!strcmp(cmd, "goaway-error")) {
		fc_goaway(fc, PBRPC_STATUS_UNAVAILABLE, "forced shutdown");
		fc->closing = true;
	} else if (m->fail_status) {
		fc_answer(fc, req.call_id, (int)m->fail_status, m->fail_message, NULL);
	} else if (m->delay_ms) {
		fc_hold(fc, req.call_id, tu_now_ms() + m->delay_ms, false);
	} else {
		fc_answer(fc, req.call_id, 0, NULL, &m->payload);
	}
	demo__echo_request__free_unpacked(m, NULL);
}

static void fc_frame(fconn *fc, const pbrpc__frame *f)
{
	fake *fs = fc->fs;
	if (pbrpc__wire_check_header(&f->hdr) < 0) {
		pthread_mutex_lock(&fs->mu);
		fs->bad_frames++;
		pthread_mutex_unlock(&fs->mu);
		fc->closing = true;
		return;
	}
	switch (f->hdr.type) {
	case PBRPC_FRAME_REQUEST:
		fc_request(fc, f);
		break;
	case PBRPC_FRAME_CANCEL:
		pthread_mutex_lock(&fs->mu);
		if (fs->cancels < MAX_IDS)
			fs->cancel_ids[fs->cancels] = f->hdr.stream;
		fs->cancels++;
		pthread_mutex_unlock(&fs->mu);
		if (fc_unhold(fc, f->hdr.stream))
			fc_answer(fc, f->hdr.stream, PBRPC_STATUS_CANCELLED, "cancelled", NULL);
		break;
	case PBRPC_FRAME_PONG:
		if (memcmp(f->payload, fc->ping, 8) == 0) {
			pthread_mutex_lock(&fs->mu);
			fs->pongs_ok++;
			pthread_mutex_unlock(&fs->mu);
			for (int i = 0; i < fc->nheld; i++) {
				if (fc->held[i].ping) {
					uint32_t id = fc->held[i].id;
					fc_unhold(fc, id);
					ProtobufCBinaryData p = { 4, (uint8_t *)"pong" };
					fc_answer(fc, id, 0, NULL, &p);
					break;
				}
			}
		}
		break;
	case PBRPC_FRAME_GOAWAY: {
		int st;
		const char *m;
		size_t ml;
		pthread_mutex_lock(&fs->mu);
		fs->goaways++;
		if (pbrpc__wire_read_goaway(f, &st, &m, &ml) == 0)
			fs->goaway_status = st;
		pthread_mutex_unlock(&fs->mu);
		fc->closing = true;
		break;
	}
	default:
		break;
	}
}

/* Serves requests until EOF, an error, the end of a drain or a stop. */
static void fc_loop(fconn *fc)
{
	fake *fs = fc->fs;
	while (!atomic_load(&fs->stop) && !fc->closing) {
		int64_t now = tu_now_ms();
		for (int i = 0; i < fc->nheld; i++) {
			held *h = &fc->held[i];
			if (h->due && h->due <= now) {
				uint32_t id = h->id;
				fc_unhold(fc, id);
				i--;
				ProtobufCBinaryData p = { 2, (uint8_t *)"ok" };
				fc_answer(fc, id, 0, NULL, &p);
			}
		}
		if (fc->draining && fc->nheld == 0)
			break;
		pbrpc__frame f;
		int r;
		while (!fc->closing && (r = pbrpc__frame_decoder_next(&fc->d, &f)) > 0)
			fc_frame(fc, &f);
		if (r < 0 || fc->closing)
			break;
		struct pollfd p = { .fd = fc->fd, .events = POLLIN };
		if (poll(&p, 1, 5) <= 0)
			continue;
		if (pbrpc__frame_decoder_recv(&fc->d, fc->fd, MSG_DONTWAIT) < 0)
			break;
	}
}

static void *fake_conn_main(void *arg)
{
	fconn *fc = arg;
	fake *fs = fc->fs;
	int fd = fc->fd;
	pbrpc__frame_writer_init(&fc->w);
	pbrpc__frame_decoder_init(&fc->d, 0);

	if (fs->cfg.bad_preface) {
		static const char junk[] = "HTTP/1.1 400 Bad Request\r\n\r\n";
		send(fd, junk, sizeof(junk) - 1, MSG_NOSIGNAL);
		goto out;
	}
	if (fs->cfg.goaway_hello) {
		pbrpc__frame_writer_append_raw(&fc->w, PBRPC_WIRE_PREFACE, PBRPC_WIRE_PREFACE_SIZE);
		pbrpc__wire_write_goaway(&fc->w, PBRPC_STATUS_RESOURCE_EXHAUSTED, "too many connections");
		fc_flush(fc);
		goto out;
	}
	pbrpc_hello h = {
		.version = fs->cfg.version ? fs->cfg.version : 1,
		.max_frame = fs->cfg.max_frame,
		.max_calls = fs->cfg.max_calls,
	};
	snprintf(h.agent, sizeof(h.agent), "fake/1");
	pbrpc__wire_write_preface(&fc->w, &h);
	fc_flush(fc);

	uint8_t pre[PBRPC_WIRE_PREFACE_SIZE];
	size_t got = 0;
	while (got < sizeof(pre)) {
		ssize_t n = recv(fd, pre + got, sizeof(pre) - got, 0);
		if (n <= 0)
			goto out;
		got += (size_t)n;
	}
	if (memcmp(pre, PBRPC_WIRE_PREFACE, sizeof(pre)) != 0)
		goto out;
	pbrpc__frame f;
	if (pbrpc__frame_read(&fc->d, fd, &f, 2000) != 1)
		goto out;
	pthread_mutex_lock(&fs->mu);
	pbrpc__wire_read_hello(&f, &fs->client_hello);
	pthread_mutex_unlock(&fs->mu);
	if (fs->cfg.version > 1) {
		/* The client should say why it leaves: GOAWAY(FAILED_PRECONDITION). */
		if (pbrpc__frame_read(&fc->d, fd, &f, 2000) == 1)
			fc_frame(fc, &f);
		goto out;
	}
	fc_loop(fc);
out:
	shutdown(fd, SHUT_RDWR);
	pbrpc__frame_writer_fini(&fc->w);
	pbrpc__frame_decoder_fini(&fc->d);
	free(fc);
	return NULL;
}

static void *fake_accept_main(void *arg)
{
	fake *fs = arg;
	for (;;) {
		int fd = accept4(fs->lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (atomic_load(&fs->stop)) {
			close(fd);
			break;
		}
		pthread_mutex_lock(&fs->mu);
		int i = fs->conns++;
		pthread_mutex_unlock(&fs->mu);
		if (i >= MAX_CONNS) {
			close(fd);
			continue;
		}
		fconn *fc = calloc(1, sizeof(*fc));
		fc->fs = fs;
		fc->fd = fd;
		fs->fds[i] = fd;
		pthread_create(&fs->threads[i], NULL, fake_conn_main, fc);
	}
	return NULL;
}

static void fake_listen(fake *fs)
{
	fs->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	cr_assert(fs->lfd >= 0);
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", fs->path);
	cr_assert(bind(fs->lfd, (struct sockaddr *)&sa, sizeof(sa)) == 0, "bind %s: %s", fs->path, strerror(errno));
	cr_assert(listen(fs->lfd, 64) == 0);
	pthread_create(&fs->acceptor, NULL, fake_accept_main, fs);
	fs->accepting = true;
}

/* Prepares a fake server on a fresh path; listens unless `later`. */
static fake *fake_new(const fake_cfg *cfg, bool later)
{
	fake *fs = calloc(1, sizeof(*fs));
	if (cfg)
		fs->cfg = *cfg;
	fs->lfd = -1;
	pthread_mutex_init(&fs->mu, NULL);
	const char *tmp = getenv("TMPDIR");
	if (!tmp || strlen(tmp) > 40)
		tmp = "/tmp";
	snprintf(fs->dir, sizeof(fs->dir), "%s/pbrpc-client-XXXXXX", tmp);
	cr_assert(mkdtemp(fs->dir) != NULL);
	snprintf(fs->path, sizeof(fs->path), "%s/s", fs->dir);
	snprintf(fs->endpoint, sizeof(fs->endpoint), "unix:%s", fs->path);
	if (!later)
		fake_listen(fs);
	return fs;
}

static void fake_free(fake *fs)
{
	atomic_store(&fs->stop, true);
	if (fs->accepting) {
		shutdown(fs->lfd, SHUT_RDWR);
		pthread_join(fs->acceptor, NULL);
	}
	int n = fs->conns < MAX_CONNS ? fs->conns : MAX_CONNS;
	for (int i = 0; i < n; i++) {
		pthread_join(fs->threads[i], NULL);
		close(fs->fds[i]);
	}
	if (fs->lfd >= 0)
		close(fs->lfd);
	unlink(fs->path);
	rmdir(fs->dir);
	free(fs);
}

static int fake_get(fake *fs, const int *field)
{
	pthread_mutex_lock(&fs->mu);
	int v = *field;
	pthread_mutex_unlock(&fs->mu);
	return v;
}

/* Waits up to 2 s for *field to reach want. */
static int fake_wait(fake *fs, const int *field, int want)
{
	int64_t end = tu_now_ms() + 2000;
	int v;
	while ((v = fake_get(fs, field)) < want && tu_now_ms() < end)
		usleep(1000);
	return v;
}

/* ---- client helpers ---- */

typedef struct result {
	bool ran;
	int status;
	char msg[256];
	char payload[64];
	int order;
} result;

static atomic_int closure_seq;

static void on_reply(const Demo__EchoReply *reply, void *data)
{
	result *r = data;
	const char *m;
	r->ran = true;
	r->status = pbrpc_client_status(&m);
	snprintf(r->msg, sizeof(r->msg), "%s", m);
	r->payload[0] = '\0';
	if (reply)
		snprintf(r->payload, sizeof(r->payload), "%.*s", (int)reply->payload.len, (const char *)reply->payload.data);
	r->order = atomic_fetch_add(&closure_seq, 1);
}

static void echo_req(Demo__EchoRequest *req, const char *payload)
{
	demo__echo_request__init(req);
	req->payload.data = (uint8_t *)payload;
	req->payload.len = strlen(payload);
}

static result echo(ProtobufCService *svc, const char *payload)
{
	Demo__EchoRequest req;
	echo_req(&req, payload);
	result r = { 0 };
	demo__echo__echo(svc, &req, on_reply, &r);
	return r;
}

static pbrpc_client *connect_ok(fake *fs, const pbrpc_client_opts *opts)
{
	pbrpc_client *c = NULL;
	int rc = pbrpc_client_connect(&c, fs->endpoint, opts);
	cr_assert_eq(rc, 0, "connect: %s", pbrpc_strerror(rc));
	cr_assert_not_null(c);
	return c;
}

static int64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

TestSuite(client, .init = tu_setup, .timeout = 30);

/* ---- basics ---- */

Test(client, sync_roundtrip)
{
	fake *fs = fake_new(&(fake_cfg){ .max_frame = 1 << 20, .max_calls = 77 }, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	cr_assert_not_null(svc);
	cr_assert_eq(pbrpc_client_service(c, &demo__echo__descriptor), svc, "services are cached");

	result r = echo(svc, "hello");
	cr_assert(r.ran);
	cr_assert_eq(r.status, PBRPC_STATUS_OK, "status %d: %s", r.status, r.msg);
	cr_assert_str_eq(r.payload, "hello");
	const char *m;
	cr_assert_eq(pbrpc_client_status(&m), PBRPC_STATUS_OK);
	cr_assert_neq(pbrpc_client_last_call(), 0);

	pbrpc_hello h;
	pbrpc_client_server_hello(c, &h);
	cr_assert_eq(h.version, 1);
	cr_assert_eq(h.max_frame, 1u << 20);
	cr_assert_eq(h.max_calls, 77);
	cr_assert_str_eq(h.agent, "fake/1");

	pthread_mutex_lock(&fs->mu);
	cr_assert_eq(fs->client_hello.version, 1);
	cr_assert_eq(fs->client_hello.max_calls, 0);
	cr_assert_eq(fs->client_hello.max_frame, PBRPC_MAX_FRAME_DEFAULT);
	cr_assert_str_eq(fs->client_hello.agent, "pbrpc-c/" PBRPC_VERSION);
	cr_assert(fs->last_has_timeout, "the default 30 s timeout is sent");
	cr_assert(fs->last_timeout_us > 29000000 && fs->last_timeout_us <= 30000000, "timeout_us %llu",
		  (unsigned long long)fs->last_timeout_us);
	pthread_mutex_unlock(&fs->mu);

	protobuf_c_service_destroy(svc); /* harmless */
	for (int i = 0; i < 100; i++) {
		char p[16];
		snprintf(p, sizeof(p), "n%d", i);
		r = echo(svc, p);
		cr_assert_str_eq(r.payload, p);
	}
	cr_assert_eq(fake_get(fs, &fs->conns), 1);
	pbrpc_client_free(c);
	fake_free(fs);
}

Test(client, status_propagation)
{
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);

	Demo__EchoRequest req;
	echo_req(&req, "x");
	req.fail_status = PBRPC_STATUS_NOT_FOUND;
	req.fail_message = "no such key";
	result r = { 0 };
	demo__echo__echo(svc, &req, on_reply, &r);
	cr_assert(r.ran);
	cr_assert_eq(r.status, PBRPC_STATUS_NOT_FOUND);
	cr_assert_str_eq(r.msg, "no such key");
	cr_assert_str_eq(r.payload, "", "closure got NULL");
	const char *m;
	cr_assert_eq(pbrpc_client_status(&m), PBRPC_STATUS_NOT_FOUND, "status after the stub returns");
	cr_assert_str_eq(m, "no such key");

	req.fail_status = 99;
	req.fail_message = "odd";
	demo__echo__echo(svc, &req, on_reply, &r);
	cr_assert_eq(r.status, PBRPC_STATUS_UNKNOWN, "statuses above 16 map to UNKNOWN");
	cr_assert_str_eq(r.msg, "odd");

	r = echo(svc, "badbody");
	cr_assert_eq(r.status, PBRPC_STATUS_INTERNAL);
	cr_assert_str_eq(r.msg, "reply is not a valid demo.EchoReply");

	r = echo(svc, "fine");
	cr_assert_eq(r.status, PBRPC_STATUS_OK);
	cr_assert_str_eq(r.payload, "fine");
	pbrpc_client_free(c);
	fake_free(fs);
}

static void nested_cb(const Demo__EchoReply *reply, void *data)
{
	ProtobufCService *svc = data;
	(void)reply;
	/* A closure may call again; the outer status survives it. */
	result r = echo(svc, "inner");
	cr_assert_str_eq(r.payload, "inner");
	Demo__EchoRequest req;
	echo_req(&req, "x");
	req.fail_status = PBRPC_STATUS_ABORTED;
	demo__echo__echo(svc, &req, on_reply, &r);
	cr_assert_eq(r.status, PBRPC_STATUS_ABORTED);
}

Test(client, nested_call_in_closure)
{
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	Demo__EchoRequest req;
	echo_req(&req, "outer");
	req.fail_status = PBRPC_STATUS_NOT_FOUND;
	req.fail_message = "outer status";
	demo__echo__echo(svc, &req, (Demo__EchoReply_Closure)nested_cb, svc);
	const char *m;
	cr_assert_eq(pbrpc_client_status(&m), PBRPC_STATUS_NOT_FOUND);
	cr_assert_str_eq(m, "outer status");
	pbrpc_client_free(c);
	fake_free(fs);
}

static void nested_fail_cb(const Demo__EchoReply *reply, void *data)
{
	ProtobufCService *svc = data;
	cr_assert_not_null(reply);
	Demo__EchoRequest req;
	echo_req(&req, "x");
	req.fail_status = PBRPC_STATUS_ABORTED;
	req.fail_message = "inner failed";
	result r = { 0 };
	demo__echo__echo(svc, &req, on_reply, &r);
	cr_assert_eq(r.status, PBRPC_STATUS_ABORTED);
	cr_assert_str_eq(r.msg, "inner failed");
}

Test(client, nested_call_keeps_outer_ok_status)
{
	/* The outer call succeeded (no message to save): a failing call made by
	 * its closure must not leave its status or message behind. */
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	Demo__EchoRequest req;
	echo_req(&req, "outer");
	demo__echo__echo(svc, &req, (Demo__EchoReply_Closure)nested_fail_cb, svc);
	const char *m = NULL;
	cr_assert_eq(pbrpc_client_status(&m), PBRPC_STATUS_OK);
	cr_assert_str_eq(m, "");
	pbrpc_client_free(c);
	fake_free(fs);
}

Test(client, metadata_and_explicit_calls)
{
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, &(pbrpc_client_opts){ .call_timeout_ms = -1 });

	pbrpc_metadata md = { .key = "x-test", .value = "v1", .value_len = 2 };
	Demo__EchoRequest req;
	echo_req(&req, "explicit");
	ProtobufCMessage *reply = NULL;
	pbrpc_call_result res;
	int rc = pbrpc_client_call(c, "demo.Echo/Echo", &req.base, &demo__echo_reply__descriptor, &reply,
				   &(pbrpc_call_opts){ .metadata = &md, .metadata_count = 1 }, &res);
	cr_assert_eq(rc, 0, "%s: %s", pbrpc_strerror(rc), res.message);
	cr_assert_eq(res.status, PBRPC_STATUS_OK);
	Demo__EchoReply *er = (Demo__EchoReply *)reply;
	cr_assert_eq(er->payload.len, 8);
	cr_assert(memcmp(er->payload.data, "explicit", 8) == 0);
	protobuf_c_message_free_unpacked(reply, NULL);
	pthread_mutex_lock(&fs->mu);
	cr_assert_str_eq(fs->last_md, "v1");
	cr_assert(!fs->last_has_timeout, "call_timeout_ms < 0 sends no timeout");
	pthread_mutex_unlock(&fs->mu);

	uint8_t buf[64];
	size_t n = demo__echo_request__pack(&req, buf);
	uint8_t *raw = NULL;
	size_t raw_len = 0;
	rc = pbrpc_client_call_raw(c, "demo.Echo/Echo", buf, n, &raw, &raw_len, NULL, &res);
	cr_assert_eq(rc, 0);
	Demo__EchoReply *er2 = demo__echo_reply__unpack(NULL, raw_len, raw);
	cr_assert_not_null(er2);
	cr_assert_eq(er2->payload.len, 8);
	demo__echo_reply__free_unpacked(er2, NULL);
	free(raw);

	req.fail_status = PBRPC_STATUS_PERMISSION_DENIED;
	req.fail_message = "nope";
	rc = pbrpc_client_call(c, "demo.Echo/Echo", &req.base, &demo__echo_reply__descriptor, &reply, NULL, &res);
	cr_assert_eq(rc, PBRPC_ESTATUS);
	cr_assert_null(reply);
	cr_assert_eq(res.status, PBRPC_STATUS_PERMISSION_DENIED);
	cr_assert_str_eq(res.message, "nope");

	rc = pbrpc_client_call(c, "demo.Echo/Nope", &req.base, &demo__echo_reply__descriptor, &reply, NULL, &res);
	cr_assert_eq(rc, PBRPC_ESTATUS);
	cr_assert_eq(res.status, PBRPC_STATUS_UNIMPLEMENTED);

	rc = pbrpc_client_call(c, "not a method", &req.base, &demo__echo_reply__descriptor, &reply, NULL, &res);
	cr_assert_eq(rc, PBRPC_EINVALID);
	cr_assert_eq(res.status, PBRPC_STATUS_INVALID_ARGUMENT);

	echo_req(&req, "badbody");
	rc = pbrpc_client_call(c, "demo.Echo/Echo", &req.base, &demo__echo_reply__descriptor, &reply, NULL, &res);
	cr_assert_eq(rc, PBRPC_EDECODE);
	cr_assert_eq(res.status, PBRPC_STATUS_INTERNAL);

	echo_req(&req, "never");
	int64_t t0 = tu_now_ms();
	rc = pbrpc_client_call(c, "demo.Echo/Echo", &req.base, &demo__echo_reply__descriptor, &reply,
			       &(pbrpc_call_opts){ .timeout_ms = 100 }, &res);
	cr_assert_eq(rc, -ETIMEDOUT);
	cr_assert_eq(res.status, PBRPC_STATUS_DEADLINE_EXCEEDED);
	cr_assert(tu_now_ms() - t0 >= 95);
	pbrpc_client_free(c);
	fake_free(fs);
}

/* ---- deadlines ---- */

Test(client, deadline_exceeded_keeps_id_until_response)
{
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);

	pbrpc_client_next_call(&(pbrpc_call_opts){ .timeout_ms = 150 });
	int64_t t0 = tu_now_ms();
	result r = echo(svc, "never");
	int64_t el = tu_now_ms() - t0;
	uint32_t id = pbrpc_client_last_call();
	cr_assert(r.ran);
	cr_assert_eq(r.status, PBRPC_STATUS_DEADLINE_EXCEEDED, "%d %s", r.status, r.msg);
	cr_assert(el >= 145 && el < 1000, "took %lld ms", (long long)el);
	pthread_mutex_lock(&fs->mu);
	cr_assert(fs->last_timeout_us > 100000 && fs->last_timeout_us <= 150000);
	pthread_mutex_unlock(&fs->mu);

	/* The CANCEL reaches the server, which answers CANCELLED for the id; the
	 * client drops that late answer without complaint. */
	cr_assert_eq(fake_wait(fs, &fs->cancels, 1), 1);
	cr_assert_eq(fs->cancel_ids[0], id);
	for (int i = 0; i < 20; i++) {
		r = echo(svc, "after");
		cr_assert_eq(r.status, PBRPC_STATUS_OK, "%s", r.msg);
		cr_assert_neq(pbrpc_client_last_call(), id);
	}
	cr_assert_eq(fake_get(fs, &fs->goaways), 0);
	cr_assert_eq(fake_get(fs, &fs->conns), 1);
	cr_assert_eq(fake_get(fs, &fs->dup_ids), 0);
	pbrpc_client_free(c);
	fake_free(fs);
}

Test(client, expired_deadline_sends_nothing)
{
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	ProtobufCService *asvc = pbrpc_client_service_async(c, &demo__echo__descriptor);

	pbrpc_client_next_call(&(pbrpc_call_opts){ .deadline_ns = mono_ns() - 1000000 });
	result r = echo(svc, "x");
	cr_assert_eq(r.status, PBRPC_STATUS_DEADLINE_EXCEEDED);

	Demo__EchoRequest req;
	echo_req(&req, "y");
	result ar = { 0 };
	pbrpc_client_next_call(&(pbrpc_call_opts){ .deadline_ns = 1 });
	demo__echo__echo(asvc, &req, on_reply, &ar);
	cr_assert(!ar.ran, "async closures never run inside the stub");
	cr_assert_eq(pbrpc_client_drain(c, 1000), 0);
	cr_assert_eq(ar.status, PBRPC_STATUS_DEADLINE_EXCEEDED);

	usleep(50000);
	cr_assert_eq(fake_get(fs, &fs->requests), 0, "no REQUEST was sent");
	r = echo(svc, "now");
	cr_assert_eq(r.status, PBRPC_STATUS_OK);
	cr_assert_eq(fake_get(fs, &fs->requests), 1);
	pbrpc_client_free(c);
	fake_free(fs);
}

Test(client, async_deadline)
{
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *asvc = pbrpc_client_service_async(c, &demo__echo__descriptor);
	Demo__EchoRequest req;
	echo_req(&req, "never");
	result r = { 0 };
	pbrpc_client_next_call(&(pbrpc_call_opts){ .timeout_ms = 100 });
	demo__echo__echo(asvc, &req, on_reply, &r);
	cr_assert_eq(pbrpc_client_pending(c), 1);
	int64_t t0 = tu_now_ms();
	cr_assert_eq(pbrpc_client_process(c, -1), 1);
	cr_assert(tu_now_ms() - t0 >= 90);
	cr_assert_eq(r.status, PBRPC_STATUS_DEADLINE_EXCEEDED);
	cr_assert_eq(pbrpc_client_pending(c), 0);
	cr_assert_eq(fake_wait(fs, &fs->cancels, 1), 1);
	pbrpc_client_free(c);
	fake_free(fs);
}

/* ---- limits ---- */

Test(client, request_above_server_max_frame)
{
	fake *fs = fake_new(&(fake_cfg){ .max_frame = 64 }, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	char big[101];
	memset(big, 'b', 100);
	big[100] = '\0';
	result r = echo(svc, big);
	cr_assert_eq(r.status, PBRPC_STATUS_RESOURCE_EXHAUSTED);
	cr_assert(strstr(r.msg, "server accepts at most 64") != NULL, "%s", r.msg);
	cr_assert(strncmp(r.msg, "request is ", 11) == 0, "%s", r.msg);
	r = echo(svc, "small");
	cr_assert_eq(r.status, PBRPC_STATUS_OK);
	cr_assert_eq(fake_get(fs, &fs->requests), 1, "the big request was never sent");
	pbrpc_client_free(c);
	fake_free(fs);
}

Test(client, max_calls)
{
	fake *fs = fake_new(&(fake_cfg){ .max_calls = 2 }, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	ProtobufCService *asvc = pbrpc_client_service_async(c, &demo__echo__descriptor);
	Demo__EchoRequest req;
	echo_req(&req, "slow");
	req.delay_ms = 200;
	result a[3] = { 0 };
	for (int i = 0; i < 3; i++)
		demo__echo__echo(asvc, &req, on_reply, &a[i]);
	/* The third async call fails at once; a sync call waits for a slot. */
	int64_t t0 = tu_now_ms();
	result r = echo(svc, "sync");
	cr_assert_eq(r.status, PBRPC_STATUS_OK, "%s", r.msg);
	cr_assert(tu_now_ms() - t0 >= 150, "waited for a slot");
	cr_assert_eq(pbrpc_client_drain(c, 2000), 0);
	cr_assert_eq(a[0].status, PBRPC_STATUS_OK);
	cr_assert_eq(a[1].status, PBRPC_STATUS_OK);
	cr_assert_eq(a[2].status, PBRPC_STATUS_RESOURCE_EXHAUSTED);
	cr_assert(strstr(a[2].msg, "at most 2") != NULL, "%s", a[2].msg);
	pbrpc_client_free(c);
	fake_free(fs);
}

/* ---- async ---- */

#define NASYNC 1000

Test(client, async_many_reverse_order)
{
	int n = (int)tu_scale(NASYNC);
	fake *fs = fake_new(&(fake_cfg){ .reverse_batch = n, .max_calls = 4096 }, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *asvc = pbrpc_client_service_async(c, &demo__echo__descriptor);
	result *res = calloc((size_t)n, sizeof(*res));
	char (*payloads)[16] = calloc((size_t)n, 16);
	atomic_store(&closure_seq, 0);
	for (int i = 0; i < n; i++) {
		snprintf(payloads[i], 16, "m%d", i);
		Demo__EchoRequest req;
		echo_req(&req, payloads[i]);
		demo__echo__echo(asvc, &req, on_reply, &res[i]);
		cr_assert_neq(pbrpc_client_last_call(), 0);
	}
	cr_assert_eq(pbrpc_client_pending(c), (size_t)n);
	cr_assert_eq(pbrpc_client_drain(c, 20000), 0);
	for (int i = 0; i < n; i++) {
		cr_assert(res[i].ran);
		cr_assert_eq(res[i].status, PBRPC_STATUS_OK, "%d: %s", i, res[i].msg);
		cr_assert_str_eq(res[i].payload, payloads[i]);
		cr_assert_eq(res[i].order, n - 1 - i, "answered in reverse");
	}
	free(res);
	free(payloads);
	pbrpc_client_free(c);
	fake_free(fs);
}

Test(client, cancel_async)
{
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *asvc = pbrpc_client_service_async(c, &demo__echo__descriptor);
	Demo__EchoRequest req;
	echo_req(&req, "never");
	result r = { 0 };
	demo__echo__echo(asvc, &req, on_reply, &r);
	uint32_t id = pbrpc_client_last_call();
	cr_assert_neq(id, 0);
	cr_assert_eq(pbrpc_client_cancel(c, id), 0);
	cr_assert_eq(pbrpc_client_cancel(c, id), PBRPC_EINVALID);
	cr_assert_eq(pbrpc_client_process(c, 1000), 1);
	cr_assert_eq(r.status, PBRPC_STATUS_CANCELLED);
	cr_assert_eq(fake_wait(fs, &fs->cancels, 1), 1);
	cr_assert_eq(fs->cancel_ids[0], id);
	cr_assert_eq(pbrpc_client_cancel(c, 12345), PBRPC_EINVALID);
	/* The server's late CANCELLED answer is dropped; the connection lives. */
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	result s = echo(svc, "alive");
	cr_assert_eq(s.status, PBRPC_STATUS_OK);
	cr_assert_eq(pbrpc_client_pending(c), 0);
	cr_assert_eq(fake_get(fs, &fs->goaways), 0);
	pbrpc_client_free(c);
	fake_free(fs);
}

Test(client, poll_fd)
{
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *asvc = pbrpc_client_service_async(c, &demo__echo__descriptor);
	int fd = pbrpc_client_fd(c);
	cr_assert(fd >= 0);
	Demo__EchoRequest req;
	echo_req(&req, "polled");
	result r = { 0 };
	demo__echo__echo(asvc, &req, on_reply, &r);
	int ran = 0;
	int64_t end = tu_now_ms() + 2000;
	while (!ran && tu_now_ms() < end) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		cr_assert(poll(&p, 1, 2000) >= 0);
		ran += pbrpc_client_process(c, 0);
	}
	cr_assert_eq(ran, 1);
	cr_assert_str_eq(r.payload, "polled");
	pbrpc_client_free(c);
	fake_free(fs);
}

typedef struct io_ctx {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int done;
	pthread_t thread;
	bool other_thread;
} io_ctx;

static void on_io_reply(const Demo__EchoReply *reply, void *data)
{
	io_ctx *x = data;
	pthread_mutex_lock(&x->mu);
	x->other_thread = !pthread_equal(pthread_self(), x->thread) && reply != NULL;
	x->done++;
	pthread_cond_signal(&x->cv);
	pthread_mutex_unlock(&x->mu);
}

Test(client, io_thread)
{
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, &(pbrpc_client_opts){ .io_thread = true });
	ProtobufCService *asvc = pbrpc_client_service_async(c, &demo__echo__descriptor);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	io_ctx x = { .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER, .thread = pthread_self() };
	Demo__EchoRequest req;
	echo_req(&req, "io");
	for (int i = 0; i < 10; i++) {
		demo__echo__echo(asvc, &req, on_io_reply, &x);
		result r = echo(svc, "sync too");
		cr_assert_eq(r.status, PBRPC_STATUS_OK);
	}
	pthread_mutex_lock(&x.mu);
	while (x.done < 10)
		pthread_cond_wait(&x.cv, &x.mu);
	pthread_mutex_unlock(&x.mu);
	cr_assert(x.other_thread);
	pbrpc_client_free(c);
	fake_free(fs);
}

Test(client, free_cancels_in_flight)
{
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *asvc = pbrpc_client_service_async(c, &demo__echo__descriptor);
	Demo__EchoRequest req;
	echo_req(&req, "never");
	result r[3] = { 0 };
	for (int i = 0; i < 3; i++)
		demo__echo__echo(asvc, &req, on_reply, &r[i]);
	pbrpc_client_free(c);
	for (int i = 0; i < 3; i++) {
		cr_assert(r[i].ran);
		cr_assert_eq(r[i].status, PBRPC_STATUS_CANCELLED);
	}
	fake_free(fs);
}

/* ---- threads ---- */

#define NTHREADS 8
#define NCALLS 200

typedef struct thr_arg {
	ProtobufCService *svc;
	int idx;
	int failures;
} thr_arg;

static void *thr_main(void *p)
{
	thr_arg *a = p;
	int n = (int)tu_scale(NCALLS);
	for (int i = 0; i < n; i++) {
		char pl[32];
		snprintf(pl, sizeof(pl), "t%d-%d", a->idx, i);
		Demo__EchoRequest req;
		echo_req(&req, pl);
		if (i % 7 == 3)
			req.delay_ms = 1; /* answered out of order */
		result r = { 0 };
		demo__echo__echo(a->svc, &req, on_reply, &r);
		if (!r.ran || r.status != PBRPC_STATUS_OK || strcmp(r.payload, req.delay_ms ? "ok" : pl) != 0)
			a->failures++;
	}
	return NULL;
}

Test(client, threads_sync)
{
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	pthread_t t[NTHREADS];
	thr_arg a[NTHREADS];
	for (int i = 0; i < NTHREADS; i++) {
		a[i] = (thr_arg){ .svc = svc, .idx = i };
		pthread_create(&t[i], NULL, thr_main, &a[i]);
	}
	for (int i = 0; i < NTHREADS; i++) {
		pthread_join(t[i], NULL);
		cr_assert_eq(a[i].failures, 0, "thread %d", i);
	}
	cr_assert_eq(fake_get(fs, &fs->conns), 1);
	cr_assert_eq(fake_get(fs, &fs->dup_ids), 0);
	pbrpc_client_free(c);
	fake_free(fs);
}

/* ---- connection faults ---- */

Test(client, server_closes_mid_call_then_reconnect)
{
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	result r = echo(svc, "close");
	cr_assert_eq(r.status, PBRPC_STATUS_UNAVAILABLE);
	cr_assert_str_eq(r.msg, "connection closed by server");
	r = echo(svc, "again");
	cr_assert_eq(r.status, PBRPC_STATUS_OK, "%s", r.msg);
	cr_assert_str_eq(r.payload, "again");
	cr_assert_eq(fake_get(fs, &fs->conns), 2);
	pbrpc_client_free(c);
	fake_free(fs);
}

Test(client, write_to_closed_connection_retries)
{
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	ProtobufCService *asvc = pbrpc_client_service_async(c, &demo__echo__descriptor);
	Demo__EchoRequest req;
	echo_req(&req, "close");
	result a = { 0 };
	demo__echo__echo(asvc, &req, on_reply, &a);
	usleep(100000); /* closed by the server, not noticed by the client yet */
	/* The write fails, so the server never saw the request: it is retried. */
	result r = echo(svc, "retried");
	cr_assert_eq(r.status, PBRPC_STATUS_OK, "%d %s", r.status, r.msg);
	cr_assert_str_eq(r.payload, "retried");
	cr_assert_eq(fake_get(fs, &fs->conns), 2);
	cr_assert_eq(pbrpc_client_drain(c, 1000), 0);
	cr_assert_eq(a.status, PBRPC_STATUS_UNAVAILABLE);
	pbrpc_client_free(c);
	fake_free(fs);
}

Test(client, goaway_error_fails_calls)
{
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	result r = echo(svc, "goaway-error");
	cr_assert_eq(r.status, PBRPC_STATUS_UNAVAILABLE);
	cr_assert_str_eq(r.msg, "server sent GOAWAY: UNAVAILABLE: forced shutdown");
	r = echo(svc, "again");
	cr_assert_eq(r.status, PBRPC_STATUS_OK, "%s", r.msg);
	pbrpc_client_free(c);
	fake_free(fs);
}

Test(client, drain_moves_to_new_connection)
{
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	result r = echo(svc, "drain");
	cr_assert_eq(r.status, PBRPC_STATUS_OK, "%s", r.msg);
	r = echo(svc, "next");
	cr_assert_eq(r.status, PBRPC_STATUS_OK, "%s", r.msg);
	cr_assert_eq(fake_get(fs, &fs->conns), 2);
	pbrpc_client_free(c);
	fake_free(fs);
}

Test(client, drain_retries_unseen_call)
{
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	ProtobufCService *asvc = pbrpc_client_service_async(c, &demo__echo__descriptor);
	Demo__EchoRequest req;
	echo_req(&req, "drain-hold");
	result a = { 0 };
	demo__echo__echo(asvc, &req, on_reply, &a);
	usleep(100000); /* the GOAWAY is sent but not read yet */
	result r = echo(svc, "late");
	cr_assert_eq(r.status, PBRPC_STATUS_OK, "%s", r.msg);
	cr_assert_str_eq(r.payload, "late");
	cr_assert_eq(fake_get(fs, &fs->conns), 2);
	cr_assert_eq(pbrpc_client_drain(c, 2000), 0);
	cr_assert_eq(a.status, PBRPC_STATUS_OK, "%s", a.msg);
	pbrpc_client_free(c);
	fake_free(fs);
}

Test(client, ping_answered)
{
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	result r = echo(svc, "ping");
	cr_assert_eq(r.status, PBRPC_STATUS_OK, "%s", r.msg);
	cr_assert_str_eq(r.payload, "pong");
	cr_assert_eq(fake_get(fs, &fs->pongs_ok), 1);
	pbrpc_client_free(c);
	fake_free(fs);
}

Test(client, protocol_errors_close_with_goaway)
{
	const char *cmds[] = { "badframe", "unknown-id" };
	for (int i = 0; i < 2; i++) {
		fake *fs = fake_new(NULL, false);
		pbrpc_client *c = connect_ok(fs, NULL);
		ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
		result r = echo(svc, cmds[i]);
		cr_assert_eq(r.status, PBRPC_STATUS_UNAVAILABLE, "%s: %d", cmds[i], r.status);
		cr_assert(strstr(r.msg, "protocol error") != NULL, "%s", r.msg);
		cr_assert_eq(fake_wait(fs, &fs->goaways, 1), 1);
		cr_assert_eq(fs->goaway_status, PBRPC_STATUS_INVALID_ARGUMENT);
		r = echo(svc, "recovered");
		cr_assert_eq(r.status, PBRPC_STATUS_OK, "%s", r.msg);
		pbrpc_client_free(c);
		fake_free(fs);
	}
}

/* ---- handshake ---- */

Test(client, bad_preface)
{
	fake *fs = fake_new(&(fake_cfg){ .bad_preface = true }, false);
	pbrpc_client *c = (pbrpc_client *)1;
	cr_assert_eq(pbrpc_client_connect(&c, fs->endpoint, NULL), PBRPC_EBADMAGIC);
	cr_assert_null(c);
	fake_free(fs);
}

Test(client, wrong_version)
{
	fake *fs = fake_new(&(fake_cfg){ .version = 2 }, false);
	pbrpc_client *c = (pbrpc_client *)1;
	cr_assert_eq(pbrpc_client_connect(&c, fs->endpoint, NULL), PBRPC_EVERSION);
	cr_assert_null(c);
	cr_assert_eq(fake_wait(fs, &fs->goaways, 1), 1);
	cr_assert_eq(fs->goaway_status, PBRPC_STATUS_FAILED_PRECONDITION);
	fake_free(fs);
}

Test(client, goaway_instead_of_hello)
{
	fake *fs = fake_new(&(fake_cfg){ .goaway_hello = true }, false);
	pbrpc_client *c = NULL;
	cr_assert_eq(pbrpc_client_connect(&c, fs->endpoint, NULL), PBRPC_EGOAWAY);
	cr_assert_null(c);
	/* Lazy: the first call reports why. */
	cr_assert_eq(pbrpc_client_connect(&c, fs->endpoint, &(pbrpc_client_opts){ .lazy = true }), 0);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	pbrpc_client_next_call(&(pbrpc_call_opts){ .timeout_ms = 200 });
	result r = echo(svc, "x");
	cr_assert_eq(r.status, PBRPC_STATUS_UNAVAILABLE);
	cr_assert(strstr(r.msg, "too many connections") != NULL, "%s", r.msg);
	pbrpc_client_free(c);
	fake_free(fs);
}

Test(client, bad_endpoint)
{
	pbrpc_client *c = NULL;
	cr_assert_eq(pbrpc_client_connect(&c, "bogus:1", NULL), PBRPC_EADDRESS);
	cr_assert_null(c);
	cr_assert_eq(pbrpc_client_connect(&c, "unix:/nonexistent/dir/sock", NULL), -ENOENT);
	cr_assert_eq(pbrpc_client_connect(&c, "unix:/nonexistent/dir/sock", &(pbrpc_client_opts){ .lazy = true }), 0);
	pbrpc_client_free(c);
}

Test(client, call_before_server_listens)
{
	fake *fs = fake_new(NULL, true);
	pbrpc_client *c = NULL;
	cr_assert_eq(pbrpc_client_connect(&c, fs->endpoint,
					  &(pbrpc_client_opts){ .lazy = true, .backoff_min_ms = 20, .backoff_max_ms = 80 }),
		     0);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	ProtobufCService *asvc = pbrpc_client_service_async(c, &demo__echo__descriptor);

	Demo__EchoRequest req;
	echo_req(&req, "early");
	result a = { 0 };
	demo__echo__echo(asvc, &req, on_reply, &a);
	cr_assert_eq(pbrpc_client_process(c, 1000), 1);
	cr_assert_eq(a.status, PBRPC_STATUS_UNAVAILABLE);
	cr_assert(strstr(a.msg, "cannot connect") != NULL, "%s", a.msg);

	pbrpc_client_next_call(&(pbrpc_call_opts){ .timeout_ms = 200 });
	int64_t t0 = tu_now_ms();
	result r = echo(svc, "early sync");
	cr_assert_eq(r.status, PBRPC_STATUS_UNAVAILABLE, "%d %s", r.status, r.msg);
	cr_assert(tu_now_ms() - t0 >= 190, "a sync call retries until its deadline");

	fake_listen(fs);
	r = echo(svc, "late");
	cr_assert_eq(r.status, PBRPC_STATUS_OK, "%s", r.msg);
	cr_assert_str_eq(r.payload, "late");
	pbrpc_client_free(c);
	fake_free(fs);
}

/* ---- the fast path ---- */

#if HAVE_ALLOC_COUNT
typedef struct count_ctx {
	int ok;
} count_ctx;

static void on_count(const Demo__EchoReply *reply, void *data)
{
	count_ctx *x = data;
	if (reply && reply->payload.len == 5)
		x->ok++;
}
#endif

Test(client, sync_fast_path_allocates_nothing)
{
#if !HAVE_ALLOC_COUNT
	cr_skip_test("malloc belongs to the sanitizer");
#else
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	Demo__EchoRequest req;
	echo_req(&req, "hello");
	count_ctx x = { 0 };
	for (int i = 0; i < 10; i++)
		demo__echo__echo(svc, &req, on_count, &x);
	alloc_count = 0;
	alloc_counting = true;
	for (int i = 0; i < 1000; i++)
		demo__echo__echo(svc, &req, on_count, &x);
	alloc_counting = false;
	cr_assert_eq(x.ok, 1010);
	cr_assert_eq(alloc_count, 0, "%ld allocations in 1000 calls", alloc_count);
	/* The counter itself works (called through a pointer: the compiler
	 * assumes the builtin malloc touches no other memory). */
	void *(*volatile m)(size_t) = malloc;
	alloc_counting = true;
	void *p = m(16);
	alloc_counting = false;
	free(p);
	cr_assert_eq(alloc_count, 1, "counted %ld", alloc_count);
	pbrpc_client_free(c);
	fake_free(fs);
#endif
}

static void on_count_len(const Demo__EchoReply *reply, void *data)
{
	size_t *len = data;
	*len = reply ? reply->payload.len : 0;
}

/* n synchronous echoes of `size` bytes; returns the allocations they made
 * (0 under ASan, which owns malloc). */
static long count_big_echoes(ProtobufCService *svc, uint8_t *buf, size_t size, int n)
{
	Demo__EchoRequest req;
	demo__echo_request__init(&req);
	req.payload.data = buf;
	req.payload.len = size;
	size_t got = 0;
#if HAVE_ALLOC_COUNT
	alloc_count = 0;
	alloc_counting = true;
#endif
	for (int i = 0; i < n; i++) {
		got = 0;
		demo__echo__echo(svc, &req, on_count_len, &got);
		if (got != size)
			break;
	}
#if HAVE_ALLOC_COUNT
	alloc_counting = false;
#endif
	cr_assert_eq(got, size, "echo of %zu bytes: status %d", size, pbrpc_client_status(NULL));
#if HAVE_ALLOC_COUNT
	return alloc_count;
#else
	return 0;
#endif
}

/* Large messages: the decoder, writer and reply arena are kept while the
 * connection is busy (no allocation per call), and given back after a
 * second without large messages. Under ASan only the calls are checked. */
Test(client, sync_large_messages_allocate_nothing_while_busy)
{
	if (tu_short_io())
		cr_skip_test("megabytes in pieces of a few bytes take too long");
	fake *fs = fake_new(NULL, false);
	pbrpc_client *c = connect_ok(fs, NULL);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	size_t sizes[] = { 64u << 10, 1u << 20 };
	uint8_t *buf = calloc(1, 1u << 20);
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		count_big_echoes(svc, buf, sizes[i], 3); /* warm-up */
		/* A stall of over a second between two calls (a loaded machine)
		 * lets the client give its buffers back, which is right: a call
		 * that allocates every time fails all three tries. */
		long n = -1;
		for (int try = 0; try < 3 && n != 0; try++)
			n = count_big_echoes(svc, buf, sizes[i], 20);
		cr_assert_eq(n, 0, "%ld allocations in 20 calls of %zu bytes", n, sizes[i]);
	}
	/* Idle for over a second: the next call gives the large buffers back, so
	 * the one after it has to allocate again. */
	usleep(1100 * 1000);
	count_big_echoes(svc, buf, 32, 1);
	long n = count_big_echoes(svc, buf, 1u << 20, 1);
	if (HAVE_ALLOC_COUNT)
		cr_assert_gt(n, 0, "large buffers kept after an idle second");
	n = -1;
	for (int try = 0; try < 3 && n != 0; try++)
		n = count_big_echoes(svc, buf, 1u << 20, 5);
	cr_assert_eq(n, 0, "%ld allocations in 5 calls of 1 MiB after regrowing", n);
	free(buf);
	pbrpc_client_free(c);
	fake_free(fs);
}
