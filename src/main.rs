//! `sparse-lavida`: generate, run one forward pass, benchmark, make weights, describe the build.

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use sparse_lavida::backend::Backend;
use sparse_lavida::bench;
use sparse_lavida::case::Case;
use sparse_lavida::config::Config;
use sparse_lavida::cuda::device::CudaDevice;
use sparse_lavida::model::Model;
use sparse_lavida::profile;
use sparse_lavida::runtime::{self, AnyModel, Device, WeightSource};
use sparse_lavida::sampler::{
    self, Execution, Generation, Mode, RunOptions, Switches, T2iRequest, Task, TextRequest,
};
use sparse_lavida::schedule::Order;
use sparse_lavida::weights::{HostTensor, HostWeights, SaveDtype};
use sparse_lavida::{Error, Result};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// `println!` that never panics: a closed pipe (`| head`) ends the program quietly.
macro_rules! say {
    ($($arg:tt)*) => { write_stdout(format_args!($($arg)*)) };
}

/// Runs `$body` with `$m` bound to the model of whichever backend `$any` holds.
macro_rules! with_model {
    ($any:expr, $m:ident => $body:expr) => {
        match $any {
            AnyModel::Cpu($m) => {
                let $m = &**$m;
                $body
            }
            AnyModel::Cuda($m) => {
                let $m = &**$m;
                $body
            }
        }
    };
}

fn write_stdout(args: std::fmt::Arguments) {
    use std::io::Write;
    if let Err(e) = writeln!(std::io::stdout().lock(), "{args}")
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

#[derive(Parser)]
#[command(
    name = "sparse-lavida",
    version,
    about = "Sparse-LaViDa masked-diffusion sampling"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an image (t2i) or a text answer and print a summary.
    Generate(GenerateArgs),
    /// One full forward pass over the rows of a case file; writes the logits.
    Forward(ForwardArgs),
    /// Dense vs sparse (and the eight-switch ablation) in one process.
    Bench(BenchArgs),
    /// Write seeded random weights to a safetensors file.
    InitWeights(InitArgs),
    /// Describe the backend, threads and build.
    Info,
}

