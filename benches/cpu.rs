//! CPU backend micro-benchmarks (criterion): the baseline each CUDA kernel is measured against,
//! at `small`-preset shapes. `cargo bench --bench cpu`.
//!
//! - attention at a sparse-step shape (2 × (16 registers + C_k + C_{k-1}) query rows against up
//!   to 1088 keys, and 4160 keys as at 64×64, with 48 rows or the 140 of a 64×64 run's average
//!   step) and at the dense shape (2 × 1088 rows, all visible), 4 heads × 64: the kernel twin
//!   (`tiled`) and the backend's attention (`flash`);
//! - the sampler pass at V = 512 and 2048 (rows × V logits, CFG pairs);
//! - the matrix products of a sparse and a dense step (and a 1024³ square for the sgemm rate),
//!   column split (`crate`) against the previous row split.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};
use sparse_lavida::backend::SampleParams;
use sparse_lavida::backend::cpu::attention::{AttnInputs, AttnShape, AttnTiling, attention_tiled};
use sparse_lavida::backend::cpu::flash::attention_flash;
use sparse_lavida::backend::cpu::ops;
use sparse_lavida::backend::cpu::packed::{PackedWeight, matmul_packed};
use sparse_lavida::config::Branch;
use sparse_lavida::plan::Tag;
use std::hint::black_box;

fn random(n: usize, rng: &mut impl Rng) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

/// One attention problem: `rows` queries per sequence (2 sequences) over `keys` keys each.
struct Problem {
    q: Vec<f32>,
    row_tags: Vec<Tag>,
    seq_indptr: Vec<u32>,
    k: Vec<f32>,
    v: Vec<f32>,
    kv_indptr: Vec<u32>,
    kv_indices: Vec<u32>,
    kv_tags: Vec<Tag>,
    shape: AttnShape,
}

impl Problem {
    /// Dense: every row clean block 0. Sparse: `rows` masked rows of block 1 over `keys - rows`
    /// clean cached keys plus their own.
    fn new(rows: usize, keys: usize, sparse: bool, rng: &mut impl Rng) -> Problem {
        let shape = AttnShape {
            n_heads: 4,
            n_kv_heads: 4,
            head_dim: 64,
        };
        let slots = 2 * keys;
        let (mut kv_indices, mut kv_tags, mut kv_indptr) = (Vec::new(), Vec::new(), vec![0]);
        for s in 0..2 {
            for j in 0..keys {
                kv_indices.push((s * keys + j) as u32);
                let fresh = sparse && j >= keys - rows;
                kv_tags.push(Tag::new(Branch::Image, fresh as u32, fresh));
            }
            kv_indptr.push(kv_indices.len() as u32);
        }
        let row_tag = Tag::new(Branch::Image, sparse as u32, sparse);
        Problem {
            q: random(2 * rows * 256, rng),
            row_tags: vec![row_tag; 2 * rows],
            seq_indptr: vec![0, rows as u32, 2 * rows as u32],
            k: random(slots * 256, rng),
            v: random(slots * 256, rng),
            kv_indptr,
            kv_indices,
            kv_tags,
            shape,
        }
    }

    fn inputs(&self) -> AttnInputs<'_> {
        AttnInputs {
            q: &self.q,
            row_tags: &self.row_tags,
            seq_indptr: &self.seq_indptr,
            k_pool: &self.k,
            v_pool: &self.v,
            kv_indptr: &self.kv_indptr,
            kv_indices: &self.kv_indices,
            kv_tags: &self.kv_tags,
            joint: false,
            shape: self.shape,
        }
    }
}

