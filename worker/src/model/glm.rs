//! GLM (THUDM/GLM `modeling_glm.py` + `mpu/transformer.py`).
//!
//! word + position + block-position embeddings -> dropout -> `num_layers`
//! pre-LayerNorm blocks (fused query_key_value, attention under the GLM mask,
//! dense; LayerNorm, dense_h_to_4h, tanh-GeLU, dense_4h_to_h; residuals) ->
//! final LayerNorm -> logits through the word-embedding matrix (tied).
//!
//! Parameter names are the original's state-dict keys, so a checkpoint maps
//! 1:1 onto the PyTorch model. Attention uses libtorch's fused
//! scaled-dot-product attention with a boolean mask: Part A (positions before
//! `sep`) is visible to every token, Part B is causal.
//!
//! Precision: parameters and activations are in the compute dtype of the
//! parameter buffer (fp32, bf16 or fp16). The fused attention accumulates
//! its scores and softmax in fp32 whatever the dtype; logits are cast to
//! fp32 before the cross entropy; with `fp32_layernorm` LayerNorm runs in
//! fp32, with `fp32_embedding` the embeddings are summed in fp32. The
//! original's `attention_scale` (> 1) divides q and k by its square root
//! before the scores and multiplies them back (the fp16 overflow guard).
//!
//! Activation checkpointing (`checkpoint_num_layers` > 0): each chunk of that
//! many layers keeps only its input and runs again in backward
//! (`model::autograd::recompute`), with the same dropout masks.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::autograd::recompute;
use super::params::{Init, ParamBuilder, Params, Part, Partition};
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
        glm_common::dims::check_sizes(self.hidden_size, self.num_layers, self.num_attention_heads).map_err(Error::Config)?;
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

/// `t` in fp32 when it is in a 16-bit type (softmax and cross entropy
/// run in fp32 at least).
fn to_fp32(t: Tensor) -> Tensor {
    match t.kind() {
        Kind::BFloat16 | Kind::Half => t.to_kind(Kind::Float),
        _ => t,
    }
}

/// How a model is built and run, apart from its shape (`GlmConfig`, which
/// checkpoints record): device, dtype, layout and numerics.
#[derive(Clone, Debug)]
pub struct ModelOptions {
    pub device: tch::Device,
    /// Compute dtype of parameters and activations: Float, BFloat16, Half
    /// (Double for gradient checks).
    pub kind: Kind,
    /// Initialisation seed.
    pub seed: i64,
    /// The tensor-parallel group this rank's slices belong to.
    pub tp: Option<Group>,
    /// The flat buffers are padded to a multiple of this (ZeRO partitions).
    pub pad_multiple: i64,
    pub fp32_layernorm: bool,
    pub fp32_embedding: bool,
    pub attention_scale: f64,
    /// Layers per recomputed chunk (activation checkpointing); 0 = off.
    pub checkpoint_num_layers: usize,
}

impl ModelOptions {
    /// fp32, one process, no checkpointing.
    pub fn new(device: tch::Device, seed: i64) -> Self {
        ModelOptions {
            device,
            kind: Kind::Float,
            seed,
            tp: None,
            pad_multiple: 1,
            fp32_layernorm: false,
            fp32_embedding: false,
            attention_scale: 1.0,
            checkpoint_num_layers: 0,
        }
    }
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

/// Parameter indices of a linear layer, resolved to tensors after building.
struct LinearDecl {
    weight: usize,
    bias: usize,
    split: Split,
}

impl LinearDecl {
    fn new(pb: &mut ParamBuilder, name: &str, d_in: usize, d_out: usize, std: f64, split: Split, tp: Option<(usize, usize)>) -> Self {
        let (w, b) = match split {
            Split::Column => (Partition::Rows, Partition::Rows),
            Split::Qkv => (Partition::QkvRows, Partition::QkvRows),
            Split::Row => (Partition::Cols, Partition::Whole),
        };
        let weight = pb.add_split(format!("{name}.weight"), &[d_out as i64, d_in as i64], w, part_under(tp, w), Init::Normal(std), true);
        let bias = pb.add_split(format!("{name}.bias"), &[d_out as i64], b, part_under(tp, b), Init::Zeros, false);
        LinearDecl { weight, bias, split }
    }
    fn resolve(&self, p: &Params) -> Linear {
        Linear { weight: p.get(self.weight).shallow_clone(), bias: p.get(self.bias).shallow_clone(), split: self.split }
    }
}

/// This rank's part under `tp` (whole without tensor parallelism).
fn part_under(tp: Option<(usize, usize)>, p: Partition) -> Part {
    tp.map_or(Part::Whole, |(rank, size)| p.part(rank, size))
}

struct Linear {
    weight: Tensor, // [out, in]
    bias: Tensor,
    split: Split,
}

impl Linear {
    fn shallow(&self) -> Self {
        Linear { weight: self.weight.shallow_clone(), bias: self.bias.shallow_clone(), split: self.split }
    }

