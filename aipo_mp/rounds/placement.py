"""Where each stage of a round runs: tasks, GPUs per task, tasks per node, nodes.

Every stage declares what it needs and the launcher turns that into one step (one `srun` over the
right nodes, or local subprocesses):

    sample  `sampling.replicas` vLLM engines of TP x PP x DP GPUs (`sampling.tensor_parallel` x
            `pipeline_parallel` x `data_parallel`). An engine that fits a node is one task, and as
            many engines as fit share a node. A wider engine spans `TP x PP x DP // gpus_per_node`
            whole nodes, one task per node (task k: engine k // nodes_per_engine, node-rank
            k % nodes_per_engine; node-rank 0 drives, the others run headless); spanning engines
            never share a node.
    reward  the same with `reward.replicas` engines of `reward.tensor_parallel` x
            `reward.pipeline_parallel` GPUs: a reward model, or a pairwise or judge ranker (each
            engine ranks its shards of whole prompts); a rule reward: `reward.replicas` CPU tasks
    compare the ranker's engines (the reward layout), each judging its shards of the answers
    synthesize  `sampling.replicas` engines of the sampling layout, splitting each generation batch
    kl      `sampling.replicas` engines of the sampling layout (a large policy never goes into one
            TP=1 engine), each on every E-th sample of each round
    export  one converter rank per stored TP x PP shard, packed `gpus_per_node` per node so a TP
            group stays inside a node
    pairs   one CPU task
    train   every node, one task per GPU

"GPUs" are the allocation's ranks per node (`cluster.nproc_per_node`); on CPU they are CPU slots.
`aipo_mp.validate.placement_errors` checks that the engines fit before any stage starts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
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

    @classmethod
    def from_dict(cls, d: dict) -> "Placement":
        """The placement held in a dict with more keys (a dry-run entry)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def engine_gpus(tensor_parallel: int, pipeline_parallel: int = 1, data_parallel: int = 1) -> int:
    """GPUs of one engine: TP x PP x DP."""
    return max(1, tensor_parallel) * max(1, pipeline_parallel) * max(1, data_parallel)


def nodes_per_engine(gpus: int, gpus_per_node: int) -> int:
    """Whole nodes one engine of `gpus` GPUs spans (1 when it fits a node). Validation refuses an
    engine wider than a node that does not fill whole nodes; here such a one rounds up."""
    return max(1, math.ceil(gpus / max(1, gpus_per_node)))


