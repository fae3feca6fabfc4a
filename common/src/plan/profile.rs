//! A device profile: what one rank of a machine achieves, measured by
//! `glm-worker bench-step --profile-out` and read by the planner
//! (`glm-launch plan --profile`). JSON, versioned; every rate is what a
//! training step sees (forward and backward kernels, this build of
//! libtorch, this thread count), not a datasheet peak.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The `format` field of a profile file.
pub const PROFILE_FORMAT: &str = "glm-profile";
/// The profile format this code writes and reads.
pub const PROFILE_VERSION: u32 = 1;

/// Element types the planner distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Fp32,
    Bf16,
    Fp16,
}

impl Dtype {
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::Fp32 => 4,
            Dtype::Bf16 | Dtype::Fp16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Fp32 => "fp32",
            Dtype::Bf16 => "bf16",
            Dtype::Fp16 => "fp16",
        }
    }
    pub fn parse(s: &str) -> Option<Dtype> {
        match s {
            "fp32" => Some(Dtype::Fp32),
            "bf16" => Some(Dtype::Bf16),
            "fp16" => Some(Dtype::Fp16),
            _ => None,
        }
    }
}

/// A linear layer's matrix products at `(m × k) · (k × n)`: the forward,
/// the input's gradient `(m × n) · (n × k)` and the weight's
/// `(k × m) · (m × n)`; `tflops` = 3 · 2·m·n·k / their time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gemm {
    pub dtype: Dtype,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub tflops: f64,
}

/// Attention forward + backward as the model runs it
/// (`scaled_dot_product_attention` under a boolean mask): `tflops` counts
/// 4·b·a·s²·d forward and twice that backward (the recomputation of a fused
/// kernel's backward not counted).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attention {
    pub dtype: Dtype,
    pub batch: u64,
    pub heads: u64,
    pub seq: u64,
    pub head_dim: u64,
    /// With attention dropout (which may choose another kernel).
    pub dropout: bool,
    pub tflops: f64,
    /// Bytes the forward kept for backward, per (batch × heads × seq²):
    /// about 0 for a fused kernel, several for the unfused one (scores,
    /// probabilities, dropout mask). Absent: not measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_bytes_per_score: Option<f64>,
}

/// Nanoseconds per element of the kernels around a layer's matmuls,
/// forward and backward (`add`: forward only, one output element).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ElementwiseNs {
    pub layer_norm: f64,
    pub gelu: f64,
    pub dropout: f64,
    pub add: f64,
    pub log_softmax: f64,
    /// An in-place add over a buffer past the caches (8M elements): the
    /// passes over whole parameter-sized buffers (gradients added into the
    /// flat buffer, the fp32 accumulator, the copy back to 16 bits).
    #[serde(default)]
    pub add_large: f64,
}

impl ElementwiseNs {
    /// The cost of a pass over a whole parameter-sized buffer: the
    /// out-of-cache add, or the add where a profile has none.
    pub fn large_add(&self) -> f64 {
        if self.add_large > 0.0 {
            self.add_large
        } else {
            self.add
        }
    }
}

/// A collective's bus bandwidth over `ranks` ranks (NCCL-tests' convention:
/// an all-reduce moves 2(p−1)/p of its bytes per rank).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Collective {
    pub op: String,
    pub ranks: u64,
    pub bytes: u64,
    pub bus_gbps: f64,
}

/// What one rank of a machine achieves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub format: String,
    pub version: u32,
    /// `cpu` or `cuda`.
    pub kind: String,
    /// The device's name (CPU model or GPU name).
    pub device: String,
    /// Intra-op threads the measurements used (CPU).
    pub threads: u64,
    /// The device's memory: a GPU's, or the host's RAM and swap (CPU ranks
    /// share it: the planner divides it by the ranks a node holds).
    pub memory_bytes: u64,
    /// Memory a rank holds before the model: the process with libtorch
    /// initialised (CPU resident set), or the CUDA context and allocator
    /// (GPU).
    pub baseline_bytes: u64,
    pub gemm: Vec<Gemm>,
    pub attention: Vec<Attention>,
    /// Elementwise kernels' effective bandwidth (bytes read + written per
    /// second) per dtype, in GB/s: LayerNorm, GeLU, dropout, residuals and
    /// AdamW are bound by it.
    pub elementwise_gbps: std::collections::BTreeMap<String, f64>,
    /// The layer's elementwise kernels, per dtype: nanoseconds per element,
    /// forward and backward, at the model's activation size (on a CPU they
    /// are compute-bound, so bytes over a bandwidth mispredict them).
    #[serde(default)]
    pub elementwise_ns: std::collections::BTreeMap<String, ElementwiseNs>,
    /// The optimizer step per fp32 element of a rank's shard, nanoseconds:
    /// glm-worker's AdamW, the gradient's squared norm, the gradient zeroed.
    #[serde(default)]
    pub optimizer_ns: Option<f64>,
    #[serde(default)]
    pub collectives: Vec<Collective>,
    /// How it was measured.
    #[serde(default)]
    pub command: String,
    #[serde(default)]
    pub created: String,
}

