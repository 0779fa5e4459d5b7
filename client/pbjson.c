/* JSON <-> protobuf binary through a run-time schema. See pbjson.h. */
#include "pbjson.h"

#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum wire_type {
	WIRE_VARINT = 0,
	WIRE_FIXED64 = 1,
	WIRE_LEN = 2,
	WIRE_FIXED32 = 5,
};

/* ---- errors ---- */

typedef struct errbuf {
	char *buf;
	size_t len;
} errbuf;

static int fail(errbuf *e, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int fail(errbuf *e, int code, const char *fmt, ...)
{
	if (e->buf && e->len) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(e->buf, e->len, fmt, ap);
		va_end(ap);
	}
	return code;
}

/* ---- growable byte buffer ---- */

typedef struct buf {
	uint8_t *data;
	size_t len, cap;
} buf;

static int buf_reserve(buf *b, size_t extra)
{
	if (b->cap - b->len >= extra)
		return 0;
	if (extra > SIZE_MAX / 2 - b->len)
		return -ENOMEM;
	size_t cap = b->cap ? b->cap : 64;
	while (cap - b->len < extra)
		cap *= 2;
	uint8_t *p = realloc(b->data, cap);
	if (!p)
		return -ENOMEM;
	b->data = p;
	b->cap = cap;
	return 0;
}

static int buf_put(buf *b, const void *p, size_t n)
{
	if (n == 0)
		return 0;
	if (buf_reserve(b, n) < 0)
		return -ENOMEM;
	memcpy(b->data + b->len, p, n);
	b->len += n;
	return 0;
}

static int buf_varint(buf *b, uint64_t v)
{
	uint8_t tmp[10];
	size_t n = 0;
	do {
		tmp[n] = (uint8_t)(v & 0x7f);
		v >>= 7;
		if (v)
			tmp[n] |= 0x80;
		n++;
	} while (v);
	return buf_put(b, tmp, n);
}

static int buf_fixed32(buf *b, uint32_t v)
{
	uint8_t tmp[4];
	for (int i = 0; i < 4; i++)
		tmp[i] = (uint8_t)(v >> (8 * i));
	return buf_put(b, tmp, 4);
}

static int buf_fixed64(buf *b, uint64_t v)
{
	uint8_t tmp[8];
	for (int i = 0; i < 8; i++)
		tmp[i] = (uint8_t)(v >> (8 * i));
	return buf_put(b, tmp, 8);
}

static int buf_tag(buf *b, uint32_t number, enum wire_type wt)
{
	return buf_varint(b, ((uint64_t)number << 3) | wt);
}

/* ---- base64 ---- */

static const char b64_std[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static char *base64_encode(const uint8_t *in, size_t len)
{
	char *out = malloc((len + 2) / 3 * 4 + 1);
	size_t o = 0;
	if (!out)
		return NULL;
	for (size_t i = 0; i < len; i += 3) {
		uint32_t v = (uint32_t)in[i] << 16;
		if (i + 1 < len)
			v |= (uint32_t)in[i + 1] << 8;
		if (i + 2 < len)
			v |= in[i + 2];
		out[o++] = b64_std[(v >> 18) & 63];
		out[o++] = b64_std[(v >> 12) & 63];
		out[o++] = i + 1 < len ? b64_std[(v >> 6) & 63] : '=';
		out[o++] = i + 2 < len ? b64_std[v & 63] : '=';
	}
	out[o] = '\0';
	return out;
}

static int b64_value(char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+' || c == '-')
		return 62;
	if (c == '/' || c == '_')
		return 63;
	return -1;
}

/* Standard or URL-safe alphabet, padding optional. Appends to out. Returns 0
 * or -EINVAL (bad character, bad length, padding in the middle). */
static int base64_decode(const char *in, size_t len, buf *out)
{
	while (len > 0 && in[len - 1] == '=' && len % 4 != 1)
		len--;
	if (len % 4 == 1)
		return -EINVAL;
	uint32_t acc = 0;
	int bits = 0;
	for (size_t i = 0; i < len; i++) {
		int v = b64_value(in[i]);
		if (v < 0)
			return -EINVAL;
		acc = (acc << 6) | (uint32_t)v;
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			uint8_t byte = (uint8_t)(acc >> bits);
			if (buf_put(out, &byte, 1) < 0)
				return -ENOMEM;
		}
	}
	return 0;
}

/* ---- UTF-8 ---- */

static bool utf8_valid(const uint8_t *s, size_t len)
{
	size_t i = 0;
	while (i < len) {
		uint8_t c = s[i];
		size_t n;
		uint32_t cp;
		if (c < 0x80) {
			i++;
			continue;
		} else if ((c & 0xe0) == 0xc0) {
			n = 1;
			cp = c & 0x1f;
		} else if ((c & 0xf0) == 0xe0) {
			n = 2;
			cp = c & 0x0f;
		} else if ((c & 0xf8) == 0xf0) {
			n = 3;
			cp = c & 0x07;
		} else {
			return false;
		}
		if (len - i <= n)
			return false;
		for (size_t k = 1; k <= n; k++) {
			if ((s[i + k] & 0xc0) != 0x80)
				return false;
			cp = (cp << 6) | (s[i + k] & 0x3f);
		}
		if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) || cp > 0x10ffff ||
		    (cp >= 0xd800 && cp <= 0xdfff))
			return false;
		i += n + 1;
	}
	return true;
}

/* ---- parsing JSON text ---- */

static bool all_space(const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (s[i] != ' ' && s[i] != '\t' && s[i] != '\n' && s[i] != '\r')
			return false;
	return true;
}

