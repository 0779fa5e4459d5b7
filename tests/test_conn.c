/* Tests for the connection core (lib/conn/conn.h), driven directly over a
 * socketpair: either two conns, one per role, or one conn and a raw peer
 * that writes and reads frames with the frame and wire codecs.
 *
 * The tests step the conn by hand (recv, dispatch, flush, expire) and check
 * the callbacks it made, its state, and the exact frames it put on the wire.
 * Clock readings passed to flush/expire are synthetic where the test is
 * about time.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "conn/conn.h"
#include "proto/frame.h"
#include "proto/wire.h"
#include "testutil.h"
#include "util/bytes.h"
#include "util/list.h"

#define HS PBRPC_FRAME_HEADER_SIZE
#define MS PBRPC__NS_PER_MS

TestSuite(conn, .init = tu_setup, .timeout = 60);

/* ---- a conn with recorded callbacks ---- */

typedef struct tconn {
	pbrpc__conn c;
	int opens, closes, goaways, requests, cancels, responses;
	int close_err;
	char why[300];
	pbrpc__conn_state state_at_close;
	pbrpc__frame_header req_hdr;
	uint32_t cancel_id;
	uint32_t resp_id;
	int resp_status;
	char resp_msg[300];
	bool stop_on_response;     /* on_response returns this */
	bool fail_in_on_close;     /* on_close calls pbrpc__conn_fail (re-entrancy) */
	void *resp_arg;
} tconn;

static tconn *T(pbrpc__conn *c)
{
	return pbrpc__container_of(c, tconn, c);
}

static void cb_open(pbrpc__conn *c)
{
	cr_assert_eq(c->state, PBRPC__CONN_OPEN);
	T(c)->opens++;
}

static void cb_request(pbrpc__conn *c, const pbrpc__frame *f)
{
	cr_assert_eq(c->role, PBRPC__CONN_SERVER);
	T(c)->requests++;
	T(c)->req_hdr = f->hdr;
}

static void cb_cancel(pbrpc__conn *c, uint32_t id)
{
	T(c)->cancels++;
	T(c)->cancel_id = id;
}

static bool cb_response(pbrpc__conn *c, const pbrpc__wire_response *r, void *arg)
{
	tconn *t = T(c);
	t->responses++;
	t->resp_id = r->call_id;
	t->resp_status = r->status;
	t->resp_arg = arg;
	snprintf(t->resp_msg, sizeof(t->resp_msg), "%.*s", (int)r->message_len, r->message ? r->message : "");
	return t->stop_on_response;
}

static void cb_goaway(pbrpc__conn *c)
{
	cr_assert(c->draining);
	T(c)->goaways++;
}

static void cb_close(pbrpc__conn *c, int err, const char *why)
{
	tconn *t = T(c);
	cr_assert_eq(c->state, PBRPC__CONN_CLOSED);
	t->closes++;
	t->close_err = err;
	t->state_at_close = (pbrpc__conn_state)c->closed_in;
	snprintf(t->why, sizeof(t->why), "%s", why);
	if (t->fail_in_on_close)
		pbrpc__conn_fail(c, PBRPC_STATUS_INTERNAL, PBRPC_EPROTO, "nested %d", 1);
}

static const pbrpc__conn_ops ops = {
	.on_open = cb_open,
	.on_request = cb_request,
	.on_cancel = cb_cancel,
	.on_response = cb_response,
	.on_goaway = cb_goaway,
	.on_close = cb_close,
};

static pbrpc_hello hello_v(uint32_t version, uint32_t max_frame, const char *agent)
{
	pbrpc_hello h = { .version = version, .max_frame = max_frame };
	snprintf(h.agent, sizeof(h.agent), "%s", agent);
	return h;
}

static void tconn_init(tconn *t, int fd, pbrpc__conn_role role, uint32_t max_frame)
{
	memset(t, 0, sizeof(*t));
	pbrpc_hello h = hello_v(PBRPC_WIRE_VERSION, max_frame, role == PBRPC__CONN_SERVER ? "t-server" : "t-client");
	cr_assert_eq(pbrpc__conn_init(&t->c, fd, role, &ops, &h), 0);
	cr_assert_eq(t->c.state, PBRPC__CONN_PREFACE);
	cr_assert_eq(t->c.goaway_sent, -1);
	cr_assert_gt(pbrpc__conn_pending_out(&t->c), PBRPC_WIRE_PREFACE_SIZE, "preface and HELLO queued");
}

/* Reads what is available (without blocking) and dispatches it; flushes
 * before and after. scratch: read through a caller buffer. */
static void pump(tconn *t, bool scratch)
{
	pbrpc__conn *c = &t->c;
	uint8_t buf[4096];
	if (!pbrpc__conn_closed(c))
		cr_assert_geq(pbrpc__conn_flush(c, 0), 0);
	while (!pbrpc__conn_closed(c)) {
		ssize_t n = pbrpc__conn_recv(c, scratch ? buf : NULL, sizeof(buf), MSG_DONTWAIT);
		if (n == 0)
			break;
		if (n < 0) {
			pbrpc__conn_read_failed(c, (int)n);
			break;
		}
		while (pbrpc__conn_dispatch(c, NULL) == 1)
			;
	}
	if (!pbrpc__conn_closed(c))
		cr_assert_geq(pbrpc__conn_flush(c, 0), 0);
}

/* ---- the raw peer ---- */

typedef struct raw {
	int fd;
	pbrpc__frame_decoder dec;
	pbrpc__frame_writer w;
	pbrpc__frame f; /* the last frame read */
} raw;

static void raw_init(raw *r, int fd)
{
	r->fd = fd;
	pbrpc__frame_decoder_init(&r->dec, 0);
	pbrpc__frame_writer_init(&r->w);
}

static void raw_fini(raw *r)
{
	pbrpc__frame_decoder_fini(&r->dec);
	pbrpc__frame_writer_fini(&r->w);
	close(r->fd);
}

/* Sends everything queued in r->w (blocking). */
static void raw_send(raw *r)
{
	while (pbrpc__frame_writer_pending(&r->w)) {
		ssize_t n = pbrpc__frame_writer_flush(&r->w, r->fd, 0);
		cr_assert_geq(n, 0, "raw send: %s", pbrpc_strerror((int)n));
	}
}

static void raw_bytes(raw *r, const void *p, size_t len)
{
	tu_write_full(r->fd, p, len);
}

static void raw_hello(raw *r, uint32_t version, uint32_t max_frame, uint32_t max_calls)
{
	pbrpc_hello h = hello_v(version, max_frame, "raw-peer/1");
	h.max_calls = max_calls;
	h.features = 0x55;
	cr_assert_eq(pbrpc__wire_write_preface(&r->w, &h), 0);
	raw_send(r);
}

static void raw_frame(raw *r, uint8_t type, uint8_t flags, uint32_t stream, const void *payload, size_t len)
{
	pbrpc__frame_header h = { .type = type, .flags = flags, .stream = stream };
	cr_assert_eq(pbrpc__frame_writer_append(&r->w, &h, payload, len), 0);
	raw_send(r);
}

static void raw_goaway(raw *r, int status, const char *msg)
{
	cr_assert_eq(pbrpc__wire_write_goaway(&r->w, status, msg), 0);
	raw_send(r);
}

static void raw_request(raw *r, uint32_t id, const char *method, const void *body, size_t body_len)
{
	pbrpc__wire_request q = { .call_id = id, .method = method, .method_len = strlen(method), .body = body,
				  .body_len = body_len };
	cr_assert_eq(pbrpc__wire_write_request(&r->w, &q, NULL, 0), 0);
	raw_send(r);
}

static void raw_response(raw *r, uint32_t id, int status, const char *msg)
{
	pbrpc__wire_response s = { .call_id = id, .status = status, .message = msg,
				   .message_len = msg ? strlen(msg) : 0 };
	cr_assert_eq(pbrpc__wire_write_response(&r->w, &s, NULL, 0), 0);
	raw_send(r);
}

/* Reads the conn's 8-byte preface. */
static void raw_expect_preface(raw *r)
{
	uint8_t p[PBRPC_WIRE_PREFACE_SIZE];
	cr_assert_eq(tu_read_full(r->fd, p, sizeof(p)), sizeof(p));
	cr_assert_arr_eq(p, PBRPC_WIRE_PREFACE, sizeof(p));
}

static const pbrpc__frame *raw_next(raw *r)
{
	int rc = pbrpc__frame_read(&r->dec, r->fd, &r->f, 2000);
	cr_assert_eq(rc, 1, "raw read: %s", pbrpc_strerror(rc));
	return &r->f;
}

static const pbrpc__frame *raw_expect(raw *r, uint8_t type)
{
	const pbrpc__frame *f = raw_next(r);
	cr_assert_eq(f->hdr.type, type, "got a %s frame, want %s", pbrpc__wire_frame_name(f->hdr.type),
		     pbrpc__wire_frame_name(type));
	return f;
}

static void raw_expect_hello(raw *r, uint32_t max_frame)
{
	pbrpc_hello h;
	cr_assert_eq(pbrpc__wire_read_hello(raw_expect(r, PBRPC_FRAME_HELLO), &h), 0);
	cr_assert_eq(h.version, PBRPC_WIRE_VERSION);
	cr_assert_eq(h.max_frame, max_frame);
}

static void raw_expect_goaway(raw *r, int status, const char *msg)
{
	int st;
	const char *m;
	size_t ml;
	cr_assert_eq(pbrpc__wire_read_goaway(raw_expect(r, PBRPC_FRAME_GOAWAY), &st, &m, &ml), 0);
	cr_assert_eq(st, status, "GOAWAY %s (%.*s), want %s", pbrpc_status_name(st), (int)ml, m,
		     pbrpc_status_name(status));
	cr_assert_eq(ml, strlen(msg), "GOAWAY message \"%.*s\", want \"%s\"", (int)ml, m, msg);
	cr_assert_arr_eq(m, msg, ml, "GOAWAY message \"%.*s\", want \"%s\"", (int)ml, m, msg);
}

