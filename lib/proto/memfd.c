#include "proto/memfd.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pbrpc/error.h"

/* A message is packed into this thread's staging buffer, kept for the next
 * one (freed when the thread ends), and written into the memfd: on the
 * kernels measured (docs/BENCHMARKS.md) a write into a fresh memfd costs a
 * third less than mapping it writable, faulting its pages in and unmapping
 * it, which F_SEAL_WRITE requires before the seal. */
static _Thread_local uint8_t *stage;
static _Thread_local size_t stage_cap;
static pthread_key_t stage_key;
static pthread_once_t stage_once = PTHREAD_ONCE_INIT;
static bool stage_key_ok;

static void stage_free(void *p)
{
	free(p);
}

static void stage_init(void)
{
	stage_key_ok = pthread_key_create(&stage_key, stage_free) == 0;
}

__attribute__((destructor)) static void stage_fini(void)
{
	if (stage_key_ok)
		pthread_key_delete(stage_key);
}

static const uint8_t *stage_pack(size_t len, const ProtobufCMessage *msg)
{
	if (len > stage_cap) {
		pthread_once(&stage_once, stage_init);
		uint8_t *p = realloc(stage, len);
		if (!p)
			return NULL;
		stage = p;
		stage_cap = len;
		if (stage_key_ok)
			pthread_setspecific(stage_key, stage);
	}
	protobuf_c_message_pack(msg, stage);
	return stage;
}

/* A staging buffer above this goes back after each use. */
#define STAGE_KEEP (16u << 20)

static void stage_trim(void)
{
	if (stage_cap > STAGE_KEEP) {
		free(stage);
		stage = NULL;
		stage_cap = 0;
		if (stage_key_ok)
			pthread_setspecific(stage_key, NULL);
	}
}

int pbrpc__memfd_pack(size_t len, const ProtobufCMessage *msg, const void *bytes)
{
	const uint8_t *src = msg ? stage_pack(len, msg) : bytes;
	if (len && !src)
		return -ENOMEM;
	int fd = memfd_create("pbrpc-body", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0)
		return -errno;
	int err = 0;
	if (len && ftruncate(fd, (off_t)len) < 0) {
		err = -errno;
		goto fail;
	}
	for (size_t off = 0; off < len;) {
		ssize_t n = pwrite(fd, src + off, len - off, (off_t)off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			err = n < 0 ? -errno : -EIO;
			goto fail;
		}
		off += (size_t)n;
	}
	if (fcntl(fd, F_ADD_SEALS, PBRPC__MEMFD_SEALS_REQUIRED | F_SEAL_SEAL) < 0) {
		err = -errno;
		goto fail;
	}
	stage_trim();
	return fd;
fail:
	stage_trim();
	close(fd);
	return err;
}

int pbrpc__memfd_map(int fd, uint64_t len, const uint8_t **map, char *why, size_t whylen)
{
	*map = NULL;
	int seals = fcntl(fd, F_GET_SEALS);
	if (seals < 0) {
		snprintf(why, whylen, "body fd is not a sealed memfd (F_GET_SEALS: %s)", strerror(errno));
		return PBRPC_EPROTO;
	}
	if ((seals & PBRPC__MEMFD_SEALS_REQUIRED) != PBRPC__MEMFD_SEALS_REQUIRED) {
		snprintf(why, whylen, "body memfd is not sealed against changes (seals 0x%x, need 0x%x)", (unsigned)seals,
			 (unsigned)PBRPC__MEMFD_SEALS_REQUIRED);
		return PBRPC_EPROTO;
	}
	struct stat st = { 0 };
	if (fstat(fd, &st) < 0 || (uint64_t)st.st_size != len) {
		snprintf(why, whylen, "body memfd is %lld bytes, its frame says %llu", (long long)st.st_size,
			 (unsigned long long)len);
		return PBRPC_EPROTO;
	}
	if (len == 0)
		return 0;
	void *p = mmap(NULL, (size_t)len, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
	if (p == MAP_FAILED) {
		snprintf(why, whylen, "cannot map the %llu-byte body memfd: %s", (unsigned long long)len, strerror(errno));
		return PBRPC_EPROTO;
	}
	*map = p;
	return 0;
}

void pbrpc__memfd_unmap(const uint8_t *map, size_t len)
{
	if (map && len)
		munmap((void *)(uintptr_t)map, len);
}
