#!/usr/bin/env bash
# The WAN table of docs/wan.md: `dqkd bench` (cross-site pairs, ready pools on) at each
# one-way delay between the sites and each concurrency, one fresh cluster per cell, printed
# as a Markdown table, with the round trip a probe through a relay of the same delay measured
# during the run (link RTT). Each run's JSON report is kept in OUT_DIR.
# Usage: scripts/wan-table.sh [DQKD_BINARY] [DELAYS_MS] [CONCURRENCIES] [SECONDS] [OUT_DIR]
#   e.g. scripts/wan-table.sh target/release/dqkd "0 10 40" "1 16 64 256 1024" 8 wan-runs
# Set ENTROPY_DELAY_MS to also delay the links to the entropy servers, PORT for the base port
# of the clusters (default 28443, as the bench). Needs jq.
set -euo pipefail
bin=$(realpath "${1:-target/release/dqkd}")
delays=${2:-0 10 40}
concurrencies=${3:-1 16 64 256 1024}
seconds=${4:-8}
out=${5:-$(mktemp -d)}
mkdir -p "$out"

echo "| one-way delay | connections | pairs/s | enc_keys p50 ms | enc_keys p99 ms | link RTT p50 ms | dec_keys p50 ms | errors |"
echo "|---|---|---|---|---|---|---|---|"
for delay in $delays; do
    for c in $concurrencies; do
        report="$out/delay-${delay}ms-c${c}.json"
        if ! RUST_LOG=error "$bin" bench --port "${PORT:-28443}" --concurrency "$c" --duration "$seconds" \
            --peer-delay-ms "$delay" --entropy-delay-ms "${ENTROPY_DELAY_MS:-0}" \
            --json >"$report" 2>"$out/delay-${delay}ms-c${c}.log"; then
            echo "| $delay ms | $c | failed: see $out/delay-${delay}ms-c${c}.log | | | | | |"
            continue
        fi
        jq -r --arg d "$delay" --arg c "$c" '.phases[-1] as $p |
            "| \($d) ms | \($c) | \($p.pairs_per_s | floor) | \($p.enc_keys.p50_ms * 10 | round / 10) | \($p.enc_keys.p99_ms * 10 | round / 10) | \(if $p.peer_link_rtt.count > 0 then ($p.peer_link_rtt.p50_ms * 10 | round / 10) else "–" end) | \($p.dec_keys.p50_ms * 10 | round / 10) | \($p.errors) |"' \
            "$report"
    done
done
