//! Run metrics: `metrics.jsonl` (one JSON object per log or eval event,
//! appended) and `loss.png` (train and validation loss against iterations,
//! rewritten at every evaluation), both in the run's save directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;

use super::tensorboard::{Style, Writer};
use crate::error::{Error, IoContext, Result};

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct TrainEvent {
    pub iteration: u64,
    pub lr: f64,
    pub loss: f64,
    pub grad_norm: f64,
    pub ms_per_iter: f64,
    pub tokens_per_s: f64,
    pub tflops: f64,
    /// Model FLOPs utilisation (`train::mfu`), where the device's peak is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    pub mem_mb: f64,
    /// The fp16 loss scale of the interval's last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// Steps of the interval skipped for gradient overflow (fp16).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped: u64,
    /// Several ranks: each rank's own work per step (its step time outside
    /// collectives, where the others' waits do not count), over the world.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks: Option<RankSpread>,
    /// What each training corpus has given so far (one entry without a
    /// mixture).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub corpora: Vec<CorpusUse>,
}

/// Samples, tokens and epochs a training corpus has given after an
/// iteration: tokens are samples × seq_length (what the model reads), epochs
/// those tokens over the tokens of the corpus's training documents
/// (documents are drawn by length, with replacement).
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct CorpusUse {
    pub name: String,
    pub samples: u64,
    pub tokens: u64,
    pub epochs: f64,
}

/// One corpus's validation result.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct CorpusEval {
    pub name: String,
    /// Its share of the mix (the weights of the validated corpora, normalised).
    pub weight: f64,
    pub loss: f64,
    pub ppl: f64,
    pub accuracy: f64,
    pub tokens: i64,
}

/// The spread of a per-rank quantity over the world.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct RankSpread {
    pub min_ms: f64,
    pub median_ms: f64,
    pub max_ms: f64,
    /// The rank with the most.
    pub slowest: usize,
}

impl RankSpread {
    /// The spread of `per_rank` (milliseconds, in rank order); `None` for
    /// fewer than two ranks.
    pub fn of(per_rank: &[f64]) -> Option<RankSpread> {
        if per_rank.len() < 2 {
            return None;
        }
        let mut sorted = per_rank.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
        let slowest = per_rank.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
        Some(RankSpread { min_ms: sorted[0], median_ms: median, max_ms: sorted[n - 1], slowest })
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct EvalEvent {
    pub iteration: u64,
    pub loss: f64,
    pub ppl: f64,
    pub accuracy: f64,
    pub tokens: i64,
    /// A mixture: each corpus's result (the fields above are their weighted
    /// mean, tokens their sum).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub corpora: Vec<CorpusEval>,
    /// The same batches by blank-infilling mode (each batch has one), as
    /// the original's valid_bert_loss / valid_sent_loss / valid_gpt_loss (a
    /// mixture: the weighted mean of its corpora's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modes: Vec<ModeEval>,
}

/// Validation of the batches of one mode.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct ModeEval {
    /// span, sentence or generation.
    pub mode: String,
    pub loss: f64,
    pub ppl: f64,
    pub accuracy: f64,
    pub tokens: i64,
}

impl ModeEval {
    /// The original's TensorBoard name of the mode's loss: bert (span),
    /// sent (sentence), gpt (generation).
    pub fn original_name(&self) -> &str {
        match self.mode.as_str() {
            "span" => "bert",
            "sentence" => "sent",
            "generation" => "gpt",
            m => m,
        }
    }
}

pub struct Metrics {
    dir: Option<PathBuf>,
    train: Vec<(u64, f64)>,
    valid: Vec<(u64, f64)>,
    baseline: Option<f64>,
    /// TensorBoard directories (rank 0), and samples per iteration (the
    /// step axis of DeepSpeed's).
    tensorboard: Vec<Writer>,
    samples_per_iter: u64,
    /// (iteration, samples trained on) when this run started.
    start: (u64, u64),
    /// This run starts at iteration 0 (a resume has its step-0 events).
    fresh: bool,
}

/// Registers the font the plot's text is drawn with: one compiled into the
/// binary (Ubuntu, from `epaint_default_fonts`), so `loss.png` looks the same
/// everywhere and is drawn on machines without system fonts.
fn register_font() -> std::result::Result<(), String> {
    static ONCE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT)
            .map_err(|_| "the built-in font did not load".to_string())
    })
    .clone()
}

