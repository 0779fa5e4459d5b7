#!/bin/sh
# libpbrpc exports exactly its public API, and the public headers stand alone.
#   test_abi.sh LIBPBRPC.so libpbrpc.map CC SRC_INCLUDE BUILD_INCLUDE
# TAP on stdout.
set -u
lib=$1 map=$2 cc=$3 srcinc=$4 buildinc=$5
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
n=0 failed=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() { n=$((n + 1)); failed=1; echo "not ok $n - $1"; }

nm -D --defined-only "$lib" | awk '$2 ~ /^[TDBRVW]$/ { sub(/@.*/, "", $3); print $3 }' | sort -u >"$tmp/exported"
sed -n 's/^[[:space:]]*\(pbrpc_[a-z0-9_]*\);$/\1/p' "$map" | sort -u >"$tmp/listed"

extra=$(comm -23 "$tmp/exported" "$tmp/listed")
if [ -z "$extra" ]; then ok "no symbol outside libpbrpc.map is exported"; else
	not_ok "symbols exported but not in libpbrpc.map:"; echo "$extra" | sed 's/^/# /'; fi
missing=$(comm -13 "$tmp/exported" "$tmp/listed")
if [ -z "$missing" ]; then ok "every symbol of libpbrpc.map is exported"; else
	not_ok "symbols in libpbrpc.map that are not exported:"; echo "$missing" | sed 's/^/# /'; fi
if [ "$(wc -l <"$tmp/listed")" -gt 0 ]; then ok "libpbrpc.map lists $(wc -l <"$tmp/listed") symbols"; else
	not_ok "libpbrpc.map lists no symbol"; fi

# Each public header compiles on its own, as C and as C++, with only the
# installed include directories: none of them reaches a private header.
for h in "$srcinc"/pbrpc/*.h; do
	name=pbrpc/$(basename "$h")
	printf '#include "%s"\n' "$name" >"$tmp/one.c"
	if "$cc" -std=c11 -Wall -Wextra -Werror -fsyntax-only -I"$srcinc" -I"$buildinc" "$tmp/one.c" 2>"$tmp/err"; then
		ok "$name compiles alone as C"
	else
		not_ok "$name compiles alone as C"; sed 's/^/# /' "$tmp/err"
	fi
	if command -v c++ >/dev/null 2>&1; then
		if c++ -x c++ -Wall -Wextra -Werror -fsyntax-only -I"$srcinc" -I"$buildinc" "$tmp/one.c" 2>"$tmp/err"; then
			ok "$name compiles alone as C++"
		else
			not_ok "$name compiles alone as C++"; sed 's/^/# /' "$tmp/err"
		fi
	fi
done
echo "1..$n"
exit $failed
