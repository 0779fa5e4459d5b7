/* Each service's code: its registration, and for stream methods the typed
 * wrappers of pbrpc/stream.h. See gen.h and docs/pbrpc-gen.1.scd for the
 * shape of what is written.
 *
 * Server side, a stream method M of service S gets a typed stream handle
 * (S_M_Stream: pbrpc's stream, the typed callbacks and the user pointer,
 * malloc'd when the stream opens, freed by S__m_end()), a handler type, a
 * callbacks struct, and send/end/cancelled/user functions. Client side it
 * gets a typed call handle (S_M_Call, which is pbrpc's client stream) and
 * open/send/close_send/next/cancel/status/free, and open_async with a typed
 * message callback. The service struct S_Pbrpc holds protoc-c's service
 * (the unary handlers) and one handler per stream method. */
#include <stdlib.h>
#include <string.h>

#include "gen.h"

void gen_stream_includes(FILE *h)
{
	fprintf(h, "#include <pbrpc/stream.h>\n");
}

typedef struct method {
	const char *name;   /* "Follow" */
	char *lower;        /* "follow" */
	char *full;         /* "streamtest.Streamer/Follow" */
	char *in_c, *out_c; /* "Streamtest__Query" */
	char *in_desc, *out_desc; /* "streamtest__query__descriptor" */
	unsigned kind;      /* 0 unary, else pbrpc_stream_kind */
	char *fn;           /* "streamtest__streamer__follow" */
	char *T;            /* "Streamtest__Streamer_Follow" */
} method;

static const char *kind_enum(unsigned k)
{
	return k == 1 ? "PBRPC_STREAM_CLIENT" : k == 2 ? "PBRPC_STREAM_SERVER" : "PBRPC_STREAM_BIDI";
}

static char *lower_method(const char *name)
{
	/* protoc-c's CamelToLower on the method name alone. */
	char *dotted = gen_printf(".%s", name);
	char *l = gen_name_lower(dotted);
	free(dotted);
	return l;
}

static void method_init(method *m, const Google__Protobuf__MethodDescriptorProto *md, const char *svc_full,
			const char *svc_lower, const char *svc_c)
{
	m->name = md->name;
	m->lower = lower_method(md->name);
	m->full = gen_printf("%s/%s", svc_full, md->name);
	m->in_c = gen_name_c(md->input_type);
	m->out_c = gen_name_c(md->output_type);
	char *il = gen_name_lower(md->input_type), *ol = gen_name_lower(md->output_type);
	m->in_desc = gen_printf("%s__descriptor", il);
	m->out_desc = gen_printf("%s__descriptor", ol);
	free(il);
	free(ol);
	m->kind = (md->has_client_streaming && md->client_streaming ? 1u : 0u) |
		  (md->has_server_streaming && md->server_streaming ? 2u : 0u);
	m->fn = gen_printf("%s__%s", svc_lower, m->lower);
	m->T = gen_printf("%s_%s", svc_c, md->name);
}

static void method_fini(method *m)
{
	free(m->lower);
	free(m->full);
	free(m->in_c);
	free(m->out_c);
	free(m->in_desc);
	free(m->out_desc);
	free(m->fn);
	free(m->T);
}

/* ---- server side ---- */

