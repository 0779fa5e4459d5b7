/* Tests for the framing layer (lib/include/pbrpc/frame.h).
 *
 * Every test asserts exact outcomes: bytes on the wire, the sequence of frames
 * decoded, the code returned. Socket tests run over a socketpair, a Unix socket
 * bound to a path, and TCP on 127.0.0.1. Randomised tests use a fixed seed
 * (PBRPC_TEST_SEED overrides it) and print it in every failure message.
 *
 * With PBRPC_TEST_IO=short the whole file runs again through a shim doing
 * 1-byte reads and sends of at most 143 bytes; tests that install their own
 * shim override it for their duration.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "proto/frame.h"
#include "testutil.h"

#define HS PBRPC_FRAME_HEADER_SIZE
#define SEED_FMT "seed=%#llx"
#define SEED(s) ((unsigned long long)(s))

TestSuite(frame, .init = tu_setup, .timeout = 60);

/* ---- test streams: frames with known contents and their encoding ---- */

typedef struct tframe {
	pbrpc__frame_header hdr;
	uint8_t *payload;
} tframe;

typedef struct tstream {
	tframe *f;
	size_t n;
	uint8_t *bytes; /* the encoded stream */
	size_t len;
} tstream;

static void put_header(uint8_t *p, uint32_t length, uint8_t type, uint8_t flags, uint16_t reserved,
		       uint32_t stream)
{
	pbrpc__frame_header h = { length, type, flags, reserved, stream };
	pbrpc__frame_header_encode(&h, p);
}

/* Payload sizes from 0 to ~100 KiB, weighted towards the small frames that
 * dominate real traffic and the boundaries around the header size. */
static size_t rand_payload_len(tu_rng *r, size_t max)
{
	size_t len;
	switch (tu_rand(r) % 8) {
	case 0:
		len = 0;
		break;
	case 1:
	case 2:
		len = tu_rand_range(r, 1, 24);
		break;
	case 3:
	case 4:
		len = tu_rand_range(r, 25, 600);
		break;
	case 5:
	case 6:
		len = tu_rand_range(r, 601, 8192);
		break;
	default:
		len = tu_rand_range(r, 8193, 100 * 1024);
		break;
	}
	return len < max ? len : max;
}

static void stream_add(tstream *s, const pbrpc__frame_header *hdr, const void *payload)
{
	s->f = realloc(s->f, (s->n + 1) * sizeof(*s->f));
	s->bytes = realloc(s->bytes, s->len + HS + hdr->length);
	cr_assert(s->f && s->bytes);
	tframe *f = &s->f[s->n++];
	f->hdr = *hdr;
	f->payload = malloc(hdr->length ? hdr->length : 1);
	cr_assert(f->payload);
	if (hdr->length)
		memcpy(f->payload, payload, hdr->length);
	pbrpc__frame_header_encode(hdr, s->bytes + s->len);
	if (hdr->length)
		memcpy(s->bytes + s->len + HS, payload, hdr->length);
	s->len += HS + hdr->length;
}

/* n random frames, payloads of at most max_len bytes. */
static void stream_random(tstream *s, tu_rng *r, size_t n, size_t max_len)
{
	memset(s, 0, sizeof(*s));
	uint8_t *buf = malloc(max_len ? max_len : 1);
	cr_assert(buf);
	for (size_t i = 0; i < n; i++) {
		pbrpc__frame_header h = {
			.length = (uint32_t)rand_payload_len(r, max_len),
			.type = (uint8_t)tu_rand(r),
			.flags = (uint8_t)tu_rand(r),
			.stream = (tu_rand(r) & 1) ? (uint32_t)tu_rand(r) : (uint32_t)tu_rand_range(r, 0, 3),
		};
		tu_rand_bytes(r, buf, h.length);
		stream_add(s, &h, buf);
	}
	free(buf);
}

static void stream_free(tstream *s)
{
	for (size_t i = 0; i < s->n; i++)
		free(s->f[i].payload);
	free(s->f);
	free(s->bytes);
	memset(s, 0, sizeof(*s));
}

static bool header_eq(const pbrpc__frame_header *a, const pbrpc__frame_header *b)
{
	return a->length == b->length && a->type == b->type && a->flags == b->flags &&
	       a->reserved == b->reserved && a->stream == b->stream;
}

/* The frame-by-frame expectation: frame idx of s is `f`. Frames longer than
 * the decoder's maximum must come out as PBRPC_ETOOBIG with that header. */
typedef struct checker {
	const tstream *s;
	size_t idx;
	uint32_t max;
	uint64_t seed;
	const char *what;
} checker;

static void check_frame(checker *c, const pbrpc__frame *f)
{
	cr_assert_lt(c->idx, c->s->n, "%s " SEED_FMT ": extra frame after %zu", c->what, SEED(c->seed), c->idx);
	const tframe *e = &c->s->f[c->idx];
	cr_assert_leq(e->hdr.length, c->max, "%s " SEED_FMT ": frame %zu (length %u) should be rejected", c->what,
		      SEED(c->seed), c->idx, e->hdr.length);
	cr_assert(header_eq(&f->hdr, &e->hdr),
		  "%s " SEED_FMT ": frame %zu header: got len %u type %u flags %u stream %u, want len %u type %u "
		  "flags %u stream %u",
		  c->what, SEED(c->seed), c->idx, f->hdr.length, f->hdr.type, f->hdr.flags, f->hdr.stream,
		  e->hdr.length, e->hdr.type, e->hdr.flags, e->hdr.stream);
	cr_assert(e->hdr.length == 0 || memcmp(f->payload, e->payload, e->hdr.length) == 0,
		  "%s " SEED_FMT ": frame %zu payload differs", c->what, SEED(c->seed), c->idx);
	c->idx++;
}

static void check_rejected(checker *c, pbrpc__frame_decoder *d)
{
	cr_assert_lt(c->idx, c->s->n, "%s " SEED_FMT ": rejection after the last frame", c->what, SEED(c->seed));
	const tframe *e = &c->s->f[c->idx];
	cr_assert_gt(e->hdr.length, c->max, "%s " SEED_FMT ": frame %zu (length %u) rejected", c->what,
		     SEED(c->seed), c->idx, e->hdr.length);
	const pbrpc__frame_header *rej = pbrpc__frame_decoder_rejected(d);
	cr_assert_not_null(rej, "%s " SEED_FMT ": ETOOBIG without rejected()", c->what, SEED(c->seed));
	cr_assert(header_eq(rej, &e->hdr), "%s " SEED_FMT ": rejected header %zu differs", c->what,
		  SEED(c->seed), c->idx);
	/* Rejected before allocating: the buffer never grew towards its length. */
	cr_assert_leq(d->cap, 64 * 1024, "%s: decoder buffer %zu bytes after rejecting a %u-byte frame", c->what,
		      d->cap, e->hdr.length);
	cr_assert_eq(pbrpc__frame_decoder_skip(d), 0);
	c->idx++;
}

/* Feeds the stream to a fresh decoder in chunks whose sizes next_chunk()
 * returns. Each chunk lives in its own allocation, freed as soon as next()
 * returns 0 (the API allows it), so ASan catches a decoder that keeps a
 * pointer into fed bytes. */
typedef size_t (*chunk_fn)(void *ctx, size_t off, size_t left);

static void decode_chunked(const tstream *s, uint32_t max, chunk_fn next_chunk, void *ctx, uint64_t seed,
			   const char *what)
{
	pbrpc__frame_decoder d;
	pbrpc__frame_decoder_init(&d, max);
	checker c = { s, 0, d.max_payload, seed, what };
	size_t off = 0;
	do {
		size_t n = next_chunk(ctx, off, s->len - off);
		if (n > s->len - off)
			n = s->len - off;
		uint8_t *chunk = malloc(n ? n : 1);
		cr_assert(chunk);
		memcpy(chunk, s->bytes + off, n);
		pbrpc__frame_decoder_feed(&d, chunk, n);
		pbrpc__frame f;
		int rc;
		while ((rc = pbrpc__frame_decoder_next(&d, &f)) != 0) {
			if (rc == PBRPC_ETOOBIG) {
				check_rejected(&c, &d);
				continue;
			}
			cr_assert_eq(rc, 1, "%s " SEED_FMT ": next() = %d (%s) at offset %zu", what, SEED(seed), rc,
				     pbrpc_strerror(rc), off);
			bool in_chunk = f.payload >= chunk && f.payload + f.hdr.length <= chunk + n;
			bool in_buf = d.buf && f.payload >= d.buf && f.payload + f.hdr.length <= d.buf + d.tail;
			cr_assert(in_chunk || in_buf || f.hdr.length == 0,
				  "%s " SEED_FMT ": payload of frame %zu points outside the decoder's bytes", what,
				  SEED(seed), c.idx);
			check_frame(&c, &f);
		}
		free(chunk);
		off += n;
	} while (off < s->len);
	cr_assert_eq(c.idx, s->n, "%s " SEED_FMT ": decoded %zu of %zu frames", what, SEED(seed), c.idx, s->n);
	cr_assert_eq(pbrpc__frame_decoder_pending(&d), 0, "%s " SEED_FMT ": bytes left over", what, SEED(seed));
	pbrpc__frame_decoder_fini(&d);
}

