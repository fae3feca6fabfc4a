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

/// Set by `glm-launch` for every worker: print a [`Heartbeat`] line to
/// stdout every this many seconds (the launcher reads them off each rank's
/// output, and names the ranks that stop making progress).
pub const HEARTBEAT_VAR: &str = "GLM_HEARTBEAT";

/// Set by `glm-launch` for every worker of an attempt: how many automatic
/// restarts came before it (0 for the first; torchrun's
/// `TORCHELASTIC_RESTART_COUNT`).
pub const RESTART_COUNT_VAR: &str = "GLM_RESTART_COUNT";

/// How long a rank may wait inside one collective before it stops the job
/// (`--collective-timeout`, configs.json `collective_timeout`): 10 minutes,
/// PyTorch's NCCL watchdog default.
pub const DEFAULT_COLLECTIVE_TIMEOUT_S: f64 = 600.0;

/// A `--collective-timeout` value: a positive number of seconds (the
/// worker's parser; glm-launch reads the same flag).
pub fn positive_seconds(v: &str) -> std::result::Result<f64, String> {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 => Ok(s),
        _ => Err(format!("{v}: expected a positive number of seconds")),
    }
}

/// The exit code of a rank that stopped because a collective passed its
/// deadline (`timeout(1)`'s code).
pub const EXIT_COLLECTIVE_TIMEOUT: i32 = 124;

/// Whether `dir` holds a checkpoint the worker can load: its `state.json`,
/// or tensor-parallel parts with the first part's (`mp_rank_00/state.json`).
/// The worker's loader, its save-directory check and glm-launch's restart
/// (which resumes what the worker will load) all ask this.
pub fn is_checkpoint_dir(dir: &Path) -> bool {
    dir.join("state.json").is_file() || dir.join("mp_rank_00").join("state.json").is_file()
}

/// What starts a heartbeat line.
pub const HEARTBEAT_TAG: &str = "glm-heartbeat:";

/// The phases a heartbeat names, in the order of the worker's
/// `runtime::progress::Phase`.
pub const PHASES: [&str; 12] =
    ["starting", "preparing-data", "building", "data", "forward", "backward", "optimizer", "evaluate", "save", "log", "done", "connecting"];

/// The phases of unbounded length, where glm-launch sets no progress
/// deadline (a frozen rank still shows there, by its silence): start-up,
/// rank 0 preparing the data while the others wait for it, building the
/// model and reading a checkpoint, writing one.
pub const UNBOUNDED_PHASES: [&str; 4] = ["starting", "preparing-data", "building", "save"];

/// Where a rank is: its iteration (the one it works on; 0 before the first),
/// its phase (`starting`, `data`, `forward`, `backward`, `optimizer`,
/// `evaluate`, `save`, ...), a count of work done (micro-batches, evaluation
/// batches, collectives: it moves while a long phase makes progress), and
/// the collective it waits in, if any.
#[derive(Clone, Debug, PartialEq)]
pub struct Heartbeat {
    pub iteration: u64,
    pub phase: String,
    pub ticks: u64,
    pub waiting: Option<Waiting>,
}

/// A collective a rank is inside: the operation, the group, and for how long.
#[derive(Clone, Debug, PartialEq)]
pub struct Waiting {
    pub op: String,
    pub group: String,
    pub secs: f64,
}

impl Heartbeat {
    /// `glm-heartbeat: iteration=12 phase=backward ticks=345 waiting=all_reduce@dp:3.2`
    pub fn line(&self) -> String {
        let mut s = format!("{HEARTBEAT_TAG} iteration={} phase={} ticks={}", self.iteration, self.phase, self.ticks);
        if let Some(w) = &self.waiting {
            s.push_str(&format!(" waiting={}@{}:{:.1}", w.op, w.group, w.secs));
        }
        s
    }

    /// The heartbeat a line carries (`None` for any other line).
    pub fn parse(line: &str) -> Option<Heartbeat> {
        let rest = line.trim().strip_prefix(HEARTBEAT_TAG)?;
        let (mut iteration, mut phase, mut ticks, mut waiting) = (None, None, 0, None);
        for field in rest.split_whitespace() {
            match field.split_once('=')? {
                ("iteration", v) => iteration = v.parse().ok(),
                ("phase", v) => phase = Some(v.to_string()),
                ("ticks", v) => ticks = v.parse().ok()?,
                ("waiting", v) => {
                    let (op, at) = v.split_once('@')?;
                    let (group, secs) = at.rsplit_once(':')?;
                    waiting = Some(Waiting { op: op.into(), group: group.into(), secs: secs.parse().ok()? });
                }
                _ => {}
            }
        }
        Some(Heartbeat { iteration: iteration?, phase: phase?, ticks, waiting })
    }
}

