//! `glm-launch --launcher ssh` against real test hosts: two network
//! namespaces on a bridge, each with its own hostname and a real OpenSSH
//! server (`tests/fixtures/netns_hosts.sh`); glm-launch reaches them with
//! its own SSH client and is OpenMPI's remote-start agent. Needs root,
//! iproute2, openssh-server and OpenMPI (`scripts/setup.sh` installs them).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{repo, text, tiny_job, Hosts};

/// glm-launch over ssh with this test's hosts, config and network.
fn launch(h: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_glm-launch"));
    c.current_dir(repo())
        .env("OMP_NUM_THREADS", "1")
        // OpenMPI's traffic stays on the test bridge
        .env("OMPI_MCA_btl_tcp_if_include", "10.213.77.0/24")
        .env("OMPI_MCA_oob_tcp_if_include", "10.213.77.0/24")
        .env_remove("SSH_AUTH_SOCK")
        // no ~/.ssh of the machine's user takes part
        .env("HOME", h.join("home"))
        .args(["--launcher", "ssh", "--hostfile", &h.join("hosts").display().to_string()])
        .args(extra);
    if !extra.contains(&"--ssh_config") {
        c.args(["--ssh_config", &h.join("ssh_config").display().to_string()]);
    }
    c
}

/// A stand-in worker: answers the preflight like glm-worker, then reports
/// where each rank runs, records its pid, and sleeps when asked to.
fn fake_worker(dir: &Path) -> PathBuf {
    let w = dir.join("worker.sh");
    std::fs::write(
        &w,
        format!(
            "#!/bin/sh\nif [ \"$1\" = env ]; then echo 'glm-worker: {}'; echo 'libtorch dir: /x'; echo 'cuda devices: 0'; echo 'host memory: 16000000000'; exit 0; fi\n\
             echo \"rank $OMPI_COMM_WORLD_RANK on $(uname -n)\"\necho $$ > {}/pid.$OMPI_COMM_WORLD_RANK\n[ \"$1\" = sleep ] && exec sleep 60\nexit 0\n",
            env!("CARGO_PKG_VERSION"),
            dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&w, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    w
}

/// glm-launch to its end (a hang fails the test).
fn done(c: &mut Command) -> std::process::Output {
    common::output_within(c, 300).expect("glm-launch did not end within 300 s")
}

fn set_known_hosts(h: &Path, file: &Path) {
    let cfg = std::fs::read_to_string(h.join("ssh_config")).unwrap();
    let cfg: String = cfg
        .lines()
        .map(|l| if l.trim_start().starts_with("UserKnownHostsFile") { format!("  UserKnownHostsFile {}\n", file.display()) } else { format!("{l}\n") })
        .collect();
    std::fs::write(h.join("ssh_config"), cfg).unwrap();
}

#[test]
fn ssh_back_end_on_two_test_hosts() {
    let d = tempfile::tempdir().unwrap();
    let h = d.path().join("hosts.d");
    let _hosts = Hosts::up(&h, 2);
    std::fs::write(h.join("hosts"), "node1 slots=2\nnode2 slots=2\n").unwrap();
    let w = fake_worker(d.path());
    let ws = w.display().to_string();

    // 1. an unknown host key is refused before anything starts
    let empty = d.path().join("known_hosts.empty");
    std::fs::write(&empty, "").unwrap();
    let good = h.join("known_hosts");
    set_known_hosts(&h, &empty);
    let o = done(&mut launch(&h, &["--worker", &ws]));
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    assert!(out.contains("node1 (10.213.77.11:2222): unknown host key (ssh-ed25519 SHA256:") && out.contains("pass --ssh_accept_new_host_keys"), "{out}");
    assert!(err.contains("preflight failed") && !d.path().join("pid.0").exists(), "{err}");
    // the command the refusal names records each key where glm-launch reads it
    let scanned = d.path().join("known_hosts.scanned");
    std::fs::write(&scanned, "").unwrap();
    set_known_hosts(&h, &scanned);
    let (out, _) = text(&done(&mut launch(&h, &["--worker", &ws])));
    let scans: Vec<String> =
        out.lines().filter_map(|l| l.split_once("(`ssh-keyscan ")).map(|(_, r)| format!("ssh-keyscan {}", r.split_once("`)").unwrap().0)).collect();
    assert_eq!(scans.len(), 2, "one per host: {out}");
    for scan in &scans {
        assert!(Command::new("sh").args(["-c", scan]).status().unwrap().success(), "{scan}");
    }
    let o = done(&mut launch(&h, &["--worker", &ws]));
    assert!(o.status.success(), "after {scans:?}: {}{}", text(&o).0, text(&o).1);
    set_known_hosts(&h, &empty);

    // 2. ... unless the user opts in: the keys are recorded, and every rank
    // runs on its host
    let o = done(&mut launch(
        &h,
        &["--worker", &ws, "--ssh_accept_new_host_keys", "--all-ranks-output", "--run_dir", &d.path().join("run1").display().to_string()],
    ));
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    for (r, host) in [(0, "node1"), (1, "node1"), (2, "node2"), (3, "node2")] {
        assert!(out.contains(&format!("[{host}:{r}] rank {r} on {host}")), "{out}");
    }
    assert!(err.contains("added its ssh-ed25519 key"), "{err}");
    assert_eq!(std::fs::read_to_string(&empty).unwrap().lines().count(), 2, "both keys recorded");

    // 3. a changed host key is refused, even with the opt-in
    let other = d.path().join("other_key");
    assert!(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f", &other.display().to_string()]).status().unwrap().success());
    let pubkey = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let changed = d.path().join("known_hosts.changed");
    let node2 = std::fs::read_to_string(&good).unwrap().lines().nth(1).unwrap().to_string();
    std::fs::write(&changed, format!("[10.213.77.11]:2222 {}\n{node2}\n", pubkey.split_whitespace().take(2).collect::<Vec<_>>().join(" "))).unwrap();
    set_known_hosts(&h, &changed);
    let o = done(&mut launch(&h, &["--worker", &ws, "--ssh_accept_new_host_keys"]));
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    assert!(out.contains("node1 (10.213.77.11:2222): HOST KEY CHANGED") && out.contains("ssh-keygen -R '[10.213.77.11]:2222'"), "{out}");
    let node2_row = out.lines().find(|l| l.trim_start().starts_with("node2")).unwrap();
    assert!(node2_row.ends_with("ok"), "only the changed host fails: {out}");
    // the command it names removes the old key from the file it is in; the opt-in then records the new one
    let remove = format!("ssh-keygen -R {}", out.split_once("`ssh-keygen -R ").unwrap().1.split_once("`)").unwrap().0);
    assert!(remove.ends_with(&format!(" -f {}", changed.display())), "{remove}");
    assert!(Command::new("sh").args(["-c", &remove]).output().unwrap().status.success(), "{remove}");
    let o = done(&mut launch(&h, &["--worker", &ws, "--ssh_accept_new_host_keys"]));
    assert!(o.status.success(), "after {remove}: {}{}", text(&o).0, text(&o).1);
    set_known_hosts(&h, &good);

    // 4. a wrong port: a clear preflight row, nothing started
    let _ = std::fs::remove_file(d.path().join("pid.0"));
    let o = done(&mut launch(&h, &["--worker", &ws, "--ssh_port", "2299"]));
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    assert!(out.contains("node1 (10.213.77.11:2299): cannot connect: Connection refused"), "{out}");
    assert!(!d.path().join("pid.0").exists(), "nothing started");

    // 5. the plan check: 8 GB a rank on every host (16 GB, 2 slots); a
    // model of 4.8 G parameters is refused before anything starts
    let big = [
        "--config", "configs/config_block_tiny.json", "--args", "configs/configs_tiny.json", "--set", "save=null", "--set", "num_layers=24", "--set",
        "hidden_size=4096", "--set", "num_attention_heads=32",
    ];
    let o = done(launch(&h, &["--worker", &ws]).args(big));
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    assert!(err.contains("the job does not fit") && err.contains("the selected hosts offer 8.00 GB per rank"), "{err}");
    assert!(!d.path().join("pid.0").exists(), "nothing started");
    let o = done(launch(&h, &["--worker", &ws]).args(&big[..6]));
    assert!(o.status.success() && text(&o).0.contains("glm-launch: plan: peak "), "{:?}", text(&o));

    // 6. keys from ssh-agent, with no identity file anywhere
    let no_key = h.join("ssh_config.agent");
    let cfg = std::fs::read_to_string(h.join("ssh_config")).unwrap();
    std::fs::write(&no_key, cfg.lines().filter(|l| !l.contains("IdentityFile")).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let o = done(&mut launch(&h, &["--worker", &ws, "--ssh_config", &no_key.display().to_string()]));
    assert_eq!(o.status.code(), Some(2), "no key, no login: {:?}", text(&o));
    assert!(text(&o).0.contains("login as root refused: no key found"), "{}", text(&o).0);
    let sock = h.join("agent.sock");
    let agent = Command::new("ssh-agent").args(["-a", &sock.display().to_string()]).output().unwrap();
    let agent_pid: i32 = String::from_utf8_lossy(&agent.stdout)
        .split("SSH_AGENT_PID=")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .and_then(|p| p.parse().ok())
        .expect("ssh-agent started");
    let added = Command::new("ssh-add").arg(h.join("id_ed25519")).env("SSH_AUTH_SOCK", &sock).output().unwrap();
    let o = done(
        launch(&h, &["--worker", &ws, "--ssh_config", &no_key.display().to_string(), "--run_dir", &d.path().join("run.agent").display().to_string()])
            .env("SSH_AUTH_SOCK", &sock),
    );
    // SAFETY: the agent this test started.
    unsafe { libc::kill(agent_pid, libc::SIGTERM) };
    assert!(added.status.success(), "ssh-add: {}", String::from_utf8_lossy(&added.stderr));
    assert!(o.status.success(), "login with the agent's key: {:?}", text(&o));

    // 7. a worker killed on one host stops every other one, named
    for r in 0..4 {
        let _ = std::fs::remove_file(d.path().join(format!("pid.{r}")));
    }
    let t0 = Instant::now();
    let child = launch(&h, &["--worker", &ws, "--run_dir", &d.path().join("run2").display().to_string(), "sleep"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // every rank has started (its pid file is written) before rank 3 is killed
    let pid_of = |r: usize| std::fs::read_to_string(d.path().join(format!("pid.{r}"))).ok().and_then(|p| p.trim().parse::<i32>().ok());
    while (0..4).any(|r| pid_of(r).is_none()) {
        assert!(t0.elapsed() < Duration::from_secs(60), "not every rank started");
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = pid_of(3).unwrap();
    let killed = Instant::now();
    // SAFETY: the test's own worker process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let o = child.wait_with_output().unwrap();
    let (out, err) = text(&o);
    assert!(killed.elapsed() < Duration::from_secs(20), "the others were stopped, not waited for ({:?})", killed.elapsed());
    assert!(!o.status.success(), "{out}{err}");
    assert!(err.contains("glm-launch: rank 3 on node2 killed by signal 9"), "{err}");

    // 8. real training: 2 hosts × 2 slots of glm-worker as one MPI world;
    // SIGTERM to glm-launch (no worker on this machine) reaches the workers
    // over SSH, which save a checkpoint that resumes
    let (worker, job) = tiny_job(
        d.path(),
        r#"{"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 0.001}}, "zero_optimization": {"stage": 1}}"#,
    );
    let save = d.path().join("save");
    let mut args: Vec<String> = vec!["--worker".into(), worker.display().to_string(), "--run_dir".into(), d.path().join("run3").display().to_string()];
    args.extend(job.iter().cloned());
    args.extend(["--set".to_string(), "train_iters=3".into(), "--set".into(), format!("save={}", save.display())]);
    let o = done(launch(&h, &[]).args(&args));
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("parallel: world 4 = tensor-parallel 1 × data-parallel 4") && out.contains("[node1:0]  iteration       3/3"), "{out}");
    assert!(out.contains("free disk") && out.lines().filter(|l| l.contains(" ok")).count() >= 2, "{out}");
    assert_eq!(std::fs::read_to_string(save.join("latest")).unwrap().trim(), "3");

    let mut args: Vec<String> = vec!["--worker".into(), worker.display().to_string(), "--run_dir".into(), d.path().join("run4").display().to_string()];
    args.extend(job.iter().cloned());
    args.extend(["--set", "train_iters=100000", "--set"].map(String::from));
    args.push(format!("save={}", save.display()));
    args.extend(["--set".to_string(), format!("load={}", save.display())]);
    let child = launch(&h, &[]).args(&args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // wait for training to pass iteration 3 (the run log of rank 0)
    let log = d.path().join("run4/logs/rank_0000.log");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("iteration       6/") {
        assert!(t0.elapsed() < Duration::from_secs(120), "training never reached iteration 6");
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(143), "{out}\n{err}");
    assert!(err.contains("SIGTERM to the workers on 2 host(s) over SSH"), "{err}");
    let it: u64 = std::fs::read_to_string(save.join("latest")).unwrap().trim().parse().unwrap();
    assert!(it >= 6, "a checkpoint of the stopped run ({it})");
    let mut args: Vec<String> = vec!["--worker".into(), worker.display().to_string(), "--run_dir".into(), d.path().join("run5").display().to_string()];
    args.extend(job);
    args.extend(["--set".to_string(), format!("train_iters={}", it + 1), "--set".into(), format!("load={}", save.display())]);
    let o = done(launch(&h, &[]).args(&args));
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains(&format!("iteration {:>7}/{}", it + 1, it + 1)), "resumed at {it}: {out}");
}

/// The `train` events of `<save>/metrics.jsonl`: (iteration, loss).
fn losses(save: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(save.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["type"] == "train")
        .map(|e| (e["iteration"].as_u64().unwrap(), e["loss"].as_f64().unwrap()))
        .collect()
}

/// Faults on the test hosts, with the real worker: a frozen rank on node2
/// (2 and 4 ranks) is named and ends the job within its deadline, and the
/// checkpoint before it resumes; a rank killed on node2 restarts the job,
/// which ends bitwise where a run resumed from the same checkpoint ends; and node2 taken down
/// mid-run (its sshd and every process in its namespace killed) makes an
/// elastic job restart on node1 alone, with data-parallel 4 → 2 and twice
/// the gradient accumulation, training what the uninterrupted run trains.
#[test]
fn faults_on_the_test_hosts() {
    let d = tempfile::tempdir().unwrap();
    let h = d.path().join("hosts.d");
    let _hosts = Hosts::up(&h, 2);
    let hostfile = |slots: usize| {
        let f = d.path().join(format!("hosts.{slots}"));
        std::fs::write(&f, format!("node1 slots={slots}\nnode2 slots={slots}\n")).unwrap();
        f.display().to_string()
    };
    let (worker, job) = tiny_job(
        d.path(),
        r#"{"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 0.001}}, "zero_optimization": {"stage": 2}}"#,
    );
    let run = |name: &str, slots: usize, iters: u64, extra: &[&str]| -> Command {
        let mut c = launch(&h, &["--hostfile", &hostfile(slots)]);
        c.env_remove("GLM_TEST_FAULT").env_remove("GLM_TEST_FAULT_MARK");
        c.args(["--worker", &worker.display().to_string(), "--run_dir", &d.path().join(format!("run.{name}")).display().to_string()]).args(extra);
        c.args(&job).args(["--set", "hidden_dropout=0", "--set", "attention_dropout=0", "--set", "save_interval=2", "--set", &format!("train_iters={iters}")]);
        c.args(["--set", &format!("save={}", d.path().join(format!("save.{name}")).display())]);
        c
    };
    let wait_for = |file: &Path| {
        let t0 = Instant::now();
        while !file.exists() {
            assert!(t0.elapsed() < Duration::from_secs(240), "{} never appeared", file.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        Instant::now()
    };

    // 1. a frozen rank on node2, of 2 and of 4 ranks
    for slots in [1usize, 2] {
        let frozen = 2 * slots - 1;
        let mark = d.path().join(format!("fired.{slots}"));
        let mut c = run(&format!("stop{slots}"), slots, 8, &["--collective-timeout", "5"]);
        c.env("GLM_TEST_FAULT", format!("stop:{frozen}:5")).env("GLM_TEST_FAULT_MARK", &mark);
        let child = common::start(&mut c);
        let fired = wait_for(&mark);
        let o = child.finish();
        let (out, err) = text(&o);
        assert!(fired.elapsed() < Duration::from_secs(20), "ended {:?} after the fault", fired.elapsed());
        assert_eq!(o.status.code(), Some(124), "{out}\n{err}");
        assert!(err.contains(&format!("rank {frozen} on node2: no progress for")), "{err}");
        let save = d.path().join(format!("save.stop{slots}"));
        assert_eq!(std::fs::read_to_string(save.join("latest")).unwrap().trim(), "2");
    }
    // the last checkpoint before the fault resumes
    let stopped = d.path().join("save.stop2");
    let o = done(&mut run("stop2", 2, 4, &["--set", &format!("load={}", stopped.display())]));
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("(iteration 2)") && out.contains("[node1:0]  iteration       4/4"), "{out}");

    // 2. kill -9 on node2: restarted from the latest checkpoint, finished
    let mut c = run("kill", 2, 6, &["--max-restarts", "1"]);
    c.env("GLM_TEST_FAULT", "kill:3:5");
    let o = done(&mut c);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(err.contains("restart 1 of 1 after") && err.contains("resuming from checkpoint 2"), "{err}");
    assert!(out.contains("[node1:0]  iteration       6/6"), "{out}");
    // it ends where a run resumed from the same checkpoint without a fault ends (bitwise)
    let killed = d.path().join("save.kill");
    let o = done(&mut run("kill-ref", 2, 6, &["--set", &format!("load={}", killed.join("2").display())]));
    assert!(o.status.success(), "{}\n{}", text(&o).0, text(&o).1);
    let model = |save: &Path| std::fs::read(save.join("6/model.safetensors")).unwrap();
    assert!(model(&killed) == model(&d.path().join("save.kill-ref")), "the restarted run's final weights differ from the resumed run's");

    // 3. elastic: the uninterrupted run at 2 hosts × 2, then the same job
    // losing node2 after iteration 2's checkpoint
    let o = done(&mut run("whole", 2, 6, &[]));
    assert!(o.status.success(), "{}\n{}", text(&o).0, text(&o).1);
    let whole = losses(&d.path().join("save.whole"));
    let mark = d.path().join("fired.elastic");
    let mut c = run("elastic", 2, 6, &["--max-restarts", "1", "--min-nodes", "1", "--collective-timeout", "5"]);
    c.env("GLM_TEST_FAULT", "stop:2:5").env("GLM_TEST_FAULT_MARK", &mark);
    let child = common::start(&mut c);
    wait_for(&mark);
    // node2 goes down: its sshd, OpenMPI's daemon and its workers
    let down = Command::new("sh").args(["-c", "ip netns pids glmt-node2 | xargs -r kill -9"]).status().unwrap();
    assert!(down.success());
    let o = child.finish();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        out.contains("glm-launch: elastic: leaving out node2 (failed the preflight); restarting on 1 host(s), 2 worker(s), the global batch 8 kept"),
        "{out}"
    );
    assert!(out.contains("data-parallel 2") && out.contains("[node1:0]  iteration       6/6"), "{out}");
    let rec = std::fs::read_to_string(d.path().join("run.elastic/restarts.jsonl")).unwrap();
    assert!(rec.contains("\"dropped_hosts\":[\"node2\"]") && rec.contains("\"world\":2") && rec.contains("ds.gradient_accumulation_steps=2"), "{rec}");
    let shrunk = losses(&d.path().join("save.elastic"));
    assert_eq!(shrunk.iter().map(|(i, _)| *i).collect::<Vec<_>>(), (1..=6).collect::<Vec<_>>(), "{shrunk:?}");
    for ((i, a), (_, b)) in whole.iter().zip(&shrunk) {
        assert!((a - b).abs() <= 1e-6 * a.abs(), "iteration {i}: {a} uninterrupted, {b} after the shrink");
    }
}
