"""Run several `aipo-mp` commands in one process (one import of torch/megatron for all of them).
argv: steps.json results.json.

steps.json: a list of steps, each {"name": str, "cli": [args...]} (aipo_mp.cli.main in-process;
or "tool": [args...] for checkpoint_tools;
exit code, stdout and stderr recorded) or {"exec": "python code"} (test set-up between commands,
e.g. damaging a checkpoint). results.json: {name: {"code", "out", "err"}} for the cli steps."""

from __future__ import annotations

import contextlib
import io
import json
import sys


def run_cli(args: list[str], tool: bool = False) -> dict:
    """`aipo-mp ARGS`, or with tool=True `python -m checkpoint_tools ARGS`."""
    if tool:
        from aipo_mp.convert.cli import main
    else:
        from aipo_mp.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args) or 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # a traceback is a failure of the one-line promise: record it
            import traceback

            traceback.print_exc(file=err)
            code = f"exception {type(e).__name__}"
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}


def main() -> None:
    steps = json.load(open(sys.argv[1]))
    results = {}
    for step in steps:
        if "cli" in step:
            results[step["name"]] = run_cli(step["cli"])
        elif "tool" in step:
            results[step["name"]] = run_cli(step["tool"], tool=True)
        else:
            exec(step["exec"], {})
    json.dump(results, open(sys.argv[2], "w"), indent=1)


if __name__ == "__main__":
    main()
