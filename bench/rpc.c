/* pbrpc under test: the library's server with a minimal demo.Echo handler,
 * driven by the library's client (system "pbrpc") or by a minimal client
 * written on the frame and wire layers alone (system "wire", a diagnostic: it
 * shows what the server and protocol cost with a client that does nothing but
 * one gathered write and blocking reads per call, and no allocation).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "bench.h"
#include "echo.pb-c.h"
#include "pbrpc/pbrpc.h"
#include "proto/wire.h"

#define METHOD "demo.Echo/Echo"

/* ---- server ---- */

static void bench_echo(Demo__Echo_Service *svc, const Demo__EchoRequest *req, Demo__EchoReply_Closure closure,
		       void *closure_data)
{
	(void)svc;
	bench_server_tick();
	Demo__EchoReply rep = DEMO__ECHO_REPLY__INIT;
	rep.payload = req->payload;
	closure(&rep, closure_data);
}

static Demo__Echo_Service echo_service = DEMO__ECHO__INIT(bench_);

/* The memfd rows set PBRPC_BENCH_MEMFD_THRESHOLD for both sides (0 or
 * unset: the library's default). */
static size_t bench_memfd_threshold(void)
{
	const char *e = getenv("PBRPC_BENCH_MEMFD_THRESHOLD");
	return e ? (size_t)strtoull(e, NULL, 0) : 0;
}
bool bench_authz;
unsigned bench_loop_threads = 1;

static pbrpc_server *new_server(int lfd, unsigned loops)
{
	/* The library sets no socket buffer sizes: give its sockets the
	 * baselines' (see hooks.c). */
	bench_hook_sockets = true;
	pbrpc_server_opts o = { .max_connections = 1u << 20, .max_frame = 2 * BENCH_MAX_PAYLOAD,
				.memfd_threshold = bench_memfd_threshold(), .loop_threads = loops };
	pbrpc_server *srv;
	int rc = pbrpc_server_new(&srv, &o);
	if (rc < 0)
		bench_die("pbrpc_server_new: %s", pbrpc_strerror(rc));
	rc = pbrpc_server_add_service(srv, &echo_service.base);
	if (rc < 0)
		bench_die("pbrpc_server_add_service: %s", pbrpc_strerror(rc));
	if (bench_authz) {
		/* Over TCP the policy admits the peer by allow_tcp, without the
		 * uid list. */
		uid_t uids[2] = { 65534, getuid() }; /* ours second: one miss first */
		pbrpc_policy p = { .uids = uids, .n_uids = 2, .allow_tcp = true };
		rc = pbrpc_server_set_policy(srv, METHOD, &p);
		if (rc < 0)
			bench_die("pbrpc_server_set_policy: %s", pbrpc_strerror(rc));
	}
	rc = pbrpc_server_listen_fd(srv, lfd);
	if (rc < 0)
		bench_die("pbrpc_server_listen_fd: %s", pbrpc_strerror(rc));
	return srv;
}

static void serve(int lfd, const bench_target *t)
{
	(void)t;
	pbrpc_server *srv = new_server(lfd, bench_loop_threads);
	atomic_store(&bench_shared->ready, 1);
	int rc = pbrpc_server_run(srv);
	bench_die("pbrpc_server_run returned %s", pbrpc_strerror(rc));
}

static void serve_idle(int lfd, const bench_target *t)
{
	(void)t;
	pbrpc_server *srv = new_server(lfd, 1); /* pbrpc_server_process: one loop */
	atomic_store(&bench_shared->ready, 1);
	for (;;) {
		int rc = pbrpc_server_process(srv, 20);
		if (rc < 0)
			bench_die("pbrpc_server_process: %s", pbrpc_strerror(rc));
		pbrpc_server_stats st;
		pbrpc_server_get_stats(srv, &st);
		atomic_store(&bench_shared->conns, st.connections_open);
	}
}

/* ---- "wire": the minimal client on the frame and wire layers ---- */

struct bump {
	uint8_t *p;
	size_t cap, used;
};

static void *bump_alloc(void *ud, size_t size)
{
	struct bump *b = ud;
	size = (size + 15) & ~(size_t)15;
	if (b->cap - b->used < size)
		return NULL;
	void *r = b->p + b->used;
	b->used += size;
	return r;
}

static void bump_free(void *ud, void *p)
{
	(void)ud;
	(void)p;
}

