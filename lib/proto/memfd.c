#include "proto/memfd.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pbrpc/error.h"

int pbrpc__memfd_pack(size_t len, const ProtobufCMessage *msg, const void *bytes)
{
	int fd = memfd_create("pbrpc-body", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0)
		return -errno;
	int err = 0;
	if (len) {
		if (ftruncate(fd, (off_t)len) < 0) {
			err = -errno;
			goto fail;
		}
		/* MAP_POPULATE: the pages in one go, not one fault each. */
		void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
		if (p == MAP_FAILED) {
			err = -errno;
			goto fail;
		}
		if (msg)
			protobuf_c_message_pack(msg, p);
		else
			memcpy(p, bytes, len);
		munmap(p, len); /* F_SEAL_WRITE fails while a writable mapping exists */
	}
	if (fcntl(fd, F_ADD_SEALS, PBRPC__MEMFD_SEALS_REQUIRED | F_SEAL_SEAL) < 0) {
		err = -errno;
		goto fail;
	}
	return fd;
fail:
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
