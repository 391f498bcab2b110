//! The CPU backend takes only the rows that need logits past their K/V in the last layer
//! (`Backend::prunes_last_layer`, `StepPlan::logits_tail`). The oracle is the same pass with
//! every row through every layer (`Model::prepare_whole`): the pruned pass gives the same logits
//! bit for bit and leaves the same K/V pool, over
//! - every plan of t2i (with and without CFG) and text generations in all 9 modes,
//! - the same with every layer joint (the other branch's rows computed in the last layer, then
//!   dropped) and with the forced tiled attention (`CpuBackend::with_tiling`),
//! - a hand-built plan whose logits rows come permuted within their sequences and twice.

mod common;

use common::{plans_of, small_t2i, small_text};
use sparse_lavida::backend::cpu::CpuBackend;
use sparse_lavida::backend::cpu::attention::AttnTiling;
use sparse_lavida::config::{Branch, Config};
use sparse_lavida::model::{Model, Workspace};
use sparse_lavida::plan::{PlanBuilder, Row, StepPlan, Tag};
use sparse_lavida::sampler::Mode;
use sparse_lavida::weights::HostWeights;

/// `tiny` with seeded random weights, every layer joint or not, on the CPU backend (with a
/// forced attention tiling or not).
fn model(all_joint: bool, tiled: bool) -> Model<CpuBackend> {
    let mut cfg = Config::preset("tiny").unwrap();
    if all_joint {
        cfg.n_joint_layers = cfg.n_layers;
    }
    let mut be = CpuBackend::new();
    if tiled {
        be = be.with_tiling(AttnTiling::heuristic(64, 64, cfg.n_heads, 2));
    }
    let w = HostWeights::random(&cfg, 7);
    Model::new(be, cfg, w).unwrap()
}

/// Runs `plans` in order, pruned (one reused workspace) and whole (fresh buffers over a copy of
/// the pool); returns how many passes had a tail.
fn check(model: &Model<CpuBackend>, plans: Vec<StepPlan>, what: &str) -> usize {
    let slots = plans.iter().map(|p| p.pool_slots).max().unwrap();
    let mut cache = model.new_cache(slots).unwrap();
    let mut ws = Workspace::new();
    let mut pruned = 0;
    for (k, plan) in plans.into_iter().enumerate() {
        let mut whole_cache = cache.clone();
        let whole = model
            .forward(
                &model.prepare_whole(plan.clone()).unwrap(),
                &mut whole_cache,
            )
            .unwrap();
        let prepared = model.prepare(plan).unwrap();
        pruned += usize::from(prepared.tail.is_some());
        let has = model.forward_in(&prepared, &mut cache, &mut ws).unwrap();
        assert_eq!(has, whole.is_some(), "{what} pass {k}");
        if let Some(whole) = whole {
            let got = ws.logits().unwrap();
            assert_eq!(
                (got.rows, got.cols),
                (whole.rows, whole.cols),
                "{what} pass {k}"
            );
            let differ = got
                .data
                .iter()
                .zip(&whole.data)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(differ, 0, "{what} pass {k}: {differ} logits differ");
        }
        assert!(cache == whole_cache, "{what} pass {k}: the pools differ");
    }
    pruned
}

#[test]
fn pruned_last_layer_gives_the_whole_layers_logits() {
    for (all_joint, tiled) in [(false, false), (true, false), (false, true)] {
        let model = model(all_joint, tiled);
        for task in [small_t2i(0.0), small_t2i(2.0), small_text()] {
            let mut pruned = 0;
            for mode in Mode::all() {
                let what = format!("{mode} (all joint {all_joint}, tiled {tiled})");
                pruned += check(&model, plans_of(&model, &task, mode), &what);
            }
            // Steps that decode part of what they feed have a tail: real ones were compared.
            assert!(pruned > 0, "{task:?}: no pass had a tail");
        }
    }
}

/// Two sequences of image rows (and a text row, computed in the last layer when every layer
/// is joint) whose logits rows come permuted within each sequence, one of them twice.
#[test]
fn permuted_and_repeated_logits_rows_are_pruned_exactly() {
    for all_joint in [false, true] {
        let model = model(all_joint, false);
        let mut p = PlanBuilder::new(2);
        let mut idx = Vec::new();
        for seq in 0..2u32 {
            let base = seq * 10;
            p.row(Row {
                seq,
                id: 5,
                pos: 0,
                tag: Tag::new(Branch::Text, 0, false),
                slot: base,
            });
            for i in 0..6u32 {
                idx.push(p.row(Row {
                    seq,
                    id: 1 + i * 7 % 60,
                    pos: 1 + i,
                    tag: Tag::new(Branch::Image, 1, i >= 2),
                    slot: base + 1 + i,
                }));
            }
        }
        // Sequence 0: rows 5, 2, 5 again, 3; sequence 1: rows 4, 2.
        for i in [5, 2, 5, 3, 6 + 4, 6 + 2] {
            p.logits_for(idx[i]);
        }
        let plan = p.build().unwrap();
        assert!(plan.logits_tail().is_some());
        let pruned = check(&model, vec![plan], &format!("all joint {all_joint}"));
        assert_eq!(pruned, 1);
    }
}
