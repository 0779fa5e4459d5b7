/* pbrpc-gen: what protoc-c leaves out of a .proto file, as C beside its
 * output (docs/pbrpc-gen.1.scd).
 *
 * Reads a FileDescriptorSet (`protoc --include_imports --descriptor_set_out`),
 * or runs protoc itself (--protoc), and writes NAME.pbrpc.h and NAME.pbrpc.c
 * for each file asked for: the file's serialized descriptors and method kinds
 * as a pbrpc_schema_file (pbrpc/schema.h) registered before main(), and for
 * each service a registration function and, for stream methods, typed
 * wrappers of pbrpc's stream API (gen_stream.c).
 *
 * Names follow protoc-c's rules (c_helpers.cc: FullNameToC, CamelToLower)
 * so that the output sits beside its NAME.pb-c.h; protobuf-c's own
 * `c_package` option is not read.
 */
#include <errno.h>
#include <limits.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "descset.h"
#include "gen.h"

/* ---- names ---- */

char *gen_strdup(const char *s)
{
	char *d = strdup(s ? s : "");
	if (!d) {
		fprintf(stderr, "pbrpc-gen: out of memory\n");
		exit(1);
	}
	return d;
}

char *gen_printf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	char *s = NULL;
	if (vasprintf(&s, fmt, ap) < 0) {
		fprintf(stderr, "pbrpc-gen: out of memory\n");
		exit(1);
	}
	va_end(ap);
	return s;
}

static bool is_upper(char c)
{
	return c >= 'A' && c <= 'Z';
}

/* protoc-c's CamelToLower / CamelToUpper: "GetRequest" -> "get_request". */
static void camel_to(FILE *o, const char *s, size_t n, bool upper)
{
	bool was_upper = true;
	for (size_t i = 0; i < n; i++) {
		bool u = is_upper(s[i]);
		if (u && !was_upper)
			fputc('_', o);
		char c = s[i];
		if (upper && c >= 'a' && c <= 'z')
			c = (char)(c - 'a' + 'A');
		else if (!upper && u)
			c = (char)(c - 'A' + 'a');
		fputc(c, o);
		was_upper = u;
	}
}

/* protoc-c's ToCamel: "my_pkg" -> "MyPkg". */
static void to_camel(FILE *o, const char *s, size_t n)
{
	bool next_upper = true;
	for (size_t i = 0; i < n; i++) {
		if (s[i] == '_') {
			next_upper = true;
		} else if (next_upper) {
			fputc(s[i] >= 'a' && s[i] <= 'z' ? s[i] - 'a' + 'A' : s[i], o);
			next_upper = false;
		} else {
			fputc(s[i], o);
		}
	}
}

enum name_style { STYLE_C, STYLE_LOWER, STYLE_UPPER };

/* A full name ("demo.Kv", a leading '.' ignored) in protoc-c's style:
 * C "Demo__Kv", lower "demo__kv", upper "DEMO__KV". */
static char *gen_name(const char *full, int style)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *o = open_memstream(&buf, &len);
	if (!o) {
		fprintf(stderr, "pbrpc-gen: out of memory\n");
		exit(1);
	}
	bool first = true;
	for (const char *p = full; *p;) {
		const char *dot = strchr(p, '.');
		size_t n = dot ? (size_t)(dot - p) : strlen(p);
		if (n) {
			if (!first)
				fputs("__", o);
			first = false;
			if (style == STYLE_C)
				to_camel(o, p, n);
			else
				camel_to(o, p, n, style == STYLE_UPPER);
		}
		p += n + (dot ? 1 : 0);
	}
	fclose(o);
	return buf;
}

char *gen_name_c(const char *full)
{
	return gen_name(full, STYLE_C);
}
char *gen_name_lower(const char *full)
{
	return gen_name(full, STYLE_LOWER);
}
char *gen_name_upper(const char *full)
{
	return gen_name(full, STYLE_UPPER);
}

