//! The time of one training step on one rank: compute from the work and
//! the device's achievable rates, communication from the bytes each rank
//! sends over the links they cross.

use serde::Serialize;

use super::device::Device;
use super::memory::{Dropouts, Kernel};
use super::model::{micro_batch_work, Shape};
use super::profile::Dtype;
use super::{Cluster, Layout};

/// Latency of one collective call, seconds (a ring's start-up; NCCL's and
/// a shared-memory MPI's are both of this order).
pub const COLLECTIVE_LATENCY_S: f64 = 20e-6;

/// One step's time and its parts, per rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Speed {
    /// FLOPs this rank executes per step (recomputation and GLM's logits at
    /// the loss positions as they are).
    pub executed_flops: f64,
    pub gemm_s: f64,
    pub attention_s: f64,
    /// LayerNorm, GeLU, dropout, residuals, softmax, the loss, gradient
    /// accumulation: bytes moved over the elementwise bandwidth.
    pub elementwise_s: f64,
    /// Clipping, AdamW and the copy back to the compute dtype.
    pub optimizer_s: f64,
    /// The host's cost of launching every kernel (eager execution).
    pub launch_s: f64,
    /// Bytes this rank sends per step, tensor-parallel and data-parallel.
    pub tp_bytes: f64,
    pub dp_bytes: f64,
    pub tp_comm_s: f64,
    pub dp_comm_s: f64,
    /// This implementation: collectives on the compute stream, no overlap.
    pub step_s: f64,
    /// With the data-parallel reduction overlapped with the last
    /// micro-batch's backward (DeepSpeed's overlap_comm).
    pub step_overlap_s: f64,
    /// The whole job's tokens per second, and its model FLOPs utilisation
    /// against the device's peak for the precision.
    pub tokens_per_s: f64,
    pub mfu: f64,
}

