//! `glm-launch`: starts one `glm-worker` per slot of a hostfile so that all
//! of them form one MPI world, and supervises them.
//!
//! glm-launch [--hostfile FILE] [--include H[:S,..][@H..] | --exclude ..]
//!            [--num_nodes N] [--num_gpus N] [--launcher mpirun|mpiexec|local]
//!            [--worker PATH] [--run_dir DIR] [--all_ranks_output] [--dry_run]
//!            <worker arguments: --config ds.json --args configs.json --set k=v ...>
//!
//! Launcher options are recognised by name (dashes or underscores); every
//! other argument goes to the worker. It needs no libtorch, MPI headers or
//! GPU: it builds and runs on a login node.

mod backend;
mod preflight;
mod supervise;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use glm_common::hostfile::{select, Hostfile, Placement, Selection};
use glm_common::launch;

#[derive(Parser, Debug)]
#[command(
    name = "glm-launch",
    version,
    about = "Start glm-worker on every slot of a hostfile as one MPI world, and supervise it",
    after_help = "Every argument that is not an option above goes to glm-worker (e.g. --config ds.json --args configs.json --set train_iters=100); after `--`, everything does."
)]
struct Cli {
    /// DeepSpeed/OpenMPI hostfile (`<host> slots=<n>`); without one, this machine
    #[arg(long)]
    hostfile: Option<PathBuf>,
    /// Hosts/slots to use: NAME[:SLOT[,SLOT...]][@NAME...]
    #[arg(long)]
    include: Option<String>,
    /// Hosts/slots to leave out (same syntax)
    #[arg(long)]
    exclude: Option<String>,
    /// Use the first N hosts
    #[arg(long)]
    num_nodes: Option<usize>,
    /// Use slots 0..N of each host (without a hostfile: N workers on this machine)
    #[arg(long)]
    num_gpus: Option<usize>,
    /// mpirun (OpenMPI), mpiexec (MPICH/Hydra), or local (this machine only)
    #[arg(long, default_value = "mpirun")]
    launcher: String,
    /// The MPI launcher program (default: mpirun, or mpiexec for --launcher mpiexec)
    #[arg(long)]
    mpi: Option<String>,
    /// Exported to every worker as MASTER_ADDR (the workers rendezvous over MPI; kept for tools that read it)
    #[arg(long)]
    master_addr: Option<String>,
    #[arg(long)]
    master_port: Option<u16>,
    /// The worker program (default: glm-worker beside glm-launch, else on PATH)
    #[arg(long)]
    worker: Option<PathBuf>,
    /// Where per-rank logs go (default: glm_runs/run-<unix time>-<pid>)
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Show every rank's output (default: rank 0's, and every rank's errors)
    #[arg(long)]
    all_ranks_output: bool,
    /// Print what would run, and nothing else
    #[arg(long)]
    dry_run: bool,
    /// Skip the preflight (glm-worker env on every host before the launch)
    #[arg(long)]
    no_preflight: bool,
}

/// Launcher options that take a value, and flags (dash or underscore spelling).
const VALUED: &[&str] = &["hostfile", "include", "exclude", "num_nodes", "num_gpus", "launcher", "mpi", "master_addr", "master_port", "worker", "run_dir"];
const FLAGS: &[&str] = &["all_ranks_output", "dry_run", "no_preflight", "help", "version"];

/// Splits argv into the launcher's options (normalised to `--name`) and the
/// worker's arguments (everything else, in order). `--` ends the launcher's.
fn split_args(args: &[String]) -> Result<(Vec<String>, Vec<String>)> {
    let (mut mine, mut theirs) = (vec!["glm-launch".to_string()], Vec::new());
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            theirs.extend(args[i + 1..].iter().cloned());
            break;
        }
        if a == "-h" || a == "-V" {
            mine.push(a.clone());
            i += 1;
            continue;
        }
        let name = a.strip_prefix("--").map(|n| n.split('=').next().unwrap_or(n).replace('-', "_"));
        match name.as_deref() {
            Some(n) if VALUED.contains(&n) => {
                let flag = format!("--{}", n.replace('_', "-"));
                match a.split_once('=') {
                    Some((_, v)) => mine.push(format!("{flag}={v}")),
                    None => {
                        let v = args.get(i + 1).with_context(|| format!("--{n} needs a value"))?;
                        mine.extend([flag, v.clone()]);
                        i += 1;
                    }
                }
            }
            Some(n) if FLAGS.contains(&n) => mine.push(format!("--{}", n.replace('_', "-"))),
            _ => theirs.push(a.clone()),
        }
        i += 1;
    }
    Ok((mine, theirs))
}

