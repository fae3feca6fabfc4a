//! The planner: per-rank memory and step time of a training job, from its
//! configuration, the cluster and a device description, without libtorch
//! (`glm-launch plan`, and glm-launch's preflight check). docs/scale.md
//! derives the formulas and shows worked plans.
//!
//! - `model`: the shape, parameters per rank (exact), FLOPs;
//! - `memory`: model states (exact, buffer by buffer), buckets,
//!   activations and transients (estimates);
//! - `speed`: compute, elementwise, optimizer and communication time;
//! - `device`: the built-in GPU table, and a measured `profile`.

pub mod device;
pub mod memory;
pub mod model;
pub mod profile;
pub mod speed;

use serde::Serialize;

use device::Device;
use memory::{Activations, Dropouts, States};
use model::Shape;
use profile::Dtype;
use speed::Speed;

/// How one job is laid out over its ranks: what the search varies.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Layout {
    pub tp: u64,
    /// Pipeline stages: an analysis only (glm-worker has no pipeline
    /// parallelism): the layers split over `pp` stages, 1F1B scheduling.
    pub pp: u64,
    pub dp: u64,
    pub zero: u8,
    pub micro: u64,
    pub accum: u64,
    /// Layers per checkpointed chunk (0: no activation checkpointing).
    pub checkpoint_layers: u64,
    pub dtype: Dtype,
    /// ZeRO's reduce_bucket_size and allgather_bucket_size (elements).
    pub reduce_bucket: u64,
    pub allgather_bucket: u64,
}

/// The machines: `nodes` × `per_node` ranks, tensor-parallel groups inside
/// a node (Megatron's order), data-parallel groups across nodes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Cluster {
    pub nodes: u64,
    pub per_node: u64,
}

impl Cluster {
    pub fn world(&self) -> u64 {
        self.nodes * self.per_node
    }
    fn tp_bus_gbps(&self, d: &Device) -> f64 {
        d.intra_bus_gbps
    }
    /// Data-parallel groups cross nodes when there are several (tensor
    /// parallelism stays inside a node).
    fn dp_bus_gbps(&self, d: &Device) -> f64 {
        if self.nodes > 1 {
            d.inter_bus_gbps
        } else {
            d.intra_bus_gbps
        }
    }
}

/// What a plan needs of the job apart from its layout.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Job {
    /// The model, its vocabulary the tokenizer's ids before padding.
    pub model: Shape,
    /// The padding rule (make_vocab_size_divisible_by; under tensor
    /// parallelism the vocabulary is padded to a multiple of it and of the
    /// size).
    pub divisible_by: u64,
    /// Sequences per optimizer step, over every data-parallel rank.
    pub global_batch: u64,
    pub hidden_dropout: f64,
    pub attention_dropout: f64,
    pub fp32_layernorm: bool,
    pub attention_scale: f64,
    /// Loss positions as a share of the sequence (GLM's Part B), at most.
    pub loss_fraction: f64,
    pub train_iters: u64,
    /// Host copies of a checkpoint written in the background (bytes per
    /// parameter of a rank's part: fp32 weights, and moments when saved).
    pub snapshot: Option<Snapshot>,
}

/// What a background checkpoint copies to host memory.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Snapshot {
    pub with_optimizer: bool,
}

impl Job {
    /// The shape at tensor-parallel size `tp` (the vocabulary padded for it).
    pub fn shape(&self, tp: u64) -> Shape {
        let m = lcm(self.divisible_by.max(1), tp);
        Shape { vocab: self.model.vocab.div_ceil(m) * m, ..self.model }
    }

    fn dropouts(&self) -> Dropouts {
        Dropouts { hidden: self.hidden_dropout, attention: self.attention_dropout, fp32_layernorm: self.fp32_layernorm, attention_scale: self.attention_scale }
    }

