#include "proto/wire.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "util/bytes.h"
#include "util/clock.h"
#include "util/io.h"
#include "wire.pb-c.h"

/* ---- HELLO ---- */

int pbrpc__wire_write_preface(pbrpc__frame_writer *w, const pbrpc_hello *hello)
{
	Pbrpc__Hello m = PBRPC__HELLO__INIT;
	m.version = hello->version;
	m.max_frame = hello->max_frame;
	m.max_calls = hello->max_calls;
	m.features = hello->features;
	m.agent = (char *)hello->agent;
	m.stream_window = hello->stream_window;

	int rc = pbrpc__frame_writer_append_raw(w, PBRPC_WIRE_PREFACE, PBRPC_WIRE_PREFACE_SIZE);
	if (rc < 0)
		return rc;
	pbrpc__frame_header h = { .type = PBRPC_FRAME_HELLO };
	size_t len = pbrpc__hello__get_packed_size(&m);
	uint8_t *p = pbrpc__frame_writer_begin(w, &h, len);
	if (!p)
		return -ENOMEM;
	pbrpc__hello__pack(&m, p);
	return pbrpc__frame_writer_commit(w, len);
}

int pbrpc__wire_read_hello(const pbrpc__frame *f, pbrpc_hello *out)
{
	memset(out, 0, sizeof(*out));
	if (f->hdr.type != PBRPC_FRAME_HELLO || f->hdr.stream != 0 || f->hdr.flags != 0)
		return PBRPC_EPROTO;
	Pbrpc__Hello *m = pbrpc__hello__unpack(NULL, f->hdr.length, f->payload);
	if (!m)
		return PBRPC_EPROTO;
	out->version = m->version;
	out->max_frame = m->max_frame;
	out->max_calls = m->max_calls;
	out->features = m->features;
	out->stream_window = m->stream_window;
	if (m->agent)
		snprintf(out->agent, sizeof(out->agent), "%s", m->agent);
	pbrpc__hello__free_unpacked(m, NULL);
	if (out->version != PBRPC_WIRE_VERSION)
		return PBRPC_EVERSION;
	return 0;
}

/* ---- names and keys ---- */

/* Bit 0: allowed in a method name; bit 1: allowed in a metadata key. A table
 * keeps the check to a load per byte: it runs on every call, on both sides. */
__extension__ static const uint8_t name_chars[256] = {
	['0' ... '9'] = 3, ['a' ... 'z'] = 3, ['A' ... 'Z'] = 1, ['_'] = 3, ['.'] = 3, ['-'] = 2, ['/'] = 4,
};

PBRPC_EXPORT bool pbrpc_method_valid(const char *name, size_t len)
{
	if (len < 3 || len > PBRPC_METHOD_MAX)
		return false;
	size_t slash = SIZE_MAX;
	for (size_t i = 0; i < len; i++) {
		uint8_t k = name_chars[(uint8_t)name[i]];
		if (k & 1)
			continue;
		if (k != 4 || slash != SIZE_MAX)
			return false;
		slash = i;
	}
	return slash != SIZE_MAX && slash > 0 && slash + 1 < len && name[0] != '.' && name[slash - 1] != '.';
}

PBRPC_EXPORT bool pbrpc_metadata_key_valid(const char *k, size_t len)
{
	if (len == 0 || len > PBRPC_METADATA_KEY_MAX)
		return false;
	for (size_t i = 0; i < len; i++)
		if (!(name_chars[(uint8_t)k[i]] & 2))
			return false;
	return true;
}

PBRPC_EXPORT const char *pbrpc_version(void)
{
	return PBRPC_VERSION;
}

size_t pbrpc__wire_message_len(const char *m, size_t len, size_t room)
{
	if (room > PBRPC_STATUS_MESSAGE_MAX)
		room = PBRPC_STATUS_MESSAGE_MAX;
	if (len <= room)
		return len;
	size_t n = room;
	for (size_t back = 0; back < 3 && n > 0 && ((uint8_t)m[n] & 0xC0) == 0x80; back++)
		n--;
	return n;
}

