/* pbrpc: RPC for protoc-c generated services over Unix and TCP stream sockets.
 * One include for everything; each layer's header can also be used alone:
 *   error.h     error codes, RPC status codes
 *   frame.h     length-prefixed frames, partial I/O
 *   wire.h      the wire protocol's frames (docs/PROTOCOL.md)
 *   endpoint.h  "unix:/path", "unix:@name", "tcp:host:port" sockets
 *   server.h    hosting services
 *   client.h    calling them through generated stubs
 */
#ifndef PBRPC_H
#define PBRPC_H

#include "pbrpc/error.h"
#include "pbrpc/frame.h"
#include "pbrpc/wire.h"
#include "pbrpc/endpoint.h"
#include "pbrpc/server.h"
#include "pbrpc/client.h"

#define PBRPC_VERSION_STRING "0.1.0"

#endif