static size_t chunk_all(void *ctx, size_t off, size_t left)
{
	return left;
}

static size_t chunk_fixed(void *ctx, size_t off, size_t left)
{
	return *(size_t *)ctx;
}

/* Mostly small pieces, sometimes a large one, sometimes nothing at all. */
static size_t chunk_random(void *ctx, size_t off, size_t left)
{
	tu_rng *r = ctx;
	switch (tu_rand(r) % 6) {
	case 0:
		return tu_rand_range(r, 0, 3);
	case 1:
		return tu_rand_range(r, 1, HS * 2);
	case 2:
		return tu_rand_range(r, 1, 512);
	case 3:
		return tu_rand_range(r, 1, 8192);
	case 4:
		return tu_rand_range(r, 1, 200 * 1024);
	default:
		return tu_rand_range(r, 0, left);
	}
}

/* Splits at the given ascending offsets. */
typedef struct cuts {
	const size_t *at;
	size_t n, i;
} cuts;

static size_t chunk_cuts(void *ctx, size_t off, size_t left)
{
	cuts *c = ctx;
	if (c->i < c->n)
		return c->at[c->i++] - off;
	return left;
}

/* ---- header: byte-exact vectors ---- */

/* The header of a 5-byte frame of type 0x02 with flag 0x01 on stream 7. */
static const uint8_t vec_hello[] = {
	0x00, 0x00, 0x00, 0x05, /* length   = 5, big-endian */
	0x02,                   /* type     = 0x02 */
	0x01,                   /* flags    = 0x01 */
	0x00, 0x00,             /* reserved = 0 */
	0x00, 0x00, 0x00, 0x07, /* stream   = 7, big-endian */
	'h',  'e',  'l',  'l',  'o',
};

/* Distinct bytes everywhere, so that any swapped or misplaced byte shows. */
static const uint8_t vec_order[HS] = {
	0x01, 0x02, 0x03, 0x04, /* length   = 0x01020304 */
	0xa5,                   /* type     = 0xa5 */
	0x5a,                   /* flags    = 0x5a */
	0x00, 0x00,             /* reserved = 0 */
	0xde, 0xad, 0xbe, 0xef, /* stream   = 0xdeadbeef */
};

Test(frame, header_encode_vectors)
{
	uint8_t out[HS];

	pbrpc__frame_header h = { .length = 5, .type = 0x02, .flags = 0x01, .reserved = 0, .stream = 7 };
	pbrpc__frame_header_encode(&h, out);
	cr_assert_arr_eq(out, vec_hello, HS);

	h = (pbrpc__frame_header){ 0x01020304, 0xa5, 0x5a, 0, 0xdeadbeef };
	pbrpc__frame_header_encode(&h, out);
	cr_assert_arr_eq(out, vec_order, HS);

	static const uint8_t zero[HS] = { 0 };
	h = (pbrpc__frame_header){ 0 };
	pbrpc__frame_header_encode(&h, out);
	cr_assert_arr_eq(out, zero, HS);

	static const uint8_t ones[HS] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	h = (pbrpc__frame_header){ 0xffffffffu, 0xff, 0xff, 0xffff, 0xffffffffu };
	pbrpc__frame_header_encode(&h, out);
	cr_assert_arr_eq(out, ones, HS);

	/* reserved is big-endian too (encode does not police it; decoders do) */
	static const uint8_t resv[HS] = { 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0, 0, 0, 0 };
	h = (pbrpc__frame_header){ .reserved = 0x1234 };
	pbrpc__frame_header_encode(&h, out);
	cr_assert_arr_eq(out, resv, HS);
}

Test(frame, header_decode_vectors)
{
	pbrpc__frame_header h;

	pbrpc__frame_header_decode(vec_hello, &h);
	cr_assert_eq(h.length, 5);
	cr_assert_eq(h.type, 0x02);
	cr_assert_eq(h.flags, 0x01);
	cr_assert_eq(h.reserved, 0);
	cr_assert_eq(h.stream, 7);

	pbrpc__frame_header_decode(vec_order, &h);
	cr_assert_eq(h.length, 0x01020304u);
	cr_assert_eq(h.type, 0xa5);
	cr_assert_eq(h.flags, 0x5a);
	cr_assert_eq(h.reserved, 0);
	cr_assert_eq(h.stream, 0xdeadbeefu);

	static const uint8_t resv[HS] = { 0x80, 0, 0, 0, 0, 0, 0x12, 0x34, 0, 0, 0, 0x01 };
	pbrpc__frame_header_decode(resv, &h);
	cr_assert_eq(h.length, 0x80000000u);
	cr_assert_eq(h.reserved, 0x1234);
	cr_assert_eq(h.stream, 1);
}

Test(frame, decode_literal_stream)
{
	/* Three frames: "hello" on stream 7, an empty frame, one byte on stream 0. */
	static const uint8_t bytes[] = {
		0x00, 0x00, 0x00, 0x05, 0x02, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07, 'h', 'e', 'l', 'l', 'o',
		0x00, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
		0x00, 0x00, 0x00, 0x01, 0xff, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, '!',
	};
	pbrpc__frame_decoder d;
	pbrpc__frame f;
	pbrpc__frame_decoder_init(&d, 0);
	pbrpc__frame_decoder_feed(&d, bytes, sizeof(bytes));

	cr_assert_eq(pbrpc__frame_decoder_next(&d, &f), 1);
	cr_assert(header_eq(&f.hdr, &(pbrpc__frame_header){ 5, 0x02, 0x01, 0, 7 }));
	cr_assert_arr_eq(f.payload, "hello", 5);
	/* the fast path hands out the caller's bytes, not a copy */
	cr_assert_eq(f.payload, bytes + HS);

	cr_assert_eq(pbrpc__frame_decoder_next(&d, &f), 1);
	cr_assert(header_eq(&f.hdr, &(pbrpc__frame_header){ 0, 0x05, 0, 0, 0 }));

	cr_assert_eq(pbrpc__frame_decoder_next(&d, &f), 1);
	cr_assert(header_eq(&f.hdr, &(pbrpc__frame_header){ 1, 0xff, 0x80, 0, 0 }));
	cr_assert_eq(f.payload[0], '!');

	cr_assert_eq(pbrpc__frame_decoder_next(&d, &f), 0);
	cr_assert_eq(pbrpc__frame_decoder_pending(&d), 0);
	cr_assert_null(d.buf, "whole frames fed at once need no buffer");
	pbrpc__frame_decoder_fini(&d);
}

/* ---- writer: exact bytes ---- */

static void read_expect(int fd, const uint8_t *want, size_t len, const char *what)
{
	uint8_t *got = malloc(len ? len : 1);
	cr_assert(got);
	size_t n = tu_read_full(fd, got, len);
	cr_assert_eq(n, len, "%s: read %zu of %zu bytes", what, n, len);
	cr_assert_arr_eq(got, want, len, "%s: bytes differ", what);
	free(got);
}

