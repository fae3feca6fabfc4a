//! Hostfiles and slot selection, as DeepSpeed's runner reads them.
//!
//! A hostfile has one host per line, `<host> slots=<n>` (DeepSpeed), with
//! OpenMPI's other spellings of the slot count and its maximum accepted
//! too (see `SLOT_KEYS`, `MAX_SLOT_KEYS`); `#` starts a comment; blank
//! lines are skipped. Host order is rank order. A malformed line, a
//! duplicate host, zero slots or a file without hosts is an error naming
//! the file and line.
//!
//! Selection (`--include` / `--exclude`, mutually exclusive, DeepSpeed's
//! syntax `NAME[:SLOT[,SLOT...]][@NAME...]`, an empty string meaning none;
//! then `--num_nodes` keeps the first N hosts and `--num_gpus` slots `0..N`
//! of each; `--num_nodes`/`--num_gpus` and `--include`/`--exclude` cannot
//! be combined, as in DeepSpeed) keeps the hostfile's order; an unknown
//! host or slot is an error. A host named more than once in a filter gets
//! the union of what each entry names.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The keys that give a host's slot count, as OpenMPI 4.1's hostfile
/// parser spells them (`orte/util/hostfile`; checked against `mpirun
/// --display-allocation` of OpenMPI 4.1.4). `slots=<n>` is DeepSpeed's and
/// OpenMPI's; `count=<n>` and `cpu=<n>` are OpenMPI's older synonyms with
/// the same meaning: the host runs `n` workers. Giving the count twice on
/// one line (in any spelling) is an error, as in OpenMPI ("multiple
/// definitions of the slot count").
pub const SLOT_KEYS: &[&str] = &["slots", "count", "cpu"];

/// OpenMPI's spellings of a host's maximum slot count (`max-slots`,
/// `max_slots`, `slots-max`, `slots_max`, and the same with `cpu` and
/// `count`), all one setting, with OpenMPI's meaning:
/// - alone (`node-1 max-slots=4`): the host has that many slots, so
///   glm-launch runs 4 workers there (OpenMPI sets slots = max_slots);
/// - with a slot count: the count decides how many workers run; the
///   maximum only bounds oversubscription in OpenMPI, which glm-launch
///   never asks for (it starts exactly the selected slots), so it is only
///   checked: a maximum below a count given before it is an error (OpenMPI:
///   "The max_slots parameter is less than the slots parameter"), while a
///   count given after a smaller maximum raises the maximum to the count,
///   as OpenMPI does;
/// - given twice: the last one counts, as in OpenMPI.
pub const MAX_SLOT_KEYS: &[&str] =
    &["max-slots", "max_slots", "slots-max", "slots_max", "max-cpu", "max_cpu", "cpu-max", "cpu_max", "max-count", "max_count", "count-max", "count_max"];

