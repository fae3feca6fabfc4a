//! Training: the step (shared by the trainer and `bench-step`), the step
//! loop, evaluation, metrics.

pub mod build;
pub mod data;
pub mod metrics;
pub mod mfu;
pub mod save_dir;
pub mod step;
pub mod tensorboard;
pub mod trainer;
