//! The device a rank computes on.

use anyhow::Result;
use glm_worker::comm::staged::{Backend, BACKEND_VAR};

/// The device of a rank with this local rank: `cuda:<local rank>` on CUDA.
/// With collectives staged through the host (`GLM_COMM_BACKEND=host-staged`)
/// ranks may share devices: local rank r takes `cuda:<r mod devices>`.
pub fn rank_device(choice: &str, local_rank: usize) -> Result<tch::Device> {
    match device(choice)? {
        tch::Device::Cuda(_) => {
            let n = tch::Cuda::device_count() as usize;
            // Slurm binding one GPU to each task (--gpus-per-task,
            // --gpu-bind) leaves it exactly one device, whatever its local rank
            let one = std::env::var("CUDA_VISIBLE_DEVICES").is_ok_and(|v| !v.is_empty() && !v.contains(','));
            let slurm_gpus = std::env::var_os("SLURM_STEP_GPUS").is_some() || std::env::var_os("SLURM_JOB_GPUS").is_some();
            if n == 1 && one && slurm_gpus {
                return Ok(tch::Device::Cuda(0));
            }
            Ok(tch::Device::Cuda(cuda_index(local_rank, n, Backend::from_env()? == Backend::HostStaged)?))
        }
        d => Ok(d),
    }
}

/// The CUDA device of local rank `local_rank` on a node showing `n`: its
/// own, or, when ranks may share devices (`shared`), `local_rank mod n`.
fn cuda_index(local_rank: usize, n: usize, shared: bool) -> Result<usize> {
    if local_rank >= n && n > 0 && shared {
        return Ok(local_rank % n);
    }
    anyhow::ensure!(
        local_rank < n,
        "local rank {local_rank} needs cuda:{local_rank}, but this node shows {n} CUDA device(s); start at most {n} ranks per node (CUDA_VISIBLE_DEVICES), \
         or, to check multi-rank CUDA paths on fewer GPUs, share them with {BACKEND_VAR}=host-staged (NCCL refuses two ranks on one device)"
    );
    Ok(local_rank)
}

/// The device `choice` (cpu, cuda, auto) names for a process alone.
pub fn device(choice: &str) -> Result<tch::Device> {
    // the back end's variable is checked here, where every command that
    // computes starts, so a misspelt value is an error also in a world of one
    Backend::from_env()?;
    glm_worker::runtime::torch::load_cuda();
    match choice {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => {
            anyhow::ensure!(tch::Cuda::is_available(), "--device cuda: CUDA is not available (no GPU, driver, or libtorch_cuda)");
            Ok(tch::Device::Cuda(0))
        }
        "auto" => Ok(tch::Device::cuda_if_available()),
        other => anyhow::bail!("--device {other}: expected cpu, cuda or auto"),
    }
}

#[cfg(test)]
mod tests {
    use super::cuda_index;

    #[test]
    fn ranks_share_devices_only_when_staged() {
        assert_eq!(cuda_index(1, 2, false).unwrap(), 1);
        assert_eq!(cuda_index(1, 1, true).unwrap(), 0);
        assert_eq!(cuda_index(5, 2, true).unwrap(), 1);
        let e = cuda_index(1, 1, false).unwrap_err().to_string();
        assert!(e.contains("local rank 1 needs cuda:1, but this node shows 1 CUDA device(s)") && e.contains("GLM_COMM_BACKEND=host-staged"), "{e}");
        assert!(cuda_index(0, 0, true).is_err(), "no device to share");
    }
}
