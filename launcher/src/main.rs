//! `glm-launch`: starts one `glm-worker` per slot of a hostfile so that all
//! of them form one MPI world, and supervises them.
//!
//! glm-launch [-H|--hostfile FILE] [-i|--include H[:S,..][@H..] | -e|--exclude ..]
//!            [--num_nodes N] [--num_gpus|--num_accelerators N]
//!            [--launcher mpirun|mpiexec|ssh|slurm|local]
//!            [--ssh_config F] [--ssh_user U] [--ssh_port P] [--ssh_identity KEY]
//!            [--ssh_accept_new_host_keys]
//!            [--worker PATH] [--run_dir DIR] [--all_ranks_output] [--dry_run]
//!            <worker arguments: --config ds.json --args configs.json --set k=v ...>
//!
//! Launcher options are recognised by name wherever they stand (dashes or
//! underscores, DeepSpeed's short and long spellings, and any unambiguous
//! prefix of a long one, as DeepSpeed's argparse allows); every other
//! argument goes to the worker, and after `--` everything does. It needs
//! no libtorch, MPI headers or GPU: it builds and runs on a login node.

mod backend;
mod job;
mod plan;
mod preflight;
mod progress;
mod restart;
mod ssh;
mod supervise;
mod tagged;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser};
use glm_common::hostfile::{limit, select, Hostfile, Placement, Selection};
use glm_common::launch;

#[derive(Parser, Debug)]
#[command(
    name = "glm-launch",
    version,
    about = "Start glm-worker on every slot of a hostfile as one MPI world, and supervise it",
    // a repeated option: the last one counts, as in DeepSpeed's argparse
    args_override_self = true,
    after_help = "Every argument that is not an option above goes to glm-worker (e.g. --config configs/config_block_tiny.json --args configs/configs_tiny.json --set train_iters=100 --collective-timeout 300); after `--`, everything does. glm-launch reads the worker's --collective-timeout (or configs.json's collective_timeout, 600 s) too: it stops a job whose ranks make no progress for longer, naming the ranks that hold the others up. Options are spelled with dashes or underscores (--num-gpus, --num_gpus), DeepSpeed's spellings are accepted (-H, -i, -e, --num_accelerators), and a long option may be shortened to any unambiguous prefix (--hostf, --incl), as DeepSpeed's launcher allows."
)]
struct Cli {
    #[command(flatten)]
    hosts: Hosts,
    /// mpirun (OpenMPI), mpiexec (MPICH/Hydra), ssh (OpenMPI's mpirun starting its daemons through glm-launch's own SSH connections), slurm (one srun step inside a Slurm allocation, on its nodes), or local (this machine only)
    #[arg(long, default_value = "mpirun")]
    launcher: String,
    /// ssh back end: the OpenSSH client config to read (default ~/.ssh/config)
    #[arg(long)]
    ssh_config: Option<PathBuf>,
    /// ssh back end: log in as this user on every host (over the config's User)
    #[arg(long)]
    ssh_user: Option<String>,
    /// ssh back end: connect to this port on every host (over the config's Port)
    #[arg(long)]
    ssh_port: Option<u16>,
    /// ssh back end: private key to try first (after ssh-agent's keys)
    #[arg(long)]
    ssh_identity: Option<PathBuf>,
    /// ssh back end: accept and record the key of a host not in known_hosts (a changed key is always refused)
    #[arg(long)]
    ssh_accept_new_host_keys: bool,
    /// The MPI launcher program (default: mpirun, or mpiexec for --launcher mpiexec, srun for --launcher slurm)
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
    /// Skip the preflight (glm-worker env on every host before the launch; it includes the plan check)
    #[arg(long)]
    no_preflight: bool,
    /// Start the job even when its plan says it does not fit the selected devices' memory
    #[arg(long)]
    no_plan_check: bool,
    /// After a failure (a rank that exits, is killed or hangs, a host that drops), start the job again from the latest checkpoint, up to N times (torchrun's --max-restarts)
    #[arg(long, value_name = "N", default_value_t = 0)]
    max_restarts: usize,
    /// Elastic shrink: on a restart, leave out the hosts that fail the preflight while at least M remain, keeping the global batch by more gradient accumulation (needs --max-restarts)
    #[arg(long, value_name = "M")]
    min_nodes: Option<usize>,
}

/// The hosts and slots of a job: a hostfile and DeepSpeed's selection
/// (glm-launch's and glm-launch plan's).
#[derive(clap::Args, Debug)]
pub(crate) struct Hosts {
    /// DeepSpeed/OpenMPI hostfile (`<host> slots=<n>`); without one, this machine
    #[arg(short = 'H', long)]
    hostfile: Option<PathBuf>,
    /// Hosts/slots to use: NAME[:SLOT[,SLOT...]][@NAME...] (a host named twice gets the union of its slots)
    #[arg(short = 'i', long)]
    include: Option<String>,
    /// Hosts/slots to leave out (same syntax)
    #[arg(short = 'e', long)]
    exclude: Option<String>,
    /// Use the first N hosts (not with --include/--exclude)
    #[arg(long)]
    num_nodes: Option<usize>,
    /// Use slots 0..N of each host (without a hostfile: N workers on this machine; not with --include/--exclude)
    #[arg(long, visible_alias = "num-accelerators")]
    num_gpus: Option<usize>,
}

