//! Training: the step (shared by the trainer and `bench-step`), the step
//! loop, evaluation, metrics.

pub mod metrics;
pub mod step;
pub mod trainer;
