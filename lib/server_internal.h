/* What the built-in services (health.c, reflection.c) may see of the server.
 * Not installed. All functions run on the server's loop thread. */
#ifndef PBRPC_SERVER_INTERNAL_H
#define PBRPC_SERVER_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>

#include "pbrpc/server.h"

/* Registered services, in registration order (built-in ones included). */
size_t pbrpc__server_service_count(const pbrpc_server *srv);
const ProtobufCService *pbrpc__server_service_at(const pbrpc_server *srv, size_t i);

/* The registered service with this full name ("demo.Kv"), or NULL. */
const ProtobufCService *pbrpc__server_find_service(const pbrpc_server *srv, const char *name);

/* Serving state kept for pbrpc.Health: 1 SERVING, 0 NOT_SERVING, -1 unknown
 * name. "" is the server as a whole (NOT_SERVING once shutting down). */
int pbrpc__server_serving(const pbrpc_server *srv, const char *name);

/* Built-in services, implemented in health.c and reflection.c. Each returns a
 * heap-allocated service whose handlers reach `srv`; free with
 * protobuf_c_service_destroy() (the server does this in pbrpc_server_free). */
ProtobufCService *pbrpc__health_service_new(pbrpc_server *srv);
ProtobufCService *pbrpc__reflection_service_new(pbrpc_server *srv);

#endif
