//! `glm-worker comm-check`, second half: the tensor-parallel autograd
//! regions (`mappings`) over a real group, forward and backward, checked
//! against values each rank can compute alone.

use tch::{Device, Kind, Tensor};

use super::mappings::{self, Group};
use crate::comm::check::expect;
use crate::error::Result;

/// The tensor-parallel autograd regions (copy/reduce/scatter/gather, forward
/// and backward) over group `g`, on tensors of `device`. Backward runs on
/// libtorch's autograd thread for the device, as in training.
pub fn regions(g: &Group, device: Device) -> Result<Vec<String>> {
    let (r, p) = (g.rank as f64, g.size as f64);
    let pi = g.size as i64;
    let opts = (Kind::Float, device);
    let full = |v: f64, shape: &[i64]| Tensor::full(shape, v, opts);
    let mut out = Vec::new();

    let x = full(r + 1.0, &[2, 4]).set_requires_grad(true);
    let y = mappings::copy_to(&x, g)?;
    (&y * (r + 1.0)).sum(Kind::Float).backward();
    out.push(expect("copy_to forward", &y, &full(r + 1.0, &[2, 4]))?);
    out.push(expect("copy_to backward (sum of grads)", &x.grad(), &full(p * (p + 1.0) / 2.0, &[2, 4]))?);

    let x = full(r + 1.0, &[2, 4]).set_requires_grad(true);
    let y = mappings::reduce_from(&x, g)?;
    (&y * (r + 1.0)).sum(Kind::Float).backward();
    out.push(expect("reduce_from forward (sum)", &y, &full(p * (p + 1.0) / 2.0, &[2, 4]))?);
    out.push(expect("reduce_from backward (identity)", &x.grad(), &full(r + 1.0, &[2, 4]))?);

    let x = Tensor::arange(2 * 2 * pi, opts).view([2, 2 * pi]).set_requires_grad(true);
    let y = mappings::scatter_to(&x, g)?;
    (&y * (r + 1.0)).sum(Kind::Float).backward();
    out.push(expect("scatter_to forward (own slice)", &y, &x.narrow(1, 2 * r as i64, 2))?);
    let want = Tensor::cat(&(0..pi).map(|q| full(q as f64 + 1.0, &[2, 2])).collect::<Vec<_>>(), 1);
    out.push(expect("scatter_to backward (gathered grads)", &x.grad(), &want)?);

    let x = full(r + 1.0, &[2, 2]).set_requires_grad(true);
    let y = mappings::gather_from(&x, g)?;
    let w = Tensor::arange(2 * 2 * pi, opts).view([2, 2 * pi]);
    (&y * &w).sum(Kind::Float).backward();
    let want = Tensor::cat(&(0..pi).map(|q| full(q as f64 + 1.0, &[2, 2])).collect::<Vec<_>>(), 1);
    out.push(expect("gather_from forward", &y, &want)?);
    out.push(expect("gather_from backward (own slice)", &x.grad(), &w.narrow(1, 2 * r as i64, 2))?);
    Ok(out)
}
