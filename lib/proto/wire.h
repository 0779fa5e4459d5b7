/* pbrpc wire protocol: what the frames of a connection mean.
 *
 * docs/PROTOCOL.md is the normative description; this header encodes and
 * decodes those bytes. It knows protobuf-c (bodies are packed messages) and the
 * frame layer, and nothing of sockets: encoders append to a pbrpc__frame_writer,
 * decoders read a pbrpc__frame's payload and return views into it (no copies,
 * no allocation).
 */
#ifndef PBRPC_PROTO_WIRE_H
#define PBRPC_PROTO_WIRE_H

#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pbrpc/common.h"
#include "pbrpc/error.h"
#include "proto/frame.h"


/* Each side sends these 8 bytes first, then a HELLO frame. */
#define PBRPC_WIRE_PREFACE "\x89PBRPC\r\n"
#define PBRPC_WIRE_PREFACE_SIZE 8
#define PBRPC_WIRE_VERSION 1
#define PBRPC_WIRE_AGENT "pbrpc-c/" PBRPC_VERSION /* what our HELLO says */

enum pbrpc__frame_type {
	PBRPC_FRAME_HELLO = 0x01,
	PBRPC_FRAME_REQUEST = 0x02,
	PBRPC_FRAME_RESPONSE = 0x03,
	PBRPC_FRAME_CANCEL = 0x04,
	PBRPC_FRAME_PING = 0x05,
	PBRPC_FRAME_PONG = 0x06,
	PBRPC_FRAME_GOAWAY = 0x07,
	/* streams (PBRPC_FEATURE_STREAMS) */
	PBRPC_FRAME_MESSAGE = 0x08,    /* one message of a stream, either way */
	PBRPC_FRAME_WINDOW = 0x09,     /* u32 more bytes of credit for a stream */
	PBRPC_FRAME_HALF_CLOSE = 0x0A, /* client: it sends no more messages */
};

/* REQUEST flags */
#define PBRPC_REQUEST_TIMEOUT 0x01u  /* a u64 timeout in microseconds follows the method */
#define PBRPC_REQUEST_METADATA 0x02u /* a metadata block follows */
#define PBRPC_REQUEST_CLIENT_STREAM 0x04u /* streams: the client sends MESSAGEs */
#define PBRPC_REQUEST_SERVER_STREAM 0x08u /* streams: the server sends MESSAGEs */
#define PBRPC_REQUEST_STREAM_SHIFT 2      /* (flags >> 2) & 3 is a pbrpc_stream_kind */
#define PBRPC_REQUEST_BODY_FD 0x40u  /* the body is in the frame's first fd, a sealed memfd (PBRPC_FEATURE_MEMFD) */
/* RESPONSE flags */
#define PBRPC_RESPONSE_END 0x01u     /* final frame of the call; always set in version 1 */
#define PBRPC_RESPONSE_NOT_RUN 0x02u /* no handler ran for the call (PBRPC_FEATURE_NOT_RUN) */
#define PBRPC_RESPONSE_BODY_FD 0x40u /* as PBRPC_REQUEST_BODY_FD */

/* Hello.features bits. A feature is in effect on a connection when both
 * HELLOs announce it. */
#define PBRPC_FEATURE_NOT_RUN 0x1ull /* RESPONSE may carry PBRPC_RESPONSE_NOT_RUN */
#define PBRPC_FEATURE_FDS 0x2ull     /* REQUEST and RESPONSE may carry fds: header `reserved` = their count */
#define PBRPC_FEATURE_MEMFD 0x4ull   /* ... and a body in a sealed memfd (flag BODY_FD); needs FDS */
#define PBRPC_FEATURES_UNIX (PBRPC_FEATURE_FDS | PBRPC_FEATURE_MEMFD) /* announced on Unix sockets only */
#define PBRPC_FEATURES (PBRPC_FEATURE_NOT_RUN | PBRPC_FEATURE_STREAMS | PBRPC_FEATURES_UNIX) /* what this implementation announces */
#define PBRPC_WIRE_FDS_MAX 253u /* fds one frame may carry (the kernel's SCM_MAX_FD) */
#define PBRPC_WIRE_BODY_FD_SIZE 8 /* a BODY_FD frame's body: the memfd's size, u64 */
#define PBRPC_FEATURE_STREAMS 0x8ull /* stream REQUEST flags, MESSAGE, WINDOW, HALF_CLOSE */
#define PBRPC_STREAM_WINDOW_DEFAULT 65536u /* Hello.stream_window 0 */
#define PBRPC_WIRE_WINDOW_SIZE 4          /* a WINDOW frame's payload */