/// Which model: a preset or a config file, and its weights.
#[derive(Args, Clone)]
struct ModelArgs {
    /// Model preset: tiny, small or lavida-o.
    #[arg(long, default_value = "small", conflicts_with = "config")]
    preset: String,
    /// Model config JSON (instead of a preset).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Weights (safetensors); random weights from --weights-seed when absent.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Seed of the random weights used when --weights is absent (on CUDA they are generated on
    /// the device: the same distributions as on the CPU, not the same numbers).
    #[arg(long, default_value_t = 0)]
    weights_seed: u64,
    /// Backend.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TaskKind {
    /// Text-to-image.
    T2i,
    /// Text answer.
    Text,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeKind {
    /// LaViDa-O baseline.
    Dense,
    /// Sparse-LaViDa.
    Sparse,
}

/// The generation workload (shared by generate and bench).
#[derive(Args, Clone)]
struct WorkArgs {
    /// Task.
    #[arg(long, value_enum, default_value_t = TaskKind::T2i)]
    task: TaskKind,
    /// Steps K (default: 64 for t2i, answer-len/2 for text).
    #[arg(long)]
    steps: Option<usize>,
    /// Image grid HxW (t2i).
    #[arg(long, default_value = "32x32", value_parser = parse_grid)]
    grid: (usize, usize),
    /// Random prompt of this many ids (seeded by --seed).
    #[arg(long, default_value_t = 64, conflicts_with = "prompt")]
    prompt_len: usize,
    /// Explicit prompt ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    prompt: Option<Vec<u32>>,
    /// Answer length G (text).
    #[arg(long, default_value_t = 128)]
    answer_len: usize,
    /// Semi-autoregressive block length S (text).
    #[arg(long, default_value_t = 32)]
    block: usize,
    /// CFG scale g (t2i; 0 runs one sequence).
    #[arg(long, default_value_t = 4.0)]
    guidance: f32,
    /// Gumbel temperature (0 = argmax).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Image decode order (t2i).
    #[arg(long, value_enum, default_value_t = OrderArg::Stratified)]
    order: OrderArg,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OrderArg {
    Stratified,
    Raster,
    Random,
}

/// How a CUDA generation executes (the CPU always runs the host loop).
#[derive(Args)]
struct ExecArgs {
    /// CUDA: run the host loop (each step planned on the host, launched op by op, its tokens
    /// read back) instead of CUDA graphs; the tokens are identical.
    #[arg(long, conflicts_with = "no_capture")]
    no_graphs: bool,
    /// CUDA: keep the whole generation on the device but launch it op by op instead of
    /// capturing CUDA graphs (to tell a capture problem from a device-program one).
    #[arg(long)]
    no_capture: bool,
}

impl ExecArgs {
    fn execution(&self) -> Execution {
        match (self.no_graphs, self.no_capture) {
            (true, _) => Execution::Eager,
            (false, true) => Execution::Queued,
            (false, false) => Execution::Graphs,
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    work: WorkArgs,
    #[command(flatten)]
    exec: ExecArgs,
    /// Execution mode.
    #[arg(long, value_enum, default_value_t = ModeKind::Sparse)]
    mode: ModeKind,
    /// Sparse: recompute the prompt every step.
    #[arg(long)]
    no_cache_prompt: bool,
    /// Sparse: recompute every decoded group every step.
    #[arg(long)]
    no_cache_decoded: bool,
    /// Sparse: also feed every remaining mask.
    #[arg(long)]
    no_truncate: bool,
    /// Write a per-step JSON trace here.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Write the response token ids (JSON array) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// CUDA only: run the generation once untimed (warm-up), then again between
    /// cuProfilerStart/Stop, for `nsys --capture-range=cudaProfilerApi` and
    /// `ncu --profile-from-start off`.
    #[arg(long)]
    profile: bool,
}

#[derive(Args)]
struct ForwardArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Case JSON: {"rows":[{"branch","id"|"reg","pos","block","masked"}...],"logits_for":[...]}.
    #[arg(long)]
    case: PathBuf,
    /// Output safetensors with `logits` f32 [len(logits_for), vocab].
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    work: WorkArgs,
    #[command(flatten)]
    exec: ExecArgs,
    /// Run all eight sparse switch combinations.
    #[arg(long)]
    ablation: bool,
    /// Repeats per mode (the best wall time is kept).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    repeat: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an SVG plot of the per-step latency, dense vs all-on sparse, here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// The PyTorch peer's JSON report, embedded as the report's `peer`.
    #[arg(long)]
    peer_json: Option<PathBuf>,
}

#[derive(Args)]
struct InitArgs {
    /// Model preset.
    #[arg(long, default_value = "small", conflicts_with = "config")]
    preset: String,
    /// Model config JSON.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// On-disk dtype.
    #[arg(long, value_enum, default_value_t = DtypeArg::Bf16)]
    dtype: DtypeArg,
    /// Write the weights the CUDA backend generates on the device for this seed (bf16 values;
    /// `--weights-seed` with `--device cuda`), computed on the CPU, instead of the host ChaCha8
    /// ones.
    #[arg(long)]
    like_device: bool,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
}

fn parse_grid(s: &str) -> std::result::Result<(usize, usize), String> {
    let (h, w) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("grid `{s}` is not HxW (e.g. 32x32)"))?;
    let h: usize = h
        .trim()
        .parse()
        .map_err(|_| format!("grid height `{h}` is not a number"))?;
    let w: usize = w
        .trim()
        .parse()
        .map_err(|_| format!("grid width `{w}` is not a number"))?;
    if h == 0 || w == 0 {
        return Err(format!("zero-size grid {h}x{w}"));
    }
    Ok((h, w))
}

fn load_config(preset: &str, config: Option<&Path>) -> Result<Config> {
    match config {
        Some(path) => Config::load(path),
        None => Config::preset(preset),
    }
}

fn build_model(args: &ModelArgs) -> Result<AnyModel> {
    let cfg = load_config(&args.preset, args.config.as_deref())?;
    let source = match &args.weights {
        Some(p) => WeightSource::File(p.clone()),
        None => WeightSource::Random(args.weights_seed),
    };
    let (model, note) = runtime::build_model(cfg, args.device, &source)?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    Ok(model)
}

fn build_task(w: &WorkArgs, cfg: &Config) -> Result<Task> {
    let prompt = match &w.prompt {
        Some(ids) => ids.clone(),
        None => {
            // A random prompt that avoids the [MASK] id, reproducible from the seed.
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(w.seed ^ 0x5EED_9A0B);
            (0..w.prompt_len)
                .map(|_| {
                    loop {
                        let id = rng.gen_range(0..cfg.text_vocab as u32);
                        if id != cfg.text_mask_id {
                            break id;
                        }
                    }
                })
                .collect()
        }
    };
    let order = match w.order {
        OrderArg::Stratified => Order::Stratified,
        OrderArg::Raster => Order::Raster,
        OrderArg::Random => Order::Random,
    };
    Ok(match w.task {
        TaskKind::T2i => Task::T2i(T2iRequest {
            prompt,
            height: w.grid.0,
            width: w.grid.1,
            steps: w.steps.unwrap_or(64),
            guidance: w.guidance,
            temperature: w.temperature,
            order,
            seed: w.seed,
        }),
        TaskKind::Text => Task::Text(TextRequest {
            prompt,
            answer_len: w.answer_len,
            block_len: w.block,
            steps: w.steps.unwrap_or(w.answer_len.div_ceil(2)),
            temperature: w.temperature,
            banned: Vec::new(),
            seed: w.seed,
        }),
    })
}

fn describe(task: &Task) -> String {
    match task {
        Task::T2i(r) => format!(
            "t2i {}x{}, {} steps, prompt {}, guidance {}, temperature {}, order {}",
            r.height,
            r.width,
            r.steps,
            r.prompt.len(),
            r.guidance,
            r.temperature,
            r.order
        ),
        Task::Text(r) => format!(
            "text answer {} (blocks of {}), {} steps, prompt {}, temperature {}",
            r.answer_len,
            r.block_len,
            r.steps,
            r.prompt.len(),
            r.temperature
        ),
    }
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Json {
        context: format!("writing {}", path.display()),
        source: e,
    })?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// A progress bar that appears only on a terminal and only once a run passes one second.
struct LazyProgress {
    start: Instant,
    bar: Option<ProgressBar>,
    tty: bool,
}

impl LazyProgress {
    fn new() -> Self {
        LazyProgress {
            start: Instant::now(),
            bar: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn update(&mut self, done: usize, total: usize) {
        if !self.tty || (self.bar.is_none() && self.start.elapsed().as_secs_f64() < 1.0) {
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let b = ProgressBar::new(total as u64);
            if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} steps {elapsed}")
            {
                b.set_style(style);
            }
            b
        });
        bar.set_position(done as u64);
    }

    fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let model = build_model(&a.model)?;
    match &model {
        AnyModel::Cuda(m) => generate_on(&**m, &a, a.profile.then(|| m.backend().device())),
        AnyModel::Cpu(m) if a.profile => Err(Error::Input(format!(
            "--profile needs --device cuda (it brackets the CUDA work with cuProfilerStart/Stop \
             for nsys and ncu); this run is on the {} backend; for the CPU use perf (README, \
             \"Profiling\")",
            m.backend().name()
        ))),
        AnyModel::Cpu(m) => generate_on(&**m, &a, None),
    }
}

/// Runs `a`'s generation on `model` and reports it. With `capture` (`--profile`), a first,
/// untimed run warms up (module loading, cuBLASLt algorithm choice for every shape), and the
/// reported run is bracketed by cuProfilerStart/Stop on that device.
fn generate_on<B: Backend>(
    model: &Model<B>,
    a: &GenerateArgs,
    capture: Option<&CudaDevice>,
) -> Result<()> {
    let task = build_task(&a.work, model.config())?;
    let mode = match a.mode {
        ModeKind::Dense => {
            if a.no_cache_prompt || a.no_cache_decoded || a.no_truncate {
                return Err(Error::Input(
                    "--no-cache-* / --no-truncate apply to --mode sparse only".into(),
                ));
            }
            Mode::Dense
        }
        ModeKind::Sparse => Mode::Sparse(Switches {
            cache_prompt: !a.no_cache_prompt,
            cache_decoded: !a.no_cache_decoded,
            truncate: !a.no_truncate,
        }),
    };
    let exec = a.exec.execution();
    let region = match capture {
        Some(dev) => {
            let warm = sampler::generate_with(model, &task, mode, exec, RunOptions::default())?;
            eprintln!(
                "profile: warm-up run {:.3} s; the run below is inside cuProfilerStart/Stop",
                warm.wall_s
            );
            Some(profile::Capture::start(dev)?)
        }
        None => None,
    };
    let mut progress = LazyProgress::new();
    let mut tick = |d, t| progress.update(d, t);
    let g = sampler::generate_with(
        model,
        &task,
        mode,
        exec,
        RunOptions {
            progress: Some(&mut tick),
            ..RunOptions::default()
        },
    )?;
    if let Some(region) = region {
        region.stop()?;
    }
    progress.finish();
    print_summary(model, &task, mode, &g);
    if let Some(path) = &a.trace {
        let trace = serde_json::json!({
            "backend": model.backend().name(),
            "task": describe(&task),
            "mode": mode.to_string(),
            "forwards": g.forwards,
            "rows_fed": g.rows_fed,
            "wall_s": g.wall_s,
            "setup_s": g.setup_s,
            "execution": g.execution,
            "steps": g.steps,
        });
        write_json(path, &trace)?;
    }
    if let Some(path) = &a.out {
        write_json(path, &g.tokens)?;
    }
    Ok(())
}

fn print_summary(model: &Model<impl Backend>, task: &Task, mode: Mode, g: &Generation) {
    say!("backend   {}", model.backend().name());
    say!("task      {}", describe(task));
    say!("mode      {mode}");
    say!("execution {}", g.execution);
    say!("steps     {}", g.steps.len());
    say!("forwards  {}", g.forwards);
    say!("rows fed  {} ({:.1} per step)", g.rows_fed, g.mean_rows());
    if g.setup_s > 0.0 {
        say!(
            "time      {:.3} s ({:.3} s setup: plan uploads, graph capture)",
            g.wall_s,
            g.setup_s
        );
    } else {
        say!("time      {:.3} s", g.wall_s);
    }
}

fn cmd_forward(a: ForwardArgs) -> Result<()> {
    let model = build_model(&a.model)?;
    with_model!(&model, m => forward_on(m, &a))
}

fn forward_on<B: Backend>(model: &Model<B>, a: &ForwardArgs) -> Result<()> {
    let case = Case::load(&a.case)?;
    let plan = case.plan(model.config())?;
    let vocab = plan
        .logits_branch
        .map(|b| model.config().vocab(b))
        .unwrap_or(0);
    let n = plan.logits_rows.len();
    let mut cache = model.new_cache(plan.pool_slots)?;
    let logits = match model.forward(&model.prepare(plan)?, &mut cache)? {
        Some(m) => model.backend().to_host(&m)?,
        None => Vec::new(),
    };
    let mut tensors = std::collections::BTreeMap::new();
    tensors.insert(
        "logits".to_string(),
        HostTensor {
            shape: vec![n, vocab],
            data: logits,
        },
    );
    HostWeights { tensors }.save(&a.out, SaveDtype::F32)?;
    say!("wrote logits [{n}, {vocab}] to {}", a.out.display());
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    let model = build_model(&a.model)?;
    with_model!(&model, m => bench_on(m, &a))
}

fn bench_on<B: Backend>(model: &Model<B>, a: &BenchArgs) -> Result<()> {
    let task = build_task(&a.work, model.config())?;
    let preset = a
        .model
        .config
        .as_ref()
        .map_or(a.model.preset.clone(), |p| p.display().to_string());
    let model_name = if a.model.config.is_some() {
        preset.clone()
    } else {
        format!("preset {preset}")
    };
    let workload = format!("{} ({model_name})", describe(&task));
    // Read the peer's report first: a bad file should fail before minutes of benchmarking.
    let peer = match &a.peer_json {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Json {
                    context: format!("reading the peer report {}", path.display()),
                    source: e,
                })?;
            Some(value)
        }
        None => None,
    };
    say!("backend   {}", model.backend().name());
    say!("machine   {}", runtime::cpu_description());
    say!("workload  {workload}");
    say!("{}", bench::table_header());
    let mut dense_wall = None;
    let spec = bench::BenchSpec {
        workload,
        preset,
        ablation: a.ablation,
        repeat: a.repeat as usize,
        execution: a.exec.execution(),
    };
    let mut report = bench::run_bench(model, &task, &spec, |r| {
        let d = *dense_wall.get_or_insert(r.wall_s);
        say!("{}", bench::table_row(r, d));
    })?;
    report.peer = peer;
    say!(
        "speedup sparse vs dense: {:.2}x",
        report.speedup_sparse_vs_dense
    );
    if report.runs.iter().any(|r| r.setup_s > 0.0) {
        say!(
            "speedup sparse vs dense without setup (graph capture): {:.2}x",
            report.speedup_run_sparse_vs_dense
        );
    }
    if let Some(driver) = &report.driver {
        say!("device    {}, driver {driver}", report.device);
    }
    if let Some(resident) = report.resident_device_bytes {
        let peak = report
            .runs
            .iter()
            .filter_map(|r| r.peak_device_bytes)
            .max()
            .unwrap_or(resident);
        say!(
            "memory    {:.2} GB resident, {:.2} GB peak",
            resident as f64 / 1e9,
            peak as f64 / 1e9
        );
    }
    if let (Some(peak), Some(dense), Some(frac)) = (
        report.bf16_peak_flops_per_s,
        report.dense_gemm_flops_per_s,
        report.dense_gemm_fraction_of_peak,
    ) {
        say!(
            "gemm      dense step products at {:.1} TFLOP/s = {:.0}% of the bf16 rate measured \
             here ({:.1} TFLOP/s, 8192³)",
            dense / 1e12,
            frac * 100.0,
            peak / 1e12
        );
    }
    match (
        report.floor_step_s,
        report.copy_bandwidth_bytes_per_s,
        report.sparse_step_over_floor,
    ) {
        (Some(floor), Some(bw), Some(ratio)) => say!(
            "floor     {:.3} ms per sparse step ({:.2} GB of weights at {:.0} GB/s copy); \
             sparse step median is {ratio:.2}x the floor",
            floor * 1e3,
            report.active_weight_bytes.unwrap_or(0) as f64 / 1e9,
            bw / 1e9
        ),
        _ if model.backend().device_stats().is_some() => eprintln!(
            "warning: too little device memory free to measure the copy bandwidth: no floor"
        ),
        _ => {}
    }
    if report
        .runs
        .iter()
        .any(|r| r.tokens_match_sparse == Some(false))
    {
        eprintln!(
            "warning: some sparse switch combinations chose different tokens (float rounding near a tie)"
        );
    }
    if let Some(path) = &a.json {
        write_json(path, &report)?;
    }
    if let Some(path) = &a.plot {
        bench::plot_steps_svg(&report, path)?;
    }
    Ok(())
}

