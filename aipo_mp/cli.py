"""`aipo-mp` entry point. User mistakes end with `error: ...` lines and exit code 2 (no
traceback); bugs keep their traceback."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from aipo_mp.models import num_params


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (may include others via `defaults:`)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. parallel.tp=2 train.lr=1e-6")


def cmd_check(args) -> int:
    """Validate a config (and the layout for --world-size) without starting any process group."""
    from aipo_mp.config import load_config
    from aipo_mp.validate import PLACEMENT, RECIPE, TRAIN, validate

    cfg = load_config(args.config, args.overrides)
    print_notes(cfg)
    # A recipe of `aipo-mp run` (it names rounds.prompts) is checked as `run` checks it.
    recipe = bool(cfg.rounds.prompts)
    stages = (TRAIN, RECIPE, PLACEMENT) if recipe else (TRAIN,)
    world = args.world_size or (cfg.cluster.nodes * cfg.cluster.nproc_per_node if recipe else None)
    arch = validate(cfg, world_size=world, stages=stages)
    par = cfg.parallel
    dp = world // (par.tp * par.pp * par.cp) if world else None
    if cfg.data.train:
        check_data(cfg, arch.vocab_size)
    experts = (f" ({num_params(arch, active=True) / 1e9:.3f}B active, {arch.num_experts} experts top-"
               f"{arch.num_experts_per_tok}, ep={par.ep} etp={par.etp}, router aux loss {cfg.moe.aux_loss_coeff:g}"
               f"{', router frozen' if cfg.moe.freeze_router else ''})" if arch.num_experts else "")
    print(f"ok: {arch.family} {num_params(arch) / 1e9:.3f}B params{experts}, tp={par.tp} pp={par.pp} vpp={par.vpp} "
          f"cp={par.cp} sp={par.sequence_parallel}" + (f" dp={dp}" if dp else "")
          + f", objective {cfg.objective.name}")
    return 0


def check_data(cfg, vocab_size: int) -> None:
    """Read and tokenize data.train as training would, and print the counts it would train on."""
    from aipo_mp.data import prepare

    if not cfg.model.path:
        print("note: data.train not read (it is tokenized with model.path's tokenizer, and model.path is unset)")
        return
    from aipo_mp.convert.hf_io import load_tokenizer
    from aipo_mp.training.state import tokenizer_dir_of

    tokenizer = load_tokenizer(tokenizer_dir_of(cfg.model.path), cfg.model.trust_remote_code)
    pairs, stats, _ = prepare.prepare_pairs(cfg, tokenizer, vocab_size)
    for line in prepare.report_lines(stats, cfg):
        print(line)
    steps = cfg.train.steps or max(1, len(pairs) // cfg.train.global_batch_pairs)
    print(f"would train on {len(pairs)} pairs: {steps} steps of {cfg.train.global_batch_pairs} pairs")


def print_notes(cfg) -> None:
    for line in getattr(cfg, "notes", []):
        print(line, file=sys.stderr)


def cmd_train(args) -> int:
    from aipo_mp.errors import EXIT_STOPPED
    from aipo_mp.runtime.platform import StopSignal

    stop = StopSignal().install()  # before the slow imports: an early preemption signal is not fatal
    from aipo_mp.config import load_config
    from aipo_mp.validate import validate

    cfg = load_config(args.config, args.overrides)
    if args.nproc_per_node and "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        validate(cfg, world_size=args.nproc_per_node)  # fail before starting any process
        from aipo_mp.rounds.launchers import LocalLauncher
        from aipo_mp.runtime.locks import hold_lock

        with hold_lock(cfg.output.dir, "aipo-mp train"):  # the ranks inherit it (AIPO_MP_LOCKED_DIRS)
            result = LocalLauncher().run("train", ["aipo_mp.cli", "train", args.config, *args.overrides],
                                         ntasks=args.nproc_per_node)
        return EXIT_STOPPED if result.stopped_by_signal else result.returncode
    from aipo_mp.runtime.platform import read_dist_env, shutdown
    from aipo_mp.training.loop import train

    validate(cfg, world_size=read_dist_env().world_size)
    try:
        state = train(cfg, stop)
    finally:
        shutdown()
    return EXIT_STOPPED if state.stats.get("stopped") else 0


def quiet_library_warnings() -> None:
    """megatron-core warns at import about optional GPU libraries and deprecated defaults; on
    CPU these are expected and would bury the run's own output."""
    import warnings

    for module in ("megatron", "torch.distributed", "transformers"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)


def stage_config(args):
    """Stage commands take an optional --config and key=value overrides (e.g. sampling.n=8)."""
    from aipo_mp.config import load_config

    return load_config(args.config, args.overrides)


