#include "pbrpc/endpoint.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "util/clock.h"
#include "util/dial.h"

static pbrpc__resolve_fn resolver = getaddrinfo;

void pbrpc__dial_set_resolver(pbrpc__resolve_fn fn)
{
	resolver = fn ? fn : getaddrinfo;
}

static int parse_unix(const char *rest, pbrpc_endpoint *out)
{
	struct sockaddr_un *sun = (struct sockaddr_un *)&out->addr;
	sun->sun_family = AF_UNIX;
	size_t n;
	if (rest[0] == '@') {
		n = strlen(rest + 1);
		if (n == 0)
			return PBRPC_EADDRESS;
		if (n + 1 > sizeof(sun->sun_path))
			return -ENAMETOOLONG;
		out->kind = PBRPC_ENDPOINT_ABSTRACT;
		memcpy(out->path, rest + 1, n + 1);
		sun->sun_path[0] = '\0';
		memcpy(sun->sun_path + 1, rest + 1, n);
		out->addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
		return 0;
	}
	n = strlen(rest);
	if (n == 0)
		return PBRPC_EADDRESS;
	if (n + 1 > sizeof(sun->sun_path))
		return -ENAMETOOLONG;
	out->kind = PBRPC_ENDPOINT_UNIX;
	memcpy(out->path, rest, n + 1);
	memcpy(sun->sun_path, rest, n + 1);
	out->addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
	return 0;
}

/* "HOST:PORT" or "[V6]:PORT" into host and port (a pointer into rest). */
#define HOST_MAX 256

static int split_host_port(const char *rest, char host[HOST_MAX], const char **port_out)
{
	const char *port;
	if (rest[0] == '[') {
		const char *end = strchr(rest, ']');
		if (!end || end[1] != ':' || (size_t)(end - rest - 1) >= HOST_MAX || end == rest + 1)
			return PBRPC_EADDRESS;
		memcpy(host, rest + 1, (size_t)(end - rest - 1));
		host[end - rest - 1] = '\0';
		port = end + 2;
	} else {
		const char *colon = strrchr(rest, ':');
		if (!colon || colon == rest || (size_t)(colon - rest) >= HOST_MAX || memchr(rest, ':', (size_t)(colon - rest)))
			return PBRPC_EADDRESS;
		memcpy(host, rest, (size_t)(colon - rest));
		host[colon - rest] = '\0';
		port = colon + 1;
	}
	char *endp;
	if (!*port)
		return PBRPC_EADDRESS;
	long p = strtol(port, &endp, 10);
	if (*endp || p < 0 || p > 65535)
		return PBRPC_EADDRESS;
	*port_out = port;
	return 0;
}

static int parse_tcp(const char *rest, pbrpc_endpoint *out)
{
	char host[HOST_MAX];
	const char *port;
	int rc = split_host_port(rest, host, &port);
	if (rc < 0)
		return rc;

	struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV };
	struct addrinfo *res = NULL;
	if (resolver(host, port, &hints, &res) != 0 || !res)
		return -EADDRNOTAVAIL;
	memcpy(&out->addr, res->ai_addr, res->ai_addrlen);
	out->addrlen = res->ai_addrlen;
	freeaddrinfo(res);
	out->kind = PBRPC_ENDPOINT_TCP;
	memcpy(out->host, host, sizeof(host));
	return 0;
}

PBRPC_EXPORT int pbrpc_endpoint_parse(const char *str, pbrpc_endpoint *out)
{
	memset(out, 0, sizeof(*out));
	if (!str)
		return PBRPC_EADDRESS;
	if (strncmp(str, "unix:", 5) == 0)
		return parse_unix(str + 5, out);
	if (strncmp(str, "tcp:", 4) == 0)
		return parse_tcp(str + 4, out);
	if (strncmp(str, "tls:", 4) == 0) {
		out->tls = true;
		return parse_tcp(str + 4, out);
	}
	return PBRPC_EADDRESS;
}

