"""`aipo-mp` entry point. User mistakes end with `error: ...` lines and exit code 2 (no
traceback); bugs keep their traceback."""

from __future__ import annotations

import argparse
import os
import sys

USER_ERRORS: tuple = ()


def user_error_types() -> tuple:
    from aipo_mp.config import ConfigError
    from aipo_mp.data.pairs import DataError
    from aipo_mp.objectives import ObjectiveError

    return (ConfigError, DataError, ObjectiveError, FileExistsError)


def print_errors(exc: BaseException) -> None:
    lines = getattr(exc, "errors", None) or str(exc).splitlines() or [type(exc).__name__]
    for line in lines:
        print(f"error: {line}", file=sys.stderr)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (may include others via `defaults:`)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. parallel.tp=2 train.lr=1e-6")


def cmd_check(args) -> int:
    """Validate a config (and the layout for --world-size) without starting any process group."""
    from aipo_mp.config import load_config, validate

    cfg = load_config(args.config, args.overrides)
    arch = validate(cfg, world_size=args.world_size)
    par = cfg.parallel
    dp = args.world_size // (par.tp * par.pp * par.cp) if args.world_size else None
    print(f"ok: {arch.family} {arch.num_params() / 1e9:.3f}B params, tp={par.tp} pp={par.pp} vpp={par.vpp} "
          f"cp={par.cp} sp={par.sequence_parallel}" + (f" dp={dp}" if dp else "")
          + f", objective {cfg.objective.name}")
    return 0


def cmd_train(args) -> int:
    from aipo_mp.config import load_config, validate

    cfg = load_config(args.config, args.overrides)
    if args.nproc_per_node and "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        validate(cfg, world_size=args.nproc_per_node)  # fail before starting any process
        from aipo_mp.launch import launch_local

        return launch_local(args.nproc_per_node, ["train", args.config, *args.overrides], cfg.cluster.master_port or None)
    from aipo_mp.platform import read_dist_env, shutdown
    from aipo_mp.trainer import train

    validate(cfg, world_size=read_dist_env().world_size)
    try:
        train(cfg)
    finally:
        shutdown()
    return 0


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except user_error_types() as e:
        print_errors(e)
        code = 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
