//! Megatron's conjugate tensor-parallel regions, side by side. Each is a
//! libtorch autograd function defined in `csrc/tp_autograd.cpp` (tch cannot
//! define autograd functions); its collective, in forward or backward, calls
//! back into Rust and runs on the group's `Communicator`.
//!
//! | region             | forward                       | backward                      |
//! |--------------------|-------------------------------|-------------------------------|
//! | `copy_to`          | identity                      | all-reduce (sum) of the grad  |
//! | `reduce_from`      | all-reduce (sum)              | identity                      |
//! | `scatter_to`       | own slice of the last dim     | all-gather along the last dim |
//! | `gather_from`      | all-gather along the last dim | own slice of the last dim     |
//!
//! Backward may run on an autograd worker thread. The group travels with
//! the autograd node that needs it (a clone of the shared communicator,
//! released with the node): there is no registry of groups, and a group
//! lives exactly as long as something can still call it.

use std::ffi::{c_void, CStr};
use std::os::raw::c_char;

use tch::Tensor;
use torch_sys::C_tensor;

use crate::comm::{Comm, ReduceOp};
use crate::error::{Error, Result};

type Callback = extern "C" fn(i32, *mut c_void, *mut C_tensor, *mut i32) -> *mut C_tensor;
type DropFn = extern "C" fn(*mut c_void);

extern "C" {
    fn glm_tp_set_collective(f: Callback);
    fn glm_tp_last_error() -> *const c_char;
    fn glm_tp_copy_to(x: *mut C_tensor, g: *mut c_void, drop: DropFn) -> *mut C_tensor;
    fn glm_tp_reduce_from(x: *mut C_tensor, g: *mut c_void, drop: DropFn) -> *mut C_tensor;
    fn glm_tp_scatter_to(x: *mut C_tensor, g: *mut c_void, drop: DropFn, rank: i64, size: i64) -> *mut C_tensor;
    fn glm_tp_gather_from(x: *mut C_tensor, g: *mut c_void, drop: DropFn, rank: i64, size: i64) -> *mut C_tensor;
}

/// The tensor-parallel group: its communicator and this rank's place in it.
#[derive(Clone)]
pub struct Group {
    comm: Comm,
    pub rank: usize,
    pub size: usize,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group({} rank {} of {})", self.comm.name(), self.rank, self.size)
    }
}

impl Group {
    pub fn new(comm: Comm) -> Self {
        // SAFETY: installs a plain function pointer; idempotent.
        unsafe { glm_tp_set_collective(collective) };
        Group { rank: comm.rank(), size: comm.size(), comm }
    }

    pub fn comm(&self) -> &Comm {
        &self.comm
    }

    /// A handle for the C++ side: a leaked clone of the communicator,
    /// released through `drop_group`.
    fn handle(&self) -> *mut c_void {
        Box::into_raw(Box::new(self.comm.clone())) as *mut c_void
    }
}

/// Reduces `t` in place over the group, outside autograd (values that carry
/// no gradient: the logits' maximum, squared gradient norms).
pub fn all_reduce_nograd(t: &mut Tensor, g: &Group, op: ReduceOp) -> Result<()> {
    tch::no_grad(|| g.comm.all_reduce(t, op))
}

/// `all_reduce_nograd` with the maximum.
pub fn all_reduce_max(t: &mut Tensor, g: &Group) -> Result<()> {
    all_reduce_nograd(t, g, ReduceOp::Max)
}

extern "C" fn drop_group(g: *mut c_void) {
    // SAFETY: a pointer made by `Group::handle`; the shim releases it once.
    drop(unsafe { Box::from_raw(g as *mut Comm) });
}

extern "C" fn collective(op: i32, g: *mut c_void, t: *mut C_tensor, err: *mut i32) -> *mut C_tensor {
    // SAFETY: the C++ side hands over a heap tensor it no longer owns, and a
    // group handle it keeps alive for the call.
    let mut t = unsafe { Tensor::from_ptr(t) };
    let comm: &Comm = unsafe { &*(g as *const Comm) };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<Option<Tensor>> {
        match op {
            0 => comm.all_reduce(&mut t, ReduceOp::Sum).map(|_| None),
            1 => {
                // gather along the last dimension = gather along dim 0 of the moved tensor
                let moved = t.movedim([-1], [0]).contiguous();
                let g = comm.all_gather(&moved)?;
                Ok(Some(g.movedim([0], [-1]).contiguous()))
            }
            other => Err(Error::Extension { op: "tensor-parallel region".into(), msg: format!("unknown collective {other}") }),
        }
    }));
    let fail = |msg: String| {
        log::error!("tensor-parallel collective: {msg}");
        // SAFETY: err points to the caller's int.
        unsafe { *err = 1 };
        std::ptr::null_mut()
    };
    match result {
        Ok(Ok(None)) => std::ptr::null_mut(),
        Ok(Ok(Some(mut out))) => {
            let p = out.as_mut_ptr();
            std::mem::forget(out); // the C++ side owns and frees it
            p
        }
        Ok(Err(e)) => fail(e.to_string()),
        Err(p) => fail(crate::runtime::report::panic_summary(&*p)),
    }
}

fn wrap(p: *mut C_tensor, what: &str) -> Result<Tensor> {
    if p.is_null() {
        // SAFETY: a NUL-terminated thread-local string of the shim.
        let msg = unsafe { CStr::from_ptr(glm_tp_last_error()) }.to_string_lossy().into_owned();
        return Err(Error::Extension { op: what.to_string(), msg });
    }
    // SAFETY: a fresh heap tensor returned by the shim, now ours.
    Ok(unsafe { Tensor::from_ptr(p) })
}