    /// `x Wᵀ + b`: whole, or split as it was built under tensor parallelism.
    fn forward(&self, x: &Tensor, tp: Option<&Group>) -> Result<Tensor> {
        match (tp, self.split) {
            (None, _) => Ok(x.linear(&self.weight, Some(&self.bias))),
            (Some(g), Split::Column | Split::Qkv) => column_parallel_linear(x, &self.weight, Some(&self.bias), g, false),
            (Some(g), Split::Row) => row_parallel_linear(x, &self.weight, Some(&self.bias), g, true),
        }
    }
}

struct LayerNormDecl {
    weight: usize,
    bias: usize,
}

impl LayerNormDecl {
    fn new(pb: &mut ParamBuilder, name: &str, dim: usize) -> Self {
        let weight = pb.add(format!("{name}.weight"), &[dim as i64], Init::Ones, false);
        let bias = pb.add(format!("{name}.bias"), &[dim as i64], Init::Zeros, false);
        LayerNormDecl { weight, bias }
    }
    fn resolve(&self, p: &Params, eps: f64, fp32: bool) -> LayerNorm {
        let (weight, bias) = (p.get(self.weight).shallow_clone(), p.get(self.bias).shallow_clone());
        LayerNorm { dim: weight.size()[0], weight, bias, eps, fp32 }
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    dim: i64,
    /// Normalise in fp32 (and return the input's dtype).
    fp32: bool,
}

impl LayerNorm {
    fn shallow(&self) -> Self {
        LayerNorm { weight: self.weight.shallow_clone(), bias: self.bias.shallow_clone(), ..*self }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        if self.fp32 && matches!(x.kind(), Kind::BFloat16 | Kind::Half) {
            let f = |t: &Tensor| t.to_kind(Kind::Float);
            f(x).layer_norm([self.dim], Some(f(&self.weight)), Some(f(&self.bias)), self.eps, true).to_kind(x.kind())
        } else {
            x.layer_norm([self.dim], Some(&self.weight), Some(&self.bias), self.eps, true)
        }
    }
}

struct BlockDecl {
    input_layernorm: LayerNormDecl,
    query_key_value: LinearDecl,
    dense: LinearDecl,
    post_attention_layernorm: LayerNormDecl,
    dense_h_to_4h: LinearDecl,
    dense_4h_to_h: LinearDecl,
}

struct Block {
    input_layernorm: LayerNorm,
    query_key_value: Linear,
    dense: Linear,
    post_attention_layernorm: LayerNorm,
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
}

/// What every layer of one forward pass shares.
struct LayerCtx {
    /// `(b, 1, s, s)`, true = may attend.
    mask: Tensor,
    /// Heads on this rank and their size.
    heads: i64,
    head_dim: i64,
    attention_dropout: f64,
    output_dropout: f64,
    attention_scale: f64,
    train: bool,
    tp: Option<Group>,
    /// Seed base of the micro-step (tensor-parallel dropout streams).
    rng_base: i64,
}

impl LayerCtx {
    fn shallow(&self) -> Self {
        LayerCtx { mask: self.mask.shallow_clone(), tp: self.tp.clone(), ..*self }
    }

