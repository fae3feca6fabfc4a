//! `glm-worker env`: libtorch, processor, device and NCCL facts, and free
//! disk space.

use std::path::PathBuf;

use anyhow::Result;
use glm_worker::runtime::{host, torch};

#[derive(clap::Args)]
pub struct EnvArgs {
    /// Also print the free disk space under this directory (its nearest existing ancestor)
    #[arg(long, value_name = "DIR")]
    disk: Option<PathBuf>,
}

pub fn env(a: EnvArgs) -> Result<()> {
    torch::load_cuda();
    for (k, v) in describe() {
        println!("{k:>18}: {v}");
    }
    if let Some(dir) = a.disk {
        match host::free_disk(&dir) {
            Some((bytes, at)) => println!("{:>18}: {bytes} {}", "free disk", at.display()),
            None => println!("{:>18}: ? {}", "free disk", dir.display()),
        }
    }
    Ok(())
}

/// Versions and devices as libtorch sees them.
fn describe() -> Vec<(String, String)> {
    let mut out = vec![
        ("glm-worker".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ("libtorch dir".into(), torch::libtorch_dir().unwrap_or_else(|| "?".into())),
        ("libtorch".into(), torch::version()),
        ("intra-op threads".into(), tch::get_num_threads().to_string()),
        ("cpu".into(), host::cpu_identity()),
        ("cpu kernels".into(), torch::cpu_kernels()),
        ("cuda available".into(), tch::Cuda::is_available().to_string()),
        ("cuda devices".into(), tch::Cuda::device_count().to_string()),
    ];
    // the memory glm-launch's plan check measures a job against: RAM and
    // swap (CPU ranks share it), and the first GPU's
    if let Some(m) = host::host_memory_bytes() {
        out.push(("host memory".into(), m.to_string()));
    }
    if tch::Cuda::device_count() > 0 {
        if let Some(m) = glm_worker::runtime::cuda::memory_total() {
            out.push(("gpu memory".into(), m.to_string()));
        }
    }
    out.push((
        "nccl".into(),
        match glm_worker::comm::nccl::describe() {
            Ok((path, v)) => format!("{v} ({path})"),
            Err(e) => format!("not available: {e}"),
        },
    ));
    let t = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
    out.push(("cpu tensor check".into(), format!("sum(1,2,3) = {}", t.sum(tch::Kind::Float).double_value(&[]))));
    out
}
