/* TLS under a connection (see tls.h): contexts, sessions over the I/O
 * shim, the handshake and its checks, records both ways, the peer's
 * certificate. */
#include "conn/tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/stat.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "conn/conn.h"
#include "proto/wire.h"
#include "util/io.h"

#define WHY_MAX 256
#define TLS_RECORD_TYPE_HANDSHAKE 0x16 /* the first byte of a ClientHello */

static const unsigned char alpn_wire[] = "\x07" PBRPC__TLS_ALPN; /* length-prefixed, RFC 7301 */
#define ALPN_WIRE_LEN (sizeof(alpn_wire) - 1)

struct pbrpc__tls_ctx {
	SSL_CTX *ssl;
	bool server;
};

struct pbrpc__tls {
	SSL *ssl;
	int fd;
	bool server;
	bool locked;      /* take mu around OpenSSL calls */
	bool established; /* the handshake and its checks are done */
	bool peeked;      /* server: the first byte was a TLS record */
	bool shut;        /* close_notify sent (or not to be sent) */
	bool read_wants_write;
	bool full;        /* the last read stopped with the buffer full, not
	                   * because OpenSSL needed the socket */
	int err;          /* sticky: every later call returns it */
	bool fatal;       /* err left the session unusable (no GOAWAY through it) */
	int sys_err;      /* errno of the BIO's last failed socket call */
	uint32_t hs_events; /* during the handshake: what it waits for */
	uint8_t first[512]; /* client: the server's first bytes */
	size_t first_len;
	pbrpc__tls_peer *peer;
	pthread_mutex_t mu;
	char host[256];
	char why[WHY_MAX];
};

/* ---- errors ---- */

/* OpenSSL's reason for the last failure, in words a user can act on. */
static const char *reason_text(unsigned long e, char *buf, size_t len)
{
	switch (ERR_GET_REASON(e)) {
	case SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED:
		return "the server requires a client certificate (alert certificate_required)";
	case SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED:
		return "the peer rejected our certificate: it has expired (alert certificate_expired)";
	case SSL_R_TLSV1_ALERT_UNKNOWN_CA:
		return "the peer rejected our certificate: not signed by a CA it trusts (alert unknown_ca)";
	case SSL_R_SSLV3_ALERT_BAD_CERTIFICATE:
		return "the peer rejected our certificate (alert bad_certificate)";
	case SSL_R_TLSV1_ALERT_NO_APPLICATION_PROTOCOL:
		return "the peer refused ALPN " PBRPC__TLS_ALPN " (alert no_application_protocol)";
	case SSL_R_NO_APPLICATION_PROTOCOL:
		return "the peer offered no ALPN " PBRPC__TLS_ALPN;
	case SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE:
		return "the client sent no certificate and this server requires one";
	case SSL_R_TLSV1_ALERT_PROTOCOL_VERSION:
	case SSL_R_UNSUPPORTED_PROTOCOL:
		return "no TLS version in common (this side requires TLS 1.3 unless told otherwise)";
	}
	ERR_error_string_n(e, buf, len);
	return buf;
}

/* A plaintext pbrpc server answered our ClientHello: its preface, HELLO and
 * GOAWAY say why (a plaintext port, or a refusal such as "too many
 * connections"). Reads what more came within a moment (OpenSSL gave up
 * after a few bytes), then writes "server does not speak TLS ..." to why. */
static void why_plaintext(pbrpc__tls *t)
{
	struct pollfd p = { .fd = t->fd, .events = POLLIN };
	while (t->first_len < sizeof(t->first) && poll(&p, 1, 200) > 0) {
		ssize_t n = pbrpc__io_recv(t->fd, t->first + t->first_len, sizeof(t->first) - t->first_len, MSG_DONTWAIT);
		if (n <= 0)
			break;
		t->first_len += (size_t)n;
	}
	size_t at = PBRPC_WIRE_PREFACE_SIZE;
	while (at + PBRPC_FRAME_HEADER_SIZE <= t->first_len) {
		pbrpc__frame f;
		pbrpc__frame_header_decode(t->first + at, &f.hdr);
		f.payload = t->first + at + PBRPC_FRAME_HEADER_SIZE;
		if (f.hdr.length > t->first_len - at - PBRPC_FRAME_HEADER_SIZE)
			break;
		int st;
		const char *m;
		size_t ml;
		if (f.hdr.type == PBRPC_FRAME_GOAWAY && pbrpc__wire_read_goaway(&f, &st, &m, &ml) == 0) {
			snprintf(t->why, sizeof(t->why),
				 "server does not speak TLS: it answered in plaintext pbrpc: GOAWAY %s: %.*s",
				 pbrpc_status_name(st), (int)(ml > 160 ? 160 : ml), m);
			return;
		}
		at += PBRPC_FRAME_HEADER_SIZE + f.hdr.length;
	}
	snprintf(t->why, sizeof(t->why), "server does not speak TLS (it answered with a plaintext pbrpc preface)");
}

