/* libFuzzer target for a whole server connection, in process: a real
 * pbrpc_server (small limits, no workers) hosting a tiny demo.Echo service
 * whose handler answers inline, holds the call to answer it on a later step,
 * or fails it; one Unix socket connected to it through an abstract-namespace
 * listener; the fuzz input is what the client end writes and does.
 *
 * Input layout:
 *   byte 0   configuration:
 *            bits 0-1  3: the input starts with its own preface; otherwise
 *                      the harness writes a valid preface + HELLO first
 *            bit 2     max_output_queue 512 bytes (else 8 KiB)
 *            bit 3     max_frame 256 (else 4096)
 *            bits 4-5  max_calls 1, 2, 4 or 16
 *            bit 6     idle timeout 200 ms (else none)
 *            bit 7     the harness's HELLO announces max_frame 64 (else the
 *                      default), and a second connection is refused
 *                      (max_connections 1)
 *   then ops, each an op byte (op & 7, arg = op >> 3) and perhaps more:
 *     0 WRITE    a length byte L (L & 0x80: (L & 0x7f) * 64 bytes, else L + 1)
 *                and that many bytes, queued and written as far as the
 *                socket takes them
 *     1 PROCESS  arg + 1 more rounds of pbrpc_server_process(srv, 0)
 *     2 READ     read the replies (arg 0: everything there is, else arg * 64
 *                bytes); not reading is how the input makes backpressure
 *     3 TIME     advance the clock by time_table[arg & 7] ms (util/clock.h's
 *                pbrpc__clock_skew)
 *     4 ANSWER   answer the oldest held call (arg bit 0: with a failure; bit
 *                1: every held call)
 *     5 HALF     shutdown(SHUT_WR) of the client end
 *     6 SHUTDOWN pbrpc_server_shutdown(srv, drain_table[arg & 3])
 *     7 CLOSE    close the client end (what is unread is lost)
 *   Every op is followed by one pbrpc_server_process(srv, 0).
 *
 * Streams: the harness's HELLO announces PBRPC_FEATURES; f.S/Echo, f.S/Count
 * and f.S/Sum (see below) are registered; MESSAGE and WINDOW from the server
 * must name a call in flight.
 *
 * The handler (the request is a demo.EchoRequest): fail_status != 0 fails
 * the call with that status (an invalid one is refused by
 * pbrpc_call_set_status and the closure gets NULL with no status);
 * delay_ms != 0 holds the call; otherwise it answers at once.
 *
 * Checked beyond "no crash, no leak, no UB":
 * - the reply stream parses: preface, HELLO, then well-formed frames;
 * - a RESPONSE's call id has had more REQUEST frames written than responses
 *   read (the server never answers one call twice, nor a call never made);
 *   PONGs never outnumber PINGs written;
 * - nothing follows a GOAWAY with a failure status;
 * - once the client end is closed and held calls answered, the server closes
 *   the connection (within a bounded number of rounds and clock advances),
 *   connections_open and calls_in_flight fall to 0, and after
 *   pbrpc_server_free() the process has exactly the file descriptors it had
 *   before the input.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "echo.pb-c.h"
#include "pbrpc/server.h"
#include "pbrpc/stream.h"
#include "proto/frame.h"
#include "proto/wire.h"
#include "server/server_impl.h"
#include "util/bytes.h"
#include "util/clock.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond, ...)                                                                             \
	do {                                                                                         \
		if (!(cond)) {                                                                       \
			fprintf(stderr, "fuzz_server_conn: %s:%d: %s: ", __FILE__, __LINE__, #cond); \
			fprintf(stderr, __VA_ARGS__);                                                \
			fputc('\n', stderr);                                                         \
			abort();                                                                     \
		}                                                                                    \
	} while (0)

static const int64_t time_table[8] = { 1, 10, 60, 120, 250, 1000, 6000, 60000 }; /* ms */
static const int drain_table[4] = { 0, 50, 1000, -1 };
static const uint32_t calls_table[4] = { 1, 2, 4, 16 };

/* ---- the service: inline, held and failing answers ---- */

#define HELD_MAX 64

typedef struct held {
	const Demo__EchoRequest *req;
	Demo__EchoReply_Closure closure;
	void *closure_data;
} held;

static held held_calls[HELD_MAX];
static size_t n_held;