/* Nothing more arrives from the conn: a short poll sees no bytes. */
static void raw_expect_silence(raw *r)
{
	uint8_t b;
	ssize_t n = recv(r->fd, &b, 1, MSG_DONTWAIT);
	cr_assert(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK), "unexpected bytes from the conn (n=%zd)", n);
	cr_assert_eq(pbrpc__frame_decoder_pending(&r->dec), 0);
}

/* A conn of `role` on fds[0], the raw peer on fds[1]. */
static void setup(tconn *t, raw *r, pbrpc__conn_role role, uint32_t max_frame)
{
	int fds[2];
	tu_socketpair(fds);
	tconn_init(t, fds[0], role, max_frame);
	raw_init(r, fds[1]);
}

/* The same, taken through the handshake: both sides OPEN, the raw peer has
 * read the conn's preface and HELLO. */
static void setup_open(tconn *t, raw *r, pbrpc__conn_role role, uint32_t max_frame)
{
	setup(t, r, role, max_frame);
	raw_hello(r, PBRPC_WIRE_VERSION, 0, 0);
	pump(t, false);
	cr_assert_eq(t->c.state, PBRPC__CONN_OPEN);
	cr_assert_eq(t->opens, 1);
	cr_assert_eq(t->closes, 0);
	raw_expect_preface(r);
	raw_expect_hello(r, max_frame);
}

static void teardown(tconn *t, raw *r)
{
	pbrpc__conn_fini(&t->c);
	cr_assert_eq(t->c.fd, -1);
	raw_fini(r);
}

/* ======================================================================== */
/* handshake                                                                */
/* ======================================================================== */

Test(conn, handshake_two_conns)
{
	int fds[2];
	tu_socketpair(fds);
	tconn cl, sv;
	pbrpc_hello hc = hello_v(PBRPC_WIRE_VERSION, 1 << 20, "client-agent");
	hc.features = 0x1234;
	pbrpc_hello hs = hello_v(PBRPC_WIRE_VERSION, 0, "server-agent");
	hs.max_calls = 100;
	memset(&cl, 0, sizeof(cl));
	memset(&sv, 0, sizeof(sv));
	cr_assert_eq(pbrpc__conn_init(&cl.c, fds[0], PBRPC__CONN_CLIENT, &ops, &hc), 0);
	cr_assert_eq(pbrpc__conn_init(&sv.c, fds[1], PBRPC__CONN_SERVER, &ops, &hs), 0);
	cr_assert_eq(cl.c.max_frame, 1u << 20);
	cr_assert_eq(sv.c.max_frame, PBRPC_MAX_FRAME_DEFAULT, "0 is the default");
	cr_assert_eq(pbrpc__conn_events(&cl.c), EPOLLIN | EPOLLOUT);

	for (int i = 0; i < 10 && (cl.c.state != PBRPC__CONN_OPEN || sv.c.state != PBRPC__CONN_OPEN); i++) {
		pump(&cl, i % 2);
		pump(&sv, !(i % 2));
	}
	cr_assert_eq(cl.c.state, PBRPC__CONN_OPEN);
	cr_assert_eq(sv.c.state, PBRPC__CONN_OPEN);
	cr_assert_eq(cl.opens, 1);
	cr_assert_eq(sv.opens, 1);
	cr_assert_eq(cl.closes + sv.closes, 0);

	/* Each recorded the other's HELLO. */
	cr_assert_eq(cl.c.peer.version, PBRPC_WIRE_VERSION);
	cr_assert_str_eq(cl.c.peer.agent, "server-agent");
	cr_assert_eq(cl.c.peer.max_calls, 100);
	cr_assert_eq(cl.c.peer_max_calls, 100);
	cr_assert_eq(cl.c.peer.max_frame, 0);
	cr_assert_eq(cl.c.peer_max_frame, PBRPC_MAX_FRAME_DEFAULT, "a peer max_frame of 0 is 16 MiB");
	cr_assert_str_eq(sv.c.peer.agent, "client-agent");
	cr_assert_eq(sv.c.peer.features, 0x1234);
	cr_assert_eq(sv.c.peer_max_frame, 1u << 20);
	cr_assert_eq(sv.c.peer_max_calls, 0);
	cr_assert_eq(pbrpc__conn_pending_out(&cl.c), 0);
	cr_assert_eq(pbrpc__conn_pending_in(&sv.c), 0);
	cr_assert_eq(pbrpc__conn_events(&cl.c), EPOLLIN);
	cr_assert_eq(pbrpc__conn_deadline(&cl.c), 0);
	cr_assert_not(pbrpc__conn_drained(&cl.c));

	/* A request and a response across: the roles' frames flow. */
	pbrpc__wire_request q = { .call_id = 9, .method = "a.B/C", .method_len = 5 };
	cr_assert_eq(pbrpc__wire_write_request(&cl.c.out, &q, NULL, cl.c.peer_max_frame), 0);
	pump(&cl, false);
	pump(&sv, false);
	cr_assert_eq(sv.requests, 1);
	cr_assert_eq(sv.req_hdr.stream, 9);
	pbrpc__wire_response s = { .call_id = 9, .status = PBRPC_STATUS_NOT_FOUND, .message = "nope", .message_len = 4 };
	cr_assert_eq(pbrpc__wire_write_response(&sv.c.out, &s, NULL, sv.c.peer_max_frame), 0);
	pump(&sv, false);
	pump(&cl, true);
	cr_assert_eq(cl.responses, 1);
	cr_assert_eq(cl.resp_id, 9);
	cr_assert_eq(cl.resp_status, PBRPC_STATUS_NOT_FOUND);
	cr_assert_str_eq(cl.resp_msg, "nope");

	/* A graceful goaway from the server reaches the client. */
	pbrpc__conn_goaway(&sv.c, "bye");
	cr_assert(sv.c.draining);
	pbrpc__conn_goaway(&sv.c, "twice"); /* a no-op */
	pump(&sv, false);
	pump(&cl, false);
	pump(&sv, false);
	cr_assert_eq(cl.goaways, 1);
	cr_assert(cl.c.draining);
	cr_assert_eq(cl.closes + sv.closes, 0);
	cr_assert(pbrpc__conn_drained(&cl.c));
	cr_assert(pbrpc__conn_drained(&sv.c));

	pbrpc__conn_fini(&cl.c);
	pbrpc__conn_fini(&sv.c);
}

Test(conn, peer_max_frame_clamped)
{
	tconn t;
	raw r;
	setup(&t, &r, PBRPC__CONN_CLIENT, 0);
	raw_hello(&r, PBRPC_WIRE_VERSION, 0xFFFFFFFFu, 7);
	pump(&t, false);
	cr_assert_eq(t.c.state, PBRPC__CONN_OPEN);
	cr_assert_eq(t.c.peer.max_frame, 0xFFFFFFFFu, "the HELLO as received");
	cr_assert_eq(t.c.peer_max_frame, PBRPC_MAX_FRAME_LIMIT);
	cr_assert_eq(t.c.peer_max_calls, 7);
	cr_assert_eq(t.c.peer.features, 0x55);
	cr_assert_str_eq(t.c.peer.agent, "raw-peer/1");
	teardown(&t, &r);

	setup(&t, &r, PBRPC__CONN_SERVER, 0);
	raw_hello(&r, PBRPC_WIRE_VERSION, PBRPC_MAX_FRAME_LIMIT + 1, 0);
	pump(&t, true);
	cr_assert_eq(t.c.state, PBRPC__CONN_OPEN);
	cr_assert_eq(t.c.peer_max_frame, PBRPC_MAX_FRAME_LIMIT);
	teardown(&t, &r);

	setup(&t, &r, PBRPC__CONN_SERVER, 0);
	raw_hello(&r, PBRPC_WIRE_VERSION, 1000, 0);
	pump(&t, false);
	cr_assert_eq(t.c.peer_max_frame, 1000, "small values are kept");
	teardown(&t, &r);

	/* Our own max_frame above the limit is clamped too. */
	setup(&t, &r, PBRPC__CONN_SERVER, 0xFFFFFFFFu);
	cr_assert_eq(t.c.max_frame, PBRPC_MAX_FRAME_LIMIT);
	teardown(&t, &r);
}

Test(conn, bad_preface_byte)
{
	for (size_t bad = 0; bad < PBRPC_WIRE_PREFACE_SIZE; bad++) {
		tconn t;
		raw r;
		setup(&t, &r, PBRPC__CONN_SERVER, 0);
		uint8_t p[PBRPC_WIRE_PREFACE_SIZE];
		memcpy(p, PBRPC_WIRE_PREFACE, sizeof(p));
		p[bad] ^= 0x20;
		raw_bytes(&r, p, sizeof(p));
		pump(&t, bad % 2);
		cr_assert_eq(t.closes, 1, "bad byte %zu", bad);
		cr_assert_eq(t.close_err, PBRPC_EBADMAGIC);
		cr_assert_str_eq(t.why, "bad preface: peer is not a pbrpc client");
		cr_assert_eq(t.state_at_close, PBRPC__CONN_PREFACE);
		cr_assert_eq(t.c.goaway_sent, PBRPC_STATUS_INVALID_ARGUMENT);
		cr_assert_eq(t.opens, 0);
		raw_expect_preface(&r);
		raw_expect_hello(&r, 0);
		raw_expect_goaway(&r, PBRPC_STATUS_INVALID_ARGUMENT, "bad preface: peer is not a pbrpc client");
		teardown(&t, &r);
	}

	/* The client role names the server. */
	tconn t;
	raw r;
	setup(&t, &r, PBRPC__CONN_CLIENT, 0);
	raw_bytes(&r, "HTTP/1.1 400 Bad Request\r\n", 26);
	pump(&t, false);
	cr_assert_eq(t.close_err, PBRPC_EBADMAGIC);
	cr_assert_str_eq(t.why, "bad preface: peer is not a pbrpc server");
	raw_expect_preface(&r);
	raw_expect_hello(&r, 0);
	raw_expect_goaway(&r, PBRPC_STATUS_INVALID_ARGUMENT, "bad preface: peer is not a pbrpc server");
	teardown(&t, &r);
}

