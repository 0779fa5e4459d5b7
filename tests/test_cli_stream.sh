#!/usr/bin/env bash
# `pbrpc call` on the stream methods of demo.Kv (pbrpc-gen's code in the real
# pbrpc-server): a server stream printed as JSON lines as messages arrive, a
# client stream read from stdin, a bidirectional one doing both at once, and
# Ctrl-C. TAP on stdout.
#   test_cli_stream.sh PBRPC_SERVER PBRPC [DEMO_PROTOSET]
set -u
server_bin=$1 pbrpc=$2 protoset=${3:-}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/pbrpc-cli-stream.XXXXXX")
pids=()
cleanup() {
	local p
	exec 3>&- 2>/dev/null
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
	rm -rf "$tmp"
}
trap cleanup EXIT

ep="unix:$tmp/s.sock"
"$server_bin" --listen "$ep" >"$tmp/server.out" 2>&1 &
pids+=($!)
for _ in $(seq 200); do
	grep -q '^listening on ' "$tmp/server.out" 2>/dev/null && break
	sleep 0.05
done
grep -q '^listening on ' "$tmp/server.out" || { echo "Bail out! no server: $(cat "$tmp/server.out")"; exit 1; }

n=0 failed=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() { n=$((n + 1)); failed=1; echo "not ok $n - $1"; shift; printf '%s\n' "$@" | sed 's/^/# /'; }
# check NAME WANT_STATUS WANT_OUT WANT_ERR STATUS OUT ERR
# (WANT_OUT and WANT_ERR as shell globs when they start with '~')
match() { case $2 in "~"*) [[ $1 == ${2#"~"} ]] ;; *) [ "$1" = "$2" ] ;; esac; }
check() {
	if [ "$5" = "$2" ] && match "$6" "$3" && match "$7" "$4"; then ok "$1"; else
		not_ok "$1" "status $5 (want $2)" "stdout:" "$6" "want stdout:" "$3" "stderr:" "$7" "want stderr:" "$4"; fi
}
# run WANT... COMMAND: stdin from $STDIN
run() {
	local name=$1 ws=$2 wo=$3 we=$4 st
	shift 4
	printf '%s' "${STDIN:-}" | "$@" >"$tmp/out" 2>"$tmp/err"
	st=$?
	check "$name" "$ws" "$wo" "$we" "$st" "$(cat "$tmp/out")" "$(cat "$tmp/err")"
}
# wait_lines FILE N: until FILE has N lines (10 s at most)
wait_lines() {
	for _ in $(seq 200); do
		[ "$(wc -l <"$1")" -ge "$2" ] && return 0
		sleep 0.05
	done
	return 1
}
put() { "$pbrpc" call "$ep" demo.Kv/Put "{\"key\":\"$1\",\"value\":\"$2\"}" >/dev/null; }

run "describe shows the stream keywords" 0 'rpc demo.Kv/Watch(demo.WatchRequest) returns (stream demo.Change);' "" \
	sh -c '"$1" describe "$2" demo.Kv/Watch | head -1' sh "$pbrpc" "$ep"
run "list shows them too" 0 '  demo.Kv/Upload(stream demo.PutRequest) returns (demo.UploadReply)
  demo.Kv/Lookup(stream demo.GetRequest) returns (stream demo.Entry)' "" \
	sh -c '"$1" list "$2" | grep -E "Upload|Lookup"' sh "$pbrpc" "$ep"
if [ -n "$protoset" ]; then
	run "--protoset knows them without reflection" 0 'rpc demo.Kv/Lookup(stream demo.GetRequest) returns (stream demo.Entry);' "" \
		sh -c '"$1" --protoset "$2" describe demo.Kv/Lookup | head -1' sh "$pbrpc" "$protoset"
fi

# ---- server stream: Watch, then Ctrl-C ----
# SIGINT reaches a background job only with its default disposition back.
env --default-signal=INT "$pbrpc" call "$ep" demo.Kv/Watch '{"prefix":"w/"}' >"$tmp/watch.out" 2>"$tmp/watch.err" &
watch=$!
pids+=($watch)
# The watcher registers once the stream has opened: put until it sees one.
for _ in $(seq 100); do
	put w/ready eA==
	[ -s "$tmp/watch.out" ] && break
	sleep 0.1
done
before=$(wc -l <"$tmp/watch.out")
put w/a YQ==
put other/b Yg==
"$pbrpc" call "$ep" demo.Kv/Delete '{"key":"w/a"}' >/dev/null
if wait_lines "$tmp/watch.out" $((before + 2)); then
	check "a server stream prints one JSON object per line as they arrive" 0 \
		'{"key":"w/a","value":"YQ=="}
{"key":"w/a","kind":"DELETE"}' "" 0 "$(tail -n 2 "$tmp/watch.out")" "$(cat "$tmp/watch.err")"
else
	not_ok "a server stream prints one JSON object per line as they arrive" "$(cat "$tmp/watch.out" "$tmp/watch.err")"
fi
kill -INT $watch
wait $watch
check "Ctrl-C cancels the stream: exit 130" 130 "" "pbrpc: CANCELLED: interrupted" $? "" "$(cat "$tmp/watch.err")"

run "a server stream with a bad request: exit 2, nothing sent" 2 "" \
	'pbrpc: unknown field "nope" in demo.WatchRequest (fields: prefix)' "$pbrpc" call "$ep" demo.Kv/Watch '{"nope":1}'
run "--timeout bounds a stream: DEADLINE_EXCEEDED" 68 "" "~pbrpc: DEADLINE_EXCEEDED: *" \
	"$pbrpc" --timeout 200ms call "$ep" demo.Kv/Watch '{"prefix":"never/"}'

# ---- client stream: Upload from stdin ----
STDIN='{"key":"u/1","value":"MQ=="}

{"key":"u/2","value":"Mg=="}
{"key":"w/ready"}
' run "a client stream reads one JSON object per line from stdin" 0 '{"count":3,"created":2}' "" \
	"$pbrpc" call "$ep" demo.Kv/Upload -
run "... and the server has them" 0 '{"entries":[{"key":"u/1","value":"MQ=="},{"key":"u/2","value":"Mg=="}]}' "" \
	"$pbrpc" --format compact call "$ep" demo.Kv/List '{"prefix":"u/"}'
run "a JSON argument is the one message" 0 '{"count":1,"created":1}' "" \
	"$pbrpc" --format compact call "$ep" demo.Kv/Upload '{"key":"u/3"}'
STDIN='{"key":"u/4"}
{"key":"u/5",
' run "a bad line cancels the stream: exit 2" 2 "" '~pbrpc: stdin line 2: invalid JSON: *' \
	"$pbrpc" call "$ep" demo.Kv/Upload
STDIN='{"key":""}
' run "the server's status: 64 + INVALID_ARGUMENT" 67 "" \
	"pbrpc: INVALID_ARGUMENT: entry 1: key must not be empty" "$pbrpc" call "$ep" demo.Kv/Upload
STDIN='[1]
' run "a line that is not an object" 2 "" "pbrpc: stdin line 1: expected a JSON object ({...})" \
	"$pbrpc" call "$ep" demo.Kv/Upload -

# ---- bidirectional: Lookup, replies while stdin is still open ----
mkfifo "$tmp/in"
"$pbrpc" call "$ep" demo.Kv/Lookup <"$tmp/in" >"$tmp/bidi.out" 2>"$tmp/bidi.err" &
bidi=$!
pids+=($bidi)
exec 3>"$tmp/in"
echo '{"key":"u/1"}' >&3
if wait_lines "$tmp/bidi.out" 1; then ok "a bidirectional stream prints a reply before stdin ends"; else
	not_ok "a bidirectional stream prints a reply before stdin ends" "$(cat "$tmp/bidi.err")"; fi
echo '{"key":"missing"}' >&3
wait_lines "$tmp/bidi.out" 2
exec 3>&-
wait $bidi
check "... then ends at the end of stdin, in order" 0 '{"key":"u/1","value":"MQ=="}
{"key":"missing"}' "" $? "$(cat "$tmp/bidi.out")" "$(cat "$tmp/bidi.err")"

STDIN='{"key":"u/2"}
' run "--format text on a stream" 0 'key: "u/2"
value: "2"' "" "$pbrpc" --format text call "$ep" demo.Kv/Lookup

echo "1..$n"
exit $failed
