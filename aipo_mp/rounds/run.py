"""`aipo-mp run`: rounds 0..R-1 of export -> synthesize -> sample -> reward -> compare -> pairs ->
train, then (optionally) the final policy's samples and scores, and the report after every round.
synthesize (self-instruct prompts) runs only with rounds.synthesize.enabled; compare (round r's
answers judged against round 0's, for the report) only with a ranker (reward.kind pairwise/judge).

Every stage is a separate command run through a launcher (local subprocesses, or srun inside a
Slurm allocation), writes its outputs atomically, and is recorded in RUN_DIR/run_state.json only
after it succeeded. Rerunning the same command skips recorded stages and resumes at the first
unfinished one; training resumes from its own last complete checkpoint.

Layout of RUN_DIR:
  config.yaml                 the resolved recipe
  run_state.json              completed stages and the policy of each round
  round_R/policy_hf/          round R's policy for vLLM: written by round R-1's trainer (the handoff), else
                              exported from its checkpoint (absent for an HF starting point)
  round_R/prompts.jsonl, synthesize_stats.json, synthesize/   self-instruct prompts (when enabled)
  round_R/samples.jsonl, scored.jsonl, pairs.jsonl, pairs_stats.json
  round_R/judgments_vs_round0.jsonl   rankers only, R >= 1 (and judgments_vs_baseline.jsonl)
  baseline/                   rounds.baseline_answers as samples (and scored by a scalar reward)
  round_R/train/              the trainer's output dir (metrics.jsonl, checkpoints/)
  round_R/shards/STAGE/        finished shards of the placed engine stages (sample, reward, compare/K,
                              synthesize/batch_NNN; baseline/shards/reward, shards/kl): kept across a requeue
  logs/STAGE.log              the launcher's lines and srun's messages of one stage
  logs/STAGE/rank<K>.log      every task's stdout and stderr
  report/                     report.md, report.json, *.png
  ../.RUN_DIR.lock             held while `aipo-mp run` runs (a second one on RUN_DIR fails at once)

Placement (aipo_mp/rounds/placement.py): each stage declares its tasks, nodes, tasks per node and
GPUs per task; the engine stages (sample, reward and the rankers, compare, synthesize, kl, the
baseline's scores) run one task per engine over the allocation, each on its shards, merged in order.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Optional

from aipo_mp.config import RANKER_KINDS, Config, dump_config, reward_kind
from aipo_mp.errors import CHECKPOINT_META, EXIT_STOPPED, LATEST, RUN_STATE, ConfigError, StageFailed
from aipo_mp.rounds.launchers import rank_log_dir
from aipo_mp.rounds.placement import Placement, describe_engines, engine_layout, stage_kind, stage_placement
from aipo_mp.rounds.progress import stage_progress
from aipo_mp.rounds.shards import ShardDir, shard_count
from aipo_mp.runtime.files import atomic_write_json
from aipo_mp.runtime.json_files import check_object, read_json_object
from aipo_mp.validate import PLACEMENT, RECIPE, TRAIN, validate

STAGES = ("export", "synthesize", "sample", "reward", "compare", "pairs", "train")

# The stage table: each stage kind runs one `aipo-mp` subcommand (stage_placement in
# aipo_mp/rounds/placement.py says where; the RoundRunner method of the same name, with what).
STAGE_COMMANDS = {
    "export": ("convert", "mcore-to-hf"),
    "synthesize": ("synthesize",),
    "sample": ("sample",),
    "reward": ("reward",),
    "compare": ("compare",),
    "pairs": ("pairs",),
    "train": ("train",),
    "kl": ("kl",),
}


def stage_argv(name: str, args: list[str]) -> list[str]:
    """The command of stage `name` (e.g. round2-sample): `python -m aipo_mp.cli SUBCOMMAND args...`."""
    return ["aipo_mp.cli", *STAGE_COMMANDS[stage_kind(name)], *args]
FINAL_STAGES = ("export", "sample", "reward", "compare")


class RunState:
    """run_state.json: {"rounds": {"0": {"export": {...}, ...}}, "policies": {"0": path}}."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / RUN_STATE
        self.data = read_run_state(self.path) if self.path.exists() else {"rounds": {}, "policies": {}}

    def done(self, round_idx: int, stage: str) -> bool:
        return stage in self.data["rounds"].get(str(round_idx), {})

    def record(self, round_idx: int, stage: str, info: Optional[dict] = None) -> None:
        self.data["rounds"].setdefault(str(round_idx), {})[stage] = info or {}
        atomic_write_json(self.path, self.data)

    def policy(self, round_idx: int) -> Optional[str]:
        return self.data["policies"].get(str(round_idx))

    def set_policy(self, round_idx: int, path: str) -> None:
        self.data["policies"][str(round_idx)] = path
        atomic_write_json(self.path, self.data)


