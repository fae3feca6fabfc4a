//! What a device achieves: a built-in table of data-centre GPUs (datasheet
//! peaks and link bandwidths, each overridable), or a measured profile
//! (`glm-worker bench-step --profile-out`), which wins where it has a
//! figure.

use super::profile::{Dtype, Profile};

/// A GPU's datasheet figures (dense, no sparsity).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gpu {
    /// The name `--gpu` takes.
    pub key: &'static str,
    pub name: &'static str,
    /// Memory in MiB, as nvidia-smi and `cudaMemGetInfo` report it.
    pub memory_mib: u64,
    /// bf16/fp16 tensor-core peak, TFLOP/s.
    pub tflops_16: f64,
    /// TF32 tensor-core peak (fp32 matmuls with TF32 allowed).
    pub tflops_tf32: f64,
    /// fp32 without tensor cores (libtorch's default for fp32 matmuls).
    pub tflops_fp32: f64,
    /// Memory bandwidth, GB/s.
    pub hbm_gbps: f64,
    /// NVLink (or PCIe) bandwidth per GPU and direction, GB/s.
    pub intra_gbps: f64,
    /// Network bandwidth per GPU and direction between nodes, GB/s.
    pub inter_gbps: f64,
}

/// The built-in devices: NVIDIA's datasheets; network as in the reference
/// systems (DGX A100: 8 × 200 Gb/s HDR, DGX H100/H200: 8 × 400 Gb/s NDR,
/// one NIC per GPU; PCIe servers: one 200 Gb/s NIC per GPU).
pub const GPUS: &[Gpu] = &[
    Gpu {
        key: "a100-40gb",
        name: "A100 SXM 40GB",
        memory_mib: 40960,
        tflops_16: 312.0,
        tflops_tf32: 156.0,
        tflops_fp32: 19.5,
        hbm_gbps: 1555.0,
        intra_gbps: 300.0,
        inter_gbps: 25.0,
    },
    Gpu {
        key: "a100-80gb",
        name: "A100 SXM 80GB",
        memory_mib: 81920,
        tflops_16: 312.0,
        tflops_tf32: 156.0,
        tflops_fp32: 19.5,
        hbm_gbps: 2039.0,
        intra_gbps: 300.0,
        inter_gbps: 25.0,
    },
    Gpu {
        key: "h100-sxm",
        name: "H100 SXM 80GB",
        memory_mib: 81559,
        tflops_16: 989.0,
        tflops_tf32: 494.0,
        tflops_fp32: 67.0,
        hbm_gbps: 3350.0,
        intra_gbps: 450.0,
        inter_gbps: 50.0,
    },
    Gpu {
        key: "h100-pcie",
        name: "H100 PCIe 80GB",
        memory_mib: 81559,
        tflops_16: 756.0,
        tflops_tf32: 378.0,
        tflops_fp32: 51.0,
        hbm_gbps: 2000.0,
        intra_gbps: 64.0,
        inter_gbps: 25.0,
    },
    Gpu {
        key: "h200",
        name: "H200 SXM 141GB",
        memory_mib: 143771,
        tflops_16: 989.0,
        tflops_tf32: 494.0,
        tflops_fp32: 67.0,
        hbm_gbps: 4800.0,
        intra_gbps: 450.0,
        inter_gbps: 50.0,
    },
];

/// The keys `--gpu` accepts.
pub fn gpu_keys() -> String {
    GPUS.iter().map(|g| g.key).collect::<Vec<_>>().join(", ")
}

/// The table entry `key` names (case and `-`/`_` insensitive).
pub fn gpu(key: &str) -> Option<&'static Gpu> {
    let k = key.to_ascii_lowercase().replace('_', "-");
    GPUS.iter().find(|g| g.key == k)
}

/// The table entry of a GPU the CUDA driver names ("NVIDIA H100 80GB
/// HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-40GB", "NVIDIA H200"), if
/// the table has it. PCIe A100s have the SXM parts' peaks.
pub fn gpu_for_name(name: &str) -> Option<&'static Gpu> {
    let n = name.to_ascii_uppercase();
    // parts with other peaks than the table's (H100 NVL, the export models H800/A800, ...)
    if n.contains("NVL") {
        return None;
    }
    let key = if n.contains("H200") {
        "h200"
    } else if n.contains("H100") {
        if n.contains("PCIE") {
            "h100-pcie"
        } else {
            "h100-sxm"
        }
    } else if n.contains("A100") {
        if n.contains("80G") {
            "a100-80gb"
        } else {
            "a100-40gb"
        }
    } else {
        return None;
    };
    gpu(key)
}

