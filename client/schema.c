/* The CLI's schema: a DescribeReply copied into an arena and cross-linked. */
#include "schema.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* Everything a schema holds lives in these chunks and is freed at once. */
typedef struct chunk {
	struct chunk *next;
	size_t used, size;
	max_align_t data[];
} chunk;

struct schema {
	chunk *chunks;
	size_t n_services, n_messages, n_enums;
	schema_service *services;
	schema_message *messages;
	schema_enum *enums;
};

#define CHUNK_SIZE 16384

static void *arena_alloc(schema *s, size_t n)
{
	n = (n + sizeof(max_align_t) - 1) & ~(sizeof(max_align_t) - 1);
	if (!s->chunks || s->chunks->size - s->chunks->used < n) {
		size_t size = n > CHUNK_SIZE ? n : CHUNK_SIZE;
		chunk *c = malloc(sizeof(*c) + size);
		if (!c)
			return NULL;
		c->next = s->chunks;
		c->used = 0;
		c->size = size;
		s->chunks = c;
	}
	void *p = (char *)s->chunks->data + s->chunks->used;
	s->chunks->used += n;
	memset(p, 0, n);
	return p;
}

/* Copies a string; NULL becomes "". */
static const char *arena_strdup(schema *s, const char *str)
{
	if (!str)
		str = "";
	size_t n = strlen(str) + 1;
	char *p = arena_alloc(s, n);
	if (p)
		memcpy(p, str, n);
	return p;
}

static const char *strip_dot(const char *name)
{
	return name && name[0] == '.' ? name + 1 : name;
}

