/* demo.Kv: a sorted array of entries under one mutex.
 *
 * Replies are built from copies taken under the lock, and closures run after
 * it is released, so no pbrpc code but pbrpc_stream_post ever runs while the
 * store is locked.
 *
 * Handlers may run on any thread at once (pbrpc-server --workers, or several
 * loops: --loop-threads). The stream methods (kv.pbrpc.h, from pbrpc-gen)
 * run on the loop thread of their connection, as pbrpc's stream API
 * requires. Watch's watchers are a list under the lock; a Put, Delete or
 * Upload, wherever it runs, queues the change on each matching watcher and
 * posts a flush to the watcher's loop (pbrpc_stream_post), which sends
 * them in order. */
#include <errno.h>
#include <stdbool.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "demo_services.h"
#include "kv.pbrpc.h"
#include "pbrpc/server.h"

typedef struct kv_entry {
	char *key;
	uint8_t *value;
	size_t len;
} kv_entry;

typedef struct kv_store kv_store;

typedef struct change {
	struct change *next;
	Demo__Change__Kind kind;
	size_t len;
	uint8_t *value;
	char key[];
} change;

typedef struct watcher {
	struct watcher *next;
	kv_store *kv;
	Demo__Kv_Watch_Stream *st; /* valid while it is on kv->watchers */
	char *prefix;
	/* under kv->lock: */
	change *head, **tail; /* changes not sent yet */
	bool posted;          /* a flush is queued on its loop: that frees it once dead */
	bool dead;            /* off the list, its stream over */
} watcher;

struct kv_store {
	Demo__Kv_Pbrpc pb; /* what the server sees: handlers get &pb.unary, streams pb.user == this */
	pthread_mutex_t lock;
	kv_entry *items; /* sorted by key, strcmp order (= byte order) */
	size_t n, cap;
	watcher *watchers; /* under lock */
};

#define kv_of(s) ((kv_store *)((char *)(s) - offsetof(kv_store, pb.unary)))

static void kv_notify(kv_store *kv, const char *key, const uint8_t *val, size_t len, Demo__Change__Kind kind);

/* Index of key, or of where it would be inserted; *found says which. */
static size_t kv_find(const kv_store *kv, const char *key, int *found)
{
	size_t lo = 0, hi = kv->n;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		int c = strcmp(kv->items[mid].key, key);
		if (c == 0) {
			*found = 1;
			return mid;
		}
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	*found = 0;
	return lo;
}

static uint8_t *dup_bytes(const void *p, size_t len)
{
	uint8_t *d = malloc(len ? len : 1);
	if (d && len)
		memcpy(d, p, len);
	return d;
}

/* Stores key/value; returns 1 if the key is new, 0 if replaced, -ENOMEM. */
static int kv_store_put(kv_store *kv, const char *key, const uint8_t *val, size_t len)
{
	uint8_t *copy = dup_bytes(val, len);
	if (!copy)
		return -ENOMEM;

	pthread_mutex_lock(&kv->lock);
	int found;
	size_t i = kv_find(kv, key, &found);
	if (found) {
		free(kv->items[i].value);
		kv->items[i].value = copy;
		kv->items[i].len = len;
		pthread_mutex_unlock(&kv->lock);
		return 0;
	}
	char *k = strdup(key);
	if (!k)
		goto err;
	if (kv->n == kv->cap) {
		size_t cap = kv->cap ? kv->cap * 2 : 16;
		kv_entry *items = realloc(kv->items, cap * sizeof(*items));
		if (!items)
			goto err_key;
		kv->items = items;
		kv->cap = cap;
	}
	memmove(&kv->items[i + 1], &kv->items[i], (kv->n - i) * sizeof(kv->items[0]));
	kv->items[i] = (kv_entry){ .key = k, .value = copy, .len = len };
	kv->n++;
	pthread_mutex_unlock(&kv->lock);
	return 1;

err_key:
	free(k);
err:
	pthread_mutex_unlock(&kv->lock);
	free(copy);
	return -ENOMEM;
}

