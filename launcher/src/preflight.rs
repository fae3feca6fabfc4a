//! The preflight: before anything trains, `glm-worker env` runs once on
//! every host with the job's environment and every GPU visible — through
//! the same MPI launcher (one app context per host), or over the `ssh`
//! back end's own connections — and the answers make one table: reachable,
//! the worker's version (the launcher's own), libtorch found, GPUs against
//! the selected slots, free disk under the save directory. A failing row
//! stops the launch with the table shown, before any worker starts
//! (DeepSpeed discovers a bad host only after the others have started).
//!
//! Each failure is said on the row of the host it belongs to: a host name
//! that does not resolve is found before mpirun runs (its whole job would
//! fail, and every row with it); a host mpirun's ssh cannot reach is named
//! from ssh's message, and the preflight runs again without it; the probe
//! around `glm-worker env` says when glm-worker is not there (and which
//! PATH or path it tried) and exits 0, so one host's failure does not make
//! mpirun stop the others before they answer. Ctrl-C or SIGTERM stops the
//! preflight's mpirun and everything it started, and glm-launch exits
//! 128 + the signal.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use glm_common::hostfile::Placement;
use glm_common::units::human_bytes;

use crate::supervise::{parse_line, Tags};

/// The probe's own lines start with this.
const PROBE: &str = "glm-launch probe";

/// What the preflight runs on every host: `worker env` (with `--disk DIR`)
/// inside a POSIX shell script that first checks the worker is there, and
/// says so on stdout when it is not (the name and the PATH searched, or
/// the path tried), reports a non-zero exit of the worker, and itself
/// exits 0.
pub fn probe(worker: &str, disk: Option<&Disk>) -> Vec<String> {
    // one line: every launcher passes it on as one argument
    let script = [
        "unset CUDA_VISIBLE_DEVICES".to_string(),
        "w=$1".into(),
        "shift".into(),
        format!(
            r#"case $w in */*) if [ ! -e "$w" ]; then echo "{PROBE}: missing file: $w"; exit 0; elif [ -d "$w" ] || [ ! -x "$w" ]; then echo "{PROBE}: not executable: $w"; exit 0; fi ;; *) if ! command -v "$w" >/dev/null 2>&1; then echo "{PROBE}: missing on PATH: $w"; echo "{PROBE}: PATH: $PATH"; exit 0; fi ;; esac"#
        ),
        r#""$w" "$@""#.into(),
        "rc=$?".into(),
        format!(r#"if [ $rc -ne 0 ]; then echo "{PROBE}: exit: $rc"; fi"#),
        "exit 0".into(),
    ]
    .join("; ");
    let mut argv: Vec<String> = vec!["sh".into(), "-c".into(), script, PROBE.replace(' ', "-"), worker.into(), "env".into()];
    if let Some(d) = disk {
        argv.extend(["--disk".to_string(), d.dir.display().to_string()]);
    }
    argv
}

/// glm-worker is not where the launch looks for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Missing {
    /// A bare name not found on the host's PATH (the one the probe had).
    OnPath { name: String, path: String },
    /// A path that does not exist there.
    File(String),
    /// A path that is there but cannot be run.
    NotExecutable(String),
}

impl Missing {
    fn describe(&self, host: &str) -> String {
        match self {
            Missing::OnPath { name, path } => {
                format!("glm-worker not found on {host}: no {name} on its PATH ({path}); install glm-worker there, or pass --worker with its path on {host}")
            }
            Missing::File(f) => format!("glm-worker not found on {host}: no file {f} there; pass --worker with its path on {host}, or install it at {f}"),
            Missing::NotExecutable(f) => format!("{f} on {host} is not an executable file (chmod +x it, or pass --worker with glm-worker's path on {host})"),
        }
    }
}

/// What one host reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub version: Option<String>,
    pub libtorch: Option<String>,
    pub gpus: Option<usize>,
    /// Free bytes under the save directory (when one is configured).
    pub free_disk: Option<u64>,
    /// RAM and swap, and the first GPU's memory (bytes).
    pub host_memory: Option<u64>,
    pub gpu_memory: Option<u64>,
    /// What the host wrote to stderr, as one message (its lines joined).
    pub error: Option<String>,
    /// The probe ran there (it wrote something).
    pub ran: bool,
    /// glm-worker is not there.
    pub missing: Option<Missing>,
    /// `glm-worker env`'s exit status, when not 0.
    pub exit: Option<i32>,
    /// Why the host could not be asked (its name does not resolve, ssh
    /// could not connect or log in): the row says NO.
    pub unreachable: Option<String>,
    /// Why the host was not asked although it may be fine (the preflight
    /// job failed before it ran there).
    pub not_checked: Option<String>,
}

impl Report {
    /// Takes in one line of `glm-worker env`'s (or the probe's) answer.
    fn take(&mut self, line: &str) {
        self.ran = true;
        if let Some(said) = line.trim().strip_prefix(PROBE).and_then(|r| r.strip_prefix(": ")) {
            let (k, v) = said.split_once(": ").unwrap_or((said, ""));
            let v = v.to_string();
            match k {
                "missing file" => self.missing = Some(Missing::File(v)),
                "not executable" => self.missing = Some(Missing::NotExecutable(v)),
                "missing on PATH" => self.missing = Some(Missing::OnPath { name: v, path: String::new() }),
                "PATH" => {
                    if let Some(Missing::OnPath { path, .. }) = &mut self.missing {
                        *path = v;
                    }
                }
                "exit" => self.exit = v.parse().ok(),
                _ => {}
            }
            return;
        }
        let Some((k, v)) = line.split_once(':') else { return };
        let (k, v) = (k.trim(), v.trim().to_string());
        match k {
            "glm-worker" => self.version = Some(v),
            "libtorch dir" => self.libtorch = Some(v),
            "cuda devices" => self.gpus = v.parse().ok(),
            "free disk" => self.free_disk = v.split_whitespace().next().and_then(|b| b.parse().ok()),
            "host memory" => self.host_memory = v.parse().ok(),
            "gpu memory" => self.gpu_memory = v.parse().ok(),
            _ => {}
        }
    }

