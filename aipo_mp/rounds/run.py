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
  round_R/policy_hf/          round R's policy exported for vLLM (absent for an HF starting point)
  round_R/prompts.jsonl, synthesize_stats.json, synthesize/   self-instruct prompts (when enabled)
  round_R/samples.jsonl, scored.jsonl, pairs.jsonl, pairs_stats.json
  round_R/judgments_vs_round0.jsonl   rankers only, R >= 1 (and judgments_vs_baseline.jsonl)
  baseline/                   rounds.baseline_answers as samples (and scored by a scalar reward)
  round_R/train/              the trainer's output dir (metrics.jsonl, checkpoints/)
  report/                     report.md, report.json, *.png
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from aipo_mp.config import Config, ConfigError, dump_config, validate
from aipo_mp.io_utils import atomic_write_json
from aipo_mp.platform import EXIT_STOPPED

STAGES = ("export", "synthesize", "sample", "reward", "compare", "pairs", "train")
FINAL_STAGES = ("export", "sample", "reward", "compare")


class RunState:
    """run_state.json: {"rounds": {"0": {"export": {...}, ...}}, "policies": {"0": path}}."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "run_state.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"rounds": {}, "policies": {}}

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


class StageFailed(RuntimeError):
    pass


class Stopped(Exception):
    """A stage was stopped by a signal (preemption); the run can be requeued and resumed."""


class RoundRunner:
    def __init__(self, cfg: Config, config_path: Path, launcher, world_size: int):
        self.cfg = cfg
        self.run_dir = Path(cfg.output.dir).absolute()
        self.config_path = config_path
        self.launcher = launcher
        self.world_size = world_size
        self.state = RunState(self.run_dir)

    # -- helpers -----------------------------------------------------------------------------

    def round_dir(self, r: int) -> Path:
        d = self.run_dir / f"round_{r}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def launch(self, name: str, argv: list[str], ntasks: int = 1) -> None:
        log = self.run_dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[aipo-mp run] {name}: {' '.join(argv[:3])} ...", flush=True)
        result = self.launcher.run(name, argv, ntasks=ntasks, log_path=log)
        if result.stopped_by_signal:
            raise Stopped(name)
        if result.returncode != 0:
            cause = last_error_line(log)
            raise StageFailed(f"stage {name} failed" + (f": {cause}" if cause else f" (exit {result.returncode})")
                              + f" [log: {log}]; fix it and rerun the same command to resume")

    def stage(self, r: int, name: str, fn) -> None:
        if self.state.done(r, name):
            return
        info = fn(r)
        self.state.record(r, name, info)

    # -- stages ------------------------------------------------------------------------------

    def policy_hf_dir(self, r: int) -> str:
        """The HF directory vLLM samples round r from."""
        from aipo_mp.checkpoint import is_megatron_checkpoint

        policy = self.state.policy(r)
        return str(self.round_dir(r) / "policy_hf") if is_megatron_checkpoint(policy) else policy

    def export(self, r: int) -> dict:
        from aipo_mp.checkpoint import is_megatron_checkpoint, read_meta

        policy = self.state.policy(r)
        if not is_megatron_checkpoint(policy):
            return {"skipped": "policy is already an HF directory"}
        out = self.round_dir(r) / "policy_hf"
        layout = read_meta(policy)["layout"]
        # One converter rank per stored TP x PP shard (srun spreads them over the allocation).
        self.launch(f"round{r}-export", ["checkpoint_tools", "mcore-to-hf", "--ckpt", policy, "--out", str(out),
                                         "--dtype", self.cfg.precision.dtype, "--overwrite"],
                    ntasks=layout["tp"] * layout["pp"])
        return {"hf_dir": str(out)}

    def synthesized(self, r: int) -> bool:
        """Round r samples from its own self-instruct prompts (the final evaluation uses the seeds)."""
        return self.cfg.rounds.synthesize.enabled and r < self.cfg.rounds.num_rounds

    def synthesize(self, r: int) -> dict:
        if not self.synthesized(r):
            return {"skipped": "rounds.synthesize.enabled is false"}
        rd = self.round_dir(r)
        self.launch(f"round{r}-synthesize", ["aipo_mp.cli", "synthesize", "--config", str(self.config_path),
                                             "--model", self.policy_hf_dir(r), "--out-dir", str(rd),
                                             "--round", str(r), "--run-dir", str(self.run_dir)])
        return {"prompts": str(rd / "prompts.jsonl")}

    def sample(self, r: int) -> dict:
        out = self.round_dir(r) / "samples.jsonl"
        prompts = str(self.round_dir(r) / "prompts.jsonl") if self.synthesized(r) else self.cfg.rounds.prompts
        self.launch(f"round{r}-sample", ["aipo_mp.cli", "sample", "--config", str(self.config_path),
                                         "--model", self.policy_hf_dir(r), "--out", str(out), "--prompts", prompts,
                                         f"sampling.seed={self.cfg.sampling.seed + 1000 * r}"])
        return {"samples": str(out)}

    def compare(self, r: int) -> dict:
        """Rankers: judge round r's answers against round 0's (and the baseline answers) directly,
        for the report's win rates (a ranker's scores do not compare across rounds)."""
        from aipo_mp.rounds.rankers import RANKER_KINDS, reward_kind
        from aipo_mp.rounds.report import BASELINE_JUDGMENTS_NAME, JUDGMENTS_NAME

        against = []
        if r > 0:
            against += ["--against", str(self.round_dir(0) / "samples.jsonl"), str(self.round_dir(r) / JUDGMENTS_NAME)]
        if self.cfg.rounds.baseline_answers:
            against += ["--against", str(self.run_dir / "baseline" / "samples.jsonl"),
                        str(self.round_dir(r) / BASELINE_JUDGMENTS_NAME)]
        if not against or reward_kind(self.cfg.reward) not in RANKER_KINDS:
            return {"skipped": "scalar rewards compare rounds by score"}
        self.launch(f"round{r}-compare", ["aipo_mp.rounds.rankers", "compare", "--config", str(self.config_path),
                                          "--samples", str(self.round_dir(r) / "samples.jsonl"), *against])
        return {"judgments": against[2::3]}

    def baseline(self, r: int) -> dict:
        """rounds.baseline_answers as samples of the seed prompts (RUN_DIR/baseline/samples.jsonl),
        scored by a scalar reward (baseline/scored.jsonl); rankers judge them in the compare stage."""
        from aipo_mp.rounds.rankers import RANKER_KINDS, reward_kind
        from aipo_mp.rounds.sampling import write_jsonl

        if not self.cfg.rounds.baseline_answers:
            return {"skipped": "no rounds.baseline_answers"}
        out = self.run_dir / "baseline"
        write_jsonl(out / "samples.jsonl", baseline_samples(self.cfg.rounds.baseline_answers, self.cfg.rounds.prompts,
                                                            self.state.policy(0)))
        if reward_kind(self.cfg.reward) not in RANKER_KINDS:
            self.launch("baseline-reward", ["aipo_mp.cli", "reward", "--config", str(self.config_path),
                                            "--samples", str(out / "samples.jsonl"), "--out", str(out / "scored.jsonl")])
        return {"samples": str(out / "samples.jsonl")}

    def reward(self, r: int) -> dict:
        rd = self.round_dir(r)
        self.launch(f"round{r}-reward", ["aipo_mp.cli", "reward", "--config", str(self.config_path),
                                         "--samples", str(rd / "samples.jsonl"), "--out", str(rd / "scored.jsonl")])
        return {"scored": str(rd / "scored.jsonl")}

    def pairs(self, r: int) -> dict:
        rd = self.round_dir(r)
        self.launch(f"round{r}-pairs", ["aipo_mp.cli", "pairs", "--config", str(self.config_path),
                                        "--scored", str(rd / "scored.jsonl"), "--out-dir", str(rd)])
        stats = json.loads((rd / "pairs_stats.json").read_text())
        if not stats.get("kept"):
            raise StageFailed(f"round {r}: no preference pairs survived the filters ({stats.get('dropped')}); "
                              "lower pairs.min_gap, raise sampling.temperature or sampling.n")
        return {"pairs": str(rd / "pairs.jsonl"), "kept": stats.get("kept")}

    def train(self, r: int) -> dict:
        from aipo_mp.trainer import LATEST

        rd = self.round_dir(r)
        out = rd / "train"
        overrides = [f"model.path={self.state.policy(r)}", f"data.train={rd / 'pairs.jsonl'}", f"output.dir={out}",
                     f"train.seed={self.cfg.train.seed + r}"]
        if self.cfg.rounds.reference == "initial" and r > 0:
            overrides += ["reference.mode=model", f"reference.path={self.state.policy(0)}"]
        else:  # AIPO: the reference is the policy this round starts from
            overrides += ["reference.mode=initial"]
        self.launch(f"round{r}-train", ["aipo_mp.cli", "train", str(self.config_path), *overrides],
                    ntasks=self.world_size)
        latest = (out / "checkpoints" / LATEST).read_text().strip()
        return {"checkpoint": str(out / "checkpoints" / latest)}

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
        """Sampled KL(π_r || π_0) for every round with samples: one child command (vLLM engines)."""
        out = self.run_dir / "kl.json"
        rounds = [r for r in range(last + 1) if self.state.done(r, "sample")]
        args = ["aipo_mp.rounds.report", "kl", "--run-dir", str(self.run_dir), "--out", str(out),
                "--initial", self.policy_hf_dir(0), *[f"{r}={self.policy_hf_dir(r)}" for r in rounds]]
        self.launch("kl", args)
        return {"kl": str(out)}

    def write_report(self, final: bool = False) -> None:
        from aipo_mp.rounds.report import write_report

        paths = write_report(self.run_dir)
        if final:
            print((self.run_dir / "report" / "report.md").read_text())
            print("plots: " + ", ".join(str(p) for p in paths), flush=True)


def baseline_samples(answers_path: str, prompts_path: str, policy: str) -> list[dict]:
    """Records {prompt_id, prompt, sample_index 0, text, num_tokens, finish_reason} of a baseline
    answers JSONL ({"prompt_id", "text"} per line) for prompts of `prompts_path`; num_tokens counts
    the starting policy's tokens (plus EOS, as the sampler counts a finished answer)."""
    from transformers import AutoTokenizer

    from aipo_mp.checkpoint import is_megatron_checkpoint
    from aipo_mp.rounds.sampling import read_jsonl, read_prompts

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