    /// Megatron's RNG tracker: dropout inside a parallel region (attention
    /// probabilities of this rank's heads) draws from a per-rank stream;
    /// everywhere else all tensor-parallel ranks share one stream.
    fn reseed(&self, layer: usize, rank: Option<usize>) {
        let k = (2 * layer + usize::from(rank.is_some())) as i64 * 7919 + rank.map_or(0, |r| r as i64 + 1);
        tch::manual_seed(self.rng_base.wrapping_mul(1_000_003).wrapping_add(k));
    }
}

impl Block {
    fn shallow(&self) -> Self {
        Block {
            input_layernorm: self.input_layernorm.shallow(),
            query_key_value: self.query_key_value.shallow(),
            dense: self.dense.shallow(),
            post_attention_layernorm: self.post_attention_layernorm.shallow(),
            dense_h_to_4h: self.dense_h_to_4h.shallow(),
            dense_4h_to_h: self.dense_4h_to_h.shallow(),
        }
    }

    /// Layer `index` on `x` `(b, s, h)`.
    fn forward(&self, x: &Tensor, c: &LayerCtx, index: usize) -> Result<Tensor> {
        let (b, s) = (x.size()[0], x.size()[1]);
        let (nh, hd) = (c.heads, c.head_dim);
        let attn_p = if c.train { c.attention_dropout } else { 0.0 };
        let tracked = c.tp.as_ref().filter(|_| attn_p > 0.0);
        let y = self.input_layernorm.forward(x);
        let qkv = self.query_key_value.forward(&y, c.tp.as_ref())?; // (b, s, 3h/tp)
        let parts = qkv.split(nh * hd, -1);
        let heads = |t: &Tensor| t.view([b, s, nh, hd]).transpose(1, 2); // (b, nh/tp, s, hd)
        let (mut q, mut k, v) = (heads(&parts[0]), heads(&parts[1]), heads(&parts[2]));
        let mut scale = None;
        if c.attention_scale > 1.0 {
            let r = c.attention_scale.sqrt();
            (q, k) = (q / r, k / r);
            scale = Some(c.attention_scale / (hd as f64).sqrt());
        }
        if let Some(g) = tracked {
            c.reseed(index, Some(g.rank));
        }
        let a = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&c.mask), attn_p, false, scale, false); // (b, nh/tp, s, hd)
        if tracked.is_some() {
            c.reseed(index, None);
        }
        let a = a.transpose(1, 2).contiguous().view([b, s, nh * hd]);
        let x = x + self.dense.forward(&a, c.tp.as_ref())?.dropout(c.output_dropout, c.train);
        let y = self.post_attention_layernorm.forward(&x);
        let y = self.dense_h_to_4h.forward(&y, c.tp.as_ref())?.gelu("tanh"); // (b, s, ffn/tp)
        Ok(x + self.dense_4h_to_h.forward(&y, c.tp.as_ref())?.dropout(c.output_dropout, c.train))
    }
}