impl Metrics {
    /// Metrics of a run saving to `dir` (none: nothing is written). Earlier
    /// events of `metrics.jsonl` up to `resume_from` are kept and plotted, so
    /// a resumed run continues the same file and curve.
    pub fn new(dir: Option<&Path>, resume_from: u64) -> Result<Self> {
        let mut m = Metrics {
            dir: dir.map(Path::to_path_buf),
            train: Vec::new(),
            valid: Vec::new(),
            baseline: None,
            tensorboard: Vec::new(),
            samples_per_iter: 1,
            start: (0, 0),
            fresh: resume_from == 0,
        };
        if let Some(d) = dir {
            std::fs::create_dir_all(d).at(d)?;
            let p = d.join("metrics.jsonl");
            if resume_from == 0 {
                // a fresh run starts a fresh record
                let _ = std::fs::remove_file(&p);
            } else if let Ok(text) = std::fs::read_to_string(&p) {
                let mut kept = String::new();
                for line in text.lines() {
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
                    let it = v["iteration"].as_u64().unwrap_or(u64::MAX);
                    if it > resume_from {
                        continue; // a later run of these iterations replaces them
                    }
                    match v["type"].as_str() {
                        Some("train") => m.train.push((it, v["loss"].as_f64().unwrap_or(f64::NAN))),
                        Some("eval") => m.valid.push((it, v["loss"].as_f64().unwrap_or(f64::NAN))),
                        _ => {}
                    }
                    kept.push_str(line);
                    kept.push('\n');
                }
                std::fs::write(&p, kept).at(&p)?;
            }
        }
        Ok(m)
    }

    fn append(&self, kind: &str, event: &impl Serialize) -> Result<()> {
        let Some(d) = &self.dir else { return Ok(()) };
        let mut v = serde_json::to_value(event).expect("event serialises");
        v.as_object_mut().unwrap().insert("type".into(), kind.into());
        let p = d.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&p).at(&p)?;
        writeln!(f, "{v}").at(&p)
    }

    /// Also writes every event to these TensorBoard directories. DeepSpeed's
    /// step axis counts samples: `start_samples` when the run starts at
    /// `start_iteration`, then `samples_per_iter` (the global batch) an
    /// iteration.
    pub fn with_tensorboard(&mut self, writers: Vec<Writer>, samples_per_iter: u64, start_iteration: u64, start_samples: u64) {
        self.tensorboard = writers;
        self.samples_per_iter = samples_per_iter;
        self.start = (start_iteration, start_samples);
    }

    /// The step of `iteration` in `style`'s axis.
    fn step(&self, style: Style, iteration: u64) -> i64 {
        match style {
            Style::Glm => iteration as i64,
            Style::DeepSpeed => (self.start.1 + iteration.saturating_sub(self.start.0) * self.samples_per_iter) as i64,
        }
    }

    /// Where TensorBoard events go.
    pub fn tensorboard_dirs(&self) -> Vec<&Path> {
        self.tensorboard.iter().map(|w| w.dir.as_path()).collect()
    }

    /// `values` at `iteration` in every TensorBoard directory.
    fn scalars(&mut self, iteration: u64, values: &[(String, f64)]) -> Result<()> {
        let steps: Vec<i64> = self.tensorboard.iter().map(|w| self.step(w.style, iteration)).collect();
        for (w, step) in self.tensorboard.iter_mut().zip(steps) {
            w.scalars(step, values)?;
        }
        Ok(())
    }

    /// The effective configuration as text, at `iteration` (the run's start).
    pub fn config_text(&mut self, iteration: u64, text: &str) -> Result<()> {
        let steps: Vec<i64> = self.tensorboard.iter().map(|w| self.step(w.style, iteration)).collect();
        for (w, step) in self.tensorboard.iter_mut().zip(steps) {
            w.text(step, "config", text)?;
        }
        Ok(())
    }

    pub fn train(&mut self, e: &TrainEvent) -> Result<()> {
        self.train.push((e.iteration, e.loss));
        self.append("train", e)?;
        if self.tensorboard.is_empty() {
            return Ok(());
        }
        // the original's tags (lr, train_loss, elapsed_time in ms per iteration), then the rest
        let mut v: Vec<(String, f64)> = vec![("lr".into(), e.lr), ("train_loss".into(), e.loss), ("elapsed_time".into(), e.ms_per_iter)];
        v.extend([("grad_norm".into(), e.grad_norm), ("skipped_steps".into(), e.skipped as f64)]);
        if let Some(s) = e.loss_scale {
            v.push(("loss_scale".into(), s));
        }
        v.extend([("tokens_per_s".into(), e.tokens_per_s), ("tflops".into(), e.tflops), ("mem_mb".into(), e.mem_mb)]);
        if let Some(m) = e.mfu {
            v.push(("mfu".into(), m));
        }
        if let Some(r) = &e.ranks {
            v.extend([
                ("rank_ms_min".into(), r.min_ms),
                ("rank_ms_median".into(), r.median_ms),
                ("rank_ms_max".into(), r.max_ms),
                ("slowest_rank".into(), r.slowest as f64),
            ]);
        }
        for c in &e.corpora {
            v.extend([
                (format!("samples/{}", c.name), c.samples as f64),
                (format!("tokens/{}", c.name), c.tokens as f64),
                (format!("epochs/{}", c.name), c.epochs),
            ]);
        }
        self.scalars(e.iteration, &v)
    }

    /// The unigram baseline of the validation loss, drawn as a flat line.
    pub fn baseline(&mut self, loss: f64) -> Result<()> {
        self.baseline = Some(loss);
        if self.fresh {
            self.scalars(0, &[("valid_unigram_loss".into(), loss)])?;
        }
        self.append("baseline", &serde_json::json!({ "iteration": 0, "unigram_loss": loss }))
    }

    pub fn eval(&mut self, e: &EvalEvent) -> Result<()> {
        self.valid.push((e.iteration, e.loss));
        self.append("eval", e)?;
        if !self.tensorboard.is_empty() {
            let mut v: Vec<(String, f64)> = vec![("valid_loss".into(), e.loss), ("valid_ppl".into(), e.ppl), ("valid_accuracy".into(), e.accuracy)];
            for m in &e.modes {
                let n = m.original_name();
                v.extend([(format!("valid_{n}_loss"), m.loss), (format!("valid_{n}_ppl"), m.ppl), (format!("valid_{n}_accuracy"), m.accuracy)]);
            }
            for c in &e.corpora {
                v.extend([
                    (format!("valid_loss/{}", c.name), c.loss),
                    (format!("valid_ppl/{}", c.name), c.ppl),
                    (format!("valid_accuracy/{}", c.name), c.accuracy),
                ]);
            }
            self.scalars(e.iteration, &v)?;
        }
        self.plot()
    }

    /// Rewrites `loss.png` (atomically).
    pub fn plot(&self) -> Result<()> {
        let Some(d) = &self.dir else { return Ok(()) };
        let out = d.join("loss.png");
        register_font().map_err(|e| Error::invalid(&out, format!("cannot draw: {e}")))?;
        let tmp = d.join(".loss.png.tmp.png");
        draw(&tmp, &self.train, &self.valid, self.baseline).map_err(|e| Error::invalid(&out, format!("cannot draw: {e}")))?;
        std::fs::rename(&tmp, &out).at(&out)
    }
}

