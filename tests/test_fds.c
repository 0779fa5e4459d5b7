/* File descriptors bound to one message, and sealed-memfd bodies (issue 11,
 * PROTOCOL.md section 12): the real server and the real client, plus raw
 * peers for the bytes and fds a well-behaved peer never sends. Every test
 * counts /proc/self/fd (both sides live in this process) before and after. */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "echo.pb-c.h"
#include "pbrpc/pbrpc.h"
#include "proto/frame.h"
#include "proto/memfd.h"
#include "proto/wire.h"
#include "util/io.h"
#include "testutil.h"

/* ---- fd counting ---- */

static int count_fds(void)
{
	int n = 0;
	DIR *d = opendir("/proc/self/fd");
	cr_assert_not_null(d);
	struct dirent *e;
	while ((e = readdir(d)) != NULL)
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n - 1; /* the DIR's own */
}

/* Waits (the server's loop closes on its thread) until the count is back. */
static void expect_fds(int want, const char *when)
{
	int64_t until = tu_now_ms() + 3000;
	int n;
	while ((n = count_fds()) != want && tu_now_ms() < until)
		usleep(2000);
	if (n != want) {
		char cmd[64];
		snprintf(cmd, sizeof(cmd), "ls -l /proc/%d/fd >&2", (int)getpid());
		if (system(cmd) < 0)
			perror("system");
	}
	cr_assert_eq(n, want, "%s: %d fds open, %d before", when, n, want);
}

static ino_t inode_of(int fd)
{
	struct stat st;
	cr_assert_eq(fstat(fd, &st), 0);
	return st.st_ino;
}

/* ---- the service: demo.Echo with fds ----
 * Echoes the payload. Every request fd is taken and attached to the reply
 * (the client gets the same open files back). fail_status fails the call
 * (the fds it attached are closed, not sent); delay_ms answers from a thread
 * later (for deadlines and cancels). */

static atomic_int handler_runs;
static atomic_int handler_fds; /* fds the last request carried */

typedef struct later {
	Demo__EchoReply_Closure closure;
	void *data;
	unsigned ms;
	uint8_t *payload;
	size_t len;
} later;

static void *answer_later(void *arg)
{
	later *l = arg;
	usleep(l->ms * 1000);
	Demo__EchoReply rep = DEMO__ECHO_REPLY__INIT;
	rep.payload.data = l->payload;
	rep.payload.len = l->len;
	l->closure(&rep, l->data);
	free(l->payload);
	free(l);
	return NULL;
}

static void fd_echo(Demo__Echo_Service *svc, const Demo__EchoRequest *req, Demo__EchoReply_Closure closure,
		    void *data)
{
	(void)svc;
	atomic_fetch_add(&handler_runs, 1);
	const int *fds;
	int n = pbrpc_call_fds(data, &fds);
	atomic_store(&handler_fds, n);
	for (int i = 0; i < n; i++) {
		int fd = pbrpc_call_take_fd(data, (unsigned)i);
		cr_assert_geq(fd, 0);
		cr_assert_eq(pbrpc_call_take_fd(data, (unsigned)i), PBRPC_EINVALID, "taken twice");
		cr_assert(fcntl(fd, F_GETFD) & FD_CLOEXEC, "received close-on-exec");
		pbrpc_call_attach_fd(data, fd); /* owned by pbrpc from here, whatever happens */
	}
	if (req->fail_status) {
		pbrpc_call_set_status(data, (int)req->fail_status, "%s", req->fail_message);
		closure(NULL, data);
		return;
	}
	if (req->delay_ms) {
		later *l = calloc(1, sizeof(*l));
		l->closure = closure;
		l->data = data;
		l->ms = req->delay_ms;
		l->len = req->payload.len;
		l->payload = malloc(l->len + 1);
		if (l->len)
			memcpy(l->payload, req->payload.data, l->len);
		pthread_t t;
		pthread_create(&t, NULL, answer_later, l);
		pthread_detach(t);
		return;
	}
	Demo__EchoReply rep = DEMO__ECHO_REPLY__INIT;
	rep.payload = req->payload;
	closure(&rep, data);
}

static Demo__Echo_Service echo_svc = DEMO__ECHO__INIT(fd_);

/* ---- a server on its own thread ---- */

typedef struct fsrv {
	pbrpc_server *srv;
	pthread_t thr;
	char addr[PBRPC_ENDPOINT_STRLEN];
	char dir[64];
	int rc;
} fsrv;

static void *run_server(void *arg)
{
	fsrv *s = arg;
	s->rc = pbrpc_server_run(s->srv);
	return NULL;
}

