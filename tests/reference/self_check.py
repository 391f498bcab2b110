#!/usr/bin/env python3
"""Self-check of reference.py on a random `tiny` model (SPEC §2.1 preset).

Checks invariants that a wrong implementation would break, each paired with a sensitivity check
so that it cannot pass vacuously (e.g. attention that only ever sees the query row itself would
satisfy every "unchanged" invariant). Exits 1 on the first failure, 0 when all pass.

    python3 tests/reference/self_check.py
"""

import json
import math
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import reference as ref  # noqa: E402

TINY = {
    "d_text": 64,
    "d_image": 32,
    "n_heads": 4,
    "n_kv_heads": 4,
    "head_dim": 16,
    "mlp_text": 128,
    "mlp_image": 64,
    "n_layers": 4,
    "n_joint_layers": 2,
    "rope_theta": 10000.0,
    "norm_eps": 1e-5,
    "text_vocab": 300,
    "text_mask_id": 299,
    "image_vocab": 64,
    "n_registers": 8,
}

# Float64 throughout: invariants hold to rounding, far below any real effect (sensitivity
# checks demand a change larger than CHANGED).
SAME = 1e-9
CHANGED = 1e-4

failures = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail and not ok else ''}")
    if not ok:
        failures.append(name)


def rel_diff(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def check_same(name, a, b):
    d = rel_diff(a, b)
    check(name, a.shape == b.shape and d < SAME, f"relative difference {d:.3e}")


def check_changed(name, a, b):
    d = rel_diff(a, b)
    check(name, d > CHANGED, f"relative difference only {d:.3e}")


def random_weights(cfg, rng):
    """Random weights with SPEC §2.2 names and shapes. Matrices ~ N(0, 1/in) so activations stay
    O(1); q/k are scaled up so attention is far from uniform; norms are 1 + noise, not ones."""
    w = {}
    for name, shape in ref.expected_shapes(cfg).items():
        if len(shape) == 1:
            w[name] = 1.0 + 0.3 * rng.standard_normal(shape)
        elif name.endswith(".embed"):
            w[name] = rng.standard_normal(shape)
        else:
            scale = 1.0 / np.sqrt(shape[1])
            if name.endswith(".q") or name.endswith(".k"):
                scale *= 3.0
            w[name] = scale * rng.standard_normal(shape)
    return w


def row(branch, tok, pos, block, masked):
    return {"branch": branch, "id": tok, "pos": pos, "block": block, "masked": masked}


def fwd(cfg, w, rows, logits_for):
    return ref.forward(cfg, w, rows, logits_for)


# ----------------------------------------------------------------------------------------------
# Unit checks of the building blocks against hand-worked values


def check_rope_hand_example():
    # head_dim 4, theta 10000, pos 1: angles are 1 and 10000^(-1/2) = 0.01; pairs (0,2), (1,3).
    x = np.array([[1.0, 2.0, 3.0, 4.0]])
    got = ref.rope(x, 1, 10000.0)[0]
    c0, s0, c1, s1 = np.cos(1.0), np.sin(1.0), np.cos(0.01), np.sin(0.01)
    want = np.array([1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 1 * s0 + 3 * c0, 2 * s1 + 4 * c1])
    check("rope matches hand-worked rotation (pairs i, i+head_dim/2)", np.allclose(got, want,
          rtol=0, atol=1e-15), f"got {got}, want {want}")
    check("rope at position 0 is the identity", np.array_equal(ref.rope(x, 0, 10000.0), x))


def check_masked_softmax():
    rng = np.random.default_rng(1)
    s = rng.standard_normal((3, 5))
    vis = np.array([[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=bool)
    p = ref.masked_softmax(s, vis)
    full = np.exp(s[0]) / np.exp(s[0]).sum()
    part = np.exp(s[1, [0, 2]]) / np.exp(s[1, [0, 2]]).sum()
    check("masked softmax: all-visible row is the plain softmax", np.allclose(p[0], full))
    check("masked softmax: hidden keys get 0, visible ones renormalise",
          np.allclose(p[1], [part[0], 0, part[1], 0, 0]))
    check("masked softmax: row with no visible key is zeros, not NaN",
          np.array_equal(p[2], np.zeros(5)))
    big = ref.masked_softmax(np.array([[1000.0, 999.0]]), np.ones((1, 2), dtype=bool))
    check("masked softmax is stable for large scores", np.all(np.isfinite(big)))


def check_visibility_rule():
    rows = [
        row("text", 1, 0, 0, False),  # 0 prompt
        row("image", 2, 1, 1, False),  # 1 clean block 1
        row("image", 3, 2, 2, False),  # 2 clean block 2
        row("image", 64, 3, 3, True),  # 3 masked block 3
        row("image", "reg", 4, 3, True),  # 4 register of block 3
        row("image", 64, 5, 4, True),  # 5 another masked block
        row("image", 64, 6, 1, True),  # 6 masked block numbered like clean block 1
    ]
    want_joint = np.array(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0, 1, 0],
            [1, 1, 1, 0, 0, 0, 1],
        ],
        dtype=bool,
    )
    want_split = want_joint.copy()
    want_split[1:, 0] = False  # image queries lose the text key in non-joint layers
    check("visibility matrix, joint layer", np.array_equal(ref.visibility(rows, True), want_joint))
    check("visibility matrix, branch-only layer",
          np.array_equal(ref.visibility(rows, False), want_split))


# ----------------------------------------------------------------------------------------------
# Written-out oracle: the same graph as scalar loops, with visibility phrased as in SPEC §1
# ("a clean query in block b sees clean keys in blocks <= b; a masked-block query sees every
# clean key plus the keys of its own masked block"), sharing no code with reference.py.


def loop_oracle(cfg, w, rows, asked):
    eps, theta = cfg["norm_eps"], cfg["rope_theta"]
    n_heads, n_kv, hd = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]
    half = hd // 2

    def norm(x, g):
        return g * x / math.sqrt(sum(float(v) * float(v) for v in x) / len(x) + eps)

    def matvec(m, x):
        return np.array([float(np.dot(m[r], x)) for r in range(m.shape[0])])

    def rotate(vec, pos):
        out = vec.copy()
        for head in range(len(vec) // hd):
            base = head * hd
            for i in range(half):
                ang = pos / theta ** (2 * i / hd)
                a, b = vec[base + i], vec[base + i + half]
                out[base + i] = a * math.cos(ang) - b * math.sin(ang)
                out[base + i + half] = a * math.sin(ang) + b * math.cos(ang)
        return out

    def sees(q, k, joint):
        if not joint and q["branch"] != k["branch"]:
            return False
        if q["masked"]:
            return not k["masked"] or k["block"] == q["block"]
        return not k["masked"] and k["block"] <= q["block"]

    xs = [w[f"{r['branch']}.register"] if r["id"] == "reg" else w[f"{r['branch']}.embed"][r["id"]]
          for r in rows]
    for layer in range(cfg["n_layers"]):
        joint = layer < cfg["n_joint_layers"]
        qs, ks, vs = [], [], []
        for r, x in zip(rows, xs):
            p = f"layers.{layer}.{r['branch']}."
            h = norm(x, w[p + "attn_norm"])
            qs.append(rotate(matvec(w[p + "q"], h), r["pos"]))
            ks.append(rotate(matvec(w[p + "k"], h), r["pos"]))
            vs.append(matvec(w[p + "v"], h))
        new_xs = []
        for qi, (r, x) in enumerate(zip(rows, xs)):
            attn = np.zeros(n_heads * hd)
            for head in range(n_heads):
                kvh = head // (n_heads // n_kv)
                qv = qs[qi][head * hd : (head + 1) * hd]
                keys = [ki for ki in range(len(rows)) if sees(r, rows[ki], joint)]
                scores = [float(np.dot(qv, ks[ki][kvh * hd : (kvh + 1) * hd])) / math.sqrt(hd)
                          for ki in keys]
                top = max(scores)
                e = [math.exp(s - top) for s in scores]
                for ki, ev in zip(keys, e):
                    attn[head * hd : (head + 1) * hd] += ev / sum(e) * vs[ki][kvh * hd :
                                                                            (kvh + 1) * hd]
            p = f"layers.{layer}.{r['branch']}."
            x = x + matvec(w[p + "o"], attn)
            h = norm(x, w[p + "ffn_norm"])
            g, u = matvec(w[p + "gate"], h), matvec(w[p + "up"], h)
            x = x + matvec(w[p + "down"], np.array([gv / (1 + math.exp(-gv)) * uv
                                                    for gv, uv in zip(g, u)]))
            new_xs.append(x)
        xs = new_xs
    b = rows[asked[0]]["branch"]
    return np.array([matvec(w[f"{b}.head"], norm(xs[i], w[f"{b}.final_norm"])) for i in asked])


def check_against_loops(cfg, w, rng):
    for branch, tok in (("text", 123), ("image", 17), ("image", 64)):
        rows = [row(branch, tok, 5, 0, False)]
        check_same(f"single {branch} row (id {tok}) equals the loop oracle",
                   fwd(cfg, w, rows, [0]), loop_oracle(cfg, w, rows, [0]))
    rows = t2i_case(rng) + [row("image", 64, 10, 4, True), row("image", "reg", 20, 4, True),
                            row("image", 64, 11, 1, True)]
    for asked in ([9, 10, 11, 14], [4, 6, 8], [0, 3]):
        check_same(f"mixed sequence, rows {asked}, equals the loop oracle",
                   fwd(cfg, w, rows, asked), loop_oracle(cfg, w, rows, asked))
    gqa = dict(cfg, n_kv_heads=2)
    wg = {k: (v[: 2 * cfg["head_dim"]] if k.endswith((".k", ".v")) else v) for k, v in w.items()}
    check_same("GQA model equals the loop oracle", fwd(gqa, wg, rows, [9, 10]),
               loop_oracle(gqa, wg, rows, [9, 10]))


# ----------------------------------------------------------------------------------------------
# Invariants (with sensitivity counterparts)


def check_permutation(cfg, w, rng):
    n = 7
    rows = [row("text", int(rng.integers(0, 300)), int(rng.integers(0, 50)), 0, False)
            for _ in range(n)]
    base = fwd(cfg, w, rows, list(range(n)))
    perm = rng.permutation(n)
    permuted = fwd(cfg, w, [rows[i] for i in perm], list(range(n)))
    check_same("(1) permuting clean block-0 rows permutes their logits", permuted, base[perm])
    # The same for the image branch, asking for logits in a scrambled order.
    rows = [row("image", int(rng.integers(0, 65)), int(rng.integers(0, 50)), 0, False)
            for _ in range(n)]
    base = fwd(cfg, w, rows, list(range(n)))
    order = [int(i) for i in rng.permutation(n)]
    check_same("(1) logits_for order is respected", fwd(cfg, w, rows, order), base[order])


def t2i_case(rng, masked_block=3, reg_pos=20):
    """Text prompt (block 0), two clean image groups (blocks 1, 2), one masked block with masks
    and registers. Returns rows and the index lists of each group."""
    rows = [row("text", int(rng.integers(0, 299)), p, 0, False) for p in range(4)]
    rows += [row("image", int(rng.integers(0, 64)), p, 1, False) for p in (4, 5)]
    rows += [row("image", int(rng.integers(0, 64)), p, 2, False) for p in (6, 7, 8)]
    masks = [row("image", 64, p, masked_block, True) for p in (9, 12)]
    regs = [row("image", "reg", reg_pos + r, masked_block, True) for r in range(3)]
    rows += masks + regs
    return rows


def check_masked_blocks(cfg, w, rng):
    rows = t2i_case(rng)
    asked = [9, 10]  # the two masks of block 3
    base = fwd(cfg, w, rows, asked)

    other = [row("image", 64, 10, 4, True), row("image", 64, 11, 4, True),
             row("image", "reg", 20, 4, True), row("image", "reg", 21, 4, True)]
    check_same("(2) a masked block ignores another masked block", fwd(cfg, w, rows + other, asked),
               base)
    check_same("(2) ... also when the other block comes first",
               fwd(cfg, w, other + rows, [i + len(other) for i in asked]), base)

    changed = [dict(r) for r in rows]
    changed[11] = row("image", "reg", 30, 3, True)  # move one register of the same block
    check_changed("(2') a masked row sees the rows of its own masked block",
                  fwd(cfg, w, changed, asked), base)
    changed = [dict(r) for r in rows]
    changed[1]["id"] = (changed[1]["id"] + 1) % 299  # a prompt token
    check_changed("(2') a masked row sees the prompt", fwd(cfg, w, changed, asked), base)
    changed = [dict(r) for r in rows]
    changed[7]["id"] = (changed[7]["id"] + 1) % 64  # a clean block-2 token
    check_changed("(2') a masked row sees the latest clean block", fwd(cfg, w, changed, asked),
                  base)


def check_clean_rows(cfg, w, rng):
    rows = t2i_case(rng)
    clean = list(range(4, 9))  # image rows of clean blocks 1 and 2
    base = fwd(cfg, w, rows, clean)
    only_clean = rows[:9]
    check_same("(3) clean rows ignore masked rows and registers", fwd(cfg, w, only_clean, clean),
               base)
    # Masked blocks numbered at or below the clean blocks must stay hidden from them too.
    low = [row("image", 64, 13, 1, True), row("image", "reg", 22, 1, True),
           row("image", 64, 14, 2, True), row("text", 299, 15, 0, True)]
    check_same("(3) clean rows ignore masked blocks numbered <= their own",
               fwd(cfg, w, rows + low, clean), base)

    changed = [dict(r) for r in rows]
    changed[6]["id"] = (changed[6]["id"] + 1) % 64  # first token of clean block 2
    got = fwd(cfg, w, changed, clean)
    check_same("(3) block-1 rows ignore a later clean block", got[:2], base[:2])
    check_changed("(3') block-2 rows see their own block", got[2:], base[2:])
    changed = [dict(r) for r in rows]
    changed[4]["id"] = (changed[4]["id"] + 1) % 64  # first token of clean block 1
    check_changed("(3') block-2 rows see an earlier clean block",
                  fwd(cfg, w, changed, clean)[2:], base[2:])


def check_rope_shift(cfg, w, rng):
    rows = t2i_case(rng)
    asked = [9, 10, 11]
    base = fwd(cfg, w, rows, asked)
    shifted = [dict(r, pos=r["pos"] + 1000) for r in rows]
    check_same("(4) shifting every position by a constant leaves logits unchanged",
               fwd(cfg, w, shifted, asked), base)
    moved = [dict(r) for r in rows]
    moved[2]["pos"] += 3  # one prompt token moves relative to the others
    check_changed("(4') moving one row's position changes the others' logits",
                  fwd(cfg, w, moved, asked), base)


def check_branch_split(cfg, w, rng):
    rows = t2i_case(rng)
    asked = [9, 10]
    base = fwd(cfg, w, rows, asked)
    joint = cfg["n_joint_layers"]
    late = dict(w)
    for i in range(joint, cfg["n_layers"]):
        for name in ref.LAYER_TENSORS:
            key = f"layers.{i}.text.{name}"
            late[key] = w[key] + rng.standard_normal(w[key].shape)
    check_same("text weights of non-joint layers cannot reach image logits",
               fwd(cfg, late, rows, asked), base)
    early = dict(w)
    key = f"layers.{joint - 1}.text.v"
    early[key] = w[key] + rng.standard_normal(w[key].shape)
    check_changed("text weights of the last joint layer do reach image logits",
                  fwd(cfg, early, rows, asked), base)

    no_joint = dict(cfg, n_joint_layers=0)
    image_only = [r for r in rows if r["branch"] == "image"]
    check_same("with no joint layer, image logits ignore the text rows",
               fwd(no_joint, w, rows, asked),
               fwd(no_joint, w, image_only, [i - 4 for i in asked]))


def check_gqa(cfg, w, rng):
    """A 2-KV-head model equals the 4-head model whose K/V heads duplicate it as (0,0,1,1): query
    head h reads KV head h // 2 (not h % 2)."""
    gqa = dict(cfg, n_kv_heads=2)
    hd = cfg["head_dim"]
    wg, wf = dict(w), dict(w)
    for i in range(cfg["n_layers"]):
        for b in ref.BRANCHES:
            for t in ("k", "v"):
                key = f"layers.{i}.{b}.{t}"
                small = w[key][: 2 * hd]
                wg[key] = small
                wf[key] = np.concatenate([small[:hd], small[:hd], small[hd:], small[hd:]])
    rows = t2i_case(rng)
    asked = [9, 10, 11]
    check_same("GQA: query head h reads KV head h // (n_heads / n_kv_heads)",
               fwd(gqa, wg, rows, asked), fwd(cfg, wf, rows, asked))
    swapped = dict(wf)
    for i in range(cfg["n_layers"]):
        for b in ref.BRANCHES:
            for t in ("k", "v"):
                key = f"layers.{i}.{b}.{t}"
                small = wg[key]
                swapped[key] = np.concatenate([small[:hd], small[hd:], small[:hd], small[hd:]])
    check_changed("GQA: the h % n_kv_heads mapping would differ",
                  fwd(cfg, swapped, rows, asked), fwd(gqa, wg, rows, asked))


# ----------------------------------------------------------------------------------------------
# CLI: file formats and errors


def write_bf16(path, tensors):
    """Writes a safetensors file of bf16 tensors by hand (safetensors.numpy cannot)."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        bits = np.ascontiguousarray(tensors[name], dtype=np.float32).view(np.uint32)
        data = (bits >> 16).astype("<u2").tobytes()  # values are already bf16-exact
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def to_bf16_exact(x):
    """Rounds float64 to the nearest bf16 value (ties to even), returned as float32."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def run_cli(tmp, cfg, weights_path, case, tag):
    cfg_path = os.path.join(tmp, f"{tag}.config.json")
    case_path = os.path.join(tmp, f"{tag}.case.json")
    out_path = os.path.join(tmp, f"{tag}.out.safetensors")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with open(case_path, "w") as f:
        json.dump(case, f)
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "reference.py"), "--config", cfg_path,
         "--weights", weights_path, "--case", case_path, "--out", out_path],
        capture_output=True, text=True,
    )
    logits = load_file(out_path)["logits"] if proc.returncode == 0 else None
    return proc, logits


