//! The CPU runtime alone (builds with `default-features = false`: no CUDA, no CLI
//! dependencies): a text-to-image generation on the f32 CPU backend, sparse with every saving,
//! checked against the same request with every saving off (SPEC §4.3: the same tokens) and
//! against the device-resident algorithm run by the host interpreter of its compiled program.
//! Exits non-zero on a mismatch.
//!
//! ```sh
//! cargo run --release --no-default-features --example cpu_runtime
//! ```

use sparse_lavida::backend::Backend;
use sparse_lavida::config::Config;
use sparse_lavida::exec;
use sparse_lavida::runtime::{WeightSource, cpu_model};
use sparse_lavida::sampler::{self, Mode, RunOptions, Switches, T2iRequest, Task};
use sparse_lavida::schedule::Order;

fn main() -> sparse_lavida::Result<()> {
    let cfg = Config::preset("tiny")?;
    let model = cpu_model(cfg, &WeightSource::Random(7))?;
    let task = Task::T2i(T2iRequest {
        prompt: (1..17).collect(),
        height: 8,
        width: 8,
        steps: 8,
        guidance: 2.0,
        temperature: 1.0,
        order: Order::Stratified,
        seed: 3,
    });
    let all_on = Mode::Sparse(Switches::ALL_ON);
    let g = exec::generate(&model, &task, all_on, RunOptions::default())?;
    println!(
        "{} {all_on}: {} steps, {} forwards, {:.1} rows per step, {:.3} s",
        model.backend().name(),
        g.steps.len(),
        g.forwards,
        g.mean_rows(),
        g.wall_s
    );

    // Every saving off recomputes what the savings skip: the same tokens (SPEC §4.3).
    let off = Mode::Sparse(Switches {
        cache_prompt: false,
        cache_decoded: false,
        truncate: false,
    });
    let reference = exec::generate(&model, &task, off, RunOptions::default())?;
    println!(
        "{off}: {:.1} rows per step, {:.3} s",
        reference.mean_rows(),
        reference.wall_s
    );

    // The same request compiled into a program (every step's template plan and patches) and
    // run by the host interpreter of the device-resident algorithm.
    let program = sampler::program(model.config(), &task, all_on)?;
    let interpreted = exec::run_program(&model, &program, RunOptions::default())?;

    if g.tokens != reference.tokens || g.tokens != interpreted.tokens {
        eprintln!("MISMATCH: the strategies or the program interpreter chose other tokens");
        std::process::exit(1);
    }
    println!(
        "ok: {} tokens equal across all savings on, all off, and the compiled program",
        g.tokens.len()
    );
    Ok(())
}