fn cmd_init(a: InitArgs) -> Result<()> {
    let cfg = load_config(&a.preset, a.config.as_deref())?;
    sparse_lavida::config::ensure_fits(
        "random weights in f32",
        sparse_lavida::weights::f32_bytes(&cfg),
    )?;
    let w = if a.like_device {
        HostWeights::random_like_device(&cfg, a.seed)?
    } else {
        HostWeights::random(&cfg, a.seed)
    };
    let dtype = match a.dtype {
        DtypeArg::F32 => SaveDtype::F32,
        DtypeArg::Bf16 => SaveDtype::Bf16,
    };
    w.save(&a.out, dtype)?;
    say!(
        "wrote {} parameters to {}",
        cfg.param_count(),
        a.out.display()
    );
    Ok(())
}

fn cmd_info() -> Result<()> {
    let be = sparse_lavida::backend::cpu::CpuBackend::new();
    say!("sparse-lavida {}", env!("CARGO_PKG_VERSION"));
    say!(
        "build     {} ({})",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        std::env::consts::ARCH
    );
    say!("backends  cpu (f32), cuda (bf16)");
    say!("cpu       {} threads", be.threads());
    match sparse_lavida::backend::cuda::CudaBackend::new() {
        Ok(cuda) => {
            let info = cuda.device().info();
            say!(
                "cuda      {}, {} SMs, {:.1} GB",
                cuda.name(),
                info.sm_count,
                info.total_mem as f64 / 1e9
            );
        }
        Err(e) => say!("cuda      unavailable: {}", runtime::reason(&e)),
    }
    if let Some(b) = sparse_lavida::config::available_memory_bytes() {
        say!("memory    {:.1} GB available", b as f64 / 1e9);
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => cmd_generate(a),
        Command::Forward(a) => cmd_forward(a),
        Command::Bench(a) => cmd_bench(a),
        Command::InitWeights(a) => cmd_init(a),
        Command::Info => cmd_info(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