/* Fills t->why from the verify result or OpenSSL's error queue. */
static void why_ssl(pbrpc__tls *t, const char *what)
{
	long v = SSL_get_verify_result(t->ssl);
	unsigned long e = ERR_peek_last_error();
	bool verify = ERR_GET_REASON(e) == SSL_R_CERTIFICATE_VERIFY_FAILED;
	if (verify && v != X509_V_OK) {
		const char *s = X509_verify_cert_error_string(v);
		if (v == X509_V_ERR_HOSTNAME_MISMATCH || v == X509_V_ERR_IP_ADDRESS_MISMATCH)
			snprintf(t->why, sizeof(t->why), "server certificate rejected: %s (it is not valid for %.100s)", s,
				 t->host);
		else
			snprintf(t->why, sizeof(t->why), "%s certificate rejected: %s", t->server ? "client" : "server", s);
		return;
	}
	if (!t->server && t->first_len && t->first[0] == (uint8_t)PBRPC_WIRE_PREFACE[0]) {
		why_plaintext(t);
		return;
	}
	if (!t->server && t->first_len && t->first[0] != TLS_RECORD_TYPE_HANDSHAKE && t->first[0] != 0x15) {
		snprintf(t->why, sizeof(t->why), "server does not speak TLS (its first byte is 0x%02x)", t->first[0]);
		return;
	}
	char buf[160];
	snprintf(t->why, sizeof(t->why), "%s: %s", what, e ? reason_text(e, buf, sizeof(buf)) : "failed");
}

/* The code for a failed OpenSSL call (r, its return). Sticky. */
static int failed(pbrpc__tls *t, int r, const char *what)
{
	int e = SSL_get_error(t->ssl, r);
	int code;
	if (e == SSL_ERROR_ZERO_RETURN) {
		code = PBRPC_EOF;
		snprintf(t->why, sizeof(t->why), "the peer closed the TLS session");
	} else if (e == SSL_ERROR_SYSCALL && t->sys_err) {
		code = -t->sys_err;
		/* A client that sent a certificate may meet the server's close in
		 * the handshake's last write too (TLS 1.3: the server checks it
		 * after its own Finished). */
		bool sent_cert = !t->server && SSL_get_certificate(t->ssl) != NULL;
		if (!t->server && (t->established || sent_cert) && (t->sys_err == ECONNRESET || t->sys_err == EPIPE))
			snprintf(t->why, sizeof(t->why), "%s: %s (the server may have refused our certificate: see its log)",
				 what, strerror(t->sys_err));
		else
			snprintf(t->why, sizeof(t->why), "%s: %s", what, strerror(t->sys_err));
	} else if (e == SSL_ERROR_SYSCALL && !ERR_peek_error()) {
		code = PBRPC_EOF; /* end of stream without close_notify */
		snprintf(t->why, sizeof(t->why), "the peer closed the connection during %s", what);
	} else {
		why_ssl(t, what);
		code = strncmp(t->why, "server does not speak TLS", 25) == 0 ? PBRPC_ENOTLS : PBRPC_ETLS;
	}
	if (!t->established && code != PBRPC_ETLS && !t->server && !t->first_len &&
	    (code == -EPIPE || code == -ECONNRESET)) {
		/* our ClientHello hit a closed socket: read what it said first */
		struct pollfd p = { .fd = t->fd, .events = POLLIN };
		ssize_t n = poll(&p, 1, 200) > 0 ? pbrpc__io_recv(t->fd, t->first, sizeof(t->first), MSG_DONTWAIT) : 0;
		t->first_len = n > 0 ? (size_t)n : 0;
	}
	if (!t->established && code != PBRPC_ETLS && !t->server && t->first_len &&
	    t->first[0] == (uint8_t)PBRPC_WIRE_PREFACE[0]) { /* it closed, or reset, after its preface */
		code = PBRPC_ENOTLS;
		why_plaintext(t);
	}
	ERR_clear_error();
	t->err = code;
	t->fatal = true;
	t->shut = true; /* no SSL_shutdown after a fatal error */
	return code;
}

