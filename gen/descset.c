/* FileDescriptorSets from files. See descset.h. */
#include "descset.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_FILE (64u << 20)

int descset_read_file(const char *path, uint8_t **out, size_t *out_len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return -errno;
	size_t len = 0, cap = 65536;
	uint8_t *data = malloc(cap);
	int rc = 0;
	while (data) {
		size_t n = fread(data + len, 1, cap - len, f);
		len += n;
		if (n == 0)
			break;
		if (len == cap) {
			uint8_t *p = cap >= MAX_FILE ? NULL : realloc(data, cap * 2);
			if (!p) {
				rc = cap >= MAX_FILE ? -EFBIG : -ENOMEM;
				break;
			}
			data = p;
			cap *= 2;
		}
	}
	if (!data)
		rc = -ENOMEM;
	else if (rc == 0 && ferror(f))
		rc = -EIO;
	fclose(f);
	if (rc < 0) {
		free(data);
		return rc;
	}
	*out = data;
	*out_len = len;
	return 0;
}

Google__Protobuf__FileDescriptorSet *descset_unpack(const uint8_t *data, size_t len)
{
	return google__protobuf__file_descriptor_set__unpack(NULL, len, data);
}

int descset_load(const char *path, Google__Protobuf__FileDescriptorSet **out, char *err, size_t errlen)
{
	uint8_t *data = NULL;
	size_t len = 0;
	int rc = descset_read_file(path, &data, &len);
	*out = NULL;
	if (rc < 0) {
		snprintf(err, errlen, "%s", rc == -EFBIG ? "larger than 64 MiB" : strerror(-rc));
		return rc;
	}
	Google__Protobuf__FileDescriptorSet *set = descset_unpack(data, len);
	free(data);
	if (!set || set->n_file == 0) {
		snprintf(err, errlen, "%s", set ? "the set holds no file" : "not a FileDescriptorSet (protoc -o FILE)");
		if (set)
			google__protobuf__file_descriptor_set__free_unpacked(set, NULL);
		return -EINVAL;
	}
	*out = set;
	return 0;
}

const Google__Protobuf__FileDescriptorProto *descset_find_file(const Google__Protobuf__FileDescriptorSet *set,
								 const char *name)
{
	for (size_t i = 0; i < set->n_file; i++)
		if (set->file[i]->name && strcmp(set->file[i]->name, name) == 0)
			return set->file[i];
	return NULL;
}
