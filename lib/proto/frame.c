#include "proto/frame.h"

#include <errno.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "util/bytes.h"
#include "util/clock.h"
#include "util/io.h"

/* ---- header ---- */

void pbrpc__frame_header_encode(const pbrpc__frame_header *h, uint8_t out[PBRPC_FRAME_HEADER_SIZE])
{
	pbrpc__put_u32(out, h->length);
	out[4] = h->type;
	out[5] = h->flags;
	pbrpc__put_u16(out + 6, h->reserved);
	pbrpc__put_u32(out + 8, h->stream);
}

void pbrpc__frame_header_decode(const uint8_t in[PBRPC_FRAME_HEADER_SIZE], pbrpc__frame_header *h)
{
	h->length = pbrpc__get_u32(in);
	h->type = in[4];
	h->flags = in[5];
	h->reserved = pbrpc__get_u16(in + 6);
	h->stream = pbrpc__get_u32(in + 8);
}

/* ---- decoder ---- */

/* Read size for a fresh buffer: large enough that small frames arrive many per
 * recvmsg, small enough that a busy connection does not hoard memory. */
#define DECODER_CHUNK (64u * 1024u)

void pbrpc__frame_decoder_init(pbrpc__frame_decoder *d, uint32_t max_payload)
{
	memset(d, 0, sizeof(*d));
	if (max_payload == 0)
		max_payload = PBRPC_MAX_FRAME_DEFAULT;
	if (max_payload > PBRPC_MAX_FRAME_LIMIT)
		max_payload = PBRPC_MAX_FRAME_LIMIT;
	d->max_payload = max_payload;
}

void pbrpc__frame_decoder_fini(pbrpc__frame_decoder *d)
{
	free(d->buf);
	d->buf = NULL;
	d->cap = d->head = d->tail = 0;
	d->in = NULL;
	d->in_len = 0;
}

/* Makes room for `need` bytes after tail, compacting or growing the buffer. */
/* Makes room for `need` bytes after tail, compacting or growing the buffer.
 * Growth doubles, but never past `frame` bytes in all when the frame being
 * assembled is known to be that long (0: unknown), so memory follows the
 * bytes a peer actually sends, not the length it announces. */
static int decoder_reserve(pbrpc__frame_decoder *d, size_t need, size_t frame)
{
	size_t used = d->tail - d->head;
	if (d->cap - d->tail >= need)
		return 0;
	if (d->head > 0 && d->cap - used >= need) {
		memmove(d->buf, d->buf + d->head, used);
		d->tail = used;
		d->head = 0;
		return 0;
	}
	size_t cap = d->cap ? d->cap : DECODER_CHUNK;
	while (cap < used + need)
		cap *= 2;
	if (frame && cap > frame && frame >= used + need)
		cap = frame;
	if (d->head > 0) {
		memmove(d->buf, d->buf + d->head, used);
		d->tail = used;
		d->head = 0;
	}
	uint8_t *nb = realloc(d->buf, cap);
	if (!nb)
		return -ENOMEM;
	d->buf = nb;
	d->cap = cap;
	return 0;
}

static size_t take_input(pbrpc__frame_decoder *d, size_t want)
{
	size_t n = want < d->in_len ? want : d->in_len;
	if (n) {
		memcpy(d->buf + d->tail, d->in, n);
		d->tail += n;
		d->in += n;
		d->in_len -= n;
	}
	return n;
}

static void drop_discarded(pbrpc__frame_decoder *d)
{
	size_t buffered = d->tail - d->head;
	size_t n = d->discard < buffered ? (size_t)d->discard : buffered;
	d->head += n;
	d->discard -= n;
	n = d->discard < d->in_len ? (size_t)d->discard : d->in_len;
	/* On the recv() path nothing was fed and d->in is NULL; NULL + 0 is
	 * undefined in C (clang's UBSan reports it), so only move it for n > 0. */
	if (n) {
		d->in += n;
		d->in_len -= n;
		d->discard -= n;
	}
}

static int check_header(pbrpc__frame_decoder *d, const uint8_t *p, pbrpc__frame_header *h)
{
	pbrpc__frame_header_decode(p, h);
	if (h->reserved != 0 && !d->fd_counts)
		return PBRPC_EPROTO;
	if (h->length > d->max_payload) {
		d->rejected = *h;
		d->have_rejected = 1;
		return PBRPC_ETOOBIG;
	}
	return 0;
}

void pbrpc__frame_decoder_feed(pbrpc__frame_decoder *d, const void *data, size_t len)
{
	d->in = data;
	d->in_len = len;
}

