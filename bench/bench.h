/* pbrpc-bench: pbrpc against raw-socket baselines, side by side.
 *
 * One program, two processes per measurement: the client side runs in the
 * invoking process, the server side in a child forked for that measurement, so
 * that the CPU time and heap allocations of each side can be counted apart.
 * The child publishes snapshots of its own counters through a shared page
 * (struct bench_shm) when the client asks for one; see snap_* in main.c.
 */
#ifndef PBRPC_BENCH_H
#define PBRPC_BENCH_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "pbrpc/endpoint.h"

#define BENCH_MAX_PAYLOAD (16u << 20) /* the memfd rows go up to 16 MiB */

/* ---- hooks.c: counting allocator and socket tuning ---- */

/* Calls to malloc/calloc/realloc/memalign-family and to free (non-NULL) made
 * by this process since it started (children inherit the counts at fork). */
uint64_t bench_allocs(void);
uint64_t bench_frees(void);
/* False in sanitizer builds, where the counts above are always 0. */
extern const bool bench_counts_allocs;

/* Socket buffer size applied to benchmark sockets (SO_SNDBUF and SO_RCVBUF);
 * 0 leaves the kernel's defaults. */
extern int bench_sockbuf;
/* When set, every connect() and accept4() made in this process (including the
 * ones libpbrpc makes) applies bench_sockbuf first: the library has no option
 * for socket buffer sizes. */
extern bool bench_hook_sockets;

/* --authz: pbrpc's server admits demo.Echo/Echo by a uid policy (our own
 * uid), to measure the cost of the check (issue 11). */
extern bool bench_authz;
/* pbrpc's server: opts.loop_threads for the rows served by pbrpc_server_run
 * (--loop-threads; the idle test's server always has one loop). */
extern unsigned bench_loop_threads;

/* Applies bench_sockbuf to fd; with tcp also TCP_NODELAY. */
void bench_tune_socket(int fd, bool tcp);

/* ---- main.c: what a server child shares with the client ---- */

typedef struct bench_usage {
	double user_s, sys_s; /* getrusage(RUSAGE_SELF) */
	uint64_t allocs, frees;
	uint64_t minflt, nvcsw, nivcsw;
} bench_usage;

typedef struct bench_shm {
	_Atomic uint32_t snap_req; /* client bumps it to ask for a snapshot */
	_Atomic uint32_t snap_ack; /* server sets it to snap_req when done */
	bench_usage snap;
	_Atomic uint64_t conns;    /* idle test: connections the server holds */
	_Atomic int ready;
} bench_shm;

extern bench_shm *bench_shared;

void bench_usage_now(bench_usage *u);

/* Called by every server on each request it handles: cheap unless the client
 * asked for a snapshot, which it then takes (thread-safe). */
void bench_server_tick(void);

/* ---- one system under test ---- */

typedef struct bench_target {
	pbrpc_endpoint ep;
	char endpoint[PBRPC_ENDPOINT_STRLEN];
	bool tcp;
} bench_target;

typedef struct bench_system {
	const char *key;  /* command-line name */
	const char *name; /* table heading */
	/* Runs the server on listening socket lfd, in the child; never returns. */
	void (*serve)(int lfd, const bench_target *t);
	/* Serves the idle-connection test (accept and hold); never returns.
	 * NULL: use serve. */
	void (*serve_idle)(int lfd, const bench_target *t);
	/* Client side. open returns NULL on failure (and says why on stderr). */
	void *(*open)(const bench_target *t);
	/* One synchronous echo of `size` payload bytes; 0 or -1. */
	int (*call)(void *conn, size_t size);
	/* n calls pipelined on the connection: n requests sent, then n replies
	 * read. 0 or -1. */
	int (*batch)(void *conn, size_t size, int n);
	/* A connection that only completes its handshake (idle test). Returns
	 * an fd-owning handle or NULL. */
	void *(*open_idle)(const bench_target *t);
	void (*close)(void *conn);
	void (*close_idle)(void *conn);
	/* Peers whose libraries keep process-wide state and threads (gRPC, nng)
	 * cannot be forked from a process that has used them: their server runs
	 * in a fresh image (the child execs `pbrpc-bench --serve KEY ...`), gets
	 * lfd -1 and binds t's address itself, and sets bench_shared->ready once
	 * it accepts. Their clients wait for that (bench_wait_ready). */
	bool exec_server;
	/* Non-NULL: not built into this pbrpc-bench; says why (the bench skips
	 * the system with that message). */
	const char *unavailable;
} bench_system;

extern const bench_system bench_raw;    /* baseline A */
extern const bench_system bench_rawpb;  /* baseline B */
extern const bench_system bench_epoll;  /* B's client, one-thread epoll server */
extern const bench_system bench_pbrpc;  /* pbrpc client + pbrpc server */
extern const bench_system bench_wire;   /* minimal frame/wire client + pbrpc server */
extern const bench_system bench_grpc;   /* peer: gRPC C++ (grpc.cc, grpc_sys.c) */
extern const bench_system bench_nng;    /* peer: nng req/rep + protobuf-c (nng.c) */

/* Waits until the server of this measurement says it accepts connections
 * (bench_shared->ready); dies after 10 s. */
void bench_wait_ready(void);

/* The payload every request carries (BENCH_MAX_PAYLOAD bytes of a pattern). */
extern const uint8_t *bench_payload;

/* Fails the benchmark with a message (client or server side). */
void bench_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* Blocking helpers for the baselines: whole writes and reads, EINTR retried.
 * Return 0, or -1 on error or end of stream. */
int bench_write_all(int fd, const void *p, size_t n);

#endif