static void fz_echo(Demo__Echo_Service *svc, const Demo__EchoRequest *req, Demo__EchoReply_Closure closure,
		    void *cd)
{
	size_t len;
	pid_t pid;
	uid_t uid;
	gid_t gid;
	(void)pbrpc_call_metadata(cd, "k", &len);
	(void)pbrpc_call_deadline(cd);
	(void)pbrpc_call_peer_cred(cd, &pid, &uid, &gid);
	const char *m = pbrpc_call_method(cd);
	CHECK(m && strcmp(m, "demo.Echo/Echo") == 0, "method %s", m ? m : "(null)");
	if (req->fail_status) {
		/* above 16 is refused: the closure then reports no status */
		int rc = pbrpc_call_set_status(cd, (int)(req->fail_status & 0x1f), "%s", req->fail_message);
		CHECK((rc == 0) == ((req->fail_status & 0x1f) <= 16), "set_status(%u): %d", req->fail_status & 0x1f, rc);
		closure(NULL, cd);
		return;
	}
	if (req->delay_ms && n_held < HELD_MAX) {
		held_calls[n_held++] = (held){ req, closure, cd };
		return;
	}
	Demo__EchoReply reply = DEMO__ECHO_REPLY__INIT;
	reply.payload = req->payload;
	closure(&reply, cd);
}

static Demo__Echo_Service echo_svc = DEMO__ECHO__INIT(fz_);

/* ---- streams (PROTOCOL.md section 11): f.S/Echo bidi echoes and ends on
 * fail_status or the half-close; f.S/Count sends delay_ms & 255 messages as
 * credit allows; f.S/Sum answers one reply at the half-close. Every one ends
 * its stream when told it is over. ---- */

static const pbrpc_stream_desc fz_echo_stream = { "f.S/Echo", PBRPC_STREAM_BIDI, &demo__echo_request__descriptor,
						  &demo__echo_reply__descriptor };
static const pbrpc_stream_desc fz_count_stream = { "f.S/Count", PBRPC_STREAM_SERVER,
						   &demo__echo_request__descriptor, &demo__echo_reply__descriptor };
static const pbrpc_stream_desc fz_sum_stream = { "f.S/Sum", PBRPC_STREAM_CLIENT, &demo__echo_request__descriptor,
						 &demo__echo_reply__descriptor };

static void st_over(pbrpc_stream *st, void *user)
{
	(void)user;
	CHECK(pbrpc_stream_cancelled(st) && pbrpc_stream_status(st) >= 0, "on_cancel of a live stream");
	CHECK(pbrpc_stream_end(st, 0, NULL, NULL) == PBRPC_ECLOSED, "end after the cancel");
}

static void st_echo_msg(pbrpc_stream *st, const ProtobufCMessage *m, void *user)
{
	(void)user;
	const Demo__EchoRequest *q = (const Demo__EchoRequest *)m;
	if (q->fail_status) {
		pbrpc_stream_end(st, (int)(q->fail_status & 0x1f), NULL, "%s", q->fail_message);
		return;
	}
	Demo__EchoReply r = DEMO__ECHO_REPLY__INIT;
	r.payload = q->payload;
	int rc = pbrpc_stream_send(st, &r.base);
	CHECK(rc == 0 || rc == -EAGAIN || rc == PBRPC_ETOOBIG, "stream send: %s", pbrpc_strerror(rc));
}

static void st_half(pbrpc_stream *st, void *user)
{
	(void)user;
	Demo__EchoReply r = DEMO__ECHO_REPLY__INIT;
	pbrpc_stream_end(st, PBRPC_STATUS_OK, pbrpc_stream_get_kind(st) == PBRPC_STREAM_CLIENT ? &r.base : NULL, NULL);
}

static const pbrpc_stream_ops st_echo_ops = { .on_message = st_echo_msg, .on_half_close = st_half,
					      .on_cancel = st_over };

static void st_echo(pbrpc_stream *st, const ProtobufCMessage *req, void *user)
{
	(void)req;
	(void)user;
	(void)pbrpc_stream_metadata(st, "k", NULL);
	(void)pbrpc_stream_deadline(st);
	pbrpc_stream_set_ops(st, &st_echo_ops, NULL);
}

static void st_count_pump(pbrpc_stream *st, void *user)
{
	unsigned *left = user;
	Demo__EchoReply r = DEMO__ECHO_REPLY__INIT;
	while (*left) {
		int rc = pbrpc_stream_send(st, &r.base);
		if (rc == -EAGAIN)
			return;
		CHECK(rc == 0, "stream send: %s", pbrpc_strerror(rc));
		(*left)--;
	}
	free(left);
	pbrpc_stream_end(st, PBRPC_STATUS_OK, NULL, NULL);
}

