/* pbrpc: a command-line client for any pbrpc server, driven by reflection
 * (or by a FileDescriptorSet given with --protoset).
 *
 *   pbrpc list ENDPOINT
 *   pbrpc describe ENDPOINT [SYMBOL]
 *   pbrpc call ENDPOINT METHOD [JSON | -]
 *   pbrpc health ENDPOINT [SERVICE]
 *
 * Argument parsing and the calls live here; the schema (schema.c), the JSON
 * codec (pbjson.c) and the protoset reader (protoset.c) are pure and tested
 * on their own. docs/CLI.md and pbrpc(1) are the user's manual, including the
 * exit statuses defined below.
 */
#include <errno.h>
#include <getopt.h>
#include <json-c/json.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "health.pb-c.h"
#include "pbjson.h"
#include "pbrpc/pbrpc.h"
#include "protoset.h"
#include "reflection.pb-c.h"
#include "schema.h"
#include "stats.pb-c.h"

/* Exit statuses. RPC statuses map to 64 + status (65..80) so that scripts can
 * tell them apart; everything the client decides on its own stays below 64. */
enum {
	EXIT_NOT_SERVING = 1, /* health: the answer was not SERVING */
	EXIT_USAGE = 2,       /* bad arguments, endpoint or JSON request */
	EXIT_CONNECT = 3,     /* no pbrpc server could be reached */
	EXIT_LOCAL = 4,       /* the server's schema or reply made no sense; out of memory;
			       * the output could not be written */
	EXIT_STATUS_BASE = 64,
};

#define DEFAULT_TIMEOUT_MS 30000
#define MAX_METADATA 64
#define MAX_STDIN (64u << 20)

typedef enum output_format { FORMAT_JSON, FORMAT_COMPACT, FORMAT_TEXT, FORMAT_TABLE, FORMAT_PROMETHEUS } output_format;

typedef struct cli {
	const char *endpoint;
	bool verbose;           /* -v: what is sent and received, on stderr */
	output_format format;
	bool format_given;      /* --format was on the command line */
	bool template;          /* describe --template */
	const char *protoset_path;
	protoset *ps;           /* schemas from --protoset instead of reflection */
	int64_t timeout_ms;   /* < 0: none */
	int64_t deadline_ms;  /* CLOCK_MONOTONIC; meaningful when timeout_ms >= 0 */
	pbrpc_metadata metadata[MAX_METADATA];
	size_t metadata_count;
	unsigned json_flags;
	pbrpc_tls_opts tls;     /* --ca --cert --key --servername (tls: endpoints) */
	pbrpc_client *client;
} cli;

typedef struct command {
	const char *name;
	int min_args, max_args; /* not counting ENDPOINT */
	const char *synopsis;
	const char *help;
	int (*run)(cli *c, int argc, char **argv);
} command;

static void die_msg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void die_msg(const char *fmt, ...)
{
	va_list ap;
	fputs("pbrpc: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* ---- option values ---- */

/* "500ms", "2s", "1.5m", "1h", "30" (seconds), "infinity". Returns 0 with
 * *ms set (-1: none) or -1. */
static int parse_duration(const char *s, int64_t *ms)
{
	static const struct {
		const char *unit;
		double ms;
	} units[] = { { "ms", 1 }, { "s", 1000 }, { "", 1000 }, { "m", 60000 }, { "h", 3600000 } };
	char *end;

	if (strcmp(s, "infinity") == 0) {
		*ms = -1;
		return 0;
	}
	errno = 0;
	double v = strtod(s, &end);
	if (end == s || errno || !isfinite(v) || v <= 0 || s[0] == '+' || strpbrk(s, "xXnNiI"))
		return -1;
	for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
		if (strcmp(end, units[i].unit) != 0)
			continue;
		double total = ceil(v * units[i].ms);
		if (total > 1e12)
			return -1;
		*ms = (int64_t)total;
		return 0;
	}
	return -1;
}

static bool metadata_key_valid(const char *k, size_t len)
{
	if (len == 0 || len > PBRPC_METADATA_KEY_MAX)
		return false;
	for (size_t i = 0; i < len; i++) {
		char ch = k[i];
		if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '-' || ch == '_' || ch == '.'))
			return false;
	}
	return true;
}

static int add_metadata(cli *c, const char *arg)
{
	const char *eq = strchr(arg, '=');
	if (!eq) {
		die_msg("invalid metadata \"%s\": expected KEY=VALUE", arg);
		return -1;
	}
	size_t klen = (size_t)(eq - arg);
	if (!metadata_key_valid(arg, klen)) {
		die_msg("invalid metadata key \"%.*s\": use 1 to 255 lowercase letters, digits, '-', '_' and '.'",
			(int)klen, arg);
		return -1;
	}
	if (klen >= 6 && strncmp(arg, "pbrpc-", 6) == 0) {
		die_msg("invalid metadata key \"%.*s\": keys starting with \"pbrpc-\" are reserved", (int)klen, arg);
		return -1;
	}
	if (strlen(eq + 1) > PBRPC_METADATA_VALUE_MAX) {
		die_msg("metadata value for \"%.*s\" is longer than %d bytes", (int)klen, arg,
			PBRPC_METADATA_VALUE_MAX);
		return -1;
	}
	if (c->metadata_count == MAX_METADATA) {
		die_msg("too many --metadata options (at most %d)", MAX_METADATA);
		return -1;
	}
	c->metadata[c->metadata_count++] = (pbrpc_metadata){
		.key = arg, .key_len = klen, .value = eq + 1, .value_len = strlen(eq + 1),
	};
	return 0;
}

/* ---- connecting and calling ---- */

static int64_t remaining_ms(const cli *c)
{
	return c->timeout_ms < 0 ? -1 : c->deadline_ms - now_ms();
}

static int connect_client(cli *c)
{
	pbrpc_endpoint ep;
	pbrpc_client_opts opts = { .tls = c->tls };
	int rc = pbrpc_endpoint_parse(c->endpoint, &ep);

	if (rc == PBRPC_EADDRESS || rc == -ENAMETOOLONG) {
		die_msg("invalid endpoint \"%s\": %s", c->endpoint,
			rc == PBRPC_EADDRESS ? "expected unix:/path, unix:@name, tcp:host:port, tcp:[v6]:port or tls:host:port"
					     : "socket path too long");
		return EXIT_USAGE;
	}
	if (rc < 0) {
		die_msg("cannot connect to %s: %s", c->endpoint,
			rc == -EADDRNOTAVAIL ? "host name does not resolve" : pbrpc_strerror(rc));
		return EXIT_CONNECT;
	}
	int64_t left = remaining_ms(c);
	if (left >= 0)
		opts.connect_timeout_ms = left > 0 ? (int)(left < 5000 ? left : 5000) : 1;
	int64_t t0 = now_us();
	rc = pbrpc_client_connect(&c->client, c->endpoint, &opts);
	if (rc == 0) {
		if (c->verbose)
			die_msg("connected to %s in %.3f ms", c->endpoint, (double)(now_us() - t0) / 1000);
		return 0;
	}
	if (rc == PBRPC_EADDRESS) {
		die_msg("invalid endpoint \"%s\": expected unix:/path, unix:@name, tcp:host:port, tcp:[v6]:port or tls:host:port",
			c->endpoint);
		return EXIT_USAGE;
	}
	/* The client says why in this thread's status (TLS: which certificate,
	 * which host); plain socket errors keep their short form. */
	const char *why = NULL;
	pbrpc_client_status(&why);
	if (rc == PBRPC_ETLS || rc == PBRPC_ENOTLS || rc == PBRPC_EGOAWAY || rc == PBRPC_EBADMAGIC) {
		die_msg("cannot connect to %s: %s", c->endpoint, why && *why ? why : pbrpc_strerror(rc));
		return EXIT_CONNECT;
	}
	die_msg("cannot connect to %s: %s%s", c->endpoint, pbrpc_strerror(rc),
		rc == -ENOENT || rc == -ECONNREFUSED ? " (is pbrpc-server running?)" : "");
	return EXIT_CONNECT;
}

