/* pbrpc-gen's output with the real server and the real client:
 * proto/streamdep.proto through the generated code (its schema registered
 * before main, the generated registration, reflection sending the file), and
 * proto/streamtest.proto (all four method kinds) through protoc-c alone, as
 * a program built without the step but linked with a table that knows the
 * kinds: what pbrpc then refuses, loudly. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "descriptor.pb-c.h"
#include "pbrpc/pbrpc.h"
#include "reflection.pb-c.h"
#include "streamdep.pbrpc.h"
#include "streamtest.pb-c.h"
#include "testutil.h"

TestSuite(gen, .init = tu_setup, .timeout = 60);

/* ---- the schema the generated constructor registered ---- */

Test(gen, generated_schema_registered_before_main)
{
	const pbrpc_schema_file *f = NULL;
	const pbrpc_schema_service *s = pbrpc_schema_find_service("streamdep.Tags", &f);
	cr_assert_not_null(s);
	cr_assert_eq(f, &pbrpc_schema__streamdep_proto);
	cr_assert_str_eq(f->name, "streamdep.proto");
	cr_assert_eq(s->descriptor, &streamdep__tags__descriptor);
	cr_assert_eq(pbrpc_schema_method_flags(s, "Get"), 0);
	cr_assert_eq(pbrpc_schema_method_flags(s, "Nope"), -1);
	cr_assert_eq(pbrpc_schema_find_type("streamdep.Tag"), f);
	cr_assert_null(pbrpc_schema_find_type("streamdep.Nope"));
	/* The embedded set is the file (and its imports: none). */
	Google__Protobuf__FileDescriptorSet *set =
		google__protobuf__file_descriptor_set__unpack(NULL, f->descriptor_set_len, f->descriptor_set);
	cr_assert_not_null(set);
	cr_assert_eq(set->n_file, 1);
	cr_assert_str_eq(set->file[0]->name, "streamdep.proto");
	cr_assert_null(set->file[0]->source_code_info);
	cr_assert_eq(set->file[0]->message_type[0]->n_oneof_decl, 1);
	google__protobuf__file_descriptor_set__free_unpacked(set, NULL);
}

Test(gen, register_checks_and_counts)
{
	pbrpc_schema_file bad = pbrpc_schema__streamdep_proto;
	bad.version = 99;
	cr_assert_eq(pbrpc_schema_register(&bad), PBRPC_EINVALID);
	cr_assert_eq(pbrpc_schema_register(NULL), PBRPC_EINVALID);
	/* Twice more, undone twice: still registered once. */
	cr_assert_eq(pbrpc_schema_register(&pbrpc_schema__streamdep_proto), 0);
	cr_assert_eq(pbrpc_schema_register(&pbrpc_schema__streamdep_proto), 0);
	pbrpc_schema_unregister(&pbrpc_schema__streamdep_proto);
	pbrpc_schema_unregister(&pbrpc_schema__streamdep_proto);
	cr_assert_not_null(pbrpc_schema_find_service("streamdep.Tags", NULL));
	pbrpc_schema_unregister(&bad); /* unknown: no-op */
}

/* ---- streamtest.proto as a program without pbrpc-gen's code knows it ----
 * The table a generated streamtest.pbrpc.c would register, by hand: what the
 * library does with it does not depend on who wrote it. */

static const char *const st_methods[] = { "Get", "Follow", "Collect", "Echo" };
static const uint8_t st_flags[] = { 0, PBRPC_SCHEMA_SERVER_STREAMING, PBRPC_SCHEMA_CLIENT_STREAMING,
				    PBRPC_SCHEMA_CLIENT_STREAMING | PBRPC_SCHEMA_SERVER_STREAMING };
static const pbrpc_schema_service st_services[] = {
	{ "streamtest.Streamer", &streamtest__streamer__descriptor, 4, st_methods, st_flags },
};
static const uint8_t st_set[] = { 0 };
static const pbrpc_schema_file st_file = {
	PBRPC_SCHEMA_VERSION, "streamtest.proto", st_set, 0, 1, st_services, 0, NULL,
};