def last_error_line(log: Path) -> str:
    """The child's own one-line `error: ...` message, if it printed one."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    errors = [l for l in lines if l.startswith("error: ")]
    return errors[-1][len("error: "):] if errors else ""


def check_recipe(cfg: Config) -> None:
    errors = []
    if not cfg.model.path:
        errors.append("model.path: set the starting policy (an HF directory or an aipo_mp checkpoint)")
    if not cfg.rounds.prompts:
        errors.append("rounds.prompts: set the prompts JSONL the policy samples from each round")
    else:
        from aipo_mp.rounds.sampling import read_prompts

        try:
            read_prompts(cfg.rounds.prompts)  # empty or malformed files fail here, before any stage
        except ConfigError as e:
            errors += [f"rounds.prompts: {line}" for line in e.errors]
    from aipo_mp.rounds.rankers import reward_errors
    from aipo_mp.rounds.synthesize import synthesize_errors

    if not cfg.reward.kind and bool(cfg.reward.rule) == bool(cfg.reward.model):
        errors.append("reward: set exactly one of reward.rule (module:function) or reward.model (a classifier dir)")
    else:
        errors += reward_errors(cfg.reward)
    if cfg.pairs.min_rank_gap and cfg.reward.kind not in ("pairwise", "judge"):
        errors.append("pairs.min_rank_gap needs ranks: set reward.kind to pairwise or judge, or pairs.min_rank_gap=0")
    if cfg.rounds.synthesize.enabled:
        errors += synthesize_errors(cfg.rounds.synthesize)
    if cfg.rounds.num_rounds < 1:
        errors.append(f"rounds.num_rounds={cfg.rounds.num_rounds}: must be >= 1")
    if errors:
        raise ConfigError(errors)


def run_rounds(cfg: Config, launcher_kind: str, world_size: int) -> int:
    """Entry of `aipo-mp run`. Returns 0 when done, 75 when stopped by a signal (requeue me)."""
    from aipo_mp.rounds.launchers import make_launcher

    check_recipe(cfg)
    validate(cfg, world_size=world_size)
    run_dir = Path(cfg.output.dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    dump_config(cfg, config_path)
    runner = RoundRunner(cfg, config_path, make_launcher(launcher_kind), world_size)
    try:
        runner.run()
    except Stopped as s:
        print(f"[aipo-mp run] stopped by a signal during {s}; rerun the same command to resume", flush=True)
        return EXIT_STOPPED
    except StageFailed as e:
        raise ConfigError(str(e))
    return 0