    /// One host's answer (stdout, stderr), as the ssh back end collects it.
    pub fn from_answer(stdout: &str, stderr: &str) -> Report {
        let mut rep = Report { ran: true, ..Default::default() };
        stdout.lines().for_each(|l| rep.take(l));
        rep.error = one_message(stderr.lines());
        rep
    }

    fn answered(&self) -> bool {
        self.version.is_some() || self.libtorch.is_some() || self.gpus.is_some()
    }
}

/// A host's stderr as one line: its non-empty lines, trimmed, joined with
/// "; " (clap's error, a hint under an error), at most 6 of them.
fn one_message<'a>(lines: impl Iterator<Item = &'a str>) -> Option<String> {
    let lines: Vec<&str> = lines.map(str::trim).filter(|l| !l.is_empty()).collect();
    let more = if lines.len() > 6 { format!("; ... ({} more lines)", lines.len() - 6) } else { String::new() };
    (!lines.is_empty()).then(|| format!("{}{more}", lines[..lines.len().min(6)].join("; ")))
}

/// The save directory and how many bytes it needs free.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    pub dir: std::path::PathBuf,
    pub need: u64,
}

/// What every host must show: the launcher's version, a GPU per selected
/// slot when the workers train on CUDA (unless ranks may share GPUs), and
/// room for a checkpoint.
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    pub version: &'a str,
    pub wants_cuda: bool,
    /// The job runs on CPUs even where there are GPUs (`--device cpu`).
    pub cpu_only: bool,
    /// The job stages collectives through host memory
    /// (`GLM_COMM_BACKEND=host-staged`), so ranks may share GPUs.
    pub gpus_shared: bool,
    pub disk: Option<&'a Disk>,
}

/// Per-rank (= per-host) answers from the preflight's output (whole
/// lines: `tagged::Demux` has joined OpenMPI's pieces).
pub fn parse(stdout: &str, stderr: &str, tags: Tags) -> BTreeMap<usize, Report> {
    let mut out: BTreeMap<usize, Report> = BTreeMap::new();
    let mut said: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (raw, from_stderr) in stdout.lines().map(|l| (l, false)).chain(stderr.lines().map(|l| (l, true))) {
        let line = parse_line(raw, from_stderr, tags);
        let Some(r) = line.rank else { continue };
        let rep = out.entry(r).or_default();
        if line.stderr {
            rep.ran = true;
            said.entry(r).or_default().push(line.text);
        } else {
            rep.take(&line.text);
        }
    }
    for (r, lines) in said {
        out.entry(r).or_default().error = one_message(lines.iter().map(String::as_str));
    }
    out
}

/// The preflight's verdict: the table, and which hosts failed or were not
/// checked (indices into the placement).
#[derive(Clone, Debug, Default)]
pub struct Table {
    /// The header, one row per host, and any messages below.
    pub rows: Vec<String>,
    /// Every host passed (and nothing else failed).
    pub ok: bool,
    /// The hosts that failed a check.
    pub failed: Vec<usize>,
    /// The hosts the preflight could not ask (its job failed before).
    pub unchecked: Vec<usize>,
    /// The memory a rank has on the host that offers the least: a GPU's
    /// (shared by the ranks staging through host memory on one), or (CPU
    /// ranks) the host's RAM and swap shared by its slots; `None` when a
    /// host did not say.
    pub memory_per_rank: Option<u64>,
    /// The job runs on GPUs (on at least one host).
    pub on_gpus: bool,
}

