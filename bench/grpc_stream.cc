// pbrpc-bench-stream's gRPC C++ peer: server streaming as its users write
// it. Server: the sync server, Count() writes n Chunks with writer->Write().
// Client: the sync stub, reader->Read() until the end, then Finish().
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>

#include "grpc_stream.h"
#include "stream.grpc.pb.h"

namespace {

class Service final : public benchstream::BenchStream::Service {
public:
	grpc::Status Count(grpc::ServerContext *, const benchstream::CountRequest *req,
			   grpc::ServerWriter<benchstream::Chunk> *w) override
	{
		benchstream::Chunk c;
		std::string p(30, 'x');
		for (uint32_t i = 0; i < req->n(); i++) {
			p[0] = static_cast<char>(i);
			c.set_payload(p);
			if (!w->Write(c))
				break;
		}
		return grpc::Status::OK;
	}
};

} // namespace

extern "C" long bench_grpc_stream_count(const char *target, unsigned n)
{
	grpc::ChannelArguments args;
	args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
	auto ch = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
	if (!ch->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10)))
		return -1;
	auto stub = benchstream::BenchStream::NewStub(ch);
	grpc::ClientContext ctx;
	benchstream::CountRequest req;
	req.set_n(n);
	auto reader = stub->Count(&ctx, req);
	benchstream::Chunk c;
	long got = 0;
	while (reader->Read(&c)) {
		if (c.payload().size() != 30)
			return -1;
		got++;
	}
	return reader->Finish().ok() ? got : -1;
}

extern "C" void bench_grpc_stream_serve(const char *addr, void (*on_ready)(void))
{
	Service service;
	grpc::ServerBuilder b;
	b.AddListeningPort(addr, grpc::InsecureServerCredentials());
	b.RegisterService(&service);
	std::unique_ptr<grpc::Server> server = b.BuildAndStart();
	if (!server) {
		std::fprintf(stderr, "pbrpc-bench-stream: gRPC server cannot listen on %s\n", addr);
		return;
	}
	on_ready();
	server->Wait();
}