Test(frame, writer_append_exact_bytes)
{
	int fds[2];
	tu_socketpair(fds);
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);

	/* hdr->length is ignored: the payload length wins */
	pbrpc__frame_header h = { .length = 999, .type = 0x02, .flags = 0x01, .stream = 7 };
	cr_assert_eq(pbrpc__frame_writer_append(&w, &h, "hello", 5), 0);
	cr_assert_eq(pbrpc__frame_writer_pending(&w), sizeof(vec_hello));
	cr_assert_arr_eq(w.buf + w.head, vec_hello, sizeof(vec_hello));

	cr_assert_eq(pbrpc__frame_writer_flush(&w, fds[0], 0), (ssize_t)sizeof(vec_hello));
	cr_assert_eq(pbrpc__frame_writer_pending(&w), 0);
	read_expect(fds[1], vec_hello, sizeof(vec_hello), "append");

	/* an empty queue flushes nothing */
	cr_assert_eq(pbrpc__frame_writer_flush(&w, fds[0], MSG_DONTWAIT), 0);

	pbrpc__frame_writer_fini(&w);
	close(fds[0]);
	close(fds[1]);
}

Test(frame, writer_begin_commit)
{
	int fds[2];
	tu_socketpair(fds);
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc__frame_header h = { .length = 0xffffffffu, .type = 0x02, .flags = 0x01, .stream = 7 };

	cr_assert_eq(pbrpc__frame_writer_commit(&w, 0), PBRPC_EINVALID, "commit without begin");

	uint8_t *p = pbrpc__frame_writer_begin(&w, &h, 64);
	cr_assert_not_null(p);
	cr_assert_null(pbrpc__frame_writer_begin(&w, &h, 1), "begin while a frame is open");
	cr_assert_eq(pbrpc__frame_writer_append(&w, &h, "x", 1), PBRPC_EINVALID, "append while a frame is open");
	cr_assert_eq(pbrpc__frame_writer_pending(&w), 0, "an open frame is not queued yet");
	memcpy(p, "hello", 5);
	cr_assert_eq(pbrpc__frame_writer_commit(&w, 65), PBRPC_EINVALID, "commit beyond max_len");
	cr_assert_eq(pbrpc__frame_writer_commit(&w, 5), 0);
	cr_assert_eq(pbrpc__frame_writer_pending(&w), sizeof(vec_hello));

	/* an aborted frame leaves no trace */
	p = pbrpc__frame_writer_begin(&w, &h, 100);
	cr_assert_not_null(p);
	memset(p, 'z', 100);
	pbrpc__frame_writer_abort(&w);
	cr_assert_eq(pbrpc__frame_writer_pending(&w), sizeof(vec_hello));

	/* an empty frame packed in place */
	h = (pbrpc__frame_header){ .type = 0x05 };
	cr_assert_not_null(pbrpc__frame_writer_begin(&w, &h, 0));
	cr_assert_eq(pbrpc__frame_writer_commit(&w, 0), 0);

	uint8_t want[sizeof(vec_hello) + HS];
	memcpy(want, vec_hello, sizeof(vec_hello));
	put_header(want + sizeof(vec_hello), 0, 0x05, 0, 0, 0);
	cr_assert_eq(pbrpc__frame_writer_flush(&w, fds[0], 0), (ssize_t)sizeof(want));
	read_expect(fds[1], want, sizeof(want), "begin/commit");

	pbrpc__frame_writer_fini(&w);
	close(fds[0]);
	close(fds[1]);
}

Test(frame, writer_limits_and_trim)
{
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	pbrpc__frame_header h = { .type = 1 };
	static const uint8_t dummy[1];

	/* refused before the payload is touched or anything allocated */
	cr_assert_eq(pbrpc__frame_writer_append(&w, &h, dummy, (size_t)PBRPC_MAX_FRAME_LIMIT + 1), PBRPC_ETOOBIG);
	cr_assert_null(pbrpc__frame_writer_begin(&w, &h, (size_t)PBRPC_MAX_FRAME_LIMIT + 1));
	cr_assert_null(w.buf);
	cr_assert_eq(pbrpc__frame_write(-1, &h, dummy, (size_t)PBRPC_MAX_FRAME_LIMIT + 1, 0), PBRPC_ETOOBIG);

	int fds[2];
	tu_socketpair(fds);
	uint8_t big[10000] = { 0 };
	cr_assert_eq(pbrpc__frame_writer_append(&w, &h, big, sizeof(big)), 0);
	size_t cap = w.cap;
	cr_assert_geq(cap, sizeof(big) + HS);
	pbrpc__frame_writer_trim(&w, 0);
	cr_assert_eq(w.cap, cap, "trim must not drop queued bytes");
	cr_assert_eq(pbrpc__frame_writer_flush(&w, fds[0], 0), (ssize_t)(sizeof(big) + HS));
	pbrpc__frame_writer_trim(&w, cap);
	cr_assert_eq(w.cap, cap, "a buffer within `keep` stays");
	pbrpc__frame_writer_trim(&w, cap - 1);
	cr_assert_null(w.buf);
	cr_assert_eq(w.cap, 0);
	/* and the writer still works afterwards */
	cr_assert_eq(pbrpc__frame_writer_append(&w, &h, NULL, 0), 0);
	cr_assert_eq(pbrpc__frame_writer_pending(&w), HS);

	pbrpc__frame_writer_fini(&w);
	close(fds[0]);
	close(fds[1]);
}

/* ---- decoder: chunking properties ---- */

Test(frame, property_random_chunkings)
{
	uint64_t seed = tu_seed();
	tu_rng r = { seed };
	tstream s;
	stream_random(&s, &r, 300, 100 * 1024);

	decode_chunked(&s, 0, chunk_all, NULL, seed, "one chunk");
	for (int round = 0; round < 12; round++)
		decode_chunked(&s, 0, chunk_random, &r, seed, "random chunks");
	static const size_t fixed[] = { 2, 7, 11, 12, 13, 24, 4095, 4096, 65536 };
	for (size_t i = 0; i < sizeof(fixed) / sizeof(fixed[0]); i++) {
		size_t k = fixed[i];
		decode_chunked(&s, 0, chunk_fixed, &k, seed, "fixed chunks");
	}
	stream_free(&s);

	/* 1-byte chunks on a stream of smaller frames (it is 1 call per byte) */
	stream_random(&s, &r, 200, 3000);
	size_t one = 1;
	decode_chunked(&s, 0, chunk_fixed, &one, seed, "1-byte chunks");
	stream_free(&s);
}

Test(frame, property_every_split_point)
{
	uint64_t seed = tu_seed() ^ 1;
	tu_rng r = { seed };
	tstream s = { 0 };
	/* small frames around the header size, an empty one in the middle */
	static const uint32_t lens[] = { 3, 0, 12, 1, 25 };
	for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
		uint8_t payload[32];
		tu_rand_bytes(&r, payload, sizeof(payload));
		pbrpc__frame_header h = { lens[i], (uint8_t)(i + 1), (uint8_t)(0x80 >> i), 0, (uint32_t)(i * 1000) };
		stream_add(&s, &h, payload);
	}
	cr_assert_eq(s.len, 5 * HS + 41);

	for (size_t i = 0; i <= s.len; i++) {
		size_t at[1] = { i };
		cuts c = { at, 1, 0 };
		decode_chunked(&s, 0, chunk_cuts, &c, seed, "one split");
	}
	for (size_t i = 0; i <= s.len; i++) {
		for (size_t j = i; j <= s.len; j++) {
			size_t at[2] = { i, j };
			cuts c = { at, 2, 0 };
			decode_chunked(&s, 0, chunk_cuts, &c, seed, "two splits");
		}
	}
	stream_free(&s);
}

Test(frame, zero_length_frames)
{
	tstream s = { 0 };
	for (uint32_t i = 0; i < 1000; i++) {
		pbrpc__frame_header h = { 0, (uint8_t)i, (uint8_t)(i >> 8), 0, i };
		stream_add(&s, &h, NULL);
	}
	cr_assert_eq(s.len, 1000 * HS);
	decode_chunked(&s, 0, chunk_all, NULL, 0, "zero-length, one chunk");
	for (size_t k = 1; k <= HS + 1; k++)
		decode_chunked(&s, 0, chunk_fixed, &k, k, "zero-length, fixed chunks");
	stream_free(&s);
}

/* ---- decoder: limits ---- */

static int feed_next(pbrpc__frame_decoder *d, const uint8_t *bytes, size_t len, pbrpc__frame *f)
{
	pbrpc__frame_decoder_feed(d, bytes, len);
	return pbrpc__frame_decoder_next(d, f);
}

