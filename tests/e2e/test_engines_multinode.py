"""vLLM engines that span nodes, on the two-node Slurm cluster on localhost (n1, n2 on 127.0.0.1;
tests/slurm_cluster.py). Each engine stage runs inside an sbatch job through the real
SlurmLauncher: one srun step, one task per node, the engine environment from the launcher, the
head task driving and the other serving its headless part (aipo_mp/rounds/engines.py).

The reference is the same engine on one node (one local process, TP=2 in-process, same seeds):
  - a TP=2 engine split as one process per node samples the same tokens (the sample stage's own
    `aipo-mp sample --shard-dir` task), and after its head is killed mid-stage the headless task
    ends by itself (no orphaned engine) and a rerun redoes only the unfinished shards;
  - a DP=2 x EP=2 engine of the tiny Qwen3-MoE over both nodes (vLLM's data-parallel engines with
    the CPU worker extension) gives the TP engine's teacher-forced log-probs.
One engine start takes 40-90 s here (more under load): the spanning run is shared by the two
scenarios that need it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_arch
from tests.e2e.test_slurm import read, submit_and_wait, write_script

pytestmark = pytest.mark.slow

SAMPLING = ["sampling.n=2", "sampling.max_tokens=24", "sampling.temperature=1.0", "sampling.seed=7",
            "sampling.kv_cache_gib=0.25", "sampling.max_model_len=256"]
TOKENS = [[5, 17, 60, 3, 99, 41, 8, 250, 12], [300, 2, 2, 7, 140, 55], list(range(20, 60, 3))]
NUM_PROMPTS = 6  # one prompt per shard: a kill after the first shard leaves others undone

STAGE_DRIVER = """
import json, sys
from pathlib import Path
from aipo_mp.rounds.launchers import SlurmLauncher
from aipo_mp.rounds.placement import Placement
out, name = Path(sys.argv[1]), sys.argv[2]
placement = Placement(ntasks=2, nodes=2, ntasks_per_node=1, gpus_per_task=1, engines=1, nodes_per_engine=2)
r = SlurmLauncher().run(name, sys.argv[3:], placement, log_path=out / "logs" / f"{name}.log")
(out / f"{name}.result.json").write_text(json.dumps({"returncode": r.returncode}))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    base = tmp_path_factory.mktemp("spanning")
    tok = build_tiny_tokenizer(base / "tokenizer", vocab_size=512)  # BPE: Qwen families need it
    prompts = base / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"say {i} words about colour {i}"}) + "\n"
                               for i in range(NUM_PROMPTS)))
    tokens = base / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    return {"base": base, "moe": save_hf_model(tiny_arch("qwen3_moe"), base / "qwen3_moe", seed=5, tokenizer_dir=tok),
            "prompts": prompts, "tokens": tokens}


@pytest.fixture(scope="module")
def one_node(models) -> dict:
    """The reference: the TP=2 engine in one local process (one node), its samples and log-probs."""
    out = models["base"] / "one_node.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="0|1")
    for k in ("RANK", "WORLD_SIZE", "AIPO_ENGINE_NODES", "AIPO_ENGINE_HOSTS", "AIPO_ENGINE_PORT"):
        env.pop(k, None)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "tests.engine_task_worker", "--model", str(models["moe"]),
                        "--tokens", str(models["tokens"]), "--prompts", str(models["prompts"]), "--out", str(out),
                        "sampling.tensor_parallel=2", *SAMPLING], env=env, capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    result = json.loads(out.read_text())
    print(f"one-node TP=2 engine: {time.time() - t0:.0f} s")
    return result


