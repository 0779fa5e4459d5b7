/* pbrpc-bigreq: what large requests of tiny fields cost a running server
 * (issue 9, defects 5 and 6). A measurement, never a test: it reports and
 * asserts nothing.
 *
 *   pbrpc-bigreq ENDPOINT PID [CONNS] [PER_CONN] [PATTERN] [HOLD_MS]
 *
 * Opens CONNS (1) connections to the pbrpc-server at ENDPOINT whose pid is
 * PID, and on each sends PER_CONN (1) demo.Echo/Echo REQUESTs of exactly
 * 16 MiB whose body is PATTERN repeated: "7800" (default; field 15, unknown
 * to demo.EchoRequest), "0a0158" (payload = "X", again and again) or "0a0e"
 * (payload = 14 bytes, again and again: 1 M fields that unpack within the
 * server's default bound, but take a while). Meanwhile
 * a bystander connection makes small Echo calls back to back and records
 * their latency. Reads the server's VmRSS and VmHWM from /proc/PID/status
 * (VmHWM reset through /proc/PID/clear_refs first), keeps the connections
 * open HOLD_MS (0) after the answers, closes them and reads VmRSS again 3 s
 * later. Prints the answers, the memory figures and the bystander's p50,
 * p99 and max.
 *
 * Speaks the wire protocol through lib/proto's frame and wire codecs, so that
 * it can drive a server built from any commit.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "echo.pb-c.h"
#include "pbrpc/endpoint.h"
#include "proto/frame.h"
#include "proto/wire.h"

#define MiB (1024.0 * 1024.0)

static const char *g_endpoint;
static int g_pid;

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static long status_kib(const char *key)
{
	char path[64], line[256];
	snprintf(path, sizeof(path), "/proc/%d/status", g_pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	long v = -1;
	size_t kl = strlen(key);
	while (fgets(line, sizeof(line), f))
		if (strncmp(line, key, kl) == 0 && line[kl] == ':')
			v = atol(line + kl + 1);
	fclose(f);
	return v;
}

static void hwm_reset(void)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/clear_refs", g_pid);
	int fd = open(path, O_WRONLY);
	if (fd < 0 || write(fd, "5", 1) != 1)
		fprintf(stderr, "cannot reset VmHWM: %s\n", strerror(errno));
	if (fd >= 0)
		close(fd);
}

static void die(const char *what, int rc)
{
	fprintf(stderr, "pbrpc-bigreq: %s: %s\n", what, pbrpc_strerror(rc));
	exit(1);
}

static void send_all(int fd, const uint8_t *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			die("write", -errno);
		p += w;
		n -= (size_t)w;
	}
}

static void send_writer(int fd, pbrpc__frame_writer *w)
{
	while (pbrpc__frame_writer_pending(w)) {
		ssize_t n = pbrpc__frame_writer_flush(w, fd, 0);
		if (n < 0)
			die("flush", (int)n);
	}
}

typedef struct conn {
	int fd;
	pbrpc__frame_decoder dec;
} conn;

static void conn_open(conn *c)
{
	pbrpc_endpoint ep;
	int rc = pbrpc_endpoint_parse(g_endpoint, &ep);
	if (rc < 0)
		die(g_endpoint, rc);
	c->fd = pbrpc_endpoint_connect(&ep, 5000);
	if (c->fd < 0)
		die("connect", c->fd);
	pbrpc__frame_decoder_init(&c->dec, 64u << 20);
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc_hello h = { .version = 1, .max_frame = 64u << 20, .agent = "bigreq" };
	pbrpc__wire_write_preface(&w, &h);
	send_writer(c->fd, &w);
	pbrpc__frame_writer_fini(&w);
	uint8_t pre[PBRPC_WIRE_PREFACE_SIZE];
	size_t got = 0;
	while (got < sizeof(pre)) {
		ssize_t n = read(c->fd, pre + got, sizeof(pre) - got);
		if (n <= 0)
			die("read preface", n < 0 ? -errno : PBRPC_EOF);
		got += (size_t)n;
	}
	pbrpc__frame f;
	rc = pbrpc__frame_read(&c->dec, c->fd, &f, 5000);
	if (rc < 0)
		die("read HELLO", rc);
}

/* Reads until a RESPONSE (answering PINGs); returns its status, message in msg. */
static int conn_response(conn *c, char *msg, size_t len, int timeout_ms)
{
	for (;;) {
		pbrpc__frame f;
		int rc = pbrpc__frame_read(&c->dec, c->fd, &f, timeout_ms);
		if (rc < 0)
			return rc;
		if (f.hdr.type == PBRPC_FRAME_PING) {
			pbrpc__frame_header h = { .type = PBRPC_FRAME_PONG };
			pbrpc__frame_write(c->fd, &h, f.payload, PBRPC_WIRE_PING_SIZE, 5000);
			continue;
		}
		if (f.hdr.type == PBRPC_FRAME_GOAWAY) {
			int st;
			const char *m;
			size_t ml;
			pbrpc__wire_read_goaway(&f, &st, &m, &ml);
			snprintf(msg, len, "GOAWAY %s: %.*s", pbrpc_status_name(st), (int)ml, m);
			if (st)
				return -1000 - st;
			continue;
		}
		if (f.hdr.type != PBRPC_FRAME_RESPONSE)
			continue;
		pbrpc__wire_response r;
		if (pbrpc__wire_read_response(&f, &r) < 0)
			return PBRPC_EPROTO;
		snprintf(msg, len, "%.*s", (int)r.message_len, r.message ? r.message : "");
		return r.status;
	}
}