Test(frame, max_size_accepted_and_max_plus_one_skipped)
{
	/* A 1000-byte frame (exactly max) passes; a 1001-byte one is rejected,
	 * skipped, and the frame after it comes out intact; in every chunking. */
	uint64_t seed = tu_seed() ^ 2;
	tu_rng r = { seed };
	tstream s = { 0 };
	uint8_t payload[1001];
	static const uint32_t lens[] = { 1000, 1001, 3, 1001, 1001, 0, 1000 };
	for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
		tu_rand_bytes(&r, payload, sizeof(payload));
		pbrpc__frame_header h = { lens[i], (uint8_t)i, 0, 0, (uint32_t)i };
		stream_add(&s, &h, payload);
	}
	decode_chunked(&s, 1000, chunk_all, NULL, seed, "max/max+1, one chunk");
	for (size_t k = 1; k <= 13; k++)
		decode_chunked(&s, 1000, chunk_fixed, &k, seed, "max/max+1, fixed chunks");
	for (int round = 0; round < 50; round++)
		decode_chunked(&s, 1000, chunk_random, &r, seed, "max/max+1, random chunks");
	for (size_t i = 0; i <= s.len; i++) {
		size_t at[1] = { i };
		cuts c = { at, 1, 0 };
		decode_chunked(&s, 1000, chunk_cuts, &c, seed, "max/max+1, split");
	}
	stream_free(&s);
}

Test(frame, huge_lengths_rejected_before_allocating)
{
	static const uint32_t lens[] = {
		PBRPC_MAX_FRAME_DEFAULT + 1, /* max+1 */
		0x80000000u,                 /* 2^31 */
		0xffffffffu,
	};
	for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
		uint8_t hdr[HS];
		put_header(hdr, lens[i], 9, 8, 0, 77);

		/* header in one piece (fast path) and byte by byte (buffered path) */
		for (int bytewise = 0; bytewise < 2; bytewise++) {
			pbrpc__frame_decoder d;
			pbrpc__frame f;
			int rc = 0;
			pbrpc__frame_decoder_init(&d, 0);
			cr_assert_null(pbrpc__frame_decoder_rejected(&d));
			if (bytewise) {
				for (size_t k = 0; k < HS; k++) {
					rc = feed_next(&d, hdr + k, 1, &f);
					if (k < HS - 1)
						cr_assert_eq(rc, 0);
				}
			} else {
				rc = feed_next(&d, hdr, HS, &f);
			}
			cr_assert_eq(rc, PBRPC_ETOOBIG, "length %#x: got %d", lens[i], rc);
			cr_assert_leq(d.cap, 64 * 1024, "length %#x: buffer grew to %zu", lens[i], d.cap);
			const pbrpc__frame_header *rej = pbrpc__frame_decoder_rejected(&d);
			cr_assert_not_null(rej);
			cr_assert(header_eq(rej, &(pbrpc__frame_header){ lens[i], 9, 8, 0, 77 }));
			cr_assert_eq(pbrpc__frame_decoder_skip(&d), 0);
			cr_assert_eq(pbrpc__frame_decoder_pending(&d), lens[i], "the payload still to drop is pending");
			cr_assert_eq(pbrpc__frame_decoder_skip(&d), PBRPC_EINVALID, "skip twice");
			pbrpc__frame_decoder_fini(&d);
		}
	}

	/* The configurable maximum is clamped to 2^31 - 1, so 2^31 is always too big. */
	pbrpc__frame_decoder d;
	pbrpc__frame f;
	pbrpc__frame_decoder_init(&d, 0xffffffffu);
	cr_assert_eq(d.max_payload, PBRPC_MAX_FRAME_LIMIT);
	uint8_t hdr[HS];
	put_header(hdr, 0x80000000u, 1, 0, 0, 1);
	cr_assert_eq(feed_next(&d, hdr, HS, &f), PBRPC_ETOOBIG);
	cr_assert_leq(d.cap, 64 * 1024);
	pbrpc__frame_decoder_fini(&d);

	pbrpc__frame_decoder_init(&d, 0);
	cr_assert_eq(d.max_payload, PBRPC_MAX_FRAME_DEFAULT);
	cr_assert_eq(pbrpc__frame_decoder_skip(&d), PBRPC_EINVALID, "skip with nothing rejected");
	pbrpc__frame_decoder_fini(&d);
}

Test(frame, reserved_bits_are_a_protocol_error)
{
	for (int bit = 0; bit < 16; bit++) {
		uint8_t bytes[HS + 2];
		put_header(bytes, 2, 1, 0, (uint16_t)(1u << bit), 5);
		bytes[HS] = 'o';
		bytes[HS + 1] = 'k';
		for (int bytewise = 0; bytewise < 2; bytewise++) {
			pbrpc__frame_decoder d;
			pbrpc__frame f;
			int rc = 0;
			pbrpc__frame_decoder_init(&d, 0);
			if (bytewise) {
				for (size_t k = 0; k < sizeof(bytes) && rc == 0; k++)
					rc = feed_next(&d, bytes + k, 1, &f);
			} else {
				rc = feed_next(&d, bytes, sizeof(bytes), &f);
			}
			cr_assert_eq(rc, PBRPC_EPROTO, "reserved bit %d: got %d", bit, rc);
			cr_assert_null(pbrpc__frame_decoder_rejected(&d), "EPROTO is not a skippable rejection");
			cr_assert_eq(pbrpc__frame_decoder_skip(&d), PBRPC_EINVALID);
			pbrpc__frame_decoder_fini(&d);
		}
	}
	/* A bad reserved field is fatal even when the length is also too big. */
	pbrpc__frame_decoder d;
	pbrpc__frame f;
	uint8_t hdr[HS];
	put_header(hdr, 0xffffffffu, 1, 0, 0x8000, 1);
	pbrpc__frame_decoder_init(&d, 0);
	cr_assert_eq(feed_next(&d, hdr, HS, &f), PBRPC_EPROTO);
	pbrpc__frame_decoder_fini(&d);
}

Test(frame, pending_release_and_misuse)
{
	pbrpc__frame_decoder d;
	pbrpc__frame f;
	pbrpc__frame_decoder_init(&d, 0);
	cr_assert_null(d.buf, "init allocates nothing");

	cr_assert_eq(feed_next(&d, vec_hello, 5, &f), 0);
	cr_assert_eq(pbrpc__frame_decoder_pending(&d), 5);
	pbrpc__frame_decoder_release(&d);
	cr_assert_not_null(d.buf, "release keeps a buffer holding a partial frame");
	cr_assert_eq(feed_next(&d, vec_hello + 5, sizeof(vec_hello) - 5, &f), 1);
	cr_assert_arr_eq(f.payload, "hello", 5);
	cr_assert_eq(pbrpc__frame_decoder_next(&d, &f), 0);
	cr_assert_eq(pbrpc__frame_decoder_pending(&d), 0);
	pbrpc__frame_decoder_release(&d);
	cr_assert_null(d.buf, "release frees an empty buffer");
	cr_assert_eq(d.cap, 0);

	/* recv() refuses to run while fed bytes are still unconsumed */
	int fds[2];
	tu_socketpair(fds);
	uint8_t two[2 * sizeof(vec_hello)];
	memcpy(two, vec_hello, sizeof(vec_hello));
	memcpy(two + sizeof(vec_hello), vec_hello, sizeof(vec_hello));
	cr_assert_eq(feed_next(&d, two, sizeof(two), &f), 1);
	cr_assert_eq(pbrpc__frame_decoder_recv(&d, fds[0], MSG_DONTWAIT), PBRPC_EINVALID);
	cr_assert_eq(pbrpc__frame_decoder_next(&d, &f), 1);
	cr_assert_eq(pbrpc__frame_decoder_next(&d, &f), 0);
	/* now it may, and an empty non-blocking read is "would block" */
	cr_assert_eq(pbrpc__frame_decoder_recv(&d, fds[0], MSG_DONTWAIT), 0);
	pbrpc__frame_decoder_fini(&d);
	close(fds[0]);
	close(fds[1]);
}

/* ---- sockets: helpers ---- */

/* Writes all queued bytes of w, waiting for POLLOUT when the socket is full.
 * Returns 0 or the negative code of the failed flush. */
static int flush_all(pbrpc__frame_writer *w, int fd, size_t *total)
{
	while (pbrpc__frame_writer_pending(w)) {
		ssize_t n = pbrpc__frame_writer_flush(w, fd, MSG_DONTWAIT);
		if (n < 0)
			return (int)n;
		if (total)
			*total += (size_t)n;
		if (n == 0) {
			struct pollfd p = { .fd = fd, .events = POLLOUT };
			if (poll(&p, 1, 10000) != 1)
				return -ETIMEDOUT;
		}
	}
	return 0;
}