pub struct Glm {
    pub cfg: GlmConfig,
    pub params: Params,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    block_position_embeddings: Option<Tensor>,
    layers: Vec<Block>,
    final_layernorm: LayerNorm,
    /// The tensor-parallel group this rank's slices belong to (None: whole model).
    pub tp: Option<Group>,
    /// Seed base of the current micro-step (set by the trainer), from which
    /// tensor-parallel runs derive their dropout streams (see `LayerCtx::reseed`).
    pub rng_base: std::cell::Cell<i64>,
    fp32_embedding: bool,
    attention_scale: f64,
    checkpoint_num_layers: usize,
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

impl Batch {
    /// The loss tokens (non-zero `loss_mask` entries): the count `Glm::loss_terms` divides by.
    pub fn loss_tokens(&self) -> i64 {
        self.loss_mask.ne(0).sum(Kind::Int64).int64_value(&[])
    }
}

/// The declarations of a model: its parameters in `pb`, the indices here.
struct Decls {
    word_embeddings: usize,
    position_embeddings: usize,
    block_position_embeddings: Option<usize>,
    layers: Vec<BlockDecl>,
    final_layernorm: LayerNormDecl,
}

/// Declares every parameter of `cfg` (this rank's parts under `tp`):
/// embeddings, then each layer, then the final LayerNorm, each its own
/// layout group.
fn declare(cfg: &GlmConfig, tp: Option<(usize, usize)>) -> (ParamBuilder, Decls) {
    let std = 0.02;
    let out_std = std / (2.0 * cfg.num_layers as f64).sqrt();
    let (h, ffn) = (cfg.hidden_size, cfg.intermediate_size);
    let rows = cfg.max_position_embeddings as i64 + 1;
    let mut pb = ParamBuilder::default();
    let word_embeddings =
        pb.add_split("word_embeddings.weight", &[cfg.vocab_size as i64, h as i64], Partition::Rows, part_under(tp, Partition::Rows), Init::Normal(std), true);
    let position_embeddings = pb.add("transformer.position_embeddings.weight", &[rows, h as i64], Init::Normal(std), true);
    let block_position_embeddings =
        cfg.block_position_encoding.then(|| pb.add("transformer.block_position_embeddings.weight", &[rows, h as i64], Init::Normal(std), true));
    let layers = (0..cfg.num_layers)
        .map(|i| {
            pb.group();
            let n = format!("transformer.layers.{i}");
            BlockDecl {
                input_layernorm: LayerNormDecl::new(&mut pb, &format!("{n}.input_layernorm"), h),
                query_key_value: LinearDecl::new(&mut pb, &format!("{n}.attention.query_key_value"), h, 3 * h, std, Split::Qkv, tp),
                dense: LinearDecl::new(&mut pb, &format!("{n}.attention.dense"), h, h, out_std, Split::Row, tp),
                post_attention_layernorm: LayerNormDecl::new(&mut pb, &format!("{n}.post_attention_layernorm"), h),
                dense_h_to_4h: LinearDecl::new(&mut pb, &format!("{n}.mlp.dense_h_to_4h"), h, ffn, std, Split::Column, tp),
                dense_4h_to_h: LinearDecl::new(&mut pb, &format!("{n}.mlp.dense_4h_to_h"), ffn, h, out_std, Split::Row, tp),
            }
        })
        .collect();
    pb.group();
    let final_layernorm = LayerNormDecl::new(&mut pb, "transformer.final_layernorm", h);
    (pb, Decls { word_embeddings, position_embeddings, block_position_embeddings, layers, final_layernorm })
}

/// How each parameter of a model of shape `cfg` splits over tensor-parallel
/// ranks, by state-dict name: the table checkpoint merge/split slice by,
/// derived from the model's own declarations.
pub fn partitions(cfg: &GlmConfig) -> BTreeMap<String, Partition> {
    let (pb, _) = declare(cfg, None);
    pb.layout(1).0.into_iter().map(|i| (i.name, i.partition)).collect()
}

/// The parameters of tensor-parallel rank `rank` of `size` (whole model
/// without) as the model lays them out, without allocating them: the
/// offsets checkpoint shards and merges map flat ranges by. Padding only
/// ever follows the parameters, so the offsets hold for any padding.
pub fn param_layout(cfg: &GlmConfig, tp: Option<(usize, usize)>) -> Vec<crate::model::params::ParamInfo> {
    declare(cfg, tp).0.layout(1).0
}

impl Glm {
    /// The whole model in fp32 on `device`.
    pub fn new(cfg: GlmConfig, device: tch::Device, seed: i64) -> Result<Self> {
        Self::build(cfg, &ModelOptions::new(device, seed))
    }

    /// As `new`, with parameters of `kind` (Double for gradient checks).
    pub fn new_as(cfg: GlmConfig, device: tch::Device, kind: Kind, seed: i64) -> Result<Self> {
        Self::build(cfg, &ModelOptions { kind, ..ModelOptions::new(device, seed) })
    }

