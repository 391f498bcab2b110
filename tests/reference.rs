//! The `forward` pass against an independent numpy implementation of SPEC §2.3/§3
//! (`tests/reference/reference.py`, written from the spec, not from this crate).
//! Needs `python3` with numpy and safetensors (`.ci/run` installs them).

mod common;

use common::{rel_l2, tiny_model};
use rand::{Rng, SeedableRng};
use sparse_lavida::case::{Case, CaseId, CaseRow, RegisterMarker};
use sparse_lavida::config::{Branch, Config};
use sparse_lavida::weights::{HostWeights, SaveDtype};
use std::process::Command;

fn random_case(cfg: &Config, rng: &mut impl Rng) -> Case {
    let n = rng.gen_range(2..24);
    let mut rows: Vec<CaseRow> = (0..n)
        .map(|_| {
            let branch = if rng.gen_bool(0.5) {
                Branch::Text
            } else {
                Branch::Image
            };
            let id = if rng.gen_bool(0.15) {
                CaseId::Register(RegisterMarker::Reg)
            } else {
                CaseId::Token(rng.gen_range(0..cfg.embed_rows(branch) as u32))
            };
            CaseRow {
                branch,
                id,
                pos: rng.gen_range(0..200),
                block: rng.gen_range(0..4),
                masked: rng.gen_bool(0.4),
            }
        })
        .collect();
    // At least one token row to ask logits for.
    rows[0].id = CaseId::Token(1);
    let branch = rows[0].branch;
    let logits_for: Vec<usize> = (0..n)
        .filter(|&i| rows[i].branch == branch && matches!(rows[i].id, CaseId::Token(_)))
        .filter(|&i| i == 0 || rng.gen_bool(0.6))
        .collect();
    Case { rows, logits_for }
}

#[test]
fn forward_matches_numpy_reference() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::preset("tiny").unwrap();
    let weights_path = dir.path().join("w.safetensors");
    let config_path = dir.path().join("config.json");
    HostWeights::random(&cfg, 77)
        .save(&weights_path, SaveDtype::F32)
        .unwrap();
    std::fs::write(&config_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let model = tiny_model(77);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/reference.py");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2024);
    for case_no in 0..8 {
        let case = random_case(&cfg, &mut rng);
        let case_path = dir.path().join(format!("case{case_no}.json"));
        let out_path = dir.path().join(format!("ref{case_no}.safetensors"));
        std::fs::write(&case_path, serde_json::to_string(&case).unwrap()).unwrap();
        let status = Command::new(
            std::env::var("SPARSE_LAVIDA_PYTHON").unwrap_or_else(|_| "python3".into()),
        )
        .arg(script)
        .arg("--config")
        .arg(&config_path)
        .arg("--weights")
        .arg(&weights_path)
        .arg("--case")
        .arg(&case_path)
        .arg("--out")
        .arg(&out_path)
        .output()
        .expect("python3 must be installed (see .ci/run)");
        assert!(
            status.status.success(),
            "reference.py failed (numpy and safetensors needed: see .ci/run): {}",
            String::from_utf8_lossy(&status.stderr)
        );
        let bytes = std::fs::read(&out_path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("logits").unwrap();
        let expected: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();

        let plan = case.plan(&cfg).unwrap();
        let mut cache = model.new_cache(plan.pool_slots).unwrap();
        let got = model
            .forward(&model.prepare(plan).unwrap(), &mut cache)
            .unwrap()
            .unwrap();
        assert_eq!(
            t.shape(),
            &[case.logits_for.len(), cfg.vocab(case.rows[0].branch)]
        );
        let err = rel_l2(&got.data, &expected);
        assert!(err <= 1e-4, "case {case_no}: relative L2 {err:e}");
    }
}