/* "demo/kv.proto" -> "demo_kv_proto": an identifier for the file. */
char *gen_file_ident(const char *file)
{
	char *s = gen_strdup(file);
	for (char *p = s; *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9')))
			*p = '_';
	return s;
}

/* "demo/kv.proto" -> "demo/kv", as protoc-c's StripProto. */
static char *strip_proto(const char *file)
{
	char *s = gen_strdup(file);
	size_t n = strlen(s);
	if (n > 11 && strcmp(s + n - 11, ".protodevel") == 0)
		s[n - 11] = '\0';
	else if (n > 6 && strcmp(s + n - 6, ".proto") == 0)
		s[n - 6] = '\0';
	return s;
}

/* A C string literal's body. */
void gen_put_cstr(FILE *o, const char *s)
{
	fputc('"', o);
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			fprintf(o, "\\%c", c);
		else if (c < 0x20 || c >= 0x7f || c == '?')
			fprintf(o, "\\%03o", c);
		else
			fputc(c, o);
	}
	fputc('"', o);
}

/* ---- the file's descriptors: it, then every file it imports ---- */

typedef struct fileset {
	const Google__Protobuf__FileDescriptorProto **v;
	size_t n;
} fileset;

static bool fileset_has(const fileset *fs, const Google__Protobuf__FileDescriptorProto *f)
{
	for (size_t i = 0; i < fs->n; i++)
		if (fs->v[i] == f)
			return true;
	return false;
}

static int collect(const Google__Protobuf__FileDescriptorSet *set, const Google__Protobuf__FileDescriptorProto *f,
		   fileset *fs)
{
	if (fileset_has(fs, f))
		return 0;
	fs->v[fs->n++] = f;
	for (size_t i = 0; i < f->n_dependency; i++) {
		const Google__Protobuf__FileDescriptorProto *d = descset_find_file(set, f->dependency[i]);
		if (!d) {
			fprintf(stderr,
				"pbrpc-gen: %s imports %s, which the descriptor set lacks (protoc --include_imports)\n",
				f->name, f->dependency[i]);
			return -1;
		}
		if (collect(set, d, fs) < 0)
			return -1;
	}
	return 0;
}

/* Packs the file and its imports, without source info, as one set. Returns
 * a malloc'd buffer or NULL. */
static uint8_t *pack_closure(const Google__Protobuf__FileDescriptorSet *set,
			     const Google__Protobuf__FileDescriptorProto *f, size_t *len)
{
	fileset fs = { calloc(set->n_file + 1, sizeof(*fs.v)), 0 };
	if (!fs.v || collect(set, f, &fs) < 0) {
		free(fs.v);
		return NULL;
	}
	Google__Protobuf__FileDescriptorSet out = GOOGLE__PROTOBUF__FILE_DESCRIPTOR_SET__INIT;
	Google__Protobuf__FileDescriptorProto *copies = calloc(fs.n, sizeof(*copies));
	Google__Protobuf__FileDescriptorProto **ptrs = calloc(fs.n, sizeof(*ptrs));
	uint8_t *buf = NULL;
	if (copies && ptrs) {
		for (size_t i = 0; i < fs.n; i++) {
			copies[i] = *fs.v[i]; /* shallow: only the top-level pointer changes */
			copies[i].source_code_info = NULL;
			ptrs[i] = &copies[i];
		}
		out.n_file = fs.n;
		out.file = ptrs;
		*len = google__protobuf__file_descriptor_set__get_packed_size(&out);
		buf = malloc(*len ? *len : 1);
		if (buf)
			google__protobuf__file_descriptor_set__pack(&out, buf);
	}
	free(copies);
	free(ptrs);
	free(fs.v);
	return buf;
}

/* ---- output ---- */

static void put_types(FILE *o, const char *prefix, const Google__Protobuf__DescriptorProto *m)
{
	char *full = prefix[0] ? gen_printf("%s.%s", prefix, m->name) : gen_strdup(m->name);
	fputs("\t", o);
	gen_put_cstr(o, full);
	fputs(",\n", o);
	for (size_t i = 0; i < m->n_nested_type; i++)
		put_types(o, full, m->nested_type[i]);
	for (size_t i = 0; i < m->n_enum_type; i++) {
		char *e = gen_printf("%s.%s", full, m->enum_type[i]->name);
		fputs("\t", o);
		gen_put_cstr(o, e);
		fputs(",\n", o);
		free(e);
	}
	free(full);
}

