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
#include <strings.h>

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

/* ---- strictness json-c lacks ----
 *
 * json-c, even with JSON_TOKENER_STRICT, accepts bare NaN and Infinity, keeps
 * the last of duplicate keys, turns 1e400 into Infinity and clamps integers
 * beyond 64 bits. This pass over the text finds those (and single quotes, to
 * say what is wrong with them) before json-c parses it. It reports nothing
 * for other syntax errors: it stops there and lets json-c describe them. */

typedef struct scanner {
	const char *s;
	size_t len, pos;
	errbuf *err;
} scanner;

enum { SCAN_OK = 1, SCAN_DEFER = 0 }; /* or a negative code */

static void scan_space(scanner *sc)
{
	while (sc->pos < sc->len && strchr(" \t\n\r", sc->s[sc->pos]) && sc->s[sc->pos])
		sc->pos++;
}

static bool scan_word(const scanner *sc, const char *word)
{
	size_t n = strlen(word);
	return sc->len - sc->pos >= n && strncasecmp(sc->s + sc->pos, word, n) == 0;
}

static int scan_value(scanner *sc, int depth);

/* A string's raw text between its quotes goes to *start and *n. */
static int scan_string(scanner *sc, const char **start, size_t *n)
{
	size_t p = ++sc->pos;
	while (p < sc->len && sc->s[p] != '"') {
		if ((unsigned char)sc->s[p] < 0x20)
			return SCAN_DEFER;
		p += sc->s[p] == '\\' ? 2 : 1;
	}
	if (p >= sc->len)
		return SCAN_DEFER;
	*start = sc->s + sc->pos;
	*n = p - sc->pos;
	sc->pos = p + 1;
	return SCAN_OK;
}

static int scan_number(scanner *sc)
{
	size_t start = sc->pos, p = sc->pos;
	bool integral = true;
	if (p < sc->len && sc->s[p] == '-')
		p++;
	if (p >= sc->len || sc->s[p] < '0' || sc->s[p] > '9')
		return SCAN_DEFER;
	while (p < sc->len && strchr("0123456789.eE+-", sc->s[p]) && sc->s[p]) {
		if (!strchr("0123456789-", sc->s[p]))
			integral = false;
		p++;
	}
	char text[400];
	size_t n = p - start;
	sc->pos = p;
	if (n >= sizeof(text))
		return fail(sc->err, -EINVAL, "number at offset %zu is too long", start);
	memcpy(text, sc->s + start, n);
	text[n] = '\0';
	errno = 0;
	if (integral) {
		if (text[0] == '-')
			(void)strtoll(text, NULL, 10);
		else
			(void)strtoull(text, NULL, 10);
		if (errno == ERANGE)
			return fail(sc->err, -EINVAL,
				    "integer %s at offset %zu is beyond the 64-bit range (give 64-bit values as strings)",
				    text, start);
		return SCAN_OK;
	}
	double d = strtod(text, NULL);
	if (errno == ERANGE && isinf(d))
		return fail(sc->err, -EINVAL, "number %s at offset %zu is beyond the range of a double", text, start);
	return SCAN_OK;
}

/* Duplicate keys are compared as written (escapes are not decoded). */
static int scan_object(scanner *sc, int depth)
{
	struct key {
		const char *s;
		size_t n;
	} *keys = NULL;
	size_t n_keys = 0, cap = 0;
	int rc = SCAN_DEFER;

	sc->pos++;
	scan_space(sc);
	if (sc->pos < sc->len && sc->s[sc->pos] == '}') {
		sc->pos++;
		return SCAN_OK;
	}
	for (;;) {
		scan_space(sc);
		if (sc->pos >= sc->len)
			break;
		if (sc->s[sc->pos] == '\'') {
			rc = fail(sc->err, -EINVAL, "single quotes at offset %zu: JSON strings and keys take double quotes",
				  sc->pos);
			break;
		}
		if (sc->s[sc->pos] != '"')
			break;
		size_t at = sc->pos;
		const char *k;
		size_t kn;
		if ((rc = scan_string(sc, &k, &kn)) != SCAN_OK)
			break;
		rc = SCAN_DEFER;
		for (size_t i = 0; i < n_keys; i++) {
			if (keys[i].n == kn && memcmp(keys[i].s, k, kn) == 0) {
				rc = fail(sc->err, -EINVAL, "duplicate key \"%.*s\" at offset %zu", (int)(kn > 100 ? 100 : kn),
					  k, at);
				break;
			}
		}
		if (rc < 0)
			break;
		if (n_keys == cap) {
			cap = cap ? cap * 2 : 8;
			struct key *nk = realloc(keys, cap * sizeof(*keys));
			if (!nk) {
				rc = fail(sc->err, -ENOMEM, "out of memory");
				break;
			}
			keys = nk;
		}
		keys[n_keys++] = (struct key){ k, kn };
		scan_space(sc);
		if (sc->pos >= sc->len || sc->s[sc->pos] != ':')
			break;
		sc->pos++;
		if ((rc = scan_value(sc, depth + 1)) != SCAN_OK)
			break;
		rc = SCAN_DEFER;
		scan_space(sc);
		if (sc->pos < sc->len && sc->s[sc->pos] == ',') {
			sc->pos++;
			continue;
		}
		if (sc->pos < sc->len && sc->s[sc->pos] == '}') {
			sc->pos++;
			rc = SCAN_OK;
		}
		break;
	}
	free(keys);
	return rc;
}