Test(conn, hello_version_2)
{
	pbrpc__conn_role roles[] = { PBRPC__CONN_SERVER, PBRPC__CONN_CLIENT };
	for (int i = 0; i < 2; i++) {
		tconn t;
		raw r;
		setup(&t, &r, roles[i], 0);
		raw_hello(&r, 2, 0, 0);
		pump(&t, false);
		cr_assert_eq(t.closes, 1);
		cr_assert_eq(t.close_err, PBRPC_EVERSION);
		cr_assert_str_eq(t.why, "unsupported protocol version 2, this peer speaks 1");
		cr_assert_eq(t.state_at_close, PBRPC__CONN_HELLO);
		cr_assert_eq(t.opens, 0);
		raw_expect_preface(&r);
		raw_expect_hello(&r, 0);
		raw_expect_goaway(&r, PBRPC_STATUS_FAILED_PRECONDITION, "unsupported protocol version 2, this peer speaks 1");
		teardown(&t, &r);
	}
}

Test(conn, non_hello_after_preface)
{
	tconn t;
	raw r;
	setup(&t, &r, PBRPC__CONN_SERVER, 0);
	raw_bytes(&r, PBRPC_WIRE_PREFACE, PBRPC_WIRE_PREFACE_SIZE);
	raw_frame(&r, PBRPC_FRAME_PING, 0, 0, "12345678", 8);
	pump(&t, false);
	cr_assert_eq(t.closes, 1);
	cr_assert_eq(t.close_err, PBRPC_EPROTO);
	cr_assert_str_eq(t.why, "expected HELLO, got a malformed PING frame");
	raw_expect_preface(&r);
	raw_expect_hello(&r, 0);
	raw_expect_goaway(&r, PBRPC_STATUS_INVALID_ARGUMENT, "expected HELLO, got a malformed PING frame");
	teardown(&t, &r);

	/* A HELLO whose payload is not a Hello message. */
	setup(&t, &r, PBRPC__CONN_SERVER, 0);
	raw_bytes(&r, PBRPC_WIRE_PREFACE, PBRPC_WIRE_PREFACE_SIZE);
	raw_frame(&r, PBRPC_FRAME_HELLO, 0, 0, "\xff\xff\xff", 3);
	pump(&t, false);
	cr_assert_eq(t.close_err, PBRPC_EPROTO);
	cr_assert_str_eq(t.why, "expected HELLO, got a malformed HELLO frame");
	teardown(&t, &r);

	/* A GOAWAY before the HELLO, at a server: a protocol error too. */
	setup(&t, &r, PBRPC__CONN_SERVER, 0);
	raw_bytes(&r, PBRPC_WIRE_PREFACE, PBRPC_WIRE_PREFACE_SIZE);
	raw_goaway(&r, PBRPC_STATUS_UNAVAILABLE, "x");
	pump(&t, false);
	cr_assert_eq(t.close_err, PBRPC_EPROTO);
	teardown(&t, &r);

	/* ... but at a client it is the server refusing: closed without a word. */
	setup(&t, &r, PBRPC__CONN_CLIENT, 0);
	raw_bytes(&r, PBRPC_WIRE_PREFACE, PBRPC_WIRE_PREFACE_SIZE);
	raw_goaway(&r, PBRPC_STATUS_FAILED_PRECONDITION, "old server");
	pump(&t, false);
	cr_assert_eq(t.closes, 1);
	cr_assert_eq(t.close_err, PBRPC_EVERSION);
	cr_assert_str_eq(t.why, "refused the connection: GOAWAY FAILED_PRECONDITION: old server");
	cr_assert_eq(t.c.goaway_sent, -1);
	teardown(&t, &r);

	setup(&t, &r, PBRPC__CONN_CLIENT, 0);
	raw_bytes(&r, PBRPC_WIRE_PREFACE, PBRPC_WIRE_PREFACE_SIZE);
	raw_goaway(&r, PBRPC_STATUS_RESOURCE_EXHAUSTED, "too many");
	pump(&t, false);
	cr_assert_eq(t.close_err, PBRPC_EGOAWAY);
	cr_assert_str_eq(t.why, "refused the connection: GOAWAY RESOURCE_EXHAUSTED: too many");
	teardown(&t, &r);
}

Test(conn, eof_during_handshake_and_after)
{
	tconn t;
	raw r;
	/* half a preface, then EOF */
	setup(&t, &r, PBRPC__CONN_SERVER, 0);
	raw_bytes(&r, PBRPC_WIRE_PREFACE, 3);
	shutdown(r.fd, SHUT_WR);
	pump(&t, false);
	cr_assert_eq(t.closes, 1);
	cr_assert_eq(t.close_err, PBRPC_ETRUNCATED);
	cr_assert_str_eq(t.why, "connection closed by client during the handshake");
	teardown(&t, &r);

	/* nothing at all, then EOF */
	setup(&t, &r, PBRPC__CONN_CLIENT, 0);
	shutdown(r.fd, SHUT_WR);
	pump(&t, true);
	cr_assert_eq(t.close_err, PBRPC_EOF);
	cr_assert_str_eq(t.why, "connection closed by server during the handshake");
	teardown(&t, &r);

	/* open, then EOF at a frame boundary, and inside a frame */
	setup_open(&t, &r, PBRPC__CONN_SERVER, 0);
	shutdown(r.fd, SHUT_WR);
	pump(&t, false);
	cr_assert_eq(t.close_err, PBRPC_EOF);
	cr_assert_str_eq(t.why, "connection closed by client");
	cr_assert_eq(t.state_at_close, PBRPC__CONN_OPEN);
	teardown(&t, &r);

	setup_open(&t, &r, PBRPC__CONN_SERVER, 0);
	raw_bytes(&r, "\0\0\0\x08\x05\0\0", 7);
	shutdown(r.fd, SHUT_WR);
	pump(&t, false);
	cr_assert_eq(t.close_err, PBRPC_ETRUNCATED);
	cr_assert_str_eq(t.why, "connection closed by client in the middle of a frame");
	teardown(&t, &r);
}

/* ======================================================================== */
/* connection-level frames                                                  */
/* ======================================================================== */

Test(conn, ping_answered_with_pong)
{
	pbrpc__conn_role roles[] = { PBRPC__CONN_SERVER, PBRPC__CONN_CLIENT };
	for (int i = 0; i < 2; i++) {
		tconn t;
		raw r;
		setup_open(&t, &r, roles[i], 0);
		const uint8_t data[8] = { 0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 0xff };
		raw_frame(&r, PBRPC_FRAME_PING, 0, 0, data, 8);
		raw_frame(&r, PBRPC_FRAME_PING, 0, 0, "abcdefgh", 8);
		pump(&t, i == 1);
		const pbrpc__frame *f = raw_expect(&r, PBRPC_FRAME_PONG);
		cr_assert_eq(f->hdr.length, 8);
		cr_assert_eq(f->hdr.stream, 0);
		cr_assert_eq(f->hdr.flags, 0);
		cr_assert_arr_eq(f->payload, data, 8);
		f = raw_expect(&r, PBRPC_FRAME_PONG);
		cr_assert_arr_eq(f->payload, "abcdefgh", 8);
		/* a PONG is taken silently */
		raw_frame(&r, PBRPC_FRAME_PONG, 0, 0, data, 8);
		pump(&t, false);
		cr_assert_eq(t.c.state, PBRPC__CONN_OPEN);
		raw_expect_silence(&r);
		/* a PING of the wrong size is a protocol error */
		raw_frame(&r, PBRPC_FRAME_PING, 0, 0, data, 7);
		pump(&t, false);
		cr_assert_eq(t.close_err, PBRPC_EPROTO);
		cr_assert_str_eq(t.why, "bad frame header (type 0x05, flags 0x00, stream 0, length 7)");
		raw_expect_goaway(&r, PBRPC_STATUS_INVALID_ARGUMENT, t.why);
		teardown(&t, &r);
	}
}

Test(conn, goaway_ok_drains)
{
	tconn t;
	raw r;
	setup_open(&t, &r, PBRPC__CONN_CLIENT, 0);
	raw_goaway(&r, PBRPC_STATUS_OK, "shutting down");
	pump(&t, false);
	cr_assert_eq(t.goaways, 1);
	cr_assert(t.c.draining);
	cr_assert_eq(t.c.state, PBRPC__CONN_OPEN);
	cr_assert_eq(t.closes, 0);
	raw_expect_silence(&r);
	/* Frames keep flowing while draining. */
	raw_response(&r, 3, PBRPC_STATUS_OK, NULL);
	pump(&t, false);
	cr_assert_eq(t.responses, 1);
	teardown(&t, &r);

	/* on_goaway is optional. */
	static const pbrpc__conn_ops min_ops = { .on_request = cb_request, .on_cancel = cb_cancel,
						 .on_response = cb_response, .on_close = cb_close };
	int fds[2];
	tu_socketpair(fds);
	memset(&t, 0, sizeof(t));
	pbrpc_hello h = hello_v(PBRPC_WIRE_VERSION, 0, "min");
	cr_assert_eq(pbrpc__conn_init(&t.c, fds[0], PBRPC__CONN_SERVER, &min_ops, &h), 0);
	raw_init(&r, fds[1]);
	raw_hello(&r, PBRPC_WIRE_VERSION, 0, 0);
	raw_goaway(&r, PBRPC_STATUS_OK, "");
	pump(&t, false);
	cr_assert_eq(t.c.state, PBRPC__CONN_OPEN);
	cr_assert_eq(t.opens, 0);
	cr_assert(t.c.draining);
	teardown(&t, &r);
}

Test(conn, goaway_error_closes)
{
	tconn t;
	raw r;
	setup_open(&t, &r, PBRPC__CONN_SERVER, 0);
	raw_goaway(&r, PBRPC_STATUS_UNAVAILABLE, "going away now");
	pump(&t, false);
	cr_assert_eq(t.closes, 1);
	cr_assert_eq(t.close_err, PBRPC_EGOAWAY);
	cr_assert_str_eq(t.why, "client sent GOAWAY: UNAVAILABLE: going away now");
	cr_assert_eq(t.goaways, 0);
	cr_assert_eq(t.c.goaway_sent, -1, "no GOAWAY back");
	raw_expect_silence(&r);
	teardown(&t, &r);
}

