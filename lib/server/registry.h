/* The services a server hosts and the methods they answer: what dispatch
 * looks up on every request, and what the built-in services (health.c,
 * reflection.c) read. They depend on this header and register themselves;
 * the server never calls into them. Used on the server's loop thread. */
#ifndef PBRPC_SERVER_REGISTRY_H
#define PBRPC_SERVER_REGISTRY_H

#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pbrpc/server.h"

/* Latency histogram bounds for pbrpc.Stats, in nanoseconds: 25 us to 10 s
 * in 1-2.5-5 steps; a last bucket (+Inf) takes the rest. */
#define PBRPC__STATS_BOUNDS                                                                              \
	25000, 50000, 100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000, 25000000, 50000000, \
		100000000, 250000000, 500000000, 1000000000, 2500000000, 5000000000, 10000000000
#define PBRPC__STATS_N_BOUNDS 18

/* One method's counters (or those of requests naming no hosted method).
 * Every loop adds to them (opts.loop_threads): relaxed atomic adds, read
 * with relaxed loads (stats.c). */
typedef struct pbrpc__method_stats {
	uint64_t calls[PBRPC_STATUS_COUNT]; /* answered, by status */
	uint64_t buckets[PBRPC__STATS_N_BOUNDS + 1]; /* by duration, not cumulative */
	uint64_t duration_ns;               /* sum over the answered calls */
	uint64_t bytes_in, bytes_out;
	uint64_t in_flight;                 /* handed to the handler, not answered */
} pbrpc__method_stats;

/* A service's or a method's policy (authz.c): a copy of the user's
 * pbrpc_policy, whose lists it owns. */
typedef struct pbrpc__policy {
	pbrpc_policy p;
} pbrpc__policy;

void pbrpc__policy_free(pbrpc__policy *p);

typedef struct pbrpc__method {
	char *name; /* "pkg.Service/Method", NUL-terminated */
	size_t len;
	uint64_t hash;
	size_t service; /* index into the registry's services */
	unsigned index; /* method index within the service */
	bool missing;   /* its handler slot was NULL at registration */
	uint8_t kind;   /* 0 unary, else the pbrpc_stream_kind it was registered as */
	pbrpc__method_stats *stats; /* once counting is on (stays put on rehash) */
	void *stream;   /* a stream method: the server's record (stream.c), freed
	                 * with the registry */
	const pbrpc__policy *policy; /* in force: its own, else its service's; NULL: none */
	pbrpc__policy *own_policy;   /* set for this method (owned) */
} pbrpc__method;

/* pbrpc__method.service of a stream method whose service was not added. */
#define PBRPC__NO_SERVICE ((size_t)-1)

typedef struct pbrpc__service_entry {
	ProtobufCService *service;
	bool owned;   /* built-in: destroyed with the registry */
	bool serving; /* as pbrpc.Health reports it */
	pbrpc__policy *policy; /* for its methods without their own (owned) */
} pbrpc__service_entry;

typedef struct pbrpc__registry {
	pbrpc__service_entry *services; /* in registration order */
	size_t n_services;
	pbrpc__method *methods; /* open addressing on the name's hash */
	size_t methods_cap, n_methods;
	bool serving;       /* the server as a whole ("" in pbrpc.Health) */
	bool shutting_down; /* every service reports NOT_SERVING */
	/* Someone watches each call (a call_log hook or pbrpc.Stats): dispatch
	 * then reports it through pbrpc__registry_observe(). */
	bool observe;
	bool counting;      /* methods have stats */
	pbrpc__method_stats *unknown; /* requests for no hosted method */
	pbrpc_call_log_cb call_log;
	void *call_log_user;
} pbrpc__registry;

void pbrpc__registry_init(pbrpc__registry *r);

/* Destroys the owned services and frees the tables. */
void pbrpc__registry_fini(pbrpc__registry *r);

