//! The data pipeline: corpus files -> documents -> token store -> GLM samples.

pub mod blocklm;
pub mod build;
pub mod corpus;
pub mod fortunes;
pub mod mixture;
pub mod prepare;
pub mod sentencepiece;
pub mod split;
pub mod store;
pub mod tokenizer;
