/* The pbrpc-server program: start-up line, signals, exit codes, option
 * errors, systemd socket activation, journald priorities and sd_notify. The binary's path comes from
 * $PBRPC_SERVER (set by tests/meson.build). */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <regex.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
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

/* For the next spawn(): RLIMIT_NOFILE (soft and hard) in the child when
 * non-zero, and stderr to this file instead of a pipe when set (a server that
 * logs a lot must not block on a pipe nobody reads). */
static rlim_t spawn_nofile;
static const char *spawn_errfile;

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
		if (spawn_errfile) {
			int fd = open(spawn_errfile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
			if (fd < 0 || dup2(fd, 2) < 0)
				_exit(126);
		}
		if (spawn_nofile) {
			struct rlimit rl = { spawn_nofile, spawn_nofile };
			if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
				_exit(126);
		}
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
	spawn_nofile = 0;
	spawn_errfile = NULL;
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
	char out[8192]; /* --help is past 4 KiB */
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
/* Waits until a listening Unix socket is bound at path (/proc/net/unix:
 * flag __SO_ACCEPTCON, 0x10000). Returns true when one is. */
static bool wait_unix_listening(const char *path, int timeout_ms)
{
	for (int waited = 0; waited <= timeout_ms; waited += 10) {
		FILE *f = fopen("/proc/net/unix", "r");
		if (!f)
			return true; /* cannot tell: let the call itself decide */
		char line[512];
		bool found = false;
		while (!found && fgets(line, sizeof(line), f)) {
			unsigned long flags;
			char p[256];
			if (sscanf(line, "%*s %*s %*s %lx %*s %*s %*s %255s", &flags, p) == 2 && (flags & 0x10000) &&
			    strcmp(p, path) == 0)
				found = true;
		}
		fclose(f);
		if (found)
			return true;
		usleep(10000);
	}
	return false;
}

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
	/* It binds before it listens: a connect in between is refused. */
	cr_assert(wait_unix_listening(sock, 5000), "systemd-socket-activate did not listen on %s", sock);
	/* The first connection starts the server, which then answers it. */
	cr_expect_eq(health_check(ep, "demo.Kv"), PBRPC__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
	cr_expect_str_eq(wait_listening(&d), ep);
	stop_reading_stderr(&d, SIGTERM, err, sizeof(err));
	cr_expect_not_null(strstr(err, "pbrpc-server: info: stopping on SIGTERM"), "%s", err);
}

/* ---- issue 9: file descriptors, a second signal, the limits ---- */

static int64_t tu_now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* utime + stime of a process, in seconds, from /proc/PID/stat. */
static double cpu_seconds(pid_t pid)
{
	char path[64], buf[1024];
	snprintf(path, sizeof(path), "/proc/%ld/stat", (long)pid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	cr_assert_geq(fd, 0);
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	cr_assert_gt(n, 0);
	buf[n] = '\0';
	/* Fields after the command name, which is in parentheses: state is 3,
	 * utime 14, stime 15. */
	const char *p = strrchr(buf, ')');
	cr_assert_not_null(p);
	unsigned long long ut = 0, st = 0;
	cr_assert_eq(sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st), 2);
	return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* A /proc/PID/status field in kB ("VmRSS", "VmHWM"). */
static long proc_kb(pid_t pid, const char *field)
{
	char path[64], line[256];
	snprintf(path, sizeof(path), "/proc/%ld/status", (long)pid);
	FILE *f = fopen(path, "r");
	cr_assert_not_null(f);
	long v = -1;
	size_t fl = strlen(field);
	while (fgets(line, sizeof(line), f))
		if (strncmp(line, field, fl) == 0 && line[fl] == ':')
			v = strtol(line + fl + 1, NULL, 10);
	fclose(f);
	return v;
}

/* Lines of a file that contain needle. */
static int count_lines(const char *path, const char *needle, char *last, size_t lastlen)
{
	FILE *f = fopen(path, "r");
	cr_assert_not_null(f);
	static char line[4096];
	int n = 0;
	while (fgets(line, sizeof(line), f))
		if (strstr(line, needle)) {
			n++;
			if (last)
				snprintf(last, lastlen, "%.500s", line);
		}
	fclose(f);
	return n;
}

static void echo_request(Demo__EchoRequest *req, const char *text, uint32_t delay_ms)
{
	*req = (Demo__EchoRequest)DEMO__ECHO_REQUEST__INIT;
	req->payload.data = (uint8_t *)text;
	req->payload.len = strlen(text);
	req->delay_ms = delay_ms;
}

/* A nonblocking connect to a Unix path; the server's bytes are read later. */
static int raw_connect(const char *path)
{
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	cr_assert_geq(fd, 0);
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 && errno != EINPROGRESS && errno != EAGAIN) {
		close(fd);
		return -1;
	}
	return fd;
}

/* rp_call, but a server that refuses the connection may close it before the
 * request goes out (EPIPE): its GOAWAY is still there to read. */
static int call_refusable(rp_conn *c, const ProtobufCMessage *req, rp_result *res)
{
	int rc = rp_call(c, "demo.Echo/Echo", req, NULL, NULL, res);
	if (rc == -EPIPE || rc == -ECONNRESET)
		rc = rp_recv(c, 2000, NULL, NULL, res);
	return rc;
}

/* The next RESPONSE, skipping the drain's GOAWAY(OK) and PING (unanswered:
 * the server may have closed by then). Returns its status or a negative code. */
static int next_response_status(rp_conn *c, int timeout_ms)
{
	for (;;) {
		pbrpc__frame f;
		int rc = pbrpc__frame_read(&c->dec, c->fd, &f, timeout_ms);
		if (rc < 0)
			return rc;
		if (f.hdr.type != PBRPC_FRAME_RESPONSE)
			continue;
		pbrpc__wire_response r;
		rc = pbrpc__wire_read_response(&f, &r);
		return rc < 0 ? rc : r.status;
	}
}

/* Connects without sending anything and reads what the server sends until
 * it closes (3 s at most); true when that contains `why` (a refusal's
 * GOAWAY message). */
static bool refused_with(const char *path, const char *why)
{
	int fd = raw_connect(path);
	cr_assert_geq(fd, 0);
	char buf[1024];
	size_t got = 0;
	struct pollfd p = { .fd = fd, .events = POLLIN };
	while (got < sizeof(buf) && poll(&p, 1, 3000) == 1) {
		ssize_t n = read(fd, buf + got, sizeof(buf) - got);
		if (n <= 0)
			break;
		got += (size_t)n;
	}
	close(fd);
	return memmem(buf, got, why, strlen(why)) != NULL;
}

static void cleanup_env_and_tmpdir(void)
{
	reset_env();
	remove_tmpdir();
}

#define FD_LIMIT 64
#define FD_CLIENTS 200

/* Defect 1: under RLIMIT_NOFILE 64 with 200 clients, the server neither
 * spins nor floods its log. The clients beyond the limit are told why
 * (GOAWAY RESOURCE_EXHAUSTED "out of file descriptors"), accepting backs off,
 * and a good client is served as soon as descriptors free up. */
Test(daemon, out_of_file_descriptors, .init = make_tmpdir, .fini = cleanup_env_and_tmpdir)
{
	char ep[128], errpath[128];
	snprintf(ep, sizeof(ep), "unix:%s/d.sock", tmpdir);
	snprintf(errpath, sizeof(errpath), "%s/stderr", tmpdir);
	spawn_nofile = FD_LIMIT;
	spawn_errfile = errpath;
	child d;
	spawn(&d, (const char *[]){ "--listen", ep, "--log-level", "warn", NULL }, -1, 0);
	wait_listening(&d);

	/* Fill the server up with served connections: the first refusal
	 * says why. */
	static rp_conn held[FD_CLIENTS];
	int n_held = 0, told = 0;
	Demo__EchoRequest req;
	echo_request(&req, "hi", 0);
	rp_result res;
	while (n_held < FD_CLIENTS) {
		rp_conn *c = &held[n_held];
		int rc = rp_open(c, ep);
		if (rc == -EPIPE || rc == -ECONNRESET) {
			/* Refused and closed before our HELLO went out: the next
			 * one is refused too, and read without writing. */
			cr_assert(refused_with(ep + 5, "out of file descriptors"));
			told++;
			break;
		}
		cr_assert_eq(rc, 0, "connection %d: %s", n_held, pbrpc_strerror(rc));
		rc = call_refusable(c, &req.base, &res);
		if (rc == PBRPC_EGOAWAY) {
			cr_assert_eq(res.status, PBRPC_STATUS_RESOURCE_EXHAUSTED, "%s", res.message);
			cr_assert_str_eq(res.message, "out of file descriptors");
			rp_close(c);
			told++;
			break;
		}
		cr_assert_eq(rc, 0, "connection %d: %s", n_held, pbrpc_strerror(rc));
		cr_assert_eq(res.status, PBRPC_STATUS_OK, "%s", res.message);
		n_held++;
	}
	cr_assert_eq(told, 1, "the server took all %d connections under a limit of %d fds", n_held, FD_LIMIT);
	cr_assert_gt(n_held, FD_LIMIT - 16, "only %d connections served", n_held);

	/* The other clients keep connecting: each that is closed connects again. */
	enum { PENDING = FD_CLIENTS - FD_LIMIT };
	int pend[PENDING];
	const char *path = ep + 5;
	for (int i = 0; i < PENDING; i++)
		cr_assert_geq(pend[i] = raw_connect(path), 0);
	int lines0 = count_lines(errpath, "accept", NULL, 0);
	double cpu0 = cpu_seconds(d.pid);
	int64_t t0 = tu_now_ms(), t1;
	while ((t1 = tu_now_ms()) - t0 < 2000) {
		struct pollfd p[PENDING];
		for (int i = 0; i < PENDING; i++)
			p[i] = (struct pollfd){ .fd = pend[i], .events = POLLIN };
		if (poll(p, PENDING, 100) <= 0)
			continue;
		for (int i = 0; i < PENDING; i++) {
			if (!p[i].revents)
				continue;
			char buf[512];
			ssize_t n = read(pend[i], buf, sizeof(buf));
			if (n > 0 && memmem(buf, (size_t)n, "out of file descriptors", 23))
				told++;
			if (n <= 0 || n < (ssize_t)sizeof(buf)) {
				close(pend[i]);
				cr_assert_geq(pend[i] = raw_connect(path), 0);
			}
		}
	}
	double cpu = (cpu_seconds(d.pid) - cpu0) / ((double)(t1 - t0) / 1000.0);
	char last[512] = "";
	int lines = count_lines(errpath, "accept", last, sizeof(last)) - lines0;
	double per_s = lines / ((double)(t1 - t0) / 1000.0);
	fprintf(stderr, "out_of_file_descriptors: server CPU %.1f%% at the limit, %.1f accept log lines/s, "
		"%d clients told why; last line: %s", cpu * 100, per_s, told, last);
	cr_expect_lt(cpu, 0.20, "server CPU %.0f%% while at the fd limit", cpu * 100);
	cr_expect_leq(per_s, 3.0, "%.0f log lines a second", per_s);
	cr_expect_not_null(strstr(last, "accept: out of file descriptors ("), "%s", last);
	cr_expect_not_null(strstr(last, " refused in the last second)"), "%s", last);
	cr_expect_gt(told, 1, "clients over the limit are told why");

	/* Descriptors free up: a good client is served at once. */
	for (int i = 0; i < PENDING; i++)
		close(pend[i]);
	for (int i = 0; i < 8; i++)
		rp_close(&held[--n_held]);
	int64_t t2 = tu_now_ms();
	rp_conn g;
	int rc = -1;
	while (tu_now_ms() - t2 < 3000) {
		if ((rc = rp_open(&g, ep)) < 0) {
			usleep(20000);
			continue;
		}
		rc = call_refusable(&g, &req.base, &res);
		if (rc == 0)
			break;
		rp_close(&g);
		usleep(20000);
	}
	cr_assert_eq(rc, 0, "no good client served 3 s after fds were freed: %s %s", pbrpc_strerror(rc), res.message);
	cr_expect_eq(res.status, PBRPC_STATUS_OK);
	fprintf(stderr, "out_of_file_descriptors: a good client served %lld ms after fds were freed\n",
		(long long)(tu_now_ms() - t2));
	cr_expect_lt(tu_now_ms() - t2, 1500);
	rp_close(&g);
	while (n_held > 0)
		rp_close(&held[--n_held]);
	stop_with(&d, SIGTERM);
}

/* Defect 3: a second SIGTERM during a drain closes at once; the held call is
 * answered UNAVAILABLE. */
Test(daemon, second_signal_closes_at_once)
{
	char ep[128], err[4096];
	snprintf(ep, sizeof(ep), "unix:%s/d.sock", tmpdir);
	child d;
	spawn(&d, (const char *[]){ "--listen", ep, "--drain-timeout", "20s", NULL }, -1, 0);
	wait_listening(&d);
	rp_conn c;
	cr_assert_eq(rp_open(&c, ep), 0);
	Demo__EchoRequest req;
	echo_request(&req, "held", 15000);
	cr_assert_gt(rp_send(&c, "demo.Echo/Echo", &req.base), 0);
	usleep(100000);
	cr_assert_eq(kill(d.pid, SIGTERM), 0);
	usleep(300000);
	int st;
	cr_assert_eq(waitpid(d.pid, &st, WNOHANG), 0, "exited on the first signal with a call in flight");
	int64_t t0 = tu_now_ms();
	cr_assert_eq(kill(d.pid, SIGTERM), 0);
	st = wait_exit(&d, 1500);
	int64_t took = tu_now_ms() - t0;
	read_all(d.err, err, sizeof(err));
	cr_assert_neq(st, -1, "still draining 1.5 s after the second SIGTERM; stderr:\n%s", err);
	cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0, "status 0x%x; stderr:\n%s", st, err);
	cr_expect_lt(took, 1000, "the second signal took %lld ms", (long long)took);
	cr_expect_not_null(strstr(err, "second SIGTERM: closing every connection now"), "%s", err);
	cr_expect_eq(next_response_status(&c, 2000), PBRPC_STATUS_UNAVAILABLE);
	rp_close(&c);
	finish(&d);
}