impl Hosts {
    fn selection(&self) -> Selection {
        Selection { include: self.include.clone(), exclude: self.exclude.clone(), num_nodes: self.num_nodes, num_gpus: self.num_gpus }
    }

    /// The hosts and slots a hostfile gives, under the selection; `None`
    /// without a hostfile.
    pub(crate) fn hostfile_placement(&self) -> Result<Option<Placement>> {
        let Some(f) = &self.hostfile else { return Ok(None) };
        let sel = self.selection();
        sel.check()?;
        let pool: Vec<(String, usize)> = Hostfile::load(f)?.hosts.into_iter().map(|h| (h.name, h.slots)).collect();
        Ok(Some(select(&pool, &sel)?))
    }

    /// Whether any selection flag is given.
    pub(crate) fn selecting(&self) -> bool {
        self.include.is_some() || self.exclude.is_some() || self.num_nodes.is_some() || self.num_gpus.is_some()
    }
}

/// Every spelling of a launcher option after `--`, from `Cli` (its long
/// names and aliases, dashes read as underscores; clap's `--help` and
/// `--version` too): the spelling, the long name clap knows it by, and
/// whether it takes a value. DeepSpeed's `--num_accelerators` is an alias
/// of `--num_gpus`.
fn long_options() -> Vec<(String, String, bool)> {
    let mut cmd = Cli::command();
    cmd.build();
    let mut out = Vec::new();
    for a in cmd.get_arguments() {
        let Some(long) = a.get_long() else { continue };
        let valued = a.get_action().takes_values();
        for spelling in std::iter::once(long).chain(a.get_all_aliases().into_iter().flatten()) {
            out.push((spelling.replace('-', "_"), long.to_string(), valued));
        }
    }
    out
}

/// The single-dash options (DeepSpeed's `-H`, `-i`, `-e`, and `-h`/`-V`):
/// the letter, the long name, whether it takes a value.
fn short_options() -> Vec<(char, String, bool)> {
    let mut cmd = Cli::command();
    cmd.build();
    cmd.get_arguments().filter_map(|a| Some((a.get_short()?, a.get_long()?.to_string(), a.get_action().takes_values()))).collect()
}

/// The launcher option `name` (after `--`, before any `=`) spells: itself,
/// or, like Python's argparse (DeepSpeed's launcher), an unambiguous
/// prefix of one; `None` when it is no launcher option (a worker
/// argument), an error when it is a prefix of several. Returns the long
/// name and whether it takes a value.
fn long_option(name: &str) -> Result<Option<(String, bool)>> {
    let n = name.replace('-', "_");
    if n.is_empty() {
        return Ok(None);
    }
    let options = long_options();
    if let Some((_, long, valued)) = options.iter().find(|(s, _, _)| *s == n) {
        return Ok(Some((long.clone(), *valued)));
    }
    let matches: Vec<&(String, String, bool)> = options.iter().filter(|(s, _, _)| s.starts_with(&n)).collect();
    match matches.as_slice() {
        [] => Ok(None),
        [(_, long, valued)] => Ok(Some((long.clone(), *valued))),
        several => {
            let names: Vec<String> = several.iter().map(|(s, _, _)| format!("--{s}")).collect();
            bail!("ambiguous option: --{name} could match {} (write more of it)", names.join(", "))
        }
    }
}

/// Splits argv into the launcher's options (as `--field=value` or
/// `--field`, in clap's dash spelling) and the worker's arguments
/// (everything else, in order). `--` ends the launcher's.
fn split_args(args: &[String]) -> Result<(Vec<String>, Vec<String>)> {
    let (mut mine, mut theirs) = (vec!["glm-launch".to_string()], Vec::new());
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            theirs.extend(args[i + 1..].iter().cloned());
            break;
        }
        // (long name, takes a value, value given in the same argument, as written)
        let option: Option<(String, bool, Option<String>, String)> = if let Some(body) = a.strip_prefix("--") {
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            long_option(name)?.map(|(long, valued)| (long, valued, inline, format!("--{name}")))
        } else if let Some(rest) = a.strip_prefix('-') {
            // -i VALUE, -iVALUE, -i=VALUE (argparse's forms); -h, -V alone
            let mut chars = rest.chars();
            let first = chars.next();
            match short_options().into_iter().find(|(c, _, _)| Some(*c) == first) {
                Some((c, long, valued)) => match (valued, chars.as_str()) {
                    (_, "") => Some((long, valued, None, format!("-{c}"))),
                    (true, attached) => Some((long, true, Some(attached.strip_prefix('=').unwrap_or(attached).to_string()), format!("-{c}"))),
                    // -hx: not ours
                    (false, _) => None,
                },
                None => None,
            }
        } else {
            None
        };
        let Some((field, valued, inline, spelled)) = option else {
            theirs.push(a.clone());
            i += 1;
            continue;
        };
        // for errors: the option as written, and which one it is when abbreviated
        let what = if spelled.trim_start_matches('-').replace('-', "_") == field.replace('-', "_") {
            spelled.clone()
        } else {
            format!("{spelled} (--{})", field.replace('-', "_"))
        };
        let flag = format!("--{field}");
        match (valued, inline) {
            (false, Some(_)) => bail!("{what} takes no value"),
            (false, None) => mine.push(flag),
            (true, Some(v)) => mine.push(format!("{flag}={v}")),
            (true, None) => {
                i += 1;
                let v = args.get(i).with_context(|| format!("{what} needs a value"))?;
                mine.push(format!("{flag}={v}"));
            }
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
/// wins), MASTER_ADDR/PORT when given, and the output contract (every rank
/// prints; the launcher filters the console).
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
    // every rank prints, so every rank's log file is whole; glm-launch
    // decides what reaches the console (--all_ranks_output)
    env.insert(launch::ALL_RANKS_OUTPUT.into(), "1".into());
    Ok(env.into_iter().collect())
}

