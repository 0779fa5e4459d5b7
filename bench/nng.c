/* Peer N: nng 1.5 (Debian's libnng-dev), req/rep, as an nng user would write
 * an echo service whose messages are protobuf-c.
 *
 *   client:  a req0 socket dialled to the server (one connection per socket).
 *            A call packs a demo.EchoRequest into a new nng_msg, nng_sendmsg,
 *            nng_recvmsg, unpacks the demo.EchoReply (protobuf-c, default
 *            allocator), frees both. Pipelining: N req0 contexts on the same
 *            socket, each request sent through its own aio, then the N replies
 *            received, each on its context.
 *   server:  a rep0 socket with 256 contexts served by aio callbacks on nng's
 *            own threads (the pattern of nng's demo/async server): each
 *            request unpacked, a reply built with the same payload, packed
 *            into the request's nng_msg (reused) and sent back.
 *
 * So per call both sides do B's protobuf-c work plus what nng itself does
 * (SP framing, the req/rep state machines, its thread hand-offs). Unix
 * sockets are nng's ipc transport on the same abstract name ("abstract://"),
 * TCP its tcp transport (TCP_NODELAY is nng's default). nng opens and accepts
 * its sockets itself; the bench's connect/accept4 hooks give them the
 * baselines' buffer sizes. RECVMAXSZ is lifted (its 1 MiB default would drop
 * the 1 MiB requests).
 */
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <nng/nng.h>
#include <nng/protocol/reqrep0/rep.h>
#include <nng/protocol/reqrep0/req.h>

#include "bench.h"
#include "echo.pb-c.h"

#define SERVER_CTXS 256
#define MAX_DEPTH 256

static void peer_url(const bench_target *t, char *buf, size_t n)
{
	if (t->tcp) {
		const struct sockaddr_in *sin = (const struct sockaddr_in *)&t->ep.addr;
		snprintf(buf, n, "tcp://127.0.0.1:%u", (unsigned)ntohs(sin->sin_port));
	} else if (t->ep.kind == PBRPC_ENDPOINT_ABSTRACT) {
		snprintf(buf, n, "abstract://%s", t->ep.path);
	} else {
		snprintf(buf, n, "ipc://%s", t->ep.path);
	}
}

/* ---- server ---- */

struct work {
	nng_aio *aio;
	nng_ctx ctx;
	bool sending;
};

static void work_cb(void *arg)
{
	struct work *w = arg;
	int rv = nng_aio_result(w->aio);
	if (w->sending) {
		if (rv != 0)
			nng_msg_free(nng_aio_get_msg(w->aio));
		w->sending = false;
		nng_ctx_recv(w->ctx, w->aio);
		return;
	}
	if (rv == NNG_ECLOSED)
		return;
	if (rv != 0) {
		nng_ctx_recv(w->ctx, w->aio);
		return;
	}
	nng_msg *m = nng_aio_get_msg(w->aio);
	bench_server_tick();
	Demo__EchoRequest *req = demo__echo_request__unpack(NULL, nng_msg_len(m), nng_msg_body(m));
	if (!req)
		bench_die("nng server: bad request");
	Demo__EchoReply rep = DEMO__ECHO_REPLY__INIT;
	rep.payload = req->payload;
	size_t n = demo__echo_reply__get_packed_size(&rep);
	nng_msg_clear(m);
	if (nng_msg_realloc(m, n) != 0)
		bench_die("nng server: out of memory");
	demo__echo_reply__pack(&rep, nng_msg_body(m));
	demo__echo_request__free_unpacked(req, NULL);
	nng_aio_set_msg(w->aio, m);
	w->sending = true;
	nng_ctx_send(w->ctx, w->aio);
}

static void nng_check(int rv, const char *what)
{
	if (rv != 0)
		bench_die("nng: %s: %s", what, nng_strerror(rv));
}

static void serve(int lfd, const bench_target *t)
{
	(void)lfd;
	char url[256];
	peer_url(t, url, sizeof(url));
	nng_socket s;
	nng_check(nng_rep0_open(&s), "nng_rep0_open");
	nng_check(nng_socket_set_size(s, NNG_OPT_RECVMAXSZ, 0), "RECVMAXSZ");
	static struct work works[SERVER_CTXS];
	for (int i = 0; i < SERVER_CTXS; i++) {
		nng_check(nng_aio_alloc(&works[i].aio, work_cb, &works[i]), "nng_aio_alloc");
		nng_check(nng_ctx_open(&works[i].ctx, s), "nng_ctx_open");
	}
	/* The address was freed just before this process started. */
	int rv;
	for (int i = 0; (rv = nng_listen(s, url, NULL, 0)) == NNG_EADDRINUSE && i < 1000; i++)
		usleep(1000);
	nng_check(rv, url);
	for (int i = 0; i < SERVER_CTXS; i++)
		nng_ctx_recv(works[i].ctx, works[i].aio);
	atomic_store(&bench_shared->ready, 1);
	for (;;)
		pause();
}

