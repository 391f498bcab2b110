//! `sparse-lavida`: generate, run one forward pass, benchmark, make weights, describe the build.

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use sparse_lavida::backend::Backend;
use sparse_lavida::backend::cpu::workers::HotWorkers;
use sparse_lavida::bench;
use sparse_lavida::case::Case;
use sparse_lavida::config::{Branch, Config};
#[cfg(feature = "cuda")]
use sparse_lavida::cuda::{device::CudaDevice, profiler};
use sparse_lavida::exec::{self, Resident};
use sparse_lavida::image::{GridPicture, PictureLayout};
use sparse_lavida::io::{check_outputs, write_json};
use sparse_lavida::memory::{self, Need, Target, WeightsFrom, human_bytes, human_count};
use sparse_lavida::model::Model;
use sparse_lavida::request::{PromptSpec, TaskKind, Workload};
use sparse_lavida::runtime::{self, AnyModel, Device, Resolved, WeightSource};
use sparse_lavida::sampler::{Execution, Generation, Mode, RunOptions, StepTrace, Switches, Task};
use sparse_lavida::schedule::Order;
use sparse_lavida::weights::{self, HostTensor, HostWeights, RandomKind, SaveDtype};
use sparse_lavida::{Error, Result};
use std::cell::RefCell;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// `println!` that never panics: a closed pipe (`| head`) ends the program quietly.
macro_rules! say {
    ($($arg:tt)*) => { write_stdout(format_args!($($arg)*)) };
}

