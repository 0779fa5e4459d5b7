/* pbrpc.Reflection: the server's services and the schemas of their messages,
 * read from protobuf-c's descriptors.
 *
 * A reply is a tree of small structs pointing at descriptor strings; it is
 * built in an arena and dropped in one go after the closure has packed it.
 * Type graphs are walked breadth-first with a visited list, so recursive
 * messages end the walk instead of looping. */
#include <errno.h>
#include <stdalign.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "reflection.pb-c.h"
#include "server/registry.h"
#include "util/arena.h"

typedef struct reflection_service {
	Pbrpc__Reflection_Service svc; /* handlers receive &svc */
	const pbrpc__registry *reg;
} reflection_service;

#define reflection_of(s) ((reflection_service *)((char *)(s) - offsetof(reflection_service, svc)))

/* Replies are built in a pbrpc__arena that retains nothing (keep = 0), so
 * an idle server holds no reflection memory. */

/* ---- type sets ---- */

typedef struct ptrvec {
	const void **v;
	size_t n, cap;
} ptrvec;

/* Message and enum descriptors, in the order first reached. */
typedef struct typeset {
	ptrvec msgs; /* const ProtobufCMessageDescriptor * */
	ptrvec enums; /* const ProtobufCEnumDescriptor * */
	int failed;
} typeset;

#define ts_msg(ts, i) ((const ProtobufCMessageDescriptor *)(ts)->msgs.v[i])
#define ts_enum(ts, i) ((const ProtobufCEnumDescriptor *)(ts)->enums.v[i])

static void typeset_free(typeset *ts)
{
	free(ts->msgs.v);
	free(ts->enums.v);
}

/* Appends p unless present. Linear search: schemas are small, and the visited
 * check is what ends the walk of a recursive message. */
static void add_unique(typeset *ts, ptrvec *pv, const void *p)
{
	for (size_t i = 0; i < pv->n; i++)
		if (pv->v[i] == p)
			return;
	if (pv->n == pv->cap) {
		size_t cap = pv->cap ? pv->cap * 2 : 16;
		const void **v = realloc(pv->v, cap * sizeof(*v));
		if (!v) {
			ts->failed = 1;
			return;
		}
		pv->v = v;
		pv->cap = cap;
	}
	pv->v[pv->n++] = p;
}

static void add_message(typeset *ts, const ProtobufCMessageDescriptor *md)
{
	add_unique(ts, &ts->msgs, md);
}

static void add_enum(typeset *ts, const ProtobufCEnumDescriptor *ed)
{
	add_unique(ts, &ts->enums, ed);
}

/* Adds every type reachable from the messages already in the set. */
static void typeset_close(typeset *ts)
{
	for (size_t i = 0; i < ts->msgs.n; i++) {
		const ProtobufCMessageDescriptor *md = ts_msg(ts, i);
		for (unsigned j = 0; j < md->n_fields; j++) {
			const ProtobufCFieldDescriptor *f = &md->fields[j];
			if (f->type == PROTOBUF_C_TYPE_MESSAGE)
				add_message(ts, f->descriptor);
			else if (f->type == PROTOBUF_C_TYPE_ENUM)
				add_enum(ts, f->descriptor);
		}
	}
}

static void add_method_types(typeset *ts, const ProtobufCMethodDescriptor *m)
{
	add_message(ts, m->input);
	add_message(ts, m->output);
}

/* ---- reply building ---- */

static char *str(const char *s)
{
	return (char *)(s ? s : protobuf_c_empty_string);
}

