#!/usr/bin/env python3
"""Detection and recovery times of injected faults, with glm-launch and the
real glm-worker on this machine (the tiny model, 2 or 4 CPU workers).

    python3 bench/fault_times.py [--timeout 10] [--ssh]

Each case runs one job with a fault on purpose (GLM_TEST_FAULT, see
worker/src/test_hooks.rs) and timestamps glm-launch's output lines as they
arrive: the fault (the rank's mark file), the end of the failed attempt
(glm-launch's report), the restart's first resumed iteration, the end.
--ssh adds the cases on the ssh back end's test hosts (network namespaces,
needs root: launcher/tests/fixtures/netns_hosts.sh), including node2 taken
down under an elastic job. Prints one markdown table.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "target/release/glm-launch")
WORKER = os.path.join(ROOT, "target/release/glm-worker")
FIXTURE = os.path.join(ROOT, "launcher/tests/fixtures/netns_hosts.sh")
DS = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 0.001}}, "zero_optimization": {"stage": 2}}


def job_args(d, iters):
    with open(os.path.join(ROOT, "glm_pretrain/data/data.json")) as f:
        docs = json.load(f)[:300]
    corpus = os.path.join(d, "corpus.json")
    with open(corpus, "w") as f:
        json.dump(docs, f)
    ds = os.path.join(d, "ds.json")
    with open(ds, "w") as f:
        json.dump(DS, f)
    a = ["--config", ds, "--args", "configs/configs_tiny.json", "--device", "cpu", "--vocab-size", "1200",
         "--store", os.path.join(d, "store"), "--tokenizer-cache", os.path.join(d, "model")]
    for s in ["save=null", "num_layers=2", "hidden_size=64", "num_attention_heads=2", "seq_length=64", "max_position_embeddings=64",
              "log_interval=1", "eval_interval=0", "save_interval=2", f"train_iters={iters}", f"train_data={corpus}", f"save={d}/save"]:
        a += ["--set", s]
    return a


def run(name, launcher_args, env_extra, d, iters, on_mark=None):
    """Runs one job; returns (seconds from the fault to: the attempt's end, the resumed iteration, the job's end), exit code."""
    mark = os.path.join(d, "fired")
    env = dict(os.environ, OMP_NUM_THREADS="1", GLM_TEST_FAULT_MARK=mark, **env_extra)
    cmd = [LAUNCH, "--worker", WORKER, "--run_dir", os.path.join(d, "run")] + launcher_args + job_args(d, iters)
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stamps = {}
    fired = [None]

    def watch_mark():
        while p.poll() is None and fired[0] is None:
            if os.path.exists(mark):
                fired[0] = time.monotonic()
                if on_mark:
                    on_mark()
            time.sleep(0.01)

    t = threading.Thread(target=watch_mark)
    t.start()
    log = []
    for line in p.stdout:
        now = time.monotonic()
        log.append(line)
        if ("glm-launch: rank" in line or "glm-launch: the job made no progress" in line or "no progress for" in line and "stopped the job" in line) and "ended" not in stamps:
            stamps["ended"] = now
        if "resumed from" in line and "resumed" not in stamps:
            stamps["resumed"] = now
    p.wait()
    end = time.monotonic()
    t.join()
    if fired[0] is None:
        sys.stderr.write("".join(log[-40:]))
        raise SystemExit(f"{name}: the fault never fired")
    rel = lambda k: stamps[k] - fired[0] if k in stamps else None
    return rel("ended"), rel("resumed"), end - fired[0], p.returncode, "".join(log)


def fmt(x):
    return "-" if x is None else f"{x:.1f} s"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--ssh", action="store_true")
    a = ap.parse_args()
    to = str(a.timeout)
    rows = []
    local = lambda n: ["--launcher", "local", "--num_gpus", str(n)]
    cases = [
        ("SIGSTOP of rank 1 of 2 (frozen)", local(2) + ["--collective-timeout", to], {"GLM_TEST_FAULT": "stop:1:5"}),
        ("SIGSTOP of rank 3 of 4 (frozen)", local(4) + ["--collective-timeout", to], {"GLM_TEST_FAULT": "stop:3:5"}),
        ("SIGSTOP of rank 1 of 2, --max-restarts 1", local(2) + ["--collective-timeout", to, "--max-restarts", "1"], {"GLM_TEST_FAULT": "stop:1:5"}),
        ("kill -9 of rank 1 of 2, --max-restarts 1", local(2) + ["--collective-timeout", to, "--max-restarts", "1"], {"GLM_TEST_FAULT": "kill:1:5"}),
        ("rank 0 exits 3, --max-restarts 1", local(2) + ["--collective-timeout", to, "--max-restarts", "1"], {"GLM_TEST_FAULT": "exit:0:5"}),
    ]
    for name, la, env in cases:
        with tempfile.TemporaryDirectory() as d:
            ended, resumed, total, rc, _ = run(name, la, env, d, 8)
            rows.append((name, ended, resumed, total, rc))
    if a.ssh:
        with tempfile.TemporaryDirectory() as d:
            h = os.path.join(d, "hosts.d")
            subprocess.run([FIXTURE, "up", h, "2"], check=True, capture_output=True)
            try:
                with open(os.path.join(d, "hosts"), "w") as f:
                    f.write("node1 slots=2\nnode2 slots=2\n")
                env0 = {"HOME": os.path.join(h, "home"), "OMPI_MCA_btl_tcp_if_include": "10.213.77.0/24", "OMPI_MCA_oob_tcp_if_include": "10.213.77.0/24"}
                ssh = ["--launcher", "ssh", "--hostfile", os.path.join(d, "hosts"), "--ssh_config", os.path.join(h, "ssh_config"), "--collective-timeout", to]
                for name, la, env, down in [
                    ("SIGSTOP of rank 3 of 4 on node2 (ssh)", ssh, {"GLM_TEST_FAULT": "stop:3:5"}, False),
                    ("kill -9 of rank 3 on node2 (ssh), --max-restarts 1", ssh + ["--max-restarts", "1"], {"GLM_TEST_FAULT": "kill:3:5"}, False),
                    ("node2 down (ssh), --max-restarts 1 --min-nodes 1", ssh + ["--max-restarts", "1", "--min-nodes", "1"], {"GLM_TEST_FAULT": "stop:2:5"}, True),
                ]:
                    with tempfile.TemporaryDirectory() as jd:
                        kill = (lambda: subprocess.run("ip netns pids glmt-node2 | xargs -r kill -9", shell=True)) if down else None
                        ended, resumed, total, rc, _ = run(name, la, dict(env0, **env), jd, 8, kill)
                        rows.append((name, ended, resumed, total, rc))
            finally:
                subprocess.run([FIXTURE, "down", h], capture_output=True)
    print(f"collective timeout {a.timeout} s; times from the fault (tiny model, 8 iterations, a checkpoint every 2, the fault at iteration 5)\n")
    print("| fault | job stopped / attempt ended | restart's first resumed iteration | glm-launch exited | exit code |")
    print("|---|---|---|---|---|")
    for name, ended, resumed, total, rc in rows:
        print(f"| {name} | {fmt(ended)} | {fmt(resumed)} | {fmt(total)} | {rc} |")


if __name__ == "__main__":
    main()
