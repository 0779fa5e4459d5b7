/* pbrpc: the types and checks shared by servers, clients and tools.
 *
 * Metadata entries (sent with a call), what a peer announced in its HELLO,
 * the protocol's size limits, and the validation of method names and metadata
 * keys, so that a tool can check user input before it calls. */
#ifndef PBRPC_COMMON_H
#define PBRPC_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pbrpc/error.h"
#include "pbrpc/version.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PBRPC_METHOD_MAX 1024         /* longest method name, bytes */
#define PBRPC_METADATA_KEY_MAX 255    /* longest metadata key */
#define PBRPC_METADATA_VALUE_MAX 65535 /* longest metadata value */
#define PBRPC_STATUS_MESSAGE_MAX 4096 /* longest status message sent (longer is cut) */
#define PBRPC_MAX_FRAME_DEFAULT (16u * 1024u * 1024u) /* default largest payload */
#define PBRPC_MAX_FRAME_LIMIT 0x7fffffffu             /* largest a peer may announce */
#define PBRPC_MAX_FRAME_MIN 64u /* smallest a peer may announce: a status with a short message fits */
#define PBRPC_FDS_MAX 253u      /* most fds one message may carry (the kernel's SCM_MAX_FD) */
/* Default size above which, over Unix sockets, a message body travels in a
 * sealed memfd instead of through the socket: never, because no crossover
 * was measured up to 16 MiB (docs/BENCHMARKS.md, "Bodies in sealed
 * memfds"): a fresh memfd's pages cost more to allocate, seal, map and free
 * than the socket's copies. Receiving memfd bodies is always supported. */
#define PBRPC_MEMFD_THRESHOLD_DEFAULT SIZE_MAX

/* One metadata entry: a key (1 to 255 bytes of lowercase ASCII letters,
 * digits, '-', '_', '.') and an opaque value. */
typedef struct pbrpc_metadata {
	const char *key;
	size_t key_len; /* 0: strlen(key) */
	const void *value;
	size_t value_len;
} pbrpc_metadata;

/* What a peer announced in its HELLO (docs/PROTOCOL.md section 3). */
typedef struct pbrpc_hello {
	uint32_t version;
	uint32_t max_frame; /* largest payload it accepts */
	uint32_t max_calls; /* server: calls in flight it accepts per connection */
	uint64_t features;
	char agent[64];     /* NUL-terminated, cut if longer */
	uint32_t stream_window; /* streams: per-stream receive window, bytes (0: default) */
} pbrpc_hello;

/* TLS for tls:HOST:PORT endpoints (docs/PROTOCOL.md, "TLS"): TLS 1.3 with
 * ALPN "pbrpc/1" both ways. Files are PEM; the library reads them when the
 * server or client is created (they may change on disk afterwards). */
typedef enum pbrpc_tls_verify {
	PBRPC_TLS_VERIFY_DEFAULT = 0, /* server: REQUIRE when ca is set, else NONE */
	PBRPC_TLS_VERIFY_NONE,        /* server: ask for no client certificate */
	PBRPC_TLS_VERIFY_REQUEST,     /* server: ask; verify one that is sent; accept none */
	PBRPC_TLS_VERIFY_REQUIRE,     /* server: refuse a client without a valid one */
} pbrpc_tls_verify;

typedef struct pbrpc_tls_opts {
	const char *cert;        /* our certificate chain: required by a server with
	                          * tls: listeners; a client's for mutual TLS */
	const char *key;         /* its private key; NULL: in cert's file */
	const char *ca;          /* CA certificates to verify the peer with (a file,
	                          * or a directory of hashed names). Client: NULL is
	                          * the system store. Server: NULL asks for no client
	                          * certificate */
	const char *server_name; /* client: the name sent as SNI and matched against
	                          * the server's certificate; NULL: the endpoint's
	                          * host (an IP address is matched against IP SANs) */
	pbrpc_tls_verify verify; /* server only */
	int min_version;         /* 0 or 13: TLS 1.3; 12: also TLS 1.2 */
} pbrpc_tls_opts;

/* True when name[0..len) is a valid method name: "pkg.Service/Method", one
 * '/', non-empty parts of [A-Za-z0-9_.], at most PBRPC_METHOD_MAX bytes. */
PBRPC_EXPORT bool pbrpc_method_valid(const char *name, size_t len);

/* True when key[0..len) is a valid metadata key. */
PBRPC_EXPORT bool pbrpc_metadata_key_valid(const char *key, size_t len);

/* The library's version, "MAJOR.MINOR.PATCH" (PBRPC_VERSION is the version
 * of the headers compiled against). */
PBRPC_EXPORT const char *pbrpc_version(void);

#ifdef __cplusplus
}
#endif
#endif
