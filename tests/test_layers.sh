#!/bin/sh
# The layers of lib/ depend one way (docs/ARCHITECTURE.md):
#   util <- proto <- conn <- server, client
# Each layer may include its own headers, those of the layers below it, and
# the public headers (pbrpc/). The built-in services (health.c, reflection.c)
# see the server through registry.h only. TAP on stdout.
#   test_layers.sh LIB_DIR
set -u
lib=$1
n=0 failed=0
check() { # layer allowed-prefixes...
	layer=$1
	shift
	bad=""
	for f in "$lib/$layer"/*.[ch]; do
		for inc in $(sed -n 's/^#include "\([^"]*\)".*/\1/p' "$f"); do
			case $inc in
			*.pb-c.h) continue ;;
			esac
			allowed=no
			for p in "$@"; do
				case $inc in "$p"/*) allowed=yes ;; esac
			done
			[ $allowed = yes ] || bad="$bad $(basename "$f"):$inc"
		done
	done
	n=$((n + 1))
	if [ -z "$bad" ]; then
		echo "ok $n - lib/$layer includes only: $*"
	else
		failed=1
		echo "not ok $n - lib/$layer includes only: $*"
		for b in $bad; do echo "# $b"; done
	fi
}
check util util pbrpc
check proto proto util pbrpc
check conn conn proto util pbrpc
check server server conn proto util pbrpc
check client client conn proto util pbrpc
n=$((n + 1))
bad=$(grep -l '#include "server/server_impl.h"' "$lib/server/health.c" "$lib/server/reflection.c" 2>/dev/null)
if [ -z "$bad" ]; then echo "ok $n - health and reflection see the server through registry.h only"; else
	failed=1; echo "not ok $n - health and reflection see the server through registry.h only: $bad"; fi
n=$((n + 1))
bad=$(grep -ln 'pbrpc__health\|pbrpc__reflection\|enable_health\|enable_reflection' "$lib"/server/server.c "$lib"/server/loop.c "$lib"/server/dispatch.c "$lib"/server/listener.c "$lib"/server/registry.c 2>/dev/null)
if [ -z "$bad" ]; then echo "ok $n - the server never calls into the built-in services"; else
	failed=1; echo "not ok $n - the server never calls into the built-in services: $bad"; fi
n=$((n + 1))
bad=$(grep -ln '"proto/\|"conn/\|"util/\|"server/\|"client/' "$lib"/include/pbrpc/*.h 2>/dev/null)
if [ -z "$bad" ]; then echo "ok $n - public headers include no private header"; else
	failed=1; echo "not ok $n - public headers include no private header: $bad"; fi
echo "1..$n"
exit $failed