/* Reads frames until a GOAWAY, answering PINGs when `answer`; returns its
 * status and message, and the PINGs seen (with their first payload). */
static int until_goaway(rp_conn *c, bool answer, int *pings, char *ping0, char *msg, size_t len)
{
	for (;;) {
		pbrpc__frame f;
		int rc = pbrpc__frame_read(&c->dec, c->fd, &f, 5000);
		if (rc != 1)
			return rc < 0 ? rc : -1;
		if (f.hdr.type == PBRPC_FRAME_PING) {
			if ((*pings)++ == 0)
				memcpy(ping0, f.payload, 8);
			pbrpc__frame_header h = { .type = PBRPC_FRAME_PONG };
			if (answer)
				cr_assert_eq(pbrpc__frame_write(c->fd, &h, f.payload, 8, 1000), 0);
			continue;
		}
		if (f.hdr.type != PBRPC_FRAME_GOAWAY)
			continue;
		int st;
		const char *m;
		size_t ml;
		cr_assert_eq(pbrpc__wire_read_goaway(&f, &st, &m, &ml), 0);
		snprintf(msg, len, "%.*s", (int)ml, m);
		return st;
	}
}

typedef struct answerer {
	rp_conn *c;
	int status, pings;
	int64_t at;
	char ping0[9], msg[256];
} answerer;

