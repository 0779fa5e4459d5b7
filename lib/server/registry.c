#include "server/registry.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pbrpc/common.h"
#include "pbrpc/schema.h"

static uint64_t hash_name(const char *s, size_t n)
{
	uint64_t h = 1469598103934665603ULL;
	for (size_t i = 0; i < n; i++) {
		h ^= (uint8_t)s[i];
		h *= 1099511628211ULL;
	}
	return h;
}

void pbrpc__registry_init(pbrpc__registry *r)
{
	memset(r, 0, sizeof(*r));
	r->serving = true;
}

void pbrpc__registry_fini(pbrpc__registry *r)
{
	for (size_t i = 0; i < r->n_services; i++) {
		if (r->services[i].owned)
			protobuf_c_service_destroy(r->services[i].service);
		pbrpc__policy_free(r->services[i].policy);
	}
	free(r->services);
	for (size_t i = 0; i < r->methods_cap; i++) {
		free(r->methods[i].name);
		free(r->methods[i].stats);
		free(r->methods[i].stream);
		pbrpc__policy_free(r->methods[i].own_policy);
	}
	free(r->unknown);
	free(r->methods);
	memset(r, 0, sizeof(*r));
}

const pbrpc__method *pbrpc__registry_find(const pbrpc__registry *r, const char *name, size_t len)
{
	if (!r->methods_cap)
		return NULL;
	uint64_t h = hash_name(name, len);
	size_t mask = r->methods_cap - 1;
	for (size_t i = h & mask;; i = (i + 1) & mask) {
		const pbrpc__method *e = &r->methods[i];
		if (!e->name)
			return NULL;
		if (e->hash == h && e->len == len && memcmp(e->name, name, len) == 0)
			return e;
	}
}

static void place(pbrpc__method *v, size_t cap, const pbrpc__method *e)
{
	size_t j = e->hash & (cap - 1);
	while (v[j].name)
		j = (j + 1) & (cap - 1);
	v[j] = *e;
}

/* Room for `more` methods (load factor at most 1/2). */
static int methods_reserve(pbrpc__registry *r, size_t more)
{
	size_t cap = r->methods_cap ? r->methods_cap : 32;
	while ((r->n_methods + more) * 2 > cap)
		cap *= 2;
	if (cap == r->methods_cap)
		return 0;
	pbrpc__method *v = calloc(cap, sizeof(*v));
	if (!v)
		return -ENOMEM;
	for (size_t i = 0; i < r->methods_cap; i++)
		if (r->methods[i].name)
			place(v, cap, &r->methods[i]);
	free(r->methods);
	r->methods = v;
	r->methods_cap = cap;
	return 0;
}

const char *pbrpc__registry_stream_method(const pbrpc__registry *r, const ProtobufCServiceDescriptor *d, int *flags)
{
	const pbrpc_schema_service *ss = pbrpc_schema_find_service(d->name, NULL);
	char name[PBRPC_METHOD_MAX + 1];
	for (unsigned i = 0; ss && i < d->n_methods; i++) {
		int fl = pbrpc_schema_method_flags(ss, d->methods[i].name);
		int len = snprintf(name, sizeof(name), "%s/%s", d->name, d->methods[i].name);
		const pbrpc__method *m = len > 0 && (size_t)len < sizeof(name) ? pbrpc__registry_find(r, name, (size_t)len) : NULL;
		if (fl > 0 && !(m && m->stream)) {
			if (flags)
				*flags = fl;
			return d->methods[i].name;
		}
	}
	return NULL;
}