/* Fills the per-call options from the command line. Returns false when the
 * deadline has already passed (res is then DEADLINE_EXCEEDED). */
static bool call_opts(const cli *c, pbrpc_call_opts *opts, pbrpc_call_result *res)
{
	int64_t left = remaining_ms(c);
	*opts = (pbrpc_call_opts){
		.timeout_ms = left < 0 ? -1 : (int)(left > INT32_MAX ? INT32_MAX : left),
		.metadata = c->metadata,
		.metadata_count = c->metadata_count,
	};
	if (left == 0 || (left < 0 && c->timeout_ms >= 0)) {
		res->status = PBRPC_STATUS_DEADLINE_EXCEEDED;
		snprintf(res->message, sizeof(res->message), "timed out after %lld ms", (long long)c->timeout_ms);
		return false;
	}
	return true;
}

/* Prints "pbrpc: STATUS: message" and returns the exit status for it. */
static int report_status(const pbrpc_call_result *res, const char *hint)
{
	int status = res->status >= 0 && res->status < PBRPC_STATUS_COUNT ? res->status : PBRPC_STATUS_UNKNOWN;
	if (res->message[0])
		die_msg("%s: %s%s", pbrpc_status_name(status), res->message, hint ? hint : "");
	else
		die_msg("%s%s", pbrpc_status_name(status), hint ? hint : "");
	return EXIT_STATUS_BASE + status;
}

/* A call that did not end with a status OK: either the server (or the
 * library on its behalf) reported a status, or something failed locally. */
static int report_call(const char *method, int rc, const pbrpc_call_result *res, const char *hint)
{
	if (res->status != PBRPC_STATUS_OK)
		return report_status(res, hint);
	die_msg("%s: %s", method, pbrpc_strerror(rc));
	return EXIT_LOCAL;
}

/* -v: one line before a call (method, request size, metadata, time left)... */
static void verbose_sent(const cli *c, const char *method, size_t req_len, const pbrpc_call_opts *opts)
{
	char md[1024] = "";
	size_t o = 0;
	for (size_t i = 0; i < c->metadata_count && o < sizeof(md); i++) {
		int n = snprintf(md + o, sizeof(md) - o, "%s%.*s=%.*s", i ? ", " : "", (int)c->metadata[i].key_len,
				 c->metadata[i].key, (int)c->metadata[i].value_len, (const char *)c->metadata[i].value);
		o += n > 0 ? (size_t)n : 0;
	}
	char left[32] = "no timeout";
	if (opts->timeout_ms >= 0)
		snprintf(left, sizeof(left), "timeout %d ms", opts->timeout_ms);
	die_msg("> %s: %zu bytes, %s, metadata: %s", method, req_len, left, c->metadata_count ? md : "none");
}

/* ... and one after it: the status, its message, the time it took and the
 * reply's size (when known; typed calls unpack it inside the library). */
static void verbose_done(const char *method, int64_t t0, int rc, const pbrpc_call_result *res, long long reply_len)
{
	int status = res->status >= 0 && res->status < PBRPC_STATUS_COUNT ? res->status : PBRPC_STATUS_UNKNOWN;
	const char *what = rc != 0 && status == PBRPC_STATUS_OK ? "failed" : pbrpc_status_name(status);
	const char *why = rc != 0 && status == PBRPC_STATUS_OK ? pbrpc_strerror(rc) : res->message;
	char size[40] = "";
	if (reply_len >= 0)
		snprintf(size, sizeof(size), ", %lld bytes", reply_len);
	die_msg("< %s: %s%s%s%s in %.3f ms%s", method, what, why[0] ? " (" : "", why, why[0] ? ")" : "",
		(double)(now_us() - t0) / 1000, size);
}

static int call_typed(cli *c, const char *method, const ProtobufCMessage *req,
		      const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **reply, pbrpc_call_result *res)
{
	pbrpc_call_opts opts;
	*reply = NULL;
	memset(res, 0, sizeof(*res));
	if (!call_opts(c, &opts, res))
		return PBRPC_ESTATUS;
	if (c->verbose)
		verbose_sent(c, method, protobuf_c_message_get_packed_size(req), &opts);
	int64_t t0 = now_us();
	int rc = pbrpc_client_call(c->client, method, req, reply_desc, reply, &opts, res);
	if (c->verbose)
		verbose_done(method, t0, rc, res, -1);
	return rc;
}

static int call_raw(cli *c, const char *method, const uint8_t *req, size_t req_len, uint8_t **reply,
		    size_t *reply_len, pbrpc_call_result *res)
{
	pbrpc_call_opts opts;
	*reply = NULL;
	*reply_len = 0;
	memset(res, 0, sizeof(*res));
	if (!call_opts(c, &opts, res))
		return PBRPC_ESTATUS;
	if (c->verbose)
		verbose_sent(c, method, req_len, &opts);
	int64_t t0 = now_us();
	int rc = pbrpc_client_call_raw(c->client, method, req, req_len, reply, reply_len, &opts, res);
	if (c->verbose)
		verbose_done(method, t0, rc, res, rc == 0 ? (long long)*reply_len : -1);
	return rc;
}

static const char *reflection_hint(const pbrpc_call_result *res)
{
	if (res->status == PBRPC_STATUS_UNIMPLEMENTED && strstr(res->message, "pbrpc.Reflection"))
		return " (the server does not enable reflection, which this command needs without --protoset)";
	return NULL;
}

/* Describe(symbol) into a schema. Returns 0, or an exit status after
 * printing the error. */
static int describe_protoset(cli *c, const char *symbol, schema **out, pbrpc_call_result *res)
{
	const Pbrpc__DescribeReply *reply;
	char err[256];
	int rc = protoset_describe(c->ps, symbol, &reply);
	if (rc == -ENOENT) {
		memset(res, 0, sizeof(*res));
		res->status = PBRPC_STATUS_NOT_FOUND;
		snprintf(res->message, sizeof(res->message), "unknown symbol %s in %s", symbol, c->protoset_path);
		return -1;
	}
	if (rc == 0)
		rc = schema_new(out, reply, err, sizeof(err));
	if (rc == -ENOMEM) {
		die_msg("out of memory");
		return EXIT_LOCAL;
	}
	if (rc < 0) {
		die_msg("%s: the schema for %s is unusable: %s", c->protoset_path, symbol, err);
		return EXIT_USAGE;
	}
	return 0;
}

