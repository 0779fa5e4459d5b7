/* The gRPC C++ peer's C interface (grpc.cc), used by grpc_sys.c. bench.h is
 * C only (_Atomic), so this header carries what both languages share. */
#ifndef PBRPC_BENCH_GRPC_PEER_H
#define PBRPC_BENCH_GRPC_PEER_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Client on target ("unix-abstract:NAME", "ipv4:127.0.0.1:PORT"): one channel
 * of its own (a local subchannel pool, so one TCP or Unix connection each),
 * connected before it returns. NULL on failure (said on stderr). */
void *bench_grpc_open(const char *target);
/* One call on the sync stub; 0 or -1. */
int bench_grpc_call(void *conn, size_t size);
/* n calls started on the async stub, then n completions taken from one
 * completion queue; 0 or -1. */
int bench_grpc_batch(void *conn, size_t size, int n);
void bench_grpc_close(void *conn);

/* Sync server on addr ("unix-abstract:NAME", "127.0.0.1:PORT"); calls
 * on_ready once it listens, then serves until killed. tick() runs on every
 * request (bench_server_tick). */
void bench_grpc_serve(const char *addr, void (*on_ready)(void), void (*tick)(void));

/* The request payload (bench_payload), set by grpc_sys.c before any call. */
extern const unsigned char *bench_grpc_payload;

#ifdef __cplusplus
}
#endif

#endif