static void set_err(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
	if (!err || !errlen)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

void schema_json_name(const char *name, char *buf, size_t len)
{
	size_t o = 0;
	bool upper = false;
	if (!len)
		return;
	for (const char *p = name; *p && o + 1 < len; p++) {
		if (*p == '_') {
			upper = true;
			continue;
		}
		buf[o++] = upper && *p >= 'a' && *p <= 'z' ? (char)(*p - 'a' + 'A') : *p;
		upper = false;
	}
	buf[o] = '\0';
}

static int copy_methods(schema *s, schema_service *dst, const Pbrpc__ServiceInfo *src)
{
	schema_method *methods = arena_alloc(s, (src->n_methods + 1) * sizeof(*methods));
	if (!methods)
		return -ENOMEM;
	for (size_t i = 0; i < src->n_methods; i++) {
		const Pbrpc__MethodInfo *mi = src->methods[i];
		schema_method *m = &methods[i];
		size_t full_len = strlen(dst->name) + strlen(mi->name ? mi->name : "") + 2;
		char *full = arena_alloc(s, full_len);
		m->name = arena_strdup(s, mi->name);
		m->input_type = arena_strdup(s, strip_dot(mi->input_type));
		m->output_type = arena_strdup(s, strip_dot(mi->output_type));
		m->client_streaming = mi->client_streaming;
		m->server_streaming = mi->server_streaming;
		if (!full || !m->name || !m->input_type || !m->output_type)
			return -ENOMEM;
		snprintf(full, full_len, "%s/%s", dst->name, m->name);
		m->full_name = full;
	}
	dst->methods = methods;
	dst->n_methods = src->n_methods;
	return 0;
}

static int copy_fields(schema *s, schema_message *dst, const Pbrpc__MessageSchema *src)
{
	schema_field *fields = arena_alloc(s, (src->n_fields + 1) * sizeof(*fields));
	if (!fields)
		return -ENOMEM;
	for (size_t i = 0; i < src->n_fields; i++) {
		const Pbrpc__FieldSchema *fs = src->fields[i];
		schema_field *f = &fields[i];
		f->name = arena_strdup(s, fs->name);
		f->number = fs->number;
		f->label = (schema_label)fs->label;
		f->type = (ProtobufCType)fs->type;
		f->packed = fs->packed;
		f->type_name = arena_strdup(s, strip_dot(fs->type_name));
		f->oneof = arena_strdup(s, fs->oneof);
		if (fs->json_name && fs->json_name[0]) {
			f->json_name = arena_strdup(s, fs->json_name);
		} else if (f->name) {
			char *j = arena_alloc(s, strlen(f->name) + 1);
			if (j)
				schema_json_name(f->name, j, strlen(f->name) + 1);
			f->json_name = j;
		}
		if (!f->name || !f->type_name || !f->oneof || !f->json_name)
			return -ENOMEM;
	}
	dst->fields = fields;
	dst->n_fields = src->n_fields;
	return 0;
}

static int copy_reply(schema *s, const Pbrpc__DescribeReply *r, char *err, size_t errlen)
{
	s->services = arena_alloc(s, (r->n_services + 1) * sizeof(*s->services));
	s->messages = arena_alloc(s, (r->n_messages + 1) * sizeof(*s->messages));
	s->enums = arena_alloc(s, (r->n_enums + 1) * sizeof(*s->enums));
	if (!s->services || !s->messages || !s->enums)
		return -ENOMEM;

	for (size_t i = 0; i < r->n_services; i++) {
		schema_service *svc = &s->services[s->n_services];
		svc->name = arena_strdup(s, strip_dot(r->services[i]->name));
		if (!svc->name || copy_methods(s, svc, r->services[i]) < 0)
			return -ENOMEM;
		s->n_services++;
	}
	for (size_t i = 0; i < r->n_messages; i++) {
		const char *name = strip_dot(r->messages[i]->name);
		if (schema_find_message(s, name)) {
			set_err(err, errlen, "message %s is described twice", name);
			return -EINVAL;
		}
		schema_message *m = &s->messages[s->n_messages];
		m->name = arena_strdup(s, name);
		if (!m->name || copy_fields(s, m, r->messages[i]) < 0)
			return -ENOMEM;
		s->n_messages++;
	}
	for (size_t i = 0; i < r->n_enums; i++) {
		const Pbrpc__EnumSchema *es = r->enums[i];
		const char *name = strip_dot(es->name);
		if (schema_find_enum(s, name)) {
			set_err(err, errlen, "enum %s is described twice", name);
			return -EINVAL;
		}
		schema_enum *e = &s->enums[s->n_enums];
		schema_enum_value *values = arena_alloc(s, (es->n_values + 1) * sizeof(*values));
		e->name = arena_strdup(s, name);
		if (!values || !e->name)
			return -ENOMEM;
		for (size_t j = 0; j < es->n_values; j++) {
			values[j].name = arena_strdup(s, es->values[j]->name);
			values[j].number = es->values[j]->number;
			if (!values[j].name)
				return -ENOMEM;
		}
		e->values = values;
		e->n_values = es->n_values;
		s->n_enums++;
	}
	return 0;
}

static bool known_type(ProtobufCType t)
{
	return (unsigned)t <= PROTOBUF_C_TYPE_MESSAGE;
}

/* Points every MESSAGE and ENUM field, and every method, at its type. */
static int resolve(schema *s, char *err, size_t errlen)
{
	for (size_t i = 0; i < s->n_messages; i++) {
		schema_message *m = &s->messages[i];
		for (size_t j = 0; j < m->n_fields; j++) {
			schema_field *f = (schema_field *)&m->fields[j];
			if (!known_type(f->type)) {
				set_err(err, errlen, "field %s.%s has unknown type %d", m->name, f->name, (int)f->type);
				return -EINVAL;
			}
			if ((unsigned)f->label > SCHEMA_NONE) {
				set_err(err, errlen, "field %s.%s has unknown label %d", m->name, f->name, (int)f->label);
				return -EINVAL;
			}
			if (f->number == 0 || f->number > 536870911u) {
				set_err(err, errlen, "field %s.%s has invalid number %u", m->name, f->name, f->number);
				return -EINVAL;
			}
			if (f->type == PROTOBUF_C_TYPE_MESSAGE)
				f->message = schema_find_message(s, f->type_name);
			else if (f->type == PROTOBUF_C_TYPE_ENUM)
				f->enumeration = schema_find_enum(s, f->type_name);
			else
				continue;
			if (!f->message && !f->enumeration) {
				set_err(err, errlen, "field %s.%s refers to %s, which the server did not describe",
					m->name, f->name, f->type_name[0] ? f->type_name : "an unnamed type");
				return -EINVAL;
			}
		}
	}
	for (size_t i = 0; i < s->n_services; i++) {
		for (size_t j = 0; j < s->services[i].n_methods; j++) {
			schema_method *m = (schema_method *)&s->services[i].methods[j];
			m->input = schema_find_message(s, m->input_type);
			m->output = schema_find_message(s, m->output_type);
		}
	}
	return 0;
}

int schema_new(schema **out, const Pbrpc__DescribeReply *reply, char *err, size_t errlen)
{
	int rc;
	schema *s = calloc(1, sizeof(*s));

	*out = NULL;
	if (!s)
		return -ENOMEM;
	rc = copy_reply(s, reply, err, errlen);
	if (rc == 0)
		rc = resolve(s, err, errlen);
	if (rc < 0) {
		if (rc == -ENOMEM)
			set_err(err, errlen, "out of memory");
		schema_free(s);
		return rc;
	}
	*out = s;
	return 0;
}

void schema_free(schema *s)
{
	if (!s)
		return;
	while (s->chunks) {
		chunk *next = s->chunks->next;
		free(s->chunks);
		s->chunks = next;
	}
	free(s);
}

size_t schema_service_count(const schema *s) { return s->n_services; }
const schema_service *schema_service_at(const schema *s, size_t i) { return i < s->n_services ? &s->services[i] : NULL; }
size_t schema_message_count(const schema *s) { return s->n_messages; }
const schema_message *schema_message_at(const schema *s, size_t i) { return i < s->n_messages ? &s->messages[i] : NULL; }
size_t schema_enum_count(const schema *s) { return s->n_enums; }
const schema_enum *schema_enum_at(const schema *s, size_t i) { return i < s->n_enums ? &s->enums[i] : NULL; }

const schema_service *schema_find_service(const schema *s, const char *name)
{
	name = strip_dot(name);
	for (size_t i = 0; i < s->n_services; i++)
		if (strcmp(s->services[i].name, name) == 0)
			return &s->services[i];
	return NULL;
}

const schema_message *schema_find_message(const schema *s, const char *name)
{
	name = strip_dot(name);
	for (size_t i = 0; i < s->n_messages; i++)
		if (strcmp(s->messages[i].name, name) == 0)
			return &s->messages[i];
	return NULL;
}

const schema_enum *schema_find_enum(const schema *s, const char *name)
{
	name = strip_dot(name);
	for (size_t i = 0; i < s->n_enums; i++)
		if (strcmp(s->enums[i].name, name) == 0)
			return &s->enums[i];
	return NULL;
}

const schema_method *schema_find_method(const schema *s, const char *full_name)
{
	const char *slash = strchr(full_name, '/');
	if (!slash)
		return NULL;
	full_name = strip_dot(full_name);
	for (size_t i = 0; i < s->n_services; i++) {
		const schema_service *svc = &s->services[i];
		size_t n = strlen(svc->name);
		if ((size_t)(slash - full_name) != n || strncmp(svc->name, full_name, n) != 0)
			continue;
		for (size_t j = 0; j < svc->n_methods; j++)
			if (strcmp(svc->methods[j].name, slash + 1) == 0)
				return &svc->methods[j];
	}
	return NULL;
}

static bool str_eq(const char *a, const char *b, size_t blen)
{
	return strncmp(a, b, blen) == 0 && a[blen] == '\0';
}

const schema_field *schema_field_by_key(const schema_message *m, const char *key, size_t len)
{
	for (size_t i = 0; i < m->n_fields; i++)
		if (str_eq(m->fields[i].json_name, key, len))
			return &m->fields[i];
	for (size_t i = 0; i < m->n_fields; i++)
		if (str_eq(m->fields[i].name, key, len))
			return &m->fields[i];
	return NULL;
}

const schema_field *schema_field_by_number(const schema_message *m, uint32_t number)
{
	for (size_t i = 0; i < m->n_fields; i++)
		if (m->fields[i].number == number)
			return &m->fields[i];
	return NULL;
}

const char *schema_enum_name(const schema_enum *e, int32_t number)
{
	for (size_t i = 0; i < e->n_values; i++)
		if (e->values[i].number == number)
			return e->values[i].name;
	return NULL;
}

bool schema_enum_number(const schema_enum *e, const char *name, size_t len, int32_t *number)
{
	for (size_t i = 0; i < e->n_values; i++) {
		if (str_eq(e->values[i].name, name, len)) {
			*number = e->values[i].number;
			return true;
		}
	}
	return false;
}

static const char *const scalar_names[] = {
	[PROTOBUF_C_TYPE_INT32] = "int32",       [PROTOBUF_C_TYPE_SINT32] = "sint32",
	[PROTOBUF_C_TYPE_SFIXED32] = "sfixed32", [PROTOBUF_C_TYPE_INT64] = "int64",
	[PROTOBUF_C_TYPE_SINT64] = "sint64",     [PROTOBUF_C_TYPE_SFIXED64] = "sfixed64",
	[PROTOBUF_C_TYPE_UINT32] = "uint32",     [PROTOBUF_C_TYPE_FIXED32] = "fixed32",
	[PROTOBUF_C_TYPE_UINT64] = "uint64",     [PROTOBUF_C_TYPE_FIXED64] = "fixed64",
	[PROTOBUF_C_TYPE_FLOAT] = "float",       [PROTOBUF_C_TYPE_DOUBLE] = "double",
	[PROTOBUF_C_TYPE_BOOL] = "bool",         [PROTOBUF_C_TYPE_ENUM] = "enum",
	[PROTOBUF_C_TYPE_STRING] = "string",     [PROTOBUF_C_TYPE_BYTES] = "bytes",
	[PROTOBUF_C_TYPE_MESSAGE] = "message",
};

const char *schema_field_type_name(const schema_field *f)
{
	if ((f->type == PROTOBUF_C_TYPE_MESSAGE || f->type == PROTOBUF_C_TYPE_ENUM) && f->type_name[0])
		return f->type_name;
	return known_type(f->type) ? scalar_names[f->type] : "?";
}

/* ---- proto-like text ---- */

static void print_field(FILE *out, const schema_field *f, const char *indent)
{
	const char *label = "";
	if (f->label == SCHEMA_REPEATED)
		label = "repeated ";
	else if (f->label == SCHEMA_REQUIRED)
		label = "required ";
	else if (f->label == SCHEMA_NONE && !f->oneof[0])
		label = "optional ";
	fprintf(out, "%s%s%s %s = %u;", indent, label, schema_field_type_name(f), f->name, f->number);
	if (strcmp(f->name, f->json_name) != 0)
		fprintf(out, "  // JSON: \"%s\"", f->json_name);
	fputc('\n', out);
}

void schema_print_message(FILE *out, const schema_message *m)
{
	fprintf(out, "message %s {\n", m->name);
	for (size_t i = 0; i < m->n_fields; i++) {
		const schema_field *f = &m->fields[i];
		if (!f->oneof[0]) {
			print_field(out, f, "  ");
			continue;
		}
		/* Members of a oneof print together, where its first member is. */
		bool first = true;
		for (size_t j = 0; j < i; j++)
			if (strcmp(m->fields[j].oneof, f->oneof) == 0)
				first = false;
		if (!first)
			continue;
		fprintf(out, "  oneof %s {\n", f->oneof);
		for (size_t j = i; j < m->n_fields; j++)
			if (strcmp(m->fields[j].oneof, f->oneof) == 0)
				print_field(out, &m->fields[j], "    ");
		fprintf(out, "  }\n");
	}
	fprintf(out, "}\n");
}

void schema_print_enum(FILE *out, const schema_enum *e)
{
	fprintf(out, "enum %s {\n", e->name);
	for (size_t i = 0; i < e->n_values; i++)
		fprintf(out, "  %s = %d;\n", e->values[i].name, (int)e->values[i].number);
	fprintf(out, "}\n");
}

void schema_print_method(FILE *out, const schema_service *svc, const schema_method *m)
{
	fprintf(out, "rpc %s/%s(%s%s) returns (%s%s);\n", svc->name, m->name, m->client_streaming ? "stream " : "",
		m->input_type, m->server_streaming ? "stream " : "", m->output_type);
}

void schema_print_service(FILE *out, const schema_service *svc)
{
	fprintf(out, "service %s {\n", svc->name);
	for (size_t i = 0; i < svc->n_methods; i++) {
		const schema_method *m = &svc->methods[i];
		fprintf(out, "  rpc %s(%s%s) returns (%s%s);\n", m->name, m->client_streaming ? "stream " : "",
			m->input_type, m->server_streaming ? "stream " : "", m->output_type);
	}
	fprintf(out, "}\n");
}