/// The table's rows (host, verdict per column) and the verdict of each host.
pub fn table(placement: &Placement, reports: &BTreeMap<usize, Report>, expect: &Expect) -> Table {
    let Expect { version, wants_cuda, cpu_only, gpus_shared, disk } = *expect;
    let (mut ok, mut failed, mut unchecked) = (true, Vec::new(), Vec::new());
    let (mut memory, mut on_gpus): (Option<Option<u64>>, bool) = (None, false);
    let mut rows =
        vec![format!("  {:<24} {:<10} {:<16} {:<10} {:<22} {:<12} result", "host", "reachable", "glm-worker", "libtorch", "GPUs / slots", "free disk")];
    for (i, (host, slots)) in placement.hosts.iter().enumerate() {
        let got = reports.get(&i).cloned().unwrap_or_default();
        let rep = Some(&got).filter(|r| r.answered());
        let mut why = Vec::new();
        let reach = if got.unreachable.is_some() {
            "NO"
        } else if got.ran {
            "yes"
        } else {
            "?"
        };
        let said = got.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default();
        if let Some(u) = &got.unreachable {
            why.push(u.clone());
        } else if let Some(m) = &got.missing {
            why.push(m.describe(host));
        } else if rep.is_none() {
            why.push(match (got.exit, got.ran, &got.not_checked) {
                (Some(code), _, _) => format!("glm-worker env failed there (exit status {code}){said}"),
                (None, true, _) => format!("glm-worker env gave no answer{said}"),
                (None, false, Some(n)) => format!("not checked: {n}"),
                (None, false, None) => "no answer".to_string(),
            });
        }
        let ver = rep.and_then(|r| r.version.clone()).unwrap_or_else(|| "?".into());
        if rep.is_some() && ver != version {
            why.push(format!("glm-worker {ver}, the launcher is {version}"));
        }
        let torch = if rep.and_then(|r| r.libtorch.as_ref()).is_some_and(|d| d != "?" && !d.is_empty()) { "found" } else { "?" };
        if rep.is_some() && torch == "?" {
            why.push("libtorch not found".into());
        }
        let gpus = rep.and_then(|r| r.gpus);
        // the memory a rank of this host has: a GPU's where the job runs on
        // its GPUs (--device cuda, or auto and the host has some; ranks
        // staging through host memory may share one), else the host's
        // shared by its slots
        let on_gpu = !cpu_only && gpus.unwrap_or(0) > 0;
        let per_rank = rep.and_then(|r| match on_gpu {
            true => r.gpu_memory.map(|m| m / (slots.len() as u64).div_ceil(gpus.unwrap_or(1).max(1) as u64).max(1)),
            false => r.host_memory.map(|m| m / slots.len().max(1) as u64),
        });
        on_gpus |= on_gpu;
        memory = Some(match (memory, per_rank) {
            (None, m) => m,
            (Some(Some(a)), Some(b)) => Some(a.min(b)),
            _ => None,
        });
        let top = slots.iter().max().copied().unwrap_or(0);
        let g = match gpus {
            Some(0) => {
                if wants_cuda {
                    why.push("--device cuda, but the host reports no GPU".into());
                }
                format!("none (CPU) / {}", slots.len())
            }
            // CUDA_VISIBLE_DEVICES lists the slots: the workers see the GPUs
            // before the first slot that does not exist, so sharing needs
            // the first one to
            Some(n) if top >= n && gpus_shared && slots.first().is_some_and(|&s| s < n) => format!("{n} / {} shared", slots.len()),
            Some(n) => {
                if top >= n {
                    why.push(format!("slot {top} selected but the host has {n} GPU(s)"));
                }
                format!("{n} / {}", slots.len())
            }
            None => format!("? / {}", slots.len()),
        };
        let free = match (disk, rep.and_then(|r| r.free_disk)) {
            (None, _) => "-".to_string(),
            (Some(_), None) => "?".to_string(),
            (Some(d), Some(f)) => {
                if f < d.need {
                    why.push(format!("{} free under {}, a checkpoint needs about {}", human_bytes(f), d.dir.display(), human_bytes(d.need)));
                }
                human_bytes(f)
            }
        };
        let verdict = if why.is_empty() { "ok".to_string() } else { format!("FAIL: {}", why.join("; ")) };
        ok &= why.is_empty();
        match (why.is_empty(), got.not_checked.is_some() && !got.ran && got.unreachable.is_none()) {
            (true, _) => {}
            (false, true) => unchecked.push(i),
            (false, false) => failed.push(i),
        }
        rows.push(format!("  {host:<24} {reach:<10} {ver:<16} {torch:<10} {g:<22} {free:<12} {verdict}"));
    }
    Table { rows, ok, failed, unchecked, memory_per_rank: memory.flatten(), on_gpus }
}

/// How the preflight's command starts `glm-worker env` on some hosts (one
/// process each, rank i on host i): the MPI launcher's or srun's command
/// line for that placement.
pub type Launch<'a> = dyn Fn(&Placement) -> Result<Vec<String>, String> + 'a;

/// Runs the preflight through the MPI launcher (or srun); returns the table
/// and whether every host passed (with the launcher's own messages when
/// its job failed and no row says why).
pub fn run(command: &Launch, tags: Tags, env: &[(String, String)], placement: &Placement, expect: &Expect) -> Table {
    // a signal stops what the preflight started, and glm-launch
    let catch = Catch::new();
    let n = placement.hosts.len();
    let mut reports: BTreeMap<usize, Report> = BTreeMap::new();
    // OpenMPI's mpirun reaches other hosts with ssh: a name that does not
    // resolve would fail its whole job, so such hosts are left out of it
    let routes: Vec<Route> = if tags == Tags::OpenMpi {
        let agent = rsh_agent();
        let routes = routes(placement, agent.as_deref(), keep_fqdn());
        for (i, r) in routes.iter().enumerate() {
            if let Some(why) = &r.unresolvable {
                reports.insert(i, Report { unreachable: Some(why.clone()), ..Default::default() });
            }
        }
        routes
    } else {
        placement.hosts.iter().map(|(h, _)| Route { mpirun: h.clone(), ..Default::default() }).collect()
    };
    let mut todo: Vec<usize> = (0..n).filter(|i| !reports.contains_key(i)).collect();
    // the launcher's messages when its job failed and no row says why
    let mut unexplained: Option<(String, Vec<String>)> = None;
    while !todo.is_empty() {
        let some = Placement { hosts: todo.iter().map(|&i| (placement.hosts[i].0.clone(), vec![0])).collect() };
        let argv = match command(&some) {
            Ok(a) => a,
            Err(e) => {
                unexplained = Some(("glm-launch".into(), vec![e]));
                break;
            }
        };
        let (stdout, stderr, success) = match run_launcher(&argv, env, tags, &catch) {
            Ok(o) => o,
            Err(e) => {
                unexplained = Some((argv[0].clone(), vec![format!("cannot start {}: {e}", argv[0])]));
                break;
            }
        };
        let messages: Vec<String> =
            stdout.lines().chain(stderr.lines()).filter(|l| parse_line(l, true, tags).rank.is_none() && !l.trim().is_empty()).map(String::from).collect();
        for (r, rep) in parse(&stdout, &stderr, tags) {
            if let Some(&i) = todo.get(r) {
                reports.insert(i, rep);
            }
        }
        if success {
            break;
        }
        // the job failed before some hosts answered: the ones its messages
        // name are unreachable, and the others are asked again without them
        let silent: Vec<usize> = todo.iter().copied().filter(|i| !reports.get(i).is_some_and(|r| r.ran)).collect();
        let blamed = blame(&messages, &routes, placement, &silent);
        if blamed.is_empty() {
            unexplained = Some((argv[0].clone(), messages));
            break;
        }
        for (i, why) in &blamed {
            reports.insert(*i, Report { unreachable: Some(why.clone()), ..Default::default() });
        }
        todo = silent.into_iter().filter(|i| !blamed.contains_key(i)).collect();
    }
    if let Some((program, _)) = &unexplained {
        for i in 0..n {
            let r = reports.entry(i).or_default();
            if !r.ran && r.unreachable.is_none() {
                r.not_checked = Some(format!("the preflight job failed before it ran there ({program}'s messages below)"));
            }
        }
    }
    if let Some(sig) = catch.caught() {
        stopped(sig, "the preflight had ended");
    }
    drop(catch);
    let mut t = table(placement, &reports, expect);
    if let Some((program, messages)) = &unexplained {
        t.rows.push(format!("  the preflight job failed; {program}'s messages:"));
        t.rows.extend(messages.iter().take(20).map(|m| format!("    {m}")));
        t.ok = false;
    }
    t
}

