/* pbrpc-bench-stream: messages per second on one stream of 32-byte messages
 * (issue 10), server to client, each system in the same run:
 *
 *   raw     a socketpair; the writer packs each message with protobuf-c
 *           behind a 4-byte length into a 64 KiB buffer and write()s it when
 *           full; the reader read()s 64 KiB at a time and unpacks each
 *           message (protobuf-c, default allocator, freed after use): the
 *           loop a user writes by hand, buffered on both sides
 *   pbrpc   a server stream (pbrpc_stream_send from on_writable, 64 KiB
 *           window), read with pbrpc_client_stream_next
 *   grpc    gRPC C++ server streaming (ServerWriter::Write, ClientReader::
 *           Read), sync API, when built with libgrpc++-dev
 *
 * Each round forks a server process and reads N messages in this one; the
 * figure is N / the time from opening the stream to its end. Prints the
 * median of the rounds and the ratio to raw.
 *
 *   pbrpc-bench-stream [-n MESSAGES] [-r ROUNDS] [-s raw,pbrpc,grpc]
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "echo.pb-c.h"
#include "pbrpc/client.h"
#include "pbrpc/server.h"
#include "pbrpc/stream.h"
#ifdef BENCH_HAVE_GRPC
#include "grpc_stream.h"
#endif

#define PAYLOAD 30 /* + tag and length: 32 bytes on the wire */

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int ready_pipe[2];

static void child_ready(void)
{
	char c = 1;
	if (write(ready_pipe[1], &c, 1) != 1)
		_exit(1);
}

static void wait_ready(void)
{
	char c;
	if (read(ready_pipe[0], &c, 1) != 1) {
		fprintf(stderr, "pbrpc-bench-stream: the server did not start\n");
		exit(1);
	}
}

/* ---- raw ---- */

static void raw_writer(int fd, unsigned n)
{
	static uint8_t buf[65536];
	size_t used = 0;
	uint8_t payload[PAYLOAD];
	memset(payload, 'x', sizeof(payload));
	Demo__EchoReply r = DEMO__ECHO_REPLY__INIT;
	r.payload.data = payload;
	r.payload.len = sizeof(payload);
	for (unsigned i = 0; i < n; i++) {
		payload[0] = (uint8_t)i;
		size_t len = demo__echo_reply__get_packed_size(&r);
		if (used + 4 + len > sizeof(buf)) {
			for (size_t off = 0; off < used;) {
				ssize_t w = write(fd, buf + off, used - off);
				if (w <= 0)
					_exit(1);
				off += (size_t)w;
			}
			used = 0;
		}
		buf[used] = (uint8_t)(len >> 24);
		buf[used + 1] = (uint8_t)(len >> 16);
		buf[used + 2] = (uint8_t)(len >> 8);
		buf[used + 3] = (uint8_t)len;
		used += 4 + demo__echo_reply__pack(&r, buf + used + 4);
	}
	for (size_t off = 0; off < used;) {
		ssize_t w = write(fd, buf + off, used - off);
		if (w <= 0)
			_exit(1);
		off += (size_t)w;
	}
}

static long raw_reader(int fd)
{
	static uint8_t buf[65536 + 4096];
	size_t have = 0;
	long got = 0;
	for (;;) {
		ssize_t r = read(fd, buf + have, sizeof(buf) - have);
		if (r <= 0)
			break;
		have += (size_t)r;
		size_t off = 0;
		while (have - off >= 4) {
			size_t len = (size_t)buf[off] << 24 | (size_t)buf[off + 1] << 16 | (size_t)buf[off + 2] << 8 |
				     buf[off + 3];
			if (have - off < 4 + len)
				break;
			Demo__EchoReply *m = demo__echo_reply__unpack(NULL, len, buf + off + 4);
			if (!m || m->payload.len != PAYLOAD)
				return -1;
			demo__echo_reply__free_unpacked(m, NULL);
			got++;
			off += 4 + len;
		}
		memmove(buf, buf + off, have - off);
		have -= off;
	}
	return got;
}

