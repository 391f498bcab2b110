//! The emulated device (cargo feature `emulator`): builds the kernels of `kernels/*.cu` as host
//! C++ against `kernels/emu/` and links them, with the emulator's runtime and driver, into
//! `libcuda.so.1`, plus the emulated `libcublasLt.so.13`. The libraries go to
//! `$OUT_DIR/emu/` and are copied to `target/<profile>/emu/` (a stable folder for
//! `LD_LIBRARY_PATH`; `scripts/emu` puts it there). With `SL_EMU_SANITIZE=1` a second set,
//! built with AddressSanitizer and UBSan, goes to `target/<profile>/emu-asan/`.
//!
//! Nothing here runs unless the feature is on; the crate itself never links these libraries
//! (cudarc loads `libcuda` by name at run time), so a program only uses the emulated device
//! when its library folder is on the loader's path.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{fail, write_file};

/// The registration and stub sources generated here, and the flags of every emulator compile.
const CXX_FLAGS: &[&str] = &[
    "-std=c++17",
    // The kernels' explicit roundings (__fmul_rn, ...) and the CPU twins' orders hold only
    // without contraction into FMAs.
    "-ffp-contract=off",
    // nvcc is lenient about type punning through casts; host compilers are not.
    "-fno-strict-aliasing",
    "-fvisibility=hidden",
    "-Wno-unknown-pragmas",
];

/// A variant of the emulator libraries.
struct Variant {
    /// Folder name under `$OUT_DIR` and `target/<profile>`.
    dir: &'static str,
    opt_level: u32,
    extra: &'static [&'static str],
}

const PLAIN: Variant = Variant {
    dir: "emu",
    opt_level: 2,
    extra: &["-g1"],
};

const SANITIZED: Variant = Variant {
    dir: "emu-asan",
    opt_level: 1,
    extra: &[
        "-g",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=undefined",
        "-fno-omit-frame-pointer",
    ],
};

/// Builds the emulator libraries (see the module docs).
pub fn build(manifest_dir: &Path, out_dir: &Path, kernel_sources: &[PathBuf], nvcc: Option<&Path>) {
    for var in ["SL_EMU_SANITIZE", "CXX", "CXXFLAGS"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let emu_dir = manifest_dir.join("kernels/emu");
    println!("cargo::rerun-if-changed={}", emu_dir.display());
    for entry in fs::read_dir(&emu_dir)
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", emu_dir.display())))
        .flatten()
    {
        println!("cargo::rerun-if-changed={}", entry.path().display());
    }
    let Some(nvcc) = nvcc else {
        fail(
            "the `emulator` feature needs the CUDA headers (cuda.h) of the CUDA 13.0 toolkit: \
             run scripts/install-nvcc or set NVCC",
        );
    };
    let cuda_include = nvcc
        .parent()
        .and_then(Path::parent)
        .map(|root| root.join("include"))
        .filter(|dir| dir.join("cuda.h").is_file())
        .unwrap_or_else(|| {
            fail(&format!(
                "the `emulator` feature needs cuda.h beside {} (in ../include)",
                nvcc.display()
            ))
        });

    let gen_dir = out_dir.join("emu-gen");
    fs::create_dir_all(&gen_dir)
        .unwrap_or_else(|e| fail(&format!("cannot create {}: {e}", gen_dir.display())));
    let mut kernel_units = Vec::new();
    for source in kernel_sources {
        kernel_units.push(write_registration(source, &gen_dir));
    }
    // The emulator's own test kernels (tests/emulator.rs), in the emulated device only.
    kernel_units.push(write_registration(&emu_dir.join("selftest.cu"), &gen_dir));
    let stubs = gen_dir.join("stubs.cpp");
    write_file(&stubs, stub_source(&cuda_include).as_bytes());

    let mut variants = vec![PLAIN];
    if env::var_os("SL_EMU_SANITIZE").is_some_and(|v| !v.is_empty() && v != "0") {
        variants.push(SANITIZED);
    }
    for variant in &variants {
        let lib_dir = build_variant(
            variant,
            out_dir,
            &emu_dir,
            &cuda_include,
            &kernel_units,
            &stubs,
        );
        publish(&lib_dir, out_dir, variant.dir);
    }
    println!(
        "cargo::rustc-env=SL_EMU_LIB_DIR={}",
        out_dir.join(PLAIN.dir).display()
    );
}

/// The `extern "C" __global__` kernels of a kernel file: (name, `__launch_bounds__` maximum
/// threads as written, or "0").
fn kernels_of(source: &Path) -> Vec<(String, String)> {
    let text = fs::read_to_string(source)
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", source.display())));
    let mut out = Vec::new();
    let marker = "extern \"C\" __global__";
    let mut rest = text.as_str();
    while let Some(at) = rest.find(marker) {
        rest = &rest[at + marker.len()..];
        let decl = rest.trim_start();
        let decl = decl.strip_prefix("void").unwrap_or(decl).trim_start();
        let (bounds, decl) = match decl.strip_prefix("__launch_bounds__(") {
            Some(args) => {
                let close = args.find(')').unwrap_or_else(|| {
                    fail(&format!("{}: unclosed __launch_bounds__", source.display()))
                });
                let first = args[..close]
                    .split(',')
                    .next()
                    .unwrap_or("0")
                    .trim()
                    .to_string();
                (first, args[close + 1..].trim_start())
            }
            None => ("0".to_string(), decl),
        };
        let name: String = decl
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            fail(&format!(
                "{}: cannot read the kernel name after `{marker}`",
                source.display()
            ));
        }
        out.push((name, bounds));
    }
    out
}