/// Fractions of a datasheet peak a step's kernels reach, for a table
/// device, from the H200 measurements (docs/gpu_check_h200.log and the
/// issue that opened the GPU work): bf16 tensor-core GEMMs at GLM-Large's
/// shapes reached 568-685 of 989 TFLOP/s; the fp32 GLM-Base step ran at
/// 38 TFLOP/s executed of 67, GEMMs most of it; eager attention and
/// elementwise kernels far below.
pub const GEMM_EFFICIENCY: f64 = 0.62;
pub const FP32_GEMM_EFFICIENCY: f64 = 0.75;
pub const ATTENTION_EFFICIENCY: f64 = 0.30;
pub const ELEMENTWISE_EFFICIENCY: f64 = 0.55;
pub const BUS_EFFICIENCY: f64 = 0.80;
/// A CUDA rank's memory before the model: the context and libtorch's
/// kernels (the H200's default run used 1.26 GB at its peak, about 0.5 GB
/// of it the run's own tensors); NCCL's buffers add `NCCL_BYTES` when
/// there are several ranks.
pub const CUDA_BASELINE_BYTES: u64 = 800_000_000;
pub const NCCL_BYTES: u64 = 300_000_000;
/// Kernels an eager layer launches, forward and backward (LayerNorms,
/// matmuls, bias, GeLU, dropout, residuals, attention, their gradients),
/// and the head, loss and optimizer's; each costs the host `LAUNCH_S`
/// whatever its size: what bounds a step of small kernels.
pub const KERNELS_PER_LAYER: f64 = 75.0;
pub const KERNELS_OUTSIDE_LAYERS: f64 = 60.0;
pub const LAUNCH_S: f64 = 8e-6;
/// The caching allocator's rounding and fragmentation on top of what is
/// live (a fraction of activations and transients).
pub const CUDA_FRAGMENTATION: f64 = 0.10;

/// A CPU rank under glibc's allocator (a `cpu` profile), beyond the
/// profile's baseline: libtorch's first training step initialises about
/// this much more (the autograd engine, oneDNN's primitives and kernels),
/// and the heap keeps what the gradients' temporaries took (autograd
/// computes every parameter's gradient afresh before adding it in; glibc
/// retains the freed memory), about this fraction of the model states.
/// Fitted (least squares) on a run of this project's CPU grid
/// (bench/plan_grid.py, docs/scale.md): what is alive is planned within 12%
/// there without them (`MALLOC_MMAP_THRESHOLD_=65536` returns freed memory
/// at once), and glibc's retention added 75-270 MB.
pub const CPU_STEP_INIT_BYTES: u64 = 110_000_000;
pub const CPU_HEAP_RETENTION: f64 = 0.28;

/// The device a plan is for: a table GPU with overrides, or a profile.
#[derive(Clone, Debug)]
pub struct Device {
    pub name: String,
    pub cuda: bool,
    pub memory_bytes: u64,
    pub baseline_bytes: u64,
    /// Peak (or best measured) matmul TFLOP/s per dtype: MFU's denominator.
    pub peak_tflops: [f64; 3],
    pub hbm_gbps: f64,
    /// Bus bandwidth of collectives inside a node and between nodes.
    pub intra_bus_gbps: f64,
    pub inter_bus_gbps: f64,
    pub fragmentation: f64,
    /// `memory_bytes` is a host's, shared by the ranks on it (a CPU profile).
    pub shared_by_node: bool,
    /// Allocator overhead of a CPU rank: fixed bytes, and a fraction of
    /// the model states (`CPU_STEP_INIT_BYTES`, `CPU_HEAP_RETENTION`).
    pub step_init_bytes: u64,
    pub heap_retention: f64,
    pub profile: Option<Profile>,
    /// TF32 matmuls for fp32 (libtorch's default is off).
    pub tf32: bool,
}

