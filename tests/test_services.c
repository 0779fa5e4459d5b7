/* pbrpc.Health, pbrpc.Reflection and the example services (demo.Kv,
 * demo.Echo), end to end through a real server on a temporary Unix socket. */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "demo_services.h"
#include "health.pb-c.h"
#include "pbrpc/client.h"
#include "pbrpc/server.h"
#include "reflection.pb-c.h"
#include "reftest.pb-c.h"
#include "reftest2.pb-c.h"
#include "rpcpeer.h"
#include "stats.pb-c.h"

/* ---- schema-only services, for reflection ---- */

static void graph_walk(Reftest__Graph_Service *svc, const Reftest__Tree *req, Reftest__Node_Closure closure,
		       void *data)
{
	Reftest__Node n = REFTEST__NODE__INIT;
	closure(&n, data);
}

static void old_get(Reftest2__Old_Service *svc, const Reftest2__Legacy *req, Reftest2__Legacy_Closure closure,
		    void *data)
{
	closure(req, data);
}

static Reftest__Graph_Service graph_svc = REFTEST__GRAPH__INIT(graph_);
static Reftest2__Old_Service old_svc = REFTEST2__OLD__INIT(old_);

/* ---- a server on a background thread ---- */

typedef struct tsrv {
	pbrpc_server *srv;
	pthread_t thread;
	Demo__Kv_Service *kv;
	Demo__Echo_Service *echo;
	char dir[64];
	char ep[sizeof("unix:") + 64 + sizeof("/s.sock")];
	int run_rc;
} tsrv;

static tsrv T;
static pbrpc_call_log_cb T_call_log; /* for the next start_server() */

static void *srv_main(void *arg)
{
	tsrv *t = arg;
	t->run_rc = pbrpc_server_run(t->srv);
	return NULL;
}

/* Starts the server; `setup` runs on this thread before the loop starts. */
static void start_server(unsigned workers, void (*setup)(pbrpc_server *))
{
	tsrv *t = &T;
	memset(t, 0, sizeof(*t));
	snprintf(t->dir, sizeof(t->dir), "/tmp/pbrpc-svc-XXXXXX");
	cr_assert_not_null(mkdtemp(t->dir));
	snprintf(t->ep, sizeof(t->ep), "unix:%.63s/s.sock", t->dir);

	pbrpc_server_opts opts = { .workers = workers, .call_log = T_call_log };
	cr_assert_eq(pbrpc_server_new(&t->srv, &opts), 0);
	t->kv = demo_kv_new();
	t->echo = demo_echo_new();
	cr_assert(t->kv && t->echo);
	cr_assert_eq(demo_kv_add(t->srv, t->kv), 0);
	cr_assert_eq(pbrpc_server_add_service(t->srv, &t->echo->base), 0);
	cr_assert_eq(pbrpc_server_enable_health(t->srv), 0);
	cr_assert_eq(pbrpc_server_enable_reflection(t->srv), 0);
	cr_assert_eq(pbrpc_server_add_service(t->srv, &graph_svc.base), 0);
	cr_assert_eq(pbrpc_server_add_service(t->srv, &old_svc.base), 0);
	int idx = pbrpc_server_listen(t->srv, t->ep);
	cr_assert_geq(idx, 0, "listen %s: %s", t->ep, pbrpc_strerror(idx));
	if (setup)
		setup(t->srv);
	cr_assert_eq(pthread_create(&t->thread, NULL, srv_main, t), 0);
}

static void stop_server_after(int drain_ms)
{
	tsrv *t = &T;
	pbrpc_server_shutdown(t->srv, drain_ms);
	pthread_join(t->thread, NULL);
	demo_echo_free(t->echo);
	pbrpc_server_free(t->srv);
	demo_kv_free(t->kv);
	rmdir(t->dir);
	cr_expect_eq(t->run_rc, 0);
}

static void setup_default(void)
{
	start_server(0, NULL);
}

static void setup_workers(void)
{
	start_server(4, NULL);
}

static void teardown(void)
{
	stop_server_after(1000);
}

static rp_conn open_peer(void)
{
	rp_conn c;
	int rc = rp_open(&c, T.ep);
	cr_assert_eq(rc, 0, "connect %s: %s", T.ep, pbrpc_strerror(rc));
	return c;
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Makes a call and asserts that the transport worked; returns the status. */
#define CALL(c, method, req, reply_desc, reply, res)                                                    \
	do {                                                                                            \
		int rc_ = rp_call((c), (method), (const ProtobufCMessage *)(req), (reply_desc),          \
				  (ProtobufCMessage **)(reply), (res));                                 \
		cr_assert_eq(rc_, 0, "%s: %s", (method), pbrpc_strerror(rc_));                         \
	} while (0)

/* ---- health ---- */

static int health(rp_conn *c, const char *name, rp_result *res)
{
	Pbrpc__HealthCheckRequest req = PBRPC__HEALTH_CHECK_REQUEST__INIT;
	Pbrpc__HealthCheckResponse *reply = NULL;
	req.service = (char *)name;
	CALL(c, "pbrpc.Health/Check", &req, &pbrpc__health_check_response__descriptor, &reply, res);
	int st = reply ? (int)reply->status : -1;
	if (reply)
		pbrpc__health_check_response__free_unpacked(reply, NULL);
	return st;
}

TestSuite(health, .init = setup_default, .fini = teardown, .timeout = 20);

Test(health, server_and_services_serving)
{
	rp_conn c = open_peer();
	rp_result res;
	const char *names[] = { "", "demo.Kv", "demo.Echo", "pbrpc.Health", "pbrpc.Reflection" };
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		int st = health(&c, names[i], &res);
		cr_expect_eq(res.status, PBRPC_STATUS_OK, "\"%s\": %s", names[i], res.message);
		cr_expect_eq(st, PBRPC__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING, "\"%s\"", names[i]);
	}
	rp_close(&c);
}

