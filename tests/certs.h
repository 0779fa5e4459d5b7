/* Certificates for the TLS tests, made at test time with OpenSSL's API (no
 * openssl CLI needed). tu_certs_make(dir) writes NAME.pem and NAME.key for:
 *   ca            the test CA
 *   server        CN=localhost, SANs DNS:localhost IP:127.0.0.1 IP:::1, by ca
 *   client        CN=alice, SANs URI:spiffe://pbrpc.test/alice
 *                 DNS:alice.example email:alice@pbrpc.test, by ca
 *   expired       as server, expired yesterday
 *   other-ca      another CA; other: as server, signed by it
 *   selfsigned    as server, self-signed
 *   client-other  CN=mallory, by other-ca
 *   client-expired CN=bob, by ca, expired
 * Aborts on failure (a broken test environment). */
#ifndef PBRPC_TESTS_CERTS_H
#define PBRPC_TESTS_CERTS_H

#include <stdbool.h>

void tu_certs_make(const char *dir);

#endif