/// GPUs on this machine (NVIDIA driver's list), 0 without any.
fn local_gpus() -> usize {
    std::fs::read_dir("/proc/driver/nvidia/gpus").map(|d| d.count()).unwrap_or(0)
}

fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}

fn is_local(host: &str) -> bool {
    host == "localhost" || host == "127.0.0.1" || host == this_host()
}

/// The worker program: `--worker`, else `glm-worker` beside this binary, else PATH's.
fn worker_program(cli: &Cli) -> Result<String> {
    if let Some(w) = &cli.worker {
        if !w.is_file() {
            bail!("--worker {}: no such file", w.display());
        }
        return Ok(std::fs::canonicalize(w).unwrap_or(w.clone()).display().to_string());
    }
    let beside = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("glm-worker"))).filter(|p| p.is_file());
    Ok(beside.map_or_else(|| "glm-worker".to_string(), |p| p.display().to_string()))
}

/// The environment every worker gets: the forwarded variables of this
/// process, then `.glm_env` from the home and working directories (later
/// wins), MASTER_ADDR/PORT when given, and the output contract.
fn worker_env(cli: &Cli) -> Result<Vec<(String, String)>> {
    // later sources override earlier ones
    let mut env: std::collections::BTreeMap<String, String> = std::env::vars().filter(|(k, _)| launch::forwarded(k) && k != "CUDA_VISIBLE_DEVICES").collect();
    let mut files = Vec::new();
    if let Some(home) = std::env::var_os("HOME") {
        files.push(Path::new(&home).join(launch::ENV_FILE));
    }
    files.push(PathBuf::from(launch::ENV_FILE));
    for f in files.iter().filter(|f| f.is_file()) {
        env.extend(launch::read_env_file(f)?);
    }
    if let Some(a) = &cli.master_addr {
        env.insert("MASTER_ADDR".into(), a.clone());
    }
    if let Some(p) = cli.master_port {
        env.insert("MASTER_PORT".into(), p.to_string());
    }
    if cli.all_ranks_output {
        env.insert(launch::ALL_RANKS_OUTPUT.into(), "1".into());
    }
    Ok(env.into_iter().collect())
}

fn placement(cli: &Cli) -> Result<Placement> {
    if (cli.num_nodes.is_some() || cli.num_gpus.is_some()) && (cli.include.is_some() || cli.exclude.is_some()) && cli.hostfile.is_some() {
        bail!("--num_nodes/--num_gpus cannot be combined with --include/--exclude (as in DeepSpeed): name the slots in --include instead");
    }
    let mut sel = Selection { include: cli.include.clone(), exclude: cli.exclude.clone(), num_nodes: cli.num_nodes, num_gpus: cli.num_gpus };
    let pool: Vec<(String, usize)> = match &cli.hostfile {
        Some(f) => Hostfile::load(f)?.hosts.into_iter().map(|h| (h.name, h.slots)).collect(),
        None => {
            // this machine: its GPUs — those CUDA_VISIBLE_DEVICES names, as
            // DeepSpeed does — or --num_gpus CPU workers (1 by default)
            let visible: Option<Vec<usize>> = std::env::var("CUDA_VISIBLE_DEVICES").ok().and_then(|v| v.split(',').map(|d| d.trim().parse().ok()).collect());
            let gpus = local_gpus();
            if let (Some(v), true, None, None) = (&visible, gpus > 0, &sel.include, &sel.exclude) {
                sel.include = Some(format!("localhost:{}", v.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")));
            }
            let n = match (gpus, cli.num_gpus) {
                (0, n) => n.unwrap_or(1),
                (g, _) => g,
            };
            if n == 0 {
                bail!("--num_gpus 0: nothing to run");
            }
            vec![("localhost".to_string(), n)]
        }
    };
    Ok(select(&pool, &sel)?)
}

/// `program` if it is a path to a file, else its place on PATH.
fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).is_file().then(|| PathBuf::from(program));
    }
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(program)).find(|p| p.is_file()))
}