/* ---- the BIO: OpenSSL's socket I/O through the shim ---- */

static int bio_write(BIO *b, const char *buf, int len)
{
	pbrpc__tls *t = BIO_get_data(b);
	BIO_clear_retry_flags(b);
	struct iovec iov = { (void *)(uintptr_t)buf, (size_t)len };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
	for (;;) {
		ssize_t n = pbrpc__sendmsg(t->fd, &msg, MSG_DONTWAIT);
		if (n >= 0)
			return (int)n;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK) {
			BIO_set_retry_write(b);
			return -1;
		}
		t->sys_err = errno;
		return -1;
	}
}

static int bio_read(BIO *b, char *buf, int len)
{
	pbrpc__tls *t = BIO_get_data(b);
	BIO_clear_retry_flags(b);
	ssize_t n = pbrpc__io_recv(t->fd, buf, (size_t)len, MSG_DONTWAIT);
	if (n > 0) {
		if (!t->established && t->first_len < sizeof(t->first)) {
			size_t k = sizeof(t->first) - t->first_len < (size_t)n ? sizeof(t->first) - t->first_len : (size_t)n;
			memcpy(t->first + t->first_len, buf, k);
			t->first_len += k;
		}
		return (int)n;
	}
	if (n == 0) {
		BIO_set_retry_read(b);
		return -1;
	}
	if (n == PBRPC_EOF)
		return 0;
	t->sys_err = (int)-n;
	return -1;
}

static long bio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
	(void)b, (void)num, (void)ptr;
	return cmd == BIO_CTRL_FLUSH ? 1 : 0;
}

static int bio_create(BIO *b)
{
	BIO_set_init(b, 1);
	return 1;
}

static BIO_METHOD *bio_method;
static pthread_once_t bio_once = PTHREAD_ONCE_INIT;

/* One method for the process, kept until exit (OpenSSL's globals are too). */
static void bio_method_init(void)
{
	BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "pbrpc");
	if (m && BIO_meth_set_write(m, bio_write) && BIO_meth_set_read(m, bio_read) && BIO_meth_set_ctrl(m, bio_ctrl) &&
	    BIO_meth_set_create(m, bio_create))
		bio_method = m;
	else
		BIO_meth_free(m);
}

/* ---- contexts ---- */

static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
		       unsigned int inlen, void *arg)
{
	(void)ssl, (void)arg;
	for (unsigned i = 0; i < inlen; i += 1u + in[i]) {
		if (in[i] == ALPN_WIRE_LEN - 1 && i + ALPN_WIRE_LEN <= inlen &&
		    memcmp(in + i, alpn_wire, ALPN_WIRE_LEN) == 0) {
			*out = in + i + 1;
			*outlen = in[i];
			return SSL_TLSEXT_ERR_OK;
		}
	}
	return SSL_TLSEXT_ERR_ALERT_FATAL; /* no_application_protocol */
}

static int ctx_fail(SSL_CTX *ssl, char *why, size_t len, const char *what, const char *file)
{
	unsigned long e = ERR_peek_last_error();
	char buf[160];
	const char *r = e ? reason_text(e, buf, sizeof(buf)) : "failed";
	if (ERR_GET_LIB(e) == ERR_LIB_X509 && ERR_GET_REASON(e) == X509_R_KEY_VALUES_MISMATCH)
		r = "it does not match the certificate";
	else if (ERR_GET_LIB(e) == ERR_LIB_SSL && ERR_GET_REASON(e) == ERR_R_PEM_LIB)
		r = "no PEM key or certificate of that kind in it, or it does not exist";
	snprintf(why, len, "%s %s: %s", what, file, r);
	ERR_clear_error();
	SSL_CTX_free(ssl);
	return PBRPC_ETLS;
}

