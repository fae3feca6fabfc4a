//! Quantities and names as messages print them.

// moved to glm_common, which glm-launch shares (its preflight prints free disk)
pub use glm_common::units::{human_bytes, human_count};

/// A device as the CLI names it (cpu, cuda:0).
pub fn device_name(d: tch::Device) -> String {
    match d {
        tch::Device::Cpu => "cpu".into(),
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A floating-point element type as configs name it (fp32, bf16, fp16).
pub fn kind_name(k: tch::Kind) -> String {
    match k {
        tch::Kind::Float => "fp32".into(),
        tch::Kind::BFloat16 => "bf16".into(),
        tch::Kind::Half => "fp16".into(),
        tch::Kind::Double => "fp64".into(),
        other => format!("{other:?}"),
    }
}
