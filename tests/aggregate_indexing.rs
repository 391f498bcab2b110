//! `kernels/aggregate.cu` (`sl_aggregate_sparse`) re-implemented on the CPU with the kernel's own
//! index math — block by block, thread by thread, including the chunked warp-shuffle exclusive
//! scan and the bounds clamps — and checked against its oracle, `sparse_plan(.., Switches::ALL_ON,
//! prefilled = P > 0)` packed by `PlanBuilder::build`, on random decode states.
//!
//! It also documents how a GPU test builds the kernel's inputs from a [`DecodeState`]
//! ([`KernelInputs::from_state`]) and which plan fields each output must equal
//! ([`assert_matches_plan`]).

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_lavida::config::Branch;
use sparse_lavida::plan::{REGISTER, StepPlan};
use sparse_lavida::sampler::{DecodeState, Layout, Switches, sparse_plan};

/// Marks an output element the simulated kernel never wrote.
const POISON: u32 = 0xDEAD_BEEF;

/// The `SlAggregateParams` inputs (kernels/params.h), host side.
#[derive(Debug, Clone)]
struct KernelInputs {
    tokens: Vec<u32>,
    decoded_step: Vec<u32>,
    decoded_order: Vec<u32>,
    group_indptr: Vec<u32>,
    query: Vec<u32>,
    k: u32,
    n_seqs: u32,
    prompt_len: u32,
    n_response: u32,
    n_registers: u32,
    slots_per_seq: u32,
    mask_id: u32,
    branch: u32,
    rows_per_seq: u32,
    keys_per_seq: u32,
}

impl KernelInputs {
    /// The kernel's inputs for step `k = st.groups.len()`, exactly as the CUDA backend builds
    /// them: `decoded_step[i] = j` for `i ∈ groups[j]` (else `u32::MAX`), `decoded_order` =
    /// the groups concatenated (padded to `N`), `group_indptr` = their prefix sums, and the
    /// per-sequence counts from the same data.
    fn from_state(l: &Layout, st: &DecodeState, query: &[u32]) -> KernelInputs {
        let n = l.n;
        let k = st.groups.len();
        let mut decoded_step = vec![u32::MAX; n];
        let mut decoded_order = Vec::with_capacity(n);
        let mut group_indptr = vec![0u32];
        for (j, g) in st.groups.iter().enumerate() {
            for &i in g {
                decoded_step[i as usize] = j as u32;
                decoded_order.push(i);
            }
            group_indptr.push(decoded_order.len() as u32);
        }
        let n_decoded = decoded_order.len();
        decoded_order.resize(n, POISON); // never read past group_indptr[k]
        let newest = st.groups.last().map_or(0, Vec::len);
        KernelInputs {
            // Undecoded entries are garbage the kernel must not read.
            tokens: st.tokens.iter().map(|t| t.unwrap_or(POISON)).collect(),
            decoded_step,
            decoded_order,
            group_indptr,
            query: query.to_vec(),
            k: k as u32,
            n_seqs: l.n_seqs() as u32,
            prompt_len: l.p() as u32,
            n_response: n as u32,
            n_registers: l.r as u32,
            slots_per_seq: l.slots_per_seq as u32,
            mask_id: l.mask_id,
            branch: l.branch as u32,
            rows_per_seq: (newest + query.len() + l.r) as u32,
            keys_per_seq: (l.p() + n_decoded + query.len() + l.r) as u32,
        }
    }
}

/// The kernel's output arrays.
#[derive(Debug, Clone, PartialEq)]
struct KernelOutputs {
    row_ids: Vec<u32>,
    row_pos: Vec<u32>,
    row_tags: Vec<u32>,
    row_slots: Vec<u32>,
    kv_indices: Vec<u32>,
    kv_tags: Vec<u32>,
    logits_rows: Vec<u32>,
}

/// `sl::make_tag` (kernels/common.cuh).
fn make_tag(branch: u32, block: u32, masked: bool) -> u32 {
    (block << 2) | (branch << 1) | u32::from(masked)
}