static int load_ca(SSL_CTX *ssl, const char *ca)
{
	struct stat st;
	bool dir = stat(ca, &st) == 0 && S_ISDIR(st.st_mode);
	return SSL_CTX_load_verify_locations(ssl, dir ? NULL : ca, dir ? ca : NULL);
}

int pbrpc__tls_ctx_new(pbrpc__tls_ctx **out, bool server, const pbrpc_tls_opts *o, char *why, size_t len)
{
	*out = NULL;
	why[0] = '\0';
	pthread_once(&bio_once, bio_method_init);
	if (!bio_method)
		return -ENOMEM;
	ERR_clear_error();
	SSL_CTX *ssl = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
	if (!ssl)
		return -ENOMEM;
	if (o->min_version && o->min_version != 12 && o->min_version != 13) {
		snprintf(why, len, "min_version %d: expected 12 or 13", o->min_version);
		SSL_CTX_free(ssl);
		return PBRPC_EINVALID;
	}
	SSL_CTX_set_min_proto_version(ssl, o->min_version == 12 ? TLS1_2_VERSION : TLS1_3_VERSION);
	/* No renegotiation (SSL_write never needs a read), no tickets or
	 * session cache (nothing is resumed), EOF without close_notify is an
	 * EOF (the frame layer tells a cut frame from a clean end). */
	SSL_CTX_set_options(ssl, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_TICKET | SSL_OP_IGNORE_UNEXPECTED_EOF |
					  SSL_OP_NO_COMPRESSION);
	SSL_CTX_set_session_cache_mode(ssl, SSL_SESS_CACHE_OFF);
	/* Writes resume from the writer's head, which may have moved (it is
	 * compacted or grown between tries); idle sessions hold no buffers. */
	SSL_CTX_set_mode(ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
				      SSL_MODE_RELEASE_BUFFERS);
	SSL_CTX_set_read_ahead(ssl, 1); /* one recv per few records, not two per record */
	if (server)
		SSL_CTX_set_num_tickets(ssl, 0);

	if (server && !o->cert) {
		snprintf(why, len, "a TLS server needs a certificate (tls.cert) and its key");
		SSL_CTX_free(ssl);
		return PBRPC_ETLS;
	}
	if (o->cert) {
		if (SSL_CTX_use_certificate_chain_file(ssl, o->cert) != 1)
			return ctx_fail(ssl, why, len, "cannot load the certificate chain", o->cert);
		const char *key = o->key ? o->key : o->cert;
		if (SSL_CTX_use_PrivateKey_file(ssl, key, SSL_FILETYPE_PEM) != 1)
			return ctx_fail(ssl, why, len, "cannot load the private key", key);
		if (SSL_CTX_check_private_key(ssl) != 1)
			return ctx_fail(ssl, why, len, "the private key does not match the certificate in", o->cert);
	}
	if (server) {
		SSL_CTX_set_alpn_select_cb(ssl, alpn_select, NULL);
		pbrpc_tls_verify v = o->verify ? o->verify : (o->ca ? PBRPC_TLS_VERIFY_REQUIRE : PBRPC_TLS_VERIFY_NONE);
		if (v != PBRPC_TLS_VERIFY_NONE) {
			if (!o->ca) {
				snprintf(why, len, "verifying client certificates needs a CA (tls.ca)");
				SSL_CTX_free(ssl);
				return PBRPC_ETLS;
			}
			if (load_ca(ssl, o->ca) != 1)
				return ctx_fail(ssl, why, len, "cannot load the CA certificates", o->ca);
			STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(o->ca);
			if (names)
				SSL_CTX_set_client_CA_list(ssl, names);
			ERR_clear_error(); /* a directory has no names to send */
			SSL_CTX_set_verify(ssl,
					   SSL_VERIFY_PEER |
						   (v == PBRPC_TLS_VERIFY_REQUIRE ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0),
					   NULL);
		}
	} else {
		if (SSL_CTX_set_alpn_protos(ssl, alpn_wire, ALPN_WIRE_LEN) != 0) {
			SSL_CTX_free(ssl);
			return -ENOMEM;
		}
		if (o->ca ? load_ca(ssl, o->ca) != 1 : SSL_CTX_set_default_verify_paths(ssl) != 1)
			return ctx_fail(ssl, why, len, "cannot load the CA certificates", o->ca ? o->ca : "(system store)");
		SSL_CTX_set_verify(ssl, SSL_VERIFY_PEER, NULL);
	}
	pbrpc__tls_ctx *x = calloc(1, sizeof(*x));
	if (!x) {
		SSL_CTX_free(ssl);
		return -ENOMEM;
	}
	x->ssl = ssl;
	x->server = server;
	*out = x;
	return 0;
}

