/* pbrpc framing layer (private): length-prefixed frames over a reliable
 * byte stream.
 *
 * A frame is a 12-byte header followed by `length` payload bytes:
 *
 *   offset  size  field
 *   0       4     length    payload bytes that follow the header, big-endian
 *   4       1     type      what the payload is (the wire layer defines types)
 *   5       1     flags     per-type bits (the wire layer defines them)
 *   6       2     reserved  zero; a receiver rejects anything else
 *   8       4     stream    big-endian; which call the frame belongs to, 0 = none
 *
 * This layer knows nothing of calls or protobuf: it moves (header, payload) pairs
 * and survives partial reads and writes. All I/O goes through recvmsg/sendmsg so
 * that file descriptors can later travel with a frame (SCM_RIGHTS).
 *
 * Decoder: bytes go in in pieces of any size; complete frames come out. The
 * announced length is checked against the maximum before any allocation.
 * Writer: frames are queued in one contiguous buffer (or packed straight into
 * it) and flushed with sendmsg, resuming after short writes, EAGAIN and EINTR.
 *
 * Neither object is thread-safe; each is used by one thread at a time.
 */
#ifndef PBRPC_PROTO_FRAME_H
#define PBRPC_PROTO_FRAME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "pbrpc/common.h"
#include "pbrpc/error.h"
#include "util/bytes.h"


#define PBRPC_FRAME_HEADER_SIZE 12
/* Default maximum payload (16 MiB) and the hard ceiling (2^31 - 1) are
 * PBRPC_MAX_FRAME_DEFAULT and PBRPC_MAX_FRAME_LIMIT from pbrpc/common.h. */

typedef struct pbrpc__frame_header {
	uint32_t length;
	uint8_t type;
	uint8_t flags;
	uint16_t reserved;
	uint32_t stream;
} pbrpc__frame_header;

/* One decoded frame. `payload` points into the decoder's buffer or into the
 * bytes given to pbrpc__frame_decoder_feed(); it stays valid until the next call
 * on the decoder. */
typedef struct pbrpc__frame {
	pbrpc__frame_header hdr;
	const uint8_t *payload;
} pbrpc__frame;

void pbrpc__frame_header_encode(const pbrpc__frame_header *h,
					    uint8_t out[PBRPC_FRAME_HEADER_SIZE]);
void pbrpc__frame_header_decode(const uint8_t in[PBRPC_FRAME_HEADER_SIZE],
					    pbrpc__frame_header *h);

/* ---- Decoder ------------------------------------------------------------- */

typedef struct pbrpc__frame_decoder {
	/* all fields private */
	uint32_t max_payload;
	bool fd_counts; /* `reserved` is an fd count (feature FDS): not checked here */
	uint8_t *buf; /* buffered bytes are buf[head, tail) */
	size_t cap, head, tail;
	const uint8_t *in; /* bytes given by feed() and not yet consumed */
	size_t in_len;
	uint64_t discard; /* payload bytes still to drop after skip() */
	pbrpc__frame_header rejected; /* header of the last oversized frame */
	int have_rejected;
} pbrpc__frame_decoder;

/* Initialises an embedded decoder that accepts payloads up to max_payload bytes
 * (0 = PBRPC_MAX_FRAME_DEFAULT; values above PBRPC_MAX_FRAME_LIMIT are clamped).
 * Allocates nothing. */
void pbrpc__frame_decoder_init(pbrpc__frame_decoder *d, uint32_t max_payload);

/* Frees the decoder's buffer. The decoder may be initialised again. */
void pbrpc__frame_decoder_fini(pbrpc__frame_decoder *d);

/* Offers `len` bytes at `data` to the decoder without copying them yet. Call
 * pbrpc__frame_decoder_next() until it returns 0 or an error; only then may the
 * caller reuse `data` (next() copies any incomplete tail into the decoder's own
 * buffer before returning 0). Any chunking of a stream yields the same frames. */
void pbrpc__frame_decoder_feed(pbrpc__frame_decoder *d, const void *data, size_t len);

/* Copies the bytes given by feed() and not consumed yet into the decoder's
 * own buffer, so that the caller may stop calling next() early (to apply
 * backpressure) and reuse its buffer. Returns 0 or -ENOMEM. */
int pbrpc__frame_decoder_stash(pbrpc__frame_decoder *d);

/* Yields the next complete frame.
 * Returns 1 and fills *out; 0 when more bytes are needed; or
 *   PBRPC_ETOOBIG  the next frame announces a payload above the maximum. Nothing
 *                  was allocated for it and its header is consumed;
 *                  pbrpc__frame_decoder_rejected() returns that header. Call
 *                  pbrpc__frame_decoder_skip() to drop its payload as it arrives
 *                  and go on, or treat the stream as dead.
 *   PBRPC_EPROTO   the header's reserved field is not zero (stream is dead).
 *   -ENOMEM        buffer growth failed (stream is dead). */