static void *answerer_main(void *arg)
{
	answerer *w = arg;
	w->status = until_goaway(w->c, true, &w->pings, w->ping0, w->msg, sizeof(w->msg));
	w->at = tu_now_ms();
	return NULL;
}

/* Issue 12: --keepalive-interval and --keepalive-timeout close a silent
 * connection; --max-connection-age drains one that answers its PINGs. */
Test(daemon, keepalive_and_age_options_apply)
{
	char ep[128];
	snprintf(ep, sizeof(ep), "unix:%s/ka.sock", tmpdir);
	child d;
	spawn(&d, (const char *[]){ "--listen", ep, "--keepalive-interval", "100ms", "--keepalive-timeout", "100ms",
				    "--max-connection-age", "1s", "--max-connection-age-grace", "2s", NULL },
	      -1, 0);
	wait_listening(&d);
	rp_conn a, b;
	cr_assert_eq(rp_open(&a, ep), 0);
	cr_assert_eq(rp_open(&b, ep), 0);
	int64_t t0 = tu_now_ms();
	answerer w = { .c = &b };
	pthread_t thr;
	cr_assert_eq(pthread_create(&thr, NULL, answerer_main, &w), 0);
	int pings = 0;
	char ping0[9] = "", msg[256];
	cr_expect_eq(until_goaway(&a, false, &pings, ping0, msg, sizeof(msg)), PBRPC_STATUS_UNAVAILABLE);
	cr_expect_str_eq(msg, "keepalive timeout: client sent nothing for 100 ms after a PING");
	cr_expect_eq(pings, 1);
	cr_expect_str_eq(ping0, "pbrpc-ka");
	cr_expect_geq(tu_now_ms() - t0, 150);
	cr_expect_lt(tu_now_ms() - t0, 900, "closed by keepalive, before its age");
	pthread_join(thr, NULL);
	cr_expect_eq(w.status, PBRPC_STATUS_OK);
	cr_expect_str_eq(w.msg, "max connection age reached");
	int64_t age = w.at - t0;
	cr_expect(age >= 850 && age < 2000, "drained after %lld ms (1 s +-10%%)", (long long)age);
	cr_expect_geq(w.pings, 5, "answered keepalive PINGs meanwhile: %d", w.pings);
	rp_close(&a);
	rp_close(&b);
	cr_assert_eq(kill(d.pid, SIGTERM), 0);
	int st = wait_exit(&d, 3000);
	cr_expect(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0);
	finish(&d);
}

