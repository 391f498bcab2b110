#!/usr/bin/env python3
"""Independent float64 reference for the sparse-lavida forward graph (SPEC §2.3) and
visibility rule (SPEC §3).

Written from the contract (docs/SPEC.md) only, without reading the Rust implementation, so that a
Rust test can compare against it as an oracle. It is deliberately plain: every row of every
branch is computed in every layer, attention builds the full T x T visibility matrix, and all
arithmetic is float64.

Usage:
    python3 reference.py --config CONFIG.json --weights W.safetensors \
        --case CASE.json --out OUT.safetensors

CASE.json:
    {"rows": [{"branch": "text"|"image", "id": INT|"reg", "pos": INT, "block": INT,
               "masked": BOOL}, ...],
     "logits_for": [row indices, all in one branch]}

OUT.safetensors holds one float32 tensor "logits" of shape
[len(logits_for), vocab of that branch], rows in logits_for order.

Invalid inputs (config, weights or case) print one line naming the problem and exit with 2.
"""

import argparse
import json
import struct
import sys

import numpy as np

BRANCHES = ("text", "image")
REGISTER = "reg"

CONFIG_INT_FIELDS = (
    "d_text",
    "d_image",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "mlp_text",
    "mlp_image",
    "n_layers",
    "n_joint_layers",
    "text_vocab",
    "text_mask_id",
    "image_vocab",
    "n_registers",
)
CONFIG_FLOAT_FIELDS = ("rope_theta", "norm_eps")
LAYER_TENSORS = ("attn_norm", "q", "k", "v", "o", "ffn_norm", "gate", "up", "down")


class InputError(Exception):
    """A bad config, weights file or case; main() reports it and exits with status 2."""


def is_int(v):
    # JSON true/false parse to Python bool, which is a subclass of int: reject it explicitly.
    return isinstance(v, int) and not isinstance(v, bool)


# ----------------------------------------------------------------------------------------------
# Config (SPEC §2.1)


