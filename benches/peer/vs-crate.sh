#!/usr/bin/env bash
# The peer (benches/peer/model.py) against the crate, on the CPU:
#  1. --check-logits on random `forward` cases (tiny, tiny with GQA, tiny64, small): rel L2 <= 1e-4
#     in f32, and in bf16 within SPEC §6's bound (max(1e-2, 2 x the naive bf16 twin's error));
#  2. generations, dense and sparse, t2i (stratified/random/raster orders, CFG) and text, at
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

# A random case over the config's vocabularies: clean blocks 0..3, masked blocks, registers,
# both branches, shuffled positions; logits for some non-register rows of one branch.
make_case() { # make_case CONFIG SEED OUT
    "$py" - "$1" "$2" "$3" <<'EOF'
import json, random, sys
cfg = json.load(open(sys.argv[1])); rng = random.Random(int(sys.argv[2]))
rows = []
n = rng.randint(12, 40)
for i in range(n):
    branch = rng.choice(["text", "image"])
    masked = rng.random() < 0.4
    reg = masked and rng.random() < 0.3
    rows_b = cfg["text_vocab"] if branch == "text" else cfg["image_vocab"] + 1
    rows.append({"branch": branch, "id": "reg" if reg else rng.randrange(rows_b),
                 "pos": rng.randrange(0, 3 * n), "masked": masked,
                 "block": rng.randint(5, 6) if masked else rng.randint(0, 3)})
lb = rng.choice(["text", "image"])
cands = [i for i, r in enumerate(rows) if r["branch"] == lb and r["id"] != "reg"]
rng.shuffle(cands)
json.dump({"rows": rows, "logits_for": cands[: max(1, len(cands) // 2)]}, open(sys.argv[3], "w"))
EOF
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
        make_case "$d/config.json" $((seed + 100 * i)) "$d/case.json"
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
