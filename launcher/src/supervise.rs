//! Runs the launch command and watches it: every worker's output line is
//! shown as `[host:rank] line` (rank 0's output and every rank's errors by
//! default; everything with `--all-ranks-output`) and written to the rank's
//! log file under the run directory; SIGINT/SIGTERM become a SIGTERM to the
//! local workers, which stop every rank after the same iteration with a
//! checkpoint (a second signal kills the MPI launcher's process group);
//! when the job fails, the report names the rank, its host and the cause.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};

static SIGNAL: AtomicI32 = AtomicI32::new(0);
static SIGNALS: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// The processes below `root` (by /proc) whose command name starts with
/// `name` (glm-worker's entry point execs `glm-worker-core`, whose name the
/// kernel cuts to 15 characters).
pub fn descendants(root: u32, name: &str) -> Vec<i32> {
    let mut parent_of: Vec<(i32, i32, String)> = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so split at the last ')'
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        let comm = head.split_once('(').map_or("", |(_, c)| c).to_string();
        let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse::<i32>().ok()) else { continue };
        parent_of.push((pid, ppid, comm));
    }
    let mut below = vec![root as i32];
    let mut i = 0;
    while i < below.len() {
        let p = below[i];
        below.extend(parent_of.iter().filter(|(_, pp, _)| *pp == p).map(|(c, _, _)| *c));
        i += 1;
    }
    let mut out: Vec<i32> = below[1..].iter().copied().filter(|c| parent_of.iter().any(|(p, _, comm)| p == c && comm.starts_with(name))).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// One line of the MPI launcher's output, attributed.
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    /// The rank that wrote it; `None` for the MPI launcher's own messages.
    pub rank: Option<usize>,
    pub stderr: bool,
    pub text: String,
}

/// How the MPI launcher tags each line with its rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tags {
    /// OpenMPI's `--tag-output`: `[job,rank]<stdout>:text`.
    OpenMpi,
    /// MPICH's `-prepend-rank`: `[rank] text`.
    Mpich,
    /// srun's `--label`: `rank: text`, the number right-aligned (stdout and
    /// stderr keep their own streams).
    Srun,
}

/// Parses one line of the launcher's output; lines without its tag are the
/// launcher's own.
pub fn parse_line(raw: &str, from_stderr: bool, tags: Tags) -> Line {
    match tags {
        Tags::OpenMpi | Tags::Mpich => {
            if let Some((tag, after)) = raw.strip_prefix('[').and_then(|r| r.split_once(']')) {
                match (tags, tag.split_once(',')) {
                    // OpenMPI: "1,3" then "<stdout>:" or "<stderr>:"
                    (Tags::OpenMpi, Some((_, r))) => {
                        if let Ok(rank) = r.parse::<usize>() {
                            for (stream, is_err) in [("<stdout>:", false), ("<stderr>:", true)] {
                                if let Some(text) = after.strip_prefix(stream) {
                                    return Line { rank: Some(rank), stderr: is_err, text: text.to_string() };
                                }
                            }
                        }
                    }
                    (Tags::Mpich, None) => {
                        if let Ok(rank) = tag.parse::<usize>() {
                            return Line { rank: Some(rank), stderr: from_stderr, text: after.strip_prefix(' ').unwrap_or(after).to_string() };
                        }
                    }
                    _ => {}
                }
            }
        }
        Tags::Srun => {
            if let Some((num, text)) = raw.trim_start().split_once(": ") {
                if !num.is_empty() && num.len() <= 7 && num.bytes().all(|b| b.is_ascii_digit()) {
                    if let Ok(rank) = num.parse::<usize>() {
                        return Line { rank: Some(rank), stderr: from_stderr, text: text.to_string() };
                    }
                }
            }
        }
    }
    Line { rank: None, stderr: from_stderr, text: raw.to_string() }
}

