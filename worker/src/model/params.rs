//! Parameters and their gradients, with one owner.
//!
//! Every parameter is a view into one flat buffer of the compute dtype (fp32,
//! bf16 or fp16), and its `.grad` is a view into a second flat buffer, set
//! through the C++ shim, so autograd accumulates gradients in place and a
//! step never concatenates them. Each parameter keeps its metadata: name,
//! shape, how it splits over tensor-parallel ranks (`Partition`, from which
//! checkpoint merge/split derive their slicing) and whether it takes weight
//! decay.
//!
//! Layout: groups (a transformer layer, the embeddings, the final LayerNorm)
//! in reverse declaration order — the order in which backward finishes their
//! gradients, so a bucket of the flat gradient is complete early — and
//! inside a group weight-decayed parameters first, then within each of the
//! two, tensor-parallel slices first, each run in reverse declaration order
//! too. Decay and split elements are then one
//! or two ranges per group. The buffer is padded to a multiple of
//! `pad_multiple`, so a data-parallel (ZeRO) partition is one `narrow`.
//!
//! fp32 master weights and optimizer state are not here: the optimizer owns
//! them (`optim::optimizer`).

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// How a parameter starts.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Normal(f64),
    Zeros,
    Ones,
}

/// How a parameter of the whole model is split over tensor-parallel ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partition {
    Whole,
    /// Rows (column-parallel weights and biases, the vocabulary).
    Rows,
    /// Columns (row-parallel weights).
    Cols,
    /// Rows of each of the fused query/key/value blocks (whole heads per rank).
    QkvRows,
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

/// Which part of the master tensor this rank holds. The master is generated
/// whole on every rank (same seed, same order), so any tensor-parallel
/// layout starts from the same full weights as one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Whole,
    /// Rows `[r·n/p, (r+1)·n/p)` (column-parallel weights, vocabulary).
    Rows {
        rank: usize,
        size: usize,
    },
    /// Columns likewise (row-parallel weights).
    Cols {
        rank: usize,
        size: usize,
    },
    /// The fused query/key/value rows: this rank's rows of each of the
    /// three blocks, so a rank holds whole attention heads.
    QkvRows {
        rank: usize,
        size: usize,
    },
}

impl Part {
    pub fn is_split(&self) -> bool {
        !matches!(self, Part::Whole | Part::Rows { size: 1, .. } | Part::Cols { size: 1, .. } | Part::QkvRows { size: 1, .. })
    }

    fn shape(&self, master: &[i64]) -> Vec<i64> {
        let mut s = master.to_vec();
        match *self {
            Part::Whole => {}
            Part::Rows { size, .. } | Part::QkvRows { size, .. } => s[0] /= size as i64,
            Part::Cols { size, .. } => s[1] /= size as i64,
        }
        s
    }

