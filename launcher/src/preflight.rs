//! The preflight: before anything trains, `glm-worker env` runs once on
//! every host with the job's environment and every GPU visible — through
//! the same MPI launcher (one app context per host), or over the `ssh`
//! back end's own connections — and the answers make one table: reachable,
//! the worker's version (the launcher's own), libtorch found, GPUs against
//! the selected slots, free disk under the save directory. A failing row
//! stops the launch with the table shown, before any worker starts
//! (DeepSpeed discovers a bad host only after the others have started).

use std::collections::BTreeMap;
use std::process::Command;

use glm_common::hostfile::Placement;
use glm_common::units::human_bytes;

use crate::supervise::{parse_line, Tags};

/// What one host reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub version: Option<String>,
    pub libtorch: Option<String>,
    pub gpus: Option<usize>,
    /// Free bytes under the save directory (when one is configured).
    pub free_disk: Option<u64>,
    /// The first line the host wrote to stderr (why it failed, usually).
    pub error: Option<String>,
}

impl Report {
    /// Takes in one line of `glm-worker env`'s answer.
    fn take(&mut self, line: &str) {
        let Some((k, v)) = line.split_once(':') else { return };
        let (k, v) = (k.trim(), v.trim().to_string());
        match k {
            "glm-worker" => self.version = Some(v),
            "libtorch dir" => self.libtorch = Some(v),
            "cuda devices" => self.gpus = v.parse().ok(),
            "free disk" => self.free_disk = v.split_whitespace().next().and_then(|b| b.parse().ok()),
            _ => {}
        }
    }

    /// One host's answer (stdout, stderr), as the ssh back end collects it.
    pub fn from_answer(stdout: &str, stderr: &str) -> Report {
        let mut rep = Report::default();
        stdout.lines().for_each(|l| rep.take(l));
        rep.error = stderr.lines().map(str::trim).find(|l| !l.is_empty()).map(String::from);
        rep
    }
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
    /// The job stages collectives through host memory
    /// (`GLM_COMM_BACKEND=host-staged`), so ranks may share GPUs.
    pub gpus_shared: bool,
    pub disk: Option<&'a Disk>,
}

/// Per-rank (= per-host) answers from the preflight's output.
pub fn parse(stdout: &str, stderr: &str, tags: Tags) -> BTreeMap<usize, Report> {
    let mut out: BTreeMap<usize, Report> = BTreeMap::new();
    for (raw, from_stderr) in stdout.lines().map(|l| (l, false)).chain(stderr.lines().map(|l| (l, true))) {
        let line = parse_line(raw, from_stderr, tags);
        let Some(r) = line.rank else { continue };
        if line.stderr {
            let rep = out.entry(r).or_default();
            if rep.error.is_none() && !line.text.trim().is_empty() {
                rep.error = Some(line.text.trim().to_string());
            }
            continue;
        }
        out.entry(r).or_default().take(&line.text);
    }
    out
}

