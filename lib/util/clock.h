/* The one deadline type: int64_t nanoseconds on CLOCK_MONOTONIC, 0 meaning
 * "none". Every timeout in pbrpc is converted to this once, at the API edge. */
#ifndef PBRPC_UTIL_CLOCK_H
#define PBRPC_UTIL_CLOCK_H

#include <limits.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#define PBRPC__NS_PER_MS 1000000LL
#define PBRPC__NS_PER_S 1000000000LL

typedef int64_t pbrpc__deadline;

/* Test-only: nanoseconds added to every pbrpc__now_ns() reading, so that a
 * fuzzer or test can make deadlines and timeouts fire without sleeping. Set
 * only between calls into pbrpc, while no thread sleeps on an absolute
 * deadline (pthread_cond_timedwait sees the real clock). Always 0 in
 * production. Defined in util/io.c, which every program that compiles lib/
 * sources links. */
extern _Atomic int64_t pbrpc__clock_skew;

static inline int64_t pbrpc__now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	/* one relaxed load: no fence, no extra cache traffic on the hot path */
	return (int64_t)ts.tv_sec * PBRPC__NS_PER_S + ts.tv_nsec +
	       atomic_load_explicit(&pbrpc__clock_skew, memory_order_relaxed);
}

/* now + ms; ms < 0 means no deadline (0). */
static inline pbrpc__deadline pbrpc__deadline_in(int64_t now, int ms)
{
	return ms < 0 ? 0 : now + (int64_t)ms * PBRPC__NS_PER_MS;
}

/* Milliseconds (rounded up) until d for poll() and friends: -1 for no
 * deadline, 0 once it has passed, at most INT_MAX. */
static inline int pbrpc__ms_until(pbrpc__deadline d)
{
	if (!d)
		return -1;
	int64_t ns = d - pbrpc__now_ns();
	if (ns <= 0)
		return 0;
	int64_t ms = (ns + PBRPC__NS_PER_MS - 1) / PBRPC__NS_PER_MS;
	return ms > INT_MAX ? INT_MAX : (int)ms;
}

/* The earlier of two deadlines, either of which may be 0 (none). */
static inline pbrpc__deadline pbrpc__deadline_min(pbrpc__deadline a, pbrpc__deadline b)
{
	if (!a)
		return b;
	if (!b)
		return a;
	return a < b ? a : b;
}

static inline struct timespec pbrpc__deadline_timespec(pbrpc__deadline d)
{
	struct timespec ts = { .tv_sec = (time_t)(d / PBRPC__NS_PER_S), .tv_nsec = (long)(d % PBRPC__NS_PER_S) };
	return ts;
}

#endif
