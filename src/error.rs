//! The crate's one error type. It imports nothing of the crate: every layer, the kernel layer
//! included, reports through it.

use std::path::PathBuf;

/// Everything that can go wrong, with enough context to name the offending input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config field is missing, out of range, or inconsistent with another.
    #[error("invalid config: {0}")]
    Config(String),
    /// A weight file or tensor is unusable; the message names the tensor.
    #[error("invalid weights: {0}")]
    Weights(String),
    /// A request (token ids, grid, steps, case file, CLI value) is malformed.
    #[error("invalid input: {0}")]
    Input(String),
    /// The run would not fit in memory; says how much it needs.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// The requested backend is not available in this build or on this machine.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// A CUDA driver call failed (or a kernel reported a fault); says which call and why.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// JSON (config, case, trace) could not be parsed or written.
    #[error("{context}: {source}")]
    Json {
        /// What was being parsed.
        context: String,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// The same error with `what: ` before its message (`request 3: prompt token 2 is ...`);
    /// I/O and JSON errors, which name their file or context already, are returned as they are.
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        match self {
            Error::Config(m) => Error::Config(format!("{what}: {m}")),
            Error::Weights(m) => Error::Weights(format!("{what}: {m}")),
            Error::Input(m) => Error::Input(format!("{what}: {m}")),
            Error::OutOfMemory(m) => Error::OutOfMemory(format!("{what}: {m}")),
            Error::Unavailable(m) => Error::Unavailable(format!("{what}: {m}")),
            Error::Cuda(m) => Error::Cuda(format!("{what}: {m}")),
            other => other,
        }
    }
}

#[cfg(feature = "cuda")]
impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Cuda(e.to_string())
    }
}

/// Returns `Err(Error::Input(..))` built from a format string.
#[macro_export]
macro_rules! bail_input {
    ($($arg:tt)*) => { return Err($crate::Error::Input(format!($($arg)*))) };
}