int pbrpc__frame_decoder_stash(pbrpc__frame_decoder *d)
{
	if (!d->in_len)
		return 0;
	if (d->discard) {
		drop_discarded(d);
		if (!d->in_len)
			return 0;
	}
	if (decoder_reserve(d, d->in_len, 0) < 0)
		return -ENOMEM;
	take_input(d, d->in_len);
	return 0;
}

int pbrpc__frame_decoder_next(pbrpc__frame_decoder *d, pbrpc__frame *out)
{
	pbrpc__frame_header h;
	int rc;

	if (d->head == d->tail)
		d->head = d->tail = 0;
	if (d->discard) {
		drop_discarded(d);
		if (d->discard)
			return 0;
	}
	d->have_rejected = 0;

	size_t buffered = d->tail - d->head;
	if (buffered == 0 && d->in_len == 0)
		return 0;
	if (buffered == 0 && d->in_len >= PBRPC_FRAME_HEADER_SIZE) {
		/* Fast path: parse straight from the caller's bytes, no copy. */
		rc = check_header(d, d->in, &h);
		if (rc < 0) {
			if (rc == PBRPC_ETOOBIG) {
				d->in += PBRPC_FRAME_HEADER_SIZE;
				d->in_len -= PBRPC_FRAME_HEADER_SIZE;
			}
			return rc;
		}
		size_t total = PBRPC_FRAME_HEADER_SIZE + (size_t)h.length;
		if (d->in_len >= total) {
			out->hdr = h;
			out->payload = d->in + PBRPC_FRAME_HEADER_SIZE;
			d->in += total;
			d->in_len -= total;
			return 1;
		}
		if (decoder_reserve(d, d->in_len, total) < 0)
			return -ENOMEM;
		take_input(d, d->in_len);
		return 0;
	}

	if (buffered < PBRPC_FRAME_HEADER_SIZE) {
		if (decoder_reserve(d, PBRPC_FRAME_HEADER_SIZE - buffered, 0) < 0)
			return -ENOMEM;
		buffered += take_input(d, PBRPC_FRAME_HEADER_SIZE - buffered);
		if (buffered < PBRPC_FRAME_HEADER_SIZE)
			return 0;
	}
	rc = check_header(d, d->buf + d->head, &h);
	if (rc < 0) {
		if (rc == PBRPC_ETOOBIG)
			d->head += PBRPC_FRAME_HEADER_SIZE;
		return rc;
	}
	size_t total = PBRPC_FRAME_HEADER_SIZE + (size_t)h.length;
	if (buffered < total) {
		size_t avail = total - buffered < d->in_len ? total - buffered : d->in_len;
		if (avail && decoder_reserve(d, avail, d->head + total) < 0)
			return -ENOMEM;
		buffered += take_input(d, total - buffered);
		if (buffered < total)
			return 0;
	}
	out->hdr = h;
	out->payload = d->buf + d->head + PBRPC_FRAME_HEADER_SIZE;
	d->head += total;
	return 1;
}

const pbrpc__frame_header *pbrpc__frame_decoder_rejected(const pbrpc__frame_decoder *d)
{
	return d->have_rejected ? &d->rejected : NULL;
}

int pbrpc__frame_decoder_skip(pbrpc__frame_decoder *d)
{
	if (!d->have_rejected)
		return PBRPC_EINVALID;
	d->have_rejected = 0;
	d->discard = d->rejected.length;
	drop_discarded(d);
	return 0;
}

size_t pbrpc__frame_decoder_pending(const pbrpc__frame_decoder *d)
{
	return d->tail - d->head + d->in_len + (size_t)d->discard;
}

size_t pbrpc__frame_decoder_footprint(const pbrpc__frame_decoder *d)
{
	size_t buffered = d->tail - d->head;
	if (buffered < PBRPC_FRAME_HEADER_SIZE || d->discard)
		return d->cap;
	size_t total = PBRPC_FRAME_HEADER_SIZE + (size_t)pbrpc__get_u32(d->buf + d->head);
	if (total <= buffered || d->head + total <= d->cap)
		return d->cap;
	return d->head + total;
}

void pbrpc__frame_decoder_release(pbrpc__frame_decoder *d)
{
	if (d->head == d->tail && d->buf) {
		free(d->buf);
		d->buf = NULL;
		d->cap = d->head = d->tail = 0;
	}
}

/* Makes room at the tail for the next read: a chunk, or for a large frame in
 * progress as much again as we hold of it (doubling as its bytes arrive,
 * never past its end). Returns 0 or -ENOMEM. */
