//! The optimizer step: AdamW, learning-rate schedules, the fp16 loss scaler,
//! and the optimizer that owns master weights and runs the whole update.

pub mod adamw;
pub mod optimizer;
pub mod scaler;
pub mod schedule;