static void st_count_over(pbrpc_stream *st, void *user)
{
	free(user);
	st_over(st, NULL);
}

static const pbrpc_stream_ops st_count_ops = { .on_writable = st_count_pump, .on_cancel = st_count_over };

static void st_count(pbrpc_stream *st, const ProtobufCMessage *req, void *user)
{
	(void)user;
	unsigned *left = malloc(sizeof(*left));
	CHECK(left, "malloc");
	*left = ((const Demo__EchoRequest *)req)->delay_ms & 255;
	pbrpc_stream_set_ops(st, &st_count_ops, left);
	st_count_pump(st, left);
}

static const pbrpc_stream_ops st_sum_ops = { .on_half_close = st_half, .on_cancel = st_over };

static void st_sum(pbrpc_stream *st, const ProtobufCMessage *req, void *user)
{
	(void)req;
	(void)user;
	pbrpc_stream_set_ops(st, &st_sum_ops, NULL); /* no on_message: held, then stalled by the window */
}

static void answer_held(bool fail)
{
	if (!n_held)
		return;
	held h = held_calls[0];
	memmove(held_calls, held_calls + 1, (--n_held) * sizeof(held));
	(void)pbrpc_call_cancelled(h.closure_data);
	if (fail || h.req->delay_ms & 1) {
		pbrpc_call_set_status(h.closure_data, PBRPC_STATUS_ABORTED, "held call %u failed", h.req->delay_ms);
		h.closure(NULL, h.closure_data);
		return;
	}
	Demo__EchoReply reply = DEMO__ECHO_REPLY__INIT;
	reply.payload = h.req->payload;
	h.closure(&reply, h.closure_data);
}

static void log_cb(void *user, pbrpc_log_level level, const char *msg)
{
	(void)user, (void)level;
	CHECK(msg != NULL, "NULL log message");
}

/* ---- the harness's model of both directions ---- */

#define IDS_MAX 1024

typedef struct id_count {
	uint32_t id, reqs, resps;
} id_count;

typedef struct model {
	/* what the client end wrote: frame headers, parsed as the server must */
	uint8_t hdr[PBRPC_FRAME_HEADER_SIZE];
	size_t hdr_got;
	uint64_t skip;    /* payload bytes of the current frame still to come */
	size_t preface_left;
	bool out_dead;    /* reserved bits or a bad preface: the server stops there */
	uint64_t pings;
	id_count ids[IDS_MAX];
	size_t n_ids;
	bool ids_full;

	/* what the server wrote */
	pbrpc__frame_decoder dec;
	uint8_t preface[PBRPC_WIRE_PREFACE_SIZE];
	size_t preface_got;
	bool hello_seen;
	bool failed;      /* a GOAWAY with a failure status arrived */
	uint64_t pongs;
} model;

static id_count *id_find(model *m, uint32_t id, bool add)
{
	for (size_t i = 0; i < m->n_ids; i++)
		if (m->ids[i].id == id)
			return &m->ids[i];
	if (!add)
		return NULL;
	if (m->n_ids == IDS_MAX) {
		m->ids_full = true;
		return NULL;
	}
	m->ids[m->n_ids] = (id_count){ id, 0, 0 };
	return &m->ids[m->n_ids++];
}

/* Bytes the client end has written. */
static void model_sent(model *m, const uint8_t *p, size_t n)
{
	while (n && !m->out_dead) {
		if (m->preface_left) {
			size_t k = n < m->preface_left ? n : m->preface_left;
			size_t at = PBRPC_WIRE_PREFACE_SIZE - m->preface_left;
			if (memcmp(p, &((const char *)PBRPC_WIRE_PREFACE)[at], k) != 0)
				m->out_dead = true;
			m->preface_left -= k;
			p += k, n -= k;
			continue;
		}
		if (m->skip) {
			size_t k = n < m->skip ? n : (size_t)m->skip;
			m->skip -= k;
			p += k, n -= k;
			continue;
		}
		size_t k = PBRPC_FRAME_HEADER_SIZE - m->hdr_got;
		if (k > n)
			k = n;
		memcpy(m->hdr + m->hdr_got, p, k);
		m->hdr_got += k;
		p += k, n -= k;
		if (m->hdr_got < PBRPC_FRAME_HEADER_SIZE)
			continue;
		m->hdr_got = 0;
		pbrpc__frame_header h;
		pbrpc__frame_header_decode(m->hdr, &h);
		if (h.reserved) {
			m->out_dead = true;
			break;
		}
		/* counted at the header: an oversized REQUEST is answered before
		 * its payload has arrived */
		if (h.type == PBRPC_FRAME_REQUEST) {
			id_count *c = id_find(m, h.stream, true);
			if (c)
				c->reqs++;
		} else if (h.type == PBRPC_FRAME_PING) {
			m->pings++;
		}
		m->skip = h.length;
	}
}

