/* pbrpc error codes and RPC status codes.
 *
 * Every pbrpc function that can fail returns 0 (or a byte count where one is
 * natural) on success and a negative code on failure. Codes in errno's range are
 * negated errno values (-ENOMEM, -ECONNREFUSED, ...); pbrpc's own codes sit far
 * outside it (below -4000). pbrpc_strerror() names both kinds.
 *
 * RPC status codes are a separate, positive space: the outcome of a call as the
 * peer reported it, numbered exactly as gRPC numbers them.
 */
#ifndef PBRPC_ERROR_H
#define PBRPC_ERROR_H

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define PBRPC_EXPORT __attribute__((visibility("default")))
#else
#define PBRPC_EXPORT
#endif

/* X(name, value, message): pbrpc's own error codes. */
#define PBRPC_ERROR_MAP(X)                                                            \
	X(EOF, -4001, "connection closed by peer")                                    \
	X(ETRUNCATED, -4002, "peer closed the connection in the middle of a frame")    \
	X(ETOOBIG, -4003, "frame larger than the configured maximum")                  \
	X(EPROTO, -4004, "protocol violation by peer")                                 \
	X(EBADMAGIC, -4005, "peer did not send the pbrpc preface (not a pbrpc peer?)") \
	X(EVERSION, -4006, "peer speaks an unsupported protocol version")              \
	X(EDECODE, -4007, "message could not be decoded")                              \
	X(EENCODE, -4008, "message could not be encoded")                              \
	X(EADDRESS, -4009, "invalid endpoint address")                                 \
	X(EDUPLICATE, -4010, "already registered")                                     \
	X(ECLOSED, -4011, "object is closed or shutting down")                         \
	X(ESTATUS, -4012, "call completed with a non-OK RPC status")                   \
	X(EQUEUEFULL, -4013, "output queue is full")                                   \
	X(EGOAWAY, -4014, "peer is shutting down the connection")                      \
	X(EINVALID, -4015, "invalid argument")                                        \
	X(ETLS, -4016, "TLS failed (handshake, certificate or record)")               \
	X(ENOTLS, -4017, "peer does not speak TLS")                                    \
	X(ETLSPEER, -4018, "peer speaks TLS on a plaintext endpoint")

enum pbrpc_error {
#define PBRPC__ERR_ENUM(name, value, msg) PBRPC_##name = (value),
	PBRPC_ERROR_MAP(PBRPC__ERR_ENUM)
#undef PBRPC__ERR_ENUM
};

/* Human-readable text for any code pbrpc returns: its own codes, negated errno
 * values and 0. Never NULL; the string is static. Thread-safe. */
PBRPC_EXPORT const char *pbrpc_strerror(int err);

/* The symbolic name of a code ("PBRPC_ETOOBIG", "ECONNREFUSED"), or "UNKNOWN". */
PBRPC_EXPORT const char *pbrpc_errname(int err);

/* X(name, value): RPC status codes, gRPC's numbering and names. */
#define PBRPC_STATUS_MAP(X)        \
	X(OK, 0)                   \
	X(CANCELLED, 1)            \
	X(UNKNOWN, 2)              \
	X(INVALID_ARGUMENT, 3)     \
	X(DEADLINE_EXCEEDED, 4)    \
	X(NOT_FOUND, 5)            \
	X(ALREADY_EXISTS, 6)       \
	X(PERMISSION_DENIED, 7)    \
	X(RESOURCE_EXHAUSTED, 8)   \
	X(FAILED_PRECONDITION, 9)  \
	X(ABORTED, 10)             \
	X(OUT_OF_RANGE, 11)        \
	X(UNIMPLEMENTED, 12)       \
	X(INTERNAL, 13)            \
	X(UNAVAILABLE, 14)         \
	X(DATA_LOSS, 15)           \
	X(UNAUTHENTICATED, 16)

typedef enum pbrpc_status {
#define PBRPC__STATUS_ENUM(name, value) PBRPC_STATUS_##name = (value),
	PBRPC_STATUS_MAP(PBRPC__STATUS_ENUM)
#undef PBRPC__STATUS_ENUM
} pbrpc_status;

#define PBRPC_STATUS_COUNT 17

/* "OK", "NOT_FOUND", ...; "UNKNOWN_STATUS" for a value outside 0..16. Static. */
PBRPC_EXPORT const char *pbrpc_status_name(int status);

/* Parses a status name (case-insensitive, "NOT_FOUND" or "not-found") or a
 * decimal number. Returns the status or PBRPC_EINVALID. */
PBRPC_EXPORT int pbrpc_status_from_name(const char *name);

#ifdef __cplusplus
}
#endif
#endif