fn slot(d: Dtype) -> usize {
    match d {
        Dtype::Fp32 => 0,
        Dtype::Bf16 => 1,
        Dtype::Fp16 => 2,
    }
}

impl Device {
    pub fn from_gpu(g: &Gpu, tf32: bool) -> Device {
        let fp32 = if tf32 { g.tflops_tf32 } else { g.tflops_fp32 };
        Device {
            name: g.name.to_string(),
            cuda: true,
            memory_bytes: g.memory_mib << 20,
            baseline_bytes: CUDA_BASELINE_BYTES,
            peak_tflops: [fp32, g.tflops_16, g.tflops_16],
            hbm_gbps: g.hbm_gbps,
            intra_bus_gbps: g.intra_gbps * BUS_EFFICIENCY,
            inter_bus_gbps: g.inter_gbps * BUS_EFFICIENCY,
            fragmentation: CUDA_FRAGMENTATION,
            shared_by_node: false,
            step_init_bytes: 0,
            heap_retention: 0.0,
            profile: None,
            tf32,
        }
    }

    pub fn from_profile(p: Profile) -> Device {
        let cuda = p.kind == "cuda";
        let best = |d: Dtype| p.gemm.iter().filter(|g| g.dtype == d).map(|g| g.tflops).fold(0.0, f64::max);
        let bus = p.collectives.iter().filter(|c| c.op == "all_reduce").map(|c| c.bus_gbps).fold(0.0, f64::max);
        let ew = p.elementwise_gbps.get("fp32").copied().unwrap_or(0.0);
        Device {
            name: format!("{} ({} profile, {} thread(s))", p.device, p.kind, p.threads),
            cuda,
            memory_bytes: p.memory_bytes,
            baseline_bytes: p.baseline_bytes,
            peak_tflops: [best(Dtype::Fp32), best(Dtype::Bf16), best(Dtype::Fp16)],
            hbm_gbps: ew,
            intra_bus_gbps: bus,
            inter_bus_gbps: bus,
            fragmentation: if cuda { CUDA_FRAGMENTATION } else { 0.0 },
            shared_by_node: !cuda,
            step_init_bytes: if cuda { 0 } else { CPU_STEP_INIT_BYTES },
            heap_retention: if cuda { 0.0 } else { CPU_HEAP_RETENTION },
            profile: Some(p),
            tf32: false,
        }
    }

    pub fn peak(&self, d: Dtype) -> f64 {
        let p = self.peak_tflops[slot(d)];
        if p > 0.0 {
            p
        } else {
            self.peak_tflops[0]
        }
    }

    /// TFLOP/s of an `(m × k)·(k × n)` matmul: the profile's measurement of
    /// the nearest shape in this dtype (nearest in log-size per dimension),
    /// else the peak × `GEMM_EFFICIENCY`, less for a small shape (a matmul
    /// with a dimension under 1024 keeps fewer units busy).
    pub fn gemm_tflops(&self, d: Dtype, m: u64, n: u64, k: u64) -> f64 {
        if let Some(p) = &self.profile {
            let dist =
                |g: &super::profile::Gemm| [(g.m, m), (g.n, n), (g.k, k)].iter().map(|&(a, b)| (a.max(1) as f64 / b.max(1) as f64).ln().abs()).sum::<f64>();
            if let Some(g) = p.gemm.iter().filter(|g| g.dtype == d && g.tflops > 0.0).min_by(|a, b| dist(a).total_cmp(&dist(b))) {
                return g.tflops;
            }
        }
        let small = (m.min(n).min(k) as f64 / 1024.0).min(1.0).sqrt();
        let eff = if d == Dtype::Fp32 && !self.tf32 { FP32_GEMM_EFFICIENCY } else { GEMM_EFFICIENCY };
        self.peak(d) * eff * small.max(0.1)
    }