/* Registers a service; `owned` ones are destroyed with the registry, also
 * when this fails. Every method must have a valid full name, and a method
 * whose handler slot is NULL is answered UNIMPLEMENTED (see
 * pbrpc__registry_find). Returns 0, PBRPC_EDUPLICATE, PBRPC_EINVALID, -ENOMEM;
 * a failure leaves the registry unchanged. */
int pbrpc__registry_add(pbrpc__registry *r, ProtobufCService *service, bool owned);

/* The first method of d that its .proto declares with `stream`, as pbrpc-gen
 * registered it (pbrpc/schema.h), and that has no stream handler in r yet
 * (pbrpc__registry_add_stream), or NULL; *flags (if not NULL) gets its
 * PBRPC_SCHEMA_* bits. */
const char *pbrpc__registry_stream_method(const pbrpc__registry *r, const ProtobufCServiceDescriptor *d,
					  int *flags);

/* Registers a stream method: attaches kind and the stream record (malloc'd,
 * taken over: freed with the registry, also when this fails) to the method of
 * that name, or adds one of no service (PBRPC__NO_SERVICE) that a service
 * added later takes over. Returns 0, PBRPC_EDUPLICATE (a stream of that name
 * exists), PBRPC_EINVALID (bad name), -ENOMEM. */
int pbrpc__registry_add_stream(pbrpc__registry *r, const char *name, uint8_t kind, void *stream);

/* The method with this full name, or NULL. */
const pbrpc__method *pbrpc__registry_find(const pbrpc__registry *r, const char *name, size_t len);

/* True when a service of this name (name[0..len)) is registered. */
bool pbrpc__registry_service_known(const pbrpc__registry *r, const char *name, size_t len);

static inline ProtobufCService *pbrpc__registry_service(const pbrpc__registry *r, const pbrpc__method *m)
{
	return r->services[m->service].service;
}

static inline const ProtobufCMethodDescriptor *pbrpc__registry_method_desc(const pbrpc__registry *r,
									   const pbrpc__method *m)
{
	return &r->services[m->service].service->descriptor->methods[m->index];
}

/* The registered service with this full name ("demo.Kv"), or NULL. */
const ProtobufCService *pbrpc__registry_find_service(const pbrpc__registry *r, const char *name);

/* 1 SERVING, 0 NOT_SERVING, -1 unknown name; "" or NULL is the server. */
int pbrpc__registry_serving(const pbrpc__registry *r, const char *name);

/* Returns 0 or PBRPC_EINVALID for an unknown name. */
int pbrpc__registry_set_serving(pbrpc__registry *r, const char *name, bool serving);

/* Turns per-method counting on (pbrpc.Stats), for methods registered so far
 * and later. Returns 0 or -ENOMEM. */
int pbrpc__registry_enable_stats(pbrpc__registry *r);

/* The observe point (r->observe): the counters of `m` (NULL: a request for no
 * hosted method), then the call_log hook. `started`: the call was counted in
 * flight by pbrpc__registry_observe_start(). */
void pbrpc__registry_observe(pbrpc__registry *r, const pbrpc__method *m, const pbrpc_call_info *info,
			     bool started);

/* A handler was invoked for `m` (calls in flight). */
static inline void pbrpc__registry_observe_start(pbrpc__registry *r, const pbrpc__method *m)
{
	if (m->stats)
		__atomic_fetch_add(&m->stats->in_flight, 1, __ATOMIC_RELAXED);
	(void)r;
}

/* A call handed to its handler will never be answered (its connection
 * closed). */
static inline void pbrpc__registry_observe_orphan(pbrpc__registry *r, const pbrpc__method *m)
{
	if (m->stats && __atomic_load_n(&m->stats->in_flight, __ATOMIC_RELAXED))
		__atomic_fetch_sub(&m->stats->in_flight, 1, __ATOMIC_RELAXED);
	(void)r;
}

/* The server's registry, for the built-in services' registration. */
pbrpc__registry *pbrpc__server_registry(pbrpc_server *srv);

#endif
