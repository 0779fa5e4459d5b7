/* The server's loop: one epoll set for listeners, connections and the
 * wake-up eventfd; reads into the loop's scratch buffer; one flush per dirty
 * connection per batch; timers; graceful and forced drain. */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "server/server_impl.h"

#define READS_PER_WAKEUP 16
#define SWEEP_INTERVAL_NS PBRPC__NS_PER_S

/* ---- connection bookkeeping ---- */

/* OpenSSL holds bytes (or an error) that epoll will not report: read the
 * connection again at the end of this round. */
static void tls_again(srv_conn *c, uint32_t ev)
{
	if ((ev & EPOLLIN) && !pbrpc__list_linked(&c->again) && pbrpc__conn_buffered(&c->base))
		pbrpc__list_append(&c->srv->again, &c->again);
}

static void update_events(srv_conn *c)
{
	uint32_t ev = pbrpc__conn_events(&c->base);
	if (__builtin_expect(c->base.tls != NULL, 0))
		tls_again(c, ev);
	if (ev == c->events || pbrpc__conn_closed(&c->base))
		return;
	struct epoll_event e = { .events = ev, .data.ptr = c };
	epoll_ctl(c->srv->epfd, EPOLL_CTL_MOD, c->base.fd, &e);
	c->events = ev;
}

/* The connection's timer follows its state (handshake, idle, stall,
 * keepalive, age). A
 * connection with no timed policy and no timer armed skips the derivation:
 * the common case costs one test per flush. */
static void rearm(srv_conn *c)
{
	const pbrpc__conn *b = &c->base;
	if (!b->idle_ns && !b->read_paused && b->state == PBRPC__CONN_OPEN && !pbrpc__timer_armed(&c->timer) &&
	    !b->ka_interval_ns && !b->age_at)
		return;
	pbrpc__deadline d = pbrpc__conn_deadline(b);
	if (!d)
		pbrpc__heap_stop(&c->srv->timers, &c->timer);
	else if (!pbrpc__timer_armed(&c->timer) || d < c->timer.when)
		pbrpc__heap_start(&c->srv->timers, &c->timer, d);
	/* A later deadline leaves the timer armed where it is: it fires early,
	 * expire finds nothing due and rearm moves it then. A busy connection's
	 * idle and keepalive deadlines move with every read: one heap move per
	 * interval, not one per read. */
}

/* ---- the memory budget ---- */

/* Brings the server's count of a connection's buffers up to date: its
 * decoder (a frame in progress counts whole from its header on) and its
 * writer. Called after each read and flush, and when buffers are freed. */
static void mem_sample_slow(srv_conn *c)
{
	pbrpc__conn *b = &c->base;
	if (b->dec.cap > SRV_BUF_KEEP && !pbrpc__frame_decoder_pending(&b->dec)) {
		pbrpc__frame_decoder_release(&b->dec); /* a large frame's buffer goes once handled */
		c->srv->trim = true;
	}
	size_t m = pbrpc__frame_decoder_footprint(&b->dec) + b->out.cap;
	c->srv->mem_used += m - c->mem_io;
	c->mem_used += m - c->mem_io;
	c->mem_io = m;
}

/* After it, a decoder above SRV_BUF_KEEP holds a frame in progress. */
static inline void mem_sample(srv_conn *c)
{
	const pbrpc__conn *b = &c->base;
	if (b->dec.tail != b->dec.head || b->dec.cap + b->out.cap != c->mem_io)
		mem_sample_slow(c); /* a frame in progress, or a buffer changed */
}

/* Before a read: refuse frames larger than the budget's room from their
 * header on, and stop reading a connection once less than SRV_MEM_MIN is
 * left (unless it is in the middle of a frame already counted). */
static bool mem_admit_slow(srv_conn *c)
{
	size_t avail = pbrpc__srv_mem_avail(c);
	if (avail < SRV_MEM_MIN) {
		if (!pbrpc__frame_decoder_pending(&c->base.dec)) {
			c->base.mem_paused = true;
			c->srv->mem_paused++;
			return false;
		}
		avail = SRV_MEM_MIN;
	}
	pbrpc__conn_admit(&c->base, avail);
	return true;
}

