/* The deployment test's clients (tests/test_deploy.sh): N threads, each with
 * its own pbrpc client, call demo.Echo/Echo on ENDPOINT without pause until
 * SIGTERM or SIGINT, and count every call exactly. Each failed call is
 * printed as it happens, with the wall clock in ms (so the script can line
 * it up with the kills it made):
 *
 *   fail t=1733100000123 client=2 status=UNAVAILABLE msg="..."
 *
 * and at the end one line:
 *
 *   calls=N ok=N failed=N unavailable=N
 *
 * It prints "ready t=MS" once every client has completed a call, then every
 * 50 ms "progress t=MS ok=N" (the calls that succeeded so far, all clients).
 *
 * "deploy-driver ENDPOINT probe" makes one call and exits 0 if it succeeded
 * (the script's "is this backend serving yet").
 *
 * For tls: endpoints, PBRPC_DEPLOY_CA, PBRPC_DEPLOY_CERT, PBRPC_DEPLOY_KEY
 * and PBRPC_DEPLOY_SERVER_NAME fill pbrpc_client_opts.tls (the names are
 * borrowed from the environment for the whole run). */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "echo.pb-c.h"
#include "pbrpc/pbrpc.h"

#define MAX_CLIENTS 64

static atomic_bool stop;
static atomic_int ready;
static atomic_long total_ok;
static pthread_mutex_t out_mu = PTHREAD_MUTEX_INITIALIZER;

typedef struct client {
	int idx;
	const char *endpoint;
	long ok, failed, unavailable;
} client;

static void tls_from_env(pbrpc_client_opts *o)
{
	o->tls.ca = getenv("PBRPC_DEPLOY_CA");
	o->tls.cert = getenv("PBRPC_DEPLOY_CERT");
	o->tls.key = getenv("PBRPC_DEPLOY_KEY");
	o->tls.server_name = getenv("PBRPC_DEPLOY_SERVER_NAME");
}

static long long wall_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void *client_main(void *arg)
{
	client *cl = arg;
	pbrpc_client_opts o = { .lazy = true, .call_timeout_ms = 10000, .connect_timeout_ms = 2000,
				.backoff_min_ms = 10, .backoff_max_ms = 200 };
	tls_from_env(&o);
	pbrpc_client *c;
	int rc = pbrpc_client_connect(&c, cl->endpoint, &o);
	if (rc < 0) {
		fprintf(stderr, "deploy-driver: client %d: %s\n", cl->idx, pbrpc_strerror(rc));
		exit(1);
	}
	char text[48];
	bool counted = false;
	for (unsigned long n = 0; !atomic_load(&stop); n++) {
		snprintf(text, sizeof(text), "client %d call %lu", cl->idx, n);
		Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
		req.payload.data = (uint8_t *)text;
		req.payload.len = strlen(text);
		ProtobufCMessage *got = NULL;
		pbrpc_call_result res;
		rc = pbrpc_client_call(c, "demo.Echo/Echo", &req.base, &demo__echo_reply__descriptor, &got, NULL, &res);
		Demo__EchoReply *r = (Demo__EchoReply *)got;
		if (rc == 0 && r && r->payload.len == req.payload.len &&
		    memcmp(r->payload.data, text, req.payload.len) == 0) {
			cl->ok++;
			atomic_fetch_add(&total_ok, 1);
			if (!counted) {
				counted = true;
				atomic_fetch_add(&ready, 1);
			}
		} else {
			cl->failed++;
			if (res.status == PBRPC_STATUS_UNAVAILABLE)
				cl->unavailable++;
			pthread_mutex_lock(&out_mu);
			printf("fail t=%lld client=%d status=%s msg=\"%s\"\n", wall_ms(), cl->idx,
			       rc == 0 ? "WRONG_REPLY" : pbrpc_status_name(res.status), res.message);
			fflush(stdout);
			pthread_mutex_unlock(&out_mu);
		}
		if (got)
			protobuf_c_message_free_unpacked(got, NULL);
	}
	pbrpc_client_free(c);
	return NULL;
}

static void on_signal(int sig)
{
	(void)sig;
	atomic_store(&stop, true);
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: deploy-driver ENDPOINT CLIENTS\n");
		return 2;
	}
	if (strcmp(argv[2], "probe") == 0) {
		pbrpc_client_opts o = { .connect_timeout_ms = 500, .call_timeout_ms = 1000 };
		tls_from_env(&o);
		pbrpc_client *c;
		if (pbrpc_client_connect(&c, argv[1], &o) < 0)
			return 1;
		Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
		ProtobufCMessage *got = NULL;
		int rc = pbrpc_client_call(c, "demo.Echo/Echo", &req.base, &demo__echo_reply__descriptor, &got, NULL,
					   NULL);
		if (got)
			protobuf_c_message_free_unpacked(got, NULL);
		pbrpc_client_free(c);
		return rc == 0 ? 0 : 1;
	}
	int n = atoi(argv[2]);
	if (n < 1 || n > MAX_CLIENTS)
		return 2;
	struct sigaction sa = { .sa_handler = on_signal };
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	static client cl[MAX_CLIENTS];
	pthread_t thr[MAX_CLIENTS];
	for (int i = 0; i < n; i++) {
		cl[i] = (client){ .idx = i, .endpoint = argv[1] };
		pthread_create(&thr[i], NULL, client_main, &cl[i]);
	}
	while (atomic_load(&ready) < n && !atomic_load(&stop))
		usleep(10000);
	pthread_mutex_lock(&out_mu);
	printf("ready t=%lld\n", wall_ms());
	fflush(stdout);
	pthread_mutex_unlock(&out_mu);
	while (!atomic_load(&stop)) {
		usleep(50000);
		pthread_mutex_lock(&out_mu);
		printf("progress t=%lld ok=%ld\n", wall_ms(), atomic_load(&total_ok));
		fflush(stdout);
		pthread_mutex_unlock(&out_mu);
	}
	long ok = 0, failed = 0, unavailable = 0;
	for (int i = 0; i < n; i++) {
		pthread_join(thr[i], NULL);
		ok += cl[i].ok;
		failed += cl[i].failed;
		unavailable += cl[i].unavailable;
	}
	printf("calls=%ld ok=%ld failed=%ld unavailable=%ld\n", ok + failed, ok, failed, unavailable);
	return 0;
}
