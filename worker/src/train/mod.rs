//! Training: the step loop, evaluation, metrics.

pub mod metrics;
pub mod trainer;