enum send_mode { SEND_FRAME_WRITE, SEND_WRITER_BLOCKING, SEND_WRITER_POLL };

/* A writer thread: sends a stream, then shuts its end down for writing.
 * No Criterion assertions off the main thread: results go in the struct. */
typedef struct sender {
	int fd;
	const tstream *s;
	enum send_mode mode;
	int rc;
	ssize_t first_flush; /* SEND_WRITER_BLOCKING: what one flush(fd, 0) returned */
	pthread_t tid;
} sender;

static void *sender_main(void *arg)
{
	sender *sd = arg;
	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	sd->rc = 0;
	switch (sd->mode) {
	case SEND_FRAME_WRITE:
		for (size_t i = 0; i < sd->s->n && sd->rc == 0; i++)
			sd->rc = pbrpc__frame_write(sd->fd, &sd->s->f[i].hdr, sd->s->f[i].payload,
						   sd->s->f[i].hdr.length, 10000);
		break;
	case SEND_WRITER_BLOCKING:
	case SEND_WRITER_POLL:
		for (size_t i = 0; i < sd->s->n && sd->rc == 0; i++)
			sd->rc = pbrpc__frame_writer_append(&w, &sd->s->f[i].hdr, sd->s->f[i].payload,
							   sd->s->f[i].hdr.length);
		if (sd->rc)
			break;
		if (sd->mode == SEND_WRITER_BLOCKING)
			sd->first_flush = pbrpc__frame_writer_flush(&w, sd->fd, 0);
		sd->rc = flush_all(&w, sd->fd, NULL);
		break;
	}
	pbrpc__frame_writer_fini(&w);
	shutdown(sd->fd, SHUT_WR);
	return NULL;
}

static void sender_start(sender *sd, int fd, const tstream *s, enum send_mode mode)
{
	*sd = (sender){ .fd = fd, .s = s, .mode = mode, .first_flush = -1 };
	cr_assert_eq(pthread_create(&sd->tid, NULL, sender_main, sd), 0);
}

static void sender_join(sender *sd, const char *what)
{
	pthread_join(sd->tid, NULL);
	cr_assert_eq(sd->rc, 0, "%s: sender failed: %s", what, pbrpc_strerror(sd->rc));
}

/* Reads the whole stream with pbrpc__frame_read and expects a clean EOF. */
static void read_stream(int fd, const tstream *s, uint64_t seed, const char *what)
{
	pbrpc__frame_decoder d;
	pbrpc__frame_decoder_init(&d, 0);
	checker c = { s, 0, d.max_payload, seed, what };
	pbrpc__frame f;
	int rc;
	while ((rc = pbrpc__frame_read(&d, fd, &f, 10000)) == 1)
		check_frame(&c, &f);
	cr_assert_eq(rc, PBRPC_EOF, "%s " SEED_FMT ": read ended with %d (%s) after %zu frames", what, SEED(seed), rc,
		     pbrpc_strerror(rc), c.idx);
	cr_assert_eq(c.idx, s->n, "%s " SEED_FMT ": %zu of %zu frames", what, SEED(seed), c.idx, s->n);
	cr_assert_eq(pbrpc__frame_decoder_pending(&d), 0);
	pbrpc__frame_decoder_fini(&d);
}

/* ---- sockets: streams over each transport ---- */

Test(frame, random_stream_over_each_transport)
{
	uint64_t seed = tu_seed() ^ 3;
	tu_rng r = { seed };
	tstream s;
	if (tu_short_io())
		stream_random(&s, &r, 30, 8 * 1024); /* ~1 syscall per byte */
	else
		stream_random(&s, &r, 200, 100 * 1024);
	static const enum send_mode modes[] = { SEND_FRAME_WRITE, SEND_WRITER_BLOCKING, SEND_WRITER_POLL };
	for (size_t t = 0; t < TU_TRANSPORT_COUNT; t++) {
		for (size_t m = 0; m < 3; m++) {
			int fds[2];
			tu_transports[t].pair(fds);
			if (modes[m] == SEND_WRITER_POLL)
				tu_set_nonblock(fds[0], true);
			sender sd;
			sender_start(&sd, fds[0], &s, modes[m]);
			read_stream(fds[1], &s, seed, tu_transports[t].name);
			sender_join(&sd, tu_transports[t].name);
			close(fds[0]);
			close(fds[1]);
		}
	}
	stream_free(&s);
}

Test(frame, one_byte_reads_and_writes)
{
	uint64_t seed = tu_seed() ^ 4;
	tu_rng r = { seed };
	tstream s;
	stream_random(&s, &r, 60, 2000);
	for (size_t t = 0; t < TU_TRANSPORT_COUNT; t++) {
		tu_io_install(&(tu_io_config){ .recv_max = 1, .send_max = 1 });
		int fds[2];
		tu_transports[t].pair(fds);
		sender sd;
		sender_start(&sd, fds[0], &s, SEND_WRITER_BLOCKING);
		read_stream(fds[1], &s, seed, tu_transports[t].name);
		sender_join(&sd, tu_transports[t].name);
		tu_io_stats st = tu_io_get_stats();
		/* a blocking socket never refuses: one sendmsg per byte, exactly */
		cr_assert_eq(sd.first_flush, (ssize_t)s.len, "%s: flush returned %zd", tu_transports[t].name,
			     sd.first_flush);
		cr_assert_eq(st.send_calls, s.len, "%s: %lu sendmsg calls for %zu bytes", tu_transports[t].name,
			     st.send_calls, s.len);
		cr_assert_eq(st.send_bytes, s.len);
		cr_assert_eq(st.recv_bytes, s.len);
		cr_assert_geq(st.recv_calls, s.len);
		close(fds[0]);
		close(fds[1]);
	}
	stream_free(&s);
}

Test(frame, eintr_on_recv_and_send_is_retried)
{
	uint64_t seed = tu_seed() ^ 5;
	tu_rng r = { seed };
	tstream s;
	stream_random(&s, &r, 60, 4000);
	for (size_t t = 0; t < TU_TRANSPORT_COUNT; t++) {
		/* every other call interrupted, and short transfers in between */
		tu_io_install(&(tu_io_config){ .recv_max = 5,
					       .send_max = 7,
					       .recv_errno = EINTR,
					       .send_errno = EINTR,
					       .recv_every = 2,
					       .send_every = 2 });
		int fds[2];
		tu_transports[t].pair(fds);
		sender sd;
		sender_start(&sd, fds[0], &s, SEND_WRITER_BLOCKING);

		/* Blocking recv: each call returns bytes; EINTR never surfaces. */
		pbrpc__frame_decoder d;
		pbrpc__frame_decoder_init(&d, 0);
		checker c = { &s, 0, d.max_payload, seed, tu_transports[t].name };
		ssize_t n;
		size_t got = 0;
		while ((n = pbrpc__frame_decoder_recv(&d, fds[1], 0)) > 0) {
			cr_assert_leq(n, 5);
			got += (size_t)n;
			pbrpc__frame f;
			int rc;
			while ((rc = pbrpc__frame_decoder_next(&d, &f)) == 1)
				check_frame(&c, &f);
			cr_assert_eq(rc, 0);
		}
		cr_assert_eq(n, PBRPC_EOF, "%s: recv ended with %zd (%s)", tu_transports[t].name, n,
			     pbrpc_strerror((int)n));
		cr_assert_eq(got, s.len);
		cr_assert_eq(c.idx, s.n);
		pbrpc__frame_decoder_fini(&d);
		sender_join(&sd, tu_transports[t].name);

		tu_io_stats st = tu_io_get_stats();
		cr_assert_eq(sd.first_flush, (ssize_t)s.len, "%s: one blocking flush writes everything despite EINTR",
			     tu_transports[t].name);
		cr_assert_gt(st.send_faults, 0);
		cr_assert_gt(st.recv_faults, 0);
		cr_assert_eq(st.send_bytes, s.len);
		close(fds[0]);
		close(fds[1]);
	}
	stream_free(&s);
}

