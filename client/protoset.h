/* Schemas from a file instead of a server's reflection: a FileDescriptorSet
 * as `protoc --descriptor_set_out=FILE --include_imports` writes it (grpcurl's
 * -protoset), turned into the pbrpc.DescribeReply that reflection would have
 * sent, so that schema.h and everything after it work unchanged.
 *
 * A protoset owns the unpacked file and every reply it hands out; those live
 * until protoset_free().
 */
#ifndef PBRPC_CLI_PROTOSET_H
#define PBRPC_CLI_PROTOSET_H

#include <stddef.h>

#include "reflection.pb-c.h"

typedef struct protoset protoset;

/* Reads and converts the set in `path`. Returns 0 with *out set; -errno when
 * the file cannot be read; -EINVAL when it is not a FileDescriptorSet or uses
 * what pbrpc cannot describe (proto2 groups), with a one-line reason in err;
 * -ENOMEM. */
int protoset_load(protoset **out, const char *path, char *err, size_t errlen);

/* The same from serialized google.protobuf.FileDescriptorProtos, as
 * pbrpc.Reflection sends them (DescribeReply.files): every file a described
 * type needs. The bytes stay the caller's. */
int protoset_from_files(protoset **out, size_t n, const ProtobufCBinaryData *files, char *err, size_t errlen);

/* NULL is a no-op. */
void protoset_free(protoset *ps);

/* Everything in the set: every service, message and enum. */
const Pbrpc__DescribeReply *protoset_all(const protoset *ps);

/* What reflection's Describe(symbol) answers: a service (and the types its
 * methods use), a method "pkg.Svc/Method" (its service with that method
 * alone), or a message or enum, with every type they reach. Returns 0 with
 * *out owned by ps; -ENOENT for a symbol the set does not define; -ENOMEM. */
int protoset_describe(protoset *ps, const char *symbol, const Pbrpc__DescribeReply **out);

#endif
