#!/usr/bin/env python3
"""PyTorch peer of the crate: the SPEC §2.3 graph and both samplers (SPEC §4), in eager PyTorch.

Written from docs/SPEC.md (conventions checked against src/sampler.rs, src/schedule.rs and
src/backend/cpu/ops.rs). Two execution modes, as the crate's `dense` and `sparse` (all savings):

- dense (LaViDa-O): every step feeds the prompt and every response position (masks included),
  all in clean block 0: full bidirectional attention, no registers, nothing cached across steps.
- sparse (Sparse-LaViDa, SPEC §4.3 with cache_prompt, cache_decoded and truncate on): the prompt
  is prefilled once; step k feeds [C_{k-1} (real ids, clean block k) | C_k masks + R registers
  (masked block k+1)] against the K/V cache under the step-causal rule (SPEC §3), and the
  C_{k-1} rows' K/V stay in the cache for good.

The K/V pool of a generation is one tensor per layer, [S, n_kv_heads, slots, head_dim] (S = 1,
or 2 for a CFG pair), laid out in *decode order*: prompt, then each decoded group as it is
retired, then the step's masked block as scratch that the next step overwrites. So every
forward's keys are the prefix [0, L) of the pool (a view, never a gather); in layers after the
joint ones only the span holding the query branch's keys is read. (The crate keeps response
slots by response index instead; key order does not change attention.) Attention is
torch.nn.functional.scaled_dot_product_attention with a boolean mask built from the row and key
tags (SPEC §3), or no mask where every key is visible (so the flash backend can run).

Numerics: f32 everywhere on CPU (the crate's oracle precision). On CUDA, bf16 weights and
activations with an f32 residual stream, f32 RMSNorm/RoPE/SwiGLU math and f32 logits (as the
crate's CUDA backend); products leave the GEMM in f32 where torch.mm(out_dtype=) works, so each
stored activation is rounded to bf16 once. Sampling (CFG combine, Philox4x32-10 Gumbel noise,
argmax, confidence) is f32 with the noise and log-sum-exp in f64, bit-compatible with
src/backend/cpu/ops.rs::sample_rows up to the logits themselves. Schedules (shift counts, text
blocks, stratified/random image orders with the crate's ChaCha8 shuffles) are reproduced exactly,
so decode positions match the crate's.

Usage (see benches/peer/README.md):
  model.py --json OUT.json                      timing run (CUDA; skipped without it)
  model.py --check-logits CASE_DIR [--device cpu]   logits of a `forward` case vs the crate's
                                                (f32: rel L2 <= 1e-4; bf16: SPEC §6 bound)
  model.py --check-logits CASE_DIR --weights-device-seed S   the same on the crate's CUDA
                                                random weights (`--weights-seed S` there)
  model.py --check-device-weights FILE --weights-device-seed S --preset P
                                                those weights vs `init-weights --like-device`
  model.py --make-case DIR [--case-rows N]      config.json + a random case.json
  model.py --generate --device cpu --task t2i ... --trace T.json [--compare-trace CRATE.json]
  model.py --self-test                          Philox known answers, schedules (no model)
"""

import argparse
import json
import math
import os
import statistics
import struct
import sys
import time

# ------------------------------------------------------------------------------------------------
# Config (SPEC §2.1)

CONFIG_FIELDS = (
    "d_text", "d_image", "n_heads", "n_kv_heads", "head_dim", "mlp_text", "mlp_image",
    "n_layers", "n_joint_layers", "rope_theta", "norm_eps", "text_vocab", "text_mask_id",
    "image_vocab", "n_registers",
)

PRESETS = {
    "tiny": dict(d_text=64, d_image=32, n_heads=4, n_kv_heads=4, head_dim=16, mlp_text=128,
                 mlp_image=64, n_layers=4, n_joint_layers=2, rope_theta=10000.0, norm_eps=1e-5,
                 text_vocab=300, text_mask_id=299, image_vocab=64, n_registers=8),
    "small": dict(d_text=256, d_image=128, n_heads=4, n_kv_heads=4, head_dim=64, mlp_text=768,
                  mlp_image=384, n_layers=6, n_joint_layers=3, rope_theta=10000.0, norm_eps=1e-5,
                  text_vocab=2048, text_mask_id=2047, image_vocab=512, n_registers=16),
    "lavida-o": dict(d_text=4096, d_image=2048, n_heads=32, n_kv_heads=32, head_dim=128,
                     mlp_text=12288, mlp_image=8192, n_layers=32, n_joint_layers=16,
                     rope_theta=500000.0, norm_eps=1e-5, text_vocab=127378,
                     text_mask_id=126336, image_vocab=8192, n_registers=64),
}
# Peer-only preset: `tiny` with 4 heads x 64 (the head_dim-64 attention path on a tiny model).
PRESETS["tiny64"] = dict(PRESETS["tiny"], head_dim=64)
# Peer-only preset: the crate's GPU tests' `tiny_hd64` (2 query heads sharing 1 K/V head of 64).
PRESETS["tiny64-gqa"] = dict(PRESETS["tiny"], n_heads=2, n_kv_heads=1, head_dim=64)

TEXT, IMAGE = 0, 1
BRANCH_NAMES = ("text", "image")
REGISTER = -1  # id of a register row (its embedding is {branch}.register)
SHIFT = 5.0  # LaViDa-O shift schedule parameter s


class PeerError(Exception):
    """Bad input (config, weights, case, request): reported as one line, exit status 2."""


def validate_config(c):
    missing = [f for f in CONFIG_FIELDS if f not in c]
    extra = sorted(set(c) - set(CONFIG_FIELDS))
    if missing:
        raise PeerError(f"config: missing field(s) {', '.join(missing)}")
    if extra:
        raise PeerError(f"config: unknown field(s) {', '.join(extra)}")
    for f in CONFIG_FIELDS:
        if f in ("rope_theta", "norm_eps"):
            c[f] = float(c[f])
        elif not isinstance(c[f], int) or isinstance(c[f], bool) or c[f] < 0:
            raise PeerError(f"config: {f} must be a non-negative integer, got {c[f]!r}")
    for f in ("d_text", "d_image", "n_heads", "n_kv_heads", "head_dim", "mlp_text", "mlp_image",
              "n_layers", "text_vocab", "image_vocab"):
        if c[f] == 0:
            raise PeerError(f"config: {f} must be positive")
    if c["n_heads"] % c["n_kv_heads"]:
        raise PeerError("config: n_heads must be a multiple of n_kv_heads")
    if c["head_dim"] % 2:
        raise PeerError("config: head_dim must be even (RoPE rotates pairs)")
    if c["n_joint_layers"] > c["n_layers"]:
        raise PeerError("config: n_joint_layers exceeds n_layers")
    if c["text_mask_id"] >= c["text_vocab"]:
        raise PeerError("config: text_mask_id must be < text_vocab")
    if not (c["rope_theta"] > 0 and c["norm_eps"] > 0):
        raise PeerError("config: rope_theta and norm_eps must be > 0")
    return c


def load_config(preset, path):
    if path:
        with open(path) as f:
            return validate_config(json.load(f))
    if preset not in PRESETS:
        raise PeerError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    return validate_config(dict(PRESETS[preset]))


def d_model(c, b):
    return c["d_text"] if b == TEXT else c["d_image"]


def d_mlp(c, b):
    return c["mlp_text"] if b == TEXT else c["mlp_image"]


def vocab(c, b):
    return c["text_vocab"] if b == TEXT else c["image_vocab"]


def mask_id(c, b):
    return c["text_mask_id"] if b == TEXT else c["image_vocab"]


def tensor_shapes(c):
    """SPEC §2.2 names and shapes, in the crate's order (branch tensors, then layers)."""
    a = c["n_heads"] * c["head_dim"]
    kv = c["n_kv_heads"] * c["head_dim"]
    shapes = {}
    for b, n in enumerate(BRANCH_NAMES):
        d = d_model(c, b)
        rows = c["text_vocab"] if b == TEXT else c["image_vocab"] + 1
        shapes[f"{n}.embed"] = [rows, d]
        shapes[f"{n}.register"] = [d]
        shapes[f"{n}.final_norm"] = [d]
        shapes[f"{n}.head"] = [vocab(c, b), d]
    for i in range(c["n_layers"]):
        for b, n in enumerate(BRANCH_NAMES):
            d, f = d_model(c, b), d_mlp(c, b)
            p = f"layers.{i}.{n}"
            shapes.update({
                f"{p}.attn_norm": [d], f"{p}.q": [a, d], f"{p}.k": [kv, d], f"{p}.v": [kv, d],
                f"{p}.o": [d, a], f"{p}.ffn_norm": [d], f"{p}.gate": [f, d], f"{p}.up": [f, d],
                f"{p}.down": [d, f],
            })
    return shapes