/* ---- REQUEST ---- */

int pbrpc__wire_write_request(pbrpc__frame_writer *w, const pbrpc__wire_request *req,
					  const ProtobufCMessage *msg, uint32_t max_payload)
{
	if (!req->method_checked && !pbrpc_method_valid(req->method, req->method_len))
		return PBRPC_EINVALID;

	size_t md_len = 0;
	for (size_t i = 0; i < req->metadata_count; i++) {
		const pbrpc_metadata *m = &req->metadata[i];
		size_t kl = m->key_len ? m->key_len : strlen(m->key);
		if (!pbrpc_metadata_key_valid(m->key, kl) || m->value_len > PBRPC_METADATA_VALUE_MAX)
			return PBRPC_EINVALID;
		md_len += 1 + kl + 2 + m->value_len;
	}
	if (req->metadata_count > 0xffff)
		return PBRPC_EINVALID;

	size_t body_len = req->body_fd ? PBRPC_WIRE_BODY_FD_SIZE
				       : msg ? protobuf_c_message_get_packed_size(msg) : req->body_len;
	size_t len = 2 + req->method_len + (req->has_timeout ? 8 : 0) + (req->metadata_count ? 2 + md_len : 0) +
		     body_len;
	/* A body in a memfd counts against the limit as if it were inline. */
	uint64_t logical = req->body_fd ? len - body_len + req->body_fd_len : len;
	if (max_payload && logical > max_payload)
		return PBRPC_ETOOBIG;
	if (req->memfd_above && !req->body_fd && body_len > req->memfd_above)
		return PBRPC__WIRE_USE_MEMFD;

	pbrpc__frame_header h = { .type = PBRPC_FRAME_REQUEST, .stream = req->call_id,
				  .reserved = (uint16_t)req->nfds };
	if (req->body_fd)
		h.flags |= PBRPC_REQUEST_BODY_FD;
	if (req->has_timeout)
		h.flags |= PBRPC_REQUEST_TIMEOUT;
	if (req->metadata_count)
		h.flags |= PBRPC_REQUEST_METADATA;
	h.flags |= (uint8_t)((req->stream_kind & 3u) << PBRPC_REQUEST_STREAM_SHIFT);
	uint8_t *p = pbrpc__frame_writer_begin(w, &h, len);
	if (!p)
		return len > PBRPC_MAX_FRAME_LIMIT ? PBRPC_ETOOBIG : -ENOMEM;
	uint8_t *q = p;
	pbrpc__put_u16(q, (uint16_t)req->method_len);
	memcpy(q + 2, req->method, req->method_len);
	q += 2 + req->method_len;
	if (req->has_timeout) {
		pbrpc__put_u64(q, req->timeout_us);
		q += 8;
	}
	if (req->metadata_count) {
		pbrpc__put_u16(q, (uint16_t)req->metadata_count);
		q += 2;
		for (size_t i = 0; i < req->metadata_count; i++) {
			const pbrpc_metadata *m = &req->metadata[i];
			size_t kl = m->key_len ? m->key_len : strlen(m->key);
			*q++ = (uint8_t)kl;
			memcpy(q, m->key, kl);
			q += kl;
			pbrpc__put_u16(q, (uint16_t)m->value_len);
			if (m->value_len)
				memcpy(q + 2, m->value, m->value_len);
			q += 2 + m->value_len;
		}
	}
	if (req->body_fd) {
		pbrpc__put_u64(q, req->body_fd_len);
		q += PBRPC_WIRE_BODY_FD_SIZE;
	} else if (msg)
		q += protobuf_c_message_pack(msg, q);
	else if (body_len) {
		memcpy(q, req->body, body_len);
		q += body_len;
	}
	return pbrpc__frame_writer_commit(w, (size_t)(q - p));
}

