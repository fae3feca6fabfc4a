//! Megatron's tensor-parallel layers as functions of a rank's parameter
//! slices (THUDM/GLM `mpu/layers.py`, `mpu/cross_entropy.py`). At group size
//! 1 each is the serial layer. The slices are the rank's part of the master
//! weight: rows `[r·n/p, (r+1)·n/p)` for column-parallel weights and the
//! vocabulary, columns for row-parallel weights.

use tch::{Kind, Tensor};

use super::mappings::{all_reduce_max, copy_to, gather_from, reduce_from, scatter_to, Group};
use crate::error::Result;

/// `y = x Wᵀ + b` with W split by output rows: `weight` `[out/p, in]`,
/// `bias` `[out/p]`. The input is replicated; the output stays split along
/// its last dimension unless `gather_output`.
pub fn column_parallel_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, g: &Group, gather_output: bool) -> Result<Tensor> {
    let y = copy_to(x, g)?.linear(weight, bias);
    if gather_output {
        gather_from(&y, g)
    } else {
        Ok(y)
    }
}

/// `y = x Wᵀ + b` with W split by input columns: `weight` `[out, in/p]`,
/// `bias` `[out]` (replicated, added once after the sum). The input is
/// already split along its last dimension when `input_is_parallel`.
pub fn row_parallel_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, g: &Group, input_is_parallel: bool) -> Result<Tensor> {
    let x = if input_is_parallel { x.shallow_clone() } else { scatter_to(x, g)? };
    let y = reduce_from(&x.linear::<Tensor>(weight, None), g)?;
    Ok(match bias {
        Some(b) => y + b,
        None => y,
    })
}

/// Embedding lookup with the vocabulary split by rows: `weight` `[V/p, h]`
/// holds ids `[r·V/p, (r+1)·V/p)`; other ranks' ids contribute zeros and the
/// rows are summed over the group.
pub fn vocab_parallel_embedding(ids: &Tensor, weight: &Tensor, g: &Group) -> Result<Tensor> {
    let vp = weight.size()[0];
    let start = g.rank as i64 * vp;
    let mine = ids.ge(start).logical_and(&ids.lt(start + vp));
    let local = (ids - start) * mine.to_kind(Kind::Int64);
    let e = Tensor::embedding(weight, &local, -1, false, false) * mine.unsqueeze(-1).to_kind(weight.kind());
    reduce_from(&e, g)
}

/// Per-token cross entropy of logits split by vocabulary (`logits` `[n, V/p]`,
/// `targets` `[n]` global ids) without gathering the full logits: the maximum
/// is max-reduced, the target logit and the sum of exponentials are
/// sum-reduced through `reduce_from`, whose identity backward gives each rank
/// exactly its part of softmax − one-hot.
pub fn vocab_parallel_cross_entropy(logits: &Tensor, targets: &Tensor, g: &Group) -> Result<Tensor> {
    let vp = logits.size()[1];
    let start = g.rank as i64 * vp;
    let mut max = logits.detach().amax([-1i64].as_slice(), true); // (n, 1)
    all_reduce_max(&mut max, g)?;
    let shifted = logits - &max;
    let mine = targets.ge(start).logical_and(&targets.lt(start + vp));
    let local = (targets - start) * mine.to_kind(Kind::Int64);
    let picked = shifted.gather(1, &local.unsqueeze(1), false).squeeze_dim(1) * mine.to_kind(logits.kind());
    let target_logit = reduce_from(&picked, g)?;
    let sum_exp = reduce_from(&shifted.exp().sum_dim_intlist([-1i64].as_slice(), false, logits.kind()), g)?;
    Ok(sum_exp.log() - target_logit)
}
