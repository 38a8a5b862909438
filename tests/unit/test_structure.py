"""The shape of the package: a torch-free ground floor, no import cycles, family facts only in
aipo_mp/models/, and every stage the round runner starts is an `aipo-mp` subcommand."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "aipo_mp"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the aipo_mp modules it imports, at module level or inside functions alike (a lazy
    import still ties the two layers together)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from aipo_mp.x import y`: y may itself be a module
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t != "aipo_mp":
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return []


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 50 and graph["aipo_mp.cli"], "the graph must see the package"
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_ground_floor_imports_no_torch():
    code = ("import sys, aipo_mp.config, aipo_mp.errors, aipo_mp.validate, aipo_mp.models, aipo_mp.planner, "
            "aipo_mp.rounds.run, aipo_mp.cli; "
            "heavy = sorted(m for m in ('torch', 'megatron', 'transformers', 'vllm') if m in sys.modules); "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout.strip()}"


def test_no_family_name_tested_outside_models():
    families = {"llama", "mistral", "gemma2", "qwen2", "qwen3"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] in ("models", "testing", "demo"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                for c in node.comparators:
                    if isinstance(c, (ast.Tuple, ast.List, ast.Set)):
                        consts += [e.value for e in c.elts if isinstance(e, ast.Constant)]
                if families & {c for c in consts if isinstance(c, str)}:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, "family names tested outside aipo_mp/models/: " + ", ".join(offenders)


def test_every_stage_the_runner_starts_is_an_aipo_mp_subcommand():
    from aipo_mp.cli import build_parser, passthrough_commands
    from aipo_mp.config import STAGE_KINDS
    from aipo_mp.rounds.run import STAGE_COMMANDS, stage_argv

    subcommands = set(build_parser().subcommands.choices) | set(passthrough_commands())
    assert set(STAGE_COMMANDS) == set(STAGE_KINDS)
    for kind, command in STAGE_COMMANDS.items():
        assert command[0] in subcommands, f"stage {kind} runs {command[0]}, which is no aipo-mp subcommand"
    assert stage_argv("round2-export", ["--ckpt", "C"]) == ["aipo_mp.cli", "convert", "mcore-to-hf", "--ckpt", "C"]
    # The table is the only place the runner names a command: no module path elsewhere in run.py.
    source = (PACKAGE / "rounds" / "run.py").read_text()
    assert source.count('"aipo_mp.') == 1 and "checkpoint_tools" not in source


def test_convert_is_reached_by_aipo_mp_and_by_the_checkpoint_tools_shim(tiny_hf_dirs, capsys):
    """`aipo-mp convert inspect DIR` and `python -m checkpoint_tools inspect DIR` print the same."""
    from aipo_mp.cli import main

    directory = str(tiny_hf_dirs["llama"])
    with pytest.raises(SystemExit) as code:
        main(["convert", "inspect", directory, "--json"])
    via_cli = capsys.readouterr().out
    assert code.value.code == 0 and '"family": "llama"' in via_cli
    shim = subprocess.run([sys.executable, "-m", "checkpoint_tools", "inspect", directory, "--json"], cwd=ROOT,
                          capture_output=True, text=True)
    assert shim.returncode == 0, shim.stderr
    assert shim.stdout == via_cli
    bad = subprocess.run([sys.executable, "-m", "checkpoint_tools", "inspect", "/nonexistent-dir"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1
