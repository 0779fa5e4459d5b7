/* The example services hosted by pbrpc-server and used by tests and
 * benchmarks: demo.Kv (proto/demo/kv.proto) and demo.Echo
 * (proto/demo/echo.proto).
 *
 * Each constructor returns a generated *_Service struct ready for
 * pbrpc_server_add_service(srv, &svc->base). The server borrows it, so free
 * the service after the server has stopped running and before
 * pbrpc_server_free() (demo_echo_free may still answer calls). Calling
 * protobuf_c_service_destroy() on the base is the same as the *_free function.
 */
#ifndef PBRPC_DEMO_SERVICES_H
#define PBRPC_DEMO_SERVICES_H

#include "echo.pb-c.h"
#include "kv.pb-c.h"
#include "pbrpc/server.h"

/* An in-memory key-value store, keys kept in byte order.
 *   Put    stores a value; an empty key fails with INVALID_ARGUMENT.
 *   Get    a missing key fails with NOT_FOUND ("no key \"x\"").
 *   Delete reports whether the key existed.
 *   List   keys starting with `prefix`, in byte order, at most `limit` (0: all).
 *   Watch  (server stream) every Put, Delete and Upload entry under `prefix`
 *          made on the server's loop thread, as it happens.
 *   Upload (client stream) stores each entry; the reply counts them.
 *   Lookup (bidirectional) an Entry for each key sent, in order.
 * Unary methods are safe from several threads (the server's workers). Returns
 * NULL when out of memory. Register it with demo_kv_add(): its stream methods
 * (kv.pbrpc.h, from pbrpc-gen) then the service; pbrpc_server_add_service()
 * alone refuses it. */
Demo__Kv_Service *demo_kv_new(void);
int demo_kv_add(pbrpc_server *srv, Demo__Kv_Service *svc);
void demo_kv_free(Demo__Kv_Service *svc);

/* Answers with the request's payload. fail_status != 0 fails the call with that
 * status and fail_message instead (a value above 16 gives INVALID_ARGUMENT).
 * delay_ms > 0 answers after that many milliseconds, from a timer thread the
 * service owns; the handler returns at once, so the loop is never blocked.
 * Returns NULL when out of memory or the thread cannot be started. */
Demo__Echo_Service *demo_echo_new(void);

/* Stops the timer thread and answers every call still waiting with CANCELLED,
 * from the calling thread: call it from the thread that drove the server's
 * loop, once pbrpc_server_run() has returned, and before pbrpc_server_free().
 * NULL is a no-op. */
void demo_echo_free(Demo__Echo_Service *svc);

#endif
