/* demo.Kv: a sorted array of entries under one mutex.
 *
 * Replies are built from copies taken under the lock, and closures run after
 * it is released, so no pbrpc code ever runs while the store is locked. */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "demo_services.h"
#include "pbrpc/server.h"

typedef struct kv_entry {
	char *key;
	uint8_t *value;
	size_t len;
} kv_entry;

typedef struct kv_store {
	Demo__Kv_Service svc; /* what the server sees; handlers get &svc */
	pthread_mutex_t lock;
	kv_entry *items; /* sorted by key, strcmp order (= byte order) */
	size_t n, cap;
} kv_store;

#define kv_of(s) ((kv_store *)((char *)(s) - offsetof(kv_store, svc)))

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

static void kv_destroy(ProtobufCService *base)
{
	demo_kv_free((Demo__Kv_Service *)base);
}

Demo__Kv_Service *demo_kv_new(void)
{
	kv_store *kv = calloc(1, sizeof(*kv));
	if (!kv)
		return NULL;
	/* The generated initialiser binds each method to kv_<method>. */
	kv->svc = (Demo__Kv_Service)DEMO__KV__INIT(kv_);
	kv->svc.base.destroy = kv_destroy;
	pthread_mutex_init(&kv->lock, NULL);
	return &kv->svc;
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
	pthread_mutex_destroy(&kv->lock);
	free(kv);
}