int pbjson_parse(const char *text, size_t len, json_object **out, char *err, size_t errlen)
{
	errbuf e = { err, errlen };
	json_tokener *tok;
	json_object *obj;
	enum json_tokener_error jerr;
	size_t end;
	int rc = 0;

	*out = NULL;
	if (len > INT32_MAX - 1)
		return fail(&e, -EINVAL, "request too large");
	if (all_space(text, len))
		return fail(&e, -EINVAL, "empty input");
	tok = json_tokener_new_ex(PBJSON_MAX_DEPTH);
	if (!tok)
		return fail(&e, -ENOMEM, "out of memory");
	json_tokener_set_flags(tok, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8);
	obj = json_tokener_parse_ex(tok, text, (int)len);
	jerr = json_tokener_get_error(tok);
	end = json_tokener_get_parse_end(tok);
	if (jerr == json_tokener_continue) {
		/* A bare number needs to see the end of the text to finish. */
		obj = json_tokener_parse_ex(tok, "", 1);
		jerr = json_tokener_get_error(tok);
		end = len;
		if (jerr == json_tokener_continue || (jerr != json_tokener_success && !obj))
			rc = fail(&e, -EINVAL, "unexpected end of input");
	} else if (jerr != json_tokener_success) {
		rc = fail(&e, -EINVAL, "%s at offset %zu", json_tokener_error_desc(jerr), end);
	} else if (!all_space(text + end, len - end)) {
		/* json-c stops at a NUL byte and reports success. */
		rc = fail(&e, -EINVAL, "unexpected %s at offset %zu", text[end] ? "character" : "NUL byte", end);
	}
	json_tokener_free(tok);
	if (rc < 0) {
		json_object_put(obj);
		return rc;
	}
	*out = obj;
	return 0;
}

/* ---- encoding ---- */

typedef struct encoder {
	errbuf err;
	const schema_message *root;
	char path[512]; /* "entries[2].value", for messages */
	size_t path_len;
} encoder;

static const char *json_kind(json_object *v)
{
	switch (json_object_get_type(v)) {
	case json_type_null: return "null";
	case json_type_boolean: return "boolean";
	case json_type_double:
	case json_type_int: return "number";
	case json_type_object: return "object";
	case json_type_array: return "array";
	case json_type_string: return "string";
	}
	return "value";
}

static size_t path_append(encoder *enc, int n)
{
	size_t old = enc->path_len;
	if (n > 0)
		enc->path_len = old + (size_t)n < sizeof(enc->path) ? old + (size_t)n : sizeof(enc->path) - 1;
	return old;
}

/* Extends the path by a field name or an array index; returns the old length
 * for path_pop. */
static size_t path_push(encoder *enc, const char *name)
{
	size_t old = enc->path_len;
	return path_append(enc, snprintf(enc->path + old, sizeof(enc->path) - old, "%s%s", old ? "." : "", name));
}

static size_t path_push_index(encoder *enc, size_t index)
{
	size_t old = enc->path_len;
	return path_append(enc, snprintf(enc->path + old, sizeof(enc->path) - old, "[%zu]", index));
}

static void path_pop(encoder *enc, size_t old)
{
	enc->path_len = old;
	enc->path[old] = '\0';
}

