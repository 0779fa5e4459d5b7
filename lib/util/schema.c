/* The process-wide table of pbrpc_schema_file, filled by pbrpc-gen's
 * generated constructors. See pbrpc/schema.h. Few files, looked up at
 * registration and once per client service: a mutex and linear scans. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "pbrpc/schema.h"

typedef struct entry {
	const pbrpc_schema_file *file;
	unsigned refs;
} entry;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static entry *files; /* in registration order; malloc'd, never freed while in use */
static size_t n_files, cap_files;

PBRPC_EXPORT int pbrpc_schema_register(const pbrpc_schema_file *file)
{
	if (!file || file->version != PBRPC_SCHEMA_VERSION || !file->name)
		return PBRPC_EINVALID;
	int rc = 0;
	pthread_mutex_lock(&mu);
	size_t i = 0;
	while (i < n_files && files[i].file != file)
		i++;
	if (i < n_files) {
		files[i].refs++;
	} else if (n_files == cap_files && cap_files >= 1u << 20) {
		rc = -ENOMEM;
	} else {
		if (n_files == cap_files) {
			size_t cap = cap_files ? cap_files * 2 : 16;
			entry *v = realloc(files, cap * sizeof(*v));
			if (!v) {
				rc = -ENOMEM;
				goto out;
			}
			files = v;
			cap_files = cap;
		}
		files[n_files++] = (entry){ file, 1 };
	}
out:
	pthread_mutex_unlock(&mu);
	return rc;
}

PBRPC_EXPORT void pbrpc_schema_unregister(const pbrpc_schema_file *file)
{
	pthread_mutex_lock(&mu);
	for (size_t i = 0; i < n_files; i++) {
		if (files[i].file == file) {
			if (--files[i].refs == 0) {
				memmove(&files[i], &files[i + 1], (n_files - i - 1) * sizeof(*files));
				n_files--;
			}
			break;
		}
	}
	if (n_files == 0) {
		free(files);
		files = NULL;
		cap_files = 0;
	}
	pthread_mutex_unlock(&mu);
}

PBRPC_EXPORT const pbrpc_schema_service *pbrpc_schema_find_service(const char *name,
								const pbrpc_schema_file **file)
{
	const pbrpc_schema_service *found = NULL;
	if (!name)
		return NULL;
	pthread_mutex_lock(&mu);
	for (size_t i = 0; i < n_files && !found; i++) {
		const pbrpc_schema_file *f = files[i].file;
		for (unsigned j = 0; j < f->n_services; j++) {
			if (f->services[j].name && strcmp(f->services[j].name, name) == 0) {
				found = &f->services[j];
				if (file)
					*file = f;
				break;
			}
		}
	}
	pthread_mutex_unlock(&mu);
	return found;
}

PBRPC_EXPORT const pbrpc_schema_file *pbrpc_schema_find_type(const char *name)
{
	const pbrpc_schema_file *found = NULL;
	if (!name)
		return NULL;
	pthread_mutex_lock(&mu);
	for (size_t i = 0; i < n_files && !found; i++) {
		const pbrpc_schema_file *f = files[i].file;
		for (unsigned j = 0; j < f->n_types; j++) {
			if (f->types[j] && strcmp(f->types[j], name) == 0) {
				found = f;
				break;
			}
		}
	}
	pthread_mutex_unlock(&mu);
	return found;
}

PBRPC_EXPORT int pbrpc_schema_method_flags(const pbrpc_schema_service *svc, const char *method)
{
	if (!svc || !method)
		return -1;
	for (unsigned i = 0; i < svc->n_methods; i++)
		if (svc->methods[i] && strcmp(svc->methods[i], method) == 0)
			return svc->flags ? svc->flags[i] : 0;
	return -1;
}
