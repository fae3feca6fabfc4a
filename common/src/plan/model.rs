//! The model's shape and what follows from it alone: the parameters one
//! tensor-parallel rank holds (exactly as glm-worker declares them), and
//! the floating-point work of a step.

/// Elements the worker pads each rank's flat parameter buffer to a multiple
/// of, per data-parallel rank (glm-worker's `train::build::PAD_PER_DP_RANK`):
/// a ZeRO partition is then one slice per rank.
pub const PAD_PER_DP_RANK: u64 = 64;

/// GLM's shape as the worker builds it.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Shape {
    /// The padded vocabulary (rows of the word embeddings).
    pub vocab: u64,
    pub hidden: u64,
    pub layers: u64,
    pub heads: u64,
    pub ffn: u64,
    pub max_position_embeddings: u64,
    /// GLM's second position embedding (2D positions).
    pub block_position: bool,
    pub seq: u64,
}

impl Shape {
    /// Elements of the parameters tensor-parallel rank of `tp` holds (any
    /// rank: every split is even), before padding. Split over `tp`: the word
    /// embeddings' rows, query/key/value weights and biases, `dense_h_to_4h`
    /// weight and bias, the inputs of `attention.dense` and `dense_4h_to_h`;
    /// whole: LayerNorms, the two output biases and the position embeddings.
    pub fn params_per_rank(&self, tp: u64) -> u64 {
        let (h, f) = (self.hidden, self.ffn);
        let rows = self.max_position_embeddings + 1;
        let emb = self.vocab / tp * h + rows * h * if self.block_position { 2 } else { 1 };
        let layer = 2 * h // input_layernorm
            + (3 * h * h + 3 * h) / tp // query_key_value
            + h * h / tp + h // attention.dense (row-parallel: bias whole)
            + 2 * h // post_attention_layernorm
            + (f * h + f) / tp // dense_h_to_4h
            + f * h / tp + h; // dense_4h_to_h
        emb + self.layers * layer + 2 * h
    }

    /// The flat buffer of one rank: `params_per_rank` padded to a multiple
    /// of 64 × data-parallel size.
    pub fn padded_per_rank(&self, tp: u64, dp: u64) -> u64 {
        let m = PAD_PER_DP_RANK * dp;
        self.params_per_rank(tp).div_ceil(m) * m
    }

    /// Parameters of the whole model (every rank's parts once).
    pub fn params_total(&self) -> u64 {
        self.params_per_rank(1)
    }

    /// The matmul parameters N of the model FLOPs convention: the layers'
    /// four weight matrices and the tied output matrix.
    pub fn matmul_params(&self) -> u64 {
        self.layers * (4 * self.hidden * self.hidden + 2 * self.hidden * self.ffn) + self.vocab * self.hidden
    }

    /// Model FLOPs per token (the MFU convention the worker logs): 6·N +
    /// 12·L·h·s: forward and backward of every matmul weight, and of the
    /// attention scores and their product with the values at full length.
    /// Recomputation and GLM's logits at the loss positions only are not
    /// reflected: this is the model's work, not the hardware's.
    pub fn model_flops_per_token(&self) -> f64 {
        6.0 * self.matmul_params() as f64 + 12.0 * (self.layers * self.hidden * self.seq) as f64
    }
}

/// The floating-point work of one micro-batch on one rank, by kind of
/// kernel: what the device executes (`Work`), unlike the model FLOPs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Work {
    /// The layers' four matmuls, forward and backward (3×), plus a second
    /// forward of the recomputed layers.
    pub layer_gemm: f64,
    /// Attention scores and their product with the values, at full length
    /// (the mask does not skip work).
    pub attention: f64,
    /// Logits at the loss positions only, forward and backward.
    pub logits: f64,
}

impl Work {
    pub fn total(&self) -> f64 {
        self.layer_gemm + self.attention + self.logits
    }
}

