//! The CUDA kernels against their CPU twins (SPEC §6), through the safe layer
//! (`sparse_lavida::cuda::ops`).
//!
//! GPU tests are `#[ignore = "needs a CUDA GPU"]`; run them on a GPU machine with
//! `cargo test --release --test gpu_kernels -- --ignored`. Each draws random inputs, rounds them
//! to bf16 where the kernel stores bf16, runs the CPU op on the SAME rounded values, poisons every
//! output before the launch (NaN, or `u32::MAX` for indices) and checks: relative L2 error
//! ≤ 1e-2 for bf16 outputs, exact equality where the kernel only moves data or must match bit
//! for bit (sampled tokens, aggregation), no NaN, every output written, nothing outside the
//! output touched.
//!
//! The tests without a GPU (not ignored) check what can be checked on the host: the probe fails
//! cleanly, the attention plan's tables, and the validation of inputs.

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
use sparse_lavida::cuda::abi::SL_ATTN_BLOCK_M;
use sparse_lavida::cuda::device::{CudaDevice, NO_DRIVER};
use sparse_lavida::cuda::ops::{
    self, AggregateInputs, AttnArgs, AttnLayout, AttnOut, AttnPlan, DecodeArrays, DeviceMask,
    EmbedNorm, IndexBuf, KvPool, RopeKv, ScoreShape, SwigluShape,
};
use sparse_lavida::plan::{REGISTER, Tag};
use sparse_lavida::sampler::{DecodeState, Layout, Switches, sparse_plan};

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn device() -> CudaDevice {
    CudaDevice::new(0).unwrap_or_else(|e| panic!("the GPU tests need a CUDA device: {e}"))
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
            assert_eq!(dev.kernels().images().len(), 4);
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
    let d = DecodeArrays::from_state(&st).unwrap();
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
#[ignore = "needs a CUDA GPU"]
fn gpu_device_opens_and_loads_every_kernel_file() {
    let dev = device();
    let info = dev.info();
    assert!(info.sm_count > 0 && info.cc.0 >= 8, "{info:?}");
    let files: Vec<&str> = dev.kernels().images().iter().map(|&(f, _)| f).collect();
    assert_eq!(files.len(), 5, "{files:?}");
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
#[ignore = "needs a CUDA GPU"]
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
#[ignore = "needs a CUDA GPU"]
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
#[ignore = "needs a CUDA GPU"]
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
#[ignore = "needs a CUDA GPU"]
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

        let mut q_dev = dev.upload(&q).unwrap();
        let k_dev = dev.upload(&k).unwrap();
        let v_dev = dev.upload(&v).unwrap();
        let pos_dev = dev.upload(&positions).unwrap();
        let slots_dev = IndexBuf::upload(&dev, &slots).unwrap();
        let poison = vec![bf16::NAN; n_slots * pool_stride];
        let mut k_pool = dev.upload(&poison).unwrap();
        let mut v_pool = dev.upload(&poison).unwrap();
        ops::rope_kv(
            &dev,
            RopeKv {
                shape,
                n_rows,
                positions: &pos_dev,
                slots: &slots_dev,
                rope_theta: theta,
                q: &mut q_dev,
                q_stride,
                k: &k_dev,
                v: &v_dev,
                kv_stride,
            },
            KvPool {
                k: &mut k_pool,
                v: &mut v_pool,
                stride: pool_stride,
            },
        )
        .unwrap();
        let what = format!("rope_kv case {case}");
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

#[test]
#[ignore = "needs a CUDA GPU"]
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
#[ignore = "needs a CUDA GPU"]
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
#[ignore = "needs a CUDA GPU"]
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
#[ignore = "needs a CUDA GPU"]
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
        let d = DecodeArrays::from_state(st).unwrap();
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
#[ignore = "needs a CUDA GPU"]
fn gpu_aggregate_matches_sparse_plan() {
    let dev = device();
    for (case, (layout, st, query, plan)) in aggregate_cases().iter().enumerate() {
        let (n_seqs, branch) = (layout.n_seqs(), layout.branch);
        let d = DecodeArrays::from_state(st).unwrap();
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

/// Runs the GPU attention with `n_splits` (None: the heuristic); returns (o dense, lse, splits).
fn run_attention(
    dev: &CudaDevice,
    c: &AttnCase,
    n_splits: Option<usize>,
) -> (Vec<bf16>, Vec<f32>, usize) {
    let rows = c.row_tags.len();
    let q_dim = c.shape.q_dim();
    let o_stride = q_dim + 8; // padded: the padding must stay poisoned
    let mut plan = AttnPlan::new(dev, &c.layout(), n_splits).unwrap();
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
#[ignore = "needs a CUDA GPU"]
fn gpu_attention_matches_naive_and_splits_agree() {
    let dev = device();
    let many = [
        (300usize, 500usize, false),
        (150, 2000, false),
        (1, 0, false),
        (0, 40, false),
        (70, 100, true),
    ];
    let few = [(5usize, 3000usize, false)];
    let decode = [(3usize, 700usize, false), (2, 64, true), (4, 129, false)];
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

#[test]
#[ignore = "needs a CUDA GPU"]
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
    let args = AttnArgs {
        q: &q,
        q_stride: 128,
        k_pool: &k,
        v_pool: &v_short,
        kv_stride: 64,
        joint: true,
    };
    let out = AttnOut {
        o: &mut o,
        o_stride: 128,
        lse: None,
    };
    let e = ops::attention(&dev, &mut plan, &args, out).unwrap_err();
    assert!(e.to_string().contains("v_pool"), "{e}");
    let args = AttnArgs {
        v_pool: &v,
        q_stride: 132,
        ..args
    };
    let out = AttnOut {
        o: &mut o,
        o_stride: 128,
        lse: None,
    };
    let e = ops::attention(&dev, &mut plan, &args, out).unwrap_err();
    assert!(e.to_string().contains("q row stride 132"), "{e}");
    assert!(
        dev.download(&o).unwrap().iter().all(|x| x.is_nan()),
        "nothing may be launched on bad input"
    );
}
