//! Issue 9, "hardening and first-hour polish", case by case: every request that used to crash,
//! hang or blow up memory is refused at once, within a memory limit, with a message naming the
//! problem; defaults are valid; flags that do not apply are refused; outputs are checked before
//! the work and written atomically; messages use units.

mod common;

use sparse_lavida::config::Config;
use sparse_lavida::weights::HostWeights;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_sparse-lavida");

/// Generous bound for a refusal on a loaded 2-core CI machine (the requirement is ~1 s).
const FAST: Duration = Duration::from_secs(10);

/// Runs the CLI with its address space limited to `limit` bytes (`ulimit -v`, as the issue's
/// reports did) and killed after `timeout`: a blow-up becomes a test failure, not a dead
/// machine. Returns the output and the wall time.
fn run_limited(args: &[&str], limit: u64, timeout: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {}; exec \"$0\" \"$@\"", limit / 1024))
        .arg(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sh");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    // Drain both pipes on threads so that a chatty child cannot block on a full pipe.
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} still running after {timeout:?} (a hang or a blow-up)");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = start.elapsed();
    let output = Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    };
    (output, elapsed)
}

fn cli(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts failure (no panic, no signal) with every needle in stderr.
fn assert_refused(o: &Output, what: &str, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{what}: {:?}: {err}", o.status);
    assert!(!err.contains("panicked"), "{what} panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "{what}: stderr lacks `{n}`: {err}");
    }
}

/// Runs `args` under a 2 GiB address-space limit and asserts a prompt refusal naming `needles`.
fn refused_fast(args: &[&str], needles: &[&str]) {
    let (o, t) = run_limited(args, 2 << 30, Duration::from_secs(60));
    assert_refused(&o, &format!("{args:?}"), needles);
    assert!(t < FAST, "{args:?} took {t:?} to be refused");
}

fn tiny_with(dir: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v = serde_json::to_value(Config::preset("tiny").unwrap()).unwrap();
    edit(&mut v);
    let path = dir.join(name);
    std::fs::write(&path, v.to_string()).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn oversized_configs_are_refused_at_once_within_a_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    // 10¹² layers: the parameter count used to build every tensor name first (58 s, 24 GB).
    let huge = tiny_with(dir.path(), "layers12.json", |v| {
        v["n_layers"] = 1_000_000_000_000u64.into()
    });
    refused_fast(
        &["generate", "--config", &huge],
        &["out of memory", "limit"],
    );
    // 10⁸ layers of width 2: the tensor list alone is the blow-up (it aborted under 8 GB).
    let deep = tiny_with(dir.path(), "layers8.json", |v| {
        for k in ["d_text", "d_image", "head_dim"] {
            v[k] = 2.into();
        }
        for k in [
            "n_heads",
            "n_kv_heads",
            "mlp_text",
            "mlp_image",
            "n_joint_layers",
        ] {
            v[k] = 1.into();
        }
        v["n_layers"] = 100_000_000.into();
    });
    refused_fast(
        &["generate", "--config", &deep],
        &[
            "out of memory",
            "tensor bookkeeping",
            "(1,800,000,008 tensors)",
        ],
    );
    let out = dir.path().join("w.safetensors");
    refused_fast(
        &[
            "init-weights",
            "--config",
            &deep,
            "--out",
            out.to_str().unwrap(),
        ],
        &["out of memory"],
    );
    assert!(!out.exists());
    // Sizes that overflow 64 bits: "capacity overflow" used to panic.
    let wide = tiny_with(dir.path(), "wide.json", |v| {
        v["d_text"] = (1u64 << 62).into();
        v["mlp_text"] = (1u64 << 62).into();
    });
    refused_fast(
        &["generate", "--config", &wide],
        &["invalid config", "overflows 64-bit arithmetic"],
    );
    // A number written as a float is a parse error naming the field's value.
    let float = dir.path().join("float.json");
    let text = std::fs::read_to_string(&huge)
        .unwrap()
        .replace("1000000000000", "1e12");
    std::fs::write(&float, text).unwrap();
    refused_fast(
        &["generate", "--config", float.to_str().unwrap()],
        &["invalid config", "floating point", "expected usize"],
    );
}

#[test]
fn a_text_vocabulary_of_only_mask_is_refused_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let one = tiny_with(dir.path(), "v1.json", |v| {
        v["text_vocab"] = 1.into();
        v["text_mask_id"] = 0.into();
    });
    refused_fast(
        &["generate", "--config", &one],
        &["random prompt needs a text id other than [MASK]"],
    );
    refused_fast(
        &[
            "generate",
            "--config",
            &one,
            "--task",
            "text",
            "--prompt-len",
            "0",
        ],
        &["every id of the text vocabulary (1) is banned"],
    );
    // An image needs no text id: it runs.
    let o = cli(&[
        "generate",
        "--config",
        &one,
        "--prompt-len",
        "0",
        "--grid",
        "2x2",
        "--steps",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn oversized_requests_are_refused_at_once_within_a_memory_limit() {
    for args in [
        vec!["generate", "--grid", "60000x60000"],
        vec!["generate", "--grid", "1000x1000"],
        vec!["generate", "--prompt-len", "1000000000"],
        vec!["generate", "--task", "text", "--answer-len", "1000000000"],
        vec!["bench", "--grid", "1000x1000"],
    ] {
        let (o, t) = run_limited(&args, 2 << 30, Duration::from_secs(60));
        let err = stderr(&o);
        assert_refused(&o, &format!("{args:?}"), &[]);
        assert!(
            err.contains("out of memory") || err.contains("sequence too long"),
            "{args:?}: {err}"
        );
        assert!(t < FAST, "{args:?} took {t:?}");
    }
    // The refusal states both numbers and where the limit comes from (on the CPU, where the K/V
    // pool is host memory).
    let (o, _) = run_limited(
        &["generate", "--grid", "1000x1000", "--device", "cpu"],
        2 << 30,
        FAST,
    );
    let err = stderr(&o);
    assert!(
        err.contains("needs") && err.contains("K/V pool") && err.contains("ulimit -v"),
        "{err}"
    );
}

#[test]
fn a_forward_case_of_a_million_rows_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let case = dir.path().join("big.json");
    let mut text = String::from(r#"{"rows":["#);
    for i in 0..1_000_000 {
        if i > 0 {
            text.push(',');
        }
        text.push_str(&format!(
            r#"{{"branch":"text","id":5,"pos":{i},"block":0,"masked":false}}"#
        ));
    }
    text.push_str(r#"],"logits_for":[0]}"#);
    std::fs::write(&case, text).unwrap();
    let out = dir.path().join("o.safetensors");
    let (o, t) = run_limited(
        &[
            "forward",
            "--preset",
            "tiny",
            "--case",
            case.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        2 << 30,
        Duration::from_secs(60),
    );
    assert_refused(
        &o,
        "forward 1e6 rows",
        &["out of memory", "1,000,000 slots"],
    );
    assert!(t < FAST, "took {t:?}");
    assert!(!out.exists());
}

#[test]
fn max_memory_sets_the_limit() {
    let base = [
        "generate", "--preset", "tiny", "--grid", "4x4", "--steps", "4",
    ];
    let mut args = base.to_vec();
    args.extend(["--max-memory", "1M"]);
    assert_refused(
        &cli(&args),
        "1M",
        &["out of memory", "--max-memory", "1.05 MB"],
    );
    let mut args = base.to_vec();
    args.extend(["--max-memory", "4G"]);
    let o = cli(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut args = base.to_vec();
    args.extend(["--max-memory", "lots"]);
    let o = cli(&args);
    assert!(!o.status.success() && stderr(&o).contains("`lots` is not a byte count"));
}

#[test]
fn init_weights_bounds_the_dtype_it_writes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w.safetensors");
    let o = cli(&[
        "init-weights",
        "--preset",
        "lavida-o",
        "--dtype",
        "bf16",
        "--max-memory",
        "1G",
        "--out",
        out.to_str().unwrap(),
    ]);
    // Streamed one batch at a time: lavida-o in bf16 needs its largest tensor (3 GB), not the
    // 43 GB of the whole model in f32.
    assert_refused(&o, "lavida-o bf16", &["bf16", "3.16 GB", "--max-memory"]);
    assert!(!stderr(&o).contains("43"), "{}", stderr(&o));
    assert!(!out.exists());
    // The streamed file equals the in-memory weights, in both dtypes and both generators.
    let cfg = Config::preset("tiny").unwrap();
    for (dtype, like_device) in [("f32", false), ("bf16", true)] {
        let mut args = vec![
            "init-weights",
            "--preset",
            "tiny",
            "--seed",
            "4",
            "--dtype",
            dtype,
            "--out",
            out.to_str().unwrap(),
        ];
        if like_device {
            args.push("--like-device");
        }
        let o = cli(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&o).contains("264,672 parameters"), "{}", stdout(&o));
        let want = if like_device {
            HostWeights::random_like_device(&cfg, 4).unwrap()
        } else {
            HostWeights::random(&cfg, 4)
        };
        assert_eq!(HostWeights::load(&out, &cfg).unwrap(), want);
        let saved = dir.path().join("saved.safetensors");
        let save_dtype = if dtype == "f32" {
            sparse_lavida::weights::SaveDtype::F32
        } else {
            sparse_lavida::weights::SaveDtype::Bf16
        };
        want.save(&saved, save_dtype).unwrap();
        assert_eq!(std::fs::read(&saved).unwrap(), std::fs::read(&out).unwrap());
    }
}

/// Mounts a tmpfs of `size` at a fresh directory; `None` (with a note) where this machine does
/// not allow it (not root, no mount namespace).
struct Tmpfs {
    path: PathBuf,
    /// Removed after the unmount (fields drop after `Drop::drop`).
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("note: cannot mount a tmpfs here (needs root): full-filesystem test skipped");
            return None;
        }
        Some(Tmpfs {
            path: dir.path().to_path_buf(),
            _dir: dir,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

/// On a full filesystem, replacing a valid file fails with the disk's error and leaves the old
/// file whole (it used to be truncated, or left at 0 bytes for `--out`).
#[test]
fn a_full_filesystem_keeps_the_old_files() {
    let Some(fs) = Tmpfs::mount("1m") else {
        return;
    };
    let cfg = Config::preset("tiny").unwrap();
    let w = fs.path.join("w.safetensors");
    let o = cli(&[
        "init-weights",
        "--preset",
        "tiny",
        "--out",
        w.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let before = std::fs::read(&w).unwrap();
    // `small` in bf16 is 16 MB: it cannot fit.
    let o = cli(&[
        "init-weights",
        "--preset",
        "small",
        "--out",
        w.to_str().unwrap(),
    ]);
    assert_refused(
        &o,
        "init-weights on a full disk",
        &["w.safetensors", "No space left"],
    );
    assert_eq!(std::fs::read(&w).unwrap(), before);
    HostWeights::load(&w, &cfg).unwrap();
    assert!(temp_files(&fs.path).is_empty());

    let out = fs.path.join("out.json");
    std::fs::write(&out, "[1, 2, 3]\n").unwrap();
    // Fill the disk to the last byte.
    let mut filler = std::fs::File::create(fs.path.join("filler")).unwrap();
    let chunk = vec![0u8; 4096];
    while std::io::Write::write_all(&mut filler, &chunk).is_ok() {}
    while std::io::Write::write_all(&mut filler, &chunk[..1]).is_ok() {}
    drop(filler);
    let o = cli(&[
        "generate", "--preset", "tiny", "--grid", "4x4", "--steps", "4", "--out",
    ]
    .into_iter()
    .chain([out.to_str().unwrap()])
    .collect::<Vec<_>>());
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(stderr(&o).contains("out.json"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "[1, 2, 3]\n");
    assert!(temp_files(&fs.path).is_empty());
}

#[test]
fn output_locations_are_checked_before_the_work() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("no_such_dir").join("r.json");
    let start = Instant::now();
    let o = cli(&[
        "bench",
        "--preset",
        "small",
        "--ablation",
        "--json",
        typo.to_str().unwrap(),
    ]);
    assert_refused(
        &o,
        "bench --json typo",
        &["--json", "no_such_dir", "does not exist"],
    );
    // Refused before any run: no table row printed, and in far less than the ablation's time.
    assert!(!stdout(&o).contains("dense"), "{}", stdout(&o));
    assert!(start.elapsed() < FAST);
    let same = dir.path().join("x.json");
    let o = cli(&[
        "generate",
        "--preset",
        "tiny",
        "--trace",
        same.to_str().unwrap(),
        "--out",
        same.to_str().unwrap(),
    ]);
    assert_refused(&o, "two flags, one file", &["--trace and --out both write"]);
    for (cmd, flag) in [
        (vec!["generate", "--preset", "tiny"], "--image"),
        (vec!["generate", "--preset", "tiny"], "--trace"),
        (vec!["bench", "--preset", "tiny"], "--plot"),
        (vec!["init-weights", "--preset", "tiny"], "--out"),
    ] {
        let mut args = cmd.clone();
        args.extend([flag, dir.path().to_str().unwrap()]);
        assert_refused(&cli(&args), flag, &[flag, "directory"]);
    }
}

#[test]
fn text_defaults_are_valid_for_any_answer_length() {
    for g in ["33", "40", "100", "130"] {
        let o = cli(&[
            "generate",
            "--preset",
            "tiny",
            "--task",
            "text",
            "--answer-len",
            g,
        ]);
        assert!(o.status.success(), "answer-len {g}: {}", stderr(&o));
        let want = format!("text answer {g} (blocks of 32), {} steps", {
            let g: usize = g.parse().unwrap();
            g.div_ceil(2)
        });
        assert!(stdout(&o).contains(&want), "{}", stdout(&o));
    }
    // Blocks shorter than two positions: one step per block.
    let o = cli(&[
        "generate",
        "--preset",
        "tiny",
        "--task",
        "text",
        "--answer-len",
        "9",
        "--block",
        "1",
    ]);
    assert!(
        o.status.success() && stdout(&o).contains("9 steps"),
        "{}",
        stderr(&o)
    );
    // t2i on a grid of fewer cells than the default 64 steps: one step per cell.
    let o = cli(&["generate", "--preset", "tiny", "--grid", "3x5"]);
    assert!(
        o.status.success() && stdout(&o).contains("15 steps"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn flags_that_do_not_apply_are_refused() {
    for (args, needle) in [
        (
            vec!["--task", "text", "--guidance", "2"],
            "--guidance applies to --task t2i",
        ),
        (
            vec!["--task", "text", "--order", "raster"],
            "--order applies to --task t2i",
        ),
        (
            vec!["--task", "text", "--grid", "4x4"],
            "--grid applies to --task t2i",
        ),
        (vec!["--block", "8"], "--block applies to --task text"),
        (
            vec!["--answer-len", "16"],
            "--answer-len applies to --task text",
        ),
    ] {
        for cmd in ["generate", "bench"] {
            let mut a = vec![cmd, "--preset", "tiny"];
            a.extend(&args);
            assert_refused(&cli(&a), needle, &[needle]);
        }
    }
    assert_refused(
        &cli(&[
            "generate", "--preset", "tiny", "--task", "text", "--image", "x.png",
        ]),
        "--image on text",
        &["--image", "t2i"],
    );
}

#[test]
fn a_prompt_holding_the_mask_id_is_refused() {
    assert_refused(
        &cli(&["generate", "--preset", "tiny", "--prompt", "1,299,3"]),
        "prompt with [MASK]",
        &["prompt token 1 is 299, the text [MASK] id"],
    );
}

/// Case-file decisions: identical rows and an empty `logits_for` are errors; a masked row with
/// a real id is valid (its id is embedded, `masked` only tags visibility) and noted.
#[test]
fn case_file_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("w.safetensors");
    HostWeights::random(&Config::preset("tiny").unwrap(), 5)
        .save(&w, sparse_lavida::weights::SaveDtype::F32)
        .unwrap();
    let forward = |name: &str, text: &str| {
        let case = dir.path().join(name);
        std::fs::write(&case, text).unwrap();
        let out = dir.path().join(format!("{name}.safetensors"));
        let o = cli(&[
            "forward",
            "--preset",
            "tiny",
            "--weights",
            w.to_str().unwrap(),
            "--case",
            case.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        (o, out)
    };
    let row = |b: &str, id: &str, pos: u32, block: u32, masked: bool| {
        format!(r#"{{"branch":"{b}","id":{id},"pos":{pos},"block":{block},"masked":{masked}}}"#)
    };
    let (o, _) = forward(
        "dup.json",
        &format!(
            r#"{{"rows":[{},{},{}],"logits_for":[0]}}"#,
            row("text", "5", 0, 0, false),
            row("text", "6", 1, 0, false),
            row("text", "5", 0, 0, false)
        ),
    );
    assert_refused(&o, "duplicate rows", &["case rows 0 and 2 are identical"]);
    // Same position, different content: allowed (positions are free inputs).
    let (o, _) = forward(
        "samepos.json",
        &format!(
            r#"{{"rows":[{},{}],"logits_for":[0]}}"#,
            row("text", "5", 0, 0, false),
            row("text", "6", 0, 0, false)
        ),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let (o, out) = forward(
        "empty.json",
        &format!(
            r#"{{"rows":[{}],"logits_for":[]}}"#,
            row("text", "5", 0, 0, false)
        ),
    );
    assert_refused(&o, "logits_for []", &["logits_for is empty"]);
    assert!(!out.exists());
    for (id, needle) in [
        ("-1", "id -1 is negative"),
        ("1.5", "id 1.5 is not an integer"),
        ("4294967296", "id 4294967296 does not fit 32 bits"),
        ("\"register\"", "neither a token id nor \\\"reg\\\""),
    ] {
        let (o, _) = forward(
            "badid.json",
            &format!(
                r#"{{"rows":[{}],"logits_for":[0]}}"#,
                row("text", id, 0, 0, false)
            ),
        );
        let needle = needle.replace("\\\"", "\"");
        assert_refused(&o, id, &[needle.as_str()]);
        assert!(!stderr(&o).contains("untagged"), "{}", stderr(&o));
    }
    // A masked row carrying a real id: a clean query cannot see it (§3), so the id makes no
    // difference to the clean row's logits; a query in its masked block sees it, so there it
    // does. Both run, with a note.
    let logits = |masked_id: &str, query: usize| {
        let name = format!("m{masked_id}{query}.json");
        let (o, out) = forward(
            &name,
            &format!(
                r#"{{"rows":[{},{},{}],"logits_for":[{query}]}}"#,
                row("text", "5", 0, 0, false),
                row("text", masked_id, 1, 1, true),
                row("text", "299", 2, 1, true)
            ),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("note: 1 masked row(s) carry a token id") || masked_id == "299",
            "{}",
            stderr(&o)
        );
        let bytes = std::fs::read(out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor("logits").unwrap().data().to_vec()
    };
    assert_eq!(logits("7", 0), logits("8", 0));
    assert_ne!(logits("7", 2), logits("8", 2));
}

#[test]
fn messages_use_units() {
    let dir = tempfile::tempdir().unwrap();
    let big = tiny_with(dir.path(), "big.json", |v| {
        v["n_layers"] = 10_000_000.into();
        v["d_text"] = 4096.into();
        v["mlp_text"] = 16384.into();
    });
    let o = cli(&["generate", "--config", &big]);
    let err = stderr(&o);
    assert_refused(&o, "big", &["parameters in f32", " TB", " PB"]);
    assert!(!err.contains(" B parameters"), "{err}");
    // Counts are exact integers in groups of three digits; bytes carry a decimal unit.
    let count = err
        .split(" parameters in f32")
        .next()
        .and_then(|head| head.rsplit('(').next())
        .unwrap();
    let groups: Vec<&str> = count.split(',').collect();
    assert!(
        groups.len() > 4
            && groups[1..].iter().all(|g| g.len() == 3)
            && groups.iter().all(|g| g.chars().all(|c| c.is_ascii_digit())),
        "{count}: {err}"
    );
}

#[test]
fn info_says_what_this_build_can_run() {
    let out = stdout(&cli(&["info"]));
    match sparse_lavida::cuda::images::KERNELS_MISSING {
        Some(why) => assert!(
            out.contains("not in this build") && out.contains(why),
            "{out}"
        ),
        None => assert!(out.contains("bf16 backend built: cubins for sm_"), "{out}"),
    }
    assert!(out.contains("memory") && out.contains("threads"), "{out}");
}

/// The CPU's host loop reports progress (the resident path used to take the callback and
/// decline, leaving the host loop without one).
#[test]
fn the_host_loop_reports_progress_whatever_the_execution_asked() {
    use sparse_lavida::sampler::{Execution, Mode, RunOptions, Switches, T2iRequest, Task};
    let model = common::tiny_model(3);
    let task = Task::T2i(T2iRequest {
        prompt: common::prompt(4, 1),
        height: 4,
        width: 4,
        steps: 5,
        guidance: 0.0,
        temperature: 1.0,
        order: sparse_lavida::schedule::Order::Stratified,
        seed: 1,
    });
    for exec in [Execution::Graphs, Execution::Queued, Execution::Eager] {
        let mut seen = Vec::new();
        let mut tick = |done, total| seen.push((done, total));
        let opts = RunOptions {
            progress: Some(&mut tick),
            ..RunOptions::default()
        };
        sparse_lavida::exec::generate_with(
            &model,
            &task,
            Mode::Sparse(Switches::ALL_ON),
            exec,
            opts,
        )
        .unwrap();
        assert_eq!(seen, (1..=5).map(|k| (k, 5)).collect::<Vec<_>>(), "{exec}");
    }
}

/// Progress appears on a terminal and not when piped. The terminal is a pseudo-terminal from
/// `script` (util-linux), where available.
#[test]
fn progress_shows_on_a_terminal_and_stays_quiet_when_piped() {
    // A dense run of about two seconds here (12 steps of 0.2 s): the bar appears at the first
    // step that ends after one second.
    let args = [
        "generate", "--preset", "small", "--grid", "32x32", "--steps", "12", "--mode", "dense",
        "--device", "cpu",
    ];
    let o = cli(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(!err.contains("steps") && !err.contains('\r'), "{err}");
    // The run's own wall time, from its report's `time` line.
    let wall = |report: &str| -> f64 {
        (report.lines())
            .find_map(|l| l.strip_prefix("time"))
            .and_then(|t| t.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no `time` line in {report}"))
    };
    // Too quick to be due a bar (a step must end after one second): nothing to check. Each run
    // is judged by its own time: the machine's speed varies between the two.
    let too_quick = |wall: f64| {
        let quick = wall < 1.5;
        if quick {
            eprintln!("note: a run took {wall} s here, too quick for a progress bar: not checked");
        }
        quick
    };
    if too_quick(wall(&stdout(&o))) {
        return;
    }
    let command = std::iter::once(BIN)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ");
    let tty = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output();
    match tty {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            if too_quick(wall(&text)) {
                return;
            }
            assert!(
                text.contains("/12 steps"),
                "no progress on a terminal: {text}"
            );
        }
        _ => eprintln!("note: `script` is not available: terminal progress not checked"),
    }
}