/* Walks a metadata block; returns its length or -1 if malformed. */
static long metadata_block_len(const uint8_t *p, size_t avail, bool *keys_ok)
{
	if (avail < 2)
		return -1;
	size_t n = pbrpc__get_u16(p), off = 2;
	*keys_ok = true;
	for (size_t i = 0; i < n; i++) {
		if (off + 1 > avail)
			return -1;
		size_t kl = p[off];
		if (off + 1 + kl + 2 > avail)
			return -1;
		if (!pbrpc_metadata_key_valid((const char *)p + off + 1, kl))
			*keys_ok = false;
		size_t vl = pbrpc__get_u16(p + off + 1 + kl);
		off += 1 + kl + 2;
		if (off + vl > avail)
			return -1;
		off += vl;
	}
	return (long)off;
}

int pbrpc__wire_read_request(const pbrpc__frame *f, pbrpc__wire_request *out)
{
	/* Field by field: a memset of the struct compiles to `rep stos`, slow to
	 * start, on a path every call takes. */
	out->call_id = f->hdr.stream;
	out->method = NULL;
	out->method_len = 0;
	out->has_timeout = false;
	out->timeout_us = 0;
	out->metadata = NULL;
	out->metadata_count = 0;
	out->metadata_raw = NULL;
	out->metadata_raw_len = 0;
	out->body = NULL;
	out->body_len = 0;
	out->method_checked = false;
	out->stream_kind = (uint8_t)((f->hdr.flags >> PBRPC_REQUEST_STREAM_SHIFT) & 3u);
	out->nfds = f->hdr.reserved;
	out->body_fd = false;
	out->body_fd_len = 0;
	out->memfd_above = 0; /* encoding only; a decoded request re-encodes as it came */
	if (f->hdr.type != PBRPC_FRAME_REQUEST || f->hdr.stream == 0 ||
	    (f->hdr.flags & ~(PBRPC_REQUEST_TIMEOUT | PBRPC_REQUEST_METADATA | PBRPC_REQUEST_CLIENT_STREAM |
			      PBRPC_REQUEST_SERVER_STREAM | PBRPC_REQUEST_BODY_FD)))
		return PBRPC_EPROTO;
	const uint8_t *p = f->payload;
	size_t avail = f->hdr.length;
	if (avail < 2)
		return PBRPC_EPROTO;
	size_t ml = pbrpc__get_u16(p);
	if (2 + ml > avail)
		return PBRPC_EPROTO;
	out->method = (const char *)p + 2;
	out->method_len = ml;
	p += 2 + ml;
	avail -= 2 + ml;
	if (f->hdr.flags & PBRPC_REQUEST_TIMEOUT) {
		if (avail < 8)
			return PBRPC_EPROTO;
		out->has_timeout = true;
		out->timeout_us = pbrpc__get_u64(p);
		p += 8;
		avail -= 8;
	}
	bool keys_ok = true;
	if (f->hdr.flags & PBRPC_REQUEST_METADATA) {
		long bl = metadata_block_len(p, avail, &keys_ok);
		if (bl < 0)
			return PBRPC_EPROTO;
		out->metadata_raw = p;
		out->metadata_raw_len = (size_t)bl;
		p += bl;
		avail -= (size_t)bl;
	}
	out->body = p;
	out->body_len = avail;
	if (f->hdr.flags & PBRPC_REQUEST_BODY_FD) {
		if (avail != PBRPC_WIRE_BODY_FD_SIZE || out->nfds == 0)
			return PBRPC_EPROTO;
		out->body_fd = true;
		out->body_fd_len = pbrpc__get_u64(p);
		out->body = NULL;
		out->body_len = 0;
	}
	if (!keys_ok)
		return PBRPC_EINVALID;
	return 0;
}