impl Profile {
    pub fn load(path: &Path) -> Result<Profile> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: {e} (a profile from glm-worker bench-step --profile-out)", path.display())))?;
        let p: Profile =
            serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}:{}:{}: not a device profile: {e}", path.display(), e.line(), e.column())))?;
        if p.format != PROFILE_FORMAT {
            return Err(Error::Config(format!("{}: format \"{}\", expected \"{PROFILE_FORMAT}\"", path.display(), p.format)));
        }
        if p.version != PROFILE_VERSION {
            return Err(Error::Config(format!(
                "{}: profile version {}, this build reads version {PROFILE_VERSION}: measure again with glm-worker bench-step --profile-out",
                path.display(),
                p.version
            )));
        }
        if let Some(why) = p.invalid() {
            return Err(Error::Config(format!("{}: {why} (measure it again with glm-worker bench-step --profile-out)", path.display())));
        }
        Ok(p)
    }

    /// What makes the profile unusable: no GEMM measured, or a figure that
    /// is not a positive number (a rate, a memory size) or is negative (a
    /// cost).
    pub fn invalid(&self) -> Option<String> {
        let pos = |v: f64| v.is_finite() && v > 0.0;
        if self.gemm.is_empty() {
            return Some("no gemm measurements".into());
        }
        if let Some(g) = self.gemm.iter().find(|g| !pos(g.tflops) || g.m == 0 || g.n == 0 || g.k == 0) {
            return Some(format!("gemm {} ({}, {}, {}): {} TFLOP/s", g.dtype.name(), g.m, g.n, g.k, g.tflops));
        }
        if let Some(a) = self.attention.iter().find(|a| !pos(a.tflops)) {
            return Some(format!("attention {}: {} TFLOP/s", a.dtype.name(), a.tflops));
        }
        if let Some((k, v)) = self.elementwise_gbps.iter().find(|(_, v)| !pos(**v)) {
            return Some(format!("elementwise_gbps.{k}: {v}"));
        }
        for (k, ns) in &self.elementwise_ns {
            let all = [ns.layer_norm, ns.gelu, ns.dropout, ns.add, ns.log_softmax, ns.add_large];
            if all.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return Some(format!("elementwise_ns.{k}: {ns:?}"));
            }
        }
        if self.optimizer_ns.is_some_and(|v| !pos(v)) {
            return Some(format!("optimizer_ns: {:?}", self.optimizer_ns));
        }
        if let Some(c) = self.collectives.iter().find(|c| !pos(c.bus_gbps)) {
            return Some(format!("collective {}: {} GB/s", c.op, c.bus_gbps));
        }
        if self.memory_bytes == 0 || self.baseline_bytes >= self.memory_bytes {
            return Some(format!("memory_bytes {} and baseline_bytes {}: the baseline must be below the memory", self.memory_bytes, self.baseline_bytes));
        }
        None
    }
}

#[cfg(test)]
impl Profile {
    /// A CPU profile of one thread with these GEMM measurements and nothing
    /// else, for tests to fill in.
    pub(crate) fn for_tests(gemm: Vec<Gemm>) -> Profile {
        Profile {
            format: PROFILE_FORMAT.into(),
            version: PROFILE_VERSION,
            kind: "cpu".into(),
            device: "test".into(),
            threads: 1,
            memory_bytes: 1 << 34,
            baseline_bytes: 1 << 28,
            gemm,
            attention: vec![],
            elementwise_gbps: Default::default(),
            elementwise_ns: Default::default(),
            optimizer_ns: None,
            collectives: vec![],
            command: String::new(),
            created: String::new(),
        }
    }
}