static void server_start(fsrv *s, bool tcp, const pbrpc_server_opts *opts)
{
	memset(s, 0, sizeof(*s));
	cr_assert_eq(pbrpc_server_new(&s->srv, opts), 0);
	cr_assert_eq(pbrpc_server_add_service(s->srv, &echo_svc.base), 0);
	char ep[128];
	if (tcp) {
		snprintf(ep, sizeof(ep), "tcp:127.0.0.1:0");
	} else {
		snprintf(s->dir, sizeof(s->dir), "/tmp/pbrpc-fds-XXXXXX");
		cr_assert_not_null(mkdtemp(s->dir));
		snprintf(ep, sizeof(ep), "unix:%s/s.sock", s->dir);
	}
	int idx = pbrpc_server_listen(s->srv, ep);
	cr_assert_geq(idx, 0, "listen %s: %s", ep, pbrpc_strerror(idx));
	pbrpc_server_address(s->srv, idx, s->addr, sizeof(s->addr));
	cr_assert_eq(pthread_create(&s->thr, NULL, run_server, s), 0);
}

static void server_stop(fsrv *s)
{
	pbrpc_server_shutdown(s->srv, 0);
	pthread_join(s->thr, NULL);
	cr_assert_eq(s->rc, 0);
	pbrpc_server_free(s->srv);
	if (s->dir[0])
		rmdir(s->dir);
}

TestSuite(fds, .init = tu_setup, .timeout = 120);

/* A memfd holding `text`, as a user would pass a file. */
static int text_fd(const char *text)
{
	int fd = memfd_create("t", MFD_CLOEXEC);
	cr_assert_geq(fd, 0);
	cr_assert_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
	return fd;
}

typedef struct got {
	int status;
	char msg[256];
	int nfds;
	int fds[8];
	size_t len;
} got;

static void on_reply(const Demo__EchoReply *r, void *data)
{
	got *g = data;
	const char *m;
	g->status = pbrpc_client_status(&m);
	snprintf(g->msg, sizeof(g->msg), "%s", m);
	g->nfds = (int)pbrpc_client_reply_fds(g->fds, 8);
	g->len = r ? r->payload.len : 0;
}

/* One synchronous stub call carrying fds. */
static got call_with(ProtobufCService *svc, const int *fds, size_t n, const Demo__EchoRequest *req, int timeout_ms)
{
	pbrpc_call_opts o = { .fds = fds, .fd_count = n, .timeout_ms = timeout_ms };
	pbrpc_client_next_call(&o);
	got g = { .status = -1 };
	demo__echo__echo(svc, req, on_reply, &g);
	return g;
}

static void close_got(got *g)
{
	for (int i = 0; i < g->nfds; i++)
		close(g->fds[i]);
	g->nfds = 0;
}

Test(fds, sync_round_trip_same_files)
{
	int base = count_fds();
	fsrv s;
	server_start(&s, false, NULL);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	pbrpc_hello h;
	pbrpc_client_server_hello(c, &h);
	cr_assert_eq(h.features & 0x6, 0x6, "FDS and MEMFD announced over Unix");
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);

	int mine[3] = { text_fd("abc"), -1, -1 };
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	mine[1] = p[0];
	mine[2] = p[1];
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)"hi";
	req.payload.len = 2;
	got g = call_with(svc, mine, 3, &req, 0);
	cr_assert_eq(g.status, 0, "%s", g.msg);
	cr_assert_eq(atomic_load(&handler_fds), 3);
	cr_assert_eq(g.nfds, 3);
	for (int i = 0; i < 3; i++) {
		cr_assert_neq(g.fds[i], mine[i], "the client gets its own copies");
		cr_assert_eq(inode_of(g.fds[i]), inode_of(mine[i]), "fd %d is the same file", i);
	}
	char buf[8] = { 0 };
	cr_assert_eq(pread(g.fds[0], buf, sizeof(buf), 0), 3);
	cr_assert_str_eq(buf, "abc");
	cr_assert_eq(write(g.fds[2], "x", 1), 1); /* the returned write end feeds our read end */
	cr_assert_eq(read(mine[1], buf, 1), 1);
	close_got(&g);
	for (int i = 0; i < 3; i++)
		close(mine[i]);

	/* Without fds the same connection goes on as before. */
	g = call_with(svc, NULL, 0, &req, 0);
	cr_assert_eq(g.status, 0);
	cr_assert_eq(g.nfds, 0);
	pbrpc_client_free(c);
	server_stop(&s);
	expect_fds(base, "after the round trip");
}