int pbrpc__wire_metadata_next(const pbrpc__wire_request *req, size_t *pos, pbrpc_metadata *out)
{
	const uint8_t *p = req->metadata_raw;
	if (!p || req->metadata_raw_len < 2)
		return 0;
	if (*pos == 0)
		*pos = 2;
	if (*pos >= req->metadata_raw_len)
		return 0;
	size_t off = *pos;
	size_t kl = p[off];
	out->key = (const char *)p + off + 1;
	out->key_len = kl;
	out->value_len = pbrpc__get_u16(p + off + 1 + kl);
	out->value = p + off + 1 + kl + 2;
	*pos = off + 1 + kl + 2 + out->value_len;
	return 1;
}

const void *pbrpc__wire_metadata_get(const pbrpc__wire_request *req, const char *key, size_t *len)
{
	size_t pos = 0, kl = strlen(key);
	pbrpc_metadata m;
	while (pbrpc__wire_metadata_next(req, &pos, &m)) {
		if (m.key_len == kl && memcmp(m.key, key, kl) == 0) {
			if (len)
				*len = m.value_len;
			return m.value;
		}
	}
	return NULL;
}

/* ---- RESPONSE ---- */

int pbrpc__wire_write_response(pbrpc__frame_writer *w, const pbrpc__wire_response *resp,
					   const ProtobufCMessage *msg, uint32_t max_payload)
{
	/* A status answer's message is cut to what the peer accepts. */
	size_t room = max_payload && resp->status != PBRPC_STATUS_OK && max_payload >= 4 ? max_payload - 4 : SIZE_MAX;
	size_t ml = resp->message ? pbrpc__wire_message_len(resp->message, resp->message_len, room) : 0;
	size_t body_len = 0;
	bool body_fd = resp->body_fd && resp->status == PBRPC_STATUS_OK;
	if (body_fd)
		body_len = PBRPC_WIRE_BODY_FD_SIZE;
	else if (resp->status == PBRPC_STATUS_OK)
		body_len = msg ? protobuf_c_message_get_packed_size(msg) : resp->body_len;
	size_t len = 4 + ml + body_len;
	uint64_t logical = body_fd ? len - body_len + resp->body_fd_len : len;
	if (max_payload && logical > max_payload)
		return PBRPC_ETOOBIG;
	if (resp->memfd_above && !body_fd && body_len > resp->memfd_above)
		return PBRPC__WIRE_USE_MEMFD;

	pbrpc__frame_header h = { .type = PBRPC_FRAME_RESPONSE, .stream = resp->call_id,
				  .reserved = (uint16_t)resp->nfds };
	h.flags = PBRPC_RESPONSE_END | (resp->not_run ? PBRPC_RESPONSE_NOT_RUN : 0) |
		  (body_fd ? PBRPC_RESPONSE_BODY_FD : 0);
	uint8_t *p = pbrpc__frame_writer_begin(w, &h, len);
	if (!p)
		return len > PBRPC_MAX_FRAME_LIMIT ? PBRPC_ETOOBIG : -ENOMEM;
	pbrpc__put_u16(p, (uint16_t)resp->status);
	pbrpc__put_u16(p + 2, (uint16_t)ml);
	if (ml)
		memcpy(p + 4, resp->message, ml);
	uint8_t *q = p + 4 + ml;
	if (body_fd) {
		pbrpc__put_u64(q, resp->body_fd_len);
		q += PBRPC_WIRE_BODY_FD_SIZE;
	} else if (body_len) {
		if (msg)
			q += protobuf_c_message_pack(msg, q);
		else {
			memcpy(q, resp->body, body_len);
			q += body_len;
		}
	}
	return pbrpc__frame_writer_commit(w, (size_t)(q - p));
}

