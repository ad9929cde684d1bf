#!/usr/bin/env bash
# Measures a site holding N ready keys per link: how long the local cluster takes to fill
# both pools, then how long site A's KME takes from start to serving and its resident
# memory once serving (read RSS_WAIT seconds after it is ready, default 1).
# Usage: scripts/pool-restart.sh [DQKD_BINARY] [KEYS_PER_LINK] [BASE_PORT]
set -euo pipefail
bin=$(realpath "${1:-target/release/dqkd}")
target=${2:-1000000}
port=${3:-18443}
metrics="http://127.0.0.1:$((port + 300))/metrics"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"

RUST_LOG=warn "$bin" up --dir state --port "$port" --pool-target "$target" --no-demo >up.log 2>&1 &
up=$!
start=$(date +%s.%N)
until [ "$(curl -sf "$metrics" | grep -c "^dqkd_pool_keys{.*} $target\$" || true)" = 2 ]; do
    kill -0 "$up" 2>/dev/null || { cat up.log; exit 1; }
    sleep 0.5
done
filled=$(echo "$(date +%s.%N) - $start" | bc)
echo "both links filled with $target ready keys each in ${filled} s" \
     "($(echo "$target * 60 / $filled" | bc) keys/min per link, both links at once, one process)"
kill -INT "$up"; wait "$up" || true
ls -l state/data/*.redb | awk '{print "  store file " $NF ": " $5 " bytes"}'

for run in 1 2 3; do
    rm -f ready
    t0=$(date +%s.%N)
    RUST_LOG=warn "$bin" kme --config state/site-KME_A.toml --ready-file ready >kme.log 2>&1 &
    kme=$!
    until [ -s ready ]; do
        kill -0 "$kme" 2>/dev/null || { cat kme.log; exit 1; }
        sleep 0.01
    done
    t1=$(date +%s.%N)
    sleep ${RSS_WAIT:-1}
    level=$(curl -sf "$metrics" | grep '^dqkd_pool_keys' | awk '{print $2}')
    echo "restart $run: serving after $(echo "$t1 - $t0" | bc) s with $level ready keys;" \
         "$(grep VmRSS /proc/$kme/status | tr -s ' \t' ' ')"
    kill -INT "$kme"; wait "$kme" || true
done
