/* The pbrpc CLI's schema (client/schema.c) and JSON codec (client/pbjson.c),
 * checked against protobuf-c: JSON encoded by the codec is unpacked with the
 * generated code, messages packed by protobuf-c are decoded to JSON, and the
 * two directions agree byte for byte.
 *
 * Schemas come from DescribeReply messages built here from protobuf-c
 * descriptors the way lib/reflection.c builds them, or written by hand.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clitest.pb-c.h"
#include "clitest2.pb-c.h"
#include "kv.pb-c.h"
#include "pbjson.h"
#include "reflection.pb-c.h"
#include "schema.h"

/* ---- DescribeReply from descriptors, as lib/reflection.c does ---- */

typedef struct pool {
	void *p[4096];
	size_t n;
} pool;

static void *pool_alloc(pool *pl, size_t n)
{
	cr_assert_lt(pl->n, sizeof(pl->p) / sizeof(pl->p[0]));
	void *p = calloc(1, n ? n : 1);
	cr_assert_not_null(p);
	pl->p[pl->n++] = p;
	return p;
}

static void pool_free(pool *pl)
{
	while (pl->n)
		free(pl->p[--pl->n]);
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
	case PROTOBUF_C_LABEL_REQUIRED: return PBRPC__FIELD_SCHEMA__LABEL__REQUIRED;
	case PROTOBUF_C_LABEL_REPEATED: return PBRPC__FIELD_SCHEMA__LABEL__REPEATED;
	case PROTOBUF_C_LABEL_OPTIONAL:
		return proto3 ? PBRPC__FIELD_SCHEMA__LABEL__NONE : PBRPC__FIELD_SCHEMA__LABEL__OPTIONAL;
	default: return PBRPC__FIELD_SCHEMA__LABEL__OPTIONAL;
	}
}

/* oneof_name: what to call every oneof; NULL leaves it "" as protobuf-c 1.4
 * servers must (their descriptors carry no oneof names). json_name is left
 * empty so that the schema derives it. */
static schema *schema_from(const ProtobufCMessageDescriptor *root, const char *oneof_name)
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
			if (oneof_name && (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF))
				fs->oneof = (char *)oneof_name;
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

	/* Through the wire, as the CLI receives it. */
	size_t len = protobuf_c_message_get_packed_size(&reply.base);
	uint8_t *bytes = malloc(len + 1);
	protobuf_c_message_pack(&reply.base, bytes);
	pool_free(&pl);
	Pbrpc__DescribeReply *got = pbrpc__describe_reply__unpack(NULL, len, bytes);
	free(bytes);
	cr_assert_not_null(got);

	schema *s;
	char err[256] = "";
	int rc = schema_new(&s, got, err, sizeof(err));
	pbrpc__describe_reply__free_unpacked(got, NULL);
	cr_assert_eq(rc, 0, "schema_new: %s", err);
	return s;
}

/* ---- helpers ---- */

static json_object *parse(const char *text)
{
	json_object *obj;
	char err[256] = "";
	int rc = pbjson_parse(text, strlen(text), &obj, err, sizeof(err));
	cr_assert_eq(rc, 0, "pbjson_parse(%s): %s", text, err);
	return obj;
}

/* JSON text -> bytes; asserts success. */
static uint8_t *encode_ok(const schema_message *m, const char *json, size_t *len)
{
	uint8_t *out;
	char err[512] = "";
	json_object *obj = parse(json);
	int rc = pbjson_encode(m, obj, &out, len, err, sizeof(err));
	json_object_put(obj);
	cr_assert_eq(rc, 0, "encode %s: %s", json, err);
	return out;
}

/* JSON text -> the codec's error message; asserts failure. */
static void expect_encode_error(const schema_message *m, const char *json, const char *want)
{
	uint8_t *out = NULL;
	size_t len;
	char err[512] = "";
	json_object *obj = parse(json);
	int rc = pbjson_encode(m, obj, &out, &len, err, sizeof(err));
	json_object_put(obj);
	free(out);
	cr_assert_eq(rc, -EINVAL, "encode %s should fail, got %d", json, rc);
	cr_assert_str_eq(err, want, "encode %s:\n got  %s\n want %s", json, err, want);
}