int pbrpc__wire_read_response(const pbrpc__frame *f, pbrpc__wire_response *out)
{
	out->call_id = f->hdr.stream;
	out->status = PBRPC_STATUS_UNKNOWN;
	out->message = NULL;
	out->message_len = 0;
	out->body = NULL;
	out->body_len = 0;
	out->not_run = (f->hdr.flags & PBRPC_RESPONSE_NOT_RUN) != 0;
	out->nfds = f->hdr.reserved;
	out->body_fd = false;
	out->body_fd_len = 0;
	if (f->hdr.type != PBRPC_FRAME_RESPONSE || f->hdr.stream == 0 ||
	    (f->hdr.flags & ~(PBRPC_RESPONSE_NOT_RUN | PBRPC_RESPONSE_BODY_FD)) != PBRPC_RESPONSE_END)
		return PBRPC_EPROTO;
	if (f->hdr.length < 4)
		return PBRPC_EPROTO;
	out->status = pbrpc__get_u16(f->payload);
	size_t ml = pbrpc__get_u16(f->payload + 2);
	if (4 + ml > f->hdr.length)
		return PBRPC_EPROTO;
	out->message = (const char *)f->payload + 4;
	out->message_len = ml;
	out->body = f->payload + 4 + ml;
	out->body_len = f->hdr.length - 4 - ml;
	if (out->status != PBRPC_STATUS_OK && out->body_len)
		return PBRPC_EPROTO;
	if (f->hdr.flags & PBRPC_RESPONSE_BODY_FD) {
		if (out->status != PBRPC_STATUS_OK || out->body_len != PBRPC_WIRE_BODY_FD_SIZE || out->nfds == 0)
			return PBRPC_EPROTO;
		out->body_fd = true;
		out->body_fd_len = pbrpc__get_u64(out->body);
		out->body = NULL;
		out->body_len = 0;
	}
	return 0;
}

/* ---- small frames ---- */

int pbrpc__wire_write_cancel(pbrpc__frame_writer *w, uint32_t call_id)
{
	pbrpc__frame_header h = { .type = PBRPC_FRAME_CANCEL, .stream = call_id };
	return pbrpc__frame_writer_append(w, &h, NULL, 0);
}

int pbrpc__wire_write_ping(pbrpc__frame_writer *w, uint8_t type, const uint8_t data[PBRPC_WIRE_PING_SIZE])
{
	if (type != PBRPC_FRAME_PING && type != PBRPC_FRAME_PONG)
		return PBRPC_EINVALID;
	pbrpc__frame_header h = { .type = type };
	return pbrpc__frame_writer_append(w, &h, data, PBRPC_WIRE_PING_SIZE);
}

int pbrpc__wire_write_goaway(pbrpc__frame_writer *w, int status, const char *message)
{
	size_t ml = message ? pbrpc__wire_message_len(message, strlen(message), SIZE_MAX) : 0;
	pbrpc__frame_header h = { .type = PBRPC_FRAME_GOAWAY };
	uint8_t *p = pbrpc__frame_writer_begin(w, &h, 4 + ml);
	if (!p)
		return -ENOMEM;
	pbrpc__put_u16(p, (uint16_t)status);
	pbrpc__put_u16(p + 2, (uint16_t)ml);
	if (ml)
		memcpy(p + 4, message, ml);
	return pbrpc__frame_writer_commit(w, 4 + ml);
}

int pbrpc__wire_read_goaway(const pbrpc__frame *f, int *status, const char **message, size_t *message_len)
{
	if (f->hdr.type != PBRPC_FRAME_GOAWAY || f->hdr.length < 4)
		return PBRPC_EPROTO;
	size_t ml = pbrpc__get_u16(f->payload + 2);
	if (4 + ml != f->hdr.length)
		return PBRPC_EPROTO;
	*status = pbrpc__get_u16(f->payload);
	*message = (const char *)f->payload + 4;
	*message_len = ml;
	return 0;
}

/* ---- streams ---- */

long pbrpc__wire_write_message(pbrpc__frame_writer *w, uint32_t id, const ProtobufCMessage *msg,
			       uint32_t max_payload)
{
	size_t len = protobuf_c_message_get_packed_size(msg);
	if (max_payload && len > max_payload)
		return PBRPC_ETOOBIG;
	pbrpc__frame_header h = { .type = PBRPC_FRAME_MESSAGE, .stream = id };
	uint8_t *p = pbrpc__frame_writer_begin(w, &h, len);
	if (!p)
		return len > PBRPC_MAX_FRAME_LIMIT ? PBRPC_ETOOBIG : -ENOMEM;
	size_t n = protobuf_c_message_pack(msg, p);
	int rc = pbrpc__frame_writer_commit(w, n);
	return rc < 0 ? rc : (long)n;
}

