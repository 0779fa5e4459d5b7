/* pbrpc-bench: runs every measurement and prints markdown tables on stdout
 * (progress on stderr). See docs/BENCHMARKS.md for what each row means; run
 * `pbrpc-bench --help` for the options. Benchmarks never assert anything:
 * the targets table only reports.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

/* ---- shared state and helpers ---- */

bench_shm *bench_shared;
const uint8_t *bench_payload;

void bench_die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "pbrpc-bench[%d]: ", (int)getpid());
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(1);
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void sleep_s(double s)
{
	struct timespec ts = { .tv_sec = (time_t)s, .tv_nsec = (long)((s - (double)(time_t)s) * 1e9) };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

void bench_usage_now(bench_usage *u)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	u->user_s = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6;
	u->sys_s = (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
	u->minflt = (uint64_t)ru.ru_minflt;
	u->nvcsw = (uint64_t)ru.ru_nvcsw;
	u->nivcsw = (uint64_t)ru.ru_nivcsw;
	u->allocs = bench_allocs();
	u->frees = bench_frees();
}

static pthread_mutex_t snap_mu = PTHREAD_MUTEX_INITIALIZER;

void bench_server_tick(void)
{
	uint32_t r = atomic_load_explicit(&bench_shared->snap_req, memory_order_acquire);
	if (r == atomic_load_explicit(&bench_shared->snap_ack, memory_order_relaxed))
		return;
	pthread_mutex_lock(&snap_mu);
	if (r != atomic_load_explicit(&bench_shared->snap_ack, memory_order_relaxed)) {
		bench_usage_now(&bench_shared->snap);
		atomic_store_explicit(&bench_shared->snap_ack, r, memory_order_release);
	}
	pthread_mutex_unlock(&snap_mu);
}

static uint32_t snap_request(void)
{
	return atomic_fetch_add(&bench_shared->snap_req, 1) + 1;
}

static bool snap_done(uint32_t r)
{
	return atomic_load_explicit(&bench_shared->snap_ack, memory_order_acquire) == r;
}

/* Waits for the server's snapshot (taken by its next request). */
static bool snap_wait(uint32_t r, double timeout_s)
{
	double end = now_s() + timeout_s;
	while (!snap_done(r)) {
		if (now_s() > end)
			return false;
		sleep_s(50e-6);
	}
	return true;
}

void bench_wait_ready(void)
{
	double end = now_s() + 10;
	while (!atomic_load(&bench_shared->ready)) {
		if (now_s() > end)
			bench_die("the server did not start accepting within 10 s");
		sleep_s(1e-3);
	}
}

/* ---- configuration ---- */

/* The peers are built only when their libraries are found (bench/meson.build). */
#ifndef BENCH_HAVE_GRPC
const bench_system bench_grpc = {
	.key = "grpc",
	.name = "G gRPC",
	.unavailable = "built without gRPC C++ (run scripts/setup-bench, then reconfigure)",
};
#endif
#ifndef BENCH_HAVE_NNG
const bench_system bench_nng = {
	.key = "nng",
	.name = "N nng",
	.unavailable = "built without nng (run scripts/setup-bench, then reconfigure)",
};
#endif

static const bench_system *const all_systems[] = { &bench_pbrpc, &bench_rawpb, &bench_raw, &bench_epoll,
						   &bench_wire,  &bench_grpc,  &bench_nng };
#define N_SYSTEMS 7
enum { SYS_PBRPC, SYS_RAWPB, SYS_RAW, SYS_EPOLL, SYS_WIRE, SYS_GRPC, SYS_NNG };

static const size_t all_sizes[] = { 32, 1024, 64 * 1024, 1024 * 1024 };
#define N_SIZES 4

static struct {
	bool systems[N_SYSTEMS];
	bool sizes[N_SIZES];
	bool transports[2]; /* unix, tcp */
	bool pin_modes[3];  /* placements: PL_DEFAULT, PL_PINNED, PL_SPLIT */
	bool seq, conc, pipe, idle, memfd;
	double secs;
	int rounds;
	long calls; /* fixed call count (profiling); 0: timed */
	int idle_conns;
	int conc_counts[2];
	unsigned loops[4]; /* --loop-threads: pbrpc's server; loops[0] everywhere, the others in conc too */
	int n_loops;
	int depths[3];
	int pin_cpu;
} cfg = {
	.systems = { true, true, true, true, true, true, true },
	.sizes = { true, true, true, true },
	.transports = { true, true },
	.pin_modes = { true, true, true },
	.seq = true,
	.conc = true,
	.pipe = true,
	.idle = true,
	.memfd = true,
	.secs = 0.25,
	.rounds = 3,
	.idle_conns = 10000,
	.conc_counts = { 16, 256 },
	.depths = { 1, 16, 128 },
};

static const char *const transport_names[2] = { "unix", "tcp" };

/* Where the two processes of a sequential row run: wherever the scheduler
 * puts them (what a user gets), both on one CPU, or one CPU each (client on
 * the other CPU, server on pin_cpu: every call crosses vCPUs twice). */
enum { PL_DEFAULT, PL_PINNED, PL_SPLIT, N_PL };
static const int pl_order[N_PL] = { PL_PINNED, PL_DEFAULT, PL_SPLIT };
static const char *const pl_col[N_PL] = { "2", "pinned", "split" };      /* table column */
static const char *const pl_key[N_PL] = { "unpinned", "pinned", "split" }; /* --pin, progress */
static int cur_pl;                                                        /* set_pinned's */

/* ---- affinity ---- */

static cpu_set_t all_cpus;

/* Applies to every thread of the client process, not only the caller: gRPC
 * and nng keep threads of their own between measurements, which would
 * otherwise keep the placement of the measurement that created them. */
static int split_client_cpu(void)
{
	for (int c = 0; c < CPU_SETSIZE; c++)
		if (c != cfg.pin_cpu && CPU_ISSET(c, &all_cpus))
			return c;
	return cfg.pin_cpu;
}

static void set_pinned(int pl)
{
	cpu_set_t s;
	cur_pl = pl;
	if (pl == PL_DEFAULT) {
		s = all_cpus;
	} else {
		CPU_ZERO(&s);
		CPU_SET(pl == PL_SPLIT ? split_client_cpu() : cfg.pin_cpu, &s);
	}
	if (sched_setaffinity(0, sizeof(s), &s) < 0)
		bench_die("sched_setaffinity: %s", strerror(errno));
	DIR *d = opendir("/proc/self/task");
	if (!d)
		return;
	struct dirent *e;
	while ((e = readdir(d)))
		if (e->d_name[0] != '.')
			sched_setaffinity((pid_t)atoi(e->d_name), sizeof(s), &s); /* a thread may be gone */
	closedir(d);
}

/* ---- server child ---- */

static int make_listener(bool tcp, bench_target *t)
{
	static int seq;
	char ep[PBRPC_ENDPOINT_STRLEN];
	if (tcp)
		snprintf(ep, sizeof(ep), "tcp:127.0.0.1:0");
	else
		snprintf(ep, sizeof(ep), "unix:@pbrpc-bench-%d-%d", (int)getpid(), seq++);
	memset(t, 0, sizeof(*t));
	t->tcp = tcp;
	int rc = pbrpc_endpoint_parse(ep, &t->ep);
	if (rc < 0)
		bench_die("endpoint %s: %s", ep, pbrpc_strerror(rc));
	pbrpc_listen_opts lo = { .backlog = 0 };
	int fd = pbrpc_endpoint_listen(&t->ep, &lo);
	if (fd < 0)
		bench_die("listen %s: %s", ep, pbrpc_strerror(fd));
	/* Accepted TCP sockets inherit the listener's buffer sizes. */
	bench_tune_socket(fd, false);
	pbrpc_endpoint_format(&t->ep, t->endpoint, sizeof(t->endpoint));
	return fd;
}

/* The server exits on SIGTERM through _exit, so that profilers attached to it
 * (valgrind follows the fork) write their data. */
static void on_term(int sig)
{
	(void)sig;
	_exit(0);
}

static int shm_fd = -1; /* bench_shared's memfd, for servers that exec */

static pid_t spawn_server(const bench_system *s, const bench_target *t, int lfd, bool idle)
{
	atomic_store(&bench_shared->snap_req, 0);
	atomic_store(&bench_shared->snap_ack, 0);
	atomic_store(&bench_shared->conns, 0);
	atomic_store(&bench_shared->ready, 0);
	if (s->exec_server) {
		/* Its server binds the address itself: free it first. */
		close(lfd);
		lfd = -1;
	}
	fflush(NULL);
	pid_t pid = fork();
	if (pid < 0)
		bench_die("fork: %s", strerror(errno));
	if (pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (cur_pl == PL_SPLIT) {
			/* The server on pin_cpu, the client (set_pinned) elsewhere;
			 * an exec keeps it. */
			cpu_set_t cs;
			CPU_ZERO(&cs);
			CPU_SET(cfg.pin_cpu, &cs);
			if (sched_setaffinity(0, sizeof(cs), &cs) < 0)
				bench_die("sched_setaffinity: %s", strerror(errno));
		}
		if (s->exec_server) {
			char fd_s[16], buf_s[16];
			snprintf(fd_s, sizeof(fd_s), "%d", shm_fd);
			snprintf(buf_s, sizeof(buf_s), "%d", bench_sockbuf);
			fcntl(shm_fd, F_SETFD, 0);
			execl("/proc/self/exe", "pbrpc-bench", "--serve", s->key, t->endpoint, fd_s, buf_s, (char *)NULL);
			bench_die("exec /proc/self/exe: %s", strerror(errno));
		}
		signal(SIGTERM, on_term);
		if (idle && s->serve_idle)
			s->serve_idle(lfd, t);
		else
			s->serve(lfd, t);
		_exit(0);
	}
	if (lfd >= 0)
		close(lfd);
	return pid;
}

/* `pbrpc-bench --serve KEY ENDPOINT SHM_FD SOCKBUF`: the server side of an
 * exec_server system, in a fresh process image (see spawn_server). */
static int serve_main(char **argv)
{
	const bench_system *s = NULL;
	for (size_t i = 0; i < sizeof(all_systems) / sizeof(all_systems[0]); i++)
		if (strcmp(all_systems[i]->key, argv[2]) == 0)
			s = all_systems[i];
	if (!s || !s->serve)
		bench_die("--serve: no system %s", argv[2]);
	bench_target t;
	memset(&t, 0, sizeof(t));
	int rc = pbrpc_endpoint_parse(argv[3], &t.ep);
	if (rc < 0)
		bench_die("--serve: endpoint %s: %s", argv[3], pbrpc_strerror(rc));
	t.tcp = t.ep.kind == PBRPC_ENDPOINT_TCP;
	snprintf(t.endpoint, sizeof(t.endpoint), "%s", argv[3]);
	bench_shared = mmap(NULL, sizeof(*bench_shared), PROT_READ | PROT_WRITE, MAP_SHARED, atoi(argv[4]), 0);
	if (bench_shared == MAP_FAILED)
		bench_die("--serve: mmap: %s", strerror(errno));
	close(atoi(argv[4]));
	bench_sockbuf = atoi(argv[5]);
	bench_hook_sockets = true; /* the peers' accepted sockets get the baselines' buffers */
	signal(SIGPIPE, SIG_IGN);
	s->serve(-1, &t);
	return 0;
}

static void stop_server(pid_t pid)
{
	kill(pid, SIGTERM);
	for (int i = 0; i < 2000; i++) {
		if (waitpid(pid, NULL, WNOHANG) == pid)
			return;
		sleep_s(1e-3);
	}
	kill(pid, SIGKILL);
	while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
		;
}

/* ---- results ---- */

enum {
	V_P50,    /* us */
	V_P99,    /* us */
	V_RATE,   /* calls/s */
	V_CPU,    /* us of CPU per call, client + server */
	V_CCPU,   /* client part */
	V_SCPU,   /* server part */
	V_CALLOC, /* heap allocations per call, client */
	V_SALLOC, /* server */
	V_CFLT,   /* minor page faults per call */
	V_SFLT,
	V_CCSW, /* context switches (voluntary + involuntary) per call */
	V_SCSW,
	V_RSS0, /* idle test: server RSS before, KiB */
	V_RSS1, /* after */
	NV
};

typedef struct result {
	bool ok;
	double v[NV];
} result;

static void fill_usage(result *r, const bench_usage *c0, const bench_usage *c1, const bench_usage *s0,
		       const bench_usage *s1, double calls)
{
	double cc = (c1->user_s + c1->sys_s) - (c0->user_s + c0->sys_s);
	double sc = (s1->user_s + s1->sys_s) - (s0->user_s + s0->sys_s);
	r->v[V_CCPU] = cc * 1e6 / calls;
	r->v[V_SCPU] = sc * 1e6 / calls;
	r->v[V_CPU] = r->v[V_CCPU] + r->v[V_SCPU];
	r->v[V_CALLOC] = (double)(c1->allocs - c0->allocs) / calls;
	r->v[V_SALLOC] = (double)(s1->allocs - s0->allocs) / calls;
	r->v[V_CFLT] = (double)(c1->minflt - c0->minflt) / calls;
	r->v[V_SFLT] = (double)(s1->minflt - s0->minflt) / calls;
	r->v[V_CCSW] = (double)(c1->nvcsw + c1->nivcsw - c0->nvcsw - c0->nivcsw) / calls;
	r->v[V_SCSW] = (double)(s1->nvcsw + s1->nivcsw - s0->nvcsw - s0->nivcsw) / calls;
}

/* The k-th smallest of v[0..n) (quickselect; reorders v). Linear, so that a
 * profile of many calls is not dominated by sorting the samples. */
static uint32_t nth(uint32_t *v, size_t n, size_t k)
{
	size_t lo = 0, hi = n - 1;
	while (lo < hi) {
		uint32_t pivot = v[lo + (hi - lo) / 2];
		size_t i = lo, j = hi;
		while (i <= j) {
			while (v[i] < pivot)
				i++;
			while (v[j] > pivot)
				j--;
			if (i <= j) {
				uint32_t t = v[i];
				v[i++] = v[j];
				v[j] = t;
				if (j == 0)
					break;
				j--;
			}
		}
		if (k <= j)
			hi = j;
		else if (k >= i)
			lo = i;
		else
			return v[k];
	}
	return v[k];
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* Field-wise median of the rounds that succeeded. */
static result median(const result *rs, int n)
{
	result m = { 0 };
	double v[64];
	int k = 0;
	for (int i = 0; i < n && k < 64; i++)
		if (rs[i].ok)
			k++;
	if (!k)
		return m;
	m.ok = true;
	for (int f = 0; f < NV; f++) {
		k = 0;
		for (int i = 0; i < n && k < 64; i++)
			if (rs[i].ok)
				v[k++] = rs[i].v[f];
		qsort(v, (size_t)k, sizeof(v[0]), cmp_double);
		m.v[f] = k % 2 ? v[k / 2] : (v[k / 2 - 1] + v[k / 2]) / 2;
	}
	return m;
}

/* ---- sequential calls on one connection ---- */

#define MAX_SAMPLES (2u << 20)
static uint32_t *samples;

static result run_seq(const bench_system *s, bool tcp, size_t size, int pl)
{
	result r = { 0 };
	bench_target t;
	set_pinned(pl);
	int lfd = make_listener(tcp, &t);
	pid_t pid = spawn_server(s, &t, lfd, false);
	void *c = s->open(&t);
	if (!c)
		goto out;

	/* Warm up: buffers grown, pools filled, caches hot. */
	double warm_end = now_s() + (cfg.calls ? 0 : cfg.secs * 0.2);
	for (int i = 0; i < 20 || now_s() < warm_end; i++)
		if (s->call(c, size) < 0)
			goto fail;

	bench_usage c0, c1, s0, s1;
	uint32_t q = snap_request();
	if (s->call(c, size) < 0 || !snap_wait(q, 5))
		goto fail;
	s0 = bench_shared->snap;
	bench_usage_now(&c0);

	size_t n = 0;
	uint64_t t0 = now_ns(), a = t0, b = t0;
	uint64_t end = t0 + (uint64_t)(cfg.secs * 1e9);
	while (n < MAX_SAMPLES && (cfg.calls ? n < (size_t)cfg.calls : b < end)) {
		if (s->call(c, size) < 0)
			goto fail;
		b = now_ns();
		samples[n++] = (uint32_t)(b - a);
		a = b;
	}

	q = snap_request();
	if (s->call(c, size) < 0 || !snap_wait(q, 5))
		goto fail;
	bench_usage_now(&c1);
	s1 = bench_shared->snap;

	r.v[V_P50] = nth(samples, n, n / 2) / 1e3;
	r.v[V_P99] = nth(samples, n, (size_t)((double)n * 0.99)) / 1e3;
	r.v[V_RATE] = (double)n / ((double)(b - t0) * 1e-9);
	fill_usage(&r, &c0, &c1, &s0, &s1, (double)(n + 1));
	r.ok = true;
	goto close;
fail:
	fprintf(stderr, "pbrpc-bench: %s %s %zu B: call failed\n", s->key, t.endpoint, size);
close:
	s->close(c);
out:
	stop_server(pid);
	set_pinned(PL_DEFAULT);
	return r;
}

/* ---- concurrent connections, one synchronous caller each ---- */

struct worker {
	const bench_system *s;
	const bench_target *t;
	pthread_t th;
	_Atomic uint64_t calls;
	_Atomic int state; /* 0 starting, 1 running, -1 failed */
	char pad[64];
};

static _Atomic int workers_stop;

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	void *c = w->s->open(w->t);
	if (!c) {
		atomic_store(&w->state, -1);
		return NULL;
	}
	atomic_store(&w->state, 1);
	while (!atomic_load_explicit(&workers_stop, memory_order_relaxed)) {
		if (w->s->call(c, 32) < 0) {
			atomic_store(&w->state, -1);
			break;
		}
		atomic_store_explicit(&w->calls, atomic_load_explicit(&w->calls, memory_order_relaxed) + 1,
				      memory_order_relaxed);
	}
	w->s->close(c);
	return NULL;
}

static uint64_t total_calls(struct worker *ws, int n)
{
	uint64_t sum = 0;
	for (int i = 0; i < n; i++)
		sum += atomic_load_explicit(&ws[i].calls, memory_order_relaxed);
	return sum;
}

static result run_conc(const bench_system *s, bool tcp, int nconn)
{
	result r = { 0 };
	bench_target t;
	int lfd = make_listener(tcp, &t);
	pid_t pid = spawn_server(s, &t, lfd, false);
	struct worker *ws = calloc((size_t)nconn, sizeof(*ws));
	if (!ws)
		bench_die("out of memory");
	atomic_store(&workers_stop, 0);
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 256 * 1024);
	int started = 0;
	for (; started < nconn; started++) {
		ws[started].s = s;
		ws[started].t = &t;
		if (pthread_create(&ws[started].th, &attr, worker_main, &ws[started]) != 0)
			break;
	}
	pthread_attr_destroy(&attr);
	bool ok = started == nconn;
	for (int i = 0; i < started && ok; i++) {
		while (atomic_load(&ws[i].state) == 0)
			sleep_s(1e-3);
		ok = atomic_load(&ws[i].state) == 1;
	}
	if (ok) {
		sleep_s(cfg.secs * 0.5);
		bench_usage c0, c1, s0, s1;
		uint32_t q = snap_request();
		ok = snap_wait(q, 5);
		bench_usage_now(&c0);
		s0 = bench_shared->snap;
		uint64_t n0 = total_calls(ws, nconn);
		double t0 = now_s();
		sleep_s(cfg.secs * 2);
		q = snap_request();
		ok = ok && snap_wait(q, 5);
		bench_usage_now(&c1);
		s1 = bench_shared->snap;
		uint64_t n1 = total_calls(ws, nconn);
		double t1 = now_s();
		for (int i = 0; i < nconn; i++)
			ok = ok && atomic_load(&ws[i].state) == 1;
		if (ok && n1 > n0) {
			r.v[V_RATE] = (double)(n1 - n0) / (t1 - t0);
			fill_usage(&r, &c0, &c1, &s0, &s1, (double)(n1 - n0));
			r.ok = true;
		}
	}
	atomic_store(&workers_stop, 1);
	for (int i = 0; i < started; i++)
		pthread_join(ws[i].th, NULL);
	if (!r.ok)
		fprintf(stderr, "pbrpc-bench: %s %s %d connections failed\n", s->key, t.endpoint, nconn);
	free(ws);
	stop_server(pid);
	return r;
}

