//! The GLM model: parameters over flat buffers and the network over them.

pub mod autograd;
pub mod glm;
pub mod params;
