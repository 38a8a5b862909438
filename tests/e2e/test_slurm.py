"""Launchers, placement and the Slurm scripts: local ranks, srun steps placed over the nodes of an
allocation, the dry-run plan, preemption (warning signal -> save -> requeue -> resume only what is
unfinished) vs cancel, and the RUN_DIR lock, on a two-node Slurm cluster that the session starts on
localhost (tests/slurm_cluster.py: two slurmd on 127.0.0.1; Debian's Slurm is installed with
apt-get when missing)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_arch
from tests.slurm_cluster import SlurmCluster

TRAIN = ["train.global_batch_pairs=8", "train.seq_length=128", "data.max_prompt_length=32", "parallel.tp=2",
         "train.lr=1e-3", "train.warmup_steps=0", "train.schedule=constant", "output.tensorboard=false"]
TINY_LLAMA = ROOT / "configs" / "models" / "tiny_llama.yaml"


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


# slurm_cluster and slurm_env: tests/e2e/conftest.py


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> dict:
    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.synthetic import marker_pairs, write_jsonl
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    base = tmp_path_factory.mktemp("slurm_policy")
    tok = build_tiny_tokenizer(base / "tokenizer", vocab_size=512)
    return {"model": save_hf_model(tiny_arch("llama"), base / "llama", seed=3, tokenizer_dir=tok),
            "pairs": write_jsonl(marker_pairs(96, seed=1), base / "pairs.jsonl")}


def train_overrides(policy: dict, out: Path, steps: int, extra: list[str] = ()) -> list[str]:
    return [f"model.path={policy['model']}", f"data.train={policy['pairs']}", f"train.steps={steps}", *TRAIN,
            *extra, f"output.dir={out}"]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def write_script(path: Path, sbatch: list[str], body: str) -> Path:
    lines = ["#!/bin/bash", *[f"#SBATCH {s}" for s in sbatch], "set -euo pipefail", f"cd {ROOT}", body]
    path.write_text("\n".join(lines) + "\n")
    return path


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} does not exist)"


def job_field(cluster: SlurmCluster, job_id: str, name: str) -> str:
    return cluster.show_job(job_id).get(name, "")


def wait_for_job(cluster: SlurmCluster, job_id: str, timeout: float, out: Path) -> dict:
    deadline = time.time() + timeout
    info = {}
    while time.time() < deadline:
        info = cluster.show_job(job_id)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(1.0)
    cluster.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} not finished after {timeout}s (state {info.get('JobState')}):\n"
                         f"{read(out)[-4000:]}\n{cluster.logs()}")


def submit_and_wait(cluster: SlurmCluster, env: dict, script: Path, out: Path, timeout: float) -> dict:
    """sbatch, then poll every second (`sbatch --wait` polls at growing intervals: a 10 s job
    took 42 s to report)."""
    r = cluster.run(["sbatch", "--parsable", str(script)], env=env, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    return wait_for_job(cluster, r.stdout.strip().split(";")[0], timeout, out)


def metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Launchers without Slurm
# ---------------------------------------------------------------------------------------------


def test_slurm_launcher_outside_an_allocation_is_one_clear_error(monkeypatch):
    from aipo_mp.errors import ConfigError
    from aipo_mp.rounds.launchers import SlurmLauncher, make_launcher

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ConfigError) as e:
        SlurmLauncher(handle_signals=False)
    assert len(e.value.errors) == 1 and "SLURM_JOB_ID" in e.value.errors[0] and "sbatch" in e.value.errors[0]
    with pytest.raises(ConfigError):
        make_launcher("kubernetes")


def test_stage_ports_differ_per_stage_and_requeue():
    from aipo_mp.rounds.launchers import stage_port

    ports = {stage_port("4711", restart, stage) for restart in range(3) for stage in range(20)}
    assert len(ports) == 60 and all(20000 <= p < 32000 for p in ports)
    assert stage_port("4711", 0, 0) != stage_port("4712", 0, 0)


def test_slurm_launcher_command_layout(monkeypatch):
    """srun lines for a 4-node job of 8 CPUs per node: a 1-task stage is pinned to the first node
    (MASTER_ADDR) and gets the node's CPUs; a 32-task stage spreads 8 per node with 1 CPU each;
    torchrun variables never reach srun; AIPO_PYTHON / AIPO_SETUP wrap the stage command."""
    from aipo_mp.rounds import launchers
    from aipo_mp.rounds.placement import Placement

    monkeypatch.setattr(launchers, "job_hosts", lambda env: ["gpu001", "gpu002", "gpu003", "gpu004"])
    monkeypatch.setattr(launchers, "node_address", lambda host, env=None: "10.0.0.1" if host == "gpu001" else host)
    monkeypatch.setattr(launchers.shutil, "which", lambda name, path=None: f"/usr/bin/{name}")
    env = {"SLURM_JOB_ID": "123", "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "gpu[001-004]",
           "SLURM_JOB_CPUS_PER_NODE": "8(x4)", "SLURM_NTASKS_PER_NODE": "8", "RANK": "0", "WORLD_SIZE": "1",
           "AIPO_SRUN_ARGS": "--mpi=pmix", "PATH": "/usr/bin"}
    launcher = launchers.SlurmLauncher(environ=env, handle_signals=False, task_wait_s=60)
    cmd, step_env = launcher.command("export", ["checkpoint_tools", "mcore-to-hf"], Placement(1, 1, 1, 1))
    assert "--nodes=1" in cmd and "--ntasks=1" in cmd and "--nodelist=gpu001" in cmd and "--kill-on-bad-exit=1" in cmd
    assert "--cpus-per-task=8" in cmd and "--mpi=pmix" in cmd and "--wait=60" in cmd
    assert cmd[cmd.index(sys.executable):] == [sys.executable, "-m", "checkpoint_tools", "mcore-to-hf"]
    assert step_env["MASTER_ADDR"] == "10.0.0.1" and "RANK" not in step_env and "WORLD_SIZE" not in step_env
    assert "SLURM_NTASKS_PER_NODE" not in step_env
    cmd2, env2 = launcher.command("train", ["aipo_mp.cli", "train"], Placement(32, 4, 8, 1), Path("/r/logs/t.log"), 30)
    assert "--nodes=4" in cmd2 and "--ntasks-per-node=8" in cmd2 and not any(c.startswith("--nodelist") for c in cmd2)
    assert "--cpus-per-task=1" in cmd2 and "--time=30" in cmd2 and "--output=/r/logs/t/rank%t.log" in cmd2
    assert env2["MASTER_PORT"] != step_env["MASTER_PORT"]
    wrapped = dict(env, AIPO_PYTHON="apptainer exec img.sif python3", AIPO_SETUP="/site/setup.sh")
    cmd3, _ = launchers.SlurmLauncher(environ=wrapped, handle_signals=False).command(
        "pairs", ["aipo_mp.cli", "pairs"], Placement(1, 1, 1, 0))
    i = cmd3.index("bash")
    assert cmd3[i + 3:] == ["/site/setup.sh", "apptainer", "exec", "img.sif", "python3", "-m", "aipo_mp.cli", "pairs"]
    assert 'source "$0"' in cmd3[cmd3.index("bash") + 2]
    assert launchers.cpus_per_node({"SLURM_JOB_CPUS_PER_NODE": "64,32(x3)"}) == 32


RECIPE_123B = ROOT / "configs" / "recipes" / "aipo_mistral_large_123b.yaml"


def dry_run(capsys, *args: str) -> subprocess.CompletedProcess:
    """`aipo-mp run RECIPE_123B --launcher slurm --dry-run --nodes 8 --gpus-per-node 8 ARGS` in
    this process (outside an allocation: the test clears SLURM_*)."""
    from aipo_mp.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["run", str(RECIPE_123B), "--launcher", "slurm", "--dry-run", "--nodes", "8", "--gpus-per-node", "8",
              *args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, e.value.code, out.out, out.err)


def test_dry_run_places_every_stage_of_the_123b_recipe(capsys, monkeypatch):
    """The issue's done-when: on 8 nodes x 8 GPUs sampling is 8 engines of TP 8, one per node;
    reward and kl run TP 8 engines; export packs its 32 ranks 8 per node; training is 64 tasks;
    replicas that do not fit fail with one line, before anything starts."""
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    r = dry_run(capsys, "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    stages = {s["name"]: s for s in plan["stages"]}
    assert set(stages) == {"export", "sample", "reward", "pairs", "train", "kl"}
    assert all({"ntasks", "nodes", "ntasks_per_node", "gpus_per_task", "argv"} <= set(s) for s in plan["stages"])
    shape = {name: (s["ntasks"], s["nodes"], s["ntasks_per_node"], s["gpus_per_task"]) for name, s in stages.items()}
    assert shape == {"sample": (8, 8, 1, 8), "reward": (8, 8, 1, 8), "kl": (8, 8, 1, 8), "export": (32, 4, 8, 1),
                     "pairs": (1, 1, 1, 0), "train": (64, 8, 8, 1)}
    sample = stages["sample"]["argv"]
    assert sample[0].endswith("srun") and "--ntasks=8" in sample and "--nodes=8" in sample
    assert "--ntasks-per-node=1" in sample and "--shard-dir" in sample
    assert "--tensor-parallel" in stages["kl"]["argv"] and stages["kl"]["argv"][stages["kl"]["argv"].index(
        "--tensor-parallel") + 1] == "8"
    assert "--nodelist=node001,node002,node003,node004" in stages["export"]["argv"]
    text = dry_run(capsys)
    assert text.returncode == 0 and "round0-sample: 8 task(s) on 8 node(s)" in text.stdout, text.stdout
    for override, key in (("sampling.replicas=16", "sampling.replicas=16 x sampling.tensor_parallel=8 needs 128"),
                          ("sampling.tensor_parallel=16", "sampling.replicas=8 engines x 2 nodes each (sampling.tensor_parallel=16) "
                           "need 16 nodes; the allocation has 8"),
                          ("reward.replicas=9", "reward.replicas=9 x reward.tensor_parallel=8 needs 72")):
        bad = dry_run(capsys, override)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and key in lines[0] and lines[0].startswith("error: "), \
            (override, bad.stderr)
        assert not bad.stdout


@pytest.mark.dist
def test_local_launcher_ranks_stop_signal_and_failure(tmp_path):
    """Two ranks join one gloo group; SIGUSR1 to the launcher reaches both ranks and marks the
    stage stopped, after which no stage starts; one failing rank ends the others."""
    from aipo_mp.rounds.launchers import LocalLauncher, one_task

    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with LocalLauncher() as launcher:
        log = tmp_path / "stop.log"
        rank0 = tmp_path / "stop" / "rank0.log"  # logs/STAGE/rank<K>.log beside logs/STAGE.log

        def signal_when_ready():
            deadline = time.time() + 120
            while time.time() < deadline and "ready" not in (rank0.read_text() if rank0.exists() else ""):
                time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGUSR1)

        threading.Thread(target=signal_when_ready, daemon=True).start()
        result = launcher.run("stop", ["tests.slurm_cluster", "allreduce", str(tmp_path / "out"), "120"],
                              one_task(2), env=env, log_path=log)
        assert result.stopped_by_signal and result.returncode == 0, (result, read(rank0))
        ranks = [json.loads((tmp_path / "out" / f"rank_{r}.json").read_text()) for r in range(2)]
        assert [r["signals"] for r in ranks] == [["SIGUSR1"], ["SIGUSR1"]]
        assert {r["sum"] for r in ranks} == {1.0} and {r["launcher"] for r in ranks} == {"torchrun"}
        assert launcher.stop_requested
        later = launcher.run("later", ["tests.slurm_cluster", "exit", "0"], env=env)
        assert later.stopped_by_signal and later.returncode == 0

    with LocalLauncher(handle_signals=False) as launcher:
        launcher.stop_requested = True  # a signal came as the stage finished:
        assert launcher._result(0, marker_seen=False).ok  # exit 0 is done
        assert launcher._result(1, marker_seen=False).stopped_by_signal  # a failure after it: rerun after requeue
        assert launcher._result(0, marker_seen=True).stopped_by_signal  # the trainer saved and stopped
    with LocalLauncher(handle_signals=False) as launcher:
        hung = launcher.run("hung", ["tests.slurm_cluster", "exit", "0", "300"], env=env, time_limit_min=0.05,
                            log_path=tmp_path / "hung.log")
        assert hung.timed_out and hung.returncode != 0 and not hung.stopped_by_signal, hung
        assert "ran past its wall-clock limit" in read(tmp_path / "hung.log")

    with LocalLauncher() as launcher:
        t0 = time.time()
        result = launcher.run("fail", ["tests.slurm_cluster", "exit", "3"], one_task(1), env=env)
        assert result.returncode == 3 and not result.stopped_by_signal
        # rank 1 exits 3 after 1 s; rank 0 would sleep 300 s but is stopped.
        result = launcher.run("fail2", ["tests.slurm_cluster", "rank-exit", "3", "300"], one_task(2), env=env)
        assert result.returncode == 3 and not result.stopped_by_signal, result
        assert time.time() - t0 < 60


# ---------------------------------------------------------------------------------------------
# On a Slurm cluster
# ---------------------------------------------------------------------------------------------


LAUNCHER_DRIVER = """
import json, sys
from pathlib import Path
from aipo_mp.rounds.launchers import SlurmLauncher
from aipo_mp.rounds.placement import Placement
out = sys.argv[1]
launcher = SlurmLauncher()
results = []
for name, placement in (("two", Placement(2, 2, 1, 0)), ("one", Placement(1, 1, 1, 0))):
    r = launcher.run(name, ["tests.slurm_cluster", "allreduce", f"{out}/{name}"], placement,
                     log_path=Path(f"{out}/logs/{name}.log"))
    results.append({"name": name, "returncode": r.returncode, "stopped": r.stopped_by_signal})