Test(frame, eagain_on_send_resumes_after_short_write)
{
	int fds[2];
	tu_socketpair(fds);
	/* 10 bytes per sendmsg; calls 0, 3, 6, ... fail with EAGAIN */
	tu_io_install(&(tu_io_config){ .send_max = 10, .send_errno = EAGAIN, .send_every = 3 });

	pbrpc__frame_writer w;
	pbrpc__frame_writer_init(&w);
	uint8_t a[50], b[30];
	memset(a, 'a', sizeof(a));
	memset(b, 'b', sizeof(b));
	pbrpc__frame_header ha = { .type = 1, .stream = 1 }, hb = { .type = 2, .stream = 2 };
	cr_assert_eq(pbrpc__frame_writer_append(&w, &ha, a, sizeof(a)), 0);

	cr_assert_eq(pbrpc__frame_writer_flush(&w, fds[0], 0), 0, "EAGAIN first: nothing written");
	cr_assert_eq(pbrpc__frame_writer_pending(&w), 62);
	cr_assert_eq(pbrpc__frame_writer_flush(&w, fds[0], 0), 20, "two short writes, then EAGAIN");
	cr_assert_eq(pbrpc__frame_writer_pending(&w), 42);
	/* queue more behind the partly written frame */
	cr_assert_eq(pbrpc__frame_writer_append(&w, &hb, b, sizeof(b)), 0);
	cr_assert_eq(pbrpc__frame_writer_pending(&w), 84);

	size_t total = 20, calls = 2;
	ssize_t n;
	while (pbrpc__frame_writer_pending(&w)) {
		n = pbrpc__frame_writer_flush(&w, fds[0], 0);
		cr_assert_geq(n, 0);
		cr_assert_leq(n, 20);
		total += (size_t)n;
		calls++;
		cr_assert_lt(calls, 100);
	}
	cr_assert_eq(total, 104);
	cr_assert_eq(calls, 7, "flushes of 0, 20, 20, 20, 20, 20, 4 bytes");
	tu_io_stats st = tu_io_get_stats();
	cr_assert_eq(st.send_faults, 6);
	cr_assert_eq(st.send_bytes, 104);
	cr_assert_eq(st.send_flags_all & MSG_NOSIGNAL, MSG_NOSIGNAL, "every sendmsg carries MSG_NOSIGNAL");

	uint8_t want[104];
	put_header(want, 50, 1, 0, 0, 1);
	memcpy(want + HS, a, 50);
	put_header(want + 62, 30, 2, 0, 0, 2);
	memcpy(want + 74, b, 30);
	read_expect(fds[1], want, sizeof(want), "after EAGAINs");

	pbrpc__frame_writer_fini(&w);
	close(fds[0]);
	close(fds[1]);
}

Test(frame, eagain_on_recv_is_would_block)
{
	int fds[2];
	tu_socketpair(fds);
	tu_write_full(fds[0], vec_hello, sizeof(vec_hello));
	/* calls 0, 2, 4, ... fail with EAGAIN */
	tu_io_install(&(tu_io_config){ .recv_errno = EAGAIN, .recv_every = 2 });

	pbrpc__frame_decoder d;
	pbrpc__frame f;
	pbrpc__frame_decoder_init(&d, 0);
	cr_assert_eq(pbrpc__frame_decoder_recv(&d, fds[1], 0), 0, "EAGAIN is 'would block', even on a blocking fd");
	cr_assert_eq(pbrpc__frame_decoder_next(&d, &f), 0);
	cr_assert_eq(pbrpc__frame_decoder_recv(&d, fds[1], 0), (ssize_t)sizeof(vec_hello));
	cr_assert_eq(pbrpc__frame_decoder_next(&d, &f), 1);
	cr_assert(header_eq(&f.hdr, &(pbrpc__frame_header){ 5, 2, 1, 0, 7 }));
	cr_assert_arr_eq(f.payload, "hello", 5);

	/* pbrpc__frame_read waits and retries through injected EAGAINs */
	tu_io_install(&(tu_io_config){ .recv_max = 3, .recv_errno = EAGAIN, .recv_every = 2 });
	for (int i = 0; i < 3; i++)
		tu_write_full(fds[0], vec_hello, sizeof(vec_hello));
	for (int i = 0; i < 3; i++) {
		cr_assert_eq(pbrpc__frame_read(&d, fds[1], &f, 5000), 1);
		cr_assert_arr_eq(f.payload, "hello", 5);
	}
	cr_assert_geq(tu_io_get_stats().recv_faults, 6);
	pbrpc__frame_decoder_fini(&d);
	close(fds[0]);
	close(fds[1]);
}

/* ---- backpressure ---- */

typedef struct reader {
	int fd;
	const tstream *s;
	size_t frames;
	size_t first_bad; /* index of the first wrong frame, or SIZE_MAX */
	int end_rc;
	pthread_t tid;
} reader;

static void *reader_main(void *arg)
{
	reader *rd = arg;
	pbrpc__frame_decoder d;
	pbrpc__frame f;
	int rc;
	pbrpc__frame_decoder_init(&d, 0);
	while ((rc = pbrpc__frame_read(&d, rd->fd, &f, 10000)) == 1) {
		const tframe *e = rd->frames < rd->s->n ? &rd->s->f[rd->frames] : NULL;
		if (rd->first_bad == SIZE_MAX &&
		    (!e || !header_eq(&f.hdr, &e->hdr) || memcmp(f.payload, e->payload, e->hdr.length) != 0))
			rd->first_bad = rd->frames;
		rd->frames++;
	}
	rd->end_rc = rc;
	pbrpc__frame_decoder_fini(&d);
	return NULL;
}

Test(frame, backlog_flushes_completely_and_in_order)
{
	uint64_t seed = tu_seed() ^ 6;
	tu_rng r = { seed };
	tstream s = { 0 };
	size_t target = tu_scale(8u << 20); /* 8 MiB */
	uint8_t *buf = malloc(64 * 1024);
	cr_assert(buf);
	for (uint32_t i = 0; s.len < target; i++) {
		pbrpc__frame_header h = { (uint32_t)tu_rand_range(&r, 0, 64 * 1024), (uint8_t)i, 0, 0, i };
		tu_rand_bytes(&r, buf, h.length);
		stream_add(&s, &h, buf);
	}
	free(buf);

	for (size_t t = 0; t < TU_TRANSPORT_COUNT; t++) {
		const char *name = tu_transports[t].name;
		int fds[2];
		tu_transports[t].pair(fds);
		tu_set_nonblock(fds[0], true);
		if (tu_short_io()) {
			/* the scaled-down backlog must still overflow the socket */
			tu_small_buffers(fds[0]);
			tu_small_buffers(fds[1]);
		}

		pbrpc__frame_writer w;
		pbrpc__frame_writer_init(&w);
		for (size_t i = 0; i < s.n; i++)
			cr_assert_eq(pbrpc__frame_writer_append(&w, &s.f[i].hdr, s.f[i].payload, s.f[i].hdr.length),
				     0);
		cr_assert_eq(pbrpc__frame_writer_pending(&w), s.len);

		/* Nobody reads yet: flush until the socket refuses more. */
		size_t total = 0;
		ssize_t n;
		int rounds = 0;
		while ((n = pbrpc__frame_writer_flush(&w, fds[0], 0)) > 0) {
			total += (size_t)n;
			cr_assert_lt(++rounds, 1000, "%s: socket never filled", name);
		}
		cr_assert_eq(n, 0, "%s: flush = %zd (%s)", name, n, pbrpc_strerror((int)n));
		cr_assert_gt(total, 0, "%s", name);
		cr_assert_gt(pbrpc__frame_writer_pending(&w), 0, "%s: %zu bytes did not fill the socket", name, s.len);
		cr_assert_eq(total + pbrpc__frame_writer_pending(&w), s.len);

		reader rd = { .fd = fds[1], .s = &s, .first_bad = SIZE_MAX };
		cr_assert_eq(pthread_create(&rd.tid, NULL, reader_main, &rd), 0);
		int rc = flush_all(&w, fds[0], &total);
		shutdown(fds[0], SHUT_WR);
		pthread_join(rd.tid, NULL);

		cr_assert_eq(rc, 0, "%s: flush failed: %s", name, pbrpc_strerror(rc));
		cr_assert_eq(total, s.len, "%s: flushed %zu of %zu bytes", name, total, s.len);
		cr_assert_eq(pbrpc__frame_writer_pending(&w), 0);
		cr_assert_eq(rd.first_bad, SIZE_MAX, "%s " SEED_FMT ": frame %zu wrong", name, SEED(seed),
			     rd.first_bad);
		cr_assert_eq(rd.frames, s.n, "%s: read %zu of %zu frames", name, rd.frames, s.n);
		cr_assert_eq(rd.end_rc, PBRPC_EOF, "%s: reader ended with %s", name, pbrpc_strerror(rd.end_rc));
		pbrpc__frame_writer_fini(&w);
		close(fds[0]);
		close(fds[1]);
	}
	stream_free(&s);
}

