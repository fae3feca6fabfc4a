//! `glm-launch plan`: per-rank memory, step time and the best layout of a
//! job before any GPU is booked; and the preflight's check that the job
//! about to start fits its devices. The formulas are glm_common::plan's.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use glm_common::hostfile::Placement;
use glm_common::plan::device::{gpu, gpu_keys, Device};
use glm_common::plan::profile::{Dtype, Profile};
use glm_common::plan::{self as planner, Cluster, Layout, Plan};
use glm_common::units::human_bytes;

use crate::job::{flag_value, Job};

#[derive(Parser, Debug)]
#[command(
    name = "glm-launch plan",
    about = "Memory per rank, step time and the best layout of a training job, before it runs",
    after_help = "The cluster: a hostfile (with DeepSpeed's selection flags) or --nodes/--gpus-per-node. The device: --gpu (a built-in table) or --profile (measured by glm-worker bench-step --profile-out). docs/scale.md derives every formula and shows worked plans."
)]
struct PlanCli {
    /// The DeepSpeed config, as glm-worker takes it
    #[arg(long)]
    config: Option<PathBuf>,
    /// The original's configs.json, as glm-worker takes it (default configs/configs.json)
    #[arg(long)]
    args: Option<PathBuf>,
    /// KEY=VALUE over configs.json (ds.KEY over the DeepSpeed file), as glm-worker takes them
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// The token store glm-worker would use (its vocabulary size is the model's)
    #[arg(long)]
    store: Option<PathBuf>,
    /// The cluster: a hostfile's hosts and slots, selected as glm-launch selects them
    #[command(flatten)]
    hosts: crate::Hosts,
    /// Nodes of the cluster (without a hostfile)
    #[arg(long)]
    nodes: Option<u64>,
    /// Ranks (GPUs) per node (without a hostfile)
    #[arg(long)]
    gpus_per_node: Option<u64>,
    /// The device, from the built-in table
    #[arg(long)]
    gpu: Option<String>,
    /// The device as measured: a profile from glm-worker bench-step --profile-out
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Override the device's memory per rank (GB)
    #[arg(long)]
    memory_gb: Option<f64>,
    /// Override the device's peak TFLOP/s for the run's precision
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Override the collective bus bandwidth inside a node (GB/s)
    #[arg(long)]
    intra_gbps: Option<f64>,
    /// Override the collective bus bandwidth between nodes, per GPU (GB/s)
    #[arg(long)]
    inter_gbps: Option<f64>,
    /// fp32 matmuls on TF32 tensor cores (libtorch's default is off)
    #[arg(long)]
    tf32: bool,
    /// The tokenizer's vocabulary size (default: the store's, else the tokenizer's, else a trained one's 16000)
    #[arg(long)]
    vocab: Option<u64>,
    /// Loss positions as a share of the sequence (default: the largest GLM's blank-infilling modes give)
    #[arg(long)]
    loss_fraction: Option<f64>,
    /// Pipeline-parallel stages, as an analysis only (glm-worker has no pipeline parallelism): the layers split over N stages, 1F1B
    #[arg(long, default_value_t = 1)]
    pp: u64,
    /// Layouts of the search to show
    #[arg(long, default_value_t = 8)]
    top: usize,
    /// Only the configured layout, no search
    #[arg(long)]
    no_search: bool,
    /// Print the configured layout's plan as JSON (and the search's best as "best")
    #[arg(long)]
    json: bool,
}