/* ---- pipelined calls on one connection ---- */

static result run_pipe(const bench_system *s, bool tcp, int depth)
{
	result r = { 0 };
	bench_target t;
	int lfd = make_listener(tcp, &t);
	pid_t pid = spawn_server(s, &t, lfd, false);
	void *c = s->open(&t);
	if (!c)
		goto out;
	double warm_end = now_s() + cfg.secs * 0.2;
	for (int i = 0; i < 5 || now_s() < warm_end; i++)
		if (s->batch(c, 32, depth) < 0)
			goto fail;

	bench_usage c0, c1, s0, s1;
	uint32_t q = snap_request();
	if (s->batch(c, 32, depth) < 0 || !snap_wait(q, 5))
		goto fail;
	bench_usage_now(&c0);
	s0 = bench_shared->snap;
	uint64_t n = 0;
	double t0 = now_s(), t1 = t0, end = t0 + cfg.secs;
	while (t1 < end) {
		if (s->batch(c, 32, depth) < 0)
			goto fail;
		n += (uint64_t)depth;
		t1 = now_s();
	}
	q = snap_request();
	if (s->batch(c, 32, depth) < 0 || !snap_wait(q, 5))
		goto fail;
	bench_usage_now(&c1);
	s1 = bench_shared->snap;
	r.v[V_RATE] = (double)n / (t1 - t0);
	fill_usage(&r, &c0, &c1, &s0, &s1, (double)(n + (uint64_t)depth));
	r.ok = true;
	goto close;
fail:
	fprintf(stderr, "pbrpc-bench: %s %s depth %d: call failed\n", s->key, t.endpoint, depth);
close:
	s->close(c);
out:
	stop_server(pid);
	return r;
}