Test(fds, explicit_and_async_calls)
{
	int base = count_fds();
	fsrv s;
	server_start(&s, false, NULL);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	int f = text_fd("raw");
	pbrpc_call_opts o = { .fds = &f, .fd_count = 1 };
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	uint8_t body[64];
	size_t blen = demo__echo_request__pack(&req, body);
	uint8_t *rep = NULL;
	size_t rlen = 0;
	pbrpc_call_result res;
	cr_assert_eq(pbrpc_client_call_raw(c, "demo.Echo/Echo", body, blen, &rep, &rlen, &o, &res), 0, "%s",
		     res.message);
	free(rep);
	int back[2];
	cr_assert_eq(pbrpc_client_reply_fds(back, 2), 1);
	cr_assert_eq(inode_of(back[0]), inode_of(f));
	close(back[0]);
	/* A second explicit call's fds are closed at the next call when not taken. */
	cr_assert_eq(pbrpc_client_call_raw(c, "demo.Echo/Echo", body, blen, &rep, &rlen, &o, &res), 0);
	free(rep);
	cr_assert_eq(pbrpc_client_call_raw(c, "demo.Echo/Echo", body, blen, &rep, &rlen, NULL, &res), 0);
	free(rep);
	cr_assert_eq(pbrpc_client_reply_fds(back, 2), 0);

	ProtobufCService *as = pbrpc_client_service_async(c, &demo__echo__descriptor);
	got g[4];
	for (int i = 0; i < 4; i++) {
		g[i] = (got){ .status = -1 };
		pbrpc_client_next_call(&o);
		demo__echo__echo(as, &req, on_reply, &g[i]);
	}
	cr_assert_eq(pbrpc_client_drain(c, 5000), 0);
	for (int i = 0; i < 4; i++) {
		cr_assert_eq(g[i].status, 0, "%s", g[i].msg);
		cr_assert_eq(g[i].nfds, 1);
		cr_assert_eq(inode_of(g[i].fds[0]), inode_of(f));
		close_got(&g[i]);
	}
	/* An async closure that takes nothing: its fds are closed after it. */
	got skip = { .status = -1 };
	pbrpc_client_next_call(&o);
	demo__echo__echo(as, &req, on_reply, &skip);
	cr_assert_eq(pbrpc_client_drain(c, 5000), 0);
	close_got(&skip);
	close(f);
	pbrpc_client_free(c);
	server_stop(&s);
	expect_fds(base, "after explicit and async calls");
}

Test(fds, refused_over_tcp)
{
	int base = count_fds();
	fsrv s;
	server_start(&s, true, NULL);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	pbrpc_hello h;
	pbrpc_client_server_hello(c, &h);
	cr_assert_eq(h.features & 0x6, 0, "no fd features over TCP");
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	int f = text_fd("x");
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	int runs = atomic_load(&handler_runs);
	got g = call_with(svc, &f, 1, &req, 0);
	cr_assert_eq(g.status, PBRPC_STATUS_FAILED_PRECONDITION, "%s", g.msg);
	cr_assert(strstr(g.msg, "not a Unix socket"), "%s", g.msg);
	cr_assert_eq(atomic_load(&handler_runs), runs, "nothing was sent");
	close(f);
	pbrpc_client_free(c);
	server_stop(&s);
	expect_fds(base, "after TCP");
}

/* Every way a call carrying fds can end without them being delivered. */
Test(fds, failure_paths_close_every_fd)
{
	int base = count_fds();
	fsrv s;
	pbrpc_server_opts so = { .max_fds = 2, .max_frame = 1 << 20 };
	server_start(&s, false, &so);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, &(pbrpc_client_opts){ .memfd_threshold = 1024 }), 0);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	int f[3] = { text_fd("a"), text_fd("b"), text_fd("c") };
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	int mid = count_fds();

	/* refused: over the server's per-request cap */
	got g = call_with(svc, f, 3, &req, 0);
	cr_assert_eq(g.status, PBRPC_STATUS_RESOURCE_EXHAUSTED, "%s", g.msg);
	cr_assert(strstr(g.msg, "3 file descriptors"), "%s", g.msg);
	/* refused: unknown method */
	pbrpc_call_opts o = { .fds = f, .fd_count = 2 };
	uint8_t *rep = NULL;
	size_t rlen;
	pbrpc_call_result res;
	cr_assert_eq(pbrpc_client_call_raw(c, "demo.Echo/Nope", "", 0, &rep, &rlen, &o, &res), PBRPC_ESTATUS);
	cr_assert_eq(res.status, PBRPC_STATUS_UNIMPLEMENTED);
	/* failed by the handler, after attaching the fds to its reply */
	req.fail_status = PBRPC_STATUS_NOT_FOUND;
	req.fail_message = "no";
	g = call_with(svc, f, 2, &req, 0);
	cr_assert_eq(g.status, PBRPC_STATUS_NOT_FOUND);
	cr_assert_eq(g.nfds, 0, "no fds with a failed reply");
	req.fail_status = 0;
	/* oversized: the request is skipped unread, its fds closed */
	size_t big = (1 << 20) + 10;
	uint8_t *pay = calloc(1, big);
	req.payload.data = pay;
	req.payload.len = big;
	pbrpc_client_opts co = { .memfd_threshold = SIZE_MAX };
	pbrpc_client *c2;
	cr_assert_eq(pbrpc_client_connect(&c2, s.addr, &co), 0);
	ProtobufCService *svc2 = pbrpc_client_service(c2, &demo__echo__descriptor);
	g = call_with(svc2, f, 2, &req, 0);
	cr_assert_eq(g.status, PBRPC_STATUS_RESOURCE_EXHAUSTED, "%s", g.msg);
	/* the same through a memfd body: refused by its size, before mapping */
	g = call_with(svc, f, 2, &req, 0);
	cr_assert_eq(g.status, PBRPC_STATUS_RESOURCE_EXHAUSTED, "%s", g.msg);
	free(pay);
	req.payload.len = 0;
	/* expired: the handler answers after the deadline */
	req.delay_ms = 150;
	g = call_with(svc, f, 2, &req, 40);
	cr_assert_eq(g.status, PBRPC_STATUS_DEADLINE_EXCEEDED, "%s", g.msg);
	/* cancelled (async) */
	ProtobufCService *as = pbrpc_client_service_async(c, &demo__echo__descriptor);
	got ag = { .status = -1 };
	pbrpc_client_next_call(&o);
	demo__echo__echo(as, &req, on_reply, &ag);
	cr_assert_eq(pbrpc_client_cancel(c, pbrpc_client_last_call()), 0);
	cr_assert_eq(pbrpc_client_drain(c, 5000), 0);
	cr_assert_eq(ag.status, PBRPC_STATUS_CANCELLED);
	cr_assert_eq(ag.nfds, 0);
	usleep(300 * 1000); /* the delayed handlers answer into the void */
	/* peer gone: a call in flight when the client goes away */
	pbrpc_client_next_call(&o);
	demo__echo__echo(as, &req, on_reply, &ag);
	pbrpc_client_free(c2);
	pbrpc_client_free(c);
	usleep(300 * 1000);
	expect_fds(mid - 4 /* c's socket, epoll and eventfd, and the server's end */, "clients gone, server up");
	for (int i = 0; i < 3; i++)
		close(f[i]);
	server_stop(&s);
	expect_fds(base, "after every failure path");
}

