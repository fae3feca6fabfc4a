//! Memory one rank needs: model states exactly as glm-worker allocates
//! them, and estimates of the rest (buckets, activations, transients).

use super::model::Shape;
use super::profile::Dtype;
use super::Layout;

/// Model-state bytes of one rank, buffer by buffer as glm-worker's
/// optimizer keeps them (`Optimizer::memory`): exact, not a theory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct States {
    /// The flat parameter buffer in the compute dtype.
    pub params: u64,
    /// Gradients: the compute-dtype buffer (stages 0-1), the fp32
    /// accumulator of mixed precision (stages 0-1), the fp32 shard gradient
    /// (stages 1-2).
    pub grads: u64,
    /// fp32 master weights of this rank's shard (bf16/fp16).
    pub master: u64,
    /// AdamW's two fp32 moments of this rank's shard.
    pub moments: u64,
}

impl States {
    pub fn total(&self) -> u64 {
        self.params + self.grads + self.master + self.moments
    }
    /// What glm-worker calls optimizer state: masters and moments.
    pub fn optimizer(&self) -> u64 {
        self.master + self.moments
    }
}

/// The model states of one rank of `layout`.
pub fn states(s: &Shape, l: &Layout) -> States {
    let padded = s.padded_per_rank(l.tp, l.dp);
    let e = l.dtype.bytes();
    let mixed = l.dtype != Dtype::Fp32;
    // the optimizer partitions over data-parallel ranks only at stages 1-2
    let shard = if l.zero > 0 { padded / l.dp } else { padded };
    let grads = match l.zero {
        0 => padded * e + if mixed { 4 * padded } else { 0 },
        1 => padded * e + if mixed { 4 * padded } else { 0 } + 4 * shard,
        // the compute-dtype buffer released: buckets feed the fp32 shard
        _ => 4 * shard,
    };
    States { params: padded * e, grads, master: if mixed { 4 * shard } else { 0 }, moments: 8 * shard }
}

/// Elements of a ZeRO unit (a reduce-scatter bucket), as the worker cuts
/// the flat buffer: `reduce_bucket_size` rounded down to a multiple of
/// 64·dp, at least one such multiple, at most the buffer.
pub fn unit(s: &Shape, l: &Layout) -> u64 {
    let padded = s.padded_per_rank(l.tp, l.dp);
    let q = 64 * l.dp;
    (l.reduce_bucket / q * q).max(q).min(padded.max(q))
}

/// ZeRO's gradient buffers in flight during backward: stage 2 holds the
/// buckets of at most two units at once (a parameter's gradient can span
/// a unit's end; one when the buffer is one unit) in the compute dtype, and
/// with data parallelism a reduce-scatter's output of a unit's run; stage
/// 1 reduce-scatters each fp32 unit into a run-sized output.
pub fn buckets(s: &Shape, l: &Layout) -> f64 {
    let (u, e) = (unit(s, l) as f64, l.dtype.bytes() as f64);
    let units = (s.padded_per_rank(l.tp, l.dp) as f64 / u).ceil();
    let d = l.dp as f64;
    match l.zero {
        0 => 0.0,
        1 if l.dp == 1 => 0.0,
        1 => 4.0 * u / d,
        _ => units.min(2.0) * u * e + if l.dp > 1 { u * e / d } else { 0.0 },
    }
}

/// Host bytes a checkpoint written in the background copies on a rank of
/// `elements` parameters: the fp32 weights, and the Adam moments it saves
/// (whole at ZeRO stage 0, its shard over `dp` ranks at stages 1 and 2).
/// glm-worker's own start-up check and the planner both count it so.
pub fn snapshot_bytes(elements: u64, zero: u8, dp: u64, with_optimizer: bool) -> u64 {
    let moments = match (with_optimizer, zero) {
        (false, _) => 0,
        (true, 0) => 8 * elements,
        (true, _) => 8 * elements / dp.max(1),
    };
    4 * elements + moments
}

