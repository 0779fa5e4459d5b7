/* libFuzzer target for the client's handshake, response, goaway and
 * reconnect handling: a real pbrpc_client talks to a fake server whose bytes
 * and actions come from the input.
 *
 * The fake server is a listening abstract-namespace Unix socket. The harness
 * links with -Wl,--wrap=connect: when the client connects to it, the wrapper
 * accepts at once (a Unix connect completes into the backlog) and writes the
 * server's preface and HELLO (unless the input writes its own) and whatever
 * bytes the input has queued for the next connection, so the whole exchange
 * runs on one thread and is deterministic.
 *
 * Input layout:
 *   byte 0   configuration:
 *            bits 0-1  3: no automatic preface + HELLO (the input's bytes are
 *                      the whole handshake); otherwise a valid one
 *            bit 2     the HELLO announces max_calls 2 (else none)
 *            bit 3     the HELLO announces max_frame 64 (else the default)
 *            bit 4     lazy client (else pbrpc_client_connect handshakes)
 *            bit 5     the client's max_frame is 128 (else the default)
 *   then ops, each an op byte (op & 7, arg = op >> 3):
 *     0 BYTES    a length byte L (L + 1 bytes follow): written to the
 *                current connection, or queued for the next one
 *     1 ASYNC    an async demo.Echo call; arg & 3 picks the timeout (the
 *                client's default of 20 ms, 1 ms, 200 ms, none); arg & 4
 *                adds metadata
 *     2 PROCESS  arg + 1 rounds of pbrpc_client_process(c, 0)
 *     3 SYNC     a sync demo.Echo call with a 1 ms timeout (at most 4 per
 *                input, as each may wait that long); arg & 1: the
 *                fake server answers it before it is made (OK, or with arg &
 *                2 an error), predicting the client's next call id
 *     4 CLOSE    the fake server closes the current connection (arg & 1:
 *                shutdown(SHUT_WR) only)
 *     5 TIME     advance the clock by time_table[arg & 7] ms
 *     6 CANCEL   pbrpc_client_cancel() of the last call made
 *     7 SERVE    the fake server reads what the client sent, then by arg & 7:
 *                0 answers the oldest request OK, 1 with the status in
 *                the next byte (% 17),
 *                2 OK with the next L + 1 input bytes as the body, 3 answers
 *                the last answered call again, 4 GOAWAY(OK), 5
 *                GOAWAY(UNAVAILABLE), 6 PING, 7 answers every request OK
 *
 * Checked beyond "no crash, no leak, no UB": every async closure runs
 * exactly once (at the latest from pbrpc_client_free), a sync stub runs its
 * closure exactly once before it returns, a closure gets a reply exactly when
 * the status is OK, and after pbrpc_client_free() and the fake server's
 * closes the process has the file descriptors it had before the input.
 */
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "client/client_impl.h"
#include "echo.pb-c.h"
#include "pbrpc/client.h"
#include "proto/frame.h"
#include "proto/wire.h"
#include "util/clock.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int __wrap_connect(int fd, const struct sockaddr *addr, socklen_t len);
int __real_connect(int fd, const struct sockaddr *addr, socklen_t len);
int __wrap_pthread_cond_timedwait(pthread_cond_t *cv, pthread_mutex_t *mu, const struct timespec *ts);
int __real_pthread_cond_timedwait(pthread_cond_t *cv, pthread_mutex_t *mu, const struct timespec *ts);

