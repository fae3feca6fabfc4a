//! The library's error type. Every error that stems from user input names the
//! file, and where it can, the line and column (`path:line:col: message`), so
//! it can be pasted into an editor's "go to" box.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error while touching `path`. (Not a `source`:
    /// the message is part of this one, and a chain would print it twice.)
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },

    /// Malformed input at a known place. `line`/`col` are 1-based; 0 means unknown.
    #[error("{}", fmt_at(path, *line, *col, msg))]
    Parse { path: PathBuf, line: usize, col: usize, msg: String },

    /// Input that is well-formed but unusable (empty corpus, wrong version, ...).
    #[error("{}: {msg}", path.display())]
    Invalid { path: PathBuf, msg: String },

    /// A tokenizer could not be built, loaded, trained or run.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A configuration value out of range or inconsistent.
    #[error("config: {0}")]
    Config(String),

    /// A failure while training (a libtorch kernel, backward, diverging values).
    #[error("{0}")]
    Runtime(String),

    /// A collective or a communicator failed (MPI, NCCL): the operation
    /// (`MPI_Allreduce`, `ncclCommInitRank`, ...) and, where known, the group
    /// and this rank's place in it.
    #[error("{}", fmt_comm(op, at.as_ref(), msg))]
    Comm { op: String, at: Option<CommAt>, msg: String },

    /// A call into the device runtime failed (CUDA: `cudaSetDevice`, ...).
    #[error("{op}: {msg}")]
    Device { op: String, msg: String },

    /// A call into the C++ extension failed (libtorch autograd functions,
    /// gradient views and hooks, activation recomputation).
    #[error("{op}: {msg}")]
    Extension { op: String, msg: String },
}

/// Where a collective ran: the group's name ("world", "dp", "tp") and this
/// rank's index in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommAt {
    pub group: String,
    pub rank: usize,
    pub size: usize,
}

fn fmt_comm(op: &str, at: Option<&CommAt>, msg: &str) -> String {
    match at {
        Some(a) => format!("{op} on the {} group (rank {} of {}): {msg}", a.group, a.rank, a.size),
        None => format!("{op}: {msg}"),
    }
}

fn fmt_at(path: &Path, line: usize, col: usize, msg: &str) -> String {
    match (line, col) {
        (0, _) => format!("{}: {msg}", path.display()),
        (l, 0) => format!("{}:{l}: {msg}", path.display()),
        (l, c) => format!("{}:{l}:{c}: {msg}", path.display()),
    }
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), error: source }
    }
    pub fn parse(path: impl Into<PathBuf>, line: usize, col: usize, msg: impl Into<String>) -> Self {
        Error::Parse { path: path.into(), line, col, msg: msg.into() }
    }
    pub fn invalid(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Invalid { path: path.into(), msg: msg.into() }
    }
    /// A communication failure of `op` outside any group (loading a library,
    /// initialising MPI).
    pub fn comm(op: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Comm { op: op.into(), at: None, msg: msg.into() }
    }
}

/// `map_err` helper: attach a path to an `io::Error`.
pub trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