Test(conn, goaway_malformed)
{
	tconn t;
	raw r;
	setup_open(&t, &r, PBRPC__CONN_CLIENT, 0);
	/* message length says 5, only 2 bytes follow */
	raw_frame(&r, PBRPC_FRAME_GOAWAY, 0, 0, "\x00\x00\x00\x05hi", 6);
	pump(&t, false);
	cr_assert_eq(t.closes, 1);
	cr_assert_eq(t.close_err, PBRPC_EPROTO);
	cr_assert_str_eq(t.why, "malformed GOAWAY");
	cr_assert_eq(t.goaways, 0);
	raw_expect_goaway(&r, PBRPC_STATUS_INVALID_ARGUMENT, "malformed GOAWAY");
	teardown(&t, &r);

	/* shorter than its fixed part */
	setup_open(&t, &r, PBRPC__CONN_SERVER, 0);
	raw_frame(&r, PBRPC_FRAME_GOAWAY, 0, 0, "\x00\x00", 2);
	pump(&t, false);
	cr_assert_eq(t.close_err, PBRPC_EPROTO);
	cr_assert_str_eq(t.why, "malformed GOAWAY");
	teardown(&t, &r);
}

/* ======================================================================== */
/* roles                                                                    */
/* ======================================================================== */

Test(conn, role_checks)
{
	tconn t;
	raw r;
	/* RESPONSE at a server */
	setup_open(&t, &r, PBRPC__CONN_SERVER, 0);
	raw_response(&r, 1, PBRPC_STATUS_OK, NULL);
	pump(&t, false);
	cr_assert_eq(t.close_err, PBRPC_EPROTO);
	cr_assert_str_eq(t.why, "unexpected RESPONSE frame from the client");
	cr_assert_eq(t.responses, 0);
	raw_expect_goaway(&r, PBRPC_STATUS_INVALID_ARGUMENT, "unexpected RESPONSE frame from the client");
	teardown(&t, &r);

	/* REQUEST at a client */
	setup_open(&t, &r, PBRPC__CONN_CLIENT, 0);
	raw_request(&r, 1, "a.B/C", "x", 1);
	pump(&t, false);
	cr_assert_eq(t.close_err, PBRPC_EPROTO);
	cr_assert_str_eq(t.why, "unexpected REQUEST frame from the server");
	cr_assert_eq(t.requests, 0);
	raw_expect_goaway(&r, PBRPC_STATUS_INVALID_ARGUMENT, "unexpected REQUEST frame from the server");
	teardown(&t, &r);

	/* CANCEL at a client */
	setup_open(&t, &r, PBRPC__CONN_CLIENT, 0);
	raw_frame(&r, PBRPC_FRAME_CANCEL, 0, 4, NULL, 0);
	pump(&t, false);
	cr_assert_eq(t.close_err, PBRPC_EPROTO);
	cr_assert_str_eq(t.why, "unexpected CANCEL frame from the server");
	cr_assert_eq(t.cancels, 0);
	teardown(&t, &r);

	/* an unknown frame type */
	setup_open(&t, &r, PBRPC__CONN_SERVER, 0);
	raw_frame(&r, 0x42, 0, 0, NULL, 0);
	pump(&t, false);
	cr_assert_eq(t.close_err, PBRPC_EPROTO);
	cr_assert_str_eq(t.why, "bad frame header (type 0x42, flags 0x00, stream 0, length 0)");
	teardown(&t, &r);

	/* reserved bits set */
	setup_open(&t, &r, PBRPC__CONN_SERVER, 0);
	raw_bytes(&r, "\0\0\0\0\x06\0\0\x01\0\0\0\0", 12);
	pump(&t, false);
	cr_assert_eq(t.close_err, PBRPC_EPROTO);
	cr_assert_str_eq(t.why, "bad frame header (reserved bits set)");
	teardown(&t, &r);

	/* a malformed RESPONSE at a client */
	setup_open(&t, &r, PBRPC__CONN_CLIENT, 0);
	raw_frame(&r, PBRPC_FRAME_RESPONSE, PBRPC_RESPONSE_END, 8, "\x00", 1);
	pump(&t, false);
	cr_assert_eq(t.close_err, PBRPC_EPROTO);
	cr_assert_str_eq(t.why, "malformed RESPONSE for call 8");
	cr_assert_eq(t.responses, 0);
	teardown(&t, &r);
}

Test(conn, server_gets_request_and_cancel)
{
	tconn t;
	raw r;
	setup_open(&t, &r, PBRPC__CONN_SERVER, 0);
	raw_request(&r, 77, "demo.Echo/Echo", "body", 4);
	pump(&t, false);
	cr_assert_eq(t.requests, 1);
	cr_assert_eq(t.req_hdr.type, PBRPC_FRAME_REQUEST);
	cr_assert_eq(t.req_hdr.stream, 77);
	cr_assert_eq(t.req_hdr.length, 2 + 14 + 4);
	raw_frame(&r, PBRPC_FRAME_CANCEL, 0, 77, NULL, 0);
	pump(&t, true);
	cr_assert_eq(t.cancels, 1);
	cr_assert_eq(t.cancel_id, 77);
	cr_assert_eq(t.c.state, PBRPC__CONN_OPEN);
	cr_assert_eq(t.closes, 0);
	raw_expect_silence(&r);
	teardown(&t, &r);
}

Test(conn, client_response_stop_keeps_rest_buffered)
{
	tconn t;
	raw r;
	setup_open(&t, &r, PBRPC__CONN_CLIENT, 0);
	t.stop_on_response = true;
	/* Three RESPONSEs in one write. */
	const char *msgs[3] = { "first", "second", "third" };
	for (int i = 0; i < 3; i++) {
		pbrpc__wire_response s = { .call_id = (uint32_t)(10 + i), .status = PBRPC_STATUS_ABORTED + i,
					   .message = msgs[i], .message_len = strlen(msgs[i]) };
		cr_assert_eq(pbrpc__wire_write_response(&r.w, &s, NULL, 0), 0);
	}
	size_t total = pbrpc__frame_writer_pending(&r.w);
	raw_send(&r);

	size_t got = 0;
	while (got < total) {
		ssize_t n = pbrpc__conn_recv(&t.c, NULL, 0, 0);
		cr_assert_gt(n, 0);
		got += (size_t)n;
	}
	cr_assert_eq(pbrpc__conn_pending_in(&t.c), total);
	int arg;
	for (int i = 0; i < 3; i++) {
		cr_assert_eq(pbrpc__conn_dispatch(&t.c, &arg), 1, "response %d", i);
		cr_assert_eq(t.responses, i + 1);
		cr_assert_eq(t.resp_id, (uint32_t)(10 + i));
		cr_assert_eq(t.resp_status, PBRPC_STATUS_ABORTED + i);
		cr_assert_str_eq(t.resp_msg, msgs[i]);
		cr_assert_eq(t.resp_arg, &arg, "the dispatch argument is passed through");
		if (i < 2)
			cr_assert_gt(pbrpc__conn_pending_in(&t.c), 0, "the rest stays buffered");
	}
	cr_assert_eq(pbrpc__conn_pending_in(&t.c), 0);
	cr_assert_eq(pbrpc__conn_dispatch(&t.c, &arg), 0);
	cr_assert_eq(t.responses, 3);

	/* The same with the bytes read through a scratch buffer: the rest must
	 * survive in the decoder between dispatches. */
	uint8_t scratch[4096];
	for (int i = 0; i < 3; i++) {
		pbrpc__wire_response s = { .call_id = (uint32_t)(20 + i), .status = PBRPC_STATUS_OK };
		cr_assert_eq(pbrpc__wire_write_response(&r.w, &s, NULL, 0), 0);
	}
	total = pbrpc__frame_writer_pending(&r.w);
	raw_send(&r);
	ssize_t n = pbrpc__conn_recv(&t.c, scratch, sizeof(scratch), 0);
	cr_assert_gt(n, 0);
	if (!tu_short_io())
		cr_assert_eq((size_t)n, total);
	int seen = 0;
	for (;;) {
		int d;
		while ((d = pbrpc__conn_dispatch(&t.c, NULL)) == 1)
			cr_assert_eq(t.resp_id, (uint32_t)(20 + seen++));
		if (seen == 3)
			break;
		n = pbrpc__conn_recv(&t.c, scratch, sizeof(scratch), 0);
		cr_assert_gt(n, 0);
	}
	cr_assert_eq(t.responses, 6);
	cr_assert_eq(t.c.state, PBRPC__CONN_OPEN);
	teardown(&t, &r);
}

/* ======================================================================== */
/* oversized frames                                                         */
/* ======================================================================== */

Test(conn, oversized_request_answered)
{
	tconn t;
	raw r;
	setup_open(&t, &r, PBRPC__CONN_SERVER, 1024);
	uint8_t *body = calloc(1, 5000);
	cr_assert(body);
	raw_request(&r, 7, "a.B/C", body, 5000 - 7); /* payload 2 + 5 + 4993 = 5000 */
	raw_frame(&r, PBRPC_FRAME_PING, 0, 0, "after-it", 8);
	raw_request(&r, 8, "a.B/C", "ok", 2);
	pump(&t, false);
	cr_assert_eq(t.c.state, PBRPC__CONN_OPEN, "closed: %s", t.why);
	cr_assert_eq(t.closes, 0);
	cr_assert_eq(t.requests, 1, "only the small request reached the role");
	cr_assert_eq(t.req_hdr.stream, 8);

	pbrpc__wire_response s;
	cr_assert_eq(pbrpc__wire_read_response(raw_expect(&r, PBRPC_FRAME_RESPONSE), &s), 0);
	cr_assert_eq(s.call_id, 7);
	cr_assert_eq(s.status, PBRPC_STATUS_RESOURCE_EXHAUSTED);
	const char *want = "request is 5000 bytes, server accepts at most 1024";
	cr_assert_eq(s.message_len, strlen(want));
	cr_assert_arr_eq(s.message, want, s.message_len, "%.*s", (int)s.message_len, s.message);
	cr_assert_arr_eq(raw_expect(&r, PBRPC_FRAME_PONG)->payload, "after-it", 8);
	raw_expect_silence(&r);

	/* A request exactly at the limit is taken. */
	raw_request(&r, 9, "a.B/C", body, 1024 - 7);
	pump(&t, false);
	cr_assert_eq(t.requests, 2);
	cr_assert_eq(t.req_hdr.length, 1024);

	/* An oversized REQUEST for a call id already in flight is fatal. */
	int rec;
	cr_assert_eq(pbrpc__idmap_put(&t.c.calls, 9, &rec), 0);
	raw_request(&r, 9, "a.B/C", body, 2000);
	pump(&t, false);
	cr_assert_eq(t.closes, 1);
	cr_assert_eq(t.close_err, PBRPC_ETOOBIG);
	cr_assert_str_eq(t.why, "REQUEST frame of 2007 bytes exceeds the limit of 1024");
	raw_expect_goaway(&r, PBRPC_STATUS_RESOURCE_EXHAUSTED, "REQUEST frame of 2007 bytes exceeds the limit of 1024");
	free(body);
	teardown(&t, &r);
}

