/* libFuzzer target for the frame decoder and writer.
 *
 * Input layout:
 *   byte 0        configuration: bits 0-2 pick the decoder's maximum payload
 *                 (max_table); bit 3 re-encodes with begin/commit instead of
 *                 append; bit 4 reads through pbrpc__frame_decoder_recv() and an
 *                 in-memory I/O shim instead of feed(); bits 5-6 repeat the
 *                 stream (rep_table) so that small inputs make streams long
 *                 enough to wrap and compact the decoder's 64 KiB buffer
 *   byte 1        S = byte % 32, the length of the chunk schedule
 *   S bytes       chunk schedule: chunk i is sched[i % S] bytes; a byte with
 *                 the top bit set means (byte & 0x7f) * 256 bytes; 0 is an empty
 *                 feed (recv: EAGAIN) and 0x80 is EINTR (recv); S = 0 delivers
 *                 the whole stream at once
 *   the rest      the byte stream given to the decoder
 *
 * The harness keeps its own model of the stream (where the next frame starts)
 * and checks each outcome against it: a frame has a legal header, lies wholly
 * inside the bytes delivered so far, carries exactly the stream's bytes, and
 * its payload points into the current chunk or the decoder's buffer; ETOOBIG
 * names the model's header, which exceeds the maximum, and allocated nothing
 * for it; EPROTO means nonzero reserved bits. Every accepted frame is encoded
 * again with the writer and must reproduce the stream's bytes. At the end the
 * decoder holds exactly the bytes the model says are left (or still to skip),
 * and recv() reports PBRPC_EOF at a frame boundary, PBRPC_ETRUNCATED elsewhere.
 *
 * Each fed chunk is copied into its own allocation and freed once next()
 * returns 0, so ASan reports a decoder that keeps a pointer into fed bytes.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "proto/frame.h"
#include "util/io.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define HS PBRPC_FRAME_HEADER_SIZE
#define KiB 1024u

#define CHECK(cond, ...)                                                                       \
	do {                                                                                   \
		if (!(cond)) {                                                                 \
			fprintf(stderr, "fuzz_frame: %s:%d: %s: ", __FILE__, __LINE__, #cond); \
			fprintf(stderr, __VA_ARGS__);                                          \
			fputc('\n', stderr);                                                   \
			abort();                                                               \
		}                                                                              \
	} while (0)

static const uint32_t max_table[8] = { 1, 12, 100, 255, 1000, 4096, 65535, 1u << 20 };
static const size_t rep_table[4] = { 1, 3, 17, 100 };
#define STREAM_MAX (256 * KiB) /* repeated streams are cut here */

/* ---- chunk schedule ---- */

typedef struct schedule {
	const uint8_t *sched;
	size_t n, i;
	bool stalled; /* the previous step delivered nothing */
} schedule;

enum { STEP_BYTES, STEP_EMPTY, STEP_EINTR };

/* The next step: how many bytes to deliver (at most `left`), or an empty step.
 * Two empty steps in a row never happen, so every input terminates. */
static int next_step(schedule *s, size_t left, size_t *len)
{
	if (s->n == 0) {
		*len = left;
		return STEP_BYTES;
	}
	uint8_t b = s->sched[s->i++ % s->n];
	size_t l = (b & 0x80) ? (size_t)(b & 0x7f) * 256 : b;
	if (l == 0 && !s->stalled) {
		s->stalled = true;
		*len = 0;
		return b == 0x80 ? STEP_EINTR : STEP_EMPTY;
	}
	s->stalled = false;
	if (l == 0)
		l = 1;
	*len = l < left ? l : left;
	return STEP_BYTES;
}

/* ---- the model ---- */

typedef struct model {
	const uint8_t *stream;
	size_t len;
	size_t delivered; /* stream bytes given to the decoder so far */
	uint64_t off; /* where the next frame starts (may pass len while skipping) */
	bool dead; /* EPROTO seen */
	uint32_t max;
	bool in_place;
	pbrpc__frame_decoder d;
	pbrpc__frame_writer w;
} model;

static bool header_eq(const pbrpc__frame_header *a, const pbrpc__frame_header *b)
{
	return a->length == b->length && a->type == b->type && a->flags == b->flags &&
	       a->reserved == b->reserved && a->stream == b->stream;
}

/* Queues the frame again and checks that the writer produced the very bytes
 * the frame was decoded from. */