Test(fds, ten_thousand_calls_in_a_row)
{
	int base = count_fds();
	fsrv s;
	server_start(&s, false, NULL);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	int f = text_fd("n");
	ino_t ino = inode_of(f);
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	size_t n = tu_scale(10000);
	for (size_t i = 0; i < n; i++) {
		got g = call_with(svc, &f, 1, &req, 0);
		cr_assert_eq(g.status, 0, "call %zu: %s", i, g.msg);
		cr_assert_eq(g.nfds, 1);
		if (i % 1000 == 0)
			cr_assert_eq(inode_of(g.fds[0]), ino);
		close_got(&g);
	}
	close(f);
	pbrpc_client_free(c);
	server_stop(&s);
	expect_fds(base, "after 10,000 calls");
}

/* ---- memfd bodies through the real server and client ---- */

static void echo_sizes(size_t threshold, const size_t *sizes, size_t nsizes, uint8_t **out, bool *used_memfd)
{
	fsrv s;
	pbrpc_server_opts so = { .max_frame = 80u << 20, .max_memory = 512u << 20, .memfd_threshold = threshold };
	server_start(&s, false, &so);
	pbrpc_client *c;
	pbrpc_client_opts co = { .max_frame = 80u << 20, .memfd_threshold = threshold, .call_timeout_ms = 60000 };
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, &co), 0);
	tu_rng r = { tu_seed() };
	for (size_t i = 0; i < nsizes; i++) {
		Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
		uint8_t *p = malloc(sizes[i] + 1);
		tu_rand_bytes(&r, p, sizes[i]);
		req.payload.data = p;
		req.payload.len = sizes[i];
		uint8_t *rep = NULL;
		size_t rlen = 0;
		pbrpc_call_result res;
		ProtobufCMessage *reply = NULL;
		if (!tu_short_io())
			tu_io_install(&(tu_io_config){ 0 }); /* to count the bytes through the socket */
		int rc = pbrpc_client_call(c, "demo.Echo/Echo", &req.base, &demo__echo_reply__descriptor, &reply, NULL,
					   &res);
		cr_assert_eq(rc, 0, "%zu bytes: %s", sizes[i], res.message);
		if (!tu_short_io())
			used_memfd[i] = tu_io_get_stats().send_bytes < sizes[i];
		Demo__EchoReply *er = (Demo__EchoReply *)reply;
		cr_assert_eq(er->payload.len, sizes[i]);
		cr_assert(sizes[i] == 0 || memcmp(er->payload.data, p, sizes[i]) == 0, "%zu bytes differ", sizes[i]);
		out[i] = p;
		protobuf_c_message_free_unpacked(reply, NULL);
		(void)rep;
		(void)rlen;
	}
	tu_io_default();
	pbrpc_client_free(c);
	server_stop(&s);
}

Test(fds, memfd_and_plain_paths_byte_identical)
{
	int base = count_fds();
	size_t sizes[] = { 0, 1, 4095, 256 * 1024 - 16, 256 * 1024 + 1, 1 << 20, (16u << 20) - 100, 64u << 20 };
	size_t n = sizeof(sizes) / sizeof(sizes[0]);
	if (tu_short_io())
		n = 5; /* one byte per read: the large ones would take minutes */
	uint8_t *a[8], *b[8];
	bool ma[8] = { 0 }, mb[8] = { 0 };
	echo_sizes(SIZE_MAX, sizes, n, a, ma);
	echo_sizes(256 * 1024, sizes, n, b, mb); /* bodies above 256 KiB by memfd */
	for (size_t i = 0; i < n; i++) {
		cr_assert(sizes[i] == 0 || memcmp(a[i], b[i], sizes[i]) == 0);
		if (!tu_short_io()) {
			cr_assert(!ma[i], "%zu bytes: the plain path sent them through the socket", sizes[i]);
			cr_assert_eq(mb[i], sizes[i] > 256 * 1024, "%zu bytes: memfd %d", sizes[i],
				     mb[i]);
		}
		free(a[i]);
		free(b[i]);
	}
	expect_fds(base, "after the memfd runs");
}

