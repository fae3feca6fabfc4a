//! The autograd extensions of `csrc/train_ext.cpp`: a parameter's `.grad`
//! set to a view of the flat gradient buffer, and activation recomputation
//! (checkpointing) of a closure.

use std::ffi::{c_void, CStr};
use std::os::raw::c_char;

use tch::Tensor;
use torch_sys::C_tensor;

use crate::error::{Error, Result};

type CallFn = extern "C" fn(*mut c_void, *mut C_tensor, *mut i32) -> *mut C_tensor;
type DropFn = extern "C" fn(*mut c_void);

extern "C" {
    fn glm_ext_last_error() -> *const c_char;
    fn glm_set_grad(param: *mut C_tensor, grad: *mut C_tensor) -> i32;
    fn glm_recompute(x: *mut C_tensor, ctx: *mut c_void, call: CallFn, drop: DropFn) -> *mut C_tensor;
    fn glm_set_grad_hook(param: *mut C_tensor, ctx: *mut c_void, call: HookFn, drop: DropFn) -> i32;
    fn glm_clear_grad(param: *mut C_tensor);
}

type HookFn = extern "C" fn(*mut c_void, *mut C_tensor, *mut i32);

/// What a gradient hook runs (from an autograd thread on CUDA, hence `Send`).
pub type GradHook = Box<dyn FnMut(&Tensor) -> Result<()> + Send>;

extern "C" fn call_hook(ctx: *mut c_void, g: *mut C_tensor, err: *mut i32) {
    // SAFETY: `ctx` is the `Box<GradHook>` leaked by `set_grad_hook`, alive
    // until `drop_hook`; autograd runs one hook of a parameter at a time.
    let f = unsafe { &mut *(ctx as *mut GradHook) };
    let g = unsafe { Tensor::from_ptr(g) };
    let ok = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&g))) {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            log::error!("gradient hook: {e}");
            false
        }
        Err(p) => {
            log::error!("gradient hook: {}", crate::runtime::report::panic_summary(&*p));
            false
        }
    };
    if !ok {
        // SAFETY: err points to the caller's int.
        unsafe { *err = 1 };
    }
}

extern "C" fn drop_hook(ctx: *mut c_void) {
    // SAFETY: the pointer `set_grad_hook` leaked; the shim calls this once.
    drop(unsafe { Box::from_raw(ctx as *mut GradHook) });
}

/// After autograd accumulates `param`'s gradient, `f` takes it, and the
/// parameter's `.grad` is released (ZeRO stage 2). Replaces an earlier hook.
pub fn set_grad_hook(param: &Tensor, f: GradHook) -> Result<()> {
    let ctx = Box::into_raw(Box::new(f)) as *mut c_void;
    // SAFETY: a live tensor borrowed for the call; the shim takes `ctx`.
    let rc = unsafe { glm_set_grad_hook(param.as_ptr() as *mut C_tensor, ctx, call_hook, drop_hook) };
    if rc != 0 {
        return Err(Error::Extension { op: "installing a gradient hook".into(), msg: last_error() });
    }
    Ok(())
}

/// Releases `param`'s `.grad`.
pub fn clear_grad(param: &Tensor) {
    // SAFETY: a live tensor borrowed for the call.
    unsafe { glm_clear_grad(param.as_ptr() as *mut C_tensor) }
}

/// The shim's last error message (this thread).
pub(crate) fn last_error() -> String {
    // SAFETY: a NUL-terminated thread-local string of the shim.
    unsafe { CStr::from_ptr(glm_ext_last_error()) }.to_string_lossy().into_owned()
}

/// Makes `grad` (same shape, dtype and device) the `.grad` of `param`:
/// backward then accumulates into `grad`'s storage in place.
pub fn set_grad(param: &Tensor, grad: &Tensor) -> Result<()> {
    // SAFETY: both pointers are live tensors borrowed for the call; the shim
    // copies the handle (a reference count), it does not take them.
    let rc = unsafe { glm_set_grad(param.as_ptr() as *mut C_tensor, grad.as_ptr() as *mut C_tensor) };
    if rc != 0 {
        return Err(Error::Extension { op: "setting a parameter's gradient view".into(), msg: last_error() });
    }
    Ok(())
}