/// How mpirun reaches one host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Route {
    /// The name mpirun uses: OpenMPI 4 cuts a host name at its first dot
    /// (not an address), unless `orte_keep_fqdn_hostnames` is set.
    pub mpirun: String,
    /// The address its ssh connects to (ssh's HostName for that name),
    /// when ssh is mpirun's agent and the host is not this machine.
    pub ssh: Option<String>,
    /// Why that does not resolve.
    pub unresolvable: Option<String>,
}

/// mpirun's remote-start agent when it is ssh: its command words (the
/// first of `plm_rsh_agent`'s alternatives found on PATH; OpenMPI's
/// default is `ssh : rsh`).
fn rsh_agent() -> Option<Vec<String>> {
    let agent = ["OMPI_MCA_plm_rsh_agent", "OMPI_MCA_orte_rsh_agent"].iter().find_map(|k| std::env::var(k).ok()).unwrap_or_else(|| "ssh : rsh".into());
    let words =
        agent.split(':').map(|a| a.split_whitespace().map(String::from).collect::<Vec<_>>()).find(|w| !w.is_empty() && crate::which(&w[0]).is_some())?;
    (std::path::Path::new(&words[0]).file_name()? == "ssh").then_some(words)
}

/// OpenMPI's `orte_keep_fqdn_hostnames`, from the environment.
fn keep_fqdn() -> bool {
    std::env::var("OMPI_MCA_orte_keep_fqdn_hostnames")
        .is_ok_and(|v| ["1", "true", "yes", "y", "t", "on", "enabled"].contains(&v.trim().to_lowercase().as_str()))
}

/// ssh's HostName and Port for `host` (`ssh -G`, with the agent's own
/// options: a `-F` config counts).
fn ssh_destination(agent: &[String], host: &str) -> Option<(String, u16)> {
    let o = Command::new(&agent[0]).args(&agent[1..]).args(["-G", host]).stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&o.stdout);
    let get = |k: &str| text.lines().find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()));
    Some((get("hostname ")?, get("port ").and_then(|p| p.parse().ok()).unwrap_or(22)))
}

fn resolves(host: &str, port: u16) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    match (host, port).to_socket_addrs().map(|a| a.count()) {
        Ok(0) => Err("no address".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string().trim_start_matches("failed to lookup address information: ").to_string()),
    }
}

/// Every host's route, and whether its name resolves where mpirun's ssh
/// needs it to (hosts on this machine are started without ssh; with
/// another agent than ssh nothing is checked). Looked up 32 at a time.
pub fn routes(placement: &Placement, agent: Option<&[String]>, keep_fqdn: bool) -> Vec<Route> {
    let one = |host: &str| -> Route {
        let short = if keep_fqdn || host.parse::<std::net::IpAddr>().is_ok() { host } else { host.split('.').next().unwrap_or(host) };
        let mut r = Route { mpirun: short.to_string(), ..Default::default() };
        let Some(agent) = agent.filter(|_| !crate::is_local(short) && !crate::is_local(host)) else { return r };
        let dest_of = |name: &str| ssh_destination(agent, name).unwrap_or_else(|| (name.to_string(), 22));
        let (dest, port) = dest_of(short);
        if let Err(e) = resolves(&dest, port) {
            // would the whole name have done?
            let whole = (short != host).then(|| dest_of(host)).is_some_and(|(d, p)| resolves(&d, p).is_ok());
            r.unresolvable = Some(if whole {
                format!(
                    "cannot resolve host name {short}: OpenMPI's mpirun cuts {host} at its first dot (set OMPI_MCA_orte_keep_fqdn_hostnames=1 to keep whole names)"
                )
            } else {
                let alias = if dest != short { format!(" (ssh's HostName for it: {dest})") } else { String::new() };
                format!("cannot resolve host name {host}{alias}: {e} (check the hostfile, DNS or /etc/hosts)")
            });
        }
        r.ssh = Some(dest);
        r
    };
    let hosts: Vec<&str> = placement.hosts.iter().map(|(h, _)| h.as_str()).collect();
    let mut out = Vec::with_capacity(hosts.len());
    for chunk in hosts.chunks(32) {
        std::thread::scope(|s| {
            let asks: Vec<_> = chunk.iter().map(|h| s.spawn(move || one(h))).collect();
            out.extend(asks.into_iter().zip(chunk).map(|(a, h)| a.join().unwrap_or_else(|_| Route { mpirun: h.to_string(), ..Default::default() })));
        });
    }
    out
}

