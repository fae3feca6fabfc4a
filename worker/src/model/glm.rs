//! GLM (THUDM/GLM `modeling_glm.py` + `mpu/transformer.py`), one process.
//!
//! word + position + block-position embeddings -> dropout -> `num_layers`
//! pre-LayerNorm blocks (fused query_key_value, attention under the GLM mask,
//! dense; LayerNorm, dense_h_to_4h, tanh-GeLU, dense_4h_to_h; residuals) ->
//! final LayerNorm -> logits through the word-embedding matrix (tied).
//!
//! Parameter names are the original's state-dict keys, so a checkpoint maps
//! 1:1 onto the PyTorch model. Attention uses libtorch's fused
//! scaled-dot-product attention with a boolean mask: Part A (positions before
//! `sep`) is visible to every token, Part B is causal. The original's
//! `attention_scale` only rescales q and k to keep fp16 scores in range; in
//! fp32 the result is the same, so it is not applied.

use tch::{Kind, Tensor};

use super::params::{Init, ParamBuilder, Params, Part};
use crate::error::{Error, Result};
use crate::parallel::layers::{column_parallel_linear, row_parallel_linear, vocab_parallel_cross_entropy, vocab_parallel_embedding};
use crate::parallel::mappings::{copy_to, gather_from, Group};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GlmConfig {
    /// Embedding rows: the tokenizer's size padded (see `padded_vocab_size`).
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub layernorm_epsilon: f64,
    pub hidden_dropout: f64,
    pub attention_dropout: f64,
    pub output_dropout: f64,
    pub block_position_encoding: bool,
}

impl GlmConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.hidden_size == 0 || self.num_layers == 0 || self.num_attention_heads == 0 {
            return bad("hidden_size, num_layers and num_attention_heads must be positive".into());
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        for (k, p) in [("hidden_dropout", self.hidden_dropout), ("attention_dropout", self.attention_dropout), ("output_dropout", self.output_dropout)] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{k} = {p}: must lie in [0, 1)"));
            }
        }
        Ok(())
    }

    /// Parameters excluding position embeddings (the tied output matrix counts once).
    pub fn num_params(&self) -> (usize, usize) {
        let h = self.hidden_size;
        let per_layer = 4 * h + 3 * h * h + 3 * h + h * h + h + 2 * h * self.intermediate_size + self.intermediate_size + h;
        let emb = self.vocab_size * h;
        let pos = (self.max_position_embeddings + 1) * h * if self.block_position_encoding { 2 } else { 1 };
        (self.num_layers * per_layer + 2 * h + emb, pos)
    }

    /// Model FLOPs per token, torchtitan's convention: 6·N + 12·L·h·s, with N
    /// the matmul parameters (the layers plus the tied output matrix).
    pub fn flops_per_token(&self, seq: usize) -> f64 {
        let h = self.hidden_size as f64;
        let n_matmul = self.num_layers as f64 * (4.0 * h * h + 2.0 * h * self.intermediate_size as f64) + self.vocab_size as f64 * h;
        6.0 * n_matmul + 12.0 * self.num_layers as f64 * h * seq as f64
    }
}

struct Linear {
    weight: usize, // [out, in]
    bias: usize,
    split: Split,
}

/// How a parameter of the original's state dict is split over
/// tensor-parallel ranks, by name: the table checkpoint merge/split uses.
/// The model's constructor picks each layer's partition from its kind, and
/// a test checks that both agree; `Partition::part` + `Part::take` do the
/// slicing for both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partition {
    Whole,
    Rows,
    Cols,
    QkvRows,
}

pub fn partition_of(name: &str) -> Partition {
    if name == "word_embeddings.weight" || name.ends_with("mlp.dense_h_to_4h.weight") || name.ends_with("mlp.dense_h_to_4h.bias") {
        Partition::Rows
    } else if name.ends_with("attention.query_key_value.weight") || name.ends_with("attention.query_key_value.bias") {
        Partition::QkvRows
    } else if name.ends_with("attention.dense.weight") || name.ends_with("mlp.dense_4h_to_h.weight") {
        Partition::Cols
    } else {
        Partition::Whole
    }
}