/* Bytes the server has written. */
static void model_received(model *m, const uint8_t *p, size_t n)
{
	CHECK(!m->failed || n == 0, "%zu bytes after a failure GOAWAY", n);
	while (n && m->preface_got < PBRPC_WIRE_PREFACE_SIZE) {
		m->preface[m->preface_got++] = *p++;
		n--;
		if (m->preface_got == PBRPC_WIRE_PREFACE_SIZE)
			CHECK(memcmp(m->preface, PBRPC_WIRE_PREFACE, PBRPC_WIRE_PREFACE_SIZE) == 0, "bad preface");
	}
	if (!n)
		return;
	pbrpc__frame_decoder_feed(&m->dec, p, n);
	pbrpc__frame f;
	int rc;
	while ((rc = pbrpc__frame_decoder_next(&m->dec, &f)) == 1) {
		CHECK(!m->failed, "a %s frame after a failure GOAWAY", pbrpc__wire_frame_name(f.hdr.type));
		CHECK(pbrpc__wire_check_header(&f.hdr) == 0, "server sent a bad %s header (flags %#x, stream %u, len %u)",
		      pbrpc__wire_frame_name(f.hdr.type), f.hdr.flags, f.hdr.stream, f.hdr.length);
		if (!m->hello_seen) {
			CHECK(f.hdr.type == PBRPC_FRAME_HELLO, "first frame is %s", pbrpc__wire_frame_name(f.hdr.type));
			pbrpc_hello h;
			CHECK(pbrpc__wire_read_hello(&f, &h) == 0, "server's HELLO does not parse");
			m->hello_seen = true;
			continue;
		}
		switch (f.hdr.type) {
		case PBRPC_FRAME_RESPONSE: {
			pbrpc__wire_response r;
			CHECK(pbrpc__wire_read_response(&f, &r) == 0, "server's RESPONSE does not parse");
			CHECK(r.status >= 0 && r.status <= 16, "status %d", r.status);
			id_count *c = id_find(m, r.call_id, false);
			if (!c && m->ids_full)
				break;
			CHECK(c && c->resps < c->reqs, "call %u answered %u times after %u requests", r.call_id,
			      c ? c->resps + 1 : 1, c ? c->reqs : 0);
			c->resps++;
			break;
		}
		case PBRPC_FRAME_PONG:
			CHECK(m->pongs < m->pings, "PONG %llu after %llu PINGs", (unsigned long long)m->pongs + 1,
			      (unsigned long long)m->pings);
			m->pongs++;
			break;
		case PBRPC_FRAME_GOAWAY: {
			int status;
			const char *msg;
			size_t len;
			CHECK(pbrpc__wire_read_goaway(&f, &status, &msg, &len) == 0, "server's GOAWAY does not parse");
			if (status != PBRPC_STATUS_OK)
				m->failed = true;
			break;
		}
		case PBRPC_FRAME_PING:
			break; /* a server may ping too */
		case PBRPC_FRAME_MESSAGE:
		case PBRPC_FRAME_WINDOW: {
			/* streams: only for a call in flight */
			id_count *c = id_find(m, f.hdr.stream, false);
			if (!c && m->ids_full)
				break;
			CHECK(c && c->resps < c->reqs, "%s for call %u, not in flight", pbrpc__wire_frame_name(f.hdr.type),
			      f.hdr.stream);
			break;
		}
		default:
			CHECK(false, "server sent %s", pbrpc__wire_frame_name(f.hdr.type));
		}
	}
	CHECK(rc == 0, "reply stream: %s", pbrpc_strerror(rc));
}

/* ---- the client end ---- */

typedef struct peer {
	int fd; /* -1 once closed */
	bool half;
	uint8_t *out; /* queued, not yet written */
	size_t out_len, out_cap;
	model m;
} peer;

