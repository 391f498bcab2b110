//! The CLI end to end on a CUDA device (a GPU, or the emulated one: built with the `emulator`
//! feature these tests run on it, see `scripts/test`; otherwise they are ignored and a GPU
//! machine runs them with `--include-ignored`).
//!
//! - Every execution of a generation (CUDA graphs, `--no-capture` queued, `--no-graphs` eager)
//!   chooses exactly the same tokens, in dense mode and all eight switch combinations, for t2i
//!   with and without CFG and for text, on `small` and on a head_dim-64 `tiny` (GQA);
//!   `generate --out` writes what `bench` ran.
//! - `forward --device cuda` gives the CPU's logits within SPEC §6 (relative L2 ≤ 1e-2) on the
//!   same bf16 weights.
//! - Requests the device cannot run are refused as on a GPU, naming the problem.

mod common;

use common::twin::{Bf16Twin, bound};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_lavida::backend::Backend;
use sparse_lavida::backend::cpu::CpuBackend;
use sparse_lavida::case::{Case, CaseId, CaseRow, RegisterMarker};
use sparse_lavida::config::{Branch, Config};
use sparse_lavida::model::Model;
use sparse_lavida::weights::HostWeights;
use std::path::Path;
use std::process::{Command, Output};

/// The CLI: this build's, or `SPARSE_LAVIDA_BIN` (scripts/gpu-check runs the bundled one on a
/// GPU machine, where the build machine's path does not exist).
fn cli(args: &[&str]) -> Output {
    let bin = std::env::var_os("SPARSE_LAVIDA_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_sparse-lavida").into());
    Command::new(bin).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(args: &[&str]) -> Output {
    let o = cli(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}\n{}",
        stderr(&o),
        String::from_utf8_lossy(&o.stdout)
    );
    o
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `tiny` with head_dim 64 and 2 query heads on 1 K/V head: the CUDA attention kernels need
/// head_dim 64 or 128.
fn tiny_hd64() -> Config {
    Config {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 64,
        ..Config::preset("tiny").unwrap()
    }
}

/// The model flags of each model the tests run: `small`, and `tiny_hd64` written to `dir`.
fn models(dir: &Path) -> Vec<(&'static str, Vec<String>)> {
    let path = dir.join("tiny-hd64.json");
    std::fs::write(&path, serde_json::to_string(&tiny_hd64()).unwrap()).unwrap();
    vec![
        ("small", vec!["--preset".into(), "small".into()]),
        (
            "tiny-hd64",
            vec!["--config".into(), path.to_str().unwrap().into()],
        ),
    ]
}

/// Small workloads: t2i with CFG, t2i without, and a text answer of two blocks.
const TASKS: [(&str, &[&str]); 3] = [
    (
        "t2i cfg",
        &[
            "--grid",
            "4x4",
            "--steps",
            "4",
            "--prompt-len",
            "5",
            "--guidance",
            "4",
        ],
    ),
    (
        "t2i",
        &[
            "--grid",
            "4x4",
            "--steps",
            "4",
            "--prompt-len",
            "5",
            "--guidance",
            "0",
        ],
    ),
    (
        "text",
        &[
            "--task",
            "text",
            "--prompt-len",
            "6",
            "--answer-len",
            "16",
            "--block",
            "8",
            "--steps",
            "8",
        ],
    ),
];

/// `(mode label, execution, tokens)` of every run of a bench JSON.
fn runs(json: &serde_json::Value) -> Vec<(String, String, Vec<u64>)> {
    json["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let label = format!(
                "{} prompt {} decoded {} truncate {}",
                r["mode"], r["cache_prompt"], r["cache_decoded"], r["truncate"]
            );
            let tokens = (r["tokens"].as_array().unwrap().iter())
                .map(|t| t.as_u64().unwrap())
                .collect();
            (label, r["execution"].as_str().unwrap().to_string(), tokens)
        })
        .collect()
}