# ------------------------------------------------------------------------------------------------
# Schedules (SPEC §4; src/schedule.rs)


def shift_counts(n, k):
    """Positions decoded at each of the k steps: LaViDa-O's shift schedule, same f64 math."""
    if n <= 0 or k <= 0 or k > n:
        raise PeerError(f"shift schedule needs 0 < K <= N, got K = {k}, N = {n}")
    cumulative = []
    for j in range(k + 1):
        t = j / k
        sigma = SHIFT * t / (1.0 + (SHIFT - 1.0) * t)
        cumulative.append(math.floor(sigma * n))
    counts = [max(1, cumulative[j + 1] - cumulative[j]) for j in range(k)]
    excess = sum(counts) - n
    j = 0
    while excess > 0:
        if counts[j] > 1:
            counts[j] -= 1
            excess -= 1
        j = (j + 1) % k
    counts.reverse()
    return counts


def text_schedule(answer_len, block_len, steps):
    """[(semi-AR block, commits)] per step: steps split evenly over blocks, remainder first; a
    short last block whose even share exceeds its positions gets one step per position and the
    other blocks split the rest evenly (the crate's schedule::text_block_steps)."""
    if answer_len <= 0 or block_len <= 0 or steps <= 0:
        raise PeerError("text schedule: answer length, block length and steps must be > 0")
    if steps > answer_len:
        raise PeerError(f"text schedule: steps ({steps}) must be <= answer length ({answer_len})")
    nblocks = -(-answer_len // block_len)
    if steps < nblocks:
        raise PeerError(f"text schedule: {steps} steps for {nblocks} blocks")

    def even(total, blocks, b):
        return total // blocks + (1 if b < total % blocks else 0)

    last = len(text_block_range(answer_len, block_len, nblocks - 1))
    capped = nblocks > 1 and even(steps, nblocks, nblocks - 1) > last
    out = []
    for block in range(nblocks):
        size = len(text_block_range(answer_len, block_len, block))
        if not capped:
            block_steps = even(steps, nblocks, block)
        elif block == nblocks - 1:
            block_steps = last
        else:
            block_steps = even(steps - last, nblocks - 1, block)
        out += [(block, size // block_steps + (1 if t < size % block_steps else 0))
                for t in range(block_steps)]
    return out


def text_block_range(answer_len, block_len, b):
    return range(min(b * block_len, answer_len), min((b + 1) * block_len, answer_len))


M32 = 0xFFFFFFFF


class ChaCha8:
    """rand_chacha 0.3 `ChaCha8Rng::seed_from_u64` + `next_u32` (the crate's shuffles), pure
    Python: key from rand_core 0.6's PCG32 expansion of the seed, 64-bit block counter in words
    12-13, stream 0 in words 14-15, output words in keystream order."""

    def __init__(self, seed):
        state = seed & 0xFFFFFFFFFFFFFFFF
        key = []
        for _ in range(8):
            state = (state * 6364136223846793005 + 11634580027462260723) & 0xFFFFFFFFFFFFFFFF
            xorshifted = (((state >> 18) ^ state) >> 27) & M32
            rot = state >> 59
            key.append(((xorshifted >> rot) | (xorshifted << ((32 - rot) & 31))) & M32)
        self.key = key
        self.counter = 0
        self.buf = []
        self.idx = 0

    @staticmethod
    def _qr(x, a, b, c, d):
        x[a] = (x[a] + x[b]) & M32
        x[d] ^= x[a]
        x[d] = ((x[d] << 16) | (x[d] >> 16)) & M32
        x[c] = (x[c] + x[d]) & M32
        x[b] ^= x[c]
        x[b] = ((x[b] << 12) | (x[b] >> 20)) & M32
        x[a] = (x[a] + x[b]) & M32
        x[d] ^= x[a]
        x[d] = ((x[d] << 8) | (x[d] >> 24)) & M32
        x[c] = (x[c] + x[d]) & M32
        x[b] ^= x[c]
        x[b] = ((x[b] << 7) | (x[b] >> 25)) & M32

    def _block(self):
        s = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574] + self.key + [
            self.counter & M32, self.counter >> 32, 0, 0]
        x = list(s)
        for _ in range(4):  # 8 rounds = 4 double rounds
            self._qr(x, 0, 4, 8, 12)
            self._qr(x, 1, 5, 9, 13)
            self._qr(x, 2, 6, 10, 14)
            self._qr(x, 3, 7, 11, 15)
            self._qr(x, 0, 5, 10, 15)
            self._qr(x, 1, 6, 11, 12)
            self._qr(x, 2, 7, 8, 13)
            self._qr(x, 3, 4, 9, 14)
        self.counter += 1
        return [(x[i] + s[i]) & M32 for i in range(16)]

    def next_u32(self):
        if self.idx >= len(self.buf):
            self.buf, self.idx = self._block(), 0
        self.idx += 1
        return self.buf[self.idx - 1]

    def below(self, n):
        """rand 0.8 `gen_range(0..n)` for u32 (widening multiply, conservative zone)."""
        zone = ((n << (32 - n.bit_length())) - 1) & M32
        while True:
            m = self.next_u32() * n
            if (m & M32) <= zone:
                return m >> 32

    def shuffle(self, xs):
        """rand 0.8 `SliceRandom::shuffle` (Fisher-Yates from the end)."""
        for i in range(len(xs) - 1, 0, -1):
            j = self.below(i + 1)
            xs[i], xs[j] = xs[j], xs[i]


def image_order(order, h, w, seed):
    """A permutation of the h*w row-major cells in decode order (src/schedule.rs)."""
    if h <= 0 or w <= 0:
        raise PeerError(f"image order: zero-size grid {h}x{w}")
    if order == "raster":
        return list(range(h * w))
    if order == "random":
        perm = list(range(h * w))
        ChaCha8(seed).shuffle(perm)
        return perm
    if order != "stratified":
        raise PeerError(f"unknown image order {order!r}")
    # Quadtree digits (top level first) on the 2^m square covering the grid; each node gets a
    # seeded permutation of its four quadrants, drawn level by level, row-major over the nodes
    # that intersect the grid; a cell's key puts the top-level permuted digit least significant.
    side = 1 << (max(h, w) - 1).bit_length()
    m = side.bit_length() - 1
    rng = ChaCha8(seed)
    perms = []
    for i in range(m):
        shift = m - i
        rows, cols = -(-h // (1 << shift)), -(-w // (1 << shift))
        level = []
        for _ in range(rows * cols):
            p = [0, 1, 2, 3]
            rng.shuffle(p)
            level.append(p)
        perms.append((cols, level))
    keyed = []
    for y in range(h):
        for x in range(w):
            key = 0
            for i, (cols, level) in enumerate(perms):
                shift = m - i
                node = (y >> shift) * cols + (x >> shift)
                bit = shift - 1
                digit = 2 * ((y >> bit) & 1) + ((x >> bit) & 1)
                key |= level[node][digit] << (2 * i)
            keyed.append((key, y * w + x))
    keyed.sort()
    return [cell for _, cell in keyed]


# ------------------------------------------------------------------------------------------------
# Philox4x32-10 and Gumbel noise (SPEC §4.1; src/backend/cpu/ops.rs). uint32 words held in int64
# tensors; 32x32 -> 64-bit products split into 16-bit halves so nothing overflows int64.

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a, b):
    """(hi, lo) 32-bit halves of the constant a (< 2^32) times the int64 tensor b (< 2^32)."""
    t0 = b * (a & 0xFFFF)  # < 2^48
    t1 = b * (a >> 16)  # < 2^48
    s = t0 + ((t1 & 0xFFFF) << 16)  # < 2^49
    return (t1 >> 16) + (s >> 32), s & M32


def philox4x32_10(c, key):
    """c: four broadcastable int64 tensors (uint32 values); key: two python ints."""
    c0, c1, c2, c3 = c
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & M32, (k1 + PHILOX_W1) & M32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def gumbel_noise(torch, seed, n_vocab, positions, step, request, device):
    """[len(positions), n_vocab] f32: counter (v/4, position, step, request), word v%4."""
    dev = device
    v4 = torch.arange((n_vocab + 3) // 4, dtype=torch.int64, device=dev)[None, :]
    pos = torch.tensor(positions, dtype=torch.int64, device=dev)[:, None]
    z = torch.zeros((), dtype=torch.int64, device=dev)
    words = philox4x32_10((v4 + z * pos, pos + z * v4, z + step, z + request),
                          (seed & M32, (seed >> 32) & M32))
    w = torch.stack(words, dim=-1).reshape(len(positions), -1)[:, :n_vocab]
    u = ((w >> 8).to(torch.float64) + 0.5) * 2.0 ** -24
    return (-torch.log(-torch.log(u))).to(torch.float32)


# ------------------------------------------------------------------------------------------------
# Weights (SPEC §2.2): safetensors without the safetensors package (not on every GPU machine).

ST_DTYPES = {"F32": ("float32", 4), "BF16": ("bfloat16", 2), "F16": ("float16", 2),
             "F64": ("float64", 8)}


def read_safetensors(torch, path):
    """{name: CPU tensor} of a safetensors file (F32/BF16/F16/F64), shapes as stored."""
    out = {}
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise PeerError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise PeerError(f"{path}: bad safetensors header ({e})") from None
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dt = ST_DTYPES.get(info.get("dtype"))
            if dt is None:
                raise PeerError(f"{path}: tensor `{name}` has unsupported dtype "
                                f"{info.get('dtype')}")
            start, end = info["data_offsets"]
            shape = info["shape"]
            count = math.prod(shape)
            if end - start != count * dt[1]:
                raise PeerError(f"{path}: tensor `{name}`: {end - start} bytes for shape {shape}")
            f.seek(base + start)
            buf = bytearray(f.read(end - start))
            if len(buf) != end - start:
                raise PeerError(f"{path}: tensor `{name}` is truncated")
            t = (torch.frombuffer(buf, dtype=getattr(torch, dt[0])) if count
                 else torch.empty(0, dtype=getattr(torch, dt[0])))
            out[name] = t.reshape(shape)
    return out


def check_weights(torch, cfg, tensors, path):
    shapes = tensor_shapes(cfg)
    for name, shape in shapes.items():
        if name not in tensors:
            raise PeerError(f"{path}: missing tensor `{name}`")
        if list(tensors[name].shape) != shape:
            raise PeerError(f"{path}: tensor `{name}` has shape {list(tensors[name].shape)}, "
                            f"expected {shape}")
    for name in sorted(tensors):
        if name not in shapes:
            raise PeerError(f"{path}: unexpected tensor `{name}`")
    for name in shapes:
        if not bool(torch.isfinite(tensors[name]).all()):
            raise PeerError(f"{path}: tensor `{name}` has a non-finite value")


def random_weights(torch, cfg, seed, device, dtype):
    """Seeded random weights made on `device` with torch (the crate's distributions, not its
    ChaCha8 streams): linear/head U(-a, a), a = sqrt(3/in); embed/register U(-1, 1); norm gains
    1 + U(-0.1, 0.1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in tensor_shapes(cfg).items():
        leaf = name.rsplit(".", 1)[1]
        if leaf.endswith("norm"):
            lo, hi, dt = 0.9, 1.1, torch.float32
        elif leaf in ("embed", "register"):
            lo, hi, dt = -1.0, 1.0, dtype
        else:
            a = math.sqrt(3.0 / shape[1])
            lo, hi, dt = -a, a, dtype
        out[name] = torch.empty(shape, dtype=dt, device=device).uniform_(lo, hi, generator=gen)
    return out


INIT_COUNTER_TAG = 0x1A17  # third Philox counter word of the crate's weight init


def init_range(name, shape):
    """(offset, scale) of the crate's `weights::init_range` as f32 values (python floats):
    norm gains (1, 0.1), embed/register (0, 1), linear [out, in] (0, sqrt(3/in) in f64 rounded
    to f32)."""
    leaf = name.rsplit(".", 1)[1]
    if leaf.endswith("_norm"):
        return 1.0, struct.unpack("<f", struct.pack("<f", 0.1))[0]
    if leaf in ("embed", "register"):
        return 0.0, 1.0
    return 0.0, struct.unpack("<f", struct.pack("<f", math.sqrt(3.0 / shape[1])))[0]


def device_weights(torch, cfg, seed, device, out_device=None, chunk_groups=1 << 22):
    """The crate's device-generated weights for (cfg, seed), bit for bit (`Model::random_on_device`,
    kernels/init.cu `sl_init_uniform`; CPU twin `HostWeights::random_like_device`), as bf16
    tensors made on `device` and kept on `out_device` (default `device`).

    Tensor i of tensor_shapes(cfg): element e is bf16_rne(offset + scale*u) in f32 with two
    roundings, u = (2*(w >> 8) + 1 - 2^24) * 2^-24 (exact in f32), w word e % 4 of
    philox4x32_10(counter (g lo32, g hi32, i, 0x1A17), key (seed lo32, seed hi32)), g = e // 4.
    Generated `chunk_groups` Philox calls at a time, so the memory beyond the result is bounded
    (about 80 bytes a group)."""
    out_device = out_device or device
    key = (seed & M32, (seed >> 32) & M32)
    out = {}
    for i, (name, shape) in enumerate(tensor_shapes(cfg).items()):
        offset, scale = init_range(name, shape)
        off_t = torch.tensor(offset, dtype=torch.float32, device=device)
        scale_t = torch.tensor(scale, dtype=torch.float32, device=device)
        n = math.prod(shape)
        flat = torch.empty(n, dtype=torch.bfloat16, device=device)
        groups = -(-n // 4)
        for g0 in range(0, groups, chunk_groups):
            g = torch.arange(g0, min(g0 + chunk_groups, groups), dtype=torch.int64, device=device)
            z = torch.zeros((), dtype=torch.int64, device=device)
            words = philox4x32_10((g & M32, g >> 32, z + i, z + INIT_COUNTER_TAG), key)
            w = torch.stack(words, dim=-1).reshape(-1)[: n - 4 * g0]
            k = (((w >> 8) << 1) | 1) - (1 << 24)  # odd, |k| < 2^24: exact in f32
            u = k.to(torch.float32) * (2.0 ** -24)  # a power of two: exact
            v = torch.add(torch.mul(scale_t, u), off_t)  # two f32 roundings, no FMA
            flat[4 * g0: 4 * g0 + v.numel()] = v.to(torch.bfloat16)  # round to nearest even
        out[name] = flat.reshape(shape).to(out_device)
    return out


def check_device_weights(torch, cfg, seed, device, path):
    """Compares device_weights(cfg, seed) made on `device` with a safetensors file (the crate's
    `init-weights --like-device`), bit for bit; returns the number of differing tensors."""
    theirs = read_safetensors(torch, path)
    check_weights(torch, cfg, theirs, path)
    ours = device_weights(torch, cfg, seed, device, out_device="cpu")
    bad = 0
    for name in tensor_shapes(cfg):
        a, b = ours[name], theirs[name]
        if b.dtype == torch.bfloat16:
            a, b = a.view(torch.int16), b.view(torch.int16)
        else:  # an f32/f16/f64 file of bf16 values: compare exactly in f64
            a, b = a.double(), b.double()
        diff = (a != b).reshape(-1)
        if bool(diff.any()):
            e = int(diff.nonzero()[0])
            bad += 1
            print(f"  {name}: {int(diff.sum())} of {diff.numel()} values differ, first at {e} "
                  f"(ours {float(ours[name].reshape(-1)[e])}, "
                  f"file {float(theirs[name].reshape(-1)[e])})")
    n = sum(math.prod(s) for s in tensor_shapes(cfg).values())
    print(f"check-device-weights {path}: seed {seed}, {len(ours)} tensors, {n} values made on "
          f"{device}: {'identical' if not bad else f'{bad} tensor(s) DIFFER'}")
    return bad


# ------------------------------------------------------------------------------------------------
# The model (SPEC §2.3) and its K/V pool


class Feed:
    """One forward pass over S sequences that share one structure (a CFG pair differs only in
    its prompt ids). Row i has (branch, pos, block, masked) and writes pool slot start + i;
    `ids` is [S, T] on the device (REGISTER for registers); `logits_rows` lists the rows (one
    branch) whose logits are wanted, per sequence; `skip` is the branch not computed in layers
    >= n_joint_layers (text during text-to-image), or None."""

    def __init__(self, torch, device, branch, pos, block, masked, start, ids, logits_rows=(),
                 skip=None):
        self.T = len(branch)
        self.branch, self.pos, self.block, self.masked = branch, pos, block, masked
        self.start = start
        self.ids = ids
        self.logits_rows = list(logits_rows)
        self.skip = skip
        self.rows = [[i for i in range(self.T) if branch[i] == b] for b in (TEXT, IMAGE)]
        self.host = {k: torch.tensor(v, dtype=torch.int64) for k, v in
                     (("branch", branch), ("block", block), ("masked", masked))}
        self.dev_index = [None, None]
        for b in (TEXT, IMAGE):
            r = self.rows[b]
            if r and r == list(range(r[0], r[0] + len(r))):
                self.dev_index[b] = slice(r[0], r[0] + len(r))
            elif r:
                self.dev_index[b] = torch.tensor(r, dtype=torch.int64, device=device)
        self.memo = {}  # per-forward constants (RoPE tables, masks), reused while unchanged

    @property
    def n_seqs(self):
        return self.ids.shape[0]


class Cache:
    """K/V pool [S, n_kv_heads, slots, head_dim] per layer plus each slot's tag (host side)."""

    def __init__(self, torch, cfg, n_seqs, slots, device, dtype):
        shape = (n_seqs, cfg["n_kv_heads"], slots, cfg["head_dim"])
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg["n_layers"])]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg["n_layers"])]
        self.slots = slots
        self.branch = torch.full((slots,), -1, dtype=torch.int64)
        self.block = torch.zeros(slots, dtype=torch.int64)
        self.masked = torch.zeros(slots, dtype=torch.int64)