/* Defect 8: the limits as flags, validated. */
Test(daemon, limit_options_apply)
{
	char ep[128];
	snprintf(ep, sizeof(ep), "unix:%s/d.sock", tmpdir);
	child d;
	spawn(&d, (const char *[]){ "--listen", ep, "--max-connections", "2", "--max-calls", "3", "--idle-timeout",
				    "300ms", "--handshake-timeout", "200ms", "--drain-timeout", "1s", NULL },
	      -1, 0);
	wait_listening(&d);
	rp_conn a, b;
	cr_assert_eq(rp_open(&a, ep), 0);
	cr_expect_eq(a.hello.max_calls, 3);
	cr_assert_eq(rp_open(&b, ep), 0);
	/* A third connection is over --max-connections. */
	cr_expect(refused_with(ep + 5, "too many connections"));
	Demo__EchoRequest req;
	/* --idle-timeout: a connection with nothing in flight is closed. */
	int64_t t0 = tu_now_ms();
	pbrpc__frame f;
	int rc = pbrpc__frame_read(&a.dec, a.fd, &f, 3000);
	while (rc == 1)
		rc = pbrpc__frame_read(&a.dec, a.fd, &f, 3000); /* its GOAWAY(UNAVAILABLE) */
	cr_expect(rc == PBRPC_EOF || rc == -ECONNRESET, "%s", pbrpc_strerror(rc));
	cr_expect_geq(tu_now_ms() - t0, 250);
	cr_expect_lt(tu_now_ms() - t0, 2000);
	rp_close(&a);
	rp_close(&b);
	/* --handshake-timeout: a silent connection is closed. */
	int s = raw_connect(ep + 5);
	cr_assert_geq(s, 0);
	t0 = tu_now_ms();
	struct pollfd p = { .fd = s, .events = POLLIN };
	char buf[256];
	for (;;) {
		cr_assert_eq(poll(&p, 1, 3000), 1, "the silent connection is still open after 3 s");
		if (read(s, buf, sizeof(buf)) <= 0)
			break;
	}
	cr_expect_geq(tu_now_ms() - t0, 150);
	cr_expect_lt(tu_now_ms() - t0, 2000);
	close(s);
	/* --drain-timeout 1s: a held call is answered UNAVAILABLE after 1 s. */
	cr_assert_eq(rp_open(&a, ep), 0);
	echo_request(&req, "held", 10000);
	cr_assert_gt(rp_send(&a, "demo.Echo/Echo", &req.base), 0);
	usleep(50000);
	t0 = tu_now_ms();
	cr_assert_eq(kill(d.pid, SIGTERM), 0);
	cr_expect_eq(next_response_status(&a, 5000), PBRPC_STATUS_UNAVAILABLE);
	cr_expect_geq(tu_now_ms() - t0, 900);
	cr_expect_lt(tu_now_ms() - t0, 3000);
	rp_close(&a);
	int st = wait_exit(&d, 3000);
	cr_expect(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0);
	finish(&d);
}