Test(health, unknown_service_is_not_found)
{
	rp_conn c = open_peer();
	rp_result res;
	health(&c, "demo.Nope", &res);
	cr_expect_eq(res.status, PBRPC_STATUS_NOT_FOUND);
	cr_expect_str_eq(res.message, "unknown service demo.Nope");
	/* The connection stays usable. */
	cr_expect_eq(health(&c, "", &res), PBRPC__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
	rp_close(&c);
}

static void kv_not_serving(pbrpc_server *srv)
{
	cr_assert_eq(pbrpc_server_set_serving(srv, "demo.Kv", false), 0);
}

static void all_not_serving(pbrpc_server *srv)
{
	cr_assert_eq(pbrpc_server_set_serving(srv, "", false), 0);
}

/* Declared suites only: Criterion leaks the ones it creates implicitly. */
TestSuite(health_state, .timeout = 20);

Test(health_state, service_not_serving, .fini = teardown)
{
	start_server(0, kv_not_serving);
	rp_conn c = open_peer();
	rp_result res;
	cr_expect_eq(health(&c, "demo.Kv", &res), PBRPC__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING);
	cr_expect_eq(health(&c, "demo.Echo", &res), PBRPC__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
	cr_expect_eq(health(&c, "", &res), PBRPC__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
	rp_close(&c);
}

Test(health_state, server_not_serving, .fini = teardown)
{
	start_server(0, all_not_serving);
	rp_conn c = open_peer();
	rp_result res;
	cr_expect_eq(health(&c, "", &res), PBRPC__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING);
	rp_close(&c);
}

Test(health_state, set_serving_unknown_name)
{
	pbrpc_server *srv;
	cr_assert_eq(pbrpc_server_new(&srv, NULL), 0);
	cr_assert_eq(pbrpc_server_enable_health(srv), 0);
	cr_expect_eq(pbrpc_server_set_serving(srv, "demo.Nope", false), PBRPC_EINVALID);
	cr_expect_eq(pbrpc_server_set_serving(srv, "pbrpc.Health", false), 0);
	pbrpc_server_free(srv);
}

/* ---- reflection ---- */

static Pbrpc__DescribeReply *describe(rp_conn *c, const char *symbol, rp_result *res)
{
	Pbrpc__DescribeRequest req = PBRPC__DESCRIBE_REQUEST__INIT;
	Pbrpc__DescribeReply *reply = NULL;
	req.symbol = (char *)symbol;
	CALL(c, "pbrpc.Reflection/Describe", &req, &pbrpc__describe_reply__descriptor, &reply, res);
	return reply;
}

static const Pbrpc__MessageSchema *find_msg(const Pbrpc__DescribeReply *r, const char *name)
{
	const Pbrpc__MessageSchema *found = NULL;
	for (size_t i = 0; i < r->n_messages; i++) {
		if (strcmp(r->messages[i]->name, name) == 0) {
			cr_assert_null(found, "%s listed twice", name);
			found = r->messages[i];
		}
	}
	return found;
}

static const Pbrpc__FieldSchema *find_field(const Pbrpc__MessageSchema *m, const char *name)
{
	for (size_t i = 0; i < m->n_fields; i++)
		if (strcmp(m->fields[i]->name, name) == 0)
			return m->fields[i];
	cr_assert_fail("%s has no field %s", m->name, name);
	return NULL;
}

static void expect_field(const Pbrpc__MessageSchema *m, const char *name, uint32_t number, int label, int type,
			 const char *type_name, const char *json)
{
	const Pbrpc__FieldSchema *f = find_field(m, name);
	cr_expect_eq(f->number, number, "%s.%s number", m->name, name);
	cr_expect_eq(f->label, label, "%s.%s label %d", m->name, name, f->label);
	cr_expect_eq(f->type, type, "%s.%s type %d", m->name, name, f->type);
	cr_expect_str_eq(f->type_name, type_name, "%s.%s type_name", m->name, name);
	cr_expect_str_eq(f->json_name, json, "%s.%s json_name", m->name, name);
	cr_expect_str_eq(f->oneof, "");
}

TestSuite(reflection, .init = setup_default, .fini = teardown, .timeout = 20);

Test(reflection, list_services)
{
	rp_conn c = open_peer();
	rp_result res;
	Pbrpc__ListServicesRequest req = PBRPC__LIST_SERVICES_REQUEST__INIT;
	Pbrpc__ListServicesReply *reply = NULL;
	CALL(&c, "pbrpc.Reflection/ListServices", &req, &pbrpc__list_services_reply__descriptor, &reply, &res);
	cr_assert_eq(res.status, PBRPC_STATUS_OK, "%s", res.message);

	const char *want[] = { "demo.Kv", "demo.Echo", "pbrpc.Health", "pbrpc.Reflection", "reftest.Graph",
			       "reftest2.Old" };
	cr_assert_eq(reply->n_services, 6);
	for (size_t i = 0; i < 6; i++)
		cr_expect_str_eq(reply->services[i]->name, want[i]);

	const Pbrpc__ServiceInfo *kv = reply->services[0];
	const char *m[][3] = {
		{ "Put", "demo.PutRequest", "demo.PutReply" },
		{ "Get", "demo.GetRequest", "demo.GetReply" },
		{ "Delete", "demo.DeleteRequest", "demo.DeleteReply" },
		{ "List", "demo.ListRequest", "demo.ListReply" },
		{ "Watch", "demo.WatchRequest", "demo.Change" },
		{ "Upload", "demo.PutRequest", "demo.UploadReply" },
		{ "Lookup", "demo.GetRequest", "demo.Entry" },
	};
	/* The stream keywords, from kv.pbrpc.c's table (pbrpc-gen). */
	const bool streams[][2] = { { 0, 0 }, { 0, 0 }, { 0, 0 }, { 0, 0 }, { 0, 1 }, { 1, 0 }, { 1, 1 } };
	cr_assert_eq(kv->n_methods, 7);
	for (size_t i = 0; i < 7; i++) {
		cr_expect_str_eq(kv->methods[i]->name, m[i][0]);
		cr_expect_str_eq(kv->methods[i]->input_type, m[i][1]);
		cr_expect_str_eq(kv->methods[i]->output_type, m[i][2]);
		cr_expect_eq(kv->methods[i]->client_streaming, streams[i][0], "%s", m[i][0]);
		cr_expect_eq(kv->methods[i]->server_streaming, streams[i][1], "%s", m[i][0]);
	}
	cr_expect_eq(reply->services[3]->n_methods, 2);
	pbrpc__list_services_reply__free_unpacked(reply, NULL);
	rp_close(&c);
}

Test(reflection, describe_method)
{
	rp_conn c = open_peer();
	rp_result res;
	Pbrpc__DescribeReply *r = describe(&c, "demo.Kv/Put", &res);
	cr_assert_eq(res.status, PBRPC_STATUS_OK, "%s", res.message);

	cr_assert_eq(r->n_services, 1);
	cr_expect_str_eq(r->services[0]->name, "demo.Kv");
	cr_assert_eq(r->services[0]->n_methods, 1);
	cr_expect_str_eq(r->services[0]->methods[0]->name, "Put");

	cr_expect_eq(r->n_messages, 2);
	cr_expect_eq(r->n_enums, 0);
	const Pbrpc__MessageSchema *put = find_msg(r, "demo.PutRequest");
	cr_assert_not_null(put);
	cr_expect_eq(put->n_fields, 2);
	expect_field(put, "key", 1, PBRPC__FIELD_SCHEMA__LABEL__OPTIONAL, PBRPC__FIELD_SCHEMA__TYPE__STRING, "", "key");
	expect_field(put, "value", 2, PBRPC__FIELD_SCHEMA__LABEL__OPTIONAL, PBRPC__FIELD_SCHEMA__TYPE__BYTES, "",
		     "value");
	const Pbrpc__MessageSchema *rep = find_msg(r, "demo.PutReply");
	cr_assert_not_null(rep);
	expect_field(rep, "created", 1, PBRPC__FIELD_SCHEMA__LABEL__OPTIONAL, PBRPC__FIELD_SCHEMA__TYPE__BOOL, "",
		     "created");
	pbrpc__describe_reply__free_unpacked(r, NULL);
	rp_close(&c);
}

Test(reflection, describe_message_reaches_nested_types)
{
	rp_conn c = open_peer();
	rp_result res;
	Pbrpc__DescribeReply *r = describe(&c, "demo.ListReply", &res);
	cr_assert_eq(res.status, PBRPC_STATUS_OK, "%s", res.message);
	cr_expect_eq(r->n_services, 0);
	cr_assert_eq(r->n_messages, 2);
	cr_expect_str_eq(r->messages[0]->name, "demo.ListReply"); /* the symbol first */
	const Pbrpc__MessageSchema *lr = find_msg(r, "demo.ListReply");
	expect_field(lr, "entries", 1, PBRPC__FIELD_SCHEMA__LABEL__REPEATED, PBRPC__FIELD_SCHEMA__TYPE__MESSAGE,
		     "demo.Entry", "entries");
	const Pbrpc__MessageSchema *e = find_msg(r, "demo.Entry");
	cr_assert_not_null(e);
	expect_field(e, "key", 1, PBRPC__FIELD_SCHEMA__LABEL__OPTIONAL, PBRPC__FIELD_SCHEMA__TYPE__STRING, "", "key");
	pbrpc__describe_reply__free_unpacked(r, NULL);
	rp_close(&c);
}

Test(reflection, describe_service)
{
	rp_conn c = open_peer();
	rp_result res;
	Pbrpc__DescribeReply *r = describe(&c, "demo.Kv", &res);
	cr_assert_eq(res.status, PBRPC_STATUS_OK, "%s", res.message);
	cr_assert_eq(r->n_services, 1);
	cr_expect_eq(r->services[0]->n_methods, 7);
	cr_expect_eq(r->n_messages, 12); /* 4 requests, 4 replies, Entry, WatchRequest, Change, UploadReply */
	cr_expect_eq(r->n_files, 1); /* kv.proto, from kv.pbrpc.c */
	cr_expect_not_null(find_msg(r, "demo.Entry"));
	pbrpc__describe_reply__free_unpacked(r, NULL);
	rp_close(&c);
}

Test(reflection, describe_enums)
{
	rp_conn c = open_peer();
	rp_result res;
	Pbrpc__DescribeReply *r = describe(&c, "pbrpc.Health/Check", &res);
	cr_assert_eq(res.status, PBRPC_STATUS_OK, "%s", res.message);
	const Pbrpc__MessageSchema *m = find_msg(r, "pbrpc.HealthCheckResponse");
	cr_assert_not_null(m);
	expect_field(m, "status", 1, PBRPC__FIELD_SCHEMA__LABEL__OPTIONAL, PBRPC__FIELD_SCHEMA__TYPE__ENUM,
		     "pbrpc.HealthCheckResponse.ServingStatus", "status");
	cr_assert_eq(r->n_enums, 1);
	const Pbrpc__EnumSchema *e = r->enums[0];
	cr_expect_str_eq(e->name, "pbrpc.HealthCheckResponse.ServingStatus");
	cr_assert_eq(e->n_values, 3);
	cr_expect_str_eq(e->values[1]->name, "SERVING");
	cr_expect_eq(e->values[1]->number, 1);
	cr_expect_str_eq(e->values[2]->name, "NOT_SERVING");
	pbrpc__describe_reply__free_unpacked(r, NULL);

	/* An enum by name: just the enum. */
	r = describe(&c, "pbrpc.FieldSchema.Type", &res);
	cr_assert_eq(res.status, PBRPC_STATUS_OK, "%s", res.message);
	cr_expect_eq(r->n_messages, 0);
	cr_assert_eq(r->n_enums, 1);
	cr_expect_eq(r->enums[0]->n_values, 17);
	cr_expect_str_eq(r->enums[0]->values[16]->name, "MESSAGE");
	pbrpc__describe_reply__free_unpacked(r, NULL);
	rp_close(&c);
}

Test(reflection, json_names)
{
	rp_conn c = open_peer();
	rp_result res;
	Pbrpc__DescribeReply *r = describe(&c, "pbrpc.MethodInfo", &res);
	cr_assert_eq(res.status, PBRPC_STATUS_OK, "%s", res.message);
	const Pbrpc__MessageSchema *m = find_msg(r, "pbrpc.MethodInfo");
	cr_expect_str_eq(find_field(m, "input_type")->json_name, "inputType");
	cr_expect_str_eq(find_field(m, "output_type")->json_name, "outputType");
	pbrpc__describe_reply__free_unpacked(r, NULL);
	rp_close(&c);
}

Test(reflection, recursive_messages_terminate)
{
	rp_conn c = open_peer();
	rp_result res;
	Pbrpc__DescribeReply *r = describe(&c, "reftest.Graph/Walk", &res);
	cr_assert_eq(res.status, PBRPC_STATUS_OK, "%s", res.message);
	/* Tree -> Node -> (Node, Tree, Node.AttrsEntry), each once. */
	cr_expect_eq(r->n_messages, 3);
	cr_expect_str_eq(r->messages[0]->name, "reftest.Tree");
	cr_expect_str_eq(r->messages[1]->name, "reftest.Node");
	cr_expect_not_null(find_msg(r, "reftest.Node.AttrsEntry"));
	cr_assert_eq(r->n_enums, 1);
	cr_expect_str_eq(r->enums[0]->name, "reftest.Color");

	const Pbrpc__MessageSchema *n = find_msg(r, "reftest.Node");
	const int OPT = PBRPC__FIELD_SCHEMA__LABEL__OPTIONAL, REP = PBRPC__FIELD_SCHEMA__LABEL__REPEATED,
		  NONE = PBRPC__FIELD_SCHEMA__LABEL__NONE;
	expect_field(n, "node_name", 1, OPT, PBRPC__FIELD_SCHEMA__TYPE__STRING, "", "nodeName");
	expect_field(n, "children", 2, REP, PBRPC__FIELD_SCHEMA__TYPE__MESSAGE, "reftest.Node", "children");
	expect_field(n, "owner", 3, OPT, PBRPC__FIELD_SCHEMA__TYPE__MESSAGE, "reftest.Tree", "owner");
	/* oneof members: label NONE (their oneof name is not in protobuf-c's
	 * descriptors, so FieldSchema.oneof stays empty). */
	expect_field(n, "num", 4, NONE, PBRPC__FIELD_SCHEMA__TYPE__INT64, "", "num");
	expect_field(n, "color", 5, NONE, PBRPC__FIELD_SCHEMA__TYPE__ENUM, "reftest.Color", "color");
	expect_field(n, "other", 6, NONE, PBRPC__FIELD_SCHEMA__TYPE__MESSAGE, "reftest.Node", "other");
	expect_field(n, "packed_nums", 7, REP, PBRPC__FIELD_SCHEMA__TYPE__SINT32, "", "packedNums");
	cr_expect(find_field(n, "packed_nums")->packed, "proto3 packs repeated scalars");
	expect_field(n, "tags", 8, REP, PBRPC__FIELD_SCHEMA__TYPE__STRING, "", "tags");
	cr_expect_not(find_field(n, "tags")->packed);
	expect_field(n, "attrs", 9, REP, PBRPC__FIELD_SCHEMA__TYPE__MESSAGE, "reftest.Node.AttrsEntry", "attrs");
	pbrpc__describe_reply__free_unpacked(r, NULL);
	rp_close(&c);
}

Test(reflection, proto2_labels)
{
	rp_conn c = open_peer();
	rp_result res;
	Pbrpc__DescribeReply *r = describe(&c, "reftest2.Legacy", &res);
	cr_assert_eq(res.status, PBRPC_STATUS_OK, "%s", res.message);
	cr_assert_eq(r->n_messages, 1);
	const Pbrpc__MessageSchema *m = r->messages[0];
	expect_field(m, "id", 1, PBRPC__FIELD_SCHEMA__LABEL__REQUIRED, PBRPC__FIELD_SCHEMA__TYPE__INT32, "", "id");
	expect_field(m, "note", 2, PBRPC__FIELD_SCHEMA__LABEL__OPTIONAL, PBRPC__FIELD_SCHEMA__TYPE__STRING, "",
		     "note");
	expect_field(m, "vals", 3, PBRPC__FIELD_SCHEMA__LABEL__REPEATED, PBRPC__FIELD_SCHEMA__TYPE__INT32, "", "vals");
	cr_expect(find_field(m, "vals")->packed);
	cr_expect_not(find_field(m, "loose")->packed);
	expect_field(m, "a", 5, PBRPC__FIELD_SCHEMA__LABEL__NONE, PBRPC__FIELD_SCHEMA__TYPE__STRING, "", "a");
	pbrpc__describe_reply__free_unpacked(r, NULL);
	rp_close(&c);
}

Test(reflection, unknown_symbols_are_not_found)
{
	rp_conn c = open_peer();
	rp_result res;
	const char *bad[] = { "demo.Nope", "demo.Kv/Nope", "demo.Nope/Get", "", "/", "demo.PutRequest/x",
			      "demo.Kv/" };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		Pbrpc__DescribeReply *r = describe(&c, bad[i], &res);
		cr_expect_null(r);
		cr_expect_eq(res.status, PBRPC_STATUS_NOT_FOUND, "\"%s\": %d", bad[i], res.status);
	}
	describe(&c, "demo.Nope", &res);
	cr_expect_str_eq(res.message, "unknown symbol demo.Nope");
	rp_close(&c);
}

/* ---- demo.Kv ---- */

static int kv_put(rp_conn *c, const char *key, const char *val, bool *created)
{
	Demo__PutRequest req = DEMO__PUT_REQUEST__INIT;
	Demo__PutReply *reply = NULL;
	rp_result res;
	req.key = (char *)key;
	req.value.data = (uint8_t *)val;
	req.value.len = strlen(val);
	CALL(c, "demo.Kv/Put", &req, &demo__put_reply__descriptor, &reply, &res);
	if (reply) {
		if (created)
			*created = reply->created;
		demo__put_reply__free_unpacked(reply, NULL);
	}
	return res.status;
}

/* Returns the status; *out gets a malloc'd NUL-terminated value when OK. */
static int kv_get(rp_conn *c, const char *key, char **out, rp_result *res)
{
	Demo__GetRequest req = DEMO__GET_REQUEST__INIT;
	Demo__GetReply *reply = NULL;
	req.key = (char *)key;
	CALL(c, "demo.Kv/Get", &req, &demo__get_reply__descriptor, &reply, res);
	*out = NULL;
	if (reply) {
		*out = strndup(reply->value.len ? (const char *)reply->value.data : "", reply->value.len);
		demo__get_reply__free_unpacked(reply, NULL);
	}
	return res->status;
}

static Demo__ListReply *kv_list(rp_conn *c, const char *prefix, uint32_t limit)
{
	Demo__ListRequest req = DEMO__LIST_REQUEST__INIT;
	Demo__ListReply *reply = NULL;
	rp_result res;
	req.prefix = (char *)prefix;
	req.limit = limit;
	CALL(c, "demo.Kv/List", &req, &demo__list_reply__descriptor, &reply, &res);
	cr_assert_eq(res.status, PBRPC_STATUS_OK, "%s", res.message);
	return reply;
}

static void expect_keys(Demo__ListReply *r, const char *const *keys, size_t n)
{
	cr_assert_eq(r->n_entries, n, "got %zu entries, want %zu", r->n_entries, n);
	for (size_t i = 0; i < n; i++)
		cr_expect_str_eq(r->entries[i]->key, keys[i], "entry %zu", i);
	demo__list_reply__free_unpacked(r, NULL);
}

TestSuite(kv, .init = setup_default, .fini = teardown, .timeout = 30);

Test(kv, put_get_delete)
{
	rp_conn c = open_peer();
	rp_result res;
	bool created = false;
	char *v;

	cr_expect_eq(kv_put(&c, "a", "one", &created), PBRPC_STATUS_OK);
	cr_expect(created);
	cr_expect_eq(kv_get(&c, "a", &v, &res), PBRPC_STATUS_OK);
	cr_expect_str_eq(v, "one");
	free(v);

	cr_expect_eq(kv_put(&c, "a", "two", &created), PBRPC_STATUS_OK);
	cr_expect_not(created, "a replaced key is not created");
	cr_expect_eq(kv_get(&c, "a", &v, &res), PBRPC_STATUS_OK);
	cr_expect_str_eq(v, "two");
	free(v);

	/* Empty values are values. */
	cr_expect_eq(kv_put(&c, "empty", "", NULL), PBRPC_STATUS_OK);
	cr_expect_eq(kv_get(&c, "empty", &v, &res), PBRPC_STATUS_OK);
	cr_expect_str_eq(v, "");
	free(v);

	Demo__DeleteRequest dreq = DEMO__DELETE_REQUEST__INIT;
	Demo__DeleteReply *drep = NULL;
	dreq.key = "a";
	CALL(&c, "demo.Kv/Delete", &dreq, &demo__delete_reply__descriptor, &drep, &res);
	cr_assert_not_null(drep);
	cr_expect(drep->deleted);
	demo__delete_reply__free_unpacked(drep, NULL);
	CALL(&c, "demo.Kv/Delete", &dreq, &demo__delete_reply__descriptor, &drep, &res);
	cr_assert_not_null(drep);
	cr_expect_not(drep->deleted);
	demo__delete_reply__free_unpacked(drep, NULL);

	cr_expect_eq(kv_get(&c, "a", &v, &res), PBRPC_STATUS_NOT_FOUND);
	cr_expect_null(v);
	cr_expect_str_eq(res.message, "no key \"a\"");
	rp_close(&c);
}

Test(kv, empty_key_is_invalid)
{
	rp_conn c = open_peer();
	rp_result res;
	char *v;
	cr_expect_eq(kv_put(&c, "", "x", NULL), PBRPC_STATUS_INVALID_ARGUMENT);
	cr_expect_eq(kv_get(&c, "", &v, &res), PBRPC_STATUS_NOT_FOUND);
	rp_close(&c);
}

Test(kv, list_prefix_limit_byte_order)
{
	rp_conn c = open_peer();
	/* Inserted out of order; byte order puts upper case first and UTF-8
	 * multi-byte sequences last. */
	const char *keys[] = { "b", "ab", "a", "\xc3\xa9t\xc3\xa9", "B", "abc", "a/x", "c" };
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
		cr_assert_eq(kv_put(&c, keys[i], keys[i], NULL), PBRPC_STATUS_OK);

	const char *all[] = { "B", "a", "a/x", "ab", "abc", "b", "c", "\xc3\xa9t\xc3\xa9" };
	expect_keys(kv_list(&c, "", 0), all, 8);
	const char *pa[] = { "a", "a/x", "ab", "abc" };
	expect_keys(kv_list(&c, "a", 0), pa, 4);
	expect_keys(kv_list(&c, "a", 2), pa, 2);
	const char *pab[] = { "ab", "abc" };
	expect_keys(kv_list(&c, "ab", 10), pab, 2);
	expect_keys(kv_list(&c, "abcd", 0), NULL, 0);
	expect_keys(kv_list(&c, "zzz", 0), NULL, 0);
	const char *first[] = { "B" };
	expect_keys(kv_list(&c, "", 1), first, 1);

	Demo__ListReply *r = kv_list(&c, "c", 0);
	cr_assert_eq(r->n_entries, 1);
	cr_expect_eq(r->entries[0]->value.len, 1);
	cr_expect_eq(memcmp(r->entries[0]->value.data, "c", 1), 0);
	demo__list_reply__free_unpacked(r, NULL);
	rp_close(&c);
}

/* Several connections writing at once, with handlers on worker threads. */
#define KV_THREADS 4
#define KV_PUTS 200

static void *kv_writer(void *arg)
{
	intptr_t id = (intptr_t)arg;
	rp_conn c = open_peer();
	for (int i = 0; i < KV_PUTS; i++) {
		char key[32], val[32];
		snprintf(key, sizeof(key), "t%ld/%04d", (long)id, i);
		snprintf(val, sizeof(val), "v%d", i);
		bool created = false;
		cr_assert_eq(kv_put(&c, key, val, &created), PBRPC_STATUS_OK);
		cr_assert(created);
	}
	rp_close(&c);
	return NULL;
}

TestSuite(kv_workers, .init = setup_workers, .fini = teardown, .timeout = 60);

Test(kv_workers, concurrent_writers)
{
	pthread_t th[KV_THREADS];
	for (intptr_t i = 0; i < KV_THREADS; i++)
		cr_assert_eq(pthread_create(&th[i], NULL, kv_writer, (void *)i), 0);
	for (int i = 0; i < KV_THREADS; i++)
		pthread_join(th[i], NULL);

	rp_conn c = open_peer();
	Demo__ListReply *r = kv_list(&c, "", 0);
	cr_assert_eq(r->n_entries, KV_THREADS * KV_PUTS);
	for (size_t i = 1; i < r->n_entries; i++)
		cr_assert_lt(strcmp(r->entries[i - 1]->key, r->entries[i]->key), 0);
	demo__list_reply__free_unpacked(r, NULL);
	r = kv_list(&c, "t2/", 0);
	cr_expect_eq(r->n_entries, KV_PUTS);
	demo__list_reply__free_unpacked(r, NULL);
	rp_close(&c);
}

/* The user's view: the generated stubs over pbrpc_client_service(). */
typedef struct stub_ctx {
	int calls;
	int status;
	char message[128];
	bool flag;
	char value[64];
	size_t n_entries;
	char keys[8][16];
} stub_ctx;

static void stub_done(stub_ctx *ctx, const void *reply)
{
	const char *msg = NULL;
	ctx->calls++;
	ctx->status = pbrpc_client_status(&msg);
	snprintf(ctx->message, sizeof(ctx->message), "%s", msg ? msg : "");
	cr_expect_eq(reply != NULL, ctx->status == PBRPC_STATUS_OK);
}

static void on_put(const Demo__PutReply *r, void *data)
{
	stub_done(data, r);
	if (r)
		((stub_ctx *)data)->flag = r->created;
}

static void on_get(const Demo__GetReply *r, void *data)
{
	stub_done(data, r);
	if (r)
		snprintf(((stub_ctx *)data)->value, sizeof(((stub_ctx *)data)->value), "%.*s", (int)r->value.len,
			 (const char *)r->value.data);
}

static void on_delete(const Demo__DeleteReply *r, void *data)
{
	stub_done(data, r);
	if (r)
		((stub_ctx *)data)->flag = r->deleted;
}

static void on_list(const Demo__ListReply *r, void *data)
{
	stub_ctx *ctx = data;
	stub_done(ctx, r);
	for (size_t i = 0; r && i < r->n_entries && i < 8; i++)
		snprintf(ctx->keys[i], sizeof(ctx->keys[i]), "%s", r->entries[i]->key);
	ctx->n_entries = r ? r->n_entries : 0;
}

static void on_health(const Pbrpc__HealthCheckResponse *r, void *data)
{
	stub_done(data, r);
	if (r)
		((stub_ctx *)data)->flag = r->status == PBRPC__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
}

static void stub_put(ProtobufCService *kv, const char *key, const char *val, stub_ctx *ctx)
{
	Demo__PutRequest req = DEMO__PUT_REQUEST__INIT;
	req.key = (char *)key;
	req.value.data = (uint8_t *)val;
	req.value.len = strlen(val);
	memset(ctx, 0, sizeof(*ctx));
	demo__kv__put(kv, &req, on_put, ctx);
	cr_assert_eq(ctx->calls, 1, "the synchronous stub returns after its closure ran");
}

Test(kv, through_generated_stubs)
{
	pbrpc_client *c;
	int rc = pbrpc_client_connect(&c, T.ep, NULL);
	cr_assert_eq(rc, 0, "connect: %s", pbrpc_strerror(rc));
	ProtobufCService *kv = pbrpc_client_service(c, &demo__kv__descriptor);
	ProtobufCService *health = pbrpc_client_service(c, &pbrpc__health__descriptor);
	cr_assert(kv && health);
	stub_ctx ctx;

	stub_put(kv, "k1", "v1", &ctx);
	cr_expect_eq(ctx.status, PBRPC_STATUS_OK, "%s", ctx.message);
	cr_expect(ctx.flag);
	stub_put(kv, "k1", "v2", &ctx);
	cr_expect_not(ctx.flag);
	stub_put(kv, "k0", "v0", &ctx);
	stub_put(kv, "", "v", &ctx);
	cr_expect_eq(ctx.status, PBRPC_STATUS_INVALID_ARGUMENT);

	Demo__GetRequest get = DEMO__GET_REQUEST__INIT;
	get.key = "k1";
	memset(&ctx, 0, sizeof(ctx));
	demo__kv__get(kv, &get, on_get, &ctx);
	cr_expect_eq(ctx.status, PBRPC_STATUS_OK, "%s", ctx.message);
	cr_expect_str_eq(ctx.value, "v2");

	get.key = "nope";
	memset(&ctx, 0, sizeof(ctx));
	demo__kv__get(kv, &get, on_get, &ctx);
	cr_expect_eq(ctx.calls, 1);
	cr_expect_eq(ctx.status, PBRPC_STATUS_NOT_FOUND);
	cr_expect_str_eq(ctx.message, "no key \"nope\"");
	const char *msg = NULL;
	cr_expect_eq(pbrpc_client_status(&msg), PBRPC_STATUS_NOT_FOUND, "status after the stub returned");
	cr_expect_str_eq(msg ? msg : "", "no key \"nope\"");

	Demo__ListRequest list = DEMO__LIST_REQUEST__INIT;
	list.prefix = "k";
	memset(&ctx, 0, sizeof(ctx));
	demo__kv__list(kv, &list, on_list, &ctx);
	cr_assert_eq(ctx.n_entries, 2);
	cr_expect_str_eq(ctx.keys[0], "k0");
	cr_expect_str_eq(ctx.keys[1], "k1");

	Demo__DeleteRequest del = DEMO__DELETE_REQUEST__INIT;
	del.key = "k0";
	memset(&ctx, 0, sizeof(ctx));
	demo__kv__delete(kv, &del, on_delete, &ctx);
	cr_expect(ctx.flag);

	Pbrpc__HealthCheckRequest hreq = PBRPC__HEALTH_CHECK_REQUEST__INIT;
	hreq.service = "demo.Kv";
	memset(&ctx, 0, sizeof(ctx));
	pbrpc__health__check(health, &hreq, on_health, &ctx);
	cr_expect_eq(ctx.status, PBRPC_STATUS_OK, "%s", ctx.message);
	cr_expect(ctx.flag);

	pbrpc_client_free(c);
}

/* ---- demo.Echo ---- */

static int64_t echo_send(rp_conn *c, const char *payload, uint32_t delay_ms, uint32_t fail, const char *msg)
{
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	req.payload.data = (uint8_t *)payload;
	req.payload.len = strlen(payload);
	req.delay_ms = delay_ms;
	req.fail_status = fail;
	if (msg)
		req.fail_message = (char *)msg;
	int64_t id = rp_send(c, "demo.Echo/Echo", (const ProtobufCMessage *)&req);
	cr_assert_gt(id, 0, "send: %s", pbrpc_strerror((int)id));
	return id;
}

/* Receives one response; returns its payload (malloc'd) or NULL. */
static char *echo_recv(rp_conn *c, rp_result *res)
{
	Demo__EchoReply *reply = NULL;
	int rc = rp_recv(c, 10000, &demo__echo_reply__descriptor, (ProtobufCMessage **)&reply, res);
	cr_assert_eq(rc, 0, "recv: %s", pbrpc_strerror(rc));
	if (!reply)
		return NULL;
	char *p = strndup(reply->payload.len ? (const char *)reply->payload.data : "", reply->payload.len);
	demo__echo_reply__free_unpacked(reply, NULL);
	return p;
}

TestSuite(echo, .init = setup_default, .fini = teardown, .timeout = 30);

Test(echo, replies_payload_and_fails_on_request)
{
	rp_conn c = open_peer();
	rp_result res;
	echo_send(&c, "hello", 0, 0, NULL);
	char *p = echo_recv(&c, &res);
	cr_expect_eq(res.status, PBRPC_STATUS_OK);
	cr_expect_str_eq(p, "hello");
	free(p);

	echo_send(&c, "x", 0, PBRPC_STATUS_PERMISSION_DENIED, "go away");
	cr_expect_null(echo_recv(&c, &res));
	cr_expect_eq(res.status, PBRPC_STATUS_PERMISSION_DENIED);
	cr_expect_str_eq(res.message, "go away");

	echo_send(&c, "x", 0, 99, NULL);
	cr_expect_null(echo_recv(&c, &res));
	cr_expect_eq(res.status, PBRPC_STATUS_INVALID_ARGUMENT);
	rp_close(&c);
}

Test(echo, delays_come_from_a_timer_not_the_loop)
{
	rp_conn c = open_peer();
	rp_result res;
	int64_t t0 = now_ms();
	int64_t slow = echo_send(&c, "slow", 300, 0, NULL);
	int64_t mid = echo_send(&c, "mid", 200, 0, NULL);
	int64_t fast = echo_send(&c, "fast", 100, 0, NULL);
	int64_t now = echo_send(&c, "now", 0, 0, NULL);
	int64_t failing = echo_send(&c, "f", 150, PBRPC_STATUS_ABORTED, "late failure");

	/* The undelayed call is answered first: the loop was not blocked. */
	int64_t want[] = { now, fast, failing, mid, slow };
	const char *payload[] = { "now", "fast", NULL, "mid", "slow" };
	for (int i = 0; i < 5; i++) {
		char *p = echo_recv(&c, &res);
		cr_expect_eq(res.id, (uint32_t)want[i], "reply %d: id %u, want %ld", i, res.id, (long)want[i]);
		if (payload[i])
			cr_expect_str_eq(p, payload[i]);
		else
			cr_expect_eq(res.status, PBRPC_STATUS_ABORTED);
		if (i == 0)
			cr_expect_lt(now_ms() - t0, 90, "undelayed reply took %ld ms", (long)(now_ms() - t0));
		free(p);
	}
	int64_t took = now_ms() - t0;
	cr_expect_geq(took, 295);
	cr_expect_lt(took, 1000, "delays ran one after another? %ld ms", (long)took);
	rp_close(&c);
}

/* These stop the server themselves. */
TestSuite(echo_stop, .init = setup_default, .timeout = 30);

Test(echo_stop, delayed_call_completes_during_drain)
{
	rp_conn c = open_peer();
	rp_result res;
	echo_send(&c, "drained", 200, 0, NULL);
	usleep(50000); /* let the server read it */
	int64_t t0 = now_ms();
	pbrpc_server_shutdown(T.srv, 5000);
	char *p = echo_recv(&c, &res);
	cr_expect_eq(res.status, PBRPC_STATUS_OK, "%d %s", res.status, res.message);
	cr_expect_str_eq(p, "drained");
	free(p);
	pthread_join(T.thread, NULL);
	cr_expect_lt(now_ms() - t0, 2000);
	rp_close(&c);
	demo_echo_free(T.echo);
	pbrpc_server_free(T.srv);
	demo_kv_free(T.kv);
	rmdir(T.dir);
}

/* A call still waiting when the drain deadline passes is answered by the
 * server; demo_echo_free then answers it again (CANCELLED) without waiting for
 * its 10 s delay, and the server ignores that second answer. */
Test(echo_stop, free_answers_queued_calls)
{
	rp_conn c = open_peer();
	rp_result res;
	echo_send(&c, "never", 10000, 0, NULL);
	usleep(50000);
	pbrpc_server_shutdown(T.srv, 100);
	int rc = rp_recv(&c, 5000, &demo__echo_reply__descriptor, NULL, &res);
	if (rc == 0)
		cr_expect_eq(res.status, PBRPC_STATUS_UNAVAILABLE, "%d %s", res.status, res.message);
	pthread_join(T.thread, NULL);
	int64_t t0 = now_ms();
	demo_echo_free(T.echo);
	cr_expect_lt(now_ms() - t0, 1000);
	rp_close(&c);
	pbrpc_server_free(T.srv);
	demo_kv_free(T.kv);
	rmdir(T.dir);
}

/* ---- pbrpc.Stats and the call_log hook (issue 13 item 5) ---- */

typedef struct logged {
	char method[64];
	int status;
	bool ran, has_cred;
	uid_t uid;
	size_t bytes_in, bytes_out;
	int64_t duration_ns;
	char peer[64];
} logged;

static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static logged log_v[64];
static size_t log_n;

static void record_call(void *user, const pbrpc_call_info *info)
{
	(void)user;
	pthread_mutex_lock(&log_mu);
	if (log_n < 64) {
		logged *l = &log_v[log_n++];
		snprintf(l->method, sizeof(l->method), "%.*s", (int)info->method_len, info->method);
		l->status = info->status;
		l->ran = info->ran;
		l->has_cred = info->has_cred;
		l->uid = info->uid;
		l->bytes_in = info->bytes_in;
		l->bytes_out = info->bytes_out;
		l->duration_ns = info->duration_ns;
		snprintf(l->peer, sizeof(l->peer), "%s", info->peer);
	}
	pthread_mutex_unlock(&log_mu);
}

static void enable_stats(pbrpc_server *srv)
{
	cr_assert_eq(pbrpc_server_enable_stats(srv), 0);
}

static void setup_stats(void)
{
	log_n = 0;
	T_call_log = record_call;
	start_server(0, enable_stats);
	T_call_log = NULL;
}

static Pbrpc__StatsReply *get_stats(rp_conn *c)
{
	Pbrpc__StatsRequest req = PBRPC__STATS_REQUEST__INIT;
	Pbrpc__StatsReply *reply = NULL;
	rp_result res;
	cr_assert_eq(rp_call(c, "pbrpc.Stats/Get", &req.base, &pbrpc__stats_reply__descriptor,
			     (ProtobufCMessage **)&reply, &res),
		     0);
	cr_assert_eq(res.status, PBRPC_STATUS_OK, "%s", res.message);
	return reply;
}

static const Pbrpc__MethodStats *method_stats(const Pbrpc__StatsReply *r, const char *name)
{
	for (size_t i = 0; i < r->n_methods; i++)
		if (strcmp(r->methods[i]->method, name) == 0)
			return r->methods[i];
	cr_assert_fail("no stats for %s", name);
	return NULL;
}

static uint64_t count_of(const Pbrpc__MethodStats *m, int status)
{
	for (size_t i = 0; i < m->n_calls; i++)
		if ((int)m->calls[i]->status == status)
			return m->calls[i]->count;
	return 0;
}

static void check_histogram(const Pbrpc__StatsReply *r, const Pbrpc__MethodStats *m)
{
	cr_assert_eq(m->n_latency_buckets, r->n_latency_bounds_seconds);
	uint64_t answered = 0;
	for (size_t i = 0; i < m->n_calls; i++)
		answered += m->calls[i]->count;
	cr_expect_eq(m->latency_count, answered, "%s: histogram count is the calls answered", m->method);
	for (size_t b = 0; b < m->n_latency_buckets; b++) {
		cr_expect_leq(m->latency_buckets[b], m->latency_count);
		if (b) {
			cr_expect_leq(m->latency_buckets[b - 1], m->latency_buckets[b], "cumulative");
			cr_expect_lt(r->latency_bounds_seconds[b - 1], r->latency_bounds_seconds[b]);
		}
	}
	cr_expect_geq(m->latency_sum_seconds, 0);
}

TestSuite(stats, .init = setup_stats, .fini = teardown, .timeout = 30);

Test(stats, counts_are_exact_and_the_hook_sees_each_call)
{
	enum { N_OK = 5, N_DENIED = 2 };
	rp_conn c = open_peer();
	rp_result res;
	for (int i = 0; i < N_OK; i++) {
		echo_send(&c, "hello", 0, 0, NULL);
		free(echo_recv(&c, &res));
		cr_assert_eq(res.status, PBRPC_STATUS_OK);
	}
	for (int i = 0; i < N_DENIED; i++) {
		echo_send(&c, "x", 0, PBRPC_STATUS_PERMISSION_DENIED, "no");
		cr_assert_null(echo_recv(&c, &res));
	}
	Demo__EchoRequest req = DEMO__ECHO_REQUEST__INIT;
	cr_assert_eq(rp_call(&c, "demo.Echo/Nope", &req.base, NULL, NULL, &res), 0);
	cr_assert_eq(res.status, PBRPC_STATUS_UNIMPLEMENTED);

	Pbrpc__StatsReply *r = get_stats(&c);
	const Pbrpc__MethodStats *echo = method_stats(r, "demo.Echo/Echo");
	cr_expect_eq(count_of(echo, PBRPC_STATUS_OK), N_OK);
	cr_expect_eq(count_of(echo, PBRPC_STATUS_PERMISSION_DENIED), N_DENIED);
	cr_expect_eq(echo->n_calls, 2, "only the statuses seen");
	cr_expect_eq(echo->in_flight, 0);
	check_histogram(r, echo);
	const Pbrpc__MethodStats *unknown = method_stats(r, "");
	cr_expect_eq(count_of(unknown, PBRPC_STATUS_UNIMPLEMENTED), 1);
	check_histogram(r, unknown);
	const Pbrpc__MethodStats *get = method_stats(r, "pbrpc.Stats/Get");
	cr_expect_eq(get->latency_count, 0, "its own call is not answered yet");
	cr_expect_eq(get->in_flight, 1, "...but in flight");
	const Pbrpc__MethodStats *put = method_stats(r, "demo.Kv/Put");
	cr_expect_eq(put->latency_count, 0);
	cr_expect_eq(put->n_calls, 0);
	cr_expect_geq(r->connections->accepted, 1);
	cr_expect_geq(r->connections->open, 1);

	pthread_mutex_lock(&log_mu);
	/* The Get's reply was queued, and observed, before it was sent. */
	cr_assert_eq(log_n, N_OK + N_DENIED + 2, "one hook call per answered request: %zu", log_n);
	cr_expect_str_eq(log_v[N_OK + N_DENIED + 1].method, "pbrpc.Stats/Get");
	uint64_t in = 0, out = 0;
	for (size_t i = 0; i < N_OK + N_DENIED; i++) {
		cr_expect_str_eq(log_v[i].method, "demo.Echo/Echo");
		cr_expect_eq(log_v[i].status, i < N_OK ? PBRPC_STATUS_OK : PBRPC_STATUS_PERMISSION_DENIED);
		cr_expect(log_v[i].ran);
		cr_expect(log_v[i].has_cred);
		cr_expect_eq(log_v[i].uid, getuid());
		cr_expect_str_eq(log_v[i].peer, "unix");
		cr_expect_geq(log_v[i].duration_ns, 0);
		in += log_v[i].bytes_in;
		out += log_v[i].bytes_out;
	}
	cr_expect_gt(log_v[0].bytes_out, 5, "the RESPONSE payload holds the reply");
	cr_expect_eq(echo->bytes_in, in);
	cr_expect_eq(echo->bytes_out, out);
	cr_expect_str_eq(log_v[N_OK + N_DENIED].method, "demo.Echo/Nope");
	cr_expect_not(log_v[N_OK + N_DENIED].ran, "refused before dispatch");
	cr_expect_eq(log_v[N_OK + N_DENIED].status, PBRPC_STATUS_UNIMPLEMENTED);
	pthread_mutex_unlock(&log_mu);
	pbrpc__stats_reply__free_unpacked(r, NULL);

	r = get_stats(&c);
	get = method_stats(r, "pbrpc.Stats/Get");
	cr_expect_eq(count_of(get, PBRPC_STATUS_OK), 1);
	cr_expect_eq(get->in_flight, 1);
	pbrpc__stats_reply__free_unpacked(r, NULL);
	rp_close(&c);
}

Test(stats, in_flight_follows_delayed_and_orphaned_calls)
{
	rp_conn a = open_peer(), b = open_peer();
	rp_result res;
	echo_send(&a, "slow", 200, 0, NULL);
	usleep(50000);
	Pbrpc__StatsReply *r = get_stats(&b);
	cr_expect_eq(method_stats(r, "demo.Echo/Echo")->in_flight, 1);
	pbrpc__stats_reply__free_unpacked(r, NULL);
	free(echo_recv(&a, &res));
	cr_expect_eq(res.status, PBRPC_STATUS_OK);
	r = get_stats(&b);
	cr_expect_eq(method_stats(r, "demo.Echo/Echo")->in_flight, 0);
	cr_expect_eq(count_of(method_stats(r, "demo.Echo/Echo"), PBRPC_STATUS_OK), 1);
	pbrpc__stats_reply__free_unpacked(r, NULL);

	/* A connection that goes away leaves no call in flight. */
	echo_send(&a, "slow", 200, 0, NULL);
	usleep(50000);
	rp_close(&a);
	usleep(50000);
	r = get_stats(&b);
	cr_expect_eq(method_stats(r, "demo.Echo/Echo")->in_flight, 0);
	pbrpc__stats_reply__free_unpacked(r, NULL);
	rp_close(&b);
}
