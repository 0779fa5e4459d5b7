#!/bin/sh
# pbrpc-gen as a user runs it: its output compiles warning-free as C and as
# C++, and its failures say why. TAP on stdout.
#   test_gen.sh PBRPC_GEN PROTOC CC PROTO_DIR SRC_INCLUDE BUILD_INCLUDE
set -u
gen=$1 protoc=$2 cc=$3 protos=$4 srcinc=$5 buildinc=$6
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
n=0 failed=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() { n=$((n + 1)); failed=1; echo "not ok $n - $1"; sed 's/^/# /' "$tmp/err"; }

if "$gen" --protoc --protoc-bin="$protoc" -I "$protos" -o "$tmp/out" "$protos/streamtest.proto" \
	"$protos/streamdep.proto" 2>"$tmp/err"; then
	ok "pbrpc-gen --protoc writes the C of both files"
else
	not_ok "pbrpc-gen --protoc writes the C of both files"
fi
for f in streamtest.pb-c.c streamtest.pbrpc.c streamtest.pbrpc.h streamdep.pbrpc.c streamdep.pbrpc.h; do
	[ -s "$tmp/out/$f" ] || { echo "missing $f" >"$tmp/err"; not_ok "$f written"; }
done

warn="-Wall -Wextra -Werror -pedantic -Wshadow -Wmissing-prototypes -Wstrict-prototypes -Wformat=2 -Wvla"
for f in streamtest streamdep; do
	for std in c11 gnu11 gnu17; do  # protoc-c's own headers need C11 (anonymous unions)
		if "$cc" -std=$std $warn -I"$srcinc" -I"$buildinc" -I"$tmp/out" -c "$tmp/out/$f.pbrpc.c" \
			-o "$tmp/$f.o" 2>"$tmp/err"; then
			ok "$f.pbrpc.c compiles as $std with -Werror -pedantic"
		else
			not_ok "$f.pbrpc.c compiles as $std with -Werror -pedantic"
		fi
	done
	if command -v c++ >/dev/null 2>&1; then
		for std in c++11 c++17; do
			if c++ -x c++ -std=$std -Wall -Wextra -Werror -pedantic -Wshadow -I"$srcinc" -I"$buildinc" \
				-I"$tmp/out" -c "$tmp/out/$f.pbrpc.c" -o "$tmp/$f.o" 2>"$tmp/err"; then
				ok "$f.pbrpc.c compiles as $std with -Werror -pedantic"
			else
				not_ok "$f.pbrpc.c compiles as $std with -Werror -pedantic"
			fi
		done
	else
		echo "ok $((n += 1)) - # SKIP no C++ compiler"
	fi
done

# The same bytes from a set file as from --protoc.
"$protoc" --include_imports -I "$protos" --descriptor_set_out="$tmp/set.pb" "$protos/streamtest.proto"
mkdir -p "$tmp/set"
if "$gen" -o "$tmp/set" "$tmp/set.pb" 2>"$tmp/err" && cmp -s "$tmp/set/streamtest.pbrpc.c" "$tmp/out/streamtest.pbrpc.c" &&
	[ ! -e "$tmp/set/streamdep.pbrpc.c" ]; then
	ok "from a set, the files no other imports (streamtest.proto), byte for byte"
else
	not_ok "from a set, the files no other imports (streamtest.proto), byte for byte"
fi

expect_fail() { # description expected-text args...
	what=$1 text=$2
	shift 2
	if "$gen" "$@" >"$tmp/err" 2>&1; then
		not_ok "$what: fails"
	elif grep -q -- "$text" "$tmp/err"; then
		ok "$what: fails saying \"$text\""
	else
		not_ok "$what: fails saying \"$text\""
	fi
}
"$protoc" -I "$protos" --descriptor_set_out="$tmp/noimports.pb" "$protos/streamtest.proto"
expect_fail "a set without its imports" "include_imports" -o "$tmp/set" "$tmp/noimports.pb"
printf 'not a set' >"$tmp/junk.pb"
expect_fail "a file that is not a set" "not a FileDescriptorSet" -o "$tmp/set" "$tmp/junk.pb"
expect_fail "a missing file" "No such file" -o "$tmp/set" "$tmp/none.pb"
expect_fail "a file the set lacks" "no file nope.proto" -o "$tmp/set" --file nope.proto "$tmp/set.pb"
expect_fail "protoc failing" "failed" --protoc --protoc-bin="$protoc" -I "$protos" -o "$tmp/set" "$protos/none.proto"
expect_fail "no input" "usage" -o "$tmp/set"

echo "1..$n"
exit $failed
