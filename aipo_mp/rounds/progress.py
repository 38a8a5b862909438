"""One-line console progress of a long stage while the launcher waits for it: finished shards of
an engine stage (sample, reward, kl) or logged steps of a train stage, read from the files the
stage writes (the stage's own output stays in its log). On a terminal the line is rewritten in
place; otherwise a line is printed when the count changed, at most every `every_s` seconds."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

Probe = Callable[[], Optional[tuple[int, Optional[int], str]]]  # (done, total or None, unit)


def shard_probe(root: Path) -> Probe:
    """Finished shards of a placed stage: the markers in its newest ofN directory."""
    def probe():
        dirs = sorted(Path(root).glob("of*"), key=lambda d: d.stat().st_mtime)
        if not dirs:
            return None
        total = int(dirs[-1].name[2:]) if dirs[-1].name[2:].isdigit() else None
        return len(list(dirs[-1].glob("shard_*.json"))), total, "shards"
    return probe


def steps_probe(metrics: Path, total: Optional[int]) -> Probe:
    """Optimizer steps the trainer logged (metrics.jsonl; the last line is the newest step)."""
    def probe():
        try:
            lines = Path(metrics).read_text().splitlines()
            return (json.loads(lines[-1])["step"] if lines else 0), total, "steps"
        except (OSError, ValueError, KeyError, IndexError):
            return None
    return probe


@contextlib.contextmanager
def stage_progress(name: str, probe: Optional[Probe], every_s: float = 30.0, poll_s: float = 2.0):
    """Show `probe`'s count for stage `name` while the block runs."""
    if probe is None:
        yield
        return
    tty = sys.stdout.isatty()
    stop = threading.Event()
    shown = {"text": None, "wrote": False}

    def loop():
        waited = every_s  # the first change is shown at once
        while not stop.wait(poll_s if tty else min(poll_s, every_s)):
            waited += poll_s
            try:
                got = probe()
            except Exception:  # noqa: BLE001 - progress must never end a stage
                got = None
            if got is None:
                continue
            done, total, unit = got
            text = f"[aipo-mp run] {name}: {done}" + (f"/{total}" if total else "") + f" {unit}"
            if text == shown["text"] or (not tty and waited < every_s):
                continue
            print(("\r" + text) if tty else text, end="" if tty else "\n", flush=True)
            shown.update(text=text, wrote=True)
            waited = 0.0

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        if tty and shown["wrote"]:
            print("", flush=True)  # end the rewritten line before the stage's closing line