Test(daemon, bad_limit_options_exit_2)
{
	struct {
		const char *args[3];
		const char *needle;
	} cases[] = {
		{ { "--max-connections", "0" }, "--max-connections" },
		{ { "--max-connections", "lots" }, "--max-connections" },
		{ { "--max-connections", "99999999999" }, "--max-connections" },
		{ { "--max-calls", "0" }, "--max-calls" },
		{ { "--max-calls", "-4" }, "--max-calls" },
		{ { "--idle-timeout", "soon" }, "--idle-timeout" },
		{ { "--idle-timeout", "5h" }, "--idle-timeout" },
		{ { "--idle-timeout", "-1s" }, "--idle-timeout" },
		{ { "--handshake-timeout", "0" }, "--handshake-timeout" },
		{ { "--handshake-timeout", "99999999s" }, "--handshake-timeout" },
		{ { "--drain-timeout", "1.5s" }, "--drain-timeout" },
		{ { "--drain-timeout" }, "--drain-timeout" },
		{ { "--keepalive-interval", "often" }, "--keepalive-interval" },
		{ { "--keepalive-timeout", "0" }, "--keepalive-timeout" },
		{ { "--max-connection-age", "2d" }, "--max-connection-age" },
		{ { "--max-connection-age-grace", "0" }, "--max-connection-age-grace" },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char err[4096];
		int code = run_to_exit(cases[i].args, err, sizeof(err));
		cr_expect_eq(code, 2, "%s %s: exit %d", cases[i].args[0], cases[i].args[1], code);
		cr_expect_not_null(strstr(err, cases[i].needle), "%s: stderr \"%s\"", cases[i].args[0], err);
		cr_expect_eq(strchr(err, '\n'), err + strlen(err) - 1, "one line: \"%s\"", err);
	}
	char out[8192];
	child d;
	spawn(&d, (const char *[]){ "--help", NULL }, -1, 0);
	int st = wait_exit(&d, 5000);
	read_all(d.out, out, sizeof(out));
	finish(&d);
	cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	static const char *const flags[] = { "--max-connections N", "--max-calls N", "--idle-timeout DURATION",
					     "--handshake-timeout DURATION", "--drain-timeout DURATION",
					     "--keepalive-interval DURATION", "--keepalive-timeout DURATION",
					     "--max-connection-age DURATION", "--max-connection-age-grace DURATION" };
	for (size_t i = 0; i < sizeof(flags) / sizeof(flags[0]); i++)
		cr_expect_not_null(strstr(out, flags[i]), "--help lacks %s:\n%s", flags[i], out);
}

