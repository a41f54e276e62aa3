#!/usr/bin/env bash
# Runs one criterion benchmark filter N times and prints, per benchmark id, the
# min / median / max of the N medians criterion measured (and the spread max/min), so a
# figure in BENCHMARKS.md can say how stable it is.
#
# usage: scripts/bench-repeat.sh [-n RUNS] [-b BENCH] [-a 'CRITERION ARGS'] FILTER
#   defaults: -n 5  -b queue_vs_pipe  -a '--warm-up-time 1 --measurement-time 3'
# example:
#   scripts/bench-repeat.sh -n 5 'queue_throughput/(spsc|os_pipe)/8B'
#
# Each run's medians are read from target/criterion/<id>/new/estimates.json (only the ids
# that run refreshed); for ids with a throughput, messages/s (or bytes/s) are printed too.
# Needs jq. The raw per-run figures are kept in target/bench-repeat/<timestamp>.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=5
bench=queue_vs_pipe
args='--warm-up-time 1 --measurement-time 3'
while getopts "n:b:a:" opt; do
    case $opt in
        n) runs=$OPTARG ;;
        b) bench=$OPTARG ;;
        a) args=$OPTARG ;;
        *) sed -n '2,13p' "$0"; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
filter=${1:?"a criterion filter is needed (see the usage at the top of $0)"}
command -v jq >/dev/null || { echo "bench-repeat: jq is needed (apt-get install jq)" >&2; exit 2; }

out_dir=target/bench-repeat
mkdir -p "$out_dir"
tsv="$out_dir/$(date -u +%Y%m%dT%H%M%SZ).tsv"
echo "# $(date -u '+%F %T UTC') $(nproc) CPUs; cargo bench --bench $bench -- $args '$filter' x $runs" | tee "$tsv"

cargo bench --bench "$bench" --no-run -q 2>/dev/null || cargo bench --bench "$bench" --no-run
for run in $(seq 1 "$runs"); do
    stamp=$(mktemp)
    echo "run $run/$runs: load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    # shellcheck disable=SC2086 # $args is a list of criterion options
    cargo bench -q --bench "$bench" -- $args "$filter" >/dev/null 2>"$out_dir/last.stderr" || {
        echo "bench-repeat: run $run failed; see $out_dir/last.stderr" >&2
        exit 1
    }
    # Every benchmark.json refreshed by this run: its id, per-iteration throughput, median.
    find target/criterion -path '*/new/benchmark.json' -newer "$stamp" | while read -r b; do
        est=$(dirname "$b")/estimates.json
        jq -r --argjson run "$run" --slurpfile e "$est" \
            '[$run, .full_id,
              (.throughput.Bytes // .throughput.Elements // 0),
              (if .throughput.Bytes then "B" elif .throughput.Elements then "E" else "-" end),
              $e[0].median.point_estimate] | @tsv' "$b"
    done >>"$tsv"
    rm -f "$stamp"
done

# Per id: min/median/max of the per-run median times (ns), and the throughput they mean.
grep -v '^#' "$tsv" | sort -t$'\t' -k2,2 -k5,5g | awk -F'\t' -v runs="$runs" '
function rate(per, kind, ns,   r) {
    if (kind == "-" || ns <= 0) return "-"
    r = per / (ns * 1e-9)
    if (kind == "B") {
        # bytes/s, and messages/s (one message of `per` bytes per iteration)
        if (r >= 2^30) return sprintf("%.2f GiB/s = %s", r / 2^30, msgs(1 / (ns * 1e-9)))
        return sprintf("%.1f MiB/s = %s", r / 2^20, msgs(1 / (ns * 1e-9)))
    }
    return msgs(r)
}
function msgs(r) {
    if (r >= 1e6) return sprintf("%.2f M/s", r / 1e6)
    return sprintf("%.1f k/s", r / 1e3)
}
function fmt(ns) {
    if (ns >= 1e6) return sprintf("%.2f ms", ns / 1e6)
    if (ns >= 1e3) return sprintf("%.2f µs", ns / 1e3)
    return sprintf("%.1f ns", ns)
}
function flush(   med, n) {
    if (id == "") return
    n = cnt
    med = (n % 2) ? t[(n + 1) / 2] : (t[n / 2] + t[n / 2 + 1]) / 2
    printf "%-40s %3d  %10s %10s %10s  %5.2fx  %s .. %s (median %s)\n", id, n,
        fmt(t[1]), fmt(med), fmt(t[n]), t[n] / t[1],
        rate(per, kind, t[n]), rate(per, kind, t[1]), rate(per, kind, med)
}
BEGIN {
    printf "%-40s %3s  %10s %10s %10s  %6s  %s\n", "id (time per iteration)", "n", "min", "median", "max", "max/min", "rate: worst .. best (median)"
}
{
    if ($2 != id) { flush(); id = $2; cnt = 0; delete t }
    t[++cnt] = $5; per = $3; kind = $4
}
END { flush() }
' | tee -a "$tsv.summary"
