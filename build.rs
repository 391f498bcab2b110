//! Build script: compiles the CUDA kernels (`kernels/*.cu`) with nvcc and embeds them.
//!
//! For every kernel file and every architecture in `CUDA_ARCHS` (default `80;90`) it builds a
//! cubin (`sm_XX`; `sm_90a` instead of `sm_90` for a file whose first 20 lines contain the
//! marker `// sl:needs-sm90a`), plus PTX for the newest listed plain architecture
//! (`compute_XX`) so that newer GPUs can JIT the kernels (not for an sm_90a file: its code is
//! not portable). Flags: `-std=c++17 -O3 -lineinfo -Xptxas -v -I kernels`; compiles run in
//! parallel (cargo's `NUM_JOBS` threads). The images are embedded through `$OUT_DIR/kernels.rs`
//! (module `cuda::images`), and `cfg(sl_kernels)` is set when there are any.
//!
//! ptxas's resource report (registers, spills, shared memory) of every compile is written to
//! `$OUT_DIR/ptxas-report.txt` (path exported as `SL_PTXAS_REPORT`) and summarised, one
//! function per line, in `$OUT_DIR/ptxas-summary.tsv` (read by `scripts/check-kernels`); any
//! spill, and any nvcc warning, is a `cargo:warning`.
//!
//! nvcc is looked up in this order: `$NVCC`, `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`,
//! `nvcc` on `PATH`, then the project's local install made by `scripts/install-nvcc`
//! (`.tools/cuda/lib/python3*/site-packages/nvidia/cu13/bin/nvcc`). Without nvcc (or with
//! `SL_NO_CUDA=1`, or with the `cuda` cargo feature off, for a CPU-only build) the crate still
//! builds, with no kernels embedded and `KERNELS_MISSING` saying why. A kernel that fails to
//! compile fails the build.
//!
//! Reruns when a file in `kernels/` or one of `NVCC`, `CUDA_HOME`, `CUDA_PATH`, `CUDA_ARCHS`,
//! `SL_NO_CUDA` changes (not `PATH`: it changes too often to recompile the kernels for it).
//!
//! With the cargo feature `emulator`, it also builds the emulated device (`build/emulator.rs`):
//! the same kernel files compiled as host C++ against `kernels/emu/`, linked into an emulated
//! `libcuda.so.1` and `libcublasLt.so.13` under `target/<profile>/emu/`. That part uses the `cc`
//! crate; the nvcc part uses std only.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

#[path = "build/emulator.rs"]
mod emulator;

/// Architectures built when `CUDA_ARCHS` is unset: Ampere (A100) and Hopper (H100/H200).
const DEFAULT_ARCHS: &str = "80;90";
/// A kernel file that uses sm_90a-only features (wgmma, setmaxnreg) says so in its first lines.
const SM90A_MARKER: &str = "// sl:needs-sm90a";
const SM90A_MARKER_LINES: usize = 20;
/// Flags of every nvcc compile (plus `-I kernels`).
const NVCC_FLAGS: &[&str] = &["-std=c++17", "-O3", "-lineinfo"];

const MISSING_NVCC_WARNING: &str =
    "nvcc not found: CUDA kernels not built; run scripts/install-nvcc or set NVCC";
const MISSING_NVCC_REASON: &str = "built without CUDA kernels: nvcc was not found at build \
    time; run scripts/install-nvcc (pinned CUDA 13.0 wheels) or set NVCC, then rebuild";
const NO_SOURCES_REASON: &str = "built without CUDA kernels: kernels/ has no .cu file";
const NO_CUDA_REASON: &str = "built without CUDA kernels: SL_NO_CUDA was set at build time; \
    unset it (with nvcc installed: scripts/install-nvcc or NVCC) and rebuild";