#define PBRPC_WIRE_PING_SIZE 8

/* A decoded or to-be-encoded request. Decoded views point into the frame. */
typedef struct pbrpc__wire_request {
	uint32_t call_id;
	const char *method; /* "package.Service/Method", not NUL-terminated */
	size_t method_len;
	bool has_timeout;
	uint64_t timeout_us; /* relative to when the frame was sent */
	/* Encoding: an array of metadata_count entries. Decoding: the raw block,
	 * read it with pbrpc__wire_metadata_next(). */
	const pbrpc_metadata *metadata;
	size_t metadata_count;
	const uint8_t *metadata_raw;
	size_t metadata_raw_len;
	const uint8_t *body; /* packed request message */
	size_t body_len;
	/* Encoding: the caller has already checked `method` with
	 * pbrpc_method_valid() (e.g. once per service), so the per-call
	 * check is skipped. */
	bool method_checked;
	uint8_t stream_kind; /* 0 unary, else pbrpc_stream_kind (REQUEST flags 0x04/0x08) */
	unsigned nfds;        /* fds with the frame (header `reserved`), memfd included */
	bool body_fd;         /* BODY_FD: the body is body_fd_len bytes in the first fd */
	uint64_t body_fd_len; /* (encoding: the caller packed it; msg and body are ignored) */
	/* Encoding: a body larger than this (0: never) is not queued: the
	 * writer returns PBRPC__WIRE_USE_MEMFD, so that the caller packs it into
	 * a memfd instead. */
	size_t memfd_above;
} pbrpc__wire_request;

/* What pbrpc__wire_write_request/_response return when memfd_above says the
 * body should go in a memfd (nothing was queued). */
#define PBRPC__WIRE_USE_MEMFD 1

typedef struct pbrpc__wire_response {
	uint32_t call_id;
	int status; /* pbrpc_status */
	const char *message; /* not NUL-terminated; may be NULL when len is 0 */
	size_t message_len;
	const uint8_t *body; /* packed reply; empty unless status is OK */
	size_t body_len;
	bool not_run; /* flag NOT_RUN: the server ran no handler for the call */
	unsigned nfds;        /* as in pbrpc__wire_request */
	bool body_fd;
	uint64_t body_fd_len;
	size_t memfd_above;
} pbrpc__wire_response;

/* ---- HELLO ---- */

/* Appends the preface and a HELLO frame. Returns 0 or -ENOMEM. */
int pbrpc__wire_write_preface(pbrpc__frame_writer *w, const pbrpc_hello *hello);

/* Parses a HELLO frame. Returns 0; PBRPC_EPROTO if the frame is not a
 * well-formed HELLO; PBRPC_EVERSION if its version is not ours (the decoded
 * hello is still filled so the caller can report the peer's version). */
int pbrpc__wire_read_hello(const pbrpc__frame *f, pbrpc_hello *out);

/* ---- REQUEST ---- */

/* Appends a REQUEST frame. When msg is not NULL it is packed straight into the
 * output buffer and req->body is ignored; otherwise req->body is copied.
 * Returns 0, -ENOMEM, PBRPC_EINVALID (bad method name or metadata key/value),
 * PBRPC_ETOOBIG (payload above max_payload; nothing queued). */
int pbrpc__wire_write_request(pbrpc__frame_writer *w, const pbrpc__wire_request *req,
					  const ProtobufCMessage *msg, uint32_t max_payload);