def head_pids(marker: str) -> list[int]:
    """The head tasks (SLURM_PROCID=0) whose command line holds `marker`, outermost only."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        # the task's `python -m aipo_mp.cli`, not the job's driver or srun (their command lines hold the argv too)
        if (marker in cmdline and " -m aipo_mp.cli " in cmdline and b"SLURM_PROCID=0" in environ
                and not cmdline.split()[0].endswith("srun")):
            found[int(proc.name)] = ppid
    return [pid for pid, ppid in found.items() if ppid not in found]


def processes_holding(marker: str) -> list[str]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline and "pytest" not in cmdline:
                out.append(f"{proc.name}: {cmdline[:200]}")
    return out


def submit(cluster, env: dict, base: Path, name: str, argv: list[str]) -> str:
    (base / "driver.py").write_text(STAGE_DRIVER)
    script = write_script(base / f"{name}.sh", ["-N 2", "-n 2", f"-o {base}/{name}.out"],
                          f"{sys.executable} {base}/driver.py {base} {name} {' '.join(argv)}")
    r = cluster.run(["sbatch", "--parsable", str(script)], env=env, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def spanning_sample(slurm_cluster, slurm_env, models) -> dict:
    """The sample stage on a TP=2 engine spanning n1 and n2: started, its head killed (SIGKILL)
    once a shard is done, then rerun to the end (a second sbatch of the same stage)."""
    from tests.e2e.test_slurm import wait_for_job

    base = models["base"] / "spanning_sample"
    base.mkdir()
    shard_root = base / "shards"
    argv = ["aipo_mp.cli", "sample", "--model", str(models["moe"]), "--prompts", str(models["prompts"]),
            "--shard-dir", str(shard_root), "--shard-prompts", "1", "sampling.tensor_parallel=2", *SAMPLING]
    shard_dir = shard_root / f"of{NUM_PROMPTS}"
    t0 = time.time()
    job = submit(slurm_cluster, slurm_env, base, "first", argv)
    deadline = time.time() + 900
    while not list(shard_dir.glob("shard_*.json")):
        assert time.time() < deadline, read(base / "first.out")[-3000:] + read(base / "logs" / "first" / "rank0.log")[-4000:]
        assert slurm_cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), (
            read(base / "logs" / "first" / "rank0.log")[-4000:] + read(base / "logs" / "first" / "rank1.log")[-4000:])
        time.sleep(0.05)
    heads = head_pids(str(shard_root))
    assert len(heads) == 1, heads
    os.kill(heads[0], 9)
    killed_at = time.time()
    first_done = {p.name: p.read_text() for p in shard_dir.glob("shard_*.json")}
    info = wait_for_job(slurm_cluster, job, 180, base / "first.out")
    ended_s = time.time() - killed_at
    time.sleep(2)
    leftovers = processes_holding(str(models["moe"]))
    t1 = time.time()
    info2 = submit_and_wait(slurm_cluster, slurm_env, write_script(
        base / "second.sh", ["-N 2", "-n 2", f"-o {base}/second.out"],
        f"{sys.executable} {base}/driver.py {base} second {' '.join(argv)}"), base / "second.out", timeout=900)
    print(f"spanning sample stage: first run {killed_at - t0:.0f} s to the kill, step ended {ended_s:.0f} s after "
          f"it; rerun {time.time() - t1:.0f} s")
    return {"base": base, "shard_dir": shard_dir, "first_done": first_done, "first_info": info, "ended_s": ended_s,
            "leftovers": leftovers, "second_info": info2}


def test_tp_engine_spanning_two_nodes_samples_like_one_node(spanning_sample, one_node):
    """TP=2 as one process per node: the merged samples equal the one-node TP=2 engine's (same
    seeds, same tokens), text, lengths and finish reasons."""
    from aipo_mp.rounds.shards import ShardDir

    base = spanning_sample["base"]
    assert spanning_sample["second_info"]["JobState"] == "COMPLETED", read(base / "second.out")[-3000:]
    assert json.loads((base / "second.result.json").read_text())["returncode"] == 0, (
        read(base / "logs" / "second" / "rank0.log")[-4000:])
    merged = ShardDir(spanning_sample["shard_dir"].parent, NUM_PROMPTS).merge()
    reference = one_node["samples"]
    assert len(merged) == len(reference) == NUM_PROMPTS * 2
    key = lambda r: (r["prompt_id"], r["sample_index"])  # noqa: E731
    fields = ("text", "num_tokens", "finish_reason", "num_prompt_tokens")
    assert [[r[f] for f in fields] for r in sorted(merged, key=key)] == \
        [[r[f] for f in fields] for r in sorted(reference, key=key)]
    assert len({r["text"] for r in merged}) > NUM_PROMPTS  # not one degenerate answer
    rank0 = read(base / "logs" / "second" / "rank0.log")
    rank1 = read(base / "logs" / "second" / "rank1.log")
    assert "[shards] task 0/1 on n1" in rank0  # the head on n1 drove the engine's shards
    assert "headless part of" in rank1 and "[shards]" not in rank1  # n2 served, did no shard work


def test_headless_task_ends_with_its_head_and_requeue_redoes_only_unfinished_shards(spanning_sample):
    """The head killed with SIGKILL mid-stage: the step ends and nothing of the engine is left
    running; in the rerun the headless task ends by itself when its head finishes; the rerun does
    only the shards the killed run left undone and keeps the finished ones as they were."""
    base, shard_dir = spanning_sample["base"], spanning_sample["shard_dir"]
    assert spanning_sample["first_info"]["JobState"] in ("COMPLETED", "FAILED"), spanning_sample["first_info"]
    assert spanning_sample["ended_s"] < 120, spanning_sample["ended_s"]
    assert spanning_sample["leftovers"] == []
    # srun's --kill-on-bad-exit also ends the killed head's step; a head that finishes normally
    # (the rerun) has no such help: its headless task must end by itself, or the step never ends
    assert "head ended, headless part stopped" in read(base / "logs" / "second" / "rank1.log")
    first_done = spanning_sample["first_done"]
    assert 1 <= len(first_done) < NUM_PROMPTS, sorted(first_done)
    for name, text in first_done.items():  # untouched by the rerun
        assert (shard_dir / name).read_text() == text
    redone = sorted(int(p.name[6:11]) for p in shard_dir.glob("shard_*.json") if p.name not in first_done)
    expected = sorted(set(range(NUM_PROMPTS)) - {int(n[6:11]) for n in first_done})
    assert redone == expected
    assert f"shards {expected} of {NUM_PROMPTS}" in read(base / "logs" / "second" / "rank0.log")


def test_dp2_ep2_moe_engine_over_two_nodes_equals_tp_logprobs(slurm_cluster, slurm_env, models, one_node):
    """A DP=2 x EP=2 engine of the tiny Qwen3-MoE, one DP rank per node (vLLM's data-parallel
    engines, the head's async client spreading the requests, the CPU worker extension): its
    teacher-forced log-probs equal the one-node TP=2 engine's."""
    base = models["base"] / "dp_ep"
    base.mkdir()
    out = base / "dp_ep.json"
    t0 = time.time()
    argv = ["tests.engine_task_worker", "--model", str(models["moe"]), "--tokens", str(models["tokens"]),
            "--out", str(out), "sampling.data_parallel=2", "sampling.expert_parallel=true", *SAMPLING]
    (base / "driver.py").write_text(STAGE_DRIVER)
    info = submit_and_wait(slurm_cluster, slurm_env, write_script(
        base / "dp.sh", ["-N 2", "-n 2", f"-o {base}/dp.out"],
        f"{sys.executable} {base}/driver.py {base} dp {' '.join(argv)}"), base / "dp.out", timeout=900)
    print(f"DP=2 x EP=2 engine over two nodes: {time.time() - t0:.0f} s")
    logs = read(base / "logs" / "dp" / "rank0.log")[-4000:] + read(base / "logs" / "dp" / "rank1.log")[-4000:]
    assert info["JobState"] == "COMPLETED" and out.exists(), logs
    result = json.loads(out.read_text())
    assert result["task"]["nodes"] == 2 and result["task"]["node_rank"] == 0
    got, want = result["logprobs"], one_node["logprobs"]
    assert [len(x) for x in got] == [len(t) - 1 for t in TOKENS] == [len(x) for x in want]
    worst = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w))
    assert worst < 1e-4, worst
    spread = max(abs(a - b) for g in got for a, b in zip(g, g[1:]))
    assert spread > 1e-3  # the log-probs differ from token to token: the comparison can fail
    assert "headless part of" in read(base / "logs" / "dp" / "rank1.log")