void pbrpc__tls_ctx_free(pbrpc__tls_ctx *x)
{
	if (!x)
		return;
	SSL_CTX_free(x->ssl);
	free(x);
}

/* ---- sessions ---- */

static bool is_ip(const char *host)
{
	unsigned char buf[16];
	return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

int pbrpc__tls_new(pbrpc__tls **out, pbrpc__tls_ctx *x, int fd, const char *host, bool locked)
{
	*out = NULL;
	pbrpc__tls *t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->fd = fd;
	t->server = x->server;
	t->locked = locked;
	t->hs_events = t->server ? EPOLLIN : EPOLLOUT;
	pthread_mutex_init(&t->mu, NULL);
	t->ssl = SSL_new(x->ssl);
	BIO *bio = t->ssl ? BIO_new(bio_method) : NULL;
	if (!bio)
		goto err;
	BIO_set_data(bio, t);
	SSL_set_bio(t->ssl, bio, bio);
	if (t->server) {
		SSL_set_accept_state(t->ssl);
	} else {
		SSL_set_connect_state(t->ssl);
		snprintf(t->host, sizeof(t->host), "%s", host ? host : "");
		/* SNI carries names only (RFC 6066); an address is checked as an IP SAN. */
		if (is_ip(t->host)) {
			if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(t->ssl), t->host) != 1)
				goto err;
		} else if (SSL_set_tlsext_host_name(t->ssl, t->host) != 1 || SSL_set1_host(t->ssl, t->host) != 1) {
			goto err;
		}
		SSL_set_hostflags(t->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
	}
	*out = t;
	return 0;
err:
	ERR_clear_error();
	pbrpc__tls_free(t);
	return -ENOMEM;
}

void pbrpc__tls_free(pbrpc__tls *t)
{
	if (!t)
		return;
	SSL_free(t->ssl);
	pbrpc__tls_peer_unref(t->peer);
	pthread_mutex_destroy(&t->mu);
	free(t);
}

static void lock(pbrpc__tls *t)
{
	if (t->locked)
		pthread_mutex_lock(&t->mu);
}

static void unlock(pbrpc__tls *t)
{
	if (t->locked)
		pthread_mutex_unlock(&t->mu);
}

bool pbrpc__tls_established(const pbrpc__tls *t)
{
	return t->established;
}

const char *pbrpc__tls_why(const pbrpc__tls *t)
{
	return t->why[0] ? t->why : "TLS failed";
}

bool pbrpc__tls_usable(const pbrpc__tls *t)
{
	return t->established && !t->fatal;
}

/* A server that refused a handshake reads what the client sent meanwhile
 * (the rest of its flight, its preface): closing with bytes unread would
 * send a reset, which can overtake the alert that says why. */
static void drain_input(pbrpc__tls *t)
{
	uint8_t buf[4096];
	for (int i = 0; i < 1024; i++)
		if (pbrpc__io_recv(t->fd, buf, sizeof(buf), MSG_DONTWAIT) <= 0)
			return;
}

void pbrpc__tls_close(pbrpc__tls *t)
{
	lock(t);
	if (t->server && t->fatal && !t->established)
		drain_input(t);
	if (t->established && !t->shut) {
		ERR_clear_error();
		SSL_shutdown(t->ssl); /* best effort, without waiting for the peer's */
		ERR_clear_error();
	}
	t->shut = true;
	unlock(t);
}

/* ---- the peer's certificate ---- */

typedef struct strbuf {
	char *p;
	size_t len, cap;
} strbuf;

/* Appends s and its NUL; returns its offset, or SIZE_MAX. */
static size_t sb_add(strbuf *b, const char *s, size_t n)
{
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap * 2 : 256;
		while (cap < b->len + n + 1)
			cap *= 2;
		char *np = realloc(b->p, cap);
		if (!np)
			return SIZE_MAX;
		b->p = np;
		b->cap = cap;
	}
	size_t at = b->len;
	memcpy(b->p + at, s, n);
	b->p[at + n] = '\0';
	b->len += n + 1;
	return at;
}