static int decoder_make_room(pbrpc__frame_decoder *d)
{
	size_t want = DECODER_CHUNK / 2, frame = 0;
	size_t buffered = d->tail - d->head;
	if (buffered >= PBRPC_FRAME_HEADER_SIZE && !d->discard) {
		uint32_t len = pbrpc__get_u32(d->buf + d->head);
		size_t total = PBRPC_FRAME_HEADER_SIZE + (size_t)len;
		if (len <= d->max_payload && total > buffered) {
			size_t rest = total - buffered;
			size_t grow = buffered > want ? buffered : want;
			want = rest < grow ? rest : grow;
			frame = total;
		}
	}
	if (d->head == d->tail)
		d->head = d->tail = 0;
	return decoder_reserve(d, want, frame ? d->head + frame : 0);
}

static ssize_t decoder_recv(pbrpc__frame_decoder *d, int fd, int flags, struct pbrpc__io_fds *rx)
{
	if (d->in_len)
		return PBRPC_EINVALID;
	if (decoder_make_room(d) < 0)
		return -ENOMEM;

	ssize_t n = rx ? pbrpc__io_recv_fds(fd, d->buf + d->tail, d->cap - d->tail, flags, rx)
		       : pbrpc__io_recv(fd, d->buf + d->tail, d->cap - d->tail, flags);
	if (n <= 0)
		return n == PBRPC_EOF && pbrpc__frame_decoder_pending(d) ? PBRPC_ETRUNCATED : n;
	d->tail += (size_t)n;
	if (d->discard)
		drop_discarded(d);
	return n;
}

ssize_t pbrpc__frame_decoder_recv(pbrpc__frame_decoder *d, int fd, int flags)
{
	return decoder_recv(d, fd, flags, NULL);
}

ssize_t pbrpc__frame_decoder_recv_fds(pbrpc__frame_decoder *d, int fd, int flags, struct pbrpc__io_fds *rx)
{
	return decoder_recv(d, fd, flags, rx);
}

/* ---- writer ---- */

void pbrpc__frame_writer_init(pbrpc__frame_writer *w)
{
	memset(w, 0, sizeof(*w));
	w->open = SIZE_MAX;
}

void pbrpc__frame_writer_fini(pbrpc__frame_writer *w)
{
	for (size_t i = 0; i < w->fdq_n; i++) {
		pbrpc__io_close_fds(w->fdq[i].fds, w->fdq[i].n);
		free(w->fdq[i].fds);
	}
	free(w->fdq);
	free(w->buf);
	pbrpc__frame_writer_init(w);
}

int pbrpc__frame_writer_attach_fds(pbrpc__frame_writer *w, size_t at, const int *fds, unsigned n)
{
	if (n == 0)
		return 0;
	int *copy = NULL;
	if (n > PBRPC__IO_FDS_MAX)
		goto fail;
	if (w->fdq_n == w->fdq_cap) {
		uint32_t cap = w->fdq_cap ? 2 * w->fdq_cap : 4;
		pbrpc__frame_wfds *nq = realloc(w->fdq, cap * sizeof(*nq));
		if (!nq)
			goto fail;
		w->fdq = nq;
		w->fdq_cap = cap;
	}
	copy = malloc(n * sizeof(int));
	if (!copy)
		goto fail;
	memcpy(copy, fds, n * sizeof(int));
	w->fdq[w->fdq_n++] = (pbrpc__frame_wfds){ .at = w->sent + at, .end = w->sent + (w->tail - w->head), .n = n,
						   .fds = copy };
	return 0;
fail:
	pbrpc__io_close_fds(fds, n);
	w->tail = w->head + at; /* the frame's count would announce fds that never come */
	return -ENOMEM;
}

/* The next sendmsg when frames with fds are queued: plain bytes up to the
 * first of them, or that frame with its fds up to the next one. */
static size_t writer_fd_cut(const pbrpc__frame_writer *w, size_t len, struct msghdr *msg, void *ctl, bool *with)
{
	const pbrpc__frame_wfds *q = &w->fdq[0];
	*with = false;
	if (q->at > w->sent)
		return q->at - w->sent < len ? (size_t)(q->at - w->sent) : len;
	if (q->end - w->sent < len)
		len = (size_t)(q->end - w->sent); /* nothing after the frame rides with its fds */
	msg->msg_control = ctl;
	msg->msg_controllen = CMSG_SPACE(q->n * sizeof(int));
	struct cmsghdr *cm = CMSG_FIRSTHDR(msg);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(q->n * sizeof(int));
	memcpy(CMSG_DATA(cm), q->fds, q->n * sizeof(int));
	*with = true;
	return len;
}