/* ---- limits over sockets ---- */

typedef struct raw_sender {
	int fd;
	const void *buf;
	size_t len;
	pthread_t tid;
} raw_sender;

static void *raw_sender_main(void *arg)
{
	raw_sender *rs = arg;
	tu_write_full(rs->fd, rs->buf, rs->len);
	return NULL;
}

Test(frame, max_plus_one_skipped_then_max_frame_over_socket)
{
	/* max+1 is rejected and its payload skipped with the buffer kept small;
	 * then a frame of exactly the maximum arrives whole, and the frame after
	 * it is intact. Default maximum (16 MiB), or 64 KiB under short I/O. */
	uint32_t max = tu_short_io() ? 64 * 1024 : PBRPC_MAX_FRAME_DEFAULT;
	size_t len = 3 * HS + (size_t)max + 1 + (size_t)max + 2;
	uint8_t *bytes = malloc(len), *p = bytes;
	cr_assert(bytes);
	put_header(p, max + 1, 1, 0, 0, 1);
	p += HS;
	memset(p, 0xee, (size_t)max + 1);
	p += max + 1;
	put_header(p, max, 2, 0, 0, 2);
	p += HS;
	const uint8_t *max_payload = p;
	for (uint32_t i = 0; i < max; i++)
		*p++ = (uint8_t)(i * 7 + 3);
	put_header(p, 2, 3, 0, 0, 3);
	p += HS;
	*p++ = 'o';
	*p++ = 'k';
	cr_assert_eq((size_t)(p - bytes), len);

	int fds[2];
	tu_socketpair(fds);
	raw_sender rs = { .fd = fds[0], .buf = bytes, .len = len };
	cr_assert_eq(pthread_create(&rs.tid, NULL, raw_sender_main, &rs), 0);

	pbrpc__frame_decoder d;
	pbrpc__frame f;
	pbrpc__frame_decoder_init(&d, tu_short_io() ? max : 0);
	cr_assert_eq(d.max_payload, max);
	cr_assert_eq(pbrpc__frame_read(&d, fds[1], &f, 10000), PBRPC_ETOOBIG);
	cr_assert_eq(pbrpc__frame_decoder_rejected(&d)->length, max + 1);
	cr_assert_eq(pbrpc__frame_decoder_skip(&d), 0);
	/* drain the skipped payload by hand, watching the buffer */
	size_t max_cap = d.cap;
	while (d.discard > 0) {
		ssize_t n = pbrpc__frame_decoder_recv(&d, fds[1], 0);
		cr_assert_gt(n, 0, "recv while skipping: %s", pbrpc_strerror((int)n));
		if (d.cap > max_cap)
			max_cap = d.cap;
	}
	cr_assert_leq(max_cap, 64 * 1024, "buffer grew to %zu bytes while skipping %u", max_cap, max + 1);

	cr_assert_eq(pbrpc__frame_read(&d, fds[1], &f, 10000), 1);
	cr_assert(header_eq(&f.hdr, &(pbrpc__frame_header){ max, 2, 0, 0, 2 }));
	cr_assert_arr_eq(f.payload, max_payload, max);
	cr_assert_eq(pbrpc__frame_read(&d, fds[1], &f, 10000), 1);
	cr_assert(header_eq(&f.hdr, &(pbrpc__frame_header){ 2, 3, 0, 0, 3 }));
	cr_assert_arr_eq(f.payload, "ok", 2);

	pthread_join(rs.tid, NULL);
	close(fds[0]);
	cr_assert_eq(pbrpc__frame_read(&d, fds[1], &f, 10000), PBRPC_EOF);
	pbrpc__frame_decoder_fini(&d);
	close(fds[1]);
	free(bytes);
}

Test(frame, huge_length_over_socket_keeps_buffer_small)
{
	static const uint32_t lens[] = { PBRPC_MAX_FRAME_DEFAULT + 1, 0x80000000u, 0xffffffffu };
	for (size_t t = 0; t < TU_TRANSPORT_COUNT; t++) {
		for (size_t i = 0; i < 3; i++) {
			int fds[2];
			tu_transports[t].pair(fds);
			uint8_t bytes[HS + 100];
			put_header(bytes, lens[i], 1, 0, 0, 1);
			memset(bytes + HS, 0x55, 100);
			tu_write_full(fds[0], bytes, sizeof(bytes));

			pbrpc__frame_decoder d;
			pbrpc__frame f;
			pbrpc__frame_decoder_init(&d, 0);
			cr_assert_eq(pbrpc__frame_read(&d, fds[1], &f, 5000), PBRPC_ETOOBIG, "%s: length %#x",
				     tu_transports[t].name, lens[i]);
			cr_assert_eq(pbrpc__frame_decoder_rejected(&d)->length, lens[i]);
			cr_assert_leq(d.cap, 64 * 1024, "%s: buffer %zu bytes", tu_transports[t].name, d.cap);
			cr_assert_eq(pbrpc__frame_decoder_skip(&d), 0);
			/* the peer leaves mid-payload: the stream ends inside a frame */
			close(fds[0]);
			int rc = pbrpc__frame_read(&d, fds[1], &f, 5000);
			cr_assert_eq(rc, PBRPC_ETRUNCATED, "%s: %s", tu_transports[t].name, pbrpc_strerror(rc));
			cr_assert_leq(d.cap, 64 * 1024);
			pbrpc__frame_decoder_fini(&d);
			close(fds[1]);
		}
	}
}

Test(frame, reserved_bits_over_socket)
{
	int fds[2];
	tu_socketpair(fds);
	uint8_t bytes[HS];
	put_header(bytes, 0, 1, 0, 0x0100, 1);
	tu_write_full(fds[0], vec_hello, sizeof(vec_hello));
	tu_write_full(fds[0], bytes, sizeof(bytes));
	pbrpc__frame_decoder d;
	pbrpc__frame f;
	pbrpc__frame_decoder_init(&d, 0);
	cr_assert_eq(pbrpc__frame_read(&d, fds[1], &f, 5000), 1);
	cr_assert_eq(pbrpc__frame_read(&d, fds[1], &f, 5000), PBRPC_EPROTO);
	pbrpc__frame_decoder_fini(&d);
	close(fds[0]);
	close(fds[1]);
}

/* ---- end of stream ---- */

Test(frame, clean_eof_between_frames)
{
	for (size_t t = 0; t < TU_TRANSPORT_COUNT; t++) {
		int fds[2];
		tu_transports[t].pair(fds);
		pbrpc__frame_header h = { .type = 3, .stream = 9 };
		cr_assert_eq(pbrpc__frame_write(fds[0], &h, "abc", 3, 1000), 0);
		cr_assert_eq(pbrpc__frame_write(fds[0], &h, NULL, 0, 1000), 0);
		close(fds[0]);

		pbrpc__frame_decoder d;
		pbrpc__frame f;
		pbrpc__frame_decoder_init(&d, 0);
		cr_assert_eq(pbrpc__frame_read(&d, fds[1], &f, 5000), 1);
		cr_assert_eq(f.hdr.length, 3);
		cr_assert_arr_eq(f.payload, "abc", 3);
		cr_assert_eq(pbrpc__frame_read(&d, fds[1], &f, 5000), 1);
		cr_assert_eq(f.hdr.length, 0);
		cr_assert_eq(pbrpc__frame_read(&d, fds[1], &f, 5000), PBRPC_EOF, "%s", tu_transports[t].name);
		cr_assert_eq(pbrpc__frame_decoder_recv(&d, fds[1], 0), PBRPC_EOF, "EOF again");
		pbrpc__frame_decoder_fini(&d);
		close(fds[1]);
	}
}