def cmd_sample(args) -> int:
    from aipo_mp.rounds.shards import StopFlag

    stop = StopFlag() if args.shard_dir else None  # a placed task: before the slow imports
    from aipo_mp.errors import ConfigError
    from aipo_mp.rounds.sampling import sample, sample_task

    cfg = stage_config(args)
    spec = cfg.sampling
    if args.shard_dir:  # one task of `aipo-mp run`'s sample stage: this task's shards only
        return sample_task(args.model, args.prompts or cfg.rounds.prompts, spec, args.shard_dir, stop,
                           shard_prompts=args.shard_prompts)
    if not args.out:
        raise ConfigError("sample: give --out FILE (or --shard-dir DIR for one task of a placed stage)")
    records = sample(args.model, args.prompts or cfg.rounds.prompts, spec, args.out)
    print(f"wrote {len(records)} samples to {args.out}")
    return 0


def cmd_reward(args) -> int:
    from aipo_mp.rounds.shards import StopFlag

    stop = StopFlag() if args.shard_dir else None  # a placed task: before the slow imports
    from aipo_mp.errors import ConfigError
    from aipo_mp.rounds.rewards import reward_task, score_with_model, score_with_rule

    cfg = stage_config(args)
    rule, model = args.rule or cfg.reward.rule, args.model or cfg.reward.model
    if cfg.reward.kind in ("pairwise", "judge"):  # rankers: aipo_mp/rounds/rankers.py
        from aipo_mp.rounds.rankers import rank_task, rank_with_config

        reward = dataclasses.replace(cfg.reward, model=model)
        if args.shard_dir:  # one engine task of `aipo-mp run`'s ranker stage: its shards (whole prompts)
            return rank_task(args.samples, reward, args.shard_dir, stop)
        ranked = rank_with_config(args.samples, reward, args.out)
        print(f"ranked {len(ranked)} samples with the {reward.kind} ranker into {args.out}")
        return 0
    if bool(rule) == bool(model):
        raise ConfigError("reward: give exactly one of --rule module:function or --model DIR (or reward.rule / reward.model)")
    if args.shard_dir:  # one task of `aipo-mp run`'s reward stage: this task's shard only
        return reward_task(args.samples, args.shard_dir, stop, rule=rule, model=model,
                           tensor_parallel=cfg.reward.tensor_parallel, pipeline_parallel=cfg.reward.pipeline_parallel)
    if not args.out:
        raise ConfigError("reward: give --out FILE (or --shard-dir DIR for one task of a placed stage)")
    scored = score_with_rule(args.samples, rule, args.out) if rule else score_with_model(args.samples, model, args.out)
    mean = sum(r["score"] for r in scored) / max(1, len(scored))
    print(f"scored {len(scored)} samples (mean {mean:.4f}) into {args.out}")
    return 0


def cmd_synthesize(args) -> int:
    from aipo_mp.rounds.shards import StopFlag

    stop = StopFlag() if args.shard_dir else None  # a placed task: before the slow imports
    from aipo_mp.rounds.synthesize import previous_new_prompts, run_stage, synthesize_task

    cfg = stage_config(args)
    extra = []
    if cfg.rounds.synthesize.include_previous and args.run_dir:
        from pathlib import Path

        extra = previous_new_prompts(Path(args.run_dir), args.round)
    if args.shard_dir:  # one engine task of `aipo-mp run`'s synthesize stage: its shard of each batch
        return synthesize_task(cfg, args.model, args.seeds or cfg.rounds.prompts, args.out_dir, args.round, extra,
                               args.shard_dir, stop)
    records, stats = run_stage(cfg, args.model, args.seeds or cfg.rounds.prompts, args.out_dir, args.round, extra)
    print(f"synthesized {stats['kept']} new prompts ({stats['completions']} completions, dropped {stats['dropped']}); "
          f"wrote {len(records)} prompts to {args.out_dir}/prompts.jsonl")
    return 0


def cmd_pairs(args) -> int:
    from aipo_mp.rounds.pairs import build_pairs

    cfg = stage_config(args)
    p = cfg.pairs
    pairs, stats = build_pairs(args.scored, min_gap=p.min_gap, allow_truncated=p.allow_truncated, mode=p.mode,
                               max_pairs_per_prompt=p.max_pairs_per_prompt or None, out_dir=args.out_dir,
                               min_rank_gap=p.min_rank_gap)
    print(f"kept {len(pairs)} pairs; dropped {stats.get('dropped')} -> {args.out_dir}")
    return 0


