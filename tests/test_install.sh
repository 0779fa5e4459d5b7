#!/usr/bin/env bash
# After `meson install`, everything runs: the programs from a DESTDIR and
# (with --system) from /usr/local without ldconfig, thanks to their
# $ORIGIN-relative rpath; and a project outside pbrpc (tests/outside/ with
# examples/greeter) builds and runs against pbrpc both ways the README gives:
# pkg-config against an installed tree (cc and meson), and as a meson
# subproject through dependency('pbrpc'), which builds the library only.
#
# Usage: tests/test_install.sh [--system]
#   --system  also install to /usr/local for real (needs root; CI does it on a
#             fresh machine), run from there, then uninstall. Refuses when a
#             pbrpc is installed there already.
# Builds in build-install/ (prefix /usr/local, no tests). Reports TAP on stdout;
# exits non-zero when a check fails.
set -u
cd "$(dirname "$0")/.."
src=$PWD
system=0
case ${1:-} in
--system) system=1 ;;
'') ;;
*) echo "usage: tests/test_install.sh [--system]" >&2; exit 2 ;;
esac

tmp=$(mktemp -d "${TMPDIR:-/tmp}/pbrpc-install-test.XXXXXX")
pids=()
cleanup() {
	local p
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
	rm -rf "$tmp"
}
trap cleanup EXIT

