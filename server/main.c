/* pbrpc-server: hosts demo.Kv and demo.Echo, plus pbrpc.Health and
 * pbrpc.Reflection, on one or more endpoints.
 *
 * stdout carries only "listening on ENDPOINT" lines (one per listener, flushed,
 * for scripts and tests); everything else is logged to stderr, one line per
 * event. Exit status: 0 after a clean shutdown, 1 on a runtime failure, 2 on a
 * bad command line. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "demo_services.h"
#include "pbrpc/pbrpc.h"

#define PROG "pbrpc-server"
#define DRAIN_MS 5000
#define SD_LISTEN_FDS_START 3

static pbrpc_server *volatile g_srv;
static volatile sig_atomic_t g_signal;

static const char *const level_names[] = { [PBRPC_LOG_ERROR] = "error", [PBRPC_LOG_WARN] = "warn",
					    [PBRPC_LOG_INFO] = "info", [PBRPC_LOG_DEBUG] = "debug" };
static pbrpc_log_level g_log_level = PBRPC_LOG_INFO;

/* The library filters by opts.log_level already; our own events (logf_) are
 * filtered here. */
static void log_cb(void *user, pbrpc_log_level level, const char *msg)
{
	if (level > g_log_level)
		return;
	const char *name = level >= PBRPC_LOG_ERROR && level <= PBRPC_LOG_DEBUG ? level_names[level] : "?";
	fprintf(stderr, PROG ": %s: %s\n", name, msg);
}

/* Our own events go through the same sink and filter as the library's. */
static void logf_(pbrpc_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logf_(pbrpc_log_level level, const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	log_cb(NULL, level, buf);
}

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: " PROG " [OPTION]...\n"
		"Serve the pbrpc example services demo.Kv and demo.Echo, with pbrpc.Health\n"
		"and pbrpc.Reflection.\n"
		"\n"
		"  -l, --listen ENDPOINT   listen on ENDPOINT (repeatable): unix:/path,\n"
		"                          unix:@abstract, tcp:HOST:PORT, tcp:[V6]:PORT;\n"
		"                          default unix:$XDG_RUNTIME_DIR/pbrpc-demo.sock\n"
		"                          (or unix:/tmp/pbrpc-demo-$UID.sock)\n"
		"  -m, --socket-mode OCTAL permissions of Unix socket files (e.g. 0660)\n"
		"  -f, --max-frame BYTES   largest request accepted; suffixes K and M\n"
		"                          (default 16M)\n"
		"  -w, --workers N         run handlers on N threads (default 0: on the loop)\n"
		"  -L, --log-level LEVEL   error, warn, info (default) or debug\n"
		"  -h, --help              show this help and exit\n"
		"  -V, --version           show the version and exit\n"
		"\n"
		"Listening sockets passed by systemd (LISTEN_FDS) replace the default\n"
		"endpoint. SIGINT or SIGTERM drains calls in flight for up to %d s and\n"
		"exits; a second signal closes at once.\n",
		DRAIN_MS / 1000);
}

static _Noreturn void bad_option(const char *opt, const char *val, const char *why)
{
	fprintf(stderr, PROG ": invalid %s '%s': %s (see --help)\n", opt, val, why);
	exit(2);
}

static unsigned long parse_ulong(const char *opt, const char *s, int base, unsigned long max)
{
	char *end;
	errno = 0;
	if (*s == '\0' || *s == '-' || *s == '+')
		bad_option(opt, s, "not a number");
	unsigned long v = strtoul(s, &end, base);
	if (errno || *end != '\0')
		bad_option(opt, s, base == 8 ? "not an octal number" : "not a number");
	if (v > max)
		bad_option(opt, s, "too large");
	return v;
}

static uint32_t parse_size(const char *opt, const char *s)
{
	char *end;
	errno = 0;
	if (*s < '0' || *s > '9')
		bad_option(opt, s, "not a size");
	unsigned long long v = strtoull(s, &end, 10);
	unsigned long long mul = 1;
	if (*end == 'K' || *end == 'k')
		mul = 1024, end++;
	else if (*end == 'M' || *end == 'm')
		mul = 1024 * 1024, end++;
	if (errno || *end != '\0')
		bad_option(opt, s, "not a size (digits with an optional K or M suffix)");
	if (v == 0)
		bad_option(opt, s, "must be at least 1");
	if (v > PBRPC_MAX_FRAME_LIMIT / mul)
		bad_option(opt, s, "larger than the protocol's limit of 2147483647 bytes");
	return (uint32_t)(v * mul);
}

static pbrpc_log_level parse_level(const char *opt, const char *s)
{
	for (unsigned i = PBRPC_LOG_ERROR; i <= PBRPC_LOG_DEBUG; i++)
		if (strcmp(s, level_names[i]) == 0)
			return (pbrpc_log_level)i;
	bad_option(opt, s, "expected error, warn, info or debug");
}