PBRPC_EXPORT void pbrpc_endpoint_format(const pbrpc_endpoint *ep, char *buf, size_t len)
{
	char host[INET6_ADDRSTRLEN] = "?";
	switch (ep->kind) {
	case PBRPC_ENDPOINT_UNIX:
		snprintf(buf, len, "unix:%s", ep->path);
		return;
	case PBRPC_ENDPOINT_ABSTRACT:
		snprintf(buf, len, "unix:@%s", ep->path);
		return;
	case PBRPC_ENDPOINT_TCP:
		if (ep->addr.ss_family == AF_INET6) {
			const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&ep->addr;
			inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
			snprintf(buf, len, "%s:[%s]:%u", ep->tls ? "tls" : "tcp", host, ntohs(a->sin6_port));
		} else {
			const struct sockaddr_in *a = (const struct sockaddr_in *)&ep->addr;
			inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
			snprintf(buf, len, "%s:%s:%u", ep->tls ? "tls" : "tcp", host, ntohs(a->sin_port));
		}
		return;
	}
	snprintf(buf, len, "?");
}

static void tune_socket(int fd, const pbrpc_endpoint *ep)
{
	if (ep->kind == PBRPC_ENDPOINT_TCP) {
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	}
}

/* A socket file is stale when nothing accepts connections on it. */
static int unix_path_in_use(const pbrpc_endpoint *ep)
{
	struct stat st;
	if (lstat(ep->path, &st) < 0)
		return 0;
	if (!S_ISSOCK(st.st_mode))
		return -EEXIST;
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	int r = connect(fd, (const struct sockaddr *)&ep->addr, ep->addrlen);
	int err = errno;
	close(fd);
	if (r == 0 || err == EAGAIN)
		return -EADDRINUSE;
	if (err == ECONNREFUSED) {
		if (unlink(ep->path) < 0 && errno != ENOENT)
			return -errno;
		return 0;
	}
	return -err;
}

PBRPC_EXPORT int pbrpc_endpoint_listen(pbrpc_endpoint *ep, const pbrpc_listen_opts *opts)
{
	pbrpc_listen_opts defaults = { 0 };
	if (!opts)
		opts = &defaults;
	int fd = socket(ep->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC | (opts->nonblock ? SOCK_NONBLOCK : 0), 0);
	if (fd < 0)
		return -errno;
	int err;
	if (ep->kind == PBRPC_ENDPOINT_TCP) {
		int one = 1;
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (ep->addr.ss_family == AF_INET6)
			setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
	}
	if (bind(fd, (const struct sockaddr *)&ep->addr, ep->addrlen) < 0) {
		err = -errno;
		if (err == -EADDRINUSE && ep->kind == PBRPC_ENDPOINT_UNIX) {
			err = unix_path_in_use(ep);
			if (err == 0 && bind(fd, (const struct sockaddr *)&ep->addr, ep->addrlen) < 0)
				err = -errno;
		}
		if (err < 0)
			goto err_fd;
	}
	if (ep->kind == PBRPC_ENDPOINT_UNIX && opts->mode && chmod(ep->path, opts->mode & 07777) < 0) {
		err = -errno;
		unlink(ep->path);
		goto err_fd;
	}
	if (listen(fd, opts->backlog > 0 ? opts->backlog : SOMAXCONN) < 0) {
		err = -errno;
		if (ep->kind == PBRPC_ENDPOINT_UNIX)
			unlink(ep->path);
		goto err_fd;
	}
	if (ep->kind == PBRPC_ENDPOINT_TCP) {
		ep->addrlen = sizeof(ep->addr);
		getsockname(fd, (struct sockaddr *)&ep->addr, &ep->addrlen);
	}
	return fd;
err_fd:
	close(fd);
	return err;
}

