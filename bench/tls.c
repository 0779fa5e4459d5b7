/* pbrpc-bench-tls: TLS against plain TCP, in one run. One server (in this
 * process, its own thread) listens on tcp: and tls: (certificates made at
 * start, tests/certs.c); one synchronous client per transport calls
 * demo.Echo with 32-byte and 1 MiB payloads. Rounds alternate the order of
 * the two transports, so that load from elsewhere falls on both; the table
 * gives each one's median over the rounds and their ratio.
 *
 *   pbrpc-bench-tls [--rounds N] [--small N] [--large N]
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../tests/certs.h"
#include "demo_services.h"
#include "pbrpc/pbrpc.h"

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void *run(void *srv)
{
	pbrpc_server_run(srv);
	return NULL;
}

static int failures;

static void on_reply(const Demo__EchoReply *r, void *len)
{
	if (!r || r->payload.len != *(size_t *)len)
		failures++;
}

/* ns per call over n calls of len bytes each way. */
static double measure(ProtobufCService *svc, const uint8_t *buf, size_t len, int n)
{
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)buf;
	req.payload.len = len;
	int64_t t0 = now_ns();
	for (int i = 0; i < n; i++)
		demo__echo__echo(svc, &req, on_reply, &len);
	return (double)(now_ns() - t0) / n;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

#define MAX_ROUNDS 64

int main(int argc, char **argv)
{
	int rounds = 7, small = 20000, large = 200;
	for (int i = 1; i + 1 < argc; i += 2) {
		if (strcmp(argv[i], "--rounds") == 0)
			rounds = atoi(argv[i + 1]);
		else if (strcmp(argv[i], "--small") == 0)
			small = atoi(argv[i + 1]);
		else if (strcmp(argv[i], "--large") == 0)
			large = atoi(argv[i + 1]);
	}
	if (rounds < 1 || rounds > MAX_ROUNDS)
		rounds = 7;
	char dir[] = "/tmp/pbrpc-bench-tls-XXXXXX";
	if (!mkdtemp(dir))
		return 1;
	tu_certs_make(dir);
	char cert[128], key[128], ca[128];
	snprintf(cert, sizeof(cert), "%s/server.pem", dir);
	snprintf(key, sizeof(key), "%s/server.key", dir);
	snprintf(ca, sizeof(ca), "%s/ca.pem", dir);

	pbrpc_server_opts so = { .tls = { .cert = cert, .key = key } };
	pbrpc_server *srv;
	Demo__Echo_Service *echo = demo_echo_new();
	if (pbrpc_server_new(&srv, &so) < 0 || pbrpc_server_add_service(srv, &echo->base) < 0)
		return 1;
	char addr[2][PBRPC_ENDPOINT_STRLEN];
	const char *eps[2] = { "tcp:127.0.0.1:0", "tls:127.0.0.1:0" };
	for (int i = 0; i < 2; i++) {
		int idx = pbrpc_server_listen(srv, eps[i]);
		if (idx < 0)
			return 1;
		pbrpc_server_address(srv, idx, addr[i], sizeof(addr[i]));
	}
	pthread_t thr;
	pthread_create(&thr, NULL, run, srv);

	pbrpc_client *c[2];
	ProtobufCService *svc[2];
	for (int i = 0; i < 2; i++) {
		pbrpc_client_opts co = { .tls = { .ca = ca } };
		int rc = pbrpc_client_connect(&c[i], addr[i], &co);
		if (rc < 0) {
			fprintf(stderr, "pbrpc-bench-tls: connect %s: %s\n", addr[i], pbrpc_strerror(rc));
			return 1;
		}
		svc[i] = pbrpc_client_service(c[i], &demo__echo__descriptor);
	}
	size_t sizes[2] = { 32, 1u << 20 };
	int calls[2] = { small, large };
	uint8_t *buf = calloc(1, sizes[1]);
	double t[2][2][MAX_ROUNDS]; /* size, transport, round */
	for (int s = 0; s < 2; s++)
		for (int k = 0; k < 2; k++)
			measure(svc[k], buf, sizes[s], calls[s] / 10 + 1); /* warm up */
	for (int r = 0; r < rounds; r++)
		for (int s = 0; s < 2; s++)
			for (int j = 0; j < 2; j++) {
				int k = (r + j) % 2; /* alternate which goes first */
				t[s][k][r] = measure(svc[k], buf, sizes[s], calls[s]);
			}
	printf("| payload | calls x rounds | tcp: us/call | tls: us/call | tls / tcp |\n");
	printf("|---|---|---:|---:|---:|\n");
	for (int s = 0; s < 2; s++) {
		double med[2];
		for (int k = 0; k < 2; k++) {
			qsort(t[s][k], (size_t)rounds, sizeof(double), cmp);
			med[k] = t[s][k][rounds / 2];
		}
		printf("| %s | %d x %d | %.2f | %.2f | %.2f |\n", s ? "1 MiB" : "32 B", calls[s], rounds, med[0] / 1000,
		       med[1] / 1000, med[1] / med[0]);
	}
	if (failures)
		printf("\n%d calls failed\n", failures);
	for (int i = 0; i < 2; i++)
		pbrpc_client_free(c[i]);
	pbrpc_server_shutdown(srv, 0);
	pthread_join(thr, NULL);
	pbrpc_server_free(srv);
	demo_echo_free(echo);
	free(buf);
	char cmd[64];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	return system(cmd) == 0 && !failures ? 0 : 1;
}
