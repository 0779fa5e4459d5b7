/* Tests for error codes and RPC status names (lib/include/pbrpc/error.h). */
#include <criterion/criterion.h>
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "pbrpc/error.h"

/* The table as the header declares it, to check the functions against. */
static const struct {
	int code;
	const char *name, *msg;
} errors[] = {
#define X(sym, num, text) { PBRPC_##sym, "PBRPC_" #sym, text },
	PBRPC_ERROR_MAP(X)
#undef X
};
#define NERRORS (sizeof(errors) / sizeof(errors[0]))

Test(error, strerror_and_errname_for_every_pbrpc_code)
{
	cr_assert_eq(NERRORS, 18);
	for (size_t i = 0; i < NERRORS; i++) {
		cr_assert_str_eq(pbrpc_strerror(errors[i].code), errors[i].msg, "%s", errors[i].name);
		cr_assert_str_eq(pbrpc_errname(errors[i].code), errors[i].name);
		/* outside errno's range, and each code and message unique */
		cr_assert_lt(errors[i].code, -4000, "%s", errors[i].name);
		for (size_t j = 0; j < i; j++) {
			cr_assert_neq(errors[i].code, errors[j].code, "%s", errors[i].name);
			cr_assert_str_neq(errors[i].msg, errors[j].msg, "%s", errors[i].name);
		}
	}
}

Test(error, fixed_values)
{
	/* numbers are ABI: other processes and other languages see them */
	cr_assert_eq(PBRPC_EOF, -4001);
	cr_assert_eq(PBRPC_ETRUNCATED, -4002);
	cr_assert_eq(PBRPC_ETOOBIG, -4003);
	cr_assert_eq(PBRPC_EPROTO, -4004);
	cr_assert_eq(PBRPC_EINVALID, -4015);
	cr_assert_eq(PBRPC_ETLS, -4016);
	cr_assert_eq(PBRPC_ENOTLS, -4017);
	cr_assert_eq(PBRPC_ETLSPEER, -4018);
}

Test(error, strerror_for_errno_values)
{
	cr_assert_str_eq(pbrpc_strerror(-ENOENT), "No such file or directory");
	cr_assert_str_eq(pbrpc_strerror(-EPIPE), "Broken pipe");
	cr_assert_str_eq(pbrpc_strerror(-ETIMEDOUT), "Connection timed out");
	cr_assert_str_eq(pbrpc_strerror(-ECONNREFUSED), "Connection refused");
	cr_assert_str_eq(pbrpc_strerror(-ENOMEM), "Cannot allocate memory");
	for (int e = 1; e < 134; e++) {
		const char *want = strerrordesc_np(e); /* NULL for the holes (41, 58) */
		cr_assert_str_eq(pbrpc_strerror(-e), want ? want : "unknown error", "errno %d", e);
	}

	cr_assert_str_eq(pbrpc_errname(-ENOENT), "ENOENT");
	cr_assert_str_eq(pbrpc_errname(-ECONNREFUSED), "ECONNREFUSED");
	cr_assert_str_eq(pbrpc_errname(-ETIMEDOUT), "ETIMEDOUT");
}

Test(error, strerror_for_zero_and_unknown_codes)
{
	cr_assert_str_eq(pbrpc_strerror(0), "success");
	cr_assert_str_eq(pbrpc_errname(0), "OK");
	static const int unknown[] = { 1, 5, 4001, -4000, -4019, -3999, -100000 };
	for (size_t i = 0; i < sizeof(unknown) / sizeof(unknown[0]); i++) {
		const char *s = pbrpc_strerror(unknown[i]);
		cr_assert_not_null(s, "%d", unknown[i]);
		cr_assert_str_eq(s, "unknown error", "%d", unknown[i]);
		cr_assert_str_eq(pbrpc_errname(unknown[i]), "UNKNOWN", "%d", unknown[i]);
	}
}

/* gRPC's numbering, written out independently of PBRPC_STATUS_MAP. */
static const struct {
	int value;
	const char *name;
} grpc[] = {
	{ 0, "OK" },
	{ 1, "CANCELLED" },
	{ 2, "UNKNOWN" },
	{ 3, "INVALID_ARGUMENT" },
	{ 4, "DEADLINE_EXCEEDED" },
	{ 5, "NOT_FOUND" },
	{ 6, "ALREADY_EXISTS" },
	{ 7, "PERMISSION_DENIED" },
	{ 8, "RESOURCE_EXHAUSTED" },
	{ 9, "FAILED_PRECONDITION" },
	{ 10, "ABORTED" },
	{ 11, "OUT_OF_RANGE" },
	{ 12, "UNIMPLEMENTED" },
	{ 13, "INTERNAL" },
	{ 14, "UNAVAILABLE" },
	{ 15, "DATA_LOSS" },
	{ 16, "UNAUTHENTICATED" },
};

Test(error, status_numbering_is_grpc)
{
	cr_assert_eq(sizeof(grpc) / sizeof(grpc[0]), PBRPC_STATUS_COUNT);
	int n = 0;
#define X(sym, num)                                         \
	cr_assert_eq(PBRPC_STATUS_##sym, num);              \
	cr_assert_str_eq(grpc[num].name, #sym, "status %d", num); \
	n++;
	PBRPC_STATUS_MAP(X)
#undef X
	cr_assert_eq(n, 17);
	cr_assert_eq(PBRPC_STATUS_UNAVAILABLE, 14);
	cr_assert_eq(PBRPC_STATUS_UNAUTHENTICATED, 16);
}

Test(error, status_name_round_trip)
{
	for (int i = 0; i < PBRPC_STATUS_COUNT; i++) {
		const char *name = pbrpc_status_name(grpc[i].value);
		cr_assert_str_eq(name, grpc[i].name);
		cr_assert_eq(pbrpc_status_from_name(name), grpc[i].value, "%s", name);

		/* lower case with dashes, and mixed case, parse too */
		char alt[64];
		size_t k;
		for (k = 0; name[k] && k < sizeof(alt) - 1; k++)
			alt[k] = name[k] == '_' ? '-' : (char)tolower((unsigned char)name[k]);
		alt[k] = '\0';
		cr_assert_eq(pbrpc_status_from_name(alt), grpc[i].value, "%s", alt);
		alt[0] = (char)toupper((unsigned char)alt[0]);
		cr_assert_eq(pbrpc_status_from_name(alt), grpc[i].value, "%s", alt);

		/* and so does the decimal number */
		char num[8];
		snprintf(num, sizeof(num), "%d", grpc[i].value);
		cr_assert_eq(pbrpc_status_from_name(num), grpc[i].value, "%s", num);
	}
}

Test(error, status_out_of_range_and_bad_names)
{
	cr_assert_str_eq(pbrpc_status_name(-1), "UNKNOWN_STATUS");
	cr_assert_str_eq(pbrpc_status_name(17), "UNKNOWN_STATUS");
	cr_assert_str_eq(pbrpc_status_name(1 << 30), "UNKNOWN_STATUS");

	static const char *const bad[] = {
		"", "17", "-1", "99999999999999999999", "1x", "OKAY", "OK_", "O", "NOT FOUND",
		"NOT__FOUND", "UNKNOWN_STATUS", "status", " OK",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		cr_assert_eq(pbrpc_status_from_name(bad[i]), PBRPC_EINVALID, "\"%s\"", bad[i]);
	cr_assert_eq(pbrpc_status_from_name(NULL), PBRPC_EINVALID);
}
