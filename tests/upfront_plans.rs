//! Plans for graph capture: the plans of a t2i generation built up front (decoded tokens as
//! placeholders) equal, once the sampled tokens are filled in, the plans the incremental run
//! builds step by step, for every mode and switch combination.

mod common;

use common::{prompt, tiny_model};
use proptest::prelude::*;
use sparse_lavida::exec;
use sparse_lavida::plan::StepPlan;
use sparse_lavida::sampler::{Mode, PLACEHOLDER, RunOptions, T2iRequest, Task, t2i_upfront_plans};
use sparse_lavida::schedule::Order;

fn has_placeholder(p: &StepPlan) -> bool {
    p.branches.iter().any(|b| b.ids.contains(&PLACEHOLDER))
}

fn check(wseed: u64, req: &T2iRequest) {
    let model = tiny_model(wseed);
    let cfg = model.config();
    for mode in Mode::all() {
        // The incremental run, recording every plan it executes.
        let mut prefill_seen: Option<StepPlan> = None;
        let mut seen: Vec<StepPlan> = Vec::new();
        let mut on_plan = |k: Option<usize>, p: &StepPlan| match k {
            None => prefill_seen = Some(p.clone()),
            Some(k) => {
                assert_eq!(k, seen.len(), "{mode}: steps out of order");
                seen.push(p.clone());
            }
        };
        let g = exec::generate(
            &model,
            &Task::T2i(req.clone()),
            mode,
            RunOptions {
                on_plan: Some(&mut on_plan),
                ..RunOptions::default()
            },
        )
        .unwrap();

        let mut up = t2i_upfront_plans(cfg, req, mode).unwrap();
        assert_eq!(up.steps.len(), g.steps.len(), "{mode}");
        assert_eq!(up.prefill, prefill_seen, "{mode}: prefill");

        // Fills point forward, into real rows that hold a placeholder, once each.
        let n_seqs = up.steps[0].n_seqs;
        let mut per_step = vec![0usize; up.steps.len()];
        let mut targets = std::collections::HashSet::new();
        for f in &up.fills {
            assert!(f.to_step > f.from_step, "{mode}: {f:?} points backwards");
            let q = &g.steps[f.from_step as usize].query_positions;
            assert!((f.sample_index as usize) < q.len(), "{mode}: {f:?}");
            let ids = &up.steps[f.to_step as usize].rows(up.branch).ids;
            assert_eq!(ids[f.row as usize], PLACEHOLDER, "{mode}: {f:?}");
            assert!(targets.insert((f.to_step, f.row)), "{mode}: {f:?} twice");
            per_step[f.to_step as usize] += 1;
        }
        // Which decoded rows each step feeds: dense every one, sparse with cached decoded
        // groups only the newest group C_{k-1}, otherwise every group.
        for (k, &count) in per_step.iter().enumerate() {
            let decoded: usize = g.steps[..k].iter().map(|s| s.tokens.len()).sum();
            let newest = k.checked_sub(1).map_or(0, |j| g.steps[j].tokens.len());
            let fed = match mode {
                Mode::Sparse(sw) if sw.cache_decoded => newest,
                _ => decoded,
            };
            assert_eq!(count, n_seqs * fed, "{mode} step {k}: fills");
        }

        // Filled with the trace's tokens, every plan equals the incremental run's.
        let sampled: Vec<Vec<u32>> = g.steps.iter().map(|s| s.tokens.clone()).collect();
        up.apply_fills(&sampled).unwrap();
        for (k, (a, b)) in up.steps.iter().zip(&seen).enumerate() {
            assert!(!has_placeholder(a), "{mode} step {k}: placeholder left");
            assert_eq!(a, b, "{mode} step {k}: plan differs");
        }
        assert!(up.prefill.as_ref().is_none_or(|p| !has_placeholder(p)));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn upfront_plans_match_the_incremental_run(
        wseed in 0u64..1000, seed in 0u64..1000, plen in 0usize..6, h in 1usize..5, w in 1usize..6,
        steps_frac in 0.0f64..1.0, cfg in any::<bool>(), hot in any::<bool>(), order in 0usize..3,
    ) {
        let n = h * w;
        let steps = 1 + ((n - 1) as f64 * steps_frac) as usize;
        check(wseed, &T2iRequest {
            prompt: prompt(plen, seed),
            height: h,
            width: w,
            steps,
            guidance: if cfg { 2.5 } else { 0.0 },
            temperature: if hot { 1.0 } else { 0.0 },
            order: Order::ALL[order],
            seed,
        });
    }
}

#[test]
fn fills_need_every_sampled_token() {
    let model = tiny_model(1);
    let req = T2iRequest {
        prompt: prompt(3, 1),
        height: 2,
        width: 3,
        steps: 3,
        guidance: 2.0,
        temperature: 1.0,
        order: Order::Stratified,
        seed: 7,
    };
    let mut up = t2i_upfront_plans(model.config(), &req, Mode::Dense).unwrap();
    let before = up.clone();
    let err = up.apply_fills(&[vec![1, 2]]).unwrap_err().to_string();
    assert!(err.contains("no sampled token"), "{err}");
    assert_eq!(up, before, "a failed apply changes nothing");
    let bad = T2iRequest {
        guidance: -1.0,
        ..req
    };
    assert!(t2i_upfront_plans(model.config(), &bad, Mode::Dense).is_err());
}
