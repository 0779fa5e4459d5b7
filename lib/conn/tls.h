/* TLS under a connection (OpenSSL 3): the contexts a server or client makes
 * from pbrpc_tls_opts, one TLS session per connection, and what the peer's
 * certificate says. docs/PROTOCOL.md, "TLS", is what goes on the wire.
 *
 * A session is a transport below the frame layer: conn.c calls the
 * pbrpc__conn_tls_* functions (conn.h) instead of the socket when c->tls is
 * set, and plaintext connections pay one branch on that pointer. The bytes
 * reach the socket through a BIO of our own that calls the I/O shim
 * (util/io.h), so tests cut TLS records as they cut plaintext.
 *
 * The session handshakes first (the pbrpc preface waits in the writer until
 * it is done), then reads and writes records without blocking; WANT_READ and
 * WANT_WRITE become the connection's poll events (pbrpc__conn_events).
 * OpenSSL may hold decrypted bytes no poll reports: pbrpc__conn_buffered()
 * says so, and the roles read again without waiting.
 *
 * Threads: a client's reader reads while other threads write, so a client
 * session takes its own mutex around every OpenSSL call (`locked`); no call
 * blocks while holding it. A server's session is used by the loop only.
 */
#ifndef PBRPC_CONN_TLS_H
#define PBRPC_CONN_TLS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "pbrpc/common.h"
#include "pbrpc/server.h"

#define PBRPC__TLS_ALPN "pbrpc/1"

typedef struct pbrpc__tls_ctx pbrpc__tls_ctx;
typedef struct pbrpc__tls pbrpc__tls;

/* What a peer's certificate says, shared by the connection and its calls
 * (a call may outlive its connection): refcounted, immutable once made. */
typedef struct pbrpc__tls_peer {
	atomic_int refs;
	pbrpc_tls_peer pub; /* its strings live in the same allocation */
} pbrpc__tls_peer;

/* Loads o's files into a context for one role. Returns 0, or PBRPC_ETLS
 * with why[] saying which file and what was wrong, or -ENOMEM. */
int pbrpc__tls_ctx_new(pbrpc__tls_ctx **out, bool server, const pbrpc_tls_opts *o, char *why, size_t len);
void pbrpc__tls_ctx_free(pbrpc__tls_ctx *x);

/* A session on fd (borrowed: the connection closes it). host: a client's
 * name to verify and send as SNI (an IP address is matched against IP SANs
 * and not sent); NULL on a server. locked: take the session's mutex (a
 * client). Returns 0 or -ENOMEM. */
int pbrpc__tls_new(pbrpc__tls **out, pbrpc__tls_ctx *x, int fd, const char *host, bool locked);
void pbrpc__tls_free(pbrpc__tls *t);

/* The session's handshake has completed. */
bool pbrpc__tls_established(const pbrpc__tls *t);

/* Why the last call failed ("server certificate rejected: ..."). */
const char *pbrpc__tls_why(const pbrpc__tls *t);

/* The session still carries records: a GOAWAY may be sent through it. */
bool pbrpc__tls_usable(const pbrpc__tls *t);

/* Sends close_notify once, best effort (a graceful close). */
void pbrpc__tls_close(pbrpc__tls *t);

/* The peer's certificate (server: the client's), one more reference; NULL
 * before the handshake. pbrpc__tls_peer_unref drops one (NULL: no-op). */
pbrpc__tls_peer *pbrpc__tls_peer_ref(pbrpc__tls *t);
void pbrpc__tls_peer_unref(pbrpc__tls_peer *p);

#endif