static size_t sb_addf(strbuf *b, const char *prefix, const unsigned char *s, int n)
{
	char tmp[512];
	int k = snprintf(tmp, sizeof(tmp), "%s%.*s", prefix, n, (const char *)s);
	return sb_add(b, tmp, k < 0 ? 0 : (size_t)k >= sizeof(tmp) ? sizeof(tmp) - 1 : (size_t)k);
}

/* subject, version, cipher, then the SANs: offsets into one string block. */
static pbrpc__tls_peer *peer_make(SSL *ssl)
{
	strbuf b = { 0 };
	size_t offs[64];
	size_t n = 0;
	size_t subject = SIZE_MAX;
	X509 *cert = SSL_get0_peer_certificate(ssl);
	if (cert) {
		BIO *mem = BIO_new(BIO_s_mem());
		if (mem && X509_NAME_print_ex(mem, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253) >= 0) {
			char *p;
			long len = BIO_get_mem_data(mem, &p);
			subject = sb_add(&b, len > 0 ? p : "", len > 0 ? (size_t)len : 0);
		}
		BIO_free(mem);
		GENERAL_NAMES *gens = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
		for (int i = 0; gens && i < sk_GENERAL_NAME_num(gens) && n < 64; i++) {
			const GENERAL_NAME *g = sk_GENERAL_NAME_value(gens, i);
			size_t at = SIZE_MAX;
			if (g->type == GEN_DNS)
				at = sb_addf(&b, "DNS:", ASN1_STRING_get0_data(g->d.dNSName), ASN1_STRING_length(g->d.dNSName));
			else if (g->type == GEN_URI)
				at = sb_addf(&b, "URI:", ASN1_STRING_get0_data(g->d.uniformResourceIdentifier),
					     ASN1_STRING_length(g->d.uniformResourceIdentifier));
			else if (g->type == GEN_EMAIL)
				at = sb_addf(&b, "email:", ASN1_STRING_get0_data(g->d.rfc822Name),
					     ASN1_STRING_length(g->d.rfc822Name));
			else if (g->type == GEN_IPADD) {
				char ip[INET6_ADDRSTRLEN] = "?";
				int len = ASN1_STRING_length(g->d.iPAddress);
				const unsigned char *a = ASN1_STRING_get0_data(g->d.iPAddress);
				if (len == 4 || len == 16)
					inet_ntop(len == 4 ? AF_INET : AF_INET6, a, ip, sizeof(ip));
				at = sb_addf(&b, "IP:", (const unsigned char *)ip, (int)strlen(ip));
			}
			if (at != SIZE_MAX)
				offs[n++] = at;
		}
		GENERAL_NAMES_free(gens);
	}
	const char *ver = SSL_get_version(ssl), *cipher = SSL_get_cipher_name(ssl);
	size_t v = sb_add(&b, ver ? ver : "?", ver ? strlen(ver) : 1);
	size_t ci = sb_add(&b, cipher ? cipher : "?", cipher ? strlen(cipher) : 1);
	size_t head = sizeof(pbrpc__tls_peer) + n * sizeof(char *);
	pbrpc__tls_peer *p = (v == SIZE_MAX || ci == SIZE_MAX) ? NULL : malloc(head + b.len);
	if (p) {
		char *strs = (char *)p + head;
		memcpy(strs, b.p, b.len);
		const char **sans = (const char **)(void *)(p + 1);
		for (size_t i = 0; i < n; i++)
			sans[i] = strs + offs[i];
		atomic_init(&p->refs, 1);
		p->pub = (pbrpc_tls_peer){ .subject = subject == SIZE_MAX ? NULL : strs + subject,
					   .sans = sans,
					   .n_sans = n,
					   .version = strs + v,
					   .cipher = strs + ci };
	}
	free(b.p);
	return p;
}

pbrpc__tls_peer *pbrpc__tls_peer_ref(pbrpc__tls *t)
{
	pbrpc__tls_peer *p = t->peer;
	if (p)
		atomic_fetch_add_explicit(&p->refs, 1, memory_order_relaxed);
	return p;
}