/* ---- idle connections: server memory ---- */

static long vmrss_kib(pid_t pid)
{
	char path[64], line[256];
	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	long kb = -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "VmRSS: %ld kB", &kb) == 1)
			break;
	fclose(f);
	return kb;
}

static result run_idle(const bench_system *s, bool tcp, int nconn)
{
	result r = { 0 };
	bench_target t;
	int lfd = make_listener(tcp, &t);
	pid_t pid = spawn_server(s, &t, lfd, true);
	void **cs = calloc((size_t)nconn, sizeof(*cs));
	if (!cs)
		bench_die("out of memory");
	double end = now_s() + 5;
	while (!atomic_load(&bench_shared->ready) && now_s() < end)
		sleep_s(1e-3);
	sleep_s(0.05);
	long rss0 = vmrss_kib(pid);
	int n = 0;
	for (; n < nconn; n++) {
		cs[n] = s->open_idle(&t);
		if (!cs[n])
			break;
	}
	end = now_s() + 10;
	while (atomic_load(&bench_shared->conns) < (uint64_t)n && now_s() < end)
		sleep_s(1e-3);
	sleep_s(0.3); /* every HELLO read and handled */
	long rss1 = vmrss_kib(pid);
	if (n == nconn && atomic_load(&bench_shared->conns) >= (uint64_t)n) {
		r.ok = true;
		r.v[V_RSS0] = (double)rss0;
		r.v[V_RSS1] = (double)rss1;
	} else {
		fprintf(stderr, "pbrpc-bench: %s %s: only %d of %d idle connections (%s)\n", s->key, t.endpoint, n,
			nconn, strerror(errno));
	}
	for (int i = 0; i < n; i++)
		s->close_idle(cs[i]);
	free(cs);
	stop_server(pid);
	return r;
}

/* ---- tables ---- */

static result seq_res[N_SYSTEMS][2][N_PL][N_SIZES]; /* system, transport, placement, size */
static result conc_res[N_SYSTEMS][2][2];         /* system, transport, count index */
static result conc_loops_res[2][4][2][2];        /* pbrpc, W; with cfg.loops[i]; transport; count index */
static result pipe_res[N_SYSTEMS][2][3];         /* system, transport, depth index */
static result idle_res[N_SYSTEMS][2];

