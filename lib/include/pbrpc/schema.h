/* pbrpc/schema.h: the .proto file as the user wrote it, for code that
 * pbrpc-gen(1) generates.
 *
 * protoc-c's descriptors drop what pbrpc needs beyond unary calls: whether a
 * method streams (`rpc Watch(Req) returns (stream Ev)`), oneof names,
 * options. pbrpc-gen reads protoc's FileDescriptorSet and emits, for each
 * file, one constant pbrpc_schema_file that its generated code registers
 * before main() (a constructor) and unregisters when unloaded. The library
 * then:
 *   - refuses pbrpc_server_add_service() for a service with stream methods
 *     given as plain protoc-c service (the generated registration function
 *     is the way to host it);
 *   - fails a unary call, through protoc-c's stub, of a stream method on the
 *     client (FAILED_PRECONDITION, before anything is sent);
 *   - lets pbrpc.Reflection report each method's kind and send the file's
 *     full descriptors (with oneof names and options).
 * What it cannot see: a program built without pbrpc-gen's output, or whose
 * generated object the linker left out of a static library, has no table
 * (see pbrpc-gen(1), "What is detected").
 *
 * Everything here is constant data owned by the generated code; the
 * registry keeps pointers only. Safe from any thread.
 */
#ifndef PBRPC_SCHEMA_H
#define PBRPC_SCHEMA_H

#include <protobuf-c/protobuf-c.h>
#include <stddef.h>
#include <stdint.h>

#include "pbrpc/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The layout of the structs below; generated code sets .version to it. */
#define PBRPC_SCHEMA_VERSION 1

/* Bits of pbrpc_schema_service.flags[i]: the .proto's `stream` keywords. */
#define PBRPC_SCHEMA_CLIENT_STREAMING 0x1u /* rpc M(stream Req) ... */
#define PBRPC_SCHEMA_SERVER_STREAMING 0x2u /* ... returns (stream Rep) */

typedef struct pbrpc_schema_service {
	const char *name;                   /* full name, "demo.Kv" */
	const ProtobufCServiceDescriptor *descriptor; /* protoc-c's, or NULL */
	unsigned n_methods;
	const char *const *methods;         /* method names, in .proto order
	                                     * (protoc-c's order too) */
	const uint8_t *flags;               /* per method: PBRPC_SCHEMA_* bits */
} pbrpc_schema_service;

typedef struct pbrpc_schema_file {
	unsigned version;                   /* PBRPC_SCHEMA_VERSION */
	const char *name;                   /* as protoc names it: "demo/kv.proto" */
	/* A serialized google.protobuf.FileDescriptorSet: this file first, then
	 * every file it imports, directly or not (without source info). */
	const uint8_t *descriptor_set;
	size_t descriptor_set_len;
	unsigned n_services;
	const pbrpc_schema_service *services;
	unsigned n_types;
	const char *const *types;           /* full names of the messages and
	                                     * enums it defines, nested ones too */
} pbrpc_schema_file;

/* Adds a file to the process-wide table. Registering the same file again
 * counts (each registration needs its unregistration); a service or type
 * name that another registered file already defines is looked up in the
 * first one. Returns 0, PBRPC_EINVALID for NULL or another version, -ENOMEM. */
PBRPC_EXPORT int pbrpc_schema_register(const pbrpc_schema_file *file);

/* Undoes one pbrpc_schema_register(file); an unknown file is a no-op. */
PBRPC_EXPORT void pbrpc_schema_unregister(const pbrpc_schema_file *file);

/* The registered service with this full name ("demo.Kv"), or NULL; *file
 * (if not NULL) gets the file defining it. Valid until that file is
 * unregistered. */
PBRPC_EXPORT const pbrpc_schema_service *pbrpc_schema_find_service(const char *name,
								const pbrpc_schema_file **file);

/* The registered file defining this message or enum ("demo.GetRequest"), or
 * NULL. */
PBRPC_EXPORT const pbrpc_schema_file *pbrpc_schema_find_type(const char *name);

/* The PBRPC_SCHEMA_* bits of method `method` ("Watch") of a service, or -1
 * when the service or the method is not registered. */
PBRPC_EXPORT int pbrpc_schema_method_flags(const pbrpc_schema_service *svc, const char *method);

#ifdef __cplusplus
}
#endif
#endif