/* ---- client ---- */

struct nconn {
	nng_socket s;
	int nctx;
	nng_ctx ctx[MAX_DEPTH];
	nng_aio *aio[MAX_DEPTH];
};

static void *open_conn(const bench_target *t)
{
	bench_wait_ready();
	char url[256];
	peer_url(t, url, sizeof(url));
	struct nconn *c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	int rv = nng_req0_open(&c->s);
	if (rv == 0)
		rv = nng_socket_set_size(c->s, NNG_OPT_RECVMAXSZ, 0);
	if (rv == 0) {
		/* nng connects from its own threads: leave the hook on. */
		bench_hook_sockets = true;
		/* 256 clients dialling at once overflow the ipc listener's backlog
		 * (EAGAIN): retry as nng's background dialer would. */
		for (int i = 0; (rv = nng_dial(c->s, url, NULL, 0)) == NNG_EAGAIN && i < 2000; i++)
			usleep(1000);
	}
	if (rv != 0) {
		fprintf(stderr, "pbrpc-bench: nng dial %s: %s\n", url, nng_strerror(rv));
		nng_close(c->s);
		free(c);
		return NULL;
	}
	return c;
}

static nng_msg *build_request(size_t size)
{
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)bench_payload;
	req.payload.len = size;
	size_t n = demo__echo_request__get_packed_size(&req);
	nng_msg *m;
	if (nng_msg_alloc(&m, n) != 0)
		return NULL;
	demo__echo_request__pack(&req, nng_msg_body(m));
	return m;
}

static int check_reply(nng_msg *m, size_t size)
{
	Demo__EchoReply *rep = demo__echo_reply__unpack(NULL, nng_msg_len(m), nng_msg_body(m));
	nng_msg_free(m);
	if (!rep)
		return -1;
	int rc = rep->payload.len == size ? 0 : -1;
	demo__echo_reply__free_unpacked(rep, NULL);
	return rc;
}

static int call(void *conn, size_t size)
{
	struct nconn *c = conn;
	nng_msg *m = build_request(size);
	if (!m)
		return -1;
	if (nng_sendmsg(c->s, m, 0) != 0) {
		nng_msg_free(m);
		return -1;
	}
	if (nng_recvmsg(c->s, &m, 0) != 0)
		return -1;
	return check_reply(m, size);
}

static int batch(void *conn, size_t size, int n)
{
	struct nconn *c = conn;
	if (n > MAX_DEPTH)
		return -1;
	for (; c->nctx < n; c->nctx++)
		if (nng_ctx_open(&c->ctx[c->nctx], c->s) != 0 || nng_aio_alloc(&c->aio[c->nctx], NULL, NULL) != 0)
			return -1;
	for (int i = 0; i < n; i++) {
		nng_msg *m = build_request(size);
		if (!m)
			return -1;
		nng_aio_set_msg(c->aio[i], m);
		nng_ctx_send(c->ctx[i], c->aio[i]);
	}
	int rc = 0;
	for (int i = 0; i < n; i++) {
		nng_aio_wait(c->aio[i]);
		if (nng_aio_result(c->aio[i]) != 0) {
			nng_msg_free(nng_aio_get_msg(c->aio[i]));
			rc = -1;
			continue;
		}
		nng_ctx_recv(c->ctx[i], c->aio[i]);
	}
	for (int i = 0; i < n; i++) {
		nng_aio_wait(c->aio[i]);
		if (nng_aio_result(c->aio[i]) != 0 || check_reply(nng_aio_get_msg(c->aio[i]), size) < 0)
			rc = -1;
	}
	return rc;
}

static void close_conn(void *conn)
{
	struct nconn *c = conn;
	if (!c)
		return;
	nng_close(c->s);
	for (int i = 0; i < c->nctx; i++)
		nng_aio_free(c->aio[i]);
	free(c);
}

const bench_system bench_nng = {
	.key = "nng",
	.name = "N nng",
	.serve = serve,
	.open = open_conn,
	.call = call,
	.batch = batch,
	.close = close_conn,
	.exec_server = true,
};