int pbrpc__registry_add_stream(pbrpc__registry *r, const char *name, uint8_t kind, void *stream)
{
	size_t len = strlen(name);
	if (!pbrpc_method_valid(name, len)) {
		free(stream);
		return PBRPC_EINVALID;
	}
	pbrpc__method *m = (pbrpc__method *)pbrpc__registry_find(r, name, len);
	if (m && m->stream) {
		free(stream);
		return PBRPC_EDUPLICATE;
	}
	if (!m) {
		pbrpc__method e = { .name = strdup(name), .len = len, .service = PBRPC__NO_SERVICE };
		e.hash = hash_name(name, len);
		if (r->counting)
			e.stats = calloc(1, sizeof(*e.stats));
		if (!e.name || (r->counting && !e.stats) || methods_reserve(r, 1) < 0) {
			free(e.name);
			free(e.stats);
			free(stream);
			return -ENOMEM;
		}
		place(r->methods, r->methods_cap, &e);
		r->n_methods++;
		m = (pbrpc__method *)pbrpc__registry_find(r, name, len);
	}
	m->kind = kind;
	m->stream = stream;
	m->missing = false;
	return 0;
}

static int add(pbrpc__registry *r, ProtobufCService *service, bool owned)
{
	if (!service || !service->descriptor || !service->invoke || !service->descriptor->name)
		return PBRPC_EINVALID;
	const ProtobufCServiceDescriptor *d = service->descriptor;
	if (pbrpc__registry_find_service(r, d->name))
		return PBRPC_EDUPLICATE;
	/* Its .proto declares stream methods (pbrpc-gen said so) that no
	 * stream handler serves yet: protoc-c's unary slots cannot. */
	if (pbrpc__registry_stream_method(r, d, NULL))
		return PBRPC_EINVALID;
	/* Validate and allocate everything first so that a failure leaves no
	 * trace. */
	char name[PBRPC_METHOD_MAX + 1];
	for (unsigned i = 0; i < d->n_methods; i++) {
		int len = snprintf(name, sizeof(name), "%s/%s", d->name, d->methods[i].name);
		if (len < 0 || (size_t)len >= sizeof(name) || !pbrpc_method_valid(name, (size_t)len))
			return PBRPC_EINVALID;
		for (unsigned j = 0; j < i; j++)
			if (strcmp(d->methods[i].name, d->methods[j].name) == 0)
				return PBRPC_EDUPLICATE;
	}
	pbrpc__service_entry *v = realloc(r->services, (r->n_services + 1) * sizeof(*v));
	if (!v)
		return -ENOMEM;
	r->services = v;
	if (methods_reserve(r, d->n_methods) < 0)
		return -ENOMEM;
	pbrpc__method *fresh = calloc(d->n_methods ? d->n_methods : 1, sizeof(*fresh));
	if (!fresh)
		return -ENOMEM;
	/* protobuf-c's generated services keep their handlers right after the
	 * base, and its invoke calls them unchecked: note the empty slots. */
	typedef void (*handler_fn)(void);
	const handler_fn *handlers =
		service->invoke == protobuf_c_service_invoke_internal ? (const handler_fn *)(void *)(service + 1) : NULL;
	for (unsigned i = 0; i < d->n_methods; i++) {
		int len = snprintf(name, sizeof(name), "%s/%s", d->name, d->methods[i].name);
		fresh[i] = (pbrpc__method){ .name = strdup(name), .len = (size_t)len, .service = r->n_services, .index = i };
		fresh[i].hash = hash_name(name, fresh[i].len);
		fresh[i].missing = handlers && !handlers[i];
		if (r->counting)
			fresh[i].stats = calloc(1, sizeof(*fresh[i].stats));
		if (!fresh[i].name || (r->counting && !fresh[i].stats)) {
			free(fresh[i].name);
			free(fresh[i].stats);
			for (unsigned j = 0; j < i; j++) {
				free(fresh[j].name);
				free(fresh[j].stats);
			}
			free(fresh);
			return -ENOMEM;
		}
	}
	for (unsigned i = 0; i < d->n_methods; i++) {
		/* A stream method registered before its service: the service's
		 * entry takes it over. */
		pbrpc__method *old = (pbrpc__method *)pbrpc__registry_find(r, fresh[i].name, fresh[i].len);
		if (old && old->service == PBRPC__NO_SERVICE) {
			old->service = fresh[i].service;
			old->index = i;
			free(fresh[i].name);
			free(fresh[i].stats);
			r->n_methods--;
			continue;
		}
		place(r->methods, r->methods_cap, &fresh[i]);
	}
	r->n_methods += d->n_methods;
	free(fresh);
	r->services[r->n_services++] = (pbrpc__service_entry){ service, owned, true, NULL };
	return 0;
}