static void writer_fds_sent(pbrpc__frame_writer *w)
{
	pbrpc__io_close_fds(w->fdq[0].fds, w->fdq[0].n);
	free(w->fdq[0].fds);
	memmove(w->fdq, w->fdq + 1, (w->fdq_n - 1) * sizeof(*w->fdq));
	w->fdq_n--;
}

static int writer_reserve(pbrpc__frame_writer *w, size_t need)
{
	size_t used = w->tail - w->head;
	if (w->cap - w->tail >= need)
		return 0;
	if (w->head > 0 && w->cap - used >= need && w->open == SIZE_MAX) {
		memmove(w->buf, w->buf + w->head, used);
		w->head = 0;
		w->tail = used;
		return 0;
	}
	size_t cap = w->cap ? w->cap : 4096;
	while (cap < w->tail + need)
		cap *= 2;
	uint8_t *nb = realloc(w->buf, cap);
	if (!nb)
		return -ENOMEM;
	w->buf = nb;
	w->cap = cap;
	return 0;
}

uint8_t *pbrpc__frame_writer_begin_slow(pbrpc__frame_writer *w, const pbrpc__frame_header *hdr, size_t max_len)
{
	if (max_len > PBRPC_MAX_FRAME_LIMIT || w->open != SIZE_MAX)
		return NULL;
	if (w->head == w->tail)
		w->head = w->tail = 0;
	if (writer_reserve(w, PBRPC_FRAME_HEADER_SIZE + max_len) < 0)
		return NULL;
	pbrpc__frame_header_encode(hdr, w->buf + w->tail);
	w->open = w->tail;
	w->open_max = max_len;
	return w->buf + w->tail + PBRPC_FRAME_HEADER_SIZE;
}

int pbrpc__frame_writer_commit(pbrpc__frame_writer *w, size_t len)
{
	if (w->open == SIZE_MAX || len > w->open_max)
		return PBRPC_EINVALID;
	pbrpc__put_u32(w->buf + w->open, (uint32_t)len);
	w->tail = w->open + PBRPC_FRAME_HEADER_SIZE + len;
	w->open = SIZE_MAX;
	return 0;
}

void pbrpc__frame_writer_abort(pbrpc__frame_writer *w)
{
	w->open = SIZE_MAX;
}

int pbrpc__frame_writer_append(pbrpc__frame_writer *w, const pbrpc__frame_header *hdr, const void *payload,
					   size_t len)
{
	if (len > PBRPC_MAX_FRAME_LIMIT)
		return PBRPC_ETOOBIG;
	uint8_t *p = pbrpc__frame_writer_begin(w, hdr, len);
	if (!p)
		return w->open != SIZE_MAX ? PBRPC_EINVALID : -ENOMEM;
	if (len)
		memcpy(p, payload, len);
	return pbrpc__frame_writer_commit(w, len);
}

int pbrpc__frame_writer_append_raw(pbrpc__frame_writer *w, const void *data, size_t len)
{
	if (w->open != SIZE_MAX)
		return PBRPC_EINVALID;
	if (len == 0)
		return 0;
	if (writer_reserve(w, len) < 0)
		return -ENOMEM;
	memcpy(w->buf + w->tail, data, len);
	w->tail += len;
	return 0;
}

size_t pbrpc__frame_writer_pending(const pbrpc__frame_writer *w)
{
	return w->tail - w->head;
}

/* pbrpc__frame_writer_flush's general case: fds to send, a partial write, a
 * signal. `total`: bytes the caller already sent. Out of line, so that the
 * usual case needs neither its stack frame nor its control buffer. */
static __attribute__((noinline)) ssize_t writer_flush_loop(pbrpc__frame_writer *w, int fd, int flags, size_t total)
{
	while (w->tail > w->head) {
		struct iovec iov = { w->buf + w->head, w->tail - w->head };
		struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
		union {
			struct cmsghdr align;
			char buf[CMSG_SPACE(sizeof(int) * PBRPC__IO_FDS_MAX)];
		} ctl;
		bool with = false;
		if (__builtin_expect(w->fdq_n != 0, 0))
			iov.iov_len = writer_fd_cut(w, iov.iov_len, &msg, ctl.buf, &with);
		ssize_t n = pbrpc__sendmsg(fd, &msg, flags);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				break;
			return total ? (ssize_t)total : -errno;
		}
		if (n == 0)
			break; /* no progress: treat as would-block rather than spin */
		if (with)
			writer_fds_sent(w); /* they went with the first byte */
		w->head += (size_t)n;
		w->sent += (size_t)n;
		total += (size_t)n;
	}
	if (w->head == w->tail && w->open == SIZE_MAX)
		w->head = w->tail = 0;
	return (ssize_t)total;
}