/// Writes the registration unit of one kernel file: the file itself, compiled for the host,
/// and a static initialiser that registers its kernels with the runtime.
fn write_registration(source: &Path, gen_dir: &Path) -> PathBuf {
    let stem = source.file_stem().unwrap().to_string_lossy().into_owned();
    let file = source.file_name().unwrap().to_string_lossy().into_owned();
    let kernels = kernels_of(source);
    // The kernel file is found through the include path (`-I kernels`), so a rebuild from a
    // modified copy of the kernels (the `rebuild` script, scripts/emu-mutants) puts the copy first.
    let mut cpp = format!(
        "// Generated by build.rs (build/emulator.rs): {file} for the emulated device.\n\
         #include \"runtime.h\"\n#include \"{file}\"\n\nnamespace {{\n\
         const ::sl_emu::KernelEntry kEntries[] = {{\n"
    );
    for (name, bounds) in &kernels {
        let _ = writeln!(cpp, "    SL_EMU_KERNEL({name}, \"{file}\", {bounds}),");
    }
    let _ = write!(
        cpp,
        "}};\nstruct Register {{\n    Register() {{ ::sl_emu::register_kernels(kEntries, {}); }}\n}} \
         register_{stem};\n}}  // namespace\n",
        kernels.len()
    );
    let path = gen_dir.join(format!("kernels_{stem}.cpp"));
    write_file(&path, cpp.as_bytes());
    path
}

