/* pbrpc-server: hosts demo.Kv and demo.Echo, plus pbrpc.Health,
 * pbrpc.Reflection and pbrpc.Stats, on one or more endpoints. Each call
 * answered leaves an access-log line at info (access_log()).
 *
 * stdout carries only "listening on ENDPOINT" lines (one per listener, flushed,
 * for scripts and tests); everything else is logged to stderr, one line per
 * event, with a syslog priority prefix ("<6>") when stderr is the journal.
 * Under systemd it reports READY=1 and STOPPING=1 to $NOTIFY_SOCKET
 * (sd_notify(3), implemented here: one datagram each). Exit status: 0 after
 * a clean shutdown, 1 on a runtime failure, 2 on a bad command line.
 * pbrpc-server(8) is the manual. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "demo_services.h"
#include "pbrpc/pbrpc.h"

#define PROG "pbrpc-server"
#define DRAIN_MS 5000
#define MAX_COUNT 1048576u        /* --max-connections, --max-calls */
#define MAX_DURATION_MS 86400000L /* one day */
#define SD_LISTEN_FDS_START 3

static pbrpc_server *volatile g_srv;
static volatile sig_atomic_t g_signal;
static int g_drain_ms = DRAIN_MS; /* --drain-timeout */

static const char *const level_names[] = { [PBRPC_LOG_ERROR] = "error", [PBRPC_LOG_WARN] = "warn",
					    [PBRPC_LOG_INFO] = "info", [PBRPC_LOG_DEBUG] = "debug" };
static pbrpc_log_level g_log_level = PBRPC_LOG_INFO;

/* stderr is a journald stream (systemd.exec(5), $JOURNAL_STREAM names its
 * device and inode): each line then starts with its syslog priority. */
static bool g_journal;
static const char *const level_prefixes[] = { [PBRPC_LOG_ERROR] = "<3>", [PBRPC_LOG_WARN] = "<4>",
					      [PBRPC_LOG_INFO] = "<6>", [PBRPC_LOG_DEBUG] = "<7>" };