#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn cuda_executions_choose_the_same_tokens_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    for (model, model_args) in models(dir.path()) {
        for (task, task_args) in TASKS {
            let mut by_exec = Vec::new();
            for (exec_flag, exec) in [
                (None, "graphs"),
                (Some("--no-capture"), "queued"),
                (Some("--no-graphs"), "eager"),
            ] {
                let json = dir.path().join(format!("{exec}.json"));
                let mut args: Vec<&str> = vec!["bench", "--device", "cuda", "--ablation"];
                args.extend(model_args.iter().map(String::as_str));
                args.extend(task_args);
                args.extend(["--seed", "11", "--json", json.to_str().unwrap()]);
                args.extend(exec_flag);
                ok(&args);
                let report = read_json(&json);
                let runs = runs(&report);
                assert_eq!(
                    runs.len(),
                    9,
                    "{model} {task} {exec}: dense + 8 switch combinations"
                );
                for (label, got_exec, tokens) in &runs {
                    assert_eq!(got_exec, exec, "{model} {task} {label}");
                    assert!(!tokens.is_empty(), "{model} {task} {label}: no tokens");
                }
                by_exec.push((exec, runs));
            }
            let (_, graphs) = &by_exec[0];
            for (exec, other) in &by_exec[1..] {
                for (g, o) in graphs.iter().zip(other) {
                    assert_eq!(g.0, o.0);
                    assert_eq!(g.2, o.2, "{model} {task} {}: graphs vs {exec}", g.0);
                }
            }
            // generate runs the same generation as bench's all-on sparse run.
            let out = dir.path().join("out.json");
            let mut args: Vec<&str> = vec!["generate", "--device", "cuda"];
            args.extend(model_args.iter().map(String::as_str));
            args.extend(task_args);
            args.extend(["--seed", "11", "--out", out.to_str().unwrap()]);
            ok(&args);
            let written: Vec<u64> = serde_json::from_value(read_json(&out)).unwrap();
            let all_on = graphs.iter().find(|r| {
                r.0.contains("\"sparse\" prompt true decoded true truncate true")
            });
            assert_eq!(
                Some(&written),
                all_on.map(|r| &r.2),
                "{model} {task}: generate --out"
            );
            println!("{model} {task}: graphs == queued == eager in 9 modes");
        }
    }
}

/// A random forward case of `cfg` (rows of both branches, registers, masked rows, several
/// blocks) asking for the logits of some rows of one branch.
fn random_case(cfg: &Config, r: &mut ChaCha8Rng) -> Case {
    let n = r.gen_range(8..40);
    let mut rows: Vec<CaseRow> = (0..n)
        .map(|i| {
            let branch = if r.gen_bool(0.5) {
                Branch::Text
            } else {
                Branch::Image
            };
            let id = if r.gen_bool(0.15) {
                CaseId::Register(RegisterMarker::Reg)
            } else {
                // Avoid the [MASK] id of either branch unless the row is masked.
                CaseId::Token(r.gen_range(0..cfg.vocab(branch) as u32 - 1))
            };
            CaseRow {
                branch,
                id,
                pos: i as u32 + r.gen_range(0..3) * 40,
                block: r.gen_range(0..4),
                masked: r.gen_bool(0.3),
            }
        })
        .collect();
    rows[0].id = CaseId::Token(1);
    rows[0].masked = false;
    let branch = rows[0].branch;
    let logits_for: Vec<usize> = (0..n)
        .filter(|&i| rows[i].branch == branch && matches!(rows[i].id, CaseId::Token(_)))
        .collect();
    Case { rows, logits_for }
}

/// The naive bf16 twin's logits of `case` on the weights file.
fn twin_logits(cfg: &Config, weights: &Path, case: &Case) -> Vec<f32> {
    let w = HostWeights::load(weights, cfg).unwrap();
    let model = Model::new(Bf16Twin(CpuBackend::new()), cfg.clone(), w).unwrap();
    let plan = case.plan(cfg).unwrap();
    let mut cache = model.new_cache(plan.pool_slots).unwrap();
    let logits = model
        .forward(&model.prepare(plan).unwrap(), &mut cache)
        .unwrap()
        .expect("the case asks for logits");
    model.backend().to_host(&logits).unwrap()
}