int pbrpc__registry_add(pbrpc__registry *r, ProtobufCService *service, bool owned)
{
	int rc = add(r, service, owned);
	if (rc < 0 && owned && service)
		protobuf_c_service_destroy(service);
	return rc;
}

bool pbrpc__registry_service_known(const pbrpc__registry *r, const char *name, size_t len)
{
	for (size_t i = 0; i < r->n_services; i++) {
		const char *s = r->services[i].service->descriptor->name;
		if (strlen(s) == len && memcmp(s, name, len) == 0)
			return true;
	}
	return false;
}

static const pbrpc__service_entry *entry(const pbrpc__registry *r, const char *name)
{
	for (size_t i = 0; i < r->n_services; i++)
		if (strcmp(r->services[i].service->descriptor->name, name) == 0)
			return &r->services[i];
	return NULL;
}

const ProtobufCService *pbrpc__registry_find_service(const pbrpc__registry *r, const char *name)
{
	const pbrpc__service_entry *e = entry(r, name);
	return e ? e->service : NULL;
}

int pbrpc__registry_serving(const pbrpc__registry *r, const char *name)
{
	if (!name || !*name)
		return r->serving && !__atomic_load_n(&r->shutting_down, __ATOMIC_RELAXED);
	const pbrpc__service_entry *e = entry(r, name);
	return e ? e->serving && !__atomic_load_n(&r->shutting_down, __ATOMIC_RELAXED) : -1;
}

int pbrpc__registry_set_serving(pbrpc__registry *r, const char *name, bool serving)
{
	if (!name || !*name) {
		r->serving = serving;
		return 0;
	}
	pbrpc__service_entry *e = (pbrpc__service_entry *)entry(r, name);
	if (!e)
		return PBRPC_EINVALID;
	e->serving = serving;
	return 0;
}

int pbrpc__registry_enable_stats(pbrpc__registry *r)
{
	if (r->counting)
		return 0;
	if (!r->unknown && !(r->unknown = calloc(1, sizeof(*r->unknown))))
		return -ENOMEM;
	for (size_t i = 0; i < r->methods_cap; i++) {
		if (r->methods[i].name && !r->methods[i].stats &&
		    !(r->methods[i].stats = calloc(1, sizeof(*r->methods[i].stats))))
			return -ENOMEM; /* the ones allocated go with the registry */
	}
	r->counting = true;
	r->observe = true;
	return 0;
}

static const int64_t stats_bounds[PBRPC__STATS_N_BOUNDS] = { PBRPC__STATS_BOUNDS };

void pbrpc__registry_observe(pbrpc__registry *r, const pbrpc__method *m, const pbrpc_call_info *info,
			     bool started)
{
	pbrpc__method_stats *st = m ? m->stats : r->unknown;
	if (st && r->counting) {
		int status = info->status >= 0 && info->status < PBRPC_STATUS_COUNT ? info->status : PBRPC_STATUS_UNKNOWN;
		__atomic_fetch_add(&st->calls[status], 1, __ATOMIC_RELAXED);
		size_t b = 0;
		while (b < PBRPC__STATS_N_BOUNDS && info->duration_ns > stats_bounds[b])
			b++;
		__atomic_fetch_add(&st->buckets[b], 1, __ATOMIC_RELAXED);
		__atomic_fetch_add(&st->duration_ns, info->duration_ns > 0 ? (uint64_t)info->duration_ns : 0,
				   __ATOMIC_RELAXED);
		__atomic_fetch_add(&st->bytes_in, info->bytes_in, __ATOMIC_RELAXED);
		__atomic_fetch_add(&st->bytes_out, info->bytes_out, __ATOMIC_RELAXED);
		if (started && __atomic_load_n(&st->in_flight, __ATOMIC_RELAXED))
			__atomic_fetch_sub(&st->in_flight, 1, __ATOMIC_RELAXED);
	}
	if (r->call_log)
		r->call_log(r->call_log_user, info);
}
