//! Runs the launch command and watches it: every worker's output line is
//! shown as `[host:rank] line` (rank 0's output and every rank's errors by
//! default; everything with `--all-ranks-output`) and written to the rank's
//! log file under the run directory; SIGINT/SIGTERM become a SIGTERM to the
//! local workers, which stop every rank after the same iteration with a
//! checkpoint (a second signal kills the MPI launcher's process group);
//! when the job fails, the report names the rank, its host and the cause.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use glm_common::launch::Heartbeat;

use crate::progress::{describe_all, Ranks, Stalled};
pub use crate::tagged::{parse_line, Tags};

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

/// The rank that failed the job, as the MPI launcher's messages name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failed {
    pub rank: usize,
    /// "exit code 3", "killed by signal 9 (Killed)", ...
    pub cause: String,
    /// The node the launcher's message names, when it names one.
    pub node: Option<String>,
}

/// The rank of an OpenMPI process name `[[jobfamily,job],vpid]`: its last
/// field (the vpid is the rank in `MPI_COMM_WORLD`); `None` for anything
/// else, and for job 0 (OpenMPI's daemons, whose vpid is no rank).
fn openmpi_rank(name: &str) -> Option<usize> {
    let inner = name.trim().strip_prefix("[[")?.strip_suffix(']')?;
    let (job, vpid) = inner.split_once("],")?;
    let (_, local_job) = job.split_once(',')?;
    (local_job.trim().parse::<u32>().ok()? != 0).then_some(())?;
    vpid.trim().parse().ok()
}

/// The failed rank from OpenMPI 4.1's messages, or srun's:
/// - a non-zero exit (`mpirun detected that one or more processes exited
///   with non-zero status ...` / `  Process name: [[9516,1],0]` /
///   `  Exit code:    3`): rank 0, exit code 3; OpenMPI names no node here
///   (its other `Process name:` messages follow with `  Node: X`);
/// - a signal (`mpirun noticed that process rank 3 with PID 0 on node vm
///   exited on signal 9 (Killed).`), and the messages of the same form for
///   a rank that called abort or exited without finalizing, where the
///   node may stand at the start of the next line (`... with PID 42 on` /
///   `node vm exiting improperly. ...`);
/// - srun's `srun: error: h: task 1: Exited with exit code 3` (`... task
///   1: Killed`), which names the node first.
pub fn failed_rank(messages: &[String]) -> Option<Failed> {
    // srun: a task that exited with a code is the cause; tasks killed by
    // --kill-on-bad-exit are collateral, named only when nothing else is
    let srun: Vec<Failed> = messages.iter().filter_map(|m| srun_task(m.trim())).collect();
    if let Some(f) = srun.iter().find(|f| f.cause.starts_with("exit code")).or_else(|| srun.first()) {
        return Some(f.clone());
    }
    let mut named: Option<Failed> = None;
    for (i, m) in messages.iter().enumerate() {
        let t = m.trim();
        if let Some(rest) = t.strip_prefix("Process name:") {
            if let Some(rank) = openmpi_rank(rest) {
                named = Some(Failed { rank, cause: "failed".into(), node: None });
            }
        } else if let (Some(f), Some(node)) = (named.as_mut(), t.strip_prefix("Node:")) {
            f.node = Some(node.trim().to_string()).filter(|n| !n.is_empty());
        } else if let (Some(mut f), Some(code)) = (named.clone(), t.strip_prefix("Exit code:")) {
            f.cause = format!("exit code {}", code.trim());
            return Some(f);
        } else if let Some(at) = t.find("process rank ") {
            let words: Vec<&str> = t[at + "process rank ".len()..].split_whitespace().collect();
            let Some(rank) = words.first().and_then(|w| w.parse::<usize>().ok()) else { continue };
            // "... with PID 42 on node vm exited on signal 9 (Killed)." on one
            // line, or "... on" / "node vm exiting improperly" over two
            let mut text = t.to_string();
            if t.ends_with(" on") {
                if let Some(next) = messages.get(i + 1) {
                    text = format!("{t} {}", next.trim());
                }
            }
            let node = text.split(" on node ").nth(1).and_then(|r| r.split_whitespace().next()).map(|n| n.trim_end_matches(['.', ',']).to_string());
            let cause = if let Some(sig) = text.split("exited on signal ").nth(1) {
                format!("killed by signal {}", sig.trim().trim_end_matches('.'))
            } else if text.contains("calling \"abort\"") {
                "called abort".to_string()
            } else if text.contains("exiting improperly") {
                "exited without finalizing MPI".to_string()
            } else {
                "failed".to_string()
            };
            return Some(Failed { rank, cause, node });
        }
    }
    named
}

