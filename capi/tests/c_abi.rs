//! The C ABI against its hand-written header: every function `include/sparse_lavida.h` declares
//! is an `extern "C"` function of `src/lib.rs` with as many parameters (and the other way
//! round), the error codes agree, and `examples/c/attention.c` compiles against the header and
//! the library (`-Wall -Wextra -Werror`) and — on a CUDA device: a GPU, or the emulated one with
//! `--features emulator` and its libraries on `LD_LIBRARY_PATH` — runs and matches its naive
//! attention.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Splits a parameter list at top-level commas; `void` and an empty list are no parameters.
fn arity(params: &str) -> usize {
    let params = params.trim();
    if params.is_empty() || params == "void" {
        return 0;
    }
    let mut depth = 0;
    let mut n = 1;
    for c in params.chars() {
        match c {
            '(' | '<' | '[' => depth += 1,
            ')' | '>' | ']' => depth -= 1,
            ',' if depth == 0 => n += 1,
            _ => {}
        }
    }
    // A trailing comma (rustfmt) is not a parameter.
    if params.trim_end().ends_with(',') {
        n -= 1;
    }
    n
}

/// `name(params)` of every declaration (`... name(params);`) or definition
/// (`extern "C" fn name(params)`) in `text` whose name starts with `sl_`.
fn functions(text: &str, rust: bool) -> BTreeMap<String, usize> {
    // Comments out, so that prose mentioning a function is not a declaration.
    let code: String = if rust {
        text.lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        let mut out = String::new();
        let mut rest = text;
        while let Some(i) = rest.find("/*") {
            out.push_str(&rest[..i]);
            rest = &rest[i + 2..];
            rest = &rest[rest.find("*/").map_or(rest.len(), |j| j + 2)..];
        }
        out.push_str(rest);
        out
    };
    let mut found = BTreeMap::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("sl_") {
        let tail = &rest[i..];
        let name_len = tail
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..name_len];
        let before = rest[..i].trim_end();
        let after = tail[name_len..].trim_start();
        let declared = if rust {
            before.ends_with("extern \"C\" fn")
        } else {
            // A declaration: a return type before it (`int`, `*`, `void`), `(` after, at the
            // start of a statement.
            (before.ends_with('*')
                || before.ends_with("int")
                || before.ends_with("void")
                || before.ends_with("uint32_t")
                || before.ends_with("char"))
                && after.starts_with('(')
        };
        if declared && after.starts_with('(') {
            let close = after.find(')').unwrap();
            found.insert(name.to_string(), arity(&after[1..close]));
        }
        rest = &tail[name_len..];
    }
    found
}

#[test]
fn the_header_declares_exactly_the_exported_functions() {
    let header = std::fs::read_to_string(root().join("include/sparse_lavida.h")).unwrap();
    let lib = std::fs::read_to_string(root().join("capi/src/lib.rs")).unwrap();
    let c = functions(&header, false);
    let mut rust = functions(&lib, true);
    // The launches come from a macro: `$name(kernels, params, stream)`.
    for line in lib.lines() {
        if let Some(name) = line.trim().strip_prefix("sl_launch_") {
            let name = name.split(',').next().unwrap();
            rust.insert(format!("sl_launch_{name}"), 3);
        }
    }
    assert!(c.len() >= 20, "header parse found only {c:?}");
    assert_eq!(c, rust, "header (left) vs capi/src/lib.rs (right)");
}

#[test]
fn the_error_codes_agree() {
    use sparse_lavida_capi::*;
    let header = std::fs::read_to_string(root().join("include/sparse_lavida.h")).unwrap();
    for (name, value) in [
        ("SL_OK", SL_OK),
        ("SL_ERR_INVALID", SL_ERR_INVALID),
        ("SL_ERR_UNAVAILABLE", SL_ERR_UNAVAILABLE),
        ("SL_ERR_CUDA", SL_ERR_CUDA),
        ("SL_ERR_INTERNAL", SL_ERR_INTERNAL),
    ] {
        assert!(
            header.contains(&format!("#define {name} {value}")),
            "{name} = {value}"
        );
    }
}

/// The directory of this build's `libsparse_lavida_capi.so` (beside the test's own binary).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps, deps.parent().unwrap()] {
        if dir.join("libsparse_lavida_capi.so").exists() {
            return dir.to_path_buf();
        }
    }
    panic!("libsparse_lavida_capi.so not found near {}", exe.display());
}

/// Compiles examples/c/attention.c against the header and the library.
fn compile_c_program(out: &Path) {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let r = root();
    let status = Command::new(&cc)
        .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(r.join("include"))
        .arg("-I")
        .arg(r.join("kernels"))
        .arg(r.join("examples/c/attention.c"))
        .arg("-o")
        .arg(out)
        .arg("-L")
        .arg(lib_dir())
        .args(["-lsparse_lavida_capi", "-ldl", "-lm"])
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?}: {e}"));
    assert!(status.success(), "{cc} failed on examples/c/attention.c");
}

#[test]
fn the_c_program_compiles_against_the_header() {
    let dir = std::env::temp_dir().join(format!("sl-capi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    compile_c_program(&dir.join("attention"));
    // Also as C++ (the header's extern "C" block).
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let src = dir.join("header.cpp");
    std::fs::write(
        &src,
        "#include \"sparse_lavida.h\"\nint main() { return sl_version() ? 0 : 1; }\n",
    )
    .unwrap();
    let status = Command::new(&cxx)
        .args(["-std=c++17", "-Wall", "-Wextra", "-Werror", "-c", "-I"])
        .arg(root().join("include"))
        .arg("-I")
        .arg(root().join("kernels"))
        .arg(&src)
        .arg("-o")
        .arg(dir.join("header.o"))
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler {cxx:?}: {e}"));
    assert!(status.success(), "{cxx} failed on the header");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn the_c_program_runs_and_matches_naive_attention() {
    let dir = std::env::temp_dir().join(format!("sl-capi-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("attention");
    compile_c_program(&exe);
    let path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", lib_dir().display()),
        _ => lib_dir().display().to_string(),
    };
    let out = Command::new(&exe)
        .env("LD_LIBRARY_PATH", path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "examples/c/attention.c failed:\n{text}"
    );
    assert!(text.contains("\nok"), "{text}");
}