/// The table's rows (host, verdict per column) and whether all passed.
pub fn table(placement: &Placement, reports: &BTreeMap<usize, Report>, expect: &Expect) -> (Vec<String>, bool) {
    let Expect { version, wants_cuda, gpus_shared, disk } = *expect;
    let mut ok = true;
    let mut rows =
        vec![format!("  {:<24} {:<10} {:<16} {:<10} {:<22} {:<12} result", "host", "reachable", "glm-worker", "libtorch", "GPUs / slots", "free disk")];
    for (i, (host, slots)) in placement.hosts.iter().enumerate() {
        let rep = reports.get(&i).filter(|r| r.version.is_some() || r.libtorch.is_some() || r.gpus.is_some());
        let mut why = Vec::new();
        let reach = if rep.is_some() { "yes" } else { "NO" };
        if rep.is_none() {
            let said = reports.get(&i).and_then(|r| r.error.clone()).map(|e| format!(": {e}")).unwrap_or_default();
            why.push(format!("no answer (unreachable, or glm-worker missing/failing there){said}"));
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
        rows.push(format!("  {host:<24} {reach:<10} {ver:<16} {torch:<10} {g:<22} {free:<12} {verdict}"));
    }
    (rows, ok)
}

/// Runs the preflight; returns the table and whether every host passed
/// (with the launcher's own messages when the preflight job failed).
pub fn run(argv: &[String], tags: Tags, env: &[(String, String)], placement: &Placement, expect: &Expect) -> (Vec<String>, bool) {
    let out = Command::new(&argv[0]).args(&argv[1..]).envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str()))).output();
    let (reports, messages, success) = match out {
        Ok(o) => {
            // whole lines: OpenMPI's tags cut a line a rank wrote in pieces
            let whole = |b: &[u8]| if tags == Tags::OpenMpi { crate::tagged::Demux::lines(b).join("\n") } else { String::from_utf8_lossy(b).into_owned() };
            let (stdout, stderr) = (whole(&o.stdout), whole(&o.stderr));
            let msgs: Vec<String> =
                stdout.lines().chain(stderr.lines()).filter(|l| parse_line(l, true, tags).rank.is_none() && !l.trim().is_empty()).map(String::from).collect();
            (parse(&stdout, &stderr, tags), msgs, o.status.success())
        }
        Err(e) => (BTreeMap::new(), vec![format!("cannot start {}: {e}", argv[0])], false),
    };
    let (mut rows, ok) = table(placement, &reports, expect);
    if !success {
        rows.push(format!("  the preflight job failed; {}'s messages:", argv[0]));
        rows.extend(messages.iter().take(20).map(|m| format!("    {m}")));
    }
    (rows, ok && success)
}