static Pbrpc__ServiceInfo *service_info(pbrpc__arena *a, const ProtobufCServiceDescriptor *sd,
					const ProtobufCMethodDescriptor *only)
{
	Pbrpc__ServiceInfo *si = pbrpc__arena_alloc(a, sizeof(*si));
	size_t n = only ? 1 : sd->n_methods;
	Pbrpc__MethodInfo **mv = pbrpc__arena_alloc(a, n * sizeof(*mv));
	if (!si || !mv)
		return NULL;
	pbrpc__service_info__init(si);
	si->name = str(sd->name);
	si->n_methods = n;
	si->methods = mv;
	for (size_t i = 0; i < n; i++) {
		const ProtobufCMethodDescriptor *m = only ? only : &sd->methods[i];
		Pbrpc__MethodInfo *mi = pbrpc__arena_alloc(a, sizeof(*mi));
		if (!mi)
			return NULL;
		pbrpc__method_info__init(mi);
		mi->name = str(m->name);
		mi->input_type = str(m->input->name);
		mi->output_type = str(m->output->name);
		mv[i] = mi;
	}
	return si;
}

/* protoc's ToJsonName: drop each '_' and upper-case the letter after it. */
static char *json_name(pbrpc__arena *a, const char *name)
{
	char *out = pbrpc__arena_alloc(a, strlen(name) + 1);
	if (!out)
		return NULL;
	char *o = out;
	int up = 0;
	for (const char *p = name; *p; p++) {
		if (*p == '_') {
			up = 1;
		} else {
			*o++ = up && *p >= 'a' && *p <= 'z' ? (char)(*p - 'a' + 'A') : *p;
			up = 0;
		}
	}
	*o = '\0';
	return out;
}

/* protobuf-c gives implicit-presence proto3 fields LABEL_NONE; a message with
 * any such field comes from a proto3 file, where LABEL_OPTIONAL can only mean
 * an explicit "optional". */
static int is_proto3(const ProtobufCMessageDescriptor *md)
{
	for (unsigned i = 0; i < md->n_fields; i++)
		if (md->fields[i].label == PROTOBUF_C_LABEL_NONE)
			return 1;
	return 0;
}

static Pbrpc__FieldSchema__Label field_label(const ProtobufCFieldDescriptor *f, int proto3)
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
	case PROTOBUF_C_LABEL_NONE:
	default:
		return PBRPC__FIELD_SCHEMA__LABEL__OPTIONAL;
	}
}

static Pbrpc__FieldSchema *field_schema(pbrpc__arena *a, const ProtobufCFieldDescriptor *f, int proto3)
{
	Pbrpc__FieldSchema *fs = pbrpc__arena_alloc(a, sizeof(*fs));
	if (!fs)
		return NULL;
	pbrpc__field_schema__init(fs);
	fs->name = str(f->name);
	fs->number = f->id;
	fs->label = field_label(f, proto3);
	fs->type = (Pbrpc__FieldSchema__Type)f->type;
	if (f->type == PROTOBUF_C_TYPE_MESSAGE)
		fs->type_name = str(((const ProtobufCMessageDescriptor *)f->descriptor)->name);
	else if (f->type == PROTOBUF_C_TYPE_ENUM)
		fs->type_name = str(((const ProtobufCEnumDescriptor *)f->descriptor)->name);
	fs->packed = (f->flags & PROTOBUF_C_FIELD_FLAG_PACKED) != 0;
	/* fs->oneof stays "": protobuf-c 1.4's descriptors carry no oneof names
	 * (members only share a quantifier_offset). */
	fs->json_name = json_name(a, f->name);
	return fs->json_name ? fs : NULL;
}

static Pbrpc__MessageSchema *message_schema(pbrpc__arena *a, const ProtobufCMessageDescriptor *md)
{
	Pbrpc__MessageSchema *ms = pbrpc__arena_alloc(a, sizeof(*ms));
	Pbrpc__FieldSchema **fv = pbrpc__arena_alloc(a, md->n_fields * sizeof(*fv));
	if (!ms || !fv)
		return NULL;
	pbrpc__message_schema__init(ms);
	ms->name = str(md->name);
	ms->n_fields = md->n_fields;
	ms->fields = fv;
	int proto3 = is_proto3(md);
	for (unsigned i = 0; i < md->n_fields; i++)
		if (!(fv[i] = field_schema(a, &md->fields[i], proto3)))
			return NULL;
	return ms;
}

