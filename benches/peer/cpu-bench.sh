#!/usr/bin/env bash
# The crate against the PyTorch peer (benches/peer/model.py) on the CPU, one workload, dense and
# sparse, same weights, same prompt, same thread count, one after the other on one machine:
#   1. `sparse-lavida init-weights --dtype f32` writes the preset's weights once (both use them);
#   2. model.py --device cpu --threads T times the peer (median and every run in its JSON);
#   3. `sparse-lavida bench --device cpu --peer-json` times the crate (best of --repeat) and
#      prints `vs peer` lines: crate vs peer (best against best) for dense and sparse.
# Usage: benches/peer/cpu-bench.sh OUT_PREFIX WORKLOAD [PYTHON]
#   WORKLOAD: t2i32 (small, t2i 32x32, 64 steps, CFG 4), t2i64 (small, t2i 64x64, 64 steps,
#   CFG 4), text (small, text answer 128, block 32, 64 steps), tiny32 (tiny, t2i 32x32)
#   Env: THREADS (default: nproc), REPEAT (default 3), PEER_BUDGET_S (default 900), PROMPT_LEN
#   (default 64; the prompt is ids 1..=PROMPT_LEN times 37 modulo 2000, never a [MASK] id).
# Writes OUT_PREFIX-peer.json (model.py) and OUT_PREFIX.json (bench, with the peer embedded and
# `vs_peer`). Needs target/release/sparse-lavida (cargo build --release; SL_NO_CUDA=1 is fine).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: cpu-bench.sh OUT_PREFIX WORKLOAD [PYTHON]}
work=${2:?usage: cpu-bench.sh OUT_PREFIX WORKLOAD [PYTHON]}
py=${3:-python3}
bin=${CARGO_TARGET_DIR:-target}/release/sparse-lavida
[ -x "$bin" ] || { echo "build the crate first: cargo build --release" >&2; exit 1; }
threads=${THREADS:-$(nproc)}
repeat=${REPEAT:-3}
budget=${PEER_BUDGET_S:-900}
plen=${PROMPT_LEN:-64}
prompt=$(seq 1 "$plen" | awk '{printf "%s%d", (NR>1?",":""), ($1*37)%2000}')

preset=small
case $work in
t2i32) args=(--task t2i --grid 32x32 --steps 64 --guidance 4) ;;
t2i64) args=(--task t2i --grid 64x64 --steps 64 --guidance 4) ;;
text) args=(--task text --answer-len 128 --block 32 --steps 64) ;;
tiny32) preset=tiny args=(--task t2i --grid 32x32 --steps 64 --guidance 4) ;;
*) echo "unknown workload $work (t2i32, t2i64, text, tiny32)" >&2; exit 2 ;;
esac
if [ "$preset" = tiny ]; then
    prompt=$(seq 1 "$plen" | awk '{printf "%s%d", (NR>1?",":""), ($1*37)%290}')
fi

weights=$(mktemp --suffix=.safetensors)
trap 'rm -f "$weights"' EXIT
"$bin" init-weights --preset "$preset" --seed 0 --dtype f32 --out "$weights" >/dev/null
echo "== $work: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $threads threads, load $(cut -d' ' -f1-3 /proc/loadavg)"
"$py" benches/peer/model.py --device cpu --threads "$threads" --preset "$preset" \
    --weights "$weights" --prompt "$prompt" --temperature 1 --seed 0 --mode both \
    --repeat "$repeat" --budget-s "$budget" "${args[@]}" --json "$out-peer.json"
echo "== crate (load $(cut -d' ' -f1-3 /proc/loadavg))"
RAYON_NUM_THREADS=$threads "$bin" bench --device cpu --preset "$preset" --weights "$weights" \
    --prompt "$prompt" --temperature 1 --seed 0 --repeat "$repeat" "${args[@]}" \
    --peer-json "$out-peer.json" --json "$out.json"
echo "== done (load $(cut -d' ' -f1-3 /proc/loadavg))"
