//! `bench-step`: the training step on a synthetic batch, timed (the
//! benchmark of scripts/bench.sh and scripts/gpu_check.sh).

use anyhow::Result;
use tch::Tensor;

use glm_worker::comm::Communicator;
use glm_worker::model::glm::{Batch, GlmConfig};
use glm_worker::optim::adamw::AdamWConfig;
use glm_worker::optim::optimizer::{OptimConfig, Precision};
use glm_worker::optim::zero::ZeroConfig;
use glm_worker::parallel::Parallel;
use glm_worker::train::build::{build, Recipe};

use crate::at_least;
use crate::rank::{device, rank_device};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Intra-op threads
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..))]
    threads: i32,
    /// Timed steps
    #[arg(long, default_value_t = 20, value_parser = at_least(1))]
    iters: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 4, value_parser = at_least(1))]
    layers: usize,
    #[arg(long, default_value_t = 256, value_parser = at_least(1))]
    hidden: usize,
    #[arg(long, default_value_t = 4, value_parser = at_least(1))]
    heads: usize,
    /// Sequence length (Part A is its first half, Part B its second)
    #[arg(long, default_value_t = 256, value_parser = at_least(2))]
    seq: usize,
    #[arg(long, default_value_t = 8, value_parser = at_least(1))]
    batch: usize,
    /// Vocabulary size (token ids are drawn from 10 up)
    #[arg(long, default_value_t = 16000, value_parser = at_least(16))]
    vocab: usize,
    #[arg(long, default_value_t = 0.1)]
    dropout: f64,
    /// cpu, cuda, or auto
    #[arg(long, default_value = "cpu")]
    device: String,
    /// fp32, bf16 or fp16 (fp16: dynamic loss scaling)
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// Recompute every layer in backward (activation checkpointing)
    #[arg(long)]
    checkpoint_activations: bool,
    /// ZeRO stage (0, 1, 2) over the data-parallel ranks (run under mpirun: one batch per rank)
    #[arg(long, default_value_t = 0)]
    zero_stage: u8,
    /// ZeRO's reduce_bucket_size (elements)
    #[arg(long, default_value_t = 500_000_000, value_parser = clap::value_parser!(i64).range(1..))]
    reduce_bucket_size: i64,
    /// ZeRO's allgather_bucket_size (elements)
    #[arg(long, default_value_t = 500_000_000, value_parser = clap::value_parser!(i64).range(1..))]
    allgather_bucket_size: i64,
    /// Save a checkpoint into this directory every --save-every timed steps,
    /// as training does: its time on the training thread counts in ms/it
    /// (held_ms_per_save: per save installed within the timed steps); a
    /// background save still in flight after them is waited for untimed (end_wait_ms)
    #[arg(long)]
    save: Option<std::path::PathBuf>,
    /// Steps between checkpoints (with --save)
    #[arg(long, default_value_t = 1, value_parser = at_least(1))]
    save_every: usize,
    /// How checkpoint files are written: background (training goes on) or inline (training waits)
    #[arg(long, default_value = "background", value_parser = ["background", "inline"])]
    save_writer: String,
    /// Checkpoints kept in --save (keep_last)
    #[arg(long, default_value_t = 2, value_parser = at_least(1))]
    keep_last: usize,
    /// Tensor-parallel size: under mpirun, groups of N consecutive ranks
    /// split the model (heads, hidden, 4h and vocab must divide by N) and
    /// see the same batch; data parallelism over world/N groups
    #[arg(long, default_value_t = 1, value_parser = at_least(1))]
    tp: usize,
    /// After the timed steps, measure this device and write its profile
    /// (JSON, glm_common::plan::profile, for the planner) here: GEMMs of
    /// the bench model's own shapes (m = batch×seq tokens, split by --tp)
    /// and squares 256-2048 (skipped: those over 4× the model's largest
    /// GEMM dimension, so a tiny model profiles in seconds, and those
    /// predicted to take over 1 s a call, e.g. emulated 16-bit on a CPU),
    /// attention forward+backward, GeLU bandwidth, and an all-reduce of
    /// 64 MB over the world under mpirun (rank 0 measures and writes)
    #[arg(long)]
    profile_out: Option<std::path::PathBuf>,
}

