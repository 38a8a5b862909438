"""Engines that span nodes, without an engine: which engine and node-rank a task is from the
launchers' environment, the multi-node vLLM arguments of each task, the launchers' engine
environment, and the head's beacon tying a headless task's life to its head's (a real second
process; the vLLM part is exercised in tests/e2e/test_engines_multinode.py)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from aipo_mp.errors import ConfigError
from aipo_mp.rounds.engines import (
    EngineTask,
    HeadBeacon,
    cli_flags,
    engine_task,
    spanning_args,
)
from aipo_mp.rounds.launchers import SlurmLauncher, engine_env
from aipo_mp.rounds.placement import Placement
from tests.conftest import ROOT


def spanning_env(rank: int, world: int = 4, nodes: int = 2, hosts: str = "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4",
                 slurm: bool = True) -> dict:
    env = {"AIPO_ENGINE_NODES": str(nodes), "AIPO_ENGINE_HOSTS": hosts, "AIPO_ENGINE_PORT": "12300"}
    if slurm:
        env.update(SLURM_STEP_ID="3", SLURM_PROCID=str(rank), SLURM_NTASKS=str(world))
    else:
        env.update(RANK=str(rank), WORLD_SIZE=str(world))
    return env


def test_engine_task_from_the_launcher_environment():
    tasks = [engine_task(spanning_env(k)) for k in range(4)]
    assert [(t.engine, t.engines, t.node_rank, t.is_head) for t in tasks] == [
        (0, 2, 0, True), (0, 2, 1, False), (1, 2, 0, True), (1, 2, 1, False)]
    assert [t.head for t in tasks] == ["10.0.0.1", "10.0.0.1", "10.0.0.3", "10.0.0.3"]
    assert [t.port for t in tasks] == [12300, 12300, 12400, 12400]  # 100 ports per engine
    assert tasks[2].master_port == 12400 and tasks[2].dp_rpc_port == 12401 and tasks[2].beacon_port == 12402
    assert {(t.machine_index, t.machine_tasks) for t in tasks} == {(0, 1)}  # four machines
    local = [engine_task(spanning_env(k, slurm=False, hosts="127.0.0.1," * 4)) for k in range(4)]
    assert [(t.engine, t.node_rank) for t in local] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [(t.machine_index, t.machine_tasks) for t in local] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    plain = engine_task({"RANK": "2", "WORLD_SIZE": "3"})  # a one-node engine per task, no engine env
    assert (plain.engine, plain.engines, plain.node_rank, plain.nodes, plain.spans) == (2, 3, 0, 1, False)


@pytest.mark.parametrize("env, words", [
    (dict(spanning_env(0), AIPO_ENGINE_NODES="3"), "does not divide"),
    (dict(spanning_env(0), AIPO_ENGINE_HOSTS="10.0.0.1"), "AIPO_ENGINE_HOSTS"),
    (dict(spanning_env(0), AIPO_ENGINE_PORT=""), "AIPO_ENGINE_PORT"),
    (dict(spanning_env(0), AIPO_ENGINE_NODES="two"), "not a non-negative integer"),
])
def test_engine_task_refuses_a_broken_environment(env, words):
    with pytest.raises(ConfigError, match=words):
        engine_task(env)


def test_spanning_arguments_and_flags():
    head = EngineTask(engine=1, engines=2, node_rank=0, nodes=2, head="10.0.0.3", port=12400)
    other = EngineTask(engine=1, engines=2, node_rank=1, nodes=2, head="10.0.0.3", port=12400)
    assert spanning_args(other, 1) == dict(nnodes=2, node_rank=1, master_addr="10.0.0.3", master_port=12400,
                                           distributed_executor_backend="mp")
    assert spanning_args(head, 4) == dict(data_parallel_size_local=2, data_parallel_address="10.0.0.3",
                                          data_parallel_rpc_port=12401)
    assert spanning_args(other, 4)["data_parallel_start_rank"] == 2
    with pytest.raises(ConfigError, match="whole DP ranks"):
        spanning_args(other, 3)
    assert cli_flags(dict(model="m", tensor_parallel_size=2, enforce_eager=True, enable_chunked_prefill=False,
                          max_model_len=None)) == ["--tensor-parallel-size", "2", "--enforce-eager",
                                                   "--no-enable-chunked-prefill"]


def test_launchers_engine_environment(monkeypatch):
    spanning = Placement(ntasks=4, nodes=4, ntasks_per_node=1, gpus_per_task=8, engines=2, nodes_per_engine=2)
    assert engine_env(spanning, ["a", "b", "c", "d"], 12000) == {
        "AIPO_ENGINE_NODES": "2", "AIPO_ENGINE_HOSTS": "a,b,c,d", "AIPO_ENGINE_PORT": "12000"}
    assert engine_env(Placement(ntasks=2, nodes=1, ntasks_per_node=2, gpus_per_task=0), ["a"], 1) == {}
    launcher = SlurmLauncher.for_plan(nodes=4, environ={"PATH": "/usr/bin"})
    _, env = launcher.command("round0-sample", ["aipo_mp.cli", "sample"], spanning)
    assert env["AIPO_ENGINE_HOSTS"] == "node001,node002,node003,node004" and env["AIPO_ENGINE_NODES"] == "2"
    fitting = Placement(ntasks=4, nodes=2, ntasks_per_node=2, gpus_per_task=4, engines=4, nodes_per_engine=1)
    _, env2 = launcher.command("round0-reward", ["aipo_mp.cli", "reward"], fitting)
    assert env2["AIPO_ENGINE_HOSTS"] == "node001,node001,node002,node002"  # srun's block distribution
    assert env2["AIPO_ENGINE_PORT"] != env["AIPO_ENGINE_PORT"]  # fresh per stage


HEADLESS = """
import sys
from aipo_mp.rounds.engines import EngineTask, serve_headless
task = EngineTask(engine=0, engines=1, node_rank=1, nodes=2, head="127.0.0.1", port=int(sys.argv[1]))
sys.exit(serve_headless(task, finished=lambda: sys.argv[2] == "finished"))
"""


def test_a_headless_task_ends_with_its_head():
    """The headless side connects to the head's beacon, and exits as soon as the head's process is
    gone (its socket closes); with no work left for its engine it does not wait for a head."""
    from aipo_mp.rounds.launchers import free_port_block

    port = free_port_block(1)
    task = EngineTask(engine=0, engines=1, node_rank=0, nodes=2, head="127.0.0.1", port=port)
    beacon = HeadBeacon(task)
    proc = subprocess.Popen([sys.executable, "-c", HEADLESS, str(port), "busy"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        beacon.wait_for_peers(timeout=60)
        beacon.send({"stop": True})  # no engine running: nothing to stop, the task keeps waiting
        time.sleep(1.5)
        assert proc.poll() is None
        t0 = time.time()
        for peer in beacon.peers:  # what the OS does when the head process dies
            peer.close()
        beacon.server.close()
        assert proc.wait(timeout=20) == 0
        assert time.time() - t0 < 5
        assert "head ended, headless part stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    done = subprocess.run([sys.executable, "-c", HEADLESS, str(free_port_block(1)), "finished"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
