#!/usr/bin/env bash
# client/pbrpc.bash, the bash completion for pbrpc, driven as bash drives it
# (COMP_LINE and COMP_POINT), against a running pbrpc-server.
# Usage: test_completion.sh PBRPC_SERVER PBRPC COMPLETION_FILE [DEMO_PROTOSET]
# Reports TAP on stdout.
set -u
server_bin=$1 pbrpc=$2 completion=$3 protoset=${4:-}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/pbrpc-completion-test.XXXXXX")
ep="unix:$tmp/s.sock"
"$server_bin" --listen "$ep" >"$tmp/out" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 100); do grep -q "^listening on" "$tmp/out" && break; sleep 0.05; done

# shellcheck source=/dev/null
source "$completion"
n=0 failed=0
# expect NAME LINE WANT: the completions of LINE (cursor at its end), one per line.
expect() {
	local name=$1 got
	COMP_LINE=$2
	COMP_POINT=${#2}
	COMPREPLY=()
	_pbrpc
	got=$(printf '%s\n' "${COMPREPLY[@]}")
	n=$((n + 1))
	if [ "$got" = "$3" ]; then
		echo "ok $n - $name"
	else
		failed=$((failed + 1))
		echo "not ok $n - $name"
		printf '# line: %s\n# got:\n%s\n# want:\n%s\n' "$2" "$(sed 's/^/#   /' <<<"$got")" "$(sed 's/^/#   /' <<<"$3")"
	fi
}

unset PBRPC_ENDPOINT
expect "commands" "$pbrpc " "list
describe
call
health
stats
help"
expect "a command by its start" "$pbrpc de" "describe"
expect "options" "$pbrpc --t" "--timeout
--template"
expect "--format values" "$pbrpc call --format " "json
compact
text
table
prometheus"
expect "no endpoint yet: its kinds" "$pbrpc call " "unix:
tcp:"
expect "endpoint paths, after the ':' as bash completes them" "$pbrpc call unix:$tmp/s." "$tmp/s.sock"
expect "methods from the server" "$pbrpc call $ep demo.Kv/" "demo.Kv/Put
demo.Kv/Get
demo.Kv/Delete
demo.Kv/List
demo.Kv/Watch
demo.Kv/Upload
demo.Kv/Lookup"
expect "describe: services and methods" "$pbrpc describe $ep demo.E" "demo.Echo
demo.Echo/Echo"
expect "health: services" "$pbrpc health $ep pbrpc." "pbrpc.Health
pbrpc.Reflection
pbrpc.Stats"
expect "stats: nothing after the endpoint" "$pbrpc stats $ep " ""
expect "nothing after the method" "$pbrpc call $ep demo.Kv/Get " ""
PBRPC_ENDPOINT=$ep expect "methods from \$PBRPC_ENDPOINT" "$pbrpc -v call demo.Echo" "demo.Echo/Echo"
expect "a server that is not there: nothing" "$pbrpc call unix:$tmp/none.sock d" ""
if [ -n "$protoset" ]; then
	expect "methods from --protoset, no server" "$pbrpc --protoset $protoset call demo.Kv/G" "demo.Kv/Get"
fi
echo "1..$n"
[ $failed = 0 ]