def cmd_run(args) -> int:
    from aipo_mp.config import load_config
    from aipo_mp.rounds.run import run_rounds

    cfg = load_config(args.config, args.overrides)
    launcher = args.launcher or cfg.cluster.launcher
    if args.nodes:
        cfg.cluster.nodes = args.nodes
    if args.gpus_per_node:
        cfg.cluster.nproc_per_node = args.gpus_per_node
    if args.dry_run:
        from aipo_mp.rounds.run import dry_run

        return dry_run(cfg, launcher, as_json=args.json)
    world = args.nproc_per_node or cfg.cluster.nproc_per_node * cfg.cluster.nodes
    return run_rounds(cfg, launcher, world)


def cmd_report(args) -> int:
    from aipo_mp.errors import RUN_STATE, ConfigError
    from aipo_mp.rounds.report import console_summary, report_rows, write_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {args.run_dir}; give the output.dir of an `aipo-mp run`")
    if not (run_dir / RUN_STATE).is_file():  # checked before anything is written
        raise ConfigError(f"{args.run_dir} is not a run directory (no {RUN_STATE}); give the output.dir of an "
                          "`aipo-mp run`")
    paths = write_report(run_dir)
    print(console_summary(report_rows(run_dir), run_dir / "report" / "report.md"), end="")
    print("plots: " + ", ".join(str(p) for p in paths))
    return 0


def cmd_eval(args) -> int:
    from aipo_mp.errors import ConfigError
    from aipo_mp.rounds.evaluate import JudgeOptions, evaluate, parse_rounds, results_table

    judge = None
    if bool(args.judge_url) != bool(args.judge_model):
        raise ConfigError("eval: give both --judge-url and --judge-model (or neither)")
    if args.baseline and args.baseline_round is not None:
        raise ConfigError("eval: give one of --baseline FILE and --baseline-round R")
    if args.judge_url:
        judge = JudgeOptions(args.judge_url, args.judge_model, args.judge_api_key_env, args.judge_rps,
                             args.judge_retries, args.baseline, args.baseline_round, judge_extra_body(args))
    done = evaluate(args.run_dir, args.questions, args.format, parse_rounds(args.rounds), args.out,
                    args.overrides, args.launcher, judge)
    for r, path in done["answers"].items():
        print(f"round {r}: {path}")
    if done["results"]:
        print(results_table(done["results"]), end="")
    return 0


def judge_extra_body(args) -> dict | None:
    import json

    from aipo_mp.errors import ConfigError

    if not args.judge_extra_body:
        return None
    try:
        extra = json.loads(args.judge_extra_body)
    except ValueError as e:
        raise ConfigError(f"--judge-extra-body: not valid JSON ({e}); give a JSON object") from None
    if not isinstance(extra, dict):
        raise ConfigError("--judge-extra-body: give a JSON object, e.g. '{\"structured_outputs\": "
                          "{\"choice\": [\"A\", \"B\"]}}'")
    return extra


