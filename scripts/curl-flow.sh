#!/usr/bin/env bash
# Runs the mission's flow with plain curl and .p12 bundles against `dqkd up` (two sites,
# three entropy servers): Alice at site A asks for a key for Bob's KME ID, Bob fetches it
# at site B by key ID with Alice's KME ID, both must match, and a second fetch must be
# refused. Usage: scripts/curl-flow.sh [path/to/dqkd]
set -euo pipefail
dqkd="$(realpath "${1:-target/debug/dqkd}")"
port="${DQKD_FLOW_PORT:-18443}"
work="$(mktemp -d)"
cleanup() {
    [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

"$dqkd" up --port "$port" --no-demo >up.out 2>up.err &
pid=$!
for _ in $(seq 1 100); do
    grep -q "Press Ctrl-C" up.out 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { cat up.out up.err; echo "dqkd up exited"; exit 1; }
    sleep 0.1
done
grep -q "Press Ctrl-C" up.out || { cat up.out up.err; echo "dqkd up did not start"; exit 1; }

pki=dqkd-local/pki
site_a="https://127.0.0.1:$port"
site_b="https://127.0.0.1:$((port + 1))"
enc=$(curl --silent --show-error --fail-with-body \
    --cert "$pki/sae/alice.p12" --cert-type P12 --cacert "$pki/ca.pem" \
    "$site_a/api/v1/keys/KME_B/enc_keys")
echo "alice enc_keys: $enc" | sed 's/"key":"[^"]*"/"key":"<hidden>"/'
key_id=$(printf '%s' "$enc" | grep -o '"key_ID":"[^"]*"' | head -n 1 | cut -d'"' -f4)
key=$(printf '%s' "$enc" | grep -o '"key":"[^"]*"' | head -n 1 | cut -d'"' -f4)
[ -n "$key_id" ] && [ -n "$key" ] || { echo "no key in enc_keys answer"; exit 1; }

dec=$(curl --silent --show-error --fail-with-body \
    --cert "$pki/sae/bob.p12" --cert-type P12 --cacert "$pki/ca.pem" \
    "$site_b/api/v1/keys/KME_A/dec_keys" \
    -H "Content-Type: application/json" \
    -d "{\"key_IDs\": [{\"key_ID\": \"$key_id\"}]}")
got=$(printf '%s' "$dec" | grep -o '"key":"[^"]*"' | head -n 1 | cut -d'"' -f4)
[ "$got" = "$key" ] || { echo "Bob's key differs from Alice's"; exit 1; }
echo "bob dec_keys at site B: same key for $key_id"

code=$(curl --silent --output /dev/null --write-out '%{http_code}' \
    --cert "$pki/sae/bob.p12" --cert-type P12 --cacert "$pki/ca.pem" \
    "$site_b/api/v1/keys/KME_A/dec_keys?key_ID=$key_id")
[ "$code" = "400" ] || { echo "second dec_keys answered $code, expected 400"; exit 1; }
echo "bob dec_keys again: 400 (delivered once)"
echo "curl-flow: 1 passed, 0 failed"