class Model:
    """The graph on one device in one compute dtype. `twin=True` makes the naive bf16 twin of
    SPEC §6 (as tests/gpu_backend.rs's Bf16Twin): f32 arithmetic on bf16-rounded weights, with
    every value the bf16 model stores in bf16 (normed activations, rotated q/k, v, attention
    output, SwiGLU output) rounded to bf16."""

    def __init__(self, torch, cfg, tensors, device, dtype, twin=False):
        import torch.nn.functional as F

        self.torch, self.F, self.cfg, self.device, self.dtype = torch, F, cfg, device, dtype
        self.twin = twin
        if twin:
            self.dtype = dtype = torch.float32
        # Takes ownership of `tensors`: each one is popped as it is converted or fused, so the
        # peak memory is the weights plus one layer's fused copies (lavida-o: ~22 GB in bf16).
        t = tensors
        for name in list(t):
            leaf = name.rsplit(".", 1)[1]
            dt = torch.float32 if leaf.endswith("norm") else dtype
            w = t[name].to(device=device)
            t[name] = (w.to(torch.bfloat16) if twin else w).to(dtype=dt)
        self.branch = []
        for n in BRANCH_NAMES:
            self.branch.append({k: t.pop(f"{n}.{k}") for k in
                                ("embed", "register", "final_norm", "head")})
        # Fused projections: one GEMM for q|k|v and one for gate|up (same math, fewer launches).
        self.layers = []
        for i in range(cfg["n_layers"]):
            per = []
            for n in BRANCH_NAMES:
                p = f"layers.{i}.{n}"
                per.append({
                    "attn_norm": t.pop(f"{p}.attn_norm"),
                    "qkv": torch.cat([t.pop(f"{p}.q"), t.pop(f"{p}.k"), t.pop(f"{p}.v")]),
                    "o": t.pop(f"{p}.o"),
                    "ffn_norm": t.pop(f"{p}.ffn_norm"),
                    "gate_up": torch.cat([t.pop(f"{p}.gate"), t.pop(f"{p}.up")]),
                    "down": t.pop(f"{p}.down"),
                })
            self.layers.append(per)
        self.H, self.Hkv, self.hd = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]
        self.eps = cfg["norm_eps"]
        half = self.hd // 2
        self.inv_freq = torch.tensor(
            [cfg["rope_theta"] ** (-2.0 * i / self.hd) for i in range(half)], dtype=torch.float64)
        try:  # torch >= 2.5 maps query head h to K/V head h / (H / Hkv) itself
            kv = torch.zeros(1, 1, 1, 2)
            F.scaled_dot_product_attention(torch.zeros(1, 2, 1, 2), kv, kv, enable_gqa=True)
            self.gqa_kw = True
        except (TypeError, RuntimeError):
            self.gqa_kw = False
        self.mm_f32 = self._probe_mm_f32()

    def _probe_mm_f32(self):
        """Whether torch.mm(a, b, out_dtype=float32) works here (CUDA, torch >= 2.8): bf16
        products then leave the GEMM in f32 (as cuBLASLt with an f32 C), sparing one bf16
        rounding per product. Checked once against an f32 product; any failure: bf16 outputs."""
        torch = self.torch
        if self.dtype == torch.float32:
            return False
        try:
            g = torch.Generator(device=self.device).manual_seed(1)
            a = torch.randn(8, 64, generator=g, device=self.device).to(self.dtype)
            b = torch.randn(64, 16, generator=g, device=self.device).to(self.dtype)
            got = torch.mm(a, b, out_dtype=torch.float32)
            want = a.float() @ b.float()
            return got.dtype == torch.float32 and bool(
                ((got - want).norm() <= 1e-3 * want.norm()).item())
        except Exception:  # noqa: BLE001 - any failure means: not usable here
            return False

    def linear_f32(self, h, w):
        """h · wᵀ as f32 (h in the compute dtype)."""
        if self.mm_f32:
            k = h.shape[-1]
            y = self.torch.mm(h.reshape(-1, k), w.t(), out_dtype=self.torch.float32)
            return y.reshape(*h.shape[:-1], w.shape[0])
        return self.F.linear(h, w).float()

    def store(self, x):
        """x as the compute dtype stores it (the twin: f32 rounded to bf16)."""
        x = x.to(self.dtype)
        return x.to(self.torch.bfloat16).float() if self.twin else x

    def new_cache(self, n_seqs, slots):
        return Cache(self.torch, self.cfg, n_seqs, slots, self.device, self.dtype)

    def rmsnorm(self, x, w):
        """f32: x / sqrt(mean(x^2) + eps) * w."""
        x = x.float()
        return x * self.torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w

    def rope_tables(self, feed, b):
        key = ("rope", b)
        if key not in feed.memo:
            pos = self.torch.tensor([feed.pos[i] for i in feed.rows[b]], dtype=self.torch.float64)
            ang = pos[:, None] * self.inv_freq[None, :]  # θ in f64, as the crate
            feed.memo[key] = (ang.cos().float().to(self.device)[None, :, None, :],
                              ang.sin().float().to(self.device)[None, :, None, :])
        return feed.memo[key]

    def rope(self, x, cos, sin):
        """x [S, n, heads, hd] f32: (a, b) = (x_i, x_{i+hd/2}) -> (a cos - b sin, a sin + b cos),
        rounded once to the compute dtype."""
        a, b = x[..., : self.hd // 2], x[..., self.hd // 2:]
        return self.store(self.torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1))

    def attn_plan(self, feed, cache, b, joint):
        """Key span [lo, hi) of the pool and the boolean mask (None: all visible) for the
        queries of branch b. SPEC §3: branch_ok = joint or same branch; step_ok from tags."""
        key = ("attn", b, joint)
        if key in feed.memo:
            return feed.memo[key]
        torch = self.torch
        end = feed.start + feed.T
        if joint:
            lo, hi = 0, end
        else:
            idx = (cache.branch[:end] == b).nonzero().flatten()
            lo, hi = int(idx[0]), int(idx[-1]) + 1
        rows = torch.tensor(feed.rows[b], dtype=torch.int64)
        qb, qk, qm = (feed.host[n][rows][:, None] for n in ("branch", "block", "masked"))
        kb, kk, km = (getattr(cache, n)[lo:hi][None, :] for n in ("branch", "block", "masked"))
        qm, km = qm.bool(), km.bool()
        step_ok = torch.where(qm, ~km | (kk == qk), ~km & (kk <= qk))
        vis = step_ok if joint else step_ok & (kb == qb)
        if bool(vis.all()):
            plan = (lo, hi, None, None)
        else:
            empty = ~vis.any(-1)
            plan = (lo, hi, vis.to(self.device)[None, None],
                    empty.to(self.device)[None, None, :, None] if bool(empty.any()) else None)
        feed.memo[key] = plan
        return plan

    def forward(self, feed, cache):
        """Writes every fed row's K/V into `cache` (slots start..start+T) and returns the f32
        logits [S * len(logits_rows), V] (sequence-major), or None without logits rows."""
        torch, F, cfg = self.torch, self.F, self.cfg
        S = feed.n_seqs
        end = feed.start + feed.T
        if end > cache.slots:
            raise PeerError(f"feed ends at slot {end}, the pool has {cache.slots}")
        cache.branch[feed.start:end] = feed.host["branch"]
        cache.block[feed.start:end] = feed.host["block"]
        cache.masked[feed.start:end] = feed.host["masked"]
        x = [None, None]
        for b in (TEXT, IMAGE):
            if not feed.rows[b]:
                continue
            bw = self.branch[b]
            ids = feed.ids[:, feed.dev_index[b]]
            reg = ids == REGISTER
            e = bw["embed"][ids.clamp(min=0)].float()
            x[b] = torch.where(reg[..., None], bw["register"].float(), e)  # [S, n_b, d_b] f32
        H, Hkv, hd = self.H, self.Hkv, self.hd
        A, kvd = H * hd, Hkv * hd
        for layer, weights in enumerate(self.layers):
            joint = layer < cfg["n_joint_layers"]
            active = [b for b in (TEXT, IMAGE)
                      if x[b] is not None and (joint or feed.skip != b)]
            qs = {}
            # Every active branch stores its K/V before any branch attends (joint layers).
            for b in active:
                w = weights[b]
                n = x[b].shape[1]
                h = self.store(self.rmsnorm(x[b], w["attn_norm"]))
                qkv = self.linear_f32(h, w["qkv"])
                q = qkv[..., :A].reshape(S, n, H, hd)
                k = qkv[..., A:A + kvd].reshape(S, n, Hkv, hd)
                v = self.store(qkv[..., A + kvd:].reshape(S, n, Hkv, hd))
                cos, sin = self.rope_tables(feed, b)
                q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
                di = feed.dev_index[b]
                slots = (slice(feed.start + di.start, feed.start + di.stop)
                         if isinstance(di, slice) else di + feed.start)
                cache.k[layer][:, :, slots] = k.transpose(1, 2)
                cache.v[layer][:, :, slots] = v.transpose(1, 2)
                qs[b] = q.transpose(1, 2)  # [S, H, n, hd]
            for b in active:
                w = weights[b]
                n = x[b].shape[1]
                lo, hi, mask, empty = self.attn_plan(feed, cache, b, joint)
                k = cache.k[layer][:, :, lo:hi]
                v = cache.v[layer][:, :, lo:hi]
                kw = {}
                if Hkv != H:
                    if self.gqa_kw:
                        kw["enable_gqa"] = True
                    else:
                        k = k.repeat_interleave(H // Hkv, dim=1)
                        v = v.repeat_interleave(H // Hkv, dim=1)
                o = F.scaled_dot_product_attention(qs[b], k, v, attn_mask=mask,
                                                   scale=1.0 / math.sqrt(hd), **kw)
                if empty is not None:  # a query with no visible key outputs zeros
                    o = o.masked_fill(empty, 0.0)
                o = self.store(o.transpose(1, 2).reshape(S, n, A))
                x[b] = x[b] + self.linear_f32(o, w["o"])
                h = self.store(self.rmsnorm(x[b], w["ffn_norm"]))
                gu = self.linear_f32(h, w["gate_up"])
                f = gu.shape[-1] // 2
                act = self.store(F.silu(gu[..., :f]) * gu[..., f:])
                x[b] = x[b] + self.linear_f32(act, w["down"])
        if not feed.logits_rows:
            return None
        lb = feed.branch[feed.logits_rows[0]]
        pos_in_branch = {r: j for j, r in enumerate(feed.rows[lb])}
        try:
            sel = [pos_in_branch[r] for r in feed.logits_rows]
        except KeyError:
            raise PeerError("logits requested for rows of both branches") from None
        xs = x[lb][:, torch.tensor(sel, dtype=torch.int64, device=self.device)]
        bw = self.branch[lb]
        h = self.store(self.rmsnorm(xs.reshape(-1, xs.shape[-1]), bw["final_norm"]))
        return self.linear_f32(h, bw["head"])


# ------------------------------------------------------------------------------------------------
# Sampling (SPEC §4; ops.rs sample_rows)


def sample(torch, logits, positions, step, seed, temperature, guidance=None, banned=()):
    """Per position: (token, confidence). logits [S*n, V] f32, conditional rows first."""
    n = len(positions)
    if guidance is not None:
        lv = (1.0 + guidance) * logits[:n] - guidance * logits[n:2 * n]
    else:
        lv = logits[:n]
    if not bool(torch.isfinite(lv).all()):
        raise PeerError(f"step {step}: non-finite logits")
    V = lv.shape[1]
    tau = temperature
    s = lv / tau if tau > 0 else lv
    allowed = torch.ones(V, dtype=torch.bool, device=lv.device)
    if banned:
        allowed[torch.tensor(sorted(banned), dtype=torch.int64, device=lv.device)] = False
    neg = torch.tensor(float("-inf"), device=lv.device)
    if tau > 0:
        score = s + gumbel_noise(torch, seed, V, positions, step, 0, lv.device)
    else:
        score = s
    token = torch.where(allowed, score, neg).argmax(dim=1)  # first maximum: ties to lower id
    s64 = torch.where(allowed, s, neg).double()
    lse = torch.logsumexp(s64, dim=1)
    conf = (s64.gather(1, token[:, None])[:, 0] - lse).exp().float()
    return token.tolist(), conf.tolist()


# ------------------------------------------------------------------------------------------------
# Generation (SPEC §4; src/sampler.rs)


class Timer:
    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device != "cpu"

    def start(self):
        if self.cuda:
            self.a = self.torch.cuda.Event(enable_timing=True)
            self.b = self.torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self):
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            return self.a.elapsed_time(self.b) / 1e3
        return time.perf_counter() - self.t0


def generate(model, req, mode):
    """Runs one generation; returns {tokens, steps (trace), forwards, rows_fed, wall_s}."""
    torch, cfg, dev = model.torch, model.cfg, model.device
    if req["temperature"] < 0 or not math.isfinite(req["temperature"]):
        raise PeerError("temperature must be finite and >= 0")
    prompt = list(req["prompt"])
    for i, t in enumerate(prompt):
        if not 0 <= t < cfg["text_vocab"]:
            raise PeerError(f"prompt token {i} is {t}, outside the text vocabulary")
    P = len(prompt)
    R = cfg["n_registers"]
    if req["task"] == "t2i":
        br = IMAGE
        g = req["guidance"]
        order = image_order(req["order"], req["height"], req["width"], req["seed"])
        N = len(order)
        groups, nxt = [], 0
        for c in shift_counts(N, req["steps"]):
            groups.append(order[nxt:nxt + c])
            nxt += c
        prompts = [prompt] + ([[cfg["text_mask_id"]] * P] if g > 0 else [])
        guidance = g if g > 0 else None
        banned = ()
        n_steps = len(groups)
        skip = TEXT
    else:
        br = TEXT
        N = req["answer_len"]
        sched = text_schedule(N, req["block"], req["steps"])
        prompts = [prompt]
        guidance = None
        banned = {cfg["text_mask_id"], *req.get("banned", ())}
        n_steps = len(sched)
        skip = None
    S = len(prompts)
    mid = mask_id(cfg, br)
    prompt_ids = torch.tensor(prompts, dtype=torch.int64, device=dev).reshape(S, P)
    tokens = [None] * N
    trace = []
    forwards = rows_fed = 0
    timer = Timer(torch, dev)
    timer.start()

    def query(k):
        if req["task"] == "t2i":
            return groups[k]
        blk = text_block_range(N, req["block"], sched[k][0])
        return [i for i in blk if tokens[i] is None]

    def commit(k, q, toks, confs):
        if req["task"] == "t2i":
            return list(zip(q, toks))
        order_ = sorted(range(len(q)), key=lambda j: (-confs[j], q[j]))[: sched[k][1]]
        return [(q[j], toks[j]) for j in order_]

    if mode == "dense":
        cache = model.new_cache(S, P + N)
        resp = torch.full((S, N), mid, dtype=torch.int64, device=dev)
        feed = Feed(torch, dev, [TEXT] * P + [br] * N, list(range(P + N)), [0] * (P + N),
                    [0] * (P + N), 0, None, skip=skip)
    else:
        max_q = max(len(query(k)) for k in range(n_steps)) if req["task"] == "t2i" else \
            req["block"]
        cache = model.new_cache(S, P + N + max_q + R)
        if P > 0:
            pre = Feed(torch, dev, [TEXT] * P, list(range(P)), [0] * P, [0] * P, 0, prompt_ids,
                       skip=skip)
            model.forward(pre, cache)
            forwards += 1
            rows_fed += S * P
        filled = P  # clean keys in the pool before this step's C_{k-1}
        prev = []  # (index, token) decoded at the previous step
    for k in range(n_steps):
        t0 = time.perf_counter()
        q = query(k)
        positions = [P + i for i in q]
        if mode == "dense":
            feed.ids = torch.cat([prompt_ids, resp], dim=1)
            feed.logits_rows = [P + i for i in q]
            f = feed
        else:
            c = len(prev)
            n_rows = c + len(q) + R
            ids = [t for _, t in prev] + [mid] * len(q) + [REGISTER] * R
            f = Feed(torch, dev, [br] * n_rows,
                     [P + i for i, _ in prev] + positions + [P + N + r for r in range(R)],
                     [k] * c + [k + 1] * (len(q) + R),  # group k-1 is clean block k
                     [0] * c + [1] * (len(q) + R), filled,
                     torch.tensor(ids, dtype=torch.int64, device=dev)[None].expand(S, -1),
                     logits_rows=range(c, c + len(q)), skip=skip)
        logits = model.forward(f, cache)
        forwards += 1
        rows_fed += S * f.T
        toks, confs = sample(torch, logits, positions, k, req["seed"], req["temperature"],
                             guidance, banned)
        done = commit(k, q, toks, confs)
        for i, t in done:
            tokens[i] = t
        if mode == "dense":
            idx = torch.tensor([i for i, _ in done], dtype=torch.int64, device=dev)
            resp[:, idx] = torch.tensor([t for _, t in done], dtype=torch.int64, device=dev)
        else:
            filled += len(prev)
            prev = done
        trace.append({"step": k, "decoded_positions": [i for i, _ in done],
                      "tokens": [t for _, t in done], "rows_fed": S * f.T,
                      "time_s": time.perf_counter() - t0})
    wall = timer.stop()
    if any(t is None for t in tokens):
        raise PeerError("some response positions were never decoded")
    return {"tokens": tokens, "steps": trace, "forwards": forwards, "rows_fed": rows_fed,
            "wall_s": wall}


def random_prompt(torch, cfg, n, seed):
    gen = torch.Generator().manual_seed(seed ^ 0x5EED)
    ids = torch.randint(0, cfg["text_vocab"] - 1, (n,), generator=gen)
    ids = ids + (ids >= cfg["text_mask_id"]).long()  # skip the [MASK] id
    return ids.tolist()


# ------------------------------------------------------------------------------------------------
# CLI


def write_json(path, doc):
    if path:
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"written to {path}")