fn draw(path: &Path, train: &[(u64, f64)], valid: &[(u64, f64)], baseline: Option<f64>) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let all = train.iter().chain(valid).filter(|(_, l)| l.is_finite());
    let xmax = all.clone().map(|(i, _)| *i).max().unwrap_or(1).max(1) as f64;
    let ymax = all.clone().map(|(_, l)| *l).fold(f64::MIN, f64::max).max(0.1) * 1.05;
    let ymin = all.map(|(_, l)| *l).fold(f64::MAX, f64::min).min(ymax - 0.1).max(0.0) * 0.95;
    let mut chart = ChartBuilder::on(&root)
        .caption("GLM pretraining loss", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..xmax, ymin..ymax)?;
    chart.configure_mesh().x_desc("iteration").y_desc("loss (nats)").x_label_formatter(&|x| format!("{x:.0}")).label_style(("sans-serif", 14)).draw()?;
    chart
        .draw_series(LineSeries::new(train.iter().map(|&(i, l)| (i as f64, l)), BLUE.stroke_width(2)))?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(valid.iter().map(|&(i, l)| (i as f64, l)), RED.stroke_width(2)))?
        .label("validation")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart.draw_series(valid.iter().map(|&(i, l)| Circle::new((i as f64, l), 4, RED.filled())))?;
    if let Some(u) = baseline.filter(|u| (ymin..ymax).contains(u)) {
        let green = RGBColor(0, 140, 60);
        chart
            .draw_series(LineSeries::new([(0.0, u), (xmax, u)], green.stroke_width(2)))?
            .label("unigram baseline (validation)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], green.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).label_font(("sans-serif", 14)).draw()?;
    root.present()?;
    Ok(())
}

/// Resident memory of this process in MB (Linux), 0 when unknown.
pub fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<f64>().ok()))
        .map_or(0.0, |pages| pages * 4096.0 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rank_spread_names_the_slowest() {
        assert_eq!(RankSpread::of(&[40.0]), None);
        let s = RankSpread::of(&[40.0, 95.0, 41.0, 42.0]).unwrap();
        assert_eq!(s, RankSpread { min_ms: 40.0, median_ms: 41.5, max_ms: 95.0, slowest: 1 });
        assert_eq!(RankSpread::of(&[3.0, 1.0, 2.0]).unwrap().median_ms, 2.0);
    }

    #[test]
    fn the_curve_is_drawn_with_the_built_in_font() {
        // no system font is read: this draws the same on a bare machine
        let d = tempfile::tempdir().unwrap();
        let mut m = Metrics::new(Some(d.path()), 0).unwrap();
        m.baseline(9.0).unwrap();
        for (it, loss) in [(5, 9.5), (10, 8.8), (15, 8.1)] {
            m.train.push((it, loss));
        }
        m.eval(&EvalEvent { iteration: 10, loss: 9.1, ppl: 9.1f64.exp(), accuracy: 0.1, tokens: 100, corpora: Vec::new(), modes: Vec::new() }).unwrap();
        let png = std::fs::read(d.path().join("loss.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // width and height from the IHDR chunk
        let dim = |o: usize| u32::from_be_bytes(png[o..o + 4].try_into().unwrap());
        assert_eq!((dim(16), dim(20)), (900, 560));
        let names: Vec<String> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(!names.iter().any(|n| n.contains(".tmp")), "no temporary left: {names:?}");
    }
}