static int scan_array(scanner *sc, int depth)
{
	sc->pos++;
	scan_space(sc);
	if (sc->pos < sc->len && sc->s[sc->pos] == ']') {
		sc->pos++;
		return SCAN_OK;
	}
	for (;;) {
		int rc = scan_value(sc, depth + 1);
		if (rc != SCAN_OK)
			return rc;
		scan_space(sc);
		if (sc->pos < sc->len && sc->s[sc->pos] == ',') {
			sc->pos++;
			continue;
		}
		if (sc->pos < sc->len && sc->s[sc->pos] == ']') {
			sc->pos++;
			return SCAN_OK;
		}
		return SCAN_DEFER;
	}
}

static int scan_value(scanner *sc, int depth)
{
	static const char *const non_finite[] = { "-Infinity", "Infinity", "NaN", "-NaN", "-inf", "inf" };
	scan_space(sc);
	if (depth > PBJSON_MAX_DEPTH || sc->pos >= sc->len)
		return SCAN_DEFER;
	for (size_t i = 0; i < sizeof(non_finite) / sizeof(non_finite[0]); i++) {
		if (scan_word(sc, non_finite[i]))
			return fail(sc->err, -EINVAL,
				    "bare %.*s at offset %zu is not JSON (protobuf's JSON mapping writes \"NaN\", "
				    "\"Infinity\" and \"-Infinity\" as strings)",
				    (int)strlen(non_finite[i]), sc->s + sc->pos, sc->pos);
	}
	const char *k;
	size_t kn;
	switch (sc->s[sc->pos]) {
	case '{':
		return scan_object(sc, depth);
	case '[':
		return scan_array(sc, depth);
	case '"':
		return scan_string(sc, &k, &kn);
	case '\'':
		return fail(sc->err, -EINVAL, "single quotes at offset %zu: JSON strings take double quotes", sc->pos);
	case 't':
	case 'f':
	case 'n':
		while (sc->pos < sc->len && sc->s[sc->pos] >= 'a' && sc->s[sc->pos] <= 'z')
			sc->pos++;
		return SCAN_OK; /* json-c checks the spelling */
	default:
		return scan_number(sc);
	}
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
	scanner sc = { text, len, 0, &e };
	if ((rc = scan_value(&sc, 1)) < 0) {
		json_tokener_free(tok);
		return rc;
	}
	rc = 0;
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
			/* An empty packed run leaves an empty array: omitted like
			 * any empty repeated field unless defaults are emitted. */
			if (s->val && json_object_array_length(s->val) == 0 && !emit) {
				json_object_put(s->val);
				s->val = NULL;
				continue;
			}
			v = s->val ? s->val : json_object_new_array();
			s->val = NULL;
			if (!v)
				return -ENOMEM;
		} else if (f->type == PROTOBUF_C_TYPE_MESSAGE && s->present) {
			reader sub = { s->msg.data, s->msg.data ? s->msg.data + s->msg.len : NULL }; /* never NULL + 0 */
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
	reader r = { (const uint8_t *)"", (const uint8_t *)"" }; /* no NULL + 0 for an empty message */
	if (data) {
		r.p = data;
		r.end = data + len;
	}
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

const char *pbjson_to_compact_string(json_object *obj)
{
	return json_object_to_json_string_ext(obj, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
}

/* ---- protobuf text format ---- */

/* A text-format string literal: C escapes, octal for other bytes below 0x20
 * and 0x7f, and (for bytes fields) for everything above 0x7e too; UTF-8 in
 * string fields stays readable. */
static void text_quoted(FILE *out, const uint8_t *p, size_t n, bool binary)
{
	fputc('"', out);
	for (size_t i = 0; i < n; i++) {
		uint8_t c = p[i];
		switch (c) {
		case '\n': fputs("\\n", out); break;
		case '\r': fputs("\\r", out); break;
		case '\t': fputs("\\t", out); break;
		case '"': fputs("\\\"", out); break;
		case '\'': fputs("\\'", out); break;
		case '\\': fputs("\\\\", out); break;
		default:
			if (c < 0x20 || c == 0x7f || (binary && c > 0x7e))
				fprintf(out, "\\%03o", c);
			else
				fputc(c, out);
		}
	}
	fputc('"', out);
}

static int text_message(FILE *out, const schema_message *msg, json_object *obj, int indent);

static int text_value(FILE *out, const schema_field *f, json_object *v, int indent)
{
	if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
		fprintf(out, "%*s%s {\n", indent, "", f->name);
		int rc = text_message(out, f->message, v, indent + 2);
		fprintf(out, "%*s}\n", indent, "");
		return rc;
	}
	fprintf(out, "%*s%s: ", indent, "", f->name);
	const char *str = json_object_get_string(v);
	switch (f->type) {
	case PROTOBUF_C_TYPE_STRING:
		text_quoted(out, (const uint8_t *)str, (size_t)json_object_get_string_len(v), false);
		break;
	case PROTOBUF_C_TYPE_BYTES: {
		buf b = { 0 };
		if (base64_decode(str, (size_t)json_object_get_string_len(v), &b) < 0) {
			free(b.data);
			return -EINVAL;
		}
		text_quoted(out, b.data, b.len, true);
		free(b.data);
		break;
	}
	case PROTOBUF_C_TYPE_FLOAT:
	case PROTOBUF_C_TYPE_DOUBLE:
		if (json_object_is_type(v, json_type_string))
			fputs(strcmp(str, "NaN") == 0 ? "nan" : strcmp(str, "Infinity") == 0 ? "inf" : "-inf", out);
		else
			fputs(json_object_to_json_string_ext(v, JSON_C_TO_STRING_PLAIN), out);
		break;
	default: /* integers (64-bit ones are JSON strings), bools, enum names or numbers */
		fputs(str, out);
		break;
	}
	fputc('\n', out);
	return 0;
}

static int text_message(FILE *out, const schema_message *msg, json_object *obj, int indent)
{
	if (!obj)
		return 0;
	struct json_object_iterator it = json_object_iter_begin(obj), end = json_object_iter_end(obj);
	for (; !json_object_iter_equal(&it, &end); json_object_iter_next(&it)) {
		const char *key = json_object_iter_peek_name(&it);
		json_object *v = json_object_iter_peek_value(&it);
		const schema_field *f = schema_field_by_key(msg, key, strlen(key));
		int rc = 0;
		if (!f)
			return -EINVAL;
		if (!v)
			continue; /* an unset message printed as null with PBJSON_EMIT_DEFAULTS */
		if (json_object_is_type(v, json_type_array)) {
			for (size_t i = 0; i < json_object_array_length(v) && rc == 0; i++)
				rc = text_value(out, f, json_object_array_get_idx(v, i), indent);
		} else {
			rc = text_value(out, f, v, indent);
		}
		if (rc < 0)
			return rc;
	}
	return 0;
}

int pbjson_to_text(const schema_message *msg, json_object *obj, char **out)
{
	size_t len;
	FILE *f = open_memstream(out, &len);
	if (!f)
		return -ENOMEM;
	int rc = text_message(f, msg, obj, 0);
	if (fclose(f) != 0 && rc == 0)
		rc = -ENOMEM;
	if (rc < 0) {
		free(*out);
		*out = NULL;
	}
	return rc;
}

/* ---- templates ---- */

typedef struct tmpl_stack {
	const schema_message *msg;
	const struct tmpl_stack *up;
} tmpl_stack;

static json_object *template_message(const schema_message *msg, const tmpl_stack *up);

static json_object *template_scalar(const schema_field *f, const tmpl_stack *st)
{
	switch (f->type) {
	case PROTOBUF_C_TYPE_STRING:
	case PROTOBUF_C_TYPE_BYTES:
		return json_object_new_string("");
	case PROTOBUF_C_TYPE_BOOL:
		return json_object_new_boolean(0);
	case PROTOBUF_C_TYPE_FLOAT:
	case PROTOBUF_C_TYPE_DOUBLE:
		return json_object_new_double_s(0, "0.0");
	case PROTOBUF_C_TYPE_INT64:
	case PROTOBUF_C_TYPE_SINT64:
	case PROTOBUF_C_TYPE_SFIXED64:
	case PROTOBUF_C_TYPE_UINT64:
	case PROTOBUF_C_TYPE_FIXED64:
		return json_object_new_string("0");
	case PROTOBUF_C_TYPE_ENUM:
		if (f->enumeration && schema_enum_name(f->enumeration, 0)) /* the default */
			return json_object_new_string(schema_enum_name(f->enumeration, 0));
		if (f->enumeration && f->enumeration->n_values)
			return json_object_new_string(f->enumeration->values[0].name);
		return json_object_new_int(0);
	case PROTOBUF_C_TYPE_MESSAGE:
		for (const tmpl_stack *s = st; s; s = s->up)
			if (s->msg == f->message)
				return json_object_new_object(); /* recursive type: stop here */
		return template_message(f->message, st);
	default:
		return json_object_new_int(0);
	}
}

static json_object *template_message(const schema_message *msg, const tmpl_stack *up)
{
	tmpl_stack st = { msg, up };
	json_object *obj = json_object_new_object();
	for (size_t i = 0; obj && i < msg->n_fields; i++) {
		const schema_field *f = &msg->fields[i];
		json_object *v = template_scalar(f, &st);
		if (v && f->label == SCHEMA_REPEATED) {
			json_object *arr = json_object_new_array();
			if (!arr || json_object_array_add(arr, v) < 0) {
				json_object_put(arr);
				json_object_put(v);
				v = NULL;
			} else {
				v = arr;
			}
		}
		if (!v || json_object_object_add(obj, f->json_name, v) < 0) {
			json_object_put(v);
			json_object_put(obj);
			return NULL;
		}
	}
	return obj;
}

json_object *pbjson_template(const schema_message *msg)
{
	return template_message(msg, NULL);
}