const NO_FEATURE_REASON: &str = "built without CUDA kernels: the `cuda` cargo feature is off \
    (--no-default-features); rebuild with it (the default)";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(sl_kernels)");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "CUDA_ARCHS", "SL_NO_CUDA"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    let kernel_dir = manifest_dir.join("kernels");

    // Nothing of an earlier run (another file, arch, or a build with nvcc) may linger.
    let _ = fs::remove_dir_all(out_dir.join("kernels"));
    let _ = fs::remove_file(out_dir.join("ptxas-report.txt"));
    let _ = fs::remove_file(out_dir.join("ptxas-summary.tsv"));

    let sources = kernel_sources(&kernel_dir);
    // The directory itself catches added or removed files; each file catches edits.
    println!("cargo::rerun-if-changed={}", kernel_dir.display());
    for file in &sources.all {
        println!("cargo::rerun-if-changed={}", file.display());
    }

    let search = find_nvcc(&manifest_dir);
    if env::var_os("CARGO_FEATURE_EMULATOR").is_some() {
        let nvcc = match &search {
            NvccSearch::Found(nvcc) => Some(nvcc.as_path()),
            _ => None,
        };
        emulator::build(&manifest_dir, &out_dir, &sources.cu, nvcc);
    }
    // Cargo sets CARGO_FEATURE_CUDA when the `cuda` feature is on (and reruns this script when
    // the features change).
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return write_kernels_rs(&out_dir, &[], Some(NO_FEATURE_REASON));
    }
    let nvcc = match search {
        NvccSearch::Found(nvcc) => nvcc,
        NvccSearch::Disabled => return write_kernels_rs(&out_dir, &[], Some(NO_CUDA_REASON)),
        NvccSearch::NotFound => {
            println!("cargo::warning={MISSING_NVCC_WARNING}");
            return write_kernels_rs(&out_dir, &[], Some(MISSING_NVCC_REASON));
        }
    };
    if sources.cu.is_empty() {
        return write_kernels_rs(&out_dir, &[], Some(NO_SOURCES_REASON));
    }
    let archs = parse_archs(&env::var("CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.into()));
    let jobs = plan_jobs(&sources.cu, &archs, &out_dir.join("kernels"));
    let results = run_jobs(&nvcc, &kernel_dir, &jobs);
    write_ptxas_report(&nvcc, &out_dir, &jobs, &results);
    write_kernels_rs(&out_dir, &jobs, None);
    println!("cargo::rustc-cfg=sl_kernels");
}

/// The files of `kernels/`: the `.cu` files to compile and every file a compile may read.
struct KernelSources {
    /// `kernels/*.cu`, sorted.
    cu: Vec<PathBuf>,
    /// Every `.cu`, `.cuh` and `.h` file, sorted.
    all: Vec<PathBuf>,
}

/// Lists `kernel_dir` (an absent directory has no kernels).
fn kernel_sources(kernel_dir: &Path) -> KernelSources {
    let mut all: Vec<PathBuf> = match fs::read_dir(kernel_dir) {
        Ok(entries) => entries
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| {
                path.is_file()
                    && matches!(
                        path.extension().and_then(|ext| ext.to_str()),
                        Some("cu" | "cuh" | "h")
                    )
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    all.sort();
    let cu = all
        .iter()
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .cloned()
        .collect();
    KernelSources { cu, all }
}

/// Outcome of the nvcc search.
enum NvccSearch {
    Found(PathBuf),
    NotFound,
    /// `SL_NO_CUDA` is set: a CPU-only build was asked for.
    Disabled,
}

/// Finds nvcc: `$NVCC`, `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, `nvcc` on `PATH`, then
/// the local install of `scripts/install-nvcc`. An explicit `$NVCC` that is not a file counts
/// as not found (with a warning naming it) rather than silently using another nvcc.
fn find_nvcc(manifest_dir: &Path) -> NvccSearch {
    if env::var_os("SL_NO_CUDA").is_some_and(|v| !v.is_empty() && v != "0") {
        return NvccSearch::Disabled;
    }
    if let Some(nvcc) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let nvcc = PathBuf::from(nvcc);
        if nvcc.is_file() {
            return NvccSearch::Found(nvcc);
        }
        println!("cargo::warning=NVCC={} is not a file", nvcc.display());
        return NvccSearch::NotFound;
    }
    let toolkits = ["CUDA_HOME", "CUDA_PATH"]
        .into_iter()
        .filter_map(env::var_os)
        .map(|root| PathBuf::from(root).join("bin").join("nvcc"));
    let on_path = env::var_os("PATH")
        .map(|path| env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("nvcc"));
    toolkits
        .chain(on_path)
        .chain(local_nvcc(manifest_dir))
        .find(|nvcc| nvcc.is_file())
        .map_or(NvccSearch::NotFound, NvccSearch::Found)
}

/// `.tools/cuda/lib/python3*/site-packages/nvidia/cu13/bin/nvcc` (the python version globbed).
fn local_nvcc(manifest_dir: &Path) -> Vec<PathBuf> {
    let lib = manifest_dir.join(".tools/cuda/lib");
    let Ok(entries) = fs::read_dir(&lib) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("python3"))
        .map(|entry| entry.path().join("site-packages/nvidia/cu13/bin/nvcc"))
        .collect();
    found.sort();
    found
}

/// One CUDA architecture from `CUDA_ARCHS`: `80`, `90`, `90a`, `100`, ...
#[derive(Debug, Clone, PartialEq, Eq)]
struct Arch {
    number: u32,
    /// `"a"` for an architecture-specific variant (`90a`), else empty.
    suffix: String,
}

/// Parses `CUDA_ARCHS`: architectures separated by `;`, `,` or spaces. A malformed entry fails
/// the build with a message naming it.
fn parse_archs(value: &str) -> Vec<Arch> {
    let mut archs: Vec<Arch> = Vec::new();
    for item in value.split([';', ',', ' ']).filter(|item| !item.is_empty()) {
        let item = item.trim_start_matches("sm_");
        let digits = item.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let (Ok(number), suffix) = (digits.parse::<u32>(), &item[digits.len()..]) else {
            fail(&format!(
                "CUDA_ARCHS={value:?}: {item:?} is not an architecture like 80, 90 or 90a"
            ));
        };
        let arch = Arch {
            number,
            suffix: suffix.to_string(),
        };
        if !archs.contains(&arch) {
            archs.push(arch);
        }
    }
    if archs.is_empty() {
        fail(&format!(
            "CUDA_ARCHS={value:?} lists no architecture (e.g. \"80;90\")"
        ));
    }
    archs
}

/// One nvcc invocation: one kernel file for one target.
struct Job {
    /// The source, e.g. `kernels/attention.cu`.
    source: PathBuf,
    /// `sm_80`, `sm_90a` (cubin) or `compute_90` (PTX).
    target: String,
    /// Where the image goes, `$OUT_DIR/kernels/<stem>.<target>.{cubin,ptx}`.
    output: PathBuf,
}

impl Job {
    fn is_ptx(&self) -> bool {
        self.target.starts_with("compute_")
    }

    fn file_name(&self) -> String {
        self.source
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }
}

/// Every (file, target) to compile, in file order then target order: a cubin per
/// architecture, then PTX for the newest plain architecture. A file marked `needs-sm90a` is
/// built for `sm_90a` instead of `sm_90` and gets no PTX (arch-specific code cannot run on
/// another architecture, so its PTX would not be forward compatible).
fn plan_jobs(sources: &[PathBuf], archs: &[Arch], image_dir: &Path) -> Vec<Job> {
    let newest_plain = archs
        .iter()
        .filter(|arch| arch.suffix.is_empty())
        .map(|arch| arch.number)
        .max();
    let mut jobs = Vec::new();
    for source in sources {
        let needs_sm90a = needs_sm90a(source);
        let stem = source.file_stem().unwrap().to_string_lossy().into_owned();
        let mut targets: Vec<String> = Vec::new();
        for arch in archs {
            let suffix = if needs_sm90a && arch.number == 90 && arch.suffix.is_empty() {
                "a"
            } else {
                &arch.suffix
            };
            let target = format!("sm_{}{suffix}", arch.number);
            if !targets.contains(&target) {
                targets.push(target);
            }
        }
        if let (Some(number), false) = (newest_plain, needs_sm90a) {
            targets.push(format!("compute_{number}"));
        }
        for target in targets {
            let ext = if target.starts_with("compute_") {
                "ptx"
            } else {
                "cubin"
            };
            let output = image_dir.join(format!("{stem}.{target}.{ext}"));
            jobs.push(Job {
                source: source.clone(),
                target,
                output,
            });
        }
    }
    jobs
}

/// Whether `source` carries the `// sl:needs-sm90a` marker in its first 20 lines.
fn needs_sm90a(source: &Path) -> bool {
    let text = fs::read_to_string(source)
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", source.display())));
    text.lines()
        .take(SM90A_MARKER_LINES)
        .any(|line| line.trim() == SM90A_MARKER)
}

/// Runs every job on a pool of threads (cargo's `NUM_JOBS`, at least 1) and returns each
/// job's nvcc stderr (the ptxas report), in job order. A failed compile fails the build with
/// nvcc's output; nvcc warnings become cargo warnings.
fn run_jobs(nvcc: &Path, kernel_dir: &Path, jobs: &[Job]) -> Vec<String> {
    if let Some(dir) = jobs.first().and_then(|job| job.output.parent())
        && let Err(e) = fs::create_dir_all(dir)
    {
        fail(&format!("cannot create {}: {e}", dir.display()));
    }
    let threads = env::var("NUM_JOBS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, jobs.len().max(1));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<String, String>>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let result = compile(nvcc, kernel_dir, job);
                    results.lock().unwrap()[i] = Some(result);
                }
            });
        }
    });
    let results = results.into_inner().unwrap();
    let mut reports = Vec::new();
    // nvcc's errors for each failed file, shown once (its other targets fail the same way).
    let mut failures: Vec<(String, String, Vec<String>)> = Vec::new();
    for (job, result) in jobs.iter().zip(results) {
        match result.expect("every job ran") {
            Ok(report) => {
                for line in report.lines().filter(|line| line.contains("warning")) {
                    println!("cargo::warning={} {}: {line}", job.file_name(), job.target);
                }
                reports.push(report);
            }
            Err(message) => match failures.iter_mut().find(|f| f.0 == job.file_name()) {
                Some(failure) => failure.2.push(job.target.clone()),
                None => failures.push((job.file_name(), message, vec![job.target.clone()])),
            },
        }
    }
    if !failures.is_empty() {
        let mut text = String::new();
        for (file, message, targets) in &failures {
            let _ = writeln!(
                text,
                "{message}\n(kernels/{file} failed for: {})\n",
                targets.join(", ")
            );
        }
        fail(&format!("CUDA kernel compile failed:\n\n{text}"));
    }
    reports
}