/// A weak stub for every function cuda.h declares (as the preprocessor names it: `cuMemAlloc`
/// is `cuMemAlloc_v2`): driver.cpp's definitions replace the ones it implements, and the rest
/// report their name and return CUDA_ERROR_NOT_SUPPORTED.
fn stub_source(cuda_include: &Path) -> String {
    let cxx = cc::Build::new().cpp(true).get_compiler();
    let output = Command::new(cxx.path())
        .args(["-E", "-P", "-x", "c++", "-I"])
        .arg(cuda_include)
        .arg(cuda_include.join("cuda.h"))
        .output()
        .unwrap_or_else(|e| fail(&format!("cannot run the C++ preprocessor: {e}")));
    if !output.status.success() {
        fail(&format!(
            "preprocessing cuda.h failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let mut names: Vec<String> = Vec::new();
    for (at, _) in text.match_indices("CUresult ") {
        let name: String = text[at + "CUresult ".len()..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let after = text[at + "CUresult ".len()..].trim_start()[name.len()..].trim_start();
        if name.starts_with("cu") && after.starts_with('(') && !names.contains(&name) {
            names.push(name);
        }
    }
    if names.len() < 100 {
        fail(&format!("found only {} functions in cuda.h", names.len()));
    }
    let mut cpp = String::from(
        "// Generated by build.rs (build/emulator.rs) from cuda.h: a weak stub per driver \
         function.\nextern \"C\" int slEmuUnimplemented(const char *name);\n",
    );
    for name in &names {
        let _ = writeln!(
            cpp,
            "extern \"C\" __attribute__((weak, visibility(\"default\"))) int {name}(void) {{ \
             return slEmuUnimplemented(\"{name}\"); }}"
        );
    }
    cpp
}

/// Compiles and links one variant; returns the folder holding its libraries.
fn build_variant(
    variant: &Variant,
    out_dir: &Path,
    emu_dir: &Path,
    cuda_include: &Path,
    kernel_units: &[PathBuf],
    stubs: &Path,
) -> PathBuf {
    let obj_dir = out_dir.join(format!("{}-obj", variant.dir));
    let lib_dir = out_dir.join(variant.dir);
    for dir in [&obj_dir, &lib_dir] {
        fs::create_dir_all(dir)
            .unwrap_or_else(|e| fail(&format!("cannot create {}: {e}", dir.display())));
    }
    let kernels_dir = emu_dir.parent().unwrap();
    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .pic(true)
            .opt_level(variant.opt_level)
            .debug(false)
            .cargo_metadata(false)
            .out_dir(&obj_dir)
            // kernels/emu first: its cuda_bf16.h must win over the toolkit's.
            .include(emu_dir)
            .include(kernels_dir)
            .include(cuda_include)
            .define("SL_EMULATE", None)
            .warnings(true)
            .extra_warnings(false);
        for flag in CXX_FLAGS.iter().chain(variant.extra) {
            b.flag(flag);
        }
        b
    };
    let mut driver = base();
    driver
        .file(emu_dir.join("runtime.cpp"))
        .file(emu_dir.join("driver.cpp"))
        .file(stubs);
    let driver_objects = driver
        .try_compile_intermediates()
        .unwrap_or_else(|e| fail(&format!("compiling the emulated device: {e}")));
    let mut kernels = base();
    for unit in kernel_units {
        kernels.file(unit);
    }
    let kernel_objects = kernels
        .try_compile_intermediates()
        .unwrap_or_else(|e| fail(&format!("compiling the emulated kernels: {e}")));
    let mut blas = base();
    blas.file(emu_dir.join("cublaslt.cpp"));
    let blas_objects = blas
        .try_compile_intermediates()
        .unwrap_or_else(|e| fail(&format!("compiling the emulated cuBLASLt: {e}")));

    let cxx = base().get_compiler();
    let link = |objects: &[PathBuf], soname: &str, extra: &[&str]| {
        let out = lib_dir.join(soname);
        let mut cmd = Command::new(cxx.path());
        cmd.arg("-shared")
            .arg(format!("-Wl,-soname,{soname}"))
            .arg("-o")
            .arg(&out)
            .args(objects)
            .args(variant.extra.iter().filter(|f| f.starts_with("-fsanitize")))
            .args(extra)
            .args(["-pthread", "-ldl"]);
        let status = cmd
            .status()
            .unwrap_or_else(|e| fail(&format!("cannot run the linker: {e}")));
        if !status.success() {
            fail(&format!("linking {} failed: {cmd:?}", out.display()));
        }
    };
    let all_objects: Vec<PathBuf> = driver_objects
        .iter()
        .chain(&kernel_objects)
        .cloned()
        .collect();
    link(&all_objects, "libcuda.so.1", &[]);
    let lib_arg = format!("-L{}", lib_dir.display());
    link(
        &blas_objects,
        "libcublasLt.so.13",
        &[&lib_arg, "-l:libcuda.so.1", "-Wl,-rpath,$ORIGIN"],
    );
    // The names cudarc tries first.
    for (alias, target) in [
        ("libcuda.so", "libcuda.so.1"),
        ("libcublasLt.so", "libcublasLt.so.13"),
    ] {
        let path = lib_dir.join(alias);
        let _ = fs::remove_file(&path);
        if let Err(e) = std::os::unix::fs::symlink(target, &path) {
            fail(&format!("cannot link {}: {e}", path.display()));
        }
    }
    // The emulated cuBLASLt's own test (a fake of the driver's extension API inside it): run by
    // scripts/test as `cublaslt-test libcublasLt.so.13`.
    let mut test = base();
    // Its fake driver functions must be exported (-rdynamic) for the library to bind to them.
    test.flag("-fvisibility=default")
        .file(emu_dir.join("test/cublaslt_test.cpp"));
    let test_objects = test
        .try_compile_intermediates()
        .unwrap_or_else(|e| fail(&format!("compiling the emulated cuBLASLt's test: {e}")));
    let exe = lib_dir.join("cublaslt-test");
    let mut cmd = Command::new(cxx.path());
    cmd.arg("-o")
        .arg(&exe)
        .args(&test_objects)
        .args(variant.extra.iter().filter(|f| f.starts_with("-fsanitize")))
        .args(["-rdynamic", "-ldl", "-pthread"]);
    match cmd.status() {
        Ok(status) if status.success() => {}
        _ => fail(&format!("linking {} failed: {cmd:?}", exe.display())),
    }
    write_rebuild_script(&lib_dir, &cxx, kernel_units, &driver_objects, variant);
    lib_dir
}

/// Writes `<lib_dir>/rebuild KERNEL_DIR OUT_DIR`: compiles the kernel units against the kernel
/// files of KERNEL_DIR (a modified copy of `kernels/`) and links them with this build's other
/// objects into `OUT_DIR/libcuda.so.1` (with this folder's cuBLASLt beside it). For
/// `scripts/emu-mutants`, which runs the tests against deliberately broken kernels without
/// rebuilding the crate.
fn write_rebuild_script(
    lib_dir: &Path,
    cxx: &cc::Tool,
    kernel_units: &[PathBuf],
    driver_objects: &[PathBuf],
    variant: &Variant,
) {
    let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    let mut args = Vec::new();
    let mut kernels_include_at = None;
    for arg in cxx.args() {
        let arg = arg.to_string_lossy().into_owned();
        if arg.ends_with("/kernels") && args.last().is_some_and(|a: &String| a == "'-I'") {
            kernels_include_at = Some(args.len() - 1);
        }
        args.push(quote(&arg));
    }
    // The copy's kernel files before the originals.
    let at = kernels_include_at.unwrap_or_else(|| fail("rebuild script: no -I kernels flag"));
    args.insert(at, "\"$kernels\"".to_string());
    args.insert(at, "'-I'".to_string());
    let flags = args.join(" ");
    let mut sh = format!(
        "#!/bin/sh\n# Generated by build.rs (build/emulator.rs): rebuilds libcuda.so.1 of the {} \
         emulator from the kernel files in $1 into $2.\nset -eu\nkernels=$(cd \"$1\" && pwd)\n\
         out=\"$2\"\nmkdir -p \"$out\"\npids=\"\"\n",
        variant.dir
    );
    let mut objects: Vec<String> = driver_objects
        .iter()
        .map(|o| quote(&o.to_string_lossy()))
        .collect();
    for unit in kernel_units {
        let stem = unit.file_stem().unwrap().to_string_lossy();
        let _ = writeln!(
            sh,
            "{} {flags} -c {} -o \"$out/{stem}.o\" & pids=\"$pids $!\"",
            quote(&cxx.path().to_string_lossy()),
            quote(&unit.to_string_lossy())
        );
        objects.push(format!("\"$out/{stem}.o\""));
    }
    let sanitize: Vec<&str> = variant
        .extra
        .iter()
        .copied()
        .filter(|f| f.starts_with("-fsanitize"))
        .collect();
    let _ = write!(
        sh,
        "for p in $pids; do wait \"$p\"; done\n{} -shared -Wl,-soname,libcuda.so.1 -o \"$out/libcuda.so.1\" {} {} -pthread -ldl\n\
         cp {} \"$out/\"\nln -sf libcuda.so.1 \"$out/libcuda.so\"\n\
         ln -sf libcublasLt.so.13 \"$out/libcublasLt.so\"\n",
        quote(&cxx.path().to_string_lossy()),
        objects.join(" "),
        sanitize.join(" "),
        quote(&lib_dir.join("libcublasLt.so.13").to_string_lossy()),
    );
    let path = lib_dir.join("rebuild");
    write_file(&path, sh.as_bytes());
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o755));
}

/// Copies a variant's libraries to `target/<profile>/<dir>/` (replacing the folder at once, so
/// a process that is loading the old ones never sees half of the new ones).
fn publish(lib_dir: &Path, out_dir: &Path, dir: &str) {
    // OUT_DIR is target/<profile>/build/<pkg>-<hash>/out.
    let Some(profile_dir) = out_dir.ancestors().nth(3) else {
        return;
    };
    let dest = profile_dir.join(dir);
    let staging = profile_dir.join(format!(".{dir}.new-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)
        .unwrap_or_else(|e| fail(&format!("cannot create {}: {e}", staging.display())));
    for entry in fs::read_dir(lib_dir).into_iter().flatten().flatten() {
        let from = entry.path();
        let to = staging.join(entry.file_name());
        let copied = match fs::read_link(&from) {
            Ok(target) => std::os::unix::fs::symlink(target, &to),
            Err(_) => fs::copy(&from, &to).map(|_| ()),
        };
        if let Err(e) = copied {
            fail(&format!(
                "cannot copy {} to {}: {e}",
                from.display(),
                to.display()
            ));
        }
    }
    let old = profile_dir.join(format!(".{dir}.old-{}", std::process::id()));
    let _ = fs::rename(&dest, &old);
    if let Err(e) = fs::rename(&staging, &dest) {
        fail(&format!("cannot publish {}: {e}", dest.display()));
    }
    let _ = fs::remove_dir_all(&old);
}