    /// TFLOP/s of the attention's forward and backward at `(b, a, s, d)`:
    /// the profile's nearest measurement (same dtype and dropout), else
    /// the peak × `ATTENTION_EFFICIENCY`.
    pub fn attention_tflops(&self, dt: Dtype, dropout: bool, b: u64, a: u64, s: u64, hd: u64) -> f64 {
        if let Some(p) = &self.profile {
            let size = |x: f64| x.ln();
            let want = size((b * a * s * s * hd) as f64);
            let near = p.attention.iter().filter(|x| x.dtype == dt && x.dropout == dropout && x.tflops > 0.0).min_by(|x, y| {
                (size((x.batch * x.heads * x.seq * x.seq * x.head_dim) as f64) - want)
                    .abs()
                    .total_cmp(&(size((y.batch * y.heads * y.seq * y.seq * y.head_dim) as f64) - want).abs())
            });
            if let Some(x) = near {
                return x.tflops;
            }
        }
        self.peak(dt) * ATTENTION_EFFICIENCY
    }

    /// Effective bandwidth of elementwise kernels in `d`, GB/s.
    pub fn elementwise_gbps(&self, d: Dtype) -> f64 {
        if let Some(p) = &self.profile {
            if let Some(v) = p.elementwise_gbps.get(d.name()).or(p.elementwise_gbps.get("fp32")) {
                return *v;
            }
        }
        self.hbm_gbps * ELEMENTWISE_EFFICIENCY
    }

    /// The profile's measured elementwise costs in `d`, if it has them.
    pub fn elementwise_ns(&self, d: Dtype) -> Option<super::profile::ElementwiseNs> {
        self.profile.as_ref()?.elementwise_ns.get(d.name()).copied()
    }

    /// The profile's measured optimizer cost per shard element, if any.
    pub fn optimizer_ns(&self) -> Option<f64> {
        self.profile.as_ref()?.optimizer_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::profile::{Gemm, Profile};

    #[test]
    fn table_lookups() {
        assert_eq!(gpu("H100_SXM").unwrap().tflops_16, 989.0);
        assert!(gpu("v100").is_none());
        for (name, key) in [
            ("NVIDIA H100 80GB HBM3", Some("h100-sxm")),
            ("NVIDIA H100 PCIe", Some("h100-pcie")),
            ("NVIDIA H200", Some("h200")),
            ("NVIDIA A100-SXM4-40GB", Some("a100-40gb")),
            ("NVIDIA A100 80GB PCIe", Some("a100-80gb")),
            ("Tesla V100-SXM2-16GB", None),
            ("NVIDIA H100 NVL", None),
            ("NVIDIA H800", None),
        ] {
            assert_eq!(gpu_for_name(name).map(|g| g.key), key, "{name}");
        }
        let d = Device::from_gpu(gpu("a100-40gb").unwrap(), false);
        assert_eq!(d.peak(Dtype::Fp32), 19.5);
        assert_eq!(d.gemm_tflops(Dtype::Fp32, 8192, 4096, 1024), 19.5 * FP32_GEMM_EFFICIENCY);
        assert_eq!(d.gemm_tflops(Dtype::Bf16, 8192, 4096, 1024), 312.0 * GEMM_EFFICIENCY);
        assert_eq!(d.gemm_tflops(Dtype::Bf16, 8192, 4096, 256), 312.0 * GEMM_EFFICIENCY * 0.5);
    }

    #[test]
    fn profile_picks_the_nearest_shape() {
        let g = |m, n, k, t| Gemm { dtype: Dtype::Fp32, m, n, k, tflops: t };
        let p = Profile {
            elementwise_gbps: [("fp32".to_string(), 5.0)].into(),
            memory_bytes: 1 << 30,
            ..Profile::for_tests(vec![g(256, 256, 256, 0.05), g(2048, 768, 256, 0.08), g(2048, 256, 1024, 0.07)])
        };
        let d = Device::from_profile(p);
        assert_eq!(d.gemm_tflops(Dtype::Fp32, 2048, 768, 256), 0.08);
        assert_eq!(d.gemm_tflops(Dtype::Fp32, 4096, 256, 1024), 0.07);
        assert_eq!(d.peak(Dtype::Fp32), 0.08);
        // no bf16 measured: the fp32 best, discounted as a table device would be
        assert_eq!(d.gemm_tflops(Dtype::Bf16, 300, 300, 300), 0.08 * GEMM_EFFICIENCY * (300.0f64 / 1024.0).sqrt());
        assert_eq!(d.gemm_tflops(Dtype::Fp32, 300, 300, 300), 0.05);
        assert_eq!(d.elementwise_gbps(Dtype::Bf16), 5.0);
    }
}
