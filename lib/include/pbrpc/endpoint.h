/* pbrpc endpoints: "unix:/path", "unix:@abstract", "tcp:HOST:PORT", "tcp:[V6]:PORT",
 * and "tls:HOST:PORT", "tls:[V6]:PORT": TCP with TLS (kind TCP, tls set).
 *
 * Parses endpoint strings and turns them into listening or connected sockets.
 * All sockets are created SOCK_CLOEXEC; TCP sockets get TCP_NODELAY.
 */
#ifndef PBRPC_ENDPOINT_H
#define PBRPC_ENDPOINT_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "pbrpc/error.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PBRPC_ENDPOINT_STRLEN 128

typedef enum pbrpc_endpoint_kind {
	PBRPC_ENDPOINT_UNIX = 1, /* filesystem path */
	PBRPC_ENDPOINT_ABSTRACT, /* Linux abstract namespace */
	PBRPC_ENDPOINT_TCP,
} pbrpc_endpoint_kind;

typedef struct pbrpc_endpoint {
	pbrpc_endpoint_kind kind;
	struct sockaddr_storage addr; /* resolved address */
	socklen_t addrlen;
	char path[108]; /* UNIX: the path; ABSTRACT: the name (no leading '@') */
	bool tls;       /* "tls:": TCP with TLS */
	char host[256]; /* TCP: the host as written (a name, or an address without
	                 * brackets), for TLS's SNI and certificate check */
} pbrpc_endpoint;

/* Parses an endpoint string. TCP host names are resolved (first address).
 * Returns 0; PBRPC_EADDRESS for a malformed string; -ENAMETOOLONG for a Unix
 * path or name that does not fit sockaddr_un; -EADDRNOTAVAIL if a host name does
 * not resolve. */
PBRPC_EXPORT int pbrpc_endpoint_parse(const char *str, pbrpc_endpoint *out);

/* Formats an endpoint back to its string form ("tcp:[::1]:7000"). */
PBRPC_EXPORT void pbrpc_endpoint_format(const pbrpc_endpoint *ep, char *buf, size_t len);

typedef struct pbrpc_listen_opts {
	int backlog;        /* 0 = SOMAXCONN */
	unsigned mode;      /* UNIX: chmod() applied to the socket file; 0 = leave as umask made it */
	bool nonblock;      /* make the socket non-blocking */
} pbrpc_listen_opts;

/* Creates a listening socket. For a Unix path, a stale socket file left by a
 * dead server is replaced; a live one (something accepts connections on it)
 * gives -EADDRINUSE, and a non-socket file at the path gives -EEXIST. After
 * binding, *ep is updated to the real address (port 0 becomes the chosen port).
 * Returns the fd (>= 0) or a negative code (-EACCES, -ENOSPC, -EADDRINUSE, ...). */
PBRPC_EXPORT int pbrpc_endpoint_listen(pbrpc_endpoint *ep, const pbrpc_listen_opts *opts);

/* Connects (blocking, up to timeout_ms; < 0 waits as long as the kernel does).
 * Returns a connected, blocking fd or a negative code (-ECONNREFUSED, -ENOENT,
 * -ETIMEDOUT, ...). */
PBRPC_EXPORT int pbrpc_endpoint_connect(const pbrpc_endpoint *ep, int timeout_ms);

/* Fills *out with the endpoint a listening fd is bound to (for sockets handed
 * over by systemd). Returns 0 or a negative code. */
PBRPC_EXPORT int pbrpc_endpoint_from_fd(int fd, pbrpc_endpoint *out);

#ifdef __cplusplus
}
#endif
#endif