static void reencode(model *m, const pbrpc__frame *f, const uint8_t *orig)
{
	pbrpc__frame_writer *w = &m->w;
	size_t before = pbrpc__frame_writer_pending(w);
	if (m->in_place) {
		uint8_t *p = pbrpc__frame_writer_begin(w, &f->hdr, f->hdr.length);
		CHECK(p != NULL, "begin(%u) failed", f->hdr.length);
		if (f->hdr.length)
			memcpy(p, f->payload, f->hdr.length);
		CHECK(pbrpc__frame_writer_commit(w, f->hdr.length) == 0, "commit failed");
	} else {
		int rc = pbrpc__frame_writer_append(w, &f->hdr, f->payload, f->hdr.length);
		CHECK(rc == 0, "append: %s", pbrpc_strerror(rc));
	}
	size_t total = HS + (size_t)f->hdr.length;
	CHECK(pbrpc__frame_writer_pending(w) == before + total, "writer queued %zu, want %zu",
	      pbrpc__frame_writer_pending(w) - before, total);
	CHECK(memcmp(w->buf + w->tail - total, orig, total) == 0, "re-encoded frame differs");
}

/* Calls next() until it wants more bytes, checking each outcome. */
static void drain(model *m, const uint8_t *chunk, size_t n)
{
	pbrpc__frame_decoder *d = &m->d;
	for (;;) {
		pbrpc__frame f;
		pbrpc__frame_header want;
		size_t cap_before = d->cap;
		int rc = pbrpc__frame_decoder_next(d, &f);
		if (rc == 0)
			return;
		CHECK(m->off + HS <= m->delivered, "%s with only %lld bytes after offset %llu", pbrpc_strerror(rc),
		      (long long)(m->delivered - m->off), (unsigned long long)m->off);
		pbrpc__frame_header_decode(m->stream + m->off, &want);
		if (rc == 1) {
			CHECK(header_eq(&f.hdr, &want), "frame at %llu: header differs", (unsigned long long)m->off);
			CHECK(f.hdr.reserved == 0, "reserved %#x accepted", f.hdr.reserved);
			CHECK(f.hdr.length <= m->max, "frame of %u bytes above max %u", f.hdr.length, m->max);
			CHECK(m->off + HS + f.hdr.length <= m->delivered, "frame at %llu ends beyond the bytes given",
			      (unsigned long long)m->off);
			bool in_chunk = chunk && f.payload >= chunk && f.payload + f.hdr.length <= chunk + n;
			bool in_buf = d->buf && f.payload >= d->buf && f.payload + f.hdr.length <= d->buf + d->tail;
			CHECK(in_chunk || in_buf || f.hdr.length == 0, "payload outside the decoder's bytes");
			CHECK(f.hdr.length == 0 || memcmp(f.payload, m->stream + m->off + HS, f.hdr.length) == 0,
			      "payload at %llu differs", (unsigned long long)m->off);
			reencode(m, &f, m->stream + m->off);
			m->off += HS + f.hdr.length;
		} else if (rc == PBRPC_ETOOBIG) {
			const pbrpc__frame_header *rej = pbrpc__frame_decoder_rejected(d);
			CHECK(rej != NULL, "ETOOBIG without rejected()");
			CHECK(header_eq(rej, &want), "rejected header at %llu differs", (unsigned long long)m->off);
			CHECK(want.length > m->max && want.reserved == 0, "rejected a legal header");
			/* rejected before allocating: the buffer did not grow beyond what it
			 * had or the size of one read */
			CHECK(d->cap <= cap_before || d->cap <= 64 * KiB, "buffer grew from %zu to %zu bytes rejecting %u",
			      cap_before, d->cap, want.length);
			CHECK(pbrpc__frame_decoder_skip(d) == 0, "skip failed");
			CHECK(pbrpc__frame_decoder_skip(d) == PBRPC_EINVALID, "second skip accepted");
			m->off += HS + (uint64_t)want.length;
		} else {
			CHECK(rc == PBRPC_EPROTO, "unexpected %d (%s)", rc, pbrpc_strerror(rc));
			CHECK(want.reserved != 0, "EPROTO for a legal header");
			CHECK(pbrpc__frame_decoder_rejected(d) == NULL, "EPROTO left a rejected header");
			m->dead = true;
			return;
		}
	}
}

/* What the model says the decoder still holds: the partial frame's bytes, or
 * the payload bytes it has yet to skip. */
static uint64_t model_left(const model *m)
{
	return m->off <= m->delivered ? m->delivered - m->off : m->off - m->delivered;
}

/* ---- feed() ---- */

