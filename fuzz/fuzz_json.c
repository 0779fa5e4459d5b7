/* libFuzzer target for the CLI's JSON codec (client/schema.c, client/pbjson.c)
 * against the schemas of tests/proto/clitest*.proto, built the way the CLI
 * gets them: a pbrpc.DescribeReply made from protobuf-c's descriptors, packed,
 * unpacked and given to schema_new().
 *
 * Input: byte 0 picks the message type (bits 0-1: clitest.Scalars,
 * clitest.Repeated, clitest.Choice, clitest2.Legacy), the direction (bit 2:
 * the rest is JSON text, else protobuf binary) and PBJSON_EMIT_DEFAULTS
 * (bit 3). The rest is the message.
 *
 * Checked beyond "no crash, no leak, no UB":
 * - binary that pbjson_decode and protobuf-c accept gives JSON text that pbjson_parse and
 *   pbjson_encode accept, and that encoding decodes to the same text (the
 *   canonical JSON is a fixed point);
 * - JSON that pbjson_encode accepts gives binary that protobuf-c's generated
 *   code unpacks and pbjson_decode accepts, and from there the same fixed
 *   point holds;
 * - every binary pbjson_encode produces unpacks with protobuf-c.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "clitest.pb-c.h"
#include "clitest2.pb-c.h"
#include "pbjson.h"
#include "reflection.pb-c.h"
#include "schema.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond, ...)                                                                      \
	do {                                                                                  \
		if (!(cond)) {                                                                \
			fprintf(stderr, "fuzz_json: %s:%d: %s: ", __FILE__, __LINE__, #cond); \
			fprintf(stderr, __VA_ARGS__);                                         \
			fputc('\n', stderr);                                                  \
			abort();                                                              \
		}                                                                             \
	} while (0)

/* ---- a DescribeReply from descriptors, as lib/server/reflection.c builds it ---- */

typedef struct pool {
	void *p[1024];
	size_t n;
} pool;

static void *pool_alloc(pool *pl, size_t n)
{
	CHECK(pl->n < sizeof(pl->p) / sizeof(pl->p[0]), "pool full");
	void *p = calloc(1, n ? n : 1);
	CHECK(p != NULL, "calloc");
	pl->p[pl->n++] = p;
	return p;
}

typedef struct typeset {
	const ProtobufCMessageDescriptor *msgs[64];
	const ProtobufCEnumDescriptor *enums[64];
	size_t n_msgs, n_enums;
} typeset;

static void add_type(typeset *ts, const ProtobufCFieldDescriptor *f)
{
	if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
		for (size_t i = 0; i < ts->n_msgs; i++)
			if (ts->msgs[i] == f->descriptor)
				return;
		ts->msgs[ts->n_msgs++] = f->descriptor;
	} else if (f->type == PROTOBUF_C_TYPE_ENUM) {
		for (size_t i = 0; i < ts->n_enums; i++)
			if (ts->enums[i] == f->descriptor)
				return;
		ts->enums[ts->n_enums++] = f->descriptor;
	}
}

static bool is_proto3(const ProtobufCMessageDescriptor *md)
{
	for (unsigned i = 0; i < md->n_fields; i++)
		if (md->fields[i].label == PROTOBUF_C_LABEL_NONE)
			return true;
	return false;
}

static Pbrpc__FieldSchema__Label label_of(const ProtobufCFieldDescriptor *f, bool proto3)
{
	if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF)
		return PBRPC__FIELD_SCHEMA__LABEL__NONE;
	switch (f->label) {
	case PROTOBUF_C_LABEL_REQUIRED:
		return PBRPC__FIELD_SCHEMA__LABEL__REQUIRED;
	case PROTOBUF_C_LABEL_REPEATED:
		return PBRPC__FIELD_SCHEMA__LABEL__REPEATED;
	case PROTOBUF_C_LABEL_OPTIONAL:
		return proto3 ? PBRPC__FIELD_SCHEMA__LABEL__NONE : PBRPC__FIELD_SCHEMA__LABEL__OPTIONAL;
	default:
		return PBRPC__FIELD_SCHEMA__LABEL__OPTIONAL;
	}
}

