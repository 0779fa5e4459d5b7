/* FileDescriptorSet -> pbrpc.DescribeReply. See protoset.h. */
#include "protoset.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "descset.h"

typedef struct chunk {
	struct chunk *next;
	max_align_t data[];
} chunk;

struct protoset {
	Google__Protobuf__FileDescriptorSet *fds;
	chunk *chunks;
	Pbrpc__DescribeReply all;
	size_t cap_services, cap_messages, cap_enums;
	/* what protoset_describe includes, indexed like all.messages / all.enums */
	bool *msg_in, *enum_in;
	Pbrpc__DescribeReply sub;
	Pbrpc__ServiceInfo sub_service;
	Pbrpc__MethodInfo *sub_method;
};

static void *alloc(protoset *ps, size_t n)
{
	chunk *c = calloc(1, sizeof(chunk) + n);
	if (!c)
		return NULL;
	c->next = ps->chunks;
	ps->chunks = c;
	return c->data;
}

static void set_err(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

/* prefix + "." + name, or name alone when prefix is empty. */
static char *join(protoset *ps, const char *prefix, const char *name)
{
	size_t pl = strlen(prefix), nl = strlen(name);
	char *s = alloc(ps, pl + nl + 2);
	if (s)
		snprintf(s, pl + nl + 2, "%s%s%s", prefix, pl ? "." : "", name);
	return s;
}

static char *strip_dot(const char *name)
{
	return (char *)(name && name[0] == '.' ? name + 1 : name ? name : "");
}

/* Appends p to a growable pointer array. */
static int push(void ***arr, size_t *n, size_t *cap, void *p)
{
	if (*n == *cap) {
		size_t nc = *cap ? *cap * 2 : 16;
		void **a = realloc(*arr, nc * sizeof(*a));
		if (!a)
			return -ENOMEM;
		*arr = a;
		*cap = nc;
	}
	(*arr)[(*n)++] = p;
	return 0;
}

/* descriptor.proto's FieldDescriptorProto.Type (1..18) to pbrpc.FieldSchema.Type; -1: unsupported. */
static const int type_map[19] = {
	[0] = -1,
	[GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__TYPE__TYPE_DOUBLE] = PBRPC__FIELD_SCHEMA__TYPE__DOUBLE,
	[GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__TYPE__TYPE_FLOAT] = PBRPC__FIELD_SCHEMA__TYPE__FLOAT,
	[GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__TYPE__TYPE_INT64] = PBRPC__FIELD_SCHEMA__TYPE__INT64,
	[GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__TYPE__TYPE_UINT64] = PBRPC__FIELD_SCHEMA__TYPE__UINT64,
	[GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__TYPE__TYPE_INT32] = PBRPC__FIELD_SCHEMA__TYPE__INT32,
	[GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__TYPE__TYPE_FIXED64] = PBRPC__FIELD_SCHEMA__TYPE__FIXED64,
	[GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__TYPE__TYPE_FIXED32] = PBRPC__FIELD_SCHEMA__TYPE__FIXED32,
	[GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__TYPE__TYPE_BOOL] = PBRPC__FIELD_SCHEMA__TYPE__BOOL,
	[GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__TYPE__TYPE_STRING] = PBRPC__FIELD_SCHEMA__TYPE__STRING,
	[GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__TYPE__TYPE_GROUP] = -1,
	[GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__TYPE__TYPE_MESSAGE] = PBRPC__FIELD_SCHEMA__TYPE__MESSAGE,
	[GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__TYPE__TYPE_BYTES] = PBRPC__FIELD_SCHEMA__TYPE__BYTES,
	[GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__TYPE__TYPE_UINT32] = PBRPC__FIELD_SCHEMA__TYPE__UINT32,
	[GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__TYPE__TYPE_ENUM] = PBRPC__FIELD_SCHEMA__TYPE__ENUM,
	[GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__TYPE__TYPE_SFIXED32] = PBRPC__FIELD_SCHEMA__TYPE__SFIXED32,
	[GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__TYPE__TYPE_SFIXED64] = PBRPC__FIELD_SCHEMA__TYPE__SFIXED64,
	[GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__TYPE__TYPE_SINT32] = PBRPC__FIELD_SCHEMA__TYPE__SINT32,
	[GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__TYPE__TYPE_SINT64] = PBRPC__FIELD_SCHEMA__TYPE__SINT64,
};

static bool packable(int type)
{
	return type != PBRPC__FIELD_SCHEMA__TYPE__STRING && type != PBRPC__FIELD_SCHEMA__TYPE__BYTES &&
	       type != PBRPC__FIELD_SCHEMA__TYPE__MESSAGE;
}

static int add_field(protoset *ps, Pbrpc__FieldSchema *dst, const Google__Protobuf__DescriptorProto *m,
		     const Google__Protobuf__FieldDescriptorProto *f, const char *msg_name, bool proto3, char *err,
		     size_t errlen)
{
	int type = f->has_type && f->type >= 1 && f->type <= 18 ? type_map[f->type] : -1;
	if (type < 0) {
		set_err(err, errlen, "field %s.%s: %s are not supported", msg_name, f->name,
			f->type == GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__TYPE__TYPE_GROUP ? "groups"
											: "unknown types");
		return -EINVAL;
	}
	pbrpc__field_schema__init(dst);
	dst->name = f->name;
	dst->number = (uint32_t)f->number;
	dst->type = (Pbrpc__FieldSchema__Type)type;
	dst->type_name = strip_dot(f->type_name);
	dst->json_name = f->json_name ? f->json_name : "";
	dst->oneof = "";
	bool repeated = f->label == GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__LABEL__LABEL_REPEATED;
	if (repeated) {
		dst->label = PBRPC__FIELD_SCHEMA__LABEL__REPEATED;
		dst->packed = f->options && f->options->has_packed ? f->options->packed : proto3 && packable(type);
	} else if (f->label == GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__LABEL__LABEL_REQUIRED) {
		dst->label = PBRPC__FIELD_SCHEMA__LABEL__REQUIRED;
	} else if (f->has_proto3_optional && f->proto3_optional) {
		dst->label = PBRPC__FIELD_SCHEMA__LABEL__NONE;
	} else if (f->has_oneof_index && f->oneof_index >= 0 && (size_t)f->oneof_index < m->n_oneof_decl) {
		dst->label = PBRPC__FIELD_SCHEMA__LABEL__NONE;
		dst->oneof = m->oneof_decl[f->oneof_index]->name ? m->oneof_decl[f->oneof_index]->name : "";
	} else {
		dst->label = PBRPC__FIELD_SCHEMA__LABEL__OPTIONAL;
	}
	return 0;
}

static int add_enum(protoset *ps, const Google__Protobuf__EnumDescriptorProto *e, const char *prefix)
{
	Pbrpc__EnumSchema *dst = alloc(ps, sizeof(*dst));
	if (!dst)
		return -ENOMEM;
	pbrpc__enum_schema__init(dst);
	if (!(dst->name = join(ps, prefix, e->name ? e->name : "")))
		return -ENOMEM;
	dst->n_values = e->n_value;
	dst->values = alloc(ps, e->n_value * sizeof(*dst->values) + 1);
	Pbrpc__EnumValueSchema *vals = alloc(ps, e->n_value * sizeof(*vals) + 1);
	if (!dst->values || !vals)
		return -ENOMEM;
	for (size_t i = 0; i < e->n_value; i++) {
		pbrpc__enum_value_schema__init(&vals[i]);
		vals[i].name = e->value[i]->name ? e->value[i]->name : "";
		vals[i].number = e->value[i]->number;
		dst->values[i] = &vals[i];
	}
	return push((void ***)&ps->all.enums, &ps->all.n_enums, &ps->cap_enums, dst);
}

static int add_message(protoset *ps, const Google__Protobuf__DescriptorProto *m, const char *prefix, bool proto3,
		       char *err, size_t errlen)
{
	int rc;
	Pbrpc__MessageSchema *dst = alloc(ps, sizeof(*dst));
	if (!dst)
		return -ENOMEM;
	pbrpc__message_schema__init(dst);
	if (!(dst->name = join(ps, prefix, m->name ? m->name : "")))
		return -ENOMEM;
	dst->n_fields = m->n_field;
	dst->fields = alloc(ps, m->n_field * sizeof(*dst->fields) + 1);
	Pbrpc__FieldSchema *fields = alloc(ps, m->n_field * sizeof(*fields) + 1);
	if (!dst->fields || !fields)
		return -ENOMEM;
	for (size_t i = 0; i < m->n_field; i++) {
		if ((rc = add_field(ps, &fields[i], m, m->field[i], dst->name, proto3, err, errlen)) < 0)
			return rc;
		dst->fields[i] = &fields[i];
	}
	if ((rc = push((void ***)&ps->all.messages, &ps->all.n_messages, &ps->cap_messages, dst)) < 0)
		return rc;
	for (size_t i = 0; i < m->n_nested_type; i++)
		if ((rc = add_message(ps, m->nested_type[i], dst->name, proto3, err, errlen)) < 0)
			return rc;
	for (size_t i = 0; i < m->n_enum_type; i++)
		if ((rc = add_enum(ps, m->enum_type[i], dst->name)) < 0)
			return rc;
	return 0;
}

static int add_service(protoset *ps, const Google__Protobuf__ServiceDescriptorProto *s, const char *prefix)
{
	Pbrpc__ServiceInfo *dst = alloc(ps, sizeof(*dst));
	if (!dst)
		return -ENOMEM;
	pbrpc__service_info__init(dst);
	if (!(dst->name = join(ps, prefix, s->name ? s->name : "")))
		return -ENOMEM;
	dst->n_methods = s->n_method;
	dst->methods = alloc(ps, s->n_method * sizeof(*dst->methods) + 1);
	Pbrpc__MethodInfo *ms = alloc(ps, s->n_method * sizeof(*ms) + 1);
	if (!dst->methods || !ms)
		return -ENOMEM;
	for (size_t i = 0; i < s->n_method; i++) {
		pbrpc__method_info__init(&ms[i]);
		ms[i].name = s->method[i]->name ? s->method[i]->name : "";
		ms[i].input_type = strip_dot(s->method[i]->input_type);
		ms[i].output_type = strip_dot(s->method[i]->output_type);
		ms[i].client_streaming = s->method[i]->has_client_streaming && s->method[i]->client_streaming;
		ms[i].server_streaming = s->method[i]->has_server_streaming && s->method[i]->server_streaming;
		dst->methods[i] = &ms[i];
	}
	return push((void ***)&ps->all.services, &ps->all.n_services, &ps->cap_services, dst);
}

/* Takes fds (freed with the protoset, also on failure). */
static int protoset_from_set(protoset **out, Google__Protobuf__FileDescriptorSet *fds, char *err, size_t errlen)
{
	int rc = 0;
	*out = NULL;
	protoset *ps = calloc(1, sizeof(*ps));
	if (!ps) {
		google__protobuf__file_descriptor_set__free_unpacked(fds, NULL);
		return -ENOMEM;
	}
	pbrpc__describe_reply__init(&ps->all);
	ps->fds = fds;
	for (size_t i = 0; i < ps->fds->n_file && rc == 0; i++) {
		const Google__Protobuf__FileDescriptorProto *fd = ps->fds->file[i];
		const char *pkg = fd->package ? fd->package : "";
		bool proto3 = fd->syntax && strcmp(fd->syntax, "proto3") == 0;
		for (size_t j = 0; j < fd->n_message_type && rc == 0; j++)
			rc = add_message(ps, fd->message_type[j], pkg, proto3, err, errlen);
		for (size_t j = 0; j < fd->n_enum_type && rc == 0; j++)
			rc = add_enum(ps, fd->enum_type[j], pkg);
		for (size_t j = 0; j < fd->n_service && rc == 0; j++)
			rc = add_service(ps, fd->service[j], pkg);
	}
	if (rc == 0) {
		ps->msg_in = calloc(ps->all.n_messages + 1, 1);
		ps->enum_in = calloc(ps->all.n_enums + 1, 1);
		ps->sub.messages = calloc(ps->all.n_messages + 1, sizeof(*ps->sub.messages));
		ps->sub.enums = calloc(ps->all.n_enums + 1, sizeof(*ps->sub.enums));
		if (!ps->msg_in || !ps->enum_in || !ps->sub.messages || !ps->sub.enums)
			rc = -ENOMEM;
	}
	if (rc < 0) {
		protoset_free(ps);
		return rc;
	}
	*out = ps;
	return 0;
}

int protoset_load(protoset **out, const char *path, char *err, size_t errlen)
{
	Google__Protobuf__FileDescriptorSet *fds;
	*out = NULL;
	int rc = descset_load(path, &fds, err, errlen);
	return rc < 0 ? rc : protoset_from_set(out, fds, err, errlen);
}

int protoset_from_files(protoset **out, size_t n, const ProtobufCBinaryData *files, char *err, size_t errlen)
{
	*out = NULL;
	Google__Protobuf__FileDescriptorSet *fds = calloc(1, sizeof(*fds));
	if (!fds)
		return -ENOMEM;
	google__protobuf__file_descriptor_set__init(fds);
	fds->file = calloc(n + 1, sizeof(*fds->file));
	if (!fds->file) {
		free(fds);
		return -ENOMEM;
	}
	/* Freed by free_unpacked with the system allocator, like an unpacked set. */
	for (size_t i = 0; i < n; i++) {
		fds->file[i] = google__protobuf__file_descriptor_proto__unpack(NULL, files[i].len, files[i].data);
		if (!fds->file[i]) {
			google__protobuf__file_descriptor_set__free_unpacked(fds, NULL);
			snprintf(err, errlen, "file descriptor %zu of %zu does not decode", i + 1, n);
			return -EINVAL;
		}
		fds->n_file++;
	}
	if (n == 0) {
		google__protobuf__file_descriptor_set__free_unpacked(fds, NULL);
		snprintf(err, errlen, "no file descriptor");
		return -EINVAL;
	}
	return protoset_from_set(out, fds, err, errlen);
}

void protoset_free(protoset *ps)
{
	if (!ps)
		return;
	while (ps->chunks) {
		chunk *c = ps->chunks;
		ps->chunks = c->next;
		free(c);
	}
	free(ps->all.services);
	free(ps->all.messages);
	free(ps->all.enums);
	free(ps->msg_in);
	free(ps->enum_in);
	free(ps->sub.messages);
	free(ps->sub.enums);
	if (ps->fds)
		google__protobuf__file_descriptor_set__free_unpacked(ps->fds, NULL);
	free(ps);
}

const Pbrpc__DescribeReply *protoset_all(const protoset *ps)
{
	return &ps->all;
}

/* Marks a type by name and appends it to the reply; unknown names are left
 * for schema_new() to report. */
static void include_type(protoset *ps, const char *name)
{
	for (size_t i = 0; i < ps->all.n_messages; i++) {
		if (strcmp(ps->all.messages[i]->name, name) == 0) {
			if (!ps->msg_in[i]) {
				ps->msg_in[i] = true;
				ps->sub.messages[ps->sub.n_messages++] = ps->all.messages[i];
			}
			return;
		}
	}
	for (size_t i = 0; i < ps->all.n_enums; i++) {
		if (strcmp(ps->all.enums[i]->name, name) == 0) {
			if (!ps->enum_in[i]) {
				ps->enum_in[i] = true;
				ps->sub.enums[ps->sub.n_enums++] = ps->all.enums[i];
			}
			return;
		}
	}
}

int protoset_describe(protoset *ps, const char *symbol, const Pbrpc__DescribeReply **out)
{
	const char *slash = strchr(symbol, '/');
	size_t svc_len = slash ? (size_t)(slash - symbol) : strlen(symbol);

	memset(ps->msg_in, 0, ps->all.n_messages);
	memset(ps->enum_in, 0, ps->all.n_enums);
	ps->sub.n_messages = ps->sub.n_enums = ps->sub.n_services = 0;
	ps->sub.services = NULL;

	for (size_t i = 0; i < ps->all.n_services; i++) {
		Pbrpc__ServiceInfo *svc = ps->all.services[i];
		if (strlen(svc->name) != svc_len || strncmp(svc->name, symbol, svc_len) != 0)
			continue;
		ps->sub_service = *svc;
		if (slash) {
			ps->sub_service.n_methods = 0;
			for (size_t j = 0; j < svc->n_methods; j++) {
				if (strcmp(svc->methods[j]->name, slash + 1) == 0) {
					ps->sub_method = svc->methods[j];
					ps->sub_service.methods = &ps->sub_method;
					ps->sub_service.n_methods = 1;
				}
			}
			if (ps->sub_service.n_methods == 0)
				return -ENOENT;
		}
		ps->sub.services = alloc(ps, sizeof(*ps->sub.services));
		if (!ps->sub.services)
			return -ENOMEM;
		ps->sub.services[0] = &ps->sub_service;
		ps->sub.n_services = 1;
		for (size_t j = 0; j < ps->sub_service.n_methods; j++) {
			include_type(ps, ps->sub_service.methods[j]->input_type);
			include_type(ps, ps->sub_service.methods[j]->output_type);
		}
		break;
	}
	if (ps->sub.n_services == 0) {
		if (slash)
			return -ENOENT;
		include_type(ps, symbol);
		if (ps->sub.n_messages == 0 && ps->sub.n_enums == 0)
			return -ENOENT;
	}
	/* Everything the included messages reach, breadth first. */
	for (size_t i = 0; i < ps->sub.n_messages; i++) {
		const Pbrpc__MessageSchema *m = ps->sub.messages[i];
		for (size_t j = 0; j < m->n_fields; j++)
			if (m->fields[j]->type_name[0])
				include_type(ps, m->fields[j]->type_name);
	}
	*out = &ps->sub;
	return 0;
}
