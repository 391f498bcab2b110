//! The CUDA kernels against their CPU twins (SPEC §6), through the safe layer
//! (`sparse_lavida::cuda::ops`).
//!
//! GPU tests are `#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]`; run them on a GPU machine with
//! `cargo test --release --test gpu_kernels -- --ignored --test-threads=1` (one thread: a test
//! that captures a CUDA graph must not share the device with another test's synchronising
//! calls). Each draws random inputs, rounds them
//! to bf16 where the kernel stores bf16, runs the CPU op on the SAME rounded values, poisons every
//! output before the launch (NaN, or `u32::MAX` for indices) and checks: relative L2 error
//! ≤ 1e-2 for bf16 outputs, exact equality where the kernel only moves data or must match bit
//! for bit (sampled tokens, aggregation), no NaN, every output written, nothing outside the
//! output touched.
//!
//! The host-side tests (run everywhere) check what can be checked without a device: the probe
//! fails cleanly, the attention plan's tables, and the validation of inputs.

mod common;

use cudarc::driver::DevicePtr;
use half::bf16;
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_lavida::Error;
use sparse_lavida::backend::SampleParams;
use sparse_lavida::backend::cpu::attention::{AttnInputs, AttnShape, attention_naive};
use sparse_lavida::backend::cpu::ops::{self as cpu, SoftmaxMask};
use sparse_lavida::config::Branch;
use sparse_lavida::contract::attn::{AttnVersion, key_tile_summaries};
use sparse_lavida::cuda::abi::SL_ATTN_BLOCK_M;
use sparse_lavida::cuda::device::{CudaDevice, NO_DRIVER};
use sparse_lavida::cuda::ops::{
    self, AggregateInputs, AttnArgs, AttnLayout, AttnOut, AttnPlan, BannedMask, DecodeArrays,
    DeviceMask, DeviceSampleArgs, DeviceStateBufs, EmbedNorm, IndexBuf, KvPool, PatchLens,
    PatchTargets, RopeKv, RopeQkv, RopeTable, SampleOut, ScoreShape, SummaryTarget, SwigluShape,
};
use sparse_lavida::plan::{REGISTER, Tag};
use sparse_lavida::sampler::patch::{
    self, CommitRule, DeviceState, Field, Lists, Patch, PlanArrays, Source, UNDECODED,
};
use sparse_lavida::sampler::{DecodeState, Layout, Switches, sparse_plan};

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn device() -> CudaDevice {
    CudaDevice::new(0).unwrap_or_else(|e| panic!("{}: {e}", common::NEED_DEVICE))
}

fn uniform(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| r.gen_range(-scale..scale)).collect()
}

/// Random bf16 values in `[-scale, scale)`.
fn bf16s(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<bf16> {
    uniform(r, n, scale)
        .into_iter()
        .map(bf16::from_f32)
        .collect()
}

fn widen(x: &[bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// The dense `[rows, width]` part of a strided matrix.
fn dense<T: Copy>(x: &[T], rows: usize, width: usize, stride: usize) -> Vec<T> {
    (0..rows)
        .flat_map(|r| x[r * stride..][..width].iter().copied())
        .collect()
}

/// `‖got − want‖₂ / ‖want‖₂` (0 when both are zero), in f64.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (f64::from(g) - f64::from(w)).powi(2);
        den += f64::from(w).powi(2);
    }
    if num == 0.0 { 0.0 } else { (num / den).sqrt() }
}

/// SPEC §6 for a bf16 output: no NaN (so every element was written over the poison) and
/// relative L2 error ≤ 1e-2.
fn assert_bf16_close(what: &str, got: &[bf16], want: &[f32]) {
    let got = widen(got);
    if let Some(i) = got.iter().position(|x| x.is_nan()) {
        panic!("{what}: NaN (unwritten or poisoned) at {i}");
    }
    let err = rel_l2(&got, want);
    assert!(err <= 1e-2, "{what}: relative L2 error {err}");
}

/// Bitwise equality of bf16 buffers (data moved, not computed).
fn bits(x: &[bf16]) -> Vec<u16> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn tags(t: &[Tag]) -> Vec<u32> {
    t.iter().map(|t| t.0).collect()
}

fn random_tag(r: &mut ChaCha8Rng, branch: Option<Branch>) -> Tag {
    let branch = branch.unwrap_or(if r.gen_bool(0.5) {
        Branch::Image
    } else {
        Branch::Text
    });
    Tag::new(branch, r.gen_range(0..4), r.gen_bool(0.4))
}

// ------------------------------------------------------------------------------------------
// Host-side tests (no GPU)
// ------------------------------------------------------------------------------------------

#[test]
fn probe_fails_cleanly_without_a_gpu() {
    match CudaDevice::new(0) {
        Ok(dev) => {
            // A GPU machine: the probe succeeded and found the kernels.
            assert!(dev.info().sm_count > 0);
            assert_eq!(dev.kernels().images().len(), 7);
        }
        Err(Error::Unavailable(msg)) => {
            assert!(!msg.is_empty());
            if msg.contains("libcuda") {
                assert_eq!(msg, NO_DRIVER);
            }
        }
        Err(e) => panic!("the probe must report Unavailable, got: {e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Query tiles: each within one sequence, at most SL_ATTN_BLOCK_M rows, in row order,
    /// together covering every row exactly once.
    #[test]
    fn query_tiles_partition_each_sequence(lens in prop::collection::vec(0u32..300, 1..6)) {
        let mut seq_indptr = vec![0u32];
        for l in &lens {
            seq_indptr.push(seq_indptr.last().unwrap() + l);
        }
        let rows = *seq_indptr.last().unwrap() as usize;
        let (seq, row0) = ops::query_tiles(&seq_indptr, SL_ATTN_BLOCK_M);
        prop_assert_eq!(seq.len(), row0.len());
        let mut covered = vec![0u32; rows];
        for (&s, &r0) in seq.iter().zip(&row0) {
            let (start, end) = (seq_indptr[s as usize], seq_indptr[s as usize + 1]);
            prop_assert!(start <= r0 && r0 < end, "tile at {} outside sequence {}", r0, s);
            for r in r0..(r0 + SL_ATTN_BLOCK_M).min(end) {
                covered[r as usize] += 1;
            }
        }
        prop_assert!(covered.iter().all(|&c| c == 1), "coverage {:?}", covered);
        prop_assert!(row0.windows(2).all(|w| w[0] < w[1]), "tiles out of order");
        let expected: usize = lens.iter().map(|&l| l.div_ceil(SL_ATTN_BLOCK_M) as usize).sum();
        prop_assert_eq!(seq.len(), expected);
    }

    /// The split rule never exceeds its caps and splits only an underfull grid.
    #[test]
    fn split_rule_bounds(tiles in 0usize..50, heads in 1usize..64, keys in 0usize..20_000,
                         workers in 1usize..300) {
        let s = ops::choose_splits(tiles, heads, keys, workers);
        prop_assert!((1..=32).contains(&s));
        if tiles * heads >= workers {
            prop_assert_eq!(s, 1);
        }
        prop_assert!(s <= keys.div_ceil(256).max(1));
    }
}

#[test]
fn attention_layout_validation_names_the_problem() {
    let t = Tag::new(Branch::Text, 0, false);
    let shape = AttnShape {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 128,
    };
    let rows = [t; 2];
    let keys = [t; 3];
    let ok = AttnLayout {
        shape,
        row_tags: &rows,
        seq_indptr: &[0, 2],
        kv_indptr: &[0, 3],
        kv_indices: &[0, 4, 2],
        kv_tags: &keys,
        n_slots: 5,
    };
    ok.validate().unwrap();
    let err = |l: AttnLayout| l.validate().unwrap_err().to_string();
    assert!(err(AttnLayout { n_slots: 4, ..ok }).contains("kv_indices[1] = 4"));
    assert!(
        err(AttnLayout {
            seq_indptr: &[0, 1],
            ..ok
        })
        .contains("seq_indptr ends at 1")
    );
    assert!(
        err(AttnLayout {
            shape: AttnShape {
                head_dim: 32,
                ..shape
            },
            ..ok
        })
        .contains("head_dim 32")
    );
    assert!(
        err(AttnLayout {
            kv_indptr: &[0, 2],
            ..ok
        })
        .contains("kv_indptr ends at 2")
    );
}

#[test]
fn aggregate_validation_rejects_inconsistent_decode_state() {
    let st = DecodeState {
        tokens: vec![Some(5), None, Some(6), None],
        groups: vec![vec![2], vec![0]],
    };
    let d = DecodeArrays::from_groups(&st.tokens, &st.groups).unwrap();
    let inp = AggregateInputs {
        tokens: &d.tokens,
        decoded_step: &d.decoded_step,
        decoded_order: &d.decoded_order,
        group_indptr: &d.group_indptr,
        query: &[3],
        n_seqs: 1,
        prompt_len: 2,
        n_registers: 2,
        slots_per_seq: 2 + 2 * 4 + 2,
        mask_id: 9,
        branch: Branch::Text,
    };
    let c = inp.validate().unwrap();
    assert_eq!(
        (c.k, c.rows_per_seq, c.keys_per_seq),
        (2, 1 + 1 + 2, 2 + 2 + 1 + 2)
    );
    let err = |i: AggregateInputs| i.validate().unwrap_err().to_string();
    assert!(err(AggregateInputs { query: &[0], ..inp }).contains("already decoded"));
    assert!(err(AggregateInputs { query: &[4], ..inp }).contains("out of range"));
    assert!(
        err(AggregateInputs {
            decoded_step: &[1, u32::MAX, 1, u32::MAX],
            ..inp
        })
        .contains("decoded_step[2]")
    );
    assert!(
        err(AggregateInputs {
            group_indptr: &[0, 1, 5],
            ..inp
        })
        .contains("group_indptr ends at 5")
    );
}

// ------------------------------------------------------------------------------------------
// GPU: device
// ------------------------------------------------------------------------------------------

#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_device_opens_and_loads_every_kernel_file() {
    let dev = device();
    let info = dev.info();
    assert!(info.sm_count > 0 && info.cc.0 >= 8, "{info:?}");
    let files: Vec<&str> = dev.kernels().images().iter().map(|&(f, _)| f).collect();
    assert_eq!(files.len(), 7, "{files:?}");
    eprintln!("{info:?}: images {:?}", dev.kernels().images());
}

// ------------------------------------------------------------------------------------------
// GPU: random weight init
// ------------------------------------------------------------------------------------------

/// `sl_init_uniform` equals `bf16(cpu::init_uniform)` bit for bit, for lengths that end on a
/// full group of 4 (8-byte stores only) and on a partial one (element stores for the tail),
/// seeds whose two key words both matter, and a large tensor (timed: the rate of device-side
/// random weights).
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_init_uniform_equals_the_cpu_twin_in_bf16() {
    let dev = device();
    let cases: [(usize, u64, u32, f32, f32); 7] = [
        (1, 0, 0, 0.0, 1.0),
        (3, 1, 1, 1.0, 0.1),
        (4, 0xdead_beef_0000_0001, 2, 0.0, 0.5),
        (5, 0x0000_0001_dead_beef, 3, -0.25, 0.75),
        (1023, 7, 17, 0.0, 0.0625),
        (4099, 7, 18, 1.0, 0.1),
        ((1 << 26) + 3, 0x0123_4567_89ab_cdef, 1234, 0.0, 0.027),
    ];
    for (n, seed, index, offset, scale) in cases {
        let mut buf = dev.upload(&vec![bf16::NAN; n]).unwrap();
        dev.synchronize().unwrap();
        let t0 = std::time::Instant::now();
        ops::init_uniform(&dev, seed, index, offset, scale, &mut buf).unwrap();
        dev.synchronize().unwrap();
        let secs = t0.elapsed().as_secs_f64();
        let got = dev.download(&buf).unwrap();
        let mut want = vec![0f32; n];
        cpu::init_uniform(seed, index, offset, scale, &mut want);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let w = bf16::from_f32(*w);
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "n {n}, seed {seed:#x}, tensor {index}: element {i} is {g}, want {w}"
            );
        }
        if n > 1 << 20 {
            eprintln!(
                "init_uniform: {n} values in {:.2} ms ({:.0} GB/s written)",
                secs * 1e3,
                n as f64 * 2.0 / secs / 1e9
            );
        }
    }
    // Non-finite parameters are refused before the launch.
    let mut buf = dev.upload(&[bf16::ZERO; 4]).unwrap();
    assert!(matches!(
        ops::init_uniform(&dev, 0, 0, f32::NAN, 1.0, &mut buf),
        Err(Error::Input(_))
    ));
}