static const char *size_name(size_t s)
{
	static char buf[4][32];
	static int i;
	char *b = buf[i++ % 4];
	if (s >= 1024 * 1024)
		snprintf(b, 32, "%zu MiB", s >> 20);
	else if (s >= 1024)
		snprintf(b, 32, "%zu KiB", s >> 10);
	else
		snprintf(b, 32, "%zu B", s);
	return b;
}

static void put_num(double v)
{
	if (v >= 100000)
		printf(" %.0f |", v);
	else if (v >= 100)
		printf(" %.0f |", v);
	else if (v >= 10)
		printf(" %.1f |", v);
	else
		printf(" %.2f |", v);
}

static void put_cell(const result *r, int f)
{
	if (!r->ok)
		printf(" — |");
	else
		put_num(r->v[f]);
}

static void put_ratio(const result *a, const result *b, int f)
{
	if (!a->ok || !b->ok || b->v[f] == 0)
		printf(" — |");
	else
		printf(" %.2f |", a->v[f] / b->v[f]);
}

/* pbrpc | B | pbrpc/B | A | pbrpc/A | E | pbrpc/E | W | W/E | G | G/B | N | N/B */
static void put_cmp(result *const row[N_SYSTEMS], int f)
{
	put_cell(row[SYS_PBRPC], f);
	put_cell(row[SYS_RAWPB], f);
	put_ratio(row[SYS_PBRPC], row[SYS_RAWPB], f);
	put_cell(row[SYS_RAW], f);
	put_ratio(row[SYS_PBRPC], row[SYS_RAW], f);
	put_cell(row[SYS_EPOLL], f);
	put_ratio(row[SYS_PBRPC], row[SYS_EPOLL], f);
	put_cell(row[SYS_WIRE], f);
	put_ratio(row[SYS_WIRE], row[SYS_EPOLL], f);
	put_cell(row[SYS_GRPC], f);
	put_ratio(row[SYS_GRPC], row[SYS_RAWPB], f);
	put_cell(row[SYS_NNG], f);
	put_ratio(row[SYS_NNG], row[SYS_RAWPB], f);
	putchar('\n');
}

#define CMP_HEAD                                                                                            \
	"| pbrpc | B raw+pb | pbrpc/B | A raw | pbrpc/A | E epoll+pb | pbrpc/E | W wire | W/E | G gRPC | G/B " \
	"| N nng | N/B |\n"
#define CMP_RULE "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"