/// `glm-launch plan ARGS`.
pub fn main(args: &[String]) -> Result<i32> {
    let mut argv = vec!["glm-launch plan".to_string()];
    // options spelled with underscores too (--num_nodes, --gpus_per_node), as glm-launch's own
    argv.extend(args.iter().map(|a| match a.strip_prefix("--") {
        Some(body) => {
            let (name, value) = body.split_once('=').map_or((body, None), |(n, v)| (n, Some(v)));
            format!("--{}{}", name.replace('_', "-"), value.map(|v| format!("={v}")).unwrap_or_default())
        }
        None => a.clone(),
    }));
    let cli = PlanCli::parse_from(argv);
    cli.refuse_ignored()?;
    let mut worker_args = Vec::new();
    if let Some(c) = &cli.config {
        if !c.is_file() {
            bail!("--config {}: no such file", c.display());
        }
        worker_args.extend(["--config".to_string(), c.display().to_string()]);
    }
    if let Some(a) = &cli.args {
        worker_args.extend(["--args".to_string(), a.display().to_string()]);
    }
    for s in &cli.sets {
        worker_args.extend(["--set".to_string(), s.clone()]);
    }
    if let Some(s) = &cli.store {
        worker_args.extend(["--store".to_string(), s.display().to_string()]);
    }
    let job = Job::read(&worker_args)?.context("no job")?;
    let cluster = cluster(&cli)?;
    let device = device(&cli)?;
    if cluster.world() > 1 && device.intra_bus_gbps <= 0.0 {
        bail!(
            "--profile {}: measured by one process, it has no collective bandwidth, and the cluster has {} ranks: measure it under mpirun (mpirun -np 2 glm-worker bench-step --profile-out FILE), or give --intra-gbps",
            cli.profile.as_ref().map_or(String::new(), |p| p.display().to_string()),
            cluster.world()
        );
    }
    if cluster.nodes > 1 && cli.profile.is_some() && cli.inter_gbps.is_none() {
        bail!("--profile measures one machine, and the cluster has {} nodes: give the network's bus bandwidth per rank with --inter-gbps", cluster.nodes);
    }
    let vocab = match cli.vocab {
        Some(v) => (v, "--vocab".to_string()),
        None => vocab(&job, &worker_args)?,
    };
    if cli.pp == 0 || cluster.world() % cli.pp != 0 {
        bail!("--pp {}: must divide the cluster's {} rank(s)", cli.pp, cluster.world());
    }
    if cli.pp > job.args.num_layers as u64 {
        bail!("--pp {}: more pipeline stages than the model's {} layers", cli.pp, job.args.num_layers);
    }
    let (pj, mut layout) = planned(&job, cluster.world() / cli.pp, vocab.0, cli.loss_fraction)?;
    layout.pp = cli.pp;
    let p = planner::plan(&pj, &layout, &device, &cluster);
    let found = if cli.no_search { Vec::new() } else { planner::search(&pj, &layout, &device, &cluster) };
    if cli.json {
        // versioned: scripts read it (bench/plan_grid.py); "best" only when a layout fits
        let v = serde_json::json!({
            "format": "glm-plan",
            "version": 1,
            "device": device.name,
            "vocab": vocab.0,
            "vocab_source": vocab.1,
            "plan": p,
            "best": found.first().filter(|b| b.fits),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!("{}", header(&pj, &device, &cluster, &vocab));
    println!("configured layout: {}", describe(&layout));
    for line in breakdown(&p) {
        println!("  {line}");
    }
    for line in speed(&p, &device, &pj) {
        println!("  {line}");
    }
    if !found.is_empty() {
        let fit = found.iter().filter(|p| p.fits).count();
        println!("search: {} layouts of {} rank(s) keep the global batch of {}; {fit} fit", found.len(), cluster.world(), pj.global_batch);
        println!(
            "  {:>4} {:>4} {:>4} {:>5} {:>5} {:>4} {:>10} {:>10} {:>8} {:>6}",
            "tp", "dp", "zero", "micro", "accum", "ckpt", "peak", "tokens/s", "ms/step", "MFU"
        );
        for q in found.iter().take(cli.top) {
            let l = &q.layout;
            println!(
                "  {:>4} {:>4} {:>4} {:>5} {:>5} {:>4} {:>10} {:>10.0} {:>8.1} {:>5.1}%{}",
                l.tp,
                l.dp,
                l.zero,
                l.micro,
                l.accum,
                if l.checkpoint_layers > 0 { "on" } else { "off" },
                human_bytes(q.memory.peak as u64),
                q.speed.tokens_per_s,
                q.speed.step_s * 1e3,
                q.speed.mfu * 100.0,
                if q.fits { "" } else { "  does not fit" }
            );
        }
        match found.first().filter(|b| b.fits) {
            Some(b) if b.layout == layout => println!("the configured layout is the best found"),
            Some(b) if b.layout.pp > 1 => println!("best: {} (pipeline parallelism: an analysis, glm-worker cannot run it)", describe(&b.layout)),
            Some(b) => {
                let sets: Vec<String> = planner::sets(&b.layout).iter().map(|s| format!("--set {s}")).collect();
                println!(
                    "best: {} ({:.2}× the configured layout's tokens/s): {}",
                    describe(&b.layout),
                    b.speed.tokens_per_s / p.speed.tokens_per_s,
                    sets.join(" ")
                );
            }
            None => println!("no layout of {} rank(s) fits {} per rank: more ranks, or a smaller model", cluster.world(), human_bytes(device.memory_bytes)),
        }
    }
    Ok(0)
}

impl PlanCli {
    /// Refuses flags that would do nothing here, and numbers that are no
    /// sizes or rates.
    fn refuse_ignored(&self) -> Result<()> {
        let profile = self.profile.is_some();
        let one_node = self.nodes.unwrap_or(1) == 1 && self.hosts.hostfile_placement().ok().flatten().is_none_or(|p| p.hosts.len() == 1);
        for (given, why) in [
            (self.tf32 && profile, "--tf32 is a table device's setting: a profile measured its own fp32 matmuls"),
            (self.peak_tflops.is_some() && profile, "--peak-tflops is a table device's setting: a profile's rates are measured"),
            (self.top != 8 && (self.json || self.no_search), "--top sets how many layouts of the search to show: not with --json or --no-search"),
            (self.store.is_some() && self.vocab.is_some(), "--store is read for its vocabulary size, which --vocab gives"),
            (self.inter_gbps.is_some() && one_node, "--inter-gbps is the bandwidth between nodes, and the cluster has one"),
        ] {
            if given {
                bail!("{why}");
            }
        }
        let positive = |name: &str, v: Option<f64>| match v {
            Some(x) if !(x.is_finite() && x > 0.0) => bail!("{name} {x}: must be a positive number"),
            _ => Ok(()),
        };
        positive("--memory-gb", self.memory_gb)?;
        positive("--peak-tflops", self.peak_tflops)?;
        positive("--intra-gbps", self.intra_gbps)?;
        positive("--inter-gbps", self.inter_gbps)?;
        if let Some(f) = self.loss_fraction.filter(|f| !(f.is_finite() && *f > 0.0 && *f <= 1.0)) {
            bail!("--loss-fraction {f}: the share of a sequence's positions that are loss positions, in (0, 1]");
        }
        if self.vocab == Some(0) {
            bail!("--vocab 0: the tokenizer's ids must be positive");
        }
        Ok(())
    }
}

fn cluster(cli: &PlanCli) -> Result<Cluster> {
    let from_file = cli.hosts.hostfile_placement()?;
    if from_file.is_none() && cli.hosts.selecting() {
        bail!("--include, --exclude, --num_nodes and --num_gpus select from a --hostfile");
    }
    match (from_file, cli.nodes, cli.gpus_per_node) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => bail!("--hostfile or --nodes/--gpus-per-node, not both"),
        (Some(p), None, None) => {
            let slots: std::collections::BTreeSet<usize> = p.hosts.iter().map(|(_, s)| s.len()).collect();
            if slots.len() > 1 {
                bail!(
                    "the selected hosts have different numbers of slots ({}): the plan assumes alike nodes; select alike ones (--include, --num_gpus) or plan with --nodes/--gpus-per-node",
                    p.hosts.iter().map(|(h, s)| format!("{h} {}", s.len())).collect::<Vec<_>>().join(", ")
                );
            }
            Ok(of_placement(&p))
        }
        (None, n, g) => {
            let (n, g) = (n.unwrap_or(1), g.unwrap_or(1));
            if n == 0 || g == 0 || n.checked_mul(g).is_none_or(|w| w > 1 << 24) {
                bail!("--nodes {n} --gpus-per-node {g}: both at least 1, and at most 16M ranks in all");
            }
            Ok(Cluster { nodes: n, per_node: g })
        }
    }
}

/// The cluster of a placement: its hosts, and the fewest slots any of them
/// has (the plan assumes every node alike; tensor-parallel groups fit the
/// smallest).
pub fn of_placement(p: &Placement) -> Cluster {
    let per_node = p.hosts.iter().map(|(_, s)| s.len() as u64).min().unwrap_or(1);
    Cluster { nodes: p.hosts.len() as u64, per_node: per_node.max(1) }
}

fn device(cli: &PlanCli) -> Result<Device> {
    let mut d = match (&cli.gpu, &cli.profile) {
        (Some(_), Some(_)) => bail!("--gpu or --profile, not both"),
        (Some(g), None) => Device::from_gpu(gpu(g).with_context(|| format!("--gpu {g}: expected one of {}", gpu_keys()))?, cli.tf32),
        (None, Some(p)) => Device::from_profile(Profile::load(p)?),
        (None, None) => bail!("name the device: --gpu {} or --profile FILE (glm-worker bench-step --profile-out FILE measures one)", gpu_keys()),
    };
    if let Some(m) = cli.memory_gb {
        d.memory_bytes = (m * 1e9) as u64;
    }
    if let Some(t) = cli.peak_tflops {
        d.peak_tflops = [t; 3];
    }
    if let Some(b) = cli.intra_gbps {
        d.intra_bus_gbps = b;
    }
    if let Some(b) = cli.inter_gbps {
        d.inter_bus_gbps = b;
    }
    Ok(d)
}

/// The vocabulary the worker would build, and where that came from: the
/// token store's (`--store`, or the default one), else a BERT vocab.txt's
/// lines, else the size of a tokenizer trained on the corpus
/// (`--vocab-size`, 16000).
pub fn vocab(job: &Job, worker_args: &[String]) -> Result<(u64, String)> {
    let store = PathBuf::from(flag_value(worker_args, "--store").unwrap_or_else(|| "glm_pretrain/data/store".into()));
    let meta = store.join("meta.json");
    let stored = std::fs::read_to_string(&meta).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()).and_then(|v| v["vocab_size"].as_u64());
    if let Some(v) = stored {
        return Ok((v, format!("the token store {}", meta.display())));
    }
    match &job.args.tokenizer_path {
        Some(p) => {
            let file = if p.is_dir() { p.join("vocab.txt") } else { p.clone() };
            match std::fs::read_to_string(&file).ok().filter(|_| file.file_name().is_some_and(|n| n == "vocab.txt")) {
                Some(t) => Ok((t.lines().filter(|l| !l.is_empty()).count() as u64, format!("{} (its lines; command tokens may add a few)", file.display()))),
                None => bail!(
                    "the vocabulary size of tokenizer_path {} is not known without loading it, and there is no token store at {}: give it with --vocab (glm-worker prepare prints it)",
                    p.display(),
                    store.display()
                ),
            }
        }
        None => {
            let n = flag_value(worker_args, "--vocab-size").and_then(|v| v.parse().ok()).unwrap_or(16000);
            Ok((n, "the size of a tokenizer trained on the corpus (glm-worker's --vocab-size)".into()))
        }
    }
}

/// The planner's view of `job` on `world` ranks: the model, batch and
/// precision as glm-worker reads them, and the configured layout.
pub fn planned(job: &Job, world: u64, vocab: u64, loss_fraction: Option<f64>) -> Result<(planner::Job, Layout)> {
    let a = &job.args;
    let tp = a.model_parallel_size.max(1) as u64;
    if world % tp != 0 {
        bail!("model_parallel_size {tp} does not divide the {world} rank(s)");
    }
    // what glm-worker refuses, refused here in its words
    glm_common::dims::check_sizes(a.hidden_size, a.num_layers, a.num_attention_heads).map_err(anyhow::Error::msg)?;
    let ffn = a.intermediate_size.unwrap_or(4 * a.hidden_size);
    if ffn == 0 {
        bail!("intermediate_size 0: must be positive");
    }
    glm_common::dims::check_split(tp as usize, a.hidden_size, a.num_attention_heads, ffn).map_err(anyhow::Error::msg)?;
    if a.seq_length == 0 || a.seq_length > a.max_position_embeddings {
        bail!("seq_length {} exceeds max_position_embeddings {} (or is 0)", a.seq_length, a.max_position_embeddings);
    }
    let batch = job.batch(world as usize)?;
    let ds = job.ds.as_ref();
    // glm-worker's rule: the DeepSpeed file's bf16, else its fp16 block's
    // `enabled`, else configs.json's fp16
    let dtype = if ds.is_some_and(|d| d.bf16 == Some(true)) {
        Dtype::Bf16
    } else if ds.and_then(|d| d.fp16.as_ref()).and_then(|f| f.enabled).unwrap_or(a.fp16) {
        Dtype::Fp16
    } else {
        Dtype::Fp32
    };
    let f = loss_fraction.unwrap_or_else(|| {
        let mut f: f64 = 0.0;
        if a.bert_prob > 0.0 {
            f = f.max(0.15 * (1.0 + 1.0 / a.avg_block_length.max(1.0)));
        }
        if a.gpt_infill_prob > 0.0 {
            f = f.max(1.0 - a.gpt_min_ratio);
        }
        if a.gap_sentence_prob > 0.0 {
            f = f.max(a.gap_sentence_ratio * 1.2);
        }
        f.clamp(0.01, 1.0)
    });
    let background = ds.and_then(|d| d.checkpoint_decoupled) != Some(false);
    let pj = planner::Job {
        model: glm_common::plan::model::Shape {
            vocab,
            hidden: a.hidden_size as u64,
            layers: a.num_layers as u64,
            heads: a.num_attention_heads as u64,
            ffn: ffn as u64,
            max_position_embeddings: a.max_position_embeddings as u64,
            block_position: !a.no_block_position,
            seq: a.seq_length as u64,
        },
        divisible_by: a.make_vocab_size_divisible_by as u64,
        global_batch: batch.global as u64,
        hidden_dropout: a.hidden_dropout,
        attention_dropout: a.attention_dropout,
        fp32_layernorm: a.fp32_layernorm,
        attention_scale: a.attention_scale,
        loss_fraction: f,
        train_iters: a.train_iters,
        snapshot: (a.save.is_some() && background).then_some(planner::Snapshot { with_optimizer: !a.no_save_optim }),
    };
    let zero = ds.map_or(0, |d| d.zero_stage) as u8;
    let layout = Layout {
        tp,
        pp: 1,
        dp: world / tp,
        zero,
        micro: batch.micro as u64,
        accum: batch.accum as u64,
        checkpoint_layers: if a.checkpoint_activations { a.checkpoint_num_layers as u64 } else { 0 },
        dtype,
        reduce_bucket: ds.and_then(|d| d.reduce_bucket_size).unwrap_or(500_000_000),
        allgather_bucket: ds.and_then(|d| d.allgather_bucket_size).unwrap_or(500_000_000),
    };
    Ok((pj, layout))
}

fn describe(l: &Layout) -> String {
    format!(
        "tp {}{} × dp {}, ZeRO stage {}, micro-batch {} × accumulation {}, {}, activation checkpointing {}",
        l.tp,
        if l.pp > 1 { format!(" × pp {}", l.pp) } else { String::new() },
        l.dp,
        l.zero,
        l.micro,
        l.accum,
        l.dtype.name(),
        if l.checkpoint_layers > 0 { format!("every {} layer(s)", l.checkpoint_layers) } else { "off".into() }
    )
}

fn header(j: &planner::Job, d: &Device, c: &Cluster, vocab: &(u64, String)) -> String {
    format!(
        "plan: GLM {} layers × hidden {} ({} heads, ffn {}), seq {}, vocabulary {} from {}; global batch {}; {} node(s) × {} rank(s) of {} ({} each)",
        j.model.layers,
        j.model.hidden,
        j.model.heads,
        j.model.ffn,
        j.model.seq,
        vocab.0,
        vocab.1,
        j.global_batch,
        c.nodes,
        c.per_node,
        d.name,
        human_bytes(d.memory_bytes)
    )
}

/// The memory breakdown of a plan, one line each.
pub fn breakdown(p: &Plan) -> Vec<String> {
    let m = &p.memory;
    let s = &m.states;
    let a = &m.activations;
    let b = |x: f64| human_bytes(x.max(0.0) as u64);
    let mut v = vec![
        format!(
            "parameters: {} in all, {} on each rank ({} padded vocabulary rows split over tp {})",
            glm_common::units::human_count(p.params_total),
            glm_common::units::human_count(p.params_per_rank),
            p.padded_vocab,
            p.layout.tp
        ),
        format!(
            "model states per rank (exact): parameters {} + gradients {} + fp32 master weights {} + Adam moments {} = {}",
            b(s.params as f64),
            b(s.grads as f64),
            b(s.master as f64),
            b(s.moments as f64),
            b(s.total as f64)
        ),
    ];
    if m.buckets > 0.0 || m.gather_scratch > 0.0 {
        v.push(format!(
            "ZeRO buffers: gradient buckets in flight during backward {}, the parameters' all-gather scratch after the update {}",
            b(m.buckets),
            b(m.gather_scratch)
        ));
    }
    v.push(format!(
        "activations per micro-batch ({} loss positions, {} attention): {} a layer, {} for all {} layers{}; head and loss {}; attention mask {}",
        p.loss_tokens,
        if a.unfused_attention { "unfused (CPU with attention dropout)" } else { "fused" },
        b(a.per_layer),
        b(a.layers_full),
        p.shape.layers,
        if p.layout.checkpoint_layers > 0 {
            format!(", {} kept with checkpointing", b(a.layers_kept))
        } else {
            format!(" ({} with checkpointing every layer)", b(a.layers_checkpointed))
        },
        b(a.head),
        b(a.mask)
    ));
    v.push(format!("largest transient on top: {} (the logits at the loss, or one layer's backward)", b(a.transient)));
    v.push(format!(
        "baseline {} (the process before the model) + allocator overhead {}{}",
        b(m.baseline),
        b(m.fragmentation),
        if m.snapshot > 0.0 { format!(" + background checkpoint copies {} (host memory)", b(m.snapshot)) } else { String::new() }
    ));
    v.push(format!(
        "peak per rank {} of {} : {}",
        b(m.peak),
        b(m.device),
        if p.fits { format!("fits ({:.0}%)", 100.0 * m.peak / m.device) } else { format!("DOES NOT FIT (short by {})", b(m.peak - m.device)) }
    ));
    v.push(format!("a resume at another data-parallel size reads up to {} more while re-partitioning", b(m.resume_transient)));
    v
}

/// `v` to three significant figures (989, 67.0, 0.218).
fn figures(v: f64) -> String {
    let digits = if v >= 99.95 { 0 } else { (2 - v.abs().max(1e-9).log10().floor() as i32).clamp(0, 6) as usize };
    format!("{v:.digits$}")
}

fn speed(p: &Plan, d: &Device, j: &planner::Job) -> Vec<String> {
    let s = &p.speed;
    let ms = |x: f64| format!("{:.1} ms", x * 1e3);
    let hours = p.time_to_train_s / 3600.0;
    vec![
        format!(
            "step: {} executed per rank ({}), model {:.3e} FLOPs a token (6·N + 12·L·h·s)",
            format!("{}FLOP", glm_common::units::human_count(s.executed_flops as u64)),
            if p.layout.checkpoint_layers > 0 { "recomputation included" } else { "no recomputation" },
            p.model_flops_per_token
        ),
        format!(
            "time per step: matmuls {} + attention {} + elementwise {} + kernel launches {} + optimizer {} + tensor-parallel comm {} ({}) + data-parallel comm {} ({}) = {}; {} with the data-parallel reduction overlapped",
            ms(s.gemm_s),
            ms(s.attention_s),
            ms(s.elementwise_s),
            ms(s.launch_s),
            ms(s.optimizer_s),
            ms(s.tp_comm_s),
            human_bytes(s.tp_bytes as u64),
            ms(s.dp_comm_s),
            human_bytes(s.dp_bytes as u64),
            ms(s.step_s),
            ms(s.step_overlap_s)
        ),
        format!(
            "{:.0} tokens/s, MFU {:.1}% of {} TFLOP/s {} per rank; {} steps (train_iters) in {:.1} h",
            s.tokens_per_s,
            s.mfu * 100.0,
            figures(d.peak(p.layout.dtype)),
            p.layout.dtype.name(),
            j.train_iters,
            hours
        ),
    ]
}

/// The preflight's check of the job about to start: its plan on devices of
/// `memory_per_rank` bytes (the smallest any selected host offers).
/// `Err` holds the refusal with the breakdown.
pub fn check(job: &Job, worker_args: &[String], place: &Placement, cuda: bool, memory_per_rank: u64) -> Result<String> {
    let c = of_placement(place);
    // only memory decides here: a table GPU's figures for the rest
    let mut dev = if cuda { Device::from_gpu(gpu("h100-sxm").expect("in the table"), false) } else { cpu_device() };
    dev.name = if cuda { "GPU".into() } else { "CPU".into() };
    dev.memory_bytes = memory_per_rank;
    let vocab = vocab(job, worker_args)?;
    let (pj, l) = planned(job, place.world_size() as u64, vocab.0, None)?;
    let p = planner::plan(&pj, &l, &dev, &c);
    let summary = format!(
        "glm-launch: plan: peak {} per rank of {} ({}; model states {}, activations kept {} a micro-batch)",
        human_bytes(p.memory.peak as u64),
        human_bytes(memory_per_rank),
        describe(&l),
        human_bytes(p.memory.states.total),
        human_bytes(p.memory.activations.kept() as u64)
    );
    if p.fits {
        return Ok(summary);
    }
    let mut msg = vec![format!(
        "the job does not fit: about {} per rank, and the selected {} offer {} per rank",
        human_bytes(p.memory.peak as u64),
        if cuda { "GPUs" } else { "hosts" },
        human_bytes(memory_per_rank)
    )];
    msg.extend(breakdown(&p).into_iter().map(|l| format!("  {l}")));
    // the search assumes alike nodes: with uneven ones it would plan another world
    let even = place.hosts.iter().all(|(_, s)| s.len() as u64 == c.per_node);
    let found = if even { planner::search(&pj, &l, &dev, &c) } else { Vec::new() };
    match found.first().filter(|b| b.fits) {
        Some(b) => msg.push(format!(
            "HINT: this layout fits ({} per rank): {}",
            human_bytes(b.memory.peak as u64),
            planner::sets(&b.layout).iter().map(|s| format!("--set {s}")).collect::<Vec<_>>().join(" ")
        )),
        None if even => msg.push(format!("HINT: no layout of {} rank(s) fits: more ranks, or a smaller model", place.world_size())),
        None => msg.push("HINT: more memory per rank (more ranks, ZeRO stage 2, activation checkpointing), or a smaller model".into()),
    }
    msg.push("(glm-launch plan shows the whole plan; --no-plan-check starts the job anyway)".into());
    bail!("{}", msg.join("\n"))
}

/// A CPU rank as the preflight assumes it: libtorch's resident set before
/// the model (measured on this project's CPU runs), no fragmentation.
fn cpu_device() -> Device {
    Device {
        name: "CPU".into(),
        cuda: false,
        memory_bytes: 0,
        baseline_bytes: CPU_BASELINE_BYTES,
        peak_tflops: [0.1; 3],
        hbm_gbps: 5.0,
        intra_bus_gbps: 5.0,
        inter_bus_gbps: 1.0,
        fragmentation: 0.0,
        // the preflight divides the host's memory by its slots itself
        shared_by_node: false,
        step_init_bytes: glm_common::plan::device::CPU_STEP_INIT_BYTES,
        heap_retention: glm_common::plan::device::CPU_HEAP_RETENTION,
        profile: None,
        tf32: false,
    }
}

/// The resident set of a glm-worker process with libtorch loaded, before
/// the model (bench-step's profile measures it per machine).
pub const CPU_BASELINE_BYTES: u64 = 300_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    /// glm-worker's rule (`RunConfig::precision`): the DeepSpeed file's
    /// bf16, else its fp16 block's `enabled`, else configs.json's fp16.
    #[test]
    fn precision_as_the_worker_decides_it() {
        let d = tempfile::tempdir().unwrap();
        let args = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/configs_tiny.json");
        let case = |ds: &str, sets: &[&str]| -> Dtype {
            let f = d.path().join("ds.json");
            std::fs::write(&f, ds).unwrap();
            let mut w: Vec<String> = vec!["--config".into(), f.display().to_string(), "--args".into(), args.into(), "--set".into(), "save=null".into()];
            for s in sets {
                w.extend(["--set".to_string(), s.to_string()]);
            }
            let job = Job::read(&w).unwrap().unwrap();
            planned(&job, 1, 16000, None).unwrap().1.dtype
        };
        assert_eq!(case(r#"{"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": true}}"#, &[]), Dtype::Bf16);
        assert_eq!(case(r#"{"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": true}}"#, &[]), Dtype::Fp16);
        assert_eq!(case(r#"{"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": false}}"#, &["fp16=true"]), Dtype::Fp32);
        assert_eq!(case(r#"{"train_micro_batch_size_per_gpu": 2}"#, &["fp16=true"]), Dtype::Fp16);
        assert_eq!(case(r#"{"train_micro_batch_size_per_gpu": 2}"#, &[]), Dtype::Fp32);
    }

    #[test]
    fn three_figures() {
        assert_eq!([super::figures(989.0), super::figures(67.0), super::figures(0.21752), super::figures(19.5)], ["989", "67.0", "0.218", "19.5"]);
    }
}