/// The scratch buffer of ZeRO's parameter all-gather after the update
/// (stages 1-2): a unit's runs are gathered `allgather_bucket_size / dp`
/// elements a rank at a time through a buffer of `allgather_bucket_size`
/// elements when a rank's run is longer, straight into place otherwise.
pub fn gather_scratch(s: &Shape, l: &Layout) -> u64 {
    if l.zero == 0 || l.dp == 1 {
        return 0;
    }
    let chunk = (l.allgather_bucket / l.dp).max(1);
    if chunk >= unit(s, l) / l.dp {
        0
    } else {
        chunk * l.dp * l.dtype.bytes()
    }
}

/// Which attention kernel the model's `scaled_dot_product_attention` (a
/// boolean mask) gets: a fused one keeps O(s) per head for backward; the
/// unfused one (libtorch's CPU path with attention dropout) keeps the
/// scores, their softmax and the dropout mask, O(s²), in fp32 for 16-bit
/// inputs on CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Fused,
    Unfused { bytes: u64 },
}

impl Kernel {
    /// The kernel glm-worker's attention gets: CUDA's are fused under any
    /// mask and dropout; libtorch's CPU flash kernel takes no dropout, so
    /// with attention dropout the unfused path runs, in fp32 for 16-bit
    /// inputs.
    pub fn of(cuda: bool, attention_dropout: f64, d: Dtype) -> Kernel {
        if cuda || attention_dropout == 0.0 {
            Kernel::Fused
        } else {
            Kernel::Unfused { bytes: d.bytes().max(4) }
        }
    }
}

/// Activation bytes of one micro-batch of `b` sequences on one rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Activations {
    /// One layer's saved tensors.
    pub per_layer: f64,
    /// Every layer's, without checkpointing.
    pub layers_full: f64,
    /// What the layers keep with this layout's checkpointing (chunk inputs,
    /// and one recomputed chunk's during backward).
    pub layers_kept: f64,
    /// What they would keep checkpointing every layer (the layout's own
    /// chunks when it checkpoints).
    pub layers_checkpointed: f64,
    /// The embeddings' dropout mask, the final LayerNorm's input, the loss
    /// positions' hidden states and their log-softmax.
    pub head: f64,
    /// The (b, 1, s, s) boolean attention mask every layer shares.
    pub mask: f64,
    /// The largest transient on top: at the loss two fp32 gradients of the
    /// log-softmax and the tied output matrix's gradient; in a layer's
    /// backward the residual's and the widest intermediate's gradients (the
    /// unfused kernel's score gradients) with that matrix gradient still
    /// waiting; at the embedding's backward that gradient twice.
    pub transient: f64,
    /// The unfused attention kernel ran (libtorch's CPU path with attention dropout).
    pub unfused_attention: bool,
}

impl Activations {
    pub fn kept(&self) -> f64 {
        self.layers_kept + self.head + self.mask
    }
}

