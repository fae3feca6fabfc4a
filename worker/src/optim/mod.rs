//! The optimizer step: AdamW, learning-rate schedules, the fp16 loss scaler,
//! ZeRO's partition geometry, and the distributed optimizer that owns master
//! weights, moments and gradient reduction and runs the whole update.

pub mod adamw;
pub mod optimizer;
pub mod scaler;
pub mod schedule;
pub mod zero;
