#!/usr/bin/env python3
"""Host-side emulation of the previous attention kernel, kernels/attention_v1.cu (kept
selectable for one release), no GPU needed; run by kernels/check_attention_layout.py, whose
PTX model (Part 1) it uses: a line-by-line transcription of the v1 kernel (64-row query tiles,
per-pair visibility with the CTA's barrier reductions, double-buffered K/V), run over whole
grids plus the current merge kernel against a naive float64 attention, with the same
assertions (conflict-free ldmatrix, every mma operand defined once, every output written once,
padding never written).
"""

import math

import numpy as np

from check_attention_layout import (LANE, THREADS, S_TILES, Outputs, Smem, bf16, ldmatrix_x4,
                                    mma_16816, naive, shfl_xor, split_chunk, tag_block,
                                    tag_branch, tag_masked, visible, random_problem, run_case)

BLOCK_M = BLOCK_N = 64


# --- Part 2: the kernel, transcribed ---------------------------------------------------------

class Layout:
    def __init__(self, D):
        self.TILE_BYTES = BLOCK_N * D * 2
        self.Q = 0
        self.K = BLOCK_M * D * 2
        self.V = self.K + 2 * self.TILE_BYTES
        self.TAGS = self.V + 2 * self.TILE_BYTES
        self.BYTES = self.TAGS + 2 * BLOCK_N * 4
        assert self.BYTES == (BLOCK_M + 4 * BLOCK_N) * D * 2 + 2 * BLOCK_N * 4  # params.h


def swizzled(D, row, chunk):
    return row * (D * 2) + ((chunk ^ (row & 7)) << 4)


def plan_work(p, tile, head, split):
    if p["n_kv_heads"] == 0 or p["n_heads"] % p["n_kv_heads"]:
        return None
    seq = p["qtile_seq"][tile]
    if seq >= p["n_seqs"]:
        return None
    row0 = p["qtile_row0"][tile]
    row_end = min(p["seq_indptr"][seq + 1], p["n_rows"])
    if row0 >= row_end:
        return None
    key_begin = p["kv_indptr"][seq]
    seq_keys = p["kv_indptr"][seq + 1] - key_begin
    chunk = split_chunk(seq_keys, p["n_splits"])
    start = min(split * chunk, seq_keys)
    end = min(start + chunk, seq_keys)
    return dict(row0=row0, n_valid=min(row_end - row0, BLOCK_M), head=head,
                kv_head=head // (p["n_heads"] // p["n_kv_heads"]), key0=key_begin + start,
                n_keys=end - start)


def load_q_tile(p, w, smem, sQ, D):
    CHUNKS = D // 8
    for tid in range(THREADS):
        for i in range(tid, BLOCK_M * CHUNKS, THREADS):
            r, c = i // CHUNKS, i % CHUNKS
            off = swizzled(D, r, c)
            if r < w["n_valid"]:
                src = (w["row0"] + r) * p["q_stride"] + w["head"] * D + c * 8
                smem.write16(sQ + off, p["q"][src:src + 8])
            else:
                smem.write16(sQ + off, np.zeros(8))


