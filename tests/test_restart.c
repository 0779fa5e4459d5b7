/* Graceful restarts of the real pbrpc-server with a replacement on the same
 * endpoint, while real clients call without pause (issue 9, defect 2).
 *
 * The old server's drain is exact: after its GOAWAY it reads until the
 * client's PONG shows every request sent before has arrived, answers those
 * it will not run UNAVAILABLE with the NOT_RUN flag, and the client sends
 * them again on a new connection, to the replacement. So no call fails. And
 * the old server unlinks its socket file when it closes its listener, while
 * the inode is still its own, so that it never deletes the replacement's:
 * after every restart a new client connects. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "echo.pb-c.h"
#include "pbrpc/pbrpc.h"

extern char **environ;

#define CLIENTS 4
#define RESTARTS 5

static pid_t spawn_server(const char *endpoint)
{
	const char *exe = getenv("PBRPC_SERVER");
	cr_assert_not_null(exe, "PBRPC_SERVER is not set (run through meson test)");
	posix_spawn_file_actions_t fa;
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
	posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
	char *argv[] = { (char *)exe, "--listen", (char *)endpoint, NULL };
	pid_t pid;
	int rc = posix_spawn(&pid, exe, &fa, NULL, argv, environ);
	posix_spawn_file_actions_destroy(&fa);
	cr_assert_eq(rc, 0, "spawn %s: %s", exe, strerror(rc));
	return pid;
}

static void sleep_ms(int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000 };
	nanosleep(&ts, NULL);
}

/* Waits until a fresh client completes a handshake with endpoint. */
static void wait_listening(const char *endpoint)
{
	pbrpc_client_opts o = { .connect_timeout_ms = 200 };
	for (int i = 0; i < 500; i++) {
		pbrpc_client *c;
		if (pbrpc_client_connect(&c, endpoint, &o) == 0) {
			pbrpc_client_free(c);
			return;
		}
		sleep_ms(10);
	}
	cr_assert_fail("no server answered on %s", endpoint);
}

/* Starts the replacement. While the old server has not yet closed its
 * listener the path or port is live and the new one exits with status 1
 * (cannot listen): start it again. */
static pid_t start_replacement(const char *endpoint)
{
	for (int i = 0; i < 200; i++) {
		pid_t pid = spawn_server(endpoint);
		sleep_ms(100);
		int st;
		if (waitpid(pid, &st, WNOHANG) == 0)
			return pid;
		sleep_ms(5);
	}
	cr_assert_fail("the replacement never started on %s", endpoint);
	return -1;
}

/* Waits until `pid`, or a replacement started again after it exited, is
 * alive and a new client completes a handshake with it. */
static pid_t serving_replacement(const char *endpoint, pid_t pid)
{
	pbrpc_client_opts o = { .connect_timeout_ms = 200 };
	for (int i = 0; i < 1000; i++) {
		int st;
		if (waitpid(pid, &st, WNOHANG) == pid) {
			pid = spawn_server(endpoint);
			sleep_ms(50);
			continue;
		}
		pbrpc_client *c;
		if (pbrpc_client_connect(&c, endpoint, &o) == 0) {
			pbrpc_client_free(c);
			if (waitpid(pid, &st, WNOHANG) == 0)
				return pid;
		}
		sleep_ms(10);
	}
	cr_assert_fail("no replacement came up on %s", endpoint);
	return -1;
}

typedef struct caller {
	const char *endpoint;
	atomic_bool *stop;
	int ok, failed;
	char last_error[320];
} caller;