struct wconn {
	int fd;
	uint32_t next_id;
	pbrpc__frame_decoder dec;
	pbrpc__frame_writer out;
	struct bump arena;
	ProtobufCAllocator alloc;
};

static int wire_flush(struct wconn *c)
{
	while (pbrpc__frame_writer_pending(&c->out))
		if (pbrpc__frame_writer_flush(&c->out, c->fd, 0) < 0)
			return -1;
	return 0;
}

static int wire_frame(struct wconn *c, pbrpc__frame *f)
{
	for (;;) {
		int rc = pbrpc__frame_decoder_next(&c->dec, f);
		if (rc == 1)
			return 0;
		if (rc < 0 || pbrpc__frame_decoder_recv(&c->dec, c->fd, 0) <= 0)
			return -1;
	}
}

/* Connects and exchanges prefaces and HELLOs. */
static struct wconn *wire_dial(const bench_target *t)
{
	bench_hook_sockets = true; /* buffer sizes before connect(), as the baselines */
	int fd = pbrpc_endpoint_connect(&t->ep, 5000);
	bench_hook_sockets = false;
	if (fd < 0) {
		fprintf(stderr, "pbrpc-bench: connect %s: %s\n", t->endpoint, pbrpc_strerror(fd));
		return NULL;
	}
	struct wconn *c = calloc(1, sizeof(*c));
	if (!c)
		goto err_fd;
	c->fd = fd;
	c->next_id = 1;
	pbrpc__frame_decoder_init(&c->dec, 0);
	pbrpc__frame_writer_init(&c->out);
	pbrpc_hello hello = { .version = PBRPC_WIRE_VERSION, .agent = "pbrpc-bench" };
	if (pbrpc__wire_write_preface(&c->out, &hello) < 0 || wire_flush(c) < 0)
		goto err_c;
	uint8_t pre[PBRPC_WIRE_PREFACE_SIZE];
	if (recv(fd, pre, sizeof(pre), MSG_WAITALL) != (ssize_t)sizeof(pre) ||
	    memcmp(pre, PBRPC_WIRE_PREFACE, sizeof(pre)) != 0)
		goto err_c;
	pbrpc__frame f;
	pbrpc_hello srv_hello;
	if (wire_frame(c, &f) < 0 || pbrpc__wire_read_hello(&f, &srv_hello) < 0)
		goto err_c;
	return c;

err_c:
	pbrpc__frame_decoder_fini(&c->dec);
	pbrpc__frame_writer_fini(&c->out);
	free(c);
err_fd:
	close(fd);
	fprintf(stderr, "pbrpc-bench: handshake with %s failed\n", t->endpoint);
	return NULL;
}

static void wire_close(void *conn)
{
	struct wconn *c = conn;
	if (!c)
		return;
	close(c->fd);
	pbrpc__frame_decoder_fini(&c->dec);
	pbrpc__frame_writer_fini(&c->out);
	free(c->arena.p);
	free(c);
}

static void *wire_open(const bench_target *t)
{
	struct wconn *c = wire_dial(t);
	if (!c)
		return NULL;
	/* Room for the largest reply: no allocation per call. */
	c->arena.cap = 2 * (size_t)BENCH_MAX_PAYLOAD;
	c->arena.p = malloc(c->arena.cap);
	if (!c->arena.p) {
		wire_close(c);
		return NULL;
	}
	c->alloc.alloc = bump_alloc;
	c->alloc.free = bump_free;
	c->alloc.allocator_data = &c->arena;
	return c;
}

static int wire_send(struct wconn *c, size_t size)
{
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)bench_payload;
	req.payload.len = size;
	pbrpc__wire_request r = { .call_id = c->next_id++, .method = METHOD, .method_len = sizeof(METHOD) - 1 };
	if (c->next_id == 0)
		c->next_id = 1;
	return pbrpc__wire_write_request(&c->out, &r, &req.base, 0) < 0 ? -1 : 0;
}

static int wire_recv(struct wconn *c, size_t size)
{
	pbrpc__frame f;
	pbrpc__wire_response r;
	if (wire_frame(c, &f) < 0 || f.hdr.type != PBRPC_FRAME_RESPONSE || pbrpc__wire_read_response(&f, &r) < 0 ||
	    r.status != PBRPC_STATUS_OK)
		return -1;
	c->arena.used = 0;
	Demo__EchoReply *rep = demo__echo_reply__unpack(&c->alloc, r.body_len, r.body);
	return rep && rep->payload.len == size ? 0 : -1;
}