/// A host named in one line of mpirun's messages (its ssh's, as ssh
/// writes them), and what to say about it.
fn ssh_failure(line: &str) -> Option<(String, String)> {
    let t = line.trim();
    let bare = |h: &str| {
        // [addr]:port -> addr
        let h = h.trim_end_matches([',', '.']);
        h.strip_prefix('[').and_then(|r| r.split_once(']')).map_or(h, |(a, _)| a).to_string()
    };
    if let Some(r) = t.strip_prefix("ssh: Could not resolve hostname ") {
        let (h, _) = r.split_once(':')?;
        return Some((bare(h), format!("mpirun's {t} (check the hostfile, DNS or /etc/hosts)")));
    }
    if let Some(r) = t.strip_prefix("ssh: connect to host ") {
        let (h, _) = r.split_once(" port ")?;
        return Some((bare(h), format!("mpirun's {t}")));
    }
    if let Some((who, _)) = t.split_once(": Permission denied") {
        let h = who.rsplit_once('@').map_or(who, |(_, h)| h);
        if !h.is_empty() && !h.contains(char::is_whitespace) {
            return Some((bare(h), format!("mpirun's ssh: {t} (mpirun logs in with ssh: `ssh {h}` must work without a password)")));
        }
    }
    // No ED25519 host key is known for [10.0.0.1]:2222 and you have requested strict checking.
    // Host key for 10.0.0.1 has changed and you have requested strict checking.
    let key = t.split_once("host key is known for ").map(|(_, r)| r).or_else(|| t.strip_prefix("Host key for "));
    if let Some(h) = key.and_then(|r| r.split_whitespace().next()) {
        return Some((bare(h), format!("mpirun's ssh: {t} (`ssh {}` once checks and records its key)", bare(h))));
    }
    None
}

/// The hosts among `silent` that mpirun's messages name as unreachable
/// (by the hostfile's name, the name mpirun uses, or ssh's address for it).
fn blame(messages: &[String], routes: &[Route], placement: &Placement, silent: &[usize]) -> BTreeMap<usize, String> {
    let mut out = BTreeMap::new();
    for (named, why) in messages.iter().filter_map(|m| ssh_failure(m)) {
        let named = named.to_lowercase();
        for &i in silent {
            let r = routes.get(i);
            let names = [Some(placement.hosts[i].0.as_str()), r.map(|r| r.mpirun.as_str()), r.and_then(|r| r.ssh.as_deref())];
            if names.into_iter().flatten().any(|n| n.to_lowercase() == named) {
                out.entry(i).or_insert_with(|| why.clone());
            }
        }
    }
    out
}

static STOP: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop(sig: libc::c_int) {
    STOP.store(sig, Ordering::SeqCst);
}

/// SIGINT and SIGTERM caught while it lives (the earlier dispositions
/// come back when it is dropped): the preflight stops what it started.
struct Catch {
    old: Vec<(libc::c_int, libc::sighandler_t)>,
}

impl Catch {
    fn new() -> Catch {
        STOP.store(0, Ordering::SeqCst);
        // SAFETY: the handler only stores to an atomic.
        let old = [libc::SIGINT, libc::SIGTERM].into_iter().map(|s| (s, unsafe { libc::signal(s, on_stop as *const () as libc::sighandler_t) })).collect();
        Catch { old }
    }

    /// The signal caught, if any.
    fn caught(&self) -> Option<i32> {
        Some(STOP.load(Ordering::SeqCst)).filter(|&s| s != 0)
    }
}

impl Drop for Catch {
    fn drop(&mut self) {
        for &(s, h) in &self.old {
            // SAFETY: restoring the disposition signal() returned.
            unsafe { libc::signal(s, h) };
        }
    }
}

/// glm-launch stops on a signal during the preflight: nothing was started.
fn stopped(sig: i32, what: &str) -> ! {
    use std::io::Write;
    let name = if sig == libc::SIGINT { "Ctrl-C" } else { "SIGTERM" };
    let _ = std::io::stdout().flush();
    eprintln!("glm-launch: {name} during the preflight: {what}; nothing was started");
    std::process::exit(128 + sig)
}