/// Compiles one job. Ok: nvcc's stderr (ptxas -v output for a cubin). Err: a message with the
/// command and nvcc's output.
fn compile(nvcc: &Path, kernel_dir: &Path, job: &Job) -> Result<String, String> {
    let mut cmd = Command::new(nvcc);
    cmd.args(NVCC_FLAGS).arg("-I").arg(kernel_dir);
    if job.is_ptx() {
        cmd.arg("-ptx").arg(format!("-arch={}", job.target));
    } else {
        cmd.arg("-cubin")
            .arg(format!("-arch={}", job.target))
            .args(["-Xptxas", "-v"]);
    }
    cmd.arg(&job.source).arg("-o").arg(&job.output);
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        let stdout = String::from_utf8_lossy(&output.stdout);
        return Err(format!(
            "nvcc failed ({}) on {} for {}: {cmd:?}\n{stdout}{stderr}",
            output.status,
            job.source.display(),
            job.target
        ));
    }
    if job.is_ptx() {
        // cuModuleLoadData reads PTX as a NUL-terminated string.
        let mut ptx =
            fs::read(&job.output).map_err(|e| format!("{}: {e}", job.output.display()))?;
        ptx.push(0);
        fs::write(&job.output, ptx).map_err(|e| format!("{}: {e}", job.output.display()))?;
    }
    Ok(stderr)
}