/* ---- the bystander ---- */

static atomic_bool stop;
static double *lat, *lat_start; /* each call's latency and start, ms */
static size_t n_lat, cap_lat;

static void *bystander(void *arg)
{
	(void)arg;
	conn c;
	conn_open(&c);
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)"ping";
	req.payload.len = 4;
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	for (uint32_t id = 1; !atomic_load(&stop); id++) {
		pbrpc__wire_request r = { .call_id = id, .method = "demo.Echo/Echo", .method_len = 14 };
		pbrpc__wire_write_request(&w, &r, &req.base, 0);
		double t0 = now_ms();
		send_writer(c.fd, &w);
		char msg[256];
		int st = conn_response(&c, msg, sizeof(msg), 30000);
		double dt = now_ms() - t0;
		if (st != 0)
			fprintf(stderr, "bystander call %u: %d %s\n", id, st, msg);
		if (n_lat == cap_lat) {
			cap_lat = cap_lat ? 2 * cap_lat : 4096;
			lat = realloc(lat, cap_lat * sizeof(*lat));
			lat_start = realloc(lat_start, cap_lat * sizeof(*lat_start));
		}
		lat_start[n_lat] = t0;
		lat[n_lat++] = dt;
		usleep(1000); /* ~1000 calls a second, each on an otherwise idle server */
	}
	pbrpc__frame_writer_fini(&w);
	close(c.fd);
	pbrpc__frame_decoder_fini(&c.dec);
	return NULL;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* ---- the large requests ---- */

static uint8_t *g_frames;
static size_t g_frames_len;

struct sender {
	conn c;
	pthread_t thr;
};

static void *sender(void *arg)
{
	struct sender *s = arg;
	send_all(s->c.fd, g_frames, g_frames_len);
	return NULL;
}

