//! Configuration: DeepSpeed JSON (`ds`) and the original's `configs.json`
//! (`args`), both from `glm_common` (the launcher reads them too), merged
//! into the run configuration (`run`).

pub use glm_common::{args, ds};
pub mod run;