int pbrpc__frame_decoder_next(pbrpc__frame_decoder *d, pbrpc__frame *out);

/* The header that made next() return PBRPC_ETOOBIG, or NULL. */
const pbrpc__frame_header *pbrpc__frame_decoder_rejected(const pbrpc__frame_decoder *d);

/* Drops the payload of the frame rejected with PBRPC_ETOOBIG. Returns 0, or
 * PBRPC_EINVALID when no frame was rejected. */
int pbrpc__frame_decoder_skip(pbrpc__frame_decoder *d);

/* Bytes held that belong to an incomplete frame (0 at a frame boundary). */
size_t pbrpc__frame_decoder_pending(const pbrpc__frame_decoder *d);

/* Bytes the decoder holds or will hold: its buffer, or for a frame in
 * progress whose header has arrived, as much as that whole frame needs (so
 * that a budget can count a frame from its header on). */
size_t pbrpc__frame_decoder_footprint(const pbrpc__frame_decoder *d);

/* Frees the buffer if it holds nothing, so an idle connection costs no buffer.
 * Cheap to call after each batch of reads. */
void pbrpc__frame_decoder_release(pbrpc__frame_decoder *d);

/* Reads from `fd` into the decoder's own buffer with one recvmsg().
 * flags: MSG_DONTWAIT for a non-blocking step on a blocking socket, or 0.
 * Returns the number of bytes read (> 0); 0 when the read would block;
 *   PBRPC_EOF        orderly end of stream at a frame boundary;
 *   PBRPC_ETRUNCATED end of stream inside a frame;
 *   -errno           from recvmsg (EINTR is retried here; ECONNRESET etc.);
 *   PBRPC_EINVALID   bytes from feed() are still unconsumed. */
ssize_t pbrpc__frame_decoder_recv(pbrpc__frame_decoder *d, int fd, int flags);

/* pbrpc__frame_decoder_recv that also takes the fds (SCM_RIGHTS) which came
 * with the bytes into rx (see util/io.h; rx->n is 0 on errors). */
struct pbrpc__io_fds;
ssize_t pbrpc__frame_decoder_recv_fds(pbrpc__frame_decoder *d, int fd, int flags, struct pbrpc__io_fds *rx);

/* ---- Writer -------------------------------------------------------------- */

/* File descriptors to send with one queued frame: `at` is the stream
 * position of its first byte (bytes flushed so far + its offset). */
typedef struct pbrpc__frame_wfds {
	uint64_t at, end; /* the frame's bytes are [at, end) */
	unsigned n;
	int *fds; /* owned: closed once sent, or by fini */
} pbrpc__frame_wfds;

typedef struct pbrpc__frame_writer {
	/* all fields private */
	uint8_t *buf; /* queued bytes are buf[head, tail) */
	size_t cap, head, tail;
	size_t open; /* offset of the header reserved by begin(), or SIZE_MAX */
	size_t open_max;
	uint64_t sent;            /* bytes flushed so far: the stream position of head */
	pbrpc__frame_wfds *fdq;   /* frames that carry fds, in stream order */
	uint32_t fdq_n, fdq_cap;
} pbrpc__frame_writer;

/* Binds n fds to the frame just queued, which starts `at` bytes after the
 * first byte still queued (pbrpc__frame_writer_pending() before it was
 * queued). The writer takes the fds in every case: it sends them with that
 * frame's first byte (SCM_RIGHTS on a sendmsg that starts there and sends
 * nothing past the frame's end, so that the receiver finds them with it) and
 * closes them once sent, or in fini. On -ENOMEM the frame is taken out of
 * the queue again (it must be the last one) and the fds are closed. */
int pbrpc__frame_writer_attach_fds(pbrpc__frame_writer *w, size_t at, const int *fds, unsigned n);

void pbrpc__frame_writer_init(pbrpc__frame_writer *w);
void pbrpc__frame_writer_fini(pbrpc__frame_writer *w);

/* Queues one frame; copies the payload. hdr->length is ignored (len is used).
 * Returns 0, -ENOMEM, or PBRPC_ETOOBIG when len exceeds PBRPC_MAX_FRAME_LIMIT. */
int pbrpc__frame_writer_append(pbrpc__frame_writer *w, const pbrpc__frame_header *hdr,
					   const void *payload, size_t len);

/* Queues bytes that are not a frame (the wire layer's connection preface).
 * Returns 0 or -ENOMEM. */
int pbrpc__frame_writer_append_raw(pbrpc__frame_writer *w, const void *data, size_t len);