impl Partition {
    /// Rank `rank`'s part of a parameter split this way over `size` ranks.
    pub fn part(self, rank: usize, size: usize) -> Part {
        match self {
            Partition::Whole => Part::Whole,
            Partition::Rows => Part::Rows { rank, size },
            Partition::Cols => Part::Cols { rank, size },
            Partition::QkvRows => Part::QkvRows { rank, size },
        }
    }
}

/// This rank's part under `tp` (whole without tensor parallelism).
fn part_under(tp: Option<Group>, p: Partition) -> Part {
    tp.map_or(Part::Whole, |g| p.part(g.rank, g.size))
}

/// How a linear layer is split over the tensor-parallel group.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Split {
    /// Output rows (the fused query/key/value keeps whole heads per rank).
    Column,
    Qkv,
    /// Input columns; the bias is whole and added after the sum.
    Row,
}

impl Linear {
    fn new(pb: &mut ParamBuilder, name: &str, d_in: usize, d_out: usize, std: f64, split: Split, tp: Option<Group>) -> Self {
        let (w, b) = match split {
            Split::Column => (Partition::Rows, Partition::Rows),
            Split::Qkv => (Partition::QkvRows, Partition::QkvRows),
            Split::Row => (Partition::Cols, Partition::Whole),
        };
        let weight = pb.add_part(format!("{name}.weight"), &[d_out as i64, d_in as i64], part_under(tp, w), Init::Normal(std), true);
        let bias = pb.add_part(format!("{name}.bias"), &[d_out as i64], part_under(tp, b), Init::Zeros, false);
        Linear { weight, bias, split }
    }
    fn forward(&self, p: &Params, x: &Tensor) -> Tensor {
        x.linear(p.get(self.weight), Some(p.get(self.bias)))
    }
}

struct LayerNorm {
    weight: usize,
    bias: usize,
    eps: f64,
    dim: i64,
}

impl LayerNorm {
    fn new(pb: &mut ParamBuilder, name: &str, dim: usize, eps: f64) -> Self {
        let weight = pb.add(format!("{name}.weight"), &[dim as i64], Init::Ones, false);
        let bias = pb.add(format!("{name}.bias"), &[dim as i64], Init::Zeros, false);
        LayerNorm { weight, bias, eps, dim: dim as i64 }
    }
    fn forward(&self, p: &Params, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim], Some(p.get(self.weight)), Some(p.get(self.bias)), self.eps, true)
    }
}

struct Block {
    input_layernorm: LayerNorm,
    query_key_value: Linear,
    dense: Linear,
    post_attention_layernorm: LayerNorm,
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
}

pub struct Glm {
    pub cfg: GlmConfig,
    pub params: Params,
    word_embeddings: usize,
    position_embeddings: usize,
    block_position_embeddings: Option<usize>,
    layers: Vec<Block>,
    final_layernorm: LayerNorm,
    /// The tensor-parallel group this rank's slices belong to (None: whole model).
    pub tp: Option<Group>,
    /// Seed base of the current micro-step (set by the trainer), from which
    /// tensor-parallel runs derive their dropout streams (see `hidden`).
    pub rng_base: std::cell::Cell<i64>,
}

/// One batch of samples as tensors, all `[batch, seq]` int64 except `sep` `[batch]`.
pub struct Batch {
    pub tokens: Tensor,
    pub targets: Tensor,
    pub loss_mask: Tensor,
    pub position_ids: Tensor,
    pub block_position_ids: Tensor,
    pub sep: Tensor,
}

impl Glm {
    pub fn new(cfg: GlmConfig, device: tch::Device, seed: i64) -> Result<Self> {
        Self::new_as(cfg, device, Kind::Float, seed)
    }