static void print_seq(void)
{
	static const struct {
		int f;
		const char *title;
	} metrics[] = {
		{ V_P50, "Latency p50, µs" },
		{ V_P99, "Latency p99, µs" },
		{ V_RATE, "Calls per second" },
		{ V_CPU, "CPU per call, µs (client + server, user + sys)" },
	};
	printf("### Sequential unary echo, one connection\n\n");
	for (size_t m = 0; m < sizeof(metrics) / sizeof(metrics[0]); m++) {
		printf("#### %s\n\n| transport | CPUs | payload " CMP_HEAD "|---|---|---:" CMP_RULE, metrics[m].title);
		for (int tr = 0; tr < 2; tr++)
			for (int o = 0; o < N_PL; o++)
				for (int z = 0; z < N_SIZES; z++) {
					int pin = pl_order[o];
					if (!cfg.transports[tr] || !cfg.pin_modes[pin] || !cfg.sizes[z])
						continue;
					result *row[N_SYSTEMS];
					for (int s = 0; s < N_SYSTEMS; s++)
						row[s] = &seq_res[s][tr][pin][z];
					printf("| %s | %s | %s |", transport_names[tr], pl_col[pin], size_name(all_sizes[z]));
					put_cmp(row, metrics[m].f);
				}
		printf("\n");
	}

	printf("#### Where the CPU goes: per call, client and server apart (µs), with page faults, context switches "
	       "and heap allocations\n\n"
	       "| transport | CPUs | payload | system | client CPU | server CPU | client faults | server faults | "
	       "client ctx sw | server ctx sw | client allocs | server allocs |\n"
	       "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
	for (int tr = 0; tr < 2; tr++)
		for (int o = 0; o < N_PL; o++)
			for (int z = 0; z < N_SIZES; z++)
				for (int s = 0; s < N_SYSTEMS; s++) {
					int pin = pl_order[o];
					const result *r = &seq_res[s][tr][pin][z];
					if (!cfg.transports[tr] || !cfg.pin_modes[pin] || !cfg.sizes[z] || !r->ok)
						continue;
					printf("| %s | %s | %s | %s |", transport_names[tr], pl_col[pin],
					       size_name(all_sizes[z]), all_systems[s]->name);
					static const int fs[] = { V_CCPU, V_SCPU, V_CFLT, V_SFLT, V_CCSW, V_SCSW, V_CALLOC, V_SALLOC };
					for (size_t i = 0; i < sizeof(fs) / sizeof(fs[0]); i++)
						put_num(r->v[fs[i]]);
					putchar('\n');
				}
	printf("\n");
}

static void print_conc(void)
{
	printf("### Concurrent connections, 32 B, one synchronous caller thread per connection (2 CPUs)\n\n"
	       "| transport | connections | metric " CMP_HEAD "|---|---:|---" CMP_RULE);
	for (int tr = 0; tr < 2; tr++)
		for (int k = 0; k < 2; k++) {
			if (!cfg.transports[tr])
				continue;
			result *row[N_SYSTEMS];
			for (int s = 0; s < N_SYSTEMS; s++)
				row[s] = &conc_res[s][tr][k];
			printf("| %s | %d | calls/s |", transport_names[tr], cfg.conc_counts[k]);
			put_cmp(row, V_RATE);
			printf("| %s | %d | CPU µs/call |", transport_names[tr], cfg.conc_counts[k]);
			put_cmp(row, V_CPU);
		}
	printf("\n");
	if (cfg.n_loops < 2 || (!cfg.systems[SYS_PBRPC] && !cfg.systems[SYS_WIRE]))
		return;
	/* pbrpc's server with each --loop-threads value, against B. */
	printf("### Concurrent connections: pbrpc's server loop threads, calls/s (ratio to B)\n\n"
	       "| transport | connections |");
	int cols = 0;
	for (int w = 0; w < 2; w++)
		for (int l = 0; cfg.systems[w ? SYS_WIRE : SYS_PBRPC] && l < cfg.n_loops; l++, cols++)
			printf(" %s, %u loop%s |", w ? "W" : "pbrpc", cfg.loops[l], cfg.loops[l] == 1 ? "" : "s");
	printf(" B raw+pb |\n|---|---:|");
	for (int l = 0; l <= cols; l++)
		printf("---:|");
	printf("\n");
	for (int tr = 0; tr < 2; tr++)
		for (int k = 0; k < 2; k++) {
			if (!cfg.transports[tr])
				continue;
			const result *b = &conc_res[SYS_RAWPB][tr][k];
			printf("| %s | %d |", transport_names[tr], cfg.conc_counts[k]);
			for (int c = 0; c < cols; c++) {
				int w = cfg.systems[SYS_PBRPC] ? c >= cfg.n_loops : 1, l = c % cfg.n_loops;
				const result *p = &conc_loops_res[w][l][tr][k];
				if (!p->ok)
					printf(" - |");
				else if (b->ok && cfg.systems[SYS_RAWPB])
					printf(" %.0f (%.2fx) |", p->v[V_RATE], p->v[V_RATE] / b->v[V_RATE]);
				else
					printf(" %.0f |", p->v[V_RATE]);
			}
			if (b->ok && cfg.systems[SYS_RAWPB])
				printf(" %.0f |\n", b->v[V_RATE]);
			else
				printf(" - |\n");
		}
	printf("\n");
}

static void print_pipe(void)
{
	printf("### Pipelined calls on one connection, 32 B (2 CPUs)\n\n"
	       "N requests sent, then N replies read, repeated. pbrpc: N async stub calls, then "
	       "`pbrpc_client_process()` until all closures ran; B and A: N writes, then N reads; W: N requests "
	       "gathered in one write; G: N calls on the async stub and one completion queue; N: N req contexts, "
	       "each sent through its aio, then N receives.\n\n"
	       "| transport | depth | metric " CMP_HEAD "|---|---:|---" CMP_RULE);
	for (int tr = 0; tr < 2; tr++)
		for (int k = 0; k < 3; k++) {
			if (!cfg.transports[tr])
				continue;
			result *row[N_SYSTEMS];
			for (int s = 0; s < N_SYSTEMS; s++)
				row[s] = &pipe_res[s][tr][k];
			printf("| %s | %d | calls/s |", transport_names[tr], cfg.depths[k]);
			put_cmp(row, V_RATE);
			printf("| %s | %d | CPU µs/call |", transport_names[tr], cfg.depths[k]);
			put_cmp(row, V_CPU);
			printf("| %s | %d | allocs/call c+s |", transport_names[tr], cfg.depths[k]);
			result sum[N_SYSTEMS];
			result *srow[N_SYSTEMS];
			for (int s = 0; s < N_SYSTEMS; s++) {
				sum[s] = *row[s];
				sum[s].v[V_CALLOC] += sum[s].v[V_SALLOC];
				srow[s] = &sum[s];
			}
			put_cmp(srow, V_CALLOC);
		}
	printf("\n");
}

static void print_idle(void)
{
	printf("### Memory: server RSS with %d idle connections\n\n"
	       "Each connection completes the pbrpc handshake (preface and HELLO both ways) and then sends "
	       "nothing. The baseline server accepts and holds the fds and nothing else, which is the floor "
	       "(kernel socket memory is not in RSS).\n\n"
	       "| transport | server | RSS before, MiB | RSS after, MiB | growth, MiB | per connection, bytes |\n"
	       "|---|---|---:|---:|---:|---:|\n",
	       cfg.idle_conns);
	for (int tr = 0; tr < 2; tr++)
		for (int s = 0; s < N_SYSTEMS; s++) {
			const result *r = &idle_res[s][tr];
			if (!cfg.transports[tr] || !r->ok)
				continue;
			double d = r->v[V_RSS1] - r->v[V_RSS0];
			printf("| %s | %s | %.1f | %.1f | %.1f | %.0f |\n", transport_names[tr],
			       s == SYS_PBRPC ? "pbrpc" : "baseline (accept and hold)", r->v[V_RSS0] / 1024,
			       r->v[V_RSS1] / 1024, d / 1024, d * 1024 / cfg.idle_conns);
		}
	printf("\n");
}

/* The headline: every system against B in one table, as time ratios (lower
 * is faster): p50 and CPU per call as X/B, throughput as B's calls/s over
 * X's. */
static void put_time_ratio(const result *x, const result *b, int f)
{
	if (!x->ok || !b->ok || x->v[f] == 0 || b->v[f] == 0)
		printf(" — |");
	else if (f == V_RATE)
		printf(" %.2f |", b->v[f] / x->v[f]);
	else
		printf(" %.2f |", x->v[f] / b->v[f]);
}

static const int peer_cols[] = { SYS_RAW, SYS_PBRPC, SYS_GRPC, SYS_NNG };
#define N_PEER_COLS 4

static void peer_row(const char *what, const char *metric, result *x[2][N_SYSTEMS], int f)
{
	printf("| %s | %s |", what, metric);
	for (int tr = 0; tr < 2; tr++)
		for (int i = 0; i < N_PEER_COLS; i++)
			put_time_ratio(x[tr][peer_cols[i]], x[tr][SYS_RAWPB], f);
	putchar('\n');
}

static void print_peers(void)
{
	if (!cfg.systems[SYS_RAWPB])
		return;
	printf("### All systems against B (raw+pb), same run\n\n"
	       "Each figure is a system's time over B's (lower is faster): p50 latency and CPU per call divided by "
	       "B's, and for throughput B's calls/s divided by the system's. A raw does less work than B (no "
	       "protobuf); pbrpc, gRPC and nng do B's work and more.\n\n"
	       "| workload | metric | unix: A raw | pbrpc | gRPC | nng | tcp: A raw | pbrpc | gRPC | nng |\n"
	       "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
	char what[96];
	result *x[2][N_SYSTEMS];
	static const char *const pl_what[N_PL] = { "default placement", "pinned", "split placement" };
	for (int o = 0; cfg.seq && o < N_PL; o++)
		for (int z = 0; z < N_SIZES; z++) {
			int pin = pl_order[o];
			if (!cfg.pin_modes[pin] || !cfg.sizes[z])
				continue;
			for (int tr = 0; tr < 2; tr++)
				for (int sy = 0; sy < N_SYSTEMS; sy++)
					x[tr][sy] = &seq_res[sy][tr][pin][z];
			snprintf(what, sizeof(what), "%s sequential, %s", size_name(all_sizes[z]), pl_what[pin]);
			peer_row(what, "p50", x, V_P50);
			peer_row(what, "CPU/call", x, V_CPU);
		}
	for (int m = 0; cfg.conc && m < 2; m++) {
		for (int tr = 0; tr < 2; tr++)
			for (int sy = 0; sy < N_SYSTEMS; sy++)
				x[tr][sy] = &conc_res[sy][tr][m];
		snprintf(what, sizeof(what), "%d connections × 32 B", cfg.conc_counts[m]);
		peer_row(what, "calls/s", x, V_RATE);
		peer_row(what, "CPU/call", x, V_CPU);
	}
	for (int d = 1; cfg.pipe && d < 3; d++) {
		for (int tr = 0; tr < 2; tr++)
			for (int sy = 0; sy < N_SYSTEMS; sy++)
				x[tr][sy] = &pipe_res[sy][tr][d];
		snprintf(what, sizeof(what), "%d calls pipelined, 32 B", cfg.depths[d]);
		peer_row(what, "calls/s", x, V_RATE);
		peer_row(what, "CPU/call", x, V_CPU);
	}
	printf("\n");
}

/* Rows whose figures were not measured in this run are left out. */
static void target_row(const char *what, const char *goal, double v, bool have, bool met)
{
	if (have)
		printf("| %s | %s | %.2f | %s |\n", what, goal, v, met ? "met" : "**missed**");
}

static void print_targets(void)
{
	printf("### Targets (issue 5), from this run\n\n| target | goal | measured | |\n|---|---|---:|---|\n");
	char what[128];
	for (int tr = 0; tr < 2; tr++) {
		if (!cfg.transports[tr])
			continue;
		const result *p = &seq_res[SYS_PBRPC][tr][1][0], *b = &seq_res[SYS_RAWPB][tr][1][0];
		bool have = p->ok && b->ok && cfg.pin_modes[1];
		snprintf(what, sizeof(what), "%s 32 B pinned p50, pbrpc/B", transport_names[tr]);
		double v = have ? p->v[V_P50] / b->v[V_P50] : 0;
		target_row(what, "≤ 1.1", v, have, v <= 1.1);
		snprintf(what, sizeof(what), "%s 32 B pinned CPU/call, pbrpc/B", transport_names[tr]);
		v = have ? p->v[V_CPU] / b->v[V_CPU] : 0;
		target_row(what, "≤ 1.1", v, have, v <= 1.1);
		p = &conc_res[SYS_PBRPC][tr][0];
		b = &conc_res[SYS_RAWPB][tr][0];
		have = p->ok && b->ok;
		snprintf(what, sizeof(what), "%s %d connections × 32 B calls/s, pbrpc/B", transport_names[tr],
			 cfg.conc_counts[0]);
		v = have ? p->v[V_RATE] / b->v[V_RATE] : 0;
		target_row(what, "≥ 0.8", v, have, v >= 0.8);
		for (int z = 2; z < 4; z++)
			for (int pin = 1; pin >= 0; pin--) {
				p = &seq_res[SYS_PBRPC][tr][pin][z];
				b = &seq_res[SYS_RAWPB][tr][pin][z];
				have = p->ok && b->ok;
				snprintf(what, sizeof(what), "%s %s %s p50, pbrpc/B", transport_names[tr],
					 size_name(all_sizes[z]), pin ? "pinned" : "2 CPUs");
				v = have ? p->v[V_P50] / b->v[V_P50] : 0;
				target_row(what, "≤ 1.2", v, have, v <= 1.2);
				snprintf(what, sizeof(what), "%s %s %s CPU/call, pbrpc/B", transport_names[tr],
					 size_name(all_sizes[z]), pin ? "pinned" : "2 CPUs");
				v = have ? p->v[V_CPU] / b->v[V_CPU] : 0;
				target_row(what, "≤ 1.2", v, have, v <= 1.2);
			}
		p = &seq_res[SYS_PBRPC][tr][1][0];
		snprintf(what, sizeof(what), "%s 32 B heap allocations per call, pbrpc client (sync)", transport_names[tr]);
		target_row(what, "0", p->v[V_CALLOC], p->ok, p->v[V_CALLOC] < 0.005);
		snprintf(what, sizeof(what), "%s 32 B heap allocations per call, pbrpc server", transport_names[tr]);
		target_row(what, "0", p->v[V_SALLOC], p->ok, p->v[V_SALLOC] < 0.005);
		p = &idle_res[SYS_PBRPC][tr];
		snprintf(what, sizeof(what), "%s server RSS growth, MiB, %d idle connections", transport_names[tr],
			 cfg.idle_conns);
		v = p->ok ? (p->v[V_RSS1] - p->v[V_RSS0]) / 1024 : 0;
		target_row(what, "< 64", v, p->ok, v < 64);
	}
	printf("\n");
}

/* ---- issue 11: bodies in sealed memfds, over Unix ----
 * raw+protobuf-c against pbrpc with every body through the socket
 * (threshold SIZE_MAX), with every body above 4 KiB in a memfd, and with the
 * library's default; pinned and split. The crossover is the smallest size
 * at which the memfd path costs less CPU per call (pinned) than the plain
 * one. */
static const size_t mf_sizes[] = { 16 * 1024, 64 * 1024, 128 * 1024, 256 * 1024, 512 * 1024, 1024 * 1024,
				   16 * 1024 * 1024 };
#define N_MF 7
enum { MF_RAWPB, MF_PLAIN, MF_MEMFD, MF_DEFAULT, N_MFV };
static const char *const mf_name[N_MFV] = { "raw+protobuf-c", "pbrpc, socket", "pbrpc, memfd", "pbrpc, default" };
static const char *const mf_env[N_MFV] = { NULL, "18446744073709551615", "4096", NULL };
static result mf_res[N_MFV][2][N_MF]; /* variant, pinned/split, size */

static void run_memfd(void (*progress_cb)(const char *))
{
	static const int pls[2] = { PL_PINNED, PL_SPLIT };
	result rs[7];
	char what[128];
	for (int p = 0; p < 2; p++) {
		if (!cfg.pin_modes[pls[p]])
			continue;
		for (int z = 0; z < N_MF; z++)
			for (int v = 0; v < N_MFV; v++) {
				if (mf_env[v])
					setenv("PBRPC_BENCH_MEMFD_THRESHOLD", mf_env[v], 1);
				else
					unsetenv("PBRPC_BENCH_MEMFD_THRESHOLD");
				for (int k = 0; k < cfg.rounds; k++) {
					snprintf(what, sizeof(what), "memfd %s %s %s", pl_key[pls[p]], size_name(mf_sizes[z]),
						 mf_name[v]);
					progress_cb(what);
					rs[k] = run_seq(v == MF_RAWPB ? &bench_rawpb : &bench_pbrpc, false, mf_sizes[z], pls[p]);
				}
				mf_res[v][p][z] = median(rs, cfg.rounds);
			}
	}
	unsetenv("PBRPC_BENCH_MEMFD_THRESHOLD");
}

static void print_memfd(void)
{
	static const char *const pl_what[2] = { "pinned", "split" };
	printf("### Bodies in sealed memfds (issue 11), unix\n\n"
	       "p50 in µs and CPU µs per call (both processes); the ratios are to raw+protobuf-c in the same run.\n\n"
	       "| payload | CPUs | raw+pb p50 | raw+pb CPU | socket p50 | socket CPU | memfd p50 | memfd CPU | default "
	       "p50 | default CPU | default/raw p50 | default/raw CPU |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
	for (int p = 0; p < 2; p++)
		for (int z = 0; z < N_MF; z++) {
			const result *b = &mf_res[MF_RAWPB][p][z], *d = &mf_res[MF_DEFAULT][p][z];
			if (!b->ok)
				continue;
			printf("| %s | %s |", size_name(mf_sizes[z]), pl_what[p]);
			for (int v = 0; v < N_MFV; v++) {
				put_cell(&mf_res[v][p][z], V_P50);
				put_cell(&mf_res[v][p][z], V_CPU);
			}
			put_ratio(d, b, V_P50);
			put_ratio(d, b, V_CPU);
			printf("\n");
		}
	int cross = -1;
	for (int z = 0; z < N_MF && cross < 0; z++) {
		const result *a = &mf_res[MF_PLAIN][0][z], *m = &mf_res[MF_MEMFD][0][z];
		if (a->ok && m->ok && m->v[V_CPU] < a->v[V_CPU])
			cross = z;
	}
	printf("\nCrossover (pinned, CPU per call, memfd below socket): %s.\n\n",
	       cross < 0 ? "none in the sizes measured" : size_name(mf_sizes[cross]));
	printf("| target (issue 11) | goal | measured | |\n|---|---|---:|---|\n");
	struct {
		const char *what;
		int p, z, f;
		double goal;
	} t[] = {
		{ "unix 1 MiB pinned CPU/call, pbrpc/raw+pb", 0, 5, V_CPU, 0.6 },
		{ "unix 1 MiB split p50, pbrpc/raw+pb", 1, 5, V_P50, 0.6 },
		{ "unix 16 MiB pinned CPU/call, pbrpc/raw+pb", 0, 6, V_CPU, 0.4 },
		{ "unix 16 MiB split p50, pbrpc/raw+pb", 1, 6, V_P50, 0.4 },
	};
	for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
		const result *d = &mf_res[MF_DEFAULT][t[i].p][t[i].z], *b = &mf_res[MF_RAWPB][t[i].p][t[i].z];
		bool have = d->ok && b->ok;
		double v = have ? d->v[t[i].f] / b->v[t[i].f] : 0;
		char goal[16];
		snprintf(goal, sizeof(goal), "≤ %.1f", t[i].goal);
		target_row(t[i].what, goal, v, have, v <= t[i].goal);
	}
	printf("\n");
}

/* ---- driver ---- */

static int n_runs_done, n_runs_total;

static void progress(const char *what)
{
	n_runs_done++;
	fprintf(stderr, "\r[%d/%d] %-60s", n_runs_done, n_runs_total, what);
	fflush(stderr);
}

/* Rounds for a sequential row: pinned 32 B (the 1.1x target) gets 2n+1, except
 * with --calls (profiling wants one run). */
static int key_rows(int pin, int z)
{
	return pin == PL_PINNED && z == 0 && !cfg.calls ? 2 * cfg.rounds + 1 : cfg.rounds;
}

static void run_all(void)
{
	int nsys = 0, ntr = 0, npin = 0, nsz = 0;
	for (int i = 0; i < N_SYSTEMS; i++)
		nsys += cfg.systems[i];
	for (int i = 0; i < 2; i++)
		ntr += cfg.transports[i];
	for (int i = 0; i < N_PL; i++)
		npin += cfg.pin_modes[i];
	for (int i = 0; i < N_SIZES; i++)
		nsz += cfg.sizes[i];
	n_runs_total = cfg.rounds * nsys * ntr *
		       ((cfg.seq ? npin * nsz : 0) + (cfg.conc ? 2 : 0) + (cfg.pipe ? 3 : 0)) + (cfg.idle ? ntr * 2 : 0);
	if (cfg.conc)
		n_runs_total += cfg.rounds * ntr * 2 * (cfg.n_loops - 1) *
				(cfg.systems[SYS_PBRPC] + cfg.systems[SYS_WIRE]); /* the other --loop-threads */
	if (cfg.seq && cfg.pin_modes[1] && cfg.sizes[0])
		n_runs_total += (key_rows(1, 0) - cfg.rounds) * nsys * ntr;
	if (cfg.memfd && cfg.transports[0])
		n_runs_total += cfg.rounds * N_MFV * N_MF * (cfg.pin_modes[PL_PINNED] + cfg.pin_modes[PL_SPLIT]);
	char what[128];
	result rs[N_SYSTEMS][16];

	/* Systems interleave within each round so that drift hits all alike. */
	for (int tr = 0; tr < 2; tr++) {
		if (!cfg.transports[tr])
			continue;
		for (int o = 0; cfg.seq && o < N_PL; o++) {
			int pin = pl_order[o];
			if (!cfg.pin_modes[pin])
				continue;
			for (int z = 0; z < N_SIZES; z++) {
				if (!cfg.sizes[z])
					continue;
				/* The 1.1x target rows get more rounds: a ratio that close
				 * needs them on a shared machine. */
				int rounds = key_rows(pin, z);
				for (int k = 0; k < rounds; k++)
					for (int s = 0; s < N_SYSTEMS; s++) {
						if (!cfg.systems[s])
							continue;
						snprintf(what, sizeof(what), "seq %s %s %s %s", transport_names[tr],
							 pl_key[pin], size_name(all_sizes[z]), all_systems[s]->key);
						progress(what);
						rs[s][k] = run_seq(all_systems[s], tr, all_sizes[z], pin);
					}
				for (int s = 0; s < N_SYSTEMS; s++)
					if (cfg.systems[s])
						seq_res[s][tr][pin][z] = median(rs[s], rounds);
			}
		}
		for (int m = 0; cfg.conc && m < 2; m++) {
			result rl[2][4][16];
			for (int k = 0; k < cfg.rounds; k++)
				for (int s = 0; s < N_SYSTEMS; s++) {
					if (!cfg.systems[s])
						continue;
					bool lv = s == SYS_PBRPC || s == SYS_WIRE; /* pbrpc's server */
					for (int l = 0; l < (lv ? cfg.n_loops : 1); l++) {
						bench_loop_threads = cfg.loops[l];
						int n = snprintf(what, sizeof(what), "conc %s %d %s", transport_names[tr],
								 cfg.conc_counts[m], all_systems[s]->key);
						if (lv && n > 0 && (size_t)n < sizeof(what))
							snprintf(what + n, sizeof(what) - (size_t)n, " loops %u", cfg.loops[l]);
						progress(what);
						result r = run_conc(all_systems[s], tr, cfg.conc_counts[m]);
						if (lv)
							rl[s == SYS_WIRE][l][k] = r;
						if (!l)
							rs[s][k] = r;
					}
					bench_loop_threads = cfg.loops[0];
				}
			for (int s = 0; s < N_SYSTEMS; s++)
				if (cfg.systems[s])
					conc_res[s][tr][m] = median(rs[s], cfg.rounds);
			for (int w = 0; w < 2; w++)
				for (int l = 0; cfg.systems[w ? SYS_WIRE : SYS_PBRPC] && l < cfg.n_loops; l++)
					conc_loops_res[w][l][tr][m] = median(rl[w][l], cfg.rounds);
		}
		for (int d = 0; cfg.pipe && d < 3; d++) {
			for (int k = 0; k < cfg.rounds; k++)
				for (int s = 0; s < N_SYSTEMS; s++) {
					if (!cfg.systems[s])
						continue;
					snprintf(what, sizeof(what), "pipe %s %d %s", transport_names[tr], cfg.depths[d],
						 all_systems[s]->key);
					progress(what);
					rs[s][k] = run_pipe(all_systems[s], tr, cfg.depths[d]);
				}
			for (int s = 0; s < N_SYSTEMS; s++)
				if (cfg.systems[s])
					pipe_res[s][tr][d] = median(rs[s], cfg.rounds);
		}
		if (cfg.idle) {
			/* The idle test needs only one pbrpc server and one baseline. */
			static const int idle_sys[2] = { SYS_PBRPC, SYS_RAW };
			for (int i = 0; i < 2; i++) {
				snprintf(what, sizeof(what), "idle %s %d %s", transport_names[tr], cfg.idle_conns,
					 all_systems[idle_sys[i]]->key);
				progress(what);
				idle_res[idle_sys[i]][tr] = run_idle(all_systems[idle_sys[i]], tr, cfg.idle_conns);
			}
		}
	}
	if (cfg.memfd && cfg.transports[0])
		run_memfd(progress);
	fprintf(stderr, "\n");
}

/* CPU seconds all processes spent busy (/proc/stat), to tell how much of the
 * machine other work took during the run. */
static double machine_busy_s(void)
{
	unsigned long long v[8] = { 0 };
	FILE *f = fopen("/proc/stat", "r");
	if (!f)
		return 0;
	int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
		       &v[6], &v[7]);
	fclose(f);
	if (n != 8)
		return 0;
	/* user nice system idle iowait irq softirq steal: all but idle, iowait */
	return (double)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / (double)sysconf(_SC_CLK_TCK);
}

static double own_cpu_s(void)
{
	struct rusage self, kids;
	getrusage(RUSAGE_SELF, &self);
	getrusage(RUSAGE_CHILDREN, &kids);
	return (double)(self.ru_utime.tv_sec + self.ru_stime.tv_sec + kids.ru_utime.tv_sec + kids.ru_stime.tv_sec) +
	       (double)(self.ru_utime.tv_usec + self.ru_stime.tv_usec + kids.ru_utime.tv_usec + kids.ru_stime.tv_usec) *
		       1e-6;
}

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: pbrpc-bench [OPTION]...\n"
		"Benchmark pbrpc against raw-socket baselines; markdown tables on stdout.\n\n"
		"  --only LIST        seq,conc,pipe,idle,memfd (default: all)\n"
		"  --systems LIST     pbrpc,rawpb,raw,epoll,wire,grpc,nng (default: all built in)\n"
		"  --transports LIST  unix,tcp (default: both)\n"
		"  --sizes LIST       32,1024,65536,1048576 (default: all)\n"
		"  --pin LIST         pinned,unpinned,split; both (pinned,unpinned) or all\n"
		"                     (default: all; split needs 2 CPUs)\n"
		"  --time SECONDS     measuring time per sequential row (default 0.25; concurrency 2x)\n"
		"  --rounds N         repetitions per row, median reported (default 3, max 7;\n"
		"                     pinned 32 B rows: 2N+1)\n"
		"  --calls N          sequential rows: exactly N measured calls, no timed warm-up (profiling)\n"
		"  --idle-conns N     connections in the memory test (default 10000)\n"
		"  --sockbuf BYTES    SO_SNDBUF/SO_RCVBUF for every socket (default 2097152; 0: kernel default)\n"
		"  --authz            pbrpc's server checks a uid policy on every call (its cost)\n"
		"  --loop-threads LIST\n"
		"                     pbrpc's server event loops (opts.loop_threads); the first\n"
		"                     everywhere, each one in conc for pbrpc and W (a table of\n"
		"                     its own); up to 4;\n"
		"                     auto = the online CPUs, at most 8 (default 1,auto: the\n"
		"                     library's default everywhere, pbrpc-server's in conc too)\n");
}