/// `block_exclusive_scan` for a block of `v.len()` threads (a multiple of 32): returns each
/// thread's exclusive prefix and the block total, computed the way the kernel does (Hillis-Steele
/// shuffles within each warp, warp 0 scanning the warp totals).
fn block_exclusive_scan(v: &[u32]) -> (Vec<u32>, u32) {
    assert!(v.len().is_multiple_of(32) && v.len() <= 1024);
    let n_warps = v.len() / 32;
    let warp_inclusive = |x: &[u32]| -> Vec<u32> {
        let mut inc = x.to_vec();
        let mut o = 1;
        while o < 32 {
            // __shfl_up_sync reads every lane's value before any lane adds.
            let prev = inc.clone();
            for lane in o..32 {
                inc[lane] = inc[lane].wrapping_add(prev[lane - o]);
            }
            o <<= 1;
        }
        inc
    };
    let inc: Vec<u32> = v.chunks(32).flat_map(warp_inclusive).collect();
    let mut lanes = vec![0u32; 32];
    for w in 0..n_warps {
        lanes[w] = inc[w * 32 + 31];
    }
    let warp_sums = warp_inclusive(&lanes);
    let total = warp_sums[n_warps - 1];
    let excl = (0..v.len())
        .map(|t| {
            let warp = t / 32;
            let before_warp = if warp == 0 { 0 } else { warp_sums[warp - 1] };
            before_warp.wrapping_add(inc[t]).wrapping_sub(v[t])
        })
        .collect();
    (excl, total)
}

/// `sl_aggregate_sparse` with `threads` threads per block, statement for statement. Threads of
/// a block write disjoint elements between barriers, so running them one after the other gives
/// the kernel's result. Indexing a `Vec` out of bounds panics, so an out-of-bounds write of the
/// kernel's index math would fail the test.
fn simulate(p: &KernelInputs, threads: u32) -> KernelOutputs {
    let rows = (p.n_seqs * p.rows_per_seq) as usize;
    let keys = (p.n_seqs * p.keys_per_seq) as usize;
    let mut o = KernelOutputs {
        row_ids: vec![POISON; rows],
        row_pos: vec![POISON; rows],
        row_tags: vec![POISON; rows],
        row_slots: vec![POISON; rows],
        kv_indices: vec![POISON; keys],
        kv_tags: vec![POISON; keys],
        logits_rows: vec![POISON; (p.n_seqs * p.query.len() as u32) as usize],
    };
    let (pl, n, r_count, nq) = (
        p.prompt_len,
        p.n_response,
        p.n_registers,
        p.query.len() as u32,
    );
    for s in 0..p.n_seqs {
        let base = s * p.slots_per_seq;
        let resp_slot0 = base + pl;
        let scratch_slot0 = base + pl + n;
        let new_tag = make_tag(p.branch, p.k, false);
        let masked_tag = make_tag(p.branch, p.k + 1, true);
        let row0 = (s * p.rows_per_seq) as usize;
        let key0 = (s * p.keys_per_seq) as usize;
        let put_row = |o: &mut KernelOutputs, r: u32, id, pos, tag, slot| {
            if r >= p.rows_per_seq {
                return;
            }
            let i = row0 + r as usize;
            o.row_ids[i] = id;
            o.row_pos[i] = pos;
            o.row_tags[i] = tag;
            o.row_slots[i] = slot;
        };
        let put_key = |o: &mut KernelOutputs, c: u32, slot, tag| {
            if c >= p.keys_per_seq {
                return;
            }
            o.kv_indices[key0 + c as usize] = slot;
            o.kv_tags[key0 + c as usize] = tag;
        };

        let (mut g0, mut g1) = (0, 0);
        if p.k > 0 {
            g0 = p.group_indptr[p.k as usize - 1].min(n);
            g1 = p.group_indptr[p.k as usize].max(g0).min(n);
        }
        let n_new = g1 - g0;
        for tid in 0..threads {
            for t in (tid..n_new).step_by(threads as usize) {
                let i = p.decoded_order[(g0 + t) as usize];
                let id = if i < n {
                    p.tokens[i as usize]
                } else {
                    p.mask_id
                };
                put_row(&mut o, t, id, pl + i, new_tag, resp_slot0 + i);
            }
            for j in (tid..nq).step_by(threads as usize) {
                let r = n_new + j;
                let q = p.query[j as usize];
                put_row(&mut o, r, p.mask_id, pl + q, masked_tag, scratch_slot0 + j);
                if r < p.rows_per_seq {
                    o.logits_rows[(s * nq + j) as usize] = row0 as u32 + r;
                }
            }
            for r in (tid..r_count).step_by(threads as usize) {
                let slot = scratch_slot0 + nq + r;
                put_row(
                    &mut o,
                    n_new + nq + r,
                    REGISTER,
                    pl + n + r,
                    masked_tag,
                    slot,
                );
            }
        }

        let prompt_tag = make_tag(0, 0, false);
        for tid in 0..threads {
            for t in (tid..pl).step_by(threads as usize) {
                put_key(&mut o, t, base + t, prompt_tag);
            }
        }
        let mut n_decoded = 0;
        for c0 in (0..n).step_by(threads as usize) {
            let steps: Vec<u32> = (0..threads)
                .map(|tid| {
                    let i = c0 + tid;
                    if i < n {
                        p.decoded_step[i as usize]
                    } else {
                        u32::MAX
                    }
                })
                .collect();
            let flags: Vec<u32> = steps.iter().map(|&st| u32::from(st < p.k)).collect();
            let (before, chunk_total) = block_exclusive_scan(&flags);
            for tid in 0..threads {
                if flags[tid as usize] == 1 {
                    let (i, step) = (c0 + tid, steps[tid as usize]);
                    let tag = make_tag(p.branch, step + 1, false);
                    put_key(
                        &mut o,
                        pl + n_decoded + before[tid as usize],
                        resp_slot0 + i,
                        tag,
                    );
                }
            }
            n_decoded += chunk_total;
        }
        for tid in 0..threads {
            for j in (tid..nq + r_count).step_by(threads as usize) {
                put_key(&mut o, pl + n_decoded + j, scratch_slot0 + j, masked_tag);
            }
        }
    }
    o
}