/// Runs the preflight's command in its own process group and collects
/// its output (whole lines: OpenMPI's pieces joined); a signal stops it
/// and everything it started, and glm-launch exits.
fn run_launcher(argv: &[String], env: &[(String, String)], tags: Tags, catch: &Catch) -> std::io::Result<(String, String, bool)> {
    if let Some(sig) = catch.caught() {
        stopped(sig, &format!("{} was not started", argv[0]));
    }
    let mut child = crate::supervise::spawn_group(argv, env)?;
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = r.read_to_end(&mut b);
            b
        })
    };
    let out = read(Box::new(child.stdout.take().expect("piped")));
    let err = read(Box::new(child.stderr.take().expect("piped")));
    let status = loop {
        if let Some(sig) = catch.caught() {
            crate::supervise::stop_tree(&mut child, Duration::from_secs(5));
            stopped(sig, &format!("stopped {} (pid {}) and everything it started", argv[0], child.id()));
        }
        if let Some(st) = child.try_wait()? {
            break st;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    if let Some(sig) = catch.caught() {
        stopped(sig, &format!("{} had ended", argv[0]));
    }
    let whole = |b: &[u8]| if tags == Tags::OpenMpi { crate::tagged::Demux::lines(b).join("\n") } else { String::from_utf8_lossy(b).into_owned() };
    Ok((whole(&out), whole(&err), status.success()))
}

/// The `ssh` back end's preflight: every host at once, each over its own
/// connection (host key checked, logged in), the probe fed as a script
/// with the job's environment, from the launcher's directory. This
/// machine (`local[i]`: mpirun starts its workers without SSH) is asked
/// directly. A signal ends it (the connections close with glm-launch; the
/// probes on this machine are stopped).
pub fn run_ssh(targets: &[crate::ssh::Target], local: &[bool], probe: &[String], env: &[(String, String)], placement: &Placement, expect: &Expect) -> Table {
    let catch = Catch::new();
    let cwd = std::env::current_dir().unwrap_or_default();
    let script = crate::ssh::script(env, &cwd, probe);
    // the probes on this machine (process groups), for a signal to stop
    let here_pids = std::sync::Mutex::new(Vec::<i32>::new());
    let here = || -> anyhow::Result<(i32, String, String)> {
        use std::io::Write;
        let mut c = Command::new("sh").arg("-s").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).spawn()?;
        here_pids.lock().unwrap_or_else(|e| e.into_inner()).push(c.id() as i32);
        c.stdin.take().expect("piped").write_all(script.as_bytes())?;
        let o = c.wait_with_output()?;
        Ok((o.status.code().unwrap_or(255), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned()))
    };
    let ask = |(t, local): (&crate::ssh::Target, bool)| -> Report {
        let answer = if local { here() } else { crate::ssh::run_script(t, &script, Duration::from_secs(120)) };
        match answer {
            Ok((code, out, err)) => {
                let mut rep = Report::from_answer(&out, &err);
                if code != 0 && rep.exit.is_none() {
                    rep.exit = Some(code);
                }
                rep
            }
            Err(e) => Report { unreachable: Some(format!("{e:#}")), ..Default::default() },
        }
    };
    let reports: BTreeMap<usize, Report> = std::thread::scope(|s| {
        let asks: Vec<_> = targets.iter().enumerate().map(|(i, t)| (i, s.spawn(move || ask((t, local.get(i).copied().unwrap_or(false)))))).collect();
        while !asks.iter().all(|(_, h)| h.is_finished()) {
            if let Some(sig) = catch.caught() {
                for &p in here_pids.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    // SAFETY: the process groups of the probes we started.
                    unsafe { libc::killpg(p, libc::SIGTERM) };
                }
                stopped(sig, "the preflight's SSH connections closed");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        asks.into_iter().map(|(i, h)| (i, h.join().unwrap_or_default())).collect()
    });
    if let Some(sig) = catch.caught() {
        stopped(sig, "the preflight had ended");
    }
    table(placement, &reports, expect)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect(wants_cuda: bool, disk: Option<&Disk>) -> Expect<'_> {
        Expect { version: "0.1.0", wants_cuda, cpu_only: false, gpus_shared: false, disk }
    }

    fn placement() -> Placement {
        Placement { hosts: vec![("a".into(), vec![0, 1]), ("b".into(), vec![2, 3]), ("c".into(), vec![0])] }
    }

    #[test]
    fn a_table_of_answers() {
        let out = "[1,0]<stdout>:        glm-worker: 0.1.0\n[1,0]<stdout>:      libtorch dir: /t\n[1,0]<stdout>:      cuda devices: 8\n\
                   [1,1]<stdout>:        glm-worker: 0.1.0\n[1,1]<stdout>:      libtorch dir: /t\n[1,1]<stdout>:      cuda devices: 2\n\
                   [1,2]<stderr>:glm-worker: error: libtorch not found\n[1,2]<stdout>:glm-launch probe: exit: 1\n";
        let Table { rows, ok, failed, unchecked, .. } = table(&placement(), &parse(out, "", Tags::OpenMpi), &expect(false, None));
        assert!(!ok && failed == [1, 2] && unchecked.is_empty(), "{failed:?} {unchecked:?}");
        assert!(rows[1].contains("8 / 2") && rows[1].ends_with("ok"), "{rows:?}");
        assert!(rows[2].contains("FAIL: slot 3 selected but the host has 2 GPU(s)"), "{rows:?}");
        assert!(
            rows[3].contains(" yes ") && rows[3].ends_with("FAIL: glm-worker env failed there (exit status 1): glm-worker: error: libtorch not found"),
            "{rows:?}"
        );
        // ranks staging collectives through host memory may share GPUs
        let shared = Expect { gpus_shared: true, ..expect(true, None) };
        let overlapping = Placement { hosts: vec![("a".into(), vec![0, 1]), ("b".into(), vec![1, 2]), ("c".into(), vec![0])] };
        let rows = table(&overlapping, &parse(out, "", Tags::OpenMpi), &shared).rows;
        assert!(rows[2].contains("2 / 2 shared") && !rows[2].contains("FAIL: slot"), "{rows:?}");
        // ... but not when no selected slot exists (the workers would see no GPU)
        let far = Placement { hosts: vec![("b".into(), vec![2, 3])] };
        let two = "[1,0]<stdout>: glm-worker: 0.1.0\n[1,0]<stdout>: libtorch dir: /t\n[1,0]<stdout>: cuda devices: 2\n";
        let Table { rows, ok, .. } = table(&far, &parse(two, "", Tags::OpenMpi), &shared);
        assert!(!ok && rows[1].contains("FAIL: slot 3 selected but the host has 2 GPU(s)"), "{rows:?}");
        let rows =
            table(&placement(), &parse("[1,2]<stdout>: glm-worker: 0.0.9\n[1,2]<stdout>: libtorch dir: ?\n", "", Tags::OpenMpi), &expect(false, None)).rows;
        assert!(rows[3].contains("glm-worker 0.0.9, the launcher is 0.1.0") && rows[3].contains("libtorch not found"), "{rows:?}");
        let cpu = "[1,0]<stdout>: glm-worker: 0.1.0\n[1,0]<stdout>: libtorch dir: /t\n[1,0]<stdout>: cuda devices: 0\n";
        let one = Placement { hosts: vec![("a".into(), vec![0])] };
        assert!(table(&one, &parse(cpu, "", Tags::OpenMpi), &expect(false, None)).ok);
        assert!(table(&one, &parse(cpu, "", Tags::OpenMpi), &expect(true, None)).rows[1].contains("--device cuda, but the host reports no GPU"));
        let disk = Disk { dir: "/ckpt".into(), need: 5_000_000_000 };
        let rep = Report::from_answer("glm-worker: 0.1.0\nlibtorch dir: /t\ncuda devices: 0\n        free disk: 2000000000 /ckpt\n", "");
        let Table { rows, ok, .. } = table(&one, &BTreeMap::from([(0, rep)]), &expect(false, Some(&disk)));
        assert!(!ok && rows[1].contains("2.00 GB") && rows[1].contains("FAIL: 2.00 GB free under /ckpt, a checkpoint needs about 5.00 GB"), "{rows:?}");
        // units that fit the sizes: a nearly full small disk is not "0.0 GB free"
        let small = Disk { dir: "/small".into(), need: 40_512_000 };
        let rep = Report::from_answer("glm-worker: 0.1.0\nlibtorch dir: /t\ncuda devices: 0\n        free disk: 12000000 /small\n", "");
        let rows = table(&one, &BTreeMap::from([(0, rep)]), &expect(false, Some(&small))).rows;
        assert!(rows[1].contains("FAIL: 12.0 MB free under /small, a checkpoint needs about 40.5 MB"), "{rows:?}");
        // srun: stderr is its own stream, so an error is not taken for an answer
        let srun = parse("0: glm-worker: 0.1.0\n", "1: glm-worker: error: libtorch not found\n", Tags::Srun);
        assert_eq!(srun[&0].version.as_deref(), Some("0.1.0"));
        assert_eq!((srun[&1].version.as_deref(), srun[&1].error.as_deref()), (None, Some("glm-worker: error: libtorch not found")));
        let rep = Report::from_answer("", "\nglm-launch: node9:22: cannot connect: Connection refused\n");
        assert_eq!(rep.error.as_deref(), Some("glm-launch: node9:22: cannot connect: Connection refused"));
    }

    /// The probe itself, run here by `sh`: what it says when the worker is
    /// not on PATH, not at its path, not executable, or fails; an answer
    /// passes through; it always exits 0 (so mpirun does not stop the
    /// other hosts' probes before they answer).
    #[test]
    fn the_probe_says_what_is_missing_and_always_exits_0() {
        let d = tempfile::tempdir().unwrap();
        let run = |worker: &str, path: &str| -> (Report, i32) {
            let argv = probe(worker, Some(&Disk { dir: "/ckpt dir".into(), need: 1 }));
            let o = Command::new(&argv[0]).args(&argv[1..]).env("PATH", path).env("CUDA_VISIBLE_DEVICES", "3").output().unwrap();
            (Report::from_answer(&String::from_utf8_lossy(&o.stdout), &String::from_utf8_lossy(&o.stderr)), o.status.code().unwrap())
        };
        let (rep, code) = run("glm-worker", "/nowhere:/bin");
        assert_eq!((rep.missing, code), (Some(Missing::OnPath { name: "glm-worker".into(), path: "/nowhere:/bin".into() }), 0));
        let absent = d.path().join("glm-worker");
        assert_eq!(run(&absent.display().to_string(), "/bin").0.missing, Some(Missing::File(absent.display().to_string())));
        std::fs::write(&absent, "#!/bin/sh\n").unwrap();
        assert_eq!(run(&absent.display().to_string(), "/bin").0.missing, Some(Missing::NotExecutable(absent.display().to_string())));
        assert_eq!(run(&d.path().display().to_string(), "/bin").0.missing, Some(Missing::NotExecutable(d.path().display().to_string())), "a directory");
        // the worker's own error: its lines as one message, its exit status
        std::fs::write(
            &absent,
            "#!/bin/sh\necho \"error: unexpected argument '$3' found\" >&2; echo >&2; echo 'Usage: glm-worker env [OPTIONS]' >&2; exit 2\n",
        )
        .unwrap();
        std::fs::set_permissions(&absent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let (rep, code) = run(&absent.display().to_string(), "/bin");
        assert_eq!(code, 0);
        assert_eq!((rep.exit, rep.error.as_deref()), (Some(2), Some("error: unexpected argument '/ckpt dir' found; Usage: glm-worker env [OPTIONS]")));
        // an answer, with every GPU visible and the arguments as given
        std::fs::write(&absent, "#!/bin/sh\necho \"glm-worker: 0.1.0 [${CUDA_VISIBLE_DEVICES-unset}] $1 $2 $3\"\n").unwrap();
        let (rep, _) = run(&absent.display().to_string(), "/bin");
        assert_eq!((rep.version.as_deref(), rep.exit, rep.missing), (Some("0.1.0 [unset] env --disk /ckpt dir"), None, None));
        let table = |rep: Report| table(&Placement { hosts: vec![("n1".into(), vec![0])] }, &BTreeMap::from([(0, rep)]), &expect(false, None)).rows[1].clone();
        let row = table(Report { ran: true, missing: Some(Missing::File("/opt/glm/glm-worker".into())), ..Default::default() });
        assert!(
            row.contains(" yes ") && row.ends_with("FAIL: glm-worker not found on n1: no file /opt/glm/glm-worker there; pass --worker with its path on n1, or install it at /opt/glm/glm-worker"),
            "{row}"
        );
        let one = Placement { hosts: vec![("n1".into(), vec![0])] };
        let t = super::table(&one, &BTreeMap::from([(0, Report { not_checked: Some("x".into()), ..Default::default() })]), &expect(false, None));
        assert!(t.failed.is_empty() && t.unchecked == [0], "a host not asked is not a failed host");
        let row = table(Report { not_checked: Some("the preflight job failed before it ran there".into()), ..Default::default() });
        assert!(row.contains(" ? ") && row.ends_with("FAIL: not checked: the preflight job failed before it ran there"), "{row}");
    }

    /// stderr of `mpirun --tag-output -H localhost:1 -np 1 hostname : -H
    /// <host>:1 -np 1 hostname` (OpenMPI 4.1.4, OpenSSH 9.2) against the
    /// test hosts of `tests/fixtures/netns_hosts.sh`, as captured (OpenMPI's
    /// explanation after "ORTE was unable to reliably start one or more
    /// daemons.", the same in each, left out). Resolution: ssh names the
    /// host as mpirun cut it; OpenMPI's routing complaint that follows names
    /// the reachable host, which is not to blame.
    const UNRESOLVED: &str = "ssh: Could not resolve hostname no-such-host: Name or service not known
--------------------------------------------------------------------------
ORTE was unable to reliably start one or more daemons.
--------------------------------------------------------------------------
--------------------------------------------------------------------------
ORTE does not know how to route a message to the specified daemon
located on the indicated node:

  my node:   vm
  target node:  node1
";
    /// Port 22 closed (`-H 10.213.77.11`), no key (`plm_rsh_agent` "ssh -F
    /// <config without IdentityFile> -o IdentitiesOnly=yes"), an unknown
    /// host key under strict checking, and no orted there (`orte_launch_agent`).
    const REFUSED: &str = "ssh: connect to host 10.213.77.11 port 22: Connection refused\n--------------------------------------------------------------------------\nORTE was unable to reliably start one or more daemons.\n";
    const DENIED: &str = "root@10.213.77.11: Permission denied (publickey).\n--------------------------------------------------------------------------\nORTE was unable to reliably start one or more daemons.\n";
    const HOST_KEY: &str = "No ED25519 host key is known for [10.213.77.11]:2222 and you have requested strict checking.\nHost key verification failed.\n";
    const NO_ORTED: &str = "bash: line 1: /nonexistent/orted: No such file or directory\n--------------------------------------------------------------------------\nORTE was unable to reliably start one or more daemons.\n";

    #[test]
    fn hosts_named_in_mpiruns_messages_are_blamed() {
        let place = Placement { hosts: vec![("localhost".into(), vec![0]), ("node1".into(), vec![0]), ("no-such-host.invalid".into(), vec![0])] };
        let routes = vec![
            Route { mpirun: "localhost".into(), ..Default::default() },
            Route { mpirun: "node1".into(), ssh: Some("10.213.77.11".into()), ..Default::default() },
            Route { mpirun: "no-such-host".into(), ssh: Some("no-such-host".into()), ..Default::default() },
        ];
        let blamed = |text: &str| blame(&text.lines().map(String::from).collect::<Vec<_>>(), &routes, &place, &[0, 1, 2]);
        assert_eq!(
            blamed(UNRESOLVED),
            BTreeMap::from([(
                2,
                "mpirun's ssh: Could not resolve hostname no-such-host: Name or service not known (check the hostfile, DNS or /etc/hosts)".into()
            )])
        );
        assert_eq!(blamed(REFUSED), BTreeMap::from([(1, "mpirun's ssh: connect to host 10.213.77.11 port 22: Connection refused".into())]));
        assert_eq!(
            blamed(DENIED),
            BTreeMap::from([(
                1,
                "mpirun's ssh: root@10.213.77.11: Permission denied (publickey). (mpirun logs in with ssh: `ssh 10.213.77.11` must work without a password)"
                    .into()
            )])
        );
        assert_eq!(blamed(HOST_KEY).keys().copied().collect::<Vec<_>>(), [1]);
        assert!(blamed(HOST_KEY)[&1].ends_with("(`ssh 10.213.77.11` once checks and records its key)"), "{:?}", blamed(HOST_KEY));
        assert!(blamed(NO_ORTED).is_empty(), "no host named");
        // only hosts that gave no answer
        assert!(blame(&[REFUSED.lines().next().unwrap().to_string()], &routes, &place, &[0, 2]).is_empty());
    }

    /// Where mpirun's ssh goes (`ssh -G` with the agent's own `-F`
    /// config): a name that resolves nowhere is found before mpirun runs;
    /// this machine and addresses are not cut at a dot; a whole name that
    /// would resolve where the cut one does not gets the setting that keeps it.
    #[test]
    fn names_are_resolved_as_mpiruns_ssh_would() {
        assert!(crate::which("ssh").is_some(), "ssh (openssh-client) on PATH: scripts/setup.sh --test installs it");
        let d = tempfile::tempdir().unwrap();
        let cfg = d.path().join("ssh_config");
        std::fs::write(&cfg, "Host gpu-a\n  HostName no-such-host.invalid\nHost gpu-a.example\n  HostName 127.0.0.1\nHost alias-ok\n  HostName 127.0.0.1\n")
            .unwrap();
        let agent = vec!["ssh".to_string(), "-F".into(), cfg.display().to_string()];
        let place = Placement {
            hosts: ["localhost", "alias-ok", "no-such-host.invalid", "gpu-a.example", "10.1.2.3", "gpu-a"].iter().map(|h| (h.to_string(), vec![0])).collect(),
        };
        let r = routes(&place, Some(&agent), false);
        assert_eq!(r[0], Route { mpirun: "localhost".into(), ..Default::default() }, "this machine: no ssh");
        assert_eq!(r[1], Route { mpirun: "alias-ok".into(), ssh: Some("127.0.0.1".into()), unresolvable: None });
        assert_eq!(r[2].mpirun, "no-such-host");
        let why = r[2].unresolvable.as_deref().unwrap();
        assert!(why.starts_with("cannot resolve host name no-such-host.invalid: ") && why.ends_with(" (check the hostfile, DNS or /etc/hosts)"), "{why}");
        assert_eq!(
            r[3].unresolvable.as_deref(),
            Some("cannot resolve host name gpu-a: OpenMPI's mpirun cuts gpu-a.example at its first dot (set OMPI_MCA_orte_keep_fqdn_hostnames=1 to keep whole names)")
        );
        assert_eq!(r[4], Route { mpirun: "10.1.2.3".into(), ssh: Some("10.1.2.3".into()), unresolvable: None }, "an address is not cut");
        assert!(
            r[5].unresolvable.as_deref().unwrap().starts_with("cannot resolve host name gpu-a (ssh's HostName for it: no-such-host.invalid): "),
            "{:?}",
            r[5]
        );
        // whole names kept: gpu-a.example goes through its own config entry
        let kept = routes(&place, Some(&agent), true);
        assert_eq!((kept[3].mpirun.as_str(), kept[3].unresolvable.as_deref()), ("gpu-a.example", None));
        // another agent than ssh: its own rules, nothing checked
        assert!(routes(&place, None, false).iter().all(|r| r.unresolvable.is_none() && r.ssh.is_none()));
    }
}