static void server_decls(FILE *h, const method *m)
{
	bool cs = m->kind & 1, ss = m->kind & 2;
	fprintf(h, "\n/* %s: rpc %s(%s%s) returns (%s%s), server side. */\n", m->full, m->name, cs ? "stream " : "",
		m->in_c, ss ? "stream " : "", m->out_c);
	fprintf(h, "typedef struct %s_Stream %s_Stream;\n", m->T, m->T);
	fprintf(h, "typedef struct %s_Ops {\n", m->T);
	if (cs) {
		fprintf(h, "\t/* A message from the client, in order; msg is valid during the call. */\n");
		fprintf(h, "\tvoid (*on_message)(%s_Stream *st, const %s *msg, void *user);\n", m->T, m->in_c);
		fprintf(h, "\t/* The client has ended its sending. */\n");
		fprintf(h, "\tvoid (*on_half_close)(%s_Stream *st, void *user);\n", m->T);
	}
	if (ss) {
		fprintf(h, "\t/* Credit is back after a send returned -EAGAIN. */\n");
		fprintf(h, "\tvoid (*on_writable)(%s_Stream *st, void *user);\n", m->T);
	}
	fprintf(h, "\t/* Over without the handler's word (cancel, deadline, connection): end it. */\n");
	fprintf(h, "\tvoid (*on_cancel)(%s_Stream *st, void *user);\n", m->T);
	fprintf(h, "} %s_Ops;\n", m->T);
	if (ss && !cs)
		fprintf(h, "/* request is valid until %s_end(). */\n"
			   "typedef void (*%s_Handler)(%s_Stream *st, const %s *request, void *user);\n",
			m->fn, m->T, m->T, m->in_c);
	else
		fprintf(h, "/* Set the callbacks with %s_set_ops() to receive the client's messages. */\n"
			   "typedef void (*%s_Handler)(%s_Stream *st, void *user);\n",
			m->fn, m->T, m->T);
	fprintf(h, "/* ops is borrowed until %s_end(); user is passed to its callbacks. */\n", m->fn);
	fprintf(h, "void %s_set_ops(%s_Stream *st, const %s_Ops *ops, void *user);\n", m->fn, m->T, m->T);
	if (ss)
		fprintf(h, "/* pbrpc_stream_send(): 0, -EAGAIN (no credit: on_writable follows), PBRPC_ECLOSED, ... */\n"
			   "int %s_send(%s_Stream *st, const %s *msg);\n",
			m->fn, m->T, m->out_c);
	if (cs && !ss)
		fprintf(h, "/* Ends the stream, with the one reply when status is OK (NULL: empty), and frees st. */\n"
			   "int %s_end(%s_Stream *st, int status, const %s *reply, const char *fmt, ...)\n"
			   "\t__attribute__((format(printf, 4, 5)));\n",
			m->fn, m->T, m->out_c);
	else
		fprintf(h, "/* Ends the stream with a status and frees st (pbrpc_stream_end()). */\n"
			   "int %s_end(%s_Stream *st, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));\n",
			m->fn, m->T);
	fprintf(h, "bool %s_cancelled(const %s_Stream *st);\n", m->fn, m->T);
	fprintf(h, "/* The user pointer given to %s_set_ops(), NULL before. */\n", m->fn);
	fprintf(h, "void *%s_user(const %s_Stream *st);\n", m->fn, m->T);
	fprintf(h, "/* pbrpc's stream, for the rest of pbrpc/stream.h (deadline, metadata, pause). */\n");
	fprintf(h, "pbrpc_stream *%s_raw(%s_Stream *st);\n", m->fn, m->T);
}

