/* Interposers linked into pbrpc-bench.
 *
 * Heap counting: malloc and friends defined here replace the C library's for
 * the whole process (libpbrpc and libprotobuf-c included: the executable's
 * definitions win symbol resolution) and forward to glibc's __libc_* entry
 * points. Counters are sharded over cache lines so that 256 client threads do
 * not serialise on one atomic.
 *
 * Socket buffers: libpbrpc has no option for SO_SNDBUF/SO_RCVBUF, so when
 * bench_hook_sockets is set, connect(), accept4() and accept() apply
 * bench_sockbuf to the sockets the library creates, the same sizes the
 * baselines set themselves. The peers (gRPC, nng) get theirs the same way.
 */
#include <errno.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "bench.h"

/* Sanitizers bring their own allocator: leave malloc alone under them. */
#if defined(__SANITIZE_ADDRESS__)
#define BENCH_NO_MALLOC_HOOK 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(memory_sanitizer) || __has_feature(thread_sanitizer)
#define BENCH_NO_MALLOC_HOOK 1
#endif
#endif

#ifdef BENCH_NO_MALLOC_HOOK
const bool bench_counts_allocs = false;

uint64_t bench_allocs(void)
{
	return 0;
}

uint64_t bench_frees(void)
{
	return 0;
}
#else
const bool bench_counts_allocs = true;

extern void *__libc_malloc(size_t size);
extern void *__libc_calloc(size_t n, size_t size);
extern void *__libc_realloc(void *p, size_t size);
extern void *__libc_memalign(size_t align, size_t size);
extern void __libc_free(void *p);

#define SHARDS 64

struct shard {
	_Atomic uint64_t allocs;
	_Atomic uint64_t frees;
	char pad[64 - 2 * sizeof(uint64_t)];
};

static struct shard shards[SHARDS] __attribute__((aligned(64)));
static _Atomic unsigned next_shard;
static _Thread_local int my_shard = -1;

static struct shard *shard(void)
{
	if (my_shard < 0)
		my_shard = (int)(atomic_fetch_add_explicit(&next_shard, 1, memory_order_relaxed) % SHARDS);
	return &shards[my_shard];
}

static void count_alloc(void)
{
	atomic_fetch_add_explicit(&shard()->allocs, 1, memory_order_relaxed);
}

uint64_t bench_allocs(void)
{
	uint64_t n = 0;
	for (int i = 0; i < SHARDS; i++)
		n += atomic_load_explicit(&shards[i].allocs, memory_order_relaxed);
	return n;
}

uint64_t bench_frees(void)
{
	uint64_t n = 0;
	for (int i = 0; i < SHARDS; i++)
		n += atomic_load_explicit(&shards[i].frees, memory_order_relaxed);
	return n;
}

void *malloc(size_t size)
{
	count_alloc();
	return __libc_malloc(size);
}

void *calloc(size_t n, size_t size)
{
	count_alloc();
	return __libc_calloc(n, size);
}

void *realloc(void *p, size_t size)
{
	count_alloc();
	return __libc_realloc(p, size);
}

void free(void *p)
{
	if (p)
		atomic_fetch_add_explicit(&shard()->frees, 1, memory_order_relaxed);
	__libc_free(p);
}

void *memalign(size_t align, size_t size)
{
	count_alloc();
	return __libc_memalign(align, size);
}

void *aligned_alloc(size_t align, size_t size)
{
	count_alloc();
	return __libc_memalign(align, size);
}

int posix_memalign(void **out, size_t align, size_t size)
{
	if (align < sizeof(void *) || (align & (align - 1)))
		return EINVAL;
	count_alloc();
	void *p = __libc_memalign(align, size);
	if (!p)
		return ENOMEM;
	*out = p;
	return 0;
}

void *valloc(size_t size)
{
	count_alloc();
	return __libc_memalign((size_t)sysconf(_SC_PAGESIZE), size);
}
#endif /* BENCH_NO_MALLOC_HOOK */

/* ---- sockets ---- */

int bench_sockbuf;
bool bench_hook_sockets;

void bench_tune_socket(int fd, bool tcp)
{
	if (bench_sockbuf > 0) {
		setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bench_sockbuf, sizeof(bench_sockbuf));
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bench_sockbuf, sizeof(bench_sockbuf));
	}
	if (tcp) {
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	}
}

static void hook_tune(int fd)
{
	int domain = 0, type = 0;
	socklen_t l = sizeof(domain);
	if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &l) < 0)
		return;
	l = sizeof(type);
	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &l) < 0 || type != SOCK_STREAM)
		return;
	if (domain == AF_UNIX || domain == AF_INET || domain == AF_INET6)
		bench_tune_socket(fd, domain != AF_UNIX);
}

/* glibc declares these with transparent unions when _GNU_SOURCE is set. */
#if defined(__USE_GNU) && defined(__GNUC__)
#define SA_PTR(a) ((a).__sockaddr__)
#else
#define SA_PTR(a) (a)
#endif

int connect(int fd, __CONST_SOCKADDR_ARG addr, socklen_t len)
{
	if (bench_hook_sockets)
		hook_tune(fd); /* before the handshake, so TCP can scale its window */
	return (int)syscall(SYS_connect, fd, SA_PTR(addr), len);
}

int accept4(int fd, __SOCKADDR_ARG addr, socklen_t *restrict len, int flags)
{
	int r = (int)syscall(SYS_accept4, fd, SA_PTR(addr), len, flags);
	if (r >= 0 && bench_hook_sockets)
		hook_tune(r);
	return r;
}

/* nng accepts with accept(), not accept4(). */
int accept(int fd, __SOCKADDR_ARG addr, socklen_t *restrict len)
{
	return accept4(fd, addr, len, 0);
}
