/* demo.Echo: immediate answers from the handler, delayed ones from a timer
 * thread that sleeps on a condition variable until the earliest due time.
 *
 * A delayed call keeps pointing at its request: pbrpc keeps the request alive
 * until the closure has run. Its status (if it is to fail) is set by the
 * handler, on the loop thread; the timer thread only calls the closure. */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "demo_services.h"
#include "pbrpc/server.h"

typedef struct echo_timer {
	int64_t due_ns; /* CLOCK_MONOTONIC */
	uint64_t seq;   /* equal due times answer in arrival order */
	const Demo__EchoRequest *req;
	Demo__EchoReply_Closure closure;
	void *closure_data;
} echo_timer;

typedef struct echo_service {
	Demo__Echo_Service svc;
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t wake;
	echo_timer *heap; /* binary min-heap on (due_ns, seq) */
	size_t n, cap;
	uint64_t next_seq;
	int stop;
} echo_service;

#define echo_of(s) ((echo_service *)((char *)(s) - offsetof(echo_service, svc)))

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int timer_before(const echo_timer *a, const echo_timer *b)
{
	return a->due_ns < b->due_ns || (a->due_ns == b->due_ns && a->seq < b->seq);
}

static int heap_push(echo_service *es, echo_timer t)
{
	if (es->n == es->cap) {
		size_t cap = es->cap ? es->cap * 2 : 16;
		echo_timer *h = realloc(es->heap, cap * sizeof(*h));
		if (!h)
			return -ENOMEM;
		es->heap = h;
		es->cap = cap;
	}
	size_t i = es->n++;
	while (i > 0 && timer_before(&t, &es->heap[(i - 1) / 2])) {
		es->heap[i] = es->heap[(i - 1) / 2];
		i = (i - 1) / 2;
	}
	es->heap[i] = t;
	return 0;
}

static echo_timer heap_pop(echo_service *es)
{
	echo_timer top = es->heap[0];
	echo_timer last = es->heap[--es->n];
	size_t i = 0;
	for (;;) {
		size_t c = 2 * i + 1;
		if (c >= es->n)
			break;
		if (c + 1 < es->n && timer_before(&es->heap[c + 1], &es->heap[c]))
			c++;
		if (!timer_before(&es->heap[c], &last))
			break;
		es->heap[i] = es->heap[c];
		i = c;
	}
	if (es->n > 0)
		es->heap[i] = last;
	return top;
}

static void answer(const echo_timer *t)
{
	Demo__EchoReply reply = DEMO__ECHO_REPLY__INIT;
	reply.payload = t->req->payload;
	/* With a failing status set by the handler, the reply is ignored. */
	t->closure(&reply, t->closure_data);
}

static void *timer_main(void *arg)
{
	echo_service *es = arg;

	pthread_mutex_lock(&es->lock);
	while (!es->stop) {
		if (es->n == 0) {
			pthread_cond_wait(&es->wake, &es->lock);
			continue;
		}
		int64_t due = es->heap[0].due_ns;
		if (due > now_ns()) {
			struct timespec ts = { .tv_sec = due / 1000000000, .tv_nsec = due % 1000000000 };
			pthread_cond_timedwait(&es->wake, &es->lock, &ts);
			continue;
		}
		echo_timer t = heap_pop(es);
		pthread_mutex_unlock(&es->lock);
		answer(&t);
		pthread_mutex_lock(&es->lock);
	}
	pthread_mutex_unlock(&es->lock);
	return NULL;
}

/* Sets the failure the request asks for, if any. */
static void set_failure(const Demo__EchoRequest *req, void *closure_data)
{
	if (req->fail_status == 0)
		return;
	if (req->fail_status >= PBRPC_STATUS_COUNT)
		pbrpc_call_set_status(closure_data, PBRPC_STATUS_INVALID_ARGUMENT,
				      "fail_status %u is not a status code (0..16)", (unsigned)req->fail_status);
	else
		pbrpc_call_set_status(closure_data, (int)req->fail_status, "%s", req->fail_message);
}

static void echo_echo(Demo__Echo_Service *svc, const Demo__EchoRequest *req, Demo__EchoReply_Closure closure,
		      void *closure_data)
{
	echo_service *es = echo_of(svc);
	set_failure(req, closure_data);

	echo_timer t = { .req = req, .closure = closure, .closure_data = closure_data };
	if (req->delay_ms == 0) {
		answer(&t);
		return;
	}
	t.due_ns = now_ns() + (int64_t)req->delay_ms * 1000000;

	pthread_mutex_lock(&es->lock);
	t.seq = es->next_seq++;
	int rc = heap_push(es, t);
	if (rc == 0 && es->heap[0].seq == t.seq)
		pthread_cond_signal(&es->wake); /* new earliest deadline */
	pthread_mutex_unlock(&es->lock);

	if (rc < 0) {
		pbrpc_call_set_status(closure_data, PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		closure(NULL, closure_data);
	}
}

static void echo_destroy(ProtobufCService *base)
{
	demo_echo_free((Demo__Echo_Service *)base);
}

Demo__Echo_Service *demo_echo_new(void)
{
	echo_service *es = calloc(1, sizeof(*es));
	if (!es)
		return NULL;
	es->svc = (Demo__Echo_Service)DEMO__ECHO__INIT(echo_);
	es->svc.base.destroy = echo_destroy;

	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&es->wake, &ca);
	pthread_condattr_destroy(&ca);
	pthread_mutex_init(&es->lock, NULL);

	if (pthread_create(&es->thread, NULL, timer_main, es) != 0)
		goto err;
	return &es->svc;

err:
	pthread_cond_destroy(&es->wake);
	pthread_mutex_destroy(&es->lock);
	free(es);
	return NULL;
}

void demo_echo_free(Demo__Echo_Service *svc)
{
	if (!svc)
		return;
	echo_service *es = echo_of(svc);

	pthread_mutex_lock(&es->lock);
	es->stop = 1;
	pthread_cond_signal(&es->wake);
	pthread_mutex_unlock(&es->lock);
	pthread_join(es->thread, NULL);

	/* The thread is gone: no lock needed for what it left queued. */
	while (es->n > 0) {
		echo_timer t = heap_pop(es);
		pbrpc_call_set_status(t.closure_data, PBRPC_STATUS_CANCELLED, "echo service stopped");
		t.closure(NULL, t.closure_data);
	}
	free(es->heap);
	pthread_cond_destroy(&es->wake);
	pthread_mutex_destroy(&es->lock);
	free(es);
}