Test(conn, oversized_other_frames_fatal)
{
	uint8_t *big = calloc(1, 3000);
	cr_assert(big);
	tconn t;
	raw r;

	/* a RESPONSE at a client */
	setup_open(&t, &r, PBRPC__CONN_CLIENT, 1024);
	raw_frame(&r, PBRPC_FRAME_RESPONSE, PBRPC_RESPONSE_END, 3, big, 3000);
	pump(&t, false);
	cr_assert_eq(t.closes, 1);
	cr_assert_eq(t.close_err, PBRPC_ETOOBIG);
	cr_assert_str_eq(t.why, "RESPONSE frame of 3000 bytes exceeds the limit of 1024");
	cr_assert_eq(t.c.goaway_sent, PBRPC_STATUS_RESOURCE_EXHAUSTED);
	raw_expect_goaway(&r, PBRPC_STATUS_RESOURCE_EXHAUSTED, "RESPONSE frame of 3000 bytes exceeds the limit of 1024");
	teardown(&t, &r);

	/* a GOAWAY at a server */
	setup_open(&t, &r, PBRPC__CONN_SERVER, 1024);
	raw_frame(&r, PBRPC_FRAME_GOAWAY, 0, 0, big, 2000);
	pump(&t, false);
	cr_assert_eq(t.close_err, PBRPC_ETOOBIG);
	cr_assert_str_eq(t.why, "GOAWAY frame of 2000 bytes exceeds the limit of 1024");
	raw_expect_goaway(&r, PBRPC_STATUS_RESOURCE_EXHAUSTED, t.why);
	teardown(&t, &r);

	/* a REQUEST at a client */
	setup_open(&t, &r, PBRPC__CONN_CLIENT, 1024);
	raw_frame(&r, PBRPC_FRAME_REQUEST, 0, 5, big, 1025);
	pump(&t, false);
	cr_assert_eq(t.close_err, PBRPC_ETOOBIG);
	cr_assert_str_eq(t.why, "REQUEST frame of 1025 bytes exceeds the limit of 1024");
	teardown(&t, &r);

	/* a REQUEST on stream 0 at a server */
	setup_open(&t, &r, PBRPC__CONN_SERVER, 1024);
	raw_frame(&r, PBRPC_FRAME_REQUEST, 0, 0, big, 1025);
	pump(&t, false);
	cr_assert_eq(t.close_err, PBRPC_ETOOBIG);
	teardown(&t, &r);

	/* an oversized REQUEST before the handshake completed */
	setup(&t, &r, PBRPC__CONN_SERVER, 1024);
	raw_bytes(&r, PBRPC_WIRE_PREFACE, PBRPC_WIRE_PREFACE_SIZE);
	raw_frame(&r, PBRPC_FRAME_REQUEST, 0, 5, big, 1025);
	pump(&t, false);
	cr_assert_eq(t.close_err, PBRPC_ETOOBIG);
	cr_assert_eq(t.state_at_close, PBRPC__CONN_HELLO);
	raw_expect_preface(&r);
	raw_expect_hello(&r, 1024);
	raw_expect_goaway(&r, PBRPC_STATUS_RESOURCE_EXHAUSTED, "REQUEST frame of 1025 bytes exceeds the limit of 1024");
	teardown(&t, &r);
	free(big);
}

/* ======================================================================== */
/* closing                                                                  */
/* ======================================================================== */

Test(conn, on_close_exactly_once)
{
	tconn t;
	raw r;
	setup_open(&t, &r, PBRPC__CONN_SERVER, 0);
	/* A fatal frame followed by more: nothing after it is handled. */
	raw_response(&r, 1, PBRPC_STATUS_OK, NULL);
	raw_frame(&r, PBRPC_FRAME_PING, 0, 0, "12345678", 8);
	raw_request(&r, 2, "a.B/C", NULL, 0);
	pump(&t, false);
	cr_assert_eq(t.closes, 1);
	cr_assert_eq(t.close_err, PBRPC_EPROTO);
	cr_assert_eq(t.requests, 0);
	char why[sizeof(t.why)];
	memcpy(why, t.why, sizeof(why));
	size_t out = pbrpc__conn_pending_out(&t.c);

	/* Every way of closing again is a no-op. */
	pbrpc__conn_fail(&t.c, PBRPC_STATUS_INTERNAL, PBRPC_EGOAWAY, "again %d", 2);
	pbrpc__conn_close(&t.c, -ECONNRESET, "again");
	pbrpc__conn_read_failed(&t.c, PBRPC_EOF);
	pbrpc__conn_expire(&t.c, INT64_MAX);
	pbrpc__conn_goaway(&t.c, "late");
	cr_assert_eq(pbrpc__conn_dispatch(&t.c, NULL), 0);
	cr_assert_eq(pbrpc__conn_recv(&t.c, NULL, 0, MSG_DONTWAIT), PBRPC_ECLOSED);
	cr_assert_eq(pbrpc__conn_flush(&t.c, 0), 0);
	cr_assert_eq(t.closes, 1);
	cr_assert_eq(t.close_err, PBRPC_EPROTO);
	cr_assert_str_eq(t.why, why);
	cr_assert_eq(t.c.goaway_sent, PBRPC_STATUS_INVALID_ARGUMENT);
	cr_assert_eq(pbrpc__conn_pending_out(&t.c), out, "nothing queued after close");
	cr_assert_not(t.c.draining);
	cr_assert_eq(pbrpc__conn_events(&t.c), 0);
	cr_assert_eq(pbrpc__conn_deadline(&t.c), 0);
	cr_assert(pbrpc__conn_closed(&t.c));

	/* On the wire: the one GOAWAY, nothing after it (no PONG). */
	raw_expect_goaway(&r, PBRPC_STATUS_INVALID_ARGUMENT, why);
	raw_expect_silence(&r);
	teardown(&t, &r);
}

Test(conn, close_inside_on_close_is_a_noop)
{
	tconn t;
	raw r;
	setup_open(&t, &r, PBRPC__CONN_CLIENT, 0);
	t.fail_in_on_close = true;
	pbrpc__conn_fail(&t.c, PBRPC_STATUS_UNAVAILABLE, -ECONNABORTED, "first %s", "failure");
	cr_assert_eq(t.closes, 1);
	cr_assert_eq(t.close_err, -ECONNABORTED);
	cr_assert_str_eq(t.why, "first failure");
	cr_assert_eq(t.state_at_close, PBRPC__CONN_OPEN);
	raw_expect_goaway(&r, PBRPC_STATUS_UNAVAILABLE, "first failure");
	raw_expect_silence(&r);
	teardown(&t, &r);

	/* pbrpc__conn_close: no GOAWAY at all */
	setup_open(&t, &r, PBRPC__CONN_SERVER, 0);
	pbrpc__conn_close(&t.c, -ECONNRESET, "peer reset %d", 1);
	cr_assert_eq(t.closes, 1);
	cr_assert_eq(t.close_err, -ECONNRESET);
	cr_assert_str_eq(t.why, "peer reset 1");
	cr_assert_eq(t.c.goaway_sent, -1);
	pbrpc__conn_fail(&t.c, PBRPC_STATUS_INTERNAL, PBRPC_EPROTO, "late");
	cr_assert_eq(t.closes, 1);
	cr_assert_eq(t.c.goaway_sent, -1);
	raw_expect_silence(&r);
	teardown(&t, &r);
}

/* ======================================================================== */
/* deadlines                                                                */
/* ======================================================================== */

Test(conn, handshake_deadline)
{
	for (int stage = 0; stage < 2; stage++) {
		tconn t;
		raw r;
		setup(&t, &r, PBRPC__CONN_SERVER, 0);
		const int64_t T0 = 1000 * MS;
		cr_assert_eq(pbrpc__conn_deadline(&t.c), 0, "no policy, no deadline");
		t.c.handshake_deadline = T0 + 50 * MS;
		if (stage == 1) { /* the preface arrived, no HELLO */
			raw_bytes(&r, PBRPC_WIRE_PREFACE, PBRPC_WIRE_PREFACE_SIZE);
			pump(&t, false);
			cr_assert_eq(t.c.state, PBRPC__CONN_HELLO);
		}
		cr_assert_eq(pbrpc__conn_deadline(&t.c), T0 + 50 * MS);
		pbrpc__conn_expire(&t.c, T0);
		pbrpc__conn_expire(&t.c, T0 + 50 * MS - 1);
		cr_assert_eq(t.closes, 0);
		pbrpc__conn_expire(&t.c, T0 + 50 * MS);
		cr_assert_eq(t.closes, 1);
		cr_assert_eq(t.close_err, -ETIMEDOUT);
		cr_assert_str_eq(t.why, "handshake timed out");
		cr_assert_eq(t.state_at_close, stage ? PBRPC__CONN_HELLO : PBRPC__CONN_PREFACE);
		cr_assert_eq(pbrpc__conn_deadline(&t.c), 0);
		raw_expect_preface(&r);
		raw_expect_hello(&r, 0);
		raw_expect_goaway(&r, PBRPC_STATUS_UNAVAILABLE, "handshake timed out");
		teardown(&t, &r);
	}

	/* The HELLO in time clears the handshake deadline. */
	tconn t;
	raw r;
	setup(&t, &r, PBRPC__CONN_CLIENT, 0);
	t.c.handshake_deadline = 5 * MS;
	raw_hello(&r, PBRPC_WIRE_VERSION, 0, 0);
	pump(&t, false);
	cr_assert_eq(t.c.state, PBRPC__CONN_OPEN);
	cr_assert_eq(t.c.handshake_deadline, 0);
	cr_assert_eq(pbrpc__conn_deadline(&t.c), 0);
	pbrpc__conn_expire(&t.c, INT64_MAX / 2);
	cr_assert_eq(t.closes, 0);
	teardown(&t, &r);
}

