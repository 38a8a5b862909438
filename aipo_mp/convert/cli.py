"""aipo-mp convert {hf-to-mcore,mcore-to-hf,verify,inspect} ... (also `python -m checkpoint_tools ...`)

Multi-rank commands start their own local worker processes (one per rank, torchrun-style
environment) unless they already run inside a distributed launch (torchrun / srun with
WORLD_SIZE or SLURM_NTASKS > 1), in which case each process is one rank. A single-rank job runs
in this process.

Every user mistake prints one line `error: ...` and exits with status 2; an interrupted run
(Ctrl-C, SIGTERM) removes its partial output and exits with status 130. Output is written into a
temporary sibling (`.NAME.partial`) and renamed at the end, so a failed run leaves nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Optional

from aipo_mp.models import num_params
from aipo_mp.runtime import spawn

RUN_DIR_ENV = "CHECKPOINT_TOOLS_RUN_DIR"  # set by the parent for the workers it starts
PARENT_PID_ENV = "CHECKPOINT_TOOLS_PARENT_PID"
ROOT = Path(__file__).resolve().parents[2]
RUN_DIR_PREFIX = "aipo_mp-convert."  # the parent's temporary run directory: RUN_DIR_PREFIX[kind]PID.xxxx
EXIT_USER, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 1, 130


class Interrupted(KeyboardInterrupt):
    """SIGTERM turned into an exception, so cleanup code runs as for Ctrl-C."""


class WorkerCrash(Exception):
    def __init__(self, line: str, log_tail: str = ""):
        super().__init__(line)
        self.log_tail = log_tail


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one `error:` line (exit 2) like every other mistake."""

    def error(self, message):
        self.exit(EXIT_USER, f"error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="aipo-mp convert",
                      description="Convert, verify and inspect HF and aipo_mp Megatron checkpoints.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=OneLineParser)

    a = sub.add_parser("hf-to-mcore", help="HF safetensors directory -> aipo_mp Megatron checkpoint")
    a.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    a.add_argument("--out", required=True, help="checkpoint directory to create")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    a.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per pipeline rank")
    a.add_argument("--ep", type=int, default=1,
                   help="expert-parallel size (mixture-of-experts models: each rank reads and writes its experts)")
    a.add_argument("--etp", type=int, default=None,
                   help="expert-tensor-parallel size: each expert split over this many ranks (default: --tp when "
                        "--ep is 1, else 1)")
    a.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="stored dtype (default: the source's)")
    a.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    a.add_argument("--allow-pickle", action="store_true", help="accept pickled .bin weights (trusted sources only)")
    a.add_argument("--skip-space-check", action="store_true", help="do not check free disk space first")
    a.add_argument("--threads", type=int, default=2, help="files each rank writes at once (default 2)")
    a.add_argument("--report", help="also write timings and per-rank peak RSS as JSON to this file")

    b = sub.add_parser("mcore-to-hf", help="aipo_mp Megatron checkpoint -> HF safetensors directory")
    b.add_argument("--ckpt", required=True, help="aipo_mp Megatron checkpoint directory")
    b.add_argument("--out", required=True, help="HF directory to create")
    b.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="output dtype (default: the checkpoint's)")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    b.add_argument("--skip-space-check", action="store_true", help="do not check free disk space first")
    b.add_argument("--threads", type=int, default=2, help="files each rank writes at once (default 2)")
    b.add_argument("--ranks", type=int, default=None,
                   help="converter processes, any number (default: the checkpoint's tp x pp)")
    b.add_argument("--report", help="also write timings and per-rank peak RSS as JSON to this file")
    b.add_argument("--restore-dropped", metavar="HF_DIR", default=None,
                   help="a full checkpoint: copy the tensors import dropped (DeepSeek-V3's multi-token-prediction "
                        "layer) from this HF directory, as its reader presents them (FP8 dequantized to bf16)")

    v = sub.add_parser("verify", help="compare the logits of a Megatron checkpoint with transformers on an HF dir")
    v.add_argument("--hf", required=True, help="Hugging Face model directory (the reference)")
    v.add_argument("--ckpt", required=True, help="aipo_mp Megatron checkpoint directory")
    v.add_argument("--tp", type=int, default=None,
                   help="layout to load at (default: the stored one; once any of --tp/--pp/--vpp is given, unset ones are 1)")
    v.add_argument("--pp", type=int, default=None)
    v.add_argument("--vpp", type=int, default=None)
    v.add_argument("--ep", type=int, default=None, help="expert-parallel size to load at (default: the stored one, else 1)")
    v.add_argument("--etp", type=int, default=None, help="expert-tensor-parallel size to load at")
    v.add_argument("--tol", type=float, default=1e-4, help="largest allowed max abs logit difference")
    v.add_argument("--allow-pickle", action="store_true", help="accept pickled .bin weights in --hf")

    i = sub.add_parser("inspect", help="family, layout, dtype, parameters and bytes of a checkpoint")
    i.add_argument("dir", help="HF directory or aipo_mp Megatron checkpoint")
    i.add_argument("--json", action="store_true", help="print a JSON object")
    i.add_argument("--allow-pickle", action="store_true", help="accept pickled .bin weights")

    # Internal: where `verify` workers find the reference logits.
    v.add_argument("--reference", help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------------------------------------
# Process handling
# ---------------------------------------------------------------------------------------------


def inside_distributed_launch() -> bool:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return True
    return "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1


def launched_world_size() -> int:
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    return int(env.get("SLURM_NTASKS", "1"))


def run_rank_program(args) -> list[dict]:
    """This process is one rank: init the process group, run the program, gather every rank's
    stats on rank 0 (returned there; [] elsewhere)."""
    import torch

    from aipo_mp.convert.common import AnonMemorySampler, reset_peak_rss
    from aipo_mp.runtime import platform

    env = platform.init_distributed()
    try:
        # A process that runs several commands (tests, convert_worker): the previous command's
        # model (megatron modules hold reference cycles) goes before this one's peak is measured.
        gc.collect()
        reset_peak_rss()
        with AnonMemorySampler() as mem:
            stats = rank_program(args.cmd)(args)
        stats["peak_anon_bytes"] = mem.peak
        everyone = [None] * env.world_size
        torch.distributed.all_gather_object(everyone, stats)
    finally:
        platform.shutdown()
    return everyone if env.rank == 0 else []


def rank_program(command: str):
    """The per-rank program of a multi-rank command (imported on use: it pulls in torch)."""
    if command == "hf-to-mcore":
        from aipo_mp.convert.hf_to_mcore import hf_to_mcore_rank as program
    elif command == "mcore-to-hf":
        from aipo_mp.convert.mcore_to_hf import mcore_to_hf_rank as program
    elif command == "verify":
        from aipo_mp.convert.verify import verify_rank as program
    else:
        raise KeyError(command)
    return program


def spawn_ranks(world: int, argv: list[str], run_dir: Path) -> list[dict]:
    """Start `world` local ranks of `python -m aipo_mp.convert.cli argv`. If one fails, stop the
    others and raise its one-line error (ConfigError) or a WorkerCrash with its log."""
    from aipo_mp.errors import ConfigError

    port = spawn.free_port()
    extra = {RUN_DIR_ENV: str(run_dir), PARENT_PID_ENV: str(os.getpid())}
    procs = []
    failed: Optional[int] = None
    try:
        for rank in range(world):  # own session (Ctrl-C reaches us, then we stop them), never outliving us
            procs.append(spawn.start(spawn.module_command("aipo_mp.convert.cli", argv),
                                     spawn.rank_env(rank, world, port, extra, checkout_on_path=True),
                                     run_dir / f"rank{rank}.log", own_session=True, tied_to_parent=True))
        failed, _ = spawn.wait_for_first_failure(procs)
        if failed is not None:
            # Give the other ranks a moment to report their own error (rank 0 often holds
            # the real cause while another rank only learns that rank 0 failed).
            grace = time.time() + 3
            while time.time() < grace and any(p.poll() is None for p in procs):
                time.sleep(0.1)
    finally:
        if failed is not None or any(p.poll() is None for p in procs):
            stop_all(procs)
    if failed is None:
        return json.loads((run_dir / "result.json").read_text())
    # A worker's own one-line error wins (lowest rank first); others died because we stopped them.
    for rank in range(world):
        err = run_dir / f"error.rank{rank}"
        if err.exists():
            raise ConfigError(err.read_text().strip())
    tail = (run_dir / f"rank{failed}.log").read_text()[-6000:]
    raise WorkerCrash(f"worker rank {failed} failed with exit code {procs[failed].returncode}; its output is above",
                      tail)


def make_run_dir(kind: str = "") -> Path:
    """A temporary directory named after this process (RUN_DIR_PREFIX[kind]PID.xxxx), so that a
    later conversion can tell it is orphaned (see sweep_stale_run_dirs)."""
    return Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{kind}{os.getpid()}."))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def sweep_stale_run_dirs() -> list[Path]:
    """Remove our temporary run directories whose process is gone: a parent killed after its
    output was published, but before its own cleanup ran, left one. Returns what was removed."""
    removed = []
    for d in Path(tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*"):
        parts = d.name[len(RUN_DIR_PREFIX):].split(".")
        pid = next((int(p) for p in parts[:2] if p.isdigit()), None)
        try:
            mine = d.is_dir() and not d.is_symlink() and d.stat().st_uid == os.getuid()
        except OSError:
            continue
        if pid is None or not mine or pid == os.getpid() or pid_alive(pid):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def remove_run_dir_if_orphaned() -> None:
    """A worker whose parent was killed (the parent-death signal) removes the shared temporary
    directory the parent can no longer remove."""
    run_dir, parent = os.environ.get(RUN_DIR_ENV), os.environ.get(PARENT_PID_ENV)
    if run_dir and parent and os.getppid() != int(parent):
        shutil.rmtree(run_dir, ignore_errors=True)


def watch_parent(out: Optional[str]) -> None:
    """A worker blocked in a C++ collective cannot run its SIGTERM handler: a thread notices the
    parent is gone, removes the partial output and the run directory, and ends the process."""
    import threading

    parent = os.environ.get(PARENT_PID_ENV)
    if not parent:
        return

    def watch() -> None:
        from aipo_mp.training.checkpoint import remove_partial

        while os.getppid() == int(parent):
            time.sleep(0.5)
        if out:
            remove_partial(out)
        shutil.rmtree(os.environ[RUN_DIR_ENV], ignore_errors=True)
        os._exit(EXIT_INTERRUPTED)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def stop_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.time() + 3  # ranks blocked in a C++ collective only die by SIGKILL
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_distributed(args, argv: list[str], world: int) -> list[dict]:
    """Rank stats of a multi-rank program, however this process was started."""
    from aipo_mp.errors import ConfigError

    if inside_distributed_launch():
        have = launched_world_size()
        if have != world:
            raise ConfigError(f"this launch has {have} processes but the job needs {world} (tp x pp, or with "
                              f"experts lcm(tp, ep x etp) x pp); launch "
                              f"{world} processes, or run the command without a launcher: it starts its own")
        return run_rank_program(args)
    if world == 1:
        return run_rank_program(args)
    run_dir = make_run_dir()
    try:
        return spawn_ranks(world, argv, run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Commands (the launching process)
# ---------------------------------------------------------------------------------------------


def cmd_hf_to_mcore(args, argv) -> int:
    from aipo_mp.convert import common as ct

    src = ct.hf_source(args.hf, args.allow_pickle)
    dtype = ct.choose_dtype(args.dtype, src.dtype, str(src.dir))
    etp = ct.expert_tp(src.arch, args.tp, args.ep, args.etp)
    ct.check_layout(src.arch, args.tp, args.pp, args.vpp or 1, args.ep, etp)
    out = ct.check_destination(args.out, args.overwrite)
    if Path(args.hf).absolute() == out:
        raise ct.ConfigError("--out must differ from --hf")
    if not args.skip_space_check:
        ct.check_free_space(out, src.num_params * ct.BYTES_PER[dtype], "the Megatron checkpoint")
    t0 = time.perf_counter()
    with cleanup_on_failure(out):
        stats = run_distributed(args, argv, ct.conversion_world(args.tp, args.pp, args.ep, etp))
    wall = time.perf_counter() - t0
    if stats:
        s0 = stats[0]
        lay = s0["layout"]
        conv = max(s["total_s"] for s in stats)
        print(f"converted {src.dir} -> {out}")
        print(f"  {s0['family']}, layout {layout_text(lay)}, {s0['dtype']}, "
              f"{ct.human_count(s0['num_params'])} parameters ({ct.human_bytes(s0['model_bytes'])})")
        print_timing(stats, conv, wall, read_label="read (incl. transform: one copy from the HF file into the shard)")
        write_report(args, stats, wall)
    return 0


def cmd_mcore_to_hf(args, argv) -> int:
    from aipo_mp.convert import common as ct
    from aipo_mp.models import arch_from_hf_config, family_for_hf_config

    meta = ct.checked_meta(args.ckpt)
    family_for_hf_config(meta["hf_config"])
    arch = arch_from_hf_config(meta["hf_config"])
    ct.parse_size(args.max_shard_size)
    if args.ranks is not None and args.ranks < 1:
        raise ct.ConfigError(f"--ranks={args.ranks}: must be >= 1")
    if args.threads < 1:
        raise ct.ConfigError(f"--threads={args.threads}: must be >= 1")
    out = ct.check_destination(args.out, args.overwrite)
    if Path(args.ckpt).absolute() == out:
        raise ct.ConfigError("--out must differ from --ckpt")
    out_dtype = args.dtype or meta["dtype"]
    if args.restore_dropped:
        check_restore_source(args.restore_dropped, arch)
    if not args.skip_space_check:
        ct.check_free_space(out, num_params(arch) * ct.BYTES_PER[out_dtype], "the HF safetensors")
    lay = meta["layout"]
    t0 = time.perf_counter()
    with cleanup_on_failure(out):
        # Any number of ranks reads any layout: by default the stored tp x pp, or as many as launched.
        ranks = args.ranks or (launched_world_size() if inside_distributed_launch() else int(lay["tp"]) * int(lay["pp"]))
        stats = run_distributed(args, argv, ranks)
    wall = time.perf_counter() - t0
    if stats:
        s0 = stats[0]
        conv = max(s["total_s"] for s in stats)
        print(f"converted {Path(args.ckpt).absolute()} -> {out}")
        print(f"  {s0['family']}, from layout {layout_text(lay)}, {out_dtype}, "
              f"{ct.human_count(s0['num_params'])} parameters ({ct.human_bytes(s0['model_bytes'])}) in "
              f"{sum(s['files'] for s in stats)} safetensors files; largest single tensor "
              f"{ct.human_bytes(max(s['largest_tensor_bytes'] for s in stats))}")
        print_timing(stats, conv, wall, read_label="read")
        write_report(args, stats, wall)
    return 0


def check_restore_source(hf_dir: str, arch) -> None:
    """--restore-dropped: an HF directory of the checkpoint's architecture that holds tensors import drops."""
    from aipo_mp.convert import common as ct
    from aipo_mp.models import get_family

    src = ct.hf_source(hf_dir, False)
    same = ("family", "num_layers", "hidden_size", "vocab_size")
    if any(getattr(src.arch, k) != getattr(arch, k) for k in same):
        raise ct.ConfigError(f"--restore-dropped {hf_dir}: a {src.arch.family} of {src.arch.num_layers} layers, "
                             f"hidden {src.arch.hidden_size}, not the checkpoint's {arch.family} of {arch.num_layers} "
                             f"layers, hidden {arch.hidden_size}; give the HF directory the checkpoint was imported from")
    if not ct.dropped_names(src.weights, get_family(arch.family), arch):
        raise ct.ConfigError(f"--restore-dropped {hf_dir}: it holds no tensors that import drops (for {arch.family}: "
                             "the multi-token-prediction layer); leave the option out")


def layout_text(lay: dict) -> str:
    text = f"tp={lay['tp']} pp={lay['pp']} vpp={lay.get('vpp', 1)}"
    return text + (f" ep={lay['ep']} etp={lay.get('etp', 1)}" if "ep" in lay else "")


def write_report(args, stats: list[dict], wall: float) -> None:
    if getattr(args, "report", None):
        from aipo_mp.runtime.files import atomic_write_json

        atomic_write_json(args.report, {"command": args.cmd, "wall_s": wall, "ranks": stats})


def print_timing(stats, conv, wall, read_label: str) -> None:
    """Time in the ranks and its phases, the data rate (bytes read + written over the slowest
    rank's conversion phase) and where that time went, summed over the writer threads."""
    from aipo_mp.convert import common as ct

    build = max(s["build_s"] for s in stats)
    convert = max(s["convert_s"] for s in stats)
    moved = sum(s["bytes_read"] + s["bytes_written"] for s in stats)
    print(f"  time {conv:.2f} s in the ranks (setup {build:.2f} s, convert {convert:.2f} s), {wall:.2f} s wall")
    print(f"  data: {ct.human_bytes(sum(s['bytes_read'] for s in stats))} read + "
          f"{ct.human_bytes(sum(s['bytes_written'] for s in stats))} written in {convert:.2f} s: "
          f"{moved / max(convert, 1e-9) / 1e9:.3f} GB/s ({stats[0]['threads']} writer threads per rank)")
    print(f"  thread time (summed over ranks and threads): {read_label} {sum(s['read_s'] for s in stats):.2f} s, "
          f"transform {sum(s['transform_s'] for s in stats):.2f} s, write {sum(s['write_s'] for s in stats):.2f} s")
    anon = [s.get("peak_anon_bytes") for s in stats]
    if all(a is not None for a in anon):
        print("  peak private memory per rank (anonymous RSS): " + ", ".join(ct.human_bytes(a) for a in anon))
    print("  peak RSS per rank (incl. mmap'd safetensors pages): "
          + ", ".join(ct.human_bytes(s["peak_rss_bytes"]) for s in stats))


def cmd_verify(args, argv) -> int:
    from aipo_mp.convert import common as ct
    from aipo_mp.convert.verify import make_reference, verify_layout
    from aipo_mp.models import arch_from_hf_config
    from aipo_mp.training.checkpoint import arch_differences

    meta = ct.checked_meta(args.ckpt)
    hf_arch = ct.hf_source(args.hf, args.allow_pickle).arch  # names and shapes vs config.json, headers only
    ck_arch = arch_from_hf_config(meta["hf_config"])
    diffs = arch_differences(hf_arch, ck_arch)
    if diffs:
        raise ct.ConfigError(f"--hf and --ckpt are different models ({'; '.join(diffs)}); compare a checkpoint "
                             "with the HF model it was converted from")
    tp, pp, vpp, ep, etp = verify_layout(args, meta, ck_arch)
    ct.check_layout(ck_arch, tp, pp, vpp, ep, etp)
    work = make_run_dir("verify.")
    try:
        ref = work / "reference.pt"
        if args.reference is None:
            make_reference(args.hf, ref, hf_arch)
            args.reference = str(ref)
            argv = [*argv, "--reference", str(ref)]
        stats = run_distributed(args, argv, ct.conversion_world(tp, pp, ep, etp))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not stats:
        return 0
    diff = stats[0]["max_abs_diff"]
    ok = diff <= args.tol
    where = f"tp={tp} pp={pp} vpp={vpp}" + (f" ep={ep} etp={etp}" if ck_arch.num_experts else "")
    print(f"max abs diff {diff:.3e} over {stats[0]['num_sequences']} sequences at {where} "
          f"(tol {args.tol:g}): {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def cmd_inspect(args, argv) -> int:
    from aipo_mp.convert.inspection import format_inspect, inspect_dir

    info = inspect_dir(args.dir, args.allow_pickle)
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0


COMMANDS = {"hf-to-mcore": cmd_hf_to_mcore, "mcore-to-hf": cmd_mcore_to_hf, "verify": cmd_verify,
            "inspect": cmd_inspect}


class cleanup_on_failure:
    """Remove the `.NAME.partial` sibling of `out` if the conversion fails or is interrupted
    (workers remove it themselves when they can; this covers killed workers)."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            from aipo_mp.training.checkpoint import remove_partial

            remove_partial(self.out)
        return False


# ---------------------------------------------------------------------------------------------
# Entry point and error reporting
# ---------------------------------------------------------------------------------------------


def error_line(exc: BaseException) -> Optional[str]:
    """The one line for a user-facing failure, or None for an internal error."""
    from aipo_mp.convert import common as ct
    from aipo_mp.errors import UserError

    if isinstance(exc, UserError):
        return "; ".join(e.strip() for e in exc.errors if e.strip())
    if ct.is_enospc(exc):
        where = getattr(exc, "filename", None)
        return (f"no space left on device{' while writing ' + str(where) if where else ''}; "
                "partial output removed: free disk space or choose another --out")
    if isinstance(exc, FileExistsError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR):
        return f"{exc.strerror}: {exc.filename}; check the path and its permissions"
    return None


def report(line: str) -> None:
    """Print the error line; a spawned worker also leaves it for the parent."""
    print(f"error: {line}", file=sys.stderr, flush=True)
    run_dir = os.environ.get(RUN_DIR_ENV)
    if run_dir:
        rank = os.environ.get("RANK", "0")
        with open(Path(run_dir) / f"error.rank{rank}", "w") as f:
            f.write(line + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)

    def on_sigterm(signum, frame):
        raise Interrupted()

    old = signal.signal(signal.SIGTERM, on_sigterm)
    quiet = not os.environ.get("CHECKPOINT_TOOLS_DEBUG")
    megatron_log = logging.getLogger("megatron")
    old_level = megatron_log.level
    with warnings.catch_warnings():
        if quiet:  # library warnings and logs would bury the one-line error and the summary
            warnings.simplefilter("ignore")
            megatron_log.setLevel(logging.CRITICAL)
        try:
            return _main(args, argv)
        finally:
            signal.signal(signal.SIGTERM, old)
            megatron_log.setLevel(old_level)


def output_lock(args):
    """One conversion at a time per --out (aipo_mp.runtime.locks); a second one fails with one line.
    Under torchrun/srun every rank runs this: only global rank 0 holds the lock."""
    from aipo_mp.runtime.locks import hold_lock

    out = getattr(args, "out", None)
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) if inside_distributed_launch() else "0"
    if not out or rank != "0":
        return contextlib.nullcontext()
    return hold_lock(out, f"aipo-mp convert {args.cmd}")


def _main(args, argv: list[str]) -> int:
    try:
        if os.environ.get(RUN_DIR_ENV):  # a worker started by spawn_ranks
            watch_parent(getattr(args, "out", None))
            stats = run_rank_program(args)
            if stats:
                (Path(os.environ[RUN_DIR_ENV]) / "result.json").write_text(json.dumps(stats))
            return 0
        sweep_stale_run_dirs()  # what a killed earlier conversion could not remove
        with output_lock(args):
            return COMMANDS[args.cmd](args, argv)
    except BrokenPipeError:  # stdout closed early (e.g. piped into `head`)
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_INTERNAL
    except (KeyboardInterrupt, Interrupted):
        remove_run_dir_if_orphaned()
        print("error: interrupted; partial output removed", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except WorkerCrash as e:
        if e.log_tail:
            print(e.log_tail, file=sys.stderr)
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_INTERNAL
    except BaseException as e:  # noqa: BLE001 - user mistakes get one line; the rest a traceback
        if isinstance(e, SystemExit):
            raise
        line = error_line(e)
        if line is None:
            traceback.print_exc()
            return EXIT_INTERNAL
        report(line)
        return EXIT_USER


def exit_worker(code: int) -> None:
    """End a spawned rank without interpreter teardown. Its work is written and its process group
    destroyed; what is left are C++ threads (checkpoint readers, gloo) whose destructors can
    abort the process ("terminate called without an active exception", exit -6) while Python
    unwinds, turning a finished conversion into a failed one."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    code = main()
    if os.environ.get(RUN_DIR_ENV):
        exit_worker(code)
    sys.exit(code)