static void server_defs(FILE *c, const method *m, const char *svc_c)
{
	bool cs = m->kind & 1, ss = m->kind & 2;
	fprintf(c, "\n/* ---- %s, server side ---- */\n\n", m->full);
	fprintf(c, "static const pbrpc_stream_desc %s_desc = { \"%s\", %s, &%s, &%s };\n\n", m->fn, m->full,
		kind_enum(m->kind), m->in_desc, m->out_desc);
	fprintf(c, "struct %s_Stream {\n\tpbrpc_stream *st;\n\tconst %s_Ops *ops;\n\tvoid *user;\n};\n\n", m->T, m->T);
	fprintf(c, "#define %s_of(user) ((%s_Stream *)(user))\n\n", m->fn, m->T);
	if (cs) {
		fprintf(c, "static void %s_on_message(pbrpc_stream *st, const ProtobufCMessage *msg, void *user)\n{\n"
			   "\t%s_Stream *s = %s_of(user);\n\t(void)st;\n"
			   "\tif (s->ops && s->ops->on_message)\n\t\ts->ops->on_message(s, (const %s *)msg, s->user);\n}\n\n",
			m->fn, m->T, m->fn, m->in_c);
		fprintf(c, "static void %s_on_half_close(pbrpc_stream *st, void *user)\n{\n"
			   "\t%s_Stream *s = %s_of(user);\n\t(void)st;\n"
			   "\tif (s->ops && s->ops->on_half_close)\n\t\ts->ops->on_half_close(s, s->user);\n}\n\n",
			m->fn, m->T, m->fn);
	}
	if (ss)
		fprintf(c, "static void %s_on_writable(pbrpc_stream *st, void *user)\n{\n"
			   "\t%s_Stream *s = %s_of(user);\n\t(void)st;\n"
			   "\tif (s->ops && s->ops->on_writable)\n\t\ts->ops->on_writable(s, s->user);\n}\n\n",
			m->fn, m->T, m->fn);
	fprintf(c, "static void %s_on_cancel(pbrpc_stream *st, void *user)\n{\n"
		   "\t%s_Stream *s = %s_of(user);\n\t(void)st;\n"
		   "\tif (s->ops && s->ops->on_cancel)\n\t\ts->ops->on_cancel(s, s->user);\n}\n\n",
		m->fn, m->T, m->fn);
	fprintf(c, "static const pbrpc_stream_ops %s_ops = {\n", m->fn);
	fprintf(c, "\t%s%s,\n\t%s%s,\n\t%s%s,\n\t%s_on_cancel,\n};\n\n", cs ? m->fn : "0", cs ? "_on_message" : "",
		cs ? m->fn : "0", cs ? "_on_half_close" : "", ss ? m->fn : "0", ss ? "_on_writable" : "", m->fn);
	/* The handler pbrpc calls: wraps the stream, then the user's handler. */
	fprintf(c, "static void %s_serve(pbrpc_stream *st, const ProtobufCMessage *request, void *user)\n{\n", m->fn);
	fprintf(c, "\t%s_Pbrpc *impl = (%s_Pbrpc *)user;\n", svc_c, svc_c);
	fprintf(c, "\tif (!impl->%s) {\n\t\t(void)pbrpc_stream_end(st, PBRPC_STATUS_UNIMPLEMENTED, 0, \"%%s is not "
		   "implemented\", \"%s\");\n\t\treturn;\n\t}\n",
		m->lower, m->full);
	fprintf(c, "\t%s_Stream *s = (%s_Stream *)calloc(1, sizeof(*s));\n", m->T, m->T);
	fprintf(c, "\tif (!s) {\n\t\t(void)pbrpc_stream_end(st, PBRPC_STATUS_RESOURCE_EXHAUSTED, 0, \"out of "
		   "memory\");\n\t\treturn;\n\t}\n");
	fprintf(c, "\ts->st = st;\n\tpbrpc_stream_set_ops(st, &%s_ops, s);\n", m->fn);
	if (ss && !cs)
		fprintf(c, "\timpl->%s(s, (const %s *)request, impl->user);\n}\n\n", m->lower, m->in_c);
	else
		fprintf(c, "\t(void)request;\n\timpl->%s(s, impl->user);\n}\n\n", m->lower);

	fprintf(c, "void %s_set_ops(%s_Stream *st, const %s_Ops *ops, void *user)\n{\n"
		   "\tst->ops = ops;\n\tst->user = user;\n}\n\n",
		m->fn, m->T, m->T);
	if (ss)
		fprintf(c, "int %s_send(%s_Stream *st, const %s *msg)\n{\n"
			   "\treturn pbrpc_stream_send(st->st, msg ? &msg->base : 0);\n}\n\n",
			m->fn, m->T, m->out_c);
	if (cs && !ss)
		fprintf(c, "int %s_end(%s_Stream *st, int status, const %s *reply, const char *fmt, ...)\n{\n",
			m->fn, m->T, m->out_c);
	else
		fprintf(c, "int %s_end(%s_Stream *st, int status, const char *fmt, ...)\n{\n", m->fn, m->T);
	fprintf(c, "\tchar msg[512];\n\tpbrpc_stream *raw = st->st;\n\tif (fmt) {\n\t\tva_list ap;\n"
		   "\t\tva_start(ap, fmt);\n\t\tvsnprintf(msg, sizeof(msg), fmt, ap);\n\t\tva_end(ap);\n\t}\n"
		   "\tfree(st);\n");
	fprintf(c, "\treturn fmt ? pbrpc_stream_end(raw, status, %s, \"%%s\", msg) : pbrpc_stream_end(raw, status, "
		   "%s, 0);\n}\n\n",
		cs && !ss ? "reply ? &reply->base : 0" : "0", cs && !ss ? "reply ? &reply->base : 0" : "0");
	fprintf(c, "bool %s_cancelled(const %s_Stream *st)\n{\n\treturn pbrpc_stream_cancelled(st->st);\n}\n\n", m->fn,
		m->T);
	fprintf(c, "void *%s_user(const %s_Stream *st)\n{\n\treturn st->user;\n}\n\n", m->fn, m->T);
	fprintf(c, "pbrpc_stream *%s_raw(%s_Stream *st)\n{\n\treturn st->st;\n}\n", m->fn, m->T);
}