/// Environment variables forwarded from the launcher to every worker: these
/// prefixes, and the exact names below.
pub const FORWARDED_PREFIXES: &[&str] = &["NCCL_", "CUDA_", "OMP_", "GLM_", "UCX_", "RUST_", "TORCH_"];
pub const FORWARDED_NAMES: &[&str] = &["LD_LIBRARY_PATH", "LIBTORCH", "PYTHONPATH", "PATH"];

/// The variable that chooses how the workers' tensor collectives travel
/// (`CommBackend`).
pub const COMM_BACKEND_VAR: &str = "GLM_COMM_BACKEND";

/// How the workers' tensor collectives travel, as `GLM_COMM_BACKEND` says.
/// Part of the contract because host-staged ranks may share a GPU: the
/// launcher then accepts fewer GPUs than slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommBackend {
    /// CUDA tensors through NCCL, CPU tensors through MPI (unset, empty or
    /// `native`).
    Native,
    /// Every tensor through a host copy over MPI (`host-staged`).
    HostStaged,
}

impl CommBackend {
    /// The back end `value` of `GLM_COMM_BACKEND` names (`None`: unset); any
    /// other value is an error naming the variable.
    pub fn from_value(value: Option<&str>) -> Result<CommBackend> {
        match value.map(str::trim) {
            None | Some("" | "native") => Ok(CommBackend::Native),
            Some("host-staged") => Ok(CommBackend::HostStaged),
            Some(v) => {
                Err(Error::Config(format!("{COMM_BACKEND_VAR}={v}: expected native (the default: NCCL for CUDA tensors, MPI for CPU ones) or host-staged")))
            }
        }
    }

    /// This process's `GLM_COMM_BACKEND`.
    pub fn from_env() -> Result<CommBackend> {
        CommBackend::from_value(std::env::var(COMM_BACKEND_VAR).ok().as_deref())
    }

    /// The `GLM_COMM_BACKEND` of a job's environment.
    pub fn of_job(env: &[(String, String)]) -> Result<CommBackend> {
        CommBackend::from_value(env.iter().rev().find(|(k, _)| k == COMM_BACKEND_VAR).map(|(_, v)| v.as_str()))
    }
}

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
    #[test]
    fn the_comm_backend_is_chosen_by_name_only() {
        assert_eq!(CommBackend::from_value(None).unwrap(), CommBackend::Native);
        assert_eq!(CommBackend::from_value(Some("")).unwrap(), CommBackend::Native);
        assert_eq!(CommBackend::from_value(Some("native")).unwrap(), CommBackend::Native);
        assert_eq!(CommBackend::from_value(Some("host-staged")).unwrap(), CommBackend::HostStaged);
        let e = CommBackend::from_value(Some("nccl")).unwrap_err().to_string();
        assert!(e.contains("GLM_COMM_BACKEND=nccl: expected native"), "{e}");
        let job = [("GLM_COMM_BACKEND".to_string(), "host-staged".to_string())];
        assert_eq!(CommBackend::of_job(&job).unwrap(), CommBackend::HostStaged);
        assert_eq!(CommBackend::of_job(&[]).unwrap(), CommBackend::Native);
    }

    use super::*;

    #[test]
    fn every_unbounded_phase_is_a_phase() {
        assert!(UNBOUNDED_PHASES.iter().all(|p| PHASES.contains(p)));
    }

    #[test]
    fn heartbeats_read_back_what_they_write() {
        let h = Heartbeat {
            iteration: 12,
            phase: "backward".into(),
            ticks: 345,
            waiting: Some(Waiting { op: "all_reduce".into(), group: "dp".into(), secs: 3.25 }),
        };
        assert_eq!(h.line(), "glm-heartbeat: iteration=12 phase=backward ticks=345 waiting=all_reduce@dp:3.2");
        let back = Heartbeat::parse(&h.line()).unwrap();
        assert_eq!((back.iteration, back.phase.as_str(), back.waiting.unwrap().group), (12, "backward", "dp".to_string()));
        let idle = Heartbeat { iteration: 0, phase: "starting".into(), ticks: 0, waiting: None };
        assert_eq!(Heartbeat::parse(&idle.line()), Some(idle));
        assert_eq!(Heartbeat::parse("iteration 3 | loss 2"), None);
        assert_eq!(Heartbeat::parse("glm-heartbeat: phase=x"), None);
    }

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