Test(fds, memfd_reply_over_client_max_frame_refused_by_server)
{
	int base = count_fds();
	fsrv s;
	server_start(&s, false, &(pbrpc_server_opts){ .memfd_threshold = 1024 });
	pbrpc_client *c;
	pbrpc_client_opts co = { .max_frame = 64 * 1024, .memfd_threshold = 1024 };
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, &co), 0);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	uint8_t *p = calloc(1, 100000);
	req.payload.data = p;
	req.payload.len = 100000; /* the request goes by memfd: the server accepts 16 MiB */
	got g = call_with(svc, NULL, 0, &req, 0);
	cr_assert_eq(g.status, PBRPC_STATUS_RESOURCE_EXHAUSTED, "%s", g.msg);
	cr_assert(strstr(g.msg, "client accepts at most 65536"), "%s", g.msg);
	free(p);
	pbrpc_client_free(c);
	server_stop(&s);
	expect_fds(base, "after the refused reply");
}

/* ---- raw peers ---- */

static void raw_flush(pbrpc__frame_writer *w, int fd)
{
	while (pbrpc__frame_writer_pending(w))
		cr_assert_geq(pbrpc__frame_writer_flush(w, fd, 0), 0);
}

/* sendmsg of buf with fds attached to its first byte (not through the shim). */
static void raw_send(int fd, const void *buf, size_t len, const int *fds, unsigned n)
{
	union {
		struct cmsghdr a;
		char b[CMSG_SPACE(sizeof(int) * 8)];
	} ctl;
	struct iovec iov = { (void *)buf, len };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (n) {
		m.msg_control = ctl.b;
		m.msg_controllen = CMSG_SPACE(sizeof(int) * n);
		struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int) * n);
		memcpy(CMSG_DATA(cm), fds, sizeof(int) * n);
	}
	cr_assert_eq(sendmsg(fd, &m, MSG_NOSIGNAL), (ssize_t)len);
}

typedef struct raw {
	int fd;
	pbrpc__frame_decoder d;
	pbrpc_hello peer;
} raw;

/* Our preface and HELLO, then the peer's (fd is a connected socket). */
static void raw_handshake(raw *r, int fd, uint64_t features, uint32_t max_frame)
{
	r->fd = fd;
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc_hello h = { .version = 1, .features = features, .max_frame = max_frame };
	cr_assert_eq(pbrpc__wire_write_preface(&w, &h), 0);
	raw_flush(&w, fd);
	pbrpc__frame_writer_fini(&w);
	uint8_t pre[8];
	cr_assert_eq(tu_read_full(fd, pre, 8), 8);
	pbrpc__frame_decoder_init(&r->d, 0);
	pbrpc__frame f;
	cr_assert_eq(pbrpc__frame_read(&r->d, fd, &f, 5000), 1);
	cr_assert_eq(pbrpc__wire_read_hello(&f, &r->peer), 0);
}

static void raw_open(raw *r, const char *addr, uint64_t features)
{
	pbrpc_endpoint ep;
	cr_assert_eq(pbrpc_endpoint_parse(addr, &ep), 0);
	int fd = pbrpc_endpoint_connect(&ep, 5000);
	cr_assert_geq(fd, 0);
	raw_handshake(r, fd, features, 0);
}

static void raw_close(raw *r)
{
	pbrpc__frame_decoder_fini(&r->d);
	close(r->fd);
}

/* A REQUEST for demo.Echo/Echo (empty body, or a body in a memfd) with the
 * header's fd count `declared`; the bytes, ready to send. */
static size_t raw_request(uint8_t *out, size_t cap, uint32_t id, unsigned declared, bool body_fd, uint64_t fd_len)
{
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc__wire_request q = { .call_id = id, .method = "demo.Echo/Echo", .method_len = 14, .nfds = declared,
				  .body_fd = body_fd, .body_fd_len = fd_len };
	cr_assert_eq(pbrpc__wire_write_request(&w, &q, NULL, 0), 0);
	size_t n = pbrpc__frame_writer_pending(&w);
	cr_assert_leq(n, cap);
	memcpy(out, w.buf + w.head, n);
	pbrpc__frame_writer_fini(&w);
	return n;
}

