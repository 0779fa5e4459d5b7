/* A minimal blocking pbrpc client for the service and daemon tests, written
 * with the frame and wire layers only, so that those tests depend on neither
 * lib/client.c nor the server under test being well-behaved.
 *
 * Functions return 0 or a negative pbrpc code; none of them aborts. */
#ifndef PBRPC_TEST_RPCPEER_H
#define PBRPC_TEST_RPCPEER_H

#include <protobuf-c/protobuf-c.h>
#include <stdint.h>

#include "proto/frame.h"
#include "proto/wire.h"

typedef struct rp_conn {
	int fd;
	uint32_t next_id;
	pbrpc__frame_decoder dec;
	pbrpc_hello hello; /* the server's */
} rp_conn;

typedef struct rp_result {
	uint32_t id;
	int status;
	char message[512];
} rp_result;

/* Connects to `endpoint` and exchanges prefaces and HELLOs (5 s limit). */
int rp_open(rp_conn *c, const char *endpoint);
void rp_close(rp_conn *c);

/* Sends one REQUEST and returns its call id (> 0) or a negative code. */
int64_t rp_send(rp_conn *c, const char *method, const ProtobufCMessage *req);

/* Waits up to timeout_ms for the next RESPONSE. With status OK and reply_desc
 * set, unpacks the body into *reply (protobuf_c_message_free_unpacked(.., NULL)).
 * Returns 0, PBRPC_EGOAWAY, PBRPC_EOF, -ETIMEDOUT, ... */
int rp_recv(rp_conn *c, int timeout_ms, const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **reply,
	    rp_result *res);

/* rp_send then rp_recv (10 s); the response must carry the sent id. */
int rp_call(rp_conn *c, const char *method, const ProtobufCMessage *req, const ProtobufCMessageDescriptor *reply_desc,
	    ProtobufCMessage **reply, rp_result *res);

#endif
