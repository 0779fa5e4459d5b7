/* Reading protoc's FileDescriptorSets (`protoc --descriptor_set_out`), for
 * the programs that take one: pbrpc-gen, and the pbrpc CLI's --protoset and
 * reflection's embedded descriptors (client/protoset.c). descriptor.proto is
 * protobuf's own (Debian: libprotobuf-dev), compiled with protoc-c. */
#ifndef PBRPC_GEN_DESCSET_H
#define PBRPC_GEN_DESCSET_H

#include <stddef.h>
#include <stdint.h>

#include "descriptor.pb-c.h"

/* Reads a whole file of at most 64 MiB into a malloc'd buffer the caller
 * frees. Returns 0, -errno, -EFBIG. */
int descset_read_file(const char *path, uint8_t **out, size_t *out_len);

/* Unpacks a set; NULL when the bytes are not one. Free with
 * google__protobuf__file_descriptor_set__free_unpacked(set, NULL). */
Google__Protobuf__FileDescriptorSet *descset_unpack(const uint8_t *data, size_t len);

/* Reads and unpacks the set in `path`. Returns 0 with *out set; -errno when
 * the file cannot be read, -EINVAL when it is not a set of at least one
 * file; err gets a one-line reason. */
int descset_load(const char *path, Google__Protobuf__FileDescriptorSet **out, char *err, size_t errlen);

/* The file named `name` in the set, or NULL. */
const Google__Protobuf__FileDescriptorProto *descset_find_file(const Google__Protobuf__FileDescriptorSet *set,
								 const char *name);

#endif