static void on_signal(int sig)
{
	pbrpc_server *srv = g_srv;
	int again = g_signal != 0;
	g_signal = sig;
	if (srv)
		pbrpc_server_shutdown(srv, again ? 0 : DRAIN_MS);
}

/* SIGINT and SIGTERM stay blocked everywhere but in the main thread while it
 * runs the loop, so the handler never races with pbrpc_server_free(). */
static void mask_stop_signals(int how)
{
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	pthread_sigmask(how, &set, NULL);
}

static int install_signals(void)
{
	struct sigaction sa = { .sa_handler = on_signal };
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = SA_RESTART;
	if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0)
		return -errno;
	/* SIGHUP would kill us when a terminal goes away; a daemon stays up. */
	signal(SIGHUP, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);
	return 0;
}

/* systemd's socket activation (sd_listen_fds(3)): LISTEN_PID names us and
 * LISTEN_FDS counts the sockets passed from fd 3 on. Returns the count (0 when
 * not activated) and unsets the variables so children don't inherit them. */
static int listen_fds(void)
{
	const char *pid = getenv("LISTEN_PID");
	const char *fds = getenv("LISTEN_FDS");
	int n = 0;
	if (pid && fds) {
		char *end;
		errno = 0;
		long p = strtol(pid, &end, 10);
		if (!errno && *end == '\0' && p == (long)getpid()) {
			long v = strtol(fds, &end, 10);
			if (!errno && *end == '\0' && v > 0 && v <= INT_MAX - SD_LISTEN_FDS_START)
				n = (int)v;
		}
	}
	unsetenv("LISTEN_PID");
	unsetenv("LISTEN_FDS");
	unsetenv("LISTEN_FDNAMES");
	for (int fd = SD_LISTEN_FDS_START; fd < SD_LISTEN_FDS_START + n; fd++)
		fcntl(fd, F_SETFD, FD_CLOEXEC);
	return n;
}

static int default_endpoint(char *buf, size_t len)
{
	const char *dir = getenv("XDG_RUNTIME_DIR");
	int n;
	if (dir && dir[0] == '/')
		n = snprintf(buf, len, "unix:%s/pbrpc-demo.sock", dir);
	else
		n = snprintf(buf, len, "unix:/tmp/pbrpc-demo-%u.sock", (unsigned)getuid());
	return n > 0 && (size_t)n < len ? 0 : -ENAMETOOLONG;
}

static void print_listening(pbrpc_server *srv, int index)
{
	char addr[PBRPC_ENDPOINT_STRLEN + 8];
	if (pbrpc_server_address(srv, index, addr, sizeof(addr)) < 0)
		snprintf(addr, sizeof(addr), "listener %d", index);
	printf("listening on %s\n", addr);
	fflush(stdout);
}

typedef struct config {
	const char **listen;
	size_t n_listen;
	pbrpc_server_opts opts;
} config;

