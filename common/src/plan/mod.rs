//! The planner: per-rank memory and step time of a training job, from its
//! configuration, the cluster and a device description, without libtorch
//! (`glm-launch plan`, and glm-launch's preflight check).

pub mod profile;
