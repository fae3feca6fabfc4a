//! What the launcher's integration tests share.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Holds an exclusive lock named `name` while the returned file lives: the
/// tests that build machine-wide fixtures (network namespaces, a Slurm
/// cluster with fixed ports) never overlap, even across test runs.
pub fn exclusive(name: &str) -> std::fs::File {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(std::env::temp_dir().join(format!("{name}.lock"))).unwrap();
    // SAFETY: a valid descriptor of an open file.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) }, 0, "lock {name}");
    f
}

/// Runs `cmd` to its end, or kills it after `secs` and returns `None` (a
/// hung launcher must fail the test, not hang it).
pub fn output_within(cmd: &mut std::process::Command, secs: u64) -> Option<Output> {
    use std::io::Read;
    let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut pipes = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = pipes.0.read_to_end(&mut b);
        b
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = pipes.1.read_to_end(&mut b);
        b
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    Some(Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() })
}

/// `program`'s place on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(program)).find(|p| p.is_file()))
}

pub fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// The tiny training job the real-worker tests launch: glm-worker
/// (built by the workspace), the first 300 records of the default corpus,
/// DeepSpeed config `ds_json`, every file under `dir`. Returns the worker's path and the worker arguments before the
/// run-specific `--set`s.
pub fn tiny_job(dir: &Path, ds_json: &str) -> (PathBuf, Vec<String>) {
    let worker = repo().join("target/release/glm-worker");
    assert!(worker.is_file(), "{}: build the workspace first (scripts/test.sh does)", worker.display());
    let corpus = repo().join("glm_pretrain/data/data.json");
    assert!(corpus.is_file(), "{}: scripts/setup.sh builds it", corpus.display());
    let docs: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&corpus).unwrap()).unwrap();
    let small = dir.join("corpus.json");
    std::fs::write(&small, serde_json::to_string(&docs[..300]).unwrap()).unwrap();
    let ds = dir.join("ds.json");
    std::fs::write(&ds, ds_json).unwrap();
    let mut a: Vec<String> =
        ["--config", &ds.display().to_string(), "--args", "configs/configs_tiny.json", "--device", "cpu", "--vocab-size", "1200"].map(String::from).to_vec();
    a.extend(["--store".to_string(), dir.join("store").display().to_string(), "--tokenizer-cache".into(), dir.join("model").display().to_string()]);
    // save=null first: configs_tiny.json saves into the checkout's
    // glm_pretrain/model/checkpoints/glm-tiny, which no test may touch
    for s in [
        "save=null", "num_layers=2", "hidden_size=64", "num_attention_heads=2", "seq_length=64", "max_position_embeddings=64", "log_interval=1",
        "eval_interval=0",
    ] {
        a.extend(["--set".to_string(), s.to_string()]);
    }
    a.extend(["--set".to_string(), format!("train_data={}", small.display())]);
    (worker, a)
}

fn netns_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/netns_hosts.sh")
}

/// Test hosts node1..nodeN (`tests/fixtures/netns_hosts.sh`: network
/// namespaces on a bridge, each with its own hostname and OpenSSH server);
/// taken down (servers, namespaces, links) when dropped. One set at a time
/// on the machine (a lock).
pub struct Hosts {
    dir: PathBuf,
    _lock: std::fs::File,
}

impl Hosts {
    pub fn up(dir: &Path, n: usize) -> Hosts {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "the test hosts are network namespaces: run the test as root (CI does)");
        assert!(Path::new("/usr/sbin/sshd").is_file(), "/usr/sbin/sshd missing: scripts/setup.sh installs openssh-server");
        let _lock = exclusive("glm-launch-netns-test");
        let o = std::process::Command::new(netns_fixture()).args(["up", &dir.display().to_string(), &n.to_string()]).output().unwrap();
        let hosts = Hosts { dir: dir.to_path_buf(), _lock };
        assert!(o.status.success(), "test hosts: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        hosts
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = std::process::Command::new(netns_fixture()).args(["down", &self.dir.display().to_string()]).output();
    }
}

/// A started command whose output is read as it comes (a full pipe never
/// holds it up while the test waits for something else).
pub struct Running {
    child: std::process::Child,
    out: std::thread::JoinHandle<Vec<u8>>,
    err: std::thread::JoinHandle<Vec<u8>>,
}

/// Starts `cmd` with its stdout and stderr read by threads.
pub fn start(cmd: &mut std::process::Command) -> Running {
    use std::io::Read;
    let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = r.read_to_end(&mut b);
            b
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    Running { child, out, err }
}

impl Running {
    /// Waits for the end (the test's own deadline is the caller's).
    pub fn finish(mut self) -> Output {
        let status = self.child.wait().unwrap();
        Output { status, stdout: self.out.join().unwrap(), stderr: self.err.join().unwrap() }
    }
}