/// One line of a hostfile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    /// The workers it runs: the slot count, else OpenMPI's maximum.
    pub slots: usize,
    /// OpenMPI's maximum when given (any spelling of `MAX_SLOT_KEYS`), at
    /// least `slots`.
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
    ///
    /// Where DeepSpeed and OpenMPI disagree: a line without any slot count
    /// is an error (DeepSpeed refuses it; OpenMPI would count the host's
    /// cores); `slots=0` is an error (both accept it, and the host runs
    /// nothing); a key other than the slot keys (OpenMPI's `username=`,
    /// `cores=`, ..., or a typo) is an error (OpenMPI honours or refuses
    /// them, DeepSpeed ignores everything after `slots=<n>`); spaces around
    /// `=` are allowed (OpenMPI allows them, DeepSpeed does not).
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let mut hosts: Vec<Host> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let body = raw.split('#').next().unwrap_or("");
            // `key = value` with spaces, as OpenMPI's lexer allows, is one word
            let mut words: Vec<String> = Vec::new();
            for w in body.split_whitespace() {
                let n = words.len();
                match words.last_mut() {
                    Some(last) if n > 1 && (w.starts_with('=') || last.ends_with('=')) => last.push_str(w),
                    _ => words.push(w.to_string()),
                }
            }
            let Some((name, keys)) = words.split_first() else { continue };
            let col = raw.find(name.as_str()).map_or(1, |c| c + 1);
            let err = |msg: String| Error::parse(path, line, col, msg);
            // (spelling, value) of the slot count and of the maximum
            let mut slots: Option<(&str, usize)> = None;
            let mut max_slots: Option<(&str, usize)> = None;
            for w in keys {
                let (key, value) =
                    w.split_once('=').ok_or_else(|| err(format!("`{w}`: expected slots=<n> (or OpenMPI's max-slots=<m>) after the host name")))?;
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(err(format!("`{w}`: {key} must be a whole number")));
                }
                let n: usize = value.parse().map_err(|_| err(format!("`{w}`: {key} is too large")))?;
                if SLOT_KEYS.contains(&key) {
                    if let Some((k, v)) = slots {
                        return Err(err(format!("the slot count is given twice ({k}={v}, {key}={n})")));
                    }
                    slots = Some((key, n));
                    // OpenMPI raises a smaller maximum given before the count
                    if let Some((k, _)) = max_slots.filter(|&(_, m)| m < n) {
                        max_slots = Some((k, n));
                    }
                } else if MAX_SLOT_KEYS.contains(&key) {
                    if let Some((k, v)) = slots.filter(|&(_, v)| n < v) {
                        return Err(err(format!("host {name}: {key}={n} is less than {k}={v}")));
                    }
                    max_slots = Some((key, n));
                } else {
                    return Err(err(format!(
                        "unknown key `{key}` (a hostfile line is `<host> slots=<n>`, optionally with OpenMPI's `max-slots=<m>`; count= and cpu= are OpenMPI's spellings of slots=)"
                    )));
                }
            }
            let slots = match (slots, max_slots) {
                (Some((_, n)), _) => n,
                // OpenMPI: the maximum alone is the slot count
                (None, Some((_, m))) => m,
                (None, None) => return Err(err(format!("host {name} without slots=<n>"))),
            };
            if slots == 0 {
                return Err(err(format!("host {name}: slots=0 (a host in the hostfile must run at least one worker; remove the line instead)")));
            }
            if let Some(h) = hosts.iter().find(|h| &h.name == name) {
                return Err(err(format!("host {name} is listed twice (first on line {})", h.line)));
            }
            hosts.push(Host { name: name.to_string(), slots, max_slots: max_slots.map(|(_, m)| m), line });
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

impl Selection {
    /// `--include`, unless absent or empty (DeepSpeed's default: no filter).
    pub fn include(&self) -> Option<&str> {
        self.include.as_deref().filter(|s| !s.is_empty())
    }

    /// `--exclude`, unless absent or empty.
    pub fn exclude(&self) -> Option<&str> {
        self.exclude.as_deref().filter(|s| !s.is_empty())
    }

    /// DeepSpeed's rules on which flags go together, hostfile or not:
    /// `--include` and `--exclude` are mutually exclusive, and neither
    /// combines with `--num_nodes`/`--num_gpus` (DeepSpeed's runner raises
    /// "Cannot specify num_nodes/gpus with include/exclude" whenever either
    /// number is given with a non-empty filter).
    pub fn check(&self) -> Result<()> {
        if self.include().is_some() && self.exclude().is_some() {
            return Err(Error::Config("--include and --exclude are mutually exclusive".into()));
        }
        let nums: Vec<&str> =
            [(self.num_nodes, "--num_nodes"), (self.num_gpus, "--num_gpus")].into_iter().filter(|(n, _)| n.is_some()).map(|(_, f)| f).collect();
        let filter = if self.include().is_some() { "--include" } else { "--exclude" };
        if !nums.is_empty() && (self.include().is_some() || self.exclude().is_some()) {
            return Err(Error::Config(format!(
                "{} cannot be combined with {filter} (as in DeepSpeed: \"Cannot specify num_nodes/gpus with include/exclude\"); name the hosts and slots in --include instead",
                nums.join(" and ")
            )));
        }
        Ok(())
    }
}

