#!/usr/bin/env python3
"""Static figures of the built kernels, from their SASS (no GPU): called by scripts/check-kernels.

    scripts/sass-figures.py OUT_DIR CUDA_BIN [--json FILE] [--check]

OUT_DIR is the crate's build-script output (cubins in OUT_DIR/kernels, ptxas's per-function
resources in OUT_DIR/ptxas-summary.tsv); CUDA_BIN the folder of the nvcc that built them
(nvdisasm beside it). For every kernel and architecture it prints, and writes to
OUT_DIR/kernels/sass-figures.json (or --json FILE):

  - registers, static and dynamic shared memory (params.h's launch geometry), and the CTAs that
    fit one SM (the occupancy calculator's rule: registers in 256-register units per warp,
    shared memory plus the 1 KiB the driver reserves per CTA, threads, 32 CTAs);
  - the SASS instruction mix: total (NOPs excluded), HMMA, LDSM, LDGSTS, BAR, SHFL.

For the attention kernels it also attributes the key loop's SASS to source regions. The kernel
sources tag lines with `// [sass:NAME]`; nvdisasm -gi gives each instruction its source line and
inlining chain, and an instruction belongs to the region of the innermost tagged line of its
chain. `loop-begin` / `loop-end` bound the key loop, `mb1` / `mb2` the instantiation with one or
two m-blocks per warp (64- or 128-row query tiles). Per key tile, per warp, of the steady-state
loop (region sizes are static counts: a region's instructions run once per tile; code on a
branch not taken in the scenario is excluded by the choice of regions):

  v2 visible : every loop region but `mask`, `fetch-tags`, `gather-partial`, `rescale` and
               `loop-head` (a full 64-key tile that every row sees entirely: no key tags, no
               masking; no row's running max moves, the steady state, so o is not rescaled);
  v2 visible rescaled : visible + `rescale` (a tile that moves some row's max);
  v2 mixed   : visible + `mask` (warps 0-1 fetch the indices; warps 2-3 fetch the tags, the same
               cost);
  v2 hidden  : `cursor` alone (the summary read and the classification; no fetch, no gather);
  v1         : the whole loop body but `loop-head` (its gather, per-pair visibility and
               barrier reductions, and math run for every tile that any row sees).
`loop-head` is what nvdisasm puts on the loop's own line: its test and the pre-header (the
accumulators' zeroing, which ptxas hoists there), not per-tile work.

--check fails unless, for head_dim 128 on sm_90 with 128-row tiles, a fully visible tile costs
at most half of v1's instructions per HMMA, and a hidden tile issues no LDGSTS (no gather).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "kernels")

# Per-SM limits of the architectures built (CUDA occupancy calculator's inputs).
LIMITS = {
    "sm_80": dict(regs=65536, threads=2048, ctas=32, smem=167936, reserved=1024),
    "sm_90": dict(regs=65536, threads=2048, ctas=32, smem=233472, reserved=1024),
}

# Launch geometry of each kernel: (block threads macro, dynamic shared memory expression), both
# evaluated by the C compiler on params.h.
GEOMETRY = {
    "sl_attention_hd64": ("SL_ATTN_THREADS", "SL_ATTN_SMEM_BYTES(64)"),
    "sl_attention_hd128": ("SL_ATTN_THREADS", "SL_ATTN_SMEM_BYTES(128)"),
    "sl_attention_v1_hd64": ("SL_ATTN_THREADS", "SL_ATTN_V1_SMEM_BYTES(64)"),
    "sl_attention_v1_hd128": ("SL_ATTN_THREADS", "SL_ATTN_V1_SMEM_BYTES(128)"),
    "sl_attention_merge": ("SL_MERGE_THREADS", "0"),
    "sl_sample": ("SL_SAMPLE_THREADS", "0"),
    "sl_masked_softmax": ("SL_SOFTMAX_THREADS", "0"),
    "sl_embed": ("SL_ROW_THREADS", "0"),
    "sl_rmsnorm": ("SL_ROW_THREADS", "0"),
    "sl_rope_kv": ("SL_ROW_THREADS", "0"),
    "sl_swiglu": ("SL_ELEM_THREADS", "0"),
    "sl_aggregate_sparse": ("SL_AGG_THREADS", "0"),
    "sl_init_uniform": ("SL_ELEM_THREADS", "0"),
    "sl_resolve_plan": ("SL_PROGRAM_THREADS", "0"),
    "sl_commit": ("SL_PROGRAM_THREADS", "0"),
    "sl_gather_rows": ("SL_GATHER_THREADS", "0"),
    "sl_fill_u32": ("SL_ELEM_THREADS", "0"),
}

MIX = ["HMMA", "LDSM", "LDGSTS", "BAR", "SHFL"]


def fail(msg):
    sys.exit("sass-figures: " + msg)


def params_values():
    """{expression: value} for every expression of GEOMETRY, from the C compiler."""
    exprs = sorted({e for pair in GEOMETRY.values() for e in pair})
    prog = '#include <stdio.h>\n#include "params.h"\nint main(void) {\n'
    for e in exprs:
        prog += 'printf("%%llu\\n", (unsigned long long)(%s));\n' % e
    prog += "return 0;\n}\n"
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "p.c"), os.path.join(d, "p")
        open(src, "w").write(prog)
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, "-std=c11", "-I", KERNELS, src, "-o", exe], check=True)
        out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout.split()
    return dict(zip(exprs, map(int, out)))


def ptxas_summary(out_dir):
    """{(file stem, arch, kernel): {registers, smem, stack, spills}} from ptxas-summary.tsv."""
    res = {}
    with open(os.path.join(out_dir, "ptxas-summary.tsv")) as f:
        head = f.readline().rstrip("\n").split("\t")
        for line in f:
            row = dict(zip(head, line.rstrip("\n").split("\t")))
            if row["kind"] != "kernel":
                continue
            stem = row["file"].rsplit(".", 1)[0]
            res[(stem, row["target"], row["function"])] = dict(
                registers=int(row["registers"]), smem=int(row["smem"]),
                spill=int(row["spill_stores"]) + int(row["spill_loads"]))
    return res


def ctas_per_sm(arch, threads, regs, smem):
    lim = LIMITS[arch]
    warps = (threads + 31) // 32
    per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
    by_regs = lim["regs"] // (warps * per_warp) if regs else lim["ctas"]
    by_smem = lim["smem"] // (smem + lim["reserved"])
    return max(0, min(lim["threads"] // threads, lim["ctas"], by_regs, by_smem))


INSN = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
LINE = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
FUNC = re.compile(r"^\s*\.text\.(\w+):")


def disassemble(nvdisasm, cubin):
    """{kernel: [(opcode, chain)]}: chain = [(file base name, line)], innermost first."""
    text = subprocess.run([nvdisasm, "-gi", "-c", cubin], check=True, capture_output=True,
                          text=True).stdout
    kernels, cur, chain, fresh = {}, None, [], False
    for line in text.splitlines():
        m = FUNC.match(line)
        if m:
            cur = kernels.setdefault(m.group(1), [])
            chain, fresh = [], False
            continue
        m = LINE.search(line)
        if m:
            if not fresh:  # a new chain block starts
                chain, fresh = [], True
            if not chain:
                chain.append((os.path.basename(m.group(1)), int(m.group(2))))
            if m.group(3):
                chain.append((os.path.basename(m.group(3)), int(m.group(4))))
            continue
        m = INSN.match(line)
        if m and cur is not None:
            fresh = False
            op = m.group(3)
            if op != "NOP":
                cur.append((op, list(chain)))
    return kernels


def mix(ops):
    out = {"total": len(ops)}
    for k in MIX:
        out[k] = sum(1 for o in ops if o == k or o.startswith(k + "."))
    return out


def tags_of(path):
    """{line: tag} of a kernel source's `// [sass:NAME]` tags."""
    tags = {}
    for i, line in enumerate(open(path), 1):
        m = re.search(r"\[sass:([a-z0-9-]+)\]", line)
        if m:
            tags[i] = m.group(1)
    return tags