// ------------------------------------------------------------------------------------------
// GPU: support kernels
// ------------------------------------------------------------------------------------------

#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_rmsnorm_matches_cpu_with_and_without_add() {
    let dev = device();
    // d = 4096 / 256 take the 16-byte path, 4095 / 100 the scalar one.
    for (case, &(n_rows, d)) in [(1usize, 64usize), (7, 4096), (5, 4095), (33, 100), (3, 256)]
        .iter()
        .enumerate()
    {
        for with_add in [false, true] {
            let mut r = rng(100 + case as u64);
            let eps = 1e-5;
            let x: Vec<f32> = uniform(&mut r, n_rows * d, 2.0);
            let add = bf16s(&mut r, n_rows * d, 1.0);
            let w: Vec<bf16> = (0..d)
                .map(|_| bf16::from_f32(r.gen_range(0.5..1.5)))
                .collect();
            // CPU: the f32 residual add, then rmsnorm on the same bf16 weights.
            let mut x_cpu = x.clone();
            if with_add {
                for (a, b) in x_cpu.iter_mut().zip(&add) {
                    *a += b.to_f32();
                }
            }
            let mut want = vec![0f32; n_rows * d];
            cpu::rmsnorm(&x_cpu, &widen(&w), eps, &mut want).unwrap();

            let mut x_dev = dev.upload(&x).unwrap();
            let add_dev = dev.upload(&add).unwrap();
            let w_dev = dev.upload(&w).unwrap();
            let mut out = dev.upload(&vec![bf16::NAN; n_rows * d]).unwrap();
            let add_arg = with_add.then_some(&add_dev);
            ops::rmsnorm(&dev, &mut x_dev, add_arg, &w_dev, eps, n_rows, &mut out).unwrap();
            let what = format!("rmsnorm n_rows {n_rows} d {d} add {with_add}");
            assert_bf16_close(&what, &dev.download(&out).unwrap(), &want);
            // The residual stream: exactly the f32 sum (or untouched).
            assert_eq!(dev.download(&x_dev).unwrap(), x_cpu, "{what}: x");
        }
    }
}

#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_embed_matches_cpu_and_fuses_the_norm() {
    let dev = device();
    for (case, &(table_rows, d, n_rows)) in
        [(50usize, 256usize, 40usize), (7, 100, 9), (300, 64, 1)]
            .iter()
            .enumerate()
    {
        let mut r = rng(200 + case as u64);
        let table = bf16s(&mut r, table_rows * d, 1.0);
        let register = bf16s(&mut r, d, 1.0);
        let w: Vec<bf16> = (0..d)
            .map(|_| bf16::from_f32(r.gen_range(0.5..1.5)))
            .collect();
        let ids: Vec<u32> = (0..n_rows)
            .map(|_| {
                if r.gen_bool(0.2) {
                    REGISTER
                } else {
                    r.gen_range(0..table_rows as u32)
                }
            })
            .collect();
        let mut want_x = vec![0f32; n_rows * d];
        cpu::embed(&widen(&table), d, &widen(&register), &ids, &mut want_x).unwrap();
        let mut want_norm = vec![0f32; n_rows * d];
        cpu::rmsnorm(&want_x, &widen(&w), 1e-5, &mut want_norm).unwrap();

        let table_dev = dev.upload(&table).unwrap();
        let reg_dev = dev.upload(&register).unwrap();
        let w_dev = dev.upload(&w).unwrap();
        let ids_dev = dev.upload(&ids).unwrap();
        for fused in [false, true] {
            let mut x = dev.upload(&vec![f32::NAN; n_rows * d]).unwrap();
            let mut normed = dev.upload(&vec![bf16::NAN; n_rows * d]).unwrap();
            let norm = fused.then_some(EmbedNorm {
                w: &w_dev,
                eps: 1e-5,
                out: &mut normed,
            });
            ops::embed(&dev, &table_dev, &reg_dev, &ids_dev, n_rows, &mut x, norm).unwrap();
            // A gather of bf16 values widened to f32: exact.
            assert_eq!(dev.download(&x).unwrap(), want_x, "embed case {case}");
            if fused {
                let what = format!("embed+norm case {case}");
                assert_bf16_close(&what, &dev.download(&normed).unwrap(), &want_norm);
            }
        }
        // An id past the table is an error naming the row and the id.
        let mut bad_ids = ids.clone();
        let at = n_rows / 2;
        bad_ids[at] = table_rows as u32;
        let bad_dev = dev.upload(&bad_ids).unwrap();
        let mut x = dev.upload(&vec![f32::NAN; n_rows * d]).unwrap();
        let e = ops::embed(&dev, &table_dev, &reg_dev, &bad_dev, n_rows, &mut x, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("ids[{at}] = {table_rows}")),
            "case {case}: {e}"
        );
    }
}

#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_rope_kv_matches_cpu_rope_and_stores_at_slots() {
    let dev = device();
    let shapes = [
        (4usize, 2usize, 64usize, 0usize),
        (4, 4, 128, 8),
        (4, 2, 16, 0),
        (2, 1, 10, 2),
    ];
    for (case, &(n_heads, n_kv_heads, head_dim, pad)) in shapes.iter().enumerate() {
        let mut r = rng(300 + case as u64);
        let shape = AttnShape {
            n_heads,
            n_kv_heads,
            head_dim,
        };
        let (q_dim, kv_dim) = (shape.q_dim(), shape.kv_dim());
        let (q_stride, kv_stride, pool_stride) = (q_dim + pad, kv_dim + pad, kv_dim + pad);
        let n_rows = 9;
        let n_slots = 32;
        let theta = 500_000.0;
        let positions: Vec<u32> = (0..n_rows).map(|_| r.gen_range(0..5000)).collect();
        let mut all: Vec<u32> = (0..n_slots as u32).collect();
        all.shuffle(&mut r);
        let slots = all[..n_rows].to_vec();
        let q = bf16s(&mut r, n_rows * q_stride, 2.0);
        let k = bf16s(&mut r, n_rows * kv_stride, 2.0);
        let v = bf16s(&mut r, n_rows * kv_stride, 2.0);

        let mut want_q = widen(&dense(&q, n_rows, q_dim, q_stride));
        cpu::rope(&mut want_q, n_heads, head_dim, &positions, theta).unwrap();
        let mut want_k = widen(&dense(&k, n_rows, kv_dim, kv_stride));
        cpu::rope(&mut want_k, n_kv_heads, head_dim, &positions, theta).unwrap();

        // The same rows three ways: separate q, k, v with the angles computed per row; with the
        // generation's table covering positions below 2500 (the rest computed); fused q|k|v in
        // one buffer (padded rows) with the table.
        let table = RopeTable::new(&dev, head_dim, theta, 2500).unwrap();
        for mode in ["separate", "table", "fused"] {
            let what = format!("rope_kv case {case} {mode}");
            let pos_dev = dev.upload(&positions).unwrap();
            let slots_dev = IndexBuf::upload(&dev, &slots).unwrap();
            let poison = vec![bf16::NAN; n_slots * pool_stride];
            let mut k_pool = dev.upload(&poison).unwrap();
            let mut v_pool = dev.upload(&poison).unwrap();
            let pool = KvPool {
                k: &mut k_pool,
                v: &mut v_pool,
                stride: pool_stride,
            };
            let stride = q_dim + 2 * kv_dim + pad;
            let fused: Vec<bf16> = (0..n_rows)
                .flat_map(|row| {
                    let mut r = q[row * q_stride..][..q_dim].to_vec();
                    r.extend_from_slice(&k[row * kv_stride..][..kv_dim]);
                    r.extend_from_slice(&v[row * kv_stride..][..kv_dim]);
                    r.extend(std::iter::repeat_n(bf16::from_f32(7.0), pad));
                    r
                })
                .collect();
            let mut q_dev = dev.upload(&q).unwrap();
            let mut qkv_dev = dev.upload(&fused).unwrap();
            let k_dev = dev.upload(&k).unwrap();
            let v_dev = dev.upload(&v).unwrap();
            let qkv = if mode == "fused" {
                RopeQkv::Fused {
                    qkv: &mut qkv_dev,
                    stride,
                }
            } else {
                RopeQkv::Separate {
                    q: &mut q_dev,
                    q_stride,
                    k: &k_dev,
                    v: &v_dev,
                    kv_stride,
                }
            };
            let args = RopeKv {
                shape,
                n_rows,
                positions: &pos_dev,
                slots: &slots_dev,
                rope_theta: theta,
                qkv,
                table: (mode != "separate").then_some(&table),
            };
            ops::rope_kv(&dev, args, pool).unwrap();
            if mode == "fused" {
                let out = dev.download(&qkv_dev).unwrap();
                assert_bf16_close(&what, &dense(&out, n_rows, q_dim, stride), &want_q);
                // k, v and the padding columns of each row are read, never written.
                for row in 0..n_rows {
                    assert_eq!(
                        bits(&out[row * stride + q_dim..][..2 * kv_dim + pad]),
                        bits(&fused[row * stride + q_dim..][..2 * kv_dim + pad]),
                        "{what}: row {row} past q"
                    );
                }
            } else {
                let q_out = dev.download(&q_dev).unwrap();
                assert_bf16_close(&what, &dense(&q_out, n_rows, q_dim, q_stride), &want_q);
                // q's padding columns are untouched.
                for row in 0..n_rows {
                    let tail = &q_out[row * q_stride + q_dim..][..pad];
                    assert_eq!(
                        bits(tail),
                        bits(&q[row * q_stride + q_dim..][..pad]),
                        "{what}"
                    );
                }
            }
            let (kp, vp) = (
                dev.download(&k_pool).unwrap(),
                dev.download(&v_pool).unwrap(),
            );
            let got_k: Vec<bf16> = slots
                .iter()
                .flat_map(|&s| kp[s as usize * pool_stride..][..kv_dim].to_vec())
                .collect();
            assert_bf16_close(&format!("{what} k pool"), &got_k, &want_k);
            let got_v: Vec<bf16> = slots
                .iter()
                .flat_map(|&s| vp[s as usize * pool_stride..][..kv_dim].to_vec())
                .collect();
            assert_eq!(
                bits(&got_v),
                bits(&dense(&v, n_rows, kv_dim, kv_stride)),
                "{what} v pool"
            );
            // Every other pool element keeps its poison.
            for slot in 0..n_slots {
                let cols = if slots.contains(&(slot as u32)) {
                    kv_dim..pool_stride
                } else {
                    0..pool_stride
                };
                for c in cols {
                    let at = slot * pool_stride + c;
                    assert!(
                        kp[at].is_nan() && vp[at].is_nan(),
                        "{what}: pool {slot},{c}"
                    );
                }
            }
        }
    }
}