/// `srun: error: h: task 1: Exited with exit code 3` -> rank 1, "exit code 3", node h.
fn srun_task(t: &str) -> Option<Failed> {
    let rest = t.strip_prefix("srun: error:")?;
    let at = rest.find(": task ")?;
    let node = rest[..at].trim().to_string();
    let rest = &rest[at + ": task ".len()..];
    let (r, what) = rest.split_once(": ")?;
    let rank = r.parse::<usize>().ok()?;
    let what = what.trim();
    let cause = what.strip_prefix("Exited with exit code ").map_or_else(|| format!("killed ({what})"), |c| format!("exit code {c}"));
    Some(Failed { rank, cause, node: Some(node).filter(|n| !n.is_empty()) })
}

/// Where `f` ran: the host the placement gives its rank (as the hostfile
/// names it), with the node the MPI launcher named when that differs
/// (`localhost (node vm)`); the launcher's node alone when the rank is
/// beyond the placement; `?` when neither knows.
fn failed_host(f: &Failed, hosts: &[String]) -> String {
    match (hosts.get(f.rank), &f.node) {
        (Some(h), Some(n)) if h != n => format!("{h} (node {n})"),
        (Some(h), _) => h.clone(),
        (None, Some(n)) => n.clone(),
        (None, None) => "?".into(),
    }
}

/// How the job ended.
pub struct Outcome {
    /// The exit code glm-launch returns.
    pub code: i32,
    /// What went wrong (none on success).
    pub report: Option<String>,
    /// What went wrong, for the restart policy (none on success).
    pub failure: Option<Failure>,
    /// A stop signal (SIGINT/SIGTERM) reached glm-launch: never restarted.
    pub signalled: bool,
}

/// A failed job, as the restart policy reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// "exit code 3", "killed by signal 9 (Killed)", "collective timeout",
    /// "no progress", "failed".
    pub cause: String,
    /// The rank that failed (or held the job up), and its host.
    pub rank: Option<usize>,
    pub host: Option<String>,
    /// The furthest iteration a rank reached (0: none trained).
    pub iteration: u64,
}

/// The progress deadline glm-launch watches (from the heartbeats it asks
/// the workers for).
#[derive(Clone, Copy, Debug)]
pub struct Watch {
    /// The workers' collective timeout.
    pub timeout: Duration,
    /// How often each worker sends a heartbeat.
    pub interval: Duration,
}

impl Watch {
    /// For collective timeout `timeout`: a heartbeat every tenth of it
    /// (between 0.5 and 10 s).
    pub fn new(timeout: Duration) -> Watch {
        Watch { timeout, interval: (timeout / 10).clamp(Duration::from_millis(500), Duration::from_secs(10)) }
    }

    /// How long a job may go without progress before glm-launch stops it:
    /// the timeout, and time for the workers' own watchdog to act first.
    pub fn deadline(&self) -> Duration {
        self.timeout + (self.interval * 3).max(Duration::from_secs(10))
    }
}

/// (state, process group, start time) of a process, from /proc.
pub(crate) fn proc_stat(pid: i32) -> Option<(char, i32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some((rest.first()?.chars().next()?, rest.get(2)?.parse().ok()?, rest.get(19)?.parse().ok()?))
}

