#include "pbrpc/error.h"

#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

PBRPC_EXPORT const char *pbrpc_strerror(int err)
{
	switch (err) {
#define PBRPC__ERR_CASE(name, value, msg) \
	case (value):                     \
		return (msg);
		PBRPC_ERROR_MAP(PBRPC__ERR_CASE)
#undef PBRPC__ERR_CASE
	case 0:
		return "success";
	default:
		break;
	}
	if (err < 0 && err > -4096) {
		const char *s = strerrordesc_np(-err);
		if (s)
			return s;
	}
	return "unknown error";
}

PBRPC_EXPORT const char *pbrpc_errname(int err)
{
	switch (err) {
#define PBRPC__ERR_NAME(name, value, msg) \
	case (value):                     \
		return "PBRPC_" #name;
		PBRPC_ERROR_MAP(PBRPC__ERR_NAME)
#undef PBRPC__ERR_NAME
	case 0:
		return "OK";
	default:
		break;
	}
	if (err < 0 && err > -4096) {
		const char *s = strerrorname_np(-err);
		if (s)
			return s;
	}
	return "UNKNOWN";
}

static const char *const status_names[PBRPC_STATUS_COUNT] = {
#define PBRPC__STATUS_NAME(name, value) [value] = #name,
	PBRPC_STATUS_MAP(PBRPC__STATUS_NAME)
#undef PBRPC__STATUS_NAME
};

PBRPC_EXPORT const char *pbrpc_status_name(int status)
{
	if (status < 0 || status >= PBRPC_STATUS_COUNT)
		return "UNKNOWN_STATUS";
	return status_names[status];
}

PBRPC_EXPORT int pbrpc_status_from_name(const char *name)
{
	if (!name || !*name)
		return PBRPC_EINVALID;
	if (isdigit((unsigned char)name[0])) {
		char *end;
		long v = strtol(name, &end, 10);
		if (*end || v < 0 || v >= PBRPC_STATUS_COUNT)
			return PBRPC_EINVALID;
		return (int)v;
	}
	for (int s = 0; s < PBRPC_STATUS_COUNT; s++) {
		const char *a = status_names[s], *b = name;
		while (*a && *b) {
			char cb = *b == '-' ? '_' : (char)toupper((unsigned char)*b);
			if (*a != cb)
				break;
			a++, b++;
		}
		if (!*a && !*b)
			return s;
	}
	return PBRPC_EINVALID;
}
