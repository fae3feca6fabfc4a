//! Parameters in one flat fp32 buffer.
//!
//! Every parameter is a view into `flat`; `grad_flat` gathers their gradients
//! in the same layout. Weight-decayed parameters come first, so decay is one
//! `narrow`; within each group, tensor-parallel slices come first, so they
//! are at most two ranges (`split_ranges`). The optimizer, gradient clipping and norms are then a few large
//! vector operations, and ZeRO can later shard the buffer by ranges.

use tch::{Device, Kind, Tensor};

/// How a parameter starts.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Normal(f64),
    Zeros,
    Ones,
}

/// Which part of the master tensor this rank holds. The master is generated
/// whole on every rank (same seed, same order), so any tensor-parallel
/// layout starts from the same full weights as one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Whole,
    /// Rows `[r·n/p, (r+1)·n/p)` (column-parallel weights, vocabulary).
    Rows { rank: usize, size: usize },
    /// Columns likewise (row-parallel weights).
    Cols { rank: usize, size: usize },
    /// The fused query/key/value rows: this rank's rows of each of the
    /// three blocks, so a rank holds whole attention heads.
    QkvRows { rank: usize, size: usize },
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
    pub shape: Vec<i64>,
    pub decay: bool,
    pub offset: i64,
    pub numel: i64,
    /// Split over the tensor-parallel group (its gradient norm is summed over it).
    pub split: bool,
}

/// Collects parameter declarations, then materialises them.
struct Decl {
    name: String,
    master: Vec<i64>,
    part: Part,
    init: Init,
    decay: bool,
}

#[derive(Default)]
pub struct ParamBuilder {
    decls: Vec<Decl>,
}

impl ParamBuilder {
    /// Declares a whole parameter; returns its index (resolved after `build`).
    pub fn add(&mut self, name: impl Into<String>, shape: &[i64], init: Init, decay: bool) -> usize {
        self.add_part(name, shape, Part::Whole, init, decay)
    }

    /// Declares this rank's `part` of a parameter whose full shape is `master`.
    pub fn add_part(&mut self, name: impl Into<String>, master: &[i64], part: Part, init: Init, decay: bool) -> usize {
        self.decls.push(Decl { name: name.into(), master: master.to_vec(), part, init, decay });
        self.decls.len() - 1
    }

    /// Allocates the flat buffer on `device` and initialises every parameter
    /// in declaration order from `seed` (so the same model comes out
    /// whatever the layout).
    pub fn build(self, device: Device, seed: i64) -> Params {
        self.build_as(device, Kind::Float, seed)
    }

    /// As `build`, in `kind` (Double for numerical gradient checks).
    pub fn build_as(self, device: Device, kind: Kind, seed: i64) -> Params {
        let mut order: Vec<usize> = (0..self.decls.len()).collect();
        // decayed first, then split before replicated; stable otherwise
        order.sort_by_key(|&i| (!self.decls[i].decay, !self.decls[i].part.is_split()));
        let mut infos = vec![None; self.decls.len()];
        let mut offset = 0;
        for &i in &order {
            let d = &self.decls[i];
            let shape = d.part.shape(&d.master);
            let numel: i64 = shape.iter().product();
            infos[i] = Some(ParamInfo { name: d.name.clone(), shape, decay: d.decay, offset, numel, split: d.part.is_split() });
            offset += numel;
        }
        let infos: Vec<ParamInfo> = infos.into_iter().map(Option::unwrap).collect();
        let total = offset;
        let decay_numel = infos.iter().filter(|p| p.decay).map(|p| p.numel).sum();
        let flat = Tensor::zeros([total], (kind, device));
        tch::manual_seed(seed);
        let mut views = Vec::with_capacity(infos.len());
        tch::no_grad(|| {
            for (info, d) in infos.iter().zip(&self.decls) {
                let mut v = flat.narrow(0, info.offset, info.numel).view(info.shape.as_slice());
                if d.part == Part::Whole {
                    init_(&mut v, d.init);
                } else {
                    // the whole master, drawn exactly as a whole parameter would be
                    let mut master = Tensor::zeros(d.master.as_slice(), (kind, device));
                    init_(&mut master, d.init);
                    v.copy_(&d.part.take(&master));
                }
                views.push(v.set_requires_grad(true));
            }
        });
        Params { infos, views, flat, decay_numel, grad_buf: None }
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
    pub infos: Vec<ParamInfo>,
    views: Vec<Tensor>,
    /// All parameters, laid out as `infos` says.
    pub flat: Tensor,
    /// Parameters `[0, decay_numel)` of `flat` take weight decay.
    pub decay_numel: i64,
    grad_buf: Option<Tensor>,
}

impl Params {
    pub fn get(&self, index: usize) -> &Tensor {
        &self.views[index]
    }

    pub fn numel(&self) -> i64 {
        self.flat.size()[0]
    }

    /// The `(offset, numel)` ranges of `flat` that hold tensor-parallel
    /// slices (adjacent parameters merged: at most two ranges).
    pub fn split_ranges(&self) -> Vec<(i64, i64)> {
        let mut split: Vec<(i64, i64)> = self.infos.iter().filter(|i| i.split).map(|i| (i.offset, i.numel)).collect();
        split.sort_unstable();
        let mut out: Vec<(i64, i64)> = Vec::new();
        for (o, n) in split {
            match out.last_mut() {
                Some((lo, ln)) if *lo + *ln == o => *ln += n,
                _ => out.push((o, n)),
            }
        }
        out
    }

    pub fn named(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.infos.iter().map(|i| i.name.as_str()).zip(&self.views)
    }

    /// Gradients in the flat layout (zeros for parameters without one).
    /// Reuses one buffer across calls: the previous result is overwritten.
    pub fn grad_flat(&mut self) -> Tensor {
        let mut order: Vec<usize> = (0..self.infos.len()).collect();
        order.sort_by_key(|&i| self.infos[i].offset);
        let parts: Vec<Tensor> = order
            .iter()
            .map(|&i| {
                let g = self.views[i].grad();
                if g.defined() {
                    g.view([-1])
                } else {
                    Tensor::zeros([self.infos[i].numel], (self.flat.kind(), self.flat.device()))
                }
            })
            .collect();
        let buf = self.grad_buf.get_or_insert_with(|| self.flat.zeros_like());
        let _ = Tensor::cat_out(buf, &parts, 0);
        buf.shallow_clone()
    }

    pub fn zero_grad(&mut self) {
        for v in &mut self.views {
            v.zero_grad();
        }
    }

    pub fn device(&self) -> Device {
        self.flat.device()
    }
}