static size_t count_types(const Google__Protobuf__DescriptorProto *m)
{
	size_t n = 1 + m->n_enum_type;
	for (size_t i = 0; i < m->n_nested_type; i++)
		n += count_types(m->nested_type[i]);
	return n;
}

static FILE *open_out(const char *dir, const char *base, const char *ext, char **path)
{
	*path = gen_printf("%s/%s%s", dir, base, ext);
	/* protoc-c writes demo/kv.pb-c.h under its --c_out: so do we. */
	for (char *p = *path + strlen(dir) + 1; (p = strchr(p, '/')); p++) {
		*p = '\0';
		mkdir(*path, 0777);
		*p = '/';
	}
	FILE *o = fopen(*path, "w");
	if (!o)
		fprintf(stderr, "pbrpc-gen: %s: %s\n", *path, strerror(errno));
	return o;
}

static int close_out(FILE *o, char *path)
{
	int bad = ferror(o);
	if (fclose(o) != 0 || bad) {
		fprintf(stderr, "pbrpc-gen: %s: write failed\n", path);
		free(path);
		return -1;
	}
	free(path);
	return 0;
}

static bool is_stream(const Google__Protobuf__MethodDescriptorProto *m)
{
	return (m->has_client_streaming && m->client_streaming) || (m->has_server_streaming && m->server_streaming);
}