static inline bool mem_admit(srv_conn *c)
{
	const pbrpc_server *srv = c->srv;
	if (srv->mem_used < srv->mem_easy && c->mem_used < srv->conn_easy) {
		c->base.dec.max_payload = c->base.max_frame;
		return true;
	}
	return mem_admit_slow(c);
}

/* Connections paused for memory are read again once there is room. */
static void mem_resume(pbrpc_server *srv)
{
	pbrpc__list_for_each(c, &srv->conns, srv_conn, link) {
		if (c->base.mem_paused && pbrpc__srv_mem_avail(c) >= SRV_MEM_MIN) {
			c->base.mem_paused = false;
			srv->mem_paused--;
			update_events(c);
		}
	}
}

void pbrpc__srv_mark_dirty(srv_conn *c)
{
	if (!pbrpc__list_linked(&c->dirty))
		pbrpc__list_append(&c->srv->dirty, &c->dirty);
}

/* on_close's last step: the fd goes now, the record at the next reap. */
void pbrpc__srv_conn_closed(srv_conn *c)
{
	pbrpc_server *srv = c->srv;
	epoll_ctl(srv->epfd, EPOLL_CTL_DEL, c->base.fd, NULL);
	close(c->base.fd);
	c->base.fd = -1;
	pbrpc__heap_stop(&srv->timers, &c->timer);
	if (c->base.mem_paused) {
		c->base.mem_paused = false;
		srv->mem_paused--;
	}
	SRV_STAT_ADD(srv, connections_open, -1);
	srv->reap_pending = true;
	pbrpc__srv_conn_gone(srv);
	if (srv->accept_paused)
		pbrpc__srv_accept_resume(srv); /* out of fds: one just came free (root's
		                                * backoff timer notices other loops') */
}

void pbrpc__srv_conn_free(srv_conn *c)
{
	pbrpc__list_remove(&c->link);
	pbrpc__list_remove(&c->dirty);
	pbrpc__list_remove(&c->again);
	if (c->mem_io > SRV_BUF_KEEP)
		c->srv->trim = true;
	c->srv->mem_used -= c->mem_io; /* its calls count until put back */
	pbrpc__conn_fini(&c->base);
	free(c);
}

/* Writes what is queued; closes a connection whose drain is complete. */
static void conn_flush(srv_conn *c)
{
	if (pbrpc__conn_closed(&c->base))
		return;
	ssize_t n = pbrpc__conn_flush(&c->base, c->srv->now);
	if (n < 0) {
		pbrpc__conn_close(&c->base, (int)n, "connection lost: write failed: %s", pbrpc_strerror((int)n));
		return;
	}
	if (pbrpc__conn_drained(&c->base)) {
		pbrpc__conn_close(&c->base, 0, "drained");
		return;
	}
	if (c->base.state != PBRPC__CONN_OPEN && !pbrpc__conn_pending_out(&c->base))
		pbrpc__frame_writer_trim(&c->base.out, 0); /* the preface is out: idle handshakes hold no buffer */
	if (c->base.out.cap > SRV_BUF_KEEP && !pbrpc__conn_pending_out(&c->base)) {
		pbrpc__frame_writer_trim(&c->base.out, 0); /* a large reply's buffer goes once it is out */
		c->srv->trim = true;
	}
	mem_sample(c);
	update_events(c);
	rearm(c);
}

static void flush_dirty(pbrpc_server *srv)
{
	pbrpc__list *l;
	while ((l = pbrpc__list_first(&srv->dirty)) != NULL) {
		pbrpc__list_remove(l);
		srv_conn *c = pbrpc__container_of(l, srv_conn, dirty);
		conn_flush(c);
		if (c->base.resume && !pbrpc__conn_closed(&c->base)) {
			/* Requests stashed while paused: they may be all the peer
			 * sends, so no read event would bring them back. */
			pbrpc__conn_dispatch(&c->base, NULL);
			pbrpc__srv_mark_dirty(c);
		}
	}
}

