//! Hostfiles and slot selection, as DeepSpeed's runner reads them.
//!
//! A hostfile has one host per line, `<host> slots=<n>` (DeepSpeed), or
//! with OpenMPI's `max_slots=<m>` after it; `#` starts a comment; blank
//! lines are skipped. Host order is rank order. A malformed line, a
//! duplicate host, zero slots or a file without hosts is an error naming
//! the file and line.
//!
//! Selection (`--include` / `--exclude`, mutually exclusive, DeepSpeed's
//! syntax `NAME[:SLOT[,SLOT...]][@NAME...]`; then `--num_nodes` keeps the
//! first N hosts and `--num_gpus` slots `0..N` of each) keeps the
//! hostfile's order; an unknown host or slot is an error.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One line of a hostfile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub slots: usize,
    /// OpenMPI's `max_slots` when given.
    pub max_slots: Option<usize>,
    /// 1-based line in the file.
    pub line: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hostfile {
    pub path: PathBuf,
    pub hosts: Vec<Host>,
}

impl Hostfile {
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::text::read(path)?;
        Self::parse(path, &text)
    }

    /// Parses `text` (the contents of `path`, named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let mut hosts: Vec<Host> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let body = raw.split('#').next().unwrap_or("");
            let mut words = body.split_whitespace();
            let Some(name) = words.next() else { continue };
            let col = raw.find(name).map_or(1, |c| c + 1);
            let err = |msg: String| Error::parse(path, line, col, msg);
            let (mut slots, mut max_slots) = (None, None);
            for w in words {
                let (key, value) =
                    w.split_once('=').ok_or_else(|| err(format!("`{w}`: expected slots=<n> (and optionally max_slots=<m>) after the host name")))?;
                let n: usize = value.parse().map_err(|_| err(format!("`{w}`: {key} must be a whole number")))?;
                match key {
                    "slots" if slots.is_none() => slots = Some(n),
                    "max_slots" if max_slots.is_none() => max_slots = Some(n),
                    "slots" | "max_slots" => return Err(err(format!("{key} given twice"))),
                    other => return Err(err(format!("unknown key `{other}` (a hostfile line is `<host> slots=<n> [max_slots=<m>]`)"))),
                }
            }
            let slots = slots.ok_or_else(|| err(format!("host {name} without slots=<n>")))?;
            if slots == 0 {
                return Err(err(format!("host {name}: slots=0 (a host in the hostfile must run at least one worker; remove the line instead)")));
            }
            if let Some(m) = max_slots.filter(|&m| m < slots) {
                return Err(err(format!("host {name}: max_slots={m} is less than slots={slots}")));
            }
            if let Some(h) = hosts.iter().find(|h| h.name == name) {
                return Err(err(format!("host {name} is listed twice (first on line {})", h.line)));
            }
            hosts.push(Host { name: name.to_string(), slots, max_slots, line });
        }
        if hosts.is_empty() {
            return Err(Error::invalid(path, "no hosts (expected lines `<host> slots=<n>`)"));
        }
        Ok(Hostfile { path: path.to_path_buf(), hosts })
    }
}

/// The hosts and slots a job runs on, in rank order: rank `r` is the `r`-th
/// slot counting host by host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub hosts: Vec<(String, Vec<usize>)>,
}

impl Placement {
    /// Processes in the job.
    pub fn world_size(&self) -> usize {
        self.hosts.iter().map(|(_, s)| s.len()).sum()
    }

    /// (host, local rank, slot) of every rank, in rank order.
    pub fn ranks(&self) -> Vec<(&str, usize, usize)> {
        self.hosts.iter().flat_map(|(h, slots)| slots.iter().enumerate().map(move |(local, &slot)| (h.as_str(), local, slot))).collect()
    }
}

/// What to run on: `--include`, `--exclude`, `--num_nodes`, `--num_gpus`.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub include: Option<String>,
    pub exclude: Option<String>,
    pub num_nodes: Option<usize>,
    pub num_gpus: Option<usize>,
}

