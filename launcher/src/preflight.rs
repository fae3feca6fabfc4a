//! The preflight: before anything trains, one short job through the same
//! MPI launcher (one app context per host, the job's environment, every GPU
//! visible) runs `glm-worker env` once on every host and the answers
//! make one table — reachable, the worker's version (the launcher's own),
//! libtorch found, GPUs against the selected slots. A failing row stops the
//! launch with the table shown, before any worker starts (DeepSpeed
//! discovers a bad host only after the others have started).

use std::collections::BTreeMap;
use std::process::Command;

use glm_common::hostfile::Placement;

use crate::supervise::parse_line;

/// What one host reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub version: Option<String>,
    pub libtorch: Option<String>,
    pub gpus: Option<usize>,
    /// The first line the host wrote to stderr (why it failed, usually).
    pub error: Option<String>,
}

/// Per-rank (= per-host) answers from the preflight's output.
pub fn parse(output: &str) -> BTreeMap<usize, Report> {
    let mut out: BTreeMap<usize, Report> = BTreeMap::new();
    for raw in output.lines() {
        let line = parse_line(raw, false);
        let Some(r) = line.rank else { continue };
        if line.stderr {
            let rep = out.entry(r).or_default();
            if rep.error.is_none() && !line.text.trim().is_empty() {
                rep.error = Some(line.text.trim().to_string());
            }
            continue;
        }
        let Some((k, v)) = line.text.split_once(':') else { continue };
        let (k, v) = (k.trim(), v.trim().to_string());
        let rep = out.entry(r).or_default();
        match k {
            "glm-worker" => rep.version = Some(v),
            "libtorch dir" => rep.libtorch = Some(v),
            "cuda devices" => rep.gpus = v.parse().ok(),
            _ => {}
        }
    }
    out
}

/// The table's rows (host, verdict per column) and whether all passed.
pub fn table(placement: &Placement, reports: &BTreeMap<usize, Report>, version: &str, wants_cuda: bool) -> (Vec<String>, bool) {
    let mut ok = true;
    let mut rows = vec![format!("  {:<24} {:<10} {:<16} {:<10} {:<22} result", "host", "reachable", "glm-worker", "libtorch", "GPUs / slots")];
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
            Some(n) => {
                if top >= n {
                    why.push(format!("slot {top} selected but the host has {n} GPU(s)"));
                }
                format!("{n} / {}", slots.len())
            }
            None => format!("? / {}", slots.len()),
        };
        let verdict = if why.is_empty() { "ok".to_string() } else { format!("FAIL: {}", why.join("; ")) };
        ok &= why.is_empty();
        rows.push(format!("  {host:<24} {reach:<10} {ver:<16} {torch:<10} {g:<22} {verdict}"));
    }
    (rows, ok)
}

/// Runs the preflight; returns the table and whether every host passed
/// (with the launcher's own messages when the preflight job failed).
pub fn run(argv: &[String], env: &[(String, String)], placement: &Placement, version: &str, wants_cuda: bool) -> (Vec<String>, bool) {
    let out = Command::new(&argv[0]).args(&argv[1..]).envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str()))).output();
    let (text, messages, success) = match out {
        Ok(o) => {
            let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            let msgs: Vec<String> = all.lines().filter(|l| parse_line(l, true).rank.is_none() && !l.trim().is_empty()).map(String::from).collect();
            (all, msgs, o.status.success())
        }
        Err(e) => (String::new(), vec![format!("cannot start {}: {e}", argv[0])], false),
    };
    let (mut rows, ok) = table(placement, &parse(&text), version, wants_cuda);
    if !success {
        rows.push(format!("  the preflight job failed; {}'s messages:", argv[0]));
        rows.extend(messages.iter().take(20).map(|m| format!("    {m}")));
    }
    (rows, ok && success)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement() -> Placement {
        Placement { hosts: vec![("a".into(), vec![0, 1]), ("b".into(), vec![2, 3]), ("c".into(), vec![0])] }
    }

    #[test]
    fn a_table_of_answers() {
        let out = "[1,0]<stdout>:        glm-worker: 0.1.0\n[1,0]<stdout>:      libtorch dir: /t\n[1,0]<stdout>:      cuda devices: 8\n\
                   [1,1]<stdout>:        glm-worker: 0.1.0\n[1,1]<stdout>:      libtorch dir: /t\n[1,1]<stdout>:      cuda devices: 2\n\
                   [1,2]<stderr>:glm-worker: error: libtorch not found\n";
        let (rows, ok) = table(&placement(), &parse(out), "0.1.0", false);
        assert!(!ok);
        assert!(rows[1].contains("8 / 2") && rows[1].ends_with("ok"), "{rows:?}");
        assert!(rows[2].contains("FAIL: slot 3 selected but the host has 2 GPU(s)"), "{rows:?}");
        assert!(rows[3].contains("NO") && rows[3].contains("no answer") && rows[3].contains("glm-worker: error: libtorch not found"), "{rows:?}");
        let (rows, _) = table(&placement(), &parse("[1,2]<stdout>: glm-worker: 0.0.9\n[1,2]<stdout>: libtorch dir: ?\n"), "0.1.0", false);
        assert!(rows[3].contains("glm-worker 0.0.9, the launcher is 0.1.0") && rows[3].contains("libtorch not found"), "{rows:?}");
        let cpu = "[1,0]<stdout>: glm-worker: 0.1.0\n[1,0]<stdout>: libtorch dir: /t\n[1,0]<stdout>: cuda devices: 0\n";
        let one = Placement { hosts: vec![("a".into(), vec![0])] };
        assert!(table(&one, &parse(cpu), "0.1.0", false).1);
        assert!(table(&one, &parse(cpu), "0.1.0", true).0[1].contains("--device cuda, but the host reports no GPU"));
    }
}