Test(conn, idle_deadline)
{
	tconn t;
	raw r;
	setup_open(&t, &r, PBRPC__CONN_SERVER, 0);
	const int64_t T0 = 5000 * MS;
	t.c.idle_ns = 100 * MS;
	t.c.last_active = T0;
	cr_assert_eq(pbrpc__conn_deadline(&t.c), T0 + 100 * MS);

	/* A call in the map: no idle deadline, and expire does nothing. */
	int rec;
	cr_assert_eq(pbrpc__idmap_put(&t.c.calls, 42, &rec), 0);
	cr_assert_eq(pbrpc__conn_deadline(&t.c), 0);
	pbrpc__conn_expire(&t.c, T0 + 1000000 * MS);
	cr_assert_eq(t.closes, 0);
	cr_assert_eq(pbrpc__idmap_del(&t.c.calls, 42), &rec);
	cr_assert_eq(pbrpc__conn_deadline(&t.c), T0 + 100 * MS);

	/* idle_ns 0: no deadline */
	t.c.idle_ns = 0;
	cr_assert_eq(pbrpc__conn_deadline(&t.c), 0);
	pbrpc__conn_expire(&t.c, T0 + 1000000 * MS);
	cr_assert_eq(t.closes, 0);
	t.c.idle_ns = 100 * MS;

	pbrpc__conn_expire(&t.c, T0 + 100 * MS - 1);
	cr_assert_eq(t.closes, 0);
	pbrpc__conn_expire(&t.c, T0 + 100 * MS);
	cr_assert_eq(t.closes, 1);
	cr_assert_eq(t.close_err, -ETIMEDOUT);
	cr_assert_str_eq(t.why, "idle timeout");
	raw_expect_goaway(&r, PBRPC_STATUS_UNAVAILABLE, "idle timeout");
	teardown(&t, &r);
}

/* ======================================================================== */
/* output backpressure                                                      */
/* ======================================================================== */

/* Queues count RESPONSEs with body_len-byte bodies on c's output. */
static void queue_responses(pbrpc__conn *c, uint32_t first, size_t count, size_t body_len)
{
	uint8_t *body = malloc(body_len);
	cr_assert(body);
	memset(body, 0x5a, body_len);
	for (size_t i = 0; i < count; i++) {
		pbrpc__wire_response s = { .call_id = first + (uint32_t)i, .status = PBRPC_STATUS_OK, .body = body,
					   .body_len = body_len };
		cr_assert_eq(pbrpc__wire_write_response(&c->out, &s, NULL, 0), 0);
	}
	free(body);
}

typedef struct drain_stats {
	size_t responses, pongs, other;
} drain_stats;

/* Reads what the raw side has without blocking and counts the frames. */
static ssize_t raw_drain(raw *r, drain_stats *st)
{
	ssize_t total = 0;
	for (;;) {
		ssize_t n = pbrpc__frame_decoder_recv(&r->dec, r->fd, MSG_DONTWAIT);
		cr_assert_geq(n, 0, "raw recv: %s", pbrpc_strerror((int)n));
		pbrpc__frame f;
		int rc;
		while ((rc = pbrpc__frame_decoder_next(&r->dec, &f)) == 1) {
			if (f.hdr.type == PBRPC_FRAME_RESPONSE)
				st->responses++;
			else if (f.hdr.type == PBRPC_FRAME_PONG)
				st->pongs++;
			else
				st->other++;
		}
		cr_assert_eq(rc, 0);
		if (n == 0)
			return total;
		total += n;
	}
}

Test(conn, max_output_backpressure)
{
	tconn t;
	raw r;
	setup_open(&t, &r, PBRPC__CONN_SERVER, 0);
	tu_small_buffers(t.c.fd);
	tu_small_buffers(r.fd);
	const size_t MAX_OUT = 64 * 1024, COUNT = 400, BODY = 4000;
	t.c.max_output = MAX_OUT;
	t.c.stall_ns = 1000 * MS;
	queue_responses(&t.c, 1, COUNT, BODY);
	size_t queued = pbrpc__conn_pending_out(&t.c);
	cr_assert_gt(queued, 1000 * 1000);

	const int64_t T0 = 777 * MS;
	ssize_t n = pbrpc__conn_flush(&t.c, T0);
	cr_assert_gt(n, 0);
	cr_assert_lt((size_t)n, queued, "the socket took everything: buffers too large for the test");
	cr_assert_gt(pbrpc__conn_pending_out(&t.c), MAX_OUT);
	cr_assert(t.c.read_paused);
	cr_assert_not(t.c.resume);
	cr_assert_eq(t.c.stalled_since, T0);
	cr_assert_eq(pbrpc__conn_events(&t.c), EPOLLOUT, "paused: no EPOLLIN");
	cr_assert_eq(pbrpc__conn_deadline(&t.c), T0 + 1000 * MS, "the stall deadline");

	/* No progress: stalled_since stays. */
	cr_assert_eq(pbrpc__conn_flush(&t.c, T0 + 10 * MS), 0);
	cr_assert_eq(t.c.stalled_since, T0);
	cr_assert(t.c.read_paused);

	/* Frames that arrive meanwhile stay stashed: dispatch takes none. */
	raw_frame(&r, PBRPC_FRAME_PING, 0, 0, "pingpin1", 8);
	raw_frame(&r, PBRPC_FRAME_PING, 0, 0, "pingpin2", 8);
	raw_request(&r, 999, "a.B/C", NULL, 0);
	size_t in_bytes = 3 * HS + 8 + 8 + 2 + 5;
	size_t got = 0;
	while (got < in_bytes) {
		ssize_t k = pbrpc__conn_recv(&t.c, NULL, 0, 0);
		cr_assert_gt(k, 0);
		got += (size_t)k;
	}
	size_t out_before = pbrpc__conn_pending_out(&t.c);
	cr_assert_eq(pbrpc__conn_dispatch(&t.c, NULL), 0);
	cr_assert_eq(pbrpc__conn_pending_in(&t.c), in_bytes, "the frames wait in the decoder");
	cr_assert_eq(pbrpc__conn_pending_out(&t.c), out_before, "no PONG queued while paused");
	cr_assert_eq(t.requests, 0);

	/* The peer drains; flushing unpauses once below max_output / 2. */
	drain_stats st = { 0 };
	int64_t now = T0;
	for (int i = 0; i < 100000 && t.c.read_paused; i++) {
		raw_drain(&r, &st);
		now += MS;
		cr_assert_geq(pbrpc__conn_flush(&t.c, now), 0);
		if (t.c.read_paused)
			cr_assert_eq(pbrpc__conn_events(&t.c), EPOLLOUT);
	}
	cr_assert_not(t.c.read_paused);
	cr_assert(t.c.resume, "just unpaused");
	cr_assert_leq(pbrpc__conn_pending_out(&t.c), MAX_OUT / 2);
	cr_assert(pbrpc__conn_events(&t.c) & EPOLLIN);

	/* The stashed frames are handled now. */
	cr_assert_eq(pbrpc__conn_dispatch(&t.c, NULL), 0);
	cr_assert_not(t.c.resume);
	cr_assert_eq(pbrpc__conn_pending_in(&t.c), 0);
	cr_assert_eq(t.requests, 1);
	cr_assert_eq(t.req_hdr.stream, 999);
	for (int i = 0; i < 100000 && (pbrpc__conn_pending_out(&t.c) || st.pongs < 2); i++) {
		cr_assert_geq(pbrpc__conn_flush(&t.c, now), 0);
		raw_drain(&r, &st);
	}
	cr_assert_eq(st.responses, COUNT);
	cr_assert_eq(st.pongs, 2);
	cr_assert_eq(st.other, 0);
	cr_assert_eq(t.closes, 0);
	cr_assert_eq(pbrpc__conn_events(&t.c), EPOLLIN);
	teardown(&t, &r);
}

Test(conn, stall_expires)
{
	tconn t;
	raw r;
	setup_open(&t, &r, PBRPC__CONN_SERVER, 0);
	tu_small_buffers(t.c.fd);
	tu_small_buffers(r.fd);
	t.c.max_output = 32 * 1024;
	t.c.stall_ns = 50 * MS;
	queue_responses(&t.c, 1, 300, 4000);
	const int64_t T0 = 10000 * MS;
	cr_assert_gt(pbrpc__conn_flush(&t.c, T0), 0);
	cr_assert(t.c.read_paused);
	cr_assert_eq(pbrpc__conn_deadline(&t.c), T0 + 50 * MS);

	/* Progress restarts the wait. */
	drain_stats st = { 0 };
	cr_assert_gt(raw_drain(&r, &st), 0);
	const int64_t T1 = T0 + 30 * MS;
	cr_assert_gt(pbrpc__conn_flush(&t.c, T1), 0);
	cr_assert(t.c.read_paused);
	cr_assert_eq(t.c.stalled_since, T1);
	cr_assert_eq(pbrpc__conn_deadline(&t.c), T1 + 50 * MS);
	pbrpc__conn_expire(&t.c, T0 + 50 * MS);
	cr_assert_eq(t.closes, 0);

	/* No progress for stall_ns since T1: dropped. */
	size_t pending = pbrpc__conn_pending_out(&t.c);
	pbrpc__conn_expire(&t.c, T1 + 50 * MS);
	cr_assert_eq(t.closes, 1);
	cr_assert_eq(t.close_err, -ETIMEDOUT);
	char want[200];
	snprintf(want, sizeof(want), "client read none of its %zu queued reply bytes for 50 ms", pending);
	cr_assert_str_eq(t.why, want);
	cr_assert_eq(t.c.goaway_sent, PBRPC_STATUS_RESOURCE_EXHAUSTED);
	teardown(&t, &r);
}