/// The step of `l` on `dev` for a micro-batch with `loss_tokens` loss
/// positions, on a cluster of `c`: `s` is one pipeline stage of the model
/// `full` (the whole model without pipeline parallelism).
#[allow(clippy::too_many_arguments)]
pub fn step(s: &Shape, full: &Shape, l: &Layout, dev: &Device, c: &Cluster, loss_tokens: f64, drop: &Dropouts, kernel: Kernel) -> Speed {
    let d = l.dtype;
    let e = d.bytes() as f64;
    let p = l.tp as f64;
    let b = l.micro;
    let m = b * s.seq;
    let (h, f) = (s.hidden, s.ffn);
    let recomputed = if l.checkpoint_layers > 0 { s.layers } else { 0 };
    let w = micro_batch_work(s, l.tp, b, loss_tokens, recomputed);
    let passes = 3.0 + recomputed as f64 / s.layers as f64;
    // the layers' four matmuls at their shapes, forward (and backward at
    // the same rate), then the logits at the loss positions
    let gemms = [(m, 3 * h / l.tp, h), (m, h, h / l.tp), (m, f / l.tp, h), (m, h, f / l.tp)];
    let mut gemm_s = 0.0;
    for (gm, gn, gk) in gemms {
        let flops = 2.0 * (gm * gn * gk) as f64 * passes * s.layers as f64;
        gemm_s += flops / (dev.gemm_tflops(d, gm, gn, gk) * 1e12);
    }
    if loss_tokens > 0.0 {
        gemm_s += w.logits / (dev.gemm_tflops(d, loss_tokens.round() as u64, s.vocab / l.tp, h) * 1e12);
    }
    let attention_s = w.attention / (dev.attention_tflops(d, drop.attention > 0.0, b, s.heads / l.tp, s.seq, h / s.heads) * 1e12);
    // elementwise traffic: per layer forward 17·t·e replicated (two
    // LayerNorms, two dropouts, two residual adds, reading and writing),
    // (2 + 2f/h)·t·e split (the GeLU over the MLP's width, the attention
    // output's transposed copy); backward twice that; the unfused
    // attention's mask, softmax and dropout over the scores; the loss's
    // fp32 logits
    let t = (m * h) as f64;
    // the MLP's width in units of h (4 unless intermediate_size says otherwise)
    let wf = f as f64 / h as f64;
    let mut fwd = 17.0 * t * e + (2.0 + 2.0 * wf) * t * e / p;
    if let Kernel::Unfused { bytes } = kernel {
        let scores = (b * s.heads * s.seq * s.seq) as f64 / p;
        fwd += (8.0 * bytes as f64 + 1.0) * scores;
    }
    let logit_bytes = loss_tokens * (s.vocab / l.tp) as f64 * (32.0 + 2.0 * e);
    let mixed = d != Dtype::Fp32;
    let padded = s.padded_per_rank(l.tp, l.dp) as f64;
    // stages 0-1 in 16-bit add each micro-batch's gradients into the fp32 accumulator
    let accumulate = if mixed && l.zero < 2 { padded * (e + 8.0) } else { 0.0 };
    let micro_bytes = fwd * passes * s.layers as f64 + logit_bytes + accumulate;
    let elementwise_s = match dev.elementwise_ns(d) {
        // measured per kernel (a CPU profile): per layer two LayerNorms,
        // two dropouts, the GeLU over the MLP's width, and the adds (the
        // residuals forward and backward, the transposed copy, the biases'
        // gradients: 6t + (5 + f/h)·t/p elements); recomputation repeats the
        // forward's share; the embeddings' adds and dropout, the
        // loss's log-softmax, the gradients' accumulation
        Some(ns) => {
            let dropout = if drop.hidden > 0.0 { ns.dropout } else { 0.0 };
            let layer = t * (2.0 * ns.layer_norm + 2.0 * dropout + wf / p * ns.gelu + (6.0 + (5.0 + wf) / p) * ns.add);
            // (the forward's share is about half: dropout's random draw and
            // the LayerNorm's statistics happen there)
            let layers = layer * s.layers as f64 * (1.0 + recomputed as f64 / s.layers as f64 / 2.0);
            let head = t * (3.0 * ns.add + dropout) + loss_tokens * (s.vocab / l.tp) as f64 * ns.log_softmax;
            // every parameter's gradient added into the flat buffer (or a
            // stage-2 bucket), and in 16 bits into the fp32 accumulator too
            let acc = padded * ns.large_add() * if mixed && l.zero < 2 { 3.0 } else { 1.0 };
            (layers + head + acc) * 1e-9
        }
        None => micro_bytes / (dev.elementwise_gbps(d) * 1e9),
    };
    // the optimizer over this rank's shard: AdamW reads and writes weights
    // and moments, reads the gradient (28 bytes), the norm and clipping
    // pass over the gradient (12), the copy back to the compute dtype;
    // the gradients zeroed
    let shard = if l.zero > 0 { padded / l.dp as f64 } else { padded };
    let opt_bytes = shard * (40.0 + if mixed { 4.0 + e } else { 0.0 }) + padded * e * 2.0;
    let optimizer_s = match (dev.optimizer_ns(), dev.elementwise_ns(d)) {
        // measured: AdamW, the norm and the zeroing per shard element, and
        // the copy back to the compute dtype
        (Some(o), Some(ns)) => (shard * o + if mixed { padded * ns.large_add() } else { 0.0 }) * 1e-9,
        _ => opt_bytes / (dev.elementwise_gbps(Dtype::Fp32) * 1e9),
    };
    // tensor parallelism, per micro-batch: per layer two all-reduces of
    // the row-parallel outputs forward, two of the column-parallel inputs'
    // gradients backward (again forward when recomputed), the embedding's
    // all-reduce, the logits' input gradient
    let ring = |n: f64, ranks: f64| 2.0 * (ranks - 1.0) / ranks * n;
    let (tp_bytes, tp_calls) = if l.tp > 1 {
        let calls = s.layers as f64 * (4.0 + 2.0 * recomputed as f64 / s.layers as f64) + 1.0;
        let bytes = ring(t * e, p) * calls + ring(loss_tokens * h as f64 * e, p);
        (bytes * l.accum as f64, (calls + 4.0) * l.accum as f64)
    } else {
        (0.0, 0.0)
    };
    // data parallelism, per step: stage 0 all-reduces the fp32 (or fp32
    // accumulator) gradients; stage 1 reduce-scatters them and all-gathers
    // the compute-dtype weights; stage 2 reduce-scatters compute-dtype
    // buckets every micro-batch and all-gathers the weights
    let dp = l.dp as f64;
    let half = |n: f64| (dp - 1.0) / dp * n;
    let (dp_bytes, dp_calls) = if l.dp > 1 {
        let units = (padded / super::memory::unit(s, l) as f64).ceil();
        match l.zero {
            0 => (ring(4.0 * padded, dp), 1.0),
            1 => (half(4.0 * padded) + half(e * padded), 2.0 * units),
            _ => (half(e * padded) * l.accum as f64 + half(e * padded), units * (l.accum as f64 + 1.0)),
        }
    } else {
        (0.0, 0.0)
    };
    let over = |bytes: f64, gbps: f64| if bytes > 0.0 { bytes / (gbps * 1e9) } else { 0.0 };
    let tp_comm_s = over(tp_bytes, c.tp_bus_gbps(dev)) + tp_calls * COLLECTIVE_LATENCY_S;
    let dp_comm_s = over(dp_bytes, c.dp_bus_gbps(dev)) + dp_calls * COLLECTIVE_LATENCY_S;
    // every kernel's launch, however small (recomputed layers launch their forward again)
    let kernels = super::device::KERNELS_PER_LAYER * s.layers as f64 * (1.0 + recomputed as f64 / s.layers as f64 / 3.0);
    let launch_s = (kernels + super::device::KERNELS_OUTSIDE_LAYERS) * super::device::LAUNCH_S;
    let micro_s = gemm_s + attention_s + elementwise_s + launch_s;
    // 1F1B: accum micro-batches through pp stages take accum + pp − 1 slots
    let slots = (l.accum + l.pp.max(1) - 1) as f64;
    let compute = micro_s * slots + optimizer_s;
    let step_s = compute + tp_comm_s * slots / l.accum as f64 + dp_comm_s;
    // overlap hides the reduction behind the last micro-batch's backward (⅔ of it)
    let step_overlap_s = compute + tp_comm_s * slots / l.accum as f64 + (dp_comm_s - micro_s * 2.0 / 3.0).max(0.0);
    let world = (l.tp * l.pp.max(1) * l.dp) as f64;
    let tokens_per_s = (l.micro * l.accum * l.dp * s.seq) as f64 / step_s;
    let mfu = full.model_flops_per_token() * tokens_per_s / (world * dev.peak(d) * 1e12);
    Speed {
        executed_flops: w.total() * l.accum as f64,
        gemm_s: gemm_s * slots,
        attention_s: attention_s * slots,
        elementwise_s: elementwise_s * slots,
        optimizer_s,
        launch_s: launch_s * slots,
        tp_bytes,
        dp_bytes,
        tp_comm_s,
        dp_comm_s,
        step_s,
        step_overlap_s,
        tokens_per_s,
        mfu,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::device::{gpu, Device};

    const DROP: Dropouts = Dropouts { hidden: 0.1, attention: 0.1, fp32_layernorm: false, attention_scale: 1.0 };

    fn shape() -> Shape {
        Shape { vocab: 16000, hidden: 256, layers: 4, heads: 4, ffn: 1024, max_position_embeddings: 128, block_position: true, seq: 128 }
    }

    fn layout(zero: u8, dtype: Dtype) -> Layout {
        Layout { tp: 1, pp: 1, dp: 2, zero, micro: 4, accum: 1, checkpoint_layers: 0, dtype, reduce_bucket: 2_000_000, allgather_bucket: 500_000_000 }
    }

    /// The bytes each rank sends per step, as the README measured them at
    /// DP 2 (GLM 4×256, vocab 16000): fp32 29.29 MB at every stage; bf16
    /// 29.29 / 21.96 / 14.64 MB at stages 0 / 1 / 2.
    #[test]
    fn data_parallel_bytes_match_the_measured() {
        let dev = Device::from_gpu(gpu("h100-sxm").unwrap(), false);
        let c = Cluster { nodes: 1, per_node: 2 };
        let mb = |z, d| (step(&shape(), &shape(), &layout(z, d), &dev, &c, 256.0, &DROP, Kernel::Fused).dp_bytes / 1e4).round() / 100.0;
        assert_eq!([mb(0, Dtype::Fp32), mb(1, Dtype::Fp32), mb(2, Dtype::Fp32)], [29.29, 29.29, 29.29]);
        assert_eq!([mb(0, Dtype::Bf16), mb(1, Dtype::Bf16), mb(2, Dtype::Bf16)], [29.29, 21.96, 14.64]);
    }

    /// Tensor parallelism 2, one micro-batch of t = 4·128·256 elements in
    /// fp32 (4 bytes): per layer 4 all-reduces, plus the embedding's, each
    /// sending 2·(2−1)/2 × 4t bytes; plus the logits' input gradient.
    #[test]
    fn tensor_parallel_bytes_by_hand() {
        let dev = Device::from_gpu(gpu("h100-sxm").unwrap(), false);
        let c = Cluster { nodes: 1, per_node: 2 };
        let l = Layout { tp: 2, dp: 1, ..layout(0, Dtype::Fp32) };
        let sp = step(&shape(), &shape(), &l, &dev, &c, 256.0, &DROP, Kernel::Fused);
        let t = 4.0 * 128.0 * 256.0;
        assert_eq!(sp.tp_bytes, 17.0 * 4.0 * t + 256.0 * 256.0 * 4.0);
        assert_eq!(sp.dp_bytes, 0.0);
        assert!(sp.step_overlap_s <= sp.step_s);
        assert!(sp.mfu > 0.0 && sp.mfu < 1.0, "{}", sp.mfu);
    }

    /// A profile's measured costs, by hand: per layer t·(2·LN + 2·dropout +
    /// 4/p·GeLU + (6 + 9/p)·add) ns with t = 4·128·256 elements, the head's
    /// 3t adds and a dropout plus 256 loss positions × 16000 log-softmax,
    /// the gradients' pass over the padded buffer; the optimizer's ns per
    /// shard element.
    #[test]
    fn measured_elementwise_and_optimizer_costs() {
        use crate::plan::profile::{ElementwiseNs, Gemm, Profile};
        let ns = ElementwiseNs { layer_norm: 1.0, gelu: 2.0, dropout: 3.0, add: 0.5, log_softmax: 4.0, add_large: 0.25 };
        let p = Profile {
            elementwise_ns: [("fp32".to_string(), ns)].into(),
            optimizer_ns: Some(2.0),
            baseline_bytes: 0,
            ..Profile::for_tests(vec![Gemm { dtype: Dtype::Fp32, m: 512, n: 512, k: 512, tflops: 0.1 }])
        };
        let dev = Device::from_profile(p);
        let c = Cluster { nodes: 1, per_node: 1 };
        let l = Layout { dp: 1, ..layout(0, Dtype::Fp32) };
        let sp = step(&shape(), &shape(), &l, &dev, &c, 256.0, &DROP, Kernel::Fused);
        let t = 4.0 * 128.0 * 256.0;
        let layer = t * (2.0 * 1.0 + 2.0 * 3.0 + 4.0 * 2.0 + 15.0 * 0.5);
        let padded = shape().padded_per_rank(1, 1) as f64;
        let want = (4.0 * layer + t * (3.0 * 0.5 + 3.0) + 256.0 * 16000.0 * 4.0 + padded * 0.25) * 1e-9;
        assert!((sp.elementwise_s - want).abs() < 1e-12, "{} vs {want}", sp.elementwise_s);
        assert!((sp.optimizer_s - padded * 2.0 * 1e-9).abs() < 1e-12);
    }

    /// On a table device with everything large, time ≈ executed FLOPs at
    /// the GEMM efficiency: the compute part cannot beat the peak.
    #[test]
    fn compute_bounded_by_the_peak() {
        let dev = Device::from_gpu(gpu("h100-sxm").unwrap(), false);
        let c = Cluster { nodes: 1, per_node: 1 };
        let s = Shape { vocab: 30592, hidden: 1024, layers: 24, heads: 16, ffn: 4096, max_position_embeddings: 512, block_position: true, seq: 512 };
        let l = Layout { tp: 1, dp: 1, micro: 16, ..layout(0, Dtype::Bf16) };
        let sp = step(&s, &s, &l, &dev, &c, 4096.0, &DROP, Kernel::Fused);
        assert!(sp.executed_flops / sp.step_s < 989e12 * crate::plan::device::GEMM_EFFICIENCY);
        assert!(sp.mfu > 0.1 && sp.mfu < 0.62, "{}", sp.mfu);
    }
}
