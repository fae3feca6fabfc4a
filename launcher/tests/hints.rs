//! Every hint glm-launch prints is a command that works: each test provokes
//! a hint, takes the suggested arguments from the output as printed, runs
//! them, and checks that they succeed.
//!
//! Covered elsewhere: `sbatch scripts/pretrain.sbatch` (tests/slurm.rs runs
//! it), `ssh-keygen -R` of a changed host key (tests/ssh.rs names it).

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::{repo, text};

/// glm-launch with `args` (shell words split on spaces: no argument here has one).
fn launch(args: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_glm-launch")).current_dir(repo()).env("OMP_NUM_THREADS", "1").args(args.split_whitespace()).output().unwrap()
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let rest = text.split_once(start).unwrap_or_else(|| panic!("no {start:?} in:\n{text}")).1;
    rest.split_once(end).unwrap_or_else(|| panic!("no {end:?} after {start:?} in:\n{text}")).0
}

#[test]
fn the_local_back_end_names_the_selection_that_runs_here() {
    let d = tempfile::tempdir().unwrap();
    let hosts = d.path().join("hosts");
    let w = d.path().join("w");
    std::fs::write(&w, "").unwrap();
    std::fs::write(&hosts, "node-a slots=2\nlocalhost slots=1\n").unwrap();
    let cmd = format!("--hostfile {} --launcher local --dry-run --worker {} --config ds.json", hosts.display(), w.display());
    let o = launch(&cmd);
    let (_, err) = text(&o);
    assert!(!o.status.success(), "{err}");
    let hint = between(&err, "(use ", ")");
    for alternative in hint.split(", or ") {
        // another back end replaces --launcher local; a selection is added
        let with = if alternative.starts_with("--launcher ") { cmd.replace("--launcher local", alternative) } else { format!("{cmd} {alternative}") };
        let o = launch(&with);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{alternative}: {out}{err}");
        assert!(out.contains("glm-launch: ") && out.contains("--config ds.json"), "{alternative}: {out}");
    }
    assert!(hint.contains("--include localhost"), "{hint}");
    // without this machine in the hostfile, no --include that would select nothing
    std::fs::write(&hosts, "node-a slots=2\n").unwrap();
    let (_, err) = text(&launch(&cmd));
    assert_eq!(between(&err, "(use ", ")"), "--launcher mpirun", "{err}");
}

#[test]
fn the_help_example_of_worker_arguments_runs() {
    let worker = repo().join("target/release/glm-worker");
    assert!(Path::new(&worker).is_file(), "{}: build the workspace first (scripts/test.sh does)", worker.display());
    let (help, _) = text(&launch("--help"));
    let example = between(&help, "(e.g. ", ")");
    // as printed, with train_iters=0 after it: the configuration is validated, nothing trains
    let o = launch(&format!("--launcher local --worker {} {example} --set train_iters=0", worker.display()));
    let (out, err) = text(&o);
    assert!(o.status.success() && out.contains("configuration is valid"), "{out}{err}");
}
