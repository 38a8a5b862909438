"""Launchers and the Slurm scripts: local ranks, srun steps inside an allocation, training under
sbatch, and preemption (signal -> save -> requeue -> resume) on a one-node Slurm cluster that the
session starts on localhost (tests/slurm_cluster.py; Debian's Slurm is installed with apt-get when
missing)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_arch
from tests.slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_installed

TRAIN = ["train.global_batch_pairs=8", "train.seq_length=128", "data.max_prompt_length=32", "parallel.tp=2",
         "train.lr=1e-3", "train.warmup_steps=0", "train.schedule=constant", "output.tensorboard=false"]
TINY_LLAMA = ROOT / "configs" / "models" / "tiny_llama.yaml"


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node Slurm cluster (2 CPUs) on localhost for the whole session."""
    try:
        ensure_installed()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_env(slurm_cluster) -> dict:
    """Environment for Slurm commands and the jobs they submit (sbatch exports it): SLURM_CONF,
    the repository on PYTHONPATH, one thread per rank."""
    env = slurm_cluster.command_env()
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> dict:
    from aipo_mp.models.hf_build import save_hf_model
    from aipo_mp.synthetic import marker_pairs, write_jsonl
    from aipo_mp.tiny import build_tiny_tokenizer

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
    from aipo_mp.config import ConfigError
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
    """srun line for a 4-node job: a 1-task stage is pinned to the first node, which is also
    MASTER_ADDR; a 32-task stage spreads 8 per node; torchrun variables never reach srun."""
    from aipo_mp.rounds import launchers

    monkeypatch.setattr(launchers, "job_hosts", lambda env: ["gpu001", "gpu002", "gpu003", "gpu004"])
    monkeypatch.setattr(launchers.shutil, "which", lambda name, path=None: f"/usr/bin/{name}")
    env = {"SLURM_JOB_ID": "123", "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "gpu[001-004]",
           "SLURM_CPUS_PER_TASK": "8", "SLURM_NTASKS_PER_NODE": "8", "RANK": "0", "WORLD_SIZE": "1",
           "AIPO_SRUN_ARGS": "--mpi=pmix", "PATH": "/usr/bin"}
    launcher = launchers.SlurmLauncher(environ=env, handle_signals=False)
    cmd, step_env = launcher.command("export", ["checkpoint_tools", "mcore-to-hf"], ntasks=1)
    assert "--nodes=1" in cmd and "--ntasks=1" in cmd and "--nodelist=gpu001" in cmd and "--kill-on-bad-exit=1" in cmd
    assert "--cpus-per-task=8" in cmd and "--mpi=pmix" in cmd
    assert cmd[cmd.index(sys.executable):] == [sys.executable, "-m", "checkpoint_tools", "mcore-to-hf"]
    assert step_env["MASTER_ADDR"] == "gpu001" and "RANK" not in step_env and "WORLD_SIZE" not in step_env
    assert "SLURM_NTASKS_PER_NODE" not in step_env
    cmd2, env2 = launcher.command("train", ["aipo_mp.cli", "train"], ntasks=32)
    assert "--nodes=4" in cmd2 and "--ntasks-per-node=8" in cmd2 and not any(c.startswith("--nodelist") for c in cmd2)
    assert env2["MASTER_PORT"] != step_env["MASTER_PORT"]


@pytest.mark.dist
def test_local_launcher_ranks_stop_signal_and_failure(tmp_path):
    """Two ranks join one gloo group; SIGUSR1 to the launcher reaches both ranks and marks the
    stage stopped, after which no stage starts; one failing rank ends the others."""
    from aipo_mp.rounds.launchers import LocalLauncher

    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with LocalLauncher() as launcher:
        log = tmp_path / "stop.log"

        def signal_when_ready():
            deadline = time.time() + 120
            while time.time() < deadline and "ready" not in (log.read_text() if log.exists() else ""):
                time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGUSR1)

        threading.Thread(target=signal_when_ready, daemon=True).start()
        result = launcher.run("stop", ["tests.slurm_cluster", "allreduce", str(tmp_path / "stop"), "120"], ntasks=2,
                              env=env, log_path=log)
        assert result.stopped_by_signal and result.returncode == 0, (result, read(log))
        ranks = [json.loads((tmp_path / "stop" / f"rank_{r}.json").read_text()) for r in range(2)]
        assert [r["signals"] for r in ranks] == [["SIGUSR1"], ["SIGUSR1"]]
        assert {r["sum"] for r in ranks} == {1.0} and {r["launcher"] for r in ranks} == {"torchrun"}
        assert launcher.stop_requested
        later = launcher.run("later", ["tests.slurm_cluster", "exit", "0"], env=env)
        assert later.stopped_by_signal and later.returncode == 0

    with LocalLauncher() as launcher:
        t0 = time.time()
        result = launcher.run("fail", ["tests.slurm_cluster", "exit", "3"], ntasks=1, env=env)
        assert result.returncode == 3 and not result.stopped_by_signal
        # rank 1 exits 3 after 1 s; rank 0 would sleep 300 s but is stopped.
        result = launcher.run("fail2", ["tests.slurm_cluster", "rank-exit", "3", "300"], ntasks=2, env=env)
        assert result.returncode == 3 and not result.stopped_by_signal, result
        assert time.time() - t0 < 60