/// Runs `$body` with `$m` bound to the model of whichever backend `$any` holds; on the CPU, with
/// the pool's other workers kept polling for work meanwhile ([`HotWorkers`]).
macro_rules! with_model {
    ($any:expr, $m:ident => $body:expr) => {
        match $any {
            AnyModel::Cpu($m) => {
                let $m = &**$m;
                let _hot = HotWorkers::start();
                $body
            }
            #[cfg(feature = "cuda")]
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
    /// Host memory this run may use, e.g. 8G (GiB), 1.5GB (10⁹ bytes), 4096: a request that
    /// needs more is refused before it allocates. Default: the memory available now.
    #[arg(long, global = true, value_parser = memory::parse_bytes)]
    max_memory: Option<u64>,
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
    /// Draw the picture of a t2i generation from its `generate --trace` file.
    Render(RenderArgs),
    /// Describe the build (what it can run), the backends, threads and memory.
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
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
}

/// Where to run (`runtime::Device`).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    /// The CUDA backend when a GPU, its driver, the compiled kernels and cuBLASLt are there and
    /// the model's head_dim has an attention kernel; the CPU backend otherwise.
    Auto,
    /// The f32 CPU backend.
    Cpu,
    /// The CUDA bf16 backend.
    Cuda,
}

impl From<DeviceArg> for Device {
    fn from(d: DeviceArg) -> Device {
        match d {
            DeviceArg::Auto => Device::Auto,
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::Cuda,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TaskArg {
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

/// The generation workload (shared by generate and bench). Flags of the other task are
/// refused; defaults of the flags left out follow from the others (`request::Workload`).
#[derive(Args, Clone)]
struct WorkArgs {
    /// Task.
    #[arg(long, value_enum, default_value_t = TaskArg::T2i)]
    task: TaskArg,
    /// Steps K [default: 64 for t2i (at most one per grid cell); for text about two positions
    /// per step, ceil(answer-len/2), at least one per block].
    #[arg(long)]
    steps: Option<usize>,
    /// Image grid HxW (t2i) [default: 32x32].
    #[arg(long, value_parser = parse_grid)]
    grid: Option<(usize, usize)>,
    /// Random prompt of this many ids (seeded by --seed).
    #[arg(long, default_value_t = Workload::PROMPT_LEN, conflicts_with = "prompt")]
    prompt_len: usize,
    /// Explicit prompt ids, comma-separated (text ids, never the text [MASK]).
    #[arg(long, value_delimiter = ',')]
    prompt: Option<Vec<u32>>,
    /// Answer length G (text) [default: 128].
    #[arg(long)]
    answer_len: Option<usize>,
    /// Semi-autoregressive block length S (text) [default: 32; a shorter last block is fine].
    #[arg(long)]
    block: Option<usize>,
    /// CFG scale g (t2i; 0 runs one sequence) [default: 4].
    #[arg(long)]
    guidance: Option<f32>,
    /// Gumbel temperature (0 = argmax).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Image decode order (t2i) [default: stratified].
    #[arg(long, value_enum)]
    order: Option<OrderArg>,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl WorkArgs {
    fn workload(&self) -> Workload {
        Workload {
            task: match self.task {
                TaskArg::T2i => TaskKind::T2i,
                TaskArg::Text => TaskKind::Text,
            },
            steps: self.steps,
            grid: self.grid,
            prompt: match &self.prompt {
                Some(ids) => PromptSpec::Ids(ids.clone()),
                None => PromptSpec::Random(self.prompt_len),
            },
            answer_len: self.answer_len,
            block: self.block,
            guidance: self.guidance,
            temperature: self.temperature,
            order: self.order.map(|o| match o {
                OrderArg::Stratified => Order::Stratified,
                OrderArg::Raster => Order::Raster,
                OrderArg::Random => Order::Random,
            }),
            seed: self.seed,
        }
    }
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
    /// Write a per-step JSON trace here (a batch: a directory, getting trace-{i}.json, or a
    /// pattern with {i}).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Write the response token ids (JSON array) here (a batch: a directory, getting
    /// out-{i}.json, or a pattern with {i}).
    #[arg(long)]
    out: Option<PathBuf>,
    /// t2i: write a PNG picture of the generation here (each cell's decode step beside its
    /// token id; see the README; a batch: a directory, getting image-{i}.png, or a pattern
    /// with {i}).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Run N requests as one batch (one forward pass per step for all): request i has the seed
    /// --seed + i and, without --prompt, a random prompt of --prompt-len drawn from that seed.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    batch: Option<u64>,
    /// A batch's prompts, one request per line: text ids separated by commas or spaces (`[]`
    /// is an empty prompt; blank lines and lines starting with # are skipped). Request i has
    /// the seed --seed + i.
    #[arg(long, conflicts_with = "prompt")]
    prompts: Option<PathBuf>,
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
    /// t2i: write a PNG picture of the all-on sparse run's generation here.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Throughput against batch size: run the workload as batches of these sizes
    /// (comma-separated, e.g. 1,2,4,8; request i has the seed --seed + i) and report images
    /// (or tokens) per second, latency per request and per step, and peak memory per size;
    /// --json and --plot then write that report.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..))]
    batch: Option<Vec<u64>>,
}

#[derive(Args)]
struct RenderArgs {
    /// A `generate --trace` file of a t2i generation.
    #[arg(long)]
    trace: PathBuf,
    /// The PNG to write.
    #[arg(long)]
    image: PathBuf,
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

fn weight_source(args: &ModelArgs) -> WeightSource {
    match &args.weights {
        Some(p) => WeightSource::File(p.clone()),
        None => WeightSource::Random(args.weights_seed),
    }
}

/// Resolves the device, then refuses the request if it does not fit: the weights plus what
/// `run` adds, against the host limit and (on a GPU) the device's free memory. Nothing is
/// allocated before this passes; the note of `auto` is printed once it does.
fn resolve_within_memory(
    what: &str,
    cfg: &Config,
    args: &ModelArgs,
    run: impl Fn(&mut Need, Target) -> Result<()>,
) -> Result<Resolved> {
    let (resolved, note) = runtime::resolve_device(args.device.into(), cfg)?;
    let target = match &resolved {
        Resolved::Cpu => Target::Cpu,
        #[cfg(feature = "cuda")]
        Resolved::Cuda(backend) => Target::Cuda {
            attn_workers: backend.attention_workers(cfg.head_dim)? as u64,
        },
    };
    let from = match &args.weights {
        Some(p) => WeightsFrom::File(std::fs::metadata(p).map_err(|e| Error::io(p, e))?.len()),
        None => WeightsFrom::Random,
    };
    let mut need = Need::default();
    memory::add_weights(&mut need, cfg, target, from)?;
    run(&mut need, target)?;
    need.check_host(what)?;
    #[cfg(feature = "cuda")]
    if let Resolved::Cuda(backend) = &resolved {
        need.check_device(what, backend.free_memory()? as u64)?;
    }
    if let Some(note) = note {
        eprintln!("{note}");
    }
    Ok(resolved)
}

/// The pixels of a `--image` picture of `shape`'s grid (0 without `--image`).
fn image_pixels(image: Option<&Path>, shape: &memory::GenShape) -> Result<u64> {
    match (image, shape.grid) {
        (None, _) => Ok(0),
        (Some(_), Some((h, w))) => Ok(PictureLayout::of(h as usize, w as usize)?.pixels()),
        (Some(_), None) => Err(Error::Input(
            "--image draws the grid of a t2i generation; a text answer has none".into(),
        )),
    }
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

/// A progress bar on stderr that appears only on a terminal and only once a run passes one
/// second, so piped output and quick runs stay quiet.
struct LazyProgress {
    start: Instant,
    bar: Option<ProgressBar>,
    tty: bool,
    template: &'static str,
}

impl LazyProgress {
    /// Counts steps (`generate`, `bench`).
    fn steps() -> Self {
        Self::with("{msg} {bar:40} {pos}/{len} steps {elapsed}")
    }

    /// Counts bytes (`init-weights`).
    fn bytes() -> Self {
        Self::with("{msg} {bar:40} {bytes}/{total_bytes} {elapsed} (eta {eta})")
    }

    fn with(template: &'static str) -> Self {
        LazyProgress {
            start: Instant::now(),
            bar: None,
            tty: std::io::stderr().is_terminal(),
            template,
        }
    }

    fn update(&mut self, msg: &str, done: u64, total: u64) {
        if !self.tty || (self.bar.is_none() && self.start.elapsed().as_secs_f64() < 1.0) {
            return;
        }
        let template = self.template;
        let bar = self.bar.get_or_insert_with(|| {
            let b = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(template) {
                b.set_style(style);
            }
            b
        });
        bar.set_length(total);
        bar.set_position(done);
        if bar.message() != msg {
            bar.set_message(msg.to_string());
        }
    }

    /// Runs `f` (printing to stdout) with the bar hidden, so their lines do not mix.
    fn suspend(&self, f: impl FnOnce()) {
        match &self.bar {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }

    fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

/// The mode `generate`'s flags ask for.
fn generate_mode(a: &GenerateArgs) -> Result<Mode> {
    Ok(match a.mode {
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
    })
}

/// The paths `flag`'s `path` names for a batch of `n` requests (`batch`: `--batch` or
/// `--prompts` was given): a pattern with `{i}` gives one per request, a directory
/// `DIR/{name}-{i}.{ext}`, a plain file the file itself (a batch of one only). Without `batch`
/// the path is the one file of a single generation, as it always was.
fn per_request_paths(
    flag: &str,
    path: &Path,
    (name, ext): (&str, &str),
    n: usize,
    batch: bool,
) -> Result<Vec<PathBuf>> {
    if !batch {
        return Ok(vec![path.to_path_buf()]);
    }
    let text = path.to_string_lossy();
    if text.contains("{i}") {
        return Ok((0..n)
            .map(|i| PathBuf::from(text.replace("{i}", &i.to_string())))
            .collect());
    }
    if path.is_dir() {
        return Ok((0..n)
            .map(|i| path.join(format!("{name}-{i}.{ext}")))
            .collect());
    }
    if n == 1 {
        return Ok(vec![path.to_path_buf()]);
    }
    Err(Error::Input(format!(
        "{flag} {} names one file, and a batch of {n} writes one per request: give a directory \
         (it gets {name}-0.{ext}, {name}-1.{ext}, ...) or a pattern with {{i}}",
        path.display()
    )))
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    // Everything that can be refused without a model is refused first: flags, sizes, output
    // locations, memory.
    let cfg = load_config(&a.model.preset, a.model.config.as_deref())?;
    let work = a.work.workload();
    let prompts = match &a.prompts {
        Some(path) => Some(sparse_lavida::request::read_prompts(path)?),
        None => None,
    };
    let n = match (a.batch, &prompts) {
        (Some(b), Some(p)) if b as usize != p.len() => {
            return Err(Error::Input(format!(
                "--batch {b} but --prompts holds {} prompts",
                p.len()
            )));
        }
        (_, Some(p)) => p.len(),
        (Some(b), None) => {
            usize::try_from(b).map_err(|_| Error::Input("--batch too large".into()))?
        }
        (None, None) => 1,
    };
    let works = work.batch(n, prompts.as_deref())?;
    let name = |i: usize, e: Error| {
        if n > 1 {
            e.context(format_args!("request {i}"))
        } else {
            e
        }
    };
    let shapes = (works.iter().enumerate())
        .map(|(i, w)| w.shape(&cfg).map_err(|e| name(i, e)))
        .collect::<Result<Vec<_>>>()?;
    let mode = generate_mode(&a)?;
    let image_px = image_pixels(a.image.as_deref(), &shapes[0])?;
    let batch = a.batch.is_some() || a.prompts.is_some();
    let paths = |flag: &str, p: &Option<PathBuf>, stem: &str, ext: &str| -> Result<Vec<PathBuf>> {
        match p {
            Some(p) => per_request_paths(flag, p, (stem, ext), n, batch),
            None => Ok(Vec::new()),
        }
    };
    let outs = Outputs {
        trace: paths("--trace", &a.trace, "trace", "json")?,
        out: paths("--out", &a.out, "out", "json")?,
        image: paths("--image", &a.image, "image", "png")?,
    };
    let outputs: Vec<(&str, &Path)> = (outs.trace.iter().map(|p| ("--trace", p.as_path())))
        .chain(outs.out.iter().map(|p| ("--out", p.as_path())))
        .chain(outs.image.iter().map(|p| ("--image", p.as_path())))
        .collect();
    check_outputs(&outputs)?;
    let what = if n > 1 {
        format!("this batch of {n} generations")
    } else {
        "this generation".to_string()
    };
    let resolved = resolve_within_memory(&what, &cfg, &a.model, |need, target| {
        memory::add_batch(need, &cfg, &shapes, target, image_px)
    })?;
    let tasks = (works.iter().enumerate())
        .map(|(i, w)| w.task(&cfg).map_err(|e| name(i, e)))
        .collect::<Result<Vec<_>>>()?;
    let model = runtime::build_on(resolved, cfg, &weight_source(&a.model))?;
    match &model {
        #[cfg(feature = "cuda")]
        AnyModel::Cuda(m) => generate_on(
            &**m,
            &a,
            &tasks,
            mode,
            &outs,
            a.profile.then(|| m.backend().device()),
        ),
        AnyModel::Cpu(m) if a.profile => Err(Error::Input(format!(
            "--profile needs --device cuda (it brackets the CUDA work with cuProfilerStart/Stop \
             for nsys and ncu); this run is on the {} backend; for the CPU use perf (README, \
             \"Profiling\")",
            m.backend().name()
        ))),
        AnyModel::Cpu(m) => {
            let _hot = HotWorkers::start();
            generate_on(&**m, &a, &tasks, mode, &outs, None)
        }
    }
}

/// Where `generate` writes, one path per request for each flag given.
struct Outputs {
    trace: Vec<PathBuf>,
    out: Vec<PathBuf>,
    image: Vec<PathBuf>,
}

/// The `--trace` file: the run's facts, then every step. A t2i trace also records its grid
/// and image vocabulary, so that `render` can draw it.
#[derive(serde::Serialize)]
struct TraceFile<'a> {
    backend: String,
    task: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    grid: Option<[usize; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vocab: Option<usize>,
    mode: String,
    forwards: usize,
    rows_fed: usize,
    wall_s: f64,
    setup_s: f64,
    execution: Execution,
    /// The batch this request ran in (absent for a single request).
    #[serde(skip_serializing_if = "Option::is_none")]
    batch: Option<usize>,
    /// The request's index in the batch (absent for a single request).
    #[serde(skip_serializing_if = "Option::is_none")]
    request: Option<usize>,
    /// The request's seed.
    seed: u64,
    steps: &'a [StepTrace],
}

/// The device `--profile` brackets with cuProfilerStart/Stop (none in a build without CUDA).
#[cfg(feature = "cuda")]
type ProfiledDevice = CudaDevice;
#[cfg(not(feature = "cuda"))]
type ProfiledDevice = std::convert::Infallible;

/// Runs `tasks` (one batch) on `model` and reports it. With `capture` (`--profile`), a first,
/// untimed run warms up (module loading, cuBLASLt algorithm choice for every shape), and the
/// reported run is bracketed by cuProfilerStart/Stop on that device.
fn generate_on<B: Resident>(
    model: &Model<B>,
    a: &GenerateArgs,
    tasks: &[Task],
    mode: Mode,
    outs: &Outputs,
    capture: Option<&ProfiledDevice>,
) -> Result<()> {
    let execution = a.exec.execution();
    #[cfg(feature = "cuda")]
    let region = match capture {
        Some(dev) => {
            let warm =
                exec::generate_batch_with(model, tasks, mode, execution, RunOptions::default())?;
            eprintln!(
                "profile: warm-up run {:.3} s; the run below is inside cuProfilerStart/Stop",
                warm[0].wall_s
            );
            Some(profiler::Capture::start(dev)?)
        }
        None => None,
    };
    #[cfg(not(feature = "cuda"))]
    let _ = capture;
    let mut progress = LazyProgress::steps();
    let mut tick = |d: usize, t: usize| progress.update("generate", d as u64, t as u64);
    let gs = exec::generate_batch_with(
        model,
        tasks,
        mode,
        execution,
        RunOptions {
            progress: Some(&mut tick),
            ..RunOptions::default()
        },
    )?;
    #[cfg(feature = "cuda")]
    if let Some(region) = region {
        region.stop()?;
    }
    progress.finish();
    let n = tasks.len();
    if n == 1 {
        print_summary(model, &tasks[0], mode, &gs[0]);
    } else {
        print_batch_summary(model, tasks, mode, &gs);
    }
    let image_vocab = model.config().vocab(Branch::Image);
    for (i, (task, g)) in tasks.iter().zip(&gs).enumerate() {
        let (grid, seed) = match task {
            Task::T2i(r) => (Some([r.height, r.width]), r.seed),
            Task::Text(r) => (None, r.seed),
        };
        if let Some(path) = outs.trace.get(i) {
            let trace = TraceFile {
                backend: model.backend().name(),
                task: describe(task),
                grid,
                vocab: grid.map(|_| image_vocab),
                mode: mode.to_string(),
                forwards: g.forwards,
                rows_fed: g.rows_fed,
                wall_s: g.wall_s,
                setup_s: g.setup_s,
                execution: g.execution,
                batch: (n > 1).then_some(n),
                request: (n > 1).then_some(i),
                seed,
                steps: &g.steps,
            };
            write_json(path, &trace)?;
        }
        if let Some(path) = outs.out.get(i) {
            write_json(path, &g.tokens)?;
        }
        if let (Some(path), Some([h, w])) = (outs.image.get(i), grid) {
            GridPicture::from_trace(h, w, image_vocab, &g.steps)?.write_png(path)?;
            say!("image     {}", path.display());
        }
    }
    Ok(())
}

/// The summary of a batch: the batch's passes, rows and time, and its throughput.
fn print_batch_summary(model: &Model<impl Backend>, tasks: &[Task], mode: Mode, gs: &[Generation]) {
    let n = tasks.len();
    let longest = gs.iter().max_by_key(|g| g.steps.len()).expect("a request");
    let prefill = usize::from(gs.iter().any(|g| g.forwards > g.steps.len()));
    let rows: usize = gs.iter().map(|g| g.rows_fed).sum();
    let (wall, setup) = (gs[0].wall_s, gs[0].setup_s);
    let (items, unit) = match &tasks[0] {
        Task::T2i(_) => (n, "images"),
        Task::Text(_) => (
            tasks
                .iter()
                .map(|t| match t {
                    Task::Text(r) => r.answer_len,
                    Task::T2i(_) => 0,
                })
                .sum(),
            "tokens",
        ),
    };
    let seeds = match (&tasks[0], &tasks[n - 1]) {
        (Task::T2i(a), Task::T2i(b)) => (a.seed, b.seed),
        (Task::Text(a), Task::Text(b)) => (a.seed, b.seed),
        _ => (0, 0),
    };
    say!("backend   {}", model.backend().name());
    say!(
        "task      {} (request 0), batch of {n}, seeds {}..={}",
        describe(&tasks[0]),
        seeds.0,
        seeds.1
    );
    say!("mode      {mode}");
    say!("execution {}", gs[0].execution);
    say!("steps     {}", longest.steps.len());
    say!(
        "forwards  {} (one pass per step for the whole batch)",
        longest.steps.len() + prefill
    );
    say!(
        "rows fed  {rows} ({:.1} per step)",
        rows as f64 / longest.steps.len().max(1) as f64
    );
    if setup > 0.0 {
        say!("time      {wall:.3} s ({setup:.3} s setup: plan uploads, graph capture)");
    } else {
        say!("time      {wall:.3} s");
    }
    say!("throughput {:.2} {unit}/s", items as f64 / wall);
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
    let cfg = load_config(&a.model.preset, a.model.config.as_deref())?;
    check_outputs(&[("--out", &a.out)])?;
    let case = Case::load(&a.case)?;
    let vocab = case
        .logits_for
        .first()
        .and_then(|&i| case.rows.get(i))
        .map_or(0, |r| cfg.vocab(r.branch));
    let resolved = resolve_within_memory("this forward pass", &cfg, &a.model, |need, target| {
        let rows = case.rows_per_branch();
        memory::add_forward(
            need,
            &cfg,
            rows,
            case.logits_for.len() as u64,
            vocab as u64,
            target,
        )
    })?;
    let plan = case.plan(&cfg)?;
    if let Some(note) = case.note(&cfg) {
        eprintln!("{note}");
    }
    let model = runtime::build_on(resolved, cfg, &weight_source(&a.model))?;
    with_model!(&model, m => forward_on(m, plan, &a.out))
}

fn forward_on<B: Backend>(
    model: &Model<B>,
    plan: sparse_lavida::plan::StepPlan,
    out: &Path,
) -> Result<()> {
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
    HostWeights { tensors }.save(out, SaveDtype::F32)?;
    say!("wrote logits [{n}, {vocab}] to {}", out.display());
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    if a.batch.is_some() {
        return cmd_bench_batch(a);
    }
    let cfg = load_config(&a.model.preset, a.model.config.as_deref())?;
    let work = a.work.workload();
    let shape = work.shape(&cfg)?;
    let image_px = image_pixels(a.image.as_deref(), &shape)?;
    let outputs: Vec<(&str, &Path)> = [
        ("--json", &a.json),
        ("--plot", &a.plot),
        ("--image", &a.image),
    ]
    .into_iter()
    .filter_map(|(flag, p)| p.as_deref().map(|p| (flag, p)))
    .collect();
    check_outputs(&outputs)?;
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
    let resolved = resolve_within_memory("this benchmark", &cfg, &a.model, |need, target| {
        memory::add_generation(need, &cfg, &shape, target, image_px)?;
        // The all-on sparse generation's steps are kept for --image while the other runs go,
        // and every run keeps its per-step times.
        let kept = shape.response_len.saturating_mul(64);
        let runs = shape.steps.saturating_mul(9 * 16);
        need.host(
            "the kept generation and per-step times",
            kept.saturating_add(runs),
        );
        Ok(())
    })?;
    let task = work.task(&cfg)?;
    let model = runtime::build_on(resolved, cfg, &weight_source(&a.model))?;
    with_model!(&model, m => bench_on(m, &a, &task, peer))
}

fn bench_on<B: Resident>(
    model: &Model<B>,
    a: &BenchArgs,
    task: &Task,
    peer: Option<serde_json::Value>,
) -> Result<()> {
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
    let workload = format!("{} ({model_name})", describe(task));
    say!("backend   {}", model.backend().name());
    if model.backend().name().contains("emulated") {
        say!(
            "note      the emulated device is a CPU model for correctness: its timings say \
             nothing about a GPU's"
        );
    }
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
    let progress = RefCell::new(LazyProgress::steps());
    let mut picture = None;
    let mut report = bench::run_bench(
        model,
        task,
        &spec,
        |r, g| {
            let d = *dense_wall.get_or_insert(r.wall_s);
            progress
                .borrow()
                .suspend(|| say!("{}", bench::table_row(r, d)));
            if r.is_sparse_all_on() && a.image.is_some() {
                picture = Some(g.steps.clone());
            }
        },
        |mode, done, total| {
            progress
                .borrow_mut()
                .update(&mode.to_string(), done as u64, total as u64)
        },
    )?;
    progress.into_inner().finish();
    say!(
        "speedup sparse vs dense: {:.2}x",
        report.speedup_sparse_vs_dense
    );
    if let Some(sgemm) = report.cpu_sgemm_flops_per_s {
        let rate = |r: Option<&bench::BenchRun>| match r.and_then(|r| r.product_flops_per_s) {
            Some(f) => format!("{:.0} GFLOP/s ({:.0}%)", f * 1e-9, 100.0 * f / sgemm),
            None => "-".into(),
        };
        say!(
            "products  inside the steps: dense {}, sparse {}; of the machine's sgemm rate {:.0} GFLOP/s (1024^3, matrixmultiply)",
            rate(report.runs.first()),
            rate(report.runs.iter().find(|r| r.is_sparse_all_on())),
            sgemm * 1e-9
        );
    }
    if let Some(peer) = &peer {
        let kind = match task {
            Task::T2i(_) => "t2i",
            Task::Text(_) => "text",
        };
        report.vs_peer = bench::compare_with_peer(&report.runs, kind, peer);
        let who = peer["torch"].as_str().unwrap_or("?");
        for c in &report.vs_peer {
            say!(
                "vs peer   {} {:<6}  crate {:.3} s, PyTorch {who} {:.3} s (best; median {:.3} s): crate {:.2}x",
                c.task,
                c.mode,
                c.crate_wall_s,
                c.peer_best_wall_s.unwrap_or(c.peer_wall_s),
                c.peer_wall_s,
                c.crate_speedup
            );
        }
        if report.vs_peer.is_empty() {
            say!("vs peer   the peer report has no {kind} run to compare with");
        }
    }
    report.peer = peer;
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
            "memory    {} resident, {} peak",
            human_bytes(resident),
            human_bytes(peak)
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
            "floor     {:.3} ms per sparse step ({} of weights at {:.0} GB/s copy); \
             sparse step median is {ratio:.2}x the floor",
            floor * 1e3,
            human_bytes(report.active_weight_bytes.unwrap_or(0)),
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
    if let (Some(path), Some(steps), Task::T2i(r)) = (&a.image, &picture, task) {
        let vocab = model.config().vocab(Branch::Image);
        GridPicture::from_trace(r.height, r.width, vocab, steps)?.write_png(path)?;
        say!("image     {} (the all-on sparse run)", path.display());
    }
    Ok(())
}

/// `bench --batch`: the workload as batches of each size, dense and sparse.
fn cmd_bench_batch(a: BenchArgs) -> Result<()> {
    let cfg = load_config(&a.model.preset, a.model.config.as_deref())?;
    let batches: Vec<usize> = (a.batch.iter().flatten())
        .map(|&b| usize::try_from(b).map_err(|_| Error::Input("--batch too large".into())))
        .collect::<Result<_>>()?;
    for (flag, given) in [
        ("--image", a.image.is_some()),
        ("--peer-json", a.peer_json.is_some()),
    ] {
        if given {
            return Err(Error::Input(format!(
                "{flag} applies to bench without --batch (the dense vs sparse report)"
            )));
        }
    }
    let work = a.work.workload();
    let largest = batches.iter().copied().max().unwrap_or(1);
    let shapes = (work.batch(largest, None)?.iter())
        .map(|w| w.shape(&cfg))
        .collect::<Result<Vec<_>>>()?;
    let outputs: Vec<(&str, &Path)> = [("--json", &a.json), ("--plot", &a.plot)]
        .into_iter()
        .filter_map(|(flag, p)| p.as_deref().map(|p| (flag, p)))
        .collect();
    check_outputs(&outputs)?;
    // The largest batch bounds the sweep: batches run one after another.
    let what = format!("this benchmark (batches up to {largest})");
    let resolved = resolve_within_memory(&what, &cfg, &a.model, |need, target| {
        memory::add_batch(need, &cfg, &shapes, target, 0)
    })?;
    let model = runtime::build_on(resolved, cfg, &weight_source(&a.model))?;
    with_model!(&model, m => bench_batch_on(m, &a, &work, batches))
}

fn bench_batch_on<B: Resident>(
    model: &Model<B>,
    a: &BenchArgs,
    work: &sparse_lavida::request::Workload,
    batches: Vec<usize>,
) -> Result<()> {
    let cfg = model.config();
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
    let first = work.task(cfg)?;
    let workload = format!("{} per request ({model_name})", describe(&first));
    say!("backend   {}", model.backend().name());
    if model.backend().name().contains("emulated") {
        say!(
            "note      the emulated device is a CPU model for correctness: its timings say \
             nothing about a GPU's"
        );
    }
    say!("machine   {}", runtime::cpu_description());
    if let Some([l1, l5, l15]) = bench::batch::load_average() {
        say!("load      {l1:.2} {l5:.2} {l15:.2} (1, 5, 15 min) before the runs");
    }
    say!("workload  {workload}");
    let items = match first {
        Task::T2i(_) => "images",
        Task::Text(_) => "tokens",
    };
    say!("{}", bench::batch::batch_table_header(items));
    let spec = bench::BatchSpec {
        workload,
        preset,
        batches,
        ablation: a.ablation,
        repeat: a.repeat as usize,
        execution: a.exec.execution(),
    };
    let requests = |b: usize| -> Result<Vec<Task>> {
        (work.batch(b, None)?.iter()).map(|w| w.task(cfg)).collect()
    };
    let progress = RefCell::new(LazyProgress::steps());
    let mut seen: Vec<bench::BatchRun> = Vec::new();
    let report = bench::run_batch_bench(
        model,
        &requests,
        &spec,
        |r| {
            let one = seen.iter().find(|o| o.batch == 1 && o.mode == r.mode);
            let row = bench::batch::batch_table_row(r, one);
            progress.borrow().suspend(|| say!("{row}"));
            seen.push(r.clone());
        },
        |b, mode, done, total| {
            progress
                .borrow_mut()
                .update(&format!("batch {b} {mode}"), done as u64, total as u64)
        },
    )?;
    progress.into_inner().finish();
    for best in &report.best {
        match (best.throughput_vs_batch1, best.latency_vs_batch1) {
            (Some(t), Some(l)) => say!(
                "best      {}: batch {} at {:.2} {items}/s = {t:.2}x batch 1, latency {l:.2}x",
                best.mode,
                best.batch,
                best.items_per_s
            ),
            _ => say!(
                "best      {}: batch {} at {:.2} {items}/s",
                best.mode,
                best.batch,
                best.items_per_s
            ),
        }
    }
    if let Some([l1, l5, l15]) = report.load_after {
        say!("load      {l1:.2} {l5:.2} {l15:.2} (1, 5, 15 min) after the runs");
    }
    if report
        .runs
        .iter()
        .any(|r| r.first_matches_batch1 == Some(false))
    {
        eprintln!(
            "warning: request 0 chose other tokens in a batch than alone (float rounding near a \
             tie; on the CPU this is a bug)"
        );
    }
    if let Some(path) = &a.json {
        write_json(path, &report)?;
    }
    if let Some(path) = &a.plot {
        bench::plot_batch_svg(&report, path)?;
    }
    Ok(())
}

fn cmd_init(a: InitArgs) -> Result<()> {
    let cfg = load_config(&a.preset, a.config.as_deref())?;
    check_outputs(&[("--out", &a.out)])?;
    let dtype = match a.dtype {
        DtypeArg::F32 => SaveDtype::F32,
        DtypeArg::Bf16 => SaveDtype::Bf16,
    };
    let mut need = Need::default();
    weights::add_weight_writer(&mut need, &cfg, dtype)?;
    need.check_host(&format!("writing random weights in {dtype}"))?;
    let kind = if a.like_device {
        RandomKind::LikeDevice
    } else {
        RandomKind::Host
    };
    let mut progress = LazyProgress::bytes();
    weights::write_random(&cfg, a.seed, kind, dtype, &a.out, &mut |done, total| {
        progress.update("init-weights", done, total)
    })?;
    progress.finish();
    let bytes = std::fs::metadata(&a.out).map_or(0, |m| m.len());
    say!(
        "wrote {} parameters ({}, {dtype}) to {}",
        human_count(cfg.param_count()),
        human_bytes(bytes),
        a.out.display()
    );
    Ok(())
}

fn cmd_render(a: RenderArgs) -> Result<()> {
    check_outputs(&[("--image", &a.image)])?;
    let picture = GridPicture::from_trace_file(&a.trace)?;
    picture.write_png(&a.image)?;
    say!(
        "wrote the picture of a {}x{} grid, {} steps, to {}",
        picture.height,
        picture.width,
        picture.steps,
        a.image.display()
    );
    Ok(())
}

fn cmd_info() -> Result<()> {
    #[cfg(feature = "cuda")]
    use sparse_lavida::cuda::images::{KERNEL_IMAGES, KERNELS_MISSING};
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
    say!("cpu       f32 backend, {} threads", be.threads());
    #[cfg(not(feature = "cuda"))]
    say!(
        "cuda      bf16 backend not in this build: {}",
        runtime::NO_CUDA_FEATURE
    );
    #[cfg(feature = "cuda")]
    match KERNELS_MISSING {
        Some(why) => say!("cuda      bf16 backend not in this build: {why}"),
        None => {
            let targets = |ptx: bool| {
                let set: std::collections::BTreeSet<&str> = (KERNEL_IMAGES.iter())
                    .map(|i| i.target)
                    .filter(|t| t.starts_with("compute_") == ptx)
                    .collect();
                set.into_iter().collect::<Vec<_>>().join(", ")
            };
            say!(
                "cuda      bf16 backend built: cubins for {}, PTX for {}",
                targets(false),
                targets(true)
            );
            match sparse_lavida::backend::cuda::CudaBackend::new() {
                Ok(cuda) => {
                    let info = cuda.device().info();
                    say!(
                        "device    {}, {} SMs, {}",
                        cuda.name(),
                        info.sm_count,
                        human_bytes(info.total_mem as u64)
                    );
                    if info.emulated {
                        say!(
                            "          emulated: a CPU model of the device (kernels/emu) for \
                             correctness tests; its speed means nothing"
                        );
                    }
                }
                Err(e) => say!("device    none usable here: {}", runtime::reason(&e)),
            }
        }
    }
    match memory::host_limit() {
        Some(limit) => say!("memory    {limit}"),
        None => say!("memory    limit unknown (no /proc): nothing is refused up front"),
    }
    Ok(())
}

/// Makes glibc's allocator keep freed memory for the next allocation instead of handing it back
/// to the kernel. Every step of a generation allocates and frees the same activation-sized
/// buffers; by default glibc maps the large ones afresh and unmaps them (or trims the heap)
/// afterwards, so each step page-faulted them in again, and unmapping a page another thread had
/// touched cost a TLB shootdown: about 2 % of a sparse `small` 64×64 run went to
/// `native_write_msr` alone. Allocations past 32 MiB (the weights, the K/V pool) are still mapped on their own.
/// A library user's process is not touched: this is the binary's choice.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes plain integers and only sets allocator parameters; it is called
    // first thing in `main`, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    // The main thread is worker 0 of rayon's global pool: the CPU backend's many small parallel
    // operations per step then run from inside the pool, instead of each one queueing its work
    // from outside and putting the main thread to sleep on a futex until a worker finishes it.
    // Only fails when the global pool already exists, and then that pool serves as it is.
    let _ = rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .build_global();
    memory::set_max_memory(cli.max_memory);
    let result = match cli.command {
        Command::Generate(a) => cmd_generate(a),
        Command::Forward(a) => cmd_forward(a),
        Command::Bench(a) => cmd_bench(a),
        Command::InitWeights(a) => cmd_init(a),
        Command::Render(a) => cmd_render(a),
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