/// The work of a micro-batch of `b` sequences with `loss_tokens` loss
/// positions on one of `tp` ranks, `recomputed` layers run forward twice.
pub fn micro_batch_work(s: &Shape, tp: u64, b: u64, loss_tokens: f64, recomputed: u64) -> Work {
    let tokens = (b * s.seq) as f64;
    let (h, f, l) = (s.hidden as f64, s.ffn as f64, s.layers as f64);
    let t = tp as f64;
    // 2 FLOPs a multiply-add; forward 1×, backward 2×, recomputation 1×
    let passes = |n: f64| 3.0 * n + n * recomputed as f64 / l;
    let per_layer = 2.0 * tokens * (4.0 * h * h + 2.0 * h * f) / t;
    let attn = 2.0 * 2.0 * tokens * s.seq as f64 * h / t;
    Work { layer_gemm: passes(per_layer * l), attention: passes(attn * l), logits: 3.0 * 2.0 * loss_tokens * h * s.vocab as f64 / t }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Shape {
        Shape { vocab: 256, hidden: 64, layers: 2, heads: 4, ffn: 256, max_position_embeddings: 32, block_position: true, seq: 32 }
    }

    /// Counted by hand: 256·64 embeddings, 2 × 33·64 position tables,
    /// per layer 4·64 LayerNorm, 3·64·64 + 3·64 QKV, 64·64 + 64 dense,
    /// 2·64·256 + 256 + 64 MLP, and 2·64 for the final LayerNorm.
    #[test]
    fn parameters_by_hand() {
        let s = tiny();
        let layer = 4 * 64 + (3 * 64 * 64 + 3 * 64) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64);
        assert_eq!(s.params_per_rank(1), 256 * 64 + 2 * 33 * 64 + 2 * layer + 2 * 64);
        // tp 2: the split halves, LayerNorms, output biases and positions stay
        let layer2 = 4 * 64 + (3 * 64 * 64 + 3 * 64) / 2 + (64 * 64 / 2 + 64) + (64 * 256 + 256) / 2 + (256 * 64 / 2 + 64);
        assert_eq!(s.params_per_rank(2), 128 * 64 + 2 * 33 * 64 + 2 * layer2 + 2 * 64);
        assert_eq!(s.padded_per_rank(1, 2) % 128, 0);
        assert!(s.padded_per_rank(1, 2) - s.params_per_rank(1) < 128);
    }

    /// 6·N + 12·L·h·s with N = 2·(4·64² + 2·64·256) + 256·64.
    #[test]
    fn model_flops_by_hand() {
        let n = 2.0 * (4.0 * 4096.0 + 2.0 * 64.0 * 256.0) + 256.0 * 64.0;
        assert_eq!(tiny().model_flops_per_token(), 6.0 * n + 12.0 * 2.0 * 64.0 * 32.0);
    }

    /// A micro-batch of 2 × 32 tokens, 32 loss positions: the layers'
    /// 3 × 2·64·(4·64² + 2·64·256) per layer, the attention 3 × 4·64·32·64
    /// per layer, the logits 3 × 2·32·64·256; recomputing every layer adds
    /// one forward.
    #[test]
    fn step_work_by_hand() {
        let w = micro_batch_work(&tiny(), 1, 2, 32.0, 0);
        assert_eq!(w.layer_gemm, 2.0 * 3.0 * 2.0 * 64.0 * (4.0 * 4096.0 + 2.0 * 64.0 * 256.0));
        assert_eq!(w.attention, 2.0 * 3.0 * 4.0 * 64.0 * 32.0 * 64.0);
        assert_eq!(w.logits, 3.0 * 2.0 * 32.0 * 64.0 * 256.0);
        let r = micro_batch_work(&tiny(), 1, 2, 32.0, 2);
        assert_eq!(r.layer_gemm, w.layer_gemm * 4.0 / 3.0);
        let t = micro_batch_work(&tiny(), 2, 2, 32.0, 0);
        assert_eq!(t.total(), w.total() / 2.0);
    }
}