static Pbrpc__EnumSchema *enum_schema(pbrpc__arena *a, const ProtobufCEnumDescriptor *ed)
{
	Pbrpc__EnumSchema *es = pbrpc__arena_alloc(a, sizeof(*es));
	Pbrpc__EnumValueSchema **vv = pbrpc__arena_alloc(a, ed->n_values * sizeof(*vv));
	if (!es || !vv)
		return NULL;
	pbrpc__enum_schema__init(es);
	es->name = str(ed->name);
	es->n_values = ed->n_values;
	es->values = vv;
	for (unsigned i = 0; i < ed->n_values; i++) {
		Pbrpc__EnumValueSchema *v = pbrpc__arena_alloc(a, sizeof(*v));
		if (!v)
			return NULL;
		pbrpc__enum_value_schema__init(v);
		v->name = str(ed->values[i].name);
		v->number = ed->values[i].value;
		vv[i] = v;
	}
	return es;
}

/* Fills the reply's schemas from a closed type set. Returns 0 or -ENOMEM. */
static int fill_schemas(pbrpc__arena *a, const typeset *ts, Pbrpc__DescribeReply *reply)
{
	reply->messages = pbrpc__arena_alloc(a, ts->msgs.n * sizeof(*reply->messages));
	reply->enums = pbrpc__arena_alloc(a, ts->enums.n * sizeof(*reply->enums));
	if (!reply->messages || !reply->enums)
		return -ENOMEM;
	reply->n_messages = ts->msgs.n;
	for (size_t i = 0; i < ts->msgs.n; i++)
		if (!(reply->messages[i] = message_schema(a, ts_msg(ts, i))))
			return -ENOMEM;
	reply->n_enums = ts->enums.n;
	for (size_t i = 0; i < ts->enums.n; i++)
		if (!(reply->enums[i] = enum_schema(a, ts_enum(ts, i))))
			return -ENOMEM;
	return 0;
}

/* ---- handlers ---- */

static void fail(void *closure_data, int status, const char *what)
{
	pbrpc_call_set_status(closure_data, status, "%s", what);
}