static void peer_queue(peer *p, const uint8_t *b, size_t n)
{
	if (!n)
		return;
	if (p->out_len + n > p->out_cap) {
		size_t cap = (p->out_len + n) * 2;
		p->out = realloc(p->out, cap);
		CHECK(p->out != NULL, "realloc");
		p->out_cap = cap;
	}
	memcpy(p->out + p->out_len, b, n);
	p->out_len += n;
}

static void peer_flush(peer *p)
{
	if (p->fd < 0 || p->half) {
		p->out_len = 0;
		return;
	}
	while (p->out_len) {
		ssize_t n = send(p->fd, p->out, p->out_len, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				p->out_len = 0; /* the server has closed */
			return;
		}
		model_sent(&p->m, p->out, (size_t)n);
		memmove(p->out, p->out + n, p->out_len - (size_t)n);
		p->out_len -= (size_t)n;
	}
}

/* Reads up to `max` bytes (0: all there is). Returns false at end of stream. */
static bool peer_read(peer *p, size_t max)
{
	uint8_t buf[4096];
	size_t got = 0;
	while (p->fd >= 0 && (max == 0 || got < max)) {
		size_t want = sizeof(buf);
		if (max && max - got < want)
			want = max - got;
		ssize_t n = recv(p->fd, buf, want, MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return true;
		if (n <= 0)
			return false; /* EOF or ECONNRESET */
		model_received(&p->m, buf, (size_t)n);
		got += (size_t)n;
	}
	return true;
}

static void peer_close(peer *p)
{
	if (p->fd >= 0)
		close(p->fd);
	p->fd = -1;
	p->out_len = 0;
}

/* ---- helpers ---- */

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	CHECK(d != NULL, "opendir: %s", strerror(errno));
	int n = 0;
	struct dirent *e;
	while ((e = readdir(d)) != NULL)
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n - 1; /* the directory's own fd */
}

static int connect_to(const char *name)
{
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	CHECK(fd >= 0, "socket: %s", strerror(errno));
	int sz = 4096;
	setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	size_t len = strlen(name);
	memcpy(a.sun_path + 1, name, len);
	int rc = connect(fd, (struct sockaddr *)&a, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len));
	CHECK(rc == 0, "connect: %s", strerror(errno));
	return fd;
}

static bool shut_down; /* pbrpc_server_process() said the shutdown completed */

static void process(pbrpc_server *srv)
{
	int rc = pbrpc_server_process(srv, 0);
	CHECK(rc >= 0, "process: %s", pbrpc_strerror(rc));
	if (rc == 1)
		shut_down = true;
}

