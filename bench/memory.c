/* pbrpc-memory: what a pbrpc server holds per idle connection and per call
 * in flight (issue 14 item 6). A measurement, never a test: it reports and
 * asserts nothing.
 *
 *   pbrpc-memory [--conns N] [--calls N] [--call-conns N]
 *
 * Starts a fresh server process (this program re-executed with --serve, so
 * that its heap holds nothing of ours) hosting a demo.Echo whose handler
 * answers "mem" with the server's own figures: glibc's heap in use
 * (mallinfo2: uordblks + hblkhd), VmRSS, its open connections and calls in
 * flight. Then, over one control connection (the real client):
 *   1. the baseline;
 *   2. N (default 100000) idle connections, each through the handshake
 *      (preface and HELLO both ways) and then silent; the figures again;
 *   3. C (default 10000) calls in flight: REQUESTs for demo.Echo/Echo with
 *      payload "hold" spread over --call-conns (10) of the idle connections,
 *      each held unanswered by the handler; the figures again.
 * Prints bytes per idle connection and per call in flight, and the machine's
 * kernel memory for the sockets (/proc/meminfo Slab, both ends: noisy on a
 * shared machine). RLIMIT_NOFILE is raised as far as the hard limit allows
 * (as root: to nr_open); when fewer connections fit, it says so and measures
 * those.
 *
 * The idle connections are raw sockets speaking the wire protocol through
 * lib/proto's codecs, so that the client side holds nothing but fds.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <malloc.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "echo.pb-c.h"
#include "pbrpc/pbrpc.h"
#include "proto/frame.h"
#include "proto/wire.h"

#define METHOD "demo.Echo/Echo"

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "pbrpc-memory: ");
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(1);
}

static void sleep_ms(int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

static int g_hard_errno; /* why the hard limit could not be raised */

/* Raises the soft (and, with CAP_SYS_RESOURCE, the hard) open-file limit to
 * want, or as near as the system allows; returns the soft limit now. */
static rlim_t raise_nofile(rlim_t want)
{
	struct rlimit rl;
	getrlimit(RLIMIT_NOFILE, &rl);
	if (rl.rlim_max < want) {
		FILE *f = fopen("/proc/sys/fs/nr_open", "r");
		unsigned long nr = 0;
		if (f) {
			if (fscanf(f, "%lu", &nr) != 1)
				nr = 0;
			fclose(f);
		}
		rlim_t hard = want < nr ? want : nr;
		struct rlimit nl = { hard, hard };
		if (hard > rl.rlim_max && setrlimit(RLIMIT_NOFILE, &nl) == 0)
			rl = nl;
		else
			g_hard_errno = hard > rl.rlim_max ? errno : 0;
	}
	rl.rlim_cur = want < rl.rlim_max ? want : rl.rlim_max;
	setrlimit(RLIMIT_NOFILE, &rl);
	getrlimit(RLIMIT_NOFILE, &rl);
	return rl.rlim_cur;
}

/* ---- the server (--serve) ---- */

static pbrpc_server *g_srv;
static struct held {
	Demo__EchoReply_Closure closure;
	void *data;
} *g_held;
static size_t g_n_held, g_cap_held;

static long vmrss_kib(void)
{
	FILE *f = fopen("/proc/self/status", "r");
	char line[256];
	long kb = -1;
	while (f && fgets(line, sizeof(line), f))
		if (sscanf(line, "VmRSS: %ld kB", &kb) == 1)
			break;
	if (f)
		fclose(f);
	return kb;
}

static void reply_text(Demo__EchoReply_Closure closure, void *data, const char *text)
{
	Demo__EchoReply r = DEMO__ECHO_REPLY__INIT;
	r.payload.data = (uint8_t *)text;
	r.payload.len = strlen(text);
	closure(&r, data);
}