/* ---- reading ---- */

/* A request larger than the scratch buffer is split between it and the
 * connection's decoder: a copy and more, smaller reads, and at 1 MiB over TCP
 * a third more CPU on both sides (docs/BENCHMARKS.md). Once such a request has
 * arrived whole (so memory follows bytes a peer sent, not lengths it
 * announced), the scratch buffer grows to twice its size, so that the next one
 * is read in one go, as a baseline's 2x buffer does; the sweep gives the
 * memory back once large requests stop. Called when the scratch buffer holds
 * nothing still needed. */
static void scratch_fit(pbrpc_server *srv)
{
	size_t want = srv->scratch_want;
	srv->scratch_want = 0;
	if (want <= srv->scratch_cap)
		return;
	uint8_t *nb = malloc(want);
	if (!nb)
		return;
	srv->mem_used += want - srv->scratch_cap;
	free(srv->scratch);
	srv->scratch = nb;
	srv->scratch_cap = want;
}

static void scratch_sweep(pbrpc_server *srv)
{
	if (srv->scratch_cap > SRV_SCRATCH_SIZE && srv->scratch_used <= SRV_SCRATCH_SIZE) {
		uint8_t *nb = malloc(SRV_SCRATCH_SIZE);
		if (nb) {
			srv->trim = true;
			srv->mem_used -= srv->scratch_cap - SRV_SCRATCH_SIZE;
			free(srv->scratch);
			srv->scratch = nb;
			srv->scratch_cap = SRV_SCRATCH_SIZE;
		}
	}
	srv->scratch_used = 0;
}

static void conn_read(srv_conn *c)
{
	pbrpc_server *srv = c->srv;
	pbrpc__conn *b = &c->base;
	for (int round = 0; round < READS_PER_WAKEUP && !pbrpc__conn_closed(b) && !b->read_paused && !b->read_eof;
	     round++) {
		if (round)
			mem_sample(c); /* the last round's bytes count before this one */
		if (!mem_admit(c))
			break;
		bool to_scratch = b->state == PBRPC__CONN_PREFACE || !pbrpc__frame_decoder_pending(&b->dec);
		ssize_t n = pbrpc__conn_recv(b, srv->scratch, srv->scratch_cap, MSG_DONTWAIT);
		if (n == 0)
			break;
		if (n < 0) {
			pbrpc__conn_read_failed(b, (int)n);
			break;
		}
		b->last_active = b->last_read = srv->now;
		pbrpc__conn_dispatch(b, NULL);
		if (to_scratch && (size_t)n > srv->scratch_used)
			srv->scratch_used = (size_t)n;
		scratch_fit(srv);
		if ((size_t)n < srv->scratch_cap / 2)
			break; /* the socket is very likely drained */
	}
	/* Output (replies, PONGs), the events and the timer follow from what
	 * was read. A buffer grown for a large frame is kept while the
	 * connection is busy; the sweep frees it once idle. */
	if (!pbrpc__conn_closed(b)) {
		if (pbrpc__conn_pending_out(b) || pbrpc__conn_drained(b))
			pbrpc__srv_mark_dirty(c); /* conn_flush samples memory, closes a drained one */
		else {
			mem_sample(c);
			update_events(c);
			rearm(c);
		}
	}
	flush_dirty(srv);
}

/* ---- timers ---- */

static void finish_drain(pbrpc_server *srv)
{
	pbrpc__list_for_each(c, &srv->conns, srv_conn, link) {
		if (pbrpc__conn_closed(&c->base))
			continue;
		srv_call *call;
		while ((call = pbrpc__idmap_take_any(&c->base.calls, NULL)) != NULL) {
			atomic_store(&call->cancelled, true);
			pbrpc__srv_call_answer(call, PBRPC_STATUS_UNAVAILABLE, "server shut down before the call completed",
					       NULL, NULL, 0);
			pbrpc__srv_stream_check_over(call, PBRPC_STATUS_UNAVAILABLE);
		}
		pbrpc__conn_flush(&c->base, srv->now);
		pbrpc__conn_close(&c->base, 0, "server shut down");
	}
}

