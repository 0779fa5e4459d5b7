/* The I/O shim: every socket read and write of pbrpc goes through these two
 * functions, so that tests can inject EINTR, EAGAIN and 1-byte I/O. The
 * default is the C library's. Set it before starting any I/O; process-wide.
 * Not public API: tests and fuzzers link the internal library. */
#ifndef PBRPC_UTIL_IO_H
#define PBRPC_UTIL_IO_H

#include <stdbool.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "util/clock.h"

typedef struct pbrpc__io {
	ssize_t (*recvmsg)(int fd, struct msghdr *msg, int flags);
	ssize_t (*sendmsg)(int fd, const struct msghdr *msg, int flags);
} pbrpc__io;

/* NULL restores the default. */
void pbrpc__io_set(const pbrpc__io *io);

/* sendmsg adds MSG_NOSIGNAL, so a vanished peer is -EPIPE, never SIGPIPE. */
ssize_t pbrpc__recvmsg(int fd, struct msghdr *msg, int flags);
ssize_t pbrpc__sendmsg(int fd, const struct msghdr *msg, int flags);

/* One read of up to cap bytes into buf, EINTR retried. Returns the bytes
 * read (> 0), 0 when it would block, PBRPC_EOF at end of stream, or -errno. */
ssize_t pbrpc__io_recv(int fd, void *buf, size_t cap, int flags);

/* File descriptors that arrived with one read (SCM_RIGHTS), received with
 * MSG_CMSG_CLOEXEC. The reader owns them. PBRPC__IO_FDS_MAX is the kernel's
 * SCM_MAX_FD: no sender can pass more with one sendmsg. */
#define PBRPC__IO_FDS_MAX 253
typedef struct pbrpc__io_fds {
	unsigned n;
	bool truncated; /* MSG_CTRUNC: the kernel dropped some (they are closed) */
	int fds[PBRPC__IO_FDS_MAX];
} pbrpc__io_fds;

/* pbrpc__io_recv with room for ancillary data: the fds that came with the
 * bytes go to rx (rx->n is set in every case, 0 on errors). */
ssize_t pbrpc__io_recv_fds(int fd, void *buf, size_t cap, int flags, pbrpc__io_fds *rx);

/* Closes n fds (skipping negative ones), keeping errno. */
void pbrpc__io_close_fds(const int *fds, size_t n);

/* Waits until fd has `events` (poll's) or `deadline` (0: none) passes.
 * Returns 0 when ready, -ETIMEDOUT once the deadline has passed (checked
 * before each wait, which is shortened after an EINTR), or -errno. */
int pbrpc__io_wait(int fd, short events, pbrpc__deadline deadline);

#endif