fn attention(c: &mut Criterion) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut g = c.benchmark_group("attention");
    for (name, rows, keys, sparse) in [
        ("sparse_step", 48, 1088, true),
        ("sparse_step_64x64", 48, 4160, true),
        ("sparse_step_64x64_140", 140, 4160, true),
        ("dense_step", 1088, 1088, false),
        // One of a dense 64×64 step's 22 streaming query tiles (190 rows) per sequence.
        ("dense_tile_64x64", 190, 4160, false),
    ] {
        let p = Problem::new(rows, keys, sparse, &mut rng);
        let inp = p.inputs();
        let tiling = AttnTiling::heuristic(2 * rows, keys, 4, rayon::current_num_threads());
        let mut out = vec![0.0; 2 * rows * 256];
        // QKᵀ and P·V: 2 · 2 · rows · keys · head_dim · heads multiply-adds per sequence pair.
        g.throughput(Throughput::Elements((2 * 2 * 2 * rows * keys * 256) as u64));
        g.bench_function(format!("{name}/tiled"), |b| {
            b.iter(|| attention_tiled(black_box(&inp), tiling, &mut out, None).unwrap())
        });
        g.bench_function(format!("{name}/flash"), |b| {
            b.iter(|| attention_flash(black_box(&inp), &mut out, None).unwrap())
        });
    }
    g.finish();
}

fn sampler(c: &mut Criterion) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let mut g = c.benchmark_group("sampler");
    for vocab in [512usize, 2048] {
        let n = 64;
        let logits = random(2 * n * vocab, &mut rng);
        let params = SampleParams {
            guidance: Some(4.0),
            temperature: 1.0,
            banned: vec![],
            seed: 7,
            step: 3,
            request: 0,
            positions: (0..n as u32).collect(),
        };
        g.throughput(Throughput::Bytes((logits.len() * 4) as u64));
        g.bench_function(format!("cfg_v{vocab}"), |b| {
            b.iter(|| ops::sample_rows(black_box(&logits), vocab, &params).unwrap())
        });
    }
    g.finish();
}

fn matmul(c: &mut Criterion) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut g = c.benchmark_group("matmul");
    // `small` shapes: a sparse t2i step (2 × 48 image rows: q|k|v, gate|up, down, logits), a
    // sparse text step's q|k|v, a dense step's q|k|v (2 × 1088 rows), and a square product for
    // the machine's sgemm rate. Each against the previous row split, same process.
    for (name, rows, k, n) in [
        ("sparse_t2i_qkv", 96, 128, 768),
        ("sparse_t2i_gate_up", 96, 128, 768),
        ("sparse_t2i_down", 96, 384, 128),
        ("sparse_t2i_logits", 96, 128, 512),
        ("sparse_text_qkv", 40, 256, 768),
        ("dense_t2i_qkv", 2176, 128, 768),
        ("square_1024", 1024, 1024, 1024),
    ] {
        let (x, w) = (random(rows * k, &mut rng), random(n * k, &mut rng));
        let mut out = vec![0.0; rows * n];
        g.throughput(Throughput::Elements((2 * rows * k * n) as u64));
        g.bench_function(format!("{name}/crate"), |b| {
            b.iter(|| ops::matmul_t(black_box(&x), rows, k, &w, n, &mut out, false).unwrap())
        });
        let packed = PackedWeight::pack(&w, n, k).unwrap();
        g.bench_function(format!("{name}/packed"), |b| {
            b.iter(|| matmul_packed(black_box(&x), rows, &packed, &mut out, false).unwrap())
        });
        let threads = rayon::current_num_threads();
        let gemm_crate = |out: &mut [f32]| {
            // SAFETY: out is rows×n with strides (n, 1), x is rows×k with strides (k, 1),
            // and wᵀ is k×n with element (p, j) at w[j·k + p] (strides: rows 1, columns k);
            // all three are live, in bounds for those strides, and out aliases neither
            // input. read_dst = false: out is written without being read.
            unsafe {
                gemm::gemm(
                    rows,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    black_box(&x).as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                )
            }
        };
        // The call is checked once against the crate's product before it is timed.
        let (mut want, mut got) = (vec![0.0; rows * n], vec![0.0; rows * n]);
        ops::matmul_t(&x, rows, k, &w, n, &mut want, false).unwrap();
        gemm_crate(&mut got);
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(
            want.iter()
                .zip(&got)
                .all(|(a, b)| (a - b).abs() <= 1e-4 * scale),
            "{name}: the gemm crate's product differs"
        );
        g.bench_function(format!("{name}/gemm_crate"), |b| {
            b.iter(|| gemm_crate(black_box(&mut out)))
        });
        g.bench_function(format!("{name}/row_split"), |b| {
            b.iter(|| {
                ops::matmul_t_row_split(black_box(&x), rows, k, &w, n, &mut out, false).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, attention, sampler, matmul);
criterion_main!(benches);
