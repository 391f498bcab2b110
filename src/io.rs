//! Writing output files so that a failure never destroys what was there, and checking output
//! locations before the work that fills them starts.
//!
//! Every file the crate writes (weights, `forward` logits, `--out`, `--trace`, `--json`,
//! `--plot`, `--image`) goes through [`write_atomic`]: the bytes go to a temporary file in the
//! target's directory (same filesystem, so the final rename is atomic), which is flushed and
//! synced, then renamed over the target. A write that fails half way (full disk, a value that
//! cannot be encoded, a crash) leaves the old file as it was and removes the temporary file.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Distinguishes the temporary files of concurrent writes within one process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// The directory `path` lives in (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A fresh temporary path beside `path`: `<name>.tmp-<pid>-<n>`.
fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "an output path must name a file",
            ),
        )
    })?;
    let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
    let mut temp = name.to_os_string();
    temp.push(format!(".tmp-{}-{seq}", std::process::id()));
    Ok(parent_dir(path).join(temp))
}

/// Removes the temporary file when a write is abandoned (error or panic).
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writes `path` atomically: `write` fills a buffered temporary file in the same directory,
/// which is then flushed, synced to disk and renamed over `path`. On any error (from `write`,
/// a full disk, the sync or the rename) the temporary file is removed, `path` keeps its old
/// content, and the error names `path`.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    if path.is_dir() {
        return Err(not_a_file(path));
    }
    let temp = temp_path(path)?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .map_err(|e| Error::io(path, e))?;
    let mut guard = TempGuard(Some(temp.clone()));
    let mut out = BufWriter::new(file);
    write(&mut out).map_err(|e| rename_io(e, &temp, path))?;
    let file = out
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(path, e))?;
    drop(file);
    std::fs::rename(&temp, path).map_err(|e| Error::io(path, e))?;
    guard.0 = None;
    // The rename is durable once the directory is synced; not every filesystem allows that,
    // and the data itself is already safe, so a failure here is not an error.
    if let Ok(dir) = File::open(parent_dir(path)) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// An I/O error that `write` reported against the temporary file, reported against the target.
fn rename_io(e: Error, temp: &Path, path: &Path) -> Error {
    match e {
        Error::Io { path: p, source } if p == temp => Error::io(path, source),
        e => e,
    }
}

fn not_a_file(path: &Path) -> Error {
    Error::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "is a directory, not a file",
        ),
    )
}

/// Writes `value` as pretty JSON (and a final newline) to `path`, atomically, streaming: no
/// copy of the text is held in memory.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    write_atomic(path, |w| {
        serde_json::to_writer_pretty(&mut *w, value).map_err(|e| {
            if e.is_io() {
                Error::io(path, std::io::Error::other(e))
            } else {
                Error::Json {
                    context: format!("writing {}", path.display()),
                    source: e,
                }
            }
        })?;
        w.write_all(b"\n").map_err(|e| Error::io(path, e))
    })
}

/// Checks, before any work, that a file can be written at `path`: its directory exists and
/// accepts a new file (one is created and removed), and `path` is not a directory. `flag`
/// names the option in the error (`--json`).
pub fn check_output(flag: &str, path: &Path) -> Result<()> {
    let fail = |why: String| {
        Err(Error::io(
            path,
            std::io::Error::other(format!("{flag}: cannot write here: {why}")),
        ))
    };
    if path.is_dir() {
        return fail("it is a directory".into());
    }
    let dir = parent_dir(path);
    if !dir.is_dir() {
        return fail(format!("directory {} does not exist", dir.display()));
    }
    let probe = temp_path(path)?;
    match OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(file) => {
            drop(file);
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => fail(format!("cannot create a file in {}: {e}", dir.display())),
    }
}

/// Checks every `(flag, path)` with [`check_output`] and that no two name the same file.
pub fn check_outputs(outputs: &[(&str, &Path)]) -> Result<()> {
    for (i, (flag, path)) in outputs.iter().enumerate() {
        check_output(flag, path)?;
        if let Some((other, _)) = outputs[..i].iter().find(|(_, p)| same_file(p, path)) {
            return Err(Error::Input(format!(
                "{other} and {flag} both write {}",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Whether two output paths name one file (same directory and name, after resolving the
/// directory).
fn same_file(a: &Path, b: &Path) -> bool {
    let key = |p: &Path| {
        let dir = std::fs::canonicalize(parent_dir(p)).unwrap_or_else(|_| parent_dir(p));
        (dir, p.file_name().map(|n| n.to_os_string()))
    };
    key(a) == key(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn a_write_that_fails_half_way_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        std::fs::write(&path, "old and valid").unwrap();
        let e = write_atomic(&path, |w| {
            w.write_all(b"half of the new ").unwrap();
            Err(Error::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::StorageFull, "injected: disk full"),
            ))
        })
        .unwrap_err();
        assert!(e.to_string().contains("injected: disk full"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old and valid");
        assert!(leftovers(dir.path()).is_empty());

        write_atomic(&path, |w| {
            w.write_all(b"new").map_err(|e| Error::io(&path, e))
        })
        .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn a_panicking_writer_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        let r = std::panic::catch_unwind(|| {
            let _ = write_atomic(&path, |_| panic!("writer bug"));
        });
        assert!(r.is_err());
        assert!(!path.exists());
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn output_locations_are_checked_before_the_work() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("a.json");
        check_output("--json", &ok).unwrap();
        assert!(!ok.exists(), "the probe file is removed");
        let missing = dir.path().join("no_such_dir").join("a.json");
        let e = check_output("--json", &missing).unwrap_err().to_string();
        assert!(e.contains("--json") && e.contains("no_such_dir"), "{e}");
        let e = check_output("--out", dir.path()).unwrap_err().to_string();
        assert!(e.contains("directory"), "{e}");
        let e = check_outputs(&[("--json", &ok), ("--plot", &dir.path().join("./a.json"))])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--json and --plot"), "{e}");
    }
}
