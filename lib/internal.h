/* Helpers shared by libpbrpc's layers. Not installed; nothing here is API. */
#ifndef PBRPC_INTERNAL_H
#define PBRPC_INTERNAL_H

#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>

static inline void pbrpc__put_u16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static inline void pbrpc__put_u32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

static inline void pbrpc__put_u64(uint8_t *p, uint64_t v)
{
	pbrpc__put_u32(p, (uint32_t)(v >> 32));
	pbrpc__put_u32(p + 4, (uint32_t)v);
}

static inline uint16_t pbrpc__get_u16(const uint8_t *p)
{
	return (uint16_t)((p[0] << 8) | p[1]);
}

static inline uint32_t pbrpc__get_u32(const uint8_t *p)
{
	return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t pbrpc__get_u64(const uint8_t *p)
{
	return ((uint64_t)pbrpc__get_u32(p) << 32) | pbrpc__get_u32(p + 4);
}

/* Monotonic clock in nanoseconds. */
static inline int64_t pbrpc__now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Sets *ts to now + ms on CLOCK_MONOTONIC (ms < 0: leaves it zero). */
static inline void pbrpc__deadline_in(struct timespec *ts, int ms)
{
	ts->tv_sec = 0;
	ts->tv_nsec = 0;
	if (ms < 0)
		return;
	clock_gettime(CLOCK_MONOTONIC, ts);
	ts->tv_sec += ms / 1000;
	ts->tv_nsec += (long)(ms % 1000) * 1000000;
	if (ts->tv_nsec >= 1000000000) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000;
	}
}

/* Milliseconds (rounded up) from now until *ts; <= 0 once it has passed. */
static inline int64_t pbrpc__ms_until(const struct timespec *ts)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	int64_t ns = (int64_t)(ts->tv_sec - now.tv_sec) * 1000000000 + (ts->tv_nsec - now.tv_nsec);
	if (ns <= 0)
		return 0;
	return (ns + 999999) / 1000000;
}

/* All socket I/O goes through these (see pbrpc_frame_io_set). sendmsg adds
 * MSG_NOSIGNAL so a vanished peer is -EPIPE, never SIGPIPE. */
ssize_t pbrpc__recvmsg(int fd, struct msghdr *msg, int flags);
ssize_t pbrpc__sendmsg(int fd, const struct msghdr *msg, int flags);

#endif