    /// This rank's part of the model as `o` says. Under tensor parallelism
    /// the vocabulary, query/key/value heads, `dense_h_to_4h` rows and the
    /// inputs of `attention.dense` and `dense_4h_to_h` are split; the rest is
    /// replicated. Every rank draws the full master weights from the seed
    /// and keeps its slice, so any split starts from the weights of one
    /// process.
    pub fn build(cfg: GlmConfig, o: &ModelOptions) -> Result<Self> {
        cfg.validate()?;
        if o.attention_scale < 1.0 {
            return Err(Error::Config(format!("attention_scale {}: must be >= 1", o.attention_scale)));
        }
        if let Some(g) = &o.tp {
            crate::parallel::dims::check_split(g.size, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size).map_err(Error::Config)?;
            if cfg.vocab_size % g.size != 0 {
                return Err(Error::Config(format!(
                    "vocab_size {} is not divisible by model_parallel_size {} (pad it: make_vocab_size_divisible_by)",
                    cfg.vocab_size, g.size
                )));
            }
        }
        let (pb, d) = declare(&cfg, o.tp.as_ref().map(|g| (g.rank, g.size)));
        let numel = pb.layout(o.pad_multiple).1;
        let part = o.tp.as_ref().map(|g| format!(", tensor-parallel part {} of {}", g.rank, g.size)).unwrap_or_default();
        let _doing = crate::runtime::report::doing(format!(
            "building the model (hidden_size {}, num_layers {}, vocab_size {}{part}: {} parameters, {} as {} on {}, as much again for gradients)",
            cfg.hidden_size,
            cfg.num_layers,
            cfg.vocab_size,
            crate::runtime::units::human_count(numel as u64),
            crate::runtime::units::human_bytes(numel as u64 * o.kind.elt_size_in_bytes() as u64),
            crate::runtime::units::kind_name(o.kind),
            crate::runtime::units::device_name(o.device)
        ));
        let params = pb.build(o.device, o.kind, o.seed, o.pad_multiple)?;
        let (eps, ln32) = (cfg.layernorm_epsilon, o.fp32_layernorm);
        let layers = d
            .layers
            .iter()
            .map(|l| Block {
                input_layernorm: l.input_layernorm.resolve(&params, eps, ln32),
                query_key_value: l.query_key_value.resolve(&params),
                dense: l.dense.resolve(&params),
                post_attention_layernorm: l.post_attention_layernorm.resolve(&params, eps, ln32),
                dense_h_to_4h: l.dense_h_to_4h.resolve(&params),
                dense_4h_to_h: l.dense_4h_to_h.resolve(&params),
            })
            .collect();
        Ok(Glm {
            word_embeddings: params.get(d.word_embeddings).shallow_clone(),
            position_embeddings: params.get(d.position_embeddings).shallow_clone(),
            block_position_embeddings: d.block_position_embeddings.map(|i| params.get(i).shallow_clone()),
            final_layernorm: d.final_layernorm.resolve(&params, eps, ln32),
            layers,
            params,
            cfg,
            tp: o.tp.clone(),
            rng_base: 0.into(),
            fp32_embedding: o.fp32_embedding,
            attention_scale: o.attention_scale,
            checkpoint_num_layers: o.checkpoint_num_layers,
        })
    }