/* ---- client side ---- */

static void client_decls(FILE *h, const method *m)
{
	bool cs = m->kind & 1, ss = m->kind & 2;
	char *cf = gen_printf("%s_call", m->fn);
	fprintf(h, "\n/* %s, client side: %s_Call is pbrpc's client stream, typed. */\n", m->full, m->T);
	fprintf(h, "typedef struct %s_Call %s_Call;\n", m->T, m->T);
	fprintf(h, "/* pbrpc_client_stream_open(): 0 with *out set (an already ended stream when the\n"
		   " * server refuses); PBRPC_EINVALID, PBRPC_ETOOBIG, -ENOMEM with *out NULL. */\n");
	if (ss && !cs)
		fprintf(h, "int %s_open(pbrpc_client *c, const %s *request, const pbrpc_stream_opts *opts, %s_Call **out);\n",
			cf, m->in_c, m->T);
	else
		fprintf(h, "int %s_open(pbrpc_client *c, const pbrpc_stream_opts *opts, %s_Call **out);\n", cf, m->T);
	fprintf(h, "/* Receiving by closure: msg is valid during the call; msg NULL, once and last,\n"
		   " * ends the stream (%s_status()); pbrpc frees st after it. opts->on_message\n"
		   " * and opts->user are ignored. */\n",
		cf);
	fprintf(h, "typedef void (*%s_Message_Cb)(%s_Call *st, const %s *msg, void *user);\n", m->T, m->T, m->out_c);
	if (ss && !cs)
		fprintf(h, "int %s_open_async(pbrpc_client *c, const %s *request, const pbrpc_stream_opts *opts,\n"
			   "\t%s_Message_Cb on_message, void *user, %s_Call **out);\n",
			cf, m->in_c, m->T, m->T);
	else
		fprintf(h, "int %s_open_async(pbrpc_client *c, const pbrpc_stream_opts *opts, %s_Message_Cb on_message,\n"
			   "\tvoid *user, %s_Call **out);\n",
			cf, m->T, m->T);
	if (cs) {
		fprintf(h, "/* pbrpc_client_stream_send(): 0, -EAGAIN, -ETIMEDOUT, PBRPC_ESTATUS (ended), ... */\n");
		fprintf(h, "int %s_send(%s_Call *st, const %s *msg, int timeout_ms);\n", cf, m->T, m->in_c);
		fprintf(h, "int %s_close_send(%s_Call *st);\n", cf, m->T);
	}
	fprintf(h, "/* 1 with *msg (valid until the next call or free), 0 ended OK, PBRPC_ESTATUS,\n"
		   " * -EAGAIN, -ETIMEDOUT (pbrpc_client_stream_next()). */\n");
	fprintf(h, "int %s_next(%s_Call *st, const %s **msg, int timeout_ms);\n", cf, m->T, m->out_c);
	fprintf(h, "void %s_cancel(%s_Call *st);\n", cf, m->T);
	fprintf(h, "int %s_status(const %s_Call *st, const char **message);\n", cf, m->T);
	fprintf(h, "void %s_free(%s_Call *st);\n", cf, m->T);
	fprintf(h, "pbrpc_client_stream *%s_raw(%s_Call *st);\n", cf, m->T);
	free(cf);
}