static void sweep(pbrpc_server *srv, int64_t now)
{
	/* Idle connections give their buffers back. */
	pbrpc__list_for_each(c, &srv->conns, srv_conn, link) {
		if (!pbrpc__conn_closed(&c->base) && now - c->base.last_active >= SWEEP_INTERVAL_NS) {
			pbrpc__frame_decoder_release(&c->base.dec);
			pbrpc__frame_writer_trim(&c->base.out, 0);
			mem_sample(c);
		}
	}
	scratch_sweep(srv);
	if (pbrpc__list_empty(&srv->live))
		pbrpc__arena_spare_free(&srv->spare_big); /* no call holds big blocks */
#ifdef __GLIBC__
	/* glibc keeps freed memory below its top and, once a large block has
	 * been freed, serves the next ones from the heap rather than mmap: give
	 * it back after large requests, not on every sweep. */
	if (srv->trim)
		malloc_trim(0);
#endif
	srv->trim = false;
	pbrpc__heap_start(&srv->timers, &srv->sweep, now + SWEEP_INTERVAL_NS);
}

static void run_timers(pbrpc_server *srv)
{
	int64_t now = pbrpc__now_ns();
	pbrpc__timer *t;
	while ((t = pbrpc__heap_pop_due(&srv->timers, now)) != NULL) {
		switch (t->tag) {
		case SRV_TIMER_CALL: {
			srv_call *call = pbrpc__container_of(t, srv_call, timer);
			atomic_store(&call->cancelled, true);
			pbrpc__srv_call_answer(call, PBRPC_STATUS_DEADLINE_EXCEEDED, "deadline exceeded", NULL, NULL, 0);
			pbrpc__srv_stream_check_over(call, PBRPC_STATUS_DEADLINE_EXCEEDED);
			break;
		}
		case SRV_TIMER_CONN: {
			srv_conn *c = pbrpc__container_of(t, srv_conn, timer);
			pbrpc__conn_expire(&c->base, now);
			if (!pbrpc__conn_closed(&c->base))
				rearm(c); /* what was due has moved on */
			if (!pbrpc__conn_closed(&c->base) && pbrpc__conn_pending_out(&c->base))
				pbrpc__srv_mark_dirty(c); /* a keepalive PING, an age GOAWAY */
			break;
		}
		case SRV_TIMER_SWEEP:
			sweep(srv, now);
			break;
		case SRV_TIMER_ACCEPT:
			pbrpc__srv_accept_resume(srv);
			break;
		case SRV_TIMER_DRAIN:
			pbrpc__srv_log(srv, PBRPC_LOG_WARN, "drain deadline passed; closing remaining connections");
			finish_drain(srv);
			break;
		}
	}
}

/* Sets the tick timerfd to fire at `when` (absolute, CLOCK_MONOTONIC). */
static bool tick_arm(pbrpc_server *srv, int64_t when)
{
	struct itimerspec its = { .it_value = { .tv_sec = when / PBRPC__NS_PER_S, .tv_nsec = when % PBRPC__NS_PER_S } };
	if (timerfd_settime(srv->tick.fd, TFD_TIMER_ABSTIME, &its, NULL) < 0)
		return false;
	srv->tick.armed = when;
	return true;
}

/* Makes the tick cover the heap's top: it fires no later than the top is
 * due (a top already due is armed in the past, so the fd is readable at
 * once). False only when the timerfd could not be set. Called at the end of
 * each round (an embedder waits on pbrpc_server_fd() next) and before each
 * wait (for timers started between rounds). */
static bool tick_update(pbrpc_server *srv)
{
	pbrpc__timer *t = pbrpc__heap_top(&srv->timers);
	if (!t || (srv->tick.armed && srv->tick.armed <= t->when))
		return true;
	return tick_arm(srv, t->when);
}

/* epoll_wait's timeout: 0 when bytes are buffered, else the caller's; the
 * timer heap waits on the tick timerfd instead (see server_impl.h). */