static int describe_once(cli *c, const char *symbol, schema **out, pbrpc_call_result *res)
{
	Pbrpc__DescribeRequest req = PBRPC__DESCRIBE_REQUEST__INIT;
	Pbrpc__DescribeReply *reply;
	char err[256];
	req.symbol = (char *)symbol;

	*out = NULL;
	if (c->ps)
		return describe_protoset(c, symbol, out, res);
	int rc = call_typed(c, "pbrpc.Reflection/Describe", &req.base, &pbrpc__describe_reply__descriptor,
			    (ProtobufCMessage **)&reply, res);
	if (rc != 0)
		return -1;
	rc = schema_new(out, reply, err, sizeof(err));
	protobuf_c_message_free_unpacked(&reply->base, NULL);
	if (rc < 0) {
		die_msg("the server's schema for %s is unusable: %s", symbol, err);
		return EXIT_LOCAL;
	}
	return 0;
}

/* Describe(symbol) into a schema, from the server or the protoset. An
 * unknown "demo.Kv.Get" is retried as the method "demo.Kv/Get", the way
 * grpcurl names methods; *symbol then points to the name that was found
 * (in buf). */
static int describe(cli *c, const char **symbol, char *buf, size_t buflen, schema **out, pbrpc_call_result *res)
{
	int rc = describe_once(c, *symbol, out, res);
	if (rc < 0 && res->status == PBRPC_STATUS_NOT_FOUND && !strchr(*symbol, '/') && strchr(*symbol, '.') &&
	    strlen(*symbol) < buflen) {
		pbrpc_call_result res2;
		snprintf(buf, buflen, "%s", *symbol);
		*strrchr(buf, '.') = '/';
		int rc2 = describe_once(c, buf, out, &res2);
		if (rc2 == 0)
			*symbol = buf;
		if (rc2 >= 0)
			return rc2;
	}
	return rc;
}

/* ---- commands ---- */

static void print_services(Pbrpc__ServiceInfo *const *services, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		const Pbrpc__ServiceInfo *svc = services[i];
		printf("%s\n", svc->name);
		for (size_t j = 0; j < svc->n_methods; j++) {
			const Pbrpc__MethodInfo *m = svc->methods[j];
			printf("  %s/%s(%s) returns (%s)\n", svc->name, m->name, m->input_type, m->output_type);
		}
	}
}

/* ListServices from the server; the caller frees *out. */
static int list_services(cli *c, Pbrpc__ListServicesReply **out)
{
	Pbrpc__ListServicesRequest req = PBRPC__LIST_SERVICES_REQUEST__INIT;
	pbrpc_call_result res;
	int rc = call_typed(c, "pbrpc.Reflection/ListServices", &req.base, &pbrpc__list_services_reply__descriptor,
			    (ProtobufCMessage **)out, &res);
	if (rc != 0)
		return report_call("pbrpc.Reflection/ListServices", rc, &res, reflection_hint(&res));
	return 0;
}

static int cmd_list(cli *c, int argc, char **argv)
{
	Pbrpc__ListServicesReply *reply;
	if (c->ps) {
		print_services(protoset_all(c->ps)->services, protoset_all(c->ps)->n_services);
		return 0;
	}
	int rc = list_services(c, &reply);
	if (rc != 0)
		return rc;
	print_services(reply->services, reply->n_services);
	protobuf_c_message_free_unpacked(&reply->base, NULL);
	return 0;
}

static void print_sep(bool *first)
{
	if (!*first)
		putchar('\n');
	*first = false;
}

static void print_message_once(const schema *s, const char *name, bool *done, bool *first)
{
	const schema_message *m = name ? schema_find_message(s, name) : NULL;
	if (!m)
		return;
	size_t i = (size_t)(m - schema_message_at(s, 0));
	if (done[i])
		return;
	done[i] = true;
	print_sep(first);
	schema_print_message(stdout, m);
}

/* What was asked for comes first, then everything it reaches. */
static int print_described(const schema *s, const char *symbol)
{
	size_t n_messages = schema_message_count(s);
	bool first = true;
	bool *done = calloc(n_messages + 1, 1);
	if (!done) {
		die_msg("out of memory");
		return EXIT_LOCAL;
	}
	const schema_method *m = symbol ? schema_find_method(s, symbol) : NULL;
	const schema_service *svc = symbol ? schema_find_service(s, symbol) : NULL;
	const schema_enum *asked_enum = symbol ? schema_find_enum(s, symbol) : NULL;
	if (m) {
		char svc_name[PBRPC_METHOD_MAX + 1];
		snprintf(svc_name, sizeof(svc_name), "%.*s", (int)(strchr(symbol, '/') - symbol), symbol);
		print_sep(&first);
		schema_print_method(stdout, schema_find_service(s, svc_name), m);
		print_message_once(s, m->input_type, done, &first);
		print_message_once(s, m->output_type, done, &first);
	} else if (svc) {
		print_sep(&first);
		schema_print_service(stdout, svc);
	} else if (asked_enum) {
		print_sep(&first);
		schema_print_enum(stdout, asked_enum);
	} else if (!symbol) {
		for (size_t i = 0; i < schema_service_count(s); i++) {
			print_sep(&first);
			schema_print_service(stdout, schema_service_at(s, i));
		}
	}
	if (symbol)
		print_message_once(s, symbol, done, &first);
	for (size_t i = 0; i < n_messages; i++)
		print_message_once(s, schema_message_at(s, i)->name, done, &first);
	for (size_t i = 0; i < schema_enum_count(s); i++) {
		if (schema_enum_at(s, i) == asked_enum)
			continue;
		print_sep(&first);
		schema_print_enum(stdout, schema_enum_at(s, i));
	}
	free(done);
	return 0;
}

/* Appends the entries of src missing from dst (by name). */
static int merge_named(void ***dst, size_t *n, void *const *src, size_t n_src, size_t name_offset)
{
	for (size_t i = 0; i < n_src; i++) {
		const char *name = *(const char *const *)((const char *)src[i] + name_offset);
		bool seen = false;
		for (size_t j = 0; j < *n && !seen; j++)
			seen = strcmp(*(const char *const *)((const char *)(*dst)[j] + name_offset), name) == 0;
		if (seen)
			continue;
		void **p = realloc(*dst, (*n + 1) * sizeof(*p));
		if (!p)
			return -ENOMEM;
		*dst = p;
		p[(*n)++] = src[i];
	}
	return 0;
}

/* describe without a symbol: every service and every type, from the
 * protoset, or from the server as one Describe per listed service. */