/* ======================================================================== */
/* reading                                                                  */
/* ======================================================================== */

/* Writes the peer's preface and HELLO one byte at a time, stepping the conn
 * after each byte. */
static void handshake_bytewise(bool scratch)
{
	tconn t;
	raw r;
	setup(&t, &r, PBRPC__CONN_SERVER, 0);
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc_hello h = hello_v(PBRPC_WIRE_VERSION, 4096, "bytewise");
	cr_assert_eq(pbrpc__wire_write_preface(&w, &h), 0);
	uint8_t ping[HS + 8];
	pbrpc__frame_header ph = { .length = 8, .type = PBRPC_FRAME_PING };
	pbrpc__frame_header_encode(&ph, ping);
	memcpy(ping + HS, "bytebyte", 8);
	cr_assert_eq(pbrpc__frame_writer_append_raw(&w, ping, sizeof(ping)), 0);
	const uint8_t *bytes = w.buf + w.head;
	size_t len = pbrpc__frame_writer_pending(&w);
	uint8_t buf[64];
	for (size_t i = 0; i < len; i++) {
		raw_bytes(&r, bytes + i, 1);
		ssize_t n = pbrpc__conn_recv(&t.c, scratch ? buf : NULL, sizeof(buf), 0);
		cr_assert_eq(n, 1, "byte %zu: %zd", i, n);
		cr_assert_eq(pbrpc__conn_dispatch(&t.c, NULL), 0);
		if (i + 1 < PBRPC_WIRE_PREFACE_SIZE) {
			cr_assert_eq(t.c.state, PBRPC__CONN_PREFACE, "byte %zu", i);
			cr_assert_eq(t.c.preface_got, i + 1);
			cr_assert_eq(pbrpc__conn_pending_in(&t.c), 0, "preface bytes never enter the decoder");
		} else if (i + 1 < len - sizeof(ping)) {
			cr_assert_eq(t.c.state, PBRPC__CONN_HELLO, "byte %zu", i);
		} else {
			cr_assert_eq(t.c.state, PBRPC__CONN_OPEN, "byte %zu", i);
		}
	}
	cr_assert_eq(t.opens, 1);
	cr_assert_str_eq(t.c.peer.agent, "bytewise");
	cr_assert_eq(t.c.peer_max_frame, 4096);
	cr_assert_eq(pbrpc__conn_pending_in(&t.c), 0);
	cr_assert_geq(pbrpc__conn_flush(&t.c, 0), 0);
	raw_expect_preface(&r);
	raw_expect_hello(&r, 0);
	cr_assert_arr_eq(raw_expect(&r, PBRPC_FRAME_PONG)->payload, "bytebyte", 8);
	pbrpc__frame_writer_fini(&w);
	teardown(&t, &r);
}

Test(conn, recv_bytewise_without_scratch)
{
	handshake_bytewise(false);
}

Test(conn, recv_bytewise_with_scratch)
{
	handshake_bytewise(true);
}

/* Everything in one write, then a frame split across reads, with a scratch
 * buffer and without. */
static void recv_chunks(bool scratch)
{
	tconn t;
	raw r;
	setup(&t, &r, PBRPC__CONN_CLIENT, 0);
	pbrpc_hello h = hello_v(PBRPC_WIRE_VERSION, 0, "chunks");
	cr_assert_eq(pbrpc__wire_write_preface(&r.w, &h), 0);
	cr_assert_eq(pbrpc__wire_write_ping(&r.w, PBRPC_FRAME_PING, (const uint8_t *)"chunk-01"), 0);
	pbrpc__wire_response s = { .call_id = 5, .status = PBRPC_STATUS_INTERNAL, .message = "split me",
				   .message_len = 8 };
	cr_assert_eq(pbrpc__wire_write_response(&r.w, &s, NULL, 0), 0);
	const uint8_t *bytes = r.w.buf + r.w.head;
	size_t len = pbrpc__frame_writer_pending(&r.w);
	size_t cut = len - 5; /* inside the RESPONSE */

	uint8_t buf[4096];
	raw_bytes(&r, bytes, cut);
	size_t got = 0;
	while (got < cut) {
		ssize_t n = pbrpc__conn_recv(&t.c, scratch ? buf : NULL, sizeof(buf), 0);
		cr_assert_gt(n, 0);
		got += (size_t)n;
		cr_assert_eq(pbrpc__conn_dispatch(&t.c, NULL), 0);
		if (scratch)
			memset(buf, 0xee, sizeof(buf)); /* the conn must not still be using it */
	}
	cr_assert_eq(t.c.state, PBRPC__CONN_OPEN);
	cr_assert_eq(t.responses, 0);
	cr_assert_gt(pbrpc__conn_pending_in(&t.c), 0, "the part of the RESPONSE is held");

	raw_bytes(&r, bytes + cut, len - cut);
	while (t.responses == 0) {
		ssize_t n = pbrpc__conn_recv(&t.c, scratch ? buf : NULL, sizeof(buf), 0);
		cr_assert_gt(n, 0);
		cr_assert_eq(pbrpc__conn_dispatch(&t.c, NULL), 0);
	}
	cr_assert_eq(t.resp_id, 5);
	cr_assert_eq(t.resp_status, PBRPC_STATUS_INTERNAL);
	cr_assert_str_eq(t.resp_msg, "split me");
	cr_assert_eq(pbrpc__conn_pending_in(&t.c), 0);
	cr_assert_geq(pbrpc__conn_flush(&t.c, 0), 0);
	raw_expect_preface(&r);
	raw_expect_hello(&r, 0);
	cr_assert_arr_eq(raw_expect(&r, PBRPC_FRAME_PONG)->payload, "chunk-01", 8);
	raw_expect_silence(&r);
	/* would block */
	cr_assert_eq(pbrpc__conn_recv(&t.c, scratch ? buf : NULL, sizeof(buf), MSG_DONTWAIT), 0);
	teardown(&t, &r);
}

Test(conn, recv_chunks_without_scratch)
{
	recv_chunks(false);
}

Test(conn, recv_chunks_with_scratch)
{
	recv_chunks(true);
}

/* An oversized REQUEST whose payload arrives in pieces, read through a
 * scratch buffer: answered once, its bytes dropped as they come, and the
 * stream goes on after it. */
Test(conn, oversized_request_split_with_scratch)
{
	tconn t;
	raw r;
	setup_open(&t, &r, PBRPC__CONN_SERVER, 1024);
	enum { BODY = 20000 };
	uint8_t *body = malloc(BODY);
	cr_assert(body);
	memset(body, 0x11, BODY);
	pbrpc__wire_request q = { .call_id = 31, .method = "a.B/C", .method_len = 5, .body = body, .body_len = BODY };
	cr_assert_eq(pbrpc__wire_write_request(&r.w, &q, NULL, 0), 0);
	cr_assert_eq(pbrpc__wire_write_ping(&r.w, PBRPC_FRAME_PING, (const uint8_t *)"pieces!!"), 0);
	const uint8_t *bytes = r.w.buf + r.w.head;
	size_t len = pbrpc__frame_writer_pending(&r.w);
	size_t cuts[] = { HS + 100, HS + 7000, HS + 7001, HS + 19000, len - 3, len };
	size_t at = 0;
	uint8_t scratch[2048];
	for (size_t k = 0; k < sizeof(cuts) / sizeof(cuts[0]); k++) {
		raw_bytes(&r, bytes + at, cuts[k] - at);
		at = cuts[k];
		for (;;) {
			ssize_t n = pbrpc__conn_recv(&t.c, scratch, sizeof(scratch), MSG_DONTWAIT);
			cr_assert_geq(n, 0, "%s", pbrpc_strerror((int)n));
			if (n == 0)
				break;
			cr_assert_eq(pbrpc__conn_dispatch(&t.c, NULL), 0);
			memset(scratch, 0xee, sizeof(scratch));
		}
		cr_assert_eq(t.c.state, PBRPC__CONN_OPEN, "after piece %zu: %s", k, t.why);
	}
	cr_assert_eq(t.requests, 0);
	cr_assert_eq(pbrpc__conn_pending_in(&t.c), 0);
	cr_assert_geq(pbrpc__conn_flush(&t.c, 0), 0);
	pbrpc__wire_response s;
	cr_assert_eq(pbrpc__wire_read_response(raw_expect(&r, PBRPC_FRAME_RESPONSE), &s), 0);
	cr_assert_eq(s.call_id, 31);
	cr_assert_eq(s.status, PBRPC_STATUS_RESOURCE_EXHAUSTED);
	const char *want = "request is 20007 bytes, server accepts at most 1024";
	cr_assert_eq(s.message_len, strlen(want));
	cr_assert_arr_eq(s.message, want, s.message_len);
	cr_assert_arr_eq(raw_expect(&r, PBRPC_FRAME_PONG)->payload, "pieces!!", 8);
	raw_expect_silence(&r);
	free(body);
	teardown(&t, &r);
}

/* A scratch buffer smaller than the preface. */
Test(conn, recv_tiny_scratch)
{
	tconn t;
	raw r;
	setup(&t, &r, PBRPC__CONN_CLIENT, 0);
	raw_hello(&r, PBRPC_WIRE_VERSION, 0, 3);
	raw_frame(&r, PBRPC_FRAME_PING, 0, 0, "tinytiny", 8);
	uint8_t scratch[3];
	for (int i = 0; i < 1000; i++) {
		/* at most 3 bytes while in the preface or at a frame boundary;
		 * the rest of a split frame goes to the decoder's buffer */
		bool boundary = t.c.state == PBRPC__CONN_PREFACE || pbrpc__conn_pending_in(&t.c) == 0;
		ssize_t n = pbrpc__conn_recv(&t.c, scratch, sizeof(scratch), MSG_DONTWAIT);
		cr_assert_geq(n, 0);
		if (boundary)
			cr_assert_leq(n, 3);
		cr_assert_eq(pbrpc__conn_dispatch(&t.c, NULL), 0);
		if (n == 0)
			break;
	}
	cr_assert_eq(t.c.state, PBRPC__CONN_OPEN);
	cr_assert_eq(t.c.peer_max_calls, 3);
	cr_assert_geq(pbrpc__conn_flush(&t.c, 0), 0);
	raw_expect_preface(&r);
	raw_expect_hello(&r, 0);
	cr_assert_arr_eq(raw_expect(&r, PBRPC_FRAME_PONG)->payload, "tinytiny", 8);
	teardown(&t, &r);
}