def engine_placement(replicas: int, tensor_parallel: int, gpus_per_node: int, pipeline_parallel: int = 1,
                     data_parallel: int = 1) -> Placement:
    """`replicas` engines of TP x PP x DP GPUs. Engines that fit a node: one task each, as many per
    node as fit, over the fewest nodes. Wider engines: one task per node of each engine, every
    task a whole node, so two engines never share a node."""
    gpus = engine_gpus(tensor_parallel, pipeline_parallel, data_parallel)
    span = nodes_per_engine(gpus, gpus_per_node)
    if span > 1:
        return Placement(ntasks=replicas * span, nodes=replicas * span, ntasks_per_node=1,
                         gpus_per_task=gpus_per_node, engines=replicas, nodes_per_engine=span)
    per_node = max(1, min(replicas, gpus_per_node // gpus))
    return Placement(ntasks=replicas, nodes=math.ceil(replicas / per_node), ntasks_per_node=per_node,
                     gpus_per_task=gpus, engines=replicas)


def sampling_engines(cfg: Config, gpus_per_node: int, replicas: Optional[int] = None) -> Placement:
    """Engines on the sampling layout (sample, kl, synthesize); `replicas` defaults to sampling.replicas."""
    s = cfg.sampling
    return engine_placement(s.replicas if replicas is None else replicas, s.tensor_parallel, gpus_per_node,
                            s.pipeline_parallel, s.data_parallel)


def reward_engines(cfg: Config, gpus_per_node: int, replicas: Optional[int] = None) -> Placement:
    """Engines on the reward layout (reward.model, the judge, the pairwise ranker, compare);
    `replicas` defaults to reward.replicas."""
    r = cfg.reward
    return engine_placement(r.replicas if replicas is None else replicas, r.tensor_parallel, gpus_per_node,
                            r.pipeline_parallel)


def packed_placement(ntasks: int, gpus_per_node: int) -> Placement:
    """`ntasks` one-GPU ranks, `gpus_per_node` per node (consecutive ranks share a node)."""
    per_node = max(1, min(ntasks, gpus_per_node))
    return Placement(ntasks=ntasks, nodes=math.ceil(ntasks / per_node), ntasks_per_node=per_node, gpus_per_task=1)


def cpu_placement() -> Placement:
    return Placement(ntasks=1, nodes=1, ntasks_per_node=1, gpus_per_task=0)


def reward_placement(cfg: Config, gpus_per_node: int) -> Placement:
    """A reward model or a ranker (pairwise, judge): `reward.replicas` engines of the reward layout;
    a rule: `reward.replicas` CPU tasks, one per slot."""
    r = cfg.reward
    if r.model or r.kind in ("pairwise", "judge"):
        return reward_engines(cfg, gpus_per_node)
    per_node = max(1, min(r.replicas, gpus_per_node))  # a rule: CPU tasks, one per slot
    return Placement(ntasks=r.replicas, nodes=math.ceil(r.replicas / per_node), ntasks_per_node=per_node,
                     gpus_per_task=0)


def stage_placement(kind: str, cfg: Config, nodes: int, gpus_per_node: int,
                    export_shards: Optional[int] = None) -> Placement:
    """The placement of one stage kind (sample, reward, pairs, train, export, kl)."""
    if kind in ("sample", "kl"):
        return sampling_engines(cfg, gpus_per_node)
    if kind == "reward":
        return reward_placement(cfg, gpus_per_node)
    if kind == "synthesize":  # the sampling layout's engines split each generation batch
        return sampling_engines(cfg, gpus_per_node)
    if kind == "compare":  # the ranker's engines (the reward layout)
        return reward_engines(cfg, gpus_per_node)
    if kind == "export":
        return packed_placement(export_shards or cfg.parallel.tp * cfg.parallel.pp, gpus_per_node)
    if kind == "train":
        return Placement(ntasks=nodes * gpus_per_node, nodes=nodes, ntasks_per_node=gpus_per_node, gpus_per_task=1)
    if kind == "pairs":
        return cpu_placement()
    raise ValueError(f"unknown stage kind {kind!r}")


def engine_layout(kind: str, cfg: Config) -> dict:
    """The layout of one engine of an engine stage: {tp, pp, dp, ep} (ep: expert parallel on,
    EP size = DP x TP). Sample, kl and synthesize use the sampling layout; reward, compare, the
    judge and the pairwise ranker the reward layout."""
    if kind in ("reward", "compare"):
        return {"tp": cfg.reward.tensor_parallel, "pp": cfg.reward.pipeline_parallel, "dp": 1, "ep": False}
    s = cfg.sampling
    return {"tp": s.tensor_parallel, "pp": s.pipeline_parallel, "dp": s.data_parallel, "ep": s.expert_parallel}


def describe_engines(placement: Placement, layout: dict) -> str:
    """'14 engine(s) x 2 nodes (TP 8 x PP 2), node-rank 0 drives' (the dry run's line, after the tasks)."""
    shape = " x ".join([f"TP {layout['tp']}"] + [f"{k.upper()} {layout[k]}" for k in ("pp", "dp") if layout[k] > 1])
    if layout["ep"]:
        shape += f", EP {layout['tp'] * layout['dp']}"
    n, span = placement.engines, placement.nodes_per_engine
    if span > 1:
        return f"{n} engine(s) x {span} nodes ({shape}), node-rank 0 drives, the other {span - 1} headless"
    return f"{n} engine(s) of {placement.gpus_per_task} GPU(s) ({shape}), {placement.ntasks_per_node} per node"


def stage_kind(name: str) -> str:
    """'round3-sample' -> 'sample'; 'kl' -> 'kl'."""
    return name.rsplit("-", 1)[-1]
