/* What a handler may ask of its call (closure_data): status, cancellation,
 * deadline, method, metadata, peer credentials (groups and pidfd too). */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "server/server_impl.h"

/* ---- the handler's view of a call ---- */

static srv_call *as_call(void *closure_data)
{
	srv_call *call = closure_data;
	return call && call->magic == SRV_CALL_MAGIC ? call : NULL;
}

PBRPC_EXPORT int pbrpc_call_set_status(void *closure_data, int status, const char *fmt, ...)
{
	srv_call *call = as_call(closure_data);
	if (!call || status < 0 || status >= PBRPC_STATUS_COUNT)
		return PBRPC_EINVALID;
	call->status = status;
	free(call->status_msg);
	call->status_msg = NULL;
	if (fmt) {
		va_list ap;
		va_start(ap, fmt);
		if (vasprintf(&call->status_msg, fmt, ap) < 0)
			call->status_msg = NULL;
		va_end(ap);
	}
	return 0;
}

PBRPC_EXPORT bool pbrpc_call_cancelled(void *closure_data)
{
	srv_call *call = closure_data;
	return call ? atomic_load(&call->cancelled) : true;
}

PBRPC_EXPORT int64_t pbrpc_call_deadline(void *closure_data)
{
	srv_call *call = as_call(closure_data);
	return call ? call->deadline_ns : 0;
}

PBRPC_EXPORT const char *pbrpc_call_method(void *closure_data)
{
	srv_call *call = as_call(closure_data);
	return call ? call->m->name : NULL;
}

PBRPC_EXPORT const void *pbrpc_call_metadata(void *closure_data, const char *key, size_t *len)
{
	srv_call *call = as_call(closure_data);
	if (!call || !call->md_len)
		return NULL;
	pbrpc__wire_request view = { .metadata_raw = call->md, .metadata_raw_len = call->md_len };
	return pbrpc__wire_metadata_get(&view, key, len);
}

PBRPC_EXPORT int pbrpc_call_peer_tls(void *closure_data, const pbrpc_tls_peer **out)
{
	srv_call *call = as_call(closure_data);
	if (!call || !out)
		return PBRPC_EINVALID;
	/* A reference taken at dispatch time: the connection may be gone. */
	if (!call->tls_peer)
		return -ENOTSUP;
	*out = &call->tls_peer->pub;
	return 0;
}

int pbrpc__srv_call_peer_cred(const srv_call *call, pid_t *pid, uid_t *uid, gid_t *gid)
{
	/* Credentials are copied at dispatch time: the connection may be gone. */
	if (!call->has_cred)
		return -ENOTSUP;
	if (pid)
		*pid = call->cred.pid;
	if (uid)
		*uid = call->cred.uid;
	if (gid)
		*gid = call->cred.gid;
	return 0;
}

PBRPC_EXPORT int pbrpc_call_peer_cred(void *closure_data, pid_t *pid, uid_t *uid, gid_t *gid)
{
	srv_call *call = as_call(closure_data);
	return call ? pbrpc__srv_call_peer_cred(call, pid, uid, gid) : PBRPC_EINVALID;
}

PBRPC_EXPORT int pbrpc_call_fds(void *closure_data, const int **fds)
{
	srv_call *call = as_call(closure_data);
	if (fds)
		*fds = call && call->nfds ? call->fds : NULL;
	return call ? (int)call->nfds : PBRPC_EINVALID;
}

PBRPC_EXPORT int pbrpc_call_take_fd(void *closure_data, unsigned index)
{
	srv_call *call = as_call(closure_data);
	if (!call || index >= call->nfds || call->fds[index] < 0)
		return PBRPC_EINVALID;
	int fd = call->fds[index];
	call->fds[index] = -1;
	return fd;
}

PBRPC_EXPORT int pbrpc_call_attach_fd(void *closure_data, int fd)
{
	srv_call *call = as_call(closure_data);
	int rc = 0;
	if (!call || fd < 0)
		rc = PBRPC_EINVALID;
	else if (!call->fds_ok)
		rc = -ENOTSUP;
	else if (call->nrfds >= PBRPC_FDS_MAX - 1) /* one place stays for a memfd body */
		rc = PBRPC_ETOOBIG;
	else if (call->nrfds == call->rfds_cap) {
		unsigned cap = call->rfds_cap ? 2 * call->rfds_cap : 4;
		int *p = realloc(call->rfds, cap * sizeof(int));
		if (!p)
			rc = -ENOMEM;
		else {
			call->rfds = p;
			call->rfds_cap = cap;
		}
	}
	if (rc < 0) {
		if (fd >= 0)
			close(fd);
		return rc;
	}
	call->rfds[call->nrfds++] = fd;
	return 0;
}

PBRPC_EXPORT int pbrpc_call_peer(void *closure_data, pbrpc_peer *out)
{
	srv_call *call = as_call(closure_data);
	if (!call || !out)
		return PBRPC_EINVALID;
	*out = (pbrpc_peer){ .has_cred = call->has_cred, .pidfd = -1 };
	if (!call->has_cred)
		return 0;
	out->pid = call->cred.pid;
	out->uid = call->cred.uid;
	out->gid = call->cred.gid;
	if (call->peer_ext) { /* the call holds a reference: the connection may be gone */
		out->groups = call->peer_ext->groups;
		out->n_groups = call->peer_ext->n_groups;
		out->pidfd = call->peer_ext->pidfd;
	}
	return 0;
}
