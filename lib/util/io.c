#include "util/io.h"
#include "util/clock.h"

#include <errno.h>
#include <poll.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

#include "pbrpc/error.h"

/* One buffer and no ancillary data (every call but fd passing) goes through
 * send()/recv(): the same bytes without the kernel copying in and checking a
 * msghdr and an iovec, which costs about 0.2 us per call (docs/BENCHMARKS.md). */
static ssize_t libc_sendmsg(int fd, const struct msghdr *msg, int flags)
{
	if (msg->msg_iovlen == 1 && !msg->msg_controllen && !msg->msg_namelen)
		return send(fd, msg->msg_iov[0].iov_base, msg->msg_iov[0].iov_len, flags);
	return sendmsg(fd, msg, flags);
}

static ssize_t libc_recvmsg(int fd, struct msghdr *msg, int flags)
{
	if (msg->msg_iovlen == 1 && !msg->msg_controllen && !msg->msg_namelen) {
		msg->msg_flags = 0;
		return recv(fd, msg->msg_iov[0].iov_base, msg->msg_iov[0].iov_len, flags & ~MSG_CMSG_CLOEXEC);
	}
	return recvmsg(fd, msg, flags);
}

static const pbrpc__io libc_io = { libc_recvmsg, libc_sendmsg };
static _Atomic(const pbrpc__io *) cur_io = &libc_io;

void pbrpc__io_set(const pbrpc__io *io)
{
	atomic_store(&cur_io, io ? io : &libc_io);
}

ssize_t pbrpc__recvmsg(int fd, struct msghdr *msg, int flags)
{
	return atomic_load_explicit(&cur_io, memory_order_relaxed)->recvmsg(fd, msg, flags);
}

ssize_t pbrpc__sendmsg(int fd, const struct msghdr *msg, int flags)
{
	return atomic_load_explicit(&cur_io, memory_order_relaxed)->sendmsg(fd, msg, flags | MSG_NOSIGNAL);
}

ssize_t pbrpc__io_recv(int fd, void *buf, size_t cap, int flags)
{
	struct iovec iov = { buf, cap };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
	ssize_t n;
	do
		n = pbrpc__recvmsg(fd, &msg, flags | MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -errno;
	return n == 0 ? PBRPC_EOF : n;
}

ssize_t pbrpc__io_recv_fds(int fd, void *buf, size_t cap, int flags, pbrpc__io_fds *rx)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int) * PBRPC__IO_FDS_MAX)];
	} ctl;
	struct iovec iov = { buf, cap };
	struct msghdr msg;
	ssize_t n;
	rx->n = 0;
	rx->truncated = false;
	do {
		memset(&msg, 0, sizeof(msg));
		msg.msg_iov = &iov;
		msg.msg_iovlen = 1;
		msg.msg_control = ctl.buf;
		msg.msg_controllen = sizeof(ctl.buf);
		n = pbrpc__recvmsg(fd, &msg, flags | MSG_CMSG_CLOEXEC);
	} while (n < 0 && errno == EINTR);
	if (n < 0)
		return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -errno;
	for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
		if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
			continue;
		size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		const unsigned char *d = CMSG_DATA(cm);
		for (size_t i = 0; i < k; i++) {
			int v;
			memcpy(&v, d + i * sizeof(int), sizeof(int));
			if (rx->n < PBRPC__IO_FDS_MAX)
				rx->fds[rx->n++] = v;
			else
				close(v);
		}
	}
	if (msg.msg_flags & MSG_CTRUNC)
		rx->truncated = true;
	return n == 0 ? PBRPC_EOF : n;
}

void pbrpc__io_close_fds(const int *fds, size_t n)
{
	int e = errno;
	for (size_t i = 0; i < n; i++)
		if (fds[i] >= 0)
			close(fds[i]);
	errno = e;
}

/* util/clock.h's test-only clock skew. It lives here, not in a clock.c of its
 * own, because every program that compiles lib/ sources into itself (the
 * fuzzers, the benchmark's private codecs) compiles io.c. */
_Atomic int64_t pbrpc__clock_skew = 0;

int pbrpc__io_wait(int fd, short events, pbrpc__deadline deadline)
{
	struct pollfd p = { .fd = fd, .events = events };
	for (;;) {
		int ms = pbrpc__ms_until(deadline);
		if (ms == 0)
			return -ETIMEDOUT;
		int r = poll(&p, 1, ms);
		if (r > 0)
			return 0;
		if (r == 0)
			return -ETIMEDOUT;
		if (errno != EINTR)
			return -errno;
	}
}
