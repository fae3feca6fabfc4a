//! The GLM model: a flat parameter buffer and the network over it.

pub mod glm;
pub mod params;