/// Parses DeepSpeed's `NAME[:SLOT[,SLOT...]][@NAME...]` (flag `what` in
/// errors). A host named more than once gets the union of its entries
/// (`None`: every slot), so `w:1@w:0,1` is `w:0,1` (DeepSpeed's unit test
/// asserts that result; DeepSpeed itself lets the last entry replace the
/// earlier ones, which gives the same there but drops slots in `w:0,1@w:1`).
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
        match out.iter_mut().find(|(n, _)| n == name) {
            None => out.push((name.to_string(), slots)),
            Some((_, have)) => match (have.as_mut(), slots) {
                (Some(have), Some(more)) => have.extend(more),
                // a whole host absorbs any slot list
                _ => *have = None,
            },
        }
    }
    for (_, slots) in &mut out {
        if let Some(s) = slots {
            s.sort_unstable();
            s.dedup();
        }
    }
    Ok(out)
}

/// The placement `sel` picks from `hosts` (name, slots): `sel.check()`,
/// then the filter, then `limit` by `--num_nodes`/`--num_gpus`. A host's
/// selected slots stay in ascending order (local rank i takes the i-th
/// lowest), whatever order `--include` names them in.
pub fn select(hosts: &[(String, usize)], sel: &Selection) -> Result<Placement> {
    sel.check()?;
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
    if let Some(spec) = sel.include() {
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
    if let Some(spec) = sel.exclude() {
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
    limit(Placement { hosts: placed }, sel.num_nodes, sel.num_gpus)
}

/// `--num_nodes N` keeps the first N hosts of `placement`, `--num_gpus N`
/// the first N selected slots of each; either beyond what is there, or 0,
/// is an error. A placement without slots is an error.
pub fn limit(placement: Placement, num_nodes: Option<usize>, num_gpus: Option<usize>) -> Result<Placement> {
    let mut placed = placement.hosts;
    if let Some(n) = num_nodes {
        if n == 0 || n > placed.len() {
            return Err(Error::Config(format!("--num_nodes {n}: {} host(s) available after selection", placed.len())));
        }
        placed.truncate(n);
    }
    if let Some(g) = num_gpus {
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
            ("a slots=2 slots=3\n", "the slot count is given twice (slots=2, slots=3)"),
            ("a slots=2 count=3\n", "the slot count is given twice (slots=2, count=3)"),
            ("a slots=4 max_slots=2\n", "max_slots=2 is less than slots=4"),
            ("a cpu=4 max-slots=2\n", "max-slots=2 is less than cpu=4"),
            ("a max-slots=0\n", "host a: slots=0"),
            ("a slots=+3\n", "`slots=+3`: slots must be a whole number"),
            ("a slots=\n", "`slots=`: slots must be a whole number"),
            ("a Slots=2\n", "unknown key `Slots`"),
            ("a maxslots=2\n", "unknown key `maxslots`"),
            ("a 4\n", "`4`: expected slots=<n>"),
            ("# nothing\n\n", "hosts: no hosts"),
        ] {
            let e = err(text);
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    /// OpenMPI 4.1's spellings, with the slots and maximum `mpirun
    /// --display-allocation` (OpenMPI 4.1.4) shows for the same line.
    #[test]
    fn openmpis_slot_spellings_mean_what_they_mean_to_openmpi() {
        for (line, slots, max) in [
            ("h slots=2", 2, None),
            ("h count=2", 2, None),
            ("h cpu=2", 2, None),
            ("h max-slots=3", 3, Some(3)),
            ("h max_slots=3", 3, Some(3)),
            ("h slots-max=3", 3, Some(3)),
            ("h slots_max=3", 3, Some(3)),
            ("h max-cpu=3", 3, Some(3)),
            ("h cpu_max=3", 3, Some(3)),
            ("h max-count=3", 3, Some(3)),
            ("h count_max=3", 3, Some(3)),
            ("h slots=2 max-slots=4", 2, Some(4)),
            ("h max-slots=4 slots=2", 2, Some(4)),
            // a smaller maximum before the count is raised to it
            ("h max-slots=2 slots=4", 4, Some(4)),
            ("h max-slots=2 count=2", 2, Some(2)),
            // the last maximum counts
            ("h max-slots=3 max_slots=4", 4, Some(4)),
            ("h max-slots=4 max_slots=3", 3, Some(3)),
            ("h slots=3 max-slots=3", 3, Some(3)),
            ("h slots = 2", 2, None),
            ("h max-slots = 3", 3, Some(3)),
            ("h slots=03", 3, None),
            ("h slots=2 # two GPUs", 2, None),
        ] {
            let h = parse(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!((h.hosts[0].slots, h.hosts[0].max_slots), (slots, max), "{line}");
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
        // an empty filter is none (DeepSpeed's default)
        assert_eq!(pick(Selection { include: s(""), num_gpus: Some(1), ..Default::default() }).unwrap().len(), 3);
        assert_eq!(pick(Selection { exclude: s(""), ..Default::default() }).unwrap(), all);
    }

    #[test]
    fn a_host_named_twice_gets_the_union_of_its_entries() {
        for (include, want) in [
            ("w0:1@w0:0,1", vec![0, 1]),
            ("w0:0,1@w0:1", vec![0, 1]),
            ("w0:3@w0:1,1", vec![1, 3]),
            ("w0:3,1", vec![1, 3]),
            ("w0@w0:1", vec![0, 1, 2, 3]),
            ("w0:2@w0", vec![0, 1, 2, 3]),
        ] {
            assert_eq!(pick(Selection { include: s(include), ..Default::default() }).unwrap(), vec![("w0".to_string(), want)], "--include {include}");
        }
        for (exclude, want) in [("w0:1@w0:1", vec![0, 2, 3]), ("w0:1@w0:2", vec![0, 3]), ("w0:1,1", vec![0, 2, 3])] {
            assert_eq!(pick(Selection { exclude: s(exclude), ..Default::default() }).unwrap()[0], ("w0".to_string(), want), "--exclude {exclude}");
        }
        assert_eq!(pick(Selection { exclude: s("w0:1@w0"), ..Default::default() }).unwrap().len(), 2);
        // the slots are still checked
        let e = pick(Selection { include: s("w2:0@w2:5"), ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("host w2 has 2 slot(s) (0..1), not slot 5"), "{e}");
    }

    #[test]
    fn numbers_and_filters_do_not_combine() {
        for (sel, want) in [
            (Selection { num_nodes: Some(1), include: s("w0"), ..Default::default() }, "--num_nodes cannot be combined with --include"),
            (Selection { num_gpus: Some(1), exclude: s("w0"), ..Default::default() }, "--num_gpus cannot be combined with --exclude"),
            (
                Selection { num_nodes: Some(1), num_gpus: Some(1), include: s("w0"), ..Default::default() },
                "--num_nodes and --num_gpus cannot be combined with --include",
            ),
        ] {
            let e = pick(sel.clone()).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("Cannot specify num_nodes/gpus with include/exclude") && !e.contains('\n'), "{e}");
            assert_eq!(sel.check().unwrap_err().to_string(), e);
        }
    }

    #[test]
    fn selection_errors_say_what_is_wrong() {
        for (sel, want) in [
            (Selection { include: s("w0"), exclude: s("w1"), ..Default::default() }, "mutually exclusive"),
            (Selection { include: s("w9"), ..Default::default() }, "--include: unknown host w9 (the hosts are w0, w1, w2)"),
            (Selection { exclude: s("w2:2"), ..Default::default() }, "--exclude: host w2 has 2 slot(s) (0..1), not slot 2"),
            (Selection { include: s("w0:x"), ..Default::default() }, "slot \"x\" of host w0 is not a number"),
            (Selection { include: s("w0@@w1"), ..Default::default() }, "empty host entry"),
            (Selection { num_nodes: Some(4), ..Default::default() }, "--num_nodes 4: 3 host(s) available"),
            (Selection { num_gpus: Some(3), ..Default::default() }, "--num_gpus 3: host w2 has 2 selected slot(s)"),
            (Selection { exclude: s("w0@w1@w2"), ..Default::default() }, "leaves no slots"),
        ] {
            let e = pick(sel).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