    /// Layers per recomputed chunk (0: activation checkpointing off).
    pub fn checkpoint_num_layers(&self) -> usize {
        self.checkpoint_num_layers
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

    /// Final hidden states `(b, s, h)`.
    pub fn hidden(&self, batch: &Batch, train: bool) -> Result<Tensor> {
        let s = batch.tokens.size()[1];
        let tp_size = self.tp.as_ref().map_or(1, |g| g.size as i64);
        let h = self.cfg.hidden_size as i64;
        let kind = self.params.kind();
        let words = match &self.tp {
            None => Tensor::embedding(&self.word_embeddings, &batch.tokens, -1, false, false),
            Some(g) => vocab_parallel_embedding(&batch.tokens, &self.word_embeddings, g)?,
        };
        let up = |t: Tensor| if self.fp32_embedding { to_fp32(t) } else { t };
        let mut x = up(words) + up(Tensor::embedding(&self.position_embeddings, &batch.position_ids, -1, false, false));
        if let Some(bpe) = &self.block_position_embeddings {
            x += up(Tensor::embedding(bpe, &batch.block_position_ids, -1, false, false));
        }
        let mut x = x.dropout(self.cfg.hidden_dropout, train).to_kind(kind); // (b, s, h)
        let ctx = LayerCtx {
            mask: Self::attention_mask(&batch.sep, s),
            heads: self.cfg.num_attention_heads as i64 / tp_size,
            head_dim: h / self.cfg.num_attention_heads as i64,
            attention_dropout: self.cfg.attention_dropout,
            output_dropout: self.cfg.output_dropout,
            attention_scale: self.attention_scale,
            train,
            tp: self.tp.clone(),
            rng_base: self.rng_base.get(),
        };
        let n = self.checkpoint_num_layers;
        if n > 0 && train {
            for (c, chunk) in self.layers.chunks(n).enumerate() {
                let blocks: Vec<Block> = chunk.iter().map(Block::shallow).collect();
                let lc = ctx.shallow();
                let first = c * n;
                x = recompute(
                    &x,
                    Box::new(move |x: &Tensor| {
                        let mut x = x.shallow_clone();
                        for (k, b) in blocks.iter().enumerate() {
                            x = b.forward(&x, &lc, first + k)?;
                        }
                        Ok(x)
                    }),
                )?;
            }
        } else {
            for (i, l) in self.layers.iter().enumerate() {
                x = l.forward(&x, &ctx, i)?;
            }
        }
        Ok(self.final_layernorm.forward(&x))
    }

    /// Logits of hidden states `(..., h)` through the tied embedding: `(..., vocab)`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.matmul(&self.word_embeddings.tr())
    }