static bool in_list(const char *list, const char *word)
{
	size_t n = strlen(word);
	for (const char *p = list; *p;) {
		const char *e = strchr(p, ',');
		size_t l = e ? (size_t)(e - p) : strlen(p);
		if (l == n && strncmp(p, word, n) == 0)
			return true;
		p += l + (e ? 1 : 0);
	}
	return false;
}

/* --loop-threads auto, as pbrpc-server's: the online CPUs, at most 8. */
static unsigned auto_loops(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);
	return n < 1 ? 1u : n > 8 ? 8u : (unsigned)n;
}

static void parse_args(int argc, char **argv)
{
	enum { O_ONLY = 1, O_SYSTEMS, O_TRANSPORTS, O_SIZES, O_PIN, O_TIME, O_ROUNDS, O_CALLS, O_IDLE, O_SOCKBUF, O_AUTHZ, O_LOOPS, O_HELP };
	static const struct option opts[] = {
		{ "only", required_argument, NULL, O_ONLY },
		{ "systems", required_argument, NULL, O_SYSTEMS },
		{ "transports", required_argument, NULL, O_TRANSPORTS },
		{ "sizes", required_argument, NULL, O_SIZES },
		{ "pin", required_argument, NULL, O_PIN },
		{ "time", required_argument, NULL, O_TIME },
		{ "rounds", required_argument, NULL, O_ROUNDS },
		{ "calls", required_argument, NULL, O_CALLS },
		{ "idle-conns", required_argument, NULL, O_IDLE },
		{ "sockbuf", required_argument, NULL, O_SOCKBUF },
		{ "authz", no_argument, NULL, O_AUTHZ },
		{ "loop-threads", required_argument, NULL, O_LOOPS },
		{ "help", no_argument, NULL, O_HELP },
		{ NULL, 0, NULL, 0 },
	};
	bench_sockbuf = 2 * 1024 * 1024;
	/* The library's default (one loop) everywhere; in conc also the
	 * daemon's (auto), when that is more. */
	cfg.loops[0] = 1;
	cfg.n_loops = 1;
	if (auto_loops() > 1)
		cfg.loops[cfg.n_loops++] = auto_loops();
	int o;
	char num[32];
	while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (o) {
		case O_ONLY:
			cfg.seq = in_list(optarg, "seq");
			cfg.conc = in_list(optarg, "conc");
			cfg.pipe = in_list(optarg, "pipe");
			cfg.idle = in_list(optarg, "idle");
			cfg.memfd = in_list(optarg, "memfd");
			break;
		case O_SYSTEMS:
			for (int i = 0; i < N_SYSTEMS; i++)
				cfg.systems[i] = in_list(optarg, all_systems[i]->key);
			break;
		case O_TRANSPORTS:
			for (int i = 0; i < 2; i++)
				cfg.transports[i] = in_list(optarg, transport_names[i]);
			break;
		case O_SIZES:
			for (int i = 0; i < N_SIZES; i++) {
				snprintf(num, sizeof(num), "%zu", all_sizes[i]);
				cfg.sizes[i] = in_list(optarg, num);
			}
			break;
		case O_PIN:
			for (int i = 0; i < N_PL; i++)
				cfg.pin_modes[i] = strcmp(optarg, "all") == 0 ||
						   (strcmp(optarg, "both") == 0 && i != PL_SPLIT) || in_list(optarg, pl_key[i]);
			break;
		case O_TIME:
			cfg.secs = atof(optarg);
			break;
		case O_ROUNDS:
			cfg.rounds = atoi(optarg);
			if (cfg.rounds < 1 || cfg.rounds > 7) {
				usage(stderr);
				exit(2);
			}
			break;
		case O_CALLS:
			cfg.calls = atol(optarg);
			break;
		case O_IDLE:
			cfg.idle_conns = atoi(optarg);
			break;
		case O_SOCKBUF:
			bench_sockbuf = atoi(optarg);
			break;
		case O_AUTHZ:
			bench_authz = true;
			break;
		case O_LOOPS:
			cfg.n_loops = 0;
			for (const char *p = optarg; *p && cfg.n_loops < 4;) {
				const char *e = strchr(p, ',');
				size_t l = e ? (size_t)(e - p) : strlen(p);
				unsigned v = l == 4 && strncmp(p, "auto", 4) == 0 ? auto_loops() : (unsigned)atoi(p);
				if (v < 1 || v > 256) {
					usage(stderr);
					exit(2);
				}
				cfg.loops[cfg.n_loops++] = v;
				p += l + (e ? 1 : 0);
			}
			break;
		case O_HELP:
			usage(stdout);
			exit(0);
		default:
			usage(stderr);
			exit(2);
		}
	}
	if (optind < argc || cfg.secs <= 0) {
		usage(stderr);
		exit(2);
	}
}