static void mem_echo(Demo__Echo_Service *svc, const Demo__EchoRequest *req, Demo__EchoReply_Closure closure,
		     void *data)
{
	(void)svc;
	const char *p = (const char *)req->payload.data;
	size_t n = req->payload.len;
	char text[256];
	if (n == 4 && memcmp(p, "hold", 4) == 0 && g_n_held < g_cap_held) {
		g_held[g_n_held++] = (struct held){ closure, data };
		return;
	}
	if (n == 7 && memcmp(p, "release", 7) == 0) {
		for (size_t i = 0; i < g_n_held; i++)
			reply_text(g_held[i].closure, g_held[i].data, "released");
		g_n_held = 0;
	}
	/* The handler runs on the loop thread: the counters may be read. */
	pbrpc_server_stats st;
	pbrpc_server_get_stats(g_srv, &st);
	struct mallinfo2 mi = mallinfo2();
	snprintf(text, sizeof(text), "heap=%zu rss_kib=%ld conns=%llu calls=%llu held=%zu", mi.uordblks + mi.hblkhd,
		 vmrss_kib(), (unsigned long long)st.connections_open, (unsigned long long)st.calls_in_flight,
		 g_n_held);
	reply_text(closure, data, text);
}

static Demo__Echo_Service mem_service = DEMO__ECHO__INIT(mem_);

static int serve_main(const char *endpoint, unsigned long conns, unsigned long calls)
{
	raise_nofile((rlim_t)conns + 1024);
	g_cap_held = calls;
	g_held = calloc(calls ? calls : 1, sizeof(*g_held)); /* before the baseline: not counted */
	pbrpc_server_opts o = { .max_connections = (uint32_t)conns + 64, .handshake_timeout_ms = -1 };
	int rc = pbrpc_server_new(&g_srv, &o);
	if (rc < 0 || !g_held)
		die("server: %s", pbrpc_strerror(rc < 0 ? rc : -ENOMEM));
	if ((rc = pbrpc_server_add_service(g_srv, &mem_service.base)) < 0 || (rc = pbrpc_server_listen(g_srv, endpoint)) < 0)
		die("server: %s: %s", endpoint, pbrpc_strerror(rc));
	printf("ready\n");
	fflush(stdout);
	rc = pbrpc_server_run(g_srv);
	pbrpc_server_free(g_srv);
	return rc < 0;
}

/* ---- the client side ---- */

typedef struct figures {
	size_t heap;
	long rss_kib;
	unsigned long long conns, calls;
	long slab_kib; /* the machine's, /proc/meminfo */
} figures;

static long slab_kib(void)
{
	FILE *f = fopen("/proc/meminfo", "r");
	char line[256];
	long kb = -1;
	while (f && fgets(line, sizeof(line), f))
		if (sscanf(line, "Slab: %ld kB", &kb) == 1)
			break;
	if (f)
		fclose(f);
	return kb;
}

static figures ask(pbrpc_client *c, const char *what)
{
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)what;
	req.payload.len = strlen(what);
	ProtobufCMessage *reply = NULL;
	pbrpc_call_result res;
	if (pbrpc_client_call(c, METHOD, &req.base, &demo__echo_reply__descriptor, &reply, NULL, &res) < 0)
		die("control call: %s", res.message);
	const Demo__EchoReply *r = (const Demo__EchoReply *)reply;
	char text[256];
	snprintf(text, sizeof(text), "%.*s", (int)r->payload.len, (const char *)r->payload.data);
	protobuf_c_message_free_unpacked(reply, NULL);
	figures f = { 0 };
	size_t held;
	if (sscanf(text, "heap=%zu rss_kib=%ld conns=%llu calls=%llu held=%zu", &f.heap, &f.rss_kib, &f.conns,
		   &f.calls, &held) != 5)
		die("control call: odd reply '%s'", text);
	f.slab_kib = slab_kib();
	return f;
}

/* Waits until the server holds `conns` connections and `calls` calls (+1:
 * the control call itself), then returns its figures. */
static figures settle(pbrpc_client *c, unsigned long long conns, unsigned long long calls)
{
	figures f = { 0 };
	for (int i = 0; i < 600; i++) {
		f = ask(c, "mem");
		if (f.conns >= conns && f.calls >= calls + 1)
			break;
		sleep_ms(50);
	}
	sleep_ms(300);
	return ask(c, "mem");
}

/* What every idle connection sends: preface and HELLO, packed once. */
static uint8_t g_hello[256];
static size_t g_hello_len;