/// ptxas's figures for one function of one compile.
#[derive(Default)]
struct FunctionReport {
    name: String,
    /// An `extern "C" __global__` kernel (vs a non-inlined device function).
    entry: bool,
    registers: Option<u32>,
    stack_frame: u64,
    spill_stores: u64,
    spill_loads: u64,
    /// Static shared memory only (dynamic shared memory is set at launch).
    smem: u64,
}

/// Parses ptxas -v output:
/// ```text
/// ptxas info    : Compiling entry function 'sl_simple' for 'sm_80'
/// ptxas info    : Function properties for sl_simple
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 9 registers, used 1 barriers, 1024 bytes smem, 392 bytes cmem[0]
/// ```
/// ("Function properties" also appears, without the rest, for non-inlined device functions.)
fn parse_ptxas(report: &str) -> Vec<FunctionReport> {
    let mut functions: Vec<FunctionReport> = Vec::new();
    let mut entry: Option<String> = None;
    let mut properties_of: Option<String> = None;
    for line in report.lines() {
        let line = line.trim();
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            entry = Some(name.clone());
            function(&mut functions, &name).entry = true;
        } else if let Some(name) = line.split("Function properties for ").nth(1) {
            properties_of = Some(name.trim().to_string());
        } else if line.contains("bytes spill stores") {
            if let Some(name) = properties_of.take() {
                let f = function(&mut functions, &name);
                f.stack_frame = number_before(line, "bytes stack frame");
                f.spill_stores = number_before(line, "bytes spill stores");
                f.spill_loads = number_before(line, "bytes spill loads");
            }
        } else if line.contains("Used ")
            && line.contains(" registers")
            && let Some(name) = entry.take()
        {
            let f = function(&mut functions, &name);
            f.registers = Some(number_before(line, "registers") as u32);
            f.smem = number_before(line, "bytes smem");
        }
    }
    functions
}

