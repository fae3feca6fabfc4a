//! glm_worker: the library behind `glm-worker` (its command line is in
//! `src/cli/`).
//!
//! Data flows one way: text -> token store -> blank-infilling samples ->
//! batches -> model -> loss -> gradients -> optimizer -> checkpoint.
//! Modules from the bottom up: `runtime` (this machine, libtorch, CUDA,
//! one-line errors) and `rng`; `comm` (collectives); `parallel` (the rank
//! grid, tensor-parallel regions and layers); `data`; `model`; `optim`;
//! `checkpoint`; `train`, `eval` and `generate`. `test_hooks` holds the
//! fault-injection switches of the integration tests.

pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod data;
pub mod eval;
pub use glm_common::error;
pub mod generate;
pub mod model;
pub mod optim;
pub mod parallel;
pub mod rng;
pub mod runtime;
pub mod test_hooks;
pub mod train;

pub use error::{Error, Result};

/// Tests that seed or draw from libtorch's global generator hold this lock:
/// the test harness runs tests on several threads, and a draw from another
/// test in between would change their random streams.
#[cfg(test)]
pub(crate) fn torch_rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
