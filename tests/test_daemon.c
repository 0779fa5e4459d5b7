/* The pbrpc-server program: start-up line, signals, exit codes, option
 * errors, systemd socket activation, journald priorities and sd_notify. The binary's path comes from
 * $PBRPC_SERVER (set by tests/meson.build). */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <regex.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "echo.pb-c.h"
#include "health.pb-c.h"
#include "pbrpc/common.h"
#include "rpcpeer.h"

typedef struct child {
	pid_t pid;
	int out, err; /* read ends of its stdout and stderr */
	char line[256]; /* first stdout line, without the newline */
} child;

static char tmpdir[64];

/* Extra environment for the next spawn(), "K=V" strings, NULL-terminated;
 * "JOURNAL_STREAM=stderr" names the child's own stderr, as systemd does. */
static const char *spawn_env[8];

static void make_tmpdir(void)
{
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/pbrpc-daemon-XXXXXX");
	cr_assert_not_null(mkdtemp(tmpdir));
}

static void remove_tmpdir(void)
{
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
	if (system(cmd) != 0)
		cr_log_warn("could not remove %s", tmpdir);
}

static const char *server_path(void)
{
	const char *p = getenv("PBRPC_SERVER");
	cr_assert_not_null(p, "PBRPC_SERVER is not set (run through meson test)");
	return p;
}

/* Starts pbrpc-server with `args` (NULL-terminated). With listen_fd >= 0, the
 * child gets it as fd 3 with LISTEN_FDS=1 and LISTEN_PID set to its own pid,
 * as systemd does (pid_offset != 0 sets a wrong pid). */
static void spawn(child *d, const char *const *args, int listen_fd, int pid_offset)
{
	int out[2], err[2];
	cr_assert_eq(pipe2(out, O_CLOEXEC), 0);
	cr_assert_eq(pipe2(err, O_CLOEXEC), 0);
	const char *argv[32] = { server_path() };
	size_t n = 1;
	for (; args && args[n - 1]; n++)
		argv[n] = args[n - 1];
	argv[n] = NULL;

	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		dup2(out[1], 1);
		dup2(err[1], 2);
		if (listen_fd >= 0) {
			if (listen_fd != 3) {
				dup2(listen_fd, 3);
				close(listen_fd);
			}
			fcntl(3, F_SETFD, 0);
			char pidbuf[32];
			snprintf(pidbuf, sizeof(pidbuf), "%ld", (long)getpid() + pid_offset);
			setenv("LISTEN_PID", pidbuf, 1);
			setenv("LISTEN_FDS", "1", 1);
		}
		setenv("XDG_RUNTIME_DIR", tmpdir, 1);
		for (size_t i = 0; spawn_env[i]; i++) {
			if (strcmp(spawn_env[i], "JOURNAL_STREAM=stderr") == 0) {
				struct stat st;
				char v[64];
				fstat(2, &st);
				snprintf(v, sizeof(v), "%llu:%llu", (unsigned long long)st.st_dev,
					 (unsigned long long)st.st_ino);
				setenv("JOURNAL_STREAM", v, 1);
			} else {
				putenv((char *)spawn_env[i]);
			}
		}
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	close(out[1]);
	close(err[1]);
	d->pid = pid;
	d->out = out[0];
	d->err = err[0];
	d->line[0] = '\0';
}

/* Reads one line from fd within timeout_ms; returns its length or -1. */
static int read_line(int fd, char *buf, size_t len, int timeout_ms)
{
	size_t got = 0;
	while (got + 1 < len) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		if (poll(&p, 1, timeout_ms) <= 0)
			return -1;
		ssize_t n = read(fd, buf + got, 1);
		if (n <= 0)
			return got ? (int)got : -1;
		if (buf[got] == '\n')
			break;
		got++;
	}
	buf[got] = '\0';
	return (int)got;
}