/* The next frame: a RESPONSE (status into *st) or GOAWAY (*st = -status - 1000). */
static void raw_expect(raw *r, int *st, char *msg, size_t mlen)
{
	pbrpc__frame f;
	for (;;) {
		int rc = pbrpc__frame_read(&r->d, r->fd, &f, 5000);
		cr_assert_eq(rc, 1, "read: %s", pbrpc_strerror(rc));
		if (f.hdr.type == PBRPC_FRAME_RESPONSE) {
			pbrpc__wire_response resp;
			cr_assert_eq(pbrpc__wire_read_response(&f, &resp), 0);
			*st = resp.status;
			snprintf(msg, mlen, "%.*s", (int)resp.message_len, resp.message);
			return;
		}
		if (f.hdr.type == PBRPC_FRAME_GOAWAY) {
			int gs;
			const char *m;
			size_t ml;
			cr_assert_eq(pbrpc__wire_read_goaway(&f, &gs, &m, &ml), 0);
			*st = -gs - 1000;
			snprintf(msg, mlen, "%.*s", (int)ml, m);
			return;
		}
	}
}

static void raw_goaway(fsrv *s, unsigned declared, unsigned sent, const char *want)
{
	raw r;
	raw_open(&r, s->addr, 0x7);
	uint8_t buf[256];
	size_t n = raw_request(buf, sizeof(buf), 1, declared, false, 0);
	int fds[4];
	for (unsigned i = 0; i < sent; i++)
		fds[i] = text_fd("z");
	raw_send(r.fd, buf, n, fds, sent);
	for (unsigned i = 0; i < sent; i++)
		close(fds[i]);
	int st;
	char msg[256];
	raw_expect(&r, &st, msg, sizeof(msg));
	cr_assert_eq(st, -PBRPC_STATUS_INVALID_ARGUMENT - 1000, "declared %u, sent %u: %d %s", declared, sent, st, msg);
	cr_assert(strstr(msg, want), "declared %u sent %u: %s", declared, sent, msg);
	raw_close(&r);
}

Test(fds, fd_count_disagreeing_is_a_protocol_error)
{
	int base = count_fds();
	fsrv s;
	server_start(&s, false, NULL);
	int runs = atomic_load(&handler_runs);
	raw_goaway(&s, 0, 1, "frame that declared none");
	raw_goaway(&s, 2, 1, "declares 2 file descriptors, 1 arrived");
	raw_goaway(&s, 1, 0, "declares 1 file descriptors, none arrived");
	raw_goaway(&s, 1, 3, "declares 1 file descriptors, 3 arrived");
	cr_assert_eq(atomic_load(&handler_runs), runs, "no handler ran");

	/* A count without the feature negotiated: reserved bits, as in version 1. */
	raw r;
	raw_open(&r, s.addr, 0x1);
	uint8_t buf[256];
	size_t n = raw_request(buf, sizeof(buf), 1, 1, false, 0);
	int f = text_fd("q");
	raw_send(r.fd, buf, n, &f, 1);
	close(f);
	int st;
	char msg[256];
	raw_expect(&r, &st, msg, sizeof(msg));
	cr_assert_eq(st, -PBRPC_STATUS_INVALID_ARGUMENT - 1000);
	/* Read with our HELLO: fds before the feature; after it: reserved bits. */
	cr_assert(strstr(msg, "reserved") || strstr(msg, "without the FDS feature"), "%s", msg);
	raw_close(&r);

	/* Fds arriving after the first byte of their frame. */
	raw_open(&r, s.addr, 0x7);
	n = raw_request(buf, sizeof(buf), 1, 1, false, 0);
	f = text_fd("q");
	raw_send(r.fd, buf, 5, NULL, 0);
	usleep(50 * 1000);
	raw_send(r.fd, buf + 5, n - 5, &f, 1);
	close(f);
	raw_expect(&r, &st, msg, sizeof(msg));
	cr_assert_eq(st, -PBRPC_STATUS_INVALID_ARGUMENT - 1000, "%s", msg);
	raw_close(&r);
	server_stop(&s);
	expect_fds(base, "after the raw peers");
}

/* A memfd as a sender might make it: sealed with `seals`, `len` bytes of a
 * packed EchoRequest{payload: "memfd!"} (or a shorter one). */
static int make_memfd(unsigned seals, size_t *len, bool truncate_after)
{
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)"memfd!";
	req.payload.len = 6;
	uint8_t b[32];
	*len = demo__echo_request__pack(&req, b);
	int fd = memfd_create("raw", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	cr_assert_eq(write(fd, b, *len), (ssize_t)*len);
	if (truncate_after)
		cr_assert_eq(ftruncate(fd, (off_t)*len - 2), 0);
	if (seals)
		cr_assert_eq(fcntl(fd, F_ADD_SEALS, seals), 0);
	return fd;
}

