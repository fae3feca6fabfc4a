//! `bench-step --profile-out`: what this device achieves on the kernels a
//! training step runs (GEMMs of the bench model's shapes and square ones,
//! attention forward + backward, an elementwise kernel, an all-reduce over
//! the world), written as a device profile
//! (`glm_common::plan::profile::Profile`) for the planner.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use glm_common::plan::profile::{Attention, Collective, Dtype, ElementwiseNs, Gemm, Profile, PROFILE_FORMAT, PROFILE_VERSION};
use glm_worker::comm::ReduceOp;
use glm_worker::parallel::Parallel;

/// The bench model's sizes the measurements take their shapes from.
pub struct Shape {
    pub batch: i64,
    pub seq: i64,
    pub hidden: i64,
    pub heads: i64,
    pub ffn: i64,
    pub vocab: i64,
    pub tp: i64,
    pub dropout: f64,
}

/// What the caller measured before the model existed.
pub struct Host {
    pub threads: u64,
    /// The device's memory: a GPU's, or the host's RAM and swap (see `Profile::memory_bytes`).
    pub memory_bytes: u64,
    pub baseline_bytes: u64,
}

/// Square GEMM sizes measured besides the model's own shapes (those above
/// 4× the model's largest GEMM dimension are skipped, and those a call of
/// which would take over `SQUARE_MAX_SECONDS`).
const SQUARES: [i64; 4] = [256, 512, 1024, 2048];
/// The longest call of a square GEMM measured, as predicted from the
/// previous square's time.
const SQUARE_MAX_SECONDS: f64 = 1.0;
/// The all-reduce's size (fp32).
const COLLECTIVE_BYTES: i64 = 64 << 20;
/// The elementwise kernel's size (elements).
const ELEMENTWISE_NUMEL: i64 = 16 << 20;

fn kind(d: Dtype) -> Kind {
    match d {
        Dtype::Fp32 => Kind::Float,
        Dtype::Bf16 => Kind::BFloat16,
        Dtype::Fp16 => Kind::Half,
    }
}

fn sync(device: Device) {
    if let Device::Cuda(d) = device {
        tch::Cuda::synchronize(d as i64);
    }
}