static void advance(int64_t ms)
{
	atomic_fetch_add_explicit(&pbrpc__clock_skew, ms * PBRPC__NS_PER_MS, memory_order_relaxed);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	static char name[64];
	if (!name[0])
		snprintf(name, sizeof(name), "pbrpc-fuzz-server-conn-%d", (int)getpid());
	atomic_store_explicit(&pbrpc__clock_skew, 0, memory_order_relaxed);
	shut_down = false;
	int fds_before = count_fds();

	uint8_t cfg = data[0];
	pbrpc_server_opts o = {
		.max_frame = cfg & 8 ? 256 : 4096,
		.max_calls = calls_table[(cfg >> 4) & 3],
		.max_connections = cfg & 0x80 ? 1 : 2,
		.handshake_timeout_ms = 100,
		.idle_timeout_ms = cfg & 0x40 ? 200 : 0,
		.max_output_queue = cfg & 4 ? 512 : 8192,
		.write_stall_timeout_ms = 300,
		.log = log_cb,
		.log_level = PBRPC_LOG_DEBUG,
	};
	pbrpc_server *srv;
	CHECK(pbrpc_server_new(&srv, &o) == 0, "pbrpc_server_new");
	CHECK(pbrpc_server_add_service(srv, &echo_svc.base) == 0, "add_service");
	CHECK(pbrpc_server_add_stream(srv, &fz_echo_stream, st_echo, NULL) == 0, "add_stream");
	CHECK(pbrpc_server_add_stream(srv, &fz_count_stream, st_count, NULL) == 0, "add_stream");
	CHECK(pbrpc_server_add_stream(srv, &fz_sum_stream, st_sum, NULL) == 0, "add_stream");
	CHECK(pbrpc_server_enable_health(srv) == 0, "enable_health");
	char ep[96];
	snprintf(ep, sizeof(ep), "unix:@%s", name);
	int li = pbrpc_server_listen(srv, ep);
	CHECK(li >= 0, "listen %s: %s", ep, pbrpc_strerror(li));

	static peer p; /* static: the model's id table is large */
	memset(&p, 0, sizeof(p));
	p.m.preface_left = PBRPC_WIRE_PREFACE_SIZE;
	pbrpc__frame_decoder_init(&p.m.dec, PBRPC_MAX_FRAME_DEFAULT);
	p.fd = connect_to(name);
	process(srv);
	CHECK(srv->stats.connections_open == 1, "not accepted");
	/* a small send buffer on the server's side too, so that a small input
	 * fills it and the server's output queue backs up */
	pbrpc__list_for_each(c, &srv->conns, srv_conn, link) {
		int sz = 4096;
		setsockopt(c->base.fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
	}
	if (cfg & 0x80) {
		/* over max_connections: refused with a GOAWAY */
		int fd2 = connect_to(name);
		process(srv);
		close(fd2);
	}
	if ((cfg & 3) != 3) {
		pbrpc__frame_writer w;
		pbrpc__frame_writer_init(&w);
		/* streams in effect, with a small window (bit 7) or the default */
		pbrpc_hello h = { .version = PBRPC_WIRE_VERSION, .max_frame = cfg & 0x80 ? 64 : 0, .agent = "fuzz",
				  .features = PBRPC_FEATURES, .stream_window = cfg & 0x80 ? 100 : 0 };
		CHECK(pbrpc__wire_write_preface(&w, &h) == 0, "write_preface");
		peer_queue(&p, w.buf + w.head, pbrpc__frame_writer_pending(&w));
		pbrpc__frame_writer_fini(&w);
		peer_flush(&p);
		process(srv);
	}

	size_t i = 1;
	while (i < size) {
		uint8_t op = data[i++];
		unsigned arg = op >> 3;
		switch (op & 7) {
		case 0: {
			if (i >= size)
				break;
			uint8_t l = data[i++];
			size_t n = l & 0x80 ? (size_t)(l & 0x7f) * 64 : (size_t)l + 1;
			if (n > size - i)
				n = size - i;
			peer_queue(&p, data + i, n);
			i += n;
			peer_flush(&p);
			break;
		}
		case 1:
			for (unsigned k = 0; k <= arg; k++)
				process(srv);
			break;
		case 2:
			if (!peer_read(&p, arg * 64))
				peer_close(&p);
			break;
		case 3:
			advance(time_table[arg & 7]);
			break;
		case 4:
			if (arg & 2)
				while (n_held)
					answer_held(arg & 1);
			else
				answer_held(arg & 1);
			break;
		case 5:
			if (p.fd >= 0 && !p.half) {
				peer_flush(&p);
				shutdown(p.fd, SHUT_WR);
				p.half = true;
			}
			break;
		case 6:
			pbrpc_server_shutdown(srv, drain_table[arg & 3]);
			break;
		case 7:
			peer_close(&p);
			break;
		}
		process(srv);
		peer_flush(&p);
	}

	/* The end: answer what is held, read what comes, then hang up, and the
	 * server must let the connection go. */
	for (int k = 0; k < 4; k++) {
		while (n_held)
			answer_held(false);
		process(srv);
		peer_flush(&p);
		if (!peer_read(&p, 0))
			break;
	}
	peer_close(&p);
	/* requests already in the server's socket may still run */
	for (int k = 0; k < 64 && (srv->stats.connections_open || n_held); k++) {
		while (n_held)
			answer_held(false);
		process(srv);
		if (k % 8 == 7)
			advance(1000);
	}
	CHECK(srv->stats.connections_open == 0, "the connection outlived its peer");
	/* once the shutdown has completed, process() does nothing more: closures
	 * called after it stay counted until pbrpc_server_free() */
	CHECK(shut_down || srv->stats.calls_in_flight == 0, "%llu calls in flight with no connection",
	      (unsigned long long)srv->stats.calls_in_flight);
	CHECK(n_held == 0, "a call held after the end");
	pbrpc_server_free(srv);
	pbrpc__frame_decoder_fini(&p.m.dec);
	free(p.out);
	p.out = NULL;
	int fds_after = count_fds();
	CHECK(fds_after == fds_before, "%d file descriptors before, %d after", fds_before, fds_after);
	return 0;
}