n=0
failed=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() {
	n=$((n + 1)); failed=$((failed + 1)); echo "not ok $n - $1"; shift
	[ $# -gt 0 ] && printf '%s\n' "$@" | sed 's/^/# /'
	return 0
}
# check NAME COMMAND...: ok when COMMAND succeeds; its output is shown otherwise.
check() {
	local name=$1 out
	shift
	if out=$("$@" 2>&1); then ok "$name"; else not_ok "$name" "command: $*" "$out"; fi
}

# serve NAME SERVER ARGS...: starts a server in the background and waits for
# its "listening on" line (in $tmp/NAME.log); $! is in pids.
serve() {
	local name=${1//[^A-Za-z0-9-]/_}
	local log="$tmp/$name.log"
	shift
	"$@" >"$log" 2>&1 &
	pids+=($!)
	for _ in $(seq 100); do
		grep -q "listening" "$log" && return 0
		sleep 0.05
	done
	sed 's/^/# /' "$log"
	return 1
}
stop_last() {
	local p=${pids[-1]}
	kill -TERM "$p" 2>/dev/null
	wait "$p" 2>/dev/null
	unset 'pids[-1]'
}

# programs_run NAME BINDIR: pbrpc-server and pbrpc from BINDIR, with no
# LD_LIBRARY_PATH, answer a health check.
programs_run() {
	local name=$1 bindir=$2 ep="unix:$tmp/${1//[^A-Za-z0-9-]/_}.sock" out
	if ! serve "$name" env -u LD_LIBRARY_PATH "$bindir/pbrpc-server" --listen "$ep"; then
		not_ok "$name: pbrpc-server starts"
		return
	fi
	out=$(env -u LD_LIBRARY_PATH "$bindir/pbrpc" health "$ep" 2>&1)
	if [ "$out" = SERVING ]; then ok "$name: pbrpc health answers SERVING"; else not_ok "$name: pbrpc health" "$out"; fi
	stop_last
}

# greeter_runs NAME DIR: DIR's greeter_server and greeter_client talk.
greeter_runs() {
	local name=$1 dir=$2 ep="unix:$tmp/${1//[^A-Za-z0-9-]/_}-greeter.sock" out
	if ! serve "$name-greeter" "$dir/greeter_server" "$ep"; then
		not_ok "$name: greeter_server starts"
		return
	fi
	out=$("$dir/greeter_client" "$ep" Ada 2>&1 | head -1)
	if [ "$out" = "Hello, Ada! (greeted 1 times)" ]; then ok "$name: greeter runs"; else not_ok "$name: greeter runs" "$out"; fi
	stop_last
}

# outside_project DIR: tests/outside/meson.build with the greeter sources.
outside_project() {
	mkdir -p "$1"
	cp tests/outside/meson.build examples/greeter/greeter.proto examples/greeter/greeter_server.c \
		examples/greeter/greeter_client.c "$1/"
}

# cc_build DIR: the README's `cc ... $(pkg-config --cflags --libs pbrpc)`.
cc_build() {
	local dir=$1 flags
	outside_project "$dir"
	flags=$(pkg-config --cflags --libs pbrpc) &&
		(cd "$dir" && protoc-c --c_out=. greeter.proto &&
			cc -o greeter_server greeter_server.c greeter.pb-c.c $flags &&
			cc -o greeter_client greeter_client.c greeter.pb-c.c $flags)
}

meson_build() {
	local dir=$1
	shift
	outside_project "$dir"
	meson setup "$dir/build" "$dir" "$@" >"$dir/setup.log" 2>&1 && ninja -C "$dir/build" >"$dir/build.log" 2>&1 ||
		{ cat "$dir"/*.log; return 1; }
}

# ---- the build to install ----

if [ ! -f build-install/build.ninja ]; then
	meson setup build-install --prefix=/usr/local -Dtests=false -Dexamples=false -Dbench=false >/dev/null ||
		{ echo "Bail out! meson setup build-install failed"; exit 1; }
fi
if ! out=$(ninja -C build-install 2>&1); then
	echo "Bail out! ninja -C build-install failed"
	printf '%s\n' "$out" | sed 's/^/# /'
	exit 1
fi
libdir=$(meson introspect build-install --buildoptions |
	python3 -c 'import json,sys; print(next(o["value"] for o in json.load(sys.stdin) if o["name"] == "libdir"))')

# ---- DESTDIR ----

dest=$tmp/dest
check "meson install to a DESTDIR" env DESTDIR="$dest" meson install -C build-install --quiet
for f in bin/pbrpc bin/pbrpc-server bin/pbrpc-gen include/pbrpc/pbrpc.h include/pbrpc/schema.h "$libdir/pkgconfig/pbrpc.pc" share/doc/pbrpc/LICENSE \
	lib/systemd/system/pbrpc-server.service lib/systemd/system/pbrpc-server.socket; do
	if [ -e "$dest/usr/local/$f" ]; then ok "DESTDIR has $f"; else not_ok "DESTDIR has $f"; fi
done
if grep -qx "ExecStart=/usr/local/bin/pbrpc-server --log-level info" "$dest/usr/local/lib/systemd/system/pbrpc-server.service"; then
	ok "the installed service unit runs the installed pbrpc-server"
else
	not_ok "the installed service unit runs the installed pbrpc-server" "$(grep ExecStart "$dest/usr/local/lib/systemd/system/pbrpc-server.service")"
fi
if command -v scdoc >/dev/null; then
	for f in share/man/man1/pbrpc.1 share/man/man1/pbrpc-gen.1 share/man/man8/pbrpc-server.8 share/man/man3/libpbrpc.3; do
		if grep -q "^\.SH \"\?NAME" "$dest/usr/local/$f"; then
			ok "DESTDIR has the manual $f"
		else
			not_ok "DESTDIR has the manual $f"
		fi
	done
else
	echo "# manual pages not checked: scdoc is not installed"
fi
if [ -f "$dest/usr/local/share/bash-completion/completions/pbrpc" ]; then
	ok "DESTDIR has the bash completion"
else
	not_ok "DESTDIR has the bash completion"
fi
programs_run destdir "$dest/usr/local/bin"

# pkg-config against the DESTDIR tree: the sysroot prefixes its -I and -L;
# the greeter itself has no rpath, so it needs LD_LIBRARY_PATH there.
export PKG_CONFIG_PATH="$dest/usr/local/$libdir/pkgconfig" PKG_CONFIG_SYSROOT_DIR="$dest"
check "DESTDIR: cc with pkg-config builds the greeter" cc_build "$tmp/cc-destdir"
LD_LIBRARY_PATH="$dest/usr/local/$libdir" greeter_runs "DESTDIR cc" "$tmp/cc-destdir"
check "DESTDIR: meson dependency('pbrpc') through pkg-config builds the greeter" meson_build "$tmp/meson-destdir"
LD_LIBRARY_PATH="$dest/usr/local/$libdir" greeter_runs "DESTDIR meson" "$tmp/meson-destdir/build"
unset PKG_CONFIG_PATH PKG_CONFIG_SYSROOT_DIR

# ---- subproject ----

sub=$tmp/meson-sub
mkdir -p "$sub/subprojects/pbrpc"
tar -C "$src" --exclude='./build*' --exclude=./.git --exclude=./fuzz/artifacts -cf - . |
	tar -C "$sub/subprojects/pbrpc" -xf -
check "subproject: dependency('pbrpc') from subprojects/pbrpc builds the greeter" \
	meson_build "$sub" --force-fallback-for=pbrpc
if grep -q "Subproject pbrpc finished" "$sub/setup.log"; then
	ok "subproject: pbrpc was built as a subproject"
else
	not_ok "subproject: pbrpc was built as a subproject" "$(cat "$sub/setup.log")"
fi
exes=$(meson introspect "$sub/build" --targets |
	python3 -c 'import json,sys; print(" ".join(sorted(t["name"] for t in json.load(sys.stdin) if t["type"] == "executable")))')
if [ "$exes" = "greeter_client greeter_server" ]; then
	ok "subproject: only the library is built (executables: $exes)"
else
	not_ok "subproject: only the library is built" "executables: $exes"
fi
greeter_runs subproject "$sub/build"

# ---- /usr/local ----

if [ $system = 1 ]; then
	if [ "$(id -u)" != 0 ]; then
		not_ok "--system needs root"
	elif [ -e /usr/local/bin/pbrpc ] || [ -e "/usr/local/$libdir/pkgconfig/pbrpc.pc" ]; then
		not_ok "--system: a pbrpc is installed in /usr/local already; not touching it"
	else
		check "meson install to /usr/local" meson install -C build-install --quiet
		programs_run usr-local /usr/local/bin # before ldconfig: the rpath finds libpbrpc
		check "ldconfig" ldconfig
		check "/usr/local: cc with pkg-config builds the greeter" cc_build "$tmp/cc-system"
		greeter_runs "/usr/local cc" "$tmp/cc-system"
		check "/usr/local: meson dependency('pbrpc') builds the greeter" meson_build "$tmp/meson-system"
		greeter_runs "/usr/local meson" "$tmp/meson-system/build"
		check "uninstall from /usr/local" ninja -C build-install uninstall
		ldconfig
		# meson uninstall leaves directories; remove the ones left empty
		for d in include/pbrpc "$libdir/pkgconfig" "$libdir" share/doc/pbrpc share/man/man1 share/man/man3 \
			share/man/man8 share/bash-completion/completions share/bash-completion lib/systemd/system lib/systemd; do
			[ -d "/usr/local/$d" ] && rmdir --ignore-fail-on-non-empty "/usr/local/$d"
		done
		if [ ! -e /usr/local/bin/pbrpc ]; then ok "/usr/local is clean again"; else not_ok "/usr/local is clean again"; fi
	fi
else
	echo "# /usr/local not tested: run with --system (as root) for that"
fi

echo "1..$n"
[ $failed = 0 ]