fn logits(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    bytemuck::cast_slice::<u8, f32>(t.data()).to_vec()
}

#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn cuda_forward_logits_match_the_cpu_within_spec() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let mut r = ChaCha8Rng::seed_from_u64(31);
    for (model, model_args) in models(dir.path()) {
        let cfg = match model {
            "small" => Config::preset("small").unwrap(),
            _ => tiny_hd64(),
        };
        // bf16 weights: both backends then hold exactly the same values.
        let weights = p(&format!("{model}.safetensors"));
        let mut args: Vec<&str> = vec!["init-weights", "--dtype", "bf16", "--seed", "5"];
        args.extend(model_args.iter().map(String::as_str));
        args.extend(["--out", &weights]);
        ok(&args);
        for case_no in 0..3 {
            let case = random_case(&cfg, &mut r);
            let case_path = p("case.json");
            std::fs::write(&case_path, serde_json::to_string(&case).unwrap()).unwrap();
            let mut outs = Vec::new();
            for device in ["cpu", "cuda"] {
                let out = p(&format!("{device}.safetensors"));
                let mut args: Vec<&str> = vec!["forward", "--device", device];
                args.extend(model_args.iter().map(String::as_str));
                args.extend(["--weights", &weights, "--case", &case_path, "--out", &out]);
                ok(&args);
                outs.push(logits(Path::new(&out)));
            }
            // SPEC §6: within 1e-2 of the CPU, or twice the naive bf16 implementation's error.
            let twin = twin_logits(&cfg, Path::new(&weights), &case);
            let twin_err = common::rel_l2(&twin, &outs[0]);
            let err = common::rel_l2(&outs[1], &outs[0]);
            assert!(
                outs[1].iter().all(|x| x.is_finite()),
                "{model} case {case_no}: NaN"
            );
            assert!(
                err <= bound(twin_err),
                "{model} case {case_no}: relative L2 {err:.3e} (naive bf16 {twin_err:.3e})"
            );
            println!(
                "{model} case {case_no}: cuda vs cpu logits, relative L2 {err:.2e} (naive bf16 \
                 {twin_err:.2e})"
            );
        }
    }
}

#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn cuda_refuses_what_it_cannot_run_naming_the_problem() {
    let refused = |args: &[&str], needles: &[&str]| {
        let o = cli(args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: stderr lacks `{n}`: {err}");
        }
    };
    // A bad SL_GEMM_TUNE is an error naming it, under auto too (not a fall back to the CPU).
    for device in ["cuda", "auto"] {
        let bin = std::env::var_os("SPARSE_LAVIDA_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_sparse-lavida").into());
        let o = Command::new(bin)
            .args([
                "generate", "--device", device, "--preset", "small", "--steps", "2",
            ])
            .env("SL_GEMM_TUNE", "fast")
            .output()
            .unwrap();
        let err = stderr(&o);
        assert!(
            !o.status.success(),
            "SL_GEMM_TUNE=fast --device {device} succeeded"
        );
        assert!(
            err.contains("SL_GEMM_TUNE=\"fast\""),
            "--device {device}: {err}"
        );
    }
    // tiny's head_dim 16 has no attention kernel.
    refused(
        &["generate", "--device", "cuda", "--preset", "tiny"],
        &["the CUDA backend cannot run", "head_dim 16"],
    );
    // An id outside the text vocabulary.
    refused(
        &[
            "generate", "--device", "cuda", "--preset", "small", "--prompt", "1,99999",
        ],
        &["99999"],
    );
    // More device memory than allowed: refused with both numbers, before any allocation.
    refused(
        &[
            "generate",
            "--device",
            "cuda",
            "--preset",
            "small",
            "--grid",
            "64x64",
            "--max-memory",
            "20M",
        ],
        &["out of memory", "needs", "--max-memory"],
    );
    // --profile brackets the measured run on the device (the profiler calls succeed).
    ok(&[
        "generate",
        "--device",
        "cuda",
        "--preset",
        "small",
        "--grid",
        "4x4",
        "--steps",
        "2",
        "--profile",
    ]);
}