void pbrpc__tls_peer_unref(pbrpc__tls_peer *p)
{
	if (p && atomic_fetch_sub_explicit(&p->refs, 1, memory_order_acq_rel) == 1)
		free(p);
}

/* ---- the handshake ---- */

/* The checks TLS itself does not make: ALPN pbrpc/1 both ways. */
static int established(pbrpc__tls *t)
{
	const unsigned char *proto = NULL;
	unsigned int plen = 0;
	SSL_get0_alpn_selected(t->ssl, &proto, &plen);
	if (plen != ALPN_WIRE_LEN - 1 || memcmp(proto, alpn_wire + 1, plen) != 0) {
		snprintf(t->why, sizeof(t->why), "%s", t->server ? "the client did not offer ALPN " PBRPC__TLS_ALPN
								 : "the server did not select ALPN " PBRPC__TLS_ALPN
								   " (not a pbrpc server?)");
		t->established = true; /* the session works: a GOAWAY can say it */
		t->err = PBRPC_ETLS;
		return PBRPC_ETLS;
	}
	if (t->server && !(t->peer = peer_make(t->ssl))) {
		t->fatal = t->shut = true;
		return t->err = -ENOMEM;
	}
	t->established = true;
	/* The handshake may have ended in a write (the peer's Finished read by
	 * SSL_do_handshake there), its first records read with it: nothing
	 * reads them yet, and the socket may be empty. */
	t->full = true;
	return 1;
}

/* A server's first byte: a TLS record, a plaintext pbrpc client, or
 * neither. Returns 1, 0 (nothing yet) or a code. */
static int peek_first(pbrpc__tls *t)
{
	uint8_t b;
	ssize_t n = pbrpc__io_recv(t->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
	if (n <= 0) {
		t->hs_events = EPOLLIN;
		if (n < 0) {
			snprintf(t->why, sizeof(t->why), "the client closed the connection before the TLS handshake");
			t->err = (int)n;
			t->fatal = t->shut = true;
		}
		return (int)n;
	}
	t->peeked = true;
	if (b == TLS_RECORD_TYPE_HANDSHAKE)
		return 1;
	t->fatal = t->shut = true;
	if (b == (uint8_t)PBRPC_WIRE_PREFACE[0]) {
		snprintf(t->why, sizeof(t->why), "the client sent a plaintext pbrpc preface to a TLS port");
		return t->err = PBRPC_ENOTLS;
	}
	snprintf(t->why, sizeof(t->why), "the client sent no TLS ClientHello (first byte 0x%02x)", b);
	return t->err = PBRPC_ETLS;
}

/* One step; returns 1 once established, 0 to wait (hs_events), or a code. */
static int handshake(pbrpc__tls *t)
{
	if (t->server && !t->peeked) {
		int r = peek_first(t);
		if (r <= 0)
			return r;
	}
	ERR_clear_error();
	t->sys_err = 0;
	int r = SSL_do_handshake(t->ssl);
	if (r == 1)
		return established(t);
	int e = SSL_get_error(t->ssl, r);
	if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
		t->hs_events = e == SSL_ERROR_WANT_READ ? EPOLLIN : EPOLLOUT;
		return 0;
	}
	return failed(t, r, "TLS handshake failed");
}

/* ---- records ---- */

/* Reads until cap is full or OpenSSL needs the socket; bytes already read
 * come first, an error after them on the next call. */
static ssize_t tls_read(pbrpc__tls *t, uint8_t *buf, size_t cap)
{
	if (t->err)
		return t->err;
	if (!t->established) {
		int r = handshake(t);
		if (r <= 0)
			return r;
	}
	t->read_wants_write = false;
	size_t got = 0;
	while (got < cap) {
		size_t n = 0;
		ERR_clear_error();
		t->sys_err = 0;
		int r = SSL_read_ex(t->ssl, buf + got, cap - got, &n);
		if (r == 1) {
			got += n;
			continue;
		}
		int e = SSL_get_error(t->ssl, r);
		if (e == SSL_ERROR_WANT_READ)
			break;
		if (e == SSL_ERROR_WANT_WRITE) {
			t->read_wants_write = true;
			break;
		}
		int code = failed(t, r, "TLS read failed");
		if (!got)
			return code;
		break;
	}
	t->full = got == cap;
	return (ssize_t)got;
}