static void parse_args(int argc, char **argv, config *cfg)
{
	static const struct option longopts[] = {
		{ "listen", required_argument, NULL, 'l' },
		{ "socket-mode", required_argument, NULL, 'm' },
		{ "max-frame", required_argument, NULL, 'f' },
		{ "workers", required_argument, NULL, 'w' },
		{ "log-level", required_argument, NULL, 'L' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	cfg->listen = calloc((size_t)argc, sizeof(*cfg->listen));
	if (!cfg->listen) {
		fprintf(stderr, PROG ": out of memory\n");
		exit(1);
	}
	cfg->opts.log = log_cb;
	cfg->opts.log_level = g_log_level;

	opterr = 0;
	while ((c = getopt_long(argc, argv, ":l:m:f:w:L:hV", longopts, NULL)) != -1) {
		switch (c) {
		case 'l':
			cfg->listen[cfg->n_listen++] = optarg;
			break;
		case 'm':
			cfg->opts.socket_mode = (unsigned)parse_ulong("--socket-mode", optarg, 8, 0777);
			break;
		case 'f':
			cfg->opts.max_frame = parse_size("--max-frame", optarg);
			break;
		case 'w':
			cfg->opts.workers = (unsigned)parse_ulong("--workers", optarg, 10, 1024);
			break;
		case 'L':
			g_log_level = parse_level("--log-level", optarg);
			cfg->opts.log_level = g_log_level;
			break;
		case 'h':
			usage(stdout);
			exit(0);
		case 'V':
			printf(PROG " " PBRPC_VERSION "\n");
			exit(0);
		case ':':
			if (optopt && strncmp(argv[optind - 1], "--", 2) != 0)
				fprintf(stderr, PROG ": option -%c needs a value (see --help)\n", optopt);
			else
				fprintf(stderr, PROG ": option %s needs a value (see --help)\n", argv[optind - 1]);
			exit(2);
		default:
			if (optopt)
				fprintf(stderr, PROG ": unknown option -%c (see --help)\n", optopt);
			else
				fprintf(stderr, PROG ": unknown option %s (see --help)\n", argv[optind - 1]);
			exit(2);
		}
	}
	if (optind < argc) {
		fprintf(stderr, PROG ": unexpected argument '%s' (see --help)\n", argv[optind]);
		exit(2);
	}
}

/* Adds every listener; returns 0 or prints why not and returns -1. */
static int start_listening(pbrpc_server *srv, const config *cfg)
{
	int n_fds = listen_fds();
	for (int i = 0; i < n_fds; i++) {
		int fd = SD_LISTEN_FDS_START + i;
		int idx = pbrpc_server_listen_fd(srv, fd);
		if (idx < 0) {
			fprintf(stderr, PROG ": cannot listen on fd %d from systemd: %s\n", fd, pbrpc_strerror(idx));
			return -1;
		}
		print_listening(srv, idx);
	}

	char def[PBRPC_ENDPOINT_STRLEN + 8];
	const char *const *eps = cfg->listen;
	size_t n_eps = cfg->n_listen;
	const char *one[1];
	if (n_eps == 0 && n_fds == 0) {
		if (default_endpoint(def, sizeof(def)) < 0) {
			fprintf(stderr, PROG ": $XDG_RUNTIME_DIR is too long for a socket path; use --listen\n");
			return -1;
		}
		one[0] = def;
		eps = one;
		n_eps = 1;
	}
	for (size_t i = 0; i < n_eps; i++) {
		int idx = pbrpc_server_listen(srv, eps[i]);
		if (idx < 0) {
			fprintf(stderr, PROG ": cannot listen on %s: %s\n", eps[i], pbrpc_strerror(idx));
			return -1;
		}
		print_listening(srv, idx);
	}
	return 0;
}

static int add_services(pbrpc_server *srv, Demo__Kv_Service *kv, Demo__Echo_Service *echo)
{
	int rc;
	if ((rc = pbrpc_server_add_service(srv, &kv->base)) < 0 ||
	    (rc = pbrpc_server_add_service(srv, &echo->base)) < 0 ||
	    (rc = pbrpc_server_enable_health(srv)) < 0 || (rc = pbrpc_server_enable_reflection(srv)) < 0)
		fprintf(stderr, PROG ": cannot register services: %s\n", pbrpc_strerror(rc));
	return rc;
}

int main(int argc, char **argv)
{
	config cfg = { 0 };
	pbrpc_server *srv;
	int status = 1, rc;

	parse_args(argc, argv, &cfg);
	/* Before any thread exists, so that every thread inherits the mask, and
	 * before the "listening on" line, after which a test may signal us. */
	mask_stop_signals(SIG_BLOCK);
	if (install_signals() < 0) {
		fprintf(stderr, PROG ": cannot install signal handlers: %s\n", strerror(errno));
		return 1;
	}

	Demo__Kv_Service *kv = demo_kv_new();
	Demo__Echo_Service *echo = demo_echo_new();
	if (!kv || !echo) {
		fprintf(stderr, PROG ": cannot create the example services: %s\n", strerror(errno ? errno : ENOMEM));
		goto err_services;
	}
	rc = pbrpc_server_new(&srv, &cfg.opts);
	if (rc < 0) {
		fprintf(stderr, PROG ": cannot create the server: %s\n", pbrpc_strerror(rc));
		goto err_services;
	}
	if (add_services(srv, kv, echo) < 0 || start_listening(srv, &cfg) < 0)
		goto err_server;

	g_srv = srv;
	logf_(PBRPC_LOG_INFO, "serving demo.Kv, demo.Echo, pbrpc.Health, pbrpc.Reflection");

	mask_stop_signals(SIG_UNBLOCK);
	rc = pbrpc_server_run(srv);
	mask_stop_signals(SIG_BLOCK);
	g_srv = NULL;
	if (rc < 0) {
		logf_(PBRPC_LOG_ERROR, "server loop failed: %s", pbrpc_strerror(rc));
	} else {
		if (g_signal)
			logf_(PBRPC_LOG_INFO, "stopped by SIG%s", sigabbrev_np(g_signal));
		status = 0;
	}

	/* Echo may still answer calls it holds: free it while the server exists. */
err_server:
	demo_echo_free(echo);
	echo = NULL;
	pbrpc_server_free(srv);
err_services:
	demo_echo_free(echo);
	demo_kv_free(kv);
	free(cfg.listen);
	return status;
}