Test(frame, every_header_prefix_then_eof)
{
	for (size_t t = 0; t < TU_TRANSPORT_COUNT; t++) {
		for (size_t k = 0; k < HS; k++) {
			int fds[2];
			tu_transports[t].pair(fds);
			if (k)
				tu_write_full(fds[0], vec_hello, k);
			close(fds[0]);

			pbrpc__frame_decoder d;
			pbrpc__frame f;
			pbrpc__frame_decoder_init(&d, 0);
			int rc = pbrpc__frame_read(&d, fds[1], &f, 5000);
			cr_assert_eq(rc, k ? PBRPC_ETRUNCATED : PBRPC_EOF, "%s, %zu header bytes: got %d (%s)",
				     tu_transports[t].name, k, rc, pbrpc_strerror(rc));
			cr_assert_eq(pbrpc__frame_decoder_pending(&d), k);
			pbrpc__frame_decoder_fini(&d);
			close(fds[1]);
		}
	}
}

Test(frame, truncated_body_then_eof)
{
	for (size_t t = 0; t < TU_TRANSPORT_COUNT; t++) {
		/* a whole frame, then a header announcing 100 bytes and fewer of them */
		static const size_t bodies[] = { 0, 1, 50, 99 };
		for (size_t b = 0; b < sizeof(bodies) / sizeof(bodies[0]); b++) {
			size_t body = bodies[b];
			int fds[2];
			tu_transports[t].pair(fds);
			uint8_t bytes[sizeof(vec_hello) + HS + 99];
			memcpy(bytes, vec_hello, sizeof(vec_hello));
			put_header(bytes + sizeof(vec_hello), 100, 2, 0, 0, 8);
			memset(bytes + sizeof(vec_hello) + HS, 'x', 99);
			tu_write_full(fds[0], bytes, sizeof(vec_hello) + HS + body);
			close(fds[0]);

			pbrpc__frame_decoder d;
			pbrpc__frame f;
			pbrpc__frame_decoder_init(&d, 0);
			cr_assert_eq(pbrpc__frame_read(&d, fds[1], &f, 5000), 1);
			cr_assert_arr_eq(f.payload, "hello", 5);
			int rc = pbrpc__frame_read(&d, fds[1], &f, 5000);
			cr_assert_eq(rc, PBRPC_ETRUNCATED, "%s, %zu body bytes: got %d (%s)", tu_transports[t].name,
				     body, rc, pbrpc_strerror(rc));
			cr_assert_eq(pbrpc__frame_decoder_pending(&d), HS + body);
			pbrpc__frame_decoder_fini(&d);
			close(fds[1]);
		}
	}
}

Test(frame, peer_closes_mid_frame_while_reader_waits)
{
	for (size_t t = 0; t < TU_TRANSPORT_COUNT; t++) {
		int fds[2];
		tu_transports[t].pair(fds);
		uint8_t bytes[HS + 10];
		put_header(bytes, 1000, 2, 0, 0, 8);
		memset(bytes + HS, 'x', 10);
		tu_write_full(fds[0], bytes, sizeof(bytes));

		pbrpc__frame_decoder d;
		pbrpc__frame f;
		pbrpc__frame_decoder_init(&d, 0);
		/* the reader is blocked in the middle of the frame ... */
		cr_assert_eq(pbrpc__frame_read(&d, fds[1], &f, 50), -ETIMEDOUT);
		/* ... when the peer goes away */
		close(fds[0]);
		int rc = pbrpc__frame_read(&d, fds[1], &f, 5000);
		cr_assert_eq(rc, PBRPC_ETRUNCATED, "%s: %s", tu_transports[t].name, pbrpc_strerror(rc));
		pbrpc__frame_decoder_fini(&d);
		close(fds[1]);
	}
}

/* ---- writing to a closed peer ---- */

static volatile sig_atomic_t sigpipes;

static void on_sigpipe(int sig)
{
	sigpipes++;
}

Test(frame, closed_peer_is_epipe_not_sigpipe)
{
	/* SIGPIPE is neither ignored nor blocked here: if the library wrote
	 * without MSG_NOSIGNAL, the handler would count it. */
	struct sigaction sa = { .sa_handler = on_sigpipe };
	sigemptyset(&sa.sa_mask);
	cr_assert_eq(sigaction(SIGPIPE, &sa, NULL), 0);
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGPIPE);
	cr_assert_eq(sigprocmask(SIG_UNBLOCK, &set, NULL), 0);

	pbrpc__frame_header h = { .type = 1, .stream = 1 };
	for (size_t t = 0; t < TU_TRANSPORT_COUNT; t++) {
		const char *name = tu_transports[t].name;
		bool tcp = t == 2;
		int fds[2];
		tu_transports[t].pair(fds);
		close(fds[1]);

		/* TCP learns of the close only from the RST its first write
		 * provokes; Unix sockets know at once. */
		int rc = 0;
		for (int i = 0; i < (tcp ? 100 : 1) && rc == 0; i++) {
			rc = pbrpc__frame_write(fds[0], &h, "x", 1, 1000);
			if (rc == 0)
				usleep(1000);
		}
		if (tcp)
			cr_assert(rc == -EPIPE || rc == -ECONNRESET, "%s: write = %d (%s)", name, rc,
				  pbrpc_strerror(rc));
		else
			cr_assert_eq(rc, -EPIPE, "%s: write = %d (%s)", name, rc, pbrpc_strerror(rc));

		pbrpc__frame_writer w;
		pbrpc__frame_writer_init(&w);
		cr_assert_eq(pbrpc__frame_writer_append(&w, &h, "y", 1), 0);
		ssize_t n = pbrpc__frame_writer_flush(&w, fds[0], MSG_DONTWAIT);
		cr_assert_eq(n, -EPIPE, "%s: flush = %zd (%s)", name, n, pbrpc_strerror((int)n));
		cr_assert_eq(pbrpc__frame_writer_pending(&w), HS + 1, "%s: the failed frame stays queued", name);
		pbrpc__frame_writer_fini(&w);
		close(fds[0]);
	}
	cr_assert_eq(sigpipes, 0, "SIGPIPE raised %d times", (int)sigpipes);
}

/* ---- timeouts ---- */

Test(frame, read_timeout)
{
	int fds[2];
	tu_socketpair(fds);
	pbrpc__frame_decoder d;
	pbrpc__frame f;
	pbrpc__frame_decoder_init(&d, 0);

	int64_t t0 = tu_now_ms();
	cr_assert_eq(pbrpc__frame_read(&d, fds[1], &f, 100), -ETIMEDOUT);
	int64_t ms = tu_now_ms() - t0;
	cr_assert_geq(ms, 99, "returned after %lld ms", (long long)ms);
	cr_assert_lt(ms, 2000, "returned after %lld ms", (long long)ms);
	cr_assert_eq(pbrpc__frame_read(&d, fds[1], &f, 0), -ETIMEDOUT, "0 ms: poll once");

	/* a partial frame times out too, and survives for the next call */
	tu_write_full(fds[0], vec_hello, 7);
	cr_assert_eq(pbrpc__frame_read(&d, fds[1], &f, 50), -ETIMEDOUT);
	cr_assert_eq(pbrpc__frame_decoder_pending(&d), 7);
	tu_write_full(fds[0], vec_hello + 7, sizeof(vec_hello) - 7);
	cr_assert_eq(pbrpc__frame_read(&d, fds[1], &f, -1), 1);
	cr_assert_arr_eq(f.payload, "hello", 5);

	/* data already there: even a 0 ms timeout reads it */
	tu_write_full(fds[0], vec_hello, sizeof(vec_hello));
	cr_assert_eq(pbrpc__frame_read(&d, fds[1], &f, 0), 1);

	pbrpc__frame_decoder_fini(&d);
	close(fds[0]);
	close(fds[1]);
}

Test(frame, write_timeout_on_full_socket)
{
	int fds[2];
	tu_socketpair(fds);
	tu_small_buffers(fds[0]);
	tu_set_nonblock(fds[0], true);
	uint8_t junk[4096] = { 0 };
	while (write(fds[0], junk, sizeof(junk)) > 0)
		;
	while (write(fds[0], junk, 1) > 0)
		;
	pbrpc__frame_header h = { .type = 1 };
	int64_t t0 = tu_now_ms();
	cr_assert_eq(pbrpc__frame_write(fds[0], &h, junk, sizeof(junk), 100), -ETIMEDOUT);
	int64_t ms = tu_now_ms() - t0;
	cr_assert_geq(ms, 99, "returned after %lld ms", (long long)ms);
	cr_assert_lt(ms, 2000, "returned after %lld ms", (long long)ms);
	close(fds[0]);
	close(fds[1]);
}