static ssize_t tls_write(pbrpc__tls *t, const uint8_t *buf, size_t len)
{
	/* A failed handshake is reported by the next read, with its words
	 * (pbrpc__conn_tls_events wakes the role for it); a session refused
	 * after it (ALPN) still carries the GOAWAY that says so. */
	if (t->err && t->fatal)
		return t->established ? t->err : 0;
	if (!t->established && handshake(t) <= 0)
		return 0;
	size_t done = 0;
	while (done < len) {
		size_t n = 0;
		ERR_clear_error();
		t->sys_err = 0;
		int r = SSL_write_ex(t->ssl, buf + done, len - done, &n);
		if (r == 1) {
			done += n;
			continue;
		}
		int e = SSL_get_error(t->ssl, r);
		if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ)
			break;
		int code = failed(t, r, "TLS write failed");
		return done ? (ssize_t)done : code;
	}
	return (ssize_t)done;
}

/* ---- the connection's transport (conn.h) ---- */

ssize_t pbrpc__conn_tls_recv(pbrpc__conn *c, uint8_t *buf, size_t cap)
{
	pbrpc__tls *t = c->tls;
	lock(t);
	ssize_t n = tls_read(t, buf, cap);
	unlock(t);
	return n;
}

/* A blocking read for the client's synchronous reader, which holds no
 * lock: OpenSSL is only called without blocking, and the wait is a poll
 * outside the session's mutex, so writers go on meanwhile. */
static ssize_t recv_wait(pbrpc__conn *c, uint8_t *buf, size_t cap)
{
	for (;;) {
		ssize_t n = pbrpc__conn_tls_recv(c, buf, cap);
		if (n != 0)
			return n;
		pbrpc__tls *t = c->tls;
		struct pollfd p = { .fd = c->fd, .events = POLLIN };
		if (t->read_wants_write || (!t->established && t->hs_events == EPOLLOUT))
			p.events |= POLLOUT;
		int ms = c->recv_timeout_ns > 0 ? (int)((c->recv_timeout_ns + 999999) / 1000000) : -1;
		int r = poll(&p, 1, ms);
		if (r == 0)
			return 0; /* as SO_RCVTIMEO's EAGAIN: the caller checks its deadline */
		if (r < 0 && errno != EINTR)
			return -errno;
	}
}

ssize_t pbrpc__conn_tls_recv_open(pbrpc__conn *c, int flags)
{
	size_t cap;
	uint8_t *p = pbrpc__frame_decoder_space(&c->dec, &cap);
	if (!p)
		return c->dec.in_len ? PBRPC_EINVALID : -ENOMEM;
	ssize_t n = (flags & MSG_DONTWAIT) ? pbrpc__conn_tls_recv(c, p, cap) : recv_wait(c, p, cap);
	if (n <= 0)
		return n == PBRPC_EOF && pbrpc__frame_decoder_pending(&c->dec) ? PBRPC_ETRUNCATED : n;
	pbrpc__frame_decoder_added(&c->dec, (size_t)n);
	return n;
}

ssize_t pbrpc__conn_tls_flush(pbrpc__conn *c)
{
	pbrpc__tls *t = c->tls;
	lock(t);
	ssize_t n = tls_write(t, pbrpc__frame_writer_data(&c->out), pbrpc__frame_writer_pending(&c->out));
	unlock(t);
	if (n > 0)
		pbrpc__frame_writer_consumed(&c->out, (size_t)n);
	return n;
}

uint32_t pbrpc__conn_tls_events(const pbrpc__conn *c, uint32_t plain)
{
	const pbrpc__tls *t = c->tls;
	if (t->err)
		return EPOLLIN | EPOLLOUT; /* wake up at once and read the error */
	if (!t->established)
		return t->hs_events;
	return plain | (t->read_wants_write ? EPOLLOUT : 0);
}

bool pbrpc__conn_tls_buffered(const pbrpc__conn *c)
{
	pbrpc__tls *t = c->tls;
	if (t->err)
		return true;
	if (!t->established || !t->full)
		return false; /* OpenSSL stopped for want of socket bytes: poll reports them */
	lock(t);
	bool more = SSL_has_pending(t->ssl) == 1;
	unlock(t);
	return more;
}