/* bytes -> compact JSON text (malloc'd). */
static char *decode_str(const schema_message *m, const void *bytes, size_t len, unsigned flags)
{
	json_object *obj;
	char err[512] = "";
	int rc = pbjson_decode(m, bytes, len, flags, &obj, err, sizeof(err));
	cr_assert_eq(rc, 0, "decode: %s", err);
	char *s = strdup(json_object_to_json_string_ext(obj, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
	json_object_put(obj);
	return s;
}

static void expect_decode(const schema_message *m, const ProtobufCMessage *msg, unsigned flags, const char *want)
{
	size_t len = protobuf_c_message_get_packed_size(msg);
	uint8_t *bytes = malloc(len + 1);
	protobuf_c_message_pack(msg, bytes);
	char *got = decode_str(m, bytes, len, flags);
	cr_assert_str_eq(got, want);

	/* And back: the codec encodes the JSON to protobuf-c's exact bytes. */
	size_t len2;
	uint8_t *bytes2 = encode_ok(m, got, &len2);
	cr_assert_eq(len2, len, "re-encoded %zu bytes, protobuf-c packed %zu", len2, len);
	cr_assert(len == 0 || memcmp(bytes, bytes2, len) == 0, "re-encoded bytes differ");
	free(bytes2);
	free(got);
	free(bytes);
}

static void expect_decode_error(const schema_message *m, const char *bytes, size_t len, const char *want)
{
	json_object *obj = NULL;
	char err[512] = "";
	int rc = pbjson_decode(m, (const uint8_t *)bytes, len, 0, &obj, err, sizeof(err));
	cr_assert_eq(rc, -EBADMSG, "decode should fail, got %d", rc);
	cr_assert_null(obj);
	if (want)
		cr_assert_str_eq(err, want);
}

static schema *S;

static void setup_scalars(void)
{
	S = schema_from(&clitest__scalars__descriptor, NULL);
}

static void teardown(void)
{
	schema_free(S);
	S = NULL;
}

#define MSG(name) schema_find_message(S, name)

/* ---- scalars ---- */

TestSuite(codec, .init = setup_scalars, .fini = teardown);

Test(codec, encode_every_scalar)
{
	size_t len;
	uint8_t *bytes = encode_ok(MSG("clitest.Scalars"),
		"{\"f_int32\": -5, \"fInt64\": \"-9007199254740993\", \"fUint32\": 4000000000,"
		" \"f_uint64\": \"18446744073709551615\", \"fSint32\": \"-7\","
		" \"fSint64\": \"-9223372036854775808\", \"fFixed32\": 4294967295,"
		" \"fFixed64\": 1234567890123, \"fSfixed32\": -2147483648, \"fSfixed64\": \"-1\","
		" \"fFloat\": 0.1, \"fDouble\": \"-2.5e300\", \"fBool\": true,"
		" \"fString\": \"h\\u00e9llo \\\"q\\\" / \\u0000z\", \"fBytes\": \"AAEC__4\", \"fEnum\": \"INFRARED\","
		" \"fInner\": {\"name\": \"in\", \"n\": 3, \"child\": {\"n\": 4}}, \"big_number\": 7}",
		&len);
	Clitest__Scalars *m = clitest__scalars__unpack(NULL, len, bytes);
	cr_assert_not_null(m, "protobuf-c rejects the encoding");
	cr_expect_eq(m->f_int32, -5);
	cr_expect_eq(m->f_int64, -9007199254740993LL);
	cr_expect_eq(m->f_uint32, 4000000000u);
	cr_expect_eq(m->f_uint64, UINT64_MAX);
	cr_expect_eq(m->f_sint32, -7);
	cr_expect_eq(m->f_sint64, INT64_MIN);
	cr_expect_eq(m->f_fixed32, UINT32_MAX);
	cr_expect_eq(m->f_fixed64, 1234567890123ull);
	cr_expect_eq(m->f_sfixed32, INT32_MIN);
	cr_expect_eq(m->f_sfixed64, -1);
	cr_expect_eq(m->f_float, 0.1f);
	cr_expect_eq(m->f_double, -2.5e300);
	cr_expect_eq(m->f_bool, 1);
	cr_expect_str_eq(m->f_string, "h\xc3\xa9llo \"q\" / "); /* protobuf-c strings end at the NUL */
	cr_expect_eq(m->f_bytes.len, 5);
	cr_expect(m->f_bytes.len == 5 && memcmp(m->f_bytes.data, "\x00\x01\x02\xff\xfe", 5) == 0);
	cr_expect_eq(m->f_enum, CLITEST__COLOR__INFRARED);
	cr_assert_not_null(m->f_inner);
	cr_expect_str_eq(m->f_inner->name, "in");
	cr_expect_eq(m->f_inner->n, 3);
	cr_assert_not_null(m->f_inner->child);
	cr_expect_eq(m->f_inner->child->n, 4);
	cr_expect_null(m->f_inner->child->child);
	cr_expect_eq(m->big_number, 7);
	clitest__scalars__free_unpacked(m, NULL);
	free(bytes);
}

Test(codec, decode_every_scalar)
{
	Clitest__Inner child = CLITEST__INNER__INIT, inner = CLITEST__INNER__INIT;
	Clitest__Scalars m = CLITEST__SCALARS__INIT;
	child.n = 4;
	inner.name = "in";
	inner.n = 3;
	inner.child = &child;
	m.f_int32 = -5;
	m.f_int64 = -9007199254740993LL;
	m.f_uint32 = 4000000000u;
	m.f_uint64 = UINT64_MAX;
	m.f_sint32 = -7;
	m.f_sint64 = INT64_MIN;
	m.f_fixed32 = UINT32_MAX;
	m.f_fixed64 = 1234567890123ull;
	m.f_sfixed32 = INT32_MIN;
	m.f_sfixed64 = -1;
	m.f_float = 0.1f;
	m.f_double = -2.5e300;
	m.f_bool = 1;
	m.f_string = "h\xc3\xa9llo \"q\" / \\";
	m.f_bytes.data = (uint8_t *)"\x00\x01\x02\xff\xfe";
	m.f_bytes.len = 5;
	m.f_enum = CLITEST__COLOR__INFRARED;
	m.f_inner = &inner;
	m.big_number = 7;
	expect_decode(MSG("clitest.Scalars"), &m.base, 0,
		"{\"fInt32\":-5,\"fInt64\":\"-9007199254740993\",\"fUint32\":4000000000,"
		"\"fUint64\":\"18446744073709551615\",\"fSint32\":-7,\"fSint64\":\"-9223372036854775808\","
		"\"fFixed32\":4294967295,\"fFixed64\":\"1234567890123\",\"fSfixed32\":-2147483648,"
		"\"fSfixed64\":\"-1\",\"fFloat\":0.1,\"fDouble\":-2.5e+300,\"fBool\":true,"
		"\"fString\":\"h\xc3\xa9llo \\\"q\\\" / \\\\\",\"fBytes\":\"AAEC//4=\",\"fEnum\":\"INFRARED\","
		"\"fInner\":{\"name\":\"in\",\"n\":3,\"child\":{\"n\":4}},\"bigNumber\":7}");
}

Test(codec, defaults_are_omitted_unless_asked)
{
	Clitest__Scalars m = CLITEST__SCALARS__INIT;
	expect_decode(MSG("clitest.Scalars"), &m.base, 0, "{}");
	char *got = decode_str(MSG("clitest.Scalars"), "", 0, PBJSON_EMIT_DEFAULTS);
	cr_assert_str_eq(got,
		"{\"fInt32\":0,\"fInt64\":\"0\",\"fUint32\":0,\"fUint64\":\"0\",\"fSint32\":0,\"fSint64\":\"0\","
		"\"fFixed32\":0,\"fFixed64\":\"0\",\"fSfixed32\":0,\"fSfixed64\":\"0\",\"fFloat\":0,\"fDouble\":0,"
		"\"fBool\":false,\"fString\":\"\",\"fBytes\":\"\",\"fEnum\":\"COLOR_UNSPECIFIED\",\"fInner\":null,"
		"\"bigNumber\":0}");
	free(got);

	/* A present but empty message is printed, a default scalar is not sent. */
	Clitest__Inner inner = CLITEST__INNER__INIT;
	m.f_inner = &inner;
	expect_decode(MSG("clitest.Scalars"), &m.base, 0, "{\"fInner\":{}}");
	size_t len;
	uint8_t *bytes = encode_ok(MSG("clitest.Scalars"),
		"{\"fInt32\": 0, \"fString\": \"\", \"fBool\": false, \"fEnum\": \"COLOR_UNSPECIFIED\", \"fInt64\": \"0\","
		" \"fDouble\": 0.0, \"fBytes\": \"\", \"fInner\": null}", &len);
	cr_expect_eq(len, 0);
	free(bytes);
}

Test(codec, float_special_values)
{
	Clitest__Scalars m = CLITEST__SCALARS__INIT;
	m.f_float = INFINITY;
	m.f_double = NAN;
	expect_decode(MSG("clitest.Scalars"), &m.base, 0, "{\"fFloat\":\"Infinity\",\"fDouble\":\"NaN\"}");
	m.f_float = -INFINITY;
	m.f_double = 0;
	expect_decode(MSG("clitest.Scalars"), &m.base, 0, "{\"fFloat\":\"-Infinity\"}");
	m.f_float = 3.4028235e38f;
	m.f_double = 1.0 / 3;
	expect_decode(MSG("clitest.Scalars"), &m.base, 0, "{\"fFloat\":3.4028235e+38,\"fDouble\":0.3333333333333333}");
	m.f_float = 1.0f;
	m.f_double = 1e21;
	expect_decode(MSG("clitest.Scalars"), &m.base, 0, "{\"fFloat\":1,\"fDouble\":1e+21}");

	size_t len;
	uint8_t *bytes = encode_ok(MSG("clitest.Scalars"), "{\"fFloat\": \"-Infinity\", \"fDouble\": \"NaN\"}", &len);
	Clitest__Scalars *u = clitest__scalars__unpack(NULL, len, bytes);
	cr_assert_not_null(u);
	cr_expect(isinf(u->f_float) && u->f_float < 0);
	cr_expect(isnan(u->f_double));
	clitest__scalars__free_unpacked(u, NULL);
	free(bytes);

	/* -0.0 is not the default: it is sent and printed (protobuf-c's packer
	 * drops it, protobuf's does not). */
	bytes = encode_ok(MSG("clitest.Scalars"), "{\"fDouble\": -0.0}", &len);
	cr_assert_eq(len, 9);
	cr_expect(memcmp(bytes, "\x61\0\0\0\0\0\0\0\x80", 9) == 0);
	char *got = decode_str(MSG("clitest.Scalars"), bytes, len, 0);
	cr_expect_str_eq(got, "{\"fDouble\":-0}");
	free(got);
	free(bytes);
}

Test(codec, integer_forms_accepted)
{
	static const struct {
		const char *json;
		int32_t want;
	} cases[] = {
		{ "{\"fInt32\": 2147483647}", INT32_MAX },  { "{\"fInt32\": -2147483648}", INT32_MIN },
		{ "{\"fInt32\": \"-2147483648\"}", INT32_MIN }, { "{\"fInt32\": 1e3}", 1000 },
		{ "{\"fInt32\": 7.0}", 7 },                    { "{\"fInt32\": \"1.5e1\"}", 15 },
		{ "{\"fInt32\": \"-0\"}", 0 },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		size_t len;
		uint8_t *bytes = encode_ok(MSG("clitest.Scalars"), cases[i].json, &len);
		Clitest__Scalars *u = clitest__scalars__unpack(NULL, len, bytes);
		cr_assert_not_null(u);
		cr_expect_eq(u->f_int32, cases[i].want, "%s", cases[i].json);
		clitest__scalars__free_unpacked(u, NULL);
		free(bytes);
	}
	/* 64-bit extremes as numbers, and enums by number (negative ones too). */
	size_t len;
	uint8_t *bytes = encode_ok(MSG("clitest.Scalars"),
		"{\"fInt64\": -9223372036854775808, \"fUint64\": 18446744073709551615, \"fSint64\": 9223372036854775807,"
		" \"fFixed64\": \"18446744073709551615\", \"fEnum\": -3}", &len);
	Clitest__Scalars *u = clitest__scalars__unpack(NULL, len, bytes);
	cr_assert_not_null(u);
	cr_expect_eq(u->f_int64, INT64_MIN);
	cr_expect_eq(u->f_uint64, UINT64_MAX);
	cr_expect_eq(u->f_sint64, INT64_MAX);
	cr_expect_eq(u->f_fixed64, UINT64_MAX);
	cr_expect_eq(u->f_enum, CLITEST__COLOR__INFRARED);
	clitest__scalars__free_unpacked(u, NULL);
	free(bytes);
}

Test(codec, enum_numbers_outside_the_enum)
{
	Clitest__Scalars m = CLITEST__SCALARS__INIT;
	m.f_enum = (Clitest__Color)42;
	expect_decode(MSG("clitest.Scalars"), &m.base, 0, "{\"fEnum\":42}");
}

Test(codec, wrong_types_name_the_field)
{
	const schema_message *m = MSG("clitest.Scalars");
	expect_encode_error(m, "{\"fInt32\": 3000000000}",
		"field \"fInt32\" of clitest.Scalars: expected int32 (-2147483648 to 2147483647), got number 3000000000");
	expect_encode_error(m, "{\"fInt32\": \"12x\"}",
		"field \"fInt32\" of clitest.Scalars: expected int32 (a number or a string of digits), got string \"12x\"");
	expect_encode_error(m, "{\"fInt32\": 1.5}",
		"field \"fInt32\" of clitest.Scalars: expected int32 (a number or a string of digits), got number 1.5");
	expect_encode_error(m, "{\"fUint32\": -1}",
		"field \"fUint32\" of clitest.Scalars: expected uint32 (0 to 4294967295), got number -1");
	expect_encode_error(m, "{\"fUint64\": \"-1\"}",
		"field \"fUint64\" of clitest.Scalars: expected uint64 (0 to 18446744073709551615), got string \"-1\"");
	expect_encode_error(m, "{\"fInt64\": \"9223372036854775808\"}",
		"field \"fInt64\" of clitest.Scalars: expected int64 (-9223372036854775808 to 9223372036854775807), "
		"got string \"9223372036854775808\"");
	expect_encode_error(m, "{\"fUint64\": \"99999999999999999999\"}",
		"field \"fUint64\" of clitest.Scalars: expected uint64 (0 to 18446744073709551615), "
		"got string \"99999999999999999999\"");
	expect_encode_error(m, "{\"fBool\": \"true\"}",
		"field \"fBool\" of clitest.Scalars: expected a boolean (true or false), got string \"true\"");
	expect_encode_error(m, "{\"fString\": 5}", "field \"fString\" of clitest.Scalars: expected a string, got number 5");
	expect_encode_error(m, "{\"fString\": [\"a\"]}", "field \"fString\" of clitest.Scalars: expected a string, got array");
	expect_encode_error(m, "{\"fBytes\": \"a!b=\"}",
		"field \"fBytes\" of clitest.Scalars: expected a base64 string, got string \"a!b=\"");
	expect_encode_error(m, "{\"fBytes\": \"abcde\"}",
		"field \"fBytes\" of clitest.Scalars: expected a base64 string, got string \"abcde\"");
	expect_encode_error(m, "{\"fFloat\": 3.4028236e38}",
		"field \"fFloat\" of clitest.Scalars: expected float (magnitude at most 3.4028235e+38), "
		"got number 3.4028236e38");
	expect_encode_error(m, "{\"fFloat\": 1e39}",
		"field \"fFloat\" of clitest.Scalars: expected float (magnitude at most 3.4028235e+38), got number 1e39");
	expect_encode_error(m, "{\"fDouble\": \"inf\"}",
		"field \"fDouble\" of clitest.Scalars: expected double (a number, \"NaN\", \"Infinity\" or \"-Infinity\"), "
		"got string \"inf\"");
	expect_encode_error(m, "{\"fEnum\": \"PURPLE\"}",
		"field \"fEnum\" of clitest.Scalars: expected a value of enum clitest.Color "
		"(INFRARED, COLOR_UNSPECIFIED, RED, GREEN), got string \"PURPLE\"");
	expect_encode_error(m, "{\"fEnum\": 4294967296}",
		"field \"fEnum\" of clitest.Scalars: expected an enum number (-2147483648 to 2147483647), "
		"got number 4294967296");
	expect_encode_error(m, "{\"fInner\": \"x\"}",
		"field \"fInner\" of clitest.Scalars: expected a JSON object for message clitest.Inner, got string \"x\"");
	expect_encode_error(m, "{\"fInner\": {\"child\": {\"n\": true}}}",
		"field \"fInner.child.n\" of clitest.Scalars: expected int32 (a number or a string of digits), "
		"got boolean true");
}

Test(codec, long_values_are_shortened_in_errors)
{
	uint8_t *out = NULL;
	size_t len;
	char err[512];
	json_object *obj = parse("{\"fInt32\": \"0123456789012345678901234567890123456789x\"}");
	cr_assert_eq(pbjson_encode(MSG("clitest.Scalars"), obj, &out, &len, err, sizeof(err)), -EINVAL);
	cr_expect(strstr(err, "got string \"012345678901234567890123456789012345...") != NULL, "%s", err);
	json_object_put(obj);
}

Test(codec, unknown_and_duplicate_fields)
{
	const schema_message *m = MSG("clitest.Scalars");
	expect_encode_error(m, "{\"fInner\": {\"nme\": \"y\"}}",
		"unknown field \"nme\" in clitest.Inner at \"fInner\" of clitest.Scalars (fields: name, n, child)");
	expect_encode_error(m, "{\"f_int32\": 1, \"fInt32\": 2}",
		"field \"fInt32\" of clitest.Scalars is given twice (as \"f_int32\" and \"fInt32\")");
	expect_encode_error(m, "{\"FInt32\": 1}",
		"unknown field \"FInt32\" in clitest.Scalars (fields: f_int32, f_int64, f_uint32, f_uint64, f_sint32, "
		"f_sint64, f_fixed32, f_fixed64, f_sfixed32, f_sfixed64, f_float, f_double, f_bool, f_string, f_bytes, "
		"f_enum, f_inner, big_number)");
}

Test(codec, request_must_be_an_object)
{
	uint8_t *out = NULL;
	size_t len;
	char err[256];
	json_object *arr = parse("[1]");
	cr_expect_eq(pbjson_encode(MSG("clitest.Scalars"), arr, &out, &len, err, sizeof(err)), -EINVAL);
	cr_expect_str_eq(err, "the request for clitest.Scalars must be a JSON object, not array");
	json_object_put(arr);
	cr_expect_eq(pbjson_encode(MSG("clitest.Scalars"), NULL, &out, &len, err, sizeof(err)), -EINVAL);
	cr_expect_str_eq(err, "the request for clitest.Scalars must be a JSON object, not null");
}

Test(codec, unknown_fields_are_skipped_on_decode)
{
	/* 99: varint, 100: fixed64, 101: bytes, 102: fixed32, then fInt32 = 1. */
	static const char bytes[] = "\x98\x06\x96\x01"
				    "\xa1\x06\x01\x02\x03\x04\x05\x06\x07\x08"
				    "\xaa\x06\x02xy"
				    "\xb5\x06\x01\x02\x03\x04"
				    "\x08\x01";
	char *got = decode_str(MSG("clitest.Scalars"), bytes, sizeof(bytes) - 1, 0);
	cr_expect_str_eq(got, "{\"fInt32\":1}");
	free(got);
}

Test(codec, later_occurrences_win_and_messages_merge)
{
	/* fInt32 = 1, fInner{name:"a"}, fInt32 = 2, fInner{n:5}. */
	static const char bytes[] = "\x08\x01\x8a\x01\x03\x0a\x01\x61\x08\x02\x8a\x01\x02\x10\x05";
	char *got = decode_str(MSG("clitest.Scalars"), bytes, sizeof(bytes) - 1, 0);
	cr_expect_str_eq(got, "{\"fInt32\":2,\"fInner\":{\"name\":\"a\",\"n\":5}}");
	free(got);
}

Test(codec, malformed_bytes_are_errors)
{
	const schema_message *m = MSG("clitest.Scalars");
	expect_decode_error(m, "\x08", 1, "field f_int32 of clitest.Scalars is truncated");
	expect_decode_error(m, "\x72\x05" "ab", 4, "field f_string of clitest.Scalars is truncated");
	expect_decode_error(m, "\x0a\x01" "a", 3, "field f_int32 of clitest.Scalars has wire type 2, expected 0");
	expect_decode_error(m, "\x0b", 1, "field f_int32 of clitest.Scalars has wire type 3, expected 0");
	expect_decode_error(m, "\xa3\x01", 2, "field 20 of clitest.Scalars has unsupported wire type 3");
	expect_decode_error(m, "\x00\x00", 2, "field number 0 in clitest.Scalars");
	expect_decode_error(m, "\x72\x02\xc3\x28", 4, "field f_string is not valid UTF-8");
	expect_decode_error(m, "\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f", 11, NULL);
	expect_decode_error(m, "\x8a\x01\x01\x10", 4, "field n of clitest.Inner is truncated");
}

Test(codec, random_bytes_never_crash)
{
	uint64_t seed = 0x9e3779b97f4a7c15ull;
	uint8_t bytes[64];
	const char *names[] = { "clitest.Scalars", "clitest.Inner" };
	for (int i = 0; i < 20000; i++) {
		size_t len = (size_t)(seed % sizeof(bytes));
		for (size_t j = 0; j < len; j++) {
			seed ^= seed << 13;
			seed ^= seed >> 7;
			seed ^= seed << 17;
			bytes[j] = (uint8_t)seed;
			/* Bias towards plausible tags so that decoding gets deep. */
			if (j % 3 == 0)
				bytes[j] &= 0x8f;
		}
		json_object *obj = NULL;
		char err[256];
		int rc = pbjson_decode(MSG(names[i % 2]), bytes, len, (unsigned)i & PBJSON_EMIT_DEFAULTS, &obj, err,
				       sizeof(err));
		cr_assert(rc == 0 || rc == -EBADMSG, "rc %d", rc);
		if (rc == 0)
			(void)pbjson_to_string(obj);
		json_object_put(obj);
		seed += 0x9e3779b97f4a7c15ull;
	}
}

Test(codec, deep_nesting_is_refused)
{
	/* 100 nested Inner.child messages, built from the inside out. */
	uint8_t buf[400];
	size_t len = 0;
	for (int i = 0; i < 100; i++) {
		size_t hdr = len < 128 ? 2 : 3;
		memmove(buf + hdr, buf, len);
		buf[0] = 0x1a;
		if (len < 128) {
			buf[1] = (uint8_t)len;
		} else {
			buf[1] = (uint8_t)(0x80 | (len & 0x7f));
			buf[2] = (uint8_t)(len >> 7);
		}
		len += hdr;
	}
	expect_decode_error(MSG("clitest.Inner"), (const char *)buf, len, "messages nested deeper than 64 in clitest.Inner");
}

/* ---- repeated fields ---- */

static void setup_repeated(void)
{
	S = schema_from(&clitest__repeated__descriptor, NULL);
}

TestSuite(repeated, .init = setup_repeated, .fini = teardown);

Test(repeated, packed_and_not)
{
	int32_t i32[] = { 1, -1, 300 };
	int64_t s64[] = { -2, INT64_MAX };
	uint32_t f32[] = { 7 };
	double dbl[] = { 0.5, -1 };
	protobuf_c_boolean bl[] = { 1, 0, 1 };
	char *str[] = { "a", "", "c" };
	ProtobufCBinaryData bin[] = { { 2, (uint8_t *)"hi" }, { 0, NULL } };
	Clitest__Color en[] = { CLITEST__COLOR__RED, CLITEST__COLOR__INFRARED, 9 };
	Clitest__Inner in1 = CLITEST__INNER__INIT, in2 = CLITEST__INNER__INIT;
	Clitest__Inner *inner[] = { &in1, &in2 };
	uint64_t u64[] = { 0, UINT64_MAX };
	float fl[] = { 1.5f, NAN };
	in1.name = "x";
	Clitest__Repeated m = CLITEST__REPEATED__INIT;
	m.n_r_int32 = 3, m.r_int32 = i32;
	m.n_r_sint64 = 2, m.r_sint64 = s64;
	m.n_r_fixed32 = 1, m.r_fixed32 = f32;
	m.n_r_double = 2, m.r_double = dbl;
	m.n_r_bool = 3, m.r_bool = bl;
	m.n_r_string = 3, m.r_string = str;
	m.n_r_bytes = 2, m.r_bytes = bin;
	m.n_r_enum = 3, m.r_enum = en;
	m.n_r_inner = 2, m.r_inner = inner;
	m.n_r_uint64 = 2, m.r_uint64 = u64;
	m.n_r_float = 2, m.r_float = fl;
	expect_decode(MSG("clitest.Repeated"), &m.base, 0,
		"{\"rInt32\":[1,-1,300],\"rSint64\":[\"-2\",\"9223372036854775807\"],\"rFixed32\":[7],"
		"\"rDouble\":[0.5,-1],\"rBool\":[true,false,true],\"rString\":[\"a\",\"\",\"c\"],"
		"\"rBytes\":[\"aGk=\",\"\"],\"rEnum\":[\"RED\",\"INFRARED\",9],\"rInner\":[{\"name\":\"x\"},{}],"
		"\"rUint64\":[\"0\",\"18446744073709551615\"],\"rFloat\":[1.5,\"NaN\"]}");

	Clitest__Repeated empty = CLITEST__REPEATED__INIT;
	expect_decode(MSG("clitest.Repeated"), &empty.base, 0, "{}");
	char *got = decode_str(MSG("clitest.Repeated"), "", 0, PBJSON_EMIT_DEFAULTS);
	cr_expect_str_eq(got, "{\"rInt32\":[],\"rSint64\":[],\"rFixed32\":[],\"rDouble\":[],\"rBool\":[],\"rString\":[],"
			      "\"rBytes\":[],\"rEnum\":[],\"rInner\":[],\"rUint64\":[],\"rFloat\":[]}");
	free(got);
}

Test(repeated, unpacked_encoding_is_accepted)
{
	/* rInt32 as three separate varints, interleaved with a packed run. */
	static const char bytes[] = "\x08\x01\x08\x02\x0a\x02\x03\x04\x08\x05";
	char *got = decode_str(MSG("clitest.Repeated"), bytes, sizeof(bytes) - 1, 0);
	cr_expect_str_eq(got, "{\"rInt32\":[1,2,3,4,5]}");
	free(got);
	expect_decode_error(MSG("clitest.Repeated"), "\x0a\x02\x01", 3, "field r_int32 of clitest.Repeated is truncated");
	expect_decode_error(MSG("clitest.Repeated"), "\x1a\x03\x01\x02\x03", 5,
			    "packed field r_fixed32 of clitest.Repeated is truncated");
}

Test(repeated, errors_name_the_element)
{
	const schema_message *m = MSG("clitest.Repeated");
	expect_encode_error(m, "{\"rInt32\": 5}", "field \"rInt32\" of clitest.Repeated: expected an array of int32, got number 5");
	expect_encode_error(m, "{\"rInt32\": [1, \"x\"]}",
		"field \"rInt32[1]\" of clitest.Repeated: expected int32 (a number or a string of digits), got string \"x\"");
	expect_encode_error(m, "{\"rInt32\": [1, null]}", "field \"rInt32[1]\" of clitest.Repeated: expected int32 elements, got null");
	expect_encode_error(m, "{\"rInner\": [{\"name\": \"x\"}, {\"nme\": \"y\"}]}",
		"unknown field \"nme\" in clitest.Inner at \"rInner[1]\" of clitest.Repeated (fields: name, n, child)");
	expect_encode_error(m, "{\"rInner\": [{\"child\": {\"n\": []}}]}",
		"field \"rInner[0].child.n\" of clitest.Repeated: expected int32 (a number or a string of digits), got array");
	size_t len;
	uint8_t *bytes = encode_ok(m, "{\"rInt32\": null, \"rString\": []}", &len);
	cr_expect_eq(len, 0);
	free(bytes);
}

/* ---- oneof, proto2, the demo services ---- */

Test(oneof, members_have_presence)
{
	schema *s = schema_from(&clitest__choice__descriptor, NULL);
	const schema_message *m = schema_find_message(s, "clitest.Choice");
	Clitest__Choice c = CLITEST__CHOICE__INIT;
	c.kind_case = CLITEST__CHOICE__KIND_NUMBER;
	c.number = 0;
	expect_decode(m, &c.base, 0, "{\"number\":0}");
	c.kind_case = CLITEST__CHOICE__KIND_TEXT;
	c.text = "";
	expect_decode(m, &c.base, 0, "{\"text\":\"\"}");
	c.kind_case = CLITEST__CHOICE__KIND__NOT_SET;
	char *got = decode_str(m, "", 0, PBJSON_EMIT_DEFAULTS);
	cr_expect_str_eq(got, "{\"before\":\"\"}");
	free(got);

	size_t len;
	uint8_t *bytes = encode_ok(m, "{\"inner\": {}}", &len);
	Clitest__Choice *u = clitest__choice__unpack(NULL, len, bytes);
	cr_assert_not_null(u);
	cr_expect_eq(u->kind_case, CLITEST__CHOICE__KIND_INNER);
	clitest__choice__free_unpacked(u, NULL);
	free(bytes);
	schema_free(s);
}

Test(oneof, named_oneofs_hold_one_member)
{
	schema *s = schema_from(&clitest__choice__descriptor, "kind");
	const schema_message *m = schema_find_message(s, "clitest.Choice");
	expect_encode_error(m, "{\"text\": \"a\", \"number\": 1}",
		"fields \"text\" and \"number\" of clitest.Choice are both set, but belong to oneof kind");
	/* text = "a" then number = 1 on the wire: the last one holds. */
	char *got = decode_str(m, "\x12\x01\x61\x18\x01", 5, 0);
	cr_expect_str_eq(got, "{\"number\":1}");
	free(got);

	char *text = NULL;
	size_t text_len = 0;
	FILE *f = open_memstream(&text, &text_len);
	schema_print_message(f, m);
	fclose(f);
	cr_expect_str_eq(text, "message clitest.Choice {\n"
			       "  string before = 1;\n"
			       "  oneof kind {\n"
			       "    string text = 2;\n"
			       "    int32 number = 3;\n"
			       "    clitest.Inner inner = 4;\n"
			       "  }\n"
			       "}\n");
	free(text);
	schema_free(s);
}

Test(proto2, required_and_unpacked)
{
	schema *s = schema_from(&clitest2__legacy__descriptor, NULL);
	const schema_message *m = schema_find_message(s, "clitest2.Legacy");
	expect_encode_error(m, "{\"count\": 1}", "field \"id\" of clitest2.Legacy is required");

	Clitest2__Legacy l = CLITEST2__LEGACY__INIT;
	int32_t vals[] = { 1, 2 };
	l.id = 0;
	l.has_count = 1;
	l.count = 3;
	l.n_unpacked = 2;
	l.unpacked = vals;
	expect_decode(m, &l.base, 0, "{\"id\":0,\"count\":3,\"unpacked\":[1,2]}");

	char *text = NULL;
	size_t text_len = 0;
	FILE *f = open_memstream(&text, &text_len);
	schema_print_message(f, m);
	fclose(f);
	cr_expect_str_eq(text, "message clitest2.Legacy {\n"
			       "  required int32 id = 1;\n"
			       "  int32 count = 2;\n"
			       "  string label = 3;\n"
			       "  repeated int32 unpacked = 4;\n"
			       "}\n");
	free(text);
	schema_free(s);
}

Test(demo, list_reply_with_entries)
{
	schema *s = schema_from(&demo__list_reply__descriptor, NULL);
	const schema_message *m = schema_find_message(s, "demo.ListReply");
	Demo__Entry e1 = DEMO__ENTRY__INIT, e2 = DEMO__ENTRY__INIT;
	Demo__Entry *entries[] = { &e1, &e2 };
	e1.key = "a";
	e1.value.data = (uint8_t *)"hi";
	e1.value.len = 2;
	e2.key = "b/c";
	Demo__ListReply r = DEMO__LIST_REPLY__INIT;
	r.n_entries = 2;
	r.entries = entries;
	expect_decode(m, &r.base, 0, "{\"entries\":[{\"key\":\"a\",\"value\":\"aGk=\"},{\"key\":\"b/c\"}]}");

	size_t len;
	uint8_t *bytes = encode_ok(m, "{\"entries\": [{\"key\": \"k\", \"value\": \"_-8\"}, {}]}", &len);
	Demo__ListReply *u = demo__list_reply__unpack(NULL, len, bytes);
	cr_assert_not_null(u);
	cr_assert_eq(u->n_entries, 2);
	cr_expect_str_eq(u->entries[0]->key, "k");
	cr_expect(u->entries[0]->value.len == 2 && memcmp(u->entries[0]->value.data, "\xff\xef", 2) == 0);
	cr_expect_str_eq(u->entries[1]->key, "");
	demo__list_reply__free_unpacked(u, NULL);
	free(bytes);

	/* Pretty output for people: two-space indents, compact empty containers. */
	json_object *obj = parse("{\"entries\": [{\"key\": \"a/b\"}, {}], \"e\": []}");
	cr_expect_str_eq(pbjson_to_string(obj), "{\n"
						 "  \"entries\": [\n"
						 "    {\n"
						 "      \"key\": \"a/b\"\n"
						 "    },\n"
						 "    {}\n"
						 "  ],\n"
						 "  \"e\": []\n"
						 "}");
	json_object_put(obj);
	schema_free(s);
}

/* ---- schemas written by hand ---- */

static Pbrpc__FieldSchema field(const char *name, uint32_t number, Pbrpc__FieldSchema__Type type,
				const char *json_name, const char *type_name)
{
	Pbrpc__FieldSchema f = PBRPC__FIELD_SCHEMA__INIT;
	f.name = (char *)name;
	f.number = number;
	f.type = type;
	f.json_name = (char *)json_name;
	f.type_name = (char *)type_name;
	return f;
}

Test(schema, put_request_by_hand)
{
	Pbrpc__FieldSchema key = field("key", 1, PBRPC__FIELD_SCHEMA__TYPE__STRING, "key", "");
	Pbrpc__FieldSchema value = field("value", 2, PBRPC__FIELD_SCHEMA__TYPE__BYTES, "value", "");
	Pbrpc__FieldSchema delay = field("delay_ms", 3, PBRPC__FIELD_SCHEMA__TYPE__UINT32, "", "");
	Pbrpc__FieldSchema *fields[] = { &key, &value, &delay };
	Pbrpc__MessageSchema put = PBRPC__MESSAGE_SCHEMA__INIT;
	put.name = "demo.PutRequest";
	put.n_fields = 3;
	put.fields = fields;
	Pbrpc__MessageSchema *msgs[] = { &put };
	Pbrpc__MethodInfo mi = PBRPC__METHOD_INFO__INIT;
	mi.name = "Put";
	mi.input_type = ".demo.PutRequest";
	mi.output_type = "demo.PutReply";
	Pbrpc__MethodInfo *mis[] = { &mi };
	Pbrpc__ServiceInfo si = PBRPC__SERVICE_INFO__INIT;
	si.name = "demo.Kv";
	si.n_methods = 1;
	si.methods = mis;
	Pbrpc__ServiceInfo *sis[] = { &si };
	Pbrpc__DescribeReply r = PBRPC__DESCRIBE_REPLY__INIT;
	r.n_services = 1;
	r.services = sis;
	r.n_messages = 1;
	r.messages = msgs;

	schema *s;
	char err[256] = "";
	cr_assert_eq(schema_new(&s, &r, err, sizeof(err)), 0, "%s", err);
	const schema_method *m = schema_find_method(s, "demo.Kv/Put");
	cr_assert_not_null(m);
	cr_expect_str_eq(m->full_name, "demo.Kv/Put");
	cr_expect_eq(m->input, schema_find_message(s, "demo.PutRequest"));
	cr_expect_null(m->output, "demo.PutReply was not described");
	cr_expect_null(schema_find_method(s, "demo.Kv/Get"));
	cr_expect_null(schema_find_method(s, "demo.K/Put"));
	cr_expect_str_eq(schema_field_by_key(m->input, "delay_ms", 8)->json_name, "delayMs");
	cr_expect_eq(schema_field_by_key(m->input, "delayMs", 7)->number, 3);

	expect_encode_error(m->input, "{\"kee\": \"a\"}", "unknown field \"kee\" in demo.PutRequest (fields: key, value, delay_ms)");
	expect_encode_error(m->input, "{\"key\": 5}", "field \"key\" of demo.PutRequest: expected a string, got number 5");
	size_t len;
	uint8_t *bytes = encode_ok(m->input, "{\"key\": \"a\", \"value\": \"aGk=\", \"delayMs\": 2000}", &len);
	cr_assert_eq(len, 10);
	cr_expect(memcmp(bytes, "\x0a\x01" "a\x12\x02hi\x18\xd0\x0f", 10) == 0);
	free(bytes);

	char *text = NULL;
	size_t text_len = 0;
	FILE *f = open_memstream(&text, &text_len);
	schema_print_method(f, schema_find_service(s, "demo.Kv"), m);
	schema_print_message(f, m->input);
	schema_print_service(f, schema_find_service(s, "demo.Kv"));
	fclose(f);
	cr_expect_str_eq(text, "rpc demo.Kv/Put(demo.PutRequest) returns (demo.PutReply);\n"
			       "message demo.PutRequest {\n"
			       "  string key = 1;\n"
			       "  bytes value = 2;\n"
			       "  uint32 delay_ms = 3;  // JSON: \"delayMs\"\n"
			       "}\n"
			       "service demo.Kv {\n"
			       "  rpc Put(demo.PutRequest) returns (demo.PutReply);\n"
			       "}\n");
	free(text);
	schema_free(s);
}

Test(schema, inconsistent_replies_are_refused)
{
	Pbrpc__FieldSchema ref = field("inner", 1, PBRPC__FIELD_SCHEMA__TYPE__MESSAGE, "inner", "x.Missing");
	Pbrpc__FieldSchema *fields[] = { &ref };
	Pbrpc__MessageSchema m = PBRPC__MESSAGE_SCHEMA__INIT;
	m.name = "x.M";
	m.n_fields = 1;
	m.fields = fields;
	Pbrpc__MessageSchema *msgs[] = { &m, &m };
	Pbrpc__DescribeReply r = PBRPC__DESCRIBE_REPLY__INIT;
	r.n_messages = 1;
	r.messages = msgs;
	schema *s = (schema *)1;
	char err[256] = "";
	cr_expect_eq(schema_new(&s, &r, err, sizeof(err)), -EINVAL);
	cr_expect_null(s);
	cr_expect_str_eq(err, "field x.M.inner refers to x.Missing, which the server did not describe");

	ref.type_name = "";
	ref.type = PBRPC__FIELD_SCHEMA__TYPE__INT32;
	r.n_messages = 2;
	cr_expect_eq(schema_new(&s, &r, err, sizeof(err)), -EINVAL);
	cr_expect_str_eq(err, "message x.M is described twice");

	r.n_messages = 1;
	ref.type = (Pbrpc__FieldSchema__Type)40;
	cr_expect_eq(schema_new(&s, &r, err, sizeof(err)), -EINVAL);
	cr_expect_str_eq(err, "field x.M.inner has unknown type 40");

	ref.type = PBRPC__FIELD_SCHEMA__TYPE__INT32;
	ref.number = 0;
	cr_expect_eq(schema_new(&s, &r, err, sizeof(err)), -EINVAL);
	cr_expect_str_eq(err, "field x.M.inner has invalid number 0");
}

Test(schema, json_names)
{
	static const char *const cases[][2] = {
		{ "delay_ms", "delayMs" }, { "f_int32", "fInt32" }, { "already", "already" },
		{ "a__b", "aB" },          { "trailing_", "trailing" }, { "_lead", "Lead" },
		{ "x_1y", "x1y" },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char buf[32];
		schema_json_name(cases[i][0], buf, sizeof(buf));
		cr_expect_str_eq(buf, cases[i][1], "%s", cases[i][0]);
	}
}

/* ---- JSON text ---- */

static void expect_parse_error(const char *text, size_t len, const char *want)
{
	json_object *obj = (json_object *)1;
	char err[256] = "";
	cr_expect_eq(pbjson_parse(text, len, &obj, err, sizeof(err)), -EINVAL, "%s", text);
	cr_expect_null(obj);
	cr_expect_str_eq(err, want, "%s", text);
}

Test(parse, strict_json)
{
	expect_parse_error("{\"a\":", 5, "unexpected end of input");
	expect_parse_error("{\"a\" 1}", 7, "object property name separator ':' expected at offset 5");
	expect_parse_error("{} x", 4, "unexpected character at offset 3");
	expect_parse_error("[1,]", 4, "unexpected character at offset 3");
	expect_parse_error("{} \0", 4, "unexpected NUL byte at offset 3");
	expect_parse_error("  \n", 3, "empty input");
	expect_parse_error("\"\xff\"", 3, "invalid utf-8 string at offset 1");

	json_object *obj = (json_object *)1;
	char err[64];
	cr_expect_eq(pbjson_parse("null", 4, &obj, err, sizeof(err)), 0);
	cr_expect_null(obj);
	cr_expect_eq(pbjson_parse(" 12 ", 4, &obj, err, sizeof(err)), 0);
	cr_expect_eq(json_object_get_int(obj), 12);
	json_object_put(obj);
	cr_expect_eq(pbjson_parse("{\"k\": 1}\n", 9, &obj, err, sizeof(err)), 0);
	json_object_put(obj);
}

/* What json-c accepts even with JSON_TOKENER_STRICT, and protobuf's JSON
 * mapping does not. */
Test(parse, json_c_leniencies_are_errors)
{
	expect_parse_error("{'a': 1}", 8, "single quotes at offset 1: JSON strings and keys take double quotes");
	expect_parse_error("{\"a\": 'x'}", 10, "single quotes at offset 6: JSON strings take double quotes");
	expect_parse_error("{\"a\": NaN}", 10,
		"bare NaN at offset 6 is not JSON (protobuf's JSON mapping writes \"NaN\", \"Infinity\" and "
		"\"-Infinity\" as strings)");
	expect_parse_error("[Infinity]", 10,
		"bare Infinity at offset 1 is not JSON (protobuf's JSON mapping writes \"NaN\", \"Infinity\" and "
		"\"-Infinity\" as strings)");
	expect_parse_error("{\"a\": [1, -Infinity]}", 21,
		"bare -Infinity at offset 10 is not JSON (protobuf's JSON mapping writes \"NaN\", \"Infinity\" and "
		"\"-Infinity\" as strings)");
	expect_parse_error("{\"a\": 1, \"b\": {\"c\": 2, \"c\": 3}}", 32, "duplicate key \"c\" at offset 23");
	expect_parse_error("{\"a\": 1e400}", 12, "number 1e400 at offset 6 is beyond the range of a double");
	expect_parse_error("[-1.5e309]", 10, "number -1.5e309 at offset 1 is beyond the range of a double");
	expect_parse_error("{\"a\": 18446744073709551616}", 27,
		"integer 18446744073709551616 at offset 6 is beyond the 64-bit range (give 64-bit values as strings)");
	expect_parse_error("{\"a\": -9223372036854775809}", 27,
		"integer -9223372036854775809 at offset 6 is beyond the 64-bit range (give 64-bit values as strings)");

	/* The same keys in different objects, the edges of the ranges, and the
	 * strings the mapping uses are fine. */
	json_object *obj;
	char err[256] = "";
	static const char *const good[] = {
		"{\"a\": {\"k\": 1}, \"b\": {\"k\": 2}}",
		"[18446744073709551615, -9223372036854775808, 1.7976931348623157e308, 1e-400]",
		"{\"f\": \"NaN\", \"g\": \"-Infinity\", \"s\": \"it's\"}",
	};
	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		cr_expect_eq(pbjson_parse(good[i], strlen(good[i]), &obj, err, sizeof(err)), 0, "%s: %s", good[i], err);
		json_object_put(obj);
	}
}

/* ---- text format and templates ---- */

static void expect_text(const schema_message *m, const char *json, const char *want)
{
	size_t len;
	uint8_t *bytes = encode_ok(m, json, &len);
	json_object *obj;
	char err[256] = "", *text;
	cr_assert_eq(pbjson_decode(m, bytes, len, 0, &obj, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(pbjson_to_text(m, obj, &text), 0);
	cr_expect_str_eq(text, want, "%s:\n got\n%s want\n%s", json, text, want);
	free(text);
	json_object_put(obj);
	free(bytes);
}

Test(text, every_scalar, .init = setup_scalars, .fini = teardown)
{
	expect_text(MSG("clitest.Scalars"),
		"{\"fInt32\": -1, \"fInt64\": \"-9000000000\", \"fUint64\": \"18446744073709551615\", \"fSint32\": -2,"
		" \"fFloat\": \"-Infinity\", \"fDouble\": 0.5, \"fBool\": true,"
		" \"fString\": \"a\\\"b\\\\c\\n\\u00e9\", \"fBytes\": \"AAEC//4n\", \"fEnum\": \"GREEN\","
		" \"fInner\": {\"name\": \"x\", \"child\": {\"n\": 3}}}",
		"f_int32: -1\n"
		"f_int64: -9000000000\n"
		"f_uint64: 18446744073709551615\n"
		"f_sint32: -2\n"
		"f_float: -inf\n"
		"f_double: 0.5\n"
		"f_bool: true\n"
		"f_string: \"a\\\"b\\\\c\\n\xc3\xa9\"\n"
		"f_bytes: \"\\000\\001\\002\\377\\376\\'\"\n"
		"f_enum: GREEN\n"
		"f_inner {\n"
		"  name: \"x\"\n"
		"  child {\n"
		"    n: 3\n"
		"  }\n"
		"}\n");
	expect_text(MSG("clitest.Scalars"), "{}", "");
}

Test(text, repeated_fields_repeat_their_name, .init = setup_repeated, .fini = teardown)
{
	expect_text(MSG("clitest.Repeated"), "{\"rInt32\": [1, -2], \"rDouble\": [\"NaN\", 1.5]}",
		"r_int32: 1\nr_int32: -2\nr_double: nan\nr_double: 1.5\n");
}

Test(template, every_field, .init = setup_scalars, .fini = teardown)
{
	json_object *t = pbjson_template(MSG("clitest.Scalars"));
	cr_assert_not_null(t);
	cr_expect_str_eq(pbjson_to_compact_string(t),
		"{\"fInt32\":0,\"fInt64\":\"0\",\"fUint32\":0,\"fUint64\":\"0\",\"fSint32\":0,\"fSint64\":\"0\","
		"\"fFixed32\":0,\"fFixed64\":\"0\",\"fSfixed32\":0,\"fSfixed64\":\"0\",\"fFloat\":0.0,\"fDouble\":0.0,"
		"\"fBool\":false,\"fString\":\"\",\"fBytes\":\"\",\"fEnum\":\"COLOR_UNSPECIFIED\","
		"\"fInner\":{\"name\":\"\",\"n\":0,\"child\":{}},\"bigNumber\":0}");
	/* The skeleton is a valid request. */
	uint8_t *out = NULL;
	size_t len;
	char err[256] = "";
	cr_expect_eq(pbjson_encode(MSG("clitest.Scalars"), t, &out, &len, err, sizeof(err)), 0, "%s", err);
	free(out);
	json_object_put(t);
}

Test(template, repeated_fields_hold_one_element, .init = setup_repeated, .fini = teardown)
{
	json_object *t = pbjson_template(MSG("clitest.Repeated"));
	cr_assert_not_null(t);
	cr_expect(strncmp(pbjson_to_compact_string(t), "{\"rInt32\":[0],\"rSint64\":[\"0\"],\"rFixed32\":[0],\"rDouble\":[0.0]", 60) == 0,
		  "%s", pbjson_to_compact_string(t));
	json_object_put(t);
}
