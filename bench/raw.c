/* The baselines: a length-prefixed ping-pong written plainly.
 *
 *   A (raw):    4-byte big-endian length, then the payload bytes; the server
 *               writes the request back unchanged.
 *   B (raw+pb): the same framing around a packed demo.EchoRequest; the server
 *               unpacks it, builds a demo.EchoReply with the same payload and
 *               packs that; the client packs and unpacks likewise (protobuf-c,
 *               default allocator).
 *   E (epoll):  B's client and messages, served by one thread with an epoll
 *               loop instead of a thread per connection: the system calls an
 *               event-loop server cannot avoid (epoll_wait, read, write per
 *               request), and nothing else. A diagnostic for pbrpc's server,
 *               which has the same shape.
 *
 * Blocking sockets, one thread per connection on the server, one write per
 * message (prefix and body from one buffer) and reads into a per-connection
 * buffer (usually one read per message), like any careful hand-written
 * client. Buffers grow to the largest message and are kept.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "bench.h"
#include "echo.pb-c.h"

typedef struct rbuf {
	uint8_t *p;
	size_t cap, head, tail;
} rbuf;

static void rbuf_reserve(rbuf *b, size_t need)
{
	if (b->head == b->tail)
		b->head = b->tail = 0;
	if (b->cap - b->head >= need)
		return;
	if (b->head) {
		memmove(b->p, b->p + b->head, b->tail - b->head);
		b->tail -= b->head;
		b->head = 0;
	}
	if (b->cap >= need)
		return;
	size_t cap = b->cap ? b->cap : 64 * 1024;
	while (cap < need)
		cap *= 2;
	uint8_t *np = realloc(b->p, cap);
	if (!np)
		bench_die("out of memory");
	b->p = np;
	b->cap = cap;
}

static int rbuf_fill(rbuf *b, int fd)
{
	ssize_t n;
	do
		n = read(fd, b->p + b->tail, b->cap - b->tail);
	while (n < 0 && errno == EINTR);
	if (n <= 0)
		return -1;
	b->tail += (size_t)n;
	return 0;
}

/* Reads one message; returns its body (valid until the next call) or NULL at
 * end of stream. */
static const uint8_t *read_msg(rbuf *b, int fd, uint32_t *len)
{
	rbuf_reserve(b, 4);
	while (b->tail - b->head < 4)
		if (rbuf_fill(b, fd) < 0)
			return NULL;
	const uint8_t *h = b->p + b->head;
	uint32_t n = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
	if (n > 2 * BENCH_MAX_PAYLOAD)
		return NULL;
	rbuf_reserve(b, 4 + (size_t)n);
	while (b->tail - b->head < 4 + (size_t)n)
		if (rbuf_fill(b, fd) < 0)
			return NULL;
	const uint8_t *body = b->p + b->head + 4;
	b->head += 4 + (size_t)n;
	*len = n;
	return body;
}

/* Non-blocking variant for the epoll server: the next message if it is
 * complete in the buffer, else NULL (and room reserved for the rest). */
static const uint8_t *next_msg(rbuf *b, uint32_t *len)
{
	if (b->tail - b->head < 4) {
		rbuf_reserve(b, 4);
		return NULL;
	}
	const uint8_t *h = b->p + b->head;
	uint32_t n = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
	if (b->tail - b->head < 4 + (size_t)n) {
		rbuf_reserve(b, 4 + (size_t)n);
		return NULL;
	}
	b->head += 4 + (size_t)n;
	*len = n;
	return h + 4;
}

static void put_len(uint8_t *p, size_t n)
{
	p[0] = (uint8_t)(n >> 24);
	p[1] = (uint8_t)(n >> 16);
	p[2] = (uint8_t)(n >> 8);
	p[3] = (uint8_t)n;
}