/// The activations of one micro-batch, derived for GLM's layer as the
/// worker runs it (docs/scale.md, "Activations"). Per layer, with
/// t = s·b·h elements, e bytes an element, p the tensor-parallel size,
/// f/h the MLP's width: the two LayerNorms' inputs and outputs 4·t·e and
/// the two dropout masks (1 byte an element on CUDA, e on a CPU;
/// replicated: on every tensor-parallel rank), and split over p: the
/// attention's query, key, value and output 4·t·e (fused kernel) and its
/// mask as an additive bias (b·s²·e), the projection's contiguous input
/// t·e, the GeLU's input and output 2·(f/h)·t·e. Korthikanti et al. 2022
/// count 34·t bytes + 5·a·s²·b in 16-bit: the unfused attention's scores;
/// a fused kernel keeps none, and the output is kept twice here (kernel
/// output and the transposed copy the projection saves). `cuda`: the
/// device's dropout keeps 1-byte masks.
pub fn activations(s: &Shape, l: &Layout, b: u64, loss_tokens: f64, kernel: Kernel, c: &Dropouts, cuda: bool) -> Activations {
    let e = l.dtype.bytes() as f64;
    let p = l.tp as f64;
    let t = (s.seq * b * s.hidden) as f64;
    // the MLP's width in units of the hidden size (4 unless intermediate_size says otherwise)
    let w = s.ffn as f64 / s.hidden as f64;
    let scores = (b * s.heads * s.seq * s.seq) as f64 / p;
    // LayerNorm inputs in fp32 copies when fp32_layernorm runs 16-bit
    let ln_in = if c.fp32_layernorm && e < 4.0 { 4.0 } else { e };
    // a dropout keeps its mask: 1 byte from CUDA's fused kernel, a noise
    // tensor of the input's dtype from libtorch's CPU path
    let mask = if cuda { 1.0 } else { e };
    let masks = if c.hidden > 0.0 { 2.0 * mask } else { 0.0 };
    let replicated = t * (2.0 * ln_in + 2.0 * e + masks);
    // scaled copies of the query and key keep the whole qkv alive too
    let scaled = if c.attention_scale > 1.0 { 2.0 * t * e / p } else { 0.0 };
    let (attention, score_grads) = match kernel {
        // query, key, value, output; the boolean mask becomes an additive
        // bias of the compute dtype, which the fused kernel keeps
        Kernel::Fused => (4.0 * t * e / p + (b * s.seq * s.seq) as f64 * e + scaled, 0.0),
        Kernel::Unfused { bytes: ea } => {
            let ea = ea as f64;
            // softmax; with dropout its noise tensor and the dropped probabilities
            let kept = if c.attention > 0.0 { 3.0 * ea } else { ea };
            (3.0 * t * ea / p + scores * kept, 2.0 * scores * ea)
        }
    };
    let split = attention + t * e / p + 2.0 * w * t * e / p;
    let per_layer = replicated + split;
    let layers_full = per_layer * s.layers as f64;
    let chunked = |n: u64| s.layers.div_ceil(n) as f64 * t * e + n.min(s.layers) as f64 * per_layer;
    let (layers_kept, layers_checkpointed) = match l.checkpoint_layers {
        0 => (layers_full, chunked(1)),
        n => (chunked(n), chunked(n)),
    };
    let vocab = s.vocab as f64 / p;
    let emb_mask = if c.hidden > 0.0 { t * mask } else { 0.0 };
    let head = emb_mask + t * e + loss_tokens * s.hidden as f64 * e + loss_tokens * vocab * 4.0;
    // the tied output matrix's gradient (V/p × h) from the loss waits for
    // the embedding's through the whole backward, which then adds its own
    let tied = vocab * s.hidden as f64 * e;
    // at the loss: two fp32 gradients of the log-softmax and that gradient
    let logits = loss_tokens * vocab * 8.0 + tied;
    // a layer's backward: the residual's gradient and the widest intermediate's
    let layer_bwd = t * e * (2.0 + 2.0 * w / p) + score_grads + tied;
    Activations {
        per_layer,
        layers_full,
        layers_kept,
        layers_checkpointed,
        head,
        mask: (b * s.seq * s.seq) as f64,
        transient: logits.max(layer_bwd).max(2.0 * tied),
        unfused_attention: matches!(kernel, Kernel::Unfused { .. }),
    }
}