/// The hosts and slots of the job; without a hostfile this machine's GPUs,
/// or more with `gpus_shared` and `--num_gpus`.
fn placement(cli: &Cli, gpus_shared: bool) -> Result<Placement> {
    let hosts = &cli.hosts;
    // DeepSpeed's rules on the flags as given, with a hostfile or without
    if let Some(p) = hosts.hostfile_placement()? {
        return Ok(p);
    }
    let sel = hosts.selection();
    sel.check()?;
    // this machine: its GPUs — those CUDA_VISIBLE_DEVICES names, as
    // DeepSpeed does — or --num_gpus CPU workers (1 by default)
    let visible: Option<Vec<usize>> = std::env::var("CUDA_VISIBLE_DEVICES").ok().and_then(|v| v.split(',').map(|d| d.trim().parse().ok()).collect());
    let gpus = local_gpus();
    let n = match (gpus, hosts.num_gpus) {
        (0, n) => n.unwrap_or(1),
        (g, Some(k)) if gpus_shared && k > g => k,
        (g, _) => g,
    };
    if n == 0 {
        bail!("--num_gpus 0: nothing to run");
    }
    let pool = vec![("localhost".to_string(), n)];
    if let (Some(v), true, None, None) = (&visible, gpus > 0, sel.include(), sel.exclude()) {
        // the visible GPUs, then --num_nodes/--num_gpus among them
        let include = format!("localhost:{}", v.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(","));
        let visible = select(&pool, &Selection { include: Some(include), ..Default::default() })?;
        return Ok(limit(visible, hosts.num_nodes, hosts.num_gpus)?);
    }
    Ok(select(&pool, &sel)?)
}