def loop_regions(insns, src):
    """{region: [opcodes]} of the key loop, per instantiation ("mb1", "mb2" or "all")."""
    tags = tags_of(os.path.join(KERNELS, src))
    begin = [l for l, t in tags.items() if t == "loop-begin"]
    end = [l for l, t in tags.items() if t == "loop-end"]
    if len(begin) != 1 or len(end) != 1:
        fail(f"{src}: one [sass:loop-begin] and one [sass:loop-end] expected")
    lo, hi = begin[0], end[0]
    out = {}
    for op, chain in insns:
        own = [ln for f, ln in chain if f == src]
        if not any(lo <= ln <= hi for ln in own):
            continue
        inst = next((tags[ln] for ln in own if tags.get(ln) in ("mb1", "mb2")), "all")
        region = next((tags[ln] for ln in own if ln in tags and tags[ln] not in
                       ("mb1", "mb2", "loop-end")), "other")
        if region == "loop-begin":  # the loop's header line: its pre-header (accumulator
            region = "loop-head"    # zeroing, hoisted there) and its test
        out.setdefault(inst, {}).setdefault(region, []).append(op)
    return out


# Regions of v2's sub-tile loop (keys in sub-tiles of 8·NT; the loop is not unrolled where NT <
# 8): they run 64 / (8·NT) times per key tile.
SUBTILE = ("sub", "qk", "mask", "softmax", "rescale", "pv")