static int describe_all(cli *c)
{
	Pbrpc__ListServicesReply *list = NULL;
	Pbrpc__DescribeReply **replies = NULL;
	Pbrpc__DescribeReply all = PBRPC__DESCRIBE_REPLY__INIT;
	schema *s = NULL;
	char err[256];
	int ret = 0, rc;
	size_t n_replies = 0;

	if (c->ps) {
		rc = schema_new(&s, protoset_all(c->ps), err, sizeof(err));
		if (rc < 0) {
			die_msg("%s: unusable schema: %s", c->protoset_path, err);
			return rc == -ENOMEM ? EXIT_LOCAL : EXIT_USAGE;
		}
		ret = print_described(s, NULL);
		schema_free(s);
		return ret;
	}
	if ((ret = list_services(c, &list)) != 0)
		return ret;
	replies = calloc(list->n_services + 1, sizeof(*replies));
	if (!replies) {
		die_msg("out of memory");
		ret = EXIT_LOCAL;
		goto out;
	}
	for (; n_replies < list->n_services; n_replies++) {
		Pbrpc__DescribeRequest req = PBRPC__DESCRIBE_REQUEST__INIT;
		pbrpc_call_result res;
		req.symbol = list->services[n_replies]->name;
		rc = call_typed(c, "pbrpc.Reflection/Describe", &req.base, &pbrpc__describe_reply__descriptor,
				(ProtobufCMessage **)&replies[n_replies], &res);
		if (rc != 0) {
			ret = report_call("pbrpc.Reflection/Describe", rc, &res, reflection_hint(&res));
			goto out;
		}
		const Pbrpc__DescribeReply *r = replies[n_replies];
		if (merge_named((void ***)&all.services, &all.n_services, (void *const *)r->services, r->n_services,
				offsetof(Pbrpc__ServiceInfo, name)) < 0 ||
		    merge_named((void ***)&all.messages, &all.n_messages, (void *const *)r->messages, r->n_messages,
				offsetof(Pbrpc__MessageSchema, name)) < 0 ||
		    merge_named((void ***)&all.enums, &all.n_enums, (void *const *)r->enums, r->n_enums,
				offsetof(Pbrpc__EnumSchema, name)) < 0) {
			die_msg("out of memory");
			ret = EXIT_LOCAL;
			goto out;
		}
	}
	rc = schema_new(&s, &all, err, sizeof(err));
	if (rc < 0) {
		die_msg("the server's schema is unusable: %s", err);
		ret = EXIT_LOCAL;
		goto out;
	}
	ret = print_described(s, NULL);
out:
	schema_free(s);
	free(all.services);
	free(all.messages);
	free(all.enums);
	for (size_t i = 0; replies && i < n_replies; i++)
		protobuf_c_message_free_unpacked(&replies[i]->base, NULL);
	free(replies);
	if (list)
		protobuf_c_message_free_unpacked(&list->base, NULL);
	return ret;
}

static const char *format_json(const cli *c, json_object *obj)
{
	return c->format == FORMAT_COMPACT ? pbjson_to_compact_string(obj) : pbjson_to_string(obj);
}

/* describe --template: a JSON skeleton of a message, or of a method's request. */
static int print_template(const cli *c, const schema *s, const char *symbol)
{
	const schema_method *m = schema_find_method(s, symbol);
	const schema_message *msg = m ? m->input : schema_find_message(s, symbol);
	if (!msg) {
		die_msg("--template: %s is not a message or a method", symbol);
		return EXIT_USAGE;
	}
	json_object *t = pbjson_template(msg);
	if (!t) {
		die_msg("out of memory");
		return EXIT_LOCAL;
	}
	printf("%s\n", format_json(c, t));
	json_object_put(t);
	return 0;
}

static int cmd_describe(cli *c, int argc, char **argv)
{
	char buf[PBRPC_METHOD_MAX + 1];
	pbrpc_call_result res;
	schema *s;

	if (argc == 0) {
		if (c->template) {
			die_msg("describe --template: which message or method? (usage: pbrpc describe --template [ENDPOINT] SYMBOL)");
			return EXIT_USAGE;
		}
		return describe_all(c);
	}
	const char *symbol = argv[0][0] == '.' ? argv[0] + 1 : argv[0];
	int rc = describe(c, &symbol, buf, sizeof(buf), &s, &res);
	if (rc < 0)
		return report_call("pbrpc.Reflection/Describe", rc, &res, reflection_hint(&res));
	if (rc > 0)
		return rc;
	rc = c->template ? print_template(c, s, symbol) : print_described(s, symbol);
	schema_free(s);
	return rc;
}

static int read_all(FILE *f, char **out, size_t *out_len)
{
	size_t len = 0, cap = 4096;
	char *data = malloc(cap);
	while (data) {
		size_t n = fread(data + len, 1, cap - len - 1, f);
		len += n;
		if (n == 0)
			break;
		if (len + 1 == cap) {
			char *p = cap >= MAX_STDIN ? NULL : realloc(data, cap * 2);
			if (!p) {
				free(data);
				return cap >= MAX_STDIN ? -EFBIG : -ENOMEM;
			}
			data = p;
			cap *= 2;
		}
	}
	if (!data)
		return -ENOMEM;
	if (ferror(f)) {
		int e = errno;
		free(data);
		return -(e ? e : EIO);
	}
	data[len] = '\0';
	*out = data;
	*out_len = len;
	return 0;
}

/* "demo.Kv.Get" is accepted for "demo.Kv/Get", as grpcurl does. */
static int normalize_method(const char *arg, char *buf, size_t len)
{
	snprintf(buf, len, "%s", arg[0] == '.' ? arg + 1 : arg);
	if (!strchr(buf, '/')) {
		char *dot = strrchr(buf, '.');
		if (dot)
			*dot = '/';
	}
	if (strlen(arg) >= len || !pbrpc_method_valid(buf, strlen(buf))) {
		die_msg("invalid method \"%s\": expected package.Service/Method, e.g. demo.Kv/Get", arg);
		return -1;
	}
	return 0;
}

/* Reflection does not know the method. Let the server say why in its own
 * words: send the call with a body that no protobuf parser accepts (a
 * truncated varint), so that a method that does exist after all is refused
 * with INVALID_ARGUMENT instead of running. */
static int report_unknown_method(cli *c, const char *method, const pbrpc_call_result *describe_res)
{
	static const uint8_t invalid_body[] = { 0xff };
	pbrpc_call_result res;
	uint8_t *reply;
	size_t reply_len;

	int rc = call_raw(c, method, invalid_body, sizeof(invalid_body), &reply, &reply_len, &res);
	free(reply);
	if (rc != 0 && res.status == PBRPC_STATUS_UNIMPLEMENTED)
		return report_status(&res, NULL);
	return report_status(describe_res, NULL);
}

static int load_request(int argc, char **argv, json_object **req)
{
	char err[256];
	char *text = argc > 1 ? argv[1] : "{}";
	size_t len = strlen(text);
	bool from_stdin = argc > 1 && strcmp(argv[1], "-") == 0;

	if (from_stdin) {
		int rc = read_all(stdin, &text, &len);
		if (rc < 0) {
			die_msg("cannot read the request from stdin: %s",
				rc == -EFBIG ? "larger than 64 MiB" : strerror(-rc));
			return EXIT_USAGE;
		}
	}
	int rc = pbjson_parse(text, len, req, err, sizeof(err));
	if (from_stdin)
		free(text);
	if (rc < 0) {
		die_msg("invalid JSON request: %s", err);
		return EXIT_USAGE;
	}
	if (!json_object_is_type(*req, json_type_object)) {
		die_msg("invalid JSON request: expected a JSON object ({...}), got %s",
			json_type_to_name(json_object_get_type(*req)));
		json_object_put(*req);
		*req = NULL;
		return EXIT_USAGE;
	}
	return 0;
}