def gather_kv_tile(p, w, tile, smem, sK, sV, sTags, D):
    CHUNKS = D // 8
    first = w["key0"] + tile * BLOCK_N
    n = min(w["n_keys"] - tile * BLOCK_N, BLOCK_N)
    assert 1 <= n <= BLOCK_N
    for tid in range(THREADS):
        for i in range(tid, BLOCK_N * CHUNKS, THREADS):
            j, c = i // CHUNKS, i % CHUNKS
            off = swizzled(D, j, c)
            if j < n:
                slot = p["kv_indices"][first + j]
                src = slot * p["kv_stride"] + w["kv_head"] * D + c * 8
                smem.write16(sK + off, p["k_pool"][src:src + 8])
                smem.write16(sV + off, p["v_pool"][src:src + 8])
            else:
                smem.write16(sK + off, np.zeros(8))
                smem.write16(sV + off, np.zeros(8))
        for j in range(tid, BLOCK_N, THREADS):
            smem.w[(sTags + 4 * j) // 4] = p["kv_tags"][first + j] if j < n else 0


def tile_visibility(smem, sTags, n, t, row_tag, row_ok, joint):
    bits = 0
    for nt in range(S_TILES):
        for e in range(2):
            key = nt * 8 + 2 * t + e
            key_tag = int(smem.w[(sTags + 4 * key) // 4])
            key_ok = key < n
            if row_ok[0] and key_ok and visible(row_tag[0], key_tag, joint):
                bits |= 1 << (nt * 4 + e)
            if row_ok[1] and key_ok and visible(row_tag[1], key_tag, joint):
                bits |= 1 << (nt * 4 + 2 + e)
    return bits


def qk_tile(smem, sQ, sK, warp, D):
    s = np.zeros((32, S_TILES, 4), dtype=np.float32)
    lane = LANE
    a_row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8
    a_chunk = lane >> 4
    b_row = (lane & 7) + (lane >> 4) * 8
    b_chunk = (lane >> 3) & 1
    for kk in range(D // 16):
        a = ldmatrix_x4(smem, sQ + swizzled(D, a_row, 2 * kk + a_chunk))
        for q in range(S_TILES // 2):
            b = ldmatrix_x4(smem, sK + swizzled(D, 16 * q + b_row, 2 * kk + b_chunk))
            sub0 = s[:, 2 * q]; sub1 = s[:, 2 * q + 1]
            mma_16816(sub0, a, b[:, 0], b[:, 1]); s[:, 2 * q] = sub0
            mma_16816(sub1, a, b[:, 2], b[:, 3]); s[:, 2 * q + 1] = sub1
    return s


def softmax_update(s, bits, all_visible, scale_log2, m, l, o):
    """s [32][8][4], bits [32], m/l [32][2], o [32][D/8][4] (all per lane, updated in place)."""
    f32 = np.float32
    tile_max = np.full((32, 2), -np.inf, dtype=f32)
    for nt in range(S_TILES):
        for i in range(4):
            shown = all_visible | (((bits >> (nt * 4 + i)) & 1) == 1)
            s[:, nt, i] = np.where(shown, s[:, nt, i] * f32(scale_log2), -np.inf)
            tile_max[:, i // 2] = np.fmax(tile_max[:, i // 2], s[:, nt, i])
    alpha = np.zeros((32, 2), dtype=f32); base = np.zeros((32, 2), dtype=f32)
    for r in range(2):
        tile_max[:, r] = np.fmax(tile_max[:, r], shfl_xor(tile_max[:, r], 1))
        tile_max[:, r] = np.fmax(tile_max[:, r], shfl_xor(tile_max[:, r], 2))
        m_new = np.fmax(m[:, r], tile_max[:, r])
        none_yet = m_new == -np.inf
        with np.errstate(invalid="ignore"):
            alpha[:, r] = np.where(none_yet, f32(1), np.exp2(m[:, r] - m_new))
        base[:, r] = np.where(none_yet, f32(0), m_new)
        m[:, r] = m_new
    assert not np.isnan(alpha).any()
    row_sum = np.zeros((32, 2), dtype=f32)
    for nt in range(S_TILES):
        for i in range(4):
            s[:, nt, i] = np.exp2(s[:, nt, i] - base[:, i // 2])
            row_sum[:, i // 2] += s[:, nt, i]
    assert not np.isnan(s).any()
    for r in range(2):
        l[:, r] = l[:, r] * alpha[:, r] + row_sum[:, r]
    o[:, :, 0] *= alpha[:, 0:1]; o[:, :, 1] *= alpha[:, 0:1]
    o[:, :, 2] *= alpha[:, 1:2]; o[:, :, 3] *= alpha[:, 1:2]


def pack_bf16x2(lo, hi):
    return np.stack([bf16(lo), bf16(hi)], axis=-1)


def pv_tile(smem, sV, s, o, D):
    lane = LANE
    v_row = (lane & 7) + ((lane >> 3) & 1) * 8
    v_chunk = lane >> 4
    for j in range(BLOCK_N // 16):
        a = np.stack([
            pack_bf16x2(s[:, 2 * j, 0], s[:, 2 * j, 1]),
            pack_bf16x2(s[:, 2 * j, 2], s[:, 2 * j, 3]),
            pack_bf16x2(s[:, 2 * j + 1, 0], s[:, 2 * j + 1, 1]),
            pack_bf16x2(s[:, 2 * j + 1, 2], s[:, 2 * j + 1, 3]),
        ], axis=1)
        for pp in range(D // 16):
            b = ldmatrix_x4(smem, sV + swizzled(D, 16 * j + v_row, 2 * pp + v_chunk), trans=True)
            sub0 = o[:, 2 * pp]; sub1 = o[:, 2 * pp + 1]
            mma_16816(sub0, a, b[:, 0], b[:, 1]); o[:, 2 * pp] = sub0
            mma_16816(sub1, a, b[:, 2], b[:, 3]); o[:, 2 * pp + 1] = sub1


def epilogue(p, w, split, warp, m, l, o, out, D):
    for r in range(2):
        l[:, r] += shfl_xor(l[:, r], 1)
        l[:, r] += shfl_xor(l[:, r], 2)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for r in range(2):
            local = warp * 16 + g + 8 * r
            if local >= w["n_valid"]:
                continue
            row = w["row0"] + local
            lr = l[lane, r]
            seen = lr > 0
            inv_l = np.float32(1) / lr if seen else np.float32(0)
            lse2 = m[lane, r] + np.log2(lr) if seen else -np.inf
            if p["n_splits"] == 1:
                base = row * p["o_stride"] + w["head"] * D + 2 * t
                for nt in range(D // 8):
                    for e in range(2):
                        x = o[lane, nt, 2 * r + e] * inv_l if seen else 0.0
                        out.write("o", base + nt * 8 + e, bf16(x))
                if t == 0:
                    out.write("lse", row * p["n_heads"] + w["head"],
                              lse2 * math.log(2) if seen else -np.inf)
            else:
                row_head = (split * p["n_rows"] + row) * p["n_heads"] + w["head"]
                base = row_head * D + 2 * t
                for nt in range(D // 8):
                    for e in range(2):
                        x = o[lane, nt, 2 * r + e] * inv_l if seen else 0.0
                        out.write("partial_o", base + nt * 8 + e, x)
                if t == 0:
                    out.write("partial_lse", row_head, lse2)


def attention_cta(p, tile, head, split, out, stats):
    D = p["head_dim"]
    w = plan_work(p, tile, head, split)
    if w is None:
        return
    L = Layout(D)
    smem = Smem(L.BYTES)
    sQ = L.Q
    sK = lambda b: L.K + b * L.TILE_BYTES
    sV = lambda b: L.V + b * L.TILE_BYTES
    sTags = lambda b: L.TAGS + 4 * b * BLOCK_N
    n_tiles = (w["n_keys"] + BLOCK_N - 1) // BLOCK_N
    joint = p["joint"] != 0

    # Per (warp, lane) row state.
    row_ok = {}; row_tag = {}; valid_row_bits = {}
    for warp in range(4):
        for lane in range(32):
            ok, tg = [], []
            for r in range(2):
                local = warp * 16 + (lane >> 2) + 8 * r
                ok.append(local < w["n_valid"])
                tg.append(p["row_tags"][w["row0"] + local] if ok[-1] else 0)
            row_ok[warp, lane], row_tag[warp, lane] = ok, tg
            valid_row_bits[warp, lane] = ((0x33333333 if ok[0] else 0)
                                          | (0xCCCCCCCC if ok[1] else 0))

    load_q_tile(p, w, smem, sQ, D)
    if n_tiles > 0:
        gather_kv_tile(p, w, 0, smem, sK(0), sV(0), sTags(0), D)

    o = {warp: np.zeros((32, D // 8, 4), dtype=np.float32) for warp in range(4)}
    m = {warp: np.full((32, 2), -np.inf, dtype=np.float32) for warp in range(4)}
    l = {warp: np.zeros((32, 2), dtype=np.float32) for warp in range(4)}

    for tile_i in range(n_tiles):
        buf = tile_i & 1
        if tile_i + 1 < n_tiles:
            gather_kv_tile(p, w, tile_i + 1, smem, sK(buf ^ 1), sV(buf ^ 1), sTags(buf ^ 1), D)
        n = min(w["n_keys"] - tile_i * BLOCK_N, BLOCK_N)
        bits = {(wp, ln): tile_visibility(smem, sTags(buf), n, ln & 3, row_tag[wp, ln],
                                          row_ok[wp, ln], joint)
                for wp in range(4) for ln in range(32)}
        any_visible = any(b != 0 for b in bits.values())
        all_visible = all(bits[k] == valid_row_bits[k] for k in bits)
        # The fast path's claim: all_visible implies every key of the tile is valid.
        assert not all_visible or n == BLOCK_N
        stats["tiles"] += 1
        stats["skipped"] += not any_visible
        stats["all_visible"] += all_visible
        if any_visible:
            for warp in range(4):
                s = qk_tile(smem, sQ, sK(buf), warp, D)
                wbits = np.array([bits[warp, ln] for ln in range(32)], dtype=np.int64)
                softmax_update(s, wbits, all_visible, p["scale_log2"], m[warp], l[warp], o[warp])
                pv_tile(smem, sV(buf), s, o[warp], D)

    for warp in range(4):
        epilogue(p, w, split, warp, m[warp], l[warp], o[warp], out, D)


# --- Driver ------------------------------------------------------------------------------------

def main_with(rng, merge):
    """The v1 cases (64-row tiles), merged by `merge` (the current sl_attention_merge, which
    both versions share)."""
    cases = [
        # D, heads, kv heads, rows per seq, keys per seq, splits, joint, tags
        (64, 2, 1, [70], [150], 1, True, "random"),       # padding rows, partial key tile, GQA
        (64, 2, 2, [5, 64], [64, 0], 1, False, "random"),  # a sequence with no keys
        (128, 4, 2, [33], [200], 3, True, "random"),       # splits (chunk 128): one short split
        (64, 1, 1, [20, 3], [130, 70], 4, False, "random"),  # empty splits (chunk 64)
        (128, 2, 1, [65], [260], 2, True, "blocks"),       # whole-tile skip / fast path
        (64, 3, 1, [40], [320], 1, True, "blocks"),
        (64, 2, 1, [17, 64], [128, 192], 2, False, "blocks"),
    ]
    stats = dict(tiles=0, skipped=0, all_visible=0)
    for D, H, HKV, rows, keys, Z, joint, mode in cases:
        p = random_problem(rng, D, H, HKV, rows, keys, Z, joint, mode, block_m=BLOCK_M)
        err = run_case(p, stats, attention_cta, merge)
        print(f"ok  v1 D={D} heads={H}/{HKV} rows={rows} keys={keys} splits={Z} joint={joint} "
              f"tags={mode}: o rel L2 {err:.2e}")
    print(f"v1 key tiles: {stats['tiles']}, skipped (none visible) {stats['skipped']}, "
          f"fast path (all visible) {stats['all_visible']}")
    assert stats["skipped"] > 0 and stats["all_visible"] > 0, "fast paths not exercised"
