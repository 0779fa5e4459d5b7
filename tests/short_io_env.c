/* For suites written before the short-I/O shim (test_services.c,
 * test_daemon.c): applies PBRPC_TEST_IO=short to the whole process, as
 * tu_setup() does per test in the other suites, without touching their
 * sources. Criterion runs each test in a fresh process of the same
 * executable, so a constructor reaches every one of them. */
#include "testutil.h"

__attribute__((constructor)) static void short_io_env(void)
{
	tu_setup();
}