static int cmd_call(cli *c, int argc, char **argv)
{
	char method[PBRPC_METHOD_MAX + 1];
	char err[512];
	json_object *req = NULL, *out = NULL;
	pbrpc_call_result res;
	schema *s = NULL;
	uint8_t *body = NULL, *reply = NULL;
	size_t body_len, reply_len;
	int rc, ret;

	if (normalize_method(argv[0], method, sizeof(method)) < 0)
		return EXIT_USAGE;
	if ((ret = load_request(argc, argv, &req)) != 0)
		return ret;
	if ((ret = connect_client(c)) != 0)
		goto out;

	const char *described = method;
	char buf[PBRPC_METHOD_MAX + 1];
	rc = describe(c, &described, buf, sizeof(buf), &s, &res);
	if (rc < 0 && res.status == PBRPC_STATUS_NOT_FOUND) {
		ret = report_unknown_method(c, method, &res);
		goto out;
	}
	if (rc < 0) {
		ret = report_call("pbrpc.Reflection/Describe", rc, &res, reflection_hint(&res));
		goto out;
	}
	if ((ret = rc) != 0)
		goto out;
	const schema_method *m = schema_find_method(s, method);
	if (!m || !m->input || !m->output) {
		die_msg("the server's reflection does not describe %s%s", method,
			m ? "'s request and reply types" : "");
		ret = EXIT_LOCAL;
		goto out;
	}

	if (pbjson_encode(m->input, req, &body, &body_len, err, sizeof(err)) < 0) {
		die_msg("%s", err);
		ret = EXIT_USAGE;
		goto out;
	}
	rc = call_raw(c, method, body, body_len, &reply, &reply_len, &res);
	if (rc != 0) {
		ret = report_call(method, rc, &res, NULL);
		goto out;
	}
	if (pbjson_decode(m->output, reply, reply_len, c->json_flags, &out, err, sizeof(err)) < 0) {
		die_msg("cannot decode the reply as %s: %s", m->output->name, err);
		ret = EXIT_LOCAL;
		goto out;
	}
	if (c->format == FORMAT_TEXT) {
		char *text;
		if (pbjson_to_text(m->output, out, &text) < 0) {
			die_msg("cannot print the reply as text");
			ret = EXIT_LOCAL;
			goto out;
		}
		fputs(text, stdout);
		free(text);
	} else {
		printf("%s\n", format_json(c, out));
	}
	ret = 0;
out:
	json_object_put(out);
	json_object_put(req);
	free(reply);
	free(body);
	schema_free(s);
	return ret;
}

static int cmd_health(cli *c, int argc, char **argv)
{
	Pbrpc__HealthCheckRequest req = PBRPC__HEALTH_CHECK_REQUEST__INIT;
	Pbrpc__HealthCheckResponse *reply;
	pbrpc_call_result res;
	req.service = argc > 0 ? argv[0] : "";

	int rc = call_typed(c, "pbrpc.Health/Check", &req.base, &pbrpc__health_check_response__descriptor,
			    (ProtobufCMessage **)&reply, &res);
	if (rc != 0) {
		const char *hint = NULL;
		if (res.status == PBRPC_STATUS_UNIMPLEMENTED && strstr(res.message, "pbrpc.Health"))
			hint = " (the server does not enable pbrpc.Health)";
		return report_call("pbrpc.Health/Check", rc, &res, hint);
	}
	const ProtobufCEnumValue *v =
		protobuf_c_enum_descriptor_get_value(&pbrpc__health_check_response__serving_status__descriptor,
						     reply->status);
	if (v)
		printf("%s\n", v->name);
	else
		printf("%d\n", (int)reply->status);
	int serving = reply->status == PBRPC__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
	protobuf_c_message_free_unpacked(&reply->base, NULL);
	return serving ? 0 : EXIT_NOT_SERVING;
}

/* ---- stats ---- */

/* A method's label: "" (requests for methods the server does not host) is
 * "(unknown)". */
static const char *stats_name(const Pbrpc__MethodStats *m)
{
	return m->method[0] ? m->method : "(unknown)";
}

static uint64_t stats_calls(const Pbrpc__MethodStats *m, bool errors_only)
{
	uint64_t n = 0;
	for (size_t i = 0; i < m->n_calls; i++)
		if (!errors_only || m->calls[i]->status != PBRPC_STATUS_OK)
			n += m->calls[i]->count;
	return n;
}

/* The q-quantile estimated from the cumulative histogram, by linear
 * interpolation inside the bucket that holds it (as Prometheus's
 * histogram_quantile does); the largest bound when it falls beyond. < 0: no
 * calls. */
static double stats_quantile(const Pbrpc__StatsReply *r, const Pbrpc__MethodStats *m, double q)
{
	size_t n = m->n_latency_buckets < r->n_latency_bounds_seconds ? m->n_latency_buckets
								       : r->n_latency_bounds_seconds;
	if (!m->latency_count || !n)
		return -1;
	double rank = q * (double)m->latency_count;
	uint64_t below = 0;
	double lower = 0;
	for (size_t b = 0; b < n; b++) {
		uint64_t in = m->latency_buckets[b];
		double upper = r->latency_bounds_seconds[b];
		if ((double)in >= rank && in > below)
			return lower + (upper - lower) * ((rank - (double)below) / (double)(in - below));
		below = in;
		lower = upper;
	}
	return r->latency_bounds_seconds[n - 1];
}

static void format_seconds(char *buf, size_t len, double s)
{
	if (s < 0)
		snprintf(buf, len, "-");
	else if (s < 1e-3)
		snprintf(buf, len, "%.0fus", s * 1e6);
	else if (s < 1)
		snprintf(buf, len, "%.1fms", s * 1e3);
	else
		snprintf(buf, len, "%.2fs", s);
}

/* Methods that were called, or have calls in flight. */
static bool stats_active(const Pbrpc__MethodStats *m)
{
	return m->latency_count || m->in_flight;
}

static void print_stats_table(const Pbrpc__StatsReply *r)
{
	printf("%-40s %8s %8s %9s %8s %8s %12s %12s\n", "METHOD", "CALLS", "ERRORS", "IN FLIGHT", "P50", "P99",
	       "BYTES IN", "BYTES OUT");
	for (size_t i = 0; i < r->n_methods; i++) {
		const Pbrpc__MethodStats *m = r->methods[i];
		if (!stats_active(m))
			continue;
		char p50[16], p99[16];
		format_seconds(p50, sizeof(p50), stats_quantile(r, m, 0.5));
		format_seconds(p99, sizeof(p99), stats_quantile(r, m, 0.99));
		printf("%-40s %8llu %8llu %9llu %8s %8s %12llu %12llu\n", stats_name(m),
		       (unsigned long long)stats_calls(m, false), (unsigned long long)stats_calls(m, true),
		       (unsigned long long)m->in_flight, p50, p99, (unsigned long long)m->bytes_in,
		       (unsigned long long)m->bytes_out);
	}
	const Pbrpc__ConnectionStats *c = r->connections;
	if (c)
		printf("connections: %llu open, %llu accepted, %llu refused, %llu protocol errors\n",
		       (unsigned long long)c->open, (unsigned long long)c->accepted, (unsigned long long)c->refused,
		       (unsigned long long)c->protocol_errors);
}

/* A label value in the exposition format: \\, \" and \n escaped. */
static void print_label(const char *s)
{
	for (; *s; s++) {
		if (*s == '\\' || *s == '"')
			printf("\\%c", *s);
		else if (*s == '\n')
			fputs("\\n", stdout);
		else
			putchar(*s);
	}
}

