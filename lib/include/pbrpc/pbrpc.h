/* pbrpc: RPC for protoc-c generated services over Unix and TCP stream sockets.
 * One include for everything; each header can also be used alone:
 *   error.h     error codes, RPC status codes
 *   common.h    metadata, the peer's HELLO, limits, name validation
 *   endpoint.h  "unix:/path", "unix:@name", "tcp:host:port" sockets
 *   server.h    hosting services
 *   client.h    calling them through generated stubs
 *   stream.h    streaming calls, both sides
 *   schema.h    what pbrpc-gen tells the library of a .proto file
 * The wire protocol itself is docs/PROTOCOL.md; its codecs are private.
 */
#ifndef PBRPC_H
#define PBRPC_H

#include "pbrpc/error.h"
#include "pbrpc/common.h"
#include "pbrpc/endpoint.h"
#include "pbrpc/server.h"
#include "pbrpc/client.h"
#include "pbrpc/stream.h"
#include "pbrpc/schema.h"

/* Kept for programs written against 0.1. */
#define PBRPC_VERSION_STRING PBRPC_VERSION

#endif
