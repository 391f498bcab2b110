#!/usr/bin/env python3
"""PyTorch SDPA peer of benches/kernels.rs: the same attention problems, timed the same way.

- dense: 2 sequences x 1152 rows x 32 heads x 128, bf16, no mask, every row sees every key of
  its sequence, with the FlashAttention backend forced
  (torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)). This is the figure the crate's
  dense attention must match or beat.
- sparse steps (reference only): the t2i 1024-position schedule (K = 64) steps where C_k first
  reaches 4, 16 and 64; n = 64 registers + C_k + C_k-1 rows per sequence against 128, 1024 and
  5000 keys per sequence (skipped when keys < n), with an explicit boolean mask of the
  step-causal rule (the C_k-1 rows are clean and do not see the C_k + register keys; the C_k and
  register rows see everything), run by the memory-efficient backend (the math backend if that
  refuses the mask). Keys are contiguous here (no gather), and nothing is rotated through L2.

Timing: CUDA events around batches of calls (a batch is at least ~1 ms of GPU time) after a
warm-up; the median of --reps (>= 20) batches, per call. TFLOP/s count 4 * head_dim * heads per
visible (row, key) pair, as benches/kernels.rs does. Keys of the runs ("dense",
"sparse-ck{C_k}-k{keys}") match the "key" of the Rust bench's JSON rows.

Usage: python3 benches/peer/sdpa.py [--json FILE] [--reps N]
Exits 0 with a message (and, with --json, a file saying why) when torch or CUDA is missing;
exits 1 if a run failed.
"""

import argparse
import json
import math
import statistics
import sys

# The t2i schedule comes from the peer model beside this file (it imports torch only to run).
from model import shift_counts

HEADS = 32
HEAD_DIM = 128
N_SEQS = 2
REGISTERS = 64
DENSE_ROWS = 1152
T2I_POSITIONS = 1024
T2I_STEPS = 64
CK_TARGETS = (4, 16, 64)
SPARSE_KEYS = (128, 1024, 5000)


def sparse_steps():
    """(k, C_k, C_k-1) of the first steps whose C_k reaches each target (as the Rust bench)."""
    counts = shift_counts(T2I_POSITIONS, T2I_STEPS)
    steps = []
    for target in CK_TARGETS:
        k = next(k for k in range(1, len(counts)) if counts[k] >= target)
        steps.append((k, counts[k], counts[k - 1]))
    return steps


def write_json(path, doc):
    if path:
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"written to {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--reps", type=int, default=30, help="timed batches (>= 20)")
    args = ap.parse_args()
    reps = max(20, args.reps)

    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        msg = f"sdpa peer: nothing measured, PyTorch is not installed ({e})"
        print(msg)
        write_json(args.json, {"card": None, "torch": None, "runs": [], "skipped": msg})
        return 0
    if not torch.cuda.is_available():
        msg = f"sdpa peer: nothing measured, torch {torch.__version__} sees no CUDA device"
        print(msg)
        write_json(
            args.json, {"card": None, "torch": torch.__version__, "runs": [], "skipped": msg}
        )
        return 0

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def backend(name):
            return sdpa_kernel(getattr(SDPBackend, name))

    except ImportError:  # torch < 2.3
        flags = {
            "FLASH_ATTENTION": dict(enable_flash=True, enable_math=False, enable_mem_efficient=False),
            "EFFICIENT_ATTENTION": dict(
                enable_flash=False, enable_math=False, enable_mem_efficient=True
            ),
            "MATH": dict(enable_flash=False, enable_math=True, enable_mem_efficient=False),
        }

        def backend(name):
            return torch.backends.cuda.sdp_kernel(**flags[name])

    dev = torch.device("cuda")
    card = torch.cuda.get_device_name(dev)
    print(f"sdpa peer on {card}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    gen = torch.Generator(device=dev).manual_seed(2026)

    def rand(*shape):
        return torch.rand(*shape, device=dev, generator=gen, dtype=torch.float32).mul_(2).sub_(1).to(
            torch.bfloat16
        )

    def time_ms(fn):
        """Median GPU ms per call over `reps` event-timed batches of >= ~1 ms."""
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        batch = max(1, math.ceil(1.0 / max(start.elapsed_time(end), 1e-3)))
        for _ in range(batch * 5):
            fn()
        times = []
        for _ in range(reps):
            start.record()
            for _ in range(batch):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / batch)
        return statistics.median(times)

    runs = []
    failed = False

    def run(key, shape, backends, q, k, v, mask, pairs):
        nonlocal failed
        flops = 4.0 * HEAD_DIM * HEADS * pairs
        errors = []
        for name in backends:
            try:
                with backend(name):

                    def call():
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

                    ms = time_ms(call)
            except RuntimeError as e:
                errors.append(f"{name}: {str(e).splitlines()[0]}")
                continue
            tflops = flops / (ms * 1e-3) / 1e12
            runs.append(
                {"key": key, "shape": shape, "backend": name, "ms": ms, "tflops": tflops,
                 "flops": flops}
            )
            print(f"| {shape} | {name} | {ms * 1e3:.2f} | {tflops:.1f} |")
            return
        failed = True
        runs.append({"key": key, "shape": shape, "backend": None, "ms": None, "tflops": None,
                     "error": "; ".join(errors)})
        print(f"| {shape} | failed: {'; '.join(errors)} | - | - |")

    print("| shape | backend | time µs | TFLOP/s |")
    print("|---|---|---:|---:|")

    # Dense: every row sees every key of its sequence; flash backend only.
    q, k, v = (rand(N_SEQS, HEADS, DENSE_ROWS, HEAD_DIM) for _ in range(3))
    run(
        "dense",
        f"dense: {N_SEQS}x{DENSE_ROWS} rows x {DENSE_ROWS} keys, all visible",
        ["FLASH_ATTENTION"],
        q, k, v, None,
        N_SEQS * DENSE_ROWS * DENSE_ROWS,
    )
    del q, k, v

    # Sparse steps with the step-causal mask (True = attend).
    for step, ck, ck1 in sparse_steps():
        rows = REGISTERS + ck + ck1
        masked = REGISTERS + ck
        for keys in SPARSE_KEYS:
            if keys < rows:
                continue
            q = rand(N_SEQS, HEADS, rows, HEAD_DIM)
            k = rand(N_SEQS, HEADS, keys, HEAD_DIM)
            v = rand(N_SEQS, HEADS, keys, HEAD_DIM)
            mask = torch.ones(rows, keys, dtype=torch.bool, device=dev)
            mask[:ck1, keys - masked:] = False  # clean C_k-1 rows: not the masked block's keys
            pairs = N_SEQS * int(mask.sum().item())
            mask = mask.expand(N_SEQS, 1, rows, keys)
            run(
                f"sparse-ck{ck}-k{keys}",
                f"sparse step {step}: {N_SEQS}x{rows} rows (C_k {ck} + C_k-1 {ck1} + R "
                f"{REGISTERS}) x {keys} keys",
                ["EFFICIENT_ATTENTION", "MATH"],
                q, k, v, mask, pairs,
            )
            del q, k, v, mask

    write_json(
        args.json,
        {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda,
         "timing": f"median of {reps} CUDA-event-timed batches", "runs": runs},
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
