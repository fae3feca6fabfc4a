//! `glm-worker comm-check`: every collective of a communicator checked
//! against values each rank can compute alone, on CPU (MPI) or CUDA (NCCL)
//! tensors, then all-reduce bus bandwidth. Works in a world of one (the GPU
//! check runs it so) and under mpirun. (The tensor-parallel regions built on
//! these collectives are checked by `parallel::check`.)

use tch::{Device, Kind, Tensor};

use super::{Communicator, ReduceOp};
use crate::error::{Error, Result};

/// `got` must equal `want` exactly; the line "`what`: ok", or an error
/// showing both.
pub fn expect(what: &str, got: &Tensor, want: &Tensor) -> Result<String> {
    let got_cpu = got.to_device(Device::Cpu).to_kind(Kind::Double);
    let want = want.to_device(Device::Cpu).to_kind(Kind::Double);
    if got_cpu.size() != want.size() || !got_cpu.allclose(&want, 0.0, 0.0, false) {
        let values = |t: &Tensor| Vec::<f64>::try_from(t.flatten(0, -1)).unwrap_or_default();
        return Err(Error::comm(format!("comm-check {what}"), format!("got {got_cpu:?} {:?}, want {:?}", values(&got_cpu), values(&want))));
    }
    Ok(format!("{what}: ok"))
}

/// Runs every check on tensors of `device`; returns one line per check.
/// Collective: every rank of `comm` calls it.
pub fn collectives(comm: &dyn Communicator, device: Device) -> Result<Vec<String>> {
    let (r, p) = (comm.rank() as f64, comm.size() as f64);
    let pi = comm.size() as i64;
    let opts = (Kind::Float, device);
    let mut out = Vec::new();

    // all-reduce sum: rank r holds r+1 everywhere -> p(p+1)/2
    for kind in [Kind::Float, Kind::BFloat16, Kind::Double] {
        let mut t = Tensor::full([5, 3], r + 1.0, (kind, device));
        comm.all_reduce(&mut t, ReduceOp::Sum)?;
        out.push(expect(&format!("all_reduce sum {kind:?}"), &t, &Tensor::full([5, 3], p * (p + 1.0) / 2.0, opts))?);
    }
    // all-reduce max of int64: [r, -r] -> [p-1, 0]
    let mut t = Tensor::from_slice(&[r as i64, -(r as i64)]).to(device);
    comm.all_reduce(&mut t, ReduceOp::Max)?;
    out.push(expect("all_reduce max Int64", &t, &Tensor::from_slice(&[pi - 1, 0]))?);
    // all-reduce of a non-contiguous view writes through to its base
    let base = Tensor::arange(12, opts).view([3, 4]) * (r + 1.0);
    let mut view = base.transpose(0, 1);
    comm.all_reduce(&mut view, ReduceOp::Sum)?;
    out.push(expect("all_reduce sum of a transposed view", &base, &(Tensor::arange(12, opts).view([3, 4]) * (p * (p + 1.0) / 2.0)))?);
    // broadcast from the last rank
    let mut t = Tensor::full([4], r, opts);
    comm.broadcast(&mut t, comm.size() - 1)?;
    out.push(expect("broadcast from the last rank", &t, &Tensor::full([4], p - 1.0, opts))?);
    // all-gather: rank r holds [10r, 10r+1, 10r+2]
    let t = Tensor::arange(3, opts) + 10.0 * r;
    let g = comm.all_gather(&t)?;
    let want = Tensor::cat(&(0..pi).map(|q| Tensor::arange(3, opts) + 10.0 * q as f64).collect::<Vec<_>>(), 0);
    out.push(expect("all_gather", &g, &want)?);
    // reduce-scatter in f64: rank r holds arange(2p) + r + 2^-30 (exact in
    // f64, lost in f32); keeps its 2 of the sum
    let (f64_opts, frac) = ((Kind::Double, device), 2f64.powi(-30));
    let t = Tensor::arange(2 * pi, f64_opts) + (r + frac);
    let s = comm.reduce_scatter(&t)?;
    let want = (Tensor::arange(2 * pi, f64_opts) * p + (p * (p - 1.0) / 2.0 + p * frac)).narrow(0, 2 * r as i64, 2);
    out.push(expect("reduce_scatter", &s, &want)?);
    comm.barrier()?;
    out.push("barrier: ok".into());
    Ok(out)
}

/// The factor from algorithm bandwidth to bus bandwidth of an all-reduce
/// over `p` ranks, 2(p-1)/p (NCCL's convention).
pub fn bus_factor(p: usize) -> f64 {
    2.0 * (p - 1) as f64 / p as f64
}

/// Seconds per sum all-reduce of `mib` MiB of f32 on `device` (mean of
/// `iters` after one warm-up, whose sum of ones is checked), waiting for the
/// device around the timing.
pub fn time_all_reduce(comm: &dyn Communicator, device: Device, mib: usize, iters: usize) -> Result<f64> {
    let n = (mib * (1 << 20) / 4) as i64;
    let mut t = Tensor::ones([n], (Kind::Float, device));
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    comm.all_reduce(&mut t, ReduceOp::Sum)?;
    let got = t.double_value(&[0]);
    if got != comm.size() as f64 {
        return Err(super::fail("comm-check all_reduce", comm, format!("a sum of ones gave {got}")));
    }
    sync();
    comm.barrier()?;
    let t0 = std::time::Instant::now();
    for _ in 0..iters {
        comm.all_reduce(&mut t, ReduceOp::Sum)?;
    }
    sync();
    Ok(t0.elapsed().as_secs_f64() / iters.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group of one: every collective is the identity (or a copy); a
    /// broken one drops the data of its all-gather.
    struct Alone {
        broken: bool,
    }
    impl Communicator for Alone {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            1
        }
        fn all_reduce(&self, _t: &mut Tensor, _op: ReduceOp) -> Result<()> {
            Ok(())
        }
        fn broadcast(&self, _t: &mut Tensor, _root: usize) -> Result<()> {
            Ok(())
        }
        fn name(&self) -> &str {
            "alone"
        }
        fn all_gather_into(&self, t: &Tensor, out: &mut Tensor) -> Result<()> {
            if self.broken {
                let _ = out.zero_();
            } else {
                out.copy_(&t.view_as(out));
            }
            Ok(())
        }
        fn reduce_scatter_into(&self, t: &Tensor, out: &mut Tensor) -> Result<()> {
            out.copy_(&t.view_as(out));
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_group_of_one_passes_and_a_wrong_gather_fails() {
        let lines = collectives(&Alone { broken: false }, Device::Cpu).unwrap();
        assert_eq!(lines.len(), 9, "{lines:?}");
        let e = collectives(&Alone { broken: true }, Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("all_gather"), "{e}");
    }
}
