#!/usr/bin/env bash
# The README's worked example (examples/greeter), end to end: the server built
# with the generated *_INIT macro, the client calling the generated stubs
# synchronously and asynchronously, and a handler's error status reaching the
# client. TAP output.
set -u
server=$1
client=$2
dir=$(mktemp -d)
endpoint="unix:$dir/greeter.sock"
log="$dir/server.log"
"$server" "$endpoint" >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT

echo "1..4"
n=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() { n=$((n + 1)); echo "not ok $n - $1"; shift; printf '# %s\n' "$@"; }

for _ in $(seq 100); do grep -q "listening" "$log" && break; sleep 0.05; done
if grep -q "greeter listening on $endpoint" "$log"; then ok "server starts"; else not_ok "server starts" "$(cat "$log")"; fi

out=$("$client" "$endpoint" Ada Grace 2>&1)
status=$?
expected="Hello, Ada! (greeted 1 times)
Hello, Grace! (greeted 2 times)"
# The async replies may come in any order; the sync ones come first, in order.
if [ $status -eq 0 ] && [ "$(printf '%s\n' "$out" | head -2)" = "$expected" ] &&
   [ "$(printf '%s\n' "$out" | tail -2 | sed 's/ (greeted.*//' | sort)" = "Hello, Ada!
Hello, Grace!" ]; then
  ok "sync then async greetings"
else
  not_ok "sync then async greetings" "status $status" "$out"
fi

out=$("$client" "$endpoint" "" 2>&1)
status=$?
if [ $status -eq 1 ] && printf '%s' "$out" | grep -q "greeting  failed: INVALID_ARGUMENT: name must not be empty"; then
  ok "handler status reaches the client"
else
  not_ok "handler status reaches the client" "status $status" "$out"
fi

kill -TERM "$pid"
wait "$pid"
status=$?
if [ $status -eq 0 ] && [ ! -e "$dir/greeter.sock" ]; then
  ok "SIGTERM drains and removes the socket"
else
  not_ok "SIGTERM drains and removes the socket" "status $status"
fi