/// The entry of `name` in `functions`, added when absent.
fn function<'a>(functions: &'a mut Vec<FunctionReport>, name: &str) -> &'a mut FunctionReport {
    let i = match functions.iter().position(|f| f.name == name) {
        Some(i) => i,
        None => {
            functions.push(FunctionReport {
                name: name.to_string(),
                ..FunctionReport::default()
            });
            functions.len() - 1
        }
    };
    &mut functions[i]
}

/// The number right before `label` in a comma-separated ptxas line (0 when absent).
fn number_before(line: &str, label: &str) -> u64 {
    line.split(',')
        .find(|part| part.contains(label))
        .and_then(|part| part.split_whitespace().rev().find_map(|w| w.parse().ok()))
        .unwrap_or(0)
}

/// Writes `ptxas-report.txt` (raw, one section per compile) and `ptxas-summary.tsv` (one line
/// per function: file, target, function, kind, registers, stack, spill stores, spill loads,
/// static smem), exports the report's path as `SL_PTXAS_REPORT`, and warns on any spill.
fn write_ptxas_report(nvcc: &Path, out_dir: &Path, jobs: &[Job], reports: &[String]) {
    let version = Command::new(nvcc)
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    let mut text = format!("nvcc: {}\n{version}", nvcc.display());
    let mut tsv = String::from(
        "file\ttarget\tfunction\tkind\tregisters\tstack\tspill_stores\tspill_loads\tsmem\n",
    );
    let mut spilled = false;
    for (job, report) in jobs.iter().zip(reports).filter(|(job, _)| !job.is_ptx()) {
        let file = job.file_name();
        let _ = write!(text, "\n== {file} {} ==\n{report}", job.target);
        for f in parse_ptxas(report) {
            let _ = writeln!(
                tsv,
                "{file}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                job.target,
                f.name,
                if f.entry { "kernel" } else { "device" },
                f.registers.map_or("-".to_string(), |r| r.to_string()),
                f.stack_frame,
                f.spill_stores,
                f.spill_loads,
                f.smem
            );
            if f.spill_stores > 0 || f.spill_loads > 0 {
                spilled = true;
                println!(
                    "cargo::warning=register spill in {file} {} for {}: {} bytes spill stores, \
                     {} bytes spill loads",
                    f.name, job.target, f.spill_stores, f.spill_loads
                );
            }
        }
    }
    let report_path = out_dir.join("ptxas-report.txt");
    write_file(&report_path, text.as_bytes());
    write_file(&out_dir.join("ptxas-summary.tsv"), tsv.as_bytes());
    println!("cargo::rustc-env=SL_PTXAS_REPORT={}", report_path.display());
    if spilled {
        println!("cargo::warning=ptxas report: {}", report_path.display());
    }
}