/* "field "entries[0].value" of demo.ListReply: " */
static int bad_value(encoder *enc, json_object *v, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int bad_value(encoder *enc, json_object *v, const char *fmt, ...)
{
	char what[256];
	char shown[64] = "";
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	json_type jt = json_object_get_type(v);
	if (jt != json_type_null && jt != json_type_object && jt != json_type_array) {
		const char *t = json_object_to_json_string_ext(v, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
		if (strlen(t) > 40)
			snprintf(shown, sizeof(shown), " %.37s...", t);
		else
			snprintf(shown, sizeof(shown), " %s", t);
	}
	return fail(&enc->err, -EINVAL, "field \"%s\" of %s: %s, got %s%s", enc->path, enc->root->name, what,
		    json_kind(v), shown);
}

static bool is_numeric_type(ProtobufCType t)
{
	return t != PROTOBUF_C_TYPE_STRING && t != PROTOBUF_C_TYPE_BYTES && t != PROTOBUF_C_TYPE_MESSAGE;
}

/* An integer from a JSON number or string, as sign and magnitude so that the
 * whole int64 and uint64 ranges fit. Returns 0, -EINVAL (not an integer), or
 * -ERANGE (an integer beyond 64 bits). */
static int json_integer(json_object *v, bool *neg, uint64_t *mag)
{
	double d;
	switch (json_object_get_type(v)) {
	case json_type_int: {
		int64_t i = json_object_get_int64(v);
		*neg = i < 0;
		if (i < 0)
			*mag = (uint64_t)0 - (uint64_t)i;
		else if (i == INT64_MAX)
			*mag = json_object_get_uint64(v); /* json-c keeps values above INT64_MAX as uint64 */
		else
			*mag = (uint64_t)i;
		return 0;
	}
	case json_type_double:
		d = json_object_get_double(v);
		break;
	case json_type_string: {
		const char *s = json_object_get_string(v);
		size_t len = (size_t)json_object_get_string_len(v);
		const char *digits = s[0] == '-' ? s + 1 : s;
		if (len == 0 || strlen(s) != len)
			return -EINVAL;
		if (strspn(digits, "0123456789") == strlen(digits) && digits[0]) {
			errno = 0;
			*mag = strtoull(digits, NULL, 10);
			if (errno == ERANGE)
				return -ERANGE;
			*neg = s[0] == '-' && *mag != 0;
			return 0;
		}
		if (!strpbrk(s, ".eE"))
			return -EINVAL;
		char *end;
		d = strtod(s, &end);
		if (*end || s[0] == ' ' || !strpbrk(s, "0123456789"))
			return -EINVAL;
		break;
	}
	default:
		return -EINVAL;
	}
	if (!isfinite(d) || d != floor(d))
		return -EINVAL;
	if (fabs(d) >= 18446744073709551616.0)
		return -ERANGE;
	*neg = d < 0;
	*mag = (uint64_t)fabs(d);
	return 0;
}

static const char *int_range(ProtobufCType t)
{
	switch (t) {
	case PROTOBUF_C_TYPE_INT64:
	case PROTOBUF_C_TYPE_SINT64:
	case PROTOBUF_C_TYPE_SFIXED64:
		return "-9223372036854775808 to 9223372036854775807";
	case PROTOBUF_C_TYPE_UINT32:
	case PROTOBUF_C_TYPE_FIXED32:
		return "0 to 4294967295";
	case PROTOBUF_C_TYPE_UINT64:
	case PROTOBUF_C_TYPE_FIXED64:
		return "0 to 18446744073709551615";
	default:
		return "-2147483648 to 2147483647";
	}
}

/* Range-checks an integer for field f and returns its two's complement bits. */
static int encode_integer(encoder *enc, const schema_field *f, json_object *v, uint64_t *out)
{
	bool neg = false;
	uint64_t mag = 0;
	int rc = json_integer(v, &neg, &mag);
	const char *tn = f->type == PROTOBUF_C_TYPE_ENUM ? "an enum number" : schema_field_type_name(f);
	if (rc == -EINVAL)
		return bad_value(enc, v, "expected %s (a number or a string of digits)", tn);
	bool ok = rc == 0;
	switch (f->type) {
	case PROTOBUF_C_TYPE_INT32:
	case PROTOBUF_C_TYPE_SINT32:
	case PROTOBUF_C_TYPE_SFIXED32:
	case PROTOBUF_C_TYPE_ENUM:
		ok = ok && (neg ? mag <= (uint64_t)INT32_MAX + 1 : mag <= INT32_MAX);
		break;
	case PROTOBUF_C_TYPE_INT64:
	case PROTOBUF_C_TYPE_SINT64:
	case PROTOBUF_C_TYPE_SFIXED64:
		ok = ok && (neg ? mag <= (uint64_t)INT64_MAX + 1 : mag <= INT64_MAX);
		break;
	case PROTOBUF_C_TYPE_UINT32:
	case PROTOBUF_C_TYPE_FIXED32:
		ok = ok && !neg && mag <= UINT32_MAX;
		break;
	default: /* UINT64, FIXED64 */
		ok = ok && !neg;
		break;
	}
	if (!ok)
		return bad_value(enc, v, "expected %s (%s)", tn, int_range(f->type));
	*out = neg ? (uint64_t)0 - mag : mag;
	return 0;
}

static int encode_float(encoder *enc, const schema_field *f, json_object *v, double *out)
{
	double d;
	if (json_object_is_type(v, json_type_int) || json_object_is_type(v, json_type_double)) {
		d = json_object_get_double(v);
	} else if (json_object_is_type(v, json_type_string)) {
		const char *s = json_object_get_string(v);
		char *end;
		if (strcmp(s, "NaN") == 0) {
			d = NAN;
		} else if (strcmp(s, "Infinity") == 0) {
			d = INFINITY;
		} else if (strcmp(s, "-Infinity") == 0) {
			d = -INFINITY;
		} else {
			d = strtod(s, &end);
			if (!s[0] || *end || !strpbrk(s, "0123456789") || strpbrk(s, " \t\nxXnNiI"))
				return bad_value(enc, v, "expected %s (a number, \"NaN\", \"Infinity\" or \"-Infinity\")",
						 schema_field_type_name(f));
			if (isinf(d))
				return bad_value(enc, v, "expected %s (a finite number)", schema_field_type_name(f));
		}
	} else {
		return bad_value(enc, v, "expected %s (a number, \"NaN\", \"Infinity\" or \"-Infinity\")",
				 schema_field_type_name(f));
	}
	/* Above FLT_MAX by less than half a unit in the last place still rounds
	 * to FLT_MAX (it is how FLT_MAX prints in shortest form). */
	if (f->type == PROTOBUF_C_TYPE_FLOAT && isfinite(d) && fabs(d) >= 0x1.ffffffp+127)
		return bad_value(enc, v, "expected float (magnitude at most 3.4028235e+38)");
	*out = d;
	return 0;
}

static int encode_enum(encoder *enc, const schema_field *f, json_object *v, uint64_t *out)
{
	const schema_enum *e = f->enumeration;
	if (json_object_is_type(v, json_type_string)) {
		int32_t n;
		const char *s = json_object_get_string(v);
		if (schema_enum_number(e, s, (size_t)json_object_get_string_len(v), &n)) {
			*out = (uint64_t)(int64_t)n;
			return 0;
		}
		char names[160] = "";
		size_t o = 0;
		for (size_t i = 0; i < e->n_values && o < sizeof(names); i++) {
			int n2 = snprintf(names + o, sizeof(names) - o, "%s%s", i ? ", " : "", e->values[i].name);
			o += n2 > 0 ? (size_t)n2 : 0;
		}
		if (o >= sizeof(names))
			strcpy(names + sizeof(names) - 4, "...");
		return bad_value(enc, v, "expected a value of enum %s (%s)", e->name, names);
	}
	if (json_object_is_type(v, json_type_int) || json_object_is_type(v, json_type_double))
		return encode_integer(enc, f, v, out);
	return bad_value(enc, v, "expected a value of enum %s (a name or a number)", e->name);
}

static int encode_message(encoder *enc, const schema_message *msg, json_object *obj, buf *out, int depth);

/* Appends the value of a scalar field without its tag. */
static int encode_scalar(encoder *enc, const schema_field *f, json_object *v, buf *out)
{
	uint64_t u = 0;
	double d = 0;
	int rc;

	switch (f->type) {
	case PROTOBUF_C_TYPE_INT32:
	case PROTOBUF_C_TYPE_INT64:
	case PROTOBUF_C_TYPE_UINT32:
	case PROTOBUF_C_TYPE_UINT64:
		if ((rc = encode_integer(enc, f, v, &u)) < 0)
			return rc;
		/* int32 negatives are sign-extended to ten bytes, as protobuf does. */
		if (f->type == PROTOBUF_C_TYPE_INT32)
			u = (uint64_t)(int64_t)(int32_t)(uint32_t)u;
		return buf_varint(out, u);
	case PROTOBUF_C_TYPE_SINT32:
		if ((rc = encode_integer(enc, f, v, &u)) < 0)
			return rc;
		return buf_varint(out, ((uint32_t)u << 1) ^ (uint32_t)((int32_t)(uint32_t)u >> 31));
	case PROTOBUF_C_TYPE_SINT64:
		if ((rc = encode_integer(enc, f, v, &u)) < 0)
			return rc;
		return buf_varint(out, (u << 1) ^ (uint64_t)((int64_t)u >> 63));
	case PROTOBUF_C_TYPE_FIXED32:
	case PROTOBUF_C_TYPE_SFIXED32:
		if ((rc = encode_integer(enc, f, v, &u)) < 0)
			return rc;
		return buf_fixed32(out, (uint32_t)u);
	case PROTOBUF_C_TYPE_FIXED64:
	case PROTOBUF_C_TYPE_SFIXED64:
		if ((rc = encode_integer(enc, f, v, &u)) < 0)
			return rc;
		return buf_fixed64(out, u);
	case PROTOBUF_C_TYPE_FLOAT: {
		if ((rc = encode_float(enc, f, v, &d)) < 0)
			return rc;
		float fl = (float)d;
		uint32_t bits;
		memcpy(&bits, &fl, 4);
		return buf_fixed32(out, bits);
	}
	case PROTOBUF_C_TYPE_DOUBLE:
		if ((rc = encode_float(enc, f, v, &d)) < 0)
			return rc;
		memcpy(&u, &d, 8);
		return buf_fixed64(out, u);
	case PROTOBUF_C_TYPE_BOOL:
		if (!json_object_is_type(v, json_type_boolean))
			return bad_value(enc, v, "expected a boolean (true or false)");
		return buf_varint(out, json_object_get_boolean(v) ? 1 : 0);
	case PROTOBUF_C_TYPE_ENUM:
		if ((rc = encode_enum(enc, f, v, &u)) < 0)
			return rc;
		return buf_varint(out, (uint64_t)(int64_t)(int32_t)(uint32_t)u);
	default:
		return fail(&enc->err, -EINVAL, "field \"%s\" of %s: unsupported type %d", enc->path,
			    enc->root->name, (int)f->type);
	}
}

/* Appends a length-delimited value (string, bytes or message) without its tag. */
static int encode_delimited(encoder *enc, const schema_field *f, json_object *v, buf *out, int depth)
{
	buf tmp = { 0 };
	int rc;

	switch (f->type) {
	case PROTOBUF_C_TYPE_STRING:
		if (!json_object_is_type(v, json_type_string))
			return bad_value(enc, v, "expected a string");
		rc = buf_varint(out, (uint64_t)json_object_get_string_len(v));
		if (rc == 0)
			rc = buf_put(out, json_object_get_string(v), (size_t)json_object_get_string_len(v));
		return rc;
	case PROTOBUF_C_TYPE_BYTES:
		if (!json_object_is_type(v, json_type_string))
			return bad_value(enc, v, "expected a base64 string");
		rc = base64_decode(json_object_get_string(v), (size_t)json_object_get_string_len(v), &tmp);
		if (rc == -EINVAL)
			rc = bad_value(enc, v, "expected a base64 string");
		break;
	case PROTOBUF_C_TYPE_MESSAGE:
		if (!json_object_is_type(v, json_type_object))
			return bad_value(enc, v, "expected a JSON object for message %s", f->message->name);
		rc = encode_message(enc, f->message, v, &tmp, depth + 1);
		break;
	default:
		return -EINVAL;
	}
	if (rc == 0)
		rc = buf_varint(out, tmp.len);
	if (rc == 0)
		rc = buf_put(out, tmp.data, tmp.len);
	free(tmp.data);
	return rc;
}

static enum wire_type wire_type_of(ProtobufCType t)
{
	switch (t) {
	case PROTOBUF_C_TYPE_SFIXED32:
	case PROTOBUF_C_TYPE_FIXED32:
	case PROTOBUF_C_TYPE_FLOAT:
		return WIRE_FIXED32;
	case PROTOBUF_C_TYPE_SFIXED64:
	case PROTOBUF_C_TYPE_FIXED64:
	case PROTOBUF_C_TYPE_DOUBLE:
		return WIRE_FIXED64;
	case PROTOBUF_C_TYPE_STRING:
	case PROTOBUF_C_TYPE_BYTES:
	case PROTOBUF_C_TYPE_MESSAGE:
		return WIRE_LEN;
	default:
		return WIRE_VARINT;
	}
}

/* A field's value with its tag. Proto3 implicit-presence fields holding their
 * default are left out, as a protobuf encoder would. */
static int encode_single(encoder *enc, const schema_field *f, json_object *v, buf *out, int depth)
{
	enum wire_type wt = wire_type_of(f->type);
	size_t mark = out->len;
	int rc = buf_tag(out, f->number, wt);
	if (rc < 0)
		return rc;
	size_t value_at = out->len;
	rc = wt == WIRE_LEN ? encode_delimited(enc, f, v, out, depth) : encode_scalar(enc, f, v, out);
	if (rc < 0)
		return rc;
	if (f->label == SCHEMA_OPTIONAL && f->type != PROTOBUF_C_TYPE_MESSAGE) {
		bool zero = true;
		for (size_t i = value_at; i < out->len && zero; i++)
			zero = out->data[i] == 0;
		/* A float or double -0.0 has bits set and is kept, as protobuf does. */
		if (zero)
			out->len = mark;
	}
	return 0;
}

static int encode_repeated(encoder *enc, const schema_field *f, json_object *arr, buf *out, int depth)
{
	size_t n = json_object_array_length(arr);
	int rc = 0;
	buf packed = { 0 };
	bool pack = f->packed && is_numeric_type(f->type);

	for (size_t i = 0; i < n && rc == 0; i++) {
		json_object *v = json_object_array_get_idx(arr, i);
		size_t old = path_push_index(enc, i);
		if (!v)
			rc = bad_value(enc, v, "expected %s elements", schema_field_type_name(f));
		else if (pack)
			rc = encode_scalar(enc, f, v, &packed);
		else if ((rc = buf_tag(out, f->number, wire_type_of(f->type))) == 0)
			rc = wire_type_of(f->type) == WIRE_LEN ? encode_delimited(enc, f, v, out, depth)
								: encode_scalar(enc, f, v, out);
		if (rc == 0)
			path_pop(enc, old);
	}
	if (rc == 0 && pack && packed.len > 0) {
		rc = buf_tag(out, f->number, WIRE_LEN);
		if (rc == 0)
			rc = buf_varint(out, packed.len);
		if (rc == 0)
			rc = buf_put(out, packed.data, packed.len);
	}
	free(packed.data);
	return rc;
}

static int unknown_field(encoder *enc, const schema_message *msg, const char *key)
{
	char names[256] = "";
	size_t o = 0;
	for (size_t i = 0; i < msg->n_fields && o < sizeof(names); i++) {
		int n = snprintf(names + o, sizeof(names) - o, "%s%s", i ? ", " : "", msg->fields[i].name);
		o += n > 0 ? (size_t)n : 0;
	}
	if (o >= sizeof(names))
		strcpy(names + sizeof(names) - 4, "...");
	if (enc->path_len)
		return fail(&enc->err, -EINVAL, "unknown field \"%s\" in %s at \"%s\" of %s (fields: %s)", key,
			    msg->name, enc->path, enc->root->name, msg->n_fields ? names : "none");
	return fail(&enc->err, -EINVAL, "unknown field \"%s\" in %s (fields: %s)", key, msg->name,
		    msg->n_fields ? names : "none");
}

static int encode_message(encoder *enc, const schema_message *msg, json_object *obj, buf *out, int depth)
{
	if (depth > PBJSON_MAX_DEPTH)
		return fail(&enc->err, -EINVAL, "field \"%s\" of %s: messages nested deeper than %d", enc->path,
			    enc->root->name, PBJSON_MAX_DEPTH);
	json_object **vals = calloc(msg->n_fields + 1, sizeof(*vals));
	if (!vals)
		return -ENOMEM;
	int rc = 0;

	/* First map every key to a field, so that errors about keys come first
	 * and the output is in field order whatever the order of the keys. */
	struct json_object_iterator it = json_object_iter_begin(obj), end = json_object_iter_end(obj);
	for (; !json_object_iter_equal(&it, &end); json_object_iter_next(&it)) {
		const char *key = json_object_iter_peek_name(&it);
		json_object *val = json_object_iter_peek_value(&it);
		const schema_field *f = schema_field_by_key(msg, key, strlen(key));
		if (!f) {
			rc = unknown_field(enc, msg, key);
			goto out;
		}
		size_t idx = (size_t)(f - msg->fields);
		size_t old = path_push(enc, f->json_name);
		if (vals[idx]) {
			rc = fail(&enc->err, -EINVAL, "field \"%s\" of %s is given twice (as \"%s\" and \"%s\")",
				  enc->path, enc->root->name, f->name, f->json_name);
			goto out;
		}
		path_pop(enc, old);
		if (!val)
			continue; /* null: the default */
		vals[idx] = val;
		if (f->oneof[0]) {
			for (size_t j = 0; j < msg->n_fields; j++) {
				if (j != idx && vals[j] && strcmp(msg->fields[j].oneof, f->oneof) == 0) {
					rc = fail(&enc->err, -EINVAL,
						  "fields \"%s\" and \"%s\" of %s are both set, but belong to oneof %s",
						  msg->fields[j].json_name, f->json_name, msg->name, f->oneof);
					goto out;
				}
			}
		}
	}

	for (size_t i = 0; i < msg->n_fields && rc == 0; i++) {
		const schema_field *f = &msg->fields[i];
		json_object *v = vals[i];
		size_t old = path_push(enc, f->json_name);
		if (!v) {
			if (f->label == SCHEMA_REQUIRED)
				rc = fail(&enc->err, -EINVAL, "field \"%s\" of %s is required", enc->path, enc->root->name);
		} else if (f->label == SCHEMA_REPEATED) {
			if (!json_object_is_type(v, json_type_array))
				rc = bad_value(enc, v, "expected an array of %s", schema_field_type_name(f));
			else
				rc = encode_repeated(enc, f, v, out, depth);
		} else {
			rc = encode_single(enc, f, v, out, depth);
		}
		if (rc == 0)
			path_pop(enc, old);
	}
out:
	free(vals);
	return rc;
}

int pbjson_encode(const schema_message *msg, json_object *obj, uint8_t **out, size_t *out_len, char *err,
		  size_t errlen)
{
	encoder enc = { .err = { err, errlen }, .root = msg };
	buf b = { 0 };
	*out = NULL;
	*out_len = 0;
	if (!json_object_is_type(obj, json_type_object))
		return fail(&enc.err, -EINVAL, "the request for %s must be a JSON object, not %s", msg->name,
			    obj ? json_kind(obj) : "null");
	int rc = encode_message(&enc, msg, obj, &b, 0);
	if (rc < 0) {
		free(b.data);
		if (rc == -ENOMEM)
			fail(&enc.err, rc, "out of memory");
		return rc;
	}
	*out = b.data;
	*out_len = b.len;
	return 0;
}

/* ---- decoding ---- */

typedef struct decoder {
	errbuf err;
	unsigned flags;
} decoder;

typedef struct reader {
	const uint8_t *p, *end;
} reader;

static bool read_varint(reader *r, uint64_t *out)
{
	uint64_t v = 0;
	for (int shift = 0; shift < 64; shift += 7) {
		if (r->p >= r->end)
			return false;
		uint8_t b = *r->p++;
		if (shift == 63 && b > 1)
			return false;
		v |= (uint64_t)(b & 0x7f) << shift;
		if (!(b & 0x80)) {
			*out = v;
			return true;
		}
	}
	return false;
}

static bool read_fixed(reader *r, size_t n, uint64_t *out)
{
	if ((size_t)(r->end - r->p) < n)
		return false;
	uint64_t v = 0;
	for (size_t i = 0; i < n; i++)
		v |= (uint64_t)r->p[i] << (8 * i);
	r->p += n;
	*out = v;
	return true;
}

static bool read_delimited(reader *r, reader *sub)
{
	uint64_t len;
	if (!read_varint(r, &len) || len > (uint64_t)(r->end - r->p))
		return false;
	sub->p = r->p;
	sub->end = r->p + len;
	r->p += len;
	return true;
}

/* Shortest text that reads back as the same value, as protobuf prints it. */
static json_object *new_float(double d, bool single)
{
	char text[40];
	if (isnan(d))
		return json_object_new_string("NaN");
	if (isinf(d))
		return json_object_new_string(d > 0 ? "Infinity" : "-Infinity");
	for (int prec = single ? 6 : 15; prec <= 17; prec++) {
		snprintf(text, sizeof(text), "%.*g", prec, d);
		if (single ? strtof(text, NULL) == (float)d : strtod(text, NULL) == d)
			break;
	}
	return json_object_new_double_s(d, text);
}

static json_object *new_u64_string(uint64_t v)
{
	char text[24];
	snprintf(text, sizeof(text), "%" PRIu64, v);
	return json_object_new_string(text);
}

static json_object *new_i64_string(int64_t v)
{
	char text[24];
	snprintf(text, sizeof(text), "%" PRId64, v);
	return json_object_new_string(text);
}

static json_object *enum_value(const schema_field *f, int32_t n)
{
	const char *name = schema_enum_name(f->enumeration, n);
	return name ? json_object_new_string(name) : json_object_new_int(n);
}

/* One scalar value (wire type already checked) as JSON; *is_default says
 * whether it is the type's zero value. */
static json_object *scalar_json(const schema_field *f, uint64_t raw, bool *is_default)
{
	*is_default = raw == 0;
	switch (f->type) {
	case PROTOBUF_C_TYPE_INT32:
		*is_default = (uint32_t)raw == 0;
		return json_object_new_int((int32_t)(uint32_t)raw);
	case PROTOBUF_C_TYPE_SFIXED32:
		return json_object_new_int((int32_t)(uint32_t)raw);
	case PROTOBUF_C_TYPE_SINT32: {
		uint32_t u = (uint32_t)raw;
		*is_default = u == 0;
		return json_object_new_int((int32_t)((u >> 1) ^ (uint32_t)-(int32_t)(u & 1)));
	}
	case PROTOBUF_C_TYPE_UINT32:
		*is_default = (uint32_t)raw == 0;
		return json_object_new_int64((uint32_t)raw);
	case PROTOBUF_C_TYPE_FIXED32:
		return json_object_new_int64((uint32_t)raw);
	case PROTOBUF_C_TYPE_INT64:
	case PROTOBUF_C_TYPE_SFIXED64:
		return new_i64_string((int64_t)raw);
	case PROTOBUF_C_TYPE_SINT64:
		return new_i64_string((int64_t)((raw >> 1) ^ -(raw & 1)));
	case PROTOBUF_C_TYPE_UINT64:
	case PROTOBUF_C_TYPE_FIXED64:
		return new_u64_string(raw);
	case PROTOBUF_C_TYPE_BOOL:
		return json_object_new_boolean(raw != 0);
	case PROTOBUF_C_TYPE_ENUM:
		*is_default = (int32_t)(uint32_t)raw == 0;
		return enum_value(f, (int32_t)(uint32_t)raw);
	case PROTOBUF_C_TYPE_FLOAT: {
		float fl;
		uint32_t bits = (uint32_t)raw;
		memcpy(&fl, &bits, 4);
		*is_default = bits == 0;
		return new_float(fl, true);
	}
	case PROTOBUF_C_TYPE_DOUBLE: {
		double d;
		memcpy(&d, &raw, 8);
		return new_float(d, false);
	}
	default:
		return NULL;
	}
}

/* The value a field prints as when absent and PBJSON_EMIT_DEFAULTS is set. */
static json_object *default_json(const schema_field *f)
{
	bool dummy;
	switch (f->type) {
	case PROTOBUF_C_TYPE_STRING:
	case PROTOBUF_C_TYPE_BYTES:
		return json_object_new_string("");
	case PROTOBUF_C_TYPE_MESSAGE:
		return NULL; /* JSON null, as protobuf's printers emit for unset messages */
	default:
		return scalar_json(f, 0, &dummy);
	}
}

static bool read_scalar(reader *r, const schema_field *f, uint64_t *raw)
{
	switch (wire_type_of(f->type)) {
	case WIRE_FIXED32:
		return read_fixed(r, 4, raw);
	case WIRE_FIXED64:
		return read_fixed(r, 8, raw);
	default:
		return read_varint(r, raw);
	}
}

/* Per-field state while decoding one message. */
typedef struct slot {
	json_object *val; /* last value (singular) or array (repeated) */
	bool present;
	bool is_default;
	buf msg;          /* singular message: every occurrence's bytes, merged */
} slot;

static int decode_message(decoder *dec, const schema_message *msg, reader *r, json_object **out, int depth);

static int decoded_json(decoder *dec, const schema_field *f, reader *sub, json_object **out, bool *is_default,
			int depth)
{
	size_t len = (size_t)(sub->end - sub->p);
	*is_default = len == 0;
	if (f->type == PROTOBUF_C_TYPE_MESSAGE)
		return decode_message(dec, f->message, sub, out, depth + 1);
	if (f->type == PROTOBUF_C_TYPE_STRING) {
		if (!utf8_valid(sub->p, len))
			return fail(&dec->err, -EBADMSG, "field %s is not valid UTF-8", f->name);
		*out = json_object_new_string_len((const char *)sub->p, (int)len);
		return *out ? 0 : -ENOMEM;
	}
	char *b64 = base64_encode(sub->p, len);
	if (!b64)
		return -ENOMEM;
	*out = json_object_new_string(b64);
	free(b64);
	return *out ? 0 : -ENOMEM;
}

static int decode_field(decoder *dec, const schema_message *msg, const schema_field *f, slot *s,
			enum wire_type wt, reader *r, int depth)
{
	enum wire_type want = wire_type_of(f->type);
	bool repeated = f->label == SCHEMA_REPEATED;
	json_object *v = NULL;
	bool is_default = false;
	reader sub;
	uint64_t raw;
	int rc;

	if (wt != want && !(repeated && wt == WIRE_LEN && is_numeric_type(f->type)))
		return fail(&dec->err, -EBADMSG, "field %s of %s has wire type %d, expected %d", f->name,
			    msg->name, (int)wt, (int)want);
	if (repeated && !s->val) {
		s->val = json_object_new_array();
		if (!s->val)
			return -ENOMEM;
	}

	if (want == WIRE_LEN) {
		if (!read_delimited(r, &sub))
			return fail(&dec->err, -EBADMSG, "field %s of %s is truncated", f->name, msg->name);
		if (f->type == PROTOBUF_C_TYPE_MESSAGE && !repeated) {
			/* Occurrences of a singular message merge, like concatenated encodings. */
			s->present = true;
			return buf_put(&s->msg, sub.p, (size_t)(sub.end - sub.p));
		}
		if ((rc = decoded_json(dec, f, &sub, &v, &is_default, depth)) < 0)
			return rc;
	} else if (wt == WIRE_LEN) {
		/* A packed run of scalars. */
		if (!read_delimited(r, &sub))
			return fail(&dec->err, -EBADMSG, "field %s of %s is truncated", f->name, msg->name);
		while (sub.p < sub.end) {
			if (!read_scalar(&sub, f, &raw))
				return fail(&dec->err, -EBADMSG, "packed field %s of %s is truncated", f->name,
					    msg->name);
			if (!(v = scalar_json(f, raw, &is_default)) || json_object_array_add(s->val, v) < 0) {
				json_object_put(v);
				return -ENOMEM;
			}
		}
		return 0;
	} else {
		if (!read_scalar(r, f, &raw))
			return fail(&dec->err, -EBADMSG, "field %s of %s is truncated", f->name, msg->name);
		if (!(v = scalar_json(f, raw, &is_default)))
			return -ENOMEM;
	}

	if (repeated) {
		if (json_object_array_add(s->val, v) < 0) {
			json_object_put(v);
			return -ENOMEM;
		}
		return 0;
	}
	json_object_put(s->val);
	s->val = v;
	s->present = true;
	s->is_default = is_default;
	return 0;
}

static int skip_field(decoder *dec, const schema_message *msg, uint32_t number, enum wire_type wt, reader *r)
{
	uint64_t dummy;
	reader sub;
	bool ok;
	switch ((int)wt) {
	case WIRE_VARINT: ok = read_varint(r, &dummy); break;
	case WIRE_FIXED64: ok = read_fixed(r, 8, &dummy); break;
	case WIRE_LEN: ok = read_delimited(r, &sub); break;
	case WIRE_FIXED32: ok = read_fixed(r, 4, &dummy); break;
	default:
		return fail(&dec->err, -EBADMSG, "field %u of %s has unsupported wire type %d", number, msg->name,
			    (int)wt);
	}
	return ok ? 0 : fail(&dec->err, -EBADMSG, "field %u of %s is truncated", number, msg->name);
}

/* A oneof holds its last member seen on the wire. */
static void clear_oneof(const schema_message *msg, slot *slots, size_t keep)
{
	const char *oneof = msg->fields[keep].oneof;
	if (!oneof[0])
		return;
	for (size_t i = 0; i < msg->n_fields; i++) {
		if (i == keep || strcmp(msg->fields[i].oneof, oneof) != 0)
			continue;
		json_object_put(slots[i].val);
		slots[i].val = NULL;
		slots[i].present = false;
		slots[i].msg.len = 0;
	}
}

/* Builds the JSON object from the collected slots, in field order. */
static int build_object(decoder *dec, const schema_message *msg, slot *slots, json_object *obj, int depth)
{
	bool emit = dec->flags & PBJSON_EMIT_DEFAULTS;
	for (size_t i = 0; i < msg->n_fields; i++) {
		const schema_field *f = &msg->fields[i];
		slot *s = &slots[i];
		json_object *v = NULL;
		int rc;

		if (f->label == SCHEMA_REPEATED) {
			if (!s->val && !emit)
				continue;
			v = s->val ? s->val : json_object_new_array();
			s->val = NULL;
			if (!v)
				return -ENOMEM;
		} else if (f->type == PROTOBUF_C_TYPE_MESSAGE && s->present) {
			reader sub = { s->msg.data, s->msg.data + s->msg.len };
			if ((rc = decode_message(dec, f->message, &sub, &v, depth + 1)) < 0)
				return rc;
		} else if (s->present) {
			if (s->is_default && f->label == SCHEMA_OPTIONAL && !emit)
				continue;
			v = s->val;
			s->val = NULL;
		} else {
			if (!emit || f->label == SCHEMA_NONE)
				continue;
			v = default_json(f);
			if (!v && f->type != PROTOBUF_C_TYPE_MESSAGE)
				return -ENOMEM;
		}
		if (json_object_object_add(obj, f->json_name, v) < 0) {
			json_object_put(v);
			return -ENOMEM;
		}
	}
	return 0;
}

static int decode_message(decoder *dec, const schema_message *msg, reader *r, json_object **out, int depth)
{
	int rc = 0;
	slot *slots;
	json_object *obj;

	*out = NULL;
	if (depth > PBJSON_MAX_DEPTH)
		return fail(&dec->err, -EBADMSG, "messages nested deeper than %d in %s", PBJSON_MAX_DEPTH, msg->name);
	slots = calloc(msg->n_fields + 1, sizeof(*slots));
	obj = json_object_new_object();
	if (!slots || !obj) {
		rc = -ENOMEM;
		goto out;
	}
	while (r->p < r->end) {
		uint64_t key;
		if (!read_varint(r, &key) || key >> 32) {
			rc = fail(&dec->err, -EBADMSG, "bad field tag in %s", msg->name);
			goto out;
		}
		uint32_t number = (uint32_t)(key >> 3);
		enum wire_type wt = (enum wire_type)(key & 7);
		if (number == 0) {
			rc = fail(&dec->err, -EBADMSG, "field number 0 in %s", msg->name);
			goto out;
		}
		const schema_field *f = schema_field_by_number(msg, number);
		if (!f) {
			rc = skip_field(dec, msg, number, wt, r);
		} else {
			size_t idx = (size_t)(f - msg->fields);
			clear_oneof(msg, slots, idx);
			rc = decode_field(dec, msg, f, &slots[idx], wt, r, depth);
		}
		if (rc < 0)
			goto out;
	}
	rc = build_object(dec, msg, slots, obj, depth);
out:
	if (slots) {
		for (size_t i = 0; i < msg->n_fields; i++) {
			json_object_put(slots[i].val);
			free(slots[i].msg.data);
		}
		free(slots);
	}
	if (rc < 0) {
		json_object_put(obj);
		return rc;
	}
	*out = obj;
	return 0;
}

int pbjson_decode(const schema_message *msg, const uint8_t *data, size_t len, unsigned flags, json_object **out,
		  char *err, size_t errlen)
{
	decoder dec = { .err = { err, errlen }, .flags = flags };
	reader r = { data, data + len };
	if (!data)
		r.p = r.end = (const uint8_t *)"";
	if (err && errlen)
		err[0] = '\0';
	int rc = decode_message(&dec, msg, &r, out, 0);
	if (rc == -ENOMEM)
		fail(&dec.err, rc, "out of memory");
	return rc;
}

/* ---- printing ---- */

/* json-c prints empty containers as "{\n}"; give them a fixed text. */
static void compact_empty(json_object *v)
{
	if (json_object_is_type(v, json_type_object)) {
		if (json_object_object_length(v) == 0)
			json_object_set_serializer(v, json_object_userdata_to_json_string, (void *)"{}", NULL);
		struct json_object_iterator it = json_object_iter_begin(v), end = json_object_iter_end(v);
		for (; !json_object_iter_equal(&it, &end); json_object_iter_next(&it))
			compact_empty(json_object_iter_peek_value(&it));
	} else if (json_object_is_type(v, json_type_array)) {
		size_t n = json_object_array_length(v);
		if (n == 0)
			json_object_set_serializer(v, json_object_userdata_to_json_string, (void *)"[]", NULL);
		for (size_t i = 0; i < n; i++)
			compact_empty(json_object_array_get_idx(v, i));
	}
}

const char *pbjson_to_string(json_object *obj)
{
	compact_empty(obj);
	return json_object_to_json_string_ext(obj, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED |
							   JSON_C_TO_STRING_NOSLASHESCAPE);
}
