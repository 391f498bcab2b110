//! `model::products` (what a device-resident run prepares before a graph capture) and
//! `bench::distinct_products` (the products the dense GEMM rate is measured on) list exactly the
//! products a forward pass runs: a backend that records every `matmul` it is asked for is the
//! oracle, over the dense and sparse plans of t2i (with and without CFG) and text answers.

mod common;

use common::tiny_model;
use sparse_lavida::Result;
use sparse_lavida::backend::cpu::{CpuBackend, CpuCache, CpuMatrix, CpuWeight};
use sparse_lavida::backend::{Backend, MatrixKind, SampleParams, Sampled};
use sparse_lavida::bench::{distinct_products, products_flops};
use sparse_lavida::config::{Branch, Config};
use sparse_lavida::model::{Model, products};
use sparse_lavida::plan::StepPlan;
use sparse_lavida::sampler::{self, Mode, Switches, T2iRequest, Task, TextRequest};
use sparse_lavida::schedule::Order;
use sparse_lavida::weights::{HostTensor, HostWeights};
use std::cell::RefCell;
use std::collections::BTreeMap;

/// The CPU backend, recording the `(m, n, k, accumulate)` of every product, pruning the last
/// layer or not as its third field says.
struct Counting(CpuBackend, RefCell<Vec<(usize, usize, usize, bool)>>, bool);

impl Backend for Counting {
    type Matrix = CpuMatrix;
    type Weight = CpuWeight;
    type Plan = StepPlan;
    type Cache = CpuCache;

    fn name(&self) -> String {
        "counting".into()
    }
    fn upload_weight(&self, t: HostTensor) -> Result<CpuWeight> {
        self.0.upload_weight(t)
    }
    fn concat_weights(&self, parts: Vec<CpuWeight>) -> Result<CpuWeight> {
        self.0.concat_weights(parts)
    }
    fn upload_plan(&self, plan: &StepPlan) -> Result<StepPlan> {
        self.0.upload_plan(plan)
    }
    fn new_cache(&self, cfg: &Config, slots: usize) -> Result<CpuCache> {
        self.0.new_cache(cfg, slots)
    }
    fn matrix(&self, rows: usize, cols: usize, kind: MatrixKind) -> Result<CpuMatrix> {
        self.0.matrix(rows, cols, kind)
    }
    fn reshape(&self, m: &mut CpuMatrix, rows: usize, cols: usize) -> Result<()> {
        self.0.reshape(m, rows, cols)
    }
    fn to_host(&self, m: &CpuMatrix) -> Result<Vec<f32>> {
        self.0.to_host(m)
    }
    fn embed(
        &self,
        plan: &StepPlan,
        b: Branch,
        table: &CpuWeight,
        register: &CpuWeight,
        out: &mut CpuMatrix,
    ) -> Result<()> {
        self.0.embed(plan, b, table, register, out)
    }
    fn rmsnorm(&self, x: &CpuMatrix, w: &CpuWeight, eps: f32, out: &mut CpuMatrix) -> Result<()> {
        self.0.rmsnorm(x, w, eps, out)
    }
    fn matmul(&self, x: &CpuMatrix, w: &CpuWeight, out: &mut CpuMatrix, acc: bool) -> Result<()> {
        self.1.borrow_mut().push((x.rows, w.shape[0], x.cols, acc));
        self.0.matmul(x, w, out, acc)
    }
    fn rope_store_kv(
        &self,
        plan: &StepPlan,
        b: Branch,
        layer: usize,
        qkv: &mut CpuMatrix,
        cache: &mut CpuCache,
    ) -> Result<()> {
        self.0.rope_store_kv(plan, b, layer, qkv, cache)
    }
    fn attention(
        &self,
        plan: &StepPlan,
        b: Branch,
        layer: usize,
        joint: bool,
        q: &CpuMatrix,
        cache: &CpuCache,
        out: &mut CpuMatrix,
    ) -> Result<()> {
        self.0.attention(plan, b, layer, joint, q, cache, out)
    }
    fn swiglu(&self, gate_up: &CpuMatrix, out: &mut CpuMatrix) -> Result<()> {
        self.0.swiglu(gate_up, out)
    }
    fn gather_logit_rows(&self, plan: &StepPlan, x: &CpuMatrix, out: &mut CpuMatrix) -> Result<()> {
        self.0.gather_logit_rows(plan, x, out)
    }
    fn sample(&self, logits: &CpuMatrix, first: usize, p: &SampleParams) -> Result<Vec<Sampled>> {
        self.0.sample(logits, first, p)
    }
    fn prunes_last_layer(&self) -> bool {
        self.2
    }
}

