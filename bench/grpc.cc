// Peer G: gRPC C++ as its users write it, on the generated code of
// proto/demo/echo.proto (protoc --cpp_out, grpc_cpp_plugin).
//
//   client:  one channel per connection (insecure credentials, a local
//            subchannel pool so that each channel has a connection of its
//            own), waited for until connected. A sequential call is the sync
//            stub: a fresh ClientContext and demo::EchoRequest whose payload
//            is set from the bench's bytes, stub->Echo(), the reply's payload
//            size checked. Pipelining: n calls started with the async stub
//            (AsyncEcho + Finish on one CompletionQueue), then n completions
//            taken with cq.Next().
//   server:  the sync server (ServerBuilder, a demo::Echo::Service whose Echo
//            copies the request's payload into the reply), gRPC's default
//            thread pool and options.
//
// Protobuf work per call is protobuf C++'s instead of protobuf-c's: the
// request serialised and parsed, the reply serialised and parsed, the
// payload copied into and out of std::string on both sides, as every gRPC
// C++ program does. On top of that gRPC adds HTTP/2 framing, HPACK headers,
// a status trailer, and its completion-queue and thread hand-offs.
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>

#include "echo.grpc.pb.h"
#include "grpc_peer.h"

const unsigned char *bench_grpc_payload;

namespace {

struct Conn {
	std::shared_ptr<grpc::Channel> channel;
	std::unique_ptr<demo::Echo::Stub> stub;
	grpc::CompletionQueue cq;
};

struct Pending {
	grpc::ClientContext ctx;
	demo::EchoReply reply;
	grpc::Status status;
	std::unique_ptr<grpc::ClientAsyncResponseReader<demo::EchoReply>> rpc;
};

void set_request(demo::EchoRequest *req, size_t size)
{
	req->set_payload(reinterpret_cast<const char *>(bench_grpc_payload), size);
}

class EchoService final : public demo::Echo::Service {
public:
	explicit EchoService(void (*tick)(void)) : tick_(tick) {}

	grpc::Status Echo(grpc::ServerContext *, const demo::EchoRequest *req, demo::EchoReply *rep) override
	{
		tick_();
		rep->set_payload(req->payload());
		return grpc::Status::OK;
	}

private:
	void (*tick_)(void);
};

} // namespace

extern "C" void *bench_grpc_open(const char *target)
{
	auto c = std::make_unique<Conn>();
	grpc::ChannelArguments args;
	args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
	args.SetMaxReceiveMessageSize(-1);
	args.SetMaxSendMessageSize(-1);
	c->channel = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
	if (!c->channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10))) {
		std::fprintf(stderr, "pbrpc-bench: gRPC channel to %s did not connect\n", target);
		return nullptr;
	}
	c->stub = demo::Echo::NewStub(c->channel);
	return c.release();
}

extern "C" int bench_grpc_call(void *conn, size_t size)
{
	auto *c = static_cast<Conn *>(conn);
	grpc::ClientContext ctx;
	demo::EchoRequest req;
	set_request(&req, size);
	demo::EchoReply rep;
	grpc::Status st = c->stub->Echo(&ctx, req, &rep);
	return st.ok() && rep.payload().size() == size ? 0 : -1;
}

extern "C" int bench_grpc_batch(void *conn, size_t size, int n)
{
	auto *c = static_cast<Conn *>(conn);
	std::unique_ptr<Pending[]> p(new Pending[static_cast<size_t>(n)]);
	for (int i = 0; i < n; i++) {
		demo::EchoRequest req;
		set_request(&req, size);
		p[i].rpc = c->stub->AsyncEcho(&p[i].ctx, req, &c->cq);
		p[i].rpc->Finish(&p[i].reply, &p[i].status, reinterpret_cast<void *>(static_cast<intptr_t>(i)));
	}
	int rc = 0;
	for (int k = 0; k < n; k++) {
		void *tag;
		bool ok;
		if (!c->cq.Next(&tag, &ok))
			return -1; // the queue is never shut down while calls are pending
		const Pending &q = p[reinterpret_cast<intptr_t>(tag)];
		if (!ok || !q.status.ok() || q.reply.payload().size() != size)
			rc = -1;
	}
	return rc;
}

extern "C" void bench_grpc_close(void *conn)
{
	auto *c = static_cast<Conn *>(conn);
	if (!c)
		return;
	c->cq.Shutdown();
	void *tag;
	bool ok;
	while (c->cq.Next(&tag, &ok))
		;
	delete c;
}

extern "C" void bench_grpc_serve(const char *addr, void (*on_ready)(void), void (*tick)(void))
{
	EchoService service(tick);
	std::unique_ptr<grpc::Server> server;
	// The address was freed just before this process started.
	for (int i = 0; i < 1000 && !server; i++) {
		grpc::ServerBuilder b;
		b.AddListeningPort(addr, grpc::InsecureServerCredentials());
		b.SetMaxReceiveMessageSize(-1);
		b.SetMaxSendMessageSize(-1);
		b.RegisterService(&service);
		server = b.BuildAndStart();
		if (!server)
			std::this_thread::sleep_for(std::chrono::milliseconds(1));
	}
	if (!server) {
		std::fprintf(stderr, "pbrpc-bench: gRPC server cannot listen on %s\n", addr);
		return;
	}
	on_ready();
	server->Wait();
}
