/* pbrpc.Health: reports the serving state the server keeps per service. */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>

#include "health.pb-c.h"
#include "server/registry.h"

typedef struct health_service {
	Pbrpc__Health_Service svc; /* handlers receive &svc */
	const pbrpc__registry *reg;
} health_service;

#define health_of(s) ((health_service *)((char *)(s) - offsetof(health_service, svc)))

static void health_check(Pbrpc__Health_Service *svc, const Pbrpc__HealthCheckRequest *req,
			 Pbrpc__HealthCheckResponse_Closure closure, void *closure_data)
{
	Pbrpc__HealthCheckResponse reply = PBRPC__HEALTH_CHECK_RESPONSE__INIT;
	int serving = pbrpc__registry_serving(health_of(svc)->reg, req->service);

	if (serving < 0) {
		pbrpc_call_set_status(closure_data, PBRPC_STATUS_NOT_FOUND, "unknown service %s", req->service);
		closure(NULL, closure_data);
		return;
	}
	reply.status = serving ? PBRPC__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
			       : PBRPC__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
	closure(&reply, closure_data);
}

static void health_destroy(Pbrpc__Health_Service *svc)
{
	free(health_of(svc));
}

PBRPC_EXPORT int pbrpc_server_enable_health(pbrpc_server *srv)
{
	health_service *h = calloc(1, sizeof(*h));
	if (!h)
		return -ENOMEM;
	pbrpc__health__init(&h->svc, health_destroy);
	h->svc.check = health_check;
	h->reg = pbrpc__server_registry(srv);
	return pbrpc__registry_add(pbrpc__server_registry(srv), &h->svc.base, true);
}
