//! The communication commands: `comm-check` (every collective and the
//! tensor-parallel regions checked by value, then all-reduce timed) and
//! `bench-comm` (the tensor collectives against plain MPI_Allreduce).

use anyhow::Result;

use crate::at_least;
use crate::rank::rank_device;

#[derive(clap::Args)]
pub struct CommCheckArgs {
    /// cpu, cuda, or auto (CUDA tensors go through NCCL)
    #[arg(long, default_value = "auto")]
    device: String,
    /// All-reduce sizes to time, in MiB
    #[arg(long, value_delimiter = ',', default_value = "1,16,64", value_parser = at_least(1))]
    mib: Vec<usize>,
    #[arg(long, default_value_t = 10, value_parser = at_least(1))]
    iters: usize,
}

#[derive(clap::Args)]
pub struct BenchCommArgs {
    /// Message sizes in MiB
    #[arg(long, value_delimiter = ',', default_value = "1,16,64", value_parser = at_least(1))]
    mib: Vec<usize>,
    #[arg(long, default_value_t = 10, value_parser = at_least(1))]
    iters: usize,
}

/// `glm-worker comm-check`: the world's collectives (and the tensor-parallel
/// autograd regions over the world) checked on `device`, then all-reduce
/// bus bandwidth. On CUDA the world is an NCCL communicator, even of one
/// (or, with `GLM_COMM_BACKEND=host-staged`, MPI through host copies).
pub fn comm_check(a: CommCheckArgs) -> Result<()> {
    let (choice, mib, iters) = (a.device.as_str(), &a.mib[..], a.iters);
    use glm_worker::comm::staged::Backend;
    use glm_worker::comm::{check, Communicator, GroupComm};
    let world = glm_worker::comm::mpi::world()?;
    let device = rank_device(choice, glm_worker::comm::mpi::local_rank(&world))?;
    let (rank, p) = (world.rank(), world.size());
    let say = |line: &str| {
        if rank == 0 {
            println!("comm-check: {line}");
        }
    };
    let comm = GroupComm::world(&world, device, Backend::from_env()?)?;
    let backend = match (&comm.nccl, comm.backend()) {
        (_, Backend::HostStaged) => "host memory over MPI (GLM_COMM_BACKEND=host-staged)".to_string(),
        (Some(_), _) => format!("NCCL {}", glm_worker::comm::nccl::version()?),
        (None, _) => "MPI".into(),
    };
    say(&format!("{p} rank(s), {device:?} tensors through {backend}"));
    for line in check::collectives(&comm, device)? {
        say(&line);
    }
    // the regions run over a second communicator split from the first, as
    // training's tensor-parallel group is (ncclCommSplit on CUDA)
    let sub = comm.split(0, rank, "tp")?;
    say(&format!("tensor-parallel regions over a group split from it{}", if sub.nccl.is_some() { " (ncclCommSplit)" } else { "" }));
    let g = glm_worker::parallel::mappings::Group::new(std::sync::Arc::new(sub));
    for line in glm_worker::parallel::check::regions(&g, device)? {
        say(&line);
    }
    drop(g);
    let factor = if p > 1 { check::bus_factor(p) } else { 1.0 };
    for &m in mib {
        let sec = check::time_all_reduce(&comm, device, m, iters)?;
        let bytes = (m << 20) as f64;
        if p == 1 {
            say(&format!("all_reduce {m:>5} MiB: {:>8.3} ms (one rank: nothing moves; this is the call's overhead)", sec * 1e3));
        } else {
            say(&format!("all_reduce {m:>5} MiB: {:>8.3} ms, {:.2} GB/s bus", sec * 1e3, factor * bytes / sec / 1e9));
        }
    }
    if let (Some(n), tch::Device::Cuda(_)) = (&comm.nccl, device) {
        // an invalid root must come back as an error carrying NCCL's message
        let mut t = tch::Tensor::zeros([4], (tch::Kind::Float, device));
        match n.broadcast(&mut t, p + 3) {
            Err(e) if e.to_string().contains("invalid argument") => say(&format!("NCCL error reporting: ok ({e})")),
            Err(e) => anyhow::bail!("comm-check: NCCL error without NCCL's message: {e}"),
            Ok(()) => anyhow::bail!("comm-check: broadcast from root {} of {p} ranks succeeded", p + 3),
        }
    }
    drop(comm);
    say("all checks passed");
    Ok(())
}

/// Bus bandwidth (2(p-1)/p × bytes / time, NCCL's convention) of a sum
/// all-reduce of f32 tensors through `Communicator::all_reduce`, and of a
/// plain `MPI_Allreduce` of the same bytes.
pub fn bench_comm(a: BenchCommArgs) -> Result<()> {
    let (mib, iters) = (&a.mib[..], a.iters);
    use glm_worker::comm::{check, Communicator};
    let world = glm_worker::comm::mpi::world()?;
    let p = world.size();
    if p == 1 {
        // this command line, under mpirun
        let args: Vec<String> = std::env::args().skip(1).map(|a| glm_common::text::shell_word(&a)).collect();
        anyhow::bail!("bench-comm needs several ranks: mpirun -np 2 glm-worker {}", args.join(" "));
    }
    let factor = check::bus_factor(p);
    for &m in mib {
        let n = m * (1 << 20) / 4;
        let ours = check::time_all_reduce(&world, tch::Device::Cpu, m, iters)?;
        let send = vec![1.0f32; n];
        let mut recv = vec![0.0f32; n];
        world.raw_all_reduce_f32(&send, &mut recv);
        world.barrier()?;
        let t0 = std::time::Instant::now();
        for _ in 0..iters {
            world.raw_all_reduce_f32(&send, &mut recv);
        }
        let raw = t0.elapsed().as_secs_f64() / iters as f64;
        if world.rank() == 0 {
            let bytes = (n * 4) as f64;
            println!(
                "allreduce {m:>4} MiB on {p} ranks: tensors {:.2} GB/s bus, MPI_Allreduce {:.2} GB/s bus, ratio {:.3}",
                factor * bytes / ours / 1e9,
                factor * bytes / raw / 1e9,
                raw / ours
            );
        }
    }
    drop(world);
    Ok(())
}
