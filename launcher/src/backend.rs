//! Launch back ends: each turns a placement and a worker command into the
//! command that starts the whole world. Pure functions of their inputs,
//! unit-tested; `main.rs` runs what they build.
//!
//! - `mpirun` (OpenMPI): one app context per host (`-H host:k -np k`), each
//!   with its own `CUDA_VISIBLE_DEVICES` (the host's selected slots, so
//!   local rank i uses slot i), the forwarded environment exported with
//!   `-x`, output tagged per rank (`--tag-output`) for the supervisor.
//! - `mpiexec` (MPICH / Hydra): the same as `-hosts`/`-n` app contexts with
//!   `-env`.
//! - `ssh`: OpenMPI's mpirun as above, starting its daemon on every host
//!   through `glm-launch --ssh-exec` (its `plm_rsh_agent`, glm-launch's own
//!   SSH client), all from the launcher (no tree spawn).
//! - `local`: OpenMPI's mpirun restricted to this machine (no remote start).
//! - `slurm`: one `srun --mpi=pmix` step inside the allocation, the same
//!   number of workers on every node, output labelled per task; the
//!   environment reaches the tasks through srun's own `--export=ALL`, and
//!   Slurm binds the GPUs it allocated.

use glm_common::hostfile::Placement;

/// Which MPI launcher a command line is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    OpenMpi,
    Mpich,
}

impl Flavor {
    /// Recognises the implementation from `<launcher> --version` output.
    pub fn detect(version_output: &str) -> Option<Flavor> {
        if version_output.contains("Open MPI") || version_output.contains("OpenRTE") {
            Some(Flavor::OpenMpi)
        } else if version_output.contains("HYDRA") || version_output.contains("MPICH") || version_output.contains("Intel(R) MPI") {
            Some(Flavor::Mpich)
        } else {
            None
        }
    }
}

/// What to start.
pub struct Job<'a> {
    pub placement: &'a Placement,
    /// The worker program and its arguments.
    pub worker: &'a [String],
    /// Variables exported to every worker (name, value); values are not
    /// printed by `display`.
    pub env: &'a [(String, String)],
    /// Running as root (OpenMPI refuses without `--allow-run-as-root`).
    pub as_root: bool,
    /// More workers than this machine has cores (CPU workers on one host).
    pub oversubscribe: bool,
    /// OpenMPI's remote-start agent (the ssh back end), instead of its ssh.
    pub agent: Option<&'a str>,
    /// Marks every worker of this job (`GLM_LAUNCH_ID`, exported with its
    /// value: the MPI launcher's own environment does not carry it, so a
    /// search for the mark finds workers only).
    pub launch_id: Option<&'a str>,
}

/// Whether `flavor` can start this placement.
pub fn supported(flavor: Flavor, placement: &Placement) -> Result<(), String> {
    if flavor == Flavor::Mpich && placement.hosts.len() > 1 {
        return Err(format!("MPICH's mpiexec is supported on one host for now ({} selected); use OpenMPI's mpirun for several", placement.hosts.len()));
    }
    Ok(())
}

/// The launcher command: program, arguments.
pub fn command(flavor: Flavor, launcher: &str, job: &Job) -> Vec<String> {
    let mut argv = vec![launcher.to_string()];
    let s = |v: &str| v.to_string();
    match flavor {
        Flavor::OpenMpi => {
            if job.as_root {
                argv.push(s("--allow-run-as-root"));
            }
            argv.extend([s("--tag-output"), s("--bind-to"), s("none")]);
            if let Some(agent) = job.agent {
                argv.extend([s("--mca"), s("plm_rsh_agent"), s(agent), s("--mca"), s("plm_rsh_no_tree_spawn"), s("1")]);
            }
            if job.oversubscribe {
                argv.push(s("--oversubscribe"));
            }
            for (i, (host, slots)) in job.placement.hosts.iter().enumerate() {
                if i > 0 {
                    argv.push(s(":"));
                }
                argv.extend([s("-H"), format!("{host}:{}", slots.len()), s("-np"), slots.len().to_string()]);
                // the exports in every context (options are per context)
                for (k, _) in job.env {
                    argv.extend([s("-x"), k.clone()]);
                }
                if let Some(id) = job.launch_id {
                    argv.extend([s("-x"), format!("{}={id}", glm_common::launch::LAUNCH_ID)]);
                }
                argv.extend([s("-x"), format!("CUDA_VISIBLE_DEVICES={}", join(slots))]);
                argv.extend(job.worker.iter().cloned());
            }
        }
        Flavor::Mpich => {
            // Hydra takes one host list and one -genvlist (global options);
            // per-host device lists need app contexts, so one host only
            // (`supported` refuses more)
            argv.push(s("-prepend-rank"));
            if !job.env.is_empty() {
                argv.extend([s("-genvlist"), job.env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(",")]);
            }
            if let Some((host, slots)) = job.placement.hosts.first() {
                argv.extend([s("-hosts"), host.clone(), s("-n"), slots.len().to_string()]);
                if let Some(id) = job.launch_id {
                    argv.extend([s("-env"), s(glm_common::launch::LAUNCH_ID), s(id)]);
                }
                argv.extend([s("-env"), s("CUDA_VISIBLE_DEVICES"), join(slots)]);
                argv.extend(job.worker.iter().cloned());
            }
        }
    }
    argv
}

