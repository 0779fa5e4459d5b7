/* Small helpers shared by pbrpc's test files: connected socket pairs over each
 * transport, a configurable I/O shim for the frame layer, a seeded PRNG.
 *
 * Helpers abort() with a message on setup failures (socket(), bind(), ...):
 * those are broken test environments, not outcomes under test.
 */
#ifndef PBRPC_TESTUTIL_H
#define PBRPC_TESTUTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- socket pairs --------------------------------------------------------
 * Each fills fds[0] and fds[1] with the two ends of a connected, blocking,
 * close-on-exec stream socket. The caller closes both. */
void tu_socketpair(int fds[2]);
/* AF_UNIX through a path in a fresh temporary directory; the path and the
 * directory are removed before returning, the listener is closed. */
void tu_unix_pair(int fds[2]);
/* TCP over 127.0.0.1 on a kernel-chosen port, TCP_NODELAY on both ends. */
void tu_tcp_pair(int fds[2]);

typedef struct tu_transport {
	const char *name;
	void (*pair)(int fds[2]);
} tu_transport;

#define TU_TRANSPORT_COUNT 3
extern const tu_transport tu_transports[TU_TRANSPORT_COUNT];

void tu_set_nonblock(int fd, bool on);
/* Shrinks the socket's send and receive buffers so that backpressure shows up
 * after a few hundred KiB instead of several MiB. */
void tu_small_buffers(int fd);

/* ---- I/O shim for pbrpc__io_set() -----------------------------------
 * Wraps the real recvmsg/sendmsg. Per direction: cap the bytes moved by one
 * call, and fail every `every`-th call (call index i with i % every == 0, so
 * the very first call fails) with `fault_errno` before touching the socket.
 * Statistics are atomic: a reader and a writer thread may share the shim. */
typedef struct tu_io_config {
	size_t recv_max, send_max; /* 0: no cap */
	int recv_errno, send_errno; /* EINTR, EAGAIN, ...; 0: no faults */
	unsigned recv_every, send_every; /* 0 or 1: every call faults (if errno set) */
} tu_io_config;

typedef struct tu_io_stats {
	unsigned long recv_calls, send_calls; /* including faulted ones */
	unsigned long recv_faults, send_faults;
	unsigned long send_bytes, recv_bytes;
	int send_flags_all; /* AND of all flags passed to sendmsg */
	int send_flags_any; /* OR of all flags passed to sendmsg */
} tu_io_stats;

/* Installs the shim with `cfg` and zeroes the statistics. */
void tu_io_install(const tu_io_config *cfg);
/* Restores the suite's default: the real calls, or the short-I/O shim when
 * PBRPC_TEST_IO=short (see tu_setup). */
void tu_io_default(void);
tu_io_stats tu_io_get_stats(void);
/* Puts the shim in (without caps or faults unless PBRPC_TEST_IO=short), so
 * that tu_io_thread_sends() counts; tu_io_default() takes it out again. */
void tu_io_counting(void);
/* sendmsg calls this thread made through the shim, ever. */
unsigned long tu_io_thread_sends(void);

/* Per-test setup (Criterion .init): when the environment says
 * PBRPC_TEST_IO=short, every test runs over 1-byte reads and sends of at most
 * 143 bytes, and must produce the same results. */
void tu_setup(void);
/* True in that mode; big-volume tests scale down with tu_scale(). */
bool tu_short_io(void);
/* PBRPC_TEST_LOOP_THREADS=N (the server, reliability, stream and authz
 * suites' -loops runs): their servers get opts.loop_threads = N and run
 * with pbrpc_server_run. 0 when unset. */
unsigned tu_loop_threads(void);
size_t tu_scale(size_t n);

/* ---- misc ---- */

/* splitmix64: small, fast, and the same on every platform. */
typedef struct tu_rng {
	uint64_t s;
} tu_rng;

/* The suite's seed: PBRPC_TEST_SEED from the environment (decimal or 0x hex),
 * or a fixed default. Tests print it in their failure messages. */
uint64_t tu_seed(void);
uint64_t tu_rand(tu_rng *r);
/* Uniform in [lo, hi]. */
uint64_t tu_rand_range(tu_rng *r, uint64_t lo, uint64_t hi);
void tu_rand_bytes(tu_rng *r, void *buf, size_t len);

/* Monotonic milliseconds. */
int64_t tu_now_ms(void);

/* write()/read() exactly len bytes on a blocking fd (not through the shim);
 * abort on error. tu_read_full returns the bytes read, short only at EOF. */
void tu_write_full(int fd, const void *buf, size_t len);
size_t tu_read_full(int fd, void *buf, size_t len);

#endif
