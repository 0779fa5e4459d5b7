/* Peer G: gRPC C++ (Debian's libgrpc++-dev 1.51), wrapped as a bench_system.
 * What it does per call is described in grpc.cc; this file only turns the
 * bench's endpoints into gRPC addresses and runs the server in a fresh
 * process image (exec_server): gRPC's process-wide state and threads do not
 * survive fork. */
#include <netinet/in.h>
#include <stdio.h>

#include "bench.h"
#include "grpc_peer.h"

/* client != 0: a channel target; else a server address. */
static void grpc_addr(const bench_target *t, bool client, char *buf, size_t n)
{
	if (t->tcp) {
		const struct sockaddr_in *sin = (const struct sockaddr_in *)&t->ep.addr;
		snprintf(buf, n, "%s127.0.0.1:%u", client ? "ipv4:" : "", (unsigned)ntohs(sin->sin_port));
	} else if (t->ep.kind == PBRPC_ENDPOINT_ABSTRACT) {
		snprintf(buf, n, "unix-abstract:%s", t->ep.path);
	} else {
		snprintf(buf, n, "unix:%s", t->ep.path);
	}
}

static void on_ready(void)
{
	atomic_store(&bench_shared->ready, 1);
}

static void serve(int lfd, const bench_target *t)
{
	(void)lfd;
	char addr[256];
	grpc_addr(t, false, addr, sizeof(addr));
	bench_grpc_serve(addr, on_ready, bench_server_tick);
	bench_die("gRPC server on %s stopped", addr);
}

static void *open_conn(const bench_target *t)
{
	bench_wait_ready();
	char target[256];
	grpc_addr(t, true, target, sizeof(target));
	bench_grpc_payload = bench_payload;
	/* gRPC connects from its own threads: leave the hook on. */
	bench_hook_sockets = true;
	return bench_grpc_open(target);
}

const bench_system bench_grpc = {
	.key = "grpc",
	.name = "G gRPC",
	.serve = serve,
	.open = open_conn,
	.call = bench_grpc_call,
	.batch = bench_grpc_batch,
	.close = bench_grpc_close,
	.exec_server = true,
};