/// The MPI implementation behind `program` (`--version`), else `default`.
fn detect(program: String, default: backend::Flavor) -> (backend::Flavor, String) {
    let out = std::process::Command::new(&program).arg("--version").output();
    let text = out.map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))).unwrap_or_default();
    (backend::Flavor::detect(&text).unwrap_or(default), program)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("glm-launch: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> Result<i32> {
    let (mine, worker_args) = split_args(args)?;
    let cli = Cli::parse_from(&mine);
    let place = placement(&cli)?;
    let (flavor, program) = match cli.launcher.as_str() {
        "mpirun" | "local" => detect(cli.mpi.clone().unwrap_or_else(|| "mpirun".into()), backend::Flavor::OpenMpi),
        "mpiexec" => detect(cli.mpi.clone().unwrap_or_else(|| "mpiexec".into()), backend::Flavor::Mpich),
        "ssh" | "slurm" => bail!("--launcher {}: not implemented yet (use mpirun, mpiexec or local)", cli.launcher),
        other => bail!("--launcher {other}: expected mpirun, mpiexec or local"),
    };
    if cli.launcher == "local" {
        if let Some((h, _)) = place.hosts.iter().find(|(h, _)| !is_local(h)) {
            bail!("--launcher local runs on this machine only, but the selection includes host {h} (use --launcher mpirun, or --include localhost)");
        }
    }
    backend::supported(flavor, &place).map_err(anyhow::Error::msg)?;
    let mut worker = vec![worker_program(&cli)?];
    worker.extend(worker_args.iter().cloned());
    let env = worker_env(&cli)?;
    let all_local = place.hosts.iter().all(|(h, _)| is_local(h));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let job = backend::Job {
        placement: &place,
        worker: &worker,
        env: &env,
        // SAFETY: geteuid has no preconditions.
        as_root: unsafe { libc::geteuid() } == 0,
        oversubscribe: all_local && place.world_size() > cores,
    };
    let argv = backend::command(flavor, &program, &job);
    let ranks: Vec<String> = place.ranks().iter().map(|(h, _, _)| h.to_string()).collect();
    println!("glm-launch: {} worker(s) on {} host(s): {}", place.world_size(), place.hosts.len(), place.hosts.iter().map(|(h, s)| format!("{h} slots {}", s.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","))).collect::<Vec<_>>().join("; "));
    println!("glm-launch: environment for every worker: {}", env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(" "));
    println!("glm-launch: {}", backend::display(&argv));
    if cli.dry_run {
        return Ok(0);
    }
    if which(&program).is_none() {
        bail!("{program}: not found (install OpenMPI's mpirun or MPICH's mpiexec on this machine, or name it with --mpi)");
    }
    if !cli.no_preflight {
        // one process per host (app contexts: rank i is host i), with the
        // job's environment, every GPU visible
        let one = Placement { hosts: place.hosts.iter().map(|(h, _)| (h.clone(), vec![0])).collect() };
        let probe = ["env", "-u", "CUDA_VISIBLE_DEVICES", worker[0].as_str(), "env"].map(String::from);
        let pre = backend::command(flavor, &program, &backend::Job { placement: &one, worker: &probe, env: &env, as_root: job.as_root, oversubscribe: false });
        let wants_cuda = worker_args.windows(2).any(|w| w[0] == "--device" && w[1].starts_with("cuda")) || worker_args.iter().any(|a| a.starts_with("--device=cuda"));
        let (rows, ok) = preflight::run(&pre, &env, &place, env!("CARGO_PKG_VERSION"), wants_cuda);
        println!("glm-launch: preflight: glm-worker env on every host");
        for r in &rows {
            println!("{r}");
        }
        if !ok {
            bail!("preflight failed (see the table above); nothing was started");
        }
    }
    let run_dir = cli.run_dir.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        PathBuf::from("glm_runs").join(format!("run-{secs}-{}", std::process::id()))
    });
    println!("glm-launch: per-rank logs in {}", run_dir.join("logs").display());
    let out = supervise::run(&argv, &env, &ranks, &run_dir, cli.all_ranks_output)?;
    match &out.report {
        None => println!("glm-launch: every worker finished"),
        Some(r) => eprintln!("glm-launch: {r}"),
    }
    Ok(out.code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launcher_options_are_taken_out_and_the_rest_goes_to_the_worker() {
        let args: Vec<String> = "--hostfile h --config ds.json --num-gpus=2 --set train_iters=5 --dry_run --all-ranks-output -- --num_gpus 7"
            .split_whitespace()
            .map(String::from)
            .collect();
        let (mine, theirs) = split_args(&args).unwrap();
        assert_eq!(mine, vec!["glm-launch", "--hostfile", "h", "--num-gpus=2", "--dry-run", "--all-ranks-output"]);
        assert_eq!(theirs, vec!["--config", "ds.json", "--set", "train_iters=5", "--num_gpus", "7"]);
        assert!(split_args(&["--hostfile".to_string()]).unwrap_err().to_string().contains("--hostfile needs a value"));
    }
}