Test(fds, memfd_unsealed_writable_truncated_refused)
{
	int base = count_fds();
	fsrv s;
	server_start(&s, false, NULL);
	raw r;
	raw_open(&r, s.addr, 0x7);
	const unsigned all = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL;
	struct {
		unsigned seals;
		bool trunc;
		int status;
		const char *want;
	} cases[] = {
		{ 0, false, PBRPC_STATUS_INVALID_ARGUMENT, "not sealed" },
		{ F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL, false, PBRPC_STATUS_INVALID_ARGUMENT, "not sealed" },
		{ F_SEAL_WRITE | F_SEAL_SHRINK, false, PBRPC_STATUS_INVALID_ARGUMENT, "not sealed" },
		{ all, true, PBRPC_STATUS_INVALID_ARGUMENT, "its frame says" },
		{ all, false, PBRPC_STATUS_OK, "" },
	};
	int runs = atomic_load(&handler_runs);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		size_t len;
		int m = make_memfd(cases[i].seals, &len, cases[i].trunc);
		uint8_t buf[256];
		size_t n = raw_request(buf, sizeof(buf), (uint32_t)i + 1, 1, true, len);
		raw_send(r.fd, buf, n, &m, 1);
		close(m);
		int st;
		char msg[256];
		raw_expect(&r, &st, msg, sizeof(msg));
		cr_assert_eq(st, cases[i].status, "case %zu: %d %s", i, st, msg);
		cr_assert(strstr(msg, cases[i].want), "case %zu: %s", i, msg);
	}
	cr_assert_eq(atomic_load(&handler_runs), runs + 1, "only the sealed one ran");
	/* A pipe is no memfd. */
	int p[2];
	cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
	uint8_t buf[256];
	size_t n = raw_request(buf, sizeof(buf), 9, 1, true, 10);
	raw_send(r.fd, buf, n, p, 1);
	close(p[0]);
	close(p[1]);
	int st;
	char msg[256];
	raw_expect(&r, &st, msg, sizeof(msg));
	cr_assert_eq(st, PBRPC_STATUS_INVALID_ARGUMENT, "%s", msg);
	cr_assert(strstr(msg, "not a sealed memfd"), "%s", msg);
	/* BODY_FD with no fd at all: the frame is malformed. */
	n = raw_request(buf, sizeof(buf), 10, 0, true, 10);
	raw_send(r.fd, buf, n, NULL, 0);
	raw_expect(&r, &st, msg, sizeof(msg));
	cr_assert_eq(st, PBRPC_STATUS_INVALID_ARGUMENT, "%s", msg);
	raw_close(&r);
	server_stop(&s);
	expect_fds(base, "after the bad memfds");
}

/* A raw server answers with a memfd reply larger than the client's limit,
 * and with an unsealed one: the real client refuses both. */
typedef struct rawsrv {
	int lfd;
	char path[108];
	int mode; /* 0: over max_frame, 1: unsealed */
} rawsrv;

static void *raw_server(void *arg)
{
	rawsrv *rs = arg;
	int fd = accept4(rs->lfd, NULL, NULL, SOCK_CLOEXEC);
	if (fd < 0)
		return NULL;
	raw r;
	raw_handshake(&r, fd, 0x7, 0);
	for (int k = 0; k < 2; k++) {
		pbrpc__frame f;
		do {
			if (pbrpc__frame_read(&r.d, fd, &f, 5000) != 1)
				goto out;
		} while (f.hdr.type != PBRPC_FRAME_REQUEST);
		size_t len = rs->mode == 0 ? 200000 : 50000;
		int m = memfd_create("big", MFD_CLOEXEC | MFD_ALLOW_SEALING);
		if (ftruncate(m, (off_t)len) < 0)
			abort();
		if (rs->mode == 0)
			fcntl(m, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL);
		pbrpc__frame_writer w;
		pbrpc__frame_writer_init(&w);
		pbrpc__wire_response resp = { .call_id = f.hdr.stream, .status = 0, .nfds = 1, .body_fd = true,
					      .body_fd_len = len };
		pbrpc__wire_write_response(&w, &resp, NULL, 0);
		raw_send(fd, w.buf + w.head, pbrpc__frame_writer_pending(&w), &m, 1);
		pbrpc__frame_writer_fini(&w);
		close(m);
	}
	usleep(100 * 1000);
out:
	raw_close(&r);
	return NULL;
}

