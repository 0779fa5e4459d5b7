/* pbrpc.Stats: the per-method counters the registry keeps once counting is on
 * (dispatch updates them through the same observe point as opts.call_log),
 * and the server's connection counters. Runs on the loop thread, as every
 * built-in service does. */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "server/registry.h"
#include "stats.pb-c.h"

typedef struct stats_service {
	Pbrpc__Stats_Service svc; /* handlers receive &svc */
	const pbrpc__registry *reg;
	const pbrpc_server *srv;
} stats_service;

#define stats_of(s) ((stats_service *)((char *)(s) - offsetof(stats_service, svc)))

static const int64_t bounds_ns[PBRPC__STATS_N_BOUNDS] = { PBRPC__STATS_BOUNDS };

/* Everything one reply points to, in one allocation per array. */
typedef struct reply_mem {
	Pbrpc__MethodStats *methods;
	Pbrpc__MethodStats **method_ptrs;
	Pbrpc__StatusCount *counts;
	Pbrpc__StatusCount **count_ptrs;
	uint64_t *buckets;
	double bounds[PBRPC__STATS_N_BOUNDS];
} reply_mem;

static void reply_mem_free(reply_mem *m)
{
	free(m->methods);
	free(m->method_ptrs);
	free(m->counts);
	free(m->count_ptrs);
	free(m->buckets);
}

static int by_name(const void *a, const void *b)
{
	const pbrpc__method *x = *(const pbrpc__method *const *)a, *y = *(const pbrpc__method *const *)b;
	return strcmp(x->name, y->name);
}

static void fill(Pbrpc__MethodStats *out, const char *name, const pbrpc__method_stats *live,
		 Pbrpc__StatusCount *counts, Pbrpc__StatusCount **count_ptrs, uint64_t *buckets)
{
	/* Other loops add to it meanwhile (opts.loop_threads): a snapshot. */
	pbrpc__method_stats snap;
	const uint64_t *from = (const uint64_t *)live;
	uint64_t *to = (uint64_t *)&snap;
	for (size_t i = 0; i < sizeof(snap) / sizeof(uint64_t); i++)
		to[i] = __atomic_load_n(&from[i], __ATOMIC_RELAXED);
	const pbrpc__method_stats *st = &snap;
	pbrpc__method_stats__init(out);
	out->method = (char *)name;
	out->calls = count_ptrs;
	for (int s = 0; s < PBRPC_STATUS_COUNT; s++) {
		if (!st->calls[s])
			continue;
		Pbrpc__StatusCount *c = &counts[out->n_calls];
		pbrpc__status_count__init(c);
		c->status = (uint32_t)s;
		c->count = st->calls[s];
		count_ptrs[out->n_calls++] = c;
	}
	uint64_t sum = 0;
	for (size_t b = 0; b < PBRPC__STATS_N_BOUNDS; b++)
		buckets[b] = sum += st->buckets[b];
	out->latency_buckets = buckets;
	out->n_latency_buckets = PBRPC__STATS_N_BOUNDS;
	out->latency_count = sum + st->buckets[PBRPC__STATS_N_BOUNDS];
	out->latency_sum_seconds = (double)st->duration_ns / 1e9;
	out->bytes_in = st->bytes_in;
	out->bytes_out = st->bytes_out;
	out->in_flight = st->in_flight;
}

static void stats_get(Pbrpc__Stats_Service *svc, const Pbrpc__StatsRequest *req, Pbrpc__StatsReply_Closure closure,
		      void *closure_data)
{
	(void)req;
	const pbrpc__registry *reg = stats_of(svc)->reg;
	Pbrpc__StatsReply reply = PBRPC__STATS_REPLY__INIT;
	Pbrpc__ConnectionStats conns = PBRPC__CONNECTION_STATS__INIT;
	reply_mem m = { 0 };
	size_t n = reg->n_methods + 1; /* and the unknown ones */
	const pbrpc__method **sorted = calloc(n, sizeof(*sorted));
	m.methods = calloc(n, sizeof(*m.methods));
	m.method_ptrs = calloc(n, sizeof(*m.method_ptrs));
	m.counts = calloc(n * PBRPC_STATUS_COUNT, sizeof(*m.counts));
	m.count_ptrs = calloc(n * PBRPC_STATUS_COUNT, sizeof(*m.count_ptrs));
	m.buckets = calloc(n * PBRPC__STATS_N_BOUNDS, sizeof(*m.buckets));
	if (!sorted || !m.methods || !m.method_ptrs || !m.counts || !m.count_ptrs || !m.buckets) {
		free(sorted);
		reply_mem_free(&m);
		pbrpc_call_set_status(closure_data, PBRPC_STATUS_RESOURCE_EXHAUSTED, "server out of memory");
		closure(NULL, closure_data);
		return;
	}
	size_t k = 0;
	for (size_t i = 0; i < reg->methods_cap; i++)
		if (reg->methods[i].name && reg->methods[i].stats)
			sorted[k++] = &reg->methods[i];
	qsort(sorted, k, sizeof(*sorted), by_name);
	for (size_t i = 0; i < k; i++)
		fill(&m.methods[i], sorted[i]->name, sorted[i]->stats, &m.counts[i * PBRPC_STATUS_COUNT],
		     &m.count_ptrs[i * PBRPC_STATUS_COUNT], &m.buckets[i * PBRPC__STATS_N_BOUNDS]);
	if (reg->unknown) {
		fill(&m.methods[k], "", reg->unknown, &m.counts[k * PBRPC_STATUS_COUNT],
		     &m.count_ptrs[k * PBRPC_STATUS_COUNT], &m.buckets[k * PBRPC__STATS_N_BOUNDS]);
		k++;
	}
	for (size_t i = 0; i < k; i++)
		m.method_ptrs[i] = &m.methods[i];
	reply.methods = m.method_ptrs;
	reply.n_methods = k;
	for (size_t b = 0; b < PBRPC__STATS_N_BOUNDS; b++)
		m.bounds[b] = (double)bounds_ns[b] / 1e9;
	reply.latency_bounds_seconds = m.bounds;
	reply.n_latency_bounds_seconds = PBRPC__STATS_N_BOUNDS;

	pbrpc_server_stats st;
	pbrpc_server_get_stats(stats_of(svc)->srv, &st);
	conns.open = st.connections_open;
	conns.accepted = st.connections_accepted;
	conns.refused = st.connections_refused;
	conns.protocol_errors = st.protocol_errors;
	reply.connections = &conns;

	closure(&reply, closure_data);
	free(sorted);
	reply_mem_free(&m);
}

static void stats_destroy(Pbrpc__Stats_Service *svc)
{
	free(stats_of(svc));
}

PBRPC_EXPORT int pbrpc_server_enable_stats(pbrpc_server *srv)
{
	pbrpc__registry *reg = pbrpc__server_registry(srv);
	stats_service *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	pbrpc__stats__init(&s->svc, stats_destroy);
	s->svc.get = stats_get;
	s->reg = reg;
	s->srv = srv;
	int rc = pbrpc__registry_add(reg, &s->svc.base, true);
	if (rc < 0)
		return rc;
	return pbrpc__registry_enable_stats(reg);
}
