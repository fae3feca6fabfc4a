//! The low-level pieces every other module may use, and which use none of
//! them but the error type (leaves): this machine (`host`), libtorch and its CUDA library
//! (`torch`, `cuda`), libtorch errors as one-line reports (`report`), and
//! quantities as messages print them (`units`).

pub mod cuda;
pub mod host;
pub mod progress;
pub mod report;
pub mod torch;
pub mod units;