static int generate(const Google__Protobuf__FileDescriptorSet *set, const Google__Protobuf__FileDescriptorProto *f,
		    const char *outdir)
{
	size_t blob_len = 0;
	uint8_t *blob = pack_closure(set, f, &blob_len);
	if (!blob)
		return -1;
	const char *pkg = f->package ? f->package : "";
	char *base = strip_proto(f->name);
	char *ident = gen_file_ident(f->name);
	char *guard = gen_name_upper(ident);
	gen_file g = { .f = f, .pkg = pkg, .base = base, .ident = ident };

	char *hpath, *cpath;
	FILE *h = open_out(outdir, base, ".pbrpc.h", &hpath);
	FILE *c = h ? open_out(outdir, base, ".pbrpc.c", &cpath) : NULL;
	if (!h || !c) {
		if (h)
			fclose(h);
		free(blob);
		return -1;
	}

	/* ---- header ---- */
	fprintf(h, "/* Generated by pbrpc-gen from ");
	fputs(f->name, h);
	fprintf(h, ". Do not edit.\n"
		   " * Beside protoc-c's %s.pb-c.h: the file's schema for pbrpc (pbrpc/schema.h),\n"
		   " * each service's registration and its stream methods' typed API. */\n",
		base);
	fprintf(h, "#ifndef PBRPC_GEN_%s\n#define PBRPC_GEN_%s\n\n", guard, guard);
	fprintf(h, "#include <pbrpc/pbrpc.h>\n");
	gen_stream_includes(h);
	fprintf(h, "\n#include \"%s.pb-c.h\"\n\n", base);
	fprintf(h, "#ifdef __cplusplus\nextern \"C\" {\n#endif\n\n");
	fprintf(h, "/* Registered before main() (and unregistered when unloaded). */\n");
	fprintf(h, "extern const pbrpc_schema_file pbrpc_schema__%s;\n", ident);

	/* ---- source ---- */
	fprintf(c, "/* Generated by pbrpc-gen from ");
	fputs(f->name, c);
	fprintf(c, ". Do not edit. */\n");
	fprintf(c, "#include \"%s.pbrpc.h\"\n\n", base);
	fprintf(c, "#include <errno.h>\n#include <stdarg.h>\n#include <stdint.h>\n#include <stdio.h>\n"
		   "#include <stdlib.h>\n#include <string.h>\n\n");
	fprintf(c, "/* google.protobuf.FileDescriptorSet: this file, then its imports. */\n");
	fprintf(c, "static const uint8_t descriptor_set[%zu] = {", blob_len ? blob_len : 1);
	for (size_t i = 0; i < blob_len; i++)
		fprintf(c, "%s0x%02x,", i % 16 ? " " : "\n\t", blob[i]);
	if (!blob_len)
		fprintf(c, "\n\t0x00,");
	fprintf(c, "\n};\n\n");

	size_t n_types = 0;
	for (size_t i = 0; i < f->n_message_type; i++)
		n_types += count_types(f->message_type[i]);
	n_types += f->n_enum_type;
	fprintf(c, "static const char *const types[%zu] = {\n", n_types ? n_types : 1);
	for (size_t i = 0; i < f->n_message_type; i++)
		put_types(c, pkg, f->message_type[i]);
	for (size_t i = 0; i < f->n_enum_type; i++) {
		char *e = pkg[0] ? gen_printf("%s.%s", pkg, f->enum_type[i]->name) : gen_strdup(f->enum_type[i]->name);
		fputs("\t", c);
		gen_put_cstr(c, e);
		fputs(",\n", c);
		free(e);
	}
	if (!n_types)
		fprintf(c, "\t0,\n");
	fprintf(c, "};\n\n");

	for (size_t i = 0; i < f->n_service; i++) {
		const Google__Protobuf__ServiceDescriptorProto *s = f->service[i];
		fprintf(c, "static const char *const service%zu_methods[%zu] = {", i, s->n_method ? s->n_method : 1);
		for (size_t j = 0; j < s->n_method; j++) {
			fputs(j ? ", " : " ", c);
			gen_put_cstr(c, s->method[j]->name);
		}
		fprintf(c, "%s };\n", s->n_method ? "" : " 0");
		fprintf(c, "static const uint8_t service%zu_flags[%zu] = {", i, s->n_method ? s->n_method : 1);
		for (size_t j = 0; j < s->n_method; j++) {
			const Google__Protobuf__MethodDescriptorProto *m = s->method[j];
			unsigned fl = (m->has_client_streaming && m->client_streaming ? 1u : 0u) |
				      (m->has_server_streaming && m->server_streaming ? 2u : 0u);
			fprintf(c, "%s%u", j ? ", " : " ", fl);
		}
		fprintf(c, "%s };\n", s->n_method ? "" : " 0");
	}
	fprintf(c, "\nstatic const pbrpc_schema_service services[%zu] = {\n", f->n_service ? f->n_service : 1);
	for (size_t i = 0; i < f->n_service; i++) {
		const Google__Protobuf__ServiceDescriptorProto *s = f->service[i];
		char *full = pkg[0] ? gen_printf("%s.%s", pkg, s->name) : gen_strdup(s->name);
		char *lower = gen_name_lower(full);
		fprintf(c, "\t{ ");
		gen_put_cstr(c, full);
		fprintf(c, ", &%s__descriptor, %zu, service%zu_methods, service%zu_flags },\n", lower, s->n_method, i,
			i);
		free(lower);
		free(full);
	}
	if (!f->n_service)
		fprintf(c, "\t{ 0, 0, 0, 0, 0 },\n");
	fprintf(c, "};\n\n");
	fprintf(c, "const pbrpc_schema_file pbrpc_schema__%s = {\n\tPBRPC_SCHEMA_VERSION,\n\t", ident);
	gen_put_cstr(c, f->name);
	fprintf(c, ",\n\tdescriptor_set,\n\t%zu,\n\t%zu,\n\tservices,\n\t%zu,\n\ttypes,\n};\n\n", blob_len,
		f->n_service, n_types);
	fprintf(c, "__attribute__((constructor)) static void schema_register(void)\n{\n"
		   "\t(void)pbrpc_schema_register(&pbrpc_schema__%s);\n}\n\n",
		ident);
	fprintf(c, "__attribute__((destructor)) static void schema_unregister(void)\n{\n"
		   "\tpbrpc_schema_unregister(&pbrpc_schema__%s);\n}\n",
		ident);

	for (size_t i = 0; i < f->n_service; i++)
		gen_service(&g, f->service[i], h, c);

	fprintf(h, "\n#ifdef __cplusplus\n}\n#endif\n#endif\n");
	free(blob);
	free(guard);
	free(ident);
	free(base);
	int rc = close_out(h, hpath);
	return close_out(c, cpath) < 0 || rc < 0 ? -1 : 0;
}

