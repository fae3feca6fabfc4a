//! glm_common: what `glm-launch` and `glm-worker` share, with no libtorch,
//! MPI or GPU dependency, so the launcher builds and runs on a login node.
//!
//! - `error`: the error type, with `path:line:col` locations;
//! - `ds`: the DeepSpeed JSON config (batch rule, optimizer, scheduler,
//!   precision, ZeRO);
//! - `args`: the original's `configs.json`, key classes and `--set`;
//! - `dims`: the Megatron rank grid and its validation;
//! - `hostfile`: DeepSpeed/OpenMPI hostfiles and DeepSpeed's slot selection;
//! - `launch`: the environment contract between `glm-launch` and the workers;
//! - `text`: reading UTF-8 text files (a byte-order mark dropped, binary input named);
//! - `units`: bytes and counts as messages print them (three figures);
//! - `plan`: memory and speed of a job before it runs, and device profiles.

pub mod args;
pub mod dims;
pub mod ds;
pub mod error;
pub mod hostfile;
pub mod launch;
pub mod plan;
pub mod text;
pub mod units;

pub use error::{Error, Result};