    /// Why `tp` cannot split this model, if it cannot.
    pub fn split_error(&self, tp: u64) -> Option<String> {
        let t = tp as usize;
        crate::dims::check_split(t, self.model.hidden as usize, self.model.heads as usize, self.model.ffn as usize).err()
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn lcm(a: u64, b: u64) -> u64 {
    a / gcd(a, b) * b
}

/// Memory of one rank: the breakdown and the total against the device.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Memory {
    pub states: StatesOut,
    /// ZeRO's gradient buckets in flight (stage 2: the buckets held during
    /// backward and a reduce-scatter's output; stage 1: one unit's output).
    pub buckets: f64,
    /// ZeRO's all-gather scratch after the update (when activations are
    /// gone: it raises the peak only if larger than they are).
    pub gather_scratch: f64,
    pub activations: Activations,
    /// The process before the model (CUDA context, libtorch), and the
    /// allocator's overhead (CUDA: the caching allocator's fragmentation;
    /// CPU: libtorch's first-step initialisation and glibc's retention).
    pub baseline: f64,
    pub fragmentation: f64,
    /// Host copies of a checkpoint being written in the background (device
    /// memory on CPU, host memory on GPUs: not in `peak` there).
    pub snapshot: f64,
    /// The training step's peak.
    pub peak: f64,
    pub device: f64,
    /// A resume at another data-parallel size reads this rank's part of the
    /// checkpoint's fp32 weights and moments whole before re-partitioning.
    pub resume_transient: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct StatesOut {
    pub params: u64,
    pub grads: u64,
    pub master: u64,
    pub moments: u64,
    /// What glm-worker prints as "optimizer state" (masters + moments).
    pub optimizer: u64,
    pub total: u64,
}

impl From<States> for StatesOut {
    fn from(s: States) -> Self {
        StatesOut { params: s.params, grads: s.grads, master: s.master, moments: s.moments, optimizer: s.optimizer(), total: s.total() }
    }
}

/// The plan of one layout.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub layout: Layout,
    pub shape: Shape,
    pub cluster: Cluster,
    pub params_total: u64,
    pub params_per_rank: u64,
    pub padded_vocab: u64,
    pub loss_tokens: f64,
    pub memory: Memory,
    pub fits: bool,
    pub speed: Speed,
    pub model_flops_per_token: f64,
    /// Seconds to train_iters.
    pub time_to_train_s: f64,
}

/// The plan of `layout` for `job` on `dev`.
pub fn plan(job: &Job, l: &Layout, dev: &Device, c: &Cluster) -> Plan {
    let full = job.shape(l.tp);
    // a pipeline stage: its share of the layers, and (the first stage, the
    // largest) the embeddings
    let s = Shape { layers: full.layers.div_ceil(l.pp.max(1)), ..full };
    let loss_tokens = (job.loss_fraction * s.seq as f64).ceil() * l.micro as f64;
    let kernel = memory::Kernel::of(dev.cuda, job.attention_dropout, l.dtype);
    let st = memory::states(&s, l);
    let mut a: Activations = memory::activations(&s, l, l.micro, loss_tokens, kernel, &job.dropouts(), dev.cuda);
    if l.pp > 1 {
        // 1F1B: the first stage holds `pp` micro-batches in flight, each
        // with its activations (with checkpointing: its chunk inputs; one
        // chunk is recomputed at a time)
        let inflight = l.pp.min(l.accum.max(1)) as f64;
        let recomputed = |c: u64| c.min(s.layers) as f64 * a.per_layer;
        let ck = if l.checkpoint_layers > 0 { l.checkpoint_layers } else { 1 };
        a.layers_full *= inflight;
        a.layers_checkpointed = (a.layers_checkpointed - recomputed(ck)) * inflight + recomputed(ck);
        a.layers_kept = if l.checkpoint_layers > 0 { a.layers_checkpointed } else { a.layers_full };
    }
    let buckets = memory::buckets(&s, l);
    let padded = s.padded_per_rank(l.tp, l.dp) as f64;
    let snapshot = job.snapshot.map_or(0.0, |sn| memory::snapshot_bytes(padded as u64, l.zero, l.dp, sn.with_optimizer) as f64);
    let dynamic = a.kept() + a.transient;
    let fragmentation = dynamic * dev.fragmentation + dev.step_init_bytes as f64 + dev.heap_retention * st.total() as f64;
    // NCCL's buffers on every rank of a multi-rank GPU job (a profile's baseline is one process's)
    let nccl = if dev.cuda && dev.profile.is_none() && c.world() > 1 { device::NCCL_BYTES } else { 0 };
    let baseline = (dev.baseline_bytes + nccl) as f64;
    let host_snapshot = if dev.cuda { 0.0 } else { snapshot };
    let gather = memory::gather_scratch(&s, l) as f64;
    let peak = baseline + st.total() as f64 + (buckets + dynamic).max(gather) + fragmentation + host_snapshot;
    // a CPU host's memory is shared by the ranks it holds
    let device_memory = if dev.shared_by_node { dev.memory_bytes as f64 / c.per_node as f64 } else { dev.memory_bytes as f64 };
    let memory = Memory {
        states: st.into(),
        buckets,
        gather_scratch: gather,
        activations: a,
        baseline,
        fragmentation,
        snapshot,
        peak,
        device: device_memory,
        resume_transient: 12.0 * padded,
    };
    let sp = speed::step(&s, &full, l, dev, c, loss_tokens, &job.dropouts(), kernel);
    Plan {
        layout: *l,
        shape: s,
        cluster: *c,
        params_total: full.params_total(),
        params_per_rank: s.params_per_rank(l.tp),
        padded_vocab: s.vocab,
        loss_tokens,
        fits: peak <= device_memory,
        memory,
        model_flops_per_token: full.model_flops_per_token(),
        time_to_train_s: sp.step_s * job.train_iters as f64,
        speed: sp,
    }
}

/// Every layout of the cluster's ranks that keeps `job.global_batch`:
/// tensor-parallel sizes inside a node that split the model, ZeRO stages
/// 0-2 (1-2 only with data parallelism), every micro-batch that divides
/// the batch, checkpointing off or every layer. `base` gives the dtype and
/// buckets. Sorted: layouts that fit, fastest first; then those that do
/// not, the nearest to fitting first.
pub fn search(job: &Job, base: &Layout, dev: &Device, c: &Cluster) -> Vec<Plan> {
    let world = c.world();
    let pp = base.pp.max(1);
    let mut out = Vec::new();
    for tp in (1..=c.per_node.min(world)).filter(|t| world % (t * pp) == 0 && c.per_node % t == 0) {
        if job.split_error(tp).is_some() {
            continue;
        }
        let dp = world / tp / pp;
        if job.global_batch % dp != 0 {
            continue;
        }
        let per_rank = job.global_batch / dp;
        for micro in (1..=per_rank).filter(|m| per_rank % m == 0) {
            for zero in 0..=2u8 {
                if zero > 0 && dp == 1 {
                    continue;
                }
                for ck in [0, 1] {
                    let l = Layout { tp, dp, zero, micro, accum: per_rank / micro, checkpoint_layers: ck, ..*base };
                    out.push(plan(job, &l, dev, c));
                }
            }
        }
    }
    // those that fit, fastest first; then the rest, nearest to fitting first
    out.sort_by(|a, b| {
        b.fits.cmp(&a.fits).then(if a.fits {
            b.speed.tokens_per_s.total_cmp(&a.speed.tokens_per_s).then(a.memory.peak.total_cmp(&b.memory.peak))
        } else {
            a.memory.peak.total_cmp(&b.memory.peak)
        })
    });
    out
}

/// The worker `--set`s that select layout `l`.
pub fn sets(l: &Layout) -> Vec<String> {
    let mut v = vec![
        format!("model_parallel_size={}", l.tp),
        format!("ds.zero_optimization.stage={}", l.zero),
        format!("ds.train_micro_batch_size_per_gpu={}", l.micro),
        format!("ds.gradient_accumulation_steps={}", l.accum),
        format!("ds.train_batch_size={}", l.micro * l.accum * l.dp),
        format!("checkpoint_activations={}", l.checkpoint_layers > 0),
    ];
    if l.checkpoint_layers > 0 {
        v.push(format!("checkpoint_num_layers={}", l.checkpoint_layers));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use device::gpu;

    fn job() -> Job {
        Job {
            model: Shape { vocab: 30522, hidden: 1024, layers: 24, heads: 16, ffn: 4096, max_position_embeddings: 512, block_position: true, seq: 512 },
            divisible_by: 128,
            global_batch: 128,
            hidden_dropout: 0.1,
            attention_dropout: 0.1,
            fp32_layernorm: false,
            attention_scale: 1.0,
            loss_fraction: 0.5,
            train_iters: 1000,
            snapshot: None,
        }
    }

    fn base() -> Layout {
        Layout {
            tp: 1,
            pp: 1,
            dp: 8,
            zero: 1,
            micro: 16,
            accum: 1,
            checkpoint_layers: 0,
            dtype: Dtype::Bf16,
            reduce_bucket: 500_000_000,
            allgather_bucket: 500_000_000,
        }
    }

    #[test]
    fn vocabulary_padding() {
        assert_eq!(job().shape(1).vocab, 30592);
        let j = job();
        assert_eq!(Job { divisible_by: 1, model: Shape { vocab: 1001, ..j.model }, ..j }.shape(4).vocab, 1004);
    }

    /// The search keeps the global batch, only fits before misfits, and
    /// its first layout is the fastest that fits.
    #[test]
    fn search_keeps_the_batch_and_ranks_by_speed() {
        let dev = Device::from_gpu(gpu("h100-sxm").unwrap(), false);
        let c = Cluster { nodes: 1, per_node: 8 };
        let all = search(&job(), &base(), &dev, &c);
        assert!(all.len() > 20);
        for p in &all {
            assert_eq!(p.layout.micro * p.layout.accum * p.layout.dp, 128);
            assert_eq!(p.layout.tp * p.layout.pp * p.layout.dp, 8);
        }
        let fits: Vec<&Plan> = all.iter().take_while(|p| p.fits).collect();
        assert!(!fits.is_empty() && fits.windows(2).all(|w| w[0].speed.tokens_per_s >= w[1].speed.tokens_per_s));
        assert!(all[fits.len()..].iter().all(|p| !p.fits));
        // heads 16 split over 1, 2, 4, 8: all four sizes appear
        let tps: std::collections::BTreeSet<u64> = all.iter().map(|p| p.layout.tp).collect();
        assert_eq!(tps.into_iter().collect::<Vec<_>>(), vec![1, 2, 4, 8]);
    }

    /// A model whose states alone exceed the device does not fit, and
    /// checkpointing lowers the activations kept.
    #[test]
    fn fit_and_checkpointing() {
        let dev = Device::from_gpu(gpu("a100-40gb").unwrap(), false);
        let c = Cluster { nodes: 1, per_node: 1 };
        let j = job();
        let big = Job { model: Shape { hidden: 12288, layers: 70, heads: 96, ffn: 4 * 12288, seq: 2048, ..j.model }, global_batch: 1, ..j };
        let l = Layout { dp: 1, zero: 0, micro: 1, ..base() };
        assert!(!plan(&big, &l, &dev, &c).fits);
        let small = plan(&job(), &Layout { dp: 1, zero: 0, micro: 1, ..base() }, &dev, &c);
        let ck = plan(&job(), &Layout { dp: 1, zero: 0, micro: 1, checkpoint_layers: 1, ..base() }, &dev, &c);
        assert!(small.fits && ck.memory.activations.layers_kept < small.memory.activations.layers_kept / 5.0);
        assert!(ck.speed.step_s > small.speed.step_s);
    }

    /// Pipeline stages (analysis): each rank holds its stage's layers
    /// (here 3 of 24, plus the embeddings on the first stage), the first
    /// stage keeps `pp` micro-batches in flight (as many activations as the
    /// whole model's one micro-batch), and the step pays the 1F1B bubble
    /// (accum + pp − 1 slots).
    #[test]
    fn pipeline_stages() {
        let dev = Device::from_gpu(gpu("a100-40gb").unwrap(), false);
        let c = Cluster { nodes: 1, per_node: 8 };
        // no loss positions: the logits (the last stage's) out of the comparison
        let j = Job { loss_fraction: 0.0, ..job() };
        let one = plan(&j, &Layout { dp: 1, zero: 0, micro: 1, accum: 16, ..base() }, &dev, &Cluster { nodes: 1, per_node: 1 });
        let eight = plan(&j, &Layout { pp: 8, dp: 1, zero: 0, micro: 1, accum: 16, ..base() }, &dev, &c);
        let s = job().shape(1);
        let stage = Shape { layers: 3, ..s };
        assert_eq!(eight.params_per_rank, stage.params_per_rank(1));
        assert!((eight.memory.activations.layers_full - one.memory.activations.layers_full).abs() < 1.0);
        let slots = (16.0 + 8.0 - 1.0) / 16.0;
        let bubble = eight.speed.gemm_s / (one.speed.gemm_s / 8.0);
        assert!((bubble - slots).abs() < 1e-9, "{bubble} vs {slots}");
    }

    /// The peak is the sum of its parts: baseline (with NCCL's buffers for
    /// several ranks), model states, buckets and activations (or the
    /// all-gather's scratch, whichever is larger) and the allocator's share.
    #[test]
    fn peak_is_the_sum_of_its_parts() {
        let dev = Device::from_gpu(gpu("h100-sxm").unwrap(), false);
        let c = Cluster { nodes: 1, per_node: 8 };
        let l = Layout { zero: 2, ..base() };
        let p = plan(&job(), &l, &dev, &c);
        let m = &p.memory;
        let a = &m.activations;
        assert_eq!(m.baseline, (device::CUDA_BASELINE_BYTES + device::NCCL_BYTES) as f64);
        assert_eq!(m.fragmentation, (a.kept() + a.transient) * device::CUDA_FRAGMENTATION);
        let sum = m.baseline + m.states.total as f64 + (m.buckets + a.kept() + a.transient).max(m.gather_scratch) + m.fragmentation;
        assert!((m.peak - sum).abs() < 1.0, "{} vs {sum}", m.peak);
        assert_eq!(m.buckets, memory::buckets(&job().shape(1), &l));
        assert!(m.buckets > 0.0 && m.device == (81559u64 << 20) as f64);
    }

    #[test]
    fn sets_select_the_layout() {
        let s = sets(&Layout { tp: 2, pp: 1, dp: 4, zero: 2, micro: 8, accum: 4, checkpoint_layers: 1, ..base() });
        assert_eq!(
            s,
            [
                "model_parallel_size=2", "ds.zero_optimization.stage=2", "ds.train_micro_batch_size_per_gpu=8", "ds.gradient_accumulation_steps=4",
                "ds.train_batch_size=128", "checkpoint_activations=true", "checkpoint_num_layers=1"
            ]
        );
    }
}