/// A chunk of the network, run again in backward (on CUDA from an autograd
/// worker thread, hence `Send`).
pub type Chunk = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send>;

extern "C" fn call_chunk(ctx: *mut c_void, x: *mut C_tensor, err: *mut i32) -> *mut C_tensor {
    // SAFETY: `ctx` is the `Box<Chunk>` leaked by `recompute`, alive until
    // `drop_chunk`; `x` is a heap tensor the C++ side handed over.
    let f = unsafe { &*(ctx as *const Chunk) };
    let x = unsafe { Tensor::from_ptr(x) };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&x)));
    match result {
        Ok(Ok(mut y)) => {
            let p = y.as_mut_ptr();
            std::mem::forget(y); // the C++ side owns and frees it
            p
        }
        Ok(Err(e)) => {
            log::error!("activation recompute: {e}");
            // SAFETY: err points to the caller's int.
            unsafe { *err = 1 };
            std::ptr::null_mut()
        }
        Err(p) => {
            log::error!("activation recompute: {}", crate::runtime::report::panic_summary(&*p));
            unsafe { *err = 1 };
            std::ptr::null_mut()
        }
    }
}

extern "C" fn drop_chunk(ctx: *mut c_void) {
    // SAFETY: the pointer `recompute` leaked; the shim calls this once.
    drop(unsafe { Box::from_raw(ctx as *mut Chunk) });
}

/// `f(x)` without keeping the activations inside `f`: only `x` and the
/// random-generator state are kept, and backward runs `f` again (same
/// dropout masks) to get the gradients of `x` and of the parameters `f` uses.
pub fn recompute(x: &Tensor, f: Chunk) -> Result<Tensor> {
    let ctx = Box::into_raw(Box::new(f)) as *mut c_void;
    // SAFETY: the shim takes ownership of `ctx` (freed through drop_chunk,
    // also on failure) and returns a new heap tensor or null.
    let y = unsafe { glm_recompute(x.as_ptr() as *mut C_tensor, ctx, call_chunk, drop_chunk) };
    if y.is_null() {
        return Err(Error::Extension { op: "activation checkpointing".into(), msg: last_error() });
    }
    // SAFETY: a fresh heap tensor owned by us from now on.
    Ok(unsafe { Tensor::from_ptr(y) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// Recomputed in backward, with dropout: the same gradients as without.
    #[test]
    fn recompute_gives_the_gradients_of_the_plain_run() {
        let _rng = crate::torch_rng_lock();
        let w = Tensor::randn([8, 8], (Kind::Double, tch::Device::Cpu)).set_requires_grad(true);
        let x0 = Tensor::randn([4, 8], (Kind::Double, tch::Device::Cpu));
        let run = |ckpt: bool| -> (Tensor, Tensor, Tensor) {
            tch::manual_seed(5);
            let x = x0.detach().set_requires_grad(true);
            let w2 = w.shallow_clone();
            let body = move |t: &Tensor| -> Result<Tensor> { Ok(t.matmul(&w2).gelu("tanh").dropout(0.5, true).matmul(&w2)) };
            let y = if ckpt { recompute(&x, Box::new(body)).unwrap() } else { body(&x).unwrap() };
            // a draw after the chunk: the stream must continue identically
            let after = Tensor::rand([3], (Kind::Double, tch::Device::Cpu));
            (y.sum(Kind::Double) + after.sum(Kind::Double)).backward();
            let gw = w.grad().copy();
            let _ = w.grad().zero_();
            (y.detach(), x.grad().copy(), gw)
        };
        let (y0, gx0, gw0) = run(false);
        let (y1, gx1, gw1) = run(true);
        assert!(y0.equal(&y1), "outputs differ");
        assert!(gx0.equal(&gx1), "input gradients differ");
        assert!(gw0.equal(&gw1), "parameter gradients differ");
    }
}
