/* pbrpc-gen's pieces: names (pbrpc-gen.c) and each service's code
 * (gen_service.c). */
#ifndef PBRPC_GEN_GEN_H
#define PBRPC_GEN_GEN_H

#include <stdbool.h>
#include <stdio.h>

#include "descriptor.pb-c.h"

typedef struct gen_file {
	const Google__Protobuf__FileDescriptorProto *f;
	const char *pkg;   /* "" for none */
	const char *base;  /* "demo/kv": the file name without .proto */
	const char *ident; /* "demo_kv_proto" */
} gen_file;

/* All of these return malloc'd strings and exit(1) when out of memory. */
char *gen_strdup(const char *s);
char *gen_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* protoc-c's names of a full name ("demo.Kv"): "Demo__Kv", "demo__kv",
 * "DEMO__KV"; a leading '.' is ignored. */
char *gen_name_c(const char *full);
char *gen_name_lower(const char *full);
char *gen_name_upper(const char *full);
char *gen_file_ident(const char *file);

/* Writes s as a C string literal. */
void gen_put_cstr(FILE *o, const char *s);

bool gen_method_streams(const Google__Protobuf__MethodDescriptorProto *m);

/* What the header needs beyond pbrpc/pbrpc.h. */
void gen_stream_includes(FILE *h);

/* A service's registration and typed stream API: declarations to h,
 * definitions to c. */
void gen_service(const gen_file *g, const Google__Protobuf__ServiceDescriptorProto *s, FILE *h, FILE *c);

#endif