/* Waits for the "listening on ..." line; returns the endpoint in it. */
static const char *wait_listening(child *d)
{
	int n = read_line(d->out, d->line, sizeof(d->line), 5000);
	cr_assert_gt(n, 0, "no start-up line from pbrpc-server");
	cr_assert_eq(strncmp(d->line, "listening on ", 13), 0, "got \"%s\"", d->line);
	return d->line + 13;
}

/* Waits up to timeout_ms for the child; returns its wait status or -1. */
static int wait_exit(child *d, int timeout_ms)
{
	for (int waited = 0; waited <= timeout_ms; waited += 10) {
		int st;
		pid_t r = waitpid(d->pid, &st, WNOHANG);
		if (r == d->pid)
			return st;
		usleep(10000);
	}
	kill(d->pid, SIGKILL);
	waitpid(d->pid, NULL, 0);
	return -1;
}

static void read_all(int fd, char *buf, size_t len)
{
	size_t got = 0;
	ssize_t n;
	while (got + 1 < len && (n = read(fd, buf + got, len - 1 - got)) > 0)
		got += (size_t)n;
	buf[got] = '\0';
}

static void finish(child *d)
{
	close(d->out);
	close(d->err);
}

/* Runs the server to completion with bad arguments; returns its exit code and
 * its stderr in err. */
static int run_to_exit(const char *const *args, char *err, size_t len)
{
	child d;
	spawn(&d, args, -1, 0);
	int st = wait_exit(&d, 5000);
	read_all(d.err, err, len);
	finish(&d);
	cr_assert(st >= 0 && WIFEXITED(st), "pbrpc-server did not exit; stderr: %s", err);
	return WEXITSTATUS(st);
}

static int health_check(const char *endpoint, const char *service)
{
	rp_conn c;
	int rc = rp_open(&c, endpoint);
	cr_assert_eq(rc, 0, "connect %s: %s", endpoint, pbrpc_strerror(rc));
	Pbrpc__HealthCheckRequest req = PBRPC__HEALTH_CHECK_REQUEST__INIT;
	Pbrpc__HealthCheckResponse *reply = NULL;
	rp_result res;
	req.service = (char *)service;
	rc = rp_call(&c, "pbrpc.Health/Check", &req.base, &pbrpc__health_check_response__descriptor,
		     (ProtobufCMessage **)&reply, &res);
	cr_assert_eq(rc, 0, "call: %s", pbrpc_strerror(rc));
	cr_assert_eq(res.status, PBRPC_STATUS_OK, "%s", res.message);
	int st = reply->status;
	pbrpc__health_check_response__free_unpacked(reply, NULL);
	rp_close(&c);
	return st;
}

static void stop_with(child *d, int sig)
{
	cr_assert_eq(kill(d->pid, sig), 0);
	int st = wait_exit(d, 2000);
	char err[4096];
	read_all(d->err, err, sizeof(err));
	cr_assert_neq(st, -1, "still running 2 s after signal %d; stderr:\n%s", sig, err);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "status 0x%x after signal %d; stderr:\n%s", st, sig, err);
	finish(d);
}

/* Signals the child, waits for a clean exit and returns its whole stderr. */
static void stop_reading_stderr(child *d, int sig, char *err, size_t len)
{
	cr_assert_eq(kill(d->pid, sig), 0);
	int st = wait_exit(d, 2000);
	read_all(d->err, err, len);
	cr_assert(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "status 0x%x after signal %d; stderr:\n%s", st,
		  sig, err);
	finish(d);
}

static void reset_env(void)
{
	memset(spawn_env, 0, sizeof(spawn_env));
}

TestSuite(daemon, .init = make_tmpdir, .fini = remove_tmpdir, .timeout = 30);