def attention_figures(regions_v2, regions_v1, head_dim):
    """Per key tile and warp: v2 visible / mixed / hidden (128-row tiles), v1."""
    r2 = dict(regions_v2.get("mb2", {}))
    # A 64-key tile is 2·head_dim HMMA per warp with two m-blocks (QK: 2·8·hd/16, PV:
    # 2·4·hd/8); the sub-tile loop's body holds that many over its repetitions.
    found = sum(1 for k in ("qk", "pv") for o in r2.get(k, []) if o.startswith("HMMA"))
    if not found or (2 * head_dim) % found:
        fail(f"head_dim {head_dim}: {found} HMMA in the sub-tile loop, not a part of "
             f"{2 * head_dim}")
    reps = 2 * head_dim // found
    for k in SUBTILE:
        r2[k] = r2.get(k, []) * reps
    visible_ops = [o for k, ops in r2.items() for o in ops if k not in
                   ("mask", "fetch-tags", "gather-partial", "loop-head", "rescale")]
    rescaled_ops = visible_ops + r2.get("rescale", [])
    mixed_ops = visible_ops + r2.get("mask", [])
    hidden_ops = r2.get("cursor", [])
    v1_ops = [o for k, ops in regions_v1.get("all", {}).items() for o in ops if k != "loop-head"]
    out = {}
    for name, ops in [("v2_visible", visible_ops), ("v2_visible_rescaled", rescaled_ops),
                      ("v2_mixed", mixed_ops), ("v2_hidden", hidden_ops), ("v1_tile", v1_ops)]:
        f = mix(ops)
        f["per_hmma"] = round(f["total"] / f["HMMA"], 2) if f["HMMA"] else None
        out[name] = f
    out["v2_subtile_repetitions"] = reps
    out["v2_regions"] = {k: len(v) for k, v in sorted(r2.items())}
    out["v1_regions"] = {k: len(v) for k, v in sorted(regions_v1.get("all", {}).items())}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("cuda_bin")
    ap.add_argument("--json")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    nvdisasm = os.path.join(args.cuda_bin, "nvdisasm")
    if not os.access(nvdisasm, os.X_OK):
        fail(f"{nvdisasm} not found (it comes with nvcc)")
    values = params_values()
    resources = ptxas_summary(args.out_dir)
    cubins = sorted(f for f in os.listdir(os.path.join(args.out_dir, "kernels"))
                    if f.endswith(".cubin"))
    figures = {"kernels": {}, "attention_loop": {}}
    disasm = {}
    for cubin in cubins:
        stem, arch = cubin[:-len(".cubin")].rsplit(".", 1)
        arch_key = "sm_90" if arch == "sm_90a" else arch
        if arch_key not in LIMITS:
            continue
        kernels = disassemble(nvdisasm, os.path.join(args.out_dir, "kernels", cubin))
        disasm[(stem, arch)] = kernels
        for name, insns in sorted(kernels.items()):
            if name not in GEOMETRY:
                fail(f"{name} ({cubin}) has no launch geometry in scripts/sass-figures.py")
            threads_e, smem_e = GEOMETRY[name]
            threads, dyn = values[threads_e], values[smem_e]
            res = resources.get((stem, arch, name))
            if res is None:
                fail(f"no ptxas figures for {name} ({arch})")
            f = dict(arch=arch, registers=res["registers"], static_smem=res["smem"],
                     dynamic_smem=dyn, threads=threads,
                     ctas_per_sm=ctas_per_sm(arch_key, threads, res["registers"],
                                             res["smem"] + dyn),
                     sass=mix([op for op, _ in insns]))
            figures["kernels"].setdefault(name, {})[arch] = f

    print("%-22s %-6s %5s %7s %7s %4s %7s %6s %5s %6s %4s %5s" % (
        "kernel", "arch", "regs", "smem", "dynsmem", "CTA", "SASS", "HMMA", "LDSM", "LDGSTS",
        "BAR", "SHFL"))
    for name in sorted(figures["kernels"]):
        for arch, f in sorted(figures["kernels"][name].items()):
            s = f["sass"]
            print("%-22s %-6s %5d %7d %7d %4d %7d %6d %5d %6d %4d %5d" % (
                name, arch, f["registers"], f["static_smem"], f["dynamic_smem"],
                f["ctas_per_sm"], s["total"], s["HMMA"], s["LDSM"], s["LDGSTS"], s["BAR"],
                s["SHFL"]))

    status = 0
    for arch in ("sm_80", "sm_90"):
        v2 = disasm.get(("attention", arch))
        v1 = disasm.get(("attention_v1", arch))
        if not v2 or not v1:
            continue
        for hd in (64, 128):
            r2 = loop_regions(v2[f"sl_attention_hd{hd}"], "attention.cu")
            r1 = loop_regions(v1[f"sl_attention_v1_hd{hd}"], "attention_v1.cu")
            fig = attention_figures(r2, r1, hd)
            figures["attention_loop"][f"hd{hd}_{arch}"] = fig
            print(f"\nattention hd{hd} {arch}, per 64-key tile and warp (key loop, 128-row tiles "
                  f"for v2):")
            for k in ("v2_visible", "v2_visible_rescaled", "v2_mixed", "v2_hidden", "v1_tile"):
                f = fig[k]
                print("  %-19s %5d instructions, %3d HMMA (%s per HMMA), %3d LDSM, %3d LDGSTS, "
                      "%2d BAR, %3d SHFL" % (k, f["total"], f["HMMA"], f["per_hmma"], f["LDSM"],
                                             f["LDGSTS"], f["BAR"], f["SHFL"]))
            print(f"  v2 regions (sub-tile loop x{fig['v2_subtile_repetitions']}): " +
                  ", ".join(f"{k} {v}" for k, v in fig["v2_regions"].items()))
            print("  v1 regions: " + ", ".join(f"{k} {v}" for k, v in fig["v1_regions"].items()))
            if args.check and hd == 128 and arch == "sm_90":
                vis, old = fig["v2_visible"], fig["v1_tile"]
                if not (vis["per_hmma"] and old["per_hmma"]):
                    print("sass-figures: FAIL: no HMMA found in an attention key loop",
                          file=sys.stderr)
                    status = 1
                elif vis["per_hmma"] > 0.5 * old["per_hmma"]:
                    print(f"sass-figures: FAIL: a fully visible tile costs {vis['per_hmma']} "
                          f"instructions per HMMA, more than half of v1's {old['per_hmma']}",
                          file=sys.stderr)
                    status = 1
                if fig["v2_hidden"]["LDGSTS"] != 0 or fig["v2_hidden"]["HMMA"] != 0:
                    print("sass-figures: FAIL: a hidden tile gathers or computes",
                          file=sys.stderr)
                    status = 1

    path = args.json or os.path.join(args.out_dir, "kernels", "sass-figures.json")
    with open(path, "w") as f:
        json.dump(figures, f, indent=1, sort_keys=True)
    print(f"\nwritten to {path}")
    sys.exit(status)


if __name__ == "__main__":
    main()