static bool stderr_is_journal(void)
{
	const char *v = getenv("JOURNAL_STREAM");
	unsigned long long dev, ino;
	char extra;
	struct stat st;
	if (!v || sscanf(v, "%llu:%llu%c", &dev, &ino, &extra) != 2 || fstat(STDERR_FILENO, &st) < 0)
		return false;
	return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

static const char *prio(pbrpc_log_level level)
{
	return g_journal && level >= PBRPC_LOG_ERROR && level <= PBRPC_LOG_DEBUG ? level_prefixes[level] : "";
}

/* The library filters by opts.log_level already; our own events (logf_) are
 * filtered here. */
static void log_cb(void *user, pbrpc_log_level level, const char *msg)
{
	if (level > g_log_level)
		return;
	const char *name = level >= PBRPC_LOG_ERROR && level <= PBRPC_LOG_DEBUG ? level_names[level] : "?";
	fprintf(stderr, "%s" PROG ": %s: %s\n", prio(level), name, msg);
}

/* A failure that ends the program: "pbrpc-server: what: why", at priority err. */
static void errorf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void errorf(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s" PROG ": ", prio(PBRPC_LOG_ERROR));
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

/* ---- sd_notify(3), without libsystemd ---- */

static int g_notify_fd = -1;
static struct sockaddr_un g_notify_addr;
static socklen_t g_notify_len;

/* $NOTIFY_SOCKET is a path or, starting with '@', an abstract address.
 * Unset afterwards, as sd_notify(unset_environment=1) does. */
static void notify_open(void)
{
	const char *path = getenv("NOTIFY_SOCKET");
	if (!path || (path[0] != '/' && path[0] != '@'))
		goto out;
	size_t n = strlen(path);
	if (n >= sizeof(g_notify_addr.sun_path) || n < 2) {
		errorf("$NOTIFY_SOCKET is too long or too short; not notifying systemd");
		goto out;
	}
	g_notify_addr.sun_family = AF_UNIX;
	memcpy(g_notify_addr.sun_path, path, n);
	if (path[0] == '@')
		g_notify_addr.sun_path[0] = '\0';
	g_notify_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (path[0] == '/'));
	g_notify_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (g_notify_fd < 0)
		errorf("cannot notify systemd: %s", strerror(errno));
out:
	unsetenv("NOTIFY_SOCKET");
}

/* Async-signal-safe: the signal handler sends STOPPING=1. */
static void notify(const char *msg)
{
	if (g_notify_fd >= 0)
		(void)sendto(g_notify_fd, msg, strlen(msg), MSG_NOSIGNAL, (const struct sockaddr *)&g_notify_addr,
			     g_notify_len);
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

/* ---- the access log: one line per call, at info ---- */

/* Appends s[0..n) to buf at *o, bytes outside printable ASCII (and '"', '\\',
 * and ' ' when `quoted` is false) as \xHH: a peer's bytes cannot forge lines. */
static void put_escaped(char *buf, size_t len, size_t *o, const char *s, size_t n, bool quoted)
{
	for (size_t i = 0; i < n && *o + 5 < len; i++) {
		unsigned char ch = (unsigned char)s[i];
		if (ch < 0x20 || ch > 0x7e || ch == '"' || ch == '\\' || (ch == ' ' && !quoted))
			*o += (size_t)snprintf(buf + *o, len - *o, "\\x%02x", ch);
		else
			buf[(*o)++] = (char)ch;
	}
	buf[*o < len ? *o : len - 1] = '\0';
}

/* "call method=M status=S duration=D peer... in=N out=N[ message="..."]":
 * documented in pbrpc-server(8). */
static void access_log(void *user, const pbrpc_call_info *info)
{
	(void)user;
	char line[1024], peer[96];
	size_t o = 0;
	o += (size_t)snprintf(line, sizeof(line), "call method=");
	put_escaped(line, sizeof(line), &o, info->method, info->method_len, false);
	if (info->has_cred)
		snprintf(peer, sizeof(peer), "uid=%u pid=%d", (unsigned)info->uid, (int)info->pid);
	else
		snprintf(peer, sizeof(peer), "peer=%s", info->peer);
	int n = snprintf(line + o, sizeof(line) - o, " status=%s duration=%.3fms %s in=%zu out=%zu",
			 pbrpc_status_name(info->status), (double)info->duration_ns / 1e6, peer, info->bytes_in,
			 info->bytes_out);
	o = n > 0 && (size_t)n < sizeof(line) - o ? o + (size_t)n : sizeof(line) - 1;
	if (info->status != PBRPC_STATUS_OK && info->message && o + 12 < sizeof(line)) {
		o += (size_t)snprintf(line + o, sizeof(line) - o, " message=\"");
		put_escaped(line, sizeof(line) - 1, &o, info->message, strlen(info->message), true);
		line[o++] = '"';
		line[o] = '\0';
	}
	log_cb(NULL, PBRPC_LOG_INFO, line);
}

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: " PROG " [OPTION]...\n"
		"Serve the pbrpc example services demo.Kv and demo.Echo, with pbrpc.Health,\n"
		"pbrpc.Reflection and pbrpc.Stats. Each call is logged at info.\n"
		"\n"
		"  -l, --listen ENDPOINT   listen on ENDPOINT (repeatable): unix:/path,\n"
		"                          unix:@abstract, tcp:HOST:PORT, tcp:[V6]:PORT,\n"
		"                          tls:HOST:PORT (TLS: needs --cert and --key);\n"
		"                          default unix:$XDG_RUNTIME_DIR/pbrpc-demo.sock\n"
		"                          (or unix:/tmp/pbrpc-demo-$UID.sock)\n"
		"  -m, --socket-mode OCTAL permissions of Unix socket files (e.g. 0660)\n"
		"  -f, --max-frame BYTES   largest request accepted; suffixes K and M\n"
		"                          (default 16M)\n"
		"  -w, --workers N         run handlers on N threads (default 0: on the loop)\n"
		);
	fprintf(f,
		"      --loop-threads N|auto\n"
		"                          event loops, each serving its share of the\n"
		"                          connections on a thread of its own (default auto:\n"
		"                          the online CPUs, at most 8)\n"
		"      --max-connections N\n"
		"                          connections open at once (default 4096); one more\n"
		"                          is told \"too many connections\" and closed\n"
		"      --max-calls N       calls in flight per connection (default 1024)\n"
		"      --max-connections-per-uid N\n"
		"                          Unix connections of one uid open at once\n"
		"                          (default: no cap below --max-connections)\n"
		"      --allow NAME=WHO    only WHO may call service or method NAME\n"
		"                          (demo.Kv or demo.Kv/Put; repeatable, lists add up):\n"
		"                          WHO is a comma-separated list of uid:USER and\n"
		"                          group:GROUP (names or numbers; a group matches the\n"
		"                          primary or a supplementary one), local (every\n"
		"                          Unix peer) and tcp (TCP peers)\n"
		"      --socket-group GROUP\n"
		"                          Unix socket files belong to GROUP, mode 0660\n"
		"                          unless --socket-mode says otherwise"
		"      --idle-timeout DURATION\n"
		"                          close a connection with no call in flight that\n"
		"                          was silent this long (default 0: never)\n"
		"      --handshake-timeout DURATION\n"
		"                          close a connection whose HELLO has not come\n"
		"                          within this (default 10s)\n"
		"      --drain-timeout DURATION\n"
		"                          on SIGINT or SIGTERM, let calls in flight finish\n"
		"                          for this long (default 5s; 0: close at once)\n"
		"      --keepalive-interval DURATION\n"
		"                          PING a connection that sent nothing this long\n"
		"                          (default 0: never)\n"
		"      --keepalive-timeout DURATION\n"
		"                          ...and close it when nothing comes back within\n"
		"                          this (default 20s)\n"
		"      --max-connection-age DURATION\n"
		"                          drain a connection this old (+-10%%) with GOAWAY,\n"
		"                          so that clients reconnect (default 0: never)\n"
		"      --max-connection-age-grace DURATION\n"
		"                          close a connection this long after its age\n"
		"                          GOAWAY, calls still in flight failing (default 30s)\n"
		"      --cert FILE         TLS certificate chain (PEM) for tls: endpoints\n"
		"      --key FILE          its private key (PEM; default: in --cert's file)\n"
		"      --ca FILE|DIR       verify client certificates with these CAs (mutual\n"
		"                          TLS); clients without a valid one are refused\n"
		"      --client-cert MODE  with --ca: require (default) or request (verify\n"
		"                          one if sent, accept clients without)\n"
		"  -L, --log-level LEVEL   error, warn, info (default) or debug\n"
		"  -h, --help              show this help and exit\n"
		"  -V, --version           show the version and exit\n"
		"\n"
		"DURATION is a whole number with a unit, ms, s or m (250ms, 10s, 2m); a bare\n"
		"number is seconds. At most one day.\n"
		"\n"
		"Listening sockets passed by systemd (LISTEN_FDS) replace the default\n"
		"endpoint. SIGINT or SIGTERM drains calls in flight (see --drain-timeout)\n"
		"and exits; a second signal closes at once. The soft open-file limit is\n"
		"raised, up to the hard one, to fit --max-connections. Under systemd,\n"
		"readiness goes to $NOTIFY_SOCKET (Type=notify) and log lines carry\n"
		"journal priorities.\n"
		"\n"
		"See pbrpc-server(8) for more.\n");
}