bool gen_method_streams(const Google__Protobuf__MethodDescriptorProto *m)
{
	return is_stream(m);
}

/* ---- protoc ---- */

static int run(char *const argv[])
{
	pid_t pid = fork();
	if (pid < 0) {
		perror("pbrpc-gen: fork");
		return -1;
	}
	if (pid == 0) {
		execvp(argv[0], argv);
		fprintf(stderr, "pbrpc-gen: %s: %s\n", argv[0], strerror(errno));
		_exit(127);
	}
	int st;
	while (waitpid(pid, &st, 0) < 0)
		if (errno != EINTR)
			return -1;
	return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

/* The name protoc gives `path`: relative to the first --proto_path holding
 * it ("." when none is given). NULL when none does. */
static char *proto_name(const char *path, char **dirs, size_t n_dirs)
{
	static char dot[] = ".";
	char *only_dot[1] = { dot };
	if (!n_dirs) {
		dirs = only_dot;
		n_dirs = 1;
	}
	for (size_t i = 0; i < n_dirs; i++) {
		const char *d = dirs[i];
		size_t dl = strlen(d);
		while (dl > 1 && d[dl - 1] == '/')
			dl--;
		if (dl == 1 && d[0] == '.' && path[0] != '/') {
			const char *p = path;
			while (p[0] == '.' && p[1] == '/')
				p += 2;
			return gen_strdup(p);
		}
		if (strncmp(path, d, dl) == 0 && path[dl] == '/')
			return gen_strdup(path + dl + 1);
	}
	return NULL;
}

static char **dirs, **names; /* main's -I directories and --file names */

static void usage(FILE *o)
{
	fprintf(o, "usage: pbrpc-gen [-o DIR] [--file NAME]... SET.pb\n"
		   "       pbrpc-gen --protoc [-o DIR] [--no-c] [-I DIR]... FILE.proto...\n"
		   "Writes NAME.pbrpc.h and NAME.pbrpc.c for each file (see pbrpc-gen(1)).\n");
}

int main(int argc, char **argv)
{
	enum { OPT_PROTOC = 256, OPT_NO_C, OPT_PROTOC_BIN, OPT_FILE };
	static const struct option longopts[] = {
		{ "out", required_argument, NULL, 'o' },
		{ "file", required_argument, NULL, OPT_FILE },
		{ "protoc", no_argument, NULL, OPT_PROTOC },
		{ "protoc-bin", required_argument, NULL, OPT_PROTOC_BIN },
		{ "no-c", no_argument, NULL, OPT_NO_C },
		{ "proto_path", required_argument, NULL, 'I' },
		{ "proto-path", required_argument, NULL, 'I' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *outdir = ".";
	const char *protoc = getenv("PROTOC");
	bool use_protoc = false, want_c = true;
	/* File-scope, so that the early exits leave nothing unreachable
	 * (LeakSanitizer runs pbrpc-gen in sanitized builds). */
	dirs = calloc((size_t)argc + 1, sizeof(char *));
	names = calloc((size_t)argc + 1, sizeof(char *));
	size_t n_dirs = 0, n_names = 0;
	int opt;
	if (!dirs || !names)
		return 1;
	while ((opt = getopt_long(argc, argv, "o:I:h", longopts, NULL)) != -1) {
		switch (opt) {
		case 'o':
			outdir = optarg;
			break;
		case 'I':
			/* Canonical, as the inputs: protoc wants the directory
			 * as an exact prefix of each file's path, and meson's
			 * @INPUT@ is relative ("../proto/x.proto"). */
			dirs[n_dirs] = realpath(optarg, NULL);
			if (!dirs[n_dirs])
				dirs[n_dirs] = gen_strdup(optarg);
			n_dirs++;
			break;
		case OPT_FILE:
			names[n_names++] = gen_strdup(optarg);
			break;
		case OPT_PROTOC:
			use_protoc = true;
			break;
		case OPT_PROTOC_BIN:
			protoc = optarg;
			break;
		case OPT_NO_C:
			want_c = false;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind >= argc || (!use_protoc && argc - optind != 1)) {
		usage(stderr);
		return 2;
	}

	/* -o DIR need not exist yet (protoc's --c_out must). */
	char *od = gen_strdup(outdir);
	for (char *p = od + 1; *p; p++) {
		if (*p == '/') {
			*p = '\0';
			mkdir(od, 0777);
			*p = '/';
		}
	}
	mkdir(od, 0777);
	free(od);

	char tmp[] = "/tmp/pbrpc-gen-XXXXXX";
	const char *set_path = argv[optind];
	if (use_protoc) {
		int fd = mkstemp(tmp);
		if (fd < 0) {
			perror("pbrpc-gen: mkstemp");
			return 1;
		}
		close(fd);
		set_path = tmp;
		size_t na = 0;
		char **av = calloc((size_t)(argc + n_dirs + 8), sizeof(char *));
		if (!av)
			return 1;
		av[na++] = (char *)(protoc && *protoc ? protoc : "protoc");
		av[na++] = (char *)"--include_imports";
		av[na++] = gen_printf("--descriptor_set_out=%s", tmp);
		if (want_c)
			av[na++] = gen_printf("--c_out=%s", outdir);
		for (size_t i = 0; i < n_dirs; i++)
			av[na++] = gen_printf("--proto_path=%s", dirs[i]);
		for (int i = optind; i < argc; i++) {
			char *path = n_dirs ? realpath(argv[i], NULL) : NULL;
			av[na++] = path ? path : argv[i];
			char *nm = proto_name(av[na - 1], dirs, n_dirs);
			if (nm)
				names[n_names++] = nm;
		}
		int failed = run(av) < 0;
		if (failed)
			fprintf(stderr, "pbrpc-gen: %s failed\n", av[0]);
		/* Everything after av[1] was allocated here, but the inputs
		 * realpath could not resolve (argv's own). */
		for (size_t i = 2; i < na; i++) {
			bool own = true;
			for (int j = optind; j < argc && own; j++)
				own = av[i] != argv[j];
			if (own)
				free(av[i]);
		}
		free(av);
		if (failed) {
			unlink(tmp);
			for (size_t i = 0; i < n_names; i++)
				free(names[i]);
			free(names);
			for (size_t i = 0; i < n_dirs; i++)
				free(dirs[i]);
			free(dirs);
			return 1;
		}
	}

	char err[256];
	Google__Protobuf__FileDescriptorSet *set;
	int rc = descset_load(set_path, &set, err, sizeof(err));
	if (use_protoc)
		unlink(tmp);
	if (rc < 0) {
		fprintf(stderr, "pbrpc-gen: %s: %s\n", argv[optind], err);
		return 1;
	}
	int status = 0;
	if (n_names == 0) {
		/* The files no other file of the set imports. */
		for (size_t i = 0; i < set->n_file; i++) {
			bool imported = false;
			for (size_t j = 0; j < set->n_file && !imported; j++)
				for (size_t k = 0; k < set->file[j]->n_dependency && !imported; k++)
					imported = strcmp(set->file[j]->dependency[k], set->file[i]->name) == 0;
			if (!imported && generate(set, set->file[i], outdir) < 0)
				status = 1;
		}
	}
	for (size_t i = 0; i < n_names; i++) {
		const Google__Protobuf__FileDescriptorProto *f = descset_find_file(set, names[i]);
		if (!f) {
			fprintf(stderr, "pbrpc-gen: %s: no file %s in the set\n", argv[optind], names[i]);
			status = 1;
		} else if (generate(set, f, outdir) < 0) {
			status = 1;
		}
		free(names[i]);
	}
	google__protobuf__file_descriptor_set__free_unpacked(set, NULL);
	free(names);
	for (size_t i = 0; i < n_dirs; i++)
		free(dirs[i]);
	free(dirs);
	return status;
}
