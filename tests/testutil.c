#include "testutil.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "proto/frame.h"
#include "util/io.h"

__attribute__((noreturn, format(printf, 1, 2))) static void die(const char *fmt, ...)
{
	va_list ap;
	int err = errno;
	va_start(ap, fmt);
	fputs("testutil: ", stderr);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, ": %s\n", strerror(err));
	abort();
}

/* ---- socket pairs ---- */

void tu_socketpair(int fds[2])
{
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) < 0)
		die("socketpair");
}

static void connect_accept(int lfd, const struct sockaddr *addr, socklen_t len, int fds[2])
{
	if (listen(lfd, 1) < 0)
		die("listen");
	fds[0] = socket(addr->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fds[0] < 0)
		die("socket");
	/* A blocking connect to a listening socket on this host completes as soon
	 * as the kernel queues it; accept() then returns at once. */
	if (connect(fds[0], addr, len) < 0)
		die("connect");
	fds[1] = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	if (fds[1] < 0)
		die("accept4");
	close(lfd);
}

void tu_unix_pair(int fds[2])
{
	const char *tmp = getenv("TMPDIR");
	char dir[96];
	if (!tmp || strlen(tmp) > 60)
		tmp = "/tmp";
	snprintf(dir, sizeof(dir), "%s/pbrpc-test-XXXXXX", tmp);
	if (!mkdtemp(dir))
		die("mkdtemp %s", dir);

	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s/sock", dir);
	int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd < 0)
		die("socket");
	if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		die("bind %s", sa.sun_path);
	connect_accept(lfd, (struct sockaddr *)&sa, sizeof(sa), fds);
	unlink(sa.sun_path);
	rmdir(dir);
}

void tu_tcp_pair(int fds[2])
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = 0 };
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	socklen_t len = sizeof(sa);
	int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd < 0)
		die("socket");
	if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		die("bind 127.0.0.1:0");
	if (getsockname(lfd, (struct sockaddr *)&sa, &len) < 0)
		die("getsockname");
	connect_accept(lfd, (struct sockaddr *)&sa, len, fds);
	/* Without this, Nagle plus delayed ACKs turn tests made of small writes
	 * into 40 ms stalls. */
	int one = 1;
	for (int i = 0; i < 2; i++)
		if (setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
			die("TCP_NODELAY");
}

const tu_transport tu_transports[TU_TRANSPORT_COUNT] = {
	{ "socketpair", tu_socketpair },
	{ "unix-path", tu_unix_pair },
	{ "tcp-loopback", tu_tcp_pair },
};

void tu_set_nonblock(int fd, bool on)
{
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0)
		die("F_GETFL");
	fl = on ? fl | O_NONBLOCK : fl & ~O_NONBLOCK;
	if (fcntl(fd, F_SETFL, fl) < 0)
		die("F_SETFL");
}

void tu_small_buffers(int fd)
{
	int sz = 32 * 1024;
	if (setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz)) < 0 ||
	    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof(sz)) < 0)
		die("SO_SNDBUF/SO_RCVBUF");
}

/* ---- I/O shim ---- */

static tu_io_config io_cfg;
static struct {
	atomic_ulong recv_calls, send_calls, recv_faults, send_faults, send_bytes, recv_bytes;
	atomic_int send_flags_all, send_flags_any;
} io_st;
static bool short_io;

#define SHIM_IOV_MAX 64

/* Copies msg's iovecs into iov, cut so that they hold at most max bytes. */
static size_t cap_iov(struct iovec *iov, const struct msghdr *msg, size_t max)
{
	size_t n = 0, total = 0;
	if (msg->msg_iovlen > SHIM_IOV_MAX) {
		errno = E2BIG;
		die("shim: %zu iovecs", (size_t)msg->msg_iovlen);
	}
	for (size_t i = 0; i < msg->msg_iovlen; i++) {
		iov[n] = msg->msg_iov[i];
		if (max && total + iov[n].iov_len >= max) {
			iov[n].iov_len = max - total;
			return n + 1;
		}
		total += iov[n].iov_len;
		n++;
	}
	return n;
}

static bool fault_now(unsigned long call, int err, unsigned every)
{
	return err && (every <= 1 || call % every == 0);
}

static ssize_t shim_recvmsg(int fd, struct msghdr *msg, int flags)
{
	unsigned long call = atomic_fetch_add(&io_st.recv_calls, 1);
	if (fault_now(call, io_cfg.recv_errno, io_cfg.recv_every)) {
		atomic_fetch_add(&io_st.recv_faults, 1);
		errno = io_cfg.recv_errno;
		return -1;
	}
	struct iovec iov[SHIM_IOV_MAX];
	struct msghdr m = *msg;
	m.msg_iov = iov;
	m.msg_iovlen = cap_iov(iov, msg, io_cfg.recv_max);
	ssize_t n = recvmsg(fd, &m, flags);
	msg->msg_flags = m.msg_flags;
	msg->msg_controllen = m.msg_controllen;
	if (n > 0)
		atomic_fetch_add(&io_st.recv_bytes, (unsigned long)n);
	return n;
}