    /// As `new`, with parameters of `kind` (Double for gradient checks).
    pub fn new_as(cfg: GlmConfig, device: tch::Device, kind: Kind, seed: i64) -> Result<Self> {
        Self::new_parallel(cfg, device, kind, seed, None)
    }

    /// This rank's part of the model under tensor parallelism `tp`: the
    /// vocabulary, query/key/value heads, `dense_h_to_4h` rows and the
    /// inputs of `attention.dense` and `dense_4h_to_h` are split; the rest is
    /// replicated. Every rank draws the full master weights from `seed` and
    /// keeps its slice, so any split starts from the weights of one process.
    pub fn new_parallel(cfg: GlmConfig, device: tch::Device, kind: Kind, seed: i64, tp: Option<Group>) -> Result<Self> {
        cfg.validate()?;
        let std = 0.02;
        let out_std = std / (2.0 * cfg.num_layers as f64).sqrt();
        let (h, ffn, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layernorm_epsilon);
        let rows = cfg.max_position_embeddings as i64 + 1;
        let mut pb = ParamBuilder::default();
        let word_embeddings = pb.add_part("word_embeddings.weight", &[cfg.vocab_size as i64, h as i64], part_under(tp, Partition::Rows), Init::Normal(std), true);
        let position_embeddings = pb.add("transformer.position_embeddings.weight", &[rows, h as i64], Init::Normal(std), true);
        let block_position_embeddings = cfg
            .block_position_encoding
            .then(|| pb.add("transformer.block_position_embeddings.weight", &[rows, h as i64], Init::Normal(std), true));
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let n = format!("transformer.layers.{i}");
                Block {
                    input_layernorm: LayerNorm::new(&mut pb, &format!("{n}.input_layernorm"), h, eps),
                    query_key_value: Linear::new(&mut pb, &format!("{n}.attention.query_key_value"), h, 3 * h, std, Split::Qkv, tp),
                    dense: Linear::new(&mut pb, &format!("{n}.attention.dense"), h, h, out_std, Split::Row, tp),
                    post_attention_layernorm: LayerNorm::new(&mut pb, &format!("{n}.post_attention_layernorm"), h, eps),
                    dense_h_to_4h: Linear::new(&mut pb, &format!("{n}.mlp.dense_h_to_4h"), h, ffn, std, Split::Column, tp),
                    dense_4h_to_h: Linear::new(&mut pb, &format!("{n}.mlp.dense_4h_to_h"), ffn, h, out_std, Split::Row, tp),
                }
            })
            .collect();
        let final_layernorm = LayerNorm::new(&mut pb, "transformer.final_layernorm", h, eps);
        let params = pb.build_as(device, kind, seed);
        Ok(Glm { cfg, params, word_embeddings, position_embeddings, block_position_embeddings, layers, final_layernorm, tp, rng_base: 0.into() })
    }

    /// GLM's attention mask, `[b, 1, s, s]`, true = may attend: key j is
    /// visible to query i when j <= i or j < sep.
    pub fn attention_mask(sep: &Tensor, s: i64) -> Tensor {
        let dev = sep.device();
        let ar = Tensor::arange(s, (Kind::Int64, dev));
        let causal = ar.unsqueeze(0).le_tensor(&ar.unsqueeze(1)); // (s, s): [i][j] = j <= i
        let prefix = ar.unsqueeze(0).lt_tensor(&sep.unsqueeze(1)); // (b, s): j < sep_b
        causal.unsqueeze(0).logical_or(&prefix.unsqueeze(1)).unsqueeze(1)
    }

    /// `l` applied to `x`: whole, or split as it was built under tensor parallelism.
    fn linear(&self, l: &Linear, x: &Tensor) -> Result<Tensor> {
        let p = &self.params;
        match (self.tp, l.split) {
            (None, _) => Ok(l.forward(p, x)),
            (Some(g), Split::Column | Split::Qkv) => column_parallel_linear(x, p.get(l.weight), Some(p.get(l.bias)), g, false),
            (Some(g), Split::Row) => row_parallel_linear(x, p.get(l.weight), Some(p.get(l.bias)), g, true),
        }
    }

    /// Final hidden states `(b, s, h)`.
    pub fn hidden(&self, batch: &Batch, train: bool) -> Result<Tensor> {
        let p = &self.params;
        let (b, s) = (batch.tokens.size()[0], batch.tokens.size()[1]);
        let tp_size = self.tp.map_or(1, |g| g.size as i64);
        let (h, nh) = (self.cfg.hidden_size as i64, self.cfg.num_attention_heads as i64 / tp_size);
        let hd = h / self.cfg.num_attention_heads as i64;
        let words = match self.tp {
            None => Tensor::embedding(p.get(self.word_embeddings), &batch.tokens, -1, false, false),
            Some(g) => vocab_parallel_embedding(&batch.tokens, p.get(self.word_embeddings), g)?,
        };
        let mut x = words + Tensor::embedding(p.get(self.position_embeddings), &batch.position_ids, -1, false, false);
        if let Some(bpe) = self.block_position_embeddings {
            x += Tensor::embedding(p.get(bpe), &batch.block_position_ids, -1, false, false);
        }
        let mut x = x.dropout(self.cfg.hidden_dropout, train); // (b, s, h)
        let mask = Self::attention_mask(&batch.sep, s);
        let attn_p = if train { self.cfg.attention_dropout } else { 0.0 };
        // Megatron's RNG tracker: dropout inside a parallel region (attention
        // probabilities of this rank's heads) draws from a per-rank stream;
        // everywhere else all tensor-parallel ranks share one stream.
        let reseed = |layer: usize, rank: Option<usize>| {
            let k = (2 * layer + usize::from(rank.is_some())) as i64 * 7919 + rank.map_or(0, |r| r as i64 + 1);
            tch::manual_seed(self.rng_base.get().wrapping_mul(1_000_003).wrapping_add(k));
        };
        let tracked = self.tp.filter(|_| attn_p > 0.0);
        for (i, l) in self.layers.iter().enumerate() {
            let y = l.input_layernorm.forward(p, &x);
            let qkv = self.linear(&l.query_key_value, &y)?; // (b, s, 3h/tp)
            let parts = qkv.split(nh * hd, -1);
            let heads = |t: &Tensor| t.view([b, s, nh, hd]).transpose(1, 2); // (b, nh/tp, s, hd)
            let (q, k, v) = (heads(&parts[0]), heads(&parts[1]), heads(&parts[2]));
            if let Some(g) = tracked {
                reseed(i, Some(g.rank));
            }
            let a = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&mask), attn_p, false, None, false); // (b, nh/tp, s, hd)
            if tracked.is_some() {
                reseed(i, None);
            }
            let a = a.transpose(1, 2).contiguous().view([b, s, nh * hd]);
            x = x + self.linear(&l.dense, &a)?.dropout(self.cfg.output_dropout, train);
            let y = l.post_attention_layernorm.forward(p, &x);
            let y = self.linear(&l.dense_h_to_4h, &y)?.gelu("tanh"); // (b, s, ffn/tp)
            x = x + self.linear(&l.dense_4h_to_h, &y)?.dropout(self.cfg.output_dropout, train);
        }
        Ok(self.final_layernorm.forward(p, &x))
    }

    /// Logits of hidden states `(..., h)` through the tied embedding: `(..., vocab)`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.matmul(&self.params.get(self.word_embeddings).tr())
    }

    /// Loss over the Part B targets of `batch` (mean over masked tokens), the
    /// number of correctly predicted masked tokens (argmax; 0 when `train`),
    /// and the count of masked tokens.
    pub fn loss(&self, batch: &Batch, train: bool) -> Result<(Tensor, i64, i64)> {
        let (sum, correct, n) = self.loss_terms(batch, train)?;
        Ok((sum / (n.max(1) as f64), correct, n))
    }

    /// As `loss`, but the *sum* of the masked tokens' cross entropy, so data
    /// parallel ranks can divide by the global token count. Logits are
    /// computed only where the loss mask is set: the loss and gradients equal
    /// those of full logits. Under tensor parallelism the logits stay split
    /// by vocabulary (vocab-parallel cross entropy).
    pub fn loss_terms(&self, batch: &Batch, train: bool) -> Result<(Tensor, i64, i64)> {
        let hidden = self.hidden(batch, train)?;
        let h = self.cfg.hidden_size as i64;
        let idx = batch.loss_mask.view([-1]).nonzero().squeeze_dim(1);
        let n = idx.size()[0];
        if n == 0 {
            let zero = hidden.sum(hidden.kind()) * 0.0;
            return Ok((zero, 0, 0));
        }
        let sel = hidden.view([-1, h]).index_select(0, &idx); // (n, h)
        let targets = batch.targets.view([-1]).index_select(0, &idx);
        let (loss, logits) = match self.tp {
            None => {
                let logits = self.logits(&sel); // (n, vocab)
                (logits.cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::Sum, -100, 0.0), logits)
            }
            Some(g) => {
                let local = copy_to(&sel, g)?.matmul(&self.params.get(self.word_embeddings).tr()); // (n, vocab/tp)
                (vocab_parallel_cross_entropy(&local, &targets, g)?.sum(local.kind()), local)
            }
        };
        // accuracy only where someone reads it (evaluation): an argmax over
        // every masked position's logits is not free
        let correct = if train {
            0
        } else {
            let full = match self.tp {
                None => logits,
                Some(g) => tch::no_grad(|| gather_from(&logits, g))?,
            };
            tch::no_grad(|| full.argmax(-1, false).eq_tensor(&targets).sum(Kind::Int64).int64_value(&[]))
        };
        Ok((loss, correct, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn tiny(dropout: f64) -> GlmConfig {
        GlmConfig {
            vocab_size: 40,
            hidden_size: 16,
            num_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            max_position_embeddings: 16,
            layernorm_epsilon: 1e-5,
            hidden_dropout: dropout,
            attention_dropout: dropout,
            output_dropout: dropout,
            block_position_encoding: true,
        }
    }

    /// Two samples of length 10: Part A of 6 and 4 tokens, then Part B.
    fn batch() -> Batch {
        let t = |v: Vec<i64>| Tensor::from_slice(&v).view([2, 10]);
        Batch {
            tokens: t(vec![2, 11, 12, 4, 13, 14, 5, 20, 21, 0, 2, 15, 4, 16, 5, 22, 5, 23, 24, 0]),
            targets: t(vec![2, 11, 12, 4, 13, 14, 20, 21, 6, 0, 2, 15, 4, 16, 22, 6, 23, 24, 6, 0]),
            loss_mask: t(vec![0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0]),
            position_ids: t(vec![0, 1, 2, 3, 4, 5, 3, 3, 3, 0, 0, 1, 2, 3, 2, 2, 2, 2, 2, 0]),
            block_position_ids: t(vec![0, 0, 0, 0, 0, 0, 1, 2, 3, 0, 0, 0, 0, 0, 1, 2, 1, 2, 3, 0]),
            sep: Tensor::from_slice(&[6i64, 4]),
        }
    }

    #[test]
    fn mask_is_bidirectional_before_sep_and_causal_after() {
        let m = Glm::attention_mask(&Tensor::from_slice(&[2i64]), 4);
        let got: Vec<i64> = Vec::try_from(m.view([-1]).to_kind(Kind::Int64)).unwrap();
        #[rustfmt::skip]
        let want = vec![1, 1, 0, 0,
                        1, 1, 0, 0,
                        1, 1, 1, 0,
                        1, 1, 1, 1];
        assert_eq!(got, want);
    }

    /// The fused attention path against the original's formulation
    /// (explicit scores, `scores * m - 65504 (1 - m)`, softmax) and the loss
    /// against `sum(ce * mask) / sum(mask)` over full logits.
    #[test]
    fn forward_matches_the_reference_formulation() {
        let m = Glm::new_as(tiny(0.0), Device::Cpu, Kind::Double, 3).unwrap();
        let b = batch();
        let p = &m.params;
        let (bs, s, h, nh) = (2i64, 10i64, 16i64, 2i64);
        let hd = h / nh;
        let mut x = Tensor::embedding(p.get(m.word_embeddings), &b.tokens, -1, false, false)
            + Tensor::embedding(p.get(m.position_embeddings), &b.position_ids, -1, false, false)
            + Tensor::embedding(p.get(m.block_position_embeddings.unwrap()), &b.block_position_ids, -1, false, false);
        let mask = Glm::attention_mask(&b.sep, s).to_kind(Kind::Double);
        for l in &m.layers {
            let y = l.input_layernorm.forward(p, &x);
            let qkv = l.query_key_value.forward(p, &y);
            let parts = qkv.split(h, -1);
            let heads = |t: &Tensor| t.view([bs, s, nh, hd]).transpose(1, 2);
            let (q, k, v) = (heads(&parts[0]), heads(&parts[1]), heads(&parts[2]));
            let scores = q.matmul(&k.transpose(-1, -2)) / (hd as f64).sqrt();
            let scores: Tensor = &scores * &mask - (1.0 - &mask) * 65504.0;
            let a = scores.softmax(-1, Kind::Double).matmul(&v).transpose(1, 2).contiguous().view([bs, s, h]);
            x = x + l.dense.forward(p, &a);
            let y = l.post_attention_layernorm.forward(p, &x);
            let y = y.linear(p.get(l.dense_h_to_4h.weight), Some(p.get(l.dense_h_to_4h.bias)));
            let cube: Tensor = &y * &y * &y;
            let inner: Tensor = (&y + cube * 0.044715) * 0.7978845608028654;
            let y: Tensor = &y * 0.5 * (inner.tanh() + 1.0);
            x = x + l.dense_4h_to_h.forward(p, &y);
        }
        let want_h = m.final_layernorm.forward(p, &x);
        let got_h = m.hidden(&b, false).unwrap();
        assert!(want_h.allclose(&got_h, 1e-9, 1e-9, false), "hidden states differ");
        let logits = m.logits(&want_h).view([-1, 40]);
        let ce = logits.cross_entropy_loss::<Tensor>(&b.targets.view([-1]), None, tch::Reduction::None, -100, 0.0);
        let mask = b.loss_mask.view([-1]).to_kind(Kind::Double);
        let want = ((ce * &mask).sum(Kind::Double) / mask.sum(Kind::Double)).double_value(&[]);
        let (got, _, n) = m.loss(&b, false).unwrap();
        assert_eq!(n, 8);
        assert!((got.double_value(&[]) - want).abs() < 1e-12, "{} vs {want}", got.double_value(&[]));
    }

    /// Autograd gradients against central finite differences, in f64, on
    /// coordinates of every parameter.
    #[test]
    fn gradients_match_finite_differences() {
        let mut m = Glm::new_as(tiny(0.0), Device::Cpu, Kind::Double, 5).unwrap();
        let b = batch();
        let (loss, _, _) = m.loss(&b, false).unwrap();
        loss.backward();
        let grad = m.params.grad_flat();
        let infos = m.params.infos.clone();
        let eps = 1e-6;
        let mut checked = 0;
        for info in &infos {
            for j in [0, info.numel / 2, info.numel - 1] {
                let i = info.offset + j;
                let orig = m.params.flat.double_value(&[i]);
                let at = |m: &mut Glm, v: f64| {
                    tch::no_grad(|| {
                        let _ = m.params.flat.get(i).fill_(v);
                    });
                    tch::no_grad(|| m.loss(&b, false).unwrap().0.double_value(&[]))
                };
                let numeric = (at(&mut m, orig + eps) - at(&mut m, orig - eps)) / (2.0 * eps);
                at(&mut m, orig);
                let analytic = grad.double_value(&[i]);
                assert!(
                    (numeric - analytic).abs() <= 1e-6 + 1e-4 * numeric.abs().max(analytic.abs()),
                    "{}[{j}]: autograd {analytic:e}, finite difference {numeric:e}",
                    info.name
                );
                checked += 1;
            }
        }
        assert!(checked >= 3 * 20);
        // names follow the original's state dict
        let names: Vec<&str> = infos.iter().map(|i| i.name.as_str()).collect();
        for n in ["word_embeddings.weight", "transformer.position_embeddings.weight", "transformer.block_position_embeddings.weight",
                  "transformer.layers.1.attention.query_key_value.bias", "transformer.layers.0.mlp.dense_4h_to_h.weight", "transformer.final_layernorm.weight"] {
            assert!(names.contains(&n), "{n}");
        }
    }

    #[test]
    fn partition_table_matches_the_parallel_model() {
        let g = Group { id: -1, rank: 1, size: 2 }; // construction runs no collective
        let whole = Glm::new(tiny(0.0), Device::Cpu, 1).unwrap();
        let part = Glm::new_parallel(tiny(0.0), Device::Cpu, Kind::Float, 1, Some(g)).unwrap();
        for (w, p) in whole.params.infos.iter().zip(&part.params.infos) {
            assert_eq!(w.name, p.name);
            let mut want = w.shape.clone();
            match partition_of(&w.name) {
                Partition::Whole => {}
                Partition::Rows | Partition::QkvRows => want[0] /= 2,
                Partition::Cols => want[1] /= 2,
            }
            assert_eq!(p.shape, want, "{}", w.name);
            assert_eq!(p.split, partition_of(&w.name) != Partition::Whole, "{}", w.name);
        }
        // the split elements are exactly the (at most two) split ranges
        let ranges = part.params.split_ranges();
        assert!(!ranges.is_empty() && ranges.len() <= 2, "{ranges:?}");
        let in_ranges = |i: &crate::model::params::ParamInfo| ranges.iter().any(|&(o, n)| i.offset >= o && i.offset + i.numel <= o + n);
        for i in &part.params.infos {
            assert_eq!(in_ranges(i), i.split, "{}", i.name);
        }
        let split_numel: i64 = part.params.infos.iter().filter(|i| i.split).map(|i| i.numel).sum();
        assert_eq!(ranges.iter().map(|r| r.1).sum::<i64>(), split_numel);
        assert!(whole.params.split_ranges().is_empty());
    }

    #[test]
    fn init_follows_the_original() {
        let m = Glm::new(GlmConfig { hidden_size: 64, intermediate_size: 256, vocab_size: 500, ..tiny(0.1) }, Device::Cpu, 1).unwrap();
        for (name, t) in m.params.named() {
            let std = t.std(true).double_value(&[]);
            let mean = t.mean(Kind::Float).double_value(&[]);
            if name.ends_with(".bias") {
                assert_eq!(t.abs().max().double_value(&[]), 0.0, "{name}");
            } else if name.contains("layernorm") {
                assert_eq!(mean, 1.0, "{name}");
            } else if name.ends_with("attention.dense.weight") || name.ends_with("dense_4h_to_h.weight") {
                assert!((std - 0.01).abs() < 0.001, "{name}: std {std}, want 0.02/sqrt(2·2)");
            } else {
                assert!((std - 0.02).abs() < 0.0015, "{name}: std {std}");
            }
        }
    }
}