#define CHECK(cond, ...)                                                                        \
	do {                                                                                    \
		if (!(cond)) {                                                                  \
			fprintf(stderr, "fuzz_client: %s:%d: %s: ", __FILE__, __LINE__, #cond); \
			fprintf(stderr, __VA_ARGS__);                                           \
			fputc('\n', stderr);                                                    \
			abort();                                                                \
		}                                                                               \
	} while (0)

static const int64_t time_table[8] = { 1, 5, 20, 60, 250, 1000, 3000, 60000 }; /* ms */
static const int timeout_table[4] = { 0, 1, 200, -1 };

/* ---- the fake server ---- */

#define CONNS_MAX 4
#define ACCEPTS_MAX 6 /* per input; more are closed at once */
#define REQS_MAX 64

typedef struct fconn {
	int fd;
	size_t preface_got;
	pbrpc__frame_decoder dec; /* what the client sent */
	uint32_t reqs[REQS_MAX];  /* REQUEST ids not yet answered */
	size_t n_reqs;
	uint32_t last_answered;
} fconn;

static struct {
	int lfd;
	struct sockaddr_un addr;
	socklen_t addrlen;
	uint8_t cfg;
	fconn conns[CONNS_MAX];
	int cur; /* newest, or -1 */
	int accepts;
	uint8_t pending[8192]; /* for the next connection */
	size_t n_pending;
} fk;

static void fk_write(fconn *k, const void *p, size_t n)
{
	while (n) {
		ssize_t w = send(k->fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return; /* full (the client does not read) or gone: dropped */
		p = (const uint8_t *)p + w;
		n -= (size_t)w;
	}
}

static void fk_close(int i)
{
	fconn *k = &fk.conns[i];
	if (k->fd < 0)
		return;
	close(k->fd);
	k->fd = -1;
	pbrpc__frame_decoder_fini(&k->dec);
	if (fk.cur == i)
		fk.cur = -1;
}

/* The bytes to the current connection, or to the next one. */
static void fk_send(const void *p, size_t n)
{
	if (fk.cur >= 0) {
		fk_write(&fk.conns[fk.cur], p, n);
		return;
	}
	if (n > sizeof(fk.pending) - fk.n_pending)
		n = sizeof(fk.pending) - fk.n_pending;
	memcpy(fk.pending + fk.n_pending, p, n);
	fk.n_pending += n;
}

static void fk_accept(void)
{
	int fd = accept4(fk.lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0)
		return;
	if (++fk.accepts > ACCEPTS_MAX) {
		close(fd);
		return;
	}
	int slot = -1;
	for (int i = 0; i < CONNS_MAX && slot < 0; i++)
		if (fk.conns[i].fd < 0)
			slot = i;
	if (slot < 0) { /* the oldest goes */
		slot = (fk.cur + 1) % CONNS_MAX;
		fk_close(slot);
	}
	fconn *k = &fk.conns[slot];
	memset(k, 0, sizeof(*k));
	k->fd = fd;
	pbrpc__frame_decoder_init(&k->dec, PBRPC_MAX_FRAME_DEFAULT);
	fk.cur = slot;
	if ((fk.cfg & 3) != 3) {
		pbrpc__frame_writer w;
		pbrpc__frame_writer_init(&w);
		pbrpc_hello h = {
			.version = PBRPC_WIRE_VERSION,
			.max_frame = fk.cfg & 8 ? 64 : 0,
			.max_calls = fk.cfg & 4 ? 2 : 0,
			.agent = "fuzz-server",
		};
		CHECK(pbrpc__wire_write_preface(&w, &h) == 0, "write_preface");
		fk_write(k, w.buf + w.head, pbrpc__frame_writer_pending(&w));
		pbrpc__frame_writer_fini(&w);
	}
	fk_write(k, fk.pending, fk.n_pending);
	fk.n_pending = 0;
}

/* The client sleeps on absolute CLOCK_MONOTONIC deadlines computed from
 * pbrpc__now_ns(), which includes the input's clock skew; the kernel's clock
 * does not, so the wrapper (-Wl,--wrap=pthread_cond_timedwait) takes the skew
 * back out. Otherwise a sync call waiting out a backoff would sleep for the
 * whole skew. */
int __wrap_pthread_cond_timedwait(pthread_cond_t *cv, pthread_mutex_t *mu, const struct timespec *ts)
{
	int64_t d = (int64_t)ts->tv_sec * PBRPC__NS_PER_S + ts->tv_nsec -
		    atomic_load_explicit(&pbrpc__clock_skew, memory_order_relaxed);
	struct timespec real = pbrpc__deadline_timespec(d > 0 ? d : 1);
	return __real_pthread_cond_timedwait(cv, mu, &real);
}

int __wrap_connect(int fd, const struct sockaddr *addr, socklen_t len)
{
	int rc = __real_connect(fd, addr, len);
	if (rc == 0 && len == fk.addrlen && memcmp(addr, &fk.addr, len) == 0)
		fk_accept();
	return rc;
}

/* Reads what the client sent on the current connection and notes its
 * REQUEST ids. */
static void fk_read(void)
{
	if (fk.cur < 0)
		return;
	fconn *k = &fk.conns[fk.cur];
	uint8_t buf[4096];
	for (;;) {
		ssize_t n = recv(k->fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		uint8_t *p = buf;
		while (n && k->preface_got < PBRPC_WIRE_PREFACE_SIZE) {
			CHECK(*p == (uint8_t)PBRPC_WIRE_PREFACE[k->preface_got], "client's preface byte %zu", k->preface_got);
			k->preface_got++, p++, n--;
		}
		pbrpc__frame_decoder_feed(&k->dec, p, (size_t)n);
		pbrpc__frame f;
		int rc;
		while ((rc = pbrpc__frame_decoder_next(&k->dec, &f)) == 1) {
			CHECK(pbrpc__wire_check_header(&f.hdr) == 0, "client sent a bad %s header",
			      pbrpc__wire_frame_name(f.hdr.type));
			if (f.hdr.type == PBRPC_FRAME_REQUEST) {
				pbrpc__wire_request r;
				CHECK(pbrpc__wire_read_request(&f, &r) == 0, "client's REQUEST does not parse");
				if (k->n_reqs < REQS_MAX)
					k->reqs[k->n_reqs++] = f.hdr.stream;
			}
		}
		CHECK(rc == 0, "client's stream: %s", pbrpc_strerror(rc));
	}
}

static void fk_respond(uint32_t id, int status, const uint8_t *body, size_t body_len)
{
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc__wire_response r = { .call_id = id, .status = status, .body = body, .body_len = body_len };
	if (status) {
		r.message = "fuzzed failure";
		r.message_len = strlen(r.message);
	}
	CHECK(pbrpc__wire_write_response(&w, &r, NULL, 0) == 0, "write_response");
	fk_send(w.buf + w.head, pbrpc__frame_writer_pending(&w));
	pbrpc__frame_writer_fini(&w);
}

static const uint8_t ok_body[] = { 0x0a, 0x02, 'o', 'k' }; /* EchoReply{payload: "ok"} */

static void fk_answer_oldest(int status, const uint8_t *body, size_t len)
{
	if (fk.cur < 0 || !fk.conns[fk.cur].n_reqs)
		return;
	fconn *k = &fk.conns[fk.cur];
	uint32_t id = k->reqs[0];
	memmove(k->reqs, k->reqs + 1, (--k->n_reqs) * sizeof(uint32_t));
	k->last_answered = id;
	fk_respond(id, status, body, len);
}

static void fk_control(uint8_t type, int status)
{
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	static const uint8_t ping[PBRPC_WIRE_PING_SIZE] = { 'f', 'u', 'z', 'z', 'p', 'i', 'n', 'g' };
	if (type == PBRPC_FRAME_GOAWAY)
		CHECK(pbrpc__wire_write_goaway(&w, status, status ? "fuzz server failing" : "fuzz server draining") == 0,
		      "goaway");
	else
		CHECK(pbrpc__wire_write_ping(&w, PBRPC_FRAME_PING, ping) == 0, "ping");
	fk_send(w.buf + w.head, pbrpc__frame_writer_pending(&w));
	pbrpc__frame_writer_fini(&w);
}

/* ---- the calls ---- */

#define CALLS_MAX 256

static struct {
	unsigned made, ran;
	uint8_t runs[CALLS_MAX];
} async_calls;

static int sync_runs;
static int sync_calls;
#define SYNC_MAX 4

static void check_reply(const Demo__EchoReply *r)
{
	const char *msg;
	int st = pbrpc_client_status(&msg);
	CHECK(msg != NULL, "no status message");
	CHECK((r != NULL) == (st == PBRPC_STATUS_OK), "reply %p with status %d (%s)", (const void *)r, st, msg);
	CHECK(st >= 0 && st <= 16, "status %d", st);
}

static void async_done(const Demo__EchoReply *r, void *ctx)
{
	uintptr_t slot = (uintptr_t)ctx;
	CHECK(slot < CALLS_MAX, "bad closure data");
	CHECK(async_calls.runs[slot] == 0, "async closure %u ran twice", (unsigned)slot);
	async_calls.runs[slot]++;
	async_calls.ran++;
	check_reply(r);
}

static void sync_done(const Demo__EchoReply *r, void *ctx)
{
	(void)ctx;
	sync_runs++;
	check_reply(r);
}

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
	return n - 1;
}

static void advance(int64_t ms)
{
	atomic_fetch_add_explicit(&pbrpc__clock_skew, ms * PBRPC__NS_PER_MS, memory_order_relaxed);
}

static char name[64];

static void listener_init(void)
{
	snprintf(name, sizeof(name), "pbrpc-fuzz-client-%d", (int)getpid());
	fk.lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	CHECK(fk.lfd >= 0, "socket: %s", strerror(errno));
	fk.addr.sun_family = AF_UNIX;
	size_t len = strlen(name);
	memcpy(fk.addr.sun_path + 1, name, len);
	fk.addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len);
	CHECK(bind(fk.lfd, (struct sockaddr *)&fk.addr, fk.addrlen) == 0, "bind: %s", strerror(errno));
	CHECK(listen(fk.lfd, 64) == 0, "listen: %s", strerror(errno));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	if (!name[0])
		listener_init();
	atomic_store_explicit(&pbrpc__clock_skew, 0, memory_order_relaxed);
	int fds_before = count_fds();
	memset(&async_calls, 0, sizeof(async_calls));
	sync_runs = sync_calls = 0;
	fk.cfg = data[0];
	fk.cur = -1;
	fk.accepts = 0;
	fk.n_pending = 0;
	for (int i = 0; i < CONNS_MAX; i++)
		fk.conns[i].fd = -1;

	pbrpc_client_opts o = {
		.max_frame = data[0] & 0x20 ? 128 : 0,
		.connect_timeout_ms = 2,
		.call_timeout_ms = 20,
		.lazy = data[0] & 0x10,
		.backoff_min_ms = 5,
		.backoff_max_ms = 40,
	};
	char ep[96];
	snprintf(ep, sizeof(ep), "unix:@%s", name);
	size_t i = 1;
	/* bytes before the first call-making op are the first connection's */
	while (i + 1 < size && (data[i] & 7) == 0) {
		size_t n = (size_t)data[i + 1] + 1;
		if (n > size - i - 2)
			n = size - i - 2;
		fk_send(data + i + 2, n);
		i += 2 + n;
	}
	pbrpc_client *c = NULL;
	int rc = pbrpc_client_connect(&c, ep, &o);
	if (rc < 0) {
		CHECK(c == NULL, "failed connect left a client");
		goto out;
	}
	ProtobufCService *as = pbrpc_client_service_async(c, &demo__echo__descriptor);
	ProtobufCService *ss = pbrpc_client_service(c, &demo__echo__descriptor);
	CHECK(as && ss, "services");

	while (i < size) {
		uint8_t op = data[i++];
		unsigned arg = op >> 3;
		switch (op & 7) {
		case 0: {
			if (i >= size)
				break;
			size_t n = (size_t)data[i++] + 1;
			if (n > size - i)
				n = size - i;
			fk_send(data + i, n);
			i += n;
			break;
		}
		case 1: {
			if (async_calls.made == CALLS_MAX)
				break;
			pbrpc_metadata md = { .key = "trace", .value = "1", .value_len = 1 };
			pbrpc_call_opts co = { .timeout_ms = timeout_table[arg & 3] };
			if (arg & 4) {
				co.metadata = &md;
				co.metadata_count = 1;
			}
			pbrpc_client_next_call(&co);
			Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
			req.payload.data = (uint8_t *)"abc";
			req.payload.len = 3;
			demo__echo__echo(as, &req, async_done, (void *)(uintptr_t)async_calls.made++);
			break;
		}
		case 2:
			for (unsigned k = 0; k <= arg; k++) {
				int n = pbrpc_client_process(c, 0);
				CHECK(n >= 0 || n == -ETIMEDOUT || n == -EAGAIN, "process: %s", pbrpc_strerror(n));
			}
			break;
		case 3: {
			/* each may wait for its timeout (or a handshake's): a few per
			 * input keep the target fast */
			if (++sync_calls > SYNC_MAX)
				break;
			if (arg & 1) {
				uint32_t id = c->next_id ? c->next_id : 1;
				if (arg & 2)
					fk_respond(id, PBRPC_STATUS_NOT_FOUND, NULL, 0);
				else
					fk_respond(id, PBRPC_STATUS_OK, ok_body, sizeof(ok_body));
			}
			pbrpc_call_opts co = { .timeout_ms = 1 };
			pbrpc_client_next_call(&co);
			Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
			int before = sync_runs;
			demo__echo__echo(ss, &req, sync_done, NULL);
			CHECK(sync_runs == before + 1, "sync closure ran %d times", sync_runs - before);
			break;
		}
		case 4:
			if (fk.cur >= 0) {
				if (arg & 1)
					shutdown(fk.conns[fk.cur].fd, SHUT_WR);
				else
					fk_close(fk.cur);
			}
			break;
		case 5:
			advance(time_table[arg & 7]);
			break;
		case 6:
			(void)pbrpc_client_cancel(c, pbrpc_client_last_call());
			break;
		case 7:
			fk_read();
			switch (arg & 7) {
			case 0:
				fk_answer_oldest(PBRPC_STATUS_OK, ok_body, sizeof(ok_body));
				break;
			case 1:
				fk_answer_oldest(i < size ? data[i++] % 17 : PBRPC_STATUS_UNAVAILABLE, NULL, 0);
				break;
			case 2: {
				size_t n = i < size ? (size_t)data[i++] + 1 : 0;
				if (n > size - i)
					n = size - i;
				fk_answer_oldest(PBRPC_STATUS_OK, data + i, n);
				i += n;
				break;
			}
			case 3:
				if (fk.cur >= 0 && fk.conns[fk.cur].last_answered)
					fk_respond(fk.conns[fk.cur].last_answered, PBRPC_STATUS_OK, ok_body, sizeof(ok_body));
				break;
			case 4:
				fk_control(PBRPC_FRAME_GOAWAY, PBRPC_STATUS_OK);
				break;
			case 5:
				fk_control(PBRPC_FRAME_GOAWAY, PBRPC_STATUS_UNAVAILABLE);
				break;
			case 6:
				fk_control(PBRPC_FRAME_PING, 0);
				break;
			case 7:
				while (fk.cur >= 0 && fk.conns[fk.cur].n_reqs)
					fk_answer_oldest(PBRPC_STATUS_OK, ok_body, sizeof(ok_body));
				break;
			}
			break;
		}
	}
	for (int k = 0; k < 2; k++)
		(void)pbrpc_client_process(c, 0);
	CHECK(pbrpc_client_pending(c) == async_calls.made - async_calls.ran, "pending %zu, made %u, ran %u",
	      pbrpc_client_pending(c), async_calls.made, async_calls.ran);
	pbrpc_client_free(c);
	CHECK(async_calls.ran == async_calls.made, "%u async calls made, %u closures ran", async_calls.made,
	      async_calls.ran);
out:
	for (int k = 0; k < CONNS_MAX; k++)
		fk_close(k);
	/* a connection the client dialled but the input never let in */
	for (int fd; (fd = accept4(fk.lfd, NULL, NULL, SOCK_CLOEXEC)) >= 0;)
		close(fd);
	int fds_after = count_fds();
	CHECK(fds_after == fds_before, "%d file descriptors before, %d after", fds_before, fds_after);
	return 0;
}