def read_run_state(path: Path) -> dict:
    """run_state.json through the one JSON reader: {"rounds": {round: {stage: info}}, "policies": {round: path}}."""
    fix = (f"restore it, or delete it to redo every stage (completed stage outputs under {path.parent} are "
           "rewritten)")
    data = read_json_object(path, "the run state", {"rounds": dict, "policies": dict}, fix, error=ConfigError)
    for r, stages in data["rounds"].items():
        check_object(stages, path, f"the run state of round {r}", fix=fix, error=ConfigError)
    bad = next((r for r, p in data["policies"].items() if not isinstance(p, str)), None)
    if bad is not None:
        raise ConfigError(f"{path}: the run state's policy of round {bad} is not a path; {fix}")
    return data


class Stopped(Exception):
    """A stage was stopped by a signal (preemption); the run can be requeued and resumed."""


def checkpoint_layout(path: Optional[str]) -> Optional[dict]:
    """The stored {tp, pp, ...} of an aipo_mp Megatron checkpoint; None for an HF directory."""
    meta = Path(path or "") / CHECKPOINT_META
    if not path or not meta.is_file():
        return None
    from aipo_mp.models import read_checkpoint_meta_file

    return read_checkpoint_meta_file(meta)["layout"]


class RoundRunner:
    """Runs the stages of every round through `launcher`, or (`plan_only`) records the commands
    it would run without starting anything (`aipo-mp run --dry-run`)."""

    def __init__(self, cfg: Config, config_path: Path, launcher, world_size: int, plan_only: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.output.dir).absolute()
        self.config_path = config_path
        self.launcher = launcher
        self.world_size = world_size
        self.nodes = max(1, cfg.cluster.nodes)
        self.gpus_per_node = max(1, world_size // self.nodes)
        self.plan_only = plan_only
        self.planned: list[dict] = []
        self.state = RunState(self.run_dir) if not plan_only else RunState(Path("/nonexistent-aipo-plan"))

    # -- helpers -----------------------------------------------------------------------------

    def round_dir(self, r: int) -> Path:
        d = self.run_dir / f"round_{r}"
        if not self.plan_only:
            d.mkdir(parents=True, exist_ok=True)
        return d

    def placement(self, name: str, export_shards: Optional[int] = None) -> Placement:
        return stage_placement(stage_kind(name), self.cfg, self.nodes, self.gpus_per_node, export_shards)

    def launch(self, name: str, args: list[str], placement: Placement) -> None:
        """Run one stage (its subcommand from STAGE_COMMANDS, with `args`); one console line when
        it starts and one when it ends (its output goes to RUN_DIR/logs/NAME.log and logs/NAME/rank<K>.log)."""
        argv = stage_argv(name, args)
        log = self.run_dir / "logs" / f"{name}.log"
        limit = (self.cfg.cluster.stage_minutes or {}).get(stage_kind(name))
        if self.plan_only:
            self.planned.append(self.plan_entry(name, argv, placement, log, limit))
            return
        log.parent.mkdir(parents=True, exist_ok=True)
        where = f"{placement.ntasks} task(s) on {placement.nodes or 1} node(s)" + (
            f", {placement.gpus_per_task} GPU(s) each" if placement.gpus_per_task else "")
        print(f"[aipo-mp run] {name}: {where}; logs {rank_log_dir(log)}/", flush=True)
        t0 = time.time()
        with stage_progress(name, self.progress_probe(name)):  # one console line of progress
            result = self.launcher.run(name, argv, placement, log_path=log, time_limit_min=limit)
        seconds = time.time() - t0
        if result.stopped_by_signal:
            print(f"[aipo-mp run] {name}: stopped by a signal after {seconds:.0f} s", flush=True)
            raise Stopped(name)
        if result.timed_out:
            raise StageFailed(f"stage {name} ran past its wall-clock limit of {limit} min "
                              f"(cluster.stage_minutes.{stage_kind(name)}) [logs: {rank_log_dir(log)}/]; raise the "
                              "limit or look for a hung task, then rerun the same command to resume")
        if result.returncode != 0:
            cause = last_error_line(log)
            raise StageFailed(f"stage {name} failed" + (f": {cause}" if cause else f" (exit {result.returncode})")
                              + f" [logs: {log}, {rank_log_dir(log)}/]; fix it and rerun the same command to resume")
        print(f"[aipo-mp run] {name}: done in {seconds:.0f} s", flush=True)

    def stage_output(self, name: str, path: Path, read=None):
        """What a finished stage must have written: a stage that exited 0 without it is a failed
        stage (said so, with its logs), not a KeyError or a missing file in the next stage.
        `read(path)` parses it; returns the parsed value (or the path)."""
        if self.plan_only:
            return {}
        if not path.exists():
            log = self.run_dir / "logs" / f"{name}.log"
            raise StageFailed(f"stage {name} exited 0 but did not write {path} [logs: {log}, {rank_log_dir(log)}/]; "
                              "look at its log for what stopped it early (a sys.exit in user code?), fix it and rerun "
                              "the same command to resume")
        return read(path) if read else path

    def progress_probe(self, name: str):
        """What the console's progress line of stage `name` counts (aipo_mp/rounds/progress.py):
        finished shards of an engine stage, logged steps of a train stage; `self.probes` may name
        others (aipo-mp eval's stages)."""
        from aipo_mp.rounds.progress import shard_probe, steps_probe

        if name in getattr(self, "probes", {}):
            return self.probes[name]
        kind, head = stage_kind(name), name.rsplit("-", 1)[0]
        if kind == "kl":
            return shard_probe(self.run_dir / "shards" / "kl")
        if not (head.startswith("round") and head[5:].isdigit()):
            return None
        rd = self.run_dir / f"round_{head[5:]}"
        if kind in ("sample", "reward"):
            return shard_probe(rd / "shards" / kind)
        if kind == "train":
            return steps_probe(rd / "train" / "metrics.jsonl", self.cfg.train.steps or None)
        return None

    def plan_entry(self, name: str, argv: list[str], placement: Placement, log: Path, limit) -> dict:
        entry = {"name": name, "ntasks": placement.ntasks, "nodes": placement.nodes,
                 "ntasks_per_node": placement.ntasks_per_node, "gpus_per_task": placement.gpus_per_task,
                 "engines": placement.engines, "nodes_per_engine": placement.nodes_per_engine}
        if placement.engines:  # an engine stage: its layout, and which task of an engine drives it
            entry["engine_layout"] = engine_layout(stage_kind(name), self.cfg)
            entry["driver_node_rank"] = 0
        if hasattr(self.launcher, "command"):
            entry["argv"] = self.launcher.command(name, argv, placement, log, limit)[0]
        else:
            from aipo_mp.rounds.launchers import stage_command

            entry["argv"] = stage_command(argv)
        return entry

    def stage(self, r: int, name: str, fn) -> None:
        if self.state.done(r, name):
            return
        info = fn(r)
        if not self.plan_only:
            self.state.record(r, name, info)

    # -- stages ------------------------------------------------------------------------------

    def policy_path(self, r: int) -> str:
        policy = self.state.policy(r)
        if policy is None and self.plan_only:  # the plan of round r > 0: the trainer's checkpoint
            policy = str(self.round_dir(r - 1) / "train" / "checkpoints" / LATEST)
        return policy

    def policy_hf_dir(self, r: int) -> str:
        """The HF directory vLLM samples round r from."""
        policy = self.policy_path(r)
        is_mcore = checkpoint_layout(policy) is not None or (self.plan_only and r > 0)
        return str(self.round_dir(r) / "policy_hf") if is_mcore else policy

    def export(self, r: int) -> dict:
        policy = self.policy_path(r)
        layout = checkpoint_layout(policy)
        if layout is None and not self.plan_only:
            return {"skipped": "policy is already an HF directory"}
        out = self.round_dir(r) / "policy_hf"
        handed = self.state.data["rounds"].get(str(r - 1), {}).get("train", {}).get("hf_dir")
        if not self.plan_only and handed == str(out) and out.is_dir():  # the trainer wrote it from its weights
            return {"hf_dir": str(out), "written_by": "trainer"}
        # One converter rank per stored TP x PP shard, packed per node (a plan: the trainer's layout).
        shards = layout["tp"] * layout["pp"] if layout else self.cfg.parallel.tp * self.cfg.parallel.pp
        name = f"round{r}-export"
        self.launch(name, ["--ckpt", policy, "--out", str(out),
                           "--dtype", self.cfg.precision.dtype, "--overwrite"], self.placement(name, shards))
        self.stage_output(name, out / "config.json")
        return {"hf_dir": str(out)}

    def plan_shards(self, root: Path, total: int, world: int, per_shard: int = 0) -> None:
        """Tell the tasks which shards are unfinished (they split this list)."""
        if not self.plan_only:
            ShardDir(root, shard_count(total, world, per_shard)).write_plan()

    def merge_shards(self, name: str, root: Path, total: int, world: int, out: Optional[Path] = None,
                     per_shard: int = 0) -> tuple[list[dict], list[dict]]:
        """(records, markers) of the finished shards of placed stage `name`, in order; written to
        `out` when given. A shard the stage did not write (its tasks exited 0) fails the stage."""
        from aipo_mp.data.records import write_jsonl

        if self.plan_only:
            return [], []
        shards = ShardDir(root, shard_count(total, world, per_shard))
        missing = shards.todo()
        if missing:
            log = self.run_dir / "logs" / f"{name}.log"
            raise StageFailed(f"stage {name} exited 0 but did not write shard(s) {missing[:10]} of {shards.count} "
                              f"(in {shards.path}) [logs: {log}, {rank_log_dir(log)}/]; look at its log for what "
                              "stopped it early (a sys.exit in user code?), fix it and rerun the same command to "
                              "resume")
        records = shards.merge()
        if out is not None:
            write_jsonl(out, records)
        return records, shards.markers()

    def synthesized(self, r: int) -> bool:
        """Round r samples from its own self-instruct prompts (the final evaluation uses the seeds)."""
        return self.cfg.rounds.synthesize.enabled and r < self.cfg.rounds.num_rounds

    def synthesize(self, r: int) -> dict:
        if not self.synthesized(r):
            return {"skipped": "rounds.synthesize.enabled is false"}
        rd = self.round_dir(r)
        name = f"round{r}-synthesize"
        # The sampling layout's engines split every generation batch (rd/shards/synthesize/batch_NNN/);
        # engine 0 writes the merged batches and the prompts.
        self.launch(name, ["--config", str(self.config_path),
                           "--model", self.policy_hf_dir(r), "--out-dir", str(rd),
                           "--round", str(r), "--run-dir", str(self.run_dir),
                           "--shard-dir", str(rd / "shards" / "synthesize")], self.placement(name))
        self.stage_output(name, rd / "prompts.jsonl")
        return {"prompts": str(rd / "prompts.jsonl")}

    def sample(self, r: int) -> dict:
        from aipo_mp.data.records import read_prompts

        rd = self.round_dir(r)
        out, shard_root = rd / "samples.jsonl", rd / "shards" / "sample"
        name = f"round{r}-sample"
        placement = self.placement(name)
        per_shard = self.cfg.sampling.shard_prompts
        prompts = str(rd / "prompts.jsonl") if self.synthesized(r) else self.cfg.rounds.prompts
        total = 0 if self.plan_only else len(read_prompts(prompts))
        self.plan_shards(shard_root, total, placement.ntasks, per_shard)
        self.launch(name, ["--config", str(self.config_path),
                           "--model", self.policy_hf_dir(r), "--prompts", prompts, "--shard-dir", str(shard_root),
                           "--shard-prompts", str(per_shard), f"sampling.seed={self.cfg.sampling.seed + 1000 * r}"],
                    placement)
        _, markers = self.merge_shards(name, shard_root, total, placement.ntasks, out, per_shard)
        return {"samples": str(out), "nodes": sorted({m["node"] for m in markers})}

    def compare(self, r: int) -> dict:
        """Rankers: judge round r's answers against round 0's (and the baseline answers) directly,
        for the report's win rates (a ranker's scores do not compare across rounds)."""
        from aipo_mp.rounds.report import BASELINE_JUDGMENTS_NAME, JUDGMENTS_NAME

        against = []
        if r > 0:
            against += ["--against", str(self.round_dir(0) / "samples.jsonl"), str(self.round_dir(r) / JUDGMENTS_NAME)]
        if self.cfg.rounds.baseline_answers:
            against += ["--against", str(self.run_dir / "baseline" / "samples.jsonl"),
                        str(self.round_dir(r) / BASELINE_JUDGMENTS_NAME)]
        if not against or reward_kind(self.cfg.reward) not in RANKER_KINDS:
            return {"skipped": "scalar rewards compare rounds by score"}
        name = f"round{r}-compare"
        placement, shard_root = self.placement(name), self.round_dir(r) / "shards" / "compare"
        engines, samples = engine_count(placement), self.round_dir(r) / "samples.jsonl"
        pairs = list(zip(against[1::3], against[2::3]))  # (baseline answers, judgments file)
        totals = [0 if self.plan_only else matched_count(samples, baseline) for baseline, _ in pairs]
        for k, total in enumerate(totals):  # each judgments file in shards over the engines
            self.plan_shards(shard_root / str(k), total, engines)
        self.launch(name, ["--config", str(self.config_path), "--samples", str(samples), *against,
                           "--shard-dir", str(shard_root)], placement)
        for k, ((_, out), total) in enumerate(zip(pairs, totals)):
            self.merge_shards(name, shard_root / str(k), total, engines, Path(out))
        return {"judgments": against[2::3]}

    def baseline(self, r: int) -> dict:
        """rounds.baseline_answers as samples of the seed prompts (RUN_DIR/baseline/samples.jsonl),
        scored by a scalar reward (baseline/scored.jsonl); rankers judge them in the compare stage."""
        from aipo_mp.data.records import write_jsonl

        if not self.cfg.rounds.baseline_answers:
            return {"skipped": "no rounds.baseline_answers"}
        out = self.run_dir / "baseline"
        write_jsonl(out / "samples.jsonl", baseline_samples(self.cfg.rounds.baseline_answers, self.cfg.rounds.prompts,
                                                            self.state.policy(0)))
        if reward_kind(self.cfg.reward) not in RANKER_KINDS:  # placed like a round's reward stage
            self.score("baseline-reward", out / "samples.jsonl", out / "scored.jsonl", out / "shards" / "reward")
        return {"samples": str(out / "samples.jsonl")}

    def reward(self, r: int) -> dict:
        rd = self.round_dir(r)
        return self.score(f"round{r}-reward", rd / "samples.jsonl", rd / "scored.jsonl", rd / "shards" / "reward")

    def score(self, name: str, samples: Path, out: Path, shard_root: Path) -> dict:
        """Scores (a rule, a reward model) or ranks (pairwise, judge) of `samples` into `out`: one
        task per engine, each on its shards (a ranker's shards are whole prompts), merged in input order."""
        from aipo_mp.rounds.rewards import load_samples
        from aipo_mp.rounds.shards import prompt_shards, restore_order

        placement = self.placement(name)
        engines = engine_count(placement)
        records = [] if self.plan_only else load_samples(samples)
        ranker = reward_kind(self.cfg.reward) in RANKER_KINDS
        order, bounds = prompt_shards([s["prompt_id"] for s in records], engines) if ranker else (None, None)
        total = len(bounds) if ranker else len(records)  # rankers: one unit per shard of whole prompts
        self.plan_shards(shard_root, total, engines)
        self.launch(name, ["--config", str(self.config_path), "--samples", str(samples),
                           "--shard-dir", str(shard_root)], placement)
        merged, markers = self.merge_shards(name, shard_root, total, engines, None if ranker else out)
        if ranker and not self.plan_only:
            from aipo_mp.data.records import write_jsonl

            write_jsonl(out, restore_order(merged, order))
        return {"scored": str(out), "nodes": sorted({m["node"] for m in markers})}

    def pairs(self, r: int) -> dict:
        rd = self.round_dir(r)
        name = f"round{r}-pairs"
        self.launch(name, ["--config", str(self.config_path),
                           "--scored", str(rd / "scored.jsonl"), "--out-dir", str(rd)], self.placement(name))
        if self.plan_only:
            return {}
        stats = self.stage_output(name, rd / "pairs_stats.json", lambda p: read_json_object(
            p, "the pairs statistics", fix="rerun the same command (the pairs stage is redone)", error=StageFailed))
        if not stats.get("kept"):
            raise StageFailed(f"round {r}: no preference pairs survived the filters ({stats.get('dropped')}); "
                              "lower pairs.min_gap, raise sampling.temperature or sampling.n")
        self.stage_output(name, rd / "pairs.jsonl")
        return {"pairs": str(rd / "pairs.jsonl"), "kept": stats.get("kept")}

    def train(self, r: int) -> dict:
        rd = self.round_dir(r)
        out = rd / "train"
        handoff = self.run_dir / f"round_{r + 1}" / "policy_hf"  # next round's vLLM directory
        overrides = [f"model.path={self.policy_path(r)}", f"data.train={rd / 'pairs.jsonl'}", f"output.dir={out}",
                     f"train.seed={self.cfg.train.seed + r}", f"output.hf_dir={handoff}"]
        if self.cfg.rounds.reference == "initial" and r > 0:
            overrides += ["reference.mode=model", f"reference.path={self.state.policy(0)}"]
        else:  # AIPO: the reference is the policy this round starts from
            overrides += ["reference.mode=initial"]
        name = f"round{r}-train"
        self.launch(name, [str(self.config_path), *overrides], self.placement(name))
        if self.plan_only:
            return {}
        latest = self.stage_output(name, out / "checkpoints" / LATEST, lambda p: p.read_text().strip())
        info = {"checkpoint": str(out / "checkpoints" / latest)}
        if handoff.is_dir():
            info["hf_dir"] = str(handoff)
        return info

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        if self.state.policy(0) is None:
            self.state.set_policy(0, str(Path(self.cfg.model.path).absolute()))
        rounds = self.cfg.rounds.num_rounds
        self.stage(0, "baseline", self.baseline)
        for r in range(rounds):
            for name in STAGES:
                self.stage(r, name, getattr(self, name))
            if self.state.policy(r + 1) is None:
                self.state.set_policy(r + 1, self.state.data["rounds"][str(r)]["train"]["checkpoint"])
            self.write_report()
        if self.cfg.rounds.evaluate_final:
            for name in FINAL_STAGES:
                self.stage(rounds, name, getattr(self, name))
        if self.cfg.rounds.kl_estimate:
            self.stage(rounds, "kl", self.kl)
        self.write_report(final=True)

    def kl(self, last: int) -> dict:
        """Sampled KL(π_r || π_0) for every round with samples: the sampling layout's engines, one
        task each, each on every E-th sample of each round; the sums are merged."""
        from aipo_mp.rounds.report import kl_from_sums

        out, shard_root = self.run_dir / "kl.json", self.run_dir / "shards" / "kl"
        rounds = [r for r in range(last + 1) if self.state.done(r, "sample") or self.plan_only]
        placement = self.placement("kl")
        engines = engine_count(placement)  # shard k of E: every E-th sample of each round
        self.plan_shards(shard_root, engines, engines)
        args = ["--run-dir", str(self.run_dir), "--shard-dir", str(shard_root),
                *kl_layout_args(self.cfg.sampling), "--initial", self.policy_hf_dir(0),
                *[f"{r}={self.policy_hf_dir(r)}" for r in rounds]]
        self.launch("kl", args, placement)
        if not self.plan_only:
            rows, _ = self.merge_shards("kl", shard_root, engines, engines)
            atomic_write_json(out, kl_from_sums(rows))
        return {"kl": str(out)}

    def write_report(self, final: bool = False) -> None:
        """report/ after every round (and its rows and plots to W&B with output.wandb); at the end,
        the compact console table and the path of report.md for the rest."""
        from aipo_mp.rounds.report import RoundTracker, console_summary, report_rows, write_report

        paths = write_report(self.run_dir)
        rows = report_rows(self.run_dir)
        if not hasattr(self, "tracker"):
            self.tracker = RoundTracker(self.cfg.output.wandb, self.run_dir)
        self.tracker.log(rows, paths, final)
        if final:
            print(console_summary(rows, self.run_dir / "report" / "report.md"), end="", flush=True)


def baseline_samples(answers_path: str, prompts_path: str, policy: str) -> list[dict]:
    """Records {prompt_id, prompt, sample_index 0, text, num_tokens, finish_reason} of a baseline
    answers JSONL ({"prompt_id", "text"} per line) for prompts of `prompts_path`; num_tokens counts
    the starting policy's tokens (plus EOS, as the sampler counts a finished answer)."""
    from transformers import AutoTokenizer

    from aipo_mp.data.records import read_jsonl, read_prompts
    from aipo_mp.training.checkpoint import is_megatron_checkpoint

    prompts = {json.dumps(p["id"]): p for p in read_prompts(prompts_path)}
    tokenizer = AutoTokenizer.from_pretrained(str(Path(policy) / "hf_extra") if is_megatron_checkpoint(policy) else policy)
    out = []
    for k, answer in enumerate(read_jsonl(answers_path)):
        if not isinstance(answer, dict) or not isinstance(answer.get("text"), str) or "prompt_id" not in answer:
            raise ConfigError(f"rounds.baseline_answers {answers_path}:{k + 1}: each line needs "
                              '{"prompt_id": ..., "text": "..."}')
        prompt = prompts.get(json.dumps(answer["prompt_id"]))
        if prompt is None:
            raise ConfigError(f"rounds.baseline_answers {answers_path}:{k + 1}: prompt_id "
                              f"{json.dumps(answer['prompt_id'])} is not in rounds.prompts ({prompts_path})")
        out.append({"prompt_id": prompt["id"], "prompt": prompt["prompt"], "sample_index": 0, "text": answer["text"],
                    "num_tokens": len(tokenizer(answer["text"], add_special_tokens=False).input_ids) + 1,
                    "finish_reason": "stop", "chat_format": True, **({"meta": prompt["meta"]} if "meta" in prompt else {})})
    if not out:
        raise ConfigError(f"rounds.baseline_answers {answers_path} holds no answers")
    return out


def engine_count(placement: Placement) -> int:
    """The engines of an engine stage (work shards are per engine, never per task)."""
    return getattr(placement, "engines", 0) or placement.ntasks


def kl_layout_args(sampling) -> list[str]:
    """The kl stage's engines: the sampling layout."""
    args = ["--tensor-parallel", str(sampling.tensor_parallel), "--pipeline-parallel", str(sampling.pipeline_parallel),
            "--data-parallel", str(sampling.data_parallel)]
    return args + (["--expert-parallel"] if sampling.expert_parallel else [])


def matched_count(samples: Path, baseline: str) -> int:
    """How many answers of `samples` the compare stage judges against `baseline` (its work units)."""
    from aipo_mp.rounds.report import match_baseline
    from aipo_mp.rounds.rewards import load_samples

    return len(match_baseline(load_samples(samples), load_samples(baseline)))


def last_error_line(log: Path) -> str:
    """The child's own one-line `error: ...` message (from any rank's log), if it printed one."""
    errors = []
    for path in (log, *sorted(rank_log_dir(log).glob("*.log"))):
        try:
            errors += [l for l in path.read_text(errors="replace").splitlines() if l.startswith("error: ")]
        except FileNotFoundError:
            pass
    return errors[-1][len("error: "):] if errors else ""


def run_rounds(cfg: Config, launcher_kind: str, world_size: int) -> int:
    """Entry of `aipo-mp run`. Returns 0 when done, 75 when stopped by a signal (requeue me).
    Needs no torch or GPU itself: every stage is a child command."""
    from aipo_mp.rounds.launchers import make_launcher
    from aipo_mp.runtime.locks import hold_lock

    run_dir = Path(cfg.output.dir).absolute()
    with hold_lock(run_dir, "aipo-mp run"):  # first: a second run on RUN_DIR is the problem to report
        validate(cfg, world_size, stages=(TRAIN, RECIPE, PLACEMENT))
        config_path = run_dir / "config.yaml"
        dump_config(cfg, config_path)
        launcher = make_launcher(launcher_kind, task_wait_s=cfg.cluster.task_wait_s)
        runner = RoundRunner(cfg, config_path, launcher, world_size)
        try:
            runner.run()
        except Stopped as s:
            print(f"[aipo-mp run] stopped by a signal during {s}; rerun the same command to resume", flush=True)
            return EXIT_STOPPED
    return 0


def dry_run(cfg: Config, launcher_kind: str, as_json: bool = False) -> int:
    """`aipo-mp run --dry-run`: the placement and command of every stage of round 0 (export as
    round 1 runs it when round 0 starts from an HF directory) and of the kl stage; starts nothing.
    Sizes come from the allocation (via cluster.nodes / nproc_per_node) or --nodes/--gpus-per-node."""
    from aipo_mp.rounds.launchers import LocalLauncher, SlurmLauncher

    nodes, gpus_per_node = max(1, cfg.cluster.nodes), max(1, cfg.cluster.nproc_per_node)
    world = nodes * gpus_per_node
    validate(cfg, world, stages=(TRAIN, RECIPE, PLACEMENT), plan=True)
    if launcher_kind == "slurm":
        launcher = SlurmLauncher.for_plan(nodes, task_wait_s=cfg.cluster.task_wait_s)
    else:
        launcher = LocalLauncher(handle_signals=False)
    run_dir = Path(cfg.output.dir).absolute()
    runner = RoundRunner(cfg, run_dir / "config.yaml", launcher, world, plan_only=True)
    runner.state.data["policies"]["0"] = str(Path(cfg.model.path or "MODEL").absolute())
    for name in STAGES:
        r = 1 if name == "export" and checkpoint_layout(runner.policy_path(0)) is None else 0
        getattr(runner, name)(r)
    runner.kl(cfg.rounds.num_rounds)
    stages = [{"name": stage_kind(e["name"]), "stage": e["name"], **{k: v for k, v in e.items() if k != "name"}}
              for e in runner.planned]
    if as_json:
        print(json.dumps({"launcher": launcher_kind, "nodes": nodes, "gpus_per_node": gpus_per_node,
                          "stages": stages}, indent=1))
        return 0
    print(f"plan ({launcher_kind}, {nodes} node(s) x {gpus_per_node} GPUs); nothing is started")
    for e in stages:
        where = f"{e['ntasks']} task(s) on {e['nodes']} node(s)" + (
            ": " + describe_engines(Placement.from_dict(e), e["engine_layout"]) if e["engines"] else
            f", {e['ntasks_per_node']} per node, {e['gpus_per_task']} GPU(s) per task")
        print(f"{e['stage']:>14}: {where}\n{'':>16}{shlex.join(e['argv'])}")
    return 0