static int wait_timeout(pbrpc_server *srv, int timeout_ms)
{
	if (!pbrpc__list_empty(&srv->again))
		return 0;
	if (tick_update(srv))
		return timeout_ms;
	/* No timerfd (settime cannot fail on a valid one, but): wait as long
	 * as the top allows. */
	int64_t left = pbrpc__heap_top(&srv->timers)->when - pbrpc__now_ns();
	if (left <= 0)
		return 0;
	int64_t ms = (left + PBRPC__NS_PER_MS - 1) / PBRPC__NS_PER_MS;
	if (timeout_ms < 0 || ms < timeout_ms)
		return ms > INT32_MAX ? INT32_MAX : (int)ms;
	return timeout_ms;
}

/* ---- shutdown ---- */

/* Arms (or brings forward) the drain deadline: drain_ms from now; < 0 none. */
static void drain_within(pbrpc_server *srv, int drain_ms)
{
	if (drain_ms == 0) {
		pbrpc__heap_stop(&srv->timers, &srv->drain);
		finish_drain(srv);
		return;
	}
	int64_t when = pbrpc__now_ns() + (int64_t)drain_ms * PBRPC__NS_PER_MS;
	if (drain_ms > 0 && (!pbrpc__timer_armed(&srv->drain) || when < srv->drain.when))
		pbrpc__heap_start(&srv->timers, &srv->drain, when);
}

static void begin_shutdown(pbrpc_server *srv, int drain_ms)
{
	if (srv->shutting_down)
		return;
	srv->shutting_down = true;
	__atomic_store_n(&srv->reg->shutting_down, true, __ATOMIC_RELAXED);
	if (srv == srv->root)
		pbrpc__srv_log(srv, PBRPC_LOG_INFO, "shutting down (drain %d ms)", drain_ms);
	pbrpc__srv_listeners_close(srv);
	if (srv == srv->root && srv->n_loops > 1) {
		/* Nothing is accepted for the other loops any more: they may finish. */
		atomic_store(&srv->accept_closed, true);
		for (unsigned i = 1; i < srv->n_loops; i++)
			pbrpc__srv_wake(srv->loops[i]);
	}
	/* Handshaking connections drain too: our HELLO is out, so the client
	 * may already have sent its HELLO and requests behind it. Closing
	 * would lose them; the GOAWAY after our HELLO answers them NOT_RUN. */
	pbrpc__list_for_each(c, &srv->conns, srv_conn, link) {
		pbrpc__conn_goaway(&c->base, "server is shutting down");
		pbrpc__srv_mark_dirty(c);
	}
	drain_within(srv, drain_ms);
	flush_dirty(srv);
}

/* A request, from any thread or a signal handler (atomics only): the
 * shortest drain asked for wins, so a second SIGTERM's 0 ends a 5 s drain. */
static void shutdown_one(pbrpc_server *srv, int v)
{
	int cur = atomic_load(&srv->shutdown_req);
	while ((cur == 0 || v < cur) && !atomic_compare_exchange_weak(&srv->shutdown_req, &cur, v))
		;
	pbrpc__srv_wake(srv);
}

/* Every loop drains on its own; root's listeners close in its begin_shutdown. */
PBRPC_EXPORT void pbrpc_server_shutdown(pbrpc_server *srv, int drain_ms)
{
	int v = drain_ms < 0 ? INT_MAX : (drain_ms >= INT_MAX - 1 ? INT_MAX - 1 : drain_ms + 1);
	srv = srv->root;
	shutdown_one(srv, v);
	for (unsigned i = 1; i < srv->n_loops; i++)
		shutdown_one(srv->loops[i], v);
}

/* On the loop thread, after a wake-up: begin the drain, or shorten it. */
static void shutdown_requested(pbrpc_server *srv)
{
	int req = atomic_load(&srv->shutdown_req);
	if (!req || req == srv->shutdown_seen)
		return;
	srv->shutdown_seen = req;
	int drain_ms = req == INT_MAX ? -1 : req - 1;
	if (!srv->shutting_down) {
		begin_shutdown(srv, drain_ms);
		return;
	}
	if (srv == srv->root)
		pbrpc__srv_log(srv, PBRPC_LOG_INFO, "shutting down sooner (drain %d ms)", drain_ms);
	drain_within(srv, drain_ms);
	flush_dirty(srv);
}