/// One training step per iteration on a fixed synthetic batch (Part A = first
/// half, Part B = second half in the loss), as bench/glm_torch.py does,
/// through the trainer's own step (`train::step::train_step`).
pub fn bench_step(a: BenchArgs) -> Result<()> {
    tch::set_num_threads(a.threads);
    if let Some(dir) = a.save.as_ref().filter(|d| std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_some())) {
        anyhow::bail!(
            "--save {}: not empty; bench-step writes synthetic checkpoints (1, 2, ...) there and prunes them, which would replace or remove what the directory holds: give a new or empty directory",
            dir.display()
        );
    }
    if let Some(out) = &a.profile_out {
        let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        anyhow::ensure!(dir.is_dir(), "--profile-out {}: no directory {}", out.display(), dir.display());
    }
    // under mpirun: tensor parallelism over groups of --tp consecutive
    // ranks, data parallelism over the groups, one batch per group
    let world = glm_worker::comm::mpi::world()?;
    let tp = a.tp;
    let dims = glm_worker::parallel::dims::ParallelDims::new(world.size(), world.rank(), tp)
        .map_err(|_| anyhow::anyhow!("--tp {tp}: {} rank(s) do not form groups of {tp} (run under mpirun -np <a multiple of {tp}>)", world.size()))?;
    let layout = format!("(world {} = tp {tp} × dp {})", dims.world, dims.dp);
    glm_worker::parallel::dims::check_split(tp, a.hidden, a.heads, 4 * a.hidden).map_err(|e| anyhow::anyhow!("--tp {tp}: {e} {layout}"))?;
    anyhow::ensure!(a.vocab % tp == 0, "--tp {tp}: --vocab {} is not divisible by model_parallel_size {tp} {layout}", a.vocab);
    let device = if dims.world > 1 { rank_device(&a.device, glm_worker::comm::mpi::local_rank(&world))? } else { device(&a.device)? };
    let precision = Precision::parse(&a.precision).ok_or_else(|| anyhow::anyhow!("--precision {}: expected fp32, bf16 or fp16", a.precision))?;
    let cfg = GlmConfig {
        vocab_size: a.vocab,
        hidden_size: a.hidden,
        num_layers: a.layers,
        num_attention_heads: a.heads,
        intermediate_size: 4 * a.hidden,
        max_position_embeddings: a.seq,
        layernorm_epsilon: 1e-5,
        hidden_dropout: a.dropout,
        attention_dropout: a.dropout,
        output_dropout: a.dropout,
        block_position_encoding: true,
    };
    // device memory before the model: the baseline of the peak reported
    let baseline = match device {
        tch::Device::Cuda(_) => {
            let _ = Tensor::zeros([1], (tch::Kind::Float, device));
            glm_worker::runtime::cuda::memory_in_use()
        }
        _ => None,
    };
    // the process's resident memory with libtorch initialised, before the
    // model (the profile's CPU baseline)
    let rss_before_model = {
        let _ = Tensor::ones([4], (tch::Kind::Float, tch::Device::Cpu)).sum(tch::Kind::Float).double_value(&[]);
        glm_worker::runtime::host::current_rss_bytes()
    };
    let par = Parallel::build(&world, dims, device)?;
    // the seed configs' AdamW (as bench/glm_torch.py), clipping at 1
    let zero = ZeroConfig { stage: a.zero_stage, reduce_bucket_size: a.reduce_bucket_size, allgather_bucket_size: a.allgather_bucket_size, overlap_comm: true };
    let recipe = Recipe {
        checkpoint_num_layers: usize::from(a.checkpoint_activations),
        ..Recipe::new(cfg.clone(), OptimConfig { zero, ..OptimConfig::new(precision, AdamWConfig::GLM, 1.0) }, 1234)
    };
    let (mut model, mut opt) = build(&recipe, &par, device)?;
    let (b, s) = (a.batch as i64, a.seq as i64);
    let half = s / 2;
    // the ranks of one tensor-parallel group see the same batch
    let mut rng = glm_worker::rng::Rng::new(7 + dims.dp_rank() as u64);
    let mut rand = |n: i64| -> Tensor {
        let v: Vec<i64> = (0..n).map(|_| 10 + rng.below(a.vocab as u64 - 10) as i64).collect();
        Tensor::from_slice(&v).view([b, s]).to(device)
    };
    let row = |f: &dyn Fn(i64) -> i64| Tensor::from_slice(&(0..s).map(f).collect::<Vec<_>>()).unsqueeze(0).repeat([b, 1]).to(device);
    let batch = Batch {
        tokens: rand(b * s),
        targets: rand(b * s),
        position_ids: row(&|i| i.min(half - 1)),
        block_position_ids: row(&|i| if i < half { 0 } else { i - half + 1 }),
        loss_mask: row(&|i| i64::from(i >= half)),
        sep: Tensor::from_slice(&vec![half; a.batch]).to(device),
    };
    let shallow = |b: &Batch| Batch {
        tokens: b.tokens.shallow_clone(),
        targets: b.targets.shallow_clone(),
        loss_mask: b.loss_mask.shallow_clone(),
        position_ids: b.position_ids.shallow_clone(),
        block_position_ids: b.block_position_ids.shallow_clone(),
        sep: b.sep.shallow_clone(),
    };
    use glm_worker::checkpoint::{saver::Saver, saver::SaverConfig, Progress, Writing};
    let writing = if a.save_writer == "inline" { Writing::Inline } else { Writing::Background };
    let mut saver = a.save.as_ref().map(|dir| {
        let cfg = SaverConfig { writing, keep_last: a.keep_last, every: None, with_state: true };
        Saver::new(dir, cfg, dims.rank)
    });
    let state = |it: u64| glm_worker::checkpoint::State {
        format_version: glm_worker::checkpoint::FORMAT_VERSION,
        iteration: it,
        consumed_samples: 0,
        mode_group: 0,
        optimizer_step: 0,
        skipped_steps: 0,
        schedule_start: 0,
        precision: Default::default(),
        loss_scaler: None,
        model: cfg.clone(),
        tp: dims.tp,
        dp: dims.dp,
        zero: None,
        has_optimizer: false,
        imported_from: None,
        first_sample: 0,
        tokenizer_sha256: "bench-step: synthetic tokens".into(),
        deepspeed_config: serde_json::Value::Null,
        args: serde_json::Value::Null,
        files: Default::default(),
    };
    // saves installed, and the seconds the training thread and the writers spent on them
    let mut tally = (0usize, 0.0f64, 0.0f64);
    let count = |tally: &mut (usize, f64, f64), s: Option<glm_worker::checkpoint::saver::Saved>| {
        if let Some(s) = s {
            *tally = (tally.0 + 1, tally.1 + s.finished.held.as_secs_f64(), tally.2 + s.finished.wrote.as_secs_f64());
        }
    };
    let (mut times, mut skipped, mut sent0) = (Vec::new(), 0, 0);
    for i in 0..a.warmup + a.iters {
        if i == a.warmup {
            sent0 = par.bytes_sent();
        }
        let t0 = std::time::Instant::now();
        // the step reads its loss back (a device sync), so the time is the step's
        let plan = glm_worker::train::step::StepPlan { it_seed: 1234 + i as i64, accum: 1, lr: 1e-3, norm: Default::default() };
        let out = glm_worker::train::step::train_step(&mut model, &mut opt, &par, plan, &mut |_| Ok(shallow(&batch)))?;
        if i >= a.warmup && out.stats.skipped {
            skipped += 1;
        }
        if let tch::Device::Cuda(d) = device {
            tch::Cuda::synchronize(d as i64);
        }
        // the trainer's save point: the checkpoint in flight installed once
        // written or before the next begins, one begun every save_every
        // timed steps (inline: written there)
        if let Some(sv) = saver.as_mut().filter(|_| i >= a.warmup) {
            let agreed = Saver::agree(Some(&mut *sv), &par, 0)?;
            let due = (i + 1 - a.warmup) % a.save_every == 0;
            if sv.in_flight().is_some() && (due || agreed.writer != Progress::Writing) {
                count(&mut tally, sv.finish(&par, agreed.writer, &|_| {})?);
            }
            if due {
                sv.begin(&model, &opt, &par, "{}", state((i + 1 - a.warmup) as u64))?;
            }
            if writing == Writing::Inline {
                count(&mut tally, sv.finish(&par, Progress::Written, &|_| {})?);
            }
        }
        if i >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    // a background save still in flight after the timed steps would have
    // overlapped the steps after them: waited for here, outside the timing
    let (in_loop, in_loop_held) = (tally.0, tally.1);
    let t_end = std::time::Instant::now();
    if let Some(sv) = saver.as_mut() {
        count(&mut tally, sv.finish(&par, Progress::Writing, &|_| {})?);
    }
    let end_wait = t_end.elapsed().as_secs_f64();
    let sent_per_step = (par.bytes_sent() - sent0) as f64 / a.iters.max(1) as f64;
    let sec = times.iter().sum::<f64>() / times.len() as f64;
    // the median step too: on a shared machine one disturbed step moves the mean
    let median = {
        let mut t = times.clone();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    let tps = (a.batch * a.seq * dims.dp) as f64 / sec;
    // CUDA: device memory the run added (the caching allocator's high-water
    // mark); CPU: the process's peak resident memory
    let peak = if device.is_cuda() {
        match (baseline, glm_worker::runtime::cuda::memory_in_use()) {
            (Some(b0), Some(b1)) => format!("{:.0}", b1.saturating_sub(b0) as f64 / 1e6),
            _ => "?".into(), // cudaMemGetInfo not found
        }
    } else {
        // the largest over the ranks, then rank 0's own
        let own = glm_worker::runtime::host::peak_rss_bytes();
        format!("{:.0} peak_rss_rank0_mb={:.0}", par.world_max(own as i64)? as f64 / 1e6, own as f64 / 1e6)
    };
    let states = opt.memory(&model.params);
    let zero = if dims.world > 1 || a.zero_stage > 0 {
        format!(" ranks={} zero={} model_states_mb={:.1} sent_mb_per_step={:.2}", dims.world, a.zero_stage, states.total() as f64 / 1e6, sent_per_step / 1e6)
    } else {
        String::new()
    };
    let (saves, wrote) = (tally.0, tally.2);
    let saving = if a.save.is_some() {
        format!(
            " save_every={} writer={} saves={saves} held_ms_per_save={:.1} writer_ms_per_save={:.1} end_wait_ms={:.0}",
            a.save_every,
            a.save_writer,
            in_loop_held * 1e3 / in_loop.max(1) as f64,
            wrote * 1e3 / saves.max(1) as f64,
            end_wait * 1e3
        )
    } else {
        String::new()
    };
    if dims.rank == 0 {
        println!(
            "rust device={:?} threads={} precision={} ckpt={} tokens/s={tps:.0} tflops={:.4} ms/it={:.1} ms_median={:.1} peak_mem_mb={peak} tp={} dp={} model_states_bytes={} bucket_peak_bytes={}{zero}{saving}{}",
            device,
            a.threads,
            precision.name(),
            u8::from(a.checkpoint_activations),
            tps * cfg.flops_per_token(a.seq) / 1e12,
            sec * 1000.0,
            median * 1000.0,
            dims.tp,
            dims.dp,
            states.total(),
            states.bucket_peak,
            // fp16 steps skipped for overflow inside the timed window (no optimizer update)
            if skipped > 0 { format!(" skipped={skipped}") } else { String::new() }
        );
    }
    // the model and its optimizer freed: the measurements have the device
    drop((saver, opt, model, batch));
    if let Some(out) = &a.profile_out {
        let shape = crate::profile::Shape {
            batch: b,
            seq: s,
            hidden: a.hidden as i64,
            heads: a.heads as i64,
            ffn: 4 * a.hidden as i64,
            vocab: a.vocab as i64,
            tp: a.tp as i64,
            dropout: a.dropout,
        };
        let host = match device {
            tch::Device::Cuda(_) => crate::profile::Host {
                threads: a.threads as u64,
                memory_bytes: glm_worker::runtime::cuda::memory_total().unwrap_or(0),
                baseline_bytes: baseline.unwrap_or(0),
            },
            _ => crate::profile::Host {
                threads: a.threads as u64,
                // the host's RAM and swap, as glm-worker env reports it (the
                // planner divides it by the ranks a node holds)
                memory_bytes: glm_worker::runtime::host::host_memory_bytes().unwrap_or(0),
                baseline_bytes: rss_before_model,
            },
        };
        crate::profile::measure(out, &par, device, &shape, &host)?;
    }
    drop((par, world));
    glm_worker::comm::mpi::finalize();
    Ok(())
}