/// What a GPU test asserts: the kernel's outputs equal the oracle plan's response-branch rows,
/// keys and logits rows, and the plan's CSR offsets are the fixed per-sequence counts.
fn assert_matches_plan(out: &KernelOutputs, p: &KernelInputs, plan: &StepPlan, branch: Branch) {
    let rows = plan.rows(branch);
    let other = plan.rows(match branch {
        Branch::Text => Branch::Image,
        Branch::Image => Branch::Text,
    });
    assert!(other.is_empty(), "the other branch has rows");
    let per_seq = |c: u32| (0..=p.n_seqs).map(|s| s * c).collect::<Vec<u32>>();
    assert_eq!(rows.seq_indptr, per_seq(p.rows_per_seq), "seq_indptr");
    assert_eq!(plan.kv_indptr, per_seq(p.keys_per_seq), "kv_indptr");
    assert_eq!(out.row_ids, rows.ids, "row ids");
    assert_eq!(out.row_pos, rows.pos, "row positions");
    let tags: Vec<u32> = rows.tags.iter().map(|t| t.0).collect();
    assert_eq!(out.row_tags, tags, "row tags");
    assert_eq!(out.row_slots, rows.slots, "row slots");
    assert_eq!(out.kv_indices, plan.kv_indices, "kv indices");
    let kv_tags: Vec<u32> = plan.kv_tags.iter().map(|t| t.0).collect();
    assert_eq!(out.kv_tags, kv_tags, "kv tags");
    assert_eq!(out.logits_rows, plan.logits_rows, "logits rows");
    if !p.query.is_empty() {
        assert_eq!(plan.logits_branch, Some(branch));
    }
}