static void client_defs(FILE *c, const method *m)
{
	bool cs = m->kind & 1, ss = m->kind & 2;
	char *cf = gen_printf("%s_call", m->fn);
	char *req_param = ss && !cs ? gen_printf(", const %s *request", m->in_c) : gen_strdup("");
	const char *req_arg = ss && !cs ? "request ? &request->base : 0" : "0";
	fprintf(c, "\n/* ---- %s, client side ---- */\n\n", m->full);
	fprintf(c, "#define %s_raw_of(st) ((pbrpc_client_stream *)(void *)(st))\n", cf);
	fprintf(c, "#define %s_typed(st) ((%s_Call *)(void *)(st))\n\n", cf, m->T);
	fprintf(c, "int %s_open(pbrpc_client *c%s, const pbrpc_stream_opts *opts, %s_Call **out)\n{\n", cf,
		req_param, m->T);
	fprintf(c, "\tpbrpc_client_stream *raw = 0;\n\tpbrpc_stream_opts o;\n"
		   "\tif (opts) {\n\t\to = *opts;\n\t} else {\n\t\tmemset(&o, 0, sizeof(o));\n\t}\n"
		   "\to.on_message = 0;\n\to.on_writable = 0;\n");
	fprintf(c, "\tint rc = pbrpc_client_stream_open(c, &%s_desc, %s, &o, &raw);\n", m->fn, req_arg);
	fprintf(c, "\t*out = %s_typed(raw);\n\treturn rc;\n}\n\n", cf);

	fprintf(c, "typedef struct %s_async {\n\t%s_Message_Cb cb;\n\tvoid *user;\n} %s_async;\n\n", cf, m->T, cf);
	fprintf(c, "static void %s_on_reply(pbrpc_client_stream *st, const ProtobufCMessage *msg, void *user)\n{\n"
		   "\t%s_async *a = (%s_async *)user;\n\ta->cb(%s_typed(st), (const %s *)msg, a->user);\n"
		   "\tif (!msg)\n\t\tfree(a);\n}\n\n",
		cf, cf, cf, cf, m->out_c);
	if (ss && !cs)
		fprintf(c, "int %s_open_async(pbrpc_client *c, const %s *request, const pbrpc_stream_opts *opts,\n"
			   "\t%s_Message_Cb on_message, void *user, %s_Call **out)\n{\n",
			cf, m->in_c, m->T, m->T);
	else
		fprintf(c, "int %s_open_async(pbrpc_client *c, const pbrpc_stream_opts *opts, %s_Message_Cb on_message,\n"
			   "\tvoid *user, %s_Call **out)\n{\n",
			cf, m->T, m->T);
	fprintf(c, "\tpbrpc_client_stream *raw = 0;\n\tpbrpc_stream_opts o;\n\t*out = 0;\n"
		   "\tif (!on_message)\n\t\treturn PBRPC_EINVALID;\n"
		   "\t%s_async *a = (%s_async *)malloc(sizeof(*a));\n\tif (!a)\n\t\treturn -ENOMEM;\n"
		   "\ta->cb = on_message;\n\ta->user = user;\n"
		   "\tif (opts) {\n\t\to = *opts;\n\t} else {\n\t\tmemset(&o, 0, sizeof(o));\n\t}\n"
		   "\to.on_message = %s_on_reply;\n\to.on_writable = 0;\n\to.user = a;\n",
		cf, cf, cf);
	fprintf(c, "\tint rc = pbrpc_client_stream_open(c, &%s_desc, %s, &o, &raw);\n", m->fn, req_arg);
	fprintf(c, "\tif (!raw)\n\t\tfree(a); /* no stream: no final callback */\n"
		   "\t*out = %s_typed(raw);\n\treturn rc;\n}\n\n",
		cf);
	if (cs) {
		fprintf(c, "int %s_send(%s_Call *st, const %s *msg, int timeout_ms)\n{\n"
			   "\treturn pbrpc_client_stream_send(%s_raw_of(st), msg ? &msg->base : 0, timeout_ms);\n}\n\n",
			cf, m->T, m->in_c, cf);
		fprintf(c, "int %s_close_send(%s_Call *st)\n{\n\treturn pbrpc_client_stream_close_send(%s_raw_of(st));\n}\n\n",
			cf, m->T, cf);
	}
	fprintf(c, "int %s_next(%s_Call *st, const %s **msg, int timeout_ms)\n{\n"
		   "\tconst ProtobufCMessage *m = 0;\n"
		   "\tint rc = pbrpc_client_stream_next(%s_raw_of(st), &m, timeout_ms);\n"
		   "\t*msg = (const %s *)m;\n\treturn rc;\n}\n\n",
		cf, m->T, m->out_c, cf, m->out_c);
	fprintf(c, "void %s_cancel(%s_Call *st)\n{\n\tpbrpc_client_stream_cancel(%s_raw_of(st));\n}\n\n", cf, m->T,
		cf);
	fprintf(c, "int %s_status(const %s_Call *st, const char **message)\n{\n"
		   "\treturn pbrpc_client_stream_status((const pbrpc_client_stream *)(const void *)st, message);\n}\n\n",
		cf, m->T);
	fprintf(c, "void %s_free(%s_Call *st)\n{\n\tpbrpc_client_stream_free(%s_raw_of(st));\n}\n\n", cf, m->T,
		cf);
	fprintf(c, "pbrpc_client_stream *%s_raw(%s_Call *st)\n{\n\treturn %s_raw_of(st);\n}\n", cf, m->T,
		cf);
	free(req_param);
	free(cf);
}