#[test]
fn listed_products_are_the_products_a_pass_runs() {
    for prune in [false, true] {
        check_listed_products(prune);
    }
}

/// The products of every pass of dense and sparse t2i (with and without CFG) and text, with
/// the last layer pruned or not.
fn check_listed_products(prune: bool) {
    let cfg = tiny_model(1).config().clone();
    let counting = Counting(CpuBackend::new(), RefCell::new(Vec::new()), prune);
    let model = Model::new(counting, cfg.clone(), HostWeights::random(&cfg, 1)).unwrap();
    let mut pruned_passes = 0;
    let t2i = |guidance| {
        Task::T2i(T2iRequest {
            prompt: vec![3, 4, 5, 6],
            height: 3,
            width: 4,
            steps: 4,
            guidance,
            temperature: 1.0,
            order: Order::Stratified,
            seed: 2,
        })
    };
    let text = Task::Text(TextRequest {
        prompt: vec![1, 2, 3],
        answer_len: 8,
        block_len: 4,
        steps: 4,
        temperature: 1.0,
        banned: vec![],
        seed: 2,
    });
    for task in [t2i(0.0), t2i(3.0), text] {
        for mode in [Mode::Dense, Mode::Sparse(Switches::ALL_ON)] {
            let program = sampler::program(&cfg, &task, mode).unwrap();
            let plans = program
                .prefill
                .iter()
                .chain(program.steps.iter().map(|s| &s.plan));
            for plan in plans {
                model.backend().1.borrow_mut().clear();
                let mut cache = model.new_cache(program.pool_slots).unwrap();
                let prepared = model.prepare(plan.clone()).unwrap();
                assert_eq!(
                    prepared.tail.is_some(),
                    prune && plan.logits_tail().is_some()
                );
                pruned_passes += usize::from(prepared.tail.is_some());
                model.forward(&prepared, &mut cache).unwrap();
                // model::products lists them in the pass's order, with the residual adds marked.
                let seen = model.backend().1.borrow().clone();
                let listed_in_order: Vec<_> = products(&cfg, plan, prune)
                    .iter()
                    .map(|p| (p.m, p.n, p.k, p.accumulate))
                    .collect();
                assert_eq!(listed_in_order, seen, "{task:?}");
                let mut counted: BTreeMap<(usize, usize, usize, bool), usize> = BTreeMap::new();
                for &s in &seen {
                    *counted.entry(s).or_default() += 1;
                }
                let listed = distinct_products(&cfg, plan, prune);
                let mut distinct: BTreeMap<(usize, usize, usize, bool), usize> = BTreeMap::new();
                for &(p, c) in &listed {
                    *distinct.entry((p.m, p.n, p.k, p.accumulate)).or_default() += c;
                }
                assert_eq!(distinct, counted, "{task:?}");
                let flops: f64 = model
                    .backend()
                    .1
                    .borrow()
                    .iter()
                    .map(|&(m, n, k, _)| 2.0 * (m * n * k) as f64)
                    .sum();
                assert_eq!(products_flops(&listed), flops);
            }
        }
    }
    // Every step of these tasks leaves rows without logits, so a pruning backend prunes.
    if prune {
        assert!(pruned_passes > 0);
    }
}