static schema *schema_from(const ProtobufCMessageDescriptor *root)
{
	pool pl = { .n = 0 };
	typeset ts = { .msgs = { root }, .n_msgs = 1 };
	for (size_t i = 0; i < ts.n_msgs; i++)
		for (unsigned j = 0; j < ts.msgs[i]->n_fields; j++)
			add_type(&ts, &ts.msgs[i]->fields[j]);

	Pbrpc__DescribeReply reply = PBRPC__DESCRIBE_REPLY__INIT;
	reply.n_messages = ts.n_msgs;
	reply.messages = pool_alloc(&pl, ts.n_msgs * sizeof(*reply.messages));
	for (size_t i = 0; i < ts.n_msgs; i++) {
		const ProtobufCMessageDescriptor *md = ts.msgs[i];
		Pbrpc__MessageSchema *ms = pool_alloc(&pl, sizeof(*ms));
		pbrpc__message_schema__init(ms);
		ms->name = (char *)md->name;
		ms->n_fields = md->n_fields;
		ms->fields = pool_alloc(&pl, md->n_fields * sizeof(*ms->fields));
		for (unsigned j = 0; j < md->n_fields; j++) {
			const ProtobufCFieldDescriptor *f = &md->fields[j];
			Pbrpc__FieldSchema *fs = pool_alloc(&pl, sizeof(*fs));
			pbrpc__field_schema__init(fs);
			fs->name = (char *)f->name;
			fs->number = f->id;
			fs->label = label_of(f, is_proto3(md));
			fs->type = (Pbrpc__FieldSchema__Type)f->type;
			if (f->type == PROTOBUF_C_TYPE_MESSAGE)
				fs->type_name = (char *)((const ProtobufCMessageDescriptor *)f->descriptor)->name;
			else if (f->type == PROTOBUF_C_TYPE_ENUM)
				fs->type_name = (char *)((const ProtobufCEnumDescriptor *)f->descriptor)->name;
			fs->packed = (f->flags & PROTOBUF_C_FIELD_FLAG_PACKED) != 0;
			if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF)
				fs->oneof = (char *)"kind";
			ms->fields[j] = fs;
		}
		reply.messages[i] = ms;
	}
	reply.n_enums = ts.n_enums;
	reply.enums = pool_alloc(&pl, ts.n_enums * sizeof(*reply.enums));
	for (size_t i = 0; i < ts.n_enums; i++) {
		const ProtobufCEnumDescriptor *ed = ts.enums[i];
		Pbrpc__EnumSchema *es = pool_alloc(&pl, sizeof(*es));
		pbrpc__enum_schema__init(es);
		es->name = (char *)ed->name;
		es->n_values = ed->n_values;
		es->values = pool_alloc(&pl, ed->n_values * sizeof(*es->values));
		for (unsigned j = 0; j < ed->n_values; j++) {
			Pbrpc__EnumValueSchema *v = pool_alloc(&pl, sizeof(*v));
			pbrpc__enum_value_schema__init(v);
			v->name = (char *)ed->values[j].name;
			v->number = ed->values[j].value;
			es->values[j] = v;
		}
		reply.enums[i] = es;
	}

	size_t len = protobuf_c_message_get_packed_size(&reply.base);
	uint8_t *bytes = malloc(len + 1);
	CHECK(bytes != NULL, "malloc");
	protobuf_c_message_pack(&reply.base, bytes);
	while (pl.n)
		free(pl.p[--pl.n]);
	Pbrpc__DescribeReply *got = pbrpc__describe_reply__unpack(NULL, len, bytes);
	free(bytes);
	CHECK(got != NULL, "DescribeReply does not unpack");
	schema *s;
	char err[256] = "";
	int rc = schema_new(&s, got, err, sizeof(err));
	pbrpc__describe_reply__free_unpacked(got, NULL);
	CHECK(rc == 0, "schema_new: %s", err);
	return s;
}

/* ---- the target ---- */

static const ProtobufCMessageDescriptor *const roots[4] = {
	&clitest__scalars__descriptor,
	&clitest__repeated__descriptor,
	&clitest__choice__descriptor,
	&clitest2__legacy__descriptor,
};
static schema *schemas[4];
static const schema_message *msgs[4];

/* The binary must be what protobuf-c's generated code accepts. */
static void check_unpacks(const ProtobufCMessageDescriptor *d, const uint8_t *b, size_t n, const char *what)
{
	ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, n, b);
	CHECK(m != NULL, "%s: %zu bytes from pbjson_encode do not unpack as %s", what, n, d->name);
	protobuf_c_message_free_unpacked(m, NULL);
}

static bool is_number(json_object *v)
{
	enum json_type t = json_object_get_type(v);
	return t == json_type_int || t == json_type_double;
}

static bool is_zero(json_object *v)
{
	return is_number(v) && json_object_get_double(v) == 0;
}

/* Equal as JSON values, but for -0: protobuf's JSON prints a float or double
 * -0 as -0 (tests/test_cli_codec.c pins it) and json-c reads that back as the
 * integer 0, which is the default and then omitted. So numbers compare by
 * value, and a member that is a zero on one side may be missing on the
 * other: the one documented way a round trip changes the text (docs/CLI.md). */