int main(int argc, char **argv)
{
	if (argc == 6 && strcmp(argv[1], "--serve") == 0)
		return serve_main(argv);
	parse_args(argc, argv);
	bench_loop_threads = cfg.loops[0];
	signal(SIGPIPE, SIG_IGN);
	for (int i = 0; i < N_SYSTEMS; i++)
		if (cfg.systems[i] && all_systems[i]->unavailable) {
			fprintf(stderr, "pbrpc-bench: skipping %s: %s\n", all_systems[i]->key, all_systems[i]->unavailable);
			cfg.systems[i] = false;
		}

	/* 10,000 idle connections need that many descriptors on both sides. */
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
		rlim_t want = (rlim_t)cfg.idle_conns + 256;
		if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < want) {
			rl.rlim_max = want;
			if (setrlimit(RLIMIT_NOFILE, &(struct rlimit){ want, want }) < 0)
				getrlimit(RLIMIT_NOFILE, &rl);
		}
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
		getrlimit(RLIMIT_NOFILE, &rl);
		if (cfg.idle && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < (rlim_t)cfg.idle_conns + 64) {
			fprintf(stderr, "pbrpc-bench: RLIMIT_NOFILE is %lu; idle test uses %lu connections\n",
				(unsigned long)rl.rlim_cur, (unsigned long)rl.rlim_cur - 64);
			cfg.idle_conns = (int)rl.rlim_cur - 64;
		}
	}

	if (sched_getaffinity(0, sizeof(all_cpus), &all_cpus) < 0)
		bench_die("sched_getaffinity: %s", strerror(errno));
	cfg.pin_cpu = CPU_ISSET(1, &all_cpus) ? 1 : 0;
	if (cfg.pin_modes[PL_SPLIT] && split_client_cpu() == cfg.pin_cpu) {
		fprintf(stderr, "pbrpc-bench: one CPU: no split placement\n");
		cfg.pin_modes[PL_SPLIT] = false;
	}

	/* A memfd rather than an anonymous mapping, so that servers which exec
	 * (exec_server) can map it too. */
	shm_fd = memfd_create("pbrpc-bench", MFD_CLOEXEC);
	if (shm_fd < 0 || ftruncate(shm_fd, sizeof(*bench_shared)) < 0)
		bench_die("memfd: %s", strerror(errno));
	bench_shared = mmap(NULL, sizeof(*bench_shared), PROT_READ | PROT_WRITE, MAP_SHARED, shm_fd, 0);
	if (bench_shared == MAP_FAILED)
		bench_die("mmap: %s", strerror(errno));
	uint8_t *payload = malloc(BENCH_MAX_PAYLOAD);
	samples = malloc(MAX_SAMPLES * sizeof(*samples));
	if (!payload || !samples)
		bench_die("out of memory");
	for (size_t i = 0; i < BENCH_MAX_PAYLOAD; i++)
		payload[i] = (uint8_t)(i * 131 + 7);
	memset(samples, 0, MAX_SAMPLES * sizeof(*samples)); /* fault it in now, not while measuring */
	bench_payload = payload;

	double busy0 = machine_busy_s(), own0 = own_cpu_s(), t0 = now_s();
	run_all();
	double others = (machine_busy_s() - busy0) - (own_cpu_s() - own0);
	double others_pct = 100 * others / ((now_s() - t0) * CPU_COUNT(&all_cpus));

	if (bench_sockbuf > 0)
		printf("Socket buffers: SO_SNDBUF and SO_RCVBUF set to %d bytes", bench_sockbuf);
	else
		printf("Socket buffers: the kernel's defaults");
	printf(" on every socket of every system; TCP_NODELAY on every TCP socket. Each figure is the median of %d "
	       "runs (%d for the pinned 32 B rows)%s.%s\n\n",
	       cfg.rounds, key_rows(1, 0), cfg.calls ? " (fixed call count)" : "",
	       bench_counts_allocs ? "" : " **Sanitizer build: heap allocations were not counted.**");
	printf("Other processes took %.0f%% of the CPUs while this ran%s.\n\n", others_pct < 0 ? 0 : others_pct,
	       others_pct > 5 ? ": **the figures are skewed by that work**" : "");
	print_peers();
	if (cfg.seq)
		print_seq();
	if (cfg.conc)
		print_conc();
	if (cfg.pipe)
		print_pipe();
	if (cfg.idle)
		print_idle();
	print_targets();
	if (cfg.memfd && cfg.transports[0])
		print_memfd();
	return 0;
}