    /// Bytes of activations one micro-batch of `b × s` keeps for backward in
    /// its layers, without and with this model's checkpointing: the
    /// planner's derivation for this layer (`glm_common::plan::memory`,
    /// docs/scale.md), which `glm-launch plan` uses too.
    pub fn activation_bytes(&self, b: usize, s: usize) -> (f64, f64) {
        use glm_common::plan::{memory, model::Shape, profile::Dtype, Layout};
        let cfg = &self.cfg;
        let shape = Shape {
            vocab: cfg.vocab_size as u64,
            hidden: cfg.hidden_size as u64,
            layers: cfg.num_layers as u64,
            heads: cfg.num_attention_heads as u64,
            ffn: cfg.intermediate_size as u64,
            max_position_embeddings: cfg.max_position_embeddings as u64,
            block_position: cfg.block_position_encoding,
            seq: s as u64,
        };
        let dtype = match self.params.kind() {
            Kind::BFloat16 => Dtype::Bf16,
            Kind::Half => Dtype::Fp16,
            _ => Dtype::Fp32,
        };
        let tp = self.tp.as_ref().map_or(1, |g| g.size as u64);
        let layout = Layout {
            tp,
            pp: 1,
            dp: 1,
            zero: 0,
            micro: b as u64,
            accum: 1,
            checkpoint_layers: self.checkpoint_num_layers as u64,
            dtype,
            reduce_bucket: 1,
            allgather_bucket: 1,
        };
        let cuda = self.params.device().is_cuda();
        let kernel = memory::Kernel::of(cuda, cfg.attention_dropout, dtype);
        let numerics = memory::Dropouts {
            hidden: cfg.hidden_dropout,
            attention: cfg.attention_dropout,
            fp32_layernorm: self.final_layernorm.fp32,
            attention_scale: self.attention_scale,
        };
        let a = memory::activations(&shape, &layout, b as u64, 0.0, kernel, &numerics, cuda);
        (a.layers_full, a.layers_kept)
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
        let (loss, logits) = match &self.tp {
            None => {
                let logits = to_fp32(self.logits(&sel)); // (n, vocab), fp32 at least
                (logits.cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::Sum, -100, 0.0), logits)
            }
            Some(g) => {
                let local = to_fp32(copy_to(&sel, g)?.matmul(&self.word_embeddings.tr())); // (n, vocab/tp), fp32 at least
                (vocab_parallel_cross_entropy(&local, &targets, g)?.sum(local.kind()), local)
            }
        };
        // accuracy only where someone reads it (evaluation): an argmax over
        // every masked position's logits is not free
        let correct = if train {
            0
        } else {
            let full = match &self.tp {
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
        let _rng = crate::torch_rng_lock();
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
        let _rng = crate::torch_rng_lock();
        let m = Glm::new_as(tiny(0.0), Device::Cpu, Kind::Double, 3).unwrap();
        let b = batch();
        let (bs, s, h, nh) = (2i64, 10i64, 16i64, 2i64);
        let hd = h / nh;
        let mut x = Tensor::embedding(&m.word_embeddings, &b.tokens, -1, false, false)
            + Tensor::embedding(&m.position_embeddings, &b.position_ids, -1, false, false)
            + Tensor::embedding(m.block_position_embeddings.as_ref().unwrap(), &b.block_position_ids, -1, false, false);
        let mask = Glm::attention_mask(&b.sep, s).to_kind(Kind::Double);
        for l in &m.layers {
            let y = l.input_layernorm.forward(&x);
            let qkv = l.query_key_value.forward(&y, None).unwrap();
            let parts = qkv.split(h, -1);
            let heads = |t: &Tensor| t.view([bs, s, nh, hd]).transpose(1, 2);
            let (q, k, v) = (heads(&parts[0]), heads(&parts[1]), heads(&parts[2]));
            let scores = q.matmul(&k.transpose(-1, -2)) / (hd as f64).sqrt();
            let scores: Tensor = &scores * &mask - (1.0 - &mask) * 65504.0;
            let a = scores.softmax(-1, Kind::Double).matmul(&v).transpose(1, 2).contiguous().view([bs, s, h]);
            x += l.dense.forward(&a, None).unwrap();
            let y = l.post_attention_layernorm.forward(&x);
            let y = y.linear(&l.dense_h_to_4h.weight, Some(&l.dense_h_to_4h.bias));
            let cube: Tensor = &y * &y * &y;
            let inner: Tensor = (&y + cube * 0.044715) * 0.7978845608028654;
            let y: Tensor = &y * 0.5 * (inner.tanh() + 1.0);
            x += l.dense_4h_to_h.forward(&y, None).unwrap();
        }
        let want_h = m.final_layernorm.forward(&x);
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
        let _rng = crate::torch_rng_lock();
        let mut m = Glm::new_as(tiny(0.0), Device::Cpu, Kind::Double, 5).unwrap();
        let b = batch();
        let (loss, _, _) = m.loss(&b, false).unwrap();
        loss.backward();
        let grad = m.params.grad().copy();
        let infos = m.params.infos.clone();
        let eps = 1e-6;
        let mut checked = 0;
        for info in &infos {
            for j in [0, info.numel / 2, info.numel - 1] {
                let i = info.offset + j;
                let orig = m.params.flat().double_value(&[i]);
                let at = |m: &mut Glm, v: f64| {
                    tch::no_grad(|| {
                        let _ = m.params.flat_mut().get(i).fill_(v);
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
        for n in [
            "word_embeddings.weight",
            "transformer.position_embeddings.weight",
            "transformer.block_position_embeddings.weight",
            "transformer.layers.1.attention.query_key_value.bias",
            "transformer.layers.0.mlp.dense_4h_to_h.weight",
            "transformer.final_layernorm.weight",
        ] {
            assert!(names.contains(&n), "{n}");
        }
    }

    #[test]
    fn partition_table_matches_the_parallel_model() {
        let _rng = crate::torch_rng_lock();
        let g = Group::new(std::sync::Arc::new(crate::comm::local::LocalComm::group(2, "tp").remove(1))); // construction runs no collective
        let whole = Glm::new(tiny(0.0), Device::Cpu, 1).unwrap();
        let part = Glm::build(tiny(0.0), &ModelOptions { tp: Some(g), ..ModelOptions::new(Device::Cpu, 1) }).unwrap();
        let table = partitions(&tiny(0.0));
        assert_eq!(table.len(), whole.params.infos.len());
        for (w, p) in whole.params.infos.iter().zip(&part.params.infos) {
            assert_eq!(w.name, p.name);
            let mut want = w.shape.clone();
            match table[&w.name] {
                Partition::Whole => {}
                Partition::Rows | Partition::QkvRows => want[0] /= 2,
                Partition::Cols => want[1] /= 2,
            }
            assert_eq!(p.shape, want, "{}", w.name);
            assert_eq!(p.split(), table[&w.name] != Partition::Whole, "{}", w.name);
        }
        // the split elements are exactly the split ranges (one or two per layer)
        let ranges = part.params.split_ranges();
        assert!(!ranges.is_empty() && ranges.len() <= 2 * (tiny(0.0).num_layers + 1), "{ranges:?}");
        let in_ranges = |i: &crate::model::params::ParamInfo| ranges.iter().any(|&(o, n)| i.offset >= o && i.offset + i.numel <= o + n);
        for i in &part.params.infos {
            assert_eq!(in_ranges(i), i.split(), "{}", i.name);
        }
        let split_numel: i64 = part.params.infos.iter().filter(|i| i.split()).map(|i| i.numel).sum();
        assert_eq!(ranges.iter().map(|r| r.1).sum::<i64>(), split_numel);
        assert!(whole.params.split_ranges().is_empty());
        // decay: weights and embeddings, not biases or LayerNorm; one range per layer group
        for i in &whole.params.infos {
            assert_eq!(i.decay, i.name.ends_with(".weight") && !i.name.contains("layernorm"), "{}", i.name);
        }
        assert_eq!(whole.params.decay_ranges().len(), tiny(0.0).num_layers + 1);
    }

    /// Activation checkpointing recomputes layer chunks in backward with
    /// the same dropout masks: the gradients are bitwise those without it.
    #[test]
    fn checkpointed_layers_give_bitwise_equal_gradients() {
        let _rng = crate::torch_rng_lock();
        let run = |n: usize| -> (f64, Tensor) {
            let cfg = GlmConfig { num_layers: 3, ..tiny(0.2) };
            let m = Glm::build(cfg, &ModelOptions { checkpoint_num_layers: n, ..ModelOptions::new(Device::Cpu, 9) }).unwrap();
            tch::manual_seed(77);
            let (loss, _, _) = m.loss(&batch(), true).unwrap();
            loss.backward();
            (loss.double_value(&[]), m.params.grad().copy())
        };
        let (l0, g0) = run(0);
        for n in [1, 2, 3] {
            let (l, g) = run(n);
            assert_eq!(l, l0, "loss with checkpoint_num_layers {n}");
            assert!(g.equal(&g0), "gradients with checkpoint_num_layers {n}");
        }
    }

    /// bf16 and fp16 forward passes (with and without fp32 LayerNorm and
    /// embeddings) stay close to fp32 and return an fp32 loss.
    #[test]
    fn half_precision_losses_track_fp32() {
        let _rng = crate::torch_rng_lock();
        let cfg = GlmConfig { hidden_size: 32, intermediate_size: 64, ..tiny(0.0) };
        let loss = |kind: Kind, fp32: bool, scale: f64| {
            let o = ModelOptions { kind, fp32_layernorm: fp32, fp32_embedding: fp32, attention_scale: scale, ..ModelOptions::new(Device::Cpu, 4) };
            let (l, _, _) = Glm::build(cfg.clone(), &o).unwrap().loss(&batch(), false).unwrap();
            assert_eq!(l.kind(), Kind::Float);
            l.double_value(&[])
        };
        let want = loss(Kind::Float, false, 1.0);
        for (kind, fp32, scale) in [(Kind::BFloat16, false, 1.0), (Kind::BFloat16, true, 1.0), (Kind::Half, false, 1.0), (Kind::Half, true, 4.0)] {
            let got = loss(kind, fp32, scale);
            assert!((got - want).abs() < 0.02 * want, "{kind:?} fp32 LayerNorm/embedding {fp32}, attention_scale {scale}: {got} vs fp32 {want}");
        }
        // attention_scale only guards fp16 against overflow: in fp32 it changes (almost) nothing
        assert!((loss(Kind::Float, false, 8.0) - want).abs() < 1e-5);
    }

    #[test]
    fn init_follows_the_original() {
        let _rng = crate::torch_rng_lock();
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
