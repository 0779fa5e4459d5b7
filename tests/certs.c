/* Test certificates, made with OpenSSL's API at test time (see certs.h). */
#include "certs.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

typedef struct issued {
	EVP_PKEY *key;
	X509 *cert;
} issued;

static void die(const char *what)
{
	fprintf(stderr, "certs: %s failed\n", what);
	abort();
}

static void add_ext(X509 *cert, X509 *issuer, int nid, const char *value)
{
	X509V3_CTX ctx;
	X509V3_set_ctx_nodb(&ctx);
	X509V3_set_ctx(&ctx, issuer, cert, NULL, NULL, 0);
	X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, &ctx, nid, value);
	if (!ext || !X509_add_ext(cert, ext, -1))
		die(value);
	X509_EXTENSION_free(ext);
}

/* A P-256 key and a certificate for cn, signed by ca (NULL: self-signed),
 * valid from now + from_days to now + to_days. */
static issued make(const char *cn, const issued *ca, bool is_ca, const char *san, long from_days, long to_days,
		   long serial)
{
	issued r;
	r.key = EVP_EC_gen("P-256");
	r.cert = X509_new();
	if (!r.key || !r.cert)
		die("key");
	X509_set_version(r.cert, 2);
	ASN1_INTEGER_set(X509_get_serialNumber(r.cert), serial);
	X509_gmtime_adj(X509_getm_notBefore(r.cert), from_days * 86400);
	X509_gmtime_adj(X509_getm_notAfter(r.cert), to_days * 86400);
	X509_NAME *name = X509_get_subject_name(r.cert);
	X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, (const unsigned char *)"pbrpc tests", -1, -1, 0);
	X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0);
	X509_set_issuer_name(r.cert, ca ? X509_get_subject_name(ca->cert) : name);
	X509_set_pubkey(r.cert, r.key);
	X509 *issuer = ca ? ca->cert : r.cert;
	add_ext(r.cert, issuer, NID_basic_constraints, is_ca ? "critical,CA:TRUE" : "CA:FALSE");
	add_ext(r.cert, issuer, NID_key_usage, is_ca ? "critical,keyCertSign,cRLSign" : "critical,digitalSignature");
	add_ext(r.cert, issuer, NID_subject_key_identifier, "hash");
	if (ca)
		add_ext(r.cert, issuer, NID_authority_key_identifier, "keyid");
	if (san)
		add_ext(r.cert, issuer, NID_subject_alt_name, san);
	if (!X509_sign(r.cert, ca ? ca->key : r.key, EVP_sha256()))
		die("sign");
	return r;
}

static void save(const char *dir, const char *name, const issued *it)
{
	char path[512];
	snprintf(path, sizeof(path), "%s/%s.pem", dir, name);
	FILE *f = fopen(path, "w");
	if (!f || !PEM_write_X509(f, it->cert) || fclose(f) != 0)
		die(path);
	snprintf(path, sizeof(path), "%s/%s.key", dir, name);
	f = fopen(path, "w");
	if (!f || !PEM_write_PrivateKey(f, it->key, NULL, NULL, 0, NULL, NULL) || fclose(f) != 0)
		die(path);
}

static void done(issued *it)
{
	X509_free(it->cert);
	EVP_PKEY_free(it->key);
}

#define SERVER_SANS "DNS:localhost,IP:127.0.0.1,IP:::1"

void tu_certs_make(const char *dir)
{
	issued ca = make("pbrpc test CA", NULL, true, NULL, -1, 3650, 1);
	issued other_ca = make("another CA", NULL, true, NULL, -1, 3650, 2);
	issued certs[] = {
		make("localhost", &ca, false, SERVER_SANS, -1, 365, 10),
		make("alice", &ca, false, "URI:spiffe://pbrpc.test/alice,DNS:alice.example,email:alice@pbrpc.test", -1,
		     365, 11),
		make("localhost", &ca, false, SERVER_SANS, -30, -1, 12),
		make("localhost", &other_ca, false, SERVER_SANS, -1, 365, 13),
		make("localhost", NULL, false, SERVER_SANS, -1, 365, 14),
		make("mallory", &other_ca, false, "DNS:mallory.example", -1, 365, 15),
		make("bob", &ca, false, "DNS:bob.example", -30, -1, 16),
	};
	const char *names[] = { "server", "client", "expired", "other", "selfsigned", "client-other", "client-expired" };
	save(dir, "ca", &ca);
	save(dir, "other-ca", &other_ca);
	for (size_t i = 0; i < sizeof(certs) / sizeof(certs[0]); i++) {
		save(dir, names[i], &certs[i]);
		done(&certs[i]);
	}
	done(&ca);
	done(&other_ca);
}