def pick_device(torch, name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise PeerError("--device cuda: torch sees no CUDA device")
    return name


def pick_dtype(torch, name, device):
    if name == "auto":
        name = "bf16" if device != "cpu" else "f32"
    return {"bf16": torch.bfloat16, "f32": torch.float32}[name]


def build_model(torch, args, device, dtype):
    cfg = load_config(args.preset, args.config)
    if args.weights:
        tensors = read_safetensors(torch, args.weights)
        check_weights(torch, cfg, tensors, args.weights)
    elif args.weights_device_seed is not None:
        tensors = device_weights(torch, cfg, args.weights_device_seed, device)
    else:
        tensors = random_weights(torch, cfg, args.weights_seed or 0, device, dtype)
    return Model(torch, cfg, tensors, device, dtype)


def weights_label(args):
    if args.weights:
        return args.weights
    if args.weights_device_seed is not None:
        return f"random (the crate's device weights, seed {args.weights_device_seed})"
    return f"random (torch, seed {args.weights_seed or 0})"


def make_request(torch, cfg, args, task):
    prompt_len = args.prompt_len if args.prompt_len is not None else (64 if task == "t2i" else 1024)
    prompt = args.prompt if args.prompt is not None else random_prompt(torch, cfg, prompt_len,
                                                                       args.seed)
    h, w = args.grid
    if task == "t2i":
        steps = args.steps if args.steps is not None else 64
    else:
        steps = args.steps if args.steps is not None else -(-args.answer_len // 2)
    return {"task": task, "prompt": prompt, "height": h, "width": w, "steps": steps,
            "guidance": args.guidance, "temperature": args.temperature, "order": args.order,
            "seed": args.seed, "answer_len": args.answer_len, "block": args.block}


def describe(req):
    if req["task"] == "t2i":
        return (f"t2i {req['height']}x{req['width']}, {req['steps']} steps, prompt "
                f"{len(req['prompt'])}, guidance {req['guidance']}, temperature "
                f"{req['temperature']}, order {req['order']}")
    return (f"text answer {req['answer_len']} (blocks of {req['block']}), {req['steps']} steps, "
            f"prompt {len(req['prompt'])}, temperature {req['temperature']}")


def compare_trace(mine, path):
    """Step-by-step comparison with a crate `generate --trace` file; returns a summary dict."""
    with open(path) as f:
        theirs = json.load(f)["steps"]
    same_pos = len(theirs) == len(mine)
    first_pos = first_tok = None
    tok_diff = tok_total = 0
    for a, b in zip(mine, theirs):
        if a["decoded_positions"] != b["decoded_positions"]:
            same_pos = False
            first_pos = a["step"] if first_pos is None else first_pos
        ta = dict(zip(a["decoded_positions"], a["tokens"]))
        tb = dict(zip(b["decoded_positions"], b["tokens"]))
        for i, t in tb.items():
            tok_total += 1
            if ta.get(i) != t:
                tok_diff += 1
                first_tok = a["step"] if first_tok is None else first_tok
    return {"steps": len(theirs), "same_positions": same_pos, "first_position_mismatch": first_pos,
            "tokens_compared": tok_total, "tokens_differing": tok_diff,
            "first_token_mismatch": first_tok}


def load_case(cfg, path):
    """A crate `forward` case (src/case.rs): (branch, id, pos, block, masked) lists, logits_for
    and the branch skipped after the joint layers (the one the logits rows are not in)."""
    with open(path) as f:
        case = json.load(f)
    rows = case.get("rows") or []
    if not rows:
        raise PeerError("case: no rows")
    br, ids, pos, blk, msk = [], [], [], [], []
    for i, r in enumerate(rows):
        if r.get("branch") not in BRANCH_NAMES:
            raise PeerError(f"case row {i}: branch {r.get('branch')!r}")
        b = BRANCH_NAMES.index(r["branch"])
        rid = REGISTER if r["id"] == "reg" else int(r["id"])
        if rid != REGISTER and not 0 <= rid < (cfg["text_vocab"] if b == TEXT
                                               else cfg["image_vocab"] + 1):
            raise PeerError(f"case row {i}: id {rid} outside the {r['branch']} embedding")
        br.append(b)
        ids.append(rid)
        pos.append(int(r["pos"]))
        blk.append(int(r["block"]))
        msk.append(1 if r["masked"] else 0)
    lf = list(case.get("logits_for") or [])
    for i in lf:
        if not 0 <= i < len(rows) or ids[i] == REGISTER:
            raise PeerError(f"case logits_for: row {i} is missing or a register")
    lbs = {br[i] for i in lf}
    if len(lbs) > 1:
        raise PeerError("case logits_for: rows of both branches")
    skip = (1 - lbs.pop()) if lbs else None
    return (br, ids, pos, blk, msk), lf, skip


def random_case(cfg, seed, n_rows=None):
    """A random `forward` case over cfg's vocabularies (python's random.Random(seed)): clean
    blocks 0..3, masked blocks 5..6 with registers, both branches, positions drawn from
    [0, 3n), no row twice; logits for a random half of one branch's non-register rows. `n_rows`
    rows, or 12..40 drawn from the stream."""
    import random
    rng = random.Random(seed)
    n = rng.randint(12, 40) if n_rows is None else n_rows
    if n < 1:
        raise PeerError(f"--case-rows {n}: a case needs at least one row")
    rows, seen = [], set()
    while len(rows) < n:
        branch = rng.choice(BRANCH_NAMES)
        masked = rng.random() < 0.4
        reg = masked and rng.random() < 0.3
        rows_b = cfg["text_vocab"] if branch == "text" else cfg["image_vocab"] + 1
        row = {"branch": branch, "id": "reg" if reg else rng.randrange(rows_b),
               "pos": rng.randrange(0, 3 * n), "masked": masked,
               "block": rng.randint(5, 6) if masked else rng.randint(0, 3)}
        # The crate refuses a token fed twice (the same branch, id, position, block and mask).
        key = tuple(row.values())
        if key not in seen:
            seen.add(key)
            rows.append(row)
    lb = rng.choice(BRANCH_NAMES)
    cands = [i for i, r in enumerate(rows) if r["branch"] == lb and r["id"] != "reg"]
    rng.shuffle(cands)
    return {"rows": rows, "logits_for": cands[: max(1, len(cands) // 2)]}


def cmd_make_case(args):
    """Writes DIR/config.json (--preset or --config) and DIR/case.json (random_case, --seed,
    --case-rows), the inputs of `sparse-lavida forward` and of --check-logits."""
    cfg = load_config(args.preset, args.config)
    case = random_case(cfg, args.seed, args.case_rows)
    os.makedirs(args.make_case, exist_ok=True)
    with open(os.path.join(args.make_case, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(args.make_case, "case.json"), "w") as f:
        json.dump(case, f)
    print(f"make-case {args.make_case}: {len(case['rows'])} rows, logits for "
          f"{len(case['logits_for'])}")
    return 0


def case_logits(torch, model, case):
    (br, ids, pos, blk, msk), lf, skip = case
    dev = model.device
    feed = Feed(torch, dev, br, pos, blk, msk, 0, torch.tensor([ids], dtype=torch.int64,
                                                                device=dev),
                logits_rows=lf, skip=skip)
    out = model.forward(feed, model.new_cache(1, len(br)))
    return None if out is None else out.cpu()


def rel_l2(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def cmd_check_logits(torch, args):
    """SPEC §6: f32 within 1e-4 of the crate; bf16 within max(1e-2, 2 x the error of the naive
    bf16 twin), the twin run here on the CPU (as tests/gpu_backend.rs bounds the CUDA backend)."""
    d = args.check_logits
    cfg = load_config(None, os.path.join(d, "config.json"))
    case_path = os.path.join(d, "case.json")
    if not os.path.exists(case_path):
        cands = [n for n in sorted(os.listdir(d)) if n.endswith(".json") and n != "config.json"]
        if len(cands) != 1:
            raise PeerError(f"{d}: no case.json and {len(cands)} other JSON files")
        case_path = os.path.join(d, cands[0])
    case = load_case(cfg, case_path)
    device = pick_device(torch, args.device)
    dtype = pick_dtype(torch, args.dtype, device)
    wpath = os.path.join(d, "weights.safetensors")
    seed = args.weights_device_seed
    twin_device = pick_device(torch, args.twin_device)

    def weights(dev):
        """The weights for a model on `dev`: the CASE_DIR file, or the crate's device weights
        (made on the peer's device, the fastest place, then moved)."""
        if seed is not None:
            return device_weights(torch, cfg, seed, device, out_device=dev)
        if not os.path.exists(wpath):
            raise PeerError(f"{d}: no weights.safetensors (or give --weights-device-seed)")
        t = read_safetensors(torch, wpath)
        check_weights(torch, cfg, t, wpath)
        return t

    ref = read_safetensors(torch, os.path.join(d, "logits.safetensors"))["logits"].float()
    ours = case_logits(torch, Model(torch, cfg, weights(device), device, dtype), case)
    if device != "cpu":
        torch.cuda.empty_cache()  # the model above is gone: room for a twin on the device
    if ours is None or list(ours.shape) != list(ref.shape):
        got = None if ours is None else list(ours.shape)
        raise PeerError(f"logits shape {got} vs the crate's {list(ref.shape)}")
    rel = rel_l2(ours, ref)
    f32 = dtype == torch.float32
    twin = None
    if args.tol is not None:
        tol = args.tol
    elif f32:
        tol = 1e-4
    else:
        twin = rel_l2(case_logits(torch, Model(torch, cfg, weights(twin_device), twin_device,
                                               dtype, twin=True), case), ref)
        tol = max(1e-2, 2 * twin)
    ok = rel <= tol and math.isfinite(rel)
    dn = "f32" if f32 else "bf16"
    tw = "" if twin is None else f", naive bf16 twin {twin:.3e}"
    wl = "weights file" if seed is None else f"device weights seed {seed}"
    print(f"check-logits {d}: {len(case[0][0])} rows, logits {list(ref.shape)}, {wl}, {device} "
          f"{dn}: rel L2 {rel:.3e} (tol {tol:.3g}{tw}) {'ok' if ok else 'OVER'}")
    write_json(args.json, {"check_logits": d, "device": device, "dtype": dn, "rel_l2": rel,
                           "twin_rel_l2": twin, "twin_device": None if twin is None
                           else twin_device, "tol": tol, "pass": ok,
                           "weights": wpath if seed is None else {"device_seed": seed},
                           "torch": torch.__version__})
    return 0 if ok else 1


def cmd_generate(torch, args):
    device = pick_device(torch, args.device)
    dtype = pick_dtype(torch, args.dtype, device)
    model = build_model(torch, args, device, dtype)
    task = args.task if args.task != "both" else "t2i"
    mode = args.mode if args.mode != "both" else "sparse"
    req = make_request(torch, model.cfg, args, task)
    g = generate(model, req, mode)
    print(f"task      {describe(req)}")
    print(f"mode      {mode} ({device}, {'f32' if dtype == torch.float32 else 'bf16'})")
    print(f"forwards  {g['forwards']}")
    print(f"rows fed  {g['rows_fed']} ({g['rows_fed'] / len(g['steps']):.1f} per step)")
    print(f"time      {g['wall_s']:.3f} s")
    if args.trace:
        write_json(args.trace, {"backend": f"torch peer ({device})", "task": describe(req),
                                "mode": mode, "forwards": g["forwards"],
                                "rows_fed": g["rows_fed"], "wall_s": g["wall_s"],
                                "steps": g["steps"], "tokens": g["tokens"]})
    if args.compare_trace:
        c = compare_trace(g["steps"], args.compare_trace)
        print(f"vs {args.compare_trace}: {json.dumps(c)}")
        if not c["same_positions"]:
            return 1
    return 0


def cpu_model():
    """The CPU's model name (/proc/cpuinfo), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def cmd_bench(torch, args):
    if args.device == "auto" and not torch.cuda.is_available():
        msg = (f"model peer: nothing timed, torch {torch.__version__} sees no CUDA device "
               "(--device cpu times on the CPU)")
        print(msg)
        write_json(args.json, {"card": None, "torch": torch.__version__, "runs": [],
                               "skipped": msg})
        return 0
    device = pick_device(torch, args.device)
    dtype = pick_dtype(torch, args.dtype, device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    card = torch.cuda.get_device_name() if device != "cpu" else "cpu"
    model = build_model(torch, args, device, dtype)
    if device != "cpu":
        torch.cuda.synchronize()
    preset = args.config or args.preset
    if device == "cpu":
        print(f"machine {cpu_model()}, {torch.get_num_threads()} torch threads, "
              f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"model peer on {card}, torch {torch.__version__}, {preset}, "
          f"{'f32' if dtype == torch.float32 else 'bf16'}; weights ready in "
          f"{time.perf_counter() - t_start:.1f} s")
    tasks = ["t2i", "text"] if args.task == "both" else [args.task]
    modes = ["dense", "sparse"] if args.mode == "both" else [args.mode]
    reqs = {t: make_request(torch, model.cfg, args, t) for t in tasks}
    # Warm-up: a short run of every (task, mode) loads kernels and settles the allocator.
    for t in tasks:
        w = dict(reqs[t])
        if t == "t2i":
            w.update(height=min(w["height"], 8), width=min(w["width"], 8), steps=4)
        else:
            w.update(answer_len=min(w["answer_len"], w["block"]), steps=2)
        for m in modes:
            generate(model, w, m)
    runs = []
    print("| task | mode | wall s (median) | runs | forwards | mean rows/step | speedup |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for t in tasks:
        dense_wall = None
        for m in modes:
            walls, g = [], None
            for r in range(args.repeat):
                if r and time.perf_counter() - t_start > args.budget_s:
                    break  # keep the whole run within budget: fewer repeats, said in the JSON
                g = generate(model, reqs[t], m)
                walls.append(g["wall_s"])
            wall = statistics.median(walls)
            if m == "dense":
                dense_wall = wall
            speed = dense_wall / wall if dense_wall else None
            run = {"task": t, "mode": m, "wall_s": wall, "walls_s": walls,
                   "forwards": g["forwards"], "mean_rows": g["rows_fed"] / len(g["steps"]),
                   "steps": len(g["steps"]), "workload": describe(reqs[t])}
            if speed is not None and m != "dense":
                run["speedup_vs_dense"] = speed
            runs.append(run)
            print(f"| {t} | {m} | {wall:.3f} | {len(walls)} | {g['forwards']} | "
                  f"{run['mean_rows']:.1f} | {'' if speed is None else f'{speed:.2f}x'} |")
    total = time.perf_counter() - t_start
    print(f"total {total:.1f} s")
    write_json(args.json, {
        "card": card, "torch": torch.__version__,
        "cuda": torch.version.cuda if device != "cpu" else None,
        "machine": cpu_model(), "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "preset": preset, "dtype": "f32" if dtype == torch.float32 else "bf16",
        "weights": weights_label(args),
        "timing": ("CUDA events around each whole generation (host sync per step included), "
                   "median of the timed runs after a short warm-up" if device != "cpu"
                   else "perf_counter around each generation"),
        "total_s": total, "runs": runs})
    return 0


def self_test(torch):
    """Known answers that need no model: Philox (Random123 KAT), shift counts, text schedule,
    the stratified order's coverage property, chunked device weights. Returns the number of
    failures."""
    fails = 0

    def check(name, ok):
        nonlocal fails
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
        fails += 0 if ok else 1

    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((M32,) * 4, (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in kat:
        got = philox4x32_10(tuple(torch.tensor([c], dtype=torch.int64) for c in ctr), key)
        check(f"philox KAT {ctr[0]:#x}", tuple(int(g[0]) for g in got) == want)
    c = shift_counts(4096, 64)
    check("shift_counts(4096, 64)", c[:4] == [13, 14, 13, 14] and c[61:] == [240, 267, 301]
          and sum(c) == 4096)
    check("shift_counts(12, 7)", shift_counts(12, 7) == [1, 1, 1, 1, 1, 3, 4])
    check("shift_counts(11, 7) (f64 rounding)", shift_counts(11, 7) == [1, 1, 1, 1, 1, 3, 3])
    check("text_schedule(70, 32, 7)", text_schedule(70, 32, 7) ==
          [(0, 11), (0, 11), (0, 10), (1, 16), (1, 16), (2, 3), (2, 3)])
    check("text_schedule(33, 32, 4) (short last block capped)", text_schedule(33, 32, 4) ==
          [(0, 11), (0, 11), (0, 10), (1, 1)])
    o = image_order("stratified", 16, 16, 7)
    ok = sorted(o) == list(range(256))
    for j in range(1, 4):
        tiles = {((cell // 16) >> (4 - j), (cell % 16) >> (4 - j)) for cell in o[: 4 ** j]}
        ok = ok and len(tiles) == 4 ** j
    check("stratified 16x16: first 4^j picks cover the 2^j tiling", ok)
    cfg = load_config("tiny", None)
    a = device_weights(torch, cfg, 0x100000005, "cpu")
    b = device_weights(torch, cfg, 0x100000005, "cpu", chunk_groups=1001)
    check("device weights: chunks of 1001 groups = one chunk (tiny, 4,800-group embed)",
          all(torch.equal(a[n].view(torch.int16), b[n].view(torch.int16)) for n in a))
    g = gumbel_noise(torch, 0x0123456789ABCDEF, 10, [17, 3], 3, 2, "cpu")
    check("gumbel noise finite, in [-2.8, 17.3]", bool(torch.isfinite(g).all()) and
          float(g.min()) > -2.8 and float(g.max()) < 17.3)
    return fails


def parse_grid(s):
    try:
        h, w = s.lower().split("x")
        h, w = int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid {s!r} is not HxW (e.g. 32x32)") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"zero-size grid {s}")
    return h, w


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--preset", default="lavida-o", help=", ".join(PRESETS))
    ap.add_argument("--config", help="model config JSON (instead of --preset)")
    wsrc = ap.add_mutually_exclusive_group()
    wsrc.add_argument("--weights", help="safetensors weights (bf16/f16/f32; SPEC §2.2 names)")
    wsrc.add_argument("--weights-seed", type=int,
                      help="seed of random torch weights (default 0)")
    wsrc.add_argument("--weights-device-seed", type=int, metavar="S",
                      help="the crate's CUDA random weights for seed S, bit for bit "
                           "(`--device cuda --weights-seed S` there)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--threads", type=int,
                    help="CPU threads of torch (torch.set_num_threads; default: torch's own)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "f32"],
                    help="compute dtype (auto: bf16 on CUDA, f32 on CPU)")
    ap.add_argument("--task", default="both", choices=["t2i", "text", "both"])
    ap.add_argument("--mode", default="both", choices=["dense", "sparse", "both"])
    ap.add_argument("--grid", type=parse_grid, default=(32, 32), help="HxW (t2i)")
    ap.add_argument("--steps", type=int, help="steps (default 64 for t2i, answer-len/2 for text)")
    ap.add_argument("--prompt-len", type=int, help="random prompt length (64 t2i, 1024 text)")
    ap.add_argument("--prompt", type=lambda s: [int(v) for v in s.split(",") if v],
                    help="explicit prompt ids, comma-separated")
    ap.add_argument("--answer-len", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--order", default="stratified", choices=["stratified", "raster", "random"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per (task, mode)")
    ap.add_argument("--budget-s", type=float, default=30.0,
                    help="start no further repeat once this much time has passed")
    ap.add_argument("--check-logits", metavar="CASE_DIR",
                    help="config.json, weights.safetensors (or --weights-device-seed), case "
                         "JSON, logits.safetensors")
    ap.add_argument("--tol", type=float, help="rel L2 tolerance of --check-logits")
    ap.add_argument("--twin-device", default="cpu", choices=["cpu", "cuda"],
                    help="where --check-logits runs the naive bf16 twin (cuda for lavida-o)")
    ap.add_argument("--check-device-weights", metavar="FILE",
                    help="compare --weights-device-seed's tensors with FILE (the crate's "
                         "`init-weights --like-device`) bit for bit")
    ap.add_argument("--make-case", metavar="DIR",
                    help="write DIR/config.json and a random DIR/case.json (--seed)")
    ap.add_argument("--case-rows", type=int, help="rows of --make-case's case (default 12..40)")
    ap.add_argument("--generate", action="store_true",
                    help="one generation (--task, --mode) instead of the timing run")
    ap.add_argument("--trace", help="with --generate: write the per-step trace here")
    ap.add_argument("--compare-trace", help="with --generate: compare with a crate trace")
    ap.add_argument("--self-test", action="store_true")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if args.check_device_weights and args.weights_device_seed is None:
        ap.error("--check-device-weights needs --weights-device-seed")
    for flag in ("weights_seed", "weights_device_seed"):
        v = getattr(args, flag)
        if v is not None and not 0 <= v < 2 ** 64:
            ap.error(f"--{flag.replace('_', '-')} must be in [0, 2^64)")
    if args.make_case:  # no torch needed
        try:
            return cmd_make_case(args)
        except PeerError as e:
            print(f"model.py: error: {e}", file=sys.stderr)
            return 2

    try:
        import torch
    except ImportError as e:
        msg = f"model peer: nothing run, PyTorch is not installed ({e})"
        if args.self_test or args.check_logits or args.check_device_weights or args.generate:
            print(f"model.py: error: {msg}", file=sys.stderr)  # a check must not pass unrun
            return 2
        print(msg)
        write_json(args.json, {"card": None, "torch": None, "runs": [], "skipped": msg})
        return 0
    try:
        if args.self_test:
            return 1 if self_test(torch) else 0
        if args.check_device_weights:
            cfg = load_config(args.preset, args.config)
            device = pick_device(torch, args.device)
            return 1 if check_device_weights(torch, cfg, args.weights_device_seed, device,
                                             args.check_device_weights) else 0
        if args.check_logits:
            return cmd_check_logits(torch, args)
        if args.generate:
            return cmd_generate(torch, args)
        return cmd_bench(torch, args)
    except PeerError as e:
        print(f"model.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
