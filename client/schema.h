/* The pbrpc CLI's in-memory schema: a pbrpc.Reflection DescribeReply turned
 * into linked structures that the JSON codec (pbjson.h) walks.
 *
 * A schema owns copies of everything it was built from: the DescribeReply may
 * be freed as soon as schema_new() returns. Every pointer handed out by the
 * lookup functions lives as long as the schema.
 */
#ifndef PBRPC_CLI_SCHEMA_H
#define PBRPC_CLI_SCHEMA_H

#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "reflection.pb-c.h"

/* pbrpc.FieldSchema.Label, with reflection.proto's meanings. */
typedef enum schema_label {
	SCHEMA_OPTIONAL = 0, /* proto3 implicit presence: defaults are not sent */
	SCHEMA_REQUIRED = 1,
	SCHEMA_REPEATED = 2,
	SCHEMA_NONE = 3,     /* explicit presence (proto3 optional, oneof members) */
} schema_label;

typedef struct schema_message schema_message;
typedef struct schema_enum schema_enum;

typedef struct schema_enum_value {
	const char *name;
	int32_t number;
} schema_enum_value;

struct schema_enum {
	const char *name; /* full name, "demo.Color" */
	size_t n_values;
	const schema_enum_value *values;
};

typedef struct schema_field {
	const char *name;      /* as in the .proto file */
	const char *json_name; /* lowerCamelCase; never NULL */
	uint32_t number;
	schema_label label;
	ProtobufCType type;    /* reflection.proto numbers types as protobuf-c does */
	bool packed;
	const char *type_name; /* MESSAGE and ENUM: full type name, else "" */
	const char *oneof;     /* "" when not in a oneof */
	const schema_message *message; /* MESSAGE: resolved type */
	const schema_enum *enumeration; /* ENUM: resolved type */
} schema_field;

struct schema_message {
	const char *name; /* full name, "demo.GetRequest" */
	size_t n_fields;
	const schema_field *fields; /* in the order the server sent them */
};

typedef struct schema_method {
	const char *name;      /* "Get" */
	const char *full_name; /* "demo.Kv/Get" */
	const char *input_type;
	const char *output_type;
	const schema_message *input;  /* NULL when the reply did not describe it */
	const schema_message *output;
	bool client_streaming;        /* the .proto's `stream` keywords, as the */
	bool server_streaming;        /* server or the protoset knows them */
} schema_method;

typedef struct schema_service {
	const char *name; /* "demo.Kv" */
	size_t n_methods;
	const schema_method *methods;
} schema_service;

typedef struct schema schema;

/* Builds a schema from a DescribeReply. Field types are resolved by name
 * (a leading '.' is ignored); an empty json_name is derived from the field
 * name the way protoc does. Returns 0 with *out set (free with schema_free);
 * -EINVAL when the reply is inconsistent (a field refers to a type the reply
 * does not describe, a message or enum is named twice), with a one-line
 * reason in err; -ENOMEM. */
int schema_new(schema **out, const Pbrpc__DescribeReply *reply, char *err, size_t errlen);

/* NULL is a no-op. */
void schema_free(schema *s);

size_t schema_service_count(const schema *s);
const schema_service *schema_service_at(const schema *s, size_t i);
size_t schema_message_count(const schema *s);
const schema_message *schema_message_at(const schema *s, size_t i);
size_t schema_enum_count(const schema *s);
const schema_enum *schema_enum_at(const schema *s, size_t i);

/* Lookups by full name; a leading '.' is ignored. NULL when absent. */
const schema_service *schema_find_service(const schema *s, const char *name);
const schema_message *schema_find_message(const schema *s, const char *name);
const schema_enum *schema_find_enum(const schema *s, const char *name);
/* "pkg.Service/Method". */
const schema_method *schema_find_method(const schema *s, const char *full_name);

/* A field by its JSON key: the json_name or the original name. */
const schema_field *schema_field_by_key(const schema_message *m, const char *key, size_t len);
const schema_field *schema_field_by_number(const schema_message *m, uint32_t number);

/* The name of an enum value, or NULL for a number the enum does not list. */
const char *schema_enum_name(const schema_enum *e, int32_t number);
/* Looks an enum value up by name; returns false when absent. */
bool schema_enum_number(const schema_enum *e, const char *name, size_t len, int32_t *number);

/* The .proto keyword of a scalar type ("sint64"); the type name for MESSAGE
 * and ENUM fields. */
const char *schema_field_type_name(const schema_field *f);

/* protoc's json_name rule: drop each '_' and upper-case the letter after it.
 * Writes at most len bytes including the NUL. */
void schema_json_name(const char *name, char *buf, size_t len);

/* Writes a message or enum as proto-like text ("message demo.Entry {\n  string
 * key = 1;\n ...}\n"), or a service or single method as rpc lines. */
void schema_print_message(FILE *out, const schema_message *m);
void schema_print_enum(FILE *out, const schema_enum *e);
void schema_print_service(FILE *out, const schema_service *svc);
void schema_print_method(FILE *out, const schema_service *svc, const schema_method *m);

#endif
