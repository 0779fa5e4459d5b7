/* The gRPC C++ server-streaming peer's C interface (grpc_stream.cc). */
#ifndef PBRPC_BENCH_GRPC_STREAM_H
#define PBRPC_BENCH_GRPC_STREAM_H

#ifdef __cplusplus
extern "C" {
#endif

/* Reads one Count(n) stream to its end on a fresh channel to target
 * ("unix-abstract:NAME"); returns the messages read or -1. */
long bench_grpc_stream_count(const char *target, unsigned n);
/* Serves BenchStream on addr until killed; on_ready() once it listens. */
void bench_grpc_stream_serve(const char *addr, void (*on_ready)(void));

#ifdef __cplusplus
}
#endif
#endif