static void reflection_list_services(Pbrpc__Reflection_Service *svc, const Pbrpc__ListServicesRequest *req,
				     Pbrpc__ListServicesReply_Closure closure, void *closure_data)
{
	const pbrpc__registry *reg = reflection_of(svc)->reg;
	Pbrpc__ListServicesReply reply = PBRPC__LIST_SERVICES_REPLY__INIT;
	pbrpc__arena a;
	pbrpc__arena_init(&a, 0, NULL);
	size_t n = reg->n_services;

	reply.services = pbrpc__arena_alloc(&a, n * sizeof(*reply.services));
	for (size_t i = 0; reply.services && i < n; i++) {
		reply.services[i] = service_info(&a, reg->services[i].service->descriptor, NULL);
		if (!reply.services[i])
			break;
		reply.n_services++;
	}
	if (a.failed) {
		fail(closure_data, PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		closure(NULL, closure_data);
	} else {
		closure(&reply, closure_data);
	}
	pbrpc__arena_fini(&a);
}

/* Every message and enum the server's methods reach. */
static void all_types(const pbrpc__registry *reg, typeset *ts)
{
	size_t n = reg->n_services;
	for (size_t i = 0; i < n; i++) {
		const ProtobufCServiceDescriptor *sd = reg->services[i].service->descriptor;
		for (unsigned j = 0; j < sd->n_methods; j++)
			add_method_types(ts, &sd->methods[j]);
	}
	typeset_close(ts);
}

/* Resolves `symbol` into the services to list and the root types to describe.
 * Returns 0, PBRPC_EINVALID for an unknown symbol, -ENOMEM. */
static int resolve(const pbrpc__registry *reg, pbrpc__arena *a, const char *symbol, Pbrpc__DescribeReply *reply,
		   typeset *roots)
{
	const char *slash = strchr(symbol, '/');
	size_t len = slash ? (size_t)(slash - symbol) : strlen(symbol);
	char *name = pbrpc__arena_alloc(a, len + 1);
	if (!name)
		return -ENOMEM;
	memcpy(name, symbol, len);
	name[len] = '\0';

	const ProtobufCService *s = pbrpc__registry_find_service(reg, name);
	if (s) {
		const ProtobufCServiceDescriptor *sd = s->descriptor;
		const ProtobufCMethodDescriptor *m = NULL;
		if (slash) {
			m = protobuf_c_service_descriptor_get_method_by_name(sd, slash + 1);
			if (!m)
				return PBRPC_EINVALID;
			add_method_types(roots, m);
		} else {
			for (unsigned j = 0; j < sd->n_methods; j++)
				add_method_types(roots, &sd->methods[j]);
		}
		reply->services = pbrpc__arena_alloc(a, sizeof(*reply->services));
		if (!reply->services || !(reply->services[0] = service_info(a, sd, m)))
			return -ENOMEM;
		reply->n_services = 1;
		return roots->failed ? -ENOMEM : 0;
	}
	if (slash)
		return PBRPC_EINVALID;

	typeset all = { 0 };
	all_types(reg, &all);
	int rc = all.failed ? -ENOMEM : PBRPC_EINVALID;
	for (size_t i = 0; rc == PBRPC_EINVALID && i < all.msgs.n; i++)
		if (strcmp(ts_msg(&all, i)->name, symbol) == 0) {
			add_message(roots, ts_msg(&all, i));
			rc = 0;
		}
	for (size_t i = 0; rc == PBRPC_EINVALID && i < all.enums.n; i++)
		if (strcmp(ts_enum(&all, i)->name, symbol) == 0) {
			add_enum(roots, ts_enum(&all, i));
			rc = 0;
		}
	typeset_free(&all);
	return rc == 0 && roots->failed ? -ENOMEM : rc;
}

static void reflection_describe(Pbrpc__Reflection_Service *svc, const Pbrpc__DescribeRequest *req,
				Pbrpc__DescribeReply_Closure closure, void *closure_data)
{
	const pbrpc__registry *reg = reflection_of(svc)->reg;
	Pbrpc__DescribeReply reply = PBRPC__DESCRIBE_REPLY__INIT;
	pbrpc__arena a;
	pbrpc__arena_init(&a, 0, NULL);
	typeset ts = { 0 };

	int rc = resolve(reg, &a, req->symbol, &reply, &ts);
	if (rc == 0) {
		typeset_close(&ts);
		rc = ts.failed ? -ENOMEM : fill_schemas(&a, &ts, &reply);
	}
	if (rc == PBRPC_EINVALID) {
		pbrpc_call_set_status(closure_data, PBRPC_STATUS_NOT_FOUND, "unknown symbol %s", req->symbol);
		closure(NULL, closure_data);
	} else if (rc < 0) {
		fail(closure_data, PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		closure(NULL, closure_data);
	} else {
		closure(&reply, closure_data);
	}
	typeset_free(&ts);
	pbrpc__arena_fini(&a);
}

static void reflection_destroy(Pbrpc__Reflection_Service *svc)
{
	free(reflection_of(svc));
}

PBRPC_EXPORT int pbrpc_server_enable_reflection(pbrpc_server *srv)
{
	reflection_service *r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	pbrpc__reflection__init(&r->svc, reflection_destroy);
	r->svc.list_services = reflection_list_services;
	r->svc.describe = reflection_describe;
	r->reg = pbrpc__server_registry(srv);
	return pbrpc__registry_add(pbrpc__server_registry(srv), &r->svc.base, true);
}