static void pack_hello(void)
{
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc_hello h = { .version = PBRPC_WIRE_VERSION, .agent = "pbrpc-memory" };
	int sp[2];
	if (pbrpc__wire_write_preface(&w, &h) < 0 || socketpair(AF_UNIX, SOCK_STREAM, 0, sp) < 0)
		die("packing the HELLO");
	while (pbrpc__frame_writer_pending(&w))
		if (pbrpc__frame_writer_flush(&w, sp[0], 0) < 0)
			die("packing the HELLO");
	pbrpc__frame_writer_fini(&w);
	ssize_t n = read(sp[1], g_hello, sizeof(g_hello));
	if (n <= 0)
		die("packing the HELLO");
	g_hello_len = (size_t)n;
	close(sp[0]);
	close(sp[1]);
}

static int read_full(int fd, void *buf, size_t len)
{
	size_t got = 0;
	while (got < len) {
		ssize_t n = read(fd, (uint8_t *)buf + got, len - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		got += (size_t)n;
	}
	return 0;
}

/* Connects and completes the handshake; returns the fd or -1. */
static int idle_open(const pbrpc_endpoint *ep)
{
	int fd = pbrpc_endpoint_connect(ep, 5000);
	if (fd < 0)
		return -1;
	uint8_t buf[PBRPC_WIRE_PREFACE_SIZE + PBRPC_FRAME_HEADER_SIZE];
	if (write(fd, g_hello, g_hello_len) != (ssize_t)g_hello_len || read_full(fd, buf, sizeof(buf)) < 0)
		goto fail;
	uint32_t len = (uint32_t)buf[8] << 24 | (uint32_t)buf[9] << 16 | (uint32_t)buf[10] << 8 | buf[11];
	uint8_t body[512];
	if (len > sizeof(body) || read_full(fd, body, len) < 0)
		goto fail;
	return fd;
fail:
	close(fd);
	return -1;
}

/* Sends n "hold" REQUESTs on fd, ids from *next_id on. */
static void send_holds(int fd, unsigned n, uint32_t *next_id)
{
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)"hold";
	req.payload.len = 4;
	for (unsigned i = 0; i < n; i++) {
		pbrpc__wire_request r = { .call_id = (*next_id)++, .method = METHOD, .method_len = sizeof(METHOD) - 1 };
		if (pbrpc__wire_write_request(&w, &r, &req.base, 0) < 0)
			die("packing a request");
	}
	while (pbrpc__frame_writer_pending(&w))
		if (pbrpc__frame_writer_flush(&w, fd, 0) < 0)
			die("sending requests: %s", strerror(errno));
	pbrpc__frame_writer_fini(&w);
}

static double per(double a, double b, unsigned long n)
{
	return n ? (a - b) / (double)n : 0;
}