/// Writes `$OUT_DIR/kernels.rs`: `KernelImage`, `KERNEL_IMAGES` and `KERNELS_MISSING`.
fn write_kernels_rs(out_dir: &Path, images: &[Job], missing: Option<&str>) {
    let mut rs = String::from(
        r#"// Generated by build.rs: the CUDA kernel images embedded in this build.

/// One compiled kernel file for one target.
#[derive(Debug, Clone, Copy)]
pub struct KernelImage {
    /// The kernel source file, e.g. `"attention.cu"`.
    pub file: &'static str,
    /// `"sm_80"`, `"sm_90"`, `"sm_90a"` (a cubin) or `"compute_90"` (PTX text).
    pub target: &'static str,
    /// The cubin, or the PTX text with a terminating NUL (as `cuModuleLoadData` wants).
    pub bytes: &'static [u8],
}
"#,
    );
    if !images.is_empty() {
        rs.push_str(
            r#"
/// Gives an embedded image the alignment of a loaded ELF file (the driver reads it in place).
#[repr(C, align(64))]
struct Aligned<T: ?Sized>(T);

/// `include_bytes!`, aligned by [`Aligned`].
macro_rules! aligned {
    ($path:expr) => {{
        const ALIGNED: &Aligned<[u8]> = &Aligned(*include_bytes!($path));
        &ALIGNED.0
    }};
}
"#,
        );
    }
    rs.push_str(
        "\n/// Every embedded image: for each kernel file (sorted), its cubins in `CUDA_ARCHS` \
         order,\n/// then its PTX. Empty when the crate was built without nvcc.\n\
         pub const KERNEL_IMAGES: &[KernelImage] = &[\n",
    );
    for job in images {
        let name = job.output.file_name().unwrap().to_string_lossy();
        let _ = writeln!(
            rs,
            "    KernelImage {{\n        file: {:?},\n        target: {:?},\n        \
             bytes: aligned!(concat!(env!(\"OUT_DIR\"), \"/kernels/{name}\")),\n    }},",
            job.file_name(),
            job.target,
        );
    }
    let _ = write!(
        rs,
        "];\n\n/// Why no kernels are embedded (`None` when they are).\n\
         pub const KERNELS_MISSING: Option<&str> = {missing:?};\n"
    );
    write_file(&out_dir.join("kernels.rs"), rs.as_bytes());
}

/// Writes a file or fails the build naming it.
fn write_file(path: &Path, bytes: &[u8]) {
    if let Err(e) = fs::write(path, bytes) {
        fail(&format!("cannot write {}: {e}", path.display()));
    }
}

/// Fails the build with `message` (shown by cargo) and no Rust backtrace.
fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}