#define MANY 10000

/* Defect 8: through the daemon, 10,000 concurrent connections each make one
 * call, and all succeed. Needs RLIMIT_NOFILE above 10,000 for this process
 * (raised up to the hard limit, which root may raise too). */
Test(daemon, ten_thousand_connections, .timeout = 120)
{
	struct rlimit rl;
	cr_assert_eq(getrlimit(RLIMIT_NOFILE, &rl), 0);
	rlim_t want = MANY + 256;
	if (rl.rlim_max < want)
		rl.rlim_max = want; /* root only */
	rl.rlim_cur = want;
	if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
		cr_skip_test("cannot raise RLIMIT_NOFILE to %lu (not root, hard limit lower)", (unsigned long)want);

	char ep[128];
	snprintf(ep, sizeof(ep), "unix:%s/d.sock", tmpdir);
	child d;
	spawn(&d, (const char *[]){ "--listen", ep, "--max-connections", "20000", "--log-level", "warn", NULL }, -1,
	      0);
	wait_listening(&d);
	long rss0 = proc_kb(d.pid, "VmRSS");

	rp_conn *c = calloc(MANY, sizeof(*c));
	cr_assert_not_null(c);
	int64_t t0 = tu_now_ms();
	for (int i = 0; i < MANY; i++) {
		int rc = rp_open(&c[i], ep);
		cr_assert_eq(rc, 0, "connection %d: %s", i, pbrpc_strerror(rc));
	}
	int64_t t1 = tu_now_ms();
	Demo__EchoRequest req;
	char text[32];
	for (int i = 0; i < MANY; i++) {
		snprintf(text, sizeof(text), "call %d", i);
		echo_request(&req, text, 0);
		cr_assert_eq(rp_send(&c[i], "demo.Echo/Echo", &req.base), 1, "connection %d", i);
	}
	int ok = 0;
	for (int i = 0; i < MANY; i++) {
		rp_result res;
		Demo__EchoReply *reply = NULL;
		int rc = rp_recv(&c[i], 10000, &demo__echo_reply__descriptor, (ProtobufCMessage **)&reply, &res);
		snprintf(text, sizeof(text), "call %d", i);
		if (rc == 0 && res.status == PBRPC_STATUS_OK && reply && reply->payload.len == strlen(text) &&
		    memcmp(reply->payload.data, text, reply->payload.len) == 0)
			ok++;
		else
			cr_expect_fail("connection %d: %s, status %d %s", i, pbrpc_strerror(rc), res.status, res.message);
		if (reply)
			demo__echo_reply__free_unpacked(reply, NULL);
	}
	int64_t t2 = tu_now_ms();
	long rss = proc_kb(d.pid, "VmRSS"), hwm = proc_kb(d.pid, "VmHWM");
	fprintf(stderr,
		"ten_thousand_connections: %d/%d calls ok; %lld ms to connect, %lld ms for the calls, %lld ms in all; "
		"daemon RSS %ld kB before, %ld kB with %d connections open (peak %ld kB)\n",
		ok, MANY, (long long)(t1 - t0), (long long)(t2 - t1), (long long)(t2 - t0), rss0, rss, MANY, hwm);
	cr_expect_eq(ok, MANY);
	for (int i = 0; i < MANY; i++)
		rp_close(&c[i]);
	free(c);
	stop_with(&d, SIGTERM);
}
