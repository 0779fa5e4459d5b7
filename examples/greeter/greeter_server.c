/* greeter_server ENDPOINT: hosts hello.Greeter until SIGINT or SIGTERM. */
#include <pbrpc/pbrpc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

#include "greeter.pb-c.h"

static unsigned times;

/* The generated signature: the reply goes to closure(), once. */
static void greeter_say_hello(Hello__Greeter_Service *service, const Hello__HelloRequest *req,
			      Hello__HelloReply_Closure closure, void *closure_data)
{
	(void)service;
	if (!req->name || !req->name[0]) {
		pbrpc_call_set_status(closure_data, PBRPC_STATUS_INVALID_ARGUMENT, "name must not be empty");
		closure(NULL, closure_data);
		return;
	}
	char text[256];
	snprintf(text, sizeof(text), "Hello, %s!", req->name);
	Hello__HelloReply reply = HELLO__HELLO_REPLY__INIT;
	reply.message = text;
	reply.times_greeted = ++times;
	closure(&reply, closure_data); /* packed here; the stack copy may go away after */
}

static Hello__Greeter_Service greeter = HELLO__GREETER__INIT(greeter_);
static pbrpc_server *srv;

static void on_signal(int sig)
{
	(void)sig;
	pbrpc_server_shutdown(srv, 2000); /* async-signal-safe */
}

int main(int argc, char **argv)
{
	const char *endpoint = argc > 1 ? argv[1] : "unix:/tmp/greeter.sock";
	int rc = pbrpc_server_new(&srv, NULL);
	if (rc < 0 || (rc = pbrpc_server_add_service(srv, &greeter.base)) < 0 ||
	    (rc = pbrpc_server_listen(srv, endpoint)) < 0) {
		fprintf(stderr, "greeter_server: %s: %s\n", endpoint, pbrpc_strerror(rc));
		return 1;
	}
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	printf("greeter listening on %s\n", endpoint);
	fflush(stdout);
	rc = pbrpc_server_run(srv);
	pbrpc_server_free(srv);
	return rc < 0 ? 1 : 0;
}
