/* JSON <-> protobuf binary, driven by a run-time schema (schema.h), following
 * protobuf's canonical JSON mapping:
 *
 *   keys           lowerCamelCase json_name on output; json_name or the
 *                  .proto field name on input
 *   int64, uint64, sint64, fixed64, sfixed64
 *                  strings on output; numbers or strings on input
 *   other ints     numbers; strings of digits are accepted on input
 *   float, double  numbers, or "NaN", "Infinity", "-Infinity"
 *   bytes          standard base64 with padding on output; standard or
 *                  URL-safe, padded or not, on input
 *   enums          value names on output (numbers for values the schema does
 *                  not list); names or numbers on input
 *   null           on input, the field's default (absent)
 *
 * Output omits fields holding their default value unless PBJSON_EMIT_DEFAULTS
 * is set (fields with explicit presence are printed whenever they are set).
 * Map fields are treated as the repeated entry messages they are on the wire.
 *
 * Pure functions: no I/O, no global state. Errors come back as a negative
 * code and a one-line message in the caller's buffer (no "pbrpc:" prefix).
 */
#ifndef PBRPC_CLI_PBJSON_H
#define PBRPC_CLI_PBJSON_H

#include <json-c/json.h>
#include <stddef.h>
#include <stdint.h>

#include "schema.h"

/* Decoding flags. */
#define PBJSON_EMIT_DEFAULTS 0x1u

/* Deepest message nesting either direction accepts. */
#define PBJSON_MAX_DEPTH 64

/* Parses JSON text strictly (RFC 8259, valid UTF-8, nothing after the value).
 * Returns 0 with *out set (release with json_object_put; a JSON null gives
 * NULL), or -EINVAL with json-c's description of the fault and its byte
 * offset in err. */
int pbjson_parse(const char *text, size_t len, json_object **out, char *err, size_t errlen);

/* Encodes `obj`, which must be a JSON object, as message type `msg`. On
 * success returns 0 and *out is a malloc'd buffer of *out_len bytes (free();
 * may be NULL when *out_len is 0). Returns -EINVAL when the JSON does not fit
 * the schema (unknown field, wrong type, value out of range, bad base64, ...),
 * with a message that names the field; -ENOMEM. */
int pbjson_encode(const schema_message *msg, json_object *obj, uint8_t **out, size_t *out_len, char *err,
		  size_t errlen);

/* Decodes a binary message of type `msg` into a new JSON object (*out, release
 * with json_object_put). Unknown fields are skipped. Returns 0; -EBADMSG when
 * the bytes are not a valid encoding of `msg` (err says where); -ENOMEM. */
int pbjson_decode(const schema_message *msg, const uint8_t *buf, size_t len, unsigned flags, json_object **out,
		  char *err, size_t errlen);

/* The text to print for a decoded object: pretty, two-space indentation,
 * "{}" and "[]" for empty containers, '/' unescaped. Owned by obj. */
const char *pbjson_to_string(json_object *obj);

/* The same on one line, no spaces. Owned by obj. */
const char *pbjson_to_compact_string(json_object *obj);

/* A decoded object (from pbjson_decode, of type msg) in protobuf's text
 * format: "name: value" lines with .proto field names, "name {" blocks for
 * messages, one line per element of a repeated field, strings and bytes as
 * C-escaped literals, enums by name, nan/inf. Returns 0 with *out a malloc'd
 * string (free()); -EINVAL when obj does not fit msg; -ENOMEM. */
int pbjson_to_text(const schema_message *msg, json_object *obj, char **out);

/* A JSON skeleton of msg to fill in: every field (oneof members included)
 * with a placeholder value ("" for strings and bytes, 0, "0" for 64-bit
 * integers, false, the enum's zero value (else its first), a nested skeleton, or {} where a
 * type contains itself), repeated fields as one-element arrays. Release with
 * json_object_put; NULL when out of memory. */
json_object *pbjson_template(const schema_message *msg);

#endif