static void bad_reply(int mode, const char *want)
{
	rawsrv rs = { .mode = mode };
	rs.lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	snprintf(rs.path, sizeof(rs.path), "/tmp/pbrpc-fds-raw-%d-%d", (int)getpid(), mode);
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", rs.path);
	unlink(rs.path);
	cr_assert_eq(bind(rs.lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	cr_assert_eq(listen(rs.lfd, 4), 0);
	pthread_t t;
	pthread_create(&t, NULL, raw_server, &rs);
	char ep[140];
	snprintf(ep, sizeof(ep), "unix:%s", rs.path);
	pbrpc_client *c;
	pbrpc_client_opts co = { .max_frame = 100000 };
	cr_assert_eq(pbrpc_client_connect(&c, ep, &co), 0);
	ProtobufCService *svc = pbrpc_client_service(c, &demo__echo__descriptor);
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	for (int k = 0; k < 2; k++) { /* the connection stays usable after the first */
		got g = call_with(svc, NULL, 0, &req, 3000);
		cr_assert_eq(g.status, mode == 0 ? PBRPC_STATUS_RESOURCE_EXHAUSTED : PBRPC_STATUS_INTERNAL, "%d %s",
			     g.status, g.msg);
		cr_assert(strstr(g.msg, want), "%s", g.msg);
	}
	pbrpc_client_free(c);
	pthread_join(t, NULL);
	close(rs.lfd);
	unlink(rs.path);
}

Test(fds, client_refuses_bad_memfd_replies)
{
	int base = count_fds();
	bad_reply(0, "client accepts at most 100000");
	bad_reply(1, "not sealed");
	expect_fds(base, "after the bad replies");
}

/* The kernel drops fds that do not fit (MSG_CTRUNC): the receiver cannot
 * know which frame lost what, so it is a connection error, and the fd that
 * did arrive is closed. A shim gives the server's reads room for one fd. */
static ssize_t ctrunc_recvmsg(int fd, struct msghdr *m, int flags)
{
	if (m->msg_controllen > CMSG_SPACE(sizeof(int)))
		m->msg_controllen = CMSG_SPACE(sizeof(int));
	return recvmsg(fd, m, flags);
}

static ssize_t plain_sendmsg(int fd, const struct msghdr *m, int flags)
{
	return sendmsg(fd, m, flags);
}

Test(fds, ctrunc_is_a_connection_error)
{
	int base = count_fds();
	fsrv s;
	server_start(&s, false, NULL);
	static const pbrpc__io ctrunc_io = { ctrunc_recvmsg, plain_sendmsg };
	pbrpc__io_set(&ctrunc_io);
	raw r;
	raw_open(&r, s.addr, 0x7);
	uint8_t buf[256];
	size_t n = raw_request(buf, sizeof(buf), 1, 3, false, 0);
	int fds[3] = { text_fd("1"), text_fd("2"), text_fd("3") };
	raw_send(r.fd, buf, n, fds, 3);
	for (int i = 0; i < 3; i++)
		close(fds[i]);
	int st;
	char msg[256];
	raw_expect(&r, &st, msg, sizeof(msg));
	tu_io_default();
	cr_assert_eq(st, -PBRPC_STATUS_INVALID_ARGUMENT - 1000, "%d %s", st, msg);
	cr_assert(strstr(msg, "MSG_CTRUNC"), "%s", msg);
	raw_close(&r);
	server_stop(&s);
	expect_fds(base, "after MSG_CTRUNC");
}

/* The frame layer alone: a frame's fds ride on a sendmsg that starts at its
 * first byte and stops at its last, whatever is queued around it. */
Test(fds, writer_sends_fds_with_their_frame_only)
{
	int base = count_fds();
	pbrpc__io_set(NULL); /* whole reads: what the kernel does is the point (cut sends are covered elsewhere) */
	int sv[2];
	tu_socketpair(sv);
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc__frame_header h = { .type = PBRPC_FRAME_PING };
	uint8_t ping[8] = { 0 };
	cr_assert_eq(pbrpc__frame_writer_append(&w, &h, ping, 8), 0); /* A: 20 bytes */
	size_t at = pbrpc__frame_writer_pending(&w);
	pbrpc__frame_header hb = { .type = PBRPC_FRAME_REQUEST, .stream = 1, .reserved = 2 };
	cr_assert_eq(pbrpc__frame_writer_append(&w, &hb, "0123456789", 10), 0); /* B: 22 bytes, 2 fds */
	int fds[2] = { text_fd("x"), text_fd("y") };
	ino_t ino0 = inode_of(fds[0]);
	cr_assert_eq(pbrpc__frame_writer_attach_fds(&w, at, fds, 2), 0); /* the writer's now */
	cr_assert_eq(pbrpc__frame_writer_append(&w, &h, ping, 8), 0); /* C: 20 bytes */
	while (pbrpc__frame_writer_pending(&w))
		cr_assert_gt(pbrpc__frame_writer_flush(&w, sv[0], 0), 0);
	pbrpc__frame_writer_fini(&w);

	uint8_t buf[128];
	pbrpc__io_fds rx;
	/* The kernel stops a read at the end of the bytes sent with fds. */
	ssize_t n = pbrpc__io_recv_fds(sv[1], buf, sizeof(buf), 0, &rx);
	cr_assert_eq(n, 42, "A and B, not C: %zd", n);
	cr_assert_eq(rx.n, 2);
	cr_assert(!rx.truncated);
	cr_assert_eq(inode_of(rx.fds[0]), ino0);
	cr_assert(fcntl(rx.fds[0], F_GETFD) & FD_CLOEXEC);
	pbrpc__io_close_fds(rx.fds, rx.n);
	n = pbrpc__io_recv_fds(sv[1], buf, sizeof(buf), 0, &rx);
	cr_assert_eq(n, 20);
	cr_assert_eq(rx.n, 0);
	close(sv[0]);
	close(sv[1]);
	tu_io_default();
	expect_fds(base, "after the writer");
}