static double run_raw(unsigned n)
{
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
		return -1;
	double t0 = now_s();
	pid_t pid = fork();
	if (pid == 0) {
		close(sv[0]);
		raw_writer(sv[1], n);
		_exit(0);
	}
	close(sv[1]);
	long got = raw_reader(sv[0]);
	double t = now_s() - t0;
	close(sv[0]);
	waitpid(pid, NULL, 0);
	return got == (long)n ? t : -1;
}

/* ---- pbrpc ---- */

static const pbrpc_stream_desc count_desc = { "bench.Stream/Count", PBRPC_STREAM_SERVER,
					      &demo__echo_request__descriptor, &demo__echo_reply__descriptor };

typedef struct pump {
	unsigned n, sent;
	uint8_t payload[PAYLOAD];
} pump;

static void pump_run(pbrpc_stream *st, void *user)
{
	pump *p = user;
	Demo__EchoReply r = DEMO__ECHO_REPLY__INIT;
	r.payload.data = p->payload;
	r.payload.len = sizeof(p->payload);
	while (p->sent < p->n) {
		p->payload[0] = (uint8_t)p->sent;
		int rc = pbrpc_stream_send(st, &r.base);
		if (rc == -EAGAIN)
			return;
		if (rc < 0)
			break;
		p->sent++;
	}
	int status = p->sent == p->n ? PBRPC_STATUS_OK : PBRPC_STATUS_ABORTED;
	free(p);
	pbrpc_stream_end(st, status, NULL, NULL);
}

static void pump_cancel(pbrpc_stream *st, void *user)
{
	free(user);
	pbrpc_stream_end(st, 0, NULL, NULL);
}

static const pbrpc_stream_ops pump_ops = { .on_writable = pump_run, .on_cancel = pump_cancel };

static void count_handler(pbrpc_stream *st, const ProtobufCMessage *req, void *user)
{
	(void)user;
	pump *p = calloc(1, sizeof(*p));
	p->n = ((const Demo__EchoRequest *)req)->delay_ms;
	memset(p->payload, 'x', sizeof(p->payload));
	pbrpc_stream_set_ops(st, &pump_ops, p);
	pump_run(st, p);
}

static double run_pbrpc(unsigned n)
{
	char ep[64];
	snprintf(ep, sizeof(ep), "unix:@pbrpc-bench-stream-%d", (int)getpid());
	pid_t pid = fork();
	if (pid == 0) {
		pbrpc_server *srv;
		if (pbrpc_server_new(&srv, NULL) < 0 || pbrpc_server_add_stream(srv, &count_desc, count_handler, NULL) < 0 ||
		    pbrpc_server_listen(srv, ep) < 0)
			_exit(1);
		child_ready();
		pbrpc_server_run(srv);
		_exit(0);
	}
	wait_ready();
	pbrpc_client *c;
	if (pbrpc_client_connect(&c, ep, NULL) < 0)
		return -1;
	double t0 = now_s();
	Demo__EchoRequest q = DEMO__ECHO_REQUEST__INIT;
	q.delay_ms = n;
	pbrpc_client_stream *s;
	long got = -1;
	if (pbrpc_client_stream_open(c, &count_desc, &q.base, NULL, &s) == 0) {
		const ProtobufCMessage *m;
		int rc;
		got = 0;
		while ((rc = pbrpc_client_stream_next(s, &m, -1)) == 1) {
			if (((const Demo__EchoReply *)m)->payload.len != PAYLOAD) {
				got = -1;
				break;
			}
			got++;
		}
		if (rc != 0)
			got = -1;
		pbrpc_client_stream_free(s);
	}
	double t = now_s() - t0;
	pbrpc_client_free(c);
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	return got == (long)n ? t : -1;
}

/* ---- gRPC C++ ---- */