static int wire_call(void *conn, size_t size)
{
	struct wconn *c = conn;
	if (wire_send(c, size) < 0 || wire_flush(c) < 0)
		return -1;
	return wire_recv(c, size);
}

/* The wire client gathers the n requests into one write. */
static int wire_batch(void *conn, size_t size, int n)
{
	struct wconn *c = conn;
	for (int i = 0; i < n; i++)
		if (wire_send(c, size) < 0)
			return -1;
	if (wire_flush(c) < 0)
		return -1;
	for (int i = 0; i < n; i++)
		if (wire_recv(c, size) < 0)
			return -1;
	return 0;
}

/* Idle connections of both pbrpc systems: the handshake only, then nothing.
 * The server has processed our HELLO once it counts the connection and has
 * read from it; the caller waits for that. */
static void *wire_open_idle(const bench_target *t)
{
	struct wconn *c = wire_dial(t);
	if (c) {
		/* Give back what the handshake used on our side; only the server's
		 * memory is measured, but 10,000 of these add up here too. */
		pbrpc__frame_decoder_fini(&c->dec);
		pbrpc__frame_writer_fini(&c->out);
	}
	return c;
}

const bench_system bench_wire = {
	.key = "wire",
	.name = "W wire client",
	.serve = serve,
	.serve_idle = serve_idle,
	.open = wire_open,
	.call = wire_call,
	.batch = wire_batch,
	.open_idle = wire_open_idle,
	.close = wire_close,
	.close_idle = wire_close,
};

/* ---- "pbrpc": the library's client ---- */

struct pconn {
	pbrpc_client *c;
	ProtobufCService *sync, *async;
	size_t want;
	int done, bad;
};

static void on_reply(const Demo__EchoReply *rep, void *data)
{
	struct pconn *p = data;
	p->done++;
	if (!rep || rep->payload.len != p->want)
		p->bad++;
}

static void *pbrpc_open(const bench_target *t)
{
	struct pconn *p = calloc(1, sizeof(*p));
	if (!p)
		return NULL;
	bench_hook_sockets = true;
	pbrpc_client_opts co = { .max_frame = 2 * BENCH_MAX_PAYLOAD, .memfd_threshold = bench_memfd_threshold() };
	int rc = pbrpc_client_connect(&p->c, t->endpoint, &co);
	bench_hook_sockets = false;
	if (rc < 0) {
		fprintf(stderr, "pbrpc-bench: pbrpc_client_connect %s: %s\n", t->endpoint, pbrpc_strerror(rc));
		free(p);
		return NULL;
	}
	p->sync = pbrpc_client_service(p->c, &demo__echo__descriptor);
	p->async = pbrpc_client_service_async(p->c, &demo__echo__descriptor);
	if (!p->sync || !p->async) {
		pbrpc_client_free(p->c);
		free(p);
		return NULL;
	}
	return p;
}

static int pbrpc_call(void *conn, size_t size)
{
	struct pconn *p = conn;
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)bench_payload;
	req.payload.len = size;
	p->want = size;
	p->done = p->bad = 0;
	demo__echo__echo(p->sync, &req, on_reply, p);
	return p->done == 1 && p->bad == 0 ? 0 : -1;
}

static int pbrpc_batch(void *conn, size_t size, int n)
{
	struct pconn *p = conn;
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)bench_payload;
	req.payload.len = size;
	p->want = size;
	p->done = p->bad = 0;
	for (int i = 0; i < n; i++)
		demo__echo__echo(p->async, &req, on_reply, p);
	while (p->done < n) {
		int rc = pbrpc_client_process(p->c, -1);
		if (rc < 0)
			return -1;
	}
	return p->bad ? -1 : 0;
}

static void pbrpc_close(void *conn)
{
	struct pconn *p = conn;
	if (!p)
		return;
	pbrpc_client_free(p->c);
	free(p);
}

const bench_system bench_pbrpc = {
	.key = "pbrpc",
	.name = "pbrpc",
	.serve = serve,
	.serve_idle = serve_idle,
	.open = pbrpc_open,
	.call = pbrpc_call,
	.batch = pbrpc_batch,
	.open_idle = wire_open_idle,
	.close = pbrpc_close,
	.close_idle = wire_close,
};