/// The slurm back end's step: every selected node, `slots.len()` workers
/// each (the same on every node), ranks in node order (block).
pub fn srun(program: &str, job: &Job) -> Result<Vec<String>, String> {
    let hosts = &job.placement.hosts;
    let per_node = hosts.first().map_or(0, |(_, s)| s.len());
    if let Some((h, s)) = hosts.iter().find(|(_, s)| s.len() != per_node) {
        return Err(format!("--launcher slurm starts the same number of workers on every node ({per_node} on {}, {} on {h})", hosts[0].0, s.len()));
    }
    let mut argv = vec![program.to_string(), "--mpi=pmix".into(), "--kill-on-bad-exit=1".into(), "--label".into()];
    argv.push(format!("--nodes={}", hosts.len()));
    argv.push(format!("--nodelist={}", hosts.iter().map(|(h, _)| h.as_str()).collect::<Vec<_>>().join(",")));
    argv.push(format!("--ntasks={}", hosts.len() * per_node));
    argv.push(format!("--ntasks-per-node={per_node}"));
    argv.push("--distribution=block".into());
    argv.push(match job.launch_id {
        Some(id) => format!("--export=ALL,{}={id}", glm_common::launch::LAUNCH_ID),
        None => "--export=ALL".into(),
    });
    argv.extend(job.worker.iter().cloned());
    Ok(argv)
}

fn join(slots: &[usize]) -> String {
    slots.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",")
}

/// A command line for people: words with spaces or quotes are quoted.
pub fn display(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$\\`;&|<>()*?".contains(c)) {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement() -> Placement {
        Placement { hosts: vec![("w0".into(), vec![0, 1]), ("w1".into(), vec![1, 3])] }
    }

    #[test]
    fn openmpi_one_context_per_host_with_its_devices() {
        let p = placement();
        let worker = vec!["/opt/glm/glm-worker".to_string(), "--config".into(), "a b.json".into()];
        let env = vec![("NCCL_DEBUG".to_string(), "INFO".to_string())];
        let job = Job { placement: &p, worker: &worker, env: &env, as_root: true, oversubscribe: false, agent: None, launch_id: None };
        let argv = command(Flavor::OpenMpi, "mpirun", &job);
        assert_eq!(
            display(&argv),
            "mpirun --allow-run-as-root --tag-output --bind-to none \
             -H w0:2 -np 2 -x NCCL_DEBUG -x CUDA_VISIBLE_DEVICES=0,1 /opt/glm/glm-worker --config 'a b.json' : \
             -H w1:2 -np 2 -x NCCL_DEBUG -x CUDA_VISIBLE_DEVICES=1,3 /opt/glm/glm-worker --config 'a b.json'"
        );
        assert!(!display(&argv).contains("INFO"), "values are exported, not printed");
        let ssh = command(Flavor::OpenMpi, "mpirun", &Job { agent: Some("/bin/glm-launch --ssh-exec"), ..job });
        assert!(
            display(&ssh).starts_with(
                "mpirun --allow-run-as-root --tag-output --bind-to none --mca plm_rsh_agent '/bin/glm-launch --ssh-exec' --mca plm_rsh_no_tree_spawn 1 -H w0:2"
            ),
            "{}",
            display(&ssh)
        );
    }

    #[test]
    fn one_srun_step_for_the_allocation() {
        let p = placement();
        let worker = vec!["glm-worker".to_string(), "--config".into(), "ds.json".into()];
        let job = Job { placement: &p, worker: &worker, env: &[], as_root: true, oversubscribe: false, agent: None, launch_id: Some("42") };
        assert_eq!(
            display(&srun("srun", &job).unwrap()),
            "srun --mpi=pmix --kill-on-bad-exit=1 --label --nodes=2 --nodelist=w0,w1 --ntasks=4 --ntasks-per-node=2 --distribution=block --export=ALL,GLM_LAUNCH_ID=42 glm-worker --config ds.json"
        );
        let uneven = Placement { hosts: vec![("w0".into(), vec![0, 1]), ("w1".into(), vec![0])] };
        assert!(srun("srun", &Job { placement: &uneven, ..job }).unwrap_err().contains("the same number of workers on every node (2 on w0, 1 on w1)"));
    }

    #[test]
    fn mpich_contexts_and_detection() {
        let p = Placement { hosts: vec![("w1".into(), vec![1, 3])] };
        let worker = vec!["glm-worker".to_string()];
        let env = vec![("A".to_string(), "1".to_string()), ("B".to_string(), "2".to_string())];
        let job = Job { placement: &p, worker: &worker, env: &env, as_root: false, oversubscribe: true, agent: None, launch_id: None };
        assert_eq!(
            display(&command(Flavor::Mpich, "mpiexec", &job)),
            "mpiexec -prepend-rank -genvlist A,B -hosts w1 -n 2 -env CUDA_VISIBLE_DEVICES 1,3 glm-worker"
        );
        assert!(supported(Flavor::Mpich, &placement()).unwrap_err().contains("one host for now"));
        assert!(supported(Flavor::OpenMpi, &placement()).is_ok());
        assert_eq!(Flavor::detect("mpirun (Open MPI) 4.1.4\n"), Some(Flavor::OpenMpi));
        assert_eq!(Flavor::detect("HYDRA build details:\n    Version: 4.0"), Some(Flavor::Mpich));
        assert_eq!(Flavor::detect("something else"), None);
    }
}