    /// This rank's part of the whole tensor `master`.
    pub fn take(&self, master: &Tensor) -> Tensor {
        match *self {
            Part::Whole => master.shallow_clone(),
            Part::Rows { rank, size } => {
                let n = master.size()[0] / size as i64;
                master.narrow(0, rank as i64 * n, n)
            }
            Part::Cols { rank, size } => {
                let n = master.size()[1] / size as i64;
                master.narrow(1, rank as i64 * n, n)
            }
            Part::QkvRows { rank, size } => {
                let blocks = master.chunk(3, 0);
                let parts: Vec<Tensor> = blocks
                    .iter()
                    .map(|b| {
                        let n = b.size()[0] / size as i64;
                        b.narrow(0, rank as i64 * n, n)
                    })
                    .collect();
                Tensor::cat(&parts, 0)
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct ParamInfo {
    pub name: String,
    /// This rank's shape.
    pub shape: Vec<i64>,
    /// How the whole parameter splits over tensor-parallel ranks.
    pub partition: Partition,
    /// This rank's part of it.
    pub part: Part,
    pub decay: bool,
    /// Index of the layout group (a layer, the embeddings, ...).
    pub group: usize,
    pub offset: i64,
    pub numel: i64,
}

impl ParamInfo {
    /// Split over the tensor-parallel group (its gradient norm is summed over it).
    pub fn split(&self) -> bool {
        self.part.is_split()
    }
}

/// Collects parameter declarations, then lays them out and materialises them.
struct Decl {
    name: String,
    master: Vec<i64>,
    partition: Partition,
    part: Part,
    init: Init,
    decay: bool,
    group: usize,
}

#[derive(Default)]
pub struct ParamBuilder {
    decls: Vec<Decl>,
    group: usize,
}

impl ParamBuilder {
    /// Starts a new layout group: parameters declared from now on belong to it.
    pub fn group(&mut self) {
        if !self.decls.is_empty() {
            self.group += 1;
        }
    }

    /// Declares a whole parameter; returns its index (resolved after `build`).
    pub fn add(&mut self, name: impl Into<String>, shape: &[i64], init: Init, decay: bool) -> usize {
        self.add_split(name, shape, Partition::Whole, Part::Whole, init, decay)
    }

    /// Declares this rank's `part` of a parameter whose full shape is
    /// `master`, split over tensor-parallel ranks as `partition` says.
    pub fn add_split(&mut self, name: impl Into<String>, master: &[i64], partition: Partition, part: Part, init: Init, decay: bool) -> usize {
        self.decls.push(Decl { name: name.into(), master: master.to_vec(), partition, part, init, decay, group: self.group });
        self.decls.len() - 1
    }

    /// The layout (declaration order, offsets assigned) and the padded size.
    pub fn layout(&self, pad_multiple: i64) -> (Vec<ParamInfo>, i64) {
        let last = self.decls.iter().map(|d| d.group).max().unwrap_or(0);
        let mut order: Vec<usize> = (0..self.decls.len()).collect();
        // groups last-declared first; decayed first, then split first; then
        // last-declared first (the order backward finishes them)
        order.sort_by_key(|&i| {
            let d = &self.decls[i];
            (last - d.group, !d.decay, !d.part.is_split(), std::cmp::Reverse(i))
        });
        let mut infos: Vec<Option<ParamInfo>> = vec![None; self.decls.len()];
        let mut offset = 0;
        for &i in &order {
            let d = &self.decls[i];
            let shape = d.part.shape(&d.master);
            let numel: i64 = shape.iter().product();
            infos[i] = Some(ParamInfo { name: d.name.clone(), shape, partition: d.partition, part: d.part, decay: d.decay, group: d.group, offset, numel });
            offset += numel;
        }
        let m = pad_multiple.max(1);
        let padded = (offset + m - 1) / m * m;
        (infos.into_iter().map(|i| i.expect("every declaration placed")).collect(), padded)
    }

    /// Allocates the flat buffers on `device` in `kind` and initialises every
    /// parameter in declaration order from `seed` (so the same model comes
    /// out whatever the layout, split or dtype: values are drawn in fp32, or
    /// f64 for a Double model, then cast).
    pub fn build(self, device: Device, kind: Kind, seed: i64, pad_multiple: i64) -> Result<Params> {
        let (infos, padded) = self.layout(pad_multiple);
        let init_kind = if kind == Kind::Double { Kind::Double } else { Kind::Float };
        let init = Tensor::zeros([padded], (init_kind, device));
        tch::manual_seed(seed);
        tch::no_grad(|| {
            for (info, d) in infos.iter().zip(&self.decls) {
                let mut v = init.narrow(0, info.offset, info.numel).view(info.shape.as_slice());
                if d.part == Part::Whole {
                    init_(&mut v, d.init);
                } else {
                    // the whole master, drawn exactly as a whole parameter would be
                    let mut master = Tensor::zeros(d.master.as_slice(), (init_kind, device));
                    init_(&mut master, d.init);
                    v.copy_(&d.part.take(&master));
                }
            }
        });
        let flat = if kind == init_kind { init } else { init.to_kind(kind) };
        Params::over(infos, flat)
    }
}

fn init_(t: &mut Tensor, init: Init) {
    match init {
        Init::Normal(std) => {
            let _ = t.normal_(0.0, std);
        }
        Init::Zeros => {
            let _ = t.zero_();
        }
        Init::Ones => {
            let _ = t.fill_(1.0);
        }
    }
}

pub struct Params {
    /// Declaration order (the model's); offsets give the layout.
    pub infos: Vec<ParamInfo>,
    views: Vec<Tensor>,
    /// All parameters (compute dtype), padded.
    flat: Tensor,
    /// All gradients, same layout; `views[i].grad()` is a view into it.
    grad: Tensor,
}

/// Merges `(offset, numel)` ranges that touch.
fn coalesce(mut r: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    r.sort_unstable();
    let mut out: Vec<(i64, i64)> = Vec::new();
    for (o, n) in r {
        match out.last_mut() {
            Some((lo, ln)) if *lo + *ln == o => *ln += n,
            _ => out.push((o, n)),
        }
    }
    out
}

/// The parts of `[0, n)` that sorted `ranges` leave out.
pub fn complement(ranges: &[(i64, i64)], n: i64) -> Vec<(i64, i64)> {
    debug_assert!(ranges.windows(2).all(|w| w[0].0 <= w[1].0), "ranges must be sorted: {ranges:?}");
    let mut out = Vec::new();
    let mut at = 0;
    for &(o, len) in ranges {
        if o > at {
            out.push((at, o - at));
        }
        at = at.max(o + len);
    }
    if at < n {
        out.push((at, n - at));
    }
    out
}

impl Params {
    /// Parameters over `flat` laid out as `infos` say, with a zeroed
    /// gradient buffer whose views are their `.grad`s.
    fn over(infos: Vec<ParamInfo>, flat: Tensor) -> Result<Self> {
        let grad = flat.zeros_like();
        let mut views = Vec::with_capacity(infos.len());
        for info in &infos {
            let v = flat.narrow(0, info.offset, info.numel).view(info.shape.as_slice()).set_requires_grad(true);
            let g = grad.narrow(0, info.offset, info.numel).view(info.shape.as_slice());
            super::autograd::set_grad(&v, &g).map_err(|e| match e {
                Error::Extension { op, msg } => Error::Extension { op: format!("{op} ({})", info.name), msg },
                e => e,
            })?;
            views.push(v);
        }
        Ok(Params { infos, views, flat, grad })
    }

    pub fn get(&self, index: usize) -> &Tensor {
        &self.views[index]
    }

    /// The compute dtype.
    pub fn kind(&self) -> Kind {
        self.flat.kind()
    }

    pub fn device(&self) -> Device {
        self.flat.device()
    }

    /// Elements of the parameters (without padding).
    pub fn numel(&self) -> i64 {
        self.infos.iter().map(|i| i.numel).sum()
    }

    /// Length of the flat buffers (with padding).
    pub fn padded_numel(&self) -> i64 {
        self.flat.size()[0]
    }

    /// The flat parameter buffer (read it; write through `flat_mut`).
    pub fn flat(&self) -> &Tensor {
        &self.flat
    }

    /// The flat parameter buffer for in-place updates (the optimizer, a
    /// checkpoint load, a broadcast). Writes are seen by every view.
    pub fn flat_mut(&mut self) -> &mut Tensor {
        &mut self.flat
    }

    /// The flat gradient buffer: what backward accumulated since `zero_grad`.
    pub fn grad(&self) -> &Tensor {
        &self.grad
    }

    pub fn grad_mut(&mut self) -> &mut Tensor {
        &mut self.grad
    }

    /// Drops the flat gradient buffer and every parameter's `.grad` (ZeRO
    /// stage 2: gradients go straight from autograd to their reduction
    /// bucket). `grad()` is then empty.
    pub fn release_grad_buffer(&mut self) {
        for v in &self.views {
            super::autograd::clear_grad(v);
        }
        self.grad = Tensor::zeros([0], (self.flat.kind(), self.flat.device()));
    }

    /// The parameters, in declaration order (what a gradient hook is set on).
    pub fn views(&self) -> &[Tensor] {
        &self.views
    }

    pub fn zero_grad(&mut self) {
        tch::no_grad(|| {
            let _ = self.grad.zero_();
        });
    }

    /// The ranges of the flat buffers that take weight decay.
    pub fn decay_ranges(&self) -> Vec<(i64, i64)> {
        coalesce(self.infos.iter().filter(|i| i.decay).map(|i| (i.offset, i.numel)).collect())
    }

    /// The ranges that hold tensor-parallel slices.
    pub fn split_ranges(&self) -> Vec<(i64, i64)> {
        coalesce(self.infos.iter().filter(|i| i.split()).map(|i| (i.offset, i.numel)).collect())
    }

    pub fn named(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.infos.iter().map(|i| i.name.as_str()).zip(&self.views)
    }

    /// `flat`'s slice of parameter `info`, shaped like it.
    pub fn view_of(flat: &Tensor, info: &ParamInfo) -> Tensor {
        flat.narrow(0, info.offset, info.numel).view(info.shape.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builder() -> ParamBuilder {
        let mut pb = ParamBuilder::default();
        pb.add("emb", &[4, 2], Init::Normal(0.02), true);
        for l in 0..2 {
            pb.group();
            pb.add(format!("l{l}.ln"), &[2], Init::Ones, false);
            pb.add_split(format!("l{l}.w"), &[4, 2], Partition::Rows, Part::Rows { rank: 0, size: 2 }, Init::Normal(0.02), true);
            pb.add(format!("l{l}.b"), &[2], Init::Zeros, false);
        }
        pb
    }

    #[test]
    fn layout_is_by_group_in_backward_order_and_padded() {
        let _rng = crate::torch_rng_lock();
        let (infos, padded) = builder().layout(16);
        let names_by_offset = {
            let mut v: Vec<&ParamInfo> = infos.iter().collect();
            v.sort_by_key(|i| i.offset);
            v.iter().map(|i| i.name.clone()).collect::<Vec<_>>()
        };
        assert_eq!(names_by_offset, ["l1.w", "l1.b", "l1.ln", "l0.w", "l0.b", "l0.ln", "emb"]);
        let total: i64 = infos.iter().map(|i| i.numel).sum();
        assert_eq!(total, 8 + 2 * (2 + 4 + 2));
        assert_eq!(padded, 32);
    }

    #[test]
    fn gradients_accumulate_in_the_flat_buffer() {
        let _rng = crate::torch_rng_lock();
        let mut p = builder().build(Device::Cpu, Kind::Float, 1, 16).unwrap();
        assert_eq!((p.numel(), p.padded_numel()), (24, 32));
        for _ in 0..2 {
            let loss = p.named().map(|(_, t)| t.sum(Kind::Float)).fold(Tensor::from(0.0f32), |a, b| a + b);
            loss.backward();
        }
        // every parameter element got gradient 1, twice; the padding none
        let g = p.grad().shallow_clone();
        assert_eq!(g.narrow(0, 0, 24).min().double_value(&[]), 2.0);
        assert_eq!(g.narrow(0, 24, 8).abs().max().double_value(&[]), 0.0);
        assert!(p.get(0).grad().defined());
        p.zero_grad();
        assert_eq!(p.grad().abs().max().double_value(&[]), 0.0);
        assert_eq!(p.decay_ranges(), vec![(0, 4), (8, 4), (16, 8)]);
        assert_eq!(p.split_ranges(), vec![(0, 4), (8, 4)]);
        assert_eq!(complement(&p.split_ranges(), 32), vec![(4, 4), (12, 20)]);
        assert_eq!(complement(&[(0, 32)], 32), vec![]);
    }
}
