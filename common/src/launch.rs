//! The contract between `glm-launch` and the workers it starts: the
//! environment it sets and forwards, and `.glm_env` files (like DeepSpeed's
//! `.deepspeed_env`).

use std::path::Path;

use crate::error::{Error, Result};

/// Set for every worker by `glm-launch` (which writes each rank's output to
/// its log and shows rank 0's on the console unless `--all-ranks-output`):
/// every rank prints. Without it (plain mpirun/srun) only rank 0 prints its
/// progress; every rank's errors always show.
pub const ALL_RANKS_OUTPUT: &str = "GLM_ALL_RANKS_OUTPUT";

/// Set by `glm-launch` for every worker of one job, to a value unique to
/// the job: a stop signal finds the job's workers on a host by it.
pub const LAUNCH_ID: &str = "GLM_LAUNCH_ID";

/// Environment variables forwarded from the launcher to every worker: these
/// prefixes, and the exact names below.
pub const FORWARDED_PREFIXES: &[&str] = &["NCCL_", "CUDA_", "OMP_", "GLM_", "UCX_", "RUST_", "TORCH_"];
pub const FORWARDED_NAMES: &[&str] = &["LD_LIBRARY_PATH", "LIBTORCH", "PYTHONPATH", "PATH"];

/// The worker's choice of collective back end: `host-staged` stages every
/// collective through host memory, so ranks may share a GPU (the launcher's
/// preflight then accepts fewer GPUs than slots).
pub const COMM_BACKEND_VAR: &str = "GLM_COMM_BACKEND";

/// The name of the file whose `KEY=VALUE` lines are exported to every
/// worker, read from the home directory, then the working directory.
pub const ENV_FILE: &str = ".glm_env";

/// Whether `key` is forwarded from the launcher's environment.
pub fn forwarded(key: &str) -> bool {
    FORWARDED_NAMES.contains(&key) || FORWARDED_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// The `KEY=VALUE` lines of an env file (`#` comments and blank lines
/// skipped; a line without `=` or with a malformed key is an error naming
/// the file and line).
pub fn read_env_file(path: &Path) -> Result<Vec<(String, String)>> {
    let text = crate::text::read(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let t = t.strip_prefix("export ").unwrap_or(t);
        let (k, v) = t.split_once('=').ok_or_else(|| Error::parse(path, i + 1, 1, "expected KEY=VALUE"))?;
        let k = k.trim();
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || k.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(Error::parse(path, i + 1, 1, format!("`{k}` is not a variable name")));
        }
        let v = v.trim();
        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_files_and_forwarding() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(".glm_env");
        std::fs::write(&p, "# site settings\nNCCL_IB_DISABLE=1\nexport HF_TOKEN=\"secret\"\n\n").unwrap();
        assert_eq!(read_env_file(&p).unwrap(), vec![("NCCL_IB_DISABLE".into(), "1".into()), ("HF_TOKEN".into(), "secret".into())]);
        std::fs::write(&p, "A=1\nnot a line\n").unwrap();
        assert!(read_env_file(&p).unwrap_err().to_string().contains(".glm_env:2:1: expected KEY=VALUE"));
        std::fs::write(&p, "1A=2\n").unwrap();
        assert!(read_env_file(&p).unwrap_err().to_string().contains("`1A` is not a variable name"));
        assert!(
            forwarded("NCCL_DEBUG")
                && forwarded("OMP_NUM_THREADS")
                && forwarded("LD_LIBRARY_PATH")
                && !forwarded("HOME")
                && !forwarded("AWS_SECRET_ACCESS_KEY")
        );
    }
}