/// The `ssh` back end's preflight: every host at once, each over its own
/// connection (host key checked, logged in), `glm-worker env` fed as a
/// script with the job's environment, from the launcher's directory. This
/// machine (`local[i]`: mpirun starts its workers without SSH) is asked
/// directly.
pub fn run_ssh(
    targets: &[crate::ssh::Target],
    local: &[bool],
    probe: &[String],
    env: &[(String, String)],
    placement: &Placement,
    expect: &Expect,
) -> (Vec<String>, bool) {
    let cwd = std::env::current_dir().unwrap_or_default();
    let script = crate::ssh::script(env, &cwd, probe);
    let here = || -> anyhow::Result<(i32, String, String)> {
        use std::io::Write;
        let mut c = Command::new("sh")
            .arg("-s")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        c.stdin.take().expect("piped").write_all(script.as_bytes())?;
        let o = c.wait_with_output()?;
        Ok((o.status.code().unwrap_or(255), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned()))
    };
    let ask = |(t, local): (&crate::ssh::Target, bool)| -> Report {
        let answer = if local { here() } else { crate::ssh::run_script(t, &script, std::time::Duration::from_secs(120)) };
        match answer {
            Ok((code, out, err)) => {
                let mut rep = Report::from_answer(&out, &err);
                if code != 0 && rep.error.is_none() {
                    rep.error = Some(format!("exit status {code}"));
                }
                rep
            }
            Err(e) => Report { error: Some(format!("{e:#}")), ..Default::default() },
        }
    };
    let reports: BTreeMap<usize, Report> = std::thread::scope(|s| {
        let asks: Vec<_> = targets.iter().enumerate().map(|(i, t)| (i, s.spawn(move || ask((t, local.get(i).copied().unwrap_or(false)))))).collect();
        asks.into_iter().map(|(i, h)| (i, h.join().unwrap_or_default())).collect()
    });
    table(placement, &reports, expect)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect(wants_cuda: bool, disk: Option<&Disk>) -> Expect<'_> {
        Expect { version: "0.1.0", wants_cuda, gpus_shared: false, disk }
    }

    fn placement() -> Placement {
        Placement { hosts: vec![("a".into(), vec![0, 1]), ("b".into(), vec![2, 3]), ("c".into(), vec![0])] }
    }

    #[test]
    fn a_table_of_answers() {
        let out = "[1,0]<stdout>:        glm-worker: 0.1.0\n[1,0]<stdout>:      libtorch dir: /t\n[1,0]<stdout>:      cuda devices: 8\n\
                   [1,1]<stdout>:        glm-worker: 0.1.0\n[1,1]<stdout>:      libtorch dir: /t\n[1,1]<stdout>:      cuda devices: 2\n\
                   [1,2]<stderr>:glm-worker: error: libtorch not found\n";
        let (rows, ok) = table(&placement(), &parse(out, "", Tags::OpenMpi), &expect(false, None));
        assert!(!ok);
        assert!(rows[1].contains("8 / 2") && rows[1].ends_with("ok"), "{rows:?}");
        assert!(rows[2].contains("FAIL: slot 3 selected but the host has 2 GPU(s)"), "{rows:?}");
        assert!(rows[3].contains("NO") && rows[3].contains("no answer") && rows[3].contains("glm-worker: error: libtorch not found"), "{rows:?}");
        // ranks staging collectives through host memory may share GPUs
        let shared = Expect { gpus_shared: true, ..expect(true, None) };
        let overlapping = Placement { hosts: vec![("a".into(), vec![0, 1]), ("b".into(), vec![1, 2]), ("c".into(), vec![0])] };
        let (rows, _) = table(&overlapping, &parse(out, "", Tags::OpenMpi), &shared);
        assert!(rows[2].contains("2 / 2 shared") && !rows[2].contains("FAIL: slot"), "{rows:?}");
        // ... but not when no selected slot exists (the workers would see no GPU)
        let far = Placement { hosts: vec![("b".into(), vec![2, 3])] };
        let two = "[1,0]<stdout>: glm-worker: 0.1.0\n[1,0]<stdout>: libtorch dir: /t\n[1,0]<stdout>: cuda devices: 2\n";
        let (rows, ok) = table(&far, &parse(two, "", Tags::OpenMpi), &shared);
        assert!(!ok && rows[1].contains("FAIL: slot 3 selected but the host has 2 GPU(s)"), "{rows:?}");
        let (rows, _) =
            table(&placement(), &parse("[1,2]<stdout>: glm-worker: 0.0.9\n[1,2]<stdout>: libtorch dir: ?\n", "", Tags::OpenMpi), &expect(false, None));
        assert!(rows[3].contains("glm-worker 0.0.9, the launcher is 0.1.0") && rows[3].contains("libtorch not found"), "{rows:?}");
        let cpu = "[1,0]<stdout>: glm-worker: 0.1.0\n[1,0]<stdout>: libtorch dir: /t\n[1,0]<stdout>: cuda devices: 0\n";
        let one = Placement { hosts: vec![("a".into(), vec![0])] };
        assert!(table(&one, &parse(cpu, "", Tags::OpenMpi), &expect(false, None)).1);
        assert!(table(&one, &parse(cpu, "", Tags::OpenMpi), &expect(true, None)).0[1].contains("--device cuda, but the host reports no GPU"));
        let disk = Disk { dir: "/ckpt".into(), need: 5_000_000_000 };
        let rep = Report::from_answer("glm-worker: 0.1.0\nlibtorch dir: /t\ncuda devices: 0\n        free disk: 2000000000 /ckpt\n", "");
        let (rows, ok) = table(&one, &BTreeMap::from([(0, rep)]), &expect(false, Some(&disk)));
        assert!(!ok && rows[1].contains("2.00 GB") && rows[1].contains("FAIL: 2.00 GB free under /ckpt, a checkpoint needs about 5.00 GB"), "{rows:?}");
        // units that fit the sizes: a nearly full small disk is not "0.0 GB free"
        let small = Disk { dir: "/small".into(), need: 40_512_000 };
        let rep = Report::from_answer("glm-worker: 0.1.0\nlibtorch dir: /t\ncuda devices: 0\n        free disk: 12000000 /small\n", "");
        let (rows, _) = table(&one, &BTreeMap::from([(0, rep)]), &expect(false, Some(&small)));
        assert!(rows[1].contains("FAIL: 12.0 MB free under /small, a checkpoint needs about 40.5 MB"), "{rows:?}");
        // srun: stderr is its own stream, so an error is not taken for an answer
        let srun = parse("0: glm-worker: 0.1.0\n", "1: glm-worker: error: libtorch not found\n", Tags::Srun);
        assert_eq!(srun[&0].version.as_deref(), Some("0.1.0"));
        assert_eq!((srun[&1].version.as_deref(), srun[&1].error.as_deref()), (None, Some("glm-worker: error: libtorch not found")));
        let rep = Report::from_answer("", "\nglm-launch: node9:22: cannot connect: Connection refused\n");
        assert_eq!(rep.error.as_deref(), Some("glm-launch: node9:22: cannot connect: Connection refused"));
    }
}