/// The failed rank and its exit code from OpenMPI's abort message
/// (`Process name: [[7493,1],1]` / `Exit code: 3`) or its signal message
/// (`process rank 1 with PID 42 on node h exited on signal 9`), or srun's
/// (`srun: error: h: task 1: Exited with exit code 3`, `... task 1: Killed`).
pub fn failed_rank(messages: &[String]) -> Option<(usize, String)> {
    // srun: a task that exited with a code is the cause; tasks killed by
    // --kill-on-bad-exit are collateral, named only when nothing else is
    let srun: Vec<(usize, String)> = messages.iter().filter_map(|m| srun_task(m.trim())).collect();
    if let Some(f) = srun.iter().find(|(_, c)| c.starts_with("exit code")).or_else(|| srun.first()) {
        return Some(f.clone());
    }
    let mut rank = None;
    for m in messages {
        let t = m.trim();
        if let Some(rest) = t.strip_prefix("Process name:") {
            rank = rest.trim().trim_start_matches('[').split(']').next().and_then(|s| s.split(',').nth(1)).and_then(|r| r.trim().parse::<usize>().ok());
        } else if let (Some(r), Some(code)) = (rank, t.strip_prefix("Exit code:")) {
            return Some((r, format!("exit code {}", code.trim())));
        } else if let Some(i) = t.find("process rank ") {
            let words: Vec<&str> = t[i + "process rank ".len()..].split_whitespace().collect();
            if let Some(r) = words.first().and_then(|w| w.parse::<usize>().ok()) {
                let sig = t.split("exited on signal ").nth(1).map(|s| format!("killed by signal {}", s.trim_end_matches('.')));
                return Some((r, sig.unwrap_or_else(|| "failed".into())));
            }
        }
    }
    rank.map(|r| (r, "failed".into()))
}

/// `srun: error: h: task 1: Exited with exit code 3` -> (1, "exit code 3").
fn srun_task(t: &str) -> Option<(usize, String)> {
    let rest = t.strip_prefix("srun: error:")?;
    let rest = &rest[rest.find(": task ")? + ": task ".len()..];
    let (r, what) = rest.split_once(": ")?;
    let r = r.parse::<usize>().ok()?;
    let what = what.trim();
    Some((r, what.strip_prefix("Exited with exit code ").map_or_else(|| format!("killed ({what})"), |c| format!("exit code {c}"))))
}

/// How the job ended.
pub struct Outcome {
    /// The exit code glm-launch returns.
    pub code: i32,
    /// What went wrong (none on success).
    pub report: Option<String>,
}