#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_swiglu_matches_cpu_separate_and_fused_gate_up() {
    let dev = device();
    for (case, &(n_rows, width)) in [(6usize, 256usize), (5, 200), (1, 8), (17, 1000)]
        .iter()
        .enumerate()
    {
        let mut r = rng(400 + case as u64);
        let shape_dense = SwigluShape {
            n_rows,
            width,
            gate_stride: width,
            up_stride: width,
        };
        // One [rows, 2·width] buffer: gate in the first half of each row, up in the second.
        let fused = bf16s(&mut r, n_rows * 2 * width, 6.0);
        let gate = dense(&fused, n_rows, width, 2 * width);
        let up = dense(&fused[width..], n_rows, width, 2 * width);
        let mut want = vec![0f32; n_rows * width];
        cpu::swiglu(&widen(&gate), &widen(&up), &mut want).unwrap();

        let what = format!("swiglu case {case}");
        let g_dev = dev.upload(&gate).unwrap();
        let u_dev = dev.upload(&up).unwrap();
        let mut out = dev.upload(&vec![bf16::NAN; n_rows * width]).unwrap();
        ops::swiglu(&dev, &g_dev, &u_dev, shape_dense, &mut out).unwrap();
        assert_bf16_close(&what, &dev.download(&out).unwrap(), &want);

        let f_dev = dev.upload(&fused).unwrap();
        let mut out = dev.upload(&vec![bf16::NAN; n_rows * width]).unwrap();
        let strided = SwigluShape {
            gate_stride: 2 * width,
            up_stride: 2 * width,
            ..shape_dense
        };
        ops::swiglu(
            &dev,
            &f_dev.slice(..),
            &f_dev.slice(width..),
            strided,
            &mut out,
        )
        .unwrap();
        assert_bf16_close(
            &format!("{what} (halves of one buffer)"),
            &dev.download(&out).unwrap(),
            &want,
        );
    }
}

// ------------------------------------------------------------------------------------------
// GPU: softmax and sampler
// ------------------------------------------------------------------------------------------

#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_masked_softmax_matches_cpu_rule_and_prefix() {
    let dev = device();
    for (case, &(n_rows, n_cols, pad)) in [(37usize, 300usize, 4usize), (5, 2000, 0), (64, 7, 1)]
        .iter()
        .enumerate()
    {
        let mut r = rng(500 + case as u64);
        let stride = n_cols + pad;
        let scale = 0.125;
        // Padding columns hold NaN: a read past n_cols would show.
        let mut scores = vec![f32::NAN; n_rows * stride];
        for row in 0..n_rows {
            for x in &mut scores[row * stride..][..n_cols] {
                *x = r.gen_range(-20.0..20.0);
            }
        }
        let scores_dense = dense(&scores, n_rows, n_cols, stride);
        let scores_dev = dev.upload(&scores).unwrap();
        let shape = ScoreShape {
            n_rows,
            n_cols,
            stride,
        };

        let row_tags: Vec<Tag> = (0..n_rows).map(|_| random_tag(&mut r, None)).collect();
        let mut col_tags: Vec<Tag> = (0..n_cols).map(|_| random_tag(&mut r, None)).collect();
        if case == 2 {
            // Only masked columns of block 3: every clean row, and every masked row of another
            // block, is fully hidden.
            col_tags = vec![Tag::new(Branch::Text, 3, true); n_cols];
        }
        let mut prefix: Vec<u32> = (0..n_rows)
            .map(|_| r.gen_range(0..=n_cols as u32))
            .collect();
        prefix[0] = 0;
        prefix[n_rows - 1] = n_cols as u32;
        let rt_dev = dev.upload(&tags(&row_tags)).unwrap();
        let ct_dev = dev.upload(&tags(&col_tags)).unwrap();
        let prefix_dev = IndexBuf::upload(&dev, &prefix).unwrap();

        for joint in [false, true] {
            for use_prefix in [false, true] {
                let (mask, dmask) = if use_prefix {
                    (
                        SoftmaxMask::Prefix(&prefix),
                        DeviceMask::Prefix(&prefix_dev),
                    )
                } else {
                    (
                        SoftmaxMask::Rule {
                            row_tags: &row_tags,
                            col_tags: &col_tags,
                            joint,
                        },
                        DeviceMask::Rule {
                            row_tags: &rt_dev,
                            col_tags: &ct_dev,
                            joint,
                        },
                    )
                };
                let mut want = vec![0f32; n_rows * n_cols];
                cpu::masked_softmax(&scores_dense, n_rows, n_cols, mask, scale, &mut want).unwrap();
                if use_prefix || case == 2 {
                    let hidden = want.chunks(n_cols).any(|row| row.iter().all(|&x| x == 0.0));
                    assert!(hidden, "case {case}: no fully hidden row to check");
                }
                let mut probs = dev.upload(&vec![f32::NAN; n_rows * stride]).unwrap();
                ops::masked_softmax(&dev, &scores_dev, shape, dmask, scale, &mut probs).unwrap();
                let got = dense(&dev.download(&probs).unwrap(), n_rows, n_cols, stride);
                let what = format!("masked_softmax case {case} joint {joint} prefix {use_prefix}");
                assert!(got.iter().all(|x| !x.is_nan()), "{what}: NaN");
                // Hidden entries (and fully hidden rows) are exactly zero.
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    if w == 0.0 {
                        assert_eq!(g, 0.0, "{what}: element {i} should be 0");
                    }
                    assert!((g - w).abs() <= 1e-6 + 1e-5 * w, "{what}: {i}: {g} vs {w}");
                }
                assert!(rel_l2(&got, &want) <= 1e-5, "{what}");
            }
        }
    }
}

/// f32 logits `[rows, stride]` with NaN padding, and their dense `[rows, vocab]` copy.
fn logits(r: &mut ChaCha8Rng, rows: usize, vocab: usize, stride: usize) -> (Vec<f32>, Vec<f32>) {
    let mut l = vec![f32::NAN; rows * stride];
    for row in 0..rows {
        for x in &mut l[row * stride..][..vocab] {
            *x = r.gen_range(-8.0..8.0);
        }
    }
    let d = dense(&l, rows, vocab, stride);
    (l, d)
}

fn close(a: f32, b: f32, rel: f32) -> bool {
    a == b || (a - b).abs() <= rel * a.abs().max(b.abs())
}

