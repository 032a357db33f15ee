#!/usr/bin/env bash
# Runs otpd and Redis side by side on this machine, as BENCHMARKS.md describes.
#   scripts/bench.sh [throughput|abuse|purge|janitor]   (default: throughput)
# Needs: cargo build --release; apt-get install redis-server redis-tools.
# Every daemon runs in its own temp dir and is stopped (by its pid) at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
OTPD=${OTPD:-target/release/otpd}
CLIENTS=${CLIENTS:-32}
DURATION=${DURATION:-10s}
WORK=$(mktemp -d /tmp/otpd-bench.XXXXXX)
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

# start_otpd NAME EXTRA_TOML: a daemon with the log backend writing codes to codes.jsonl.
start_otpd() {
    local dir=$WORK/$1
    mkdir -p "$dir"
    printf '%s\n[delivery]\nlog_file = "%s/codes.jsonl"\n' "$2" "$dir" > "$dir/otpd.toml"
    OTPD_LOG=error "$OTPD" serve --config "$dir/otpd.toml" --data-dir "$dir" \
        --socket "$dir/otpd.sock" 2>"$dir/stderr.log" &
    PIDS+=($!)
    for _ in $(seq 100); do [ -S "$dir/otpd.sock" ] && return; sleep 0.1; done
    echo "otpd did not start" >&2; exit 1
}

bench() { # bench NAME ARGS...
    local dir=$WORK/$1; shift
    "$OTPD" bench --socket "$dir/otpd.sock" --codes-file "$dir/codes.jsonl" "$@"
}

redis() { # redis MODE (durable|memory): SET over a Unix socket, same client count
    local dir=$WORK/redis-$1
    mkdir -p "$dir"
    local aof="--appendonly no"
    [ "$1" = durable ] && aof="--appendonly yes --appendfsync always"
    # shellcheck disable=SC2086
    redis-server --port 0 --unixsocket "$dir/redis.sock" --dir "$dir" --save '' $aof \
        --logfile "$dir/redis.log" &
    local pid=$!
    PIDS+=($pid)
    for _ in $(seq 100); do [ -S "$dir/redis.sock" ] && break; sleep 0.1; done
    echo "redis SET ($1), $CLIENTS clients:"
    redis-benchmark -s "$dir/redis.sock" -t set -c "$CLIENTS" -n "${REDIS_REQUESTS:-100000}" -q 2>&1 \
        | tr '\r' '\n' | grep -E '^SET: [0-9]'
    kill "$pid"
}

echo "== $(date -u +%FT%TZ), $(nproc) cores, load average: $(cut -d' ' -f1-3 /proc/loadavg)"
case "${1:-throughput}" in
throughput)
    start_otpd durable ""
    start_otpd relaxed $'[store]\ndurability = "relaxed"'
    redis durable
    echo "otpd mixed create+verify, durable:"; bench durable --clients "$CLIENTS" --duration "$DURATION"
    redis memory
    echo "otpd mixed create+verify, relaxed:"; bench relaxed --clients "$CLIENTS" --duration "$DURATION"
    echo "otpd create, durable:"; bench durable --op create --clients "$CLIENTS" --duration "$DURATION"
    echo "otpd verify, durable:"; bench durable --op verify --clients "$CLIENTS" --duration "$DURATION" --preload 80000
    ;;
abuse)
    start_otpd durable $'[server]\nmax_connections = 4096'
    echo "quiet:"; bench durable --clients "$CLIENTS" --duration "$DURATION"
    echo "with 2000 idle connections and 200 one-byte-a-second writers:"
    bench durable --clients "$CLIENTS" --duration "$DURATION" --idle-connections 2000 --slow-writers 200
    echo "quiet again:"; bench durable --clients "$CLIENTS" --duration "$DURATION"
    ;;
janitor)
    # 1 M codes (ttl FILL_TTL, retain 0): RSS with 1 M live; then stop the daemon until
    # all have expired and restart it, so its janitor meets 1 M due codes at once while
    # a verify load runs. Quiet baseline: the same load once the purge is done.
    ttl=${FILL_TTL:-900}
    config=$'[otp]\nttl_secs = 3600\nretain_secs = 0'
    start_otpd big "$config"
    filled_at=$(date +%s)
    echo "filling ${FILL:-1000000} codes (ttl $ttl s) with ${FILL_CLIENTS:-128} clients:"
    bench big --op create --clients "${FILL_CLIENTS:-128}" --duration 60m --total "${FILL:-1000000}" --ttl "$ttl"
    "$OTPD" stats --socket "$WORK/big/otpd.sock"
    kill "${PIDS[-1]}"; wait "${PIDS[-1]}" || true
    wait_s=$(( filled_at + ttl + 5 - $(date +%s) ))
    echo "daemon stopped at $(date -u +%T); waiting ${wait_s} s for every code to expire"
    [ "$wait_s" -gt 0 ] && sleep "$wait_s"
    start_otpd big "$config"
    echo "restarted at $(date -u +%T); create+verify while the janitor purges:"
    "$OTPD" stats --socket "$WORK/big/otpd.sock"
    bench big --clients "$CLIENTS" --duration "$DURATION"
    "$OTPD" stats --socket "$WORK/big/otpd.sock"
    # Done when every filled code has expired and nothing was purged for 5 s (the
    # verify run's own unverified codes stay live, so `live` never reaches 0).
    counter() { "$OTPD" stats --socket "$WORK/big/otpd.sock" | grep -oE "\"$1\":[0-9]+" | cut -d: -f2; }
    until [ "$(counter expired)" -ge "${FILL:-1000000}" ]; do sleep 5; done
    before=-1
    until [ "$before" = "$(counter purged)" ]; do before=$(counter purged); sleep 5; done
    echo "purge done at $(date -u +%T); create+verify, quiet:"
    "$OTPD" stats --socket "$WORK/big/otpd.sock"
    bench big --clients "$CLIENTS" --duration "$DURATION"
    ;;
purge)
    # Smaller and quicker: 150 k codes with a 45 s ttl, a quiet mixed run, then the same
    # run from 47 s after the fill began, while they expire and are purged.
    start_otpd small $'[otp]\nretain_secs = 0'
    started=$(date +%s)
    bench small --op create --clients 128 --duration 5m --total "${FILL:-150000}" --ttl 45
    echo "quiet:"; bench small --clients "$CLIENTS" --duration 8s
    while [ $(( $(date +%s) - started )) -lt 47 ]; do sleep 1; done
    echo "while the janitor expires and purges:"; bench small --clients "$CLIENTS" --duration 8s
    "$OTPD" stats --socket "$WORK/small/otpd.sock"
    ;;
esac