static _Noreturn void bad_option(const char *opt, const char *val, const char *why)
{
	errorf("invalid %s '%s': %s (see --help)", opt, val, why);
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

/* A count from 1 to MAX_COUNT. */
static uint32_t parse_count(const char *opt, const char *s)
{
	unsigned long v = parse_ulong(opt, s, 10, MAX_COUNT);
	if (v == 0)
		bad_option(opt, s, "must be at least 1");
	return (uint32_t)v;
}

/* A DURATION (see usage()) in milliseconds; 0 only when zero_ok. */
static int parse_duration(const char *opt, const char *s, bool zero_ok)
{
	char *end;
	errno = 0;
	if (*s < '0' || *s > '9')
		bad_option(opt, s, "not a duration (e.g. 250ms, 10s, 2m)");
	unsigned long long v = strtoull(s, &end, 10);
	long mul = 1000;
	if (strcmp(end, "ms") == 0)
		mul = 1;
	else if (strcmp(end, "s") == 0 || *end == '\0')
		mul = 1000;
	else if (strcmp(end, "m") == 0)
		mul = 60000;
	else
		errno = EINVAL;
	if (errno)
		bad_option(opt, s, "not a duration (a whole number with ms, s or m, e.g. 250ms, 10s, 2m)");
	if (v > (unsigned long long)(MAX_DURATION_MS / mul))
		bad_option(opt, s, "longer than a day");
	if (v == 0 && !zero_ok)
		bad_option(opt, s, "must be more than 0");
	return (int)(v * (unsigned long long)mul);
}

static pbrpc_log_level parse_level(const char *opt, const char *s)
{
	for (unsigned i = PBRPC_LOG_ERROR; i <= PBRPC_LOG_DEBUG; i++)
		if (strcmp(s, level_names[i]) == 0)
			return (pbrpc_log_level)i;
	bad_option(opt, s, "expected error, warn, info or debug");
}

/* What the signal handler logs, formatted before any signal can come (the
 * handler itself may only write(2)): [0] the first SIGINT/SIGTERM, [1] a
 * second one. */
static char g_stop_line[2][2][128];

static void format_stop_lines(void)
{
	static const int sigs[2] = { SIGINT, SIGTERM };
	char drain[48];
	if (g_drain_ms == 0)
		snprintf(drain, sizeof(drain), "closing every connection now");
	else if (g_drain_ms % 1000 == 0)
		snprintf(drain, sizeof(drain), "draining calls in flight for up to %d s", g_drain_ms / 1000);
	else
		snprintf(drain, sizeof(drain), "draining calls in flight for up to %d ms", g_drain_ms);
	for (int i = 0; i < 2; i++) {
		snprintf(g_stop_line[i][0], sizeof(g_stop_line[i][0]), "%s" PROG ": info: stopping on SIG%s: %s\n",
			 prio(PBRPC_LOG_INFO), sigabbrev_np(sigs[i]), drain);
		snprintf(g_stop_line[i][1], sizeof(g_stop_line[i][1]),
			 "%s" PROG ": warn: second SIG%s: closing every connection now\n", prio(PBRPC_LOG_WARN),
			 sigabbrev_np(sigs[i]));
	}
}

/* Logs first, so that the line comes before the library's "shutting down"
 * and "shutdown complete". */
static void on_signal(int sig)
{
	int saved = errno;
	pbrpc_server *srv = g_srv;
	int again = g_signal != 0;
	g_signal = sig;
	const char *line = g_stop_line[sig == SIGTERM][again];
	if (g_log_level >= (again ? PBRPC_LOG_WARN : PBRPC_LOG_INFO))
		(void)!write(STDERR_FILENO, line, strlen(line));
	if (!again)
		notify("STOPPING=1\nSTATUS=draining calls in flight");
	if (srv)
		pbrpc_server_shutdown(srv, again ? 0 : g_drain_ms);
	errno = saved;
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

/* One --allow NAME: the lists of every --allow for it, added up. */
typedef struct allow_rule {
	const char *name;
	uid_t *uids;
	size_t n_uids;
	gid_t *gids;
	size_t n_gids;
	bool local, tcp;
} allow_rule;

typedef struct config {
	const char **listen;
	size_t n_listen;
	pbrpc_server_opts opts;
	allow_rule *allow;
	size_t n_allow;
	bool has_group; /* --socket-group */
	gid_t socket_group;
	bool has_mode;  /* --socket-mode */
} config;

static void *xrealloc(void *p, size_t n)
{
	p = realloc(p, n);
	if (!p) {
		errorf("out of memory");
		exit(1);
	}
	return p;
}

/* A number, or a name looked up with getpwnam/getgrnam. */
static bool all_digits(const char *s)
{
	if (!*s)
		return false;
	for (; *s; s++)
		if (*s < '0' || *s > '9')
			return false;
	return true;
}

static uid_t parse_user(const char *opt, const char *arg, const char *s)
{
	if (all_digits(s))
		return (uid_t)parse_ulong(opt, s, 10, UINT32_MAX - 1);
	errno = 0;
	const struct passwd *pw = getpwnam(s);
	if (!pw) {
		errorf("invalid %s '%s': no user named '%s'%s%s (see --help)", opt, arg, s, errno ? ": " : "",
		       errno ? strerror(errno) : "");
		exit(2);
	}
	return pw->pw_uid;
}

static gid_t parse_group(const char *opt, const char *arg, const char *s)
{
	if (all_digits(s))
		return (gid_t)parse_ulong(opt, s, 10, UINT32_MAX - 1);
	errno = 0;
	const struct group *gr = getgrnam(s);
	if (!gr) {
		errorf("invalid %s '%s': no group named '%s'%s%s (see --help)", opt, arg, s, errno ? ": " : "",
		       errno ? strerror(errno) : "");
		exit(2);
	}
	return gr->gr_gid;
}

/* --allow NAME=WHO (see usage()). NAME is checked against the registered
 * services once they are (apply_allow). */
static void parse_allow(config *cfg, char *arg)
{
	const char *orig = strdup(arg);
	char *eq = strchr(arg, '=');
	if (!orig || !eq || eq == arg || !eq[1])
		bad_option("--allow", orig ? orig : arg, "expected NAME=WHO, e.g. demo.Kv/Put=uid:0,group:adm");
	*eq = '\0';
	allow_rule *r = NULL;
	for (size_t i = 0; i < cfg->n_allow; i++)
		if (strcmp(cfg->allow[i].name, arg) == 0)
			r = &cfg->allow[i];
	if (!r) {
		cfg->allow = xrealloc(cfg->allow, (cfg->n_allow + 1) * sizeof(*cfg->allow));
		r = &cfg->allow[cfg->n_allow++];
		*r = (allow_rule){ .name = arg };
	}
	char *save = NULL;
	for (char *w = strtok_r(eq + 1, ",", &save); w; w = strtok_r(NULL, ",", &save)) {
		char *colon = strchr(w, ':');
		const char *v = colon ? colon + 1 : "";
		size_t kl = colon ? (size_t)(colon - w) : strlen(w);
		if (!colon && strcmp(w, "local") == 0) {
			r->local = true;
		} else if (!colon && strcmp(w, "tcp") == 0) {
			r->tcp = true;
		} else if (colon && ((kl == 3 && strncmp(w, "uid", 3) == 0) || (kl == 4 && strncmp(w, "user", 4) == 0))) {
			r->uids = xrealloc(r->uids, (r->n_uids + 1) * sizeof(*r->uids));
			r->uids[r->n_uids++] = parse_user("--allow", orig, v);
		} else if (colon && ((kl == 3 && strncmp(w, "gid", 3) == 0) || (kl == 5 && strncmp(w, "group", 5) == 0))) {
			r->gids = xrealloc(r->gids, (r->n_gids + 1) * sizeof(*r->gids));
			r->gids[r->n_gids++] = parse_group("--allow", orig, v);
		} else {
			errorf("invalid --allow '%s': '%s' is not uid:USER, group:GROUP, local or tcp (see --help)", orig, w);
			exit(2);
		}
	}
	free((void *)orig);
}

/* Long options without a short form. */
enum { OPT_MAX_CONNECTIONS = 256, OPT_MAX_CALLS, OPT_IDLE_TIMEOUT, OPT_HANDSHAKE_TIMEOUT, OPT_DRAIN_TIMEOUT,
       OPT_LOOP_THREADS };
/* Local trust (--allow and friends). */
enum { OPT_ALLOW = 384, OPT_MAX_PER_UID, OPT_SOCKET_GROUP };
/* Keepalive and connection age. */
enum { OPT_KEEPALIVE_INTERVAL = 400, OPT_KEEPALIVE_TIMEOUT, OPT_MAX_CONNECTION_AGE, OPT_MAX_CONNECTION_AGE_GRACE };
/* TLS's options (issue 12), apart so that other options' enums merge. */
enum { OPT_TLS_CERT = 512, OPT_TLS_KEY, OPT_TLS_CA, OPT_TLS_CLIENT_CERT };

/* --loop-threads auto: one loop per online CPU, at most 8. */
static unsigned auto_loops(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);
	return n < 1 ? 1u : n > 8 ? 8u : (unsigned)n;
}

static void parse_args(int argc, char **argv, config *cfg)
{
	static const struct option longopts[] = {
		{ "listen", required_argument, NULL, 'l' },
		{ "socket-mode", required_argument, NULL, 'm' },
		{ "max-frame", required_argument, NULL, 'f' },
		{ "workers", required_argument, NULL, 'w' },
		{ "loop-threads", required_argument, NULL, OPT_LOOP_THREADS },
		{ "log-level", required_argument, NULL, 'L' },
		{ "max-connections", required_argument, NULL, OPT_MAX_CONNECTIONS },
		{ "max-calls", required_argument, NULL, OPT_MAX_CALLS },
		{ "idle-timeout", required_argument, NULL, OPT_IDLE_TIMEOUT },
		{ "handshake-timeout", required_argument, NULL, OPT_HANDSHAKE_TIMEOUT },
		{ "drain-timeout", required_argument, NULL, OPT_DRAIN_TIMEOUT },
		{ "allow", required_argument, NULL, OPT_ALLOW },
		{ "max-connections-per-uid", required_argument, NULL, OPT_MAX_PER_UID },
		{ "max-conns-per-uid", required_argument, NULL, OPT_MAX_PER_UID },
		{ "socket-group", required_argument, NULL, OPT_SOCKET_GROUP },
		{ "keepalive-interval", required_argument, NULL, OPT_KEEPALIVE_INTERVAL },
		{ "keepalive-timeout", required_argument, NULL, OPT_KEEPALIVE_TIMEOUT },
		{ "max-connection-age", required_argument, NULL, OPT_MAX_CONNECTION_AGE },
		{ "max-connection-age-grace", required_argument, NULL, OPT_MAX_CONNECTION_AGE_GRACE },
		{ "cert", required_argument, NULL, OPT_TLS_CERT },
		{ "key", required_argument, NULL, OPT_TLS_KEY },
		{ "ca", required_argument, NULL, OPT_TLS_CA },
		{ "client-cert", required_argument, NULL, OPT_TLS_CLIENT_CERT },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	cfg->listen = calloc((size_t)argc, sizeof(*cfg->listen));
	if (!cfg->listen) {
		errorf("out of memory");
		exit(1);
	}
	cfg->opts.log = log_cb;
	cfg->opts.log_level = g_log_level;
	cfg->opts.loop_threads = auto_loops();

	opterr = 0;
	while ((c = getopt_long(argc, argv, ":l:m:f:w:L:hV", longopts, NULL)) != -1) {
		switch (c) {
		case 'l':
			cfg->listen[cfg->n_listen++] = optarg;
			break;
		case 'm':
			cfg->opts.socket_mode = (unsigned)parse_ulong("--socket-mode", optarg, 8, 0777);
			cfg->has_mode = true;
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
		case OPT_LOOP_THREADS:
			cfg->opts.loop_threads = strcmp(optarg, "auto") == 0
							 ? auto_loops()
							 : (unsigned)parse_ulong("--loop-threads", optarg, 10, 256);
			if (!cfg->opts.loop_threads)
				bad_option("--loop-threads", optarg, "must be at least 1");
			break;
		case OPT_MAX_CONNECTIONS:
			cfg->opts.max_connections = parse_count("--max-connections", optarg);
			break;
		case OPT_MAX_CALLS:
			cfg->opts.max_calls = parse_count("--max-calls", optarg);
			break;
		case OPT_IDLE_TIMEOUT:
			cfg->opts.idle_timeout_ms = parse_duration("--idle-timeout", optarg, true);
			break;
		case OPT_HANDSHAKE_TIMEOUT:
			cfg->opts.handshake_timeout_ms = parse_duration("--handshake-timeout", optarg, false);
			break;
		case OPT_DRAIN_TIMEOUT:
			g_drain_ms = parse_duration("--drain-timeout", optarg, true);
			break;
		case OPT_ALLOW:
			parse_allow(cfg, optarg);
			break;
		case OPT_MAX_PER_UID:
			cfg->opts.max_connections_per_uid = parse_count("--max-connections-per-uid", optarg);
			break;
		case OPT_SOCKET_GROUP:
			cfg->socket_group = parse_group("--socket-group", optarg, optarg);
			cfg->has_group = true;
			break;
		case OPT_KEEPALIVE_INTERVAL:
			cfg->opts.keepalive_interval_ms = parse_duration("--keepalive-interval", optarg, true);
			break;
		case OPT_KEEPALIVE_TIMEOUT:
			cfg->opts.keepalive_timeout_ms = parse_duration("--keepalive-timeout", optarg, false);
			break;
		case OPT_MAX_CONNECTION_AGE:
			cfg->opts.max_connection_age_ms = parse_duration("--max-connection-age", optarg, true);
			break;
		case OPT_MAX_CONNECTION_AGE_GRACE:
			cfg->opts.max_connection_age_grace_ms = parse_duration("--max-connection-age-grace", optarg, false);
			break;
		case OPT_TLS_CERT:
			cfg->opts.tls.cert = optarg;
			break;
		case OPT_TLS_KEY:
			cfg->opts.tls.key = optarg;
			break;
		case OPT_TLS_CA:
			cfg->opts.tls.ca = optarg;
			break;
		case OPT_TLS_CLIENT_CERT:
			if (strcmp(optarg, "require") == 0)
				cfg->opts.tls.verify = PBRPC_TLS_VERIFY_REQUIRE;
			else if (strcmp(optarg, "request") == 0)
				cfg->opts.tls.verify = PBRPC_TLS_VERIFY_REQUEST;
			else {
				errorf("--client-cert: expected require or request, got '%s'", optarg);
				exit(2);
			}
			break;
		case 'h':
			usage(stdout);
			exit(0);
		case 'V':
			printf(PROG " " PBRPC_VERSION "\n");
			exit(0);
		case ':':
			if (optopt && strncmp(argv[optind - 1], "--", 2) != 0)
				errorf("option -%c needs a value (see --help)", optopt);
			else
				errorf("option %s needs a value (see --help)", argv[optind - 1]);
			exit(2);
		default:
			if (optopt)
				errorf("unknown option -%c (see --help)", optopt);
			else
				errorf("unknown option %s (see --help)", argv[optind - 1]);
			exit(2);
		}
	}
	if (optind < argc) {
		errorf("unexpected argument '%s' (see --help)", argv[optind]);
		exit(2);
	}
	if (cfg->has_group && !cfg->has_mode)
		cfg->opts.socket_mode = 0660;
	if ((cfg->opts.tls.key || cfg->opts.tls.ca) && !cfg->opts.tls.cert) {
		errorf("%s needs --cert", cfg->opts.tls.key ? "--key" : "--ca");
		exit(2);
	}
	if (cfg->opts.tls.verify && !cfg->opts.tls.ca) {
		errorf("--client-cert needs --ca");
		exit(2);
	}
}

/* The --allow rules, once the services are registered. Returns 0, or prints
 * why not and returns -1 (a bad command line). */
static int apply_allow(pbrpc_server *srv, const config *cfg)
{
	for (size_t i = 0; i < cfg->n_allow; i++) {
		const allow_rule *r = &cfg->allow[i];
		pbrpc_policy p = { .uids = r->uids, .n_uids = r->n_uids, .gids = r->gids, .n_gids = r->n_gids,
				   .any_local = r->local, .allow_tcp = r->tcp };
		int rc = pbrpc_server_set_policy(srv, r->name, &p);
		if (rc == PBRPC_EINVALID) {
			errorf("invalid --allow: this server has no service or method '%s' (it serves demo.Kv, demo.Echo, "
			       "pbrpc.Health, pbrpc.Reflection, pbrpc.Stats; a method is e.g. demo.Kv/Put)",
			       r->name);
			return -1;
		}
		if (rc < 0) {
			errorf("cannot set the policy of %s: %s", r->name, pbrpc_strerror(rc));
			return -1;
		}
	}
	return 0;
}

/* --socket-group: the socket file of a unix:/path listener belongs to the
 * group (its mode was set at bind, see parse_args). */
static int chgrp_socket(pbrpc_server *srv, int index, gid_t gid)
{
	char addr[PBRPC_ENDPOINT_STRLEN + 8];
	if (pbrpc_server_address(srv, index, addr, sizeof(addr)) < 0 || strncmp(addr, "unix:/", 6) != 0)
		return 0; /* TCP and abstract sockets have no file */
	if (chown(addr + 5, (uid_t)-1, gid) < 0) {
		errorf("cannot give %s to group %u (--socket-group): %s", addr + 5, (unsigned)gid, strerror(errno));
		return -1;
	}
	return 0;
}

/* Every connection is a file descriptor: the soft open-file limit is raised
 * to fit max_connections and a margin, up to the hard limit (the server uses
 * epoll, never select, so a large limit is harmless). When even that is too
 * low for an explicit --max-connections, say so: the connections beyond it
 * are refused as out of file descriptors. */
static void fit_open_files(const pbrpc_server_opts *o)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
		return;
	rlim_t want = (rlim_t)(o->max_connections ? o->max_connections : 4096) + 64;
	if (rl.rlim_cur < want && rl.rlim_cur < rl.rlim_max) {
		struct rlimit nl = { want < rl.rlim_max ? want : rl.rlim_max, rl.rlim_max };
		if (setrlimit(RLIMIT_NOFILE, &nl) == 0)
			rl = nl;
	}
	if (rl.rlim_cur < want && o->max_connections)
		logf_(PBRPC_LOG_WARN,
		      "the open-file limit is %llu: connections beyond about %llu are refused as out of file "
		      "descriptors, not at --max-connections %u",
		      (unsigned long long)rl.rlim_cur, (unsigned long long)(rl.rlim_cur > 16 ? rl.rlim_cur - 16 : 0),
		      (unsigned)o->max_connections);
}

/* Adds every listener; returns 0 or prints why not and returns -1. */
static int start_listening(pbrpc_server *srv, const config *cfg)
{
	int n_fds = listen_fds();
	for (int i = 0; i < n_fds; i++) {
		int fd = SD_LISTEN_FDS_START + i;
		int idx = pbrpc_server_listen_fd(srv, fd);
		if (idx < 0) {
			errorf("cannot listen on fd %d from systemd: %s", fd, pbrpc_strerror(idx));
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
			errorf("$XDG_RUNTIME_DIR is too long for a socket path; use --listen");
			return -1;
		}
		one[0] = def;
		eps = one;
		n_eps = 1;
	}
	for (size_t i = 0; i < n_eps; i++) {
		int idx = pbrpc_server_listen(srv, eps[i]);
		if (idx < 0) {
			errorf("cannot listen on %s: %s", eps[i], pbrpc_strerror(idx));
			return -1;
		}
		if (cfg->has_group && chgrp_socket(srv, idx, cfg->socket_group) < 0)
			return -1;
		print_listening(srv, idx);
	}
	return 0;
}

static int add_services(pbrpc_server *srv, Demo__Kv_Service *kv, Demo__Echo_Service *echo)
{
	int rc;
	if ((rc = demo_kv_add(srv, kv)) < 0 ||
	    (rc = pbrpc_server_add_service(srv, &echo->base)) < 0 ||
	    (rc = pbrpc_server_enable_health(srv)) < 0 || (rc = pbrpc_server_enable_reflection(srv)) < 0 ||
	    (rc = pbrpc_server_enable_stats(srv)) < 0)
		errorf("cannot register services: %s", pbrpc_strerror(rc));
	return rc;
}

int main(int argc, char **argv)
{
	config cfg = { 0 };
	pbrpc_server *srv;
	int status = 1, rc;

	g_journal = stderr_is_journal();
	parse_args(argc, argv, &cfg);
	if (g_log_level >= PBRPC_LOG_INFO)
		cfg.opts.call_log = access_log; /* else no clock is read for it */
	format_stop_lines();
	fit_open_files(&cfg.opts);
	notify_open();
	/* Before any thread exists, so that every thread inherits the mask, and
	 * before the "listening on" line, after which a test may signal us. */
	mask_stop_signals(SIG_BLOCK);
	if (install_signals() < 0) {
		errorf("cannot install signal handlers: %s", strerror(errno));
		return 1;
	}

	Demo__Kv_Service *kv = demo_kv_new();
	Demo__Echo_Service *echo = demo_echo_new();
	if (!kv || !echo) {
		errorf("cannot create the example services: %s", strerror(errno ? errno : ENOMEM));
		goto err_services;
	}
	rc = pbrpc_server_new(&srv, &cfg.opts);
	if (rc < 0) {
		errorf("cannot create the server: %s", pbrpc_strerror(rc));
		goto err_services;
	}
	if (add_services(srv, kv, echo) < 0)
		goto err_server;
	if (apply_allow(srv, &cfg) < 0) {
		status = 2;
		goto err_server;
	}
	if (start_listening(srv, &cfg) < 0)
		goto err_server;

	g_srv = srv;
	logf_(PBRPC_LOG_INFO, "serving demo.Kv, demo.Echo, pbrpc.Health, pbrpc.Reflection, pbrpc.Stats");
	notify("READY=1\nSTATUS=serving demo.Kv, demo.Echo, pbrpc.Health, pbrpc.Reflection, pbrpc.Stats");

	mask_stop_signals(SIG_UNBLOCK);
	rc = pbrpc_server_run(srv);
	mask_stop_signals(SIG_BLOCK);
	g_srv = NULL;
	if (rc < 0)
		logf_(PBRPC_LOG_ERROR, "server loop failed: %s", pbrpc_strerror(rc));
	else
		status = 0; /* the signal was logged when it came */

	/* Echo may still answer calls it holds: free it while the server exists. */
err_server:
	demo_echo_free(echo);
	echo = NULL;
	pbrpc_server_free(srv);
err_services:
	demo_echo_free(echo);
	demo_kv_free(kv);
	free(cfg.listen);
	for (size_t i = 0; i < cfg.n_allow; i++) {
		free(cfg.allow[i].uids);
		free(cfg.allow[i].gids);
	}
	free(cfg.allow);
	return status;
}
