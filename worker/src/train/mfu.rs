//! Model FLOPs utilisation: the model FLOPs a run does per second (6·N +
//! 12·L·h·s per token, `GlmConfig::flops_per_token`; recomputation of
//! activation checkpointing does not count, as in PaLM's and torchtitan's
//! MFU) over what the devices could do at the run's precision.
//!
//! The peak per device: on a GPU the datasheet's dense figure for the run's
//! precision (bf16/fp16 tensor cores; fp32 without TF32, libtorch's default
//! for fp32 matmuls) from the planner's table (A100 40/80 GB, H100 SXM/PCIe,
//! H200), found by the name the driver gives; a GPU not in the table has no
//! MFU. On the CPU there is no datasheet: a short probe at start times a
//! 512² matmul in the run's dtype on the rank's threads and takes the best
//! of a few, so the CPU's "MFU" is the step's share of a matmul's speed on
//! this machine.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::optim::optimizer::Precision;

/// What MFU is measured against, per rank.
#[derive(Clone, Debug, PartialEq)]
pub struct Peak {
    /// FLOP/s of one rank's device.
    pub flops: f64,
    /// Where the figure comes from, for the log.
    pub source: String,
}

/// The peak of `device` at `precision`, or `None` (a GPU the table lacks).
pub fn peak(device: Device, precision: Precision) -> Option<Peak> {
    let p = match precision {
        Precision::Fp32 => "fp32",
        Precision::Bf16 => "bf16",
        Precision::Fp16 => "fp16",
    };
    match device {
        Device::Cuda(i) => {
            let name = crate::runtime::cuda::device_name(i)?;
            let g = glm_common::plan::device::gpu_for_name(&name)?;
            let tflops = if precision == Precision::Fp32 { g.tflops_fp32 } else { g.tflops_16 };
            Some(Peak { flops: tflops * 1e12, source: format!("{tflops} TFLOP/s, the {p} dense datasheet peak of {} ({name})", g.name) })
        }
        _ => {
            let kind = match precision {
                Precision::Fp32 => Kind::Float,
                Precision::Bf16 => Kind::BFloat16,
                Precision::Fp16 => Kind::Half,
            };
            let flops = cpu_matmul_flops(kind, 512)?;
            Some(Peak {
                flops,
                source: format!("{:.3} TFLOP/s, a {p} 512² matmul measured at start on {} thread(s) (no CPU datasheet)", flops / 1e12, tch::get_num_threads()),
            })
        }
    }
}

/// The best FLOP/s of an `n × n` matmul in `kind` over a few runs (a tenth
/// of a second at most after the third), or `None` when the CPU cannot run
/// that dtype.
fn cpu_matmul_flops(kind: Kind, n: i64) -> Option<f64> {
    tch::no_grad(|| {
        let a = Tensor::f_randn([n, n], (Kind::Float, Device::Cpu)).ok()?.f_to_kind(kind).ok()?;
        let b = a.f_transpose(0, 1).ok()?.contiguous();
        let _ = a.f_matmul(&b).ok()?;
        let (mut best, start) = (f64::MAX, Instant::now());
        let mut runs = 0;
        while runs < 3 || (start.elapsed().as_secs_f64() < 0.1 && runs < 50) {
            let t = Instant::now();
            let c = a.f_matmul(&b).ok()?;
            let _ = c.f_sum(Kind::Float).ok()?.double_value(&[]);
            best = best.min(t.elapsed().as_secs_f64());
            runs += 1;
        }
        Some(2.0 * (n * n * n) as f64 / best)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_probe_measures_a_plausible_rate() {
        let p = peak(Device::Cpu, Precision::Fp32).unwrap();
        // anything from a slow emulator to a large server
        assert!(p.flops > 1e8 && p.flops < 1e14, "{p:?}");
        assert!(p.source.contains("measured at start"), "{}", p.source);
    }
}