/* ---- the loop ---- */

static void reap_closed(pbrpc_server *srv)
{
	srv->reap_pending = false;
	pbrpc__list_for_each_safe(c, &srv->conns, srv_conn, link)
		if (pbrpc__conn_closed(&c->base) && !pbrpc__list_linked(&c->dirty))
			pbrpc__srv_conn_free(c);
}

/* While shutting down: closes connections with nothing left to do (calls
 * answered, and the client has shown it sends no more: see
 * pbrpc__conn_goaway). Returns true once none is open. */
static bool drain_done(pbrpc_server *srv)
{
	bool open = false;
	pbrpc__list_for_each(c, &srv->conns, srv_conn, link) {
		if (pbrpc__conn_closed(&c->base))
			continue;
		if (pbrpc__conn_drained(&c->base))
			pbrpc__conn_close(&c->base, 0, "drained");
		else
			open = true;
	}
	reap_closed(srv);
	return !open;
}

static void on_event(pbrpc_server *srv, const struct epoll_event *ev)
{
	enum srv_src *src = ev->data.ptr;
	switch (*src) {
	case SRV_SRC_LISTENER:
		pbrpc__srv_accept(srv, (srv_listener *)src);
		break;
	case SRV_SRC_WAKE: {
		uint64_t v;
		ssize_t r = read(srv->wake.fd, &v, sizeof(v));
		(void)r;
		if (srv != srv->root)
			pbrpc__srv_take_handoffs(srv);
		pbrpc__srv_drain_completions(srv); /* and pbrpc_stream_post's */
		shutdown_requested(srv);
		break;
	}
	case SRV_SRC_TICK: {
		uint64_t v;
		ssize_t r = read(srv->tick.fd, &v, sizeof(v));
		(void)r; /* EAGAIN: set again since it fired */
		srv->tick.armed = 0; /* run_timers follows; the next wait sets it again */
		break;
	}
	case SRV_SRC_CONN: {
		srv_conn *c = (srv_conn *)src;
		if (pbrpc__conn_closed(&c->base))
			break;
		if ((ev->events & EPOLLHUP) && c->base.read_eof) {
			/* Half-closed, and now gone both ways: no reply can reach it. */
			pbrpc__conn_close(&c->base, PBRPC_EOF, "connection closed by client");
			break;
		}
		if (ev->events & EPOLLOUT) {
			pbrpc__srv_mark_dirty(c);
			flush_dirty(srv);
		}
		if (ev->events & (EPOLLIN | EPOLLHUP | EPOLLERR))
			conn_read(c);
		break;
	}
	}
}

/* TLS connections whose bytes wait inside OpenSSL (tls_again). */
static void read_again(pbrpc_server *srv)
{
	pbrpc__list l;
	pbrpc__list_init(&l);
	pbrpc__list_splice(&l, &srv->again);
	pbrpc__list *e;
	while ((e = pbrpc__list_first(&l)) != NULL) {
		pbrpc__list_remove(e);
		srv_conn *c = pbrpc__container_of(e, srv_conn, again);
		if (!pbrpc__conn_closed(&c->base))
			conn_read(c);
	}
}

/* A sibling loop finishes once root accepts nothing more for it. */
static bool handoffs_over(pbrpc_server *srv)
{
	if (srv == srv->root)
		return true;
	if (!atomic_load(&srv->root->accept_closed))
		return false;
	pthread_mutex_lock(&srv->hand_mu);
	bool empty = pbrpc__list_empty(&srv->hand);
	pthread_mutex_unlock(&srv->hand_mu);
	return empty;
}