/// Runs `argv` (with `env` added to its environment), attributing output
/// to `hosts[rank]`, logging under `run_dir/logs`.
/// `stop_remote`, when given, reaches workers on other machines at the first
/// signal when none runs on this one (the ssh back end's connections).
pub fn run(
    argv: &[String],
    tags: Tags,
    env: &[(String, String)],
    hosts: &[String],
    run_dir: &Path,
    all_ranks: bool,
    stop_remote: Option<&(dyn Fn() -> usize + Send + Sync)>,
) -> Result<Outcome> {
    let logs = run_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("{}: cannot create the run's log directory", logs.display()))?;
    // SAFETY: the handler only stores to atomics.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // its own process group: a terminal's Ctrl-C reaches glm-launch
        // alone, which decides what the workers get
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {} (is it installed and on PATH?)", argv[0]))?;
    struct Shared {
        files: BTreeMap<Option<usize>, std::fs::File>,
        /// The MPI launcher's own messages.
        messages: Vec<String>,
        /// The last error-looking line of each rank.
        last_error: BTreeMap<usize, String>,
    }
    let shared = Arc::new(Mutex::new(Shared { files: BTreeMap::new(), messages: Vec::new(), last_error: BTreeMap::new() }));
    let hosts: Arc<Vec<String>> = Arc::new(hosts.to_vec());
    let tag = Path::new(&argv[0]).file_name().map_or_else(|| argv[0].clone(), |n| n.to_string_lossy().into_owned());
    let pump = |stream: Box<dyn std::io::Read + Send>, from_stderr: bool| {
        let (shared, hosts, logs, tag) = (shared.clone(), hosts.clone(), logs.clone(), tag.clone());
        std::thread::spawn(move || {
            // bytes, not UTF-8 lines: one bad byte from a rank must not stop
            // the reading (a closed pipe would kill the job)
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let raw = String::from_utf8_lossy(&buf);
                let raw = raw.trim_end_matches(['\n', '\r']);
                let line = parse_line(raw, from_stderr, tags);
                let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                let name = match line.rank {
                    Some(r) => format!("rank_{r:04}.log"),
                    None => "launcher.log".to_string(),
                };
                if let std::collections::btree_map::Entry::Vacant(e) = s.files.entry(line.rank) {
                    if let Ok(f) = std::fs::File::create(logs.join(&name)) {
                        e.insert(f);
                    }
                }
                if let Some(f) = s.files.get_mut(&line.rank) {
                    let _ = writeln!(f, "{}", line.text);
                }
                // printing may fail (a closed terminal, `| head`): keep reading
                match line.rank {
                    None => {
                        s.messages.push(line.text.clone());
                        let _ = writeln!(std::io::stderr(), "[{tag}] {}", line.text);
                    }
                    Some(r) => {
                        let host = hosts.get(r).map_or("?", |h| h.as_str());
                        let lower = line.text.to_lowercase();
                        if line.stderr && (lower.contains("error") || lower.contains("panicked")) {
                            s.last_error.insert(r, line.text.clone());
                        }
                        if all_ranks || r == 0 || line.stderr {
                            if line.stderr {
                                let _ = writeln!(std::io::stderr(), "[{host}:{r}] {}", line.text);
                            } else {
                                let _ = writeln!(std::io::stdout(), "[{host}:{r}] {}", line.text);
                            }
                        }
                    }
                }
            }
        })
    };
    let t_out = pump(Box::new(child.stdout.take().expect("piped")), false);
    let t_err = pump(Box::new(child.stderr.take().expect("piped")), true);
    let (mut forwarded, mut killed) = (0, false);
    let pid = child.id() as i32;
    let status = std::thread::scope(|sc| -> Result<std::process::ExitStatus> {
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            let n = SIGNALS.load(Ordering::SeqCst);
            if n > forwarded {
                forwarded = n;
                let what = if SIGNAL.load(Ordering::SeqCst) == libc::SIGINT { "Ctrl-C" } else { "SIGTERM" };
                if n >= 2 && !killed {
                    killed = true;
                    eprintln!("glm-launch: {what} again: killing the workers");
                    if tag == "srun" {
                        // srun's own termination: two SIGINTs within a second
                        // kill the step's tasks on every node (SIGKILL to
                        // srun would leave them running)
                        // SAFETY: signalling our own child.
                        unsafe { libc::kill(pid, libc::SIGINT) };
                        std::thread::sleep(Duration::from_millis(100));
                        unsafe { libc::kill(pid, libc::SIGINT) };
                    } else {
                        // SAFETY: signalling our own child's process group.
                        unsafe { libc::killpg(pid, libc::SIGKILL) };
                    }
                } else if n == 1 {
                    // The workers agree on a stop over the whole world (any
                    // rank's signal stops every rank after the same iteration,
                    // with a checkpoint when saving is configured): SIGTERM to
                    // the local ones is enough. mpirun itself would SIGKILL the
                    // ranks 1 s after forwarding a SIGTERM, before they can save.
                    let local = descendants(pid as u32, "glm-worker");
                    if !local.is_empty() {
                        eprintln!(
                            "glm-launch: {what} received: SIGTERM to {} local worker(s); every rank stops after the current iteration (saving a checkpoint when configured); a second signal kills",
                            local.len()
                        );
                        for w in local {
                            // SAFETY: a process we started (a descendant of our child).
                            unsafe { libc::kill(w, libc::SIGTERM) };
                        }
                    } else {
                        let tag = tag.clone();
                        // on its own thread: the remote search must not hold up a second signal
                        sc.spawn(move || {
                            let remote = stop_remote.map_or(0, |f| f());
                            if remote > 0 {
                                eprintln!("glm-launch: {what} received: SIGTERM to the workers on {remote} host(s) over SSH; every rank stops after the current iteration (saving a checkpoint when configured); a second signal kills");
                            } else {
                                eprintln!("glm-launch: {what} received: no worker on this machine; SIGTERM to {tag}, which passes it to every worker (a second signal kills)");
                                // SAFETY: signalling our own child.
                                unsafe { libc::kill(pid, libc::SIGTERM) };
                            }
                        });
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })?;
    let _ = (t_out.join(), t_err.join());
    let s = shared.lock().unwrap_or_else(|e| e.into_inner());
    if status.success() {
        return Ok(Outcome { code: 0, report: None });
    }
    let code = status.code().unwrap_or(1).max(1);
    let sig = SIGNAL.load(Ordering::SeqCst);
    let report = match failed_rank(&s.messages) {
        _ if sig != 0 => format!("stopped by signal {sig} (forwarded to every worker)"),
        Some((r, cause)) => {
            let host = hosts.get(r).map_or("?", |h| h.as_str());
            let detail = s.last_error.get(&r).map(|e| format!(": {e}")).unwrap_or_default();
            format!("rank {r} on {host} {cause}{detail}; every other worker was stopped")
        }
        None => {
            let ranks: Vec<String> =
                s.last_error.iter().map(|(r, e)| format!("rank {r} on {} failed: {e}", hosts.get(*r).map_or("?", |h| h.as_str()))).collect();
            if ranks.is_empty() {
                format!("the job failed ({} exited with {code}); see {}", argv[0], logs.display())
            } else {
                format!("{} ({} exited with {code}); every other worker was stopped", ranks.join("; "), argv[0])
            }
        }
    };
    Ok(Outcome { code: if sig != 0 && code == 1 { 128 + sig } else { code }, report: Some(report) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_of_openmpi_and_mpich() {
        let o = Tags::OpenMpi;
        assert_eq!(parse_line("[1,3]<stderr>:glm-worker: error: x", false, o), Line { rank: Some(3), stderr: true, text: "glm-worker: error: x".into() });
        assert_eq!(parse_line("[1,0]<stdout>: iteration 1", true, o), Line { rank: Some(0), stderr: false, text: " iteration 1".into() });
        assert_eq!(parse_line("[2] hello", false, Tags::Mpich), Line { rank: Some(2), stderr: false, text: "hello".into() });
        assert_eq!(parse_line("[2] hello", false, o).rank, None, "MPICH's tag is not OpenMPI's");
        assert_eq!(parse_line("[vm:1234] MCA warning", true, o).rank, None);
        assert_eq!(parse_line("plain", true, o), Line { rank: None, stderr: true, text: "plain".into() });
        assert_eq!(parse_line(" 3: iteration 5", false, Tags::Srun), Line { rank: Some(3), stderr: false, text: "iteration 5".into() });
        assert_eq!(parse_line("   3: at src/main.rs:12", true, o).rank, None, "a number-colon line is srun's tag only under srun");
        assert_eq!(parse_line("srun: error: x", true, Tags::Srun).rank, None);
    }

    #[test]
    fn the_failed_rank_from_openmpis_messages() {
        let abort: Vec<String> = "mpirun detected that one or more processes exited with non-zero status\n  Process name: [[7493,1],1]\n  Exit code:    3\n"
            .lines()
            .map(String::from)
            .collect();
        assert_eq!(failed_rank(&abort), Some((1, "exit code 3".into())));
        let killed = vec!["mpirun noticed that process rank 2 with PID 4242 on node vm exited on signal 9 (Killed).".to_string()];
        assert_eq!(failed_rank(&killed), Some((2, "killed by signal 9 (Killed)".into())));
        assert_eq!(failed_rank(&["nothing".to_string()]), None);
        let srun = vec!["srun: error: vm: task 1: Exited with exit code 3".to_string()];
        assert_eq!(failed_rank(&srun), Some((1, "exit code 3".into())));
        assert_eq!(failed_rank(&["srun: error: node7: task 12: Killed".to_string()]), Some((12, "killed (Killed)".into())));
        let collateral = vec!["srun: error: a: task 0: Killed".to_string(), "srun: error: b: task 5: Exited with exit code 2".to_string()];
        assert_eq!(failed_rank(&collateral), Some((5, "exit code 2".into())));
    }
}