/// `program` if it is a path to a file, else its place on PATH.
pub(crate) fn which(program: &str) -> Option<PathBuf> {
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

/// What to do on the first Ctrl-C/SIGTERM when no worker runs on this
/// machine: SIGTERM every worker of this job (marked by its GLM_LAUNCH_ID)
/// on every host, over the ssh back end's connections; returns on how many
/// hosts a worker was found.
fn ssh_stopper(targets: Vec<ssh::Target>, id: String) -> impl Fn() -> usize + Send + Sync {
    move || {
        let script = format!(
            "n=0; for d in /proc/[0-9]*; do if tr '\\0' '\\n' < $d/environ 2>/dev/null | grep -qxF {pattern}; then kill -TERM ${{d#/proc/}} 2>/dev/null && n=$((n+1)); fi; done; echo $n\n",
            pattern = ssh::quote(&format!("{}={id}", launch::LAUNCH_ID))
        );
        std::thread::scope(|s| {
            let asks: Vec<_> = targets
                .iter()
                .map(|t| {
                    let script = &script;
                    s.spawn(move || {
                        let r = ssh::run_script(t, script, std::time::Duration::from_secs(15));
                        match r {
                            Ok((_, out, _)) => usize::from(out.trim().parse::<usize>().unwrap_or(0) > 0),
                            Err(e) => {
                                eprintln!("glm-launch: cannot signal the workers on {}: {e:#}", t.describe());
                                0
                            }
                        }
                    })
                })
                .collect();
            asks.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        })
    }
}

/// The slurm back end's placement: the allocation's nodes (the first
/// `--num_nodes`), `--num_gpus` workers on each, else the allocation's tasks
/// per node.
fn slurm_placement(cli: &Cli) -> Result<Placement> {
    let Some(job) = std::env::var("SLURM_JOB_ID").ok().filter(|j| !j.is_empty()) else {
        bail!("--launcher slurm runs inside a Slurm allocation, and there is none here (SLURM_JOB_ID unset): submit a batch job (sbatch scripts/pretrain.sbatch), or run glm-launch --launcher slurm inside salloc");
    };
    if cli.hosts.hostfile.is_some() || cli.hosts.include.is_some() || cli.hosts.exclude.is_some() {
        bail!("--launcher slurm: allocation {job} decides the hosts; --hostfile/--include/--exclude do not apply (use --num_nodes / --num_gpus, or ask sbatch/salloc for other nodes)");
    }
    let list = std::env::var("SLURM_JOB_NODELIST").or_else(|_| std::env::var("SLURM_NODELIST")).context("SLURM_JOB_NODELIST is unset inside the allocation")?;
    let out = std::process::Command::new("scontrol").args(["show", "hostnames", &list]).output().context("scontrol (to expand SLURM_JOB_NODELIST)")?;
    anyhow::ensure!(out.status.success(), "scontrol show hostnames {list}: {}", String::from_utf8_lossy(&out.stderr).trim());
    let mut nodes: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(String::from).collect();
    anyhow::ensure!(!nodes.is_empty(), "allocation {job} lists no node ({list})");
    if let Some(n) = cli.hosts.num_nodes {
        anyhow::ensure!(n >= 1 && n <= nodes.len(), "--num_nodes {n}: allocation {job} has {} node(s)", nodes.len());
        nodes.truncate(n);
    }
    // "2(x3),1" -> [2, 2, 2, 1]
    let per_node_env: Vec<usize> = std::env::var("SLURM_TASKS_PER_NODE")
        .unwrap_or_default()
        .split(',')
        .filter(|p| !p.is_empty())
        .flat_map(|p| match p.split_once("(x") {
            Some((k, r)) => vec![k.parse().unwrap_or(0); r.trim_end_matches(')').parse().unwrap_or(0)],
            None => vec![p.parse().unwrap_or(0)],
        })
        .collect();
    let per_node = match cli.hosts.num_gpus {
        Some(0) => bail!("--num_gpus 0: nothing to run"),
        Some(g) => g,
        None => per_node_env.iter().take(nodes.len()).copied().min().filter(|&k| k > 0).unwrap_or(1),
    };
    Ok(Placement { hosts: nodes.into_iter().map(|h| (h, (0..per_node).collect())).collect() })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--ssh-exec") {
        // OpenMPI's remote-start agent (plm_rsh_agent) for the ssh back end
        return ExitCode::from(ssh::agent_main(&args[1..]).clamp(0, 255) as u8);
    }
    let result = if args.first().is_some_and(|a| a == "plan") { plan::main(&args[1..]) } else { run(&args) };
    match result {
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
    let use_slurm = cli.launcher == "slurm";
    let env = worker_env(&cli)?;
    // ranks staging collectives through host memory may share GPUs
    let gpus_shared = launch::CommBackend::of_job(&env)? == launch::CommBackend::HostStaged;
    let mut place = if use_slurm { slurm_placement(&cli)? } else { placement(&cli, gpus_shared)? };
    let (flavor, program) = match cli.launcher.as_str() {
        "mpirun" | "local" | "ssh" => detect(cli.mpi.clone().unwrap_or_else(|| "mpirun".into()), backend::Flavor::OpenMpi),
        "mpiexec" => detect(cli.mpi.clone().unwrap_or_else(|| "mpiexec".into()), backend::Flavor::Mpich),
        // srun is Slurm's, whatever MPI the workers link (PMIx wires them up)
        "slurm" => (backend::Flavor::OpenMpi, cli.mpi.clone().unwrap_or_else(|| "srun".into())),
        other => bail!("--launcher {other}: expected mpirun, mpiexec, ssh, slurm or local"),
    };
    let use_ssh = cli.launcher == "ssh";
    if use_ssh && flavor != backend::Flavor::OpenMpi {
        bail!("--launcher ssh starts OpenMPI's daemons through glm-launch's own SSH connections, but {program} is not OpenMPI's mpirun (name it with --mpi)");
    }
    let ssh_opts = ssh::Options {
        config: cli.ssh_config.clone(),
        user: cli.ssh_user.clone(),
        port: cli.ssh_port,
        identity: cli.ssh_identity.clone(),
        accept_new: cli.ssh_accept_new_host_keys,
    };
    if !use_ssh && ssh_opts != ssh::Options::default() {
        bail!("--ssh_* options are for --launcher ssh (with --launcher {}, mpirun's own ssh and ~/.ssh/config decide)", cli.launcher);
    }
    if let Some(f) = &ssh_opts.config {
        if !f.is_file() {
            bail!("--ssh_config {}: no such file", f.display());
        }
    }
    // every host's address, user, port and keys, before anything runs (each attempt resolves them again)
    if use_ssh {
        place.hosts.iter().try_for_each(|(h, _)| ssh::resolve(h, &ssh_opts).map(|_| ()))?;
    }
    let agent = if use_ssh {
        let me = std::env::current_exe().context("cannot find glm-launch's own path (the ssh back end's remote-start agent)")?;
        let me = me.display().to_string();
        if me.contains([' ', ':', '\'', '"']) {
            bail!("glm-launch's path {me} holds a space, quote or ':', which OpenMPI's plm_rsh_agent cannot carry; install it elsewhere");
        }
        Some(format!("{me} --ssh-exec"))
    } else {
        None
    };
    if cli.launcher == "local" {
        if let Some((h, _)) = place.hosts.iter().find(|(h, _)| !is_local(h)) {
            // the hosts of the selection that are this machine, if any
            let here: Vec<&str> = place.hosts.iter().map(|(h, _)| h.as_str()).filter(|h| is_local(h)).collect();
            let include = if here.is_empty() { String::new() } else { format!(", or --include {}", here.join("@")) };
            bail!("--launcher local runs on this machine only, but the selection includes host {h} (use --launcher mpirun{include})");
        }
    }
    if !use_slurm {
        backend::supported(flavor, &place).map_err(anyhow::Error::msg)?;
    }
    let worker_program = worker_program(&cli)?;
    // marks this job's workers (a stop signal finds them by it on every host)
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let launch_id = format!("{secs}-{}-{}", std::process::id(), this_host());
    let tags = match (use_slurm, flavor) {
        (true, _) => supervise::Tags::Srun,
        (false, backend::Flavor::OpenMpi) => supervise::Tags::OpenMpi,
        (false, backend::Flavor::Mpich) => supervise::Tags::Mpich,
    };
    // what the launcher reads of the job: the disk a checkpoint needs, the
    // collective deadline, the save directory, the batch sizes
    // (a dry run prints the command whatever the worker's arguments say)
    let job = match job::Job::read(&worker_args) {
        Err(_) if cli.dry_run => None,
        j => j?,
    };
    // the worker's --collective-timeout (which glm-launch passes on as it is), else configs.json's
    let timeout = match job::flag_value(&worker_args, "--collective-timeout") {
        // (a bad value is the worker's to refuse, with its own message)
        Some(v) => launch::positive_seconds(&v).ok(),
        None => job.as_ref().map(|j| j.args.collective_timeout),
    };
    let watch = timeout.filter(|_| job.as_ref().is_some_and(|j| j.trains())).map(|t| supervise::Watch::new(std::time::Duration::from_secs_f64(t)));
    let mut env = env;
    if let Some(w) = watch {
        env.push((launch::HEARTBEAT_VAR.into(), format!("{}", w.interval.as_secs_f64())));
    }
    let save = job.as_ref().and_then(|j| j.save()).map(Path::to_path_buf);
    if cli.max_restarts > 0 && save.is_none() {
        bail!("--max-restarts {} restarts from the latest checkpoint, and the job saves none: set save (--set save=<dir>) and save_interval", cli.max_restarts);
    }
    if let (Some(dir), true) = (&save, cli.max_restarts > 0) {
        if !dir.is_dir() && !dir.parent().is_some_and(|p| p.as_os_str().is_empty() || p.is_dir()) {
            eprintln!(
                "glm-launch: warning: --max-restarts resumes from the latest checkpoint in {}, which glm-launch cannot see from here: put it on a filesystem this machine shares with the workers",
                dir.display()
            );
        }
        if job.as_ref().is_some_and(|j| j.args.no_save_optim) {
            eprintln!("glm-launch: warning: no_save_optim: a restart resumes the weights only (Adam's moments start again), so it does not continue exactly");
        }
    }
    if let Some(m) = cli.min_nodes {
        if cli.max_restarts == 0 {
            bail!("--min-nodes {m} shrinks the job on a restart: give --max-restarts too");
        }
        if cli.no_preflight {
            bail!("--min-nodes {m} leaves out the hosts that fail the preflight: it cannot shrink with --no-preflight");
        }
        if m == 0 || m > place.hosts.len() {
            bail!("--min-nodes {m}: between 1 and the {} host(s) selected", place.hosts.len());
        }
    }
    let run_dir = cli.run_dir.clone().unwrap_or_else(|| PathBuf::from("glm_runs").join(format!("run-{secs}-{}", std::process::id())));
    let ctx = Attempt {
        cli: &cli,
        program: &program,
        flavor,
        tags,
        use_ssh,
        use_slurm,
        ssh_opts: &ssh_opts,
        agent: agent.as_deref(),
        gpus_shared,
        launch_id: &launch_id,
        worker_program: &worker_program,
        disk: job.as_ref().and_then(|j| j.disk()),
    };
    // the global batch of the first layout, which an elastic restart keeps
    let first_batch = match (&job, cli.min_nodes) {
        (Some(j), Some(_)) if j.trains() => Some(j.batch(place.world_size())?),
        _ => None,
    };
    let tp = job.as_ref().map_or(1, |j| j.args.model_parallel_size.max(1));
    let (mut attempt, mut previous, mut extra): (usize, Option<restart::Seen>, Vec<String>) = (0, None, Vec::new());
    // the record of the restart under way, written once it has started (or shrunk)
    let mut pending: Option<restart::Record> = None;
    loop {
        let mut args_now = worker_args.clone();
        for s in &extra {
            args_now.extend(["--set".to_string(), s.clone()]);
        }
        let mut env_now = env.clone();
        env_now.push((launch::RESTART_COUNT_VAR.into(), attempt.to_string()));
        let attempt_dir = if attempt == 0 { run_dir.clone() } else { run_dir.join(format!("restart-{attempt}")) };
        let started = std::time::SystemTime::now();
        let attempted = match ctx.run(&place, &args_now, &env_now, &attempt_dir, watch, attempt == 0) {
            Ok(s) => s,
            Err(e) => {
                // a restart refused before it started (its plan no longer fits) keeps its record
                if let Some(r) = pending.take() {
                    r.append(&run_dir)?;
                }
                return Err(e);
            }
        };
        let out = match attempted {
            Started::DryRun => return Ok(0),
            Started::Preflight(checked) => {
                let failed = &checked.failed;
                let dropped: Vec<String> = failed.iter().map(|&i| place.hosts[i].0.clone()).collect();
                let keep: Vec<(String, Vec<usize>)> = place.hosts.iter().enumerate().filter(|(i, _)| !failed.contains(i)).map(|(_, h)| h.clone()).collect();
                // a restart on fewer hosts, when the rest are enough and
                // every one of them was checked
                let why = match (cli.min_nodes, attempt) {
                    (_, 0) => "nothing was started".to_string(),
                    (None, _) => format!(
                        "restart {attempt} was not started (the latest checkpoint stays in {})",
                        save.as_ref().map_or("?".into(), |s| s.display().to_string())
                    ),
                    (Some(_), _) if !checked.unchecked.is_empty() || failed.is_empty() => format!(
                        "restart {attempt} was not started: the preflight could not check {} (see its messages), so no host can be left out safely",
                        checked.unchecked.iter().map(|&i| place.hosts[i].0.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                    (Some(min), _) if keep.len() < min => {
                        format!(
                            "preflight failed on {} and {} host(s) are left (--min-nodes {min}): restart {attempt} was not started",
                            dropped.join(", "),
                            keep.len()
                        )
                    }
                    _ => String::new(),
                };
                let shrunk = Placement { hosts: keep };
                let shrink = if why.is_empty() {
                    first_batch.context("elastic shrink needs the job's batch sizes").and_then(|b| job::keep_batch(b, shrunk.world_size(), tp).map(|s| (b, s)))
                } else {
                    Err(anyhow::anyhow!("preflight failed (see the table above); {why}"))
                };
                let (b, keep_sets) = match shrink {
                    Ok(x) => x,
                    Err(e) => {
                        if let Some(r) = pending.take() {
                            r.append(&run_dir)?;
                        }
                        return Err(e);
                    }
                };
                println!(
                    "glm-launch: elastic: leaving out {} (failed the preflight); restarting on {} host(s), {} worker(s), the global batch {} kept: {}",
                    dropped.join(", "),
                    shrunk.hosts.len(),
                    shrunk.world_size(),
                    b.global,
                    keep_sets.join(" ")
                );
                // the restart's record says what was left out (a second
                // shrink of the same restart adds its own line)
                let mut r = pending.take().unwrap_or_else(|| restart::Record::shrink(attempt));
                r.dropped_hosts = dropped;
                r.world = shrunk.world_size();
                r.sets.extend(keep_sets.iter().cloned());
                r.append(&run_dir)?;
                extra.retain(|s| !job::BATCH_KEYS.iter().any(|k| s.split_once('=').is_some_and(|(key, _)| key == *k)));
                extra.extend(keep_sets);
                place = shrunk;
                continue;
            }
            Started::Ran(out) => out,
        };
        if let Some(r) = pending.take() {
            r.append(&run_dir)?;
        }
        let Some(failure) = out.failure.clone() else {
            println!(
                "glm-launch: every worker finished{}",
                if attempt > 0 { format!(" (after {attempt} restart(s); see {})", run_dir.join("restarts.jsonl").display()) } else { String::new() }
            );
            return Ok(0);
        };
        if let Some(r) = &out.report {
            eprintln!("glm-launch: {r}");
        }
        let latest = save.as_deref().and_then(restart::latest_checkpoint);
        let seen = restart::Seen { failure: failure.clone(), checkpoint: latest.map(|(it, _)| it) };
        if let Some(why) = restart::refuse(&seen, previous.as_ref(), attempt, cli.max_restarts, out.signalled) {
            if !why.is_empty() {
                eprintln!("glm-launch: {why}");
            }
            return Ok(out.code);
        }
        let now = std::time::SystemTime::now();
        let save = save.as_deref().expect("checked above");
        // the checkpoint read once: what the rules saw is what the restart resumes
        let (sets, resumed) = restart::resume_sets(save, seen.checkpoint);
        let since = latest.map_or(started, |(_, t)| t.max(started));
        attempt += 1;
        extra.retain(|s| !restart::RESUME_KEYS.iter().any(|k| s.starts_with(k)));
        extra.extend(sets.iter().cloned());
        eprintln!(
            "glm-launch: restart {attempt} of {} after {} ({}): {}",
            cli.max_restarts,
            failure.cause,
            failure.rank.map_or("rank ?".to_string(), |r| format!("rank {r} on {}", failure.host.as_deref().unwrap_or("?"))),
            match resumed {
                Some(it) => format!("resuming from checkpoint {it} in {}", save.display()),
                None if sets.is_empty() => format!("no checkpoint glm-launch can see in {}: starting again as the first attempt did", save.display()),
                None => format!("no checkpoint in {} yet: starting again from scratch", save.display()),
            }
        );
        pending = Some(restart::Record {
            time: restart::unix(now),
            restart: attempt,
            cause: failure.cause.clone(),
            rank: failure.rank,
            host: failure.host.clone(),
            iteration: failure.iteration,
            resumed_from: resumed,
            lost_s: now.duration_since(since).map_or(0.0, |d| d.as_secs_f64()),
            dropped_hosts: Vec::new(),
            world: place.world_size(),
            sets: extra.clone(),
        });
        previous = Some(seen);
    }
}

/// What one attempt at starting the job came to.
enum Started {
    /// `--dry-run`: printed, nothing started.
    DryRun,
    /// The preflight failed (its verdict per host); nothing started.
    Preflight(preflight::Table),
    Ran(supervise::Outcome),
}

/// What every attempt of a job shares.
struct Attempt<'a> {
    cli: &'a Cli,
    program: &'a str,
    flavor: backend::Flavor,
    tags: supervise::Tags,
    use_ssh: bool,
    use_slurm: bool,
    ssh_opts: &'a ssh::Options,
    agent: Option<&'a str>,
    gpus_shared: bool,
    launch_id: &'a str,
    worker_program: &'a str,
    disk: Option<preflight::Disk>,
}

impl Attempt<'_> {
    /// Runs the preflight on `place`, then the job with `worker_args` and
    /// `env`, logging under `run_dir`; `first` prints the job's command.
    fn run(
        &self,
        place: &Placement,
        worker_args: &[String],
        env: &[(String, String)],
        run_dir: &Path,
        watch: Option<supervise::Watch>,
        first: bool,
    ) -> Result<Started> {
        let cli = self.cli;
        let (program, flavor, tags, use_ssh, use_slurm) = (self.program, self.flavor, self.tags, self.use_ssh, self.use_slurm);
        // every host's address, user, port and keys, before anything runs
        let targets: Vec<ssh::Target> =
            if use_ssh { place.hosts.iter().map(|(h, _)| ssh::resolve(h, self.ssh_opts)).collect::<Result<_>>()? } else { Vec::new() };
        let mut worker = vec![self.worker_program.to_string()];
        worker.extend(worker_args.iter().cloned());
        let all_local = place.hosts.iter().all(|(h, _)| is_local(h));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let job = backend::Job {
            placement: place,
            worker: &worker,
            env,
            // SAFETY: geteuid has no preconditions.
            as_root: unsafe { libc::geteuid() } == 0,
            oversubscribe: all_local && place.world_size() > cores,
            agent: self.agent,
            launch_id: Some(self.launch_id),
        };
        let argv = if use_slurm { backend::srun(program, &job).map_err(anyhow::Error::msg)? } else { backend::command(flavor, program, &job) };
        let ranks: Vec<String> = place.ranks().iter().map(|(h, _, _)| h.to_string()).collect();
        println!(
            "glm-launch: {} worker(s) on {} host(s): {}",
            place.world_size(),
            place.hosts.len(),
            place
                .hosts
                .iter()
                .map(|(h, s)| format!("{h} slots {}", s.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")))
                .collect::<Vec<_>>()
                .join("; ")
        );
        if first {
            println!("glm-launch: environment for every worker: {}", env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(" "));
            println!("glm-launch: {}", backend::display(&argv));
        }
        if cli.dry_run {
            return Ok(Started::DryRun);
        }
        if which(program).is_none() {
            if use_slurm {
                bail!("{program}: not found (Slurm's srun; name it with --mpi)");
            }
            bail!("{program}: not found (install OpenMPI's mpirun or MPICH's mpiexec on this machine, or name it with --mpi)");
        }
        if !cli.no_preflight {
            // one process per host (app contexts: rank i is host i), with the
            // job's environment, every GPU visible
            let disk = self.disk.as_ref();
            let probe = preflight::probe(&worker[0], disk);
            let device = job::flag_value(worker_args, "--device");
            let wants_cuda = device.as_deref().is_some_and(|d| d.starts_with("cuda"));
            let cpu_only = device.as_deref() == Some("cpu");
            let expect = preflight::Expect { version: env!("CARGO_PKG_VERSION"), wants_cuda, cpu_only, gpus_shared: self.gpus_shared, disk };
            let (as_root, probe) = (job.as_root, &probe);
            let checked = if use_ssh {
                let local: Vec<bool> = place.hosts.iter().map(|(h, _)| is_local(h)).collect();
                preflight::run_ssh(&targets, &local, probe, env, place, &expect)
            } else if use_slurm {
                // one task per node, plain (no MPI), labelled by node
                let srun = |one: &Placement| {
                    let pre = backend::Job { placement: one, worker: probe, env, as_root, oversubscribe: false, agent: None, launch_id: None };
                    backend::srun(program, &pre).map(|mut a| {
                        a[1] = "--mpi=none".into();
                        a
                    })
                };
                preflight::run(&srun, supervise::Tags::Srun, env, place, &expect)
            } else {
                let mpi = |one: &Placement| {
                    let pre = backend::Job { placement: one, worker: probe, env, as_root, oversubscribe: false, agent: None, launch_id: None };
                    Ok(backend::command(flavor, program, &pre))
                };
                preflight::run(&mpi, tags, env, place, &expect)
            };
            println!("glm-launch: preflight: glm-worker env on every host{}", if use_ssh { " (over SSH)" } else { "" });
            for r in &checked.rows {
                println!("{r}");
            }
            if !checked.ok {
                return Ok(Started::Preflight(checked));
            }
            // the plan of the job as it is about to start, against the
            // memory the hosts reported
            if let Some(j) = job::Job::read(worker_args)?.filter(|j| j.trains() && !cli.no_plan_check) {
                match checked.memory_per_rank {
                    Some(mem) => println!("{}", plan::check(&j, worker_args, place, checked.on_gpus, mem)?),
                    None => println!("glm-launch: plan: not checked (a host did not report its memory: an older glm-worker?)"),
                }
            }
        }
        println!("glm-launch: per-rank logs in {}", run_dir.join("logs").display());
        // mpirun's own environment: the workers' and, for the ssh back end, the
        // agent's settings (not exported to the workers)
        let mut launcher_env = env.to_vec();
        launcher_env.extend(self.ssh_opts.to_env());
        // srun (Slurm 22.05+) does not inherit the allocation's --cpus-per-task
        if let (true, Ok(c), Err(_)) = (use_slurm, std::env::var("SLURM_CPUS_PER_TASK"), std::env::var("SRUN_CPUS_PER_TASK")) {
            launcher_env.push(("SRUN_CPUS_PER_TASK".into(), c));
        }
        let stop: Option<Box<dyn Fn() -> usize + Send + Sync>> =
            if use_ssh { Some(Box::new(ssh_stopper(targets.clone(), self.launch_id.to_string()))) } else { None };
        let opts = supervise::Options { all_ranks: cli.all_ranks_output, stop_remote: stop.as_deref(), watch };
        let out = supervise::run(&argv, tags, &launcher_env, &ranks, run_dir, opts)?;
        Ok(Started::Ran(out))
    }
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
        assert_eq!(mine, vec!["glm-launch", "--hostfile=h", "--num-gpus=2", "--dry-run", "--all-ranks-output"]);
        assert_eq!(theirs, vec!["--config", "ds.json", "--set", "train_iters=5", "--num_gpus", "7"]);
        assert!(split_args(&["--hostfile".to_string()]).unwrap_err().to_string().contains("--hostfile needs a value"));
    }

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    /// DeepSpeed's spellings: `-H`, `-i`, `-e` (with the value apart,
    /// attached or after `=`, as argparse reads them), `--num_accelerators`,
    /// and unambiguous prefixes of the long options.
    #[test]
    fn deepspeeds_spellings_and_prefixes_are_the_launchers() {
        for (args, want) in [
            ("-H h", "--hostfile=h"),
            ("-Hh", "--hostfile=h"),
            ("-H=h", "--hostfile=h"),
            ("-i w-0:1@w-1", "--include=w-0:1@w-1"),
            ("-iw-0", "--include=w-0"),
            ("-i=w-0:0,1", "--include=w-0:0,1"),
            ("-e w-1", "--exclude=w-1"),
            ("--num_accelerators 2", "--num-gpus=2"),
            ("--num-accelerators=2", "--num-gpus=2"),
            ("--num_a 2", "--num-gpus=2"),
            ("--num_g=2", "--num-gpus=2"),
            ("--num_n 1", "--num-nodes=1"),
            ("--hostf h", "--hostfile=h"),
            ("--incl w-0", "--include=w-0"),
            ("--e w-0", "--exclude=w-0"),
            ("--ex=w-0", "--exclude=w-0"),
            ("--laun slurm", "--launcher=slurm"),
            ("--mp mpiexec", "--mpi=mpiexec"),
            ("--master_a 10.0.0.1", "--master-addr=10.0.0.1"),
            ("--dry", "--dry-run"),
            ("--all-r", "--all-ranks-output"),
            ("--no_pr", "--no-preflight"),
            ("--no_pl", "--no-plan-check"),
            ("--ssh_a", "--ssh-accept-new-host-keys"),
            ("--w ./w", "--worker=./w"),
            ("--he", "--help"),
            ("-h", "--help"),
            ("-V", "--version"),
        ] {
            let (mine, theirs) = split_args(&words(&format!("{args} --config ds.json"))).unwrap_or_else(|e| panic!("{args}: {e:#}"));
            assert_eq!(mine[1..], [want.to_string()], "{args}");
            assert_eq!(theirs, words("--config ds.json"), "{args}");
        }
        for (args, want) in [
            ("--num 2", "ambiguous option: --num could match --num_nodes, --num_gpus, --num_accelerators"),
            ("--num_ 2", "ambiguous option: --num_ could match --num_nodes, --num_gpus, --num_accelerators"),
            ("--h x", "ambiguous option: --h could match --hostfile, --help"),
            ("--no_p", "ambiguous option: --no_p could match --no_preflight, --no_plan_check"),
            ("--ssh x", "ambiguous option: --ssh could match --ssh_config, --ssh_user"),
            ("--master=x", "ambiguous option: --master could match --master_addr, --master_port"),
            ("-i", "-i (--include) needs a value"),
            ("--incl", "--incl (--include) needs a value"),
            ("--num-gpus", "--num-gpus needs a value"),
            ("--dry-run=1", "--dry-run takes no value"),
            ("--dr=1", "--dr (--dry_run) takes no value"),
        ] {
            let e = split_args(&words(args)).unwrap_err().to_string();
            assert!(e.contains(want), "{args}: {e}");
        }
        // what is not the launcher's goes to the worker, in order
        let worker = "--config ds.json --set include=x -x -hx - --no_python --iters 3 --nodes --deepspeed_config c.json";
        let (mine, theirs) = split_args(&words(worker)).unwrap();
        assert_eq!((mine.len(), theirs), (1, words(worker)));
    }

    /// What split_args hands clap parses: the last of a repeated option
    /// counts (as in argparse), and the DeepSpeed spellings land in the
    /// same fields.
    #[test]
    fn clap_reads_what_split_args_hands_it() {
        let (mine, _) = split_args(&words("-H hosts -i a:0 --incl b:1 --num_accelerators 3 --no_pre --dry")).unwrap();
        let cli = Cli::try_parse_from(&mine).unwrap();
        assert_eq!(cli.hosts.hostfile, Some(PathBuf::from("hosts")));
        assert_eq!(cli.hosts.include.as_deref(), Some("b:1"));
        assert_eq!(cli.hosts.num_gpus, Some(3));
        assert!(cli.no_preflight && cli.dry_run && cli.hosts.exclude.is_none());
        // a value that starts with a dash stays a value
        let (mine, _) = split_args(&words("--run_dir -odd")).unwrap();
        assert_eq!(Cli::try_parse_from(&mine).unwrap().run_dir, Some(PathBuf::from("-odd")));
    }

    #[test]
    fn the_help_lists_every_launcher_and_the_deepspeed_spellings() {
        let help = Cli::command().render_help().to_string();
        let launcher = help.lines().skip_while(|l| !l.contains("--launcher")).take(3).collect::<Vec<_>>().join(" ");
        for name in ["mpirun", "mpiexec", "ssh", "slurm", "local"] {
            assert!(launcher.contains(name), "--launcher's help names {name}: {launcher}");
        }
        for spelling in ["-H, --hostfile", "-i, --include", "-e, --exclude", "--num-accelerators"] {
            assert!(help.contains(spelling), "{spelling}: {help}");
        }
    }
}