int main(int argc, char **argv)
{
	if (argc == 5 && strcmp(argv[1], "--serve") == 0)
		return serve_main(argv[2], strtoul(argv[3], NULL, 10), strtoul(argv[4], NULL, 10));
	unsigned long conns = 100000, calls = 10000, call_conns = 10;
	static const struct option opts[] = {
		{ "conns", required_argument, NULL, 'n' },
		{ "calls", required_argument, NULL, 'c' },
		{ "call-conns", required_argument, NULL, 'k' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int o;
	while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		if (o == 'n')
			conns = strtoul(optarg, NULL, 10);
		else if (o == 'c')
			calls = strtoul(optarg, NULL, 10);
		else if (o == 'k')
			call_conns = strtoul(optarg, NULL, 10);
		else {
			fprintf(o == 'h' ? stdout : stderr,
				"Usage: pbrpc-memory [--conns N (100000)] [--calls N (10000)] [--call-conns N (10)]\n");
			return o == 'h' ? 0 : 2;
		}
	}
	if (call_conns == 0 || call_conns > conns || calls / call_conns > 1000)
		die("--calls / --call-conns must be at most 1000 (the server's max_calls is 1024), "
		    "--call-conns at most --conns");
	signal(SIGPIPE, SIG_IGN);
	rlim_t lim = raise_nofile((rlim_t)conns + 1024);
	if (lim < (rlim_t)conns + 64) {
		fprintf(stderr,
			"pbrpc-memory: RLIMIT_NOFILE is %lu and cannot be raised (%s): %lu connections instead of %lu\n",
			(unsigned long)lim,
			g_hard_errno == EPERM ? "no CAP_SYS_RESOURCE"
			: g_hard_errno	      ? strerror(g_hard_errno)
					      : "/proc/sys/fs/nr_open",
			(unsigned long)lim - 64, conns);
		conns = (unsigned long)lim - 64;
	}

	char endpoint[64], nconns[24], ncalls[24];
	snprintf(endpoint, sizeof(endpoint), "unix:@pbrpc-memory-%d", (int)getpid());
	snprintf(nconns, sizeof(nconns), "%lu", conns);
	snprintf(ncalls, sizeof(ncalls), "%lu", calls);
	int out[2];
	if (pipe(out) < 0)
		die("pipe: %s", strerror(errno));
	pid_t pid = fork();
	if (pid == 0) {
		dup2(out[1], 1);
		close(out[0]);
		close(out[1]);
		execl("/proc/self/exe", argv[0], "--serve", endpoint, nconns, ncalls, (char *)NULL);
		_exit(127);
	}
	close(out[1]);
	char line[16] = "";
	if (read(out[0], line, sizeof(line) - 1) <= 0 || strncmp(line, "ready", 5) != 0)
		die("the server did not start");

	pbrpc_client *ctl;
	int rc = pbrpc_client_connect(&ctl, endpoint, NULL);
	if (rc < 0)
		die("control connection: %s", pbrpc_strerror(rc));
	pbrpc_endpoint ep;
	pbrpc_endpoint_parse(endpoint, &ep);
	pack_hello();
	sleep_ms(1100); /* past the server's first one-second sweep */
	figures f0 = settle(ctl, 1, 0);

	int *fds = calloc(conns, sizeof(*fds));
	if (!fds)
		die("out of memory");
	unsigned long n = 0;
	for (; n < conns; n++) {
		fds[n] = idle_open(&ep);
		if (fds[n] < 0) {
			fprintf(stderr, "pbrpc-memory: connection %lu failed: %s; measuring %lu\n", n + 1, strerror(errno),
				n);
			break;
		}
	}
	figures f1 = settle(ctl, n + 1, 0);

	unsigned long k = call_conns < n ? call_conns : n, held = 0;
	for (unsigned long i = 0; i < k; i++) {
		uint32_t id = 1;
		unsigned m = (unsigned)(calls / k + (i < calls % k));
		send_holds(fds[i], m, &id);
		held += m;
	}
	figures f2 = settle(ctl, n + 1, held);
	ask(ctl, "release");

	printf("pbrpc-memory: one pbrpc server (unix, abstract socket), glibc heap in use = mallinfo2 uordblks + "
	       "hblkhd\n\n");
	printf("| state | connections | calls in flight | heap, MiB | VmRSS, MiB | machine Slab, MiB |\n"
	       "|---|---:|---:|---:|---:|---:|\n");
	const figures *fs[3] = { &f0, &f1, &f2 };
	static const char *const names[3] = { "baseline (1 control connection)", "idle connections",
					       "calls held in flight" };
	for (int i = 0; i < 3; i++)
		printf("| %s | %llu | %llu | %.1f | %.1f | %.1f |\n", names[i], fs[i]->conns, fs[i]->calls - 1,
		       fs[i]->heap / 1048576.0, fs[i]->rss_kib / 1024.0, fs[i]->slab_kib / 1024.0);
	printf("\nper idle connection: %.0f bytes of heap, %.0f bytes of RSS, %.0f bytes of kernel slab (both ends)\n",
	       per((double)f1.heap, (double)f0.heap, n), per(f1.rss_kib * 1024.0, f0.rss_kib * 1024.0, n),
	       per(f1.slab_kib * 1024.0, f0.slab_kib * 1024.0, n));
	printf("per call in flight (%lu calls on %lu connections): %.0f bytes of heap, %.0f bytes of RSS\n", held, k,
	       per((double)f2.heap, (double)f1.heap, held), per(f2.rss_kib * 1024.0, f1.rss_kib * 1024.0, held));

	for (unsigned long i = 0; i < n; i++)
		close(fds[i]);
	free(fds);
	pbrpc_client_free(ctl);
	kill(pid, SIGTERM);
	int st;
	waitpid(pid, &st, 0);
	return 0;
}