/// Parses DeepSpeed's `NAME[:SLOT[,SLOT...]][@NAME...]` (flag `what` in errors).
fn parse_filter(spec: &str, what: &str) -> Result<Vec<(String, Option<Vec<usize>>)>> {
    let mut out: Vec<(String, Option<Vec<usize>>)> = Vec::new();
    for part in spec.split('@') {
        let part = part.trim();
        if part.is_empty() {
            return Err(Error::Config(format!("{what} {spec:?}: empty host entry (entries are NAME[:SLOT[,SLOT...]] joined by @)")));
        }
        let (name, slots) = match part.split_once(':') {
            None => (part, None),
            Some((n, s)) => {
                let slots = s
                    .split(',')
                    .map(|x| x.trim().parse::<usize>().map_err(|_| Error::Config(format!("{what} {spec:?}: slot {x:?} of host {n} is not a number"))))
                    .collect::<Result<Vec<_>>>()?;
                (n, Some(slots))
            }
        };
        if out.iter().any(|(n, _)| n == name) {
            return Err(Error::Config(format!("{what} {spec:?}: host {name} is named twice")));
        }
        out.push((name.to_string(), slots));
    }
    Ok(out)
}

/// The placement `sel` picks from `hosts` (name, slots).
pub fn select(hosts: &[(String, usize)], sel: &Selection) -> Result<Placement> {
    if sel.include.is_some() && sel.exclude.is_some() {
        return Err(Error::Config("--include and --exclude are mutually exclusive".into()));
    }
    let mut placed: Vec<(String, Vec<usize>)> = hosts.iter().map(|(h, n)| (h.clone(), (0..*n).collect())).collect();
    let check = |name: &str, slots: &Option<Vec<usize>>, what: &str| -> Result<()> {
        let (_, n) = hosts.iter().find(|(h, _)| h == name).ok_or_else(|| {
            let known: Vec<&str> = hosts.iter().map(|(h, _)| h.as_str()).collect();
            Error::Config(format!("{what}: unknown host {name} (the hosts are {})", known.join(", ")))
        })?;
        if let Some(bad) = slots.iter().flatten().find(|&&s| s >= *n) {
            return Err(Error::Config(format!("{what}: host {name} has {n} slot(s) (0..{}), not slot {bad}", n.saturating_sub(1))));
        }
        Ok(())
    };
    if let Some(spec) = &sel.include {
        let want = parse_filter(spec, "--include")?;
        for (name, slots) in &want {
            check(name, slots, "--include")?;
        }
        placed.retain_mut(|(h, slots)| match want.iter().find(|(n, _)| n == h) {
            None => false,
            Some((_, None)) => true,
            Some((_, Some(keep))) => {
                slots.retain(|s| keep.contains(s));
                true
            }
        });
    }
    if let Some(spec) = &sel.exclude {
        let drop = parse_filter(spec, "--exclude")?;
        for (name, slots) in &drop {
            check(name, slots, "--exclude")?;
        }
        placed.retain_mut(|(h, slots)| match drop.iter().find(|(n, _)| n == h) {
            None => true,
            Some((_, None)) => false,
            Some((_, Some(gone))) => {
                slots.retain(|s| !gone.contains(s));
                !slots.is_empty()
            }
        });
    }
    if let Some(n) = sel.num_nodes {
        if n == 0 || n > placed.len() {
            return Err(Error::Config(format!("--num_nodes {n}: {} host(s) available after selection", placed.len())));
        }
        placed.truncate(n);
    }
    if let Some(g) = sel.num_gpus {
        for (h, slots) in &mut placed {
            if g == 0 || g > slots.len() {
                return Err(Error::Config(format!("--num_gpus {g}: host {h} has {} selected slot(s)", slots.len())));
            }
            slots.truncate(g);
        }
    }
    if placed.iter().all(|(_, s)| s.is_empty()) {
        return Err(Error::Config("the selection leaves no slots to run on".into()));
    }
    Ok(Placement { hosts: placed })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Hostfile> {
        Hostfile::parse(Path::new("hosts"), text)
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn deepspeed_and_openmpi_lines_comments_and_order() {
        let h = parse("# cluster\nworker-1 slots=4\n\n  worker-0 slots=2 max_slots=8   # spare\nlocalhost\tslots=1\n").unwrap();
        let names: Vec<(&str, usize, Option<usize>, usize)> = h.hosts.iter().map(|h| (h.name.as_str(), h.slots, h.max_slots, h.line)).collect();
        assert_eq!(names, vec![("worker-1", 4, None, 2), ("worker-0", 2, Some(8), 4), ("localhost", 1, None, 5)]);
    }

    #[test]
    fn every_malformed_line_names_file_and_line() {
        for (text, want) in [
            ("a slots=2\nb\n", "hosts:2:1: host b without slots=<n>"),
            ("a slots=two\n", "hosts:1:1: `slots=two`: slots must be a whole number"),
            ("a slots=2\n  b slots=0\n", "hosts:2:3: host b: slots=0"),
            ("a slots=2\nb slots=1\na slots=3\n", "hosts:3:1: host a is listed twice (first on line 1)"),
            ("a slots=2 gpus=4\n", "hosts:1:1: unknown key `gpus`"),
            ("a slots=2 slots=3\n", "slots given twice"),
            ("a slots=4 max_slots=2\n", "max_slots=2 is less than slots=4"),
            ("a 4\n", "`4`: expected slots=<n>"),
            ("# nothing\n\n", "hosts: no hosts"),
        ] {
            let e = err(text);
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    fn pool() -> Vec<(String, usize)> {
        vec![("w0".into(), 4), ("w1".into(), 4), ("w2".into(), 2)]
    }

    fn pick(sel: Selection) -> Result<Vec<(String, Vec<usize>)>> {
        select(&pool(), &sel).map(|p| p.hosts)
    }

    fn s(v: &str) -> Option<String> {
        Some(v.into())
    }

    #[test]
    fn include_exclude_num_nodes_num_gpus() {
        let all = pick(Selection::default()).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(select(&pool(), &Selection::default()).unwrap().world_size(), 10);
        // include keeps the hostfile's order, not the flag's
        assert_eq!(pick(Selection { include: s("w2@w0:1,3"), ..Default::default() }).unwrap(), vec![("w0".into(), vec![1, 3]), ("w2".into(), vec![0, 1])]);
        assert_eq!(pick(Selection { exclude: s("w1@w0:0"), ..Default::default() }).unwrap(), vec![("w0".into(), vec![1, 2, 3]), ("w2".into(), vec![0, 1])]);
        // excluding every slot of a host drops the host
        assert_eq!(pick(Selection { exclude: s("w2:0,1"), ..Default::default() }).unwrap().len(), 2);
        assert_eq!(
            pick(Selection { num_nodes: Some(2), num_gpus: Some(2), ..Default::default() }).unwrap(),
            vec![("w0".into(), vec![0, 1]), ("w1".into(), vec![0, 1])]
        );
        let p = select(&pool(), &Selection { include: s("w1:2,3@w2"), ..Default::default() }).unwrap();
        assert_eq!(p.ranks(), vec![("w1", 0, 2), ("w1", 1, 3), ("w2", 0, 0), ("w2", 1, 1)]);
    }

    #[test]
    fn selection_errors_say_what_is_wrong() {
        for (sel, want) in [
            (Selection { include: s("w0"), exclude: s("w1"), ..Default::default() }, "mutually exclusive"),
            (Selection { include: s("w9"), ..Default::default() }, "--include: unknown host w9 (the hosts are w0, w1, w2)"),
            (Selection { exclude: s("w2:2"), ..Default::default() }, "--exclude: host w2 has 2 slot(s) (0..1), not slot 2"),
            (Selection { include: s("w0:x"), ..Default::default() }, "slot \"x\" of host w0 is not a number"),
            (Selection { include: s("w0@@w1"), ..Default::default() }, "empty host entry"),
            (Selection { include: s("w0@w0:1"), ..Default::default() }, "host w0 is named twice"),
            (Selection { num_nodes: Some(4), ..Default::default() }, "--num_nodes 4: 3 host(s) available"),
            (Selection { num_gpus: Some(3), ..Default::default() }, "--num_gpus 3: host w2 has 2 selected slot(s)"),
            (Selection { exclude: s("w0@w1@w2"), ..Default::default() }, "leaves no slots"),
        ] {
            let e = pick(sel).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