ssize_t pbrpc__frame_writer_flush(pbrpc__frame_writer *w, int fd, int flags)
{
	if (__builtin_expect(w->fdq_n == 0 && w->tail > w->head, 1)) {
		/* The usual case: no fds queued, one send takes everything. */
		struct iovec iov = { w->buf + w->head, w->tail - w->head };
		struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
		ssize_t n = pbrpc__sendmsg(fd, &msg, flags);
		if (__builtin_expect(n == (ssize_t)iov.iov_len, 1)) {
			w->sent += (size_t)n;
			w->head = w->tail;
			if (w->open == SIZE_MAX)
				w->head = w->tail = 0;
			return n;
		}
		if (n < 0 && errno != EINTR)
			return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -errno;
		if (n == 0)
			return 0; /* no progress: as writer_flush_loop */
		size_t total = 0;
		if (n > 0) {
			w->head += (size_t)n;
			w->sent += (size_t)n;
			total = (size_t)n;
		}
		return writer_flush_loop(w, fd, flags, total);
	}
	return writer_flush_loop(w, fd, flags, 0);
}

void pbrpc__frame_writer_trim(pbrpc__frame_writer *w, size_t keep)
{
	if (w->head == w->tail && w->open == SIZE_MAX && w->cap > keep) {
		free(w->buf);
		w->buf = NULL;
		w->cap = w->head = w->tail = 0;
	}
}

/* ---- for transports that move the bytes themselves ---- */

uint8_t *pbrpc__frame_decoder_space(pbrpc__frame_decoder *d, size_t *cap)
{
	*cap = 0;
	if (d->in_len || decoder_make_room(d) < 0)
		return NULL;
	*cap = d->cap - d->tail;
	return d->buf + d->tail;
}

void pbrpc__frame_decoder_added(pbrpc__frame_decoder *d, size_t n)
{
	d->tail += n;
	if (d->discard)
		drop_discarded(d);
}

const uint8_t *pbrpc__frame_writer_data(const pbrpc__frame_writer *w)
{
	return w->buf + w->head;
}

void pbrpc__frame_writer_consumed(pbrpc__frame_writer *w, size_t n)
{
	w->head += n;
	if (w->head == w->tail && w->open == SIZE_MAX)
		w->head = w->tail = 0;
}

/* ---- blocking helpers ---- */

int pbrpc__frame_write(int fd, const pbrpc__frame_header *hdr, const void *payload, size_t len,
				   int timeout_ms)
{
	if (len > PBRPC_MAX_FRAME_LIMIT)
		return PBRPC_ETOOBIG;
	uint8_t head[PBRPC_FRAME_HEADER_SIZE];
	pbrpc__frame_header h = *hdr;
	h.length = (uint32_t)len;
	pbrpc__frame_header_encode(&h, head);

	pbrpc__deadline deadline = pbrpc__deadline_in(pbrpc__now_ns(), timeout_ms);
	struct iovec iov[2] = { { head, sizeof(head) }, { (void *)(uintptr_t)payload, len } };
	size_t idx = 0, niov = len ? 2 : 1;
	while (idx < niov) {
		struct msghdr msg = { .msg_iov = iov + idx, .msg_iovlen = niov - idx };
		ssize_t n = pbrpc__sendmsg(fd, &msg, MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				return -errno;
			int r = pbrpc__io_wait(fd, POLLOUT, deadline);
			if (r < 0)
				return r;
			continue;
		}
		size_t done = (size_t)n;
		while (idx < niov && done >= iov[idx].iov_len) {
			done -= iov[idx].iov_len;
			idx++;
		}
		if (idx < niov) {
			iov[idx].iov_base = (uint8_t *)iov[idx].iov_base + done;
			iov[idx].iov_len -= done;
		}
	}
	return 0;
}

int pbrpc__frame_read(pbrpc__frame_decoder *d, int fd, pbrpc__frame *out, int timeout_ms)
{
	pbrpc__deadline deadline = pbrpc__deadline_in(pbrpc__now_ns(), timeout_ms);
	for (;;) {
		int rc = pbrpc__frame_decoder_next(d, out);
		if (rc != 0)
			return rc;
		ssize_t n = pbrpc__frame_decoder_recv(d, fd, MSG_DONTWAIT);
		if (n < 0)
			return (int)n;
		if (n == 0) {
			int r = pbrpc__io_wait(fd, POLLIN, deadline);
			if (r < 0)
				return r;
		}
	}
}