int bench_write_all(int fd, const void *p, size_t n)
{
	const uint8_t *q = p;
	while (n) {
		ssize_t w = send(fd, q, n, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		q += w;
		n -= (size_t)w;
	}
	return 0;
}

/* ---- server ---- */

struct sconn {
	int fd;
	bool pb;
};

/* Answers one request; returns 0 or -1 when the peer is gone. */
static int answer(int fd, bool pb, const uint8_t *body, uint32_t len, uint8_t **out, size_t *out_cap)
{
	bench_server_tick();
	if (!pb)
		return bench_write_all(fd, body - 4, 4 + (size_t)len);
	Demo__EchoRequest *req = demo__echo_request__unpack(NULL, len, body);
	if (!req)
		bench_die("raw+pb server: bad request");
	Demo__EchoReply rep = DEMO__ECHO_REPLY__INIT;
	rep.payload = req->payload;
	size_t n = demo__echo_reply__get_packed_size(&rep);
	if (*out_cap < 4 + n) {
		*out_cap = 4 + n;
		*out = realloc(*out, *out_cap);
		if (!*out)
			bench_die("out of memory");
	}
	demo__echo_reply__pack(&rep, *out + 4);
	put_len(*out, n);
	demo__echo_request__free_unpacked(req, NULL);
	return bench_write_all(fd, *out, 4 + n);
}

static void *conn_main(void *arg)
{
	struct sconn *sc = arg;
	rbuf in = { 0 };
	uint8_t *out = NULL;
	size_t out_cap = 0;
	uint32_t len;
	const uint8_t *body;

	while ((body = read_msg(&in, sc->fd, &len)))
		if (answer(sc->fd, sc->pb, body, len, &out, &out_cap) < 0)
			break;
	close(sc->fd);
	free(in.p);
	free(out);
	free(sc);
	return NULL;
}

static void serve(int lfd, const bench_target *t, bool pb)
{
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstacksize(&attr, 256 * 1024);
	for (;;) {
		int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			bench_die("accept: %s", strerror(errno));
		}
		bench_tune_socket(fd, t->tcp);
		struct sconn *sc = malloc(sizeof(*sc));
		if (!sc)
			bench_die("out of memory");
		sc->fd = fd;
		sc->pb = pb;
		pthread_t th;
		if (pthread_create(&th, &attr, conn_main, sc) != 0)
			bench_die("pthread_create failed");
	}
}

static void serve_raw(int lfd, const bench_target *t)
{
	serve(lfd, t, false);
}

static void serve_rawpb(int lfd, const bench_target *t)
{
	serve(lfd, t, true);
}

/* E: one thread, level-triggered epoll; reads with MSG_DONTWAIT, one read per
 * wake-up, answers every complete request with a blocking write. */
struct econn {
	int fd;
	rbuf in;
};

static void serve_epoll(int lfd, const bench_target *t)
{
	int ep = epoll_create1(EPOLL_CLOEXEC);
	struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL };
	if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) < 0)
		bench_die("epoll: %s", strerror(errno));
	uint8_t *out = NULL;
	size_t out_cap = 0;
	struct epoll_event evs[64];
	for (;;) {
		int n = epoll_wait(ep, evs, 64, -1);
		for (int i = 0; i < n; i++) {
			struct econn *c = evs[i].data.ptr;
			if (!c) {
				int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
				if (fd < 0)
					continue;
				bench_tune_socket(fd, t->tcp);
				c = calloc(1, sizeof(*c));
				if (!c)
					bench_die("out of memory");
				c->fd = fd;
				rbuf_reserve(&c->in, 4);
				struct epoll_event ce = { .events = EPOLLIN, .data.ptr = c };
				epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ce);
				continue;
			}
			ssize_t r;
			do
				r = recv(c->fd, c->in.p + c->in.tail, c->in.cap - c->in.tail, MSG_DONTWAIT);
			while (r < 0 && errno == EINTR);
			if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
				continue;
			bool gone = r <= 0;
			if (!gone) {
				c->in.tail += (size_t)r;
				uint32_t len;
				const uint8_t *body;
				while (!gone && (body = next_msg(&c->in, &len)))
					gone = answer(c->fd, true, body, len, &out, &out_cap) < 0;
			}
			if (gone) {
				epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
				close(c->fd);
				free(c->in.p);
				free(c);
			}
		}
	}
}

/* Idle test: accept and hold, nothing per connection but the fd. */
static void serve_idle(int lfd, const bench_target *t)
{
	(void)t;
	for (;;) {
		int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			bench_die("accept: %s", strerror(errno));
		}
		uint8_t one = 1;
		if (bench_write_all(fd, &one, 1) < 0)
			bench_die("idle server: write failed");
		atomic_fetch_add(&bench_shared->conns, 1);
	}
}

/* ---- client ---- */

struct cconn {
	int fd;
	bool pb;
	rbuf in;
	uint8_t *out;
	size_t out_cap;
	size_t raw_ready; /* raw: out holds prefix + this many payload bytes */
};