static void run_feed(model *m, schedule *sc)
{
	do {
		size_t n;
		next_step(sc, m->len - m->delivered, &n);
		uint8_t *chunk = malloc(n ? n : 1);
		CHECK(chunk != NULL, "malloc");
		memcpy(chunk, m->stream + m->delivered, n);
		pbrpc__frame_decoder_feed(&m->d, chunk, n);
		m->delivered += n;
		drain(m, chunk, n);
		free(chunk);
	} while (m->delivered < m->len && !m->dead);
}

/* ---- recv() through an in-memory shim ---- */

static struct {
	model *m;
	schedule *sc;
} src;

static ssize_t mem_recvmsg(int fd, struct msghdr *msg, int flags)
{
	model *m = src.m;
	size_t room = 0;
	for (size_t i = 0; i < msg->msg_iovlen; i++)
		room += msg->msg_iov[i].iov_len;
	CHECK(room > 0, "recvmsg with no room");
	if (m->delivered == m->len)
		return 0;
	size_t n;
	switch (next_step(src.sc, m->len - m->delivered, &n)) {
	case STEP_EMPTY:
		errno = EAGAIN;
		return -1;
	case STEP_EINTR:
		errno = EINTR;
		return -1;
	}
	if (n > room)
		n = room;
	size_t done = 0;
	for (size_t i = 0; i < msg->msg_iovlen && done < n; i++) {
		size_t k = msg->msg_iov[i].iov_len < n - done ? msg->msg_iov[i].iov_len : n - done;
		memcpy(msg->msg_iov[i].iov_base, m->stream + m->delivered + done, k);
		done += k;
	}
	m->delivered += n;
	return (ssize_t)n;
}

static ssize_t no_sendmsg(int fd, const struct msghdr *msg, int flags)
{
	errno = EBADF;
	return -1;
}

static const pbrpc__io mem_io = { mem_recvmsg, no_sendmsg };

static void run_recv(model *m, schedule *sc)
{
	src.m = m;
	src.sc = sc;
	pbrpc__io_set(&mem_io);
	/* memory stays bounded by the maximum, however the stream is cut */
	uint64_t cap_bound = 2 * ((uint64_t)HS + m->max + 64 * KiB);
	for (;;) {
		ssize_t n = pbrpc__frame_decoder_recv(&m->d, -1, MSG_DONTWAIT);
		CHECK(m->d.cap <= cap_bound, "buffer of %zu bytes with max %u", m->d.cap, m->max);
		if (n < 0) {
			CHECK(m->delivered == m->len, "recv: %s before the end", pbrpc_strerror((int)n));
			CHECK(n == (model_left(m) ? PBRPC_ETRUNCATED : PBRPC_EOF), "recv at end: %s with %llu left",
			      pbrpc_strerror((int)n), (unsigned long long)model_left(m));
			break;
		}
		drain(m, NULL, 0);
		if (m->dead)
			break;
	}
	pbrpc__io_set(NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 2)
		return 0;
	schedule sc = { data + 2, data[1] % 32, 0, false };
	if (size < 2 + sc.n)
		return 0;
	const uint8_t *stream = data + 2 + sc.n;
	size_t len = size - 2 - sc.n;
	size_t reps = rep_table[(data[0] >> 5) & 3];
	uint8_t *copy = NULL;
	if (reps > 1 && len > 0) {
		if (reps > STREAM_MAX / len)
			reps = STREAM_MAX / len > 1 ? STREAM_MAX / len : 1;
		copy = malloc(len * reps);
		CHECK(copy != NULL, "malloc");
		for (size_t i = 0; i < reps; i++)
			memcpy(copy + i * len, stream, len);
		stream = copy;
		len *= reps;
	}
	model m = {
		.stream = stream,
		.len = len,
		.max = max_table[data[0] & 7],
		.in_place = data[0] & 8,
	};
	pbrpc__frame_decoder_init(&m.d, m.max);
	pbrpc__frame_writer_init(&m.w);
	CHECK(m.d.max_payload == m.max, "max_payload %u, want %u", m.d.max_payload, m.max);

	if (data[0] & 16)
		run_recv(&m, &sc);
	else
		run_feed(&m, &sc);

	if (!m.dead) {
		CHECK(pbrpc__frame_decoder_pending(&m.d) == model_left(&m), "pending %zu, model says %llu",
		      pbrpc__frame_decoder_pending(&m.d), (unsigned long long)model_left(&m));
		if (m.off >= m.delivered) {
			pbrpc__frame_decoder_release(&m.d);
			CHECK(m.d.buf == NULL, "release kept a buffer at a frame boundary");
		}
	}
	pbrpc__frame_decoder_fini(&m.d);
	pbrpc__frame_writer_fini(&m.w);
	free(copy);
	return 0;
}