/// A random generation in progress: layout, decode state after `k` steps, and the query of
/// step `k` (the next indices of a random decode order, so neither sorted nor contiguous).
fn random_case(rng: &mut ChaCha8Rng) -> (Layout, DecodeState, Vec<u32>) {
    let n = rng.gen_range(1..=700usize);
    let p = rng.gen_range(0..=6usize);
    let r = rng.gen_range(0..=5usize);
    let n_seqs = rng.gen_range(1..=2usize);
    let branch = if rng.gen_bool(0.5) {
        Branch::Image
    } else {
        Branch::Text
    };
    let prompts = (0..n_seqs)
        .map(|_| (0..p).map(|_| rng.gen_range(0..1000)).collect())
        .collect();
    let layout = Layout {
        prompts,
        n,
        r,
        branch,
        mask_id: 4321,
        skip: (branch == Branch::Image).then_some(Branch::Text),
        slots_per_seq: p + 2 * n + r,
    };

    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(rng);
    let k = rng.gen_range(0..=7usize);
    let mut st = DecodeState {
        tokens: vec![None; n],
        groups: Vec::with_capacity(k),
    };
    let mut next = 0;
    for _ in 0..k {
        // Mostly non-empty groups, sometimes empty ones (the kernel must not care).
        let size = rng.gen_range(0..=(n - next).min(150));
        let group = order[next..next + size].to_vec();
        for &i in &group {
            st.tokens[i as usize] = Some(rng.gen_range(0..50_000));
        }
        st.groups.push(group);
        next += size;
    }
    let nq = rng.gen_range(0..=(n - next).min(300));
    let query = order[next..next + nq].to_vec();
    (layout, st, query)
}

#[test]
fn kernel_index_math_equals_sparse_plan() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_a66e);
    for case in 0..300 {
        let (layout, st, query) = random_case(&mut rng);
        let k = st.groups.len();
        let plan = sparse_plan(&layout, &st, &query, k, Switches::ALL_ON, layout.p() > 0).unwrap();
        let inputs = KernelInputs::from_state(&layout, &st, &query);
        // SL_AGG_THREADS, and smaller blocks so that N spans many scan chunks.
        for threads in [256, 64, 32] {
            let out = simulate(&inputs, threads);
            assert!(
                !out.kv_indices.contains(&POISON) && !out.row_ids.contains(&POISON),
                "case {case}, {threads} threads: an output was not written"
            );
            assert_matches_plan(&out, &inputs, &plan, layout.branch);
        }
    }
}

#[test]
fn scan_matches_a_serial_prefix_sum() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for threads in [32usize, 64, 256, 1024] {
        let v: Vec<u32> = (0..threads).map(|_| rng.gen_range(0..3)).collect();
        let (excl, total) = block_exclusive_scan(&v);
        let mut acc = 0;
        for (t, &x) in v.iter().enumerate() {
            assert_eq!(excl[t], acc, "{threads} threads, thread {t}");
            acc += x;
        }
        assert_eq!(total, acc);
    }
}

#[test]
fn inconsistent_counts_never_write_outside_a_sequence() {
    // decoded_step claims one more decoded index than group_indptr (so keys_per_seq is one
    // short): the extra key must be dropped, and sequence 1's keys left intact.
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (mut layout, st, query) = loop {
        let c = random_case(&mut rng);
        let decoded: usize = c.1.groups.iter().map(Vec::len).sum();
        if !c.1.groups.is_empty() && decoded + c.2.len() < c.0.n {
            break c;
        }
    };
    layout.prompts = vec![layout.prompts[0].clone(); 2];
    let good = KernelInputs::from_state(&layout, &st, &query);
    let mut bad = good.clone();
    let spare = (0..layout.n)
        .find(|&i| good.decoded_step[i] == u32::MAX && !query.contains(&(i as u32)))
        .unwrap();
    bad.decoded_step[spare] = 0;
    let (g, b) = (simulate(&good, 64), simulate(&bad, 64));
    let keys = good.keys_per_seq as usize;
    assert_eq!(b.kv_indices.len(), 2 * keys);
    assert_eq!(b.row_ids, g.row_ids);
    // Keys of each sequence stay within its slice (its slot range).
    for s in 0..2 {
        let lo = s as u32 * layout.slots_per_seq as u32;
        let hi = lo + layout.slots_per_seq as u32;
        assert!(
            b.kv_indices[s * keys..(s + 1) * keys]
                .iter()
                .all(|&slot| (lo..hi).contains(&slot))
        );
    }
}