bad = launcher.run("bad", ["tests.slurm_cluster", "exit", "3"], Placement(2, 2, 1, 0))
results.append({"name": "bad", "returncode": bad.returncode, "stopped": bad.stopped_by_signal})
json.dump(results, open(f"{out}/results.json", "w"))
"""


@pytest.mark.slow
def test_slurm_launcher_runs_srun_steps(slurm_cluster, slurm_env, tmp_path):
    """Inside a two-node batch job, SlurmLauncher runs a 2-task stage placed one task per node and
    a 1-task stage as srun steps: the tasks see the Slurm layout, meet at MASTER_ADDR:MASTER_PORT
    (fresh per stage; the node names n1/n2 do not resolve, so MASTER_ADDR is n1's NodeAddr), each
    task sourced AIPO_SETUP on its node, each rank writes its own log file, and a failing stage
    reports its exit code."""
    from aipo_mp.rounds.launchers import stage_port

    (tmp_path / "driver.py").write_text(LAUNCHER_DRIVER)
    (tmp_path / "setup.sh").write_text('export AIPO_SETUP_MARK="sourced on $SLURMD_NODENAME"\n')
    script = write_script(tmp_path / "launch.sh", ["-N 2", "-n 2", f"-o {tmp_path}/job.out"],
                          f"{sys.executable} {tmp_path}/driver.py {tmp_path}")
    env = dict(slurm_env, AIPO_SETUP=str(tmp_path / "setup.sh"))  # sourced in every task of every step
    info = submit_and_wait(slurm_cluster, env, script, tmp_path / "job.out", timeout=240)
    job = info["JobId"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, read(tmp_path / "job.out")[-4000:])
    results = {x["name"]: x for x in json.loads((tmp_path / "results.json").read_text())}
    assert results["two"] == {"name": "two", "returncode": 0, "stopped": False}
    assert results["one"]["returncode"] == 0
    # srun reports the highest task exit code: 3, or 143 when --kill-on-bad-exit ended the other task first
    assert results["bad"]["returncode"] in (3, 143) and not results["bad"]["stopped"]
    two = [json.loads((tmp_path / "two" / f"rank_{i}.json").read_text()) for i in range(2)]
    assert {t["launcher"] for t in two} == {"slurm"} and {t["world_size"] for t in two} == {2}
    assert {t["sum"] for t in two} == {1.0} and sorted(t["node"] for t in two) == ["n1", "n2"]
    assert sorted(t["setup_mark"] for t in two) == ["sourced on n1", "sourced on n2"]
    assert {t["master"] for t in two} == {f"127.0.0.1:{stage_port(job, 0, 0)}"}
    one = json.loads((tmp_path / "one" / "rank_0.json").read_text())
    assert one["world_size"] == 1 and one["master"] == f"127.0.0.1:{stage_port(job, 0, 1)}" and one["node"] == "n1"
    assert "[launcher] two: 2 task(s): " in read(tmp_path / "logs" / "two.log")
    assert "ready: 2 ranks" in read(tmp_path / "logs" / "two" / "rank0.log")
    assert (tmp_path / "logs" / "two" / "rank1.log").exists()


PREEMPT_DRIVER = """
import sys
from pathlib import Path
from aipo_mp.rounds.launchers import EXIT_STOPPED, SlurmLauncher
from aipo_mp.rounds.placement import Placement
out = Path(sys.argv[1])
result = SlurmLauncher().run("train", ["aipo_mp.cli", "train", *sys.argv[2:]], Placement(2, 1, 2, 0),
                             log_path=out / "logs" / "train.log")
print(f"stage result: {result}", flush=True)
sys.exit(EXIT_STOPPED if result.stopped_by_signal else result.returncode)
"""


@pytest.mark.slow
def test_preempted_job_saves_requeues_and_resumes(slurm_cluster, slurm_env, tiny_policy, tmp_path):
    """(c) `scancel --batch --signal=USR1` (what `--signal=B:USR1@T` does at the time limit) reaches
    the batch shell only; slurm/common.sh forwards it to the driver, SlurmLauncher forwards it
    through srun to both ranks; the trainer saves and stops, the driver exits 75, the shell requeues
    the job, and the requeued job resumes from the checkpoint and finishes all steps."""
    steps = 12
    out = tmp_path / "run"
    (tmp_path / "driver.py").write_text(PREEMPT_DRIVER)
    args = " ".join(train_overrides(tiny_policy, out, steps=steps, extra=["train.save_every=1000"]))
    body = (f"source {ROOT}/slurm/common.sh\n"
            f"aipo_log \"restart ${{SLURM_RESTART_COUNT:-0}}\"\n"
            f"aipo_run_requeue {sys.executable} {tmp_path}/driver.py {tmp_path} {TINY_LLAMA} {args}")
    script = write_script(tmp_path / "preempt.sh", ["-N 1", "-n 2", "--requeue", "--open-mode=append",
                                                   f"-o {tmp_path}/job.out"], body)
    r = slurm_cluster.run(["sbatch", "--parsable", str(script)], env=slurm_env, timeout=30)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    deadline = time.time() + 240
    while len(metrics_steps(out)) < 2:  # training is under way: the ranks handle SIGUSR1 by now
        assert time.time() < deadline, f"training did not start:\n{read(tmp_path / 'job.out')[-4000:]}"
        assert job_field(slurm_cluster, job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), read(
            tmp_path / "job.out")[-4000:]
        time.sleep(0.3)
    sig = slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job], env=slurm_env)
    assert sig.returncode == 0, sig.stderr
    info = wait_for_job(slurm_cluster, job, 300, tmp_path / "job.out")
    log, train_log = read(tmp_path / "job.out"), read(tmp_path / "logs" / "train" / "rank0.log")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-4000:])
    assert info["Restarts"] == "1", (info, log[-4000:])
    assert "batch shell got SIGUSR1" in log and "requeueing job" in log, log[-4000:]
    assert "stopped by signal after step" in train_log and "resuming from" in train_log, train_log[-4000:]
    assert metrics_steps(out) == list(range(1, steps + 1)), metrics_steps(out)
    stopped_at = int(train_log.split("stopped by signal after step ")[1].split(";")[0])
    assert 2 <= stopped_at < steps


CANCEL_DRIVER = """
import sys
from pathlib import Path
from aipo_mp.rounds.launchers import EXIT_STOPPED, SlurmLauncher
from aipo_mp.rounds.placement import Placement
out = Path(sys.argv[1])
result = SlurmLauncher().run("wait", ["tests.slurm_cluster", "allreduce", str(out / "ranks"), "120"],
                             Placement(2, 2, 1, 0), log_path=out / "logs" / "wait.log")
print(f"stage result: {result}", flush=True)
sys.exit(EXIT_STOPPED if result.stopped_by_signal else result.returncode)
"""


@pytest.mark.slow
def test_scancel_leaves_the_job_cancelled(slurm_cluster, slurm_env, tmp_path):
    """A plain `scancel` (SIGTERM, no USR1 warning) of a running job: the stage is stopped, the
    driver exits 75, and slurm/common.sh does not requeue: the job stays CANCELLED, 0 restarts."""
    (tmp_path / "driver.py").write_text(CANCEL_DRIVER)
    body = (f"source {ROOT}/slurm/common.sh\n"
            f"aipo_run_requeue {sys.executable} {tmp_path}/driver.py {tmp_path}")
    script = write_script(tmp_path / "cancel.sh", ["-N 2", "-n 2", "--requeue", "--open-mode=append",
                                                  f"-o {tmp_path}/job.out"], body)
    r = slurm_cluster.run(["sbatch", "--parsable", str(script)], env=slurm_env, timeout=30)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    rank0 = tmp_path / "logs" / "wait" / "rank0.log"
    deadline = time.time() + 120
    while "ready: 2 ranks" not in read(rank0):
        assert time.time() < deadline, read(tmp_path / "job.out")[-4000:]
        time.sleep(0.2)
    assert slurm_cluster.run(["scancel", job], env=slurm_env).returncode == 0
    info = wait_for_job(slurm_cluster, job, 120, tmp_path / "job.out")
    time.sleep(3)  # a wrong requeue would show up as PENDING with Restarts=1 by now
    info = slurm_cluster.show_job(job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", (info, read(tmp_path / "job.out")[-4000:])
    log = read(tmp_path / "job.out")
    assert "requeueing" not in log and "without a warning signal" in log and "not requeued" in log, log


def shard_markers(root: Path) -> dict[int, dict]:
    """{shard index: marker} of the finished shards of a placed stage (aipo_mp/rounds/shards.py)."""
    return {int(p.stem.split("_")[1]): json.loads(p.read_text()) for p in root.glob("of*/shard_*.json")}


@pytest.mark.slow
def test_sbatch_two_nodes_places_stages_resumes_unfinished_shards_and_locks(slurm_cluster, slurm_env, tiny_policy,
                                                                           tmp_path):
    """`sbatch --nodes=2 slurm/aipo_tiny.sh` with sampling.replicas=2 and reward.replicas=2: one
    vLLM engine per node (each shard records its node), the rule reward sharded over both nodes,
    and training (TP=2) with one rank per node. USR1 to the batch shell during sampling: the
    finished shards are kept, the requeued job samples only the unfinished ones. Meanwhile a
    second sbatch on the same RUN_DIR fails at once with the lock message. Run files are
    created with the submitter's umask; checkpoints are pruned to train.keep_checkpoints; the
    console shows one line per stage start and end and none of vLLM's noise."""
    from aipo_mp.demo.task import write_prompts

    prompts = write_prompts(tmp_path / "prompts.jsonl", 48, seed=0)
    run_dir = tmp_path / "run"
    args = ["rounds.num_rounds=1", "rounds.evaluate_final=false", "rounds.kl_estimate=false", "sampling.max_tokens=8",
            "sampling.n=4", "pairs.allow_truncated=true", "pairs.min_gap=0.0", "train.steps=6", "train.save_every=2",
            "train.keep_checkpoints=2", "train.global_batch_pairs=8", f"model.path={tiny_policy['model']}",
            f"rounds.prompts={prompts}", "sampling.replicas=2", "reward.replicas=2", "sampling.shard_prompts=2"]
    env = dict(slurm_env, RUN_DIR=str(run_dir), AIPO_VENV=str(Path(sys.executable).parents[1]),
               AIPO_ARGS=" ".join(args))
    out = tmp_path / "job.out"
    submit = ["bash", "-c", 'umask 022 && exec "$@"', "sbatch", "sbatch", "--parsable"]
    r = slurm_cluster.run([*submit, "--nodes=2", f"--output={out}", str(ROOT / "slurm" / "aipo_tiny.sh")], env=env,
                          cwd=ROOT, timeout=30)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    sample_root = run_dir / "round_0" / "shards" / "sample"
    deadline = time.time() + 300
    while not shard_markers(sample_root):  # the first shards are written: sampling is under way
        assert time.time() < deadline, f"sampling did not start:\n{read(out)[-4000:]}"
        assert job_field(slurm_cluster, job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), read(out)[-4000:]
        time.sleep(0.05)
    sig = slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job], env=slurm_env)
    assert sig.returncode == 0, sig.stderr
    before = {k: (sample_root / "of24" / f"shard_{k:05d}.jsonl").stat().st_mtime_ns for k in shard_markers(sample_root)}
    assert 0 < len(before) < 24

    # The requeued job runs again (same id): a second job on the same RUN_DIR must fail at once.
    deadline = time.time() + 300
    while read(out).count("restart 1 on") == 0 or job_field(slurm_cluster, job, "JobState") != "RUNNING":
        assert time.time() < deadline, f"job was not requeued:\n{read(out)[-4000:]}"
        time.sleep(0.3)
    second_out = tmp_path / "second.out"
    r2 = slurm_cluster.run([*submit, "--nodes=1", "--ntasks=1", f"--output={second_out}",
                            str(ROOT / "slurm" / "aipo_tiny.sh")], env=env, cwd=ROOT, timeout=30)
    assert r2.returncode == 0, r2.stderr
    second = wait_for_job(slurm_cluster, r2.stdout.strip().split(";")[0], 120, second_out)
    assert second["JobState"] == "FAILED" and second["ExitCode"] == "2:0", (second, read(second_out))
    lock_lines = [l for l in read(second_out).splitlines() if l.startswith("error: ")]
    assert len(lock_lines) == 1 and "is in use by `aipo-mp run`" in lock_lines[0] and f"Slurm job {job}" in lock_lines[0]

    info = wait_for_job(slurm_cluster, job, 400, out)
    log = read(out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", (info, log[-4000:])
    assert "stopped by a signal during round0-sample" in log and "requeueing job" in log, log[-4000:]
    markers = shard_markers(sample_root)
    assert sorted(markers) == list(range(24))
    assert {m["node"] for m in markers.values()} == {"n1", "n2"}  # one engine per node
    first = {k for k, m in markers.items() if m["restart"] == 0}
    assert set(before) <= first and len(first) < 24, (sorted(before), sorted(first))
    for k, mtime in before.items():  # finished shards were not redone after the requeue
        assert (sample_root / "of24" / f"shard_{k:05d}.jsonl").stat().st_mtime_ns == mtime
    samples = [json.loads(l) for l in (run_dir / "round_0" / "samples.jsonl").read_text().splitlines()]
    ids = [json.loads(l)["id"] for l in prompts.read_text().splitlines()]
    assert [s["prompt_id"] for s in samples] == [i for i in ids for _ in range(4)]  # merged in prompt order
    reward_markers = shard_markers(run_dir / "round_0" / "shards" / "reward")
    assert sorted(reward_markers) == [0, 1] and {m["node"] for m in reward_markers.values()} == {"n1", "n2"}

    train_log = read(run_dir / "logs" / "round0-train.log")
    assert "--ntasks=2 --nodes=2 --ntasks-per-node=1" in train_log, train_log  # one training rank per node
    assert metrics_steps(run_dir / "round_0" / "train") == list(range(1, 7))
    ckpts = sorted(p.name for p in (run_dir / "round_0" / "train" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_0000004", "step_0000006"], ckpts
    for f in (run_dir / "round_0" / "samples.jsonl", run_dir / "round_0" / "scored.jsonl", run_dir / "run_state.json",
              run_dir / "round_0" / "pairs.jsonl"):
        assert f.stat().st_mode & 0o777 == 0o644, (f, oct(f.stat().st_mode))
    state = json.loads((run_dir / "run_state.json").read_text())
    # Every stage of round 0 recorded done (synthesize, compare and baseline as skipped: not enabled).
    assert set(state["rounds"]["0"]) == {"export", "synthesize", "sample", "reward", "compare", "pairs", "train",
                                         "baseline"}
    progress = [l for l in log.splitlines() if l.startswith("[aipo-mp run]")]
    assert "vllm" not in log.lower() and "WARNING" not in log, log[-4000:]
    # The train stage is announced once and reported done once; between them only the one-line
    # progress of its logged steps ("N/M steps", as many as the stage lasted 30 s periods).
    train = [l for l in progress if "round0-train" in l and not re.search(r": \d+/\d+ steps$", l)]
    assert len(train) == 2 and "task(s) on 2 node(s)" in train[0] and ": done in" in train[1], progress


# ---------------------------------------------------------------------------------------------
# Operating a long run without Slurm: lock, umask, retention, time left
# ---------------------------------------------------------------------------------------------


def test_directory_lock_umask_retention_and_time_left(tmp_path):
    """A second lock on a directory fails at once naming the holder (the kernel frees it when the
    holder exits); atomic writes get the umask's mode, not mkstemp's 0600; keep_checkpoints keeps
    the newest and the one `latest` names; TimeGuard trips when a step and a save no longer fit."""
    from aipo_mp.runtime.files import atomic_directory, atomic_write_text
    from aipo_mp.runtime.locks import Lock, hold_lock
    from aipo_mp.runtime.timeleft import TimeGuard
    from aipo_mp.training.checkpoint import prune_checkpoints

    run_dir = tmp_path / "run"
    with hold_lock(run_dir, "aipo-mp run"):
        env = {k: v for k, v in os.environ.items() if k != "AIPO_MP_LOCKED_DIRS"}  # not a child of the holder
        holder = subprocess.run([sys.executable, "-c", "from aipo_mp.runtime.locks import Lock; "
                                 f"Lock({str(run_dir)!r}, 'x').acquire()"], capture_output=True, text=True,
                                env=dict(env, PYTHONPATH=str(ROOT)))
        assert holder.returncode != 0 and "LockHeld" in holder.stderr
        assert f"is in use by `aipo-mp run` (pid {os.getpid()}" in holder.stderr
    Lock(run_dir, "again").acquire().release()  # released: free again

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_directory(tmp_path / "weights") as d:
            (d / "w.bin").write_bytes(b"0")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "weights").stat().st_mode & 0o777 == 0o750

    ckpts = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        (ckpts / f"step_{step:07d}").mkdir(parents=True)
    (ckpts / "latest").write_text("step_0000004\n")  # e.g. a save after it failed before `latest`
    prune_checkpoints(ckpts, 2)
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000004", "step_0000006", "step_0000008"]
    assert prune_checkpoints(ckpts, 0) == []

    guard = TimeGuard({"AIPO_JOB_END": "1000"}, margin_s=60)
    assert not guard.out_of_time(step_s=100, save_s=200, now=0)  # 0 + 200 + 400 + 60 < 1000
    assert guard.out_of_time(step_s=100, save_s=200, now=400)
    assert not TimeGuard({}).out_of_time(1e9, 1e9)