/// Seconds one call of `f` takes on `device`: the median of a few samples
/// after a warm-up call. A sample runs enough calls to last about 10 ms (a
/// GPU kernel takes microseconds); there are 3 to 5 samples, about 0.3 s in
/// all, and a call of over a second is timed once after its warm-up.
fn seconds_per_call(device: Device, f: &mut dyn FnMut()) -> f64 {
    let mut timed = |calls: usize| {
        let t = Instant::now();
        for _ in 0..calls {
            f();
        }
        sync(device);
        t.elapsed().as_secs_f64() / calls as f64
    };
    timed(1);
    let first = timed(1);
    if first > 1.0 {
        return first;
    }
    let calls = ((0.01 / first.max(1e-9)).ceil() as usize).clamp(1, 1000);
    let n = ((0.3 / (first * calls as f64).max(1e-9)).round() as usize).clamp(3, 5);
    let mut s: Vec<f64> = (0..n).map(|_| timed(calls)).collect();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// The GEMM shapes `(m, n, k)` measured: the model's own (m = the batch's
/// tokens, a quarter and a sixteenth of them; the logits at the loss
/// positions, half of those) and the squares up to 4× its largest
/// dimension, without repeats.
fn gemm_shapes(sh: &Shape) -> (Vec<(i64, i64, i64)>, Vec<i64>) {
    let (h, t) = (sh.hidden, sh.tp);
    // the tokens of the batch, and of a quarter and a sixteenth of it (at
    // least 16): smaller micro-batches and fewer loss positions run the
    // same matmuls with a shorter side, where a matmul's packing and
    // blocking cost more per FLOP
    let mut model = Vec::new();
    for div in [1, 4, 16] {
        let m = sh.batch * sh.seq / div;
        if div > 1 && m < 16 {
            continue;
        }
        model.extend([(m, 3 * h / t, h), (m, h, h / t), (m, sh.ffn / t, h), (m, h, sh.ffn / t), ((m / 2).max(1), sh.vocab / t, h)]);
    }
    let largest = model.iter().map(|&(m, n, k)| m.max(n).max(k)).max().unwrap_or(0);
    let squares = SQUARES.iter().copied().filter(|&s| s <= 4 * largest).collect();
    (model, squares)
}

/// Measures this device (rank 0 writes `out`): first the all-reduce, in
/// which every rank of `par`'s world takes part (so every rank calls
/// this), then, on rank 0 alone, the kernels. The other ranks return at
/// once, to MPI_Finalize, which waits for rank 0 without spinning.
pub fn measure(out: &Path, par: &Parallel, device: Device, sh: &Shape, host: &Host) -> Result<()> {
    let t0 = Instant::now();
    let collectives = collectives(par, device)?;
    if par.dims.rank != 0 {
        return Ok(());
    }
    let dtypes: &[Dtype] = if device.is_cuda() { &[Dtype::Fp32, Dtype::Bf16, Dtype::Fp16] } else { &[Dtype::Fp32, Dtype::Bf16] };
    let mut skipped = Vec::new();
    let (model_shapes, squares) = gemm_shapes(sh);
    let mut gemm = Vec::new();
    tch::no_grad(|| {
        for &d in dtypes {
            let mut seen = std::collections::HashSet::new();
            let mut time = |(m, n, k): (i64, i64, i64)| -> Option<f64> {
                if !seen.insert((m, n, k)) {
                    return None;
                }
                // a linear layer's three products: forward, the input's
                // gradient and the weight's (their layouts differ in speed)
                let a = Tensor::randn([m, k], (kind(d), device));
                let b = Tensor::randn([k, n], (kind(d), device));
                let g = Tensor::randn([m, n], (kind(d), device));
                let sec = seconds_per_call(device, &mut || {
                    let _ = a.matmul(&b);
                    let _ = g.matmul(&b.tr());
                    let _ = a.tr().matmul(&g);
                });
                gemm.push(Gemm { dtype: d, m: m as u64, n: n as u64, k: k as u64, tflops: 6.0 * (m * n * k) as f64 / sec / 1e12 });
                Some(sec)
            };
            for shape in model_shapes.iter().copied() {
                time(shape);
            }
            // a square whose call would take over SQUARE_MAX_SECONDS (the
            // last one's time × the growth in work) is skipped: 16-bit
            // matmuls emulated on a CPU run 20× slower than fp32
            let mut last: Option<(i64, f64)> = None;
            for &s in &squares {
                if let Some((l, sec)) = last.filter(|&(l, sec)| sec * (s as f64 / l as f64).powi(3) > SQUARE_MAX_SECONDS) {
                    skipped.push(format!("{s}x{s} in {} (about {:.1} s a call)", d.name(), sec * (s as f64 / l as f64).powi(3)));
                    continue;
                }
                if let Some(sec) = time((s, s, s)) {
                    last = Some((s, sec));
                }
            }
        }
    });
    let mut attention = Vec::new();
    for &d in dtypes {
        let ps: &[f64] = if sh.dropout > 0.0 { &[0.0, sh.dropout] } else { &[0.0] };
        for &p in ps {
            attention.push(attention_entry(device, sh, d, p));
        }
    }
    let mut elementwise_gbps = BTreeMap::new();
    {
        let _no_grad = tch::no_grad_guard();
        for &d in dtypes {
            let x = Tensor::randn([ELEMENTWISE_NUMEL], (kind(d), device));
            let sec = seconds_per_call(device, &mut || {
                let _ = x.gelu("tanh");
            });
            let bytes = 2.0 * ELEMENTWISE_NUMEL as f64 * d.bytes() as f64;
            elementwise_gbps.insert(d.name().to_string(), bytes / sec / 1e9);
        }
    }
    let elementwise_ns = dtypes.iter().map(|&d| (d.name().to_string(), elementwise(device, sh, d))).collect();
    let optimizer_ns = Some(optimizer(device));
    let device_name = match device {
        Device::Cuda(i) => glm_worker::runtime::cuda::device_name(i).unwrap_or_else(|| format!("cuda:{i}")),
        _ => glm_worker::runtime::host::cpu_model_name(),
    };
    let profile = Profile {
        format: PROFILE_FORMAT.into(),
        version: PROFILE_VERSION,
        kind: if device.is_cuda() { "cuda" } else { "cpu" }.into(),
        device: device_name,
        threads: host.threads,
        memory_bytes: host.memory_bytes,
        baseline_bytes: host.baseline_bytes,
        gemm,
        attention,
        elementwise_gbps,
        elementwise_ns,
        optimizer_ns,
        collectives,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        created: utc_now(),
    };
    write_atomically(out, &profile)?;
    let skipped = if skipped.is_empty() { String::new() } else { format!("; skipped {}", skipped.join(", ")) };
    println!(
        "profile written: {} ({} gemm shapes, {} attention, {} elementwise, {} collectives; {:.1} s{skipped})",
        out.display(),
        profile.gemm.len(),
        profile.attention.len(),
        profile.elementwise_gbps.len(),
        profile.collectives.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// An all-reduce (sum) of 64 MB of fp32 over the world, every rank taking
/// part, a fixed number of times (the ranks must agree on the count): the
/// median's bus bandwidth. Empty alone.
fn collectives(par: &Parallel, device: Device) -> Result<Vec<Collective>> {
    let Some(world) = par.world.as_ref() else { return Ok(Vec::new()) };
    let p = world.size();
    if p < 2 {
        return Ok(Vec::new());
    }
    let mut t = Tensor::zeros([COLLECTIVE_BYTES / 4], (Kind::Float, device));
    let mut s = Vec::new();
    for i in 0..6 {
        let t0 = Instant::now();
        world.all_reduce(&mut t, ReduceOp::Sum)?;
        sync(device);
        if i > 0 {
            s.push(t0.elapsed().as_secs_f64());
        }
    }
    s.sort_by(f64::total_cmp);
    let sec = s[s.len() / 2];
    let bus = 2.0 * (p - 1) as f64 / p as f64 * COLLECTIVE_BYTES as f64 / sec / 1e9;
    Ok(vec![Collective { op: "all_reduce".into(), ranks: p as u64, bytes: COLLECTIVE_BYTES as u64, bus_gbps: bus }])
}

/// Elements of a layer's activation the elementwise costs are measured at.
fn rows(sh: &Shape) -> i64 {
    sh.batch * sh.seq
}

/// Nanoseconds per element of `op` forward and backward on a fresh
/// `[rows, cols]` input: the backward's upstream gradient enters through a
/// product with a fixed tensor and a sum, whose own cost (measured on the
/// input alone) is taken off.
fn fwd_bwd_ns(device: Device, d: Dtype, rows: i64, cols: i64, op: &dyn Fn(&Tensor) -> Tensor) -> f64 {
    let x = Tensor::randn([rows, cols], (kind(d), device)).set_requires_grad(true);
    let g = Tensor::randn([rows, cols], (kind(d), device));
    let run = |f: &dyn Fn(&Tensor) -> Tensor| {
        seconds_per_call(device, &mut || {
            let y = f(&x);
            (y * &g).sum(kind(d)).backward();
            let _ = x.grad().zero_();
        })
    };
    let with = run(op);
    let without = run(&|t: &Tensor| t.shallow_clone());
    (with - without).max(0.0) / (rows * cols) as f64 * 1e9
}

/// The layer's elementwise kernels in `d` at the bench model's sizes:
/// LayerNorm over the hidden size, GeLU over the MLP's width, dropout at
/// the bench's rate (0.1 when it has none), an add, and the log-softmax of
/// the logits at the loss positions.
fn elementwise(device: Device, sh: &Shape, d: Dtype) -> ElementwiseNs {
    let (r, h) = (rows(sh), sh.hidden);
    let w = Tensor::ones([h], (kind(d), device));
    let b = Tensor::zeros([h], (kind(d), device));
    let p = if sh.dropout > 0.0 { sh.dropout } else { 0.1 };
    // an add at the activation's size (into a new tensor, as a residual),
    // and in place over a buffer past the caches (as gradients are added)
    let add_ns = |numel: i64, in_place: bool| {
        let _g = tch::no_grad_guard();
        let (mut x, y) = (Tensor::randn([numel], (kind(d), device)), Tensor::randn([numel], (kind(d), device)));
        seconds_per_call(device, &mut || {
            let _ = if in_place { x.g_add_(&y) } else { &x + &y };
        }) / numel as f64
            * 1e9
    };
    let (add, add_large) = (add_ns(r * h, false), add_ns(OPTIMIZER_NUMEL, true));
    ElementwiseNs {
        add_large,
        layer_norm: fwd_bwd_ns(device, d, r, h, &|x| x.layer_norm([h], Some(&w), Some(&b), 1e-5, true)),
        gelu: fwd_bwd_ns(device, d, r, sh.ffn / sh.tp, &|x| x.gelu("tanh")),
        dropout: fwd_bwd_ns(device, d, r, h, &|x| x.dropout(p, true)),
        add,
        log_softmax: fwd_bwd_ns(device, d, (r / 2).max(1), sh.vocab / sh.tp, &|x| x.log_softmax(-1, Kind::Float)),
    }
}

/// Elements of the buffer the optimizer step is timed on (fp32: 32 MB, past
/// the caches, as a rank's shard is).
const OPTIMIZER_NUMEL: i64 = 8 << 20;

/// Nanoseconds per element of glm-worker's AdamW update, the gradient's
/// squared norm and the gradient zeroed, on an fp32 buffer.
fn optimizer(device: Device) -> f64 {
    use glm_worker::optim::adamw::{AdamW, AdamWConfig};
    let n = OPTIMIZER_NUMEL;
    let mut flat = Tensor::randn([n], (Kind::Float, device));
    let mut adam = AdamW::new(AdamWConfig::GLM, &flat);
    let mut grad = Tensor::randn([n], (Kind::Float, device));
    let sec = seconds_per_call(device, &mut || {
        tch::no_grad(|| {
            let _ = grad.square().sum(Kind::Double);
            adam.update(&mut flat, &[(0, n)], &mut grad, 1e-4);
            let _ = grad.zero_();
        });
    });
    sec / n as f64 * 1e9
}

/// `scaled_dot_product_attention` forward and backward (of the output's
/// sum) at the bench's (batch, heads/tp, seq, head_dim) in `d`, under a
/// GLM-like boolean mask (the first half seen by all, the second causal),
/// with attention dropout `p`.
fn attention_entry(device: Device, sh: &Shape, d: Dtype, p: f64) -> Attention {
    let (b, a, s, hd) = (sh.batch, sh.heads / sh.tp, sh.seq, sh.hidden / sh.heads);
    let i = Tensor::arange(s, (Kind::Int64, device));
    let (row, col) = (i.view([s, 1]), i.view([1, s]));
    let mask = col.lt(s / 2).logical_or(&col.le_tensor(&row)).view([1, 1, s, s]).expand([b, 1, s, s], false).contiguous();
    let qkv = || Tensor::randn([b, a, s, hd], (kind(d), device)).set_requires_grad(true);
    let sdpa = |q: &Tensor, k: &Tensor, v: &Tensor| Tensor::scaled_dot_product_attention(q, k, v, Some(&mask), p, false, None::<f64>, false);
    // the bytes the forward keeps for backward: the allocator's growth over
    // the forward, less its inputs and output (CUDA only: the CPU allocator
    // keeps no such count)
    let saved_bytes_per_score = match device {
        Device::Cuda(i) => {
            sync(device);
            let before = glm_worker::runtime::cuda::allocated_bytes(i);
            let (q, k, v) = (qkv(), qkv(), qkv());
            let o = sdpa(&q, &k, &v);
            sync(device);
            let after = glm_worker::runtime::cuda::allocated_bytes(i);
            let io = 4 * b * a * s * hd * kind(d).elt_size_in_bytes() as i64;
            let saved = match (before, after) {
                (Some(x), Some(y)) => Some((y as i64 - x as i64 - io).max(0) as f64 / (b * a * s * s) as f64),
                _ => None,
            };
            drop((o, q, k, v));
            saved
        }
        _ => None,
    };
    let (q, k, v) = (qkv(), qkv(), qkv());
    let sec = seconds_per_call(device, &mut || {
        let o = sdpa(&q, &k, &v);
        o.sum(o.kind()).backward();
    });
    let flops = 3.0 * 4.0 * (b * a * s * s * hd) as f64;
    Attention {
        dtype: d,
        batch: b as u64,
        heads: a as u64,
        seq: s as u64,
        head_dim: hd as u64,
        dropout: p > 0.0,
        tflops: flops / sec / 1e12,
        saved_bytes_per_score,
    }
}

/// Writes `profile` to `path` as a whole or not at all: `<path>.tmp`,
/// synced, renamed over `path`.
fn write_atomically(path: &Path, profile: &Profile) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let text = serde_json::to_string_pretty(profile)? + "\n";
    let written = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("--profile-out: {}", tmp.display()))?;
        f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).with_context(|| format!("--profile-out: writing {}", tmp.display()))?;
        drop(f);
        std::fs::rename(&tmp, path).with_context(|| format!("--profile-out: renaming {} to {}", tmp.display(), path.display()))
    })();
    if written.is_err() {
        // nothing half-written left behind
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if let Some(dir) = path.parent().map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d }) {
        // the rename itself durable (best effort: not every file system syncs a directory)
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// The time now, UTC, as RFC 3339 ("2026-12-01T09:30:00Z").
fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil date from days since 1970-01-01 (H. Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}
