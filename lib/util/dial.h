/* Dialling an endpoint by name: a TCP host name is resolved at every dial
 * (so a reconnect follows DNS) and each address it resolves to is tried in
 * order until one connects. Not public API: the client and the tests use it.
 * Implemented in endpoint.c. */
#ifndef PBRPC_UTIL_DIAL_H
#define PBRPC_UTIL_DIAL_H

#include <netdb.h>

#include "pbrpc/endpoint.h"

/* getaddrinfo(3)'s signature; its results are freed with freeaddrinfo(). */
typedef int (*pbrpc__resolve_fn)(const char *host, const char *service, const struct addrinfo *hints,
				 struct addrinfo **res);

/* Replaces getaddrinfo for dials (tests); NULL restores it. Process-wide. */
void pbrpc__dial_set_resolver(pbrpc__resolve_fn fn);

/* Connects to the endpoint `str` ("tcp:HOST:PORT", or any "SCHEME:HOST:PORT"
 * whose SCHEME is a TCP transport; others use *ep as parsed). A host name is
 * resolved now; its addresses are tried in order, each within what is left
 * of timeout_ms divided by the addresses left to try (a refused one costs
 * nothing, an unreachable one its share). On success *ep holds the address
 * that answered. Returns a connected, blocking fd, or the last address's
 * error (-ECONNREFUSED, -ETIMEDOUT, ...), -EADDRNOTAVAIL if the name no
 * longer resolves. */
int pbrpc__endpoint_dial(pbrpc_endpoint *ep, const char *str, int timeout_ms);

#endif
