//! Configuration: DeepSpeed JSON (`ds`) and the original's `configs.json` (`args`).

pub mod args;
pub mod ds;
pub mod run;
