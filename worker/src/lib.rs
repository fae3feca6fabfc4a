//! glm_worker: the library behind `glm-worker`.
//!
//! Data flows one way: text -> token store -> blank-infilling samples ->
//! batches -> model -> loss -> gradients -> optimizer -> checkpoint.
//! This crate currently holds the data half (`data`), the reproducible RNG
//! every random decision draws from (`rng`) and libtorch start-up (`runtime`).

pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod data;
pub use glm_common::error;
pub mod generate;
pub mod model;
pub mod optim;
pub mod parallel;
pub mod rng;
pub mod runtime;
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

pub mod eval;
