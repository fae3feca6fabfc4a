//! DeepSpeed's launcher rules, row by row, against glm-launch.
//!
//! The rows are the scenarios of DeepSpeed's own launcher tests
//! (tests/unit/launcher/test_run.py: `test_parser_*`, `test_num_plus_parser`,
//! `test_hostfile_good`, `test_hostfiles_bad`; test_ds_arguments.py tests
//! the training script's `--deepspeed`/`--deepspeed_config` arguments, not
//! the launcher's, and has no row here), then what deepspeed/launcher/runner.py
//! does beyond them (its argparse spellings, `num_nodes`/`num_gpus`, the
//! OpenMPI hostfile spellings). Each row gives DeepSpeed's result, from its
//! test's assertion or, for the runner.py rows, from the code; a row where
//! glm-launch deliberately does otherwise says what it does and why.
//!
//! Every row runs glm-launch itself (`--dry-run`), so the flag spellings,
//! the hostfile parser and the selection are tested as a user meets them;
//! the selection is read from the dry run's `N worker(s) on M host(s): ...`
//! line.

use std::path::Path;
use std::process::Command;

mod common;
use common::{repo, text};

/// What DeepSpeed's runner does with a row: the hosts and slots it runs on
/// (its `active_resources`, written as glm-launch's dry run prints a
/// selection), or the exception it raises.
#[derive(Debug)]
enum Ds {
    Runs(&'static str),
    Raises(&'static str),
}

/// What glm-launch does with the same row.
#[derive(Debug)]
enum Glm {
    /// Runs exactly what DeepSpeed runs.
    Same,
    /// Refuses, as DeepSpeed does, with this in its message.
    Refuses(&'static str),
    /// Deliberately different: runs this selection (`Ok`) or refuses with
    /// this in its message (`Err`), for the reason given.
    Differs(Result<&'static str, &'static str>, &'static str),
}

struct Row {
    /// The DeepSpeed test (or runner.py) the row comes from.
    from: &'static str,
    hostfile: Option<&'static str>,
    /// glm-launch's arguments, split on whitespace: `{hf}` is the row's
    /// hostfile, `{missing}` a path that does not exist, `''` an empty argument.
    args: &'static str,
    deepspeed: Ds,
    glm: Glm,
}

const ONE: &str = "worker-0 slots=4\n";
const TWO: &str = "worker-0 slots=4\nworker-1 slots=4\n";
const NUM_WITH_FILTER: &str = "Cannot specify num_nodes/gpus with include/exclude";

use Ds::{Raises, Runs};
use Glm::{Differs, Refuses, Same};

fn rows() -> Vec<Row> {
    let row = |from, hostfile, args, deepspeed, glm| Row { from, hostfile, args, deepspeed, glm };
    vec![
        // test_parser_mutual_exclusive
        row("test_parser_mutual_exclusive", Some(ONE), "-H {hf} -i worker-0 -e worker-0", Raises("ValueError: include_str and exclude_str are mutually exclusive."), Refuses("--include and --exclude are mutually exclusive")),
        // test_parser_local: hosts {'worker-0': [0, 1, 2, 3]}
        row("test_parser_local", Some(ONE), "-H {hf}", Runs("worker-0 slots 0,1,2,3"), Same),
        row("test_parser_local", Some(ONE), "-H {hf} -e worker-0:1", Runs("worker-0 slots 0,2,3"), Same),
        row("test_parser_local", Some(ONE), "-H {hf} -e worker-0:1,2", Runs("worker-0 slots 0,3"), Same),
        row("test_parser_local", Some(ONE), "-H {hf} -i worker-0:1", Runs("worker-0 slots 1"), Same),
        row("test_parser_local", Some(ONE), "-H {hf} -i worker-0:1,1", Runs("worker-0 slots 1"), Same),
        row("test_parser_local", Some(ONE), "-H {hf} -i worker-0:1@worker-0:0,1", Runs("worker-0 slots 0,1"), Same),
        row("test_parser_local", Some(ONE), "-H {hf} -i worker-0", Runs("worker-0 slots 0,1,2,3"), Same),
        row(
            "test_parser_local",
            Some(ONE),
            "-H {hf} -e worker-0",
            Runs("(nothing: the filter returns {})"),
            Differs(Err("the selection leaves no slots to run on"), "DeepSpeed's filter returns an empty selection (its test asserts {}), which nothing can run on; glm-launch says so before starting anything"),
        ),
        row(
            "test_parser_local",
            Some(ONE),
            "-H {hf} -e worker-0:0,1,2,3",
            Runs("(nothing: the filter returns {})"),
            Differs(Err("the selection leaves no slots to run on"), "as above: an empty selection is refused with a message"),
        ),
        // test_parser_multinode: hosts {'worker-0': [0..3], 'worker-1': [0..3]}
        row("test_parser_multinode", Some(TWO), "-H {hf}", Runs("worker-0 slots 0,1,2,3; worker-1 slots 0,1,2,3"), Same),
        row("test_parser_multinode", Some(TWO), "-H {hf} -i worker-1:0,3", Runs("worker-1 slots 0,3"), Same),
        row("test_parser_multinode", Some(TWO), "-H {hf} -e worker-1", Runs("worker-0 slots 0,1,2,3"), Same),
        row("test_parser_multinode", Some(TWO), "-H {hf} -e worker-0:0,1@worker-1:3", Runs("worker-0 slots 2,3; worker-1 slots 0,1,2"), Same),
        // test_parser_errors
        row("test_parser_errors", Some(TWO), "-H {hf} -i jeff", Raises("ValueError: Hostname 'jeff' not found in hostfile"), Refuses("--include: unknown host jeff")),
        row("test_parser_errors", Some(TWO), "-H {hf} -e jeff", Raises("ValueError: Hostname 'jeff' not found in hostfile"), Refuses("--exclude: unknown host jeff")),
        row("test_parser_errors", Some(TWO), "-H {hf} -i worker-1:4", Raises("ValueError: No slot '4' specified on host 'worker-1'"), Refuses("--include: host worker-1 has 4 slot(s) (0..3), not slot 4")),
        row("test_parser_errors", Some(TWO), "-H {hf} -e worker-1:4", Raises("ValueError: No slot '4' specified on host 'worker-1'"), Refuses("--exclude: host worker-1 has 4 slot(s) (0..3), not slot 4")),
        row("test_parser_errors", Some(TWO), "-H {hf} -e worker-1@worker-0:1@5", Raises("ValueError: Hostname '5' not found in hostfile"), Refuses("--exclude: unknown host 5")),
        // test_num_plus_parser: no hostfile (DeepSpeed's /job/hostfile is absent there)
        row("test_num_plus_parser", None, "--num_nodes 1 -i localhost", Raises(NUM_WITH_FILTER), Refuses("--num_nodes cannot be combined with --include")),
        row("test_num_plus_parser", None, "--num_nodes 1 --num_gpus 1 -i localhost", Raises(NUM_WITH_FILTER), Refuses("--num_nodes and --num_gpus cannot be combined with --include")),
        row("test_num_plus_parser", None, "--num_gpus 1 -i localhost", Raises(NUM_WITH_FILTER), Refuses("--num_gpus cannot be combined with --include")),
        row("test_num_plus_parser", None, "--num_nodes 1 -e localhost", Raises(NUM_WITH_FILTER), Refuses("--num_nodes cannot be combined with --exclude")),
        row("test_num_plus_parser", None, "--num_nodes 1 --num_gpus 1 -e localhost", Raises(NUM_WITH_FILTER), Refuses("--num_nodes and --num_gpus cannot be combined with --exclude")),
        row("test_num_plus_parser", None, "--num_gpus 1 -e localhost", Raises(NUM_WITH_FILTER), Refuses("--num_gpus cannot be combined with --exclude")),
        // ... and with a hostfile, the same rule
        row("runner.py main", Some(TWO), "-H {hf} --num_gpus 1 -i worker-0", Raises(NUM_WITH_FILTER), Refuses("--num_gpus cannot be combined with --include")),
        // test_hostfile_good
        row(
            "test_hostfile_good",
            Some("\n    worker-1 slots=2\n    worker-2 slots=2\n\n    localhost slots=1\n    123.23.12.10 slots=2\n\n    #worker-1 slots=3\n    # this is a comment\n\n    "),
            "-H {hf}",
            Runs("worker-1 slots 0,1; worker-2 slots 0,1; localhost slots 0; 123.23.12.10 slots 0,1"),
            Same,
        ),
        // test_hostfiles_bad
        row(
            "test_hostfiles_bad",
            Some("\n    worker-1 slots=2\n    worker-2 slots=1\n    worker-1 slots=1\n    "),
            "-H {hf}",
            Raises("ValueError: Hostfile contains multiple entries for worker-1, unable to proceed with launching"),
            Refuses(":4:5: host worker-1 is listed twice (first on line 2)"),
        ),
        row(
            "test_hostfiles_bad",
            Some("\n    this is bad slots=1\n    "),
            "-H {hf}",
            Raises("ValueError: Hostfile contains a bad entry"),
            Refuses(":2:5: `is`: expected slots=<n>"),
        ),
        row("test_hostfiles_bad", Some("\n    missingslots\n    "), "-H {hf}", Raises("ValueError: Hostfile contains a bad entry"), Refuses(":2:5: host missingslots without slots=<n>")),
        row("test_hostfiles_bad", Some("\n    "), "-H {hf}", Raises("ValueError: Hostfile is empty or not formatted correctly"), Refuses("no hosts (expected lines `<host> slots=<n>`)")),
        row(
            "test_hostfiles_bad",
            Some("\n    worker-1 slots=2\n    this is bad slots=1\n    worker-2 slots=4\n    missingslots\n\n    "),
            "-H {hf}",
            Raises("ValueError: Hostfile contains a bad entry"),
            Refuses(":3:5: `is`: expected slots=<n>"),
        ),
        // runner.py: argparse's spellings of the launcher's options
        row("runner.py parse_args", Some(TWO), "--hostfile={hf} --include=worker-1:2", Runs("worker-1 slots 2"), Same),
        row("runner.py parse_args", Some(TWO), "--hostf {hf} --incl worker-0:1", Runs("worker-0 slots 1"), Same),
        row("runner.py parse_args", Some(TWO), "-H{hf} -iworker-1:0,1", Runs("worker-1 slots 0,1"), Same),
        row("runner.py parse_args", Some(TWO), "-H={hf} -e=worker-0", Runs("worker-1 slots 0,1,2,3"), Same),
        row("runner.py parse_args", Some(TWO), "-H {hf} --exclu worker-1:0", Runs("worker-0 slots 0,1,2,3; worker-1 slots 1,2,3"), Same),
        row("runner.py parse_args", Some(TWO), "-H {hf} --num_accelerators 2", Runs("worker-0 slots 0,1; worker-1 slots 0,1"), Same),
        row("runner.py parse_args", Some(TWO), "-H {hf} --num_a=1 --num_n 1", Runs("worker-0 slots 0"), Same),
        row(
            "runner.py parse_args",
            Some(TWO),
            "-H {hf} --num 1",
            Raises("argparse: ambiguous option: --num could match --num_nodes, --num_gpus, --num_accelerators"),
            Refuses("ambiguous option: --num could match --num_nodes, --num_gpus, --num_accelerators"),
        ),
        row("runner.py parse_args", Some(TWO), "-H {hf} -i worker-0:0 -i worker-1", Runs("worker-1 slots 0,1,2,3"), Same),
        row("runner.py parse_args", Some(TWO), "-H {hf} -i '' --num_gpus 1", Runs("worker-0 slots 0; worker-1 slots 0"), Same),
        // runner.py: num_nodes / num_gpus
        row("runner.py main", Some(TWO), "-H {hf} --num_nodes 1 --num_gpus 2", Runs("worker-0 slots 0,1"), Same),
        row("runner.py main", None, "--num_nodes 2", Raises("ValueError: Num nodes is >1 but no extra nodes available via hostfile"), Refuses("--num_nodes 2: 1 host(s) available")),
        row(
            "runner.py main",
            Some(TWO),
            "-H {hf} --num_nodes 3",
            Runs("worker-0 slots 0,1,2,3; worker-1 slots 0,1,2,3"),
            Differs(Err("--num_nodes 3: 2 host(s) available"), "DeepSpeed quietly runs on fewer nodes than asked for; glm-launch refuses a job smaller than requested"),
        ),
        row(
            "runner.py main",
            Some("worker-0 slots=2\n"),
            "-H {hf} --num_gpus 4",
            Runs("worker-0 slots 0,1,2,3"),
            Differs(Err("--num_gpus 4: host worker-0 has 2 selected slot(s)"), "DeepSpeed takes range(N) without looking at the hostfile's slots; glm-launch never starts more workers on a host than its slots"),
        ),
        row(
            "runner.py main",
            Some(TWO),
            "-H {hf} --num_gpus 0",
            Runs("worker-0 slots 0,1,2,3; worker-1 slots 0,1,2,3"),
            Differs(Err("--num_gpus 0"), "DeepSpeed reads 0 as no limit (it limits only N > 0); glm-launch refuses a request for no workers"),
        ),
        row(
            "runner.py fetch_hostfile",
            None,
            "-H {missing}",
            Runs("(this machine: a missing hostfile is ignored with a warning)"),
            Differs(Err("missing"), "a hostfile named on the command line that is not there is a mistake; DeepSpeed's silent fallback to local resources is a common complaint"),
        ),
        // runner.py parse_resource_filter: a host named twice, slot order
        row(
            "runner.py parse_resource_filter",
            Some(ONE),
            "-H {hf} -i worker-0:0,1@worker-0:1",
            Runs("worker-0 slots 1"),
            Differs(Ok("worker-0 slots 0,1"), "DeepSpeed's later entry replaces the earlier one, silently dropping slot 0; glm-launch takes the union (the same result as DeepSpeed wherever its test asserts one)"),
        ),
        row(
            "runner.py parse_resource_filter",
            Some(ONE),
            "-H {hf} -i worker-0@worker-0:1",
            Runs("worker-0 slots 1"),
            Differs(Ok("worker-0 slots 0,1,2,3"), "union again: the whole host absorbs a slot list, in either order"),
        ),
        row(
            "runner.py parse_resource_filter",
            Some(ONE),
            "-H {hf} -i worker-0:3,1",
            Runs("worker-0 slots 3,1"),
            Differs(Ok("worker-0 slots 1,3"), "a host's ranks take its selected slots in ascending order, as they take the hostfile's hosts in order; DeepSpeed keeps the order written"),
        ),
        row("runner.py parse_resource_filter", Some(ONE), "-H {hf} -e worker-0:1@worker-0:2", Runs("worker-0 slots 0,3"), Same),
        row(
            "runner.py parse_resource_filter",
            Some(ONE),
            "-H {hf} -e worker-0:1@worker-0:1",
            Raises("ValueError: list.remove(x): x not in list"),
            Differs(Ok("worker-0 slots 0,2,3"), "DeepSpeed's error is its list.remove failing on the second removal, not a rule; glm-launch takes the union"),
        ),
        // runner.py _parse_hostfile's pattern ^(\S+)\s+slots=(\d+) against OpenMPI's hostfile keys
        row("runner.py _parse_hostfile", Some("worker-0 slots=2 max_slots=4\n"), "-H {hf}", Runs("worker-0 slots 0,1"), Same),
        row("runner.py _parse_hostfile", Some("worker-0 slots=2 max-slots=4\n"), "-H {hf}", Runs("worker-0 slots 0,1"), Same),
        row("runner.py _parse_hostfile", Some("worker-0 slots=2 # two GPUs\n"), "-H {hf}", Runs("worker-0 slots 0,1"), Same),
        row(
            "runner.py _parse_hostfile",
            Some("worker-0 max-slots=3\n"),
            "-H {hf}",
            Raises("ValueError: Hostfile contains a bad entry"),
            Differs(Ok("worker-0 slots 0,1,2"), "OpenMPI's spelling (mpirun reads the same hostfile): max-slots alone is the host's slot count in OpenMPI 4.1"),
        ),
        row(
            "runner.py _parse_hostfile",
            Some("worker-0 max_slots=2 slots=1\n"),
            "-H {hf}",
            Raises("ValueError: Hostfile contains a bad entry"),
            Differs(Ok("worker-0 slots 0"), "OpenMPI reads the keys in any order"),
        ),
        row(
            "runner.py _parse_hostfile",
            Some("worker-0 count=2\n"),
            "-H {hf}",
            Raises("ValueError: Hostfile contains a bad entry"),
            Differs(Ok("worker-0 slots 0,1"), "count= (and cpu=) is OpenMPI's older spelling of slots="),
        ),
        row(
            "runner.py _parse_hostfile",
            Some("worker-0 slots = 2\n"),
            "-H {hf}",
            Raises("ValueError: Hostfile contains a bad entry"),
            Differs(Ok("worker-0 slots 0,1"), "OpenMPI allows spaces around ="),
        ),
        row(
            "runner.py _parse_hostfile",
            Some("worker-0 slots=4 max-slots=2\n"),
            "-H {hf}",
            Runs("worker-0 slots 0,1,2,3"),
            Differs(Err("max-slots=2 is less than slots=4"), "OpenMPI refuses a maximum below the slot count; DeepSpeed ignores everything after slots=N"),
        ),
        row(
            "runner.py _parse_hostfile",
            Some("worker-0 slots=2 gpus=4\n"),
            "-H {hf}",
            Runs("worker-0 slots 0,1"),
            Differs(Err("unknown key `gpus`"), "OpenMPI refuses an unknown key too; DeepSpeed ignores everything after slots=N, so a typo (max_slot=4) would pass silently"),
        ),
        row(
            "runner.py _parse_hostfile",
            Some("worker-0 slots=0\nworker-1 slots=2\n"),
            "-H {hf}",
            Runs("worker-0 slots (none); worker-1 slots 0,1"),
            Differs(Err(":1:1: host worker-0: slots=0"), "a host that runs nothing is a mistake in the file; remove the line instead"),
        ),
    ]
}

/// glm-launch's dry run of `args`: the selection it prints, or its error.
fn dry_run(args: &[String], worker: &Path) -> Result<String, String> {
    let o = Command::new(env!("CARGO_BIN_EXE_glm-launch"))
        .current_dir(repo())
        .env("OMP_NUM_THREADS", "1")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .args(args)
        .args(["--dry-run", "--worker", &worker.display().to_string(), "--config", "ds.json"])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    if !o.status.success() {
        return Err(err);
    }
    let line = out.lines().find(|l| l.contains(" worker(s) on ")).unwrap_or_else(|| panic!("no selection in the dry run: {out}"));
    let command = out.lines().find(|l| l.contains("--config ds.json")).unwrap_or_else(|| panic!("no command in the dry run: {out}"));
    // the launcher's options never reach the worker (the report of issue
    // 19: "unexpected argument '-i'")
    let worker_args = command.rsplit_once(&*worker.display().to_string()).map_or("", |(_, a)| a);
    assert_eq!(worker_args.trim(), "--config ds.json", "{args:?}: {command}");
    Ok(line.split_once("): ").map_or("", |(_, s)| s).to_string())
}

#[test]
fn deepspeed_launcher_rules_row_by_row() {
    let d = tempfile::tempdir().unwrap();
    let worker = d.path().join("w");
    std::fs::write(&worker, "").unwrap();
    let mut failures = Vec::new();
    for (i, r) in rows().iter().enumerate() {
        let hf = d.path().join(format!("hosts-{i}"));
        if let Some(body) = r.hostfile {
            std::fs::write(&hf, body).unwrap();
        }
        let args: Vec<String> = r
            .args
            .split_whitespace()
            .map(|a| {
                if a == "''" {
                    String::new()
                } else {
                    a.replace("{hf}", &hf.display().to_string()).replace("{missing}", &d.path().join("missing").display().to_string())
                }
            })
            .collect();
        let got = dry_run(&args, &worker);
        let ok = match (&r.deepspeed, &r.glm, &got) {
            (Runs(want), Same, Ok(sel)) => sel == want,
            (Raises(raised), Refuses(msg), Err(e)) => !raised.is_empty() && e.contains(msg) && e.lines().count() == 1,
            (_, Differs(Ok(want), why), Ok(sel)) => sel == want && !why.is_empty(),
            (_, Differs(Err(msg), why), Err(e)) => e.contains(msg) && !why.is_empty(),
            _ => false,
        };
        if !ok {
            failures.push(format!("row {i} ({}: {}):\n  DeepSpeed: {:?}\n  expected:  {:?}\n  glm-launch: {got:?}", r.from, r.args, r.deepspeed, r.glm));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// glm-launch takes a launcher option wherever it stands, abbreviated or
/// not; no option of glm-worker (any subcommand's) may be taken for one,
/// so each reaches the worker as written.
#[test]
fn every_worker_option_reaches_the_worker() {
    let worker = repo().join("target/release/glm-worker");
    assert!(worker.is_file(), "{}: build the workspace first (scripts/test.sh does)", worker.display());
    let help = |args: &[&str]| text(&Command::new(&worker).args(args).arg("--help").output().unwrap()).0;
    let commands = |h: &str| -> Vec<String> {
        h.lines()
            .skip_while(|l| !l.starts_with("Commands:"))
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .filter_map(|l| l.split_whitespace().next().map(String::from))
            .filter(|c| c != "help")
            .collect()
    };
    let mut helps = vec![help(&[])];
    for c in commands(&helps[0]) {
        let h = help(&[&c]);
        for sub in commands(&h) {
            helps.push(help(&[&c, &sub]));
        }
        helps.push(h);
    }
    let mut options: Vec<String> = helps
        .iter()
        .flat_map(|h| h.lines())
        .filter_map(|l| l.trim_start().split_once("--").filter(|(before, _)| before.is_empty() || before.ends_with(", ")).map(|(_, rest)| rest))
        .filter_map(|rest| rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_')).next())
        .filter(|o| !o.is_empty() && *o != "help" && *o != "version")
        .map(|o| format!("--{o}"))
        .collect();
    options.sort();
    options.dedup();
    assert!(options.len() > 30 && options.contains(&"--set".to_string()) && options.contains(&"--iters".to_string()), "{options:?}");
    let d = tempfile::tempdir().unwrap();
    let w = d.path().join("w");
    std::fs::write(&w, "").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_glm-launch"))
        .current_dir(repo())
        .args(["--dry-run", "--worker", &w.display().to_string()])
        .args(&options)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains(&format!("{} {}", w.display(), options.join(" "))), "every option after the worker, as written: {options:?}\n{out}");
}