/* PER REQUEST frames of exactly 16 MiB each, ids 1..per. */
static void build_frames(const uint8_t *pat, size_t plen, int per)
{
	const size_t frame_len = 16u << 20;
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc__wire_request r = { .call_id = 1, .method = "demo.Echo/Echo", .method_len = 14 };
	pbrpc__wire_write_request(&w, &r, NULL, 0);
	size_t overhead = pbrpc__frame_writer_pending(&w) - PBRPC_FRAME_HEADER_SIZE;
	pbrpc__frame_writer_fini(&w);
	size_t body_len = frame_len - overhead;
	uint8_t *body = malloc(body_len);
	size_t i = 0;
	for (; i + plen <= body_len; i += plen)
		memcpy(body + i, pat, plen);
	for (; i + 2 <= body_len; i += 2)
		memcpy(body + i, "\x0a\x00", 2);
	if (i != body_len) {
		fprintf(stderr, "pattern does not tile\n");
		exit(1);
	}
	pbrpc__frame_writer_init(&w);
	for (int k = 0; k < per; k++) {
		r.call_id = (uint32_t)k + 1;
		r.body = body;
		r.body_len = body_len;
		pbrpc__wire_write_request(&w, &r, NULL, 0);
	}
	free(body);
	g_frames_len = pbrpc__frame_writer_pending(&w);
	g_frames = malloc(g_frames_len);
	memcpy(g_frames, w.buf + w.head, g_frames_len);
	pbrpc__frame_writer_fini(&w);
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: pbrpc-bigreq ENDPOINT PID [CONNS] [PER_CONN] [7800|0a0158|0a0e] [HOLD_MS]\n");
		return 2;
	}
	g_endpoint = argv[1];
	g_pid = atoi(argv[2]);
	int nconn = argc > 3 ? atoi(argv[3]) : 1;
	int per = argc > 4 ? atoi(argv[4]) : 1;
	const char *pat = argc > 5 ? argv[5] : "7800";
	int hold_ms = argc > 6 ? atoi(argv[6]) : 0;
	static const uint8_t p7800[] = { 0x78, 0x00 }, p0a[] = { 0x0a, 0x01, 0x58 };
	static const uint8_t p0a0e[] = { 0x0a, 0x0e, 'x', 'x', 'x', 'x', 'x', 'x', 'x', 'x', 'x', 'x', 'x', 'x', 'x', 'x' };
	if (strcmp(pat, "0a0158") == 0)
		build_frames(p0a, sizeof(p0a), per);
	else if (strcmp(pat, "0a0e") == 0)
		build_frames(p0a0e, sizeof(p0a0e), per);
	else
		build_frames(p7800, sizeof(p7800), per);

	pthread_t by;
	pthread_create(&by, NULL, bystander, NULL);
	usleep(300 * 1000);
	long base = status_kib("VmRSS");
	hwm_reset();
	double t0 = now_ms();
	struct sender *s = calloc((size_t)nconn, sizeof(*s));
	for (int i = 0; i < nconn; i++) {
		conn_open(&s[i].c);
		pthread_create(&s[i].thr, NULL, sender, &s[i]);
	}
	long peak_rss = 0;
	for (int i = 0; i < nconn; i++) {
		for (int k = 0; k < per; k++) {
			char msg[300];
			int st = conn_response(&s[i].c, msg, sizeof(msg), 120000);
			long rss = status_kib("VmRSS");
			if (rss > peak_rss)
				peak_rss = rss;
			if (i == 0 || k == 0)
				printf("conn %d call %d: %s %s\n", i, k + 1, st >= 0 ? pbrpc_status_name(st) : pbrpc_strerror(st),
				       msg);
		}
	}
	double t_end = now_ms(), t_answered = t_end - t0;
	for (int i = 0; i < nconn; i++)
		pthread_join(s[i].thr, NULL);
	long rss_open = status_kib("VmRSS");
	if (hold_ms)
		usleep((useconds_t)hold_ms * 1000);
	long rss_held = status_kib("VmRSS"), hwm = status_kib("VmHWM");
	for (int i = 0; i < nconn; i++) {
		close(s[i].c.fd);
		pbrpc__frame_decoder_fini(&s[i].c.dec);
	}
	sleep(3);
	long after = status_kib("VmRSS");
	atomic_store(&stop, true);
	pthread_join(by, NULL);

	printf("server pid %d: %d x 16 MiB of %s on %d connection(s), answered in %.0f ms\n", g_pid, nconn * per, pat,
	       nconn, t_answered);
	printf("  VmRSS baseline %.1f MiB; peak (VmHWM) %+.1f MiB; with the connections open %+.1f MiB", base / 1024.0,
	       (hwm - base) / 1024.0, (rss_open - base) / 1024.0);
	if (hold_ms)
		printf(" (%+.1f MiB %d ms later)", (rss_held - base) / 1024.0, hold_ms);
	printf("; 3 s after closing %+.1f MiB\n", (after - base) / 1024.0);
	/* the calls that started while the requests were sent and answered */
	size_t n = 0;
	double *v = malloc((n_lat + 1) * sizeof(*v));
	for (size_t i = 0; i < n_lat; i++)
		if (lat_start[i] >= t0 && lat_start[i] <= t_end)
			v[n++] = lat[i];
	if (n) {
		qsort(v, n, sizeof(*v), cmp_double);
		printf("  bystander while they were sent and answered: %zu calls, p50 %.2f ms, p99 %.2f ms, max %.2f ms\n",
		       n, v[n / 2], v[(size_t)(n * 0.99)], v[n - 1]);
	}
	free(g_frames);
	free(s);
	free(v);
	free(lat);
	free(lat_start);
	return 0;
}
