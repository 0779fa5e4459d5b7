/* Message bodies in sealed memfds (PROTOCOL.md section 12): the sender packs
 * a body (through a per-thread staging buffer it reuses) into a memfd and
 * seals it so that it can no longer change;
 * the receiver checks the seals and the size before it maps the memfd.
 * Linux only; no RPC concepts beyond a ProtobufCMessage to pack. */
#ifndef PBRPC_PROTO_MEMFD_H
#define PBRPC_PROTO_MEMFD_H

#include <fcntl.h>
#include <protobuf-c/protobuf-c.h>
#include <stddef.h>
#include <stdint.h>

/* The seals a receiver requires: no shrinking, no growing, no writing (any
 * writable mapping the sender kept would make F_SEAL_WRITE fail). Senders
 * also add F_SEAL_SEAL. */
#define PBRPC__MEMFD_SEALS_REQUIRED (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE)

/* Creates a memfd of len bytes holding msg packed (or, with msg NULL, a copy
 * of bytes), sealed with PBRPC__MEMFD_SEALS_REQUIRED | F_SEAL_SEAL. Returns
 * the fd (close-on-exec; the caller owns it) or -errno. */
int pbrpc__memfd_pack(size_t len, const ProtobufCMessage *msg, const void *bytes);

/* Checks that fd is a memfd sealed against every change and exactly len
 * bytes long, then maps it read-only. Returns 0 with *map set (NULL for
 * len 0), or PBRPC_EPROTO with the reason in why; the fd stays the caller's
 * in both cases (it may close it at once: the mapping keeps the pages). */
int pbrpc__memfd_map(int fd, uint64_t len, const uint8_t **map, char *why, size_t whylen);

void pbrpc__memfd_unmap(const uint8_t *map, size_t len);

#endif