#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_sample_matches_cpu_tokens_exactly() {
    let dev = device();
    let mut case = 0u64;
    for &(vocab, stride, n) in &[
        (1001usize, 1004usize, 13usize),
        (50_001, 50_001, 5),
        (7, 8, 3),
    ] {
        for guidance in [None, Some(3.0f32)] {
            for temperature in [0.0f32, 0.7, 1.0] {
                for ban in [false, true] {
                    case += 1;
                    let mut r = rng(600 + case);
                    let rows = if guidance.is_some() { 2 * n } else { n };
                    let (l, l_dense) = logits(&mut r, rows, vocab, stride);
                    let banned: Vec<u32> = if ban {
                        // Some ids stay allowed: id 0 is never banned.
                        (1..vocab as u32).filter(|_| r.gen_bool(0.3)).collect()
                    } else {
                        Vec::new()
                    };
                    let p = SampleParams {
                        guidance,
                        temperature,
                        banned,
                        seed: r.r#gen(),
                        step: r.gen_range(0..64),
                        request: r.gen_range(0..4),
                        positions: (0..n).map(|_| r.gen_range(0..5000)).collect(),
                    };
                    let want = cpu::sample_rows(&l_dense, vocab, &p).unwrap();
                    let l_dev = dev.upload(&l).unwrap();
                    let got = ops::sample(&dev, &l_dev, vocab, stride, &p).unwrap();
                    let what =
                        format!("sample vocab {vocab} g {guidance:?} tau {temperature} ban {ban}");
                    assert_eq!(got.len(), want.len(), "{what}");
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(g.token, w.token, "{what}: row {i} token");
                        assert!(close(g.lse, w.lse, 1e-5), "{what}: row {i} lse {g:?} {w:?}");
                        assert!(
                            close(g.confidence, w.confidence, 1e-5),
                            "{what}: row {i} confidence {g:?} {w:?}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_sample_reports_non_finite_logits() {
    let dev = device();
    let mut r = rng(650);
    let (vocab, n) = (3000, 4);
    for (bad, guidance) in [
        (f32::NAN, None),
        (f32::INFINITY, Some(2.0)),
        (f32::NEG_INFINITY, None),
    ] {
        let rows = if guidance.is_some() { 2 * n } else { n };
        let (mut l, _) = logits(&mut r, rows, vocab, vocab);
        l[(rows - 1) * vocab + 1234] = bad;
        let p = SampleParams {
            guidance,
            temperature: 1.0,
            banned: vec![1234],
            seed: 1,
            step: 0,
            request: 0,
            positions: vec![0, 1, 2, 3],
        };
        let cpu_err = cpu::sample_rows(&l, vocab, &p).unwrap_err().to_string();
        let l_dev = dev.upload(&l).unwrap();
        let e = ops::sample(&dev, &l_dev, vocab, vocab, &p).unwrap_err();
        assert!(matches!(e, Error::Input(_)), "{e}");
        assert!(
            e.to_string().contains("non-finite logit"),
            "{e} (cpu: {cpu_err})"
        );
    }
}

// ------------------------------------------------------------------------------------------
// GPU: aggregation
// ------------------------------------------------------------------------------------------

/// A random decode state of `n` response positions after `k` steps, and the query of step `k`.
fn random_state(r: &mut ChaCha8Rng, n: usize, k: usize, vocab: u32) -> (DecodeState, Vec<u32>) {
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(r);
    let mut st = DecodeState {
        tokens: vec![None; n],
        groups: Vec::new(),
    };
    let mut next = 0;
    for _ in 0..k {
        let size = r.gen_range(1..=((n - next) / (k + 1)).max(1));
        let group = order[next..next + size].to_vec();
        next += size;
        for &i in &group {
            st.tokens[i as usize] = Some(r.gen_range(0..vocab));
        }
        st.groups.push(group);
    }
    let q = r.gen_range(1..=(n - next).min(300));
    (st, order[next..next + q].to_vec())
}

/// Aggregation cases: a layout, a random decode state after `k` steps, the query of step `k`,
/// and `sparse_plan`'s plan of that step (the oracle).
fn aggregate_cases() -> Vec<(Layout, DecodeState, Vec<u32>, sparse_lavida::plan::StepPlan)> {
    let cases = [
        // (P, N, R, n_seqs, branch, k)
        (37usize, 3000usize, 16usize, 2usize, Branch::Image, 7usize),
        (37, 3000, 16, 2, Branch::Image, 0),
        (0, 500, 8, 1, Branch::Text, 3),
        (12, 4096, 64, 1, Branch::Text, 20),
        (5, 40, 4, 2, Branch::Image, 1),
    ];
    let mut out = Vec::new();
    for (case, &(p, n, reg, n_seqs, branch, k)) in cases.iter().enumerate() {
        let mut r = rng(700 + case as u64);
        let (st, query) = random_state(&mut r, n, k, 8000);
        let prompts: Vec<Vec<u32>> = (0..n_seqs)
            .map(|_| (0..p).map(|_| r.gen_range(0..100)).collect())
            .collect();
        let layout = Layout {
            prompts,
            n,
            r: reg,
            branch,
            mask_id: 8192,
            skip: (branch == Branch::Image).then_some(Branch::Text),
            slots_per_seq: p + 2 * n + reg,
        };
        let plan = sparse_plan(&layout, &st, &query, k, Switches::ALL_ON, p > 0).unwrap();
        out.push((layout, st, query, plan));
    }
    out
}

fn aggregate_inputs<'a>(l: &Layout, d: &'a DecodeArrays, query: &'a [u32]) -> AggregateInputs<'a> {
    AggregateInputs {
        tokens: &d.tokens,
        decoded_step: &d.decoded_step,
        decoded_order: &d.decoded_order,
        group_indptr: &d.group_indptr,
        query,
        n_seqs: l.n_seqs(),
        prompt_len: l.p(),
        n_registers: l.r,
        slots_per_seq: l.slots_per_seq,
        mask_id: l.mask_id,
        branch: l.branch,
    }
}

/// The host side of aggregation: the decode arrays of a random state pass validation, and the
/// per-sequence sizes it derives are exactly those of `sparse_plan`'s plan.
#[test]
fn aggregate_counts_match_sparse_plan() {
    for (case, (layout, st, query, plan)) in aggregate_cases().iter().enumerate() {
        let d = DecodeArrays::from_groups(&st.tokens, &st.groups).unwrap();
        let c = aggregate_inputs(layout, &d, query).validate().unwrap();
        assert_eq!(c.k as usize, st.groups.len(), "case {case}");
        let rows = plan.rows(layout.branch);
        let n_seqs = layout.n_seqs();
        let seq_indptr: Vec<u32> = (0..=n_seqs).map(|s| (s * c.rows_per_seq) as u32).collect();
        let kv_indptr: Vec<u32> = (0..=n_seqs).map(|s| (s * c.keys_per_seq) as u32).collect();
        assert_eq!(
            rows.seq_indptr, seq_indptr,
            "case {case}: rows per sequence"
        );
        assert_eq!(plan.kv_indptr, kv_indptr, "case {case}: keys per sequence");
        assert!(plan.rows(layout.branch.other()).is_empty(), "case {case}");
        assert_eq!(plan.logits_rows.len(), n_seqs * query.len(), "case {case}");
    }
}

#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_aggregate_matches_sparse_plan() {
    let dev = device();
    for (case, (layout, st, query, plan)) in aggregate_cases().iter().enumerate() {
        let (n_seqs, branch) = (layout.n_seqs(), layout.branch);
        let d = DecodeArrays::from_groups(&st.tokens, &st.groups).unwrap();
        let agg = ops::aggregate(&dev, &aggregate_inputs(layout, &d, query)).unwrap();
        let got = agg.download(&dev).unwrap();
        let what = format!("aggregate case {case}");
        let rows = plan.rows(branch);
        assert!(plan.rows(branch.other()).is_empty(), "{what}");
        assert_eq!(got.row_ids, rows.ids, "{what}: ids");
        assert_eq!(got.row_pos, rows.pos, "{what}: positions");
        assert_eq!(got.row_tags, tags(&rows.tags), "{what}: tags");
        assert_eq!(got.row_slots, rows.slots, "{what}: slots");
        assert_eq!(got.kv_indices, plan.kv_indices, "{what}: kv_indices");
        assert_eq!(got.kv_tags, tags(&plan.kv_tags), "{what}: kv_tags");
        assert_eq!(got.logits_rows, plan.logits_rows, "{what}: logits rows");
        let c = agg.counts;
        let seq_indptr: Vec<u32> = (0..=n_seqs).map(|s| (s * c.rows_per_seq) as u32).collect();
        let kv_indptr: Vec<u32> = (0..=n_seqs).map(|s| (s * c.keys_per_seq) as u32).collect();
        assert_eq!(rows.seq_indptr, seq_indptr, "{what}: rows per sequence");
        assert_eq!(plan.kv_indptr, kv_indptr, "{what}: keys per sequence");
    }
}

// ------------------------------------------------------------------------------------------
// GPU: attention
// ------------------------------------------------------------------------------------------

/// A random attention case: bf16 queries and pool (slots no key uses hold NaN), tags, CSR.
struct AttnCase {
    shape: AttnShape,
    joint: bool,
    q: Vec<bf16>,
    row_tags: Vec<Tag>,
    seq_indptr: Vec<u32>,
    k_pool: Vec<bf16>,
    v_pool: Vec<bf16>,
    kv_indptr: Vec<u32>,
    kv_indices: Vec<u32>,
    kv_tags: Vec<Tag>,
    n_slots: usize,
}

/// `seqs`: per sequence (fed rows, cached keys, hidden). Normally every row is also a key of its
/// sequence (so it sees at least itself); a `hidden` sequence's rows are not keys and its cached
/// keys are masked keys of block 1000, which no row (blocks 0..4) can see: every row there is
/// fully hidden.
fn attn_case(seed: u64, shape: AttnShape, seqs: &[(usize, usize, bool)], joint: bool) -> AttnCase {
    let mut r = rng(seed);
    let branch = if r.gen_bool(0.5) {
        Branch::Image
    } else {
        Branch::Text
    };
    let n_keys: usize = seqs.iter().map(|&(a, b, _)| a + b).sum();
    let n_slots = n_keys + 13;
    let mut free: Vec<u32> = (0..n_slots as u32).collect();
    free.shuffle(&mut r);
    let kv_dim = shape.kv_dim();
    let mut c = AttnCase {
        shape,
        joint,
        q: Vec::new(),
        row_tags: Vec::new(),
        seq_indptr: vec![0],
        k_pool: vec![bf16::NAN; n_slots * kv_dim],
        v_pool: vec![bf16::NAN; n_slots * kv_dim],
        kv_indptr: vec![0],
        kv_indices: Vec::new(),
        kv_tags: Vec::new(),
        n_slots,
    };
    for &(rows, cached, hidden) in seqs {
        let mut keys = Vec::new();
        for _ in 0..rows {
            let tag = random_tag(&mut r, Some(branch));
            c.row_tags.push(tag);
            let slot = free.pop().unwrap();
            if !hidden {
                keys.push((slot, tag));
            }
        }
        for _ in 0..cached {
            let tag = if hidden {
                Tag::new(branch, 1000, true)
            } else {
                random_tag(&mut r, None)
            };
            keys.push((free.pop().unwrap(), tag));
        }
        keys.sort_by_key(|&(slot, _)| slot);
        for (slot, tag) in keys {
            c.kv_indices.push(slot);
            c.kv_tags.push(tag);
            let at = slot as usize * kv_dim;
            c.k_pool[at..at + kv_dim].copy_from_slice(&bf16s(&mut r, kv_dim, 1.0));
            c.v_pool[at..at + kv_dim].copy_from_slice(&bf16s(&mut r, kv_dim, 1.0));
        }
        c.seq_indptr.push(c.row_tags.len() as u32);
        c.kv_indptr.push(c.kv_indices.len() as u32);
    }
    c.q = bf16s(&mut r, c.row_tags.len() * shape.q_dim(), 3.0);
    c
}

impl AttnCase {
    fn layout(&self) -> AttnLayout<'_> {
        AttnLayout {
            shape: self.shape,
            row_tags: &self.row_tags,
            seq_indptr: &self.seq_indptr,
            kv_indptr: &self.kv_indptr,
            kv_indices: &self.kv_indices,
            kv_tags: &self.kv_tags,
            n_slots: self.n_slots,
        }
    }

    /// The f64 oracle on the bf16 values (the NaN of unused slots widened too).
    fn naive(&self) -> (Vec<f32>, Vec<f64>) {
        let (q, k, v) = (widen(&self.q), widen(&self.k_pool), widen(&self.v_pool));
        let inp = AttnInputs {
            q: &q,
            row_tags: &self.row_tags,
            seq_indptr: &self.seq_indptr,
            k_pool: &k,
            v_pool: &v,
            kv_indptr: &self.kv_indptr,
            kv_indices: &self.kv_indices,
            kv_tags: &self.kv_tags,
            joint: self.joint,
            shape: self.shape,
        };
        let (o, lse) = attention_naive(&inp).unwrap();
        (o.iter().map(|&x| x as f32).collect(), lse)
    }
}

/// Runs the GPU attention (kernel `version`) with `n_splits` (None: the heuristic); returns
/// (o dense, lse, splits).
fn run_attention_version(
    dev: &CudaDevice,
    c: &AttnCase,
    n_splits: Option<usize>,
    version: AttnVersion,
) -> (Vec<bf16>, Vec<f32>, usize) {
    let rows = c.row_tags.len();
    let q_dim = c.shape.q_dim();
    let o_stride = q_dim + 8; // padded: the padding must stay poisoned
    let mut plan = AttnPlan::with_version(dev, &c.layout(), n_splits, version).unwrap();
    assert_eq!(plan.version(), version);
    let q = dev.upload(&c.q).unwrap();
    let k = dev.upload(&c.k_pool).unwrap();
    let v = dev.upload(&c.v_pool).unwrap();
    let mut o = dev.upload(&vec![bf16::NAN; rows * o_stride]).unwrap();
    let mut lse = dev.upload(&vec![f32::NAN; rows * c.shape.n_heads]).unwrap();
    let args = AttnArgs {
        q: &q,
        q_stride: q_dim,
        k_pool: &k,
        v_pool: &v,
        kv_stride: c.shape.kv_dim(),
        joint: c.joint,
    };
    let out = AttnOut {
        o: &mut o,
        o_stride,
        lse: Some(&mut lse),
    };
    ops::attention(dev, &mut plan, &args, out).unwrap();
    let o_host = dev.download(&o).unwrap();
    for row in 0..rows {
        let pad = &o_host[row * o_stride + q_dim..][..8];
        assert!(
            pad.iter().all(|x| x.is_nan()),
            "o padding of row {row} written"
        );
    }
    (
        dense(&o_host, rows, q_dim, o_stride),
        dev.download(&lse).unwrap(),
        plan.n_splits(),
    )
}

/// The current kernel ([`run_attention_version`] with v2).
fn run_attention(
    dev: &CudaDevice,
    c: &AttnCase,
    n_splits: Option<usize>,
) -> (Vec<bf16>, Vec<f32>, usize) {
    run_attention_version(dev, c, n_splits, AttnVersion::V2)
}

/// o within 1e-2 relative L2 of the oracle, no NaN, hidden (row, head) exactly zero with lse
/// −inf, other lse within 1e-3 (relative to max(1, |lse|)).
fn check_attention(what: &str, want: &(Vec<f32>, Vec<f64>), d: usize, o: &[bf16], lse: &[f32]) {
    let (want_o, want_lse) = want;
    assert_bf16_close(what, o, want_o);
    for (i, (&g, &w)) in lse.iter().zip(want_lse).enumerate() {
        if w == f64::NEG_INFINITY {
            assert_eq!(g, f32::NEG_INFINITY, "{what}: lse of hidden row·head {i}");
            assert!(
                o[i * d..][..d].iter().all(|x| x.to_f32() == 0.0),
                "{what}: hidden row·head {i} not zero"
            );
        } else {
            let tol = 1e-3 * w.abs().max(1.0);
            assert!(
                (f64::from(g) - w).abs() <= tol,
                "{what}: lse {i}: {g} vs {w}"
            );
        }
    }
}

#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_attention_matches_naive_and_splits_agree() {
    let dev = device();
    // (rows, cached keys, hidden) per sequence. On the emulated device (a CPU, thousands of times
    // slower) the long lists are shorter; every feature stays covered: partial query and key
    // tiles, several query tiles per sequence, splits, an empty key list, a row-less sequence,
    // fully hidden rows, GQA.
    let emulated = dev.info().emulated;
    let (long, longer, decode_keys) = if emulated {
        ((130, 200), (70, 700), 300)
    } else {
        ((300, 500), (150, 2000), 700)
    };
    let many = [
        (long.0, long.1, false),
        (longer.0, longer.1, false),
        (1, 0, false),
        (0, 40, false),
        (70, 100, true),
    ];
    let few = [(5usize, if emulated { 1300 } else { 3000 }, false)];
    let decode = [(3usize, decode_keys, false), (2, 64, true), (4, 129, false)];
    let mut seed = 800;
    for head_dim in [64usize, 128] {
        for (n_heads, n_kv_heads) in [(4usize, 2usize), (2, 2), (8, 1)] {
            for seqs in [&many[..], &few[..], &decode[..]] {
                for joint in [false, true] {
                    seed += 1;
                    let shape = AttnShape {
                        n_heads,
                        n_kv_heads,
                        head_dim,
                    };
                    let c = attn_case(seed, shape, seqs, joint);
                    let want = c.naive();
                    if seqs.iter().any(|s| s.2) {
                        assert!(want.1.contains(&f64::NEG_INFINITY), "no hidden row built");
                    }
                    let what = format!(
                        "attention hd {head_dim} heads {n_heads}/{n_kv_heads} seqs {seqs:?} joint {joint}"
                    );
                    let (o, lse, splits) = run_attention(&dev, &c, None);
                    check_attention(
                        &format!("{what} heuristic ({splits} splits)"),
                        &want,
                        head_dim,
                        &o,
                        &lse,
                    );
                    if seqs.len() == 1 && n_heads <= 4 {
                        assert!(splits > 1, "{what}: few rows should split, got {splits}");
                    }
                    let (o1, lse1, _) = run_attention(&dev, &c, Some(1));
                    check_attention(&format!("{what} 1 split"), &want, head_dim, &o1, &lse1);
                    // The previous kernel, kept selectable: its heuristic and 3 splits.
                    for n in [None, Some(3)] {
                        let (ov, lsev, sv) = run_attention_version(&dev, &c, n, AttnVersion::V1);
                        let w = format!("{what} v1 ({sv} splits)");
                        check_attention(&w, &want, head_dim, &ov, &lsev);
                    }
                    for n_splits in 2..=4 {
                        let (on, lsen, _) = run_attention(&dev, &c, Some(n_splits));
                        let w = format!("{what} {n_splits} splits");
                        check_attention(&w, &want, head_dim, &on, &lsen);
                        let err = rel_l2(&widen(&on), &widen(&o1));
                        assert!(err <= 1e-2, "{w}: split vs unsplit {err}");
                        for (&a, &b) in lse1.iter().zip(&lsen) {
                            assert!(
                                a == b || (a - b).abs() <= 1e-3 * a.abs().max(1.0),
                                "{w}: lse {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A sparse step's attention layout, as the planner builds it (SPEC §3, keys sorted by slot):
/// per sequence `prompt` text keys (clean, block 0), `decoded` image keys of clean blocks
/// 1..=k in slot order (k = 6), the `fed` rows C_{k-1} (image, clean, block k; their keys among
/// the decoded ones) and `masked` rows C_k + registers (image, masked, block k + 1; their keys
/// last). Dense (`masked == 0`, `dense`): every row and key clean block 0, full attention.
fn attn_case_steps(
    seed: u64,
    shape: AttnShape,
    seqs: &[(usize, usize, usize, usize)],
    joint: bool,
    dense: bool,
) -> AttnCase {
    let mut r = rng(seed);
    let kv_dim = shape.kv_dim();
    let n_keys: usize = seqs.iter().map(|&(p, d, f, m)| p + d + f + m).sum();
    let n_slots = n_keys + 7;
    let mut free: Vec<u32> = (0..n_slots as u32).collect();
    free.shuffle(&mut r);
    let mut c = AttnCase {
        shape,
        joint,
        q: Vec::new(),
        row_tags: Vec::new(),
        seq_indptr: vec![0],
        k_pool: vec![bf16::NAN; n_slots * kv_dim],
        v_pool: vec![bf16::NAN; n_slots * kv_dim],
        kv_indptr: vec![0],
        kv_indices: Vec::new(),
        kv_tags: Vec::new(),
        n_slots,
    };
    let k = 6u32;
    let tag = |b: Branch, block: u32, masked: bool| {
        if dense {
            Tag::new(Branch::Image, 0, false)
        } else {
            Tag::new(b, block, masked)
        }
    };
    for &(prompt, decoded, fed, masked) in seqs {
        let mut slots: Vec<u32> = (0..prompt + decoded + fed + masked)
            .map(|_| free.pop().unwrap())
            .collect();
        // Slot order = the key order: prompt, then response (decoded and fed interleaved by
        // slot, blocks ascending with the slot), then the masked block.
        slots.sort_unstable();
        let mut keys: Vec<(u32, Tag)> = Vec::new();
        for &slot in &slots[..prompt] {
            keys.push((slot, tag(Branch::Text, 0, false)));
        }
        let response = &slots[prompt..prompt + decoded + fed];
        let mut is_fed: Vec<bool> = (0..decoded + fed).map(|i| i < fed).collect();
        is_fed.shuffle(&mut r);
        let mut fed_rows = Vec::new();
        for (i, (&slot, &f)) in response.iter().zip(&is_fed).enumerate() {
            let block = if f {
                k
            } else {
                1 + (i * (k as usize - 1) / (decoded + fed)) as u32
            };
            keys.push((slot, tag(Branch::Image, block, false)));
            if f {
                fed_rows.push(tag(Branch::Image, k, false));
            }
        }
        for _ in &slots[prompt + decoded + fed..] {
            c.row_tags.push(tag(Branch::Image, k + 1, true));
        }
        for &slot in &slots[prompt + decoded + fed..] {
            keys.push((slot, tag(Branch::Image, k + 1, true)));
        }
        // Rows: C_{k-1} first, then the masked block (the planner's order).
        let masked_rows = c.row_tags.split_off(c.row_tags.len() - masked);
        c.row_tags.extend(fed_rows);
        c.row_tags.extend(masked_rows);
        for (slot, t) in keys {
            c.kv_indices.push(slot);
            c.kv_tags.push(t);
            let at = slot as usize * kv_dim;
            c.k_pool[at..at + kv_dim].copy_from_slice(&bf16s(&mut r, kv_dim, 1.0));
            c.v_pool[at..at + kv_dim].copy_from_slice(&bf16s(&mut r, kv_dim, 1.0));
        }
        c.seq_indptr.push(c.row_tags.len() as u32);
        c.kv_indptr.push(c.kv_indices.len() as u32);
    }
    c.q = bf16s(&mut r, c.row_tags.len() * shape.q_dim(), 3.0);
    c
}

/// How the key tiles of a case classify against its v2 query tiles (host twin of the kernel's
/// decisions): (hidden, mixed or partial, visible and full).
fn tile_class_counts(c: &AttnCase) -> (usize, usize, usize) {
    use sparse_lavida::contract::attn::{QueryDesc, TileClass, TileSummary};
    let (qseq, qrow0) = ops::query_tiles(&c.seq_indptr, SL_ATTN_BLOCK_M);
    let (kptr, sums) = key_tile_summaries(&c.kv_indptr, &c.kv_tags, 64);
    let mut n = (0, 0, 0);
    for (&s, &r0) in qseq.iter().zip(&qrow0) {
        let end = (r0 + SL_ATTN_BLOCK_M).min(c.seq_indptr[s as usize + 1]);
        let q = QueryDesc::new(
            &TileSummary::of(&c.row_tags[r0 as usize..end as usize]),
            c.joint,
        );
        let keys = (c.kv_indptr[s as usize + 1] - c.kv_indptr[s as usize]) as usize;
        for t in kptr[s as usize]..kptr[s as usize + 1] {
            let i = (t - kptr[s as usize]) as usize;
            let full = keys - i * 64 >= 64;
            match q.classify(&sums[t as usize]) {
                TileClass::Hidden => n.0 += 1,
                TileClass::Visible if full => n.2 += 1,
                _ => n.1 += 1,
            }
        }
    }
    n
}

/// The tile classes on the layouts the samplers produce: sparse steps (hidden prompt tiles in
/// non-joint layers, hidden masked tiles for clean rows, mixed boundary tiles, fully visible
/// tiles for the masked block) and the dense baseline (all visible, a partial last tile), for
/// both head dims, 64- and 128-row query tiles, splits, and both kernel versions.
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_attention_tile_classes_on_step_layouts() {
    let dev = device();
    let mut seed = 1700;
    // (prompt keys, decoded, C_{k-1} rows, C_k + registers) per sequence.
    let sparse = [(70usize, 200usize, 150usize, 100usize), (64, 130, 9, 40)];
    let dense = [(64usize, 230usize, 0usize, 0usize)];
    for head_dim in [64usize, 128] {
        for (seqs, is_dense) in [(&sparse[..], false), (&dense[..], true)] {
            for joint in [false, true] {
                seed += 1;
                let shape = AttnShape {
                    n_heads: 2,
                    n_kv_heads: 1,
                    head_dim,
                };
                let mut c = attn_case_steps(seed, shape, seqs, joint, is_dense);
                if is_dense {
                    // Every key is a row of the dense pass.
                    let rows = c.kv_tags.len();
                    c.row_tags = c.kv_tags.clone();
                    c.seq_indptr = vec![0, rows as u32];
                    c.q = bf16s(&mut rng(seed), rows * shape.q_dim(), 3.0);
                }
                let (hidden, mixed, visible) = tile_class_counts(&c);
                let what = format!("hd {head_dim} dense {is_dense} joint {joint}");
                assert!(visible > 0, "{what}: no fully visible tile");
                assert!(mixed > 0, "{what}: no mixed or partial tile");
                if !is_dense {
                    assert!(hidden > 0, "{what}: no hidden tile");
                }
                let want = c.naive();
                for n in [None, Some(1), Some(3)] {
                    let (o, lse, z) = run_attention(&dev, &c, n);
                    check_attention(&format!("{what} ({z} splits)"), &want, head_dim, &o, &lse);
                }
                let (o, lse, _) = run_attention_version(&dev, &c, None, AttnVersion::V1);
                check_attention(&format!("{what} v1"), &want, head_dim, &o, &lse);
            }
        }
    }
}

#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_attention_rejects_bad_shapes_before_launch() {
    let dev = device();
    let shape = AttnShape {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 64,
    };
    let c = attn_case(900, shape, &[(10, 20, false)], true);
    let mut plan = AttnPlan::new(&dev, &c.layout(), None).unwrap();
    let q = dev.upload(&c.q).unwrap();
    let k = dev.upload(&c.k_pool).unwrap();
    let v_short = dev.upload(&c.v_pool[..c.v_pool.len() - 64]).unwrap();
    let v = dev.upload(&c.v_pool).unwrap();
    let mut o = dev.upload(&vec![bf16::NAN; 10 * 128]).unwrap();
    // Each call refused before launch: the error's text.
    let mut refused = |args: &AttnArgs, o: &mut cudarc::driver::CudaSlice<bf16>| {
        let out = AttnOut {
            o,
            o_stride: 128,
            lse: None,
        };
        ops::attention(&dev, &mut plan, args, out)
            .unwrap_err()
            .to_string()
    };
    let args = AttnArgs {
        q: &q,
        q_stride: 128,
        k_pool: &k,
        v_pool: &v_short,
        kv_stride: 64,
        joint: true,
    };
    let e = refused(&args, &mut o);
    assert!(e.contains("v_pool"), "{e}");
    let args = AttnArgs {
        v_pool: &v,
        q_stride: 132,
        ..args
    };
    let e = refused(&args, &mut o);
    assert!(e.contains("q row stride 132"), "{e}");
    // q as an engine's view 2 bytes into an allocation: refused, not a misaligned cp.async.
    let mut padded = c.q.clone();
    padded.push(bf16::ZERO);
    let whole = dev.upload(&padded).unwrap();
    let (base, _sync) = whole.device_ptr(dev.stream());
    // SAFETY: the view covers `c.q.len()` values inside `whole`'s allocation (one value in),
    // which outlives it; it is leaked below, never freed through the view.
    let view = unsafe { dev.stream().upgrade_device_ptr::<bf16>(base + 2, c.q.len()) };
    let args = AttnArgs {
        q: &view,
        q_stride: 128,
        ..args
    };
    let e = refused(&args, &mut o);
    view.leak();
    assert!(
        e.contains("q starts at") && e.contains("not on 16 bytes"),
        "{e}"
    );
    assert!(
        dev.download(&o).unwrap().iter().all(|x| x.is_nan()),
        "nothing may be launched on bad input"
    );
}

// ------------------------------------------------------------------------------------------
// GPU: device-resident generation (kernels/program.cu vs src/sampler/patch.rs)
// ------------------------------------------------------------------------------------------

/// Uploads `host`, padded with one `pad` when empty (zero-length device buffers are avoided,
/// as the ops do).
fn upload_u32(dev: &CudaDevice, host: &[u32], pad: u32) -> cudarc::driver::CudaSlice<u32> {
    if host.is_empty() {
        dev.upload(&[pad]).unwrap()
    } else {
        dev.upload(host).unwrap()
    }
}

/// `v` cut to its logical length `n`.
fn cut<T>(mut v: Vec<T>, n: usize) -> Vec<T> {
    v.truncate(n);
    v
}

/// A random state of `n` positions with `decoded` of them decoded (in random order, over
/// consecutive steps of random sizes).
fn random_device_state(r: &mut ChaCha8Rng, n: usize, decoded: usize, mask_id: u32) -> DeviceState {
    let mut st = DeviceState::new(n, mask_id);
    let mut idx: Vec<u32> = (0..n as u32).collect();
    idx.shuffle(r);
    let mut step = 0;
    for (rank, &i) in idx[..decoded].iter().enumerate() {
        if rank > 0 && r.gen_bool(0.3) {
            step += 1;
        }
        st.order[rank] = i;
        st.tokens[i as usize] = r.gen_range(0..5000);
        st.decoded_step[i as usize] = step;
    }
    st
}

/// The state on the device.
fn upload_state(dev: &CudaDevice, st: &DeviceState) -> DeviceStateBufs {
    let mut bufs = DeviceStateBufs::new(dev, st.len()).unwrap();
    if !st.is_empty() {
        dev.write(&st.tokens, &mut bufs.tokens).unwrap();
        dev.write(&st.order, &mut bufs.order).unwrap();
        dev.write(&st.decoded_step, &mut bufs.decoded_step).unwrap();
    }
    bufs
}

/// Random plan lengths: up to `max.0` rows, `max.1` keys and `max.2` sampled positions; under
/// CFG (`cfg`) twice as many logits rows as sampled positions.
fn random_lens(r: &mut ChaCha8Rng, max: (usize, usize, usize), cfg: bool) -> PatchLens {
    let samples = r.gen_range(0..max.2);
    let rows = r.gen_range(0..max.0);
    let keys = r.gen_range(0..max.1);
    PatchLens {
        rows,
        keys,
        logits: if cfg { 2 * samples } else { samples },
        samples,
    }
}

/// Random template arrays of `lens`, one per field in `Field::ALL` order.
fn random_arrays(r: &mut ChaCha8Rng, lens: PatchLens) -> [Vec<u32>; 7] {
    Field::ALL.map(|f| (0..lens.of(f)).map(|_| r.r#gen()).collect())
}

/// Random patches over arrays of `lens`: a random subset of each field's entries (fields in
/// `skip` get none), each with a random source, an argument that is sometimes past the state or
/// the list it reads, and an offset that sometimes wraps.
fn random_patches(r: &mut ChaCha8Rng, n: usize, lens: PatchLens, skip: &[Field]) -> Vec<Patch> {
    let mut patches = Vec::new();
    for field in Field::ALL {
        if skip.contains(&field) {
            continue;
        }
        for index in 0..lens.of(field) as u32 {
            if !r.gen_bool(0.6) {
                continue;
            }
            let arg = if r.gen_bool(0.85) {
                r.gen_range(0..n.max(1) as u32)
            } else {
                r.gen_range(n as u32..n as u32 + 50)
            };
            let add = if r.gen_bool(0.1) {
                u32::MAX - r.gen_range(0..4)
            } else {
                r.gen_range(0..1000)
            };
            patches.push(Patch {
                field,
                index,
                source: Source::ALL[r.gen_range(0..Source::ALL.len())],
                arg,
                add,
            });
        }
    }
    patches.shuffle(r);
    patches
}

/// `sl_resolve_plan` equals `patch::lists` + `patch::apply`: the lists (padded with
/// UNDECODED), every plan array (entries no patch writes keep their template values), and
/// the state is left as it was. Sizes around the warp width, blocks inside, across and past
/// the response, patches reading past the state and the lists, one target not given.
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_resolve_plan_matches_patch_lists_and_apply() {
    let dev = device();
    let mut case = 0u64;
    for &n in &[0usize, 1, 31, 32, 33, 100, 1000, 4096] {
        for decoded_frac in [0.0, 0.4, 1.0] {
            case += 1;
            let mut r = rng(2000 + case);
            let decoded = ((n as f64) * decoded_frac) as usize;
            let st = random_device_state(&mut r, n, decoded, 77);
            let b0 = r.gen_range(0..=n as u32 + 5);
            let b1 = r.gen_range(b0..=n as u32 + 40);
            // Under CFG (every third case) twice as many logits rows as samples.
            let lens = random_lens(&mut r, (60, 300, 60), case.is_multiple_of(3));
            // Every other case writes no sample positions and gives no target for them.
            let skip: &[Field] = if case.is_multiple_of(2) {
                &[Field::SamplePos]
            } else {
                &[]
            };
            let patches = random_patches(&mut r, n, lens, skip);
            let mut want = random_arrays(&mut r, lens);
            let mut dev_targets: Vec<_> = want.iter().map(|v| upload_u32(&dev, v, 0)).collect();

            let l = patch::lists(&st, (b0, b1));
            patch::apply(&patches, &st, &l, &mut PlanArrays::by_field(&mut want));

            // Every case but a third also rebuilds attention key-tile summaries over the
            // patched tags, for random sequences of the keys (poisoned buffer).
            let with_summary = !case.is_multiple_of(3);
            let mut cuts: Vec<u32> = (0..r.gen_range(0..5))
                .map(|_| r.gen_range(0..=lens.keys as u32))
                .collect();
            cuts.sort_unstable();
            let kv_indptr: Vec<u32> = std::iter::once(0)
                .chain(cuts)
                .chain(std::iter::once(lens.keys as u32))
                .collect();
            let n_seqs = kv_indptr.len() - 1;
            let (_, zero_tiles) = key_tile_summaries(&kv_indptr, &vec![Tag(0); lens.keys], 64);
            let n_ktiles = zero_tiles.len();
            let d_kv_indptr = dev.upload(&kv_indptr).unwrap();
            let mut d_summary = upload_u32(&dev, &vec![0xAAAA_AAAA; n_ktiles * 8], 0);

            let mut state = upload_state(&dev, &st);
            let pbuf = ops::upload_patches(&dev, &patches, lens).unwrap();
            {
                let [ids, pos, slots, kv, tags, lr, sp] = &mut dev_targets[..] else {
                    unreachable!()
                };
                let targets = PatchTargets {
                    row_ids: Some(ids),
                    row_pos: Some(pos),
                    row_slots: Some(slots),
                    kv_indices: Some(kv),
                    kv_tags: Some(tags),
                    logits_rows: Some(lr),
                    sample_pos: if skip.is_empty() { Some(sp) } else { None },
                    kv_summary: with_summary.then_some(SummaryTarget {
                        kv_indptr: &d_kv_indptr,
                        n_seqs,
                        n_keys: lens.keys,
                        n_ktiles,
                        summary: &mut d_summary,
                    }),
                };
                ops::resolve_plan(&dev, &pbuf, &mut state, (b0, b1), targets).unwrap();
            }
            let what = format!("n {n} decoded {decoded} block [{b0}, {b1}) lens {lens:?}");
            for (k, f) in Field::ALL.iter().enumerate() {
                let got = cut(dev.download(&dev_targets[k]).unwrap(), lens.of(*f));
                assert_eq!(got, want[k], "{what}: {f:?}");
            }
            let got = cut(dev.download(&d_summary).unwrap(), n_ktiles * 8);
            if with_summary {
                let tags: Vec<Tag> = want[Field::KvTag as usize]
                    .iter()
                    .map(|&t| Tag(t))
                    .collect();
                let (_, sums) = key_tile_summaries(&kv_indptr, &tags, 64);
                let words: Vec<u32> = sums.iter().flat_map(|s| s.0).collect();
                assert_eq!(got, words, "{what}: key-tile summaries over {kv_indptr:?}");
            } else {
                assert!(
                    got.iter().all(|&w| w == 0xAAAA_AAAA),
                    "{what}: summaries written without a target"
                );
            }
            assert_eq!(state.download(&dev).unwrap(), st, "{what}: state changed");
            assert_eq!(state.download_lists(&dev).unwrap(), l, "{what}: lists");
            // The raw lists: ascending prefix, UNDECODED after it.
            for (name, buf, list) in [
                ("q", &state.q, &l.q),
                ("m", &state.m, &l.m),
                ("d", &state.d, &l.d),
            ] {
                let mut padded = list.clone();
                padded.resize(n, UNDECODED);
                assert_eq!(
                    cut(dev.download(buf).unwrap(), n),
                    padded,
                    "{what}: raw {name}"
                );
            }
        }
    }
}

/// Confidences with many ties, both zeros, infinities and NaNs of both signs.
fn tied_confidences(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    let pool = [
        0.5,
        0.25,
        0.75,
        1.0,
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        1e-30,
    ];
    (0..n)
        .map(|_| {
            if r.gen_bool(0.5) {
                pool[r.gen_range(0..pool.len())]
            } else {
                r.r#gen::<f32>()
            }
        })
        .collect()
}

/// `sl_commit` equals `patch::commit` for text (by confidence, with ties, signed zeros and NaNs
/// ordered as `f32::total_cmp`) and t2i (query order), committing none, some and all of the
/// query; query entries past the response are skipped, as if absent.
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_commit_matches_patch_commit() {
    let dev = device();
    let mut case = 0u64;
    for &n in &[1usize, 32, 33, 300, 2000] {
        for by_confidence in [true, false] {
            for commit_frac in [0.0, 0.5, 1.0] {
                for with_skipped in [false, true] {
                    case += 1;
                    let mut r = rng(3000 + case);
                    let decoded = r.gen_range(0..n);
                    let st = random_device_state(&mut r, n, decoded, 9);
                    let mut undecoded: Vec<u32> = (0..n as u32)
                        .filter(|&i| st.decoded_step[i as usize] == UNDECODED)
                        .collect();
                    undecoded.shuffle(&mut r);
                    let nq = r.gen_range(1..=undecoded.len().min(300));
                    let valid: Vec<u32> = undecoded[..nq].to_vec();
                    let token: Vec<u32> = (0..nq).map(|_| r.gen_range(0..5000)).collect();
                    let conf = tied_confidences(&mut r, nq);
                    let n_commit = ((nq as f64) * commit_frac) as u32;
                    let rule = CommitRule {
                        step: r.gen_range(0..100),
                        n_commit,
                        rank_base: decoded as u32,
                        by_confidence,
                    };
                    let mut want = st.clone();
                    patch::commit(&mut want, &valid, &token, &conf, rule).unwrap();
                    // The device query: the same entries with out-of-range ones interleaved.
                    let (mut q, mut t, mut c) = (Vec::new(), Vec::new(), Vec::new());
                    for j in 0..nq {
                        if with_skipped && r.gen_bool(0.3) {
                            q.push(if r.gen_bool(0.5) {
                                UNDECODED
                            } else {
                                n as u32 + r.gen_range(0..9)
                            });
                            t.push(r.r#gen());
                            c.push(f32::INFINITY);
                        }
                        q.push(valid[j]);
                        t.push(token[j]);
                        c.push(conf[j]);
                    }
                    let mut state = upload_state(&dev, &st);
                    let (dq, dt, dc) = (
                        dev.upload(&q).unwrap(),
                        dev.upload(&t).unwrap(),
                        dev.upload(&c).unwrap(),
                    );
                    ops::commit(&dev, &dq, &dt, &dc, q.len(), rule, &mut state).unwrap();
                    let what = format!(
                        "n {n} query {nq} (+{} skipped) commit {n_commit} by_confidence {by_confidence}",
                        q.len() - nq
                    );
                    assert_eq!(state.download(&dev).unwrap(), want, "{what}");
                }
            }
        }
    }
}

/// A whole text generation on the device, step by step against the host twin: reset, then per
/// block and step `resolve_plan` (lists of the block, patches reading them) and
/// `commit_from_lists` with `n_query` = the response length (the list padding is skipped).
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_text_generation_state_follows_the_host_twin() {
    let dev = device();
    let mut r = rng(4000);
    let (n, block, per_step, mask_id) = (100usize, 32u32, 8u32, 4242u32);
    let mut state = DeviceStateBufs::new(&dev, n).unwrap();
    assert_eq!(state.download(&dev).unwrap(), DeviceState::new(n, 0));
    state.reset(&dev, mask_id).unwrap();
    let mut host = DeviceState::new(n, mask_id);
    assert_eq!(state.download(&dev).unwrap(), host);
    assert_eq!(state.download_lists(&dev).unwrap(), Lists::default());
    let lens = PatchLens {
        rows: 40,
        keys: 0,
        logits: 40,
        samples: 40,
    };
    let mut row_ids = dev.upload(&[0u32; 40]).unwrap();
    let mut sample_pos = dev.upload(&[0u32; 40]).unwrap();
    // The host twins of the two plan arrays, patched in lockstep.
    let (mut host_ids, mut host_pos) = (vec![0u32; 40], vec![0u32; 40]);
    let (mut rank, mut step) = (0u32, 0u32);
    for b0 in (0..n as u32).step_by(block as usize) {
        let b1 = (b0 + block).min(n as u32);
        while (b0..b1).any(|i| host.decoded_step[i as usize] == UNDECODED) {
            let l = patch::lists(&host, (b0, b1));
            // The query's sampler positions (after a prompt of 7) and the latest decoded tokens.
            let mut patches = Vec::new();
            for j in 0..l.q.len() as u32 {
                patches.push(Patch {
                    field: Field::SamplePos,
                    index: j,
                    source: Source::Query,
                    arg: j,
                    add: 7,
                });
            }
            for k in 0..rank.min(40) {
                patches.push(Patch {
                    field: Field::RowId,
                    index: k,
                    source: Source::RankToken,
                    arg: rank - 1 - k,
                    add: 0,
                });
            }
            let pbuf = ops::upload_patches(&dev, &patches, lens).unwrap();
            let targets = PatchTargets {
                row_ids: Some(&mut row_ids),
                sample_pos: Some(&mut sample_pos),
                ..PatchTargets::default()
            };
            ops::resolve_plan(&dev, &pbuf, &mut state, (b0, b1), targets).unwrap();
            let mut unused: [Vec<u32>; 5] = Default::default();
            let [a, b, c, d, e] = &mut unused;
            let mut arrays = PlanArrays {
                row_ids: &mut host_ids,
                row_pos: a,
                row_slots: b,
                kv_indices: c,
                kv_tags: d,
                logits_rows: e,
                sample_pos: &mut host_pos,
            };
            patch::apply(&patches, &host, &l, &mut arrays);
            assert_eq!(
                dev.download(&row_ids).unwrap(),
                host_ids,
                "step {step}: row ids"
            );
            assert_eq!(
                dev.download(&sample_pos).unwrap(),
                host_pos,
                "step {step}: sample positions"
            );

            let nq = l.q.len();
            let token: Vec<u32> = (0..n).map(|_| r.gen_range(0..5000)).collect();
            let conf = tied_confidences(&mut r, n);
            let rule = CommitRule {
                step,
                n_commit: per_step.min(nq as u32),
                rank_base: rank,
                by_confidence: true,
            };
            patch::commit(&mut host, &l.q, &token[..nq], &conf[..nq], rule).unwrap();
            let (dt, dc) = (dev.upload(&token).unwrap(), dev.upload(&conf).unwrap());
            ops::commit_from_lists(&dev, &dt, &dc, n, rule, &mut state).unwrap();
            assert_eq!(state.download(&dev).unwrap(), host, "step {step}");
            rank += rule.n_commit;
            step += 1;
        }
    }
    assert_eq!(rank as usize, n);
    // A reset starts afresh.
    state.reset(&dev, 1).unwrap();
    assert_eq!(state.download(&dev).unwrap(), DeviceState::new(n, 1));
}

/// A reset and two resolve + commit steps captured as one CUDA graph, then replayed twice:
/// step 1's patch reads the token step 0 committed on the device, so the graph really resolves
/// plans from run-time state; each replay starts with the reset and ends in the host twin's
/// state. (Capture needs cudarc's event tracking off, which `CudaDevice::new` does: with it
/// on, each launch would wait on its buffers' events recorded before the capture, which CUDA
/// rejects inside a capture.)
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_resolve_and_commit_replay_from_a_cuda_graph() {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let dev = device();
    assert!(!dev.context().is_event_tracking());
    let mut r = rng(4100);
    let (n, mask_id) = (64usize, 5u32);
    let mut state = DeviceStateBufs::new(&dev, n).unwrap();
    let lens = PatchLens {
        rows: 2,
        keys: 0,
        logits: 0,
        samples: 0,
    };
    let p = |index, source, arg| Patch {
        field: Field::RowId,
        index,
        source,
        arg,
        add: 0,
    };
    // Step 0 reads rank 0 before anything is decoded (writes nothing); step 1 reads it after.
    let step_patches = [
        vec![p(0, Source::RankToken, 0)],
        vec![p(1, Source::RankToken, 0)],
    ];
    let pbufs: Vec<_> = step_patches
        .iter()
        .map(|ps| ops::upload_patches(&dev, ps, lens).unwrap())
        .collect();
    let mut row_ids = dev.upload(&[123u32, 456]).unwrap();
    let token: Vec<u32> = (0..n).map(|_| r.gen_range(0..5000)).collect();
    let conf = tied_confidences(&mut r, n);
    let (dt, dc) = (dev.upload(&token).unwrap(), dev.upload(&conf).unwrap());
    let rules = [0u32, 1].map(|step| CommitRule {
        step,
        n_commit: 3,
        rank_base: 3 * step,
        by_confidence: true,
    });
    let block = (8u32, 40u32);
    dev.synchronize().unwrap();

    let stream = dev.stream().clone();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    state.reset(&dev, mask_id).unwrap();
    for (pbuf, rule) in pbufs.iter().zip(rules) {
        let targets = PatchTargets {
            row_ids: Some(&mut row_ids),
            ..PatchTargets::default()
        };
        ops::resolve_plan(&dev, pbuf, &mut state, block, targets).unwrap();
        ops::commit_from_lists(&dev, &dt, &dc, n, rule, &mut state).unwrap();
    }
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("the capture recorded a graph");
    dev.synchronize().unwrap();
    assert_eq!(
        dev.download(&row_ids).unwrap(),
        vec![123, 456],
        "nothing runs during a capture"
    );

    let mut host = DeviceState::new(n, mask_id);
    let mut host_ids = vec![123u32, 456];
    for (ps, rule) in step_patches.iter().zip(rules) {
        let l = patch::lists(&host, block);
        let mut unused: [Vec<u32>; 6] = Default::default();
        let [a, b, c, d, e, f] = &mut unused;
        let mut arrays = PlanArrays {
            row_ids: &mut host_ids,
            row_pos: a,
            row_slots: b,
            kv_indices: c,
            kv_tags: d,
            logits_rows: e,
            sample_pos: f,
        };
        patch::apply(ps, &host, &l, &mut arrays);
        let nq = l.q.len();
        patch::commit(&mut host, &l.q, &token[..nq], &conf[..nq], rule).unwrap();
    }
    assert_eq!(host_ids[0], 123, "step 0's patch reads an undecoded rank");
    assert_eq!(host_ids[1], token[host.order[0] as usize - 8]);
    for replay in 0..2 {
        graph.launch().unwrap();
        dev.synchronize().unwrap();
        assert_eq!(state.download(&dev).unwrap(), host, "replay {replay}");
        assert_eq!(dev.download(&row_ids).unwrap(), host_ids, "replay {replay}");
    }
}

/// `gather_rows` moves rows bit for bit, an out-of-range row index gives a NaN row, and
/// nothing past `n` rows is written.
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_gather_rows_matches_host_and_nans_bad_rows() {
    let dev = device();
    let mut r = rng(4200);
    for &(x_rows, cols, n) in &[
        (5usize, 7usize, 9usize),
        (300, 1001, 70),
        (1, 1, 1),
        (4, 4, 0),
    ] {
        let x = uniform(&mut r, x_rows * cols, 3.0);
        let mut rows: Vec<u32> = (0..n).map(|_| r.gen_range(0..x_rows as u32)).collect();
        if n > 1 {
            rows[n / 2] = x_rows as u32; // just past the end
            rows[n - 1] = u32::MAX;
        }
        let poison = -7.5f32;
        let mut out = dev.upload(&vec![poison; n * cols + 3]).unwrap();
        let (dx, drows) = (dev.upload(&x).unwrap(), upload_u32(&dev, &rows, 0));
        ops::gather_rows(&dev, &dx, x_rows, cols, &drows, n, &mut out).unwrap();
        let got = dev.download(&out).unwrap();
        for (j, &row) in rows.iter().enumerate() {
            let got_row = &got[j * cols..][..cols];
            if (row as usize) < x_rows {
                let want = &x[row as usize * cols..][..cols];
                assert_eq!(
                    got_row.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "row {j}"
                );
            } else {
                assert!(
                    got_row.iter().all(|v| v.is_nan()),
                    "row {j} (index {row}) not NaN"
                );
            }
        }
        assert!(
            got[n * cols..].iter().all(|&v| v == poison),
            "written past n rows"
        );
    }
}

/// `sample_to_device` runs the same kernel as `ops::sample`: bit-identical tokens, confidences
/// and LSEs; a non-finite logit sets the flag, which stays set through a later clean call.
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_sample_to_device_equals_sample_and_its_flag_is_sticky() {
    let dev = device();
    let mut case = 0u64;
    for &(vocab, stride, n) in &[(1001usize, 1004usize, 13usize), (7, 8, 3)] {
        for guidance in [None, Some(3.0f32)] {
            for temperature in [0.0f32, 0.7] {
                case += 1;
                let mut r = rng(4300 + case);
                let rows = if guidance.is_some() { 2 * n } else { n };
                let (l, _) = logits(&mut r, rows, vocab, stride);
                let banned: Vec<u32> = (1..vocab as u32).filter(|_| r.gen_bool(0.3)).collect();
                let p = SampleParams {
                    guidance,
                    temperature,
                    banned: banned.clone(),
                    seed: r.r#gen(),
                    step: r.gen_range(0..64),
                    request: r.gen_range(0..4),
                    positions: (0..n).map(|_| r.gen_range(0..5000)).collect(),
                };
                let l_dev = dev.upload(&l).unwrap();
                let want = ops::sample(&dev, &l_dev, vocab, stride, &p).unwrap();
                let mask = BannedMask::new(&dev, vocab, &banned).unwrap();
                let positions = dev.upload(&p.positions).unwrap();
                let mut token = dev.upload(&vec![u32::MAX; n]).unwrap();
                let mut confidence = dev.upload(&vec![f32::NAN; n]).unwrap();
                let mut lse = dev.upload(&vec![f32::NAN; n]).unwrap();
                let mut flag = dev.upload(&[0u32]).unwrap();
                let args = DeviceSampleArgs {
                    positions: &positions,
                    banned: Some(&mask),
                    n,
                    guidance,
                    temperature,
                    seed: p.seed,
                    step: p.step,
                    request: p.request,
                };
                ops::sample_to_device(
                    &dev,
                    &l_dev,
                    vocab,
                    stride,
                    args,
                    SampleOut {
                        token: &mut token,
                        confidence: &mut confidence,
                        lse: &mut lse,
                        error_flag: &mut flag,
                    },
                )
                .unwrap();
                let what = format!("vocab {vocab} g {guidance:?} tau {temperature}");
                assert_eq!(dev.download(&flag).unwrap(), vec![0], "{what}");
                let (t, c, s) = (
                    dev.download(&token).unwrap(),
                    dev.download(&confidence).unwrap(),
                    dev.download(&lse).unwrap(),
                );
                for (i, w) in want.iter().enumerate() {
                    assert_eq!(t[i], w.token, "{what}: row {i}");
                    assert_eq!(c[i].to_bits(), w.confidence.to_bits(), "{what}: row {i}");
                    assert_eq!(s[i].to_bits(), w.lse.to_bits(), "{what}: row {i}");
                }
                // A NaN logit sets the flag; a clean call afterwards leaves it set.
                let mut bad = l.clone();
                bad[(rows - 1) * stride] = f32::NAN;
                let bad_dev = dev.upload(&bad).unwrap();
                for logits in [&bad_dev, &l_dev] {
                    ops::sample_to_device(
                        &dev,
                        logits,
                        vocab,
                        stride,
                        args,
                        SampleOut {
                            token: &mut token,
                            confidence: &mut confidence,
                            lse: &mut lse,
                            error_flag: &mut flag,
                        },
                    )
                    .unwrap();
                    assert_eq!(dev.download(&flag).unwrap(), vec![1], "{what}: sticky flag");
                }
                // A mask over another vocabulary is refused before launch.
                let other = BannedMask::new(&dev, vocab + 1, &[0]).unwrap();
                let e = ops::sample_to_device(
                    &dev,
                    &l_dev,
                    vocab,
                    stride,
                    DeviceSampleArgs {
                        banned: Some(&other),
                        ..args
                    },
                    SampleOut {
                        token: &mut token,
                        confidence: &mut confidence,
                        lse: &mut lse,
                        error_flag: &mut flag,
                    },
                )
                .unwrap_err();
                assert!(e.to_string().contains("banned mask covers"), "{e}");
            }
        }
    }
}

/// `embed_flagged` writes what `ops::embed` writes and ORs a bad id into the caller's flag
/// (sticky), where `ops::embed` reports it as an error.
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_embed_flagged_matches_embed_and_flags_a_bad_id() {
    let dev = device();
    let mut r = rng(4400);
    let (rows, d, n) = (50usize, 96usize, 20usize);
    let table = dev.upload(&bf16s(&mut r, rows * d, 1.0)).unwrap();
    let reg = dev.upload(&bf16s(&mut r, d, 1.0)).unwrap();
    let mut ids: Vec<u32> = (0..n).map(|_| r.gen_range(0..rows as u32)).collect();
    ids[3] = REGISTER;
    let ids_dev = dev.upload(&ids).unwrap();
    let mut want = dev.upload(&vec![f32::NAN; n * d]).unwrap();
    ops::embed(&dev, &table, &reg, &ids_dev, n, &mut want, None).unwrap();
    let mut got = dev.upload(&vec![f32::NAN; n * d]).unwrap();
    let mut flag = dev.upload(&[0u32]).unwrap();
    ops::embed_flagged(&dev, &table, &reg, &ids_dev, n, &mut got, None, &mut flag).unwrap();
    assert_eq!(dev.download(&flag).unwrap(), vec![0]);
    let (g, w) = (dev.download(&got).unwrap(), dev.download(&want).unwrap());
    assert_eq!(
        g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        w.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );

    ids[7] = rows as u32;
    let bad_ids = dev.upload(&ids).unwrap();
    ops::embed_flagged(&dev, &table, &reg, &bad_ids, n, &mut got, None, &mut flag).unwrap();
    assert_eq!(dev.download(&flag).unwrap(), vec![1]);
    ops::embed_flagged(&dev, &table, &reg, &ids_dev, n, &mut got, None, &mut flag).unwrap();
    assert_eq!(dev.download(&flag).unwrap(), vec![1], "the flag is sticky");
    let e = ops::embed(&dev, &table, &reg, &bad_ids, n, &mut want, None).unwrap_err();
    assert!(e.to_string().contains("ids[7] = 50"), "{e}");
}

// ------------------------------------------------------------------------------------------
// Host: a statement-by-statement transcription of kernels/program.cu vs patch.rs
// ------------------------------------------------------------------------------------------

/// `__ballot_sync` over the 32 lanes of one warp step.
fn ballot(flags: &[bool; 32]) -> u32 {
    flags
        .iter()
        .enumerate()
        .fold(0, |b, (l, &f)| b | (u32::from(f) << l))
}

/// `sl_resolve_plan` transcribed (warp 0's lanes in lockstep, then the block's threads one after
/// another): returns the raw lists and patches `targets` (`None`: a null pointer). `lens` is
/// `(n_rows, n_keys, n_logits, n_samples)`.
fn resolve_transcribed(
    st: &DeviceState,
    block: (u32, u32),
    patches: &[[u32; 4]],
    targets: &mut [Option<Vec<u32>>; 7],
    lens: (u32, u32, u32, u32),
) -> [Vec<u32>; 3] {
    let n = st.len() as u32;
    let mut lists = [
        vec![0xDEAD_u32; n as usize],
        vec![0xDEAD; n as usize],
        vec![0xDEAD; n as usize],
    ];
    let mut len = [0u32; 3]; // q, m, d
    let mut c0 = 0;
    while c0 < n {
        let mut class = [[false; 32]; 3];
        for lane in 0..32 {
            let i = c0 + lane;
            let inside = i < n;
            let dec = inside && st.decoded_step[i as usize] != UNDECODED;
            let inq = inside && !dec && i >= block.0 && i < block.1;
            let inm = inside && !dec && !inq;
            class[0][lane as usize] = inq;
            class[1][lane as usize] = inm;
            class[2][lane as usize] = dec;
        }
        for k in 0..3 {
            let b = ballot(&class[k]);
            for lane in 0..32u32 {
                if class[k][lane as usize] {
                    let below = (1u32 << lane) - 1;
                    lists[k][(len[k] + (b & below).count_ones()) as usize] = c0 + lane;
                }
            }
            len[k] += b.count_ones();
        }
        c0 += 32;
    }
    // Thread t pads entries t, t + T, ...: every entry at or past its list's length.
    for (list, &l) in lists.iter_mut().zip(&len) {
        for e in &mut list[l as usize..] {
            *e = UNDECODED;
        }
    }
    for &[kind, index, arg, add] in patches {
        let (target, tlen) = match kind >> 8 {
            0..=2 => (kind >> 8, lens.0),
            3 | 4 => (kind >> 8, lens.1),
            5 => (kind >> 8, lens.2),
            6 => (kind >> 8, lens.3),
            _ => continue,
        };
        let Some(dst) = targets[target as usize].as_mut() else {
            continue;
        };
        if index >= tlen {
            continue;
        }
        let v = match kind & 0xff {
            0 if arg < n => Some(st.tokens[arg as usize]),
            1 if arg < n => {
                let i = st.order[arg as usize];
                (i < n).then(|| st.tokens[i as usize])
            }
            2 if arg < n => {
                let i = st.order[arg as usize];
                (i != UNDECODED).then(|| add.wrapping_add(i))
            }
            s @ 3..=5 if arg < len[(s - 3) as usize] => {
                Some(add.wrapping_add(lists[(s - 3) as usize][arg as usize]))
            }
            6 if arg < len[2] => {
                let i = lists[2][arg as usize];
                Some(add.wrapping_add(st.decoded_step[i as usize].wrapping_add(1) << 2))
            }
            _ => None,
        };
        if let Some(v) = v {
            dst[index as usize] = v;
        }
    }
    lists
}

/// `total_order_key` of program.cu.
fn total_order_key(x: f32) -> i32 {
    let b = x.to_bits() as i32;
    b ^ (((b >> 31) as u32) >> 1) as i32
}

/// `sl_commit` transcribed.
fn commit_transcribed(
    st: &mut DeviceState,
    query: &[u32],
    token: &[u32],
    conf: &[f32],
    rule: CommitRule,
) {
    let n = st.len() as u32;
    let nq = query.len() as u32;
    let mut pick = |j: usize, i: u32, rank: u32| {
        let r = rule.rank_base + rank;
        if r < n {
            st.order[r as usize] = i;
        }
        st.tokens[i as usize] = token[j];
        st.decoded_step[i as usize] = rule.step;
    };
    if !rule.by_confidence {
        let mut seen = 0;
        let mut c0 = 0;
        while c0 < nq && seen < rule.n_commit {
            let mut cand = [false; 32];
            let mut idx = [UNDECODED; 32];
            for lane in 0..32 {
                let j = c0 + lane as u32;
                idx[lane] = if j < nq { query[j as usize] } else { UNDECODED };
                cand[lane] = idx[lane] < n;
            }
            let b = ballot(&cand);
            for lane in 0..32u32 {
                let rank = seen + (b & ((1u32 << lane) - 1)).count_ones();
                if cand[lane as usize] && rank < rule.n_commit {
                    pick((c0 + lane) as usize, idx[lane as usize], rank);
                }
            }
            seen += b.count_ones();
            c0 += 32;
        }
        return;
    }
    for j in 0..nq as usize {
        let i = query[j];
        if i >= n {
            continue;
        }
        let key = total_order_key(conf[j]);
        let mut rank = 0;
        let mut j2 = 0;
        while j2 < nq as usize && rank < rule.n_commit {
            let i2 = query[j2];
            if i2 < n {
                let key2 = total_order_key(conf[j2]);
                if key2 > key || (key2 == key && (i2 < i || (i2 == i && j2 < j))) {
                    rank += 1;
                }
            }
            j2 += 1;
        }
        if rank < rule.n_commit {
            pick(j, i, rank);
        }
    }
}

#[test]
fn total_order_key_orders_as_total_cmp() {
    let xs = [
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        1e-45,
        -1e-45,
        f32::MAX,
        f32::MIN,
        0.5,
    ];
    for &a in &xs {
        for &b in &xs {
            assert_eq!(
                total_order_key(a).cmp(&total_order_key(b)),
                a.total_cmp(&b),
                "{a} vs {b}"
            );
        }
    }
}

/// The transcriptions of `sl_resolve_plan` and `sl_commit` equal `patch::{lists, apply,
/// commit}` on random states, blocks, patches and queries (the same generators as the GPU
/// tests), so the kernels' indexing and ordering are right before they ever run.
#[test]
fn program_kernels_transcribed_match_patch_rs() {
    for case in 0..300u64 {
        let mut r = rng(5000 + case);
        let n = [0usize, 1, 31, 32, 33, 64, 100, 500][r.gen_range(0..8)];
        let decoded = r.gen_range(0..=n);
        let st = random_device_state(&mut r, n, decoded, 77);
        let b0 = r.gen_range(0..=n as u32 + 5);
        let b1 = r.gen_range(b0..=n as u32 + 40);
        // Under CFG (every other case) twice as many logits rows as sampled positions.
        let lens = random_lens(&mut r, (30, 80, 30), case.is_multiple_of(2));
        let skip: &[Field] = if case.is_multiple_of(3) {
            &[Field::KvTag]
        } else {
            &[]
        };
        let patches = random_patches(&mut r, n, lens, skip);
        ops::check_patches(&patches, lens).unwrap();
        let mut want = random_arrays(&mut r, lens);
        let mut targets: [Option<Vec<u32>>; 7] =
            std::array::from_fn(|k| (!skip.contains(&Field::ALL[k])).then(|| want[k].clone()));
        let l = patch::lists(&st, (b0, b1));
        patch::apply(&patches, &st, &l, &mut PlanArrays::by_field(&mut want));
        let encoded: Vec<[u32; 4]> = patches.iter().map(|p| p.encode()).collect();
        let lists = resolve_transcribed(
            &st,
            (b0, b1),
            &encoded,
            &mut targets,
            (
                lens.rows as u32,
                lens.keys as u32,
                lens.logits as u32,
                lens.samples as u32,
            ),
        );
        let what = format!("case {case}: n {n} block [{b0}, {b1})");
        for (k, t) in targets.iter().enumerate() {
            if let Some(t) = t {
                assert_eq!(t, &want[k], "{what}: {:?}", Field::ALL[k]);
            }
        }
        for (raw, list) in lists.iter().zip([&l.q, &l.m, &l.d]) {
            let mut padded = list.clone();
            padded.resize(n, UNDECODED);
            assert_eq!(raw, &padded, "{what}: lists");
        }

        // Commit: the block's query (the q list, padded as on the device), both rules.
        if l.q.is_empty() {
            continue;
        }
        let nq = l.q.len();
        let token: Vec<u32> = (0..n).map(|_| r.gen_range(0..5000)).collect();
        let conf = tied_confidences(&mut r, n);
        let rule = CommitRule {
            step: r.gen_range(0..50),
            n_commit: r.gen_range(0..=nq as u32),
            rank_base: decoded as u32,
            by_confidence: r.gen_bool(0.5),
        };
        let mut want = st.clone();
        patch::commit(&mut want, &l.q, &token[..nq], &conf[..nq], rule).unwrap();
        let mut got = st.clone();
        commit_transcribed(&mut got, &lists[0], &token, &conf, rule);
        assert_eq!(got, want, "{what}: commit {rule:?}");
    }
}