static void prom_head(const char *name, const char *type, const char *help)
{
	printf("# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void prom_method(const char *metric, const Pbrpc__MethodStats *m)
{
	printf("%s{method=\"", metric);
	print_label(stats_name(m));
	putchar('"');
}

/* The Prometheus text exposition format (version 0.0.4), for node-exporter's
 * textfile collector or a scrape through a small wrapper. */
static void print_stats_prometheus(const Pbrpc__StatsReply *r)
{
	prom_head("pbrpc_calls_total", "counter", "Calls answered, by method and status code.");
	for (size_t i = 0; i < r->n_methods; i++) {
		const Pbrpc__MethodStats *m = r->methods[i];
		for (size_t j = 0; stats_active(m) && j < m->n_calls; j++) {
			prom_method("pbrpc_calls_total", m);
			printf(",code=\"%s\"} %llu\n", pbrpc_status_name((int)m->calls[j]->status),
			       (unsigned long long)m->calls[j]->count);
		}
	}
	prom_head("pbrpc_call_duration_seconds", "histogram",
		  "Time from reading a request to queuing its reply, in seconds.");
	for (size_t i = 0; i < r->n_methods; i++) {
		const Pbrpc__MethodStats *m = r->methods[i];
		if (!stats_active(m))
			continue;
		for (size_t b = 0; b < m->n_latency_buckets && b < r->n_latency_bounds_seconds; b++) {
			prom_method("pbrpc_call_duration_seconds_bucket", m);
			printf(",le=\"%g\"} %llu\n", r->latency_bounds_seconds[b], (unsigned long long)m->latency_buckets[b]);
		}
		prom_method("pbrpc_call_duration_seconds_bucket", m);
		printf(",le=\"+Inf\"} %llu\n", (unsigned long long)m->latency_count);
		prom_method("pbrpc_call_duration_seconds_sum", m);
		printf("} %.9g\n", m->latency_sum_seconds);
		prom_method("pbrpc_call_duration_seconds_count", m);
		printf("} %llu\n", (unsigned long long)m->latency_count);
	}
	static const struct {
		const char *name, *type, *help;
		size_t off;
	} per_method[] = {
		{ "pbrpc_request_bytes_total", "counter", "REQUEST payload bytes received.",
		  offsetof(Pbrpc__MethodStats, bytes_in) },
		{ "pbrpc_response_bytes_total", "counter", "RESPONSE payload bytes sent.",
		  offsetof(Pbrpc__MethodStats, bytes_out) },
		{ "pbrpc_calls_in_flight", "gauge", "Calls handed to their handler and not answered yet.",
		  offsetof(Pbrpc__MethodStats, in_flight) },
	};
	for (size_t k = 0; k < sizeof(per_method) / sizeof(per_method[0]); k++) {
		prom_head(per_method[k].name, per_method[k].type, per_method[k].help);
		for (size_t i = 0; i < r->n_methods; i++) {
			const Pbrpc__MethodStats *m = r->methods[i];
			if (!stats_active(m))
				continue;
			prom_method(per_method[k].name, m);
			printf("} %llu\n", (unsigned long long)*(const uint64_t *)((const char *)m + per_method[k].off));
		}
	}
	const Pbrpc__ConnectionStats *c = r->connections;
	if (!c)
		return;
	prom_head("pbrpc_connections_open", "gauge", "Connections open now.");
	printf("pbrpc_connections_open %llu\n", (unsigned long long)c->open);
	prom_head("pbrpc_connections_accepted_total", "counter", "Connections accepted.");
	printf("pbrpc_connections_accepted_total %llu\n", (unsigned long long)c->accepted);
	prom_head("pbrpc_connections_refused_total", "counter", "Connections refused (too many, or shutting down).");
	printf("pbrpc_connections_refused_total %llu\n", (unsigned long long)c->refused);
	prom_head("pbrpc_protocol_errors_total", "counter", "Connections closed for protocol errors.");
	printf("pbrpc_protocol_errors_total %llu\n", (unsigned long long)c->protocol_errors);
}

static int cmd_stats(cli *c, int argc, char **argv)
{
	(void)argc, (void)argv;
	Pbrpc__StatsRequest req = PBRPC__STATS_REQUEST__INIT;
	Pbrpc__StatsReply *reply;
	pbrpc_call_result res;
	int rc = call_typed(c, "pbrpc.Stats/Get", &req.base, &pbrpc__stats_reply__descriptor,
			    (ProtobufCMessage **)&reply, &res);
	if (rc != 0) {
		const char *hint = NULL;
		if (res.status == PBRPC_STATUS_UNIMPLEMENTED && strstr(res.message, "pbrpc.Stats"))
			hint = " (the server does not enable pbrpc.Stats)";
		return report_call("pbrpc.Stats/Get", rc, &res, hint);
	}
	if (c->format == FORMAT_PROMETHEUS)
		print_stats_prometheus(reply);
	else
		print_stats_table(reply);
	protobuf_c_message_free_unpacked(&reply->base, NULL);
	return 0;
}

static const command commands[] = {
	{ "list", 0, 0, "list [ENDPOINT]",
	  "Lists the services the server offers and their methods, one per line:\n"
	  "  demo.Kv\n"
	  "    demo.Kv/Get(demo.GetRequest) returns (demo.GetReply)\n"
	  "Uses pbrpc.Reflection/ListServices; with --protoset, lists the set's services\n"
	  "and needs no ENDPOINT.\n",
	  cmd_list },
	{ "describe", 0, 1, "describe [ENDPOINT] [SYMBOL]",
	  "Shows the schema of SYMBOL as proto-like text: a service (demo.Kv), a method\n"
	  "(demo.Kv/Get or demo.Kv.Get), a message (demo.GetRequest) or an enum,\n"
	  "followed by every message and enum it uses; without SYMBOL, every service\n"
	  "and type. Fields whose JSON name differs from their name say so in a\n"
	  "comment. Uses pbrpc.Reflection/Describe (or the --protoset, without\n"
	  "ENDPOINT); an unknown symbol fails with NOT_FOUND (exit 69).\n"
	  "\n"
	  "      --template   print a JSON request to fill in instead: every field of\n"
	  "                   the message (or of the method's request) with a\n"
	  "                   placeholder value; --format compact puts it on one line\n"
	  "\n"
	  "  pbrpc describe --template unix:/tmp/kv.sock demo.Kv.Put\n",
	  cmd_describe },
	{ "call", 1, 2, "call [ENDPOINT] METHOD [JSON | -]",
	  "Calls METHOD (demo.Kv/Get, or demo.Kv.Get) with a request given as JSON:\n"
	  "the JSON argument, \"-\" to read it from stdin, or {} when omitted. The reply\n"
	  "is printed as JSON. Both follow protobuf's JSON mapping: keys in lowerCamelCase\n"
	  "(the .proto names are accepted too), bytes as base64, 64-bit integers as\n"
	  "strings, enums by name, NaN and Infinity as strings. The request is strict\n"
	  "JSON: no single quotes, no bare NaN or Infinity, no duplicate keys, no\n"
	  "numbers beyond a double's range. Fields holding their default value are not\n"
	  "printed unless --emit-defaults is given.\n"
	  "The schema comes from pbrpc.Reflection/Describe, or from --protoset.\n"
	  "\n"
	  "      --format json|compact|text   the reply as indented JSON (default), JSON\n"
	  "                   on one line, or protobuf's text format\n"
	  "      --emit-defaults  also print fields that hold their default value\n"
	  "\n"
	  "  pbrpc call unix:/tmp/kv.sock demo.Kv/Put '{\"key\": \"a\", \"value\": \"aGk=\"}'\n"
	  "  echo '{\"key\": \"a\"}' | pbrpc call unix:/tmp/kv.sock demo.Kv/Get -\n",
	  cmd_call },
	{ "health", 0, 1, "health [ENDPOINT] [SERVICE]",
	  "Asks pbrpc.Health/Check whether the server, or SERVICE (demo.Kv), is able to\n"
	  "serve, and prints SERVING or NOT_SERVING. Exits 0 when SERVING, 1 otherwise;\n"
	  "an unknown SERVICE fails with NOT_FOUND (exit 69).\n",
	  cmd_health },
	{ "stats", 0, 0, "stats [ENDPOINT]",
	  "Asks pbrpc.Stats/Get what the server has answered and prints, for each\n"
	  "method called so far: calls, errors (calls not OK), calls in flight, the\n"
	  "median and 99th percentile latency (estimated from the histogram), and the\n"
	  "request and reply bytes; then the connection counters.\n"
	  "\n"
	  "      --format table|prometheus   a table (default), or the Prometheus text\n"
	  "                   exposition format (pbrpc_calls_total,\n"
	  "                   pbrpc_call_duration_seconds, ...), e.g. for\n"
	  "                   node-exporter's textfile collector\n"
	  "\n"
	  "  pbrpc stats unix:/tmp/kv.sock\n"
	  "  pbrpc stats --format prometheus > /var/lib/node-exporter/pbrpc.prom\n",
	  cmd_stats },
};

#define N_COMMANDS (sizeof(commands) / sizeof(commands[0]))

static const char *const command_summaries[N_COMMANDS] = {
	"list services and methods",
	"show a schema, or all of them",
	"call a method with a JSON request",
	"check that a service is serving",
	"show call and connection counters",
};

static const char options_text[] =
	"Options:\n"
	"  -t, --timeout DURATION     give up after DURATION, counted over the whole\n"
	"                             command: 500ms, 2s, 1.5m, 1h or infinity\n"
	"                             (default 30s)\n"
	"  -m, --metadata KEY=VALUE   send request metadata (repeatable); KEY is\n"
	"                             lowercase letters, digits, '-', '_' and '.'\n"
	"      --protoset FILE        take schemas from FILE, a FileDescriptorSet\n"
	"                             (protoc --include_imports -o FILE), instead of\n"
	"                             the server's reflection\n"
	"      --format FORMAT        call: json (default), compact or text;\n"
	"                             stats: table (default) or prometheus\n"
	"      --emit-defaults        call: also print fields at their default value\n"
	"      --template             describe: print a JSON request skeleton\n"
	"      --ca FILE|DIR          tls: verify the server with these CAs\n"
	"                             (default: the system's store)\n"
	"      --cert FILE            tls: our certificate chain, for mutual TLS\n"
	"      --key FILE             tls: its private key (default: in --cert's file)\n"
	"      --servername NAME      tls: the name the server's certificate must\n"
	"                             match, and SNI (default: the endpoint's host)\n"
	"  -v, --verbose              show what is sent and received on stderr: the\n"
	"                             connection, each call's metadata, size, status\n"
	"                             and time\n"
	"  -h, --help                 show this help (or COMMAND's) and exit\n"
	"  -V, --version              show the version and exit\n";

static const char usage_text[] =
	"Usage: pbrpc [OPTIONS] COMMAND [ARGS...]\n"
	"\n"
	"A command-line client for pbrpc servers; it learns their services through\n"
	"pbrpc.Reflection, so it needs no generated code.\n"
	"\n"
	"Commands:\n"
	"%s"
	"  help [COMMAND]                      show this text, or a command's\n"
	"\n"
	"%s"
	"\n"
	"ENDPOINT is unix:/path, unix:@abstract-name, tcp:host:port, tcp:[v6]:port\n"
	"or tls:host:port (TLS: see --ca).\n"
	"When it is omitted, or given as \"-\", $PBRPC_ENDPOINT is used.\n"
	"\n"
	"Exit status:\n"
	"  0       success (health: SERVING)\n"
	"  1       health: the answer was not SERVING\n"
	"  2       usage error: bad arguments, endpoint, protoset or JSON request\n"
	"  3       cannot connect: no pbrpc server at ENDPOINT, or none answering\n"
	"          within the timeout\n"
	"  4       the server's schema or reply could not be understood, or the\n"
	"          output could not be written\n"
	"  64+N    the call failed with RPC status N, printed on stderr as\n"
	"          \"pbrpc: STATUS: message\": 65 CANCELLED, 66 UNKNOWN,\n"
	"          67 INVALID_ARGUMENT, 68 DEADLINE_EXCEEDED, 69 NOT_FOUND,\n"
	"          70 ALREADY_EXISTS, 71 PERMISSION_DENIED, 72 RESOURCE_EXHAUSTED,\n"
	"          73 FAILED_PRECONDITION, 74 ABORTED, 75 OUT_OF_RANGE,\n"
	"          76 UNIMPLEMENTED, 77 INTERNAL, 78 UNAVAILABLE, 79 DATA_LOSS,\n"
	"          80 UNAUTHENTICATED\n"
	"\n"
	"See pbrpc(1) for more.\n";

static void print_usage(FILE *out)
{
	char list[1024] = "";
	size_t o = 0;
	for (size_t i = 0; i < N_COMMANDS; i++) {
		int n = snprintf(list + o, sizeof(list) - o, "  %-36s%s\n", commands[i].synopsis, command_summaries[i]);
		o += n > 0 ? (size_t)n : 0;
	}
	fprintf(out, usage_text, list, options_text);
}

static const command *find_command(const char *name)
{
	for (size_t i = 0; i < N_COMMANDS; i++)
		if (strcmp(commands[i].name, name) == 0)
			return &commands[i];
	return NULL;
}

static int cmd_help(int argc, char **argv)
{
	if (argc == 0) {
		print_usage(stdout);
		return 0;
	}
	const command *cmd = find_command(argv[0]);
	if (!cmd) {
		die_msg("unknown command \"%s\" (commands: list, describe, call, health, stats, help)", argv[0]);
		return EXIT_USAGE;
	}
	printf("Usage: pbrpc [OPTIONS] %s\n\n%s\nThe global options (pbrpc --help) apply too. See pbrpc(1).\n",
	       cmd->synopsis, cmd->help);
	return 0;
}

/* An ENDPOINT argument contains ':'; a method, symbol or service never does. */
static bool looks_like_endpoint(const char *arg)
{
	return strcmp(arg, "-") == 0 || strchr(arg, ':') != NULL;
}

/* Takes the endpoint off the front of the arguments or from $PBRPC_ENDPOINT,
 * then checks the number of remaining arguments. A first argument without a
 * ':' is the endpoint only when the command could not take it otherwise. With
 * --protoset, list and describe need no endpoint. */
static int take_endpoint(cli *c, const command *cmd, int *argc, char ***argv)
{
	const char *env = getenv("PBRPC_ENDPOINT");
	bool optional = c->ps && cmd->run != cmd_call && cmd->run != cmd_health;
	if (env && !env[0])
		env = NULL;

	if (*argc > 0 && (looks_like_endpoint((*argv)[0]) || *argc > cmd->max_args ||
			  (!env && !optional && cmd->min_args == cmd->max_args && *argc > cmd->min_args))) {
		c->endpoint = (*argv)[0];
		(*argc)--;
		(*argv)++;
		if (strcmp(c->endpoint, "-") == 0)
			c->endpoint = env;
	} else {
		c->endpoint = env;
	}
	if (!c->endpoint && !optional) {
		die_msg("%s: no ENDPOINT given and $PBRPC_ENDPOINT is not set (usage: pbrpc %s)", cmd->name,
			cmd->synopsis);
		return EXIT_USAGE;
	}
	if (*argc < cmd->min_args || *argc > cmd->max_args) {
		die_msg("%s: %s arguments (usage: pbrpc %s)", cmd->name, *argc < cmd->min_args ? "missing" : "too many",
			cmd->synopsis);
		return EXIT_USAGE;
	}
	return 0;
}

/* Exit status 4 when the output cannot be written (a full disk, a closed
 * pipe's EPIPE excepted: that is the reader's choice and stays silent). */
static int finish_stdout(int ret)
{
	if (fflush(stdout) != 0 || ferror(stdout)) {
		if (errno != EPIPE)
			die_msg("cannot write output: %s", strerror(errno));
		return ret ? ret : EXIT_LOCAL;
	}
	return ret;
}

static int load_protoset(cli *c)
{
	char err[256];
	int rc = protoset_load(&c->ps, c->protoset_path, err, sizeof(err));
	if (rc == -ENOMEM) {
		die_msg("out of memory");
		return EXIT_LOCAL;
	}
	if (rc < 0) {
		die_msg("invalid --protoset \"%s\": %s", c->protoset_path, err);
		return EXIT_USAGE;
	}
	return 0;
}

int main(int argc, char **argv)
{
	enum { OPT_EMIT_DEFAULTS = 0x100, OPT_FORMAT, OPT_PROTOSET, OPT_TEMPLATE };
	enum { OPT_TLS_CA = 0x200, OPT_TLS_CERT, OPT_TLS_KEY, OPT_TLS_SERVERNAME }; /* TLS (issue 12) */
	static const struct option longopts[] = {
		{ "timeout", required_argument, NULL, 't' },
		{ "metadata", required_argument, NULL, 'm' },
		{ "emit-defaults", no_argument, NULL, OPT_EMIT_DEFAULTS },
		{ "format", required_argument, NULL, OPT_FORMAT },
		{ "protoset", required_argument, NULL, OPT_PROTOSET },
		{ "template", no_argument, NULL, OPT_TEMPLATE },
		{ "ca", required_argument, NULL, OPT_TLS_CA },
		{ "cert", required_argument, NULL, OPT_TLS_CERT },
		{ "key", required_argument, NULL, OPT_TLS_KEY },
		{ "servername", required_argument, NULL, OPT_TLS_SERVERNAME },
		{ "verbose", no_argument, NULL, 'v' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	cli c = { .timeout_ms = DEFAULT_TIMEOUT_MS };
	bool help = false;
	int opt;

	opterr = 0;
	while ((opt = getopt_long(argc, argv, ":t:m:vhV", longopts, NULL)) != -1) {
		switch (opt) {
		case 't':
			if (parse_duration(optarg, &c.timeout_ms) < 0) {
				die_msg("invalid --timeout \"%s\": expected a duration such as 500ms, 2s, 1m or infinity",
					optarg);
				return EXIT_USAGE;
			}
			break;
		case 'm':
			if (add_metadata(&c, optarg) < 0)
				return EXIT_USAGE;
			break;
		case OPT_EMIT_DEFAULTS:
			c.json_flags |= PBJSON_EMIT_DEFAULTS;
			break;
		case OPT_FORMAT:
			c.format_given = true;
			if (strcmp(optarg, "table") == 0) {
				c.format = FORMAT_TABLE;
			} else if (strcmp(optarg, "prometheus") == 0) {
				c.format = FORMAT_PROMETHEUS;
			} else if (strcmp(optarg, "json") == 0) {
				c.format = FORMAT_JSON;
			} else if (strcmp(optarg, "compact") == 0) {
				c.format = FORMAT_COMPACT;
			} else if (strcmp(optarg, "text") == 0) {
				c.format = FORMAT_TEXT;
			} else {
				die_msg("invalid --format \"%s\": expected json, compact, text, table or prometheus", optarg);
				return EXIT_USAGE;
			}
			break;
		case OPT_PROTOSET:
			c.protoset_path = optarg;
			break;
		case OPT_TEMPLATE:
			c.template = true;
			break;
		case OPT_TLS_CA:
			c.tls.ca = optarg;
			break;
		case OPT_TLS_CERT:
			c.tls.cert = optarg;
			break;
		case OPT_TLS_KEY:
			c.tls.key = optarg;
			break;
		case OPT_TLS_SERVERNAME:
			c.tls.server_name = optarg;
			break;
		case 'v':
			c.verbose = true;
			break;
		case 'h':
			help = true;
			break;
		case 'V':
			printf("pbrpc %s\n", PBRPC_VERSION);
			return finish_stdout(0);
		case ':':
			die_msg("option %s needs a value (see pbrpc --help)", argv[optind - 1]);
			return EXIT_USAGE;
		default:
			if (optopt)
				die_msg("unknown option -%c (see pbrpc --help)", optopt);
			else
				die_msg("unknown option %s (see pbrpc --help)", argv[optind - 1]);
			return EXIT_USAGE;
		}
	}
	argc -= optind;
	argv += optind;
	/* "pbrpc call --help" and "pbrpc --help call" show the command's help. */
	if (help)
		return finish_stdout(cmd_help(argc > 0 && find_command(argv[0]) ? 1 : 0, argv));
	if (argc == 0) {
		print_usage(stderr);
		return EXIT_USAGE;
	}
	if (strcmp(argv[0], "help") == 0)
		return finish_stdout(cmd_help(argc - 1, argv + 1));
	const command *cmd = find_command(argv[0]);
	if (!cmd) {
		die_msg("unknown command \"%s\" (commands: list, describe, call, health, stats, help)", argv[0]);
		return EXIT_USAGE;
	}
	if (c.template && cmd->run != cmd_describe) {
		die_msg("--template goes with describe (see pbrpc help describe)");
		return EXIT_USAGE;
	}
	if (c.format == FORMAT_TEXT && cmd->run != cmd_call) {
		die_msg("--format text goes with call (see pbrpc help call)");
		return EXIT_USAGE;
	}
	bool stats_format = c.format == FORMAT_TABLE || c.format == FORMAT_PROMETHEUS;
	if (cmd->run == cmd_stats && c.format_given && !stats_format) {
		die_msg("stats takes --format table or prometheus (see pbrpc help stats)");
		return EXIT_USAGE;
	}
	if (cmd->run != cmd_stats && stats_format) {
		die_msg("--format %s goes with stats (see pbrpc help stats)",
			c.format == FORMAT_TABLE ? "table" : "prometheus");
		return EXIT_USAGE;
	}
	int ret = c.protoset_path ? load_protoset(&c) : 0;
	argc--;
	argv++;
	if (ret == 0)
		ret = take_endpoint(&c, cmd, &argc, &argv);
	if (ret != 0) {
		protoset_free(c.ps);
		return ret;
	}
	c.deadline_ms = now_ms() + (c.timeout_ms > 0 ? c.timeout_ms : 0);

	if (cmd->run == cmd_call) {
		ret = cmd_call(&c, argc, argv); /* parses the JSON before connecting */
	} else {
		ret = c.endpoint && !(c.ps && cmd->run != cmd_health) ? connect_client(&c) : 0;
		if (ret == 0)
			ret = cmd->run(&c, argc, argv);
	}
	pbrpc_client_free(c.client);
	protoset_free(c.ps);
	return finish_stdout(ret);
}