/// What of the run's numerics activations depend on: dropout
/// probabilities, LayerNorm precision, the attention's scaling.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Dropouts {
    pub hidden: f64,
    pub attention: f64,
    pub fp32_layernorm: bool,
    /// configs.json's `attention_scale` (above 1: the query and key are
    /// scaled into copies of their own).
    pub attention_scale: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape {
        Shape { vocab: 1024, hidden: 64, layers: 4, heads: 4, ffn: 256, max_position_embeddings: 64, block_position: true, seq: 64 }
    }

    fn layout(dtype: Dtype, zero: u8, dp: u64) -> Layout {
        Layout { tp: 1, pp: 1, dp, zero, micro: 2, accum: 1, checkpoint_layers: 0, dtype, reduce_bucket: 500_000_000, allgather_bucket: 500_000_000 }
    }

    /// The README's measured ZeRO rows (GLM 4×256, vocab 16000, DP 2):
    /// fp32 117.1 / 102.5 / 73.2 MB, bf16 146.4 / 117.1 / 73.2 MB.
    #[test]
    fn states_match_the_measured_buffers() {
        let s = Shape { vocab: 16000, hidden: 256, layers: 4, heads: 4, ffn: 1024, max_position_embeddings: 128, block_position: true, seq: 128 };
        let mb = |d, z| (states(&s, &layout(d, z, 2)).total() as f64 / 1e5).round() / 10.0;
        assert_eq!([mb(Dtype::Fp32, 0), mb(Dtype::Fp32, 1), mb(Dtype::Fp32, 2)], [117.1, 102.5, 73.2]);
        assert_eq!([mb(Dtype::Bf16, 0), mb(Dtype::Bf16, 1), mb(Dtype::Bf16, 2)], [146.4, 117.1, 73.2]);
    }

    /// By hand for n = padded elements, dp 2: fp32 stage 0 is 4n params +
    /// 4n grads + 8n moments; bf16 stage 2 is 2n params + 4n/2 shard grads
    /// + 4n/2 masters + 8n/2 moments.
    #[test]
    fn states_by_hand() {
        let s = shape();
        let n = s.padded_per_rank(1, 2);
        assert_eq!(states(&s, &layout(Dtype::Fp32, 0, 2)), States { params: 4 * n, grads: 4 * n, master: 0, moments: 8 * n });
        assert_eq!(states(&s, &layout(Dtype::Bf16, 2, 2)), States { params: 2 * n, grads: 2 * n, master: 2 * n, moments: 4 * n });
        assert_eq!(states(&s, &layout(Dtype::Fp16, 1, 2)), States { params: 2 * n, grads: 2 * n + 4 * n + 2 * n, master: 2 * n, moments: 4 * n });
    }

    /// ZeRO asked for without data parallelism partitions over one rank
    /// (the worker's optimizer then has dp = 1); under tensor parallelism
    /// the states are the rank's part's.
    #[test]
    fn states_without_data_parallelism_and_under_tensor_parallelism() {
        let s = shape();
        let one = s.padded_per_rank(1, 1);
        assert_eq!(states(&s, &layout(Dtype::Bf16, 1, 1)), States { params: 2 * one, grads: 2 * one + 4 * one + 4 * one, master: 4 * one, moments: 8 * one });
        assert_eq!(states(&s, &layout(Dtype::Fp32, 2, 1)), States { params: 4 * one, grads: 4 * one, master: 0, moments: 8 * one });
        let l = Layout { tp: 2, ..layout(Dtype::Bf16, 2, 2) };
        let n = s.padded_per_rank(2, 2);
        assert!(n < s.padded_per_rank(1, 2) && n % 128 == 0);
        assert_eq!(states(&s, &l), States { params: 2 * n, grads: 2 * n, master: 2 * n, moments: 4 * n });
    }

    /// t = s·b·h = 64·2·64 = 8192 (the MLP 4h wide). A fused fp32 layer on
    /// a CPU keeps 4·4t bytes of LayerNorms, 2·4t of dropout noise, 13·4t
    /// split and the mask's additive bias b·s²·4 = 32768 bytes: 76t + 32768;
    /// on CUDA the dropout masks are 1 byte (70t + 32768). Checkpointing
    /// every layer keeps 4 chunk inputs (4t each) and one layer.
    #[test]
    fn activations_by_hand() {
        let s = shape();
        let d = Dropouts { hidden: 0.1, attention: 0.1, fp32_layernorm: false, attention_scale: 1.0 };
        let fp32 = layout(Dtype::Fp32, 0, 1);
        let a = activations(&s, &fp32, 2, 64.0, Kernel::Fused, &d, false);
        let t = 8192.0;
        let bias = 2.0 * 64.0 * 64.0 * 4.0;
        assert_eq!(a.per_layer, 76.0 * t + bias);
        assert_eq!(a.layers_full, 4.0 * a.per_layer);
        assert_eq!(a.mask, 2.0 * 64.0 * 64.0);
        let gpu = activations(&s, &fp32, 2, 64.0, Kernel::Fused, &d, true);
        assert_eq!(gpu.per_layer, 70.0 * t + bias);
        let ck = activations(&s, &Layout { checkpoint_layers: 1, ..fp32 }, 2, 64.0, Kernel::Fused, &d, false);
        assert_eq!(ck.layers_kept, 4.0 * 4.0 * t + a.per_layer);
        assert_eq!(a.layers_checkpointed, ck.layers_kept);
        // unfused with dropout (CPU): query, key, value 3·4t instead of the
        // fused 4·4t and the bias; scores b·a·s² = 32768 kept as softmax,
        // noise and dropped probabilities, 4 bytes each
        let u = activations(&s, &fp32, 2, 64.0, Kernel::Unfused { bytes: 4 }, &d, false);
        assert_eq!(u.per_layer, 76.0 * t - 4.0 * t + 12.0 * 32768.0);
        // bf16 on CUDA: 2-byte elements, 1-byte masks, a 2-byte bias
        let h = activations(&s, &layout(Dtype::Bf16, 0, 1), 2, 64.0, Kernel::Fused, &d, true);
        assert_eq!(h.per_layer, (4.0 * 2.0 + 2.0 + 13.0 * 2.0) * t + bias / 2.0);
        // attention_scale > 1: the scaled query and key on top
        let sc = activations(&s, &fp32, 2, 64.0, Kernel::Fused, &Dropouts { attention_scale: 2.0, ..d }, false);
        assert_eq!(sc.per_layer, a.per_layer + 2.0 * 4.0 * t);
        // an MLP 2h wide: GeLU's input and output 2·2·4t instead of 2·4·4t
        let narrow = activations(&Shape { ffn: 128, ..s }, &fp32, 2, 64.0, Kernel::Fused, &d, false);
        assert_eq!(narrow.per_layer, a.per_layer - 4.0 * 4.0 * t);
        // the head: the embedding's dropout noise (4t), the final LayerNorm's
        // input, 64 loss positions' hidden states and log-softmax
        assert_eq!(a.head, 4.0 * t + 4.0 * t + 64.0 * 64.0 * 4.0 + 64.0 * 1024.0 * 4.0);
        // transient: the tied matrix's gradient (1024 × 64 × 4) with the
        // loss's two fp32 gradients, or with a layer's backward
        let tied = 1024.0 * 64.0 * 4.0f64;
        assert_eq!(a.transient, (64.0 * 1024.0 * 8.0 + tied).max(t * 4.0 * 10.0 + tied));
    }

    /// Stage 2's buckets: at most two units open at once (one while the
    /// buffer is one unit) and a reduce-scatter's output when there are
    /// ranks to reduce over; stage 1 one unit's fp32 output.
    #[test]
    fn buckets_by_hand() {
        let s = shape();
        let n = s.padded_per_rank(1, 2);
        assert_eq!(buckets(&s, &layout(Dtype::Bf16, 2, 2)), (n * 2 + n * 2 / 2) as f64);
        let l = Layout { reduce_bucket: 1000, ..layout(Dtype::Bf16, 2, 2) };
        assert_eq!(buckets(&s, &l), (2 * 896 * 2 + 896 * 2 / 2) as f64);
        let one = s.padded_per_rank(1, 1);
        assert_eq!(buckets(&s, &layout(Dtype::Fp32, 2, 1)), (one * 4) as f64);
        assert_eq!(buckets(&s, &layout(Dtype::Fp32, 1, 2)), (n * 4 / 2) as f64);
        assert_eq!(buckets(&s, &layout(Dtype::Fp32, 1, 1)), 0.0);
        assert_eq!(buckets(&s, &layout(Dtype::Fp32, 0, 2)), 0.0);
    }

    #[test]
    fn units_as_the_worker_cuts_them() {
        let s = shape();
        let l = Layout { reduce_bucket: 1000, ..layout(Dtype::Fp32, 2, 2) };
        assert_eq!(unit(&s, &l), 896);
        let l = Layout { reduce_bucket: 10, ..layout(Dtype::Fp32, 2, 2) };
        assert_eq!(unit(&s, &l), 128);
        assert_eq!(unit(&s, &layout(Dtype::Fp32, 2, 2)), s.padded_per_rank(1, 2));
        // all-gather: in place while a rank's run fits the chunk, else through dp × chunk
        assert_eq!(gather_scratch(&s, &layout(Dtype::Fp32, 2, 2)), 0);
        let l = Layout { allgather_bucket: 100, ..layout(Dtype::Bf16, 2, 2) };
        assert_eq!(gather_scratch(&s, &l), 100 * 2);
    }
}