// SAFETY (all four): `x` is a live tensor borrowed for the call; the shim
// takes the group handle and returns a new heap tensor or null.

/// Identity forward; the gradient is summed over the group.
pub fn copy_to(x: &Tensor, g: &Group) -> Result<Tensor> {
    wrap(unsafe { glm_tp_copy_to(x.as_ptr() as *mut C_tensor, g.handle(), drop_group) }, "copy_to_tensor_parallel_region")
}

/// Sum over the group forward; identity backward.
pub fn reduce_from(x: &Tensor, g: &Group) -> Result<Tensor> {
    wrap(unsafe { glm_tp_reduce_from(x.as_ptr() as *mut C_tensor, g.handle(), drop_group) }, "reduce_from_tensor_parallel_region")
}

/// This rank's slice of the last dimension forward; all-gather backward.
pub fn scatter_to(x: &Tensor, g: &Group) -> Result<Tensor> {
    wrap(unsafe { glm_tp_scatter_to(x.as_ptr() as *mut C_tensor, g.handle(), drop_group, g.rank as i64, g.size as i64) }, "scatter_to_tensor_parallel_region")
}

/// All-gather along the last dimension forward; own slice backward.
pub fn gather_from(x: &Tensor, g: &Group) -> Result<Tensor> {
    wrap(unsafe { glm_tp_gather_from(x.as_ptr() as *mut C_tensor, g.handle(), drop_group, g.rank as i64, g.size as i64) }, "gather_from_tensor_parallel_region")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::Communicator;
    use std::sync::Arc;
    use tch::Kind;

    /// Rank 0 of a pretend group of two whose peer holds `peer` × this rank's
    /// values: all-reduce gives (1 + peer)·x, all-gather [x, peer·x].
    struct Pretend {
        peer: f64,
        fail: bool,
    }

    impl Communicator for Pretend {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            2
        }
        fn name(&self) -> &str {
            "pretend"
        }
        fn all_reduce(&self, t: &mut Tensor, _op: ReduceOp) -> Result<()> {
            if self.fail {
                return Err(crate::comm::fail("all_reduce", self, "the network is down"));
            }
            tch::no_grad(|| {
                let _ = t.g_mul_scalar_(1.0 + self.peer);
            });
            Ok(())
        }
        fn broadcast(&self, _t: &mut Tensor, _root: usize) -> Result<()> {
            Ok(())
        }
        fn all_gather_into(&self, t: &Tensor, out: &mut Tensor) -> Result<()> {
            tch::no_grad(|| out.copy_(&Tensor::cat(&[t.shallow_clone(), t * self.peer], 0).view_as(out)));
            Ok(())
        }
        fn reduce_scatter_into(&self, _: &Tensor, _: &mut Tensor) -> Result<()> {
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
    }

    fn input() -> Tensor {
        Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]).view([2, 4]).set_requires_grad(true)
    }

    fn weights(shape: &[i64]) -> Tensor {
        Tensor::arange(shape.iter().product::<i64>(), (Kind::Float, tch::Device::Cpu)).view(shape) + 1.0
    }

    #[test]
    fn regions_have_their_conjugate_backward() {
        let g = Group::new(Arc::new(Pretend { peer: 1.0, fail: false }));
        // copy_to: identity forward, gradient summed (doubled) backward
        let x = input();
        let y = copy_to(&x, &g).unwrap();
        assert!(y.equal(&x));
        let w = weights(&[2, 4]);
        (&y * &w).sum(Kind::Float).backward();
        assert!(x.grad().equal(&(&w * 2.0)));

        // reduce_from: summed forward, identity backward
        let x = input();
        let y = reduce_from(&x, &g).unwrap();
        assert!(y.equal(&(&x * 2.0)));
        (&y * &w).sum(Kind::Float).backward();
        assert!(x.grad().equal(&w));

        // scatter_to: own half of the last dimension; backward gathers
        let g10 = Group::new(Arc::new(Pretend { peer: 10.0, fail: false }));
        let x = input();
        let y = scatter_to(&x, &g10).unwrap();
        assert!(y.equal(&x.narrow(1, 0, 2)));
        let w2 = weights(&[2, 2]);
        (&y * &w2).sum(Kind::Float).backward();
        assert!(x.grad().equal(&Tensor::cat(&[w2.shallow_clone(), &w2 * 10.0], 1)));

        // gather_from: gathers along the last dimension; backward keeps own slice
        let x = input();
        let y = gather_from(&x, &g10).unwrap();
        assert_eq!(y.size(), vec![2, 8]);
        assert!(y.equal(&Tensor::cat(&[x.detach(), x.detach() * 10.0], 1)));
        let w8 = weights(&[2, 8]);
        (&y * &w8).sum(Kind::Float).backward();
        assert!(x.grad().equal(&w8.narrow(1, 0, 4)));
    }

    #[test]
    fn a_failing_collective_is_an_error_not_a_crash() {
        let g = Group::new(Arc::new(Pretend { peer: 1.0, fail: true }));
        let e = reduce_from(&input(), &g).unwrap_err().to_string();
        assert!(e.contains("reduce_from_tensor_parallel_region") && e.contains("all-reduce failed"), "{e}");
        let x = input();
        let y = copy_to(&x, &g).unwrap();
        let r = y.sum(Kind::Float).f_backward();
        assert!(r.is_err(), "backward must report the failed collective");
    }
}