static void *caller_main(void *arg)
{
	caller *cl = arg;
	pbrpc_client_opts o = { .lazy = true, .call_timeout_ms = 20000, .backoff_min_ms = 5, .backoff_max_ms = 50 };
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, cl->endpoint, &o), 0);
	ProtobufCService *echo = pbrpc_client_service(c, &demo__echo__descriptor);
	char text[32];
	for (unsigned n = 0; !atomic_load(cl->stop); n++) {
		snprintf(text, sizeof(text), "call %u", n);
		Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
		req.payload.data = (uint8_t *)text;
		req.payload.len = strlen(text);
		Demo__EchoReply *reply = NULL;
		ProtobufCMessage *got = NULL;
		pbrpc_call_result res;
		int rc = pbrpc_client_call(c, "demo.Echo/Echo", &req.base, &demo__echo_reply__descriptor, &got, NULL,
					   &res);
		reply = (Demo__EchoReply *)got;
		if (rc == 0 && reply && reply->payload.len == req.payload.len &&
		    memcmp(reply->payload.data, text, req.payload.len) == 0) {
			cl->ok++;
		} else {
			cl->failed++;
			snprintf(cl->last_error, sizeof(cl->last_error), "%s: %s", pbrpc_status_name(res.status),
				 res.message);
		}
		if (got)
			protobuf_c_message_free_unpacked(got, NULL);
	}
	(void)echo;
	pbrpc_client_free(c);
	return NULL;
}

static void restart_loop(const char *endpoint)
{
	pid_t server = spawn_server(endpoint);
	wait_listening(endpoint);
	atomic_bool stop = false;
	caller cl[CLIENTS];
	pthread_t thr[CLIENTS];
	for (int i = 0; i < CLIENTS; i++) {
		cl[i] = (caller){ .endpoint = endpoint, .stop = &stop };
		pthread_create(&thr[i], NULL, caller_main, &cl[i]);
	}
	for (int r = 0; r < RESTARTS; r++) {
		sleep_ms(150);
		cr_assert_eq(kill(server, SIGTERM), 0);
		pid_t next = start_replacement(endpoint);
		int st;
		cr_assert_eq(waitpid(server, &st, 0), server);
		cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the old server exits cleanly after its drain");
		/* The replacement's socket file survived the old server's exit: a
		 * new client connects to it. (A slow start under sanitizers may have
		 * let a replacement find the endpoint still taken and exit: start
		 * it again until one is up.) */
		server = serving_replacement(endpoint, next);
	}
	sleep_ms(150);
	atomic_store(&stop, true);
	int ok = 0, failed = 0;
	for (int i = 0; i < CLIENTS; i++) {
		pthread_join(thr[i], NULL);
		ok += cl[i].ok;
		failed += cl[i].failed;
		if (cl[i].failed)
			cr_log_error("client %d: %d failed, last: %s", i, cl[i].failed, cl[i].last_error);
	}
	kill(server, SIGTERM);
	waitpid(server, NULL, 0);
	cr_log_info("%s: %d calls through %d restarts, %d failed", endpoint, ok + failed, RESTARTS, failed);
	cr_assert_eq(failed, 0, "%d of %d calls failed across %d restarts", failed, ok + failed, RESTARTS);
	cr_assert_gt(ok, CLIENTS * RESTARTS, "the clients kept calling (%d calls)", ok);
}

Test(restart, unix_path, .timeout = 120)
{
	char dir[] = "/tmp/pbrpc-restart-XXXXXX";
	cr_assert_not_null(mkdtemp(dir));
	char endpoint[128];
	snprintf(endpoint, sizeof(endpoint), "unix:%s/s.sock", dir);
	restart_loop(endpoint);
	char path[128];
	snprintf(path, sizeof(path), "%s/s.sock", dir);
	unlink(path);
	rmdir(dir);
}

Test(restart, tcp, .timeout = 120)
{
	/* A port that was free a moment ago; the servers take turns on it. */
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(a);
	cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
	cr_assert_eq(getsockname(fd, (struct sockaddr *)&a, &len), 0);
	close(fd);
	char endpoint[64];
	snprintf(endpoint, sizeof(endpoint), "tcp:127.0.0.1:%u", ntohs(a.sin_port));
	restart_loop(endpoint);
}