Test(daemon, sigterm_exits_zero)
{
	char ep[128];
	snprintf(ep, sizeof(ep), "unix:%s/d.sock", tmpdir);
	child d;
	spawn(&d, (const char *[]){ "--listen", ep, NULL }, -1, 0);
	cr_expect_str_eq(wait_listening(&d), ep);
	cr_expect_eq(health_check(ep, "demo.Kv"), PBRPC__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
	stop_with(&d, SIGTERM);
	struct stat sb;
	cr_expect_neq(stat(ep + 5, &sb), 0, "socket file left behind");
}

Test(daemon, sigint_exits_zero_and_sighup_is_harmless)
{
	char ep[128];
	snprintf(ep, sizeof(ep), "unix:%s/d.sock", tmpdir);
	child d;
	spawn(&d, (const char *[]){ "--listen", ep, "--workers", "2", NULL }, -1, 0);
	wait_listening(&d);
	cr_assert_eq(kill(d.pid, SIGHUP), 0);
	usleep(50000);
	cr_expect_eq(health_check(ep, ""), PBRPC__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
	stop_with(&d, SIGINT);
}

Test(daemon, several_listeners_and_default_endpoint)
{
	char ep1[128], ep2[128], def[128];
	snprintf(ep1, sizeof(ep1), "unix:%s/one.sock", tmpdir);
	snprintf(ep2, sizeof(ep2), "tcp:127.0.0.1:0");
	child d;
	spawn(&d, (const char *[]){ "--listen", ep1, "--listen", ep2, NULL }, -1, 0);
	cr_expect_str_eq(wait_listening(&d), ep1);
	char line[256];
	cr_assert_gt(read_line(d.out, line, sizeof(line), 5000), 0);
	cr_assert_eq(strncmp(line, "listening on tcp:127.0.0.1:", 27), 0, "got %s", line);
	cr_expect_neq(strcmp(line, "listening on tcp:127.0.0.1:0"), 0, "the actual port is printed");
	cr_expect_eq(health_check(line + 13, ""), PBRPC__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
	stop_with(&d, SIGTERM);

	/* No --listen: $XDG_RUNTIME_DIR/pbrpc-demo.sock. */
	snprintf(def, sizeof(def), "unix:%s/pbrpc-demo.sock", tmpdir);
	spawn(&d, NULL, -1, 0);
	cr_expect_str_eq(wait_listening(&d), def);
	cr_expect_eq(health_check(def, ""), PBRPC__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
	stop_with(&d, SIGTERM);
}

static int bound_listener(const char *path)
{
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	cr_assert_geq(fd, 0);
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	cr_assert_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0, "bind %s: %s", path, strerror(errno));
	cr_assert_eq(listen(fd, 16), 0);
	return fd;
}

Test(daemon, socket_activation)
{
	char path[128], ep[140];
	snprintf(path, sizeof(path), "%s/activated.sock", tmpdir);
	snprintf(ep, sizeof(ep), "unix:%s", path);
	int lfd = bound_listener(path);

	child d;
	spawn(&d, NULL, lfd, 0);
	close(lfd);
	cr_expect_str_eq(wait_listening(&d), ep);
	/* The passed socket replaces the default endpoint. */
	char line[256];
	cr_expect_lt(read_line(d.out, line, sizeof(line), 200), 0, "unexpected second listener: %s", line);
	cr_expect_eq(health_check(ep, "demo.Echo"), PBRPC__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
	stop_with(&d, SIGTERM);
}

Test(daemon, socket_activation_for_another_pid_is_ignored)
{
	char path[128], def[140];
	snprintf(path, sizeof(path), "%s/activated.sock", tmpdir);
	snprintf(def, sizeof(def), "unix:%s/pbrpc-demo.sock", tmpdir);
	int lfd = bound_listener(path);

	child d;
	spawn(&d, NULL, lfd, 1);
	close(lfd);
	cr_expect_str_eq(wait_listening(&d), def);
	stop_with(&d, SIGTERM);
}

Test(daemon, max_frame_option_applies)
{
	char ep[128];
	snprintf(ep, sizeof(ep), "unix:%s/d.sock", tmpdir);
	child d;
	spawn(&d, (const char *[]){ "--listen", ep, "--max-frame", "1K", NULL }, -1, 0);
	wait_listening(&d);

	rp_conn c;
	cr_assert_eq(rp_open(&c, ep), 0);
	cr_expect_eq(c.hello.max_frame, 1024);
	c.hello.max_frame = 0; /* let rp_send exceed it */
	static uint8_t big[2048];
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = big;
	req.payload.len = sizeof(big);
	rp_result res;
	cr_assert_eq(rp_call(&c, "demo.Echo/Echo", &req.base, NULL, NULL, &res), 0);
	cr_expect_eq(res.status, PBRPC_STATUS_RESOURCE_EXHAUSTED);
	req.payload.len = 100;
	cr_assert_eq(rp_call(&c, "demo.Echo/Echo", &req.base, NULL, NULL, &res), 0);
	cr_expect_eq(res.status, PBRPC_STATUS_OK, "%s", res.message);
	rp_close(&c);
	stop_with(&d, SIGTERM);
}

Test(daemon, help_and_version)
{
	char out[4096];
	child d;
	spawn(&d, (const char *[]){ "--version", NULL }, -1, 0);
	int st = wait_exit(&d, 5000);
	read_all(d.out, out, sizeof(out));
	finish(&d);
	cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	cr_expect_str_eq(out, "pbrpc-server " PBRPC_VERSION "\n");

	spawn(&d, (const char *[]){ "--help", NULL }, -1, 0);
	st = wait_exit(&d, 5000);
	read_all(d.out, out, sizeof(out));
	finish(&d);
	cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	cr_expect_not_null(strstr(out, "--listen ENDPOINT"));
	cr_expect_not_null(strstr(out, "See pbrpc-server(8) for more.\n"), "--help names the manual: %s", out);
}

Test(daemon, bad_options_exit_2)
{
	struct {
		const char *args[4];
		const char *needle;
	} cases[] = {
		{ { "--max-frame", "12Q" }, "--max-frame" },
		{ { "--max-frame", "0" }, "--max-frame" },
		{ { "--max-frame", "4096M" }, "--max-frame" },
		{ { "--socket-mode", "999" }, "--socket-mode" },
		{ { "--socket-mode", "01777" }, "--socket-mode" },
		{ { "--workers", "-1" }, "--workers" },
		{ { "--workers", "many" }, "--workers" },
		{ { "--log-level", "loud" }, "--log-level" },
		{ { "--bogus" }, "--bogus" },
		{ { "--listen" }, "--listen" },
		{ { "extra" }, "extra" },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char err[4096];
		int code = run_to_exit(cases[i].args, err, sizeof(err));
		cr_expect_eq(code, 2, "%s: exit %d", cases[i].args[0], code);
		cr_expect_not_null(strstr(err, cases[i].needle), "%s: stderr \"%s\"", cases[i].args[0], err);
		cr_expect_eq(strchr(err, '\n'), err + strlen(err) - 1, "one line: \"%s\"", err);
	}
}

Test(daemon, listen_failure_exits_1)
{
	char err[4096];
	int code = run_to_exit((const char *[]){ "--listen", "unix:/nonexistent-dir/x.sock", NULL }, err, sizeof(err));
	cr_expect_eq(code, 1);
	cr_expect_eq(strncmp(err, "pbrpc-server: cannot listen on unix:/nonexistent-dir/x.sock: ", 61), 0, "%s", err);

	code = run_to_exit((const char *[]){ "--listen", "bogus", NULL }, err, sizeof(err));
	cr_expect_eq(code, 1);
	cr_expect_not_null(strstr(err, "cannot listen on bogus: invalid endpoint address"), "%s", err);
}

/* ---- issue 13: an observable daemon ---- */

/* The signal is logged when it comes, before the library's drain: nothing
 * follows "shutdown complete". */
Test(daemon, stop_line_precedes_shutdown_complete)
{
	char ep[128], err[4096], want[512];
	snprintf(ep, sizeof(ep), "unix:%s/d.sock", tmpdir);
	child d;
	spawn(&d, (const char *[]){ "--listen", ep, NULL }, -1, 0);
	wait_listening(&d);
	stop_reading_stderr(&d, SIGTERM, err, sizeof(err));
	snprintf(want, sizeof(want),
		 "pbrpc-server: info: listening on %s\n"
		 "pbrpc-server: info: serving demo.Kv, demo.Echo, pbrpc.Health, pbrpc.Reflection, pbrpc.Stats\n"
		 "pbrpc-server: info: stopping on SIGTERM: draining calls in flight for up to 5 s\n"
		 "pbrpc-server: info: shutting down (drain 5000 ms)\n"
		 "pbrpc-server: info: shutdown complete\n",
		 ep);
	cr_expect_str_eq(err, want);

	spawn(&d, (const char *[]){ "--listen", ep, "--log-level", "warn", NULL }, -1, 0);
	wait_listening(&d);
	stop_reading_stderr(&d, SIGINT, err, sizeof(err));
	cr_expect_str_eq(err, "", "--log-level warn hides the stop line too");
}

/* stderr is the journal when $JOURNAL_STREAM matches its device and inode:
 * every line starts with its syslog priority, errors included. */
Test(daemon, journal_priorities, .fini = reset_env)
{
	char ep[128], err[4096], want[512];
	snprintf(ep, sizeof(ep), "unix:%s/d.sock", tmpdir);
	spawn_env[0] = "JOURNAL_STREAM=stderr";
	child d;
	spawn(&d, (const char *[]){ "--listen", ep, NULL }, -1, 0);
	wait_listening(&d);
	stop_reading_stderr(&d, SIGTERM, err, sizeof(err));
	snprintf(want, sizeof(want),
		 "<6>pbrpc-server: info: listening on %s\n"
		 "<6>pbrpc-server: info: serving demo.Kv, demo.Echo, pbrpc.Health, pbrpc.Reflection, pbrpc.Stats\n"
		 "<6>pbrpc-server: info: stopping on SIGTERM: draining calls in flight for up to 5 s\n"
		 "<6>pbrpc-server: info: shutting down (drain 5000 ms)\n"
		 "<6>pbrpc-server: info: shutdown complete\n",
		 ep);
	cr_expect_str_eq(err, want);

	int code = run_to_exit((const char *[]){ "--listen", "bogus", NULL }, err, sizeof(err));
	cr_expect_eq(code, 1);
	cr_expect_str_eq(err, "<3>pbrpc-server: cannot listen on bogus: invalid endpoint address\n");
	code = run_to_exit((const char *[]){ "--workers", "many", NULL }, err, sizeof(err));
	cr_expect_eq(code, 2);
	cr_expect_eq(strncmp(err, "<3>pbrpc-server: invalid --workers 'many'", 41), 0, "%s", err);

	/* Another stream's numbers: not the journal, no prefixes. */
	spawn_env[0] = "JOURNAL_STREAM=1:1";
	code = run_to_exit((const char *[]){ "--listen", "bogus", NULL }, err, sizeof(err));
	cr_expect_eq(code, 1);
	cr_expect_str_eq(err, "pbrpc-server: cannot listen on bogus: invalid endpoint address\n");
}

/* Each call answered leaves one access-log line at info, in the format
 * pbrpc-server(8) documents: Unix peers by uid and pid, TCP ones by address;
 * failures, refusals included, with their message. */
static void expect_line(const char *err, const char *pattern)
{
	regex_t re;
	cr_assert_eq(regcomp(&re, pattern, REG_EXTENDED | REG_NEWLINE | REG_NOSUB), 0, "%s", pattern);
	cr_expect_eq(regexec(&re, err, 0, NULL, 0), 0, "no line matching\n%s\nin:\n%s", pattern, err);
	regfree(&re);
}

Test(daemon, access_log_line_per_call, .fini = reset_env)
{
	char ep[128], tcp[256], err[8192], pat[512];
	snprintf(ep, sizeof(ep), "unix:%s/d.sock", tmpdir);
	spawn_env[0] = "JOURNAL_STREAM=stderr";
	child d;
	spawn(&d, (const char *[]){ "--listen", ep, "--listen", "tcp:127.0.0.1:0", NULL }, -1, 0);
	wait_listening(&d);
	cr_assert_gt(read_line(d.out, tcp, sizeof(tcp), 5000), 0);

	rp_conn u, t;
	cr_assert_eq(rp_open(&u, ep), 0);
	cr_assert_eq(rp_open(&t, tcp + 13), 0);
	struct sockaddr_in local;
	socklen_t sl = sizeof(local);
	cr_assert_eq(getsockname(t.fd, (struct sockaddr *)&local, &sl), 0);

	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)"hi";
	req.payload.len = 2;
	rp_result res;
	cr_assert_eq(rp_call(&u, "demo.Echo/Echo", &req.base, NULL, NULL, &res), 0);
	cr_expect_eq(res.status, PBRPC_STATUS_OK);
	req.fail_status = PBRPC_STATUS_NOT_FOUND;
	req.fail_message = "no \"such\" thing";
	cr_assert_eq(rp_call(&t, "demo.Echo/Echo", &req.base, NULL, NULL, &res), 0);
	cr_expect_eq(res.status, PBRPC_STATUS_NOT_FOUND);
	cr_assert_eq(rp_call(&u, "demo.Echo/Nope", &req.base, NULL, NULL, &res), 0);
	cr_expect_eq(res.status, PBRPC_STATUS_UNIMPLEMENTED);
	rp_close(&u);
	rp_close(&t);
	stop_reading_stderr(&d, SIGTERM, err, sizeof(err));

	snprintf(pat, sizeof(pat),
		 "^<6>pbrpc-server: info: call method=demo\\.Echo/Echo status=OK duration=[0-9]+\\.[0-9]{3}ms "
		 "uid=%u pid=%d in=[1-9][0-9]* out=[1-9][0-9]*$",
		 (unsigned)getuid(), (int)getpid());
	expect_line(err, pat);
	snprintf(pat, sizeof(pat),
		 "^<6>pbrpc-server: info: call method=demo\\.Echo/Echo status=NOT_FOUND duration=[0-9]+\\.[0-9]{3}ms "
		 "peer=tcp:127\\.0\\.0\\.1:%u in=[1-9][0-9]* out=[1-9][0-9]* message=\"no \\\\x22such\\\\x22 thing\"$",
		 (unsigned)ntohs(local.sin_port));
	expect_line(err, pat);
	snprintf(pat, sizeof(pat),
		 "^<6>pbrpc-server: info: call method=demo\\.Echo/Nope status=UNIMPLEMENTED duration=[0-9]+\\.[0-9]{3}ms "
		 "uid=%u pid=%d in=[1-9][0-9]* out=[1-9][0-9]* message=\"unknown method demo\\.Echo/Nope\"$",
		 (unsigned)getuid(), (int)getpid());
	expect_line(err, pat);
	size_t calls = 0;
	for (const char *p = err; (p = strstr(p, "info: call ")) != NULL; p++)
		calls++;
	cr_expect_eq(calls, 3, "one line per call:\n%s", err);
}

/* A datagram socket standing in for systemd's notification socket; an
 * abstract address when name starts with '@'. Fills env with NOTIFY_SOCKET=. */
static int notify_socket(const char *name, char *env, size_t envlen)
{
	int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	cr_assert_geq(fd, 0);
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	socklen_t len;
	if (name[0] == '@') {
		snprintf(sa.sun_path, sizeof(sa.sun_path), "@%s-%ld", name + 1, (long)getpid());
		snprintf(env, envlen, "NOTIFY_SOCKET=%s", sa.sun_path);
		len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(sa.sun_path));
		sa.sun_path[0] = '\0';
	} else {
		snprintf(sa.sun_path, sizeof(sa.sun_path), "%s/%s", tmpdir, name);
		snprintf(env, envlen, "NOTIFY_SOCKET=%s", sa.sun_path);
		len = sizeof(sa);
	}
	cr_assert_eq(bind(fd, (struct sockaddr *)&sa, len), 0, "bind: %s", strerror(errno));
	return fd;
}

static void expect_datagram(int fd, const char *want)
{
	char buf[512];
	struct pollfd p = { .fd = fd, .events = POLLIN };
	cr_assert_eq(poll(&p, 1, 5000), 1, "no notification (want \"%s\")", want);
	ssize_t n = recv(fd, buf, sizeof(buf) - 1, 0);
	cr_assert_gt(n, 0);
	buf[n] = '\0';
	cr_expect_str_eq(buf, want);
}

static void notify_ready_and_stopping(const char *name)
{
	char ep[128], env[160], err[4096];
	snprintf(ep, sizeof(ep), "unix:%s/d.sock", tmpdir);
	int fd = notify_socket(name, env, sizeof(env));
	spawn_env[0] = env;
	child d;
	spawn(&d, (const char *[]){ "--listen", ep, NULL }, -1, 0);
	wait_listening(&d);
	expect_datagram(fd, "READY=1\nSTATUS=serving demo.Kv, demo.Echo, pbrpc.Health, pbrpc.Reflection, pbrpc.Stats");
	cr_expect_eq(health_check(ep, ""), PBRPC__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
	stop_reading_stderr(&d, SIGTERM, err, sizeof(err));
	expect_datagram(fd, "STOPPING=1\nSTATUS=draining calls in flight");
	char extra[64];
	cr_expect_lt(recv(fd, extra, sizeof(extra), MSG_DONTWAIT), 0, "one STOPPING=1 only");
	close(fd);
}

Test(daemon, sd_notify_path, .fini = reset_env)
{
	notify_ready_and_stopping("notify.sock");
}

Test(daemon, sd_notify_abstract, .fini = reset_env)
{
	notify_ready_and_stopping("@pbrpc-test-notify");
}

/* systemd-socket-activate(1) listens, and on the first connection runs the
 * server with the socket as fd 3, as systemd's .socket units do. */
Test(daemon, systemd_socket_activate)
{
	static const char *const tool[] = { "/usr/bin/systemd-socket-activate", "/bin/systemd-socket-activate" };
	const char *path = NULL;
	for (size_t i = 0; i < sizeof(tool) / sizeof(tool[0]) && !path; i++)
		if (access(tool[i], X_OK) == 0)
			path = tool[i];
	if (!path)
		cr_skip_test("systemd-socket-activate not installed (Debian: systemd); socket activation is tested "
			     "by socket_activation only");

	char sock[128], ep[140], listen_arg[160], err[4096];
	snprintf(sock, sizeof(sock), "%s/sa.sock", tmpdir);
	snprintf(ep, sizeof(ep), "unix:%s", sock);
	snprintf(listen_arg, sizeof(listen_arg), "--listen=%s", sock);

	int out[2], errp[2];
	cr_assert_eq(pipe2(out, O_CLOEXEC), 0);
	cr_assert_eq(pipe2(errp, O_CLOEXEC), 0);
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		dup2(out[1], 1);
		dup2(errp[1], 2);
		execl(path, path, listen_arg, server_path(), (char *)NULL);
		_exit(127);
	}
	close(out[1]);
	close(errp[1]);
	child d = { .pid = pid, .out = out[0], .err = errp[0] };

	struct stat sb;
	for (int i = 0; i < 500 && stat(sock, &sb) != 0; i++)
		usleep(10000);
	cr_assert_eq(stat(sock, &sb), 0, "systemd-socket-activate did not create %s", sock);
	/* The first connection starts the server, which then answers it. */
	cr_expect_eq(health_check(ep, "demo.Kv"), PBRPC__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
	cr_expect_str_eq(wait_listening(&d), ep);
	stop_reading_stderr(&d, SIGTERM, err, sizeof(err));
	cr_expect_not_null(strstr(err, "pbrpc-server: info: stopping on SIGTERM"), "%s", err);
}