def check_cli(cfg, w, rng, tmp):
    w32 = {k: v.astype(np.float32) for k, v in w.items()}
    f32_path = os.path.join(tmp, "w32.safetensors")
    save_file(w32, f32_path)
    rows = t2i_case(rng)
    case = {"rows": rows, "logits_for": [10, 9, 11]}
    proc, logits = run_cli(tmp, cfg, f32_path, case, "f32")
    check("CLI runs on f32 weights", proc.returncode == 0, proc.stderr)
    if logits is not None:
        want = fwd(cfg, {k: v.astype(np.float64) for k, v in w32.items()}, rows, [10, 9, 11])
        check("CLI output is float32 [len(logits_for), image_vocab]",
              logits.dtype == np.float32 and logits.shape == (3, cfg["image_vocab"]))
        check("CLI output equals the in-process forward (f32 rounding)",
              rel_diff(logits.astype(np.float64), want) < 1e-6)

    wb = {k: to_bf16_exact(v) for k, v in w.items()}
    bf_path = os.path.join(tmp, "wbf16.safetensors")
    write_bf16(bf_path, wb)
    f32_of_bf_path = os.path.join(tmp, "wbf16_as_f32.safetensors")
    save_file(wb, f32_of_bf_path)
    proc_b, lb = run_cli(tmp, cfg, bf_path, case, "bf16")
    proc_f, lf = run_cli(tmp, cfg, f32_of_bf_path, case, "bf16f32")
    check("CLI runs on bf16 weights", proc_b.returncode == 0, proc_b.stderr)
    check("bf16 weights load to the same values as their f32 copy",
          lb is not None and lf is not None and np.array_equal(lb, lf))

    w16 = {k: v.astype(np.float16) for k, v in w.items()}
    f16_path = os.path.join(tmp, "w16.safetensors")
    save_file(w16, f16_path)
    f16_as_f32_path = os.path.join(tmp, "w16_as_f32.safetensors")
    save_file({k: v.astype(np.float32) for k, v in w16.items()}, f16_as_f32_path)
    _, lh = run_cli(tmp, cfg, f16_path, case, "f16")
    _, lhf = run_cli(tmp, cfg, f16_as_f32_path, case, "f16f32")
    check("f16 weights load to the same values as their f32 copy",
          lh is not None and lhf is not None and np.array_equal(lh, lhf))

    text_rows = [row("text", 5, 0, 0, False), row("text", 299, 1, 1, True)]
    bad_cases = {
        "unknown branch": {"rows": [row("audio", 1, 0, 0, False)], "logits_for": [0]},
        "text id out of range": {"rows": [row("text", 300, 0, 0, False)], "logits_for": [0]},
        "image id out of range": {"rows": [row("image", 65, 0, 0, False)], "logits_for": [0]},
        "negative id": {"rows": [row("text", -1, 0, 0, False)], "logits_for": [0]},
        "logits_for out of range": {"rows": text_rows, "logits_for": [2]},
        "empty logits_for": {"rows": text_rows, "logits_for": []},
        "mixed branches in logits_for": {
            "rows": text_rows + [row("image", 64, 2, 1, True)], "logits_for": [1, 2]},
        "masked not a bool": {"rows": [row("text", 1, 0, 0, 1)], "logits_for": [0]},
        "missing field": {"rows": [{"branch": "text", "id": 1, "pos": 0, "block": 0}],
                          "logits_for": [0]},
    }
    for name, bad in bad_cases.items():
        proc, _ = run_cli(tmp, cfg, f32_path, bad, "bad")
        check(f"CLI rejects {name} with exit 2", proc.returncode == 2 and "error" in proc.stderr,
              f"rc {proc.returncode}, stderr {proc.stderr.strip()!r}")
    proc, _ = run_cli(tmp, cfg, f32_path,
                      {"rows": [row("image", 64, 0, 0, True)], "logits_for": [0]}, "mask")
    check("CLI accepts the image [MASK] id image_vocab", proc.returncode == 0, proc.stderr)

    broken = dict(w32)
    del broken["layers.3.image.up"]
    broken_path = os.path.join(tmp, "broken.safetensors")
    save_file(broken, broken_path)
    proc, _ = run_cli(tmp, cfg, broken_path, case, "broken")
    check("CLI rejects a missing tensor, naming it",
          proc.returncode == 2 and "layers.3.image.up" in proc.stderr, proc.stderr)
    broken = dict(w32)
    broken["text.head"] = broken["text.head"][:-1]
    save_file(broken, broken_path)
    proc, _ = run_cli(tmp, cfg, broken_path, case, "broken")
    check("CLI rejects a mis-shaped tensor, naming it",
          proc.returncode == 2 and "text.head" in proc.stderr, proc.stderr)
    proc, _ = run_cli(tmp, dict(cfg, n_kv_heads=3), f32_path, case, "badcfg")
    check("CLI rejects a bad config", proc.returncode == 2 and "n_kv_heads" in proc.stderr,
          proc.stderr)


def main():
    rng = np.random.default_rng(20260501)
    cfg = ref.parse_config(TINY)
    w = random_weights(cfg, rng)
    check_rope_hand_example()
    check_masked_softmax()
    check_visibility_rule()
    check_against_loops(cfg, w, rng)
    check_permutation(cfg, w, rng)
    check_masked_blocks(cfg, w, rng)
    check_clean_rows(cfg, w, rng)
    check_rope_shift(cfg, w, rng)
    check_branch_split(cfg, w, rng)
    check_gqa(cfg, w, rng)
    with tempfile.TemporaryDirectory() as tmp:
        check_cli(TINY, w, rng, tmp)
    if failures:
        print(f"{len(failures)} check(s) failed")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