/* ======================================================================== */
/* keepalive, ping strikes and connection age                               */
/* ======================================================================== */

/* RELIABILITY 36 at the conn level: a PING after ka_interval_ns without a
 * read, a close after ka_timeout_ns with nothing back; a PONG, or any read,
 * answers it; reads push the next PING back. */
Test(conn, keepalive_deadline)
{
	tconn t;
	raw r;
	setup_open(&t, &r, PBRPC__CONN_SERVER, 0);
	const int64_t T0 = 5000 * MS;
	t.c.last_read = T0;
	t.c.ka_interval_ns = 100 * MS;
	t.c.ka_timeout_ns = 50 * MS;
	cr_assert_eq(pbrpc__conn_deadline(&t.c), T0 + 100 * MS, "PING due after the interval");
	pbrpc__conn_expire(&t.c, T0 + 99 * MS);
	cr_assert_eq(pbrpc__conn_pending_out(&t.c), 0, "nothing before it");

	/* Traffic suppresses pings: a read moves the deadline. */
	t.c.last_read = T0 + 60 * MS;
	cr_assert_eq(pbrpc__conn_deadline(&t.c), T0 + 160 * MS);
	pbrpc__conn_expire(&t.c, T0 + 100 * MS);
	cr_assert_eq(pbrpc__conn_pending_out(&t.c), 0, "no PING: the peer spoke 40 ms ago");

	/* Silence: the PING goes out, the deadline becomes the timeout. */
	pbrpc__conn_expire(&t.c, T0 + 160 * MS);
	cr_assert_eq(t.c.ka_ping_at, T0 + 160 * MS);
	cr_assert_eq(pbrpc__conn_deadline(&t.c), T0 + 210 * MS);
	cr_assert_geq(pbrpc__conn_flush(&t.c, 0), 0);
	const pbrpc__frame *f = raw_expect(&r, PBRPC_FRAME_PING);
	cr_assert_eq(memcmp(f->payload, "pbrpc-ka", 8), 0);
	pbrpc__conn_expire(&t.c, T0 + 200 * MS);
	cr_assert_eq(pbrpc__conn_pending_out(&t.c), 0, "one PING outstanding at a time");

	/* The PONG clears it; the next PING is an interval after the read. */
	raw_frame(&r, PBRPC_FRAME_PONG, 0, 0, "pbrpc-ka", 8);
	pump(&t, false);
	t.c.last_read = T0 + 205 * MS;
	cr_assert_eq(t.c.ka_ping_at, 0);
	cr_assert_eq(pbrpc__conn_deadline(&t.c), T0 + 305 * MS);

	/* Any bytes after the PING show the peer alive, PONG or not. */
	pbrpc__conn_expire(&t.c, T0 + 305 * MS);
	cr_assert_eq(t.c.ka_ping_at, T0 + 305 * MS);
	t.c.last_read = T0 + 306 * MS;
	cr_assert_eq(pbrpc__conn_deadline(&t.c), T0 + 406 * MS, "a read answers the PING");
	pbrpc__conn_expire(&t.c, T0 + 360 * MS);
	cr_assert_eq(t.closes, 0);

	/* No answer within the timeout: GOAWAY(UNAVAILABLE) and a close. */
	pbrpc__conn_expire(&t.c, T0 + 406 * MS);
	cr_assert_eq(t.c.ka_ping_at, T0 + 406 * MS);
	cr_assert_geq(pbrpc__conn_flush(&t.c, 0), 0);
	raw_expect(&r, PBRPC_FRAME_PING);
	raw_expect(&r, PBRPC_FRAME_PING);
	pbrpc__conn_expire(&t.c, T0 + 455 * MS);
	cr_assert_eq(t.closes, 0);
	pbrpc__conn_expire(&t.c, T0 + 456 * MS);
	cr_assert_eq(t.closes, 1);
	cr_assert_eq(t.close_err, -ETIMEDOUT);
	cr_assert_str_eq(t.why, "keepalive timeout: client sent nothing for 50 ms after a PING");
	raw_expect_goaway(&r, PBRPC_STATUS_UNAVAILABLE, "keepalive timeout: client sent nothing for 50 ms after a PING");
	cr_assert_eq(pbrpc__conn_deadline(&t.c), 0);
	teardown(&t, &r);
}

/* RELIABILITY 31 at the conn level: PINGs closer than ping_min_ns without a
 * REQUEST between are strikes; the third strike closes. */
Test(conn, ping_strikes)
{
	tconn t;
	raw r;
	setup_open(&t, &r, PBRPC__CONN_SERVER, 0);
	t.c.ping_min_ns = 1000 * MS;
	int64_t now = 5000 * MS;
	/* Spaced out: never a strike. */
	for (int i = 0; i < 5; i++, now += 1000 * MS) {
		t.c.last_read = now;
		raw_frame(&r, PBRPC_FRAME_PING, 0, 0, "spaced!!", 8);
		pump(&t, false);
		raw_expect(&r, PBRPC_FRAME_PONG);
	}
	cr_assert_eq(t.c.ping_strikes, 0);
	/* Too often, but a REQUEST between each: forgiven. */
	for (int i = 0; i < 5; i++, now += MS) {
		t.c.last_read = now;
		raw_request(&r, (uint32_t)(10 + i), "a.B/C", NULL, 0);
		raw_frame(&r, PBRPC_FRAME_PING, 0, 0, "withcall", 8);
		pump(&t, false);
		raw_expect(&r, PBRPC_FRAME_PONG);
	}
	cr_assert_eq(t.c.ping_strikes, 0);
	cr_assert_eq(t.requests, 5);
	/* Too often without calls: two strikes are answered, the third closes. */
	for (int i = 0; i < 2; i++, now += 10 * MS) {
		t.c.last_read = now;
		raw_frame(&r, PBRPC_FRAME_PING, 0, 0, "tooquick", 8);
		pump(&t, false);
		raw_expect(&r, PBRPC_FRAME_PONG);
	}
	cr_assert_eq(t.c.ping_strikes, 2);
	cr_assert_eq(t.closes, 0);
	t.c.last_read = now;
	raw_frame(&r, PBRPC_FRAME_PING, 0, 0, "tooquick", 8);
	pump(&t, false);
	cr_assert_eq(t.closes, 1);
	cr_assert_eq(t.close_err, PBRPC_EPROTO);
	const char *why = "too many pings: more than 3 PINGs less than 1000 ms apart without a call";
	cr_assert_str_eq(t.why, why);
	raw_expect_goaway(&r, PBRPC_STATUS_RESOURCE_EXHAUSTED, why);
	teardown(&t, &r);
}

/* ping_min_ns 0 (a conn that sets no limit, like the client's): any rate. */
Test(conn, ping_no_limit)
{
	tconn t;
	raw r;
	setup_open(&t, &r, PBRPC__CONN_CLIENT, 0);
	for (int i = 0; i < 20; i++)
		raw_frame(&r, PBRPC_FRAME_PING, 0, 0, "flooding", 8);
	pump(&t, false);
	for (int i = 0; i < 20; i++)
		raw_expect(&r, PBRPC_FRAME_PONG);
	cr_assert_eq(t.closes, 0);
	teardown(&t, &r);
}

/* Connection age: at age_at the drain GOAWAY and its PING go out; calls in
 * flight may finish within the grace; at its end the connection closes. */
Test(conn, age_drain_and_grace)
{
	tconn t;
	raw r;
	setup_open(&t, &r, PBRPC__CONN_SERVER, 0);
	const int64_t T0 = 5000 * MS;
	t.c.age_at = T0 + 100 * MS;
	t.c.drain_grace_ns = 50 * MS;
	cr_assert_eq(pbrpc__conn_deadline(&t.c), T0 + 100 * MS);
	int rec;
	cr_assert_eq(pbrpc__idmap_put(&t.c.calls, 7, &rec), 0);
	pbrpc__conn_expire(&t.c, T0 + 99 * MS);
	cr_assert(!t.c.draining);
	pbrpc__conn_expire(&t.c, T0 + 100 * MS);
	cr_assert(t.c.draining);
	cr_assert_eq(t.c.drain_close_at, T0 + 150 * MS);
	cr_assert_eq(pbrpc__conn_deadline(&t.c), T0 + 150 * MS, "the grace, not the age, is due now");
	cr_assert_geq(pbrpc__conn_flush(&t.c, 0), 0);
	raw_expect_goaway(&r, PBRPC_STATUS_OK, "max connection age reached");
	const pbrpc__frame *f = raw_expect(&r, PBRPC_FRAME_PING);
	cr_assert_eq(memcmp(f->payload, "pbrpc-dr", 8), 0, "the exact drain's PING");
	/* The PONG: the peer is quiet; the call in flight keeps it open. */
	raw_frame(&r, PBRPC_FRAME_PONG, 0, 0, "pbrpc-dr", 8);
	pump(&t, false);
	cr_assert(t.c.peer_quiet);
	cr_assert(!pbrpc__conn_drained(&t.c));
	pbrpc__conn_expire(&t.c, T0 + 149 * MS);
	cr_assert_eq(t.closes, 0);
	pbrpc__conn_expire(&t.c, T0 + 150 * MS);
	cr_assert_eq(t.closes, 1);
	cr_assert_str_eq(t.why, "max connection age: drain grace of 50 ms ended with 1 calls in flight");
	raw_expect_goaway(&r, PBRPC_STATUS_UNAVAILABLE,
			  "max connection age: drain grace of 50 ms ended with 1 calls in flight");
	teardown(&t, &r);
}
