"""Where each stage of a round runs: tasks, GPUs per task, tasks per node, nodes.

Every stage declares what it needs and the launcher turns that into one step (one `srun` over the
right nodes, or local subprocesses):

    sample  `sampling.replicas` vLLM engines, one task each, `gpus_per_node // sampling.tensor_parallel`
            engines per node (a TP group never spans nodes; replicas spread over the nodes)
    reward  the same with `reward.replicas` x `reward.tensor_parallel` (a rule reward: CPU tasks;
            a pairwise or judge ranker: one engine, since a prompt's candidates are ranked together)
    synthesize, compare   one engine (the sampling layout; the ranker's)
    kl      the sampling layout (a large policy never goes into one TP=1 engine)
    export  one converter rank per stored TP x PP shard, packed `gpus_per_node` per node so a TP
            group stays inside a node
    pairs   one CPU task
    train   every node, one task per GPU

"GPUs" are the allocation's ranks per node (`cluster.nproc_per_node`); on CPU they are CPU slots.
`placement_errors` checks that the engines fit before any stage starts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from aipo_mp.config import Config


@dataclass(frozen=True)
class Placement:
    ntasks: int
    nodes: int
    ntasks_per_node: int  # at most this many tasks on one node
    gpus_per_task: int  # 0: a CPU-only stage
    engines: int = 0  # engine stages: vLLM engines (0: not an engine stage)
    nodes_per_engine: int = 1  # an engine wider than a node spans this many whole nodes, one task each

    def to_dict(self) -> dict:
        return asdict(self)


def engine_placement(replicas: int, tensor_parallel: int, gpus_per_node: int) -> Placement:
    """`replicas` engines of `tensor_parallel` GPUs, as many per node as fit, over the fewest nodes."""
    per_node = max(1, min(replicas, gpus_per_node // max(1, tensor_parallel)))
    return Placement(ntasks=replicas, nodes=math.ceil(replicas / per_node), ntasks_per_node=per_node,
                     gpus_per_task=tensor_parallel, engines=replicas)


def packed_placement(ntasks: int, gpus_per_node: int) -> Placement:
    """`ntasks` one-GPU ranks, `gpus_per_node` per node (consecutive ranks share a node)."""
    per_node = max(1, min(ntasks, gpus_per_node))
    return Placement(ntasks=ntasks, nodes=math.ceil(ntasks / per_node), ntasks_per_node=per_node, gpus_per_task=1)


def cpu_placement() -> Placement:
    return Placement(ntasks=1, nodes=1, ntasks_per_node=1, gpus_per_task=0)


def reward_placement(cfg: Config, gpus_per_node: int) -> Placement:
    r = cfg.reward
    if r.kind in ("pairwise", "judge"):  # a prompt's candidates are ranked together: one engine
        return engine_placement(1, r.tensor_parallel, gpus_per_node)
    if r.model:
        return engine_placement(r.replicas, r.tensor_parallel, gpus_per_node)
    per_node = max(1, min(r.replicas, gpus_per_node))  # a rule: CPU tasks, one per slot
    return Placement(ntasks=r.replicas, nodes=math.ceil(r.replicas / per_node), ntasks_per_node=per_node,
                     gpus_per_task=0)


def stage_placement(kind: str, cfg: Config, nodes: int, gpus_per_node: int,
                    export_shards: Optional[int] = None) -> Placement:
    """The placement of one stage kind (sample, reward, pairs, train, export, kl)."""
    s = cfg.sampling
    if kind in ("sample", "kl"):
        return engine_placement(s.replicas, s.tensor_parallel, gpus_per_node)
    if kind == "reward":
        return reward_placement(cfg, gpus_per_node)
    if kind == "synthesize":  # one engine on the sampling layout
        return engine_placement(1, s.tensor_parallel, gpus_per_node)
    if kind == "compare":  # the ranker's engine
        return engine_placement(1, cfg.reward.tensor_parallel, gpus_per_node)
    if kind == "export":
        return packed_placement(export_shards or cfg.parallel.tp * cfg.parallel.pp, gpus_per_node)
    if kind == "train":
        return Placement(ntasks=nodes * gpus_per_node, nodes=nodes, ntasks_per_node=gpus_per_node, gpus_per_task=1)
    if kind == "pairs":
        return cpu_placement()
    raise ValueError(f"unknown stage kind {kind!r}")


def stage_kind(name: str) -> str:
    """'round3-sample' -> 'sample'; 'kl' -> 'kl'."""
    return name.rsplit("-", 1)[-1]