/* ---- the service ---- */

void gen_service(const gen_file *g, const Google__Protobuf__ServiceDescriptorProto *s, FILE *h, FILE *c)
{
	char *full = g->pkg[0] ? gen_printf("%s.%s", g->pkg, s->name) : gen_strdup(s->name);
	char *cname = gen_name_c(full);
	char *lower = gen_name_lower(full);
	char *upper = gen_name_upper(full);
	method *ms = calloc(s->n_method + 1, sizeof(*ms));
	size_t n_streams = 0;
	if (!ms)
		exit(1);
	for (size_t i = 0; i < s->n_method; i++) {
		method_init(&ms[i], s->method[i], full, lower, cname);
		n_streams += ms[i].kind != 0;
	}

	fprintf(h, "\n/* ==== %s ==== */\n", full);
	for (size_t i = 0; i < s->n_method; i++)
		if (ms[i].kind)
			server_decls(h, &ms[i]);

	fprintf(h, "\n/* %s as a server hosts it: protoc-c's service for the unary methods (their\n"
		   " * slots; those of stream methods stay NULL) and a handler per stream method. */\n",
		full);
	fprintf(h, "typedef struct %s_Pbrpc {\n\t%s_Service unary;\n", cname, cname);
	for (size_t i = 0; i < s->n_method; i++)
		if (ms[i].kind)
			fprintf(h, "\t%s_Handler %s;\n", ms[i].T, ms[i].lower);
	fprintf(h, "\tvoid *user; /* passed to the stream handlers */\n} %s_Pbrpc;\n", cname);
	fprintf(h, "/* Names every handler PREFIX##method, as protoc-c's %s__INIT does. */\n", upper);
	fprintf(h, "#define %s__PBRPC_INIT(prefix) { { %s__BASE_INIT", upper, upper);
	for (size_t i = 0; i < s->n_method; i++)
		fprintf(h, ", %s%s", ms[i].kind ? "0" : "prefix##", ms[i].kind ? "" : ms[i].lower);
	fprintf(h, " }");
	for (size_t i = 0; i < s->n_method; i++)
		if (ms[i].kind)
			fprintf(h, ", prefix##%s", ms[i].lower);
	fprintf(h, ", 0 }\n");
	fprintf(h, "/* Registers %s on srv, which borrows impl: its stream methods first\n"
		   " * (pbrpc_server_add_stream), then impl->unary (pbrpc_server_add_service).\n"
		   " * Returns 0 or a negative code. */\n",
		full);
	fprintf(h, "int %s__pbrpc_add(pbrpc_server *srv, %s_Pbrpc *impl);\n", lower, cname);

	for (size_t i = 0; i < s->n_method; i++)
		if (ms[i].kind)
			client_decls(h, &ms[i]);

	for (size_t i = 0; i < s->n_method; i++)
		if (ms[i].kind) {
			server_defs(c, &ms[i], cname);
			client_defs(c, &ms[i]);
		}
	fprintf(c, "\nint %s__pbrpc_add(pbrpc_server *srv, %s_Pbrpc *impl)\n{\n", lower, cname);
	if (n_streams)
		fprintf(c, "\tint rc;\n");
	for (size_t i = 0; i < s->n_method; i++)
		if (ms[i].kind)
			fprintf(c, "\tif ((rc = pbrpc_server_add_stream(srv, &%s_desc, %s_serve, impl)) < 0)\n"
				   "\t\treturn rc;\n",
				ms[i].fn, ms[i].fn);
	fprintf(c, "\treturn pbrpc_server_add_service(srv, &impl->unary.base);\n}\n");

	for (size_t i = 0; i < s->n_method; i++)
		method_fini(&ms[i]);
	free(ms);
	free(upper);
	free(lower);
	free(cname);
	free(full);
}
