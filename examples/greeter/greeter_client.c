/* greeter_client ENDPOINT NAME...: greets each NAME, first synchronously, then
 * all at once with asynchronous calls on one connection. */
#include <pbrpc/pbrpc.h>
#include <stdio.h>
#include <string.h>

#include "greeter.pb-c.h"

static int failures;

static void on_reply(const Hello__HelloReply *reply, void *ctx)
{
	const char *name = ctx;
	if (!reply) {
		const char *msg;
		int status = pbrpc_client_status(&msg);
		fprintf(stderr, "greeting %s failed: %s: %s\n", name, pbrpc_status_name(status), msg);
		failures++;
		return;
	}
	printf("%s (greeted %u times)\n", reply->message, reply->times_greeted);
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: greeter_client ENDPOINT NAME...\n");
		return 2;
	}
	pbrpc_client *c;
	int rc = pbrpc_client_connect(&c, argv[1], NULL);
	if (rc < 0) {
		fprintf(stderr, "greeter_client: cannot connect to %s: %s\n", argv[1], pbrpc_strerror(rc));
		return 1;
	}

	/* Synchronous: the stub returns after on_reply has run. */
	ProtobufCService *greeter = pbrpc_client_service(c, &hello__greeter__descriptor);
	for (int i = 2; i < argc; i++) {
		Hello__HelloRequest req = HELLO__HELLO_REQUEST__INIT;
		req.name = argv[i];
		hello__greeter__say_hello(greeter, &req, on_reply, argv[i]);
	}

	/* Asynchronous: every call in flight at once; replies run on_reply from
	 * pbrpc_client_drain() (or pbrpc_client_process() in your own poll loop). */
	ProtobufCService *async = pbrpc_client_service_async(c, &hello__greeter__descriptor);
	for (int i = 2; i < argc; i++) {
		Hello__HelloRequest req = HELLO__HELLO_REQUEST__INIT;
		req.name = argv[i];
		hello__greeter__say_hello(async, &req, on_reply, argv[i]);
	}
	rc = pbrpc_client_drain(c, 5000);
	pbrpc_client_free(c);
	if (rc < 0) {
		fprintf(stderr, "greeter_client: %s\n", pbrpc_strerror(rc));
		return 1;
	}
	return failures ? 1 : 0;
}
