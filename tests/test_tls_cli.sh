#!/usr/bin/env bash
# pbrpc-server and the pbrpc CLI over TLS (issue 12): --cert --key --ca on
# both, mutual TLS, and the words each side gives for a missing client
# certificate, a wrong host name, an untrusted server and plaintext on a TLS
# port. Certificates come from tls-certs (OpenSSL's API, no openssl CLI).
# Usage: test_tls_cli.sh PBRPC_SERVER PBRPC TLS_CERTS. Reports TAP on stdout.
set -u
usage="usage: test_tls_cli.sh PBRPC_SERVER PBRPC TLS_CERTS"
server_bin=${1:?$usage}
pbrpc=${2:?$usage}
certs_bin=${3:?$usage}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/pbrpc-tls-cli.XXXXXX")
pids=()
cleanup() {
	for p in "${pids[@]}"; do
		kill "$p" 2>/dev/null
		wait "$p" 2>/dev/null
	done
	rm -rf "$tmp"
}
trap cleanup EXIT
"$certs_bin" "$tmp" || { echo "Bail out! tls-certs failed"; exit 1; }

n=0 failed=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() {
	n=$((n + 1)) failed=1
	echo "not ok $n - $1"
	shift
	for f in "$@"; do sed 's/^/# /' "$f"; done
}

# start NAME ARGS...: a daemon listening on tls:127.0.0.1:0; sets $ep
start() {
	local name=$1
	shift
	"$server_bin" --listen tls:127.0.0.1:0 --log-level info "$@" >"$tmp/$name.out" 2>"$tmp/$name.err" &
	pids+=($!)
	for _ in $(seq 200); do
		grep -q '^listening on ' "$tmp/$name.out" 2>/dev/null && break
		sleep 0.05
	done
	ep=$(sed -n 's/^listening on //p' "$tmp/$name.out" | head -1)
	port=${ep##*:}
}

# check NAME WANT_STATUS PATTERN COMMAND...: exit status, and PATTERN (grep -E)
# in its stdout + stderr
check() {
	local name=$1 want=$2 pat=$3 st
	shift 3
	"$@" >"$tmp/o" 2>"$tmp/e" </dev/null
	st=$?
	if [ "$st" = "$want" ] && cat "$tmp/o" "$tmp/e" | grep -Eq -- "$pat"; then
		ok "$name"
	else
		echo "# exit $st, want $want; want /$pat/ in:" >"$tmp/why"
		not_ok "$name" "$tmp/why" "$tmp/o" "$tmp/e"
	fi
}

C=$tmp
start mtls --cert "$C/server.pem" --key "$C/server.key" --ca "$C/ca.pem"
if [ -z "$ep" ]; then
	echo "Bail out! pbrpc-server did not start: $(cat "$tmp/mtls.out" "$tmp/mtls.err")"
	exit 1
fi
case $ep in tls:127.0.0.1:*) ok "the daemon listens on $ep" ;; *) not_ok "listening address $ep" ;; esac

req='{"payload":"aGVsbG8="}'
check "mutual TLS call through the CLI" 0 '"payload": "aGVsbG8="' \
	"$pbrpc" --ca "$C/ca.pem" --cert "$C/client.pem" --key "$C/client.key" call "$ep" demo.Echo/Echo "$req"
check "by name, the host checked against DNS:localhost" 0 '"payload": "aGVsbG8="' \
	"$pbrpc" --ca "$C/ca.pem" --cert "$C/client.pem" --key "$C/client.key" call "tls:localhost:$port" demo.Echo/Echo "$req"
if grep -q "tls:127.0.0.1:" "$tmp/mtls.out" "$tmp/mtls.err"; then ok "the access log names the TLS peer"; else
	not_ok "the access log names the TLS peer" "$tmp/mtls.out" "$tmp/mtls.err"; fi
check "health and reflection over TLS" 0 'SERVING' \
	"$pbrpc" --ca "$C/ca.pem" --cert "$C/client.pem" --key "$C/client.key" health "$ep"
check "no client certificate: the CLI says the server requires one" 3 \
	'cannot connect to tls:.*(the server requires a client certificate|may have refused our certificate)' \
	"$pbrpc" --ca "$C/ca.pem" list "$ep"
sleep 0.2
if grep -q "the client sent no certificate and this server requires one" "$tmp/mtls.out" "$tmp/mtls.err"; then
	ok "the daemon logs the missing client certificate"
else not_ok "the daemon logs the missing client certificate" "$tmp/mtls.out" "$tmp/mtls.err"; fi
check "wrong host name" 3 'hostname mismatch \(it is not valid for wrong.example\)' \
	"$pbrpc" --ca "$C/ca.pem" --cert "$C/client.pem" --key "$C/client.key" --servername wrong.example list "$ep"
check "untrusted server (the system store does not know the test CA)" 3 \
	'server certificate rejected: (unable to get local issuer certificate|self-signed certificate in certificate chain)' \
	"$pbrpc" --cert "$C/client.pem" --key "$C/client.key" list "$ep"
check "plaintext to the TLS port" 3 'this port expects TLS' "$pbrpc" list "tcp:127.0.0.1:$port"

start plain --cert "$C/server.pem" --key "$C/server.key"
check "server TLS only: no client certificate needed" 0 '"payload": "aGVsbG8="' \
	"$pbrpc" --ca "$C/ca.pem" call "$ep" demo.Echo/Echo "$req"

start request --cert "$C/server.pem" --key "$C/server.key" --ca "$C/ca.pem" --client-cert request
check "--client-cert request: accepted without one" 0 '"payload": "aGVsbG8="' \
	"$pbrpc" --ca "$C/ca.pem" call "$ep" demo.Echo/Echo "$req"

check "--ca without --cert is a usage error" 2 'needs --cert' "$server_bin" --listen tls:127.0.0.1:0 --ca "$C/ca.pem"
check "--client-cert needs a mode" 2 'expected require or request' \
	"$server_bin" --cert "$C/server.pem" --ca "$C/ca.pem" --client-cert maybe
check "a key that does not match: the daemon says so" 1 'does not match the certificate' \
	"$server_bin" --listen tls:127.0.0.1:0 --cert "$C/server.pem" --key "$C/client.key"
check "a certificate file without a key in it" 3 'cannot load the private key .*client.pem: no PEM key or certificate' \
	"$pbrpc" --ca "$C/ca.pem" --cert "$C/client.pem" list "$ep"
check "tls: without --cert" 1 'needs a certificate and key' "$server_bin" --listen tls:127.0.0.1:0

echo "1..$n"
exit $failed