/// Stops `child` (the leader of its own process group) and everything it
/// started: SIGTERM to it (mpirun then stops its ranks and its daemons on
/// other hosts) and to every process group below it (OpenMPI puts each
/// local rank in its own), each continued first (a frozen rank handles it
/// only then); SIGKILL to whatever is left after `grace`.
pub fn stop_tree(child: &mut std::process::Child, grace: Duration) {
    let pid = child.id() as i32;
    // SAFETY: getpgrp has no preconditions.
    let ours = unsafe { libc::getpgrp() };
    let below: Vec<(i32, u64)> = descendants(pid as u32, "").into_iter().filter_map(|p| proc_stat(p).map(|(_, _, t)| (p, t))).collect();
    let groups: BTreeSet<i32> = below.iter().filter_map(|&(p, _)| proc_stat(p).map(|(_, g, _)| g)).chain([pid]).filter(|&g| g != ours && g > 0).collect();
    let alive = |(p, t): (i32, u64)| proc_stat(p).is_some_and(|(s, _, start)| start == t && s != 'Z');
    for &g in &groups {
        // SAFETY: process groups of processes we started (a stopped rank
        // handles SIGTERM only once continued).
        unsafe {
            libc::killpg(g, libc::SIGCONT);
            libc::killpg(g, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    loop {
        let gone = child.try_wait().ok().flatten().is_some();
        if gone && !below.iter().any(|&p| alive(p)) {
            break;
        }
        if Instant::now() > deadline {
            for &g in &groups {
                // SAFETY: as above.
                unsafe { libc::killpg(g, libc::SIGKILL) };
            }
            for &(p, t) in &below {
                if alive((p, t)) {
                    // SAFETY: a process we started (its start time checked).
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `argv` with `env` added, its output piped, in its own process
/// group: a terminal's Ctrl-C reaches glm-launch alone, which decides what
/// the MPI launcher and the workers get.
pub fn spawn_group(argv: &[String], env: &[(String, String)]) -> std::io::Result<std::process::Child> {
    Command::new(&argv[0])
        .args(&argv[1..])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
}

/// How `run` watches the job.
pub struct Options<'a> {
    /// Show every rank's output (else rank 0's, and every rank's errors).
    pub all_ranks: bool,
    /// When given, reaches workers on other machines at the first signal
    /// when none runs on this one (the ssh back end's connections).
    pub stop_remote: Option<&'a (dyn Fn() -> usize + Send + Sync)>,
    /// The progress deadline, when the workers send heartbeats.
    pub watch: Option<Watch>,
}

/// Runs `argv` (with `env` added to its environment), attributing output
/// to `hosts[rank]`, logging under `run_dir/logs`.
pub fn run(argv: &[String], tags: Tags, env: &[(String, String)], hosts: &[String], run_dir: &Path, opts: Options) -> Result<Outcome> {
    let Options { all_ranks, stop_remote, watch } = opts;
    let logs = run_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("{}: cannot create the run's log directory", logs.display()))?;
    // SAFETY: the handler only stores to atomics.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut child = spawn_group(argv, env).with_context(|| format!("cannot start {} (is it installed and on PATH?)", argv[0]))?;
    struct Shared {
        files: BTreeMap<Option<usize>, std::fs::File>,
        /// The MPI launcher's own messages.
        messages: Vec<String>,
        /// The last error-looking line of each rank.
        last_error: BTreeMap<usize, String>,
        /// Every rank's last heartbeat.
        ranks: Ranks,
        /// The ranks that held the job up, when a rank's collective timed
        /// out (taken when its message arrived).
        hang: Option<(usize, Vec<Stalled>)>,
    }
    let shared =
        Arc::new(Mutex::new(Shared { files: BTreeMap::new(), messages: Vec::new(), last_error: BTreeMap::new(), ranks: Ranks::default(), hang: None }));
    let interval = watch.map_or(Duration::from_secs(10), |w| w.interval);
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
                if let Some(r) = line.rank {
                    if let Some(hb) = Heartbeat::parse(&line.text).filter(|_| !line.stderr) {
                        s.ranks.beat(r, hb, Instant::now());
                        continue;
                    }
                    if line.stderr && line.text.contains("collective timeout:") && s.hang.is_none() {
                        let stalled = s.ranks.stalled(Instant::now(), interval, interval);
                        s.hang = Some((r, stalled));
                    }
                }
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
    // whole lines: OpenMPI's tags cut a line a rank wrote in pieces
    let t_out = pump(Box::new(crate::tagged::Reader::new(child.stdout.take().expect("piped"), tags)), false);
    let t_err = pump(Box::new(crate::tagged::Reader::new(child.stderr.take().expect("piped"), tags)), true);
    let (mut forwarded, mut killed) = (0, false);
    let pid = child.id() as i32;
    // glm-launch's own deadline: the job stopped (no rank made progress, or
    // a rank went silent) and the workers' watchdog did not end it
    let mut stopped_hung: Option<(Vec<Stalled>, Instant)> = None;
    let mut warned = false;
    let status = std::thread::scope(|sc| -> Result<std::process::ExitStatus> {
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            if let Some(w) = watch {
                let now = Instant::now();
                let s = shared.lock().unwrap_or_else(|e| e.into_inner());
                let waiting = s.ranks.waiting(now, w.interval);
                let longest = waiting.iter().filter_map(|(_, h)| h.waiting.as_ref()).map(|x| x.secs).fold(0.0, f64::max);
                if !warned && longest > w.timeout.as_secs_f64() / 2.0 {
                    // half the deadline: say who holds the others up
                    warned = true;
                    let who = describe_all(&s.ranks.stalled(now, w.interval, w.interval), &hosts);
                    let (r0, h0) = &waiting[0];
                    let wt = h0.waiting.as_ref().expect("waiting");
                    eprintln!(
                        "glm-launch: warning: {} rank(s) wait in a collective (rank {r0}: {} on group {} for {:.0} s; the deadline is {:.0} s){}",
                        waiting.len(),
                        wt.op,
                        wt.group,
                        wt.secs,
                        w.timeout.as_secs_f64(),
                        if who.is_empty() { String::new() } else { format!("; holding them up: {who}") }
                    );
                } else if longest == 0.0 {
                    warned = false;
                }
                if stopped_hung.is_none() && s.ranks.hung(now, w.deadline(), hosts.len()) {
                    let stalled = s.ranks.stalled(now, w.interval, w.interval);
                    let who = describe_all(&stalled, &hosts);
                    eprintln!(
                        "glm-launch: no progress for {:.0} s ({}): stopping the job",
                        w.deadline().as_secs_f64(),
                        if who.is_empty() { "every rank" } else { who.as_str() }
                    );
                    stopped_hung = Some((stalled, now));
                    drop(s);
                    // mpirun and every rank below it (each in its own process
                    // group), continued, terminated, killed after 5 s
                    stop_tree(&mut child, Duration::from_secs(5));
                }
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
                        // mpirun's group and every rank's (OpenMPI gives each its own)
                        stop_tree(&mut child, Duration::ZERO);
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
    let sig = SIGNAL.load(Ordering::SeqCst);
    if status.success() && stopped_hung.is_none() {
        return Ok(Outcome { code: 0, report: None, failure: None, signalled: false });
    }
    let code = status.code().unwrap_or(1).max(1);
    let host_of = |r: usize| hosts.get(r).cloned().unwrap_or_else(|| "?".into());
    let iteration = s.ranks.max_iteration();
    let failure = |cause: String, rank: Option<usize>, host: Option<String>| Failure { cause, rank, host, iteration };
    let (report, failure) = match (failed_rank(&s.messages), &s.hang, &stopped_hung) {
        _ if sig != 0 => (format!("stopped by signal {sig} (forwarded to every worker)"), failure(format!("signal {sig}"), None, None)),
        // a hang: the ranks that held the job up, then who noticed
        (_, _, Some((stalled, _))) => {
            let who = describe_all(stalled, &hosts);
            let first = stalled.first().map(|x| x.rank);
            let report = format!(
                "the job made no progress for {:.0} s and glm-launch stopped it: {}",
                watch.map_or(0.0, |w| w.deadline().as_secs_f64()),
                if who.is_empty() { "no rank named itself" } else { who.as_str() }
            );
            (report, failure("no progress".into(), first, first.map(host_of)))
        }
        (_, Some((noticed, stalled)), _) => {
            let who = describe_all(stalled, &hosts);
            let first = stalled.first().map(|x| x.rank);
            let said = s.last_error.get(noticed).map(|e| e.trim_start_matches("glm-worker: error: ").to_string()).unwrap_or_default();
            let culprit = if who.is_empty() {
                "no rank stopped sending heartbeats: every rank waited in a collective (a collective called in a different order on some rank)"
            } else {
                who.as_str()
            };
            let report = format!("{culprit}; rank {noticed} on {} stopped the job: {said}", host_of(*noticed));
            (report, failure("collective timeout".into(), first.or(Some(*noticed)), Some(host_of(first.unwrap_or(*noticed)))))
        }
        (Some(f), None, None) => {
            let detail = s.last_error.get(&f.rank).map(|e| format!(": {e}")).unwrap_or_default();
            let host = failed_host(&f, &hosts);
            let report = format!("rank {} on {host} {}{detail}; every other worker was stopped", f.rank, f.cause);
            (report, failure(f.cause.clone(), Some(f.rank), Some(host)))
        }
        (None, None, None) => {
            let ranks: Vec<String> =
                s.last_error.iter().map(|(r, e)| format!("rank {r} on {} failed: {e}", hosts.get(*r).map_or("?", |h| h.as_str()))).collect();
            let first = s.last_error.keys().next().copied();
            let report = if ranks.is_empty() {
                format!("the job failed ({} exited with {code}); see {}", argv[0], logs.display())
            } else {
                format!("{} ({} exited with {code}); every other worker was stopped", ranks.join("; "), argv[0])
            };
            (report, failure("failed".into(), first, first.map(host_of)))
        }
    };
    let code = match (&stopped_hung, &s.hang) {
        _ if sig != 0 && code == 1 => 128 + sig,
        (Some(_), _) | (_, Some(_)) => glm_common::launch::EXIT_COLLECTIVE_TIMEOUT,
        _ => code,
    };
    Ok(Outcome { code, report: Some(report), failure: Some(failure), signalled: sig != 0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tagged::Line;

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

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(String::from).collect()
    }

    /// stderr of `mpirun --oversubscribe -np 4 bash -c 'if [ $OMPI_COMM_WORLD_RANK = 0 ]; then
    /// sleep 1; exit 3; fi; sleep 5'` (OpenMPI 4.1.4), as captured; ranks 1 and 3 below.
    const EXIT_RANK_0: &str = r#"--------------------------------------------------------------------------
Primary job  terminated normally, but 1 process returned
a non-zero exit code. Per user-direction, the job has been aborted.
--------------------------------------------------------------------------
--------------------------------------------------------------------------
mpirun detected that one or more processes exited with non-zero status, thus causing
the job to be terminated. The first process to do so was:

  Process name: [[13500,1],0]
  Exit code:    3
--------------------------------------------------------------------------
"#;
    const EXIT_RANK_1: &str = r#"--------------------------------------------------------------------------
Primary job  terminated normally, but 1 process returned
a non-zero exit code. Per user-direction, the job has been aborted.
--------------------------------------------------------------------------
--------------------------------------------------------------------------
mpirun detected that one or more processes exited with non-zero status, thus causing
the job to be terminated. The first process to do so was:

  Process name: [[13350,1],1]
  Exit code:    3
--------------------------------------------------------------------------
"#;
    const EXIT_RANK_3: &str = r#"--------------------------------------------------------------------------
Primary job  terminated normally, but 1 process returned
a non-zero exit code. Per user-direction, the job has been aborted.
--------------------------------------------------------------------------
--------------------------------------------------------------------------
mpirun detected that one or more processes exited with non-zero status, thus causing
the job to be terminated. The first process to do so was:

  Process name: [[13654,1],3]
  Exit code:    3
--------------------------------------------------------------------------
"#;
    /// The same with `kill -9 $$` on rank 3, and `kill -SEGV $$` on rank 0.
    const KILLED_RANK_3: &str = r#"--------------------------------------------------------------------------
Primary job  terminated normally, but 1 process returned
a non-zero exit code. Per user-direction, the job has been aborted.
--------------------------------------------------------------------------
--------------------------------------------------------------------------
mpirun noticed that process rank 3 with PID 0 on node vm exited on signal 9 (Killed).
--------------------------------------------------------------------------
"#;
    const SEGV_RANK_0: &str = r#"--------------------------------------------------------------------------
Primary job  terminated normally, but 1 process returned
a non-zero exit code. Per user-direction, the job has been aborted.
--------------------------------------------------------------------------
--------------------------------------------------------------------------
mpirun noticed that process rank 0 with PID 0 on node vm exited on signal 11 (Segmentation fault).
--------------------------------------------------------------------------
"#;

    fn failed(rank: usize, cause: &str, node: Option<&str>) -> Option<Failed> {
        Some(Failed { rank, cause: cause.into(), node: node.map(String::from) })
    }

    /// The rank is the process name's last field (`[[13500,1],0]` is rank
    /// 0, not 1: the middle field is OpenMPI's job number).
    #[test]
    fn the_failed_rank_from_openmpis_messages() {
        assert_eq!(failed_rank(&lines(EXIT_RANK_0)), failed(0, "exit code 3", None));
        assert_eq!(failed_rank(&lines(EXIT_RANK_1)), failed(1, "exit code 3", None));
        assert_eq!(failed_rank(&lines(EXIT_RANK_3)), failed(3, "exit code 3", None));
        assert_eq!(failed_rank(&lines(KILLED_RANK_3)), failed(3, "killed by signal 9 (Killed)", Some("vm")));
        assert_eq!(failed_rank(&lines(SEGV_RANK_0)), failed(0, "killed by signal 11 (Segmentation fault)", Some("vm")));
        // OpenMPI's help texts of the same forms (help-orterun.txt): a node
        // after the process name, and the rank/node message over two lines
        let mem = lines("A process exceeded memory limits:\n\n  Process name: [[7493,1],12]\n  Node:         gpu-node-3\n");
        assert_eq!(failed_rank(&mem), failed(12, "failed", Some("gpu-node-3")));
        let abort = lines("mpirun has exited due to process rank 5 with PID 4242 on\nnode gpu-node-1 calling \"abort\". This may have caused other processes");
        assert_eq!(failed_rank(&abort), failed(5, "called abort", Some("gpu-node-1")));
        let no_sync = lines("mpirun has exited due to process rank 2 with PID 77 on\nnode n2 exiting improperly. There are three reasons this could occur:");
        assert_eq!(failed_rank(&no_sync), failed(2, "exited without finalizing MPI", Some("n2")));
        // a daemon's name (job 0) is no rank
        assert_eq!(failed_rank(&lines("  Process name: [[7493,0],1]\n  Exit code:    3")), None);
        assert_eq!(failed_rank(&["nothing".to_string()]), None);
        let srun = vec!["srun: error: vm: task 1: Exited with exit code 3".to_string()];
        assert_eq!(failed_rank(&srun), failed(1, "exit code 3", Some("vm")));
        assert_eq!(failed_rank(&["srun: error: node7: task 12: Killed".to_string()]), failed(12, "killed (Killed)", Some("node7")));
        let collateral = vec!["srun: error: a: task 0: Killed".to_string(), "srun: error: b: task 5: Exited with exit code 2".to_string()];
        assert_eq!(failed_rank(&collateral), failed(5, "exit code 2", Some("b")));
    }

    #[test]
    fn the_failed_host_is_the_placements_with_the_launchers_node() {
        let hosts: Vec<String> = ["localhost", "localhost", "node-b"].map(String::from).to_vec();
        let f = |rank: usize, node: Option<&str>| failed_host(&failed(rank, "x", node).unwrap(), &hosts);
        assert_eq!(f(0, None), "localhost");
        assert_eq!(f(1, Some("vm")), "localhost (node vm)");
        assert_eq!(f(2, Some("node-b")), "node-b");
        assert_eq!(f(7, Some("vm")), "vm");
        assert_eq!(f(7, None), "?");
    }
}