def parse_config(obj):
    """Validates a config object and returns it as a plain dict (ints and floats)."""
    if not isinstance(obj, dict):
        raise InputError("config: expected a JSON object")
    known = set(CONFIG_INT_FIELDS) | set(CONFIG_FLOAT_FIELDS)
    missing = sorted(known - set(obj))
    if missing:
        raise InputError(f"config: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(obj) - known)
    if unknown:
        raise InputError(f"config: unknown field(s) {', '.join(unknown)}")
    cfg = {}
    for name in CONFIG_INT_FIELDS:
        v = obj[name]
        if not is_int(v) or v < 0:
            raise InputError(f"config: `{name}` must be a non-negative integer, got {v!r}")
        cfg[name] = v
    for name in CONFIG_FLOAT_FIELDS:
        v = obj[name]
        if not (is_int(v) or isinstance(v, float)) or not np.isfinite(v) or v <= 0:
            raise InputError(f"config: `{name}` must be a positive finite number, got {v!r}")
        cfg[name] = float(v)
    for name in ("d_text", "d_image", "n_heads", "n_kv_heads", "head_dim", "mlp_text",
                 "mlp_image", "n_layers", "text_vocab", "image_vocab"):
        if cfg[name] == 0:
            raise InputError(f"config: `{name}` must be positive")
    if cfg["n_heads"] % cfg["n_kv_heads"] != 0:
        raise InputError(
            f"config: n_heads ({cfg['n_heads']}) must be a multiple of "
            f"n_kv_heads ({cfg['n_kv_heads']})"
        )
    if cfg["head_dim"] % 2 != 0:
        raise InputError(f"config: head_dim ({cfg['head_dim']}) must be even")
    if cfg["n_joint_layers"] > cfg["n_layers"]:
        raise InputError("config: n_joint_layers exceeds n_layers")
    if cfg["text_mask_id"] >= cfg["text_vocab"]:
        raise InputError("config: text_mask_id must be < text_vocab")
    return cfg


def width(cfg, branch):
    return cfg["d_text"] if branch == "text" else cfg["d_image"]


def mlp_width(cfg, branch):
    return cfg["mlp_text"] if branch == "text" else cfg["mlp_image"]


def embed_rows(cfg, branch):
    # The image table has one extra row: its [MASK] is id image_vocab.
    return cfg["text_vocab"] if branch == "text" else cfg["image_vocab"] + 1


def vocab(cfg, branch):
    return cfg["text_vocab"] if branch == "text" else cfg["image_vocab"]


def expected_shapes(cfg):
    """Name -> shape of every tensor SPEC §2.2 requires."""
    a = cfg["n_heads"] * cfg["head_dim"]
    kv = cfg["n_kv_heads"] * cfg["head_dim"]
    shapes = {}
    for b in BRANCHES:
        d, f = width(cfg, b), mlp_width(cfg, b)
        shapes[f"{b}.embed"] = (embed_rows(cfg, b), d)
        shapes[f"{b}.register"] = (d,)
        shapes[f"{b}.final_norm"] = (d,)
        shapes[f"{b}.head"] = (vocab(cfg, b), d)
        for i in range(cfg["n_layers"]):
            p = f"layers.{i}.{b}."
            shapes[p + "attn_norm"] = (d,)
            shapes[p + "q"] = (a, d)
            shapes[p + "k"] = (kv, d)
            shapes[p + "v"] = (kv, d)
            shapes[p + "o"] = (d, a)
            shapes[p + "ffn_norm"] = (d,)
            shapes[p + "gate"] = (f, d)
            shapes[p + "up"] = (f, d)
            shapes[p + "down"] = (d, f)
    return shapes


# ----------------------------------------------------------------------------------------------
# Weights (SPEC §2.2)

def read_bf16_safetensors(path):
    """Parses a safetensors file that holds bf16 tensors, which safetensors.numpy refuses
    (numpy has no bfloat16): an 8-byte little-endian header length, a JSON header, then the raw
    bytes. A bf16 value is the top half of the float32 with the same bits, so `uint16 << 16`
    viewed as float32 is exact."""
    raw_dtypes = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
    with open(path, "rb") as f:
        blob = f.read()
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len])
    data = blob[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in raw_dtypes:
            raise InputError(f"weights: tensor `{name}` has unsupported dtype {info['dtype']}")
        shape = tuple(info["shape"])
        start, end = info["data_offsets"]
        raw = np.frombuffer(data[start:end], dtype=raw_dtypes[info["dtype"]])
        if raw.size != int(np.prod(shape, dtype=np.int64)):
            raise InputError(f"weights: tensor `{name}`: byte size does not match shape {shape}")
        if info["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = raw.reshape(shape)
    return tensors


def read_safetensors(path):
    """Reads every tensor of a safetensors file (f32, f16, bf16 or f64) as float64."""
    from safetensors.numpy import load_file

    try:
        try:
            tensors = load_file(path)
        except TypeError:
            # "data type 'bfloat16' not understood": fall back to the plain parser.
            tensors = read_bf16_safetensors(path)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad weights file
        raise InputError(f"weights: cannot read {path}: {e}") from e
    out = {}
    for name, t in tensors.items():
        if t.dtype.kind != "f":
            raise InputError(f"weights: tensor `{name}` has non-float dtype {t.dtype}")
        out[name] = t.astype(np.float64)
    return out


def load_weights(cfg, path):
    """Loads and checks the weights: every tensor present, right shape, finite, none extra."""
    tensors = read_safetensors(path)
    shapes = expected_shapes(cfg)
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise InputError(f"weights: missing tensor(s) {', '.join(missing)}")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise InputError(f"weights: unexpected tensor(s) {', '.join(extra)}")
    for name, shape in shapes.items():
        if tensors[name].shape != shape:
            raise InputError(
                f"weights: tensor `{name}` has shape {list(tensors[name].shape)}, "
                f"expected {list(shape)}"
            )
        if not np.all(np.isfinite(tensors[name])):
            raise InputError(f"weights: tensor `{name}` has a non-finite value")
    return tensors


# ----------------------------------------------------------------------------------------------
# Case


def parse_case(cfg, obj):
    """Validates a case object; returns (rows, logits_for)."""
    if not isinstance(obj, dict) or "rows" not in obj or "logits_for" not in obj:
        raise InputError('case: expected an object with "rows" and "logits_for"')
    raw_rows = obj["rows"]
    if not isinstance(raw_rows, list) or not raw_rows:
        raise InputError("case: `rows` must be a non-empty list")
    rows = []
    for i, r in enumerate(raw_rows):
        if not isinstance(r, dict):
            raise InputError(f"case: row {i} is not an object")
        for key in ("branch", "id", "pos", "block", "masked"):
            if key not in r:
                raise InputError(f"case: row {i} lacks `{key}`")
        branch = r["branch"]
        if branch not in BRANCHES:
            raise InputError(f"case: row {i}: unknown branch {branch!r} (text or image)")
        tok = r["id"]
        if tok != REGISTER:
            limit = embed_rows(cfg, branch)
            if not is_int(tok) or not 0 <= tok < limit:
                raise InputError(
                    f"case: row {i}: id {tok!r} out of range for branch {branch} "
                    f'(0..{limit - 1} or "reg")'
                )
        for key in ("pos", "block"):
            if not is_int(r[key]) or r[key] < 0:
                raise InputError(f"case: row {i}: `{key}` must be a non-negative integer")
        if not isinstance(r["masked"], bool):
            raise InputError(f"case: row {i}: `masked` must be true or false")
        rows.append(
            {"branch": branch, "id": tok, "pos": r["pos"], "block": r["block"],
             "masked": r["masked"]}
        )
    logits_for = obj["logits_for"]
    if not isinstance(logits_for, list) or not logits_for:
        raise InputError("case: `logits_for` must be a non-empty list of row indices")
    for j in logits_for:
        if not is_int(j) or not 0 <= j < len(rows):
            raise InputError(
                f"case: logits_for entry {j!r} is not a row index (0..{len(rows) - 1})"
            )
    branches = {rows[j]["branch"] for j in logits_for}
    if len(branches) != 1:
        raise InputError("case: logits_for mixes text and image rows")
    return rows, logits_for


# ----------------------------------------------------------------------------------------------
# Forward (SPEC §2.3) and visibility (SPEC §3)


def visibility(rows, joint):
    """vis[q, k]: may row q attend to row k in a layer (joint: across branches). SPEC §3."""
    branch = np.array([r["branch"] for r in rows])
    block = np.array([r["block"] for r in rows])
    masked = np.array([r["masked"] for r in rows])
    q_masked, k_masked = masked[:, None], masked[None, :]
    q_block, k_block = block[:, None], block[None, :]
    branch_ok = np.full((len(rows), len(rows)), joint) | (branch[:, None] == branch[None, :])
    step_ok = np.where(
        q_masked,
        ~k_masked | (k_block == q_block),
        ~k_masked & (k_block <= q_block),
    )
    return branch_ok & step_ok


def rmsnorm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x):
    # exp(-x) overflows to inf for very negative x, giving the correct limit -0: not an error.
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


def rope(x, pos, theta):
    """Rotates x [heads, head_dim] at position pos; pairs are (i, i + head_dim/2)."""
    half = x.shape[-1] // 2
    i = np.arange(half, dtype=np.float64)
    angle = pos * theta ** (-2.0 * i / x.shape[-1])
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = x[:, :half], x[:, half:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def masked_softmax(scores, vis):
    """Row softmax over the visible entries; a row with nothing visible is all zeros."""
    out = np.zeros_like(scores)
    for r in range(scores.shape[0]):
        keep = vis[r]
        if not keep.any():
            continue
        s = scores[r, keep]
        e = np.exp(s - s.max())
        out[r, keep] = e / e.sum()
    return out


def attention(q, k, v, vis, n_kv_heads):
    """q [T, H, hd], k/v [T, KVH, hd], vis [T, T] -> [T, H*hd], heads concatenated in order."""
    t, n_heads, hd = q.shape
    group = n_heads // n_kv_heads
    out = np.zeros((t, n_heads, hd))
    for h in range(n_heads):
        kvh = h // group
        scores = q[:, h, :] @ k[:, kvh, :].T / np.sqrt(hd)
        out[:, h, :] = masked_softmax(scores, vis) @ v[:, kvh, :]
    return out.reshape(t, n_heads * hd)


def forward(cfg, w, rows, logits_for):
    """Runs the whole sequence through every layer; returns float64 logits for logits_for."""
    n_heads, n_kv, hd = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]
    eps, theta = cfg["norm_eps"], cfg["rope_theta"]
    t = len(rows)
    members = {b: [i for i, r in enumerate(rows) if r["branch"] == b] for b in BRANCHES}

    # Residual streams, one per row, each in its branch's width.
    x = []
    for r in rows:
        b = r["branch"]
        if r["id"] == REGISTER:
            x.append(w[f"{b}.register"].copy())
        else:
            x.append(w[f"{b}.embed"][r["id"]].copy())

    for layer in range(cfg["n_layers"]):
        vis = visibility(rows, joint=layer < cfg["n_joint_layers"])
        q = np.zeros((t, n_heads, hd))
        k = np.zeros((t, n_kv, hd))
        v = np.zeros((t, n_kv, hd))
        for b in BRANCHES:
            p = f"layers.{layer}.{b}."
            for i in members[b]:
                h = rmsnorm(x[i], w[p + "attn_norm"], eps)
                q[i] = rope((h @ w[p + "q"].T).reshape(n_heads, hd), rows[i]["pos"], theta)
                k[i] = rope((h @ w[p + "k"].T).reshape(n_kv, hd), rows[i]["pos"], theta)
                v[i] = (h @ w[p + "v"].T).reshape(n_kv, hd)
        attn = attention(q, k, v, vis, n_kv)
        for b in BRANCHES:
            p = f"layers.{layer}.{b}."
            for i in members[b]:
                x[i] = x[i] + attn[i] @ w[p + "o"].T
                h = rmsnorm(x[i], w[p + "ffn_norm"], eps)
                x[i] = x[i] + (silu(h @ w[p + "gate"].T) * (h @ w[p + "up"].T)) @ w[p + "down"].T

    b = rows[logits_for[0]]["branch"]
    out = np.zeros((len(logits_for), vocab(cfg, b)))
    for j, i in enumerate(logits_for):
        out[j] = rmsnorm(x[i], w[f"{b}.final_norm"], eps) @ w[f"{b}.head"].T
    return out


# ----------------------------------------------------------------------------------------------
# CLI


def read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{what}: cannot read {path}: {e}") from e


def run(config_path, weights_path, case_path, out_path):
    from safetensors.numpy import save_file

    cfg = parse_config(read_json(config_path, "config"))
    rows, logits_for = parse_case(cfg, read_json(case_path, "case"))
    w = load_weights(cfg, weights_path)
    logits = forward(cfg, w, rows, logits_for)
    save_file({"logits": np.ascontiguousarray(logits, dtype=np.float32)}, out_path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="config JSON (SPEC §2.1 fields)")
    ap.add_argument("--weights", required=True, help="safetensors weights (SPEC §2.2)")
    ap.add_argument("--case", required=True, help="case JSON: rows and logits_for")
    ap.add_argument("--out", required=True, help="output safetensors with tensor `logits`")
    args = ap.parse_args(argv)
    try:
        run(args.config, args.weights, args.case, args.out)
    except InputError as e:
        print(f"reference.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