def add_stage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="a recipe YAML (its sampling/reward/pairs sections are used)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. sampling.n=8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aipo-mp", description="Iterative preference optimization (AIPO, DPO family) on megatron-core.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate a config and layout before any process starts")
    add_config_args(p)
    p.add_argument("--world-size", type=int, default=None, help="number of ranks the run will use")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("train", help="train a policy on preference pairs (torchrun/srun, or --nproc-per-node)")
    add_config_args(p)
    p.add_argument("--nproc-per-node", type=int, default=0, help="start this many local ranks")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("run", help="iterative rounds: export -> sample -> reward -> pairs -> train (resumable)")
    add_config_args(p)
    p.add_argument("--launcher", choices=["local", "slurm"], default=None, help="default: cluster.launcher")
    p.add_argument("--nproc-per-node", type=int, default=0, help="training ranks (default: cluster.nproc_per_node x nodes)")
    p.add_argument("--dry-run", action="store_true", help="print every stage's placement and command; start nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: one JSON object {\"stages\": [...]}")
    p.add_argument("--nodes", type=int, default=0, help="nodes of the allocation (default: cluster.nodes)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs (ranks) per node (default: cluster.nproc_per_node)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("sample", help="sample n answers per prompt with vLLM")
    p.add_argument("--model", required=True, help="HF directory of the policy")
    p.add_argument("--prompts", default=None, help="prompts JSONL (default: rounds.prompts)")
    p.add_argument("--out", default=None, help="samples.jsonl to write")
    p.add_argument("--shard-dir", default=None, help="one task of a placed stage: write this task's shards here")
    p.add_argument("--shard-prompts", type=int, default=0, help="prompts per shard with --shard-dir (0: one per task)")
    add_stage_args(p)
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("reward", help="score samples with a rule or a reward model (vLLM pooling)")
    p.add_argument("--samples", required=True)
    p.add_argument("--out", default=None, help="scored.jsonl to write")
    p.add_argument("--shard-dir", default=None, help="one task of a placed stage: write this task's shard here")
    p.add_argument("--rule", default=None, help="module:function(prompt, response) -> float")
    p.add_argument("--model", default=None, help="HF *ForSequenceClassification directory with one label")
    add_stage_args(p)
    p.set_defaults(func=cmd_reward)
    p = sub.add_parser("synthesize", help="self-instruct: new prompts written by the policy from clustered seeds")
    p.add_argument("--model", required=True, help="HF directory of the policy that writes the instructions")
    p.add_argument("--seeds", default=None, help="seed prompts JSONL (default: rounds.prompts)")
    p.add_argument("--out-dir", required=True, help="writes prompts.jsonl, synthesize_stats.json, synthesize/")
    p.add_argument("--round", type=int, default=0, help="round index (ids r<round>-n<k>, generation seeds)")
    p.add_argument("--run-dir", default=None, help="with rounds.synthesize.include_previous: earlier rounds' prompts")
    p.add_argument("--shard-dir", default=None, help="one engine task of a placed stage: its shard of each batch here")
    add_stage_args(p)
    p.set_defaults(func=cmd_synthesize)
    p = sub.add_parser("pairs", help="best vs worst answer per prompt -> pairs.jsonl and pairs_stats.json")
    p.add_argument("--scored", required=True)
    p.add_argument("--out-dir", required=True)
    add_stage_args(p)
    p.set_defaults(func=cmd_pairs)
    p = sub.add_parser("report", help="per-round table and plots of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("eval", help="answer a benchmark's questions with each round's policy (AlpacaEval, "
                       "Arena-Hard, MT-Bench files); optionally judge them pairwise")
    p.add_argument("run_dir", help="the output.dir of an `aipo-mp run`")
    p.add_argument("--questions", required=True, help="the benchmark's question file (JSON or JSONL)")
    p.add_argument("--format", choices=["alpaca_eval", "arena_hard", "mt_bench"], default=None,
                   help="default: detected from the question file")
    p.add_argument("--rounds", default=None, help="rounds to evaluate, e.g. 0,3 (default: every round with a policy)")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/eval/FORMAT)")
    p.add_argument("--launcher", choices=["local", "slurm"], default=None, help="default: cluster.launcher")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    p.add_argument("--judge-model", default=None, help="the judge's model name at that endpoint")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--judge-rps", type=float, default=2.0, help="at most this many judge requests per second")
    p.add_argument("--judge-retries", type=int, default=5, help="retries of a failed request (backoff 1, 2, 4 ... s)")
    p.add_argument("--judge-extra-body", default=None, help="JSON object added to every judge request")
    p.add_argument("--baseline", default=None, help="judge against this answer file (the benchmark's format)")
    p.add_argument("--baseline-round", type=int, default=None, help="judge against this round (default: the first)")
    p.add_argument("overrides", nargs="*", help="sampling.* overrides, e.g. sampling.max_tokens=2048")
    p.set_defaults(func=cmd_eval)
    parser.subcommands = sub  # main() adds the commands that parse their own arguments
    return parser


def passthrough_commands() -> dict:
    """Subcommands that parse their own arguments: name -> (help, main(argv) -> exit code)."""

    def plan(argv):
        from aipo_mp import planner

        return planner.main(argv)

    def convert(argv):
        from aipo_mp.convert.cli import main as convert_main

        return convert_main(argv)

    def compare(argv):
        from aipo_mp.rounds.rankers import compare_main

        return compare_main(argv)

    def kl(argv):
        from aipo_mp.rounds.report import main as report_main

        return report_main(["kl", *argv])

    return {
        "plan": ("rank parallel layouts of a model for a GPU count: memory, step time, MFU", plan),
        "convert": ("hf-to-mcore | mcore-to-hf | verify | inspect: HF <-> Megatron checkpoints", convert),
        "compare": ("rankers: judge one round's answers against another's (both orders)", compare),
        "kl": ("sampled KL(policy_r || initial policy) of the rounds of a run", kl),
    }


def main(argv: list[str] | None = None) -> int:
    from aipo_mp.errors import run_main

    quiet_library_warnings()
    argv = sys.argv[1:] if argv is None else argv
    passthrough = passthrough_commands()
    if argv[:1] and argv[0] in passthrough:
        sys.exit(run_main(lambda: passthrough[argv[0]][1](argv[1:])))
    parser = build_parser()
    for name, (text, _) in passthrough.items():
        parser.subcommands.add_parser(name, help=text, add_help=False)
    args, extra = parser.parse_known_args(argv)
    # `aipo-mp run R --launcher slurm a.b=1`: overrides may also follow an option
    late = [x for x in extra if "=" in x and not x.startswith("-")]
    if len(late) != len(extra) or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if late:
        args.overrides = list(args.overrides) + late
    sys.exit(run_main(lambda: args.func(args)))


if __name__ == "__main__":
    main()