/* Parses a REQUEST frame's payload (the frame's type must be REQUEST).
 * Returns 0; PBRPC_EPROTO when the layout is broken (lengths past the end,
 * unknown flags); PBRPC_EINVALID when it parses but a metadata key is not
 * valid. out->call_id is set in every case. The method name is NOT checked:
 * a receiver that looks names up in a table of valid names need only call
 * pbrpc_method_valid() when the lookup misses. */
int pbrpc__wire_read_request(const pbrpc__frame *f, pbrpc__wire_request *out);

/* Iterates the metadata of a decoded request. *pos starts at 0. Returns 1 with
 * *out filled (views into the frame), 0 at the end. */
int pbrpc__wire_metadata_next(const pbrpc__wire_request *req, size_t *pos, pbrpc_metadata *out);

/* Looks a key up in a decoded request's metadata. Returns the first match or
 * NULL; *len gets the value's length. */
const void *pbrpc__wire_metadata_get(const pbrpc__wire_request *req, const char *key, size_t *len);

/* ---- RESPONSE ---- */

/* Appends a final RESPONSE frame. With status OK, msg (if not NULL) is packed
 * in place, else resp->body is copied; with another status no body is sent.
 * A message longer than PBRPC_STATUS_MESSAGE_MAX is cut. If the packed body
 * exceeds max_payload, nothing is queued and PBRPC_ETOOBIG is returned. */
int pbrpc__wire_write_response(pbrpc__frame_writer *w, const pbrpc__wire_response *resp,
					   const ProtobufCMessage *msg, uint32_t max_payload);

/* How much of a status message (len bytes at m) is sent when `room` bytes
 * are left for it: at most PBRPC_STATUS_MESSAGE_MAX, cut before a UTF-8
 * continuation byte so that no character is split. */
size_t pbrpc__wire_message_len(const char *m, size_t len, size_t room);

/* Parses a RESPONSE frame. Returns 0 or PBRPC_EPROTO. */
int pbrpc__wire_read_response(const pbrpc__frame *f, pbrpc__wire_response *out);

/* ---- CANCEL, PING, PONG, GOAWAY ---- */

int pbrpc__wire_write_cancel(pbrpc__frame_writer *w, uint32_t call_id);
int pbrpc__wire_write_ping(pbrpc__frame_writer *w, uint8_t type, const uint8_t data[PBRPC_WIRE_PING_SIZE]);

/* GOAWAY: status OK means a graceful drain; any other status says why the
 * connection is being closed (e.g. INVALID_ARGUMENT for a protocol error). */
int pbrpc__wire_write_goaway(pbrpc__frame_writer *w, int status, const char *message);
int pbrpc__wire_read_goaway(const pbrpc__frame *f, int *status, const char **message,
					size_t *message_len);

/* ---- streams: MESSAGE, WINDOW, HALF_CLOSE ---- */

/* What a MESSAGE of `len` payload bytes costs against a stream's window:
 * the whole frame, so that empty messages cost too. */
#define PBRPC_WIRE_MESSAGE_COST(len) ((int64_t)(len) + PBRPC_FRAME_HEADER_SIZE)

/* Appends a MESSAGE with msg packed in place. Returns its payload length
 * (>= 0), PBRPC_ETOOBIG (above max_payload; nothing queued) or -ENOMEM. */
long pbrpc__wire_write_message(pbrpc__frame_writer *w, uint32_t id, const ProtobufCMessage *msg,
			       uint32_t max_payload);
int pbrpc__wire_write_window(pbrpc__frame_writer *w, uint32_t id, uint32_t increment);
int pbrpc__wire_write_half_close(pbrpc__frame_writer *w, uint32_t id);
/* A WINDOW frame's increment (the header was checked: 4 bytes). */
uint32_t pbrpc__wire_read_window(const pbrpc__frame *f);

/* Checks the parts of a frame header that do not depend on the payload: a
 * known type, only defined flags, stream id 0 exactly for connection-level
 * frames, payload sizes fixed by the type. Returns 0 or PBRPC_EPROTO. */
int pbrpc__wire_check_header(const pbrpc__frame_header *h);

/* Name of a frame type ("REQUEST"), or "UNKNOWN". */
const char *pbrpc__wire_frame_name(uint8_t type);

#endif
