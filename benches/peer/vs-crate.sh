#!/usr/bin/env bash
# The peer (benches/peer/model.py) against the crate, on the CPU:
#  1. --check-logits on random `forward` cases (tiny, tiny with GQA, tiny64, small): rel L2 <= 1e-4
#     in f32, and in bf16 within SPEC §6's bound (max(1e-2, 2 x the naive bf16 twin's error));
#  2. the crate's CUDA random weights: `init-weights --like-device` (tiny, small) against the peer's
#     --weights-device-seed bit for bit, and --check-logits on them with no weights file;
#  3. generations, dense and sparse, t2i (stratified/random/raster orders, CFG) and text, at
#     temperature 0 and 1: the same decoded positions as the crate's `generate --trace` (tokens
#     are reported; at τ = 0 they match unless two logits are within float rounding).
# Usage: benches/peer/vs-crate.sh [PYTHON]   (PYTHON: one with torch; default python3)
# Needs target/release/sparse-lavida (cargo build --release; SL_NO_CUDA=1 is fine).
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${1:-python3}
bin=${CARGO_TARGET_DIR:-target}/release/sparse-lavida
[ -x "$bin" ] || { echo "build the crate first: cargo build --release" >&2; exit 1; }
peer=benches/peer/model.py
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0

# A random case over the config's vocabularies (model.py's random_case: clean blocks 0..3,
# masked blocks, registers, both branches, shuffled positions; logits for some non-register rows
# of one branch). Rewrites DIR/config.json from itself.
make_case() { # make_case DIR SEED [ROWS]
    "$py" "$peer" --make-case "$1" --config "$1/config.json" --seed "$2" \
        ${3:+--case-rows "$3"} >/dev/null
}

preset_json() { # preset_json NAME [KEY=VALUE...] > file
    "$py" - "$@" <<'EOF'
import json, sys
sys.path.insert(0, "benches/peer")
import model
cfg = dict(model.PRESETS[sys.argv[1]])
for kv in sys.argv[2:]:
    k, v = kv.split("=")
    cfg[k] = type(cfg[k])(float(v)) if isinstance(cfg[k], float) else int(v)
print(json.dumps(cfg))
EOF
}

echo "== check-logits (f32, CPU)"
i=0
for spec in "tiny" "tiny n_kv_heads=2" "tiny64" "small"; do
    for seed in 1 2 3; do
        i=$((i + 1))
        d=$tmp/case$i
        mkdir -p "$d"
        preset_json $spec >"$d/config.json"
        "$bin" init-weights --config "$d/config.json" --seed $((seed + 10)) --dtype f32 \
            --out "$d/weights.safetensors" >/dev/null
        make_case "$d" $((seed + 100 * i))
        "$bin" forward --config "$d/config.json" --weights "$d/weights.safetensors" \
            --device cpu --case "$d/case.json" --out "$d/logits.safetensors" >/dev/null
        echo -n "[$spec, seed $seed] "
        "$py" "$peer" --check-logits "$d" --device cpu || fail=1
        echo -n "[$spec, seed $seed] "
        "$py" "$peer" --check-logits "$d" --device cpu --dtype bf16 || fail=1
    done
done
# A bf16 weights file is read (and converted) as the crate reads it.
d=$tmp/case1
"$bin" init-weights --preset tiny --seed 11 --dtype bf16 --out "$d/weights.safetensors" >/dev/null
"$bin" forward --config "$d/config.json" --weights "$d/weights.safetensors" --device cpu \
    --case "$d/case.json" --out "$d/logits.safetensors" >/dev/null
echo -n "[tiny, bf16 file] "
"$py" "$peer" --check-logits "$d" --device cpu || fail=1

echo "== the crate's CUDA random weights (--weights-device-seed), made on the CPU"
# `init-weights --like-device` is the crate's host twin of Model::random_on_device (equal bit for
# bit on a GPU: tests/gpu_backend.rs); the peer must make the same bf16 values from the seed.
for p in tiny small; do
    "$bin" init-weights --preset $p --like-device --seed 7 \
        --out "$tmp/dev-$p.safetensors" >/dev/null
    echo -n "[$p, seed 7] "
    "$py" "$peer" --preset $p --device cpu --weights-device-seed 7 \
        --check-device-weights "$tmp/dev-$p.safetensors" || fail=1
done
# The logits check with no weights file in CASE_DIR (as scripts/gpu-check runs it on CUDA).
d=$tmp/devcase
mkdir -p "$d"
preset_json tiny64 >"$d/config.json"
make_case "$d" 77 120
s=$((2 ** 32 + 9)) # a seed with both key words set
"$bin" init-weights --config "$d/config.json" --like-device --seed $s \
    --out "$tmp/dev-w.safetensors" >/dev/null
"$bin" forward --config "$d/config.json" --weights "$tmp/dev-w.safetensors" --device cpu \
    --case "$d/case.json" --out "$d/logits.safetensors" >/dev/null
for dt in f32 bf16; do
    echo -n "[tiny64, 120 rows, device seed $s] "
    "$py" "$peer" --check-logits "$d" --device cpu --dtype $dt --weights-device-seed $s || fail=1
done

echo "== generate vs the crate's trace (f32, CPU)"
w=$tmp/w.safetensors
"$bin" init-weights --preset small --seed 5 --dtype f32 --out "$w" >/dev/null
prompt=$("$py" -c "import random; r=random.Random(9); print(','.join(str(r.randrange(2047)) for _ in range(24)))")
gen() { # gen LABEL ARGS... : crate trace, then the peer compared with it
    local label=$1; shift
    "$bin" generate --preset small --weights "$w" --device cpu --prompt "$prompt" "$@" \
        --trace "$tmp/crate.json" >/dev/null
    echo -n "[$label] "
    "$py" "$peer" --generate --preset small --weights "$w" --device cpu --prompt "$prompt" "$@" \
        --compare-trace "$tmp/crate.json" | tail -1 || fail=1
}
for mode in dense sparse; do
    for tau in 0 1; do
        gen "t2i 16x16 stratified $mode τ=$tau" --task t2i --grid 16x16 --steps 16 \
            --mode $mode --temperature $tau --seed 3
        gen "text 64/16 $mode τ=$tau" --task text --answer-len 64 --block 16 --steps 32 \
            --mode $mode --temperature $tau --seed 4
    done
    gen "t2i 12x20 random g=0 $mode τ=1" --task t2i --grid 12x20 --steps 10 --order random \
        --guidance 0 --mode $mode --temperature 1 --seed 6
    gen "t2i 8x8 raster $mode τ=0" --task t2i --grid 8x8 --steps 8 --order raster \
        --mode $mode --temperature 0 --seed 7
done
[ $fail -eq 0 ] && echo "all checks passed" || echo "SOME CHECKS FAILED"
exit $fail
