/* tls-certs DIR: writes the TLS tests' certificates (certs.h) into DIR, for
 * the shell tests of the daemon and the CLI. */
#include <stdio.h>

#include "certs.h"

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: tls-certs DIR\n");
		return 2;
	}
	tu_certs_make(argv[1]);
	return 0;
}
