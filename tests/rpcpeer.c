#include "rpcpeer.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "pbrpc/endpoint.h"

static int flush_all(pbrpc__frame_writer *w, int fd)
{
	while (pbrpc__frame_writer_pending(w) > 0) {
		ssize_t n = pbrpc__frame_writer_flush(w, fd, 0);
		if (n < 0)
			return (int)n;
	}
	return 0;
}

int rp_open(rp_conn *c, const char *endpoint)
{
	pbrpc_endpoint ep;
	memset(c, 0, sizeof(*c));
	c->fd = -1;
	c->next_id = 1;
	int rc = pbrpc_endpoint_parse(endpoint, &ep);
	if (rc < 0)
		return rc;
	int fd = pbrpc_endpoint_connect(&ep, 5000);
	if (fd < 0)
		return fd;
	struct timeval tv = { .tv_sec = 5 };
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));

	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc_hello hello = { .version = PBRPC_WIRE_VERSION };
	snprintf(hello.agent, sizeof(hello.agent), "pbrpc-tests");
	rc = pbrpc__wire_write_preface(&w, &hello);
	if (rc == 0)
		rc = flush_all(&w, fd);
	pbrpc__frame_writer_fini(&w);
	if (rc < 0)
		goto err;

	uint8_t pre[PBRPC_WIRE_PREFACE_SIZE];
	ssize_t n = recv(fd, pre, sizeof(pre), MSG_WAITALL);
	if (n != (ssize_t)sizeof(pre) || memcmp(pre, PBRPC_WIRE_PREFACE, sizeof(pre)) != 0) {
		rc = n < 0 ? -errno : PBRPC_EBADMAGIC;
		goto err;
	}
	pbrpc__frame_decoder_init(&c->dec, 0);
	pbrpc__frame f;
	rc = pbrpc__frame_read(&c->dec, fd, &f, 5000);
	if (rc < 0)
		goto err_dec;
	rc = pbrpc__wire_read_hello(&f, &c->hello);
	if (rc < 0)
		goto err_dec;
	c->fd = fd;
	return 0;

err_dec:
	pbrpc__frame_decoder_fini(&c->dec);
err:
	close(fd);
	return rc;
}

void rp_close(rp_conn *c)
{
	if (c->fd < 0)
		return;
	close(c->fd);
	pbrpc__frame_decoder_fini(&c->dec);
	c->fd = -1;
}

int64_t rp_send(rp_conn *c, const char *method, const ProtobufCMessage *req)
{
	pbrpc__wire_request r = {
		.call_id = c->next_id++,
		.method = method,
		.method_len = strlen(method),
	};
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	uint32_t max = c->hello.max_frame ? c->hello.max_frame : PBRPC_MAX_FRAME_LIMIT;
	int rc = pbrpc__wire_write_request(&w, &r, req, max);
	if (rc == 0)
		rc = flush_all(&w, c->fd);
	pbrpc__frame_writer_fini(&w);
	return rc < 0 ? rc : (int64_t)r.call_id;
}

int rp_recv(rp_conn *c, int timeout_ms, const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **reply,
	    rp_result *res)
{
	memset(res, 0, sizeof(*res));
	if (reply)
		*reply = NULL;
	for (;;) {
		pbrpc__frame f;
		int rc = pbrpc__frame_read(&c->dec, c->fd, &f, timeout_ms);
		if (rc < 0)
			return rc;
		if (f.hdr.type == PBRPC_FRAME_GOAWAY) {
			const char *msg;
			size_t len;
			if (pbrpc__wire_read_goaway(&f, &res->status, &msg, &len) == 0)
				snprintf(res->message, sizeof(res->message), "%.*s", (int)len, msg);
			if (res->status != PBRPC_STATUS_OK)
				return PBRPC_EGOAWAY;
			continue; /* a drain: replies still come */
		}
		if (f.hdr.type == PBRPC_FRAME_PING) {
			/* Answered as every peer must (PROTOCOL.md section 7): a
			 * draining server waits for it. */
			pbrpc__frame_header h = { .type = PBRPC_FRAME_PONG };
			rc = pbrpc__frame_write(c->fd, &h, f.payload, PBRPC_WIRE_PING_SIZE, timeout_ms);
			if (rc < 0)
				return rc;
			continue;
		}
		if (f.hdr.type != PBRPC_FRAME_RESPONSE)
			continue;
		pbrpc__wire_response r;
		rc = pbrpc__wire_read_response(&f, &r);
		if (rc < 0)
			return rc;
		res->id = r.call_id;
		res->status = r.status;
		snprintf(res->message, sizeof(res->message), "%.*s", (int)r.message_len, r.message ? r.message : "");
		if (r.status == PBRPC_STATUS_OK && reply_desc && reply) {
			*reply = protobuf_c_message_unpack(reply_desc, NULL, r.body_len, r.body);
			if (!*reply)
				return PBRPC_EDECODE;
		}
		return 0;
	}
}

int rp_call(rp_conn *c, const char *method, const ProtobufCMessage *req, const ProtobufCMessageDescriptor *reply_desc,
	    ProtobufCMessage **reply, rp_result *res)
{
	int64_t id = rp_send(c, method, req);
	if (id < 0)
		return (int)id;
	int rc = rp_recv(c, 10000, reply_desc, reply, res);
	if (rc == 0 && res->id != (uint32_t)id)
		return PBRPC_EPROTO;
	return rc;
}