/* Reserves room for a frame whose payload is at most max_len bytes and returns
 * where the payload goes, so that it can be packed in place (no extra copy).
 * Finish with pbrpc__frame_writer_commit(); nothing else may be queued between.
 * Returns NULL on allocation failure or if max_len > PBRPC_MAX_FRAME_LIMIT. */
__attribute__((noinline)) uint8_t *pbrpc__frame_writer_begin_slow(pbrpc__frame_writer *w,
								   const pbrpc__frame_header *hdr, size_t max_len);
static inline uint8_t *pbrpc__frame_writer_begin(pbrpc__frame_writer *w, const pbrpc__frame_header *hdr,
						 size_t max_len)
{
	/* Inline when the frame fits the buffer (every frame once it has grown):
	 * the same steps as the slow path, which also grows it. */
	if (__builtin_expect(w->open == SIZE_MAX && max_len <= PBRPC_MAX_FRAME_LIMIT, 1)) {
		if (w->head == w->tail)
			w->head = w->tail = 0;
		if (__builtin_expect(w->cap - w->tail >= PBRPC_FRAME_HEADER_SIZE + max_len, 1)) {
			uint8_t *out = w->buf + w->tail;
			pbrpc__put_u32(out, hdr->length);
			out[4] = hdr->type;
			out[5] = hdr->flags;
			pbrpc__put_u16(out + 6, hdr->reserved);
			pbrpc__put_u32(out + 8, hdr->stream);
			w->open = w->tail;
			w->open_max = max_len;
			return out + PBRPC_FRAME_HEADER_SIZE;
		}
	}
	return pbrpc__frame_writer_begin_slow(w, hdr, max_len);
}

/* Completes the frame opened by begin() with a payload of len <= max_len bytes
 * (writes the header). Returns 0 or PBRPC_EINVALID. */
int pbrpc__frame_writer_commit(pbrpc__frame_writer *w, size_t len);

/* Abandons the frame opened by begin(). */
void pbrpc__frame_writer_abort(pbrpc__frame_writer *w);

/* Bytes queued and not yet written. */
size_t pbrpc__frame_writer_pending(const pbrpc__frame_writer *w);

/* Writes queued bytes to `fd` with sendmsg(MSG_NOSIGNAL | flags), looping until
 * the queue is empty or the socket would block. flags: MSG_DONTWAIT or 0.
 * Returns bytes written (> 0), 0 when nothing could be written (would block or
 * empty queue), or -errno (-EPIPE, -ECONNRESET, ...). EINTR is retried. */
ssize_t pbrpc__frame_writer_flush(pbrpc__frame_writer *w, int fd, int flags);

/* Frees the buffer when the queue is empty and the buffer is larger than
 * `keep` bytes (keep = 0 frees any empty buffer). */
void pbrpc__frame_writer_trim(pbrpc__frame_writer *w, size_t keep);

/* ---- For transports that move the bytes themselves (TLS) ----------------
 * The same buffers as recv() and flush(), without the socket call. */

/* Where the next read should land and how much fits there (*cap), sized as
 * pbrpc__frame_decoder_recv() sizes its reads. NULL (with *cap = 0) when
 * growing failed or bytes from feed() are still unconsumed. Finish with
 * pbrpc__frame_decoder_added(). */
uint8_t *pbrpc__frame_decoder_space(pbrpc__frame_decoder *d, size_t *cap);

/* n bytes (at most *cap of the last space() call) were written there. */
void pbrpc__frame_decoder_added(pbrpc__frame_decoder *d, size_t n);

/* The queued bytes, pbrpc__frame_writer_pending() of them (the writer's
 * buffer: valid until the next call on w). */
const uint8_t *pbrpc__frame_writer_data(const pbrpc__frame_writer *w);

/* The first n queued bytes were written. */
void pbrpc__frame_writer_consumed(pbrpc__frame_writer *w, size_t n);

/* ---- Blocking helpers ----------------------------------------------------
 * For simple programs and tests. They work on blocking and non-blocking
 * sockets alike (waiting with poll() when needed). timeout_ms < 0 waits
 * forever; on timeout they return -ETIMEDOUT. */

/* Writes one whole frame with gathered sendmsg() calls (header and payload in
 * one call when possible). Returns 0 or a negative code. */
int pbrpc__frame_write(int fd, const pbrpc__frame_header *hdr, const void *payload,
				   size_t len, int timeout_ms);

/* Reads until the decoder yields one whole frame. Returns 1 with *out filled
 * (payload valid until the next call on d), or a negative code: PBRPC_EOF,
 * PBRPC_ETRUNCATED, PBRPC_ETOOBIG, PBRPC_EPROTO, -ETIMEDOUT, -errno. */
int pbrpc__frame_read(pbrpc__frame_decoder *d, int fd, pbrpc__frame *out, int timeout_ms);

#endif