#ifdef BENCH_HAVE_GRPC
static double run_grpc(unsigned n)
{
	char addr[80], target[96];
	snprintf(addr, sizeof(addr), "unix-abstract:pbrpc-bench-stream-grpc-%d", (int)getpid());
	snprintf(target, sizeof(target), "%s", addr);
	pid_t pid = fork();
	if (pid == 0) {
		bench_grpc_stream_serve(addr, child_ready);
		_exit(0);
	}
	wait_ready();
	double t0 = now_s();
	long got = bench_grpc_stream_count(target, n);
	double t = now_s() - t0;
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	return got == (long)n ? t : -1;
}
#endif

/* Runs one measurement in a child of its own, so that this process never
 * holds gRPC's threads across a fork (a gRPC server forked from a process
 * that has used gRPC hangs). */
static double run_isolated(double (*run)(unsigned), unsigned n)
{
	int p[2];
	if (pipe(p) < 0)
		return -1;
	fflush(stdout);
	pid_t pid = fork();
	if (pid == 0) {
		close(p[0]);
		double t = run(n);
		if (write(p[1], &t, sizeof(t)) != sizeof(t))
			_exit(1);
		_exit(0);
	}
	close(p[1]);
	double t = -1;
	if (read(p[0], &t, sizeof(t)) != sizeof(t))
		t = -1;
	close(p[0]);
	waitpid(pid, NULL, 0);
	return t;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	unsigned n = 1000000, rounds = 3;
	const char *systems = "raw,pbrpc,grpc";
	int opt;
	while ((opt = getopt(argc, argv, "n:r:s:")) != -1) {
		switch (opt) {
		case 'n':
			n = (unsigned)strtoul(optarg, NULL, 10);
			break;
		case 'r':
			rounds = (unsigned)strtoul(optarg, NULL, 10);
			break;
		case 's':
			systems = optarg;
			break;
		default:
			fprintf(stderr, "usage: %s [-n MESSAGES] [-r ROUNDS] [-s raw,pbrpc,grpc]\n", argv[0]);
			return 2;
		}
	}
	if (!rounds || rounds > 99)
		rounds = 3;
	if (pipe(ready_pipe) < 0)
		return 1;
	struct {
		const char *name;
		double (*run)(unsigned);
	} sys[] = {
		{ "raw", run_raw },
		{ "pbrpc", run_pbrpc },
#ifdef BENCH_HAVE_GRPC
		{ "grpc", run_grpc },
#else
		{ "grpc", NULL },
#endif
	};
	printf("One stream, %u messages of 32 bytes, server to client, Unix socket; median of %u rounds.\n\n", n,
	       rounds);
	printf("| system | messages/s | ns/message | vs raw |\n|---|---:|---:|---:|\n");
	double raw_rate = 0;
	/* Rounds interleave the systems, so that a change in the machine's load
	 * touches them alike. */
	double t[3][100];
	for (unsigned r = 0; r < rounds; r++)
		for (size_t i = 0; i < 3; i++)
			t[i][r] = strstr(systems, sys[i].name) && sys[i].run ? run_isolated(sys[i].run, n) : -2;
	for (size_t i = 0; i < 3; i++) {
		if (!strstr(systems, sys[i].name))
			continue;
		if (!sys[i].run) {
			printf("| %s | not built (libgrpc++-dev missing) | | |\n", sys[i].name);
			continue;
		}
		qsort(t[i], rounds, sizeof(double), cmp_double);
		double med = t[i][rounds / 2];
		if (t[i][0] < 0) {
			printf("| %s | failed | | |\n", sys[i].name);
			continue;
		}
		double rate = n / med;
		if (i == 0)
			raw_rate = rate;
		if (raw_rate > 0)
			printf("| %s | %.0f | %.0f | %.2fx |\n", sys[i].name, rate, 1e9 / rate, rate / raw_rate);
		else
			printf("| %s | %.0f | %.0f | |\n", sys[i].name, rate, 1e9 / rate);
	}
	return 0;
}
