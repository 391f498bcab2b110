//! Weight load/save/random/validate against independent oracles (SPEC §2.2).

use proptest::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use sparse_lavida::Error;
use sparse_lavida::backend::cpu::ops::{init_uniform, philox4x32_10};
use sparse_lavida::config::Config;
use sparse_lavida::weights::{HostTensor, HostWeights, SaveDtype, f32_bytes, init_range};
use std::path::{Path, PathBuf};

fn tiny() -> Config {
    Config::preset("tiny").unwrap()
}

/// bf16 round-to-nearest-even on the bit pattern, independent of the `half` crate
/// (valid for finite inputs whose rounding stays finite).
fn bf16_round(x: f32) -> f32 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000;
    f32::from_bits(rounded)
}

/// One on-disk tensor, written by the tests without going through `HostWeights::save`.
struct RawTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn raw_f32(name: &str, t: &HostTensor) -> RawTensor {
    RawTensor {
        name: name.to_string(),
        dtype: Dtype::F32,
        shape: t.shape.clone(),
        bytes: t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Every tensor of `w` as little-endian f32, in name order.
fn raw_model(w: &HostWeights) -> Vec<RawTensor> {
    w.tensors.iter().map(|(n, t)| raw_f32(n, t)).collect()
}

fn write_raw(path: &Path, tensors: &[RawTensor]) {
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .map(|t| {
            let view = TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap();
            (t.name.as_str(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, &None, path).unwrap();
}

fn find<'a>(raw: &'a mut [RawTensor], name: &str) -> &'a mut RawTensor {
    raw.iter_mut().find(|t| t.name == name).unwrap()
}

/// Writes `raw` and returns the load error's message, checking it is `Error::Weights` and names
/// the file.
fn load_error(raw: &[RawTensor]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad_model.safetensors");
    write_raw(&path, raw);
    weights_error(&path)
}

fn weights_error(path: &Path) -> String {
    let e = HostWeights::load(path, &tiny()).unwrap_err();
    assert!(matches!(e, Error::Weights(_)), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    msg
}

fn saved(w: &HostWeights, dtype: SaveDtype) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    w.save(&path, dtype).unwrap();
    (dir, path)
}

#[test]
fn f32_save_load_round_trip_is_exact() {
    let cfg = tiny();
    let w = HostWeights::random(&cfg, 7);
    w.validate(&cfg).unwrap();
    let (_dir, path) = saved(&w, SaveDtype::F32);
    assert_eq!(HostWeights::load(&path, &cfg).unwrap(), w);
}

#[test]
fn bf16_save_rounds_to_nearest_even() {
    let cfg = tiny();
    let w = HostWeights::random(&cfg, 8);
    let (_dir, path) = saved(&w, SaveDtype::Bf16);

    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(file.iter().all(|(_, v)| v.dtype() == Dtype::BF16));

    let loaded = HostWeights::load(&path, &cfg).unwrap();
    let mut changed = 0usize;
    for (name, t) in &w.tensors {
        let l = loaded.get(name).unwrap();
        assert_eq!(l.shape, t.shape, "{name}");
        for (i, (&x, &y)) in t.data.iter().zip(&l.data).enumerate() {
            assert_eq!(
                y.to_bits(),
                bf16_round(x).to_bits(),
                "{name}[{i}]: {x} -> {y}"
            );
            assert_eq!(y, half::bf16::from_f32(x).to_f32(), "{name}[{i}]");
            assert!((y - x).abs() <= x.abs() / 256.0, "{name}[{i}]: {x} -> {y}");
            changed += usize::from(x != y);
        }
    }
    // Random f32 values almost never are bf16 already: rounding really happened.
    assert!(changed as u64 > cfg.param_count() * 9 / 10, "{changed}");
}

#[test]
fn f16_bf16_and_f32_tensors_in_one_file_load() {
    let cfg = tiny();
    let w = HostWeights::random(&cfg, 9);
    let dtypes = [Dtype::F16, Dtype::BF16, Dtype::F32];
    let raw: Vec<RawTensor> = w
        .tensors
        .iter()
        .enumerate()
        .map(|(i, (name, t))| {
            let dtype = dtypes[i % 3];
            let bytes = match dtype {
                Dtype::F16 => t
                    .data
                    .iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect(),
                Dtype::BF16 => t
                    .data
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
                _ => raw_f32(name, t).bytes,
            };
            RawTensor {
                name: name.clone(),
                dtype,
                shape: t.shape.clone(),
                bytes,
            }
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.safetensors");
    write_raw(&path, &raw);

    let loaded = HostWeights::load(&path, &cfg).unwrap();
    for (i, (name, t)) in w.tensors.iter().enumerate() {
        let expect: Vec<f32> = match dtypes[i % 3] {
            Dtype::F16 => t
                .data
                .iter()
                .map(|&x| half::f16::from_f32(x).to_f32())
                .collect(),
            Dtype::BF16 => t.data.iter().map(|&x| bf16_round(x)).collect(),
            _ => t.data.clone(),
        };
        assert_eq!(loaded.get(name).unwrap().data, expect, "{name}");
    }
}

#[test]
fn random_is_deterministic_per_seed() {
    let cfg = tiny();
    let a = HostWeights::random(&cfg, 1);
    assert_eq!(a, HostWeights::random(&cfg, 1));
    let b = HostWeights::random(&cfg, 2);
    for (name, t) in &a.tensors {
        assert_ne!(t.data, b.get(name).unwrap().data, "{name}");
    }
    // Each tensor has its own stream: same-shaped tensors differ.
    assert_ne!(
        a.get("layers.0.text.gate").unwrap().data,
        a.get("layers.0.text.up").unwrap().data
    );
    assert_ne!(
        a.get("layers.0.text.q").unwrap().data,
        a.get("layers.1.text.q").unwrap().data
    );
}

/// `random_like_device` is the CPU twin of the device init: tensor `i` of `tensor_shapes` is
/// `init_uniform(seed, i, init_range)` rounded to bf16, and (checked by hand from Philox, the
/// documented counter and the SPEC distributions, independently of `init_range`) element `e` is
/// `bf16(offset + scale·u)` with `u = ((w >> 8) + 0.5)·2^-23 − 1`, `w` word `e % 4` of
/// `philox(counter (e/4, 0, i, 0x1A17), key (seed lo, seed hi))`.
#[test]
fn random_like_device_is_init_uniform_per_tensor_rounded_to_bf16() {
    let cfg = Config {
        n_heads: 2,
        n_kv_heads: 1,
        ..tiny()
    };
    let seed = 0x0000_0007_0000_0005_u64;
    let key = [5u32, 7u32];
    let w = HostWeights::random_like_device(&cfg, seed).unwrap();
    w.validate(&cfg).unwrap();
    let shapes = cfg.tensor_shapes();
    assert_eq!(w.tensors.len(), shapes.len());
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let t = w.get(name).unwrap();
        assert_eq!(&t.shape, shape, "{name}");
        let (offset, scale) = init_range(name, shape);
        let mut want = vec![0f32; t.data.len()];
        init_uniform(seed, i as u32, offset, scale, &mut want);
        let want: Vec<u32> = want.iter().map(|&v| bf16_round(v).to_bits()).collect();
        let got: Vec<u32> = t.data.iter().map(|v| v.to_bits()).collect();
        assert!(
            got == want,
            "{name} (tensor {i}) differs from init_uniform + bf16"
        );

        let (offset, scale) = if name.ends_with("_norm") {
            (1.0f32, 0.1f32)
        } else if name.ends_with(".embed") || name.ends_with(".register") {
            (0.0, 1.0)
        } else {
            (0.0, (3.0 / shape[1] as f64).sqrt() as f32)
        };
        let n = t.data.len();
        for e in [0, 1, 2, 3, 4, 5, n / 2, n - 1] {
            let words = philox4x32_10([(e / 4) as u32, 0, i as u32, 0x1A17], key);
            let u = ((f64::from(words[e % 4] >> 8) + 0.5) * (-23f64).exp2() - 1.0) as f32;
            let v = bf16_round(offset + scale * u);
            assert_eq!(t.data[e].to_bits(), v.to_bits(), "{name}[{e}]");
        }
    }
    assert_eq!(w, HostWeights::random_like_device(&cfg, seed).unwrap());
    let other = HostWeights::random_like_device(&cfg, seed + 1).unwrap();
    let host = HostWeights::random(&cfg, seed);
    for (name, t) in &w.tensors {
        assert_ne!(
            t.data,
            other.get(name).unwrap().data,
            "{name}: another seed"
        );
        assert_ne!(
            t.data,
            host.get(name).unwrap().data,
            "{name}: not the ChaCha8 numbers"
        );
    }
}

fn mean_and_mean_square(data: &[f32]) -> (f64, f64) {
    let n = data.len() as f64;
    let mean = data.iter().map(|&x| x as f64).sum::<f64>() / n;
    let ms = data.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n;
    (mean, ms)
}

#[test]
fn random_weight_statistics() {
    let cfg = tiny();
    let w = HostWeights::random(&cfg, 3);
    let mut linear = 0;
    for (name, t) in &w.tensors {
        let (mean, ms) = mean_and_mean_square(&t.data);
        let n = t.data.len() as f64;
        let (lo, hi, want_mean, want_ms) = if name.ends_with("_norm") {
            (0.9, 1.1, 1.0, 1.0 + 0.01 / 3.0)
        } else if name.ends_with(".embed") || name.ends_with(".register") {
            (-1.0, 1.0, 0.0, 1.0 / 3.0)
        } else {
            linear += 1;
            let fan_in = t.shape[1] as f64;
            let a = (3.0 / fan_in).sqrt();
            (-a, a, 0.0, 1.0 / fan_in)
        };
        for &x in &t.data {
            assert!(
                (lo..=hi).contains(&(x as f64)),
                "{name}: {x} outside [{lo}, {hi}]"
            );
        }
        // Mean within 6 standard errors of a uniform on [lo, hi].
        let se = (hi - lo) / (12.0 * n).sqrt();
        assert!((mean - want_mean).abs() < 6.0 * se, "{name}: mean {mean}");
        if n >= 1000.0 {
            let rel = (ms - want_ms).abs() / want_ms;
            assert!(rel < 0.2, "{name}: mean square {ms}, want {want_ms}");
        }
    }
    // q k v o gate up down per branch per layer, plus the two heads.
    assert_eq!(linear, cfg.n_layers * 2 * 7 + 2);
}

#[test]
fn get_and_f32_bytes() {
    let cfg = tiny();
    let w = HostWeights::random(&cfg, 4);
    let t = w.get("image.head").unwrap();
    assert_eq!(t.shape, vec![cfg.image_vocab, cfg.d_image]);
    let e = w.get("image.tail").unwrap_err().to_string();
    assert!(e.contains("image.tail"), "{e}");
    let values: usize = w.tensors.values().map(|t| t.data.len()).sum();
    assert_eq!(f32_bytes(&cfg), values as u64 * 4);
}

#[test]
fn missing_truncated_and_garbage_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.safetensors");
    let e = HostWeights::load(&path, &tiny()).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("absent.safetensors"), "{e}");

    let (_dir, path) = saved(&HostWeights::random(&tiny(), 5), SaveDtype::Bf16);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let msg = weights_error(&path);
    assert!(msg.contains("not a valid safetensors file"), "{msg}");

    // Deterministic garbage that is not a safetensors header.
    let garbage: Vec<u8> = (0..5000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, garbage).unwrap();
    let msg = weights_error(&path);
    assert!(msg.contains("not a valid safetensors file"), "{msg}");
}

#[test]
fn missing_extra_and_misshaped_tensors_are_named() {
    let w = HostWeights::random(&tiny(), 6);

    let mut raw = raw_model(&w);
    raw.retain(|t| t.name != "layers.1.image.up");
    let msg = load_error(&raw);
    assert!(msg.contains("`layers.1.image.up` is missing"), "{msg}");

    // Two missing: the first in config order (heads come before layers) is reported.
    raw.retain(|t| t.name != "image.head");
    let msg = load_error(&raw);
    assert!(msg.contains("`image.head` is missing"), "{msg}");

    let mut raw = raw_model(&w);
    raw.push(raw_f32(
        "layers.4.text.q",
        w.get("layers.0.text.q").unwrap(),
    ));
    let msg = load_error(&raw);
    assert!(msg.contains("unexpected tensor `layers.4.text.q`"), "{msg}");

    let mut raw = raw_model(&w);
    find(&mut raw, "text.head").shape = vec![64, 300];
    let msg = load_error(&raw);
    assert!(
        msg.contains("`text.head` has shape [64, 300], expected [300, 64]"),
        "{msg}"
    );
}

#[test]
fn wrong_dtypes_are_named() {
    let w = HostWeights::random(&tiny(), 10);
    for (dtype, size) in [(Dtype::I32, 4), (Dtype::F64, 8)] {
        let mut raw = raw_model(&w);
        let t = find(&mut raw, "layers.2.image.v");
        t.dtype = dtype;
        t.bytes.resize(t.bytes.len() / 4 * size, 0x3f);
        let msg = load_error(&raw);
        let want = format!("`layers.2.image.v` has dtype {dtype:?}");
        assert!(msg.contains(&want), "{msg}");
    }
}

#[test]
fn non_finite_values_are_named_with_their_index() {
    let w = HostWeights::random(&tiny(), 11);
    // layers.2.text.gate is [128, 64]: flat 200 is [3, 8].
    for (bad, shown) in [
        (f32::NAN, "NaN"),
        (f32::INFINITY, "inf"),
        (f32::NEG_INFINITY, "-inf"),
    ] {
        let mut raw = raw_model(&w);
        let t = find(&mut raw, "layers.2.text.gate");
        t.bytes[200 * 4..201 * 4].copy_from_slice(&bad.to_le_bytes());
        t.bytes[300 * 4..301 * 4].copy_from_slice(&bad.to_le_bytes());
        let msg = load_error(&raw);
        let want = format!(
            "`layers.2.text.gate` has non-finite value {shown} at flat index 200 (index [3, 8])"
        );
        assert!(msg.contains(&want), "{msg}");
    }
    // A bf16 NaN is caught too.
    let mut raw = raw_model(&w);
    let t = find(&mut raw, "image.register");
    t.dtype = Dtype::BF16;
    t.bytes = (0..tiny().d_image)
        .flat_map(|i| if i == 5 { 0x7fc0u16 } else { 0x3f80 }.to_le_bytes())
        .collect();
    let msg = load_error(&raw);
    assert!(
        msg.contains("`image.register` has non-finite value NaN at flat index 5"),
        "{msg}"
    );
}

#[test]
fn validate_names_the_problem() {
    let cfg = tiny();
    let w = HostWeights::random(&cfg, 12);
    let err = |w: &HostWeights| w.validate(&cfg).unwrap_err().to_string();

    let mut bad = w.clone();
    bad.tensors.remove("layers.3.text.down");
    assert!(err(&bad).contains("`layers.3.text.down` is missing"));

    let mut bad = w.clone();
    bad.tensors
        .insert("text.extra".into(), w.get("text.register").unwrap().clone());
    assert!(err(&bad).contains("unexpected tensor `text.extra`"));

    let mut bad = w.clone();
    bad.tensors.get_mut("text.embed").unwrap().shape = vec![64, 300];
    assert!(err(&bad).contains("`text.embed` has shape [64, 300], expected [300, 64]"));

    let mut bad = w.clone();
    bad.tensors.get_mut("image.final_norm").unwrap().data.pop();
    assert!(err(&bad).contains("`image.final_norm` has 31 values but its shape [32] holds 32"));

    let mut bad = w.clone();
    bad.tensors.get_mut("layers.0.image.o").unwrap().data[33] = f32::NAN;
    assert!(err(&bad).contains("`layers.0.image.o` has non-finite value NaN at flat index 33"));
}

#[test]
fn save_refuses_values_load_would_reject() {
    let cfg = tiny();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");

    let mut w = HostWeights::random(&cfg, 13);
    w.tensors.get_mut("text.head").unwrap().data[7] = f32::MAX;
    w.save(&path, SaveDtype::F32).unwrap();
    let e = w.save(&path, SaveDtype::Bf16).unwrap_err().to_string();
    assert!(
        e.contains("`text.head`") && e.contains("flat index 7"),
        "{e}"
    );

    w.tensors.get_mut("text.head").unwrap().data[7] = f32::NAN;
    let e = w.save(&path, SaveDtype::F32).unwrap_err().to_string();
    assert!(
        e.contains("`text.head`") && e.contains("flat index 7"),
        "{e}"
    );

    let unwritable = dir.path().join("no_such_dir").join("m.safetensors");
    let e = HostWeights::random(&cfg, 13)
        .save(&unwritable, SaveDtype::F32)
        .unwrap_err();
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("no_such_dir"),
        "{e}"
    );
}

/// Small valid configs with varied widths, heads and depth.
fn small_config() -> impl Strategy<Value = Config> {
    (
        1usize..4,
        1usize..3,
        1usize..4,
        1usize..3,
        1usize..4,
        0usize..3,
    )
        .prop_map(|(kv, group, half_head, layers, width, regs)| {
            let mut c = Config::preset("tiny").unwrap();
            c.n_kv_heads = kv;
            c.n_heads = kv * group;
            c.head_dim = 2 * half_head;
            c.n_layers = layers;
            c.n_joint_layers = layers / 2;
            c.d_text = 3 * width + 1;
            c.d_image = 2 * width + 3;
            c.mlp_text = 5 * width;
            c.mlp_image = 4 * width + 1;
            c.text_vocab = 11 + width;
            c.text_mask_id = 10;
            c.image_vocab = 7 + width;
            c.n_registers = regs;
            c.validate().unwrap();
            c
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn round_trips_for_any_small_config(cfg in small_config(), seed in any::<u64>()) {
        let w = HostWeights::random(&cfg, seed);
        w.validate(&cfg).unwrap();
        let shapes: Vec<_> = w.tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
        let mut want = cfg.tensor_shapes();
        want.sort();
        prop_assert_eq!(shapes, want);

        let (_dir, path) = saved(&w, SaveDtype::F32);
        prop_assert_eq!(&HostWeights::load(&path, &cfg).unwrap(), &w);
        let (_dir, path) = saved(&w, SaveDtype::Bf16);
        let loaded = HostWeights::load(&path, &cfg).unwrap();
        for (name, t) in &w.tensors {
            let want: Vec<f32> = t.data.iter().map(|&x| bf16_round(x)).collect();
            prop_assert_eq!(&loaded.get(name).unwrap().data, &want, "{}", name);
        }
    }

    #[test]
    fn bf16_rounding_of_arbitrary_values(values in prop::collection::vec(any::<f32>(), 32)) {
        let cfg = tiny();
        let mut w = HostWeights::random(&cfg, 14);
        w.tensors.get_mut("image.register").unwrap().data = values.clone();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let first_bad = values.iter().position(|&x| !bf16_round(x).is_finite() || x.is_nan());
        match (w.save(&path, SaveDtype::Bf16), first_bad) {
            (Ok(()), None) => {
                let loaded = HostWeights::load(&path, &cfg).unwrap();
                let got = &loaded.get("image.register").unwrap().data;
                for (&x, &y) in values.iter().zip(got) {
                    prop_assert_eq!(y.to_bits(), bf16_round(x).to_bits(), "{}", x);
                }
            }
            (Err(e), Some(i)) => {
                let msg = e.to_string();
                prop_assert!(msg.contains(&format!("flat index {i} ")), "{}", msg);
            }
            (r, bad) => prop_assert!(false, "save gave {:?}, first bad value {:?}", r, bad),
        }
    }
}

/// `Model::tensors` lists every weight once, in `Config::tensor_shapes` order, with each
/// layer's q|k|v and gate|up concatenated along their rows as the model holds them from load
/// (the file keeps them apart): on the CPU backend each is the uploaded tensor of that name, or
/// the concatenation of those names.
#[test]
fn model_tensors_follow_tensor_shapes() {
    let cfg = Config::preset("tiny").unwrap();
    let w = HostWeights::random(&cfg, 4);
    let model = sparse_lavida::model::Model::new(
        sparse_lavida::backend::cpu::CpuBackend::new(),
        cfg.clone(),
        w.clone(),
    )
    .unwrap();
    let tensors = model.tensors();
    let mut groups: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (name, shape) in cfg.tensor_shapes() {
        let data = &w.get(&name).unwrap().data;
        match groups.last_mut() {
            Some((n, sh, d)) if [".k", ".v", ".up"].iter().any(|s| name.ends_with(s)) => {
                *n = format!("{n}+{name}");
                sh[0] += shape[0];
                d.extend_from_slice(data);
            }
            _ => groups.push((name, shape, data.clone())),
        }
    }
    let fused = groups.iter().filter(|g| g.0.contains('+')).count();
    assert_eq!(
        fused,
        2 * 2 * cfg.n_layers,
        "q|k|v and gate|up per layer and branch"
    );
    assert_eq!(tensors.len(), groups.len());
    for (t, (name, shape, data)) in tensors.iter().zip(&groups) {
        assert_eq!(&t.shape, shape, "{name}");
        assert_eq!(&t.data, data, "{name}");
    }
}