PBRPC_EXPORT int pbrpc_endpoint_connect(const pbrpc_endpoint *ep, int timeout_ms)
{
	int fd = socket(ep->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -errno;
	int err = 0;
	if (connect(fd, (const struct sockaddr *)&ep->addr, ep->addrlen) < 0) {
		if (errno != EINPROGRESS && errno != EAGAIN) {
			err = -errno;
			goto err_fd;
		}
		struct pollfd p = { .fd = fd, .events = POLLOUT };
		int r;
		do
			r = poll(&p, 1, timeout_ms);
		while (r < 0 && errno == EINTR);
		if (r == 0) {
			err = -ETIMEDOUT;
			goto err_fd;
		}
		int soerr = 0;
		socklen_t sl = sizeof(soerr);
		getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
		if (soerr) {
			err = -soerr;
			goto err_fd;
		}
	}
	/* Blocking from here on: the client's fast path is a plain blocking read. */
	int fl = fcntl(fd, F_GETFL);
	fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
	tune_socket(fd, ep);
	return fd;
err_fd:
	close(fd);
	return err;
}

PBRPC_EXPORT int pbrpc_endpoint_from_fd(int fd, pbrpc_endpoint *out)
{
	memset(out, 0, sizeof(*out));
	out->addrlen = sizeof(out->addr);
	if (getsockname(fd, (struct sockaddr *)&out->addr, &out->addrlen) < 0)
		return -errno;
	if (out->addr.ss_family == AF_INET || out->addr.ss_family == AF_INET6) {
		out->kind = PBRPC_ENDPOINT_TCP;
		return 0;
	}
	if (out->addr.ss_family != AF_UNIX)
		return PBRPC_EADDRESS;
	const struct sockaddr_un *sun = (const struct sockaddr_un *)&out->addr;
	size_t n = out->addrlen > offsetof(struct sockaddr_un, sun_path) ? out->addrlen - offsetof(struct sockaddr_un, sun_path) : 0;
	if (n > 0 && sun->sun_path[0] == '\0') {
		out->kind = PBRPC_ENDPOINT_ABSTRACT;
		memcpy(out->path, sun->sun_path + 1, n - 1);
		out->path[n - 1] = '\0';
	} else {
		out->kind = PBRPC_ENDPOINT_UNIX;
		snprintf(out->path, sizeof(out->path), "%.*s", (int)n, sun->sun_path);
	}
	return 0;
}

/* One address's share of what is left of the timeout: a refused address
 * costs nothing, so the ones after it get more; the last gets all. */
static int share_ms(int64_t deadline, int left_to_try)
{
	if (!deadline)
		return -1;
	int ms = pbrpc__ms_until(deadline);
	if (ms < 1)
		ms = 1;
	return left_to_try > 1 ? (ms / left_to_try > 0 ? ms / left_to_try : 1) : ms;
}

int pbrpc__endpoint_dial(pbrpc_endpoint *ep, const char *str, int timeout_ms)
{
	const char *rest = str ? strchr(str, ':') : NULL;
	if (ep->kind != PBRPC_ENDPOINT_TCP || !rest)
		return pbrpc_endpoint_connect(ep, timeout_ms);
	char host[HOST_MAX];
	const char *port;
	if (split_host_port(rest + 1, host, &port) < 0)
		return pbrpc_endpoint_connect(ep, timeout_ms);
	int64_t deadline = timeout_ms < 0 ? 0 : pbrpc__deadline_in(pbrpc__now_ns(), timeout_ms);
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV };
	struct addrinfo *res = NULL;
	if (resolver(host, port, &hints, &res) != 0 || !res)
		return -EADDRNOTAVAIL;
	int n = 0;
	for (const struct addrinfo *a = res; a; a = a->ai_next)
		n++;
	int fd = -EADDRNOTAVAIL;
	for (const struct addrinfo *a = res; a; a = a->ai_next, n--) {
		if (a->ai_addrlen > sizeof(ep->addr))
			continue;
		pbrpc_endpoint one = *ep;
		memcpy(&one.addr, a->ai_addr, a->ai_addrlen);
		one.addrlen = a->ai_addrlen;
		fd = pbrpc_endpoint_connect(&one, share_ms(deadline, n));
		if (fd >= 0) {
			*ep = one;
			break;
		}
		if (deadline && pbrpc__now_ns() >= deadline) {
			fd = -ETIMEDOUT;
			break;
		}
	}
	freeaddrinfo(res);
	return fd;
}
