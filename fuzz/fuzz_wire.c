/* libFuzzer target for the wire layer's parsers (docs/PROTOCOL.md sections
 * 3-8): every frame payload a peer can send reaches one of them.
 *
 * Input: type (1 byte), flags (1 byte), stream (4 bytes, big-endian), then the
 * payload. Invariants checked beyond "no crash, no UB, no leak":
 * - views returned by a parser lie inside the payload;
 * - a REQUEST that parses re-encodes (pbrpc__wire_write_request) to a frame
 *   that parses to the same fields, and its metadata iterates to exactly the
 *   bytes of the block;
 * - a RESPONSE and a GOAWAY that parse re-encode to the same bytes. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "util/bytes.h"
#include "proto/wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)               \
	do {                      \
		if (!(cond))      \
			abort();  \
	} while (0)

static int inside(const void *p, size_t len, const uint8_t *base, size_t n)
{
	if (len == 0)
		return 1;
	const uint8_t *q = p;
	return q >= base && q + len <= base + n;
}

/* Decodes the single frame a writer holds. */
static void writer_frame(pbrpc__frame_writer *w, pbrpc__frame *f)
{
	CHECK(pbrpc__frame_writer_pending(w) >= PBRPC_FRAME_HEADER_SIZE);
	pbrpc__frame_header_decode(w->buf + w->head, &f->hdr);
	CHECK(PBRPC_FRAME_HEADER_SIZE + (size_t)f->hdr.length == pbrpc__frame_writer_pending(w));
	f->payload = w->buf + w->head + PBRPC_FRAME_HEADER_SIZE;
}

static void fuzz_request(const pbrpc__frame *f)
{
	pbrpc__wire_request r;
	int rc = pbrpc__wire_read_request(f, &r);
	CHECK(r.call_id == f->hdr.stream);
	if (rc != 0)
		return;
	size_t n = f->hdr.length;
	CHECK(inside(r.method, r.method_len, f->payload, n));
	CHECK(inside(r.metadata_raw, r.metadata_raw_len, f->payload, n));
	CHECK(inside(r.body, r.body_len, f->payload, n));

	pbrpc_metadata md[64];
	size_t count = 0, pos = 0, bytes = r.metadata_raw_len ? 2 : 0;
	pbrpc_metadata m;
	while (pbrpc__wire_metadata_next(&r, &pos, &m)) {
		CHECK(inside(m.key, m.key_len, r.metadata_raw, r.metadata_raw_len));
		CHECK(inside(m.value, m.value_len, r.metadata_raw, r.metadata_raw_len));
		bytes += 1 + m.key_len + 2 + m.value_len;
		if (count < 64)
			md[count++] = m;
	}
	CHECK(bytes == r.metadata_raw_len);
	if (!pbrpc_method_valid(r.method, r.method_len) || count == 64 || (r.metadata_raw_len && count == 0))
		return;

	/* Round trip through the encoder. */
	pbrpc__wire_request e = r;
	e.metadata = md;
	e.metadata_count = count;
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	CHECK(pbrpc__wire_write_request(&w, &e, NULL, 0) == 0);
	pbrpc__frame g;
	writer_frame(&w, &g);
	pbrpc__wire_request back;
	CHECK(pbrpc__wire_read_request(&g, &back) == 0);
	CHECK(back.call_id == r.call_id && back.has_timeout == r.has_timeout && back.timeout_us == r.timeout_us);
	CHECK(back.method_len == r.method_len && memcmp(back.method, r.method, r.method_len) == 0);
	CHECK(back.body_len == r.body_len && (r.body_len == 0 || memcmp(back.body, r.body, r.body_len) == 0));
	CHECK(back.metadata_raw_len == r.metadata_raw_len &&
	      (r.metadata_raw_len == 0 || memcmp(back.metadata_raw, r.metadata_raw, r.metadata_raw_len) == 0));
	pbrpc__frame_writer_fini(&w);
}

static void fuzz_response(const pbrpc__frame *f)
{
	pbrpc__wire_response r;
	if (pbrpc__wire_read_response(f, &r) != 0)
		return;
	CHECK(inside(r.message, r.message_len, f->payload, f->hdr.length));
	CHECK(inside(r.body, r.body_len, f->payload, f->hdr.length));
	if (r.message_len > PBRPC_STATUS_MESSAGE_MAX)
		return; /* the encoder cuts long messages */
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	CHECK(pbrpc__wire_write_response(&w, &r, NULL, 0) == 0);
	pbrpc__frame g;
	writer_frame(&w, &g);
	CHECK(g.hdr.length == f->hdr.length && memcmp(g.payload, f->payload, f->hdr.length) == 0);
	pbrpc__frame_writer_fini(&w);
}

static void fuzz_goaway(const pbrpc__frame *f)
{
	int status;
	const char *msg;
	size_t len;
	if (pbrpc__wire_read_goaway(f, &status, &msg, &len) != 0)
		return;
	CHECK(inside(msg, len, f->payload, f->hdr.length));
	if (len > PBRPC_STATUS_MESSAGE_MAX || memchr(msg, 0, len))
		return; /* the encoder takes a C string and cuts long ones */
	char *text = malloc(len + 1);
	memcpy(text, msg, len);
	text[len] = 0;
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	CHECK(pbrpc__wire_write_goaway(&w, status, text) == 0);
	pbrpc__frame g;
	writer_frame(&w, &g);
	CHECK(g.hdr.length == f->hdr.length && memcmp(g.payload, f->payload, f->hdr.length) == 0);
	pbrpc__frame_writer_fini(&w);
	free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 6)
		return 0;
	pbrpc__frame f;
	memset(&f, 0, sizeof(f));
	f.hdr.type = data[0];
	f.hdr.flags = data[1];
	f.hdr.stream = pbrpc__get_u32(data + 2);
	f.hdr.length = (uint32_t)(size - 6);
	/* A copy of exactly the payload's size, so ASan sees any overread. */
	uint8_t *payload = malloc(size - 6 ? size - 6 : 1);
	memcpy(payload, data + 6, size - 6);
	f.payload = payload;

	(void)pbrpc__wire_check_header(&f.hdr);
	switch (f.hdr.type % 4) {
	case 0:
		f.hdr.type = PBRPC_FRAME_REQUEST;
		fuzz_request(&f);
		break;
	case 1:
		f.hdr.type = PBRPC_FRAME_RESPONSE;
		fuzz_response(&f);
		break;
	case 2:
		f.hdr.type = PBRPC_FRAME_GOAWAY;
		fuzz_goaway(&f);
		break;
	default: {
		f.hdr.type = PBRPC_FRAME_HELLO;
		pbrpc_hello h;
		(void)pbrpc__wire_read_hello(&f, &h);
		CHECK(memchr(h.agent, 0, sizeof(h.agent)) != NULL);
		break;
	}
	}
	free(payload);
	return 0;
}
