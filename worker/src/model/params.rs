//! Parameters in one flat fp32 buffer.
//!
//! Every parameter is a view into `flat`; `grad_flat` gathers their gradients
//! in the same layout. Weight-decayed parameters come first, so decay is one
//! `narrow`. The optimizer, gradient clipping and norms are then a few large
//! vector operations, and ZeRO can later shard the buffer by ranges.

use tch::{Device, Kind, Tensor};

/// How a parameter starts.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Normal(f64),
    Zeros,
    Ones,
}

#[derive(Clone, Debug)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<i64>,
    pub decay: bool,
    pub offset: i64,
    pub numel: i64,
}

/// Collects parameter declarations, then materialises them.
#[derive(Default)]
pub struct ParamBuilder {
    decls: Vec<(String, Vec<i64>, Init, bool)>,
}

impl ParamBuilder {
    /// Declares a parameter; returns its index (resolved after `build`).
    pub fn add(&mut self, name: impl Into<String>, shape: &[i64], init: Init, decay: bool) -> usize {
        self.decls.push((name.into(), shape.to_vec(), init, decay));
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
        order.sort_by_key(|&i| !self.decls[i].3); // decayed first, stable
        let mut infos = vec![None; self.decls.len()];
        let mut offset = 0;
        for &i in &order {
            let (name, shape, _, decay) = &self.decls[i];
            let numel: i64 = shape.iter().product();
            infos[i] = Some(ParamInfo { name: name.clone(), shape: shape.clone(), decay: *decay, offset, numel });
            offset += numel;
        }
        let infos: Vec<ParamInfo> = infos.into_iter().map(Option::unwrap).collect();
        let total = offset;
        let decay_numel = infos.iter().filter(|p| p.decay).map(|p| p.numel).sum();
        let flat = Tensor::zeros([total], (kind, device));
        let gen_seed = seed;
        tch::manual_seed(gen_seed);
        let mut views = Vec::with_capacity(infos.len());
        tch::no_grad(|| {
            for (info, (_, _, init, _)) in infos.iter().zip(&self.decls) {
                let mut v = flat.narrow(0, info.offset, info.numel).view(info.shape.as_slice());
                match init {
                    Init::Normal(std) => {
                        let _ = v.normal_(0.0, *std);
                    }
                    Init::Zeros => {
                        let _ = v.zero_();
                    }
                    Init::Ones => {
                        let _ = v.fill_(1.0);
                    }
                }
                views.push(v.set_requires_grad(true));
            }
        });
        Params { infos, views, flat, decay_numel, grad_buf: None }
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