static _Thread_local unsigned long thread_sends;

unsigned long tu_io_thread_sends(void)
{
	return thread_sends;
}

void tu_io_counting(void)
{
	if (!short_io)
		tu_io_install(&(tu_io_config){ 0 });
}

static ssize_t shim_sendmsg(int fd, const struct msghdr *msg, int flags)
{
	thread_sends++;
	unsigned long call = atomic_fetch_add(&io_st.send_calls, 1);
	atomic_fetch_and(&io_st.send_flags_all, flags);
	atomic_fetch_or(&io_st.send_flags_any, flags);
	if (fault_now(call, io_cfg.send_errno, io_cfg.send_every)) {
		atomic_fetch_add(&io_st.send_faults, 1);
		errno = io_cfg.send_errno;
		return -1;
	}
	struct iovec iov[SHIM_IOV_MAX];
	struct msghdr m = *msg;
	m.msg_iov = iov;
	m.msg_iovlen = cap_iov(iov, msg, io_cfg.send_max);
	ssize_t n = sendmsg(fd, &m, flags);
	if (n > 0)
		atomic_fetch_add(&io_st.send_bytes, (unsigned long)n);
	return n;
}

static const pbrpc__io shim_io = { shim_recvmsg, shim_sendmsg };

void tu_io_install(const tu_io_config *cfg)
{
	io_cfg = *cfg;
	atomic_store(&io_st.recv_calls, 0);
	atomic_store(&io_st.send_calls, 0);
	atomic_store(&io_st.recv_faults, 0);
	atomic_store(&io_st.send_faults, 0);
	atomic_store(&io_st.send_bytes, 0);
	atomic_store(&io_st.recv_bytes, 0);
	atomic_store(&io_st.send_flags_all, ~0);
	atomic_store(&io_st.send_flags_any, 0);
	pbrpc__io_set(&shim_io);
}

void tu_io_default(void)
{
	if (short_io)
		tu_io_install(&(tu_io_config){ .recv_max = 1, .send_max = 143 });
	else
		pbrpc__io_set(NULL);
}

tu_io_stats tu_io_get_stats(void)
{
	return (tu_io_stats){
		.recv_calls = atomic_load(&io_st.recv_calls),
		.send_calls = atomic_load(&io_st.send_calls),
		.recv_faults = atomic_load(&io_st.recv_faults),
		.send_faults = atomic_load(&io_st.send_faults),
		.send_bytes = atomic_load(&io_st.send_bytes),
		.recv_bytes = atomic_load(&io_st.recv_bytes),
		.send_flags_all = atomic_load(&io_st.send_flags_all),
		.send_flags_any = atomic_load(&io_st.send_flags_any),
	};
}

void tu_setup(void)
{
	const char *m = getenv("PBRPC_TEST_IO");
	short_io = m && strcmp(m, "short") == 0;
	tu_io_default();
}

bool tu_short_io(void)
{
	return short_io;
}

unsigned tu_loop_threads(void)
{
	const char *e = getenv("PBRPC_TEST_LOOP_THREADS");
	return e ? (unsigned)strtoul(e, NULL, 10) : 0;
}

size_t tu_scale(size_t n)
{
	return short_io ? n / 32 : n;
}

/* ---- misc ---- */

uint64_t tu_seed(void)
{
	const char *s = getenv("PBRPC_TEST_SEED");
	if (s && *s)
		return strtoull(s, NULL, 0);
	return 0x9e3779b97f4a7c15u;
}

uint64_t tu_rand(tu_rng *r)
{
	uint64_t z = (r->s += 0x9e3779b97f4a7c15u);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
	return z ^ (z >> 31);
}

uint64_t tu_rand_range(tu_rng *r, uint64_t lo, uint64_t hi)
{
	if (hi <= lo)
		return lo;
	return lo + tu_rand(r) % (hi - lo + 1);
}

void tu_rand_bytes(tu_rng *r, void *buf, size_t len)
{
	uint8_t *p = buf;
	while (len >= 8) {
		uint64_t v = tu_rand(r);
		memcpy(p, &v, 8);
		p += 8;
		len -= 8;
	}
	if (len) {
		uint64_t v = tu_rand(r);
		memcpy(p, &v, len);
	}
}

int64_t tu_now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void tu_write_full(int fd, const void *buf, size_t len)
{
	const uint8_t *p = buf;
	while (len) {
		ssize_t n = write(fd, p, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			die("write");
		p += n;
		len -= (size_t)n;
	}
}

size_t tu_read_full(int fd, void *buf, size_t len)
{
	uint8_t *p = buf;
	size_t got = 0;
	while (got < len) {
		ssize_t n = read(fd, p + got, len - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die("read");
		if (n == 0)
			break;
		got += (size_t)n;
	}
	return got;
}
