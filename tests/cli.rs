//! The CLI end to end: successful runs write what they promise, and every kind of bad input
//! exits non-zero with a message naming the problem, never a panic.

use sparse_lavida::backend::cuda::CudaBackend;
use sparse_lavida::config::Config;
use sparse_lavida::runtime::reason;
use sparse_lavida::weights::{HostWeights, SaveDtype};
use std::path::Path;
use std::process::{Command, Output};

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sparse-lavida"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs and asserts failure with every `needles` in stderr and no panic.
fn fails_with(args: &[&str], needles: &[&str]) {
    let o = cli(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "{args:?} succeeded: {}", stdout(&o));
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr lacks `{n}`: {err}");
    }
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn generate_writes_trace_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (trace, out) = (dir.path().join("trace.json"), dir.path().join("out.json"));
    let o = cli(&[
        "generate",
        "--preset",
        "tiny",
        "--grid",
        "4x6",
        "--steps",
        "5",
        "--prompt",
        "1,2,3",
        "--trace",
        trace.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("forwards  6"), "{}", stdout(&o));
    // The CPU runs the host loop whatever the CUDA execution flags ask for, and says so.
    assert!(stdout(&o).contains("execution eager"), "{}", stdout(&o));
    let tokens: Vec<u32> = serde_json::from_value(read_json(&out)).unwrap();
    assert_eq!(tokens.len(), 24);
    assert!(tokens.iter().all(|&t| t < 64));
    let t = read_json(&trace);
    assert_eq!(t["execution"], "eager");
    assert_eq!(t["setup_s"], 0.0);
    let steps = t["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 5);
    let mut seen: Vec<u64> = steps
        .iter()
        .flat_map(|s| {
            s["decoded_positions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (0..24).collect::<Vec<u64>>());
    for s in steps {
        assert_eq!(
            s["decoded_positions"].as_array().unwrap().len(),
            s["tokens"].as_array().unwrap().len()
        );
        assert!(s["rows_fed"].as_u64().unwrap() > 0 && s["time_s"].as_f64().unwrap() >= 0.0);
    }
    // Same seed, same tokens; the text task runs too.
    let out2 = dir.path().join("out2.json");
    let o = cli(&[
        "generate",
        "--preset",
        "tiny",
        "--grid",
        "4x6",
        "--steps",
        "5",
        "--prompt",
        "1,2,3",
        "--no-cache-decoded",
        "--no-truncate",
        "--no-capture",
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read_json(&out2), read_json(&out));
    fails_with(
        &[
            "generate",
            "--preset",
            "tiny",
            "--no-graphs",
            "--no-capture",
        ],
        &["--no-graphs", "--no-capture", "cannot be used with"],
    );
    let o = cli(&[
        "generate",
        "--preset",
        "tiny",
        "--task",
        "text",
        "--answer-len",
        "12",
        "--block",
        "4",
        "--steps",
        "6",
        "--mode",
        "dense",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn forward_bench_and_init_weights() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("w.safetensors");
    let o = cli(&[
        "init-weights",
        "--preset",
        "tiny",
        "--seed",
        "3",
        "--dtype",
        "f32",
        "--out",
        w.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = Config::preset("tiny").unwrap();
    assert_eq!(
        HostWeights::load(&w, &cfg).unwrap(),
        HostWeights::random(&cfg, 3)
    );
    // --like-device: the CUDA backend's device-generated weights (bf16 values, stored exactly).
    let wd = dir.path().join("wd.safetensors");
    let o = cli(&[
        "init-weights",
        "--preset",
        "tiny",
        "--seed",
        "3",
        "--like-device",
        "--out",
        wd.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        HostWeights::load(&wd, &cfg).unwrap(),
        HostWeights::random_like_device(&cfg, 3).unwrap()
    );

    let case = dir.path().join("case.json");
    std::fs::write(
        &case,
        r#"{"rows":[{"branch":"text","id":5,"pos":0,"block":0,"masked":false},
                    {"branch":"image","id":64,"pos":1,"block":1,"masked":true},
                    {"branch":"image","id":"reg","pos":2,"block":1,"masked":true}],
            "logits_for":[1]}"#,
    )
    .unwrap();
    let out = dir.path().join("logits.safetensors");
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
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("logits").unwrap().shape(), &[1, 64]);

    let json = dir.path().join("bench.json");
    let o = cli(&[
        "bench",
        "--preset",
        "tiny",
        "--grid",
        "4x4",
        "--steps",
        "4",
        "--ablation",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = read_json(&json);
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 9);
    assert_eq!(runs[0]["mode"], "dense");
    for run in runs {
        for key in [
            "mode",
            "cache_prompt",
            "cache_decoded",
            "truncate",
            "wall_s",
            "forwards",
            "mean_rows",
        ] {
            assert!(!run[key].is_null(), "missing {key}");
        }
    }
    assert!(r["speedup_sparse_vs_dense"].as_f64().unwrap() > 0.0);
    assert!(stdout(&cli(&["info"])).contains("threads"));
}

/// `bench --json --plot` on the CPU backend: per-step latencies for every run (wall clock), no
/// device fields, the floor rule stated, and an SVG that parses with one polyline per plotted
/// run; `--peer-json` embeds the peer's report as is, and a bad one is named.
#[test]
fn bench_writes_step_latencies_and_a_plot() {
    let dir = tempfile::tempdir().unwrap();
    let (json, svg, peer) = (
        dir.path().join("x.json"),
        dir.path().join("x.svg"),
        dir.path().join("peer.json"),
    );
    let peer_text = r#"{"device": "cpu", "runs": [{"mode": "dense", "step_median_s": 0.5}]}"#;
    std::fs::write(&peer, peer_text).unwrap();
    let o = cli(&[
        "bench",
        "--preset",
        "tiny",
        "--grid",
        "8x8",
        "--steps",
        "8",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
        "--peer-json",
        peer.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("step_ms") && out.contains("p90_ms"), "{out}");
    let r = read_json(&json);
    assert_eq!(r["device"], "cpu");
    assert!(r["driver"].is_null());
    assert!(r["bf16_peak_flops_per_s"].is_null() && r["dense_gemm_fraction_of_peak"].is_null());
    assert!(r["gemm_rule"].as_str().unwrap().contains("8192"));
    for run in r["runs"].as_array().unwrap() {
        assert_eq!(run["execution"], "eager", "{run}");
        assert_eq!(run["setup_s"], 0.0, "{run}");
    }
    assert_eq!(r["preset"], "tiny");
    assert_eq!(r["step_clock"], "wall");
    assert!(r["machine"].as_str().unwrap().contains("threads"));
    assert!(r["floor_step_s"].is_null() && r["copy_bandwidth_bytes_per_s"].is_null());
    assert!(
        r["floor_rule"]
            .as_str()
            .unwrap()
            .contains("response branch")
    );
    let tiny = Config::preset("tiny").unwrap();
    let image_layer = 2 * 32 + 2 * 64 * 32 + 2 * 64 * 32 + 3 * 64 * 32;
    assert_eq!(
        r["active_weight_params"].as_u64().unwrap(),
        (tiny.n_layers * image_layer + 32 + 64 * 32) as u64
    );
    assert_eq!(
        r["peer"],
        serde_json::from_str::<serde_json::Value>(peer_text).unwrap()
    );
    assert!(r["speedup_step_median_sparse_vs_dense"].as_f64().unwrap() > 0.0);
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for run in runs {
        let steps: Vec<f64> = run["step_s"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(steps.len(), 8);
        assert!(steps.iter().all(|&t| t > 0.0));
        let med = run["step_median_s"].as_f64().unwrap();
        let p90 = run["step_p90_s"].as_f64().unwrap();
        let max = steps.iter().cloned().fold(0.0, f64::max);
        assert!(0.0 < med && med <= p90 && p90 <= max, "{med} {p90} {max}");
        // Device fields are present and null on the CPU, never left out.
        assert!(
            run.get("peak_device_bytes").is_some_and(|v| v.is_null()),
            "{run}"
        );
    }
    // Every run states whether its tokens match the all-on sparse run's: null for dense (a
    // different attention rule), a bool for sparse.
    assert!(
        runs[0]
            .get("tokens_match_sparse")
            .is_some_and(|v| v.is_null())
    );
    assert_eq!(runs[1]["tokens_match_sparse"], true);
    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&text).unwrap();
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let lines = doc
        .descendants()
        .filter(|n| n.tag_name().name() == "polyline")
        .count();
    assert!(lines >= 2, "{lines} polylines");
    assert!(text.contains("cpu: per-step latency") && text.contains("t2i 8x8"));

    std::fs::write(&peer, "{not json").unwrap();
    fails_with(
        &[
            "bench",
            "--preset",
            "tiny",
            "--grid",
            "2x2",
            "--steps",
            "2",
            "--peer-json",
            peer.to_str().unwrap(),
        ],
        &["peer report", "peer.json"],
    );
    fails_with(
        &[
            "bench",
            "--preset",
            "tiny",
            "--peer-json",
            dir.path().join("missing.json").to_str().unwrap(),
        ],
        &["missing.json"],
    );
}

#[test]
fn bad_cli_values_are_named() {
    fails_with(
        &["generate", "--preset", "huge"],
        &["unknown preset `huge`"],
    );
    fails_with(
        &["generate", "--preset", "tiny", "--grid", "0x4"],
        &["zero-size grid"],
    );
    fails_with(
        &["generate", "--preset", "tiny", "--grid", "axb"],
        &["grid"],
    );
    fails_with(
        &[
            "generate", "--preset", "tiny", "--grid", "2x2", "--steps", "5",
        ],
        &["steps"],
    );
    fails_with(
        &["generate", "--preset", "tiny", "--temperature=-1"],
        &["temperature"],
    );
    fails_with(
        &["generate", "--preset", "tiny", "--guidance", "NaN"],
        &["guidance"],
    );
    fails_with(
        &["generate", "--preset", "tiny", "--prompt", "1,99999"],
        &["prompt token 1 is 99999"],
    );
    fails_with(
        &["generate", "--preset", "tiny", "--mode", "fast"],
        &["fast"],
    );
    fails_with(
        &[
            "generate",
            "--preset",
            "tiny",
            "--mode",
            "dense",
            "--no-truncate",
        ],
        &["sparse only"],
    );
    fails_with(
        &[
            "generate",
            "--preset",
            "tiny",
            "--task",
            "text",
            "--answer-len",
            "8",
            "--steps",
            "9",
        ],
        &["steps"],
    );
    fails_with(&["bench", "--preset", "tiny", "--repeat", "0"], &["repeat"]);
}

#[test]
fn lavida_o_on_cpu_is_refused_with_its_size_when_it_does_not_fit() {
    let need = Config::preset("lavida-o").unwrap().param_count() * 4;
    match sparse_lavida::memory::available_memory_bytes() {
        Some(avail) if avail < need => {
            fails_with(
                &["generate", "--preset", "lavida-o", "--device", "cpu"],
                &["out of memory", "43.0 GB"],
            );
        }
        _ => eprintln!("this machine has room for lavida-o in f32: nothing to refuse"),
    }
}

#[test]
fn bad_config_weights_and_case_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    std::fs::write(p("bad.json"), "{not json").unwrap();
    fails_with(
        &["generate", "--config", &p("bad.json")],
        &["invalid config", "bad.json"],
    );
    let mut cfg = Config::preset("tiny").unwrap();
    cfg.n_kv_heads = 3;
    std::fs::write(p("gqa.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    fails_with(&["generate", "--config", &p("gqa.json")], &["n_kv_heads"]);
    fails_with(
        &["generate", "--config", &p("missing.json")],
        &["missing.json"],
    );

    let cfg = Config::preset("tiny").unwrap();
    let mut w = HostWeights::random(&cfg, 1);
    w.save(Path::new(&p("w.safetensors")), SaveDtype::Bf16)
        .unwrap();
    let bytes = std::fs::read(p("w.safetensors")).unwrap();
    std::fs::write(p("trunc.safetensors"), &bytes[..bytes.len() - 100]).unwrap();
    fails_with(
        &[
            "generate",
            "--preset",
            "tiny",
            "--weights",
            &p("trunc.safetensors"),
        ],
        &["trunc.safetensors"],
    );
    // `save` refuses non-finite values, so this file is written with safetensors directly.
    w.tensors.get_mut("layers.1.image.up").unwrap().data[7] = f32::NAN;
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = w
        .tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.shape.clone(),
                t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = bytes.iter().map(|(n, shape, b)| {
        (
            n.as_str(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .unwrap(),
        )
    });
    safetensors::tensor::serialize_to_file(views, &None, Path::new(&p("nan.safetensors"))).unwrap();
    fails_with(
        &[
            "generate",
            "--preset",
            "tiny",
            "--weights",
            &p("nan.safetensors"),
        ],
        &["layers.1.image.up"],
    );
    fails_with(
        &[
            "generate",
            "--preset",
            "small",
            "--weights",
            &p("w.safetensors"),
        ],
        &["shape"],
    );

    let case = |name: &str, text: &str| {
        std::fs::write(p(name), text).unwrap();
        p(name)
    };
    let out = p("o.safetensors");
    let row = |b: &str, id: &str| {
        format!(r#"{{"branch":"{b}","id":{id},"pos":0,"block":0,"masked":false}}"#)
    };
    for (name, text, needle) in [
        ("c1.json", "[1,2".to_string(), "case file"),
        (
            "c2.json",
            format!(r#"{{"rows":[{}],"logits_for":[0]}}"#, row("text", "300")),
            "id 300",
        ),
        (
            "c3.json",
            format!(r#"{{"rows":[{}],"logits_for":[1]}}"#, row("text", "3")),
            "row 1 does not exist",
        ),
        (
            "c4.json",
            format!(
                r#"{{"rows":[{},{}],"logits_for":[0,1]}}"#,
                row("text", "3"),
                row("image", "3")
            ),
            "both branches",
        ),
        (
            "c5.json",
            format!(r#"{{"rows":[{}],"logits_for":[0]}}"#, row("audio", "3")),
            "audio",
        ),
        (
            "c6.json",
            r#"{"rows":[],"logits_for":[]}"#.to_string(),
            "no rows",
        ),
        (
            "c7.json",
            format!(
                r#"{{"rows":[{}],"logits_for":[0]}}"#,
                row("text", "\"reg\"")
            ),
            "register",
        ),
    ] {
        fails_with(
            &[
                "forward",
                "--preset",
                "tiny",
                "--case",
                &case(name, &text),
                "--out",
                &out,
            ],
            &[needle],
        );
    }
}

/// `--device cuda` where it cannot run fails naming the reason (here: no CUDA driver; on a GPU
/// machine: `tiny`'s head_dim 16 has no attention kernel), never with a panic; `auto` falls
/// back to the CPU and says why.
#[test]
fn device_cuda_names_the_reason_and_auto_falls_back() {
    let why = match CudaBackend::new() {
        Err(e) => reason(&e),
        Ok(_) => "head_dim 16".to_string(),
    };
    fails_with(
        &["generate", "--preset", "tiny", "--device", "cuda"],
        &["the CUDA backend cannot run", &why],
    );
    let o = cli(&[
        "generate", "--preset", "tiny", "--grid", "2x2", "--steps", "2", "--device", "auto",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("device auto: using the CPU backend") && err.contains(&why),
        "{err}"
    );
    assert!(stdout(&o).contains("backend   cpu"), "{}", stdout(&o));
    assert!(stdout(&cli(&["info"])).contains("cuda "));
}

/// `generate --profile` brackets CUDA work for nsys/ncu: on the CPU backend (asked for, or
/// chosen by `auto`, as it always is for `tiny`, whose head_dim 16 has no CUDA kernel) it is an
/// error that says so, never a silent unprofiled run.
#[test]
fn profile_on_the_cpu_asks_for_device_cuda() {
    let base = [
        "generate", "--preset", "tiny", "--grid", "2x2", "--steps", "2",
    ];
    for device in ["cpu", "auto"] {
        let mut args = base.to_vec();
        args.extend(["--device", device, "--profile"]);
        fails_with(&args, &["--profile needs --device cuda", "cpu (f32"]);
    }
}

/// `generate --batch N`: one output, trace and picture per request (a directory or a `{i}`
/// pattern), each request's tokens equal to its solo run (`--seed + i`), the trace naming the
/// batch, the request and its seed; `--prompts FILE` gives each request its prompt.
#[test]
fn generate_batch_writes_one_output_per_request_equal_to_solo() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = [
        "generate", "--device", "cpu", "--preset", "tiny", "--grid", "4x4", "--steps", "4",
        "--seed", "7",
    ];
    let traces = d.join("trace-{i}.json");
    let mut args = base.to_vec();
    args.extend([
        "--batch",
        "3",
        "--out",
        d.to_str().unwrap(),
        "--trace",
        traces.to_str().unwrap(),
        "--image",
        d.to_str().unwrap(),
    ]);
    let o = cli(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("batch of 3, seeds 7..=9"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("images/s"), "{}", stdout(&o));
    for i in 0..3 {
        let solo = d.join(format!("solo-{i}.json"));
        let seed = (7 + i).to_string();
        let mut args = base.to_vec();
        let last = args.len() - 1;
        args[last] = &seed;
        args.extend(["--out", solo.to_str().unwrap()]);
        assert!(cli(&args).status.success());
        let batch = read_json(&d.join(format!("out-{i}.json")));
        assert_eq!(batch, read_json(&solo), "request {i}");
        let t = read_json(&d.join(format!("trace-{i}.json")));
        assert_eq!(
            (t["batch"].as_u64(), t["request"].as_u64()),
            (Some(3), Some(i))
        );
        assert_eq!(t["seed"].as_u64(), Some(7 + i));
        assert!(d.join(format!("image-{i}.png")).exists());
    }
    // One prompt per line; blank lines and comments skipped.
    let prompts = d.join("prompts.txt");
    std::fs::write(&prompts, "1,2,3\n# a comment\n\n[]\n4 5 6 7\n").unwrap();
    let mut args = base.to_vec();
    let pat = d.join("p-{i}.json");
    args.extend([
        "--prompts",
        prompts.to_str().unwrap(),
        "--trace",
        pat.to_str().unwrap(),
    ]);
    let o = cli(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let lens: Vec<String> = (0..3)
        .map(|i| read_json(&d.join(format!("p-{i}.json")))["task"].to_string())
        .collect();
    assert!(
        lens[0].contains("prompt 3,") && lens[1].contains("prompt 0,"),
        "{lens:?}"
    );
    assert!(lens[2].contains("prompt 4,"), "{lens:?}");
}

/// A batch's bad inputs: a bad prompt names its request, a bad line of the prompts file names
/// the line, the counts must agree, and a single output file cannot hold a batch.
#[test]
fn generate_batch_refuses_bad_requests_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = [
        "generate", "--device", "cpu", "--preset", "tiny", "--grid", "4x4",
    ];
    let write = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let bad = write("bad.txt", "1,2\n3,299\n");
    let word = write("word.txt", "1,2\n3,x\n");
    let empty = write("empty.txt", "# nothing\n\n");
    let two = write("two.txt", "1\n2\n");
    let out = d.join("one.json");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--prompts", &bad],
            vec!["request 1: prompt token 1 is 299"],
        ),
        (
            vec!["--prompts", &word],
            vec!["line 2", "`x` is not a token id"],
        ),
        (vec!["--prompts", &empty], vec!["no prompt"]),
        (
            vec!["--prompts", &two, "--batch", "3"],
            vec!["--batch 3", "2 prompts"],
        ),
        (
            vec!["--batch", "2", "--out", out.to_str().unwrap()],
            vec!["names one file", "pattern with {i}"],
        ),
        (vec!["--batch", "0"], vec!["--batch"]),
        // The memory bound covers the whole batch, refused before anything is allocated.
        (
            vec!["--batch", "5000", "--max-memory", "1G"],
            vec![
                "this batch of 5000 generations needs",
                "K/V pool",
                "--max-memory",
            ],
        ),
    ];
    for (extra, needles) in cases {
        let mut args = base.to_vec();
        args.extend(extra);
        fails_with(&args, &needles);
    }
    assert!(!out.exists());
}

/// `bench --batch`: a row per batch size and mode, the JSON report (throughput, latency, peak
/// memory, request 0 against batch 1, the best batch) and the plot.
#[test]
fn bench_batch_reports_throughput_per_batch_size() {
    let dir = tempfile::tempdir().unwrap();
    let (json, plot) = (dir.path().join("b.json"), dir.path().join("b.svg"));
    let o = cli(&[
        "bench",
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--grid",
        "4x4",
        "--steps",
        "3",
        "--batch",
        "1,3,2",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("images/s"), "{}", stdout(&o));
    let r = read_json(&json);
    assert_eq!(r["items"], "images");
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 6);
    let batches: Vec<u64> = runs.iter().map(|r| r["batch"].as_u64().unwrap()).collect();
    assert_eq!(batches, [1, 1, 3, 3, 2, 2]);
    for run in runs {
        let b = run["batch"].as_f64().unwrap();
        let ips = run["items_per_s"].as_f64().unwrap();
        assert!(
            (ips * run["wall_s"].as_f64().unwrap() - b).abs() < 1e-6,
            "{run}"
        );
        assert_eq!(run["first_matches_batch1"], true, "{run}");
        assert_eq!(run["step_s"].as_array().unwrap().len(), 3);
        assert!(run["peak_device_bytes"].is_null());
    }
    assert_eq!(r["best"].as_array().unwrap().len(), 2);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.contains("<svg") && svg.contains("vs batch size"));
    fails_with(
        &[
            "bench", "--preset", "tiny", "--batch", "1,2", "--image", "x.png",
        ],
        &["--image applies to bench without --batch"],
    );
}