static bool same_json(json_object *a, json_object *b)
{
	if (is_number(a) && is_number(b))
		return json_object_get_double(a) == json_object_get_double(b) &&
		       (json_object_get_type(a) != json_type_int || json_object_get_type(b) != json_type_int ||
			json_object_get_int64(a) == json_object_get_int64(b));
	if (json_object_get_type(a) != json_object_get_type(b))
		return false;
	switch (json_object_get_type(a)) {
	case json_type_object: {
		json_object_object_foreach(a, ka, va) {
			json_object *vb;
			if (!json_object_object_get_ex(b, ka, &vb)) {
				if (!is_zero(va))
					return false;
			} else if (!same_json(va, vb)) {
				return false;
			}
		}
		json_object_object_foreach(b, kb, vb2) {
			json_object *unused;
			if (!json_object_object_get_ex(a, kb, &unused) && !is_zero(vb2))
				return false;
		}
		return true;
	}
	case json_type_array: {
		size_t n = json_object_array_length(a);
		if (n != json_object_array_length(b))
			return false;
		for (size_t i = 0; i < n; i++)
			if (!same_json(json_object_array_get_idx(a, i), json_object_array_get_idx(b, i)))
				return false;
		return true;
	}
	case json_type_string:
		return json_object_get_string_len(a) == json_object_get_string_len(b) &&
		       memcmp(json_object_get_string(a), json_object_get_string(b), (size_t)json_object_get_string_len(a)) == 0;
	case json_type_boolean:
		return json_object_get_boolean(a) == json_object_get_boolean(b);
	default:
		return true; /* null */
	}
}

/* JSON text decoded from a valid binary: it must encode, and the encoding
 * decode to the same text. */
static void check_fixed_point(int t, unsigned flags, const char *text);

static void check_fixed_point(int t, unsigned flags, const char *text)
{
	char err[512];
	json_object *obj = NULL;
	int rc = pbjson_parse(text, strlen(text), &obj, err, sizeof(err));
	CHECK(rc == 0 && obj != NULL, "decoded JSON does not parse: %s\n%s", err, text);
	uint8_t *bin = NULL;
	size_t len = 0;
	rc = pbjson_encode(msgs[t], obj, &bin, &len, err, sizeof(err));
	CHECK(rc == 0, "decoded JSON does not encode: %s\n%s", err, text);
	json_object_put(obj);
	check_unpacks(roots[t], bin, len, "re-encoded");
	json_object *back = NULL;
	rc = pbjson_decode(msgs[t], bin, len, flags, &back, err, sizeof(err));
	CHECK(rc == 0, "re-encoded binary does not decode: %s\n%s", err, text);
	const char *again = pbjson_to_string(back);
	/* Decoding is canonical: binary -> JSON -> binary -> JSON gives the
	 * same text (-0.0 and empty packed fields included, once fixed). */
	if (strcmp(text, again) != 0) {
		json_object *x = json_tokener_parse(text), *y = json_tokener_parse(again);
		CHECK(x && y && same_json(x, y), "round trip changed the JSON:\n%s\nbecame\n%s", text, again);
		json_object_put(x);
		json_object_put(y);
	}
	json_object_put(back);
	free(bin);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (!schemas[0]) {
		for (int i = 0; i < 4; i++) {
			schemas[i] = schema_from(roots[i]);
			msgs[i] = schema_find_message(schemas[i], roots[i]->name);
			CHECK(msgs[i] != NULL, "no %s in its schema", roots[i]->name);
		}
	}
	if (size < 1)
		return 0;
	int t = data[0] & 3;
	unsigned flags = data[0] & 8 ? PBJSON_EMIT_DEFAULTS : 0;
	const uint8_t *p = data + 1;
	size_t n = size - 1;
	char err[512];

	if (data[0] & 4) {
		/* JSON -> binary */
		json_object *obj = NULL;
		if (pbjson_parse((const char *)p, n, &obj, err, sizeof(err)) != 0)
			return 0;
		if (!obj)
			return 0; /* null */
		uint8_t *bin = NULL;
		size_t len = 0;
		int rc = json_object_is_type(obj, json_type_object)
				 ? pbjson_encode(msgs[t], obj, &bin, &len, err, sizeof(err))
				 : -EINVAL;
		json_object_put(obj);
		if (rc != 0) {
			CHECK(rc == -EINVAL, "pbjson_encode: %d (%s)", rc, err);
			return 0;
		}
		check_unpacks(roots[t], bin, len, "encoded");
		json_object *dec = NULL;
		rc = pbjson_decode(msgs[t], bin, len, flags, &dec, err, sizeof(err));
		CHECK(rc == 0, "encoded binary does not decode: %s", err);
		check_fixed_point(t, flags, pbjson_to_string(dec));
		json_object_put(dec);
		free(bin);
		return 0;
	}

	/* binary -> JSON; a copy of exactly the input's size, for ASan */
	uint8_t *copy = malloc(n ? n : 1);
	CHECK(copy != NULL, "malloc");
	memcpy(copy, p, n);
	json_object *dec = NULL;
	int rc = pbjson_decode(msgs[t], copy, n, flags, &dec, err, sizeof(err));
	free(copy);
	if (rc != 0) {
		CHECK(rc == -EBADMSG, "pbjson_decode: %d (%s)", rc, err);
		return 0;
	}
	CHECK(dec != NULL, "decode gave no object");
	/* pbjson_decode is lenient (a missing proto2 required field passes);
	 * the round trip is promised for what protobuf-c accepts */
	ProtobufCMessage *m = protobuf_c_message_unpack(roots[t], NULL, n, p);
	if (m)
		check_fixed_point(t, flags, pbjson_to_string(dec));
	protobuf_c_message_free_unpacked(m, NULL);
	json_object_put(dec);
	return 0;
}