static void st_get(Streamtest__Streamer_Service *svc, const Streamtest__Query *req, Streamtest__Item_Closure closure,
		   void *data)
{
	Streamtest__Item it = STREAMTEST__ITEM__INIT;
	it.key = req->prefix;
	closure(&it, data);
}

static char logged[512];
static void log_cb(void *user, pbrpc_log_level level, const char *msg)
{
	if (level == PBRPC_LOG_ERROR)
		snprintf(logged, sizeof(logged), "%s", msg);
}

Test(gen, protoc_c_service_with_stream_methods_refused_at_registration)
{
	static Streamtest__Streamer_Service plain;
	static const ProtobufCService base = STREAMTEST__STREAMER__BASE_INIT;
	plain.base = base;
	plain.get = st_get;
	pbrpc_server_opts o = { .log = log_cb, .log_level = PBRPC_LOG_ERROR };
	pbrpc_server *srv;
	cr_assert_eq(pbrpc_server_new(&srv, &o), 0);
	cr_assert_eq(pbrpc_schema_register(&st_file), 0);
	logged[0] = 0;
	cr_assert_eq(pbrpc_server_add_service(srv, &plain.base), PBRPC_EINVALID);
	cr_assert(strstr(logged, "streamtest.Streamer/Follow is a server-streaming method"), "log: %s", logged);
	cr_assert(strstr(logged, "pbrpc-gen"), "log: %s", logged);
	/* Without the table (a program built without the step), pbrpc cannot
	 * know: the service registers, its stream methods as unary ones. */
	pbrpc_schema_unregister(&st_file);
	cr_assert_eq(pbrpc_server_add_service(srv, &plain.base), 0);
	pbrpc_server_free(srv);
}

/* ---- the real server and client ---- */

typedef struct server {
	pbrpc_server *srv;
	pthread_t thr;
	char addr[PBRPC_ENDPOINT_STRLEN];
} server;

static void *run(void *arg)
{
	pbrpc_server_run(((server *)arg)->srv);
	return NULL;
}

static void tags_get(Streamdep__Tags_Service *svc, const Streamdep__Tag *req, Streamdep__Tag_Closure closure,
		     void *data)
{
	closure(req, data);
}

static Streamdep__Tags_Pbrpc tags = STREAMDEP__TAGS__PBRPC_INIT(tags_);

static void start(server *s)
{
	char ep[64];
	snprintf(ep, sizeof(ep), "unix:@pbrpc-test-gen-%d", (int)getpid());
	cr_assert_eq(pbrpc_server_new(&s->srv, NULL), 0);
	cr_assert_eq(streamdep__tags__pbrpc_add(s->srv, &tags), 0);
	cr_assert_eq(pbrpc_server_enable_reflection(s->srv), 0);
	int idx = pbrpc_server_listen(s->srv, ep);
	cr_assert_geq(idx, 0);
	pbrpc_server_address(s->srv, idx, s->addr, sizeof(s->addr));
	cr_assert_eq(pthread_create(&s->thr, NULL, run, s), 0);
}

static void stop(server *s)
{
	pbrpc_server_shutdown(s->srv, 0);
	pthread_join(s->thr, NULL);
	pbrpc_server_free(s->srv);
}

static void on_tag(const Streamdep__Tag *t, void *data)
{
	*(char **)data = t ? strdup(t->name) : NULL;
}

static void on_item(const Streamtest__Item *it, void *data)
{
	*(int *)data = it ? 1 : 2;
}