int pbrpc__wire_write_window(pbrpc__frame_writer *w, uint32_t id, uint32_t increment)
{
	uint8_t b[PBRPC_WIRE_WINDOW_SIZE];
	pbrpc__put_u32(b, increment);
	pbrpc__frame_header h = { .type = PBRPC_FRAME_WINDOW, .stream = id };
	return pbrpc__frame_writer_append(w, &h, b, sizeof(b));
}

int pbrpc__wire_write_half_close(pbrpc__frame_writer *w, uint32_t id)
{
	pbrpc__frame_header h = { .type = PBRPC_FRAME_HALF_CLOSE, .stream = id };
	return pbrpc__frame_writer_append(w, &h, NULL, 0);
}

uint32_t pbrpc__wire_read_window(const pbrpc__frame *f)
{
	return pbrpc__get_u32(f->payload);
}

int pbrpc__wire_check_header(const pbrpc__frame_header *h)
{
	switch (h->type) {
	case PBRPC_FRAME_HELLO:
	case PBRPC_FRAME_GOAWAY:
		return (h->stream == 0 && h->flags == 0) ? 0 : PBRPC_EPROTO;
	case PBRPC_FRAME_PING:
	case PBRPC_FRAME_PONG:
		return (h->stream == 0 && h->flags == 0 && h->length == PBRPC_WIRE_PING_SIZE) ? 0 : PBRPC_EPROTO;
	case PBRPC_FRAME_REQUEST:
		return (h->stream != 0 && !(h->flags & ~(PBRPC_REQUEST_TIMEOUT | PBRPC_REQUEST_METADATA |
							 PBRPC_REQUEST_CLIENT_STREAM | PBRPC_REQUEST_SERVER_STREAM |
							 PBRPC_REQUEST_BODY_FD)))
			       ? 0
			       : PBRPC_EPROTO;
	case PBRPC_FRAME_RESPONSE:
		return (h->stream != 0 &&
			(h->flags & ~(PBRPC_RESPONSE_NOT_RUN | PBRPC_RESPONSE_BODY_FD)) == PBRPC_RESPONSE_END)
			       ? 0
			       : PBRPC_EPROTO;
	case PBRPC_FRAME_CANCEL:
	case PBRPC_FRAME_HALF_CLOSE:
		return (h->stream != 0 && h->flags == 0 && h->length == 0) ? 0 : PBRPC_EPROTO;
	case PBRPC_FRAME_MESSAGE:
		return (h->stream != 0 && h->flags == 0) ? 0 : PBRPC_EPROTO;
	case PBRPC_FRAME_WINDOW:
		return (h->stream != 0 && h->flags == 0 && h->length == PBRPC_WIRE_WINDOW_SIZE) ? 0 : PBRPC_EPROTO;
	default:
		return PBRPC_EPROTO;
	}
}

const char *pbrpc__wire_frame_name(uint8_t type)
{
	switch (type) {
	case PBRPC_FRAME_HELLO:
		return "HELLO";
	case PBRPC_FRAME_REQUEST:
		return "REQUEST";
	case PBRPC_FRAME_RESPONSE:
		return "RESPONSE";
	case PBRPC_FRAME_CANCEL:
		return "CANCEL";
	case PBRPC_FRAME_PING:
		return "PING";
	case PBRPC_FRAME_PONG:
		return "PONG";
	case PBRPC_FRAME_GOAWAY:
		return "GOAWAY";
	case PBRPC_FRAME_MESSAGE:
		return "MESSAGE";
	case PBRPC_FRAME_WINDOW:
		return "WINDOW";
	case PBRPC_FRAME_HALF_CLOSE:
		return "HALF_CLOSE";
	default:
		return "UNKNOWN";
	}
}