static int dial(const bench_target *t)
{
	int fd = socket(t->ep.addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	bench_tune_socket(fd, t->tcp);
	if (connect(fd, (const struct sockaddr *)&t->ep.addr, t->ep.addrlen) < 0) {
		fprintf(stderr, "pbrpc-bench: connect %s: %s\n", t->endpoint, strerror(errno));
		close(fd);
		return -1;
	}
	return fd;
}

static void *open_conn(const bench_target *t, bool pb)
{
	struct cconn *c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	c->fd = dial(t);
	if (c->fd < 0) {
		free(c);
		return NULL;
	}
	c->pb = pb;
	c->raw_ready = SIZE_MAX;
	return c;
}

static void *open_raw(const bench_target *t)
{
	return open_conn(t, false);
}

static void *open_rawpb(const bench_target *t)
{
	return open_conn(t, true);
}

static void out_reserve(struct cconn *c, size_t n)
{
	if (c->out_cap >= n)
		return;
	c->out = realloc(c->out, n);
	if (!c->out)
		bench_die("out of memory");
	c->out_cap = n;
}

/* Puts one request into c->out; returns its length with the prefix. */
static size_t build_request(struct cconn *c, size_t size)
{
	if (!c->pb) {
		/* The raw client's message is ready-made bytes: no copy per call. */
		if (c->raw_ready != size) {
			out_reserve(c, 4 + size);
			put_len(c->out, size);
			memcpy(c->out + 4, bench_payload, size);
			c->raw_ready = size;
		}
		return 4 + size;
	}
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)bench_payload;
	req.payload.len = size;
	size_t n = demo__echo_request__get_packed_size(&req);
	out_reserve(c, 4 + n);
	demo__echo_request__pack(&req, c->out + 4);
	put_len(c->out, n);
	return 4 + n;
}

static int read_reply(struct cconn *c, size_t size)
{
	uint32_t len;
	const uint8_t *body = read_msg(&c->in, c->fd, &len);
	if (!body)
		return -1;
	if (!c->pb)
		return len == size ? 0 : -1;
	Demo__EchoReply *rep = demo__echo_reply__unpack(NULL, len, body);
	if (!rep)
		return -1;
	int rc = rep->payload.len == size ? 0 : -1;
	demo__echo_reply__free_unpacked(rep, NULL);
	return rc;
}

static int call(void *conn, size_t size)
{
	struct cconn *c = conn;
	size_t n = build_request(c, size);
	if (bench_write_all(c->fd, c->out, n) < 0)
		return -1;
	return read_reply(c, size);
}

/* n requests, each its own write (as n independent callers would), then n
 * replies. */
static int batch(void *conn, size_t size, int n)
{
	struct cconn *c = conn;
	for (int i = 0; i < n; i++) {
		size_t len = build_request(c, size);
		if (bench_write_all(c->fd, c->out, len) < 0)
			return -1;
	}
	for (int i = 0; i < n; i++)
		if (read_reply(c, size) < 0)
			return -1;
	return 0;
}

static void *open_idle(const bench_target *t)
{
	int fd = dial(t);
	if (fd < 0)
		return NULL;
	uint8_t b;
	if (recv(fd, &b, 1, MSG_WAITALL) != 1) {
		close(fd);
		return NULL;
	}
	struct cconn *c = calloc(1, sizeof(*c));
	if (!c) {
		close(fd);
		return NULL;
	}
	c->fd = fd;
	return c;
}

static void close_conn(void *conn)
{
	struct cconn *c = conn;
	if (!c)
		return;
	close(c->fd);
	free(c->in.p);
	free(c->out);
	free(c);
}

const bench_system bench_raw = {
	.key = "raw",
	.name = "A raw",
	.serve = serve_raw,
	.serve_idle = serve_idle,
	.open = open_raw,
	.call = call,
	.batch = batch,
	.open_idle = open_idle,
	.close = close_conn,
	.close_idle = close_conn,
};

const bench_system bench_rawpb = {
	.key = "rawpb",
	.name = "B raw+pb",
	.serve = serve_rawpb,
	.serve_idle = serve_idle,
	.open = open_rawpb,
	.call = call,
	.batch = batch,
	.open_idle = open_idle,
	.close = close_conn,
	.close_idle = close_conn,
};

const bench_system bench_epoll = {
	.key = "epoll",
	.name = "E epoll+pb",
	.serve = serve_epoll,
	.serve_idle = serve_idle,
	.open = open_rawpb,
	.call = call,
	.batch = batch,
	.open_idle = open_idle,
	.close = close_conn,
	.close_idle = close_conn,
};