static void kv_put(Demo__Kv_Service *svc, const Demo__PutRequest *req, Demo__PutReply_Closure closure,
		   void *closure_data)
{
	if (req->key[0] == '\0') {
		pbrpc_call_set_status(closure_data, PBRPC_STATUS_INVALID_ARGUMENT, "key must not be empty");
		closure(NULL, closure_data);
		return;
	}
	int rc = kv_store_put(kv_of(svc), req->key, req->value.data, req->value.len);
	if (rc < 0) {
		pbrpc_call_set_status(closure_data, PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		closure(NULL, closure_data);
		return;
	}
	/* Before the closure: req is pbrpc's until then, and the change is
	 * queued before the client hears of the Put. */
	kv_notify(kv_of(svc), req->key, req->value.data, req->value.len, DEMO__CHANGE__KIND__PUT);
	Demo__PutReply reply = DEMO__PUT_REPLY__INIT;
	reply.created = rc == 1;
	closure(&reply, closure_data);
}

static void kv_get(Demo__Kv_Service *svc, const Demo__GetRequest *req, Demo__GetReply_Closure closure,
		   void *closure_data)
{
	kv_store *kv = kv_of(svc);
	uint8_t *copy = NULL;
	size_t len = 0;
	int found;

	pthread_mutex_lock(&kv->lock);
	size_t i = kv_find(kv, req->key, &found);
	if (found) {
		len = kv->items[i].len;
		copy = dup_bytes(kv->items[i].value, len);
	}
	pthread_mutex_unlock(&kv->lock);

	if (!found) {
		pbrpc_call_set_status(closure_data, PBRPC_STATUS_NOT_FOUND, "no key \"%s\"", req->key);
		closure(NULL, closure_data);
		return;
	}
	if (!copy) {
		pbrpc_call_set_status(closure_data, PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		closure(NULL, closure_data);
		return;
	}
	Demo__GetReply reply = DEMO__GET_REPLY__INIT;
	reply.value.data = copy;
	reply.value.len = len;
	closure(&reply, closure_data);
	free(copy);
}

static void kv_delete(Demo__Kv_Service *svc, const Demo__DeleteRequest *req, Demo__DeleteReply_Closure closure,
		      void *closure_data)
{
	kv_store *kv = kv_of(svc);
	int found;

	pthread_mutex_lock(&kv->lock);
	size_t i = kv_find(kv, req->key, &found);
	if (found) {
		free(kv->items[i].key);
		free(kv->items[i].value);
		memmove(&kv->items[i], &kv->items[i + 1], (kv->n - i - 1) * sizeof(kv->items[0]));
		kv->n--;
	}
	pthread_mutex_unlock(&kv->lock);

	if (found)
		kv_notify(kv, req->key, NULL, 0, DEMO__CHANGE__KIND__DELETE); /* before the closure, as Put */
	Demo__DeleteReply reply = DEMO__DELETE_REPLY__INIT;
	reply.deleted = found;
	closure(&reply, closure_data);
}

static void free_entries(Demo__Entry **v, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		free(v[i]->key);
		free(v[i]->value.data);
		free(v[i]);
	}
	free(v);
}

/* Copies the matching entries; returns their count or -ENOMEM. */
static ssize_t kv_collect(kv_store *kv, const char *prefix, uint32_t limit, Demo__Entry ***out)
{
	size_t plen = strlen(prefix);
	Demo__Entry **v = NULL;
	size_t n = 0, cap = 0;
	int found;

	pthread_mutex_lock(&kv->lock);
	for (size_t i = kv_find(kv, prefix, &found); i < kv->n; i++) {
		const kv_entry *e = &kv->items[i];
		if (strncmp(e->key, prefix, plen) != 0 || (limit && n == limit))
			break;
		if (n == cap) {
			cap = cap ? cap * 2 : 16;
			Demo__Entry **nv = realloc(v, cap * sizeof(*nv));
			if (!nv)
				goto err;
			v = nv;
		}
		Demo__Entry *ent = malloc(sizeof(*ent));
		if (!ent)
			goto err;
		demo__entry__init(ent);
		ent->key = strdup(e->key);
		ent->value.data = dup_bytes(e->value, e->len);
		ent->value.len = e->len;
		v[n++] = ent;
		if (!ent->key || !ent->value.data)
			goto err;
	}
	pthread_mutex_unlock(&kv->lock);
	*out = v;
	return (ssize_t)n;

err:
	pthread_mutex_unlock(&kv->lock);
	free_entries(v, n);
	return -ENOMEM;
}

static void kv_list(Demo__Kv_Service *svc, const Demo__ListRequest *req, Demo__ListReply_Closure closure,
		    void *closure_data)
{
	Demo__Entry **entries = NULL;
	ssize_t n = kv_collect(kv_of(svc), req->prefix, req->limit, &entries);
	if (n < 0) {
		pbrpc_call_set_status(closure_data, PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		closure(NULL, closure_data);
		return;
	}
	Demo__ListReply reply = DEMO__LIST_REPLY__INIT;
	reply.n_entries = (size_t)n;
	reply.entries = entries;
	closure(&reply, closure_data);
	free_entries(entries, (size_t)n);
}

/* ---- stream methods (loop thread) ---- */

static void changes_free(change *c)
{
	while (c) {
		change *next = c->next;
		free(c->value);
		free(c);
		c = next;
	}
}

static void watcher_free(watcher *w)
{
	changes_free(w->head);
	free(w->prefix);
	free(w);
}

/* Under kv->lock: takes w off the list; returns true when the caller frees
 * it now (no flush is queued that would). */
static bool watcher_unlink(watcher *w)
{
	for (watcher **p = &w->kv->watchers; *p; p = &(*p)->next) {
		if (*p == w) {
			*p = w->next;
			break;
		}
	}
	w->dead = true;
	changes_free(w->head);
	w->head = NULL;
	w->tail = &w->head;
	return !w->posted;
}

/* On the watcher's loop: sends what was queued. */
static void watch_flush(void *arg)
{
	watcher *w = arg;
	kv_store *kv = w->kv;
	pthread_mutex_lock(&kv->lock);
	w->posted = false;
	change *list = w->head;
	w->head = NULL;
	w->tail = &w->head;
	bool dead = w->dead;
	pthread_mutex_unlock(&kv->lock);
	if (dead) {
		changes_free(list);
		watcher_free(w);
		return;
	}
	bool over = false;
	for (change *c = list; c && !over; c = c->next) {
		Demo__Change ch = DEMO__CHANGE__INIT;
		ch.key = c->key;
		ch.value.data = c->value;
		ch.value.len = c->len;
		ch.kind = c->kind;
		if (demo__kv__watch_send(w->st, &ch) == -EAGAIN) {
			/* No credit left: it reads slower than changes come. */
			demo__kv__watch_end(w->st, PBRPC_STATUS_RESOURCE_EXHAUSTED,
					    "the watcher fell behind (it reads changes slower than they happen)");
			over = true;
		}
		/* PBRPC_ECLOSED: on_cancel ends it. */
	}
	changes_free(list);
	if (!over)
		return;
	pthread_mutex_lock(&kv->lock);
	bool free_now = watcher_unlink(w);
	pthread_mutex_unlock(&kv->lock);
	if (free_now)
		watcher_free(w);
}

/* From any thread: queues the change on each watcher of a matching prefix. */
static void kv_notify(kv_store *kv, const char *key, const uint8_t *val, size_t len, Demo__Change__Kind kind)
{
	pthread_mutex_lock(&kv->lock);
	for (watcher *w = kv->watchers; w; w = w->next) {
		if (strncmp(key, w->prefix, strlen(w->prefix)) != 0)
			continue;
		size_t kl = strlen(key);
		change *c = malloc(sizeof(*c) + kl + 1);
		if (!c)
			continue;
		c->value = dup_bytes(val, len);
		if (!c->value) {
			free(c);
			continue;
		}
		memcpy(c->key, key, kl + 1);
		c->len = len;
		c->kind = kind;
		c->next = NULL;
		*w->tail = c;
		w->tail = &c->next;
		/* Its stream is valid: on_cancel takes it off the list under
		 * this lock first. */
		if (!w->posted && pbrpc_stream_post(demo__kv__watch_raw(w->st), watch_flush, w) == 0)
			w->posted = true;
	}
	pthread_mutex_unlock(&kv->lock);
}

static void watch_cancel(Demo__Kv_Watch_Stream *st, void *user)
{
	watcher *w = user;
	demo__kv__watch_end(st, PBRPC_STATUS_CANCELLED, NULL); /* ignored: the client knows */
	pthread_mutex_lock(&w->kv->lock);
	bool free_now = watcher_unlink(w);
	pthread_mutex_unlock(&w->kv->lock);
	if (free_now)
		watcher_free(w);
}

static const Demo__Kv_Watch_Ops watch_ops = { .on_cancel = watch_cancel };

static void kv_watch(Demo__Kv_Watch_Stream *st, const Demo__WatchRequest *req, void *user)
{
	kv_store *kv = user;
	watcher *w = calloc(1, sizeof(*w));
	if (w)
		w->prefix = strdup(req->prefix);
	if (!w || !w->prefix) {
		free(w);
		demo__kv__watch_end(st, PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		return;
	}
	w->kv = kv;
	w->st = st;
	w->tail = &w->head;
	demo__kv__watch_set_ops(st, &watch_ops, w);
	pthread_mutex_lock(&kv->lock);
	w->next = kv->watchers;
	kv->watchers = w;
	pthread_mutex_unlock(&kv->lock);
}

typedef struct upload {
	kv_store *kv;
	Demo__UploadReply reply;
} upload;

static void upload_message(Demo__Kv_Upload_Stream *st, const Demo__PutRequest *req, void *user)
{
	upload *u = user;
	if (req->key[0] == '\0') {
		demo__kv__upload_end(st, PBRPC_STATUS_INVALID_ARGUMENT, NULL, "entry %u: key must not be empty",
				     u->reply.count + 1);
		free(u);
		return;
	}
	int rc = kv_store_put(u->kv, req->key, req->value.data, req->value.len);
	if (rc < 0) {
		demo__kv__upload_end(st, PBRPC_STATUS_RESOURCE_EXHAUSTED, NULL, "out of memory");
		free(u);
		return;
	}
	u->reply.count++;
	u->reply.created += rc == 1;
	kv_notify(u->kv, req->key, req->value.data, req->value.len, DEMO__CHANGE__KIND__PUT);
}

static void upload_done(Demo__Kv_Upload_Stream *st, void *user)
{
	upload *u = user;
	demo__kv__upload_end(st, PBRPC_STATUS_OK, &u->reply, NULL);
	free(u);
}

static void upload_cancel(Demo__Kv_Upload_Stream *st, void *user)
{
	demo__kv__upload_end(st, PBRPC_STATUS_CANCELLED, NULL, NULL);
	free(user);
}

static const Demo__Kv_Upload_Ops upload_ops = {
	.on_message = upload_message,
	.on_half_close = upload_done,
	.on_cancel = upload_cancel,
};

static void kv_upload(Demo__Kv_Upload_Stream *st, void *user)
{
	kv_store *kv = user;
	upload *u = calloc(1, sizeof(*u));
	if (!u) {
		demo__kv__upload_end(st, PBRPC_STATUS_RESOURCE_EXHAUSTED, NULL, "out of memory");
		return;
	}
	u->kv = kv;
	demo__upload_reply__init(&u->reply);
	demo__kv__upload_set_ops(st, &upload_ops, u);
}

/* Lookup: one entry per key, in order. Without credit the entry waits
 * (one at most) and the client's messages are paused until on_writable. */
typedef struct lookup {
	kv_store *kv;
	Demo__Entry *pending;
	bool half_closed;
} lookup;

static void lookup_free(lookup *l)
{
	if (l->pending) {
		free(l->pending->key);
		free(l->pending->value.data);
		free(l->pending);
	}
	free(l);
}

/* Sends the pending entry; true when it went (or there was none). */
static bool lookup_flush(Demo__Kv_Lookup_Stream *st, lookup *l)
{
	if (!l->pending)
		return true;
	int rc = demo__kv__lookup_send(st, l->pending);
	if (rc == -EAGAIN)
		return false;
	free(l->pending->key);
	free(l->pending->value.data);
	free(l->pending);
	l->pending = NULL;
	return true;
}

static void lookup_message(Demo__Kv_Lookup_Stream *st, const Demo__GetRequest *req, void *user)
{
	lookup *l = user;
	kv_store *kv = l->kv;
	Demo__Entry *e = calloc(1, sizeof(*e));
	if (e) {
		demo__entry__init(e);
		e->key = strdup(req->key);
		int found;
		pthread_mutex_lock(&kv->lock);
		size_t i = kv_find(kv, req->key, &found);
		if (found) {
			e->value.len = kv->items[i].len;
			e->value.data = dup_bytes(kv->items[i].value, e->value.len);
		}
		pthread_mutex_unlock(&kv->lock);
	}
	if (!e || !e->key || (e->value.len && !e->value.data)) {
		if (e) {
			free(e->key);
			free(e->value.data);
		}
		free(e);
		demo__kv__lookup_end(st, PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		lookup_free(l);
		return;
	}
	l->pending = e;
	if (!lookup_flush(st, l))
		pbrpc_stream_pause(demo__kv__lookup_raw(st), true);
}

static void lookup_writable(Demo__Kv_Lookup_Stream *st, void *user)
{
	lookup *l = user;
	if (!lookup_flush(st, l))
		return;
	if (l->half_closed) {
		demo__kv__lookup_end(st, PBRPC_STATUS_OK, NULL);
		lookup_free(l);
		return;
	}
	pbrpc_stream_pause(demo__kv__lookup_raw(st), false);
}

static void lookup_done(Demo__Kv_Lookup_Stream *st, void *user)
{
	lookup *l = user;
	l->half_closed = true;
	if (!l->pending) {
		demo__kv__lookup_end(st, PBRPC_STATUS_OK, NULL);
		lookup_free(l);
	}
}

static void lookup_cancel(Demo__Kv_Lookup_Stream *st, void *user)
{
	demo__kv__lookup_end(st, PBRPC_STATUS_CANCELLED, NULL);
	lookup_free(user);
}

static const Demo__Kv_Lookup_Ops lookup_ops = {
	.on_message = lookup_message,
	.on_half_close = lookup_done,
	.on_writable = lookup_writable,
	.on_cancel = lookup_cancel,
};

static void kv_lookup(Demo__Kv_Lookup_Stream *st, void *user)
{
	kv_store *kv = user;
	lookup *l = calloc(1, sizeof(*l));
	if (!l) {
		demo__kv__lookup_end(st, PBRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		return;
	}
	l->kv = kv;
	demo__kv__lookup_set_ops(st, &lookup_ops, l);
}

static void kv_destroy(ProtobufCService *base)
{
	demo_kv_free((Demo__Kv_Service *)base);
}

Demo__Kv_Service *demo_kv_new(void)
{
	kv_store *kv = calloc(1, sizeof(*kv));
	if (!kv)
		return NULL;
	/* pbrpc-gen's initialiser binds each method to kv_<method>, unary
	 * ones in protoc-c's service, stream ones beside it. */
	kv->pb = (Demo__Kv_Pbrpc)DEMO__KV__PBRPC_INIT(kv_);
	kv->pb.user = kv;
	kv->pb.unary.base.destroy = kv_destroy;
	pthread_mutex_init(&kv->lock, NULL);
	return &kv->pb.unary;
}

int demo_kv_add(pbrpc_server *srv, Demo__Kv_Service *svc)
{
	return demo__kv__pbrpc_add(srv, &kv_of(svc)->pb);
}

void demo_kv_free(Demo__Kv_Service *svc)
{
	if (!svc)
		return;
	kv_store *kv = kv_of(svc);
	for (size_t i = 0; i < kv->n; i++) {
		free(kv->items[i].key);
		free(kv->items[i].value);
	}
	free(kv->items);
	/* The server has freed the streams; only our records remain. */
	while (kv->watchers) {
		watcher *w = kv->watchers;
		kv->watchers = w->next;
		watcher_free(w);
	}
	pthread_mutex_destroy(&kv->lock);
	free(kv);
}