Test(gen, generated_registration_serves_unary_and_client_refuses_stream_stub)
{
	server s;
	start(&s);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);

	ProtobufCService *svc = pbrpc_client_service(c, &streamdep__tags__descriptor);
	Streamdep__Tag t = STREAMDEP__TAG__INIT;
	t.name = (char *)"hello";
	char *got = NULL;
	streamdep__tags__get(svc, &t, on_tag, &got);
	cr_assert_str_eq(got, "hello");
	free(got);

	/* protoc-c's stub of a server-streaming method, with the table known. */
	cr_assert_eq(pbrpc_schema_register(&st_file), 0);
	ProtobufCService *st = pbrpc_client_service(c, &streamtest__streamer__descriptor);
	Streamtest__Query q = STREAMTEST__QUERY__INIT;
	int seen = 0;
	streamtest__streamer__follow(st, &q, on_item, &seen);
	const char *msg = NULL;
	cr_assert_eq(pbrpc_client_status(&msg), PBRPC_STATUS_FAILED_PRECONDITION);
	cr_assert_eq(seen, 2);
	cr_assert(strstr(msg, "streamtest.Streamer/Follow is a stream method"), "%s", msg);
	/* Get stays unary: it reaches the server, which does not host it. */
	seen = 0;
	streamtest__streamer__get(st, &q, on_item, &seen);
	cr_assert_eq(pbrpc_client_status(NULL), PBRPC_STATUS_UNIMPLEMENTED);
	pbrpc_schema_unregister(&st_file);

	pbrpc_client_free(c);
	stop(&s);
}

static void on_describe(const Pbrpc__DescribeReply *r, void *data)
{
	/* The reply is pbrpc's until we return: keep a copy. */
	*(Pbrpc__DescribeReply **)data = NULL;
	if (r) {
		uint8_t *buf = malloc(pbrpc__describe_reply__get_packed_size(r));
		size_t n = pbrpc__describe_reply__pack(r, buf);
		*(Pbrpc__DescribeReply **)data = pbrpc__describe_reply__unpack(NULL, n, buf);
		free(buf);
	}
}

Test(gen, reflection_sends_the_generated_file)
{
	server s;
	start(&s);
	pbrpc_client *c;
	cr_assert_eq(pbrpc_client_connect(&c, s.addr, NULL), 0);
	ProtobufCService *refl = pbrpc_client_service(c, &pbrpc__reflection__descriptor);
	Pbrpc__DescribeRequest req = PBRPC__DESCRIBE_REQUEST__INIT;
	Pbrpc__DescribeReply *r = NULL;

	const char *symbols[] = { "streamdep.Tags", "streamdep.Tags/Get", "streamdep.Tag" };
	for (size_t k = 0; k < 3; k++) {
		req.symbol = (char *)symbols[k];
		pbrpc__reflection__describe(refl, &req, on_describe, &r);
		cr_assert_not_null(r, "%s", symbols[k]);
		cr_assert_eq(r->n_files, 1, "%s: %zu files", symbols[k], r->n_files);
		Google__Protobuf__FileDescriptorProto *fd =
			google__protobuf__file_descriptor_proto__unpack(NULL, r->files[0].len, r->files[0].data);
		cr_assert_not_null(fd);
		cr_assert_str_eq(fd->name, "streamdep.proto");
		cr_assert_str_eq(fd->message_type[0]->oneof_decl[0]->name, "value");
		google__protobuf__file_descriptor_proto__free_unpacked(fd, NULL);
		if (k < 2) {
			cr_assert_eq(r->n_services, 1);
			cr_assert_not(r->services[0]->methods[0]->client_streaming);
			cr_assert_not(r->services[0]->methods[0]->server_streaming);
		}
		pbrpc__describe_reply__free_unpacked(r, NULL);
	}
	/* The built-in services have no file: none is sent. */
	req.symbol = (char *)"pbrpc.Reflection";
	pbrpc__reflection__describe(refl, &req, on_describe, &r);
	cr_assert_not_null(r);
	cr_assert_eq(r->n_files, 0);
	pbrpc__describe_reply__free_unpacked(r, NULL);

	pbrpc_client_free(c);
	stop(&s);
}