# ---------------------------------------------------------------------------------------------
# On a Slurm cluster
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sbatch_srun_trains_two_ranks(slurm_cluster, slurm_env, tiny_policy, tmp_path):
    """(a) A batch job runs `srun -n2 python -m aipo_mp.cli train` (TP=2 over two Slurm tasks)."""
    out = tmp_path / "run"
    args = " ".join(train_overrides(tiny_policy, out, steps=3))
    script = write_script(tmp_path / "train.sh", ["-n 2", f"-o {tmp_path}/job.out"],
                          f"srun -n2 --kill-on-bad-exit=1 {sys.executable} -m aipo_mp.cli train {TINY_LLAMA} {args}")
    info = submit_and_wait(slurm_cluster, slurm_env, script, tmp_path / "job.out", timeout=300)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, read(tmp_path / "job.out")[-4000:])
    assert metrics_steps(out) == [1, 2, 3], read(tmp_path / "job.out")[-4000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000003"


LAUNCHER_DRIVER = """
import json, sys
from aipo_mp.rounds.launchers import SlurmLauncher
out = sys.argv[1]
launcher = SlurmLauncher()
results = []
for name, ntasks in (("two", 2), ("one", 1)):
    r = launcher.run(name, ["tests.slurm_cluster", "allreduce", f"{out}/{name}"], ntasks=ntasks,
                     log_path=f"{out}/{name}.log")
    results.append({"name": name, "returncode": r.returncode, "stopped": r.stopped_by_signal})
bad = launcher.run("bad", ["tests.slurm_cluster", "exit", "3"], ntasks=2)
results.append({"name": "bad", "returncode": bad.returncode, "stopped": bad.stopped_by_signal})
json.dump(results, open(f"{out}/results.json", "w"))
"""


@pytest.mark.slow
def test_slurm_launcher_runs_srun_steps(slurm_cluster, slurm_env, tmp_path):
    """(b) Inside a batch job, SlurmLauncher runs a 2-task and a 1-task stage as srun steps: the
    tasks see the Slurm layout, meet at MASTER_ADDR:MASTER_PORT (fresh per stage), and a failing
    stage reports its exit code."""
    from aipo_mp.rounds.launchers import stage_port

    (tmp_path / "driver.py").write_text(LAUNCHER_DRIVER)
    script = write_script(tmp_path / "launch.sh", ["-n 2", f"-o {tmp_path}/job.out"],
                          f"{sys.executable} {tmp_path}/driver.py {tmp_path}")
    info = submit_and_wait(slurm_cluster, slurm_env, script, tmp_path / "job.out", timeout=240)
    job = info["JobId"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, read(tmp_path / "job.out")[-4000:])
    results = {x["name"]: x for x in json.loads((tmp_path / "results.json").read_text())}
    assert results["two"] == {"name": "two", "returncode": 0, "stopped": False}
    assert results["one"]["returncode"] == 0
    assert results["bad"]["returncode"] == 3 and not results["bad"]["stopped"]
    two = [json.loads((tmp_path / "two" / f"rank_{i}.json").read_text()) for i in range(2)]
    assert {t["launcher"] for t in two} == {"slurm"} and {t["world_size"] for t in two} == {2}
    assert {t["sum"] for t in two} == {1.0}
    assert {t["master"] for t in two} == {f"localhost:{stage_port(job, 0, 0)}"}
    one = json.loads((tmp_path / "one" / "rank_0.json").read_text())
    assert one["world_size"] == 1 and one["master"] == f"localhost:{stage_port(job, 0, 1)}"
    assert "[launcher] two: 2 task(s): " in read(tmp_path / "two.log") and "ready: 2 ranks" in read(tmp_path / "two.log")


PREEMPT_DRIVER = """
import sys
from pathlib import Path
from aipo_mp.rounds.launchers import EXIT_STOPPED, SlurmLauncher
out = Path(sys.argv[1])
result = SlurmLauncher().run("train", ["aipo_mp.cli", "train", *sys.argv[2:]], ntasks=2, log_path=out / "train.log")
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
    script = write_script(tmp_path / "preempt.sh", ["-n 2", "--requeue", "--open-mode=append",
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
    log, train_log = read(tmp_path / "job.out"), read(tmp_path / "train.log")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-4000:])
    assert info["Restarts"] == "1", (info, log[-4000:])
    assert "batch shell got SIGUSR1" in log and "requeueing job" in log, log[-4000:]
    assert "stopped by signal after step" in train_log and "resuming from" in train_log, train_log[-4000:]
    assert metrics_steps(out) == list(range(1, steps + 1)), metrics_steps(out)
    stopped_at = int(train_log.split("stopped by signal after step ")[1].split(";")[0])
    assert 2 <= stopped_at < steps


TINY_RECIPE = ROOT / "configs" / "recipes" / "aipo_tiny.yaml"
FALLBACK_RECIPE = """# Written by tests/test_slurm.py while configs/recipes/aipo_tiny.yaml does not exist.
defaults: [{models}/tiny_llama.yaml]
parallel:
  tp: 2
train:
  global_batch_pairs: 4
  seq_length: 128
data:
  max_prompt_length: 32
output:
  tensorboard: false
sampling:
  n: 4
  temperature: 1.0
reward:
  rule: aipo_mp.demo_task:reward
"""


def tiny_recipe_args(recipe: Path, policy: dict, prompts: Path, steps: int) -> list[str]:
    """Overrides that make any tiny recipe quick and self-contained: our tiny policy and prompts
    (unless the recipe names existing ones), one round, short answers, `steps` training steps."""
    from aipo_mp.config import load_config

    cfg = load_config(recipe)
    args = ["rounds.num_rounds=1", "rounds.evaluate_final=false", "rounds.kl_estimate=false",
            "sampling.max_tokens=8", "pairs.allow_truncated=true", f"train.steps={steps}", "train.save_every=1000"]
    if not cfg.model.path or not Path(cfg.model.path).exists():
        args.append(f"model.path={policy['model']}")
    if not cfg.rounds.prompts or not Path(cfg.rounds.prompts).exists():
        args.append(f"rounds.prompts={prompts}")
    if not cfg.reward.rule and not cfg.reward.model:
        args.append("reward.rule=aipo_mp.demo_task:reward")
    return args


@pytest.mark.slow
def test_sbatch_aipo_tiny_script_preempted_and_resumed(slurm_cluster, slurm_env, tiny_policy, tmp_path):
    """(d) `sbatch slurm/aipo_tiny.sh` runs `aipo-mp run --launcher slurm` (sample -> reward ->
    pairs -> train as srun steps). USR1 to the batch shell during training: the trainer saves,
    `aipo-mp run` exits 75, the script requeues, and the requeued job resumes the round's training
    from its checkpoint (earlier stages are not redone) and completes."""
    from aipo_mp.demo_task import write_prompts

    if not (ROOT / "aipo_mp" / "rounds" / "run.py").exists():
        pytest.skip("aipo_mp/rounds/run.py (aipo-mp run) does not exist yet")
    recipe = TINY_RECIPE
    if not recipe.exists():
        recipe = tmp_path / "aipo_tiny.yaml"
        recipe.write_text(FALLBACK_RECIPE.format(models=ROOT / "configs" / "models"))
    prompts = write_prompts(tmp_path / "prompts.jsonl", 16, seed=0)
    steps = 12
    run_dir = tmp_path / "run"
    env = dict(slurm_env, RECIPE=str(recipe), RUN_DIR=str(run_dir), AIPO_VENV=str(Path(sys.executable).parents[1]),
               AIPO_ARGS=" ".join(tiny_recipe_args(recipe, tiny_policy, prompts, steps)))
    if not (Path(env["AIPO_VENV"]) / "bin" / "activate").exists():
        env["AIPO_VENV"] = "none"
    out = tmp_path / "job.out"
    r = slurm_cluster.run(["sbatch", "--parsable", f"--output={out}", str(ROOT / "slurm" / "aipo_tiny.sh")], env=env,
                          cwd=ROOT, timeout=30)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    train_dir = run_dir / "round_0" / "train"
    deadline = time.time() + 300
    while len(metrics_steps(train_dir)) < 2:
        assert time.time() < deadline, f"training did not start:\n{read(out)[-4000:]}"
        assert job_field(slurm_cluster, job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), read(out)[-4000:]
        time.sleep(0.3)
    sig = slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job], env=slurm_env)
    assert sig.returncode == 0, sig.stderr
    info = wait_for_job(slurm_cluster, job, 300, out)
    log = read(out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-4000:])
    assert info["Restarts"] == "1", (info, log[-4000:])
    assert "stopped by a signal during round0-train" in log and "requeueing job" in log, log[-4000:]
    train_log = read(run_dir / "logs" / "round0-train.log")
    assert "stopped by signal after step" in train_log and "resuming from" in train_log, train_log[-4000:]
    assert metrics_steps(train_dir) == list(range(1, steps + 1))
    state = json.loads((run_dir / "run_state.json").read_text())
    assert set(state["rounds"]["0"]) == {"export", "sample", "reward", "pairs", "train"}
    sample_log = read(run_dir / "logs" / "round0-sample.log")
    assert sample_log.count("[launcher] round0-sample:") == 1, "the requeued job redid a finished stage"
    assert (run_dir / "report" / "report.md").exists()