/* One round of one loop. */
static int loop_round(pbrpc_server *srv, int timeout_ms)
{
	if (srv->shutdown_done)
		return 1;
	struct epoll_event evs[64];
	pbrpc_server *prev = pbrpc__srv_tl_loop;
	pbrpc__srv_tl_loop = srv;
	int n = epoll_wait(srv->epfd, evs, 64, wait_timeout(srv, timeout_ms));
	if (n < 0 && errno != EINTR) {
		pbrpc__srv_tl_loop = prev;
		return -errno;
	}
	srv->now = pbrpc__now_ns();
	for (int i = 0; i < n; i++)
		on_event(srv, &evs[i]);
	read_again(srv);
	run_timers(srv);
	if (!pbrpc__list_empty(&srv->stream_events))
		pbrpc__srv_stream_events(srv);
	flush_dirty(srv);
	pbrpc__srv_tl_loop = prev;
	if (srv->reap_pending)
		reap_closed(srv); /* closed by an event, a timer or a flush */
	if (srv->mem_paused)
		mem_resume(srv);
	if (srv->shutting_down && drain_done(srv) && handoffs_over(srv)) {
		pbrpc__heap_stop(&srv->timers, &srv->drain);
		srv->shutdown_done = true;
		if (srv == srv->root)
			pbrpc__srv_log(srv, PBRPC_LOG_INFO, "shutdown complete");
		return 1;
	}
	tick_update(srv); /* the timers this round added or moved */
	return 0;
}

PBRPC_EXPORT int pbrpc_server_process(pbrpc_server *srv, int timeout_ms)
{
	if (srv->n_loops > 1)
		return PBRPC_EINVALID; /* each loop has its own thread: pbrpc_server_run */
	return loop_round(srv, timeout_ms);
}

static int loop_run(pbrpc_server *srv)
{
	for (;;) {
		int rc = loop_round(srv, -1);
		if (rc != 0)
			return rc > 0 ? 0 : rc;
	}
}

static void *sibling_main(void *arg)
{
	pbrpc_server *srv = arg;
	srv->run_rc = loop_run(srv);
	if (srv->run_rc < 0)
		pbrpc_server_shutdown(srv->root, 0); /* the others would wait for it */
	return NULL;
}

void pbrpc__srv_loops_join(pbrpc_server *root)
{
	bool any = false;
	for (unsigned i = 1; i < root->n_loops; i++)
		any |= root->loops[i]->thread_started;
	if (!any)
		return;
	pbrpc_server_shutdown(root, 0);
	/* Root's listeners close in its own begin_shutdown, which will not run
	 * now: the siblings need not wait for handoffs. */
	atomic_store(&root->accept_closed, true);
	for (unsigned i = 1; i < root->n_loops; i++) {
		pbrpc_server *l = root->loops[i];
		pbrpc__srv_wake(l);
		if (l->thread_started)
			pthread_join(l->thread, NULL);
		l->thread_started = false;
	}
}

PBRPC_EXPORT int pbrpc_server_run(pbrpc_server *srv)
{
	if (srv->n_loops <= 1)
		return loop_run(srv);
	int rc = 0;
	/* Signals stay with the caller's threads, as with one loop. */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	for (unsigned i = 1; i < srv->n_loops && !rc; i++) {
		pbrpc_server *l = srv->loops[i];
		if (l->shutdown_done)
			continue;
		int err = pthread_create(&l->thread, NULL, sibling_main, l);
		if (err)
			rc = -err;
		else
			l->thread_started = true;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (!rc)
		rc = loop_run(srv);
	if (rc < 0)
		pbrpc_server_shutdown(srv, 0);
	if (rc < 0 && !srv->shutdown_done)
		atomic_store(&srv->accept_closed, true); /* root stopped accepting */
	for (unsigned i = 1; i < srv->n_loops; i++) {
		pbrpc_server *l = srv->loops[i];
		if (!l->thread_started)
			continue;
		if (rc < 0)
			pbrpc__srv_wake(l);
		pthread_join(l->thread, NULL);
		l->thread_started = false;
		if (!rc && l->run_rc < 0)
			rc = l->run_rc;
	}
	return rc;
}

PBRPC_EXPORT int pbrpc_server_fd(const pbrpc_server *srv)
{
	return srv->n_loops > 1 ? PBRPC_EINVALID : srv->epfd;
}
