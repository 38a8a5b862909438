"""The same DPO job through TRL's `DPOTrainer` and through `aipo-mp train`, side by side.

Builds, in a temporary directory, a random-weight `LlamaForCausalLM` saved by transformers (fp32
on disk), the project's offline sentencepiece tokenizer of the model's vocabulary, and seeded
string pairs of exact token lengths; checks that both tools see identical token ids (TRL's
tokenization of prompt + completion against aipo_mp's, from TRL's own preprocessing); then runs,
one after the other on the same pairs and the same starting weights:

  trl-ref          TRL DPOTrainer at its defaults: the reference model's forward inside each step
  trl-precomputed  TRL with precompute_ref_log_probs=True (reference pass up front)
  aipo-dp2         aipo-mp train --nproc-per-node 2 (data parallel 2, reference pass up front)
  aipo-1x2         aipo-mp train --nproc-per-node 1 train.threads=2

each in fp32 on both sides and in bf16 on both sides (TRL's default bf16 autocast over fp32
weights; aipo_mp bf16 weights with fp32 main weights). DPO sigmoid, beta 0.1, 16 pairs per step,
lr 1e-6 constant, no warmup, AdamW (0.9, 0.999), clip 1.0, max length 256; aipo_mp keeps its
default train.seq_length. Everything else is each tool's default (TRL's gradient checkpointing
included; --trl-gradient-checkpointing changes it).

    .venv/bin/pip install -e .[bench]                      # TRL, never part of `make setup`
    python benchmarks/vs_trl.py                             # everything, default sizes (about an hour on 2 cores)
    python benchmarks/vs_trl.py --pairs 32 --steps 3 --only trl-ref/fp32,aipo-dp2/fp32
    python benchmarks/vs_trl.py --trl-python /tmp/trl_venv/bin/python --json out.json

What the numbers are:
  s/step          median step time over steps 2..N (step 1 left out: warm-up).
  real tokens/s   real (non-padding) tokens of steps 2..N / their summed step time; a pair's real
                  tokens are both sequences, the prompt counted twice. aipo_mp: from metrics.jsonl;
                  TRL: the batches' attention masks and a callback's clock at each step end.
  tok util        real tokens / computed tokens (TRL: padded batch size; aipo_mp: its
                  token_utilization metric).
  peak RSS        the kernel's resident-set high-water mark (VmHWM) of each process, polled over the
                  whole run (loading, reference pass, steps, save): TRL is one process (its own
                  getrusage too); aipo_mp per rank (the launcher's children), the largest shown.
  ref pass        aipo_mp: all pairs' real tokens / the time from the run's data report
                  (data_stats.json written) to reference_logps.pt written; TRL precomputed: its
                  _precompute_ref_logps, timed inside the process.
  vs TRL          real tokens/s over TRL-with-its-reference-model's at the same precision.
With both trl-precomputed and an aipo_mp run in fp32 the two tools' reference log-probs of every
pair are compared too (same weights and tokens, so they must agree to float rounding).

Top-level imports are the standard library only: the TRL side runs this file as a worker
(`_trl_worker SPEC`) under --trl-python, which need not have aipo_mp installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
INSTALL_HINT = ".venv/bin/pip install -e .[bench]"
CONFIGS = ("trl-ref", "aipo-dp2", "aipo-1x2", "trl-precomputed")  # run order within a precision
PRECISIONS = ("fp32", "bf16")
LABELS = {"trl-ref": "TRL DPOTrainer, reference model in the step", "trl-precomputed": "TRL, precompute_ref_log_probs",
          "aipo-dp2": "aipo-mp train --nproc-per-node 2", "aipo-1x2": "aipo-mp train, 1 rank x 2 threads"}
TARGET_SPEEDUP, TARGET_REF_RATIO = 2.0, 2.5


# ---------------------------------------------------------------------------------------------
# Model, tokenizer, pairs
# ---------------------------------------------------------------------------------------------


def build_tokenizer(work: Path, vocab: int, seed: int) -> Path:
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(work / "tokenizer", vocab_size=vocab, seed=seed)


def build_model(args, tokenizer_dir: Path, work: Path) -> tuple[Path, int]:
    """A random LlamaForCausalLM saved by transformers (fp32 safetensors) with the tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).float().eval()
    out = work / "model"
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out, sum(p.numel() for p in model.parameters())


def word_costs(tokenizer) -> dict[int, list[str]]:
    """Words grouped by how many tokens each takes after a space (sentencepiece does not merge
    across spaces, so a text's token count is the sum of its words')."""
    from aipo_mp.testing.synthetic import WORDS
    from aipo_mp.testing.tiny import COMMON_WORDS

    words = sorted(set(WORDS) | set(COMMON_WORDS))
    by_cost: dict[int, list[str]] = {}
    for w, ids in zip(words, tokenizer(words, add_special_tokens=False)["input_ids"]):
        by_cost.setdefault(len(ids), []).append(w)
    if 1 not in by_cost:
        raise SystemExit("error: the tokenizer has no single-token words; exact lengths need some")
    return by_cost


def text_of(tokens: int, by_cost: dict[int, list[str]], rng: random.Random) -> str:
    """Random words adding up to exactly `tokens` tokens (>= 1)."""
    out, left = [], tokens
    while left > 0:
        costs = [c for c in by_cost if c <= left]
        c = rng.choice(costs)
        out.append(rng.choice(by_cost[c]))
        left -= c
    return " ".join(out)


def make_records(args, tokenizer) -> list[dict]:
    """Pairs whose prompt (BOS included) and responses (EOS included) have uniform random token
    counts in the given ranges; prompt + either response fits --max-length."""
    rng = random.Random(args.seed)
    by_cost = word_costs(tokenizer)
    records = []
    for _ in range(args.pairs):
        p = rng.randint(*args.prompt_tokens)
        c, r = (min(rng.randint(*args.response_tokens), args.max_length - p) for _ in range(2))
        chosen, rejected = text_of(c - 1, by_cost, rng), text_of(r - 1, by_cost, rng)
        while rejected == chosen:
            rejected = text_of(r - 1, by_cost, rng)
        records.append({"prompt": text_of(p - 1, by_cost, rng), "chosen": chosen, "rejected": rejected})
    return records


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def aipo_token_ids(records: list[dict], model_dir: Path, max_length: int) -> list[dict]:
    """The pairs as `aipo-mp train` tokenizes them (the trainer's own function)."""
    from transformers import AutoTokenizer

    from aipo_mp.data.pairs import DataStats, tokenize_pairs

    stats = DataStats()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    pairs = tokenize_pairs(records, tok, max_length, max_length - 1, stats)  # as aipo_config sets them
    if stats.truncated or stats.dropped() or len(pairs) != len(records):
        raise SystemExit(f"error: aipo_mp's tokenization changed the benchmark data ({stats.to_dict()}); "
                         "lower --prompt-tokens/--response-tokens or raise --max-length")
    return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]


def ids_digest(pairs: list[dict]) -> str:
    return hashlib.sha256(json.dumps([[p["prompt"], p["chosen"], p["rejected"]] for p in pairs]).encode()).hexdigest()


def check_same_ids(aipo: list[dict], trl: list[dict], max_length: int) -> None:
    """Fails loudly unless TRL's (prompt, chosen, rejected) ids equal aipo_mp's for every pair and
    TRL's collator truncates nothing."""
    if len(aipo) != len(trl):
        raise SystemExit(f"error: token ids differ: aipo_mp kept {len(aipo)} pairs, TRL {len(trl)}")
    for i, (a, t) in enumerate(zip(aipo, trl)):
        for k in ("prompt", "chosen", "rejected"):
            if a[k] != t[k]:
                raise SystemExit(f"error: token ids differ at pair {i}, {k}: aipo_mp {a[k][:12]}... ({len(a[k])}) vs "
                                 f"TRL {t[k][:12]}... ({len(t[k])}); the two tools would not train on the same data")
        if len(t["prompt"]) + max(len(t["chosen"]), len(t["rejected"])) > max_length:
            raise SystemExit(f"error: pair {i} is longer than --max-length {max_length}; TRL would truncate it")


def pair_tokens(pairs: list[dict]) -> int:
    return sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs)


# ---------------------------------------------------------------------------------------------
# Running a tool: its own process group, VmHWM of every process in it, nothing left behind
# ---------------------------------------------------------------------------------------------


def vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class PeakMemory(threading.Thread):
    """Polls VmHWM (the kernel's own resident high-water mark, so short spikes between polls are
    not lost) of the started process and its descendants; `ranks` = its direct children."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.done = pid, threading.Event()
        self.peak: dict[int, int] = {}
        self.role: dict[int, str] = {}

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.done.is_set():
            try:
                kids = root.children()
                everyone = [(self.pid, "root")] + [(p.pid, "child") for p in kids] + \
                    [(p.pid, "descendant") for p in root.children(recursive=True) if p not in kids]
            except psutil.Error:
                break
            for pid, role in everyone:
                self.peak[pid] = max(self.peak.get(pid, 0), vm_hwm(pid))
                self.role.setdefault(pid, role)
            self.done.wait(0.2)

    def of(self, role: str) -> list[int]:
        return [v for pid, v in sorted(self.peak.items()) if self.role.get(pid) == role]


def run_process(cmd: list[str], env: dict, log: Path, timeout_s: float, cwd: Path) -> tuple[int, PeakMemory, float]:
    """Runs `cmd` in a new session; on return (or any exception, Ctrl-C included) nothing of its
    process group is left."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        mem = PeakMemory(proc.pid)
        mem.start()
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = 124
        finally:
            stop_group(proc)
            mem.done.set()
            mem.join()
    return code, mem, time.perf_counter() - t0


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group we created (the tool, its ranks and writers)."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            proc.poll()
            time.sleep(0.1)
    proc.poll()


def child_env(work: Path) -> dict:
    """A user's environment: no thread pinning (each tool picks its own), offline, caches in `work`."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RANK",
                                                              "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(work / "hf_home"), HF_DATASETS_CACHE=str(work / "hf_datasets"),
               TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true", PYTHONUNBUFFERED="1")
    return env


def tail(log: Path, n: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


# ---------------------------------------------------------------------------------------------
# TRL (worker side: this file under --trl-python; imports only torch/transformers/datasets/trl)
# ---------------------------------------------------------------------------------------------


def trl_worker(spec_path: str) -> int:
    import resource

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    spec = json.loads(Path(spec_path).read_text())
    records = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    # TRL tokenizes prompt + completion as one string: a leading space gives each completion the
    # tokens it has alone (sentencepiece's word boundary), i.e. aipo_mp's separate tokenization.
    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]}
                                 for r in records])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    steps_log: list[dict] = []
    ref = {"seconds": 0.0, "tokens": 0}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            steps_log[-1]["time"] = now - self.last
            self.last = now

    class Measured(DPOTrainer):
        def training_step(self, model, inputs, *a, **kw):
            if not steps_log or "time" in steps_log[-1]:
                steps_log.append({"real_tokens": 0, "computed_tokens": 0})
            mask = inputs["attention_mask"]
            steps_log[-1]["real_tokens"] += int(mask.sum())
            steps_log[-1]["computed_tokens"] += mask.numel()
            return super().training_step(model, inputs, *a, **kw)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            ref["seconds"] += time.perf_counter() - t0
            ref["tokens"] += sum(2 * len(p) + len(c) + len(r) for p, c, r in
                                 zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]))
            return out

    kwargs = dict(output_dir=spec["out"], per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
                  learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, beta=spec["beta"],
                  loss_type=["sigmoid"], max_length=spec["max_length"], max_steps=max(spec["steps"], 1),
                  save_strategy="no", report_to="none", seed=spec["seed"], data_seed=spec["seed"],
                  precompute_ref_log_probs=spec["precompute"], weight_decay=0.0, max_grad_norm=1.0,
                  adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, disable_tqdm=True)
    if spec["precision"] == "fp32":
        kwargs["bf16"] = False  # TRL's DPOConfig turns bf16 on by default, on CPU too
    if not torch.cuda.is_available():
        kwargs["use_cpu"] = True  # transformers refuses bf16 on a machine without a GPU otherwise
    if spec["gradient_checkpointing"] is not None:
        kwargs["gradient_checkpointing"] = spec["gradient_checkpointing"]
    config = DPOConfig(**kwargs)
    trainer = Measured(model=spec["model"], args=config, train_dataset=dataset, processing_class=tok,
                       callbacks=[Clock()])
    ds = trainer.train_dataset
    ids = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"],
                                                                         ds["rejected_ids"])]
    result = {"trl": trl.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "bf16": bool(config.bf16), "gradient_checkpointing": bool(config.gradient_checkpointing),
              "ids_sha": ids_digest(ids), "ref": ref}
    if spec["steps"] == 0:  # tokenization only
        result["ids"] = ids
    else:
        if spec["precompute"]:
            result["ref_logps"] = [[c, r] for c, r in zip(ds["ref_chosen_logps"], ds["ref_rejected_logps"])]
        trainer.train()
        result["steps"] = [s for s in steps_log if "time" in s]
        result["loss"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def trl_spec(args, work: Path, name: str, precision: str, data: Path, model: Path, steps: int) -> dict:
    run = work / f"{name}_{precision}"
    run.mkdir(parents=True, exist_ok=True)
    gc = {"default": None, "on": True, "off": False}[args.trl_gradient_checkpointing]
    return {"data": str(data), "model": str(model), "out": str(run / "out"), "result": str(run / "result.json"),
            "batch": args.batch_pairs, "lr": 1e-6, "beta": 0.1, "max_length": args.max_length, "steps": steps,
            "seed": args.seed, "precompute": name == "trl-precomputed", "precision": precision,
            "gradient_checkpointing": gc}


def run_trl_worker(args, work: Path, spec: dict) -> tuple[dict, PeakMemory, float]:
    spec_path = Path(spec["result"]).with_name("spec.json")
    spec_path.write_text(json.dumps(spec))
    log = spec_path.with_name("trl.log")
    cmd = [args.trl_python, str(Path(__file__).resolve()), "_trl_worker", str(spec_path)]
    code, mem, wall = run_process(cmd, child_env(work), log, args.timeout_min * 60, work)
    if code:
        raise RunFailed(f"TRL exited with {code}; last lines of {log}:\n{tail(log)}")
    return json.loads(Path(spec["result"]).read_text()), mem, wall


def trl_available(python: str) -> str | None:
    """TRL's version under `python`, or None."""
    try:
        out = subprocess.run([python, "-c", "import trl, accelerate; print(trl.__version__)"], capture_output=True,
                             text=True, timeout=300)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def trl_result(args, work, name, precision, data, model) -> dict:
    res, mem, wall = run_trl_worker(args, work, trl_spec(args, work, name, precision, data, model, args.steps))
    steps = res["steps"]
    timed = steps[1:] or steps
    out = {"s_per_step": statistics.median(s["time"] for s in timed),
           "step_times": [s["time"] for s in steps],
           "real_tokens_per_s": sum(s["real_tokens"] for s in timed) / sum(s["time"] for s in timed),
           "token_utilization": sum(s["real_tokens"] for s in timed) / sum(s["computed_tokens"] for s in timed),
           "peak_rss_per_process": max(res["ru_maxrss"], max(mem.of("root"), default=0)),
           "peak_rss_processes": 1, "wall_s": wall, "bf16": res["bf16"], "threads": res["threads"],
           "gradient_checkpointing": res["gradient_checkpointing"], "ids_sha": res["ids_sha"],
           "loss": res["loss"][:1], "trl": res["trl"]}
    if res["ref"]["seconds"]:
        out["ref_pass_s"] = res["ref"]["seconds"]
        out["ref_tokens_per_s"] = res["ref"]["tokens"] / res["ref"]["seconds"]
    if "ref_logps" in res:
        out["ref_logps"] = res["ref_logps"]
    return out


# ---------------------------------------------------------------------------------------------
# aipo-mp train, as a user runs it
# ---------------------------------------------------------------------------------------------


def aipo_config(args, model: Path, data: Path, out: Path, precision: str) -> dict:
    """The job in aipo_mp's config keys; train.seq_length stays at its default."""
    return {
        "model": {"path": str(model)},
        # TRL has no prompt limit: aipo_mp's may take all but one token of a sequence.
        "data": {"train": str(data), "max_length": args.max_length, "max_prompt_length": args.max_length - 1,
                 "shuffle": True},
        "precision": {"dtype": precision},
        "objective": {"name": "dpo", "beta": 0.1},
        "reference": {"mode": "initial"},
        "train": {"steps": args.steps, "global_batch_pairs": args.batch_pairs, "lr": 1e-6, "schedule": "constant",
                  "warmup_steps": 0, "weight_decay": 0.0, "clip_grad": 1.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
                  "adam_eps": 1e-8, "seed": args.seed, "save_every": 0},
        "output": {"dir": str(out), "tensorboard": False},
    }


def aipo_result(args, work: Path, name: str, precision: str, data: Path, model: Path, all_tokens: int) -> dict:
    run = work / f"{name}_{precision}"
    run.mkdir(parents=True, exist_ok=True)
    out = run / "out"
    cfg_path = run / "train.yaml"
    cfg_path.write_text(json.dumps(aipo_config(args, model, data, out, precision), indent=1))  # JSON is YAML
    extra = ["--nproc-per-node", "2"] if name == "aipo-dp2" else ["--nproc-per-node", "1", "train.threads=2"]
    cmd = [sys.executable, "-m", "aipo_mp.cli", "train", str(cfg_path), *extra]
    log = run / "train.log"
    env = child_env(work)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    print("  running: aipo-mp " + " ".join(cmd[3:]), flush=True)
    code, mem, wall = run_process(cmd, env, log, args.timeout_min * 60, ROOT)
    if code:
        raise RunFailed(f"aipo-mp train exited with {code}; last lines of {log}:\n{tail(log)}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = records[1:] or records
    times = [r["step_time_s"] for r in timed]
    ranks = mem.of("child")
    result = {"s_per_step": statistics.median(times), "step_times": [r["step_time_s"] for r in records],
              "real_tokens_per_s": sum(r["tokens_per_s"] * r["step_time_s"] for r in timed) / sum(times),
              "token_utilization": statistics.mean(r["token_utilization"] for r in timed),
              "peak_rss_per_process": max(ranks, default=0), "peak_rss_ranks": ranks,
              "peak_rss_processes": len(ranks), "peak_rss_launcher": max(mem.of("root"), default=0),
              "wall_s": wall, "loss": [records[0]["loss"]]}
    ref_s = reference_seconds(out)
    if ref_s:
        result["ref_pass_s"] = ref_s
        result["ref_tokens_per_s"] = all_tokens / ref_s
    result["memory_lines"] = planned_memory(args, model, data, out, name, precision)
    table = out / "reference_logps.pt"
    if table.exists():
        import torch

        saved = torch.load(table, map_location="cpu", weights_only=True)
        result["ref_logps"] = (saved["table"] if isinstance(saved, dict) else saved).tolist()
    return result


def planned_memory(args, model: Path, data: Path, out: Path, name: str, precision: str) -> list[str]:
    """The planner's bytes per rank for the rows this run really trains on: the trainer's own split
    and packing of every step (rows sized to content), the longest row's tokens as the activation
    length and the most rows a rank runs as the micro-batches; printed next to the measured peak."""
    import types

    from aipo_mp import planner
    from aipo_mp.config import config_from_dict
    from aipo_mp.data.pairs import TokenizedPair, read_pairs
    from aipo_mp.models import arch_from_dir
    from aipo_mp.training.batches import pack_share, step_shares

    cfg = config_from_dict(aipo_config(args, model, data, out, precision))
    records, _ = read_pairs(data)
    ids = aipo_token_ids(records, model, args.max_length)
    pairs = [TokenizedPair(i, p["prompt"], p["chosen"], p["rejected"]) for i, p in enumerate(ids)]
    arch = arch_from_dir(model)
    dp = 2 if name == "aipo-dp2" else 1
    state = types.SimpleNamespace(cfg=cfg, layout=types.SimpleNamespace(dp_size=dp), pairs=pairs, arch=arch)
    rows = [pack_share(share, cfg) for step in range(args.steps) for share in step_shares(state, step)]
    longest = max(r.tokens.numel() for rank_rows in rows for r in rank_rows)
    most = max(len(rank_rows) for rank_rows in rows)
    est = planner.memory_per_gpu(arch, planner.Layout(dp=dp), dtype=precision, seq_length=longest,
                                 num_microbatches=most, backend="local", reference_mode="initial",
                                 distributed_optimizer=cfg.train.use_distributed_optimizer,
                                 recompute=cfg.train.recompute, overlap_grad_reduce=False)
    b = est.binding
    parts = ", ".join(f"{k} {getattr(b, k) / GB:.2f}" for k in ("weights", "grads", "optimizer", "activations",
                                                                  "logits", "overhead"))
    return [f"planned per rank from real tokens (longest row {longest} tokens, {most} rows per rank per step): "
            f"{parts}; total {b.total / GB:.2f} GB"]


def reference_seconds(out: Path) -> float | None:
    """The reference pass seen from outside: rank 0 writes data_stats.json at the end of set-up,
    just before the pass, and reference_logps.pt right after it."""
    try:
        start, end = (out / "data_stats.json").stat().st_mtime, (out / "reference_logps.pt").stat().st_mtime
    except OSError:
        return None
    return end - start if end > start else None


class RunFailed(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def fmt_gb(b: float) -> str:
    return f"{b / GB:.2f} GB"


def print_table(precision: str, results: dict) -> None:
    base = results.get(("trl-ref", precision))
    print(f"\n== {precision} ==")
    print(f"{'configuration':44s} {'s/step':>7s} {'real tok/s':>10s} {'vs TRL':>7s} {'tok util':>8s} "
          f"{'peak RSS/process':>17s}  reference pass")
    for name in CONFIGS:
        r = results.get((name, precision))
        if r is None:
            continue
        if "error" in r:
            print(f"{LABELS[name]:44s} failed: {r['error'].splitlines()[0]}")
            continue
        ratio = f"{r['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}x" if base and "error" not in base else "-"
        mem = fmt_gb(r["peak_rss_per_process"])
        if r.get("peak_rss_ranks") and len(r["peak_rss_ranks"]) > 1:
            mem += " (" + "/".join(f"{x / GB:.2f}" for x in r["peak_rss_ranks"]) + ")"
        ref = "-"
        if r.get("ref_pass_s"):
            ref = (f"{r['ref_pass_s']:.1f} s, {r['ref_tokens_per_s']:,.0f} tok/s "
                   f"({r['ref_tokens_per_s'] / r['real_tokens_per_s']:.2f}x the step)")
        if r.get("reused_from"):
            ref += f"  [reused: {r['reused_from']}]"
        print(f"{LABELS[name]:44s} {r['s_per_step']:7.2f} {r['real_tokens_per_s']:10,.0f} {ratio:>7s} "
              f"{r['token_utilization']:8.3f} {mem:>17s}  {ref}")
        for line in r.get("memory_lines", []):
            print(f"    {line}")


def verdicts(results: dict) -> list[dict]:
    """One line per target of the issue, per precision and aipo_mp layout."""
    out = []
    for precision in PRECISIONS:
        base = results.get(("trl-ref", precision))
        for name in ("aipo-dp2", "aipo-1x2"):
            r = results.get((name, precision))
            if r is None or "error" in r:
                continue
            tag = f"{precision} {name}"
            if base and "error" not in base:
                x = r["real_tokens_per_s"] / base["real_tokens_per_s"]
                out.append({"target": "speed", "config": tag, "value": x, "met": x >= TARGET_SPEEDUP,
                            "text": f"real tokens/s {r['real_tokens_per_s']:,.0f} vs TRL {base['real_tokens_per_s']:,.0f}"
                                    f" = {x:.2f}x (target >= {TARGET_SPEEDUP:g}x)"})
                m = r["peak_rss_per_process"] / base["peak_rss_per_process"]
                out.append({"target": "memory", "config": tag, "value": m, "met": m <= 1.0,
                            "text": f"peak RSS per process {fmt_gb(r['peak_rss_per_process'])} vs TRL "
                                    f"{fmt_gb(base['peak_rss_per_process'])} = {m:.2f}x (target <= 1x)"})
            if r.get("ref_tokens_per_s"):
                q = r["ref_tokens_per_s"] / r["real_tokens_per_s"]
                out.append({"target": "reference pass", "config": tag, "value": q, "met": q >= TARGET_REF_RATIO,
                            "text": f"reference pass {r['ref_tokens_per_s']:,.0f} tok/s vs the step's "
                                    f"{r['real_tokens_per_s']:,.0f} = {q:.2f}x (target >= {TARGET_REF_RATIO:g}x)"})
    return out


def ref_agreement(results: dict) -> float | None:
    """Largest |TRL - aipo_mp| reference log-prob (fp32): both tools computed the same thing."""
    trl = results.get(("trl-precomputed", "fp32"), {}).get("ref_logps")
    aipo = next((results[(n, "fp32")].get("ref_logps") for n in ("aipo-dp2", "aipo-1x2")
                 if results.get((n, "fp32"), {}).get("ref_logps")), None)
    if not trl or not aipo or len(trl) != len(aipo):
        return None
    return max(abs(a - b) for x, y in zip(trl, aipo) for a, b in zip(x, y))


def readme_line(results: dict) -> str:
    parts = []
    for precision in PRECISIONS:
        base = results.get(("trl-ref", precision))
        if not base or "error" in base:
            continue
        xs = [f"{results[(n, precision)]['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}x "
              f"({'DP=2' if n == 'aipo-dp2' else '1 rank x 2 threads'})" for n in ("aipo-dp2", "aipo-1x2")
              if (n, precision) in results and "error" not in results[(n, precision)]]
        if xs:
            parts.append(f"{precision} {', '.join(xs)}")
    return ("Against TRL 1.16's `DPOTrainer` (with its reference model) on the same DPO job on a 2-core CPU, "
            "`aipo-mp train` turns " + "; ".join(parts) + " as many real tokens per second "
            "([docs/benchmarks.md](docs/benchmarks.md#against-trl)).") if parts else ""


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def selected(only: str | None) -> list[tuple[str, str]]:
    """(config, precision) in run order: fp32 first, then bf16. `only`: comma list of `name`
    (both precisions) or `name/precision`."""
    everything = [(n, p) for p in PRECISIONS for n in CONFIGS]
    if not only:
        return everything
    wanted = set()
    for token in (t.strip() for t in only.split(",") if t.strip()):
        name, _, precision = token.partition("/")
        if name not in CONFIGS or (precision and precision not in PRECISIONS):
            raise SystemExit(f"error: --only {token!r}: use names from {', '.join(CONFIGS)}, optionally "
                             f"/{'|/'.join(PRECISIONS)} (e.g. --only trl-ref/fp32,aipo-dp2)")
        wanted |= {(name, p) for p in ([precision] if precision else PRECISIONS)}
    return [c for c in everything if c in wanted]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per configuration (>= 2; step 1 is left out)")
    ap.add_argument("--pairs", type=int, default=256, help="pairs in the data set (the reference passes cover all)")
    ap.add_argument("--batch-pairs", type=int, default=16, help="pairs per optimizer step")
    ap.add_argument("--max-length", type=int, default=256, help="per sequence, both tools")
    ap.add_argument("--prompt-tokens", type=int, nargs=2, default=[32, 96], metavar=("MIN", "MAX"),
                    help="prompt length range, BOS included")
    ap.add_argument("--response-tokens", type=int, nargs=2, default=[16, 160], metavar=("MIN", "MAX"),
                    help="response length range, EOS included")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help=f"comma list of {', '.join(CONFIGS)}, each optionally /fp32 or /bf16")
    ap.add_argument("--trl-python", default=sys.executable, help="the Python that has TRL (default: this one)")
    ap.add_argument("--trl-gradient-checkpointing", choices=["default", "on", "off"], default="default",
                    help="TRL's DPOConfig turns gradient checkpointing on by default; keep it (default) or set it")
    ap.add_argument("--timeout-min", type=float, default=60.0, help="per configuration")
    ap.add_argument("--json", default=None, help="also write every number to this file")
    ap.add_argument("--reuse", default=None,
                    help="a --json file of an earlier run of the same model and data: its configurations that are "
                         "not run now join the table and the ratios (to split a long benchmark; say so when quoting)")
    ap.add_argument("--keep", default=None, help="build and run in this directory and keep it (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (step 1 is warm-up)")
    if args.pairs < args.batch_pairs:
        ap.error("--pairs must be >= --batch-pairs")
    if args.prompt_tokens[0] < 2 or args.response_tokens[0] < 2 or args.prompt_tokens[0] > args.prompt_tokens[1] \
            or args.response_tokens[0] > args.response_tokens[1]:
        ap.error("token ranges need 2 <= MIN <= MAX")
    if args.prompt_tokens[1] + 2 > args.max_length:
        ap.error("--max-length must exceed the longest prompt by at least 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the running tool's process group is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    configs = selected(args.only)
    if any(n.startswith("trl") for n, _ in configs):
        version = trl_available(args.trl_python)
        if version is None:
            print(f"error: TRL is not importable by {args.trl_python}; install it with `{INSTALL_HINT}` "
                  "(or pass --trl-python PATH)", file=sys.stderr)
            return 2
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        return run_all(args, configs, Path(args.keep).resolve())
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        return run_all(args, configs, Path(tmp))


def run_all(args, configs: list[tuple[str, str]], work: Path) -> int:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    tok_dir = build_tokenizer(work, args.vocab, args.seed)
    model, params = build_model(args, tok_dir, work)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    records = make_records(args, tokenizer)
    data = write_jsonl(records, work / "pairs.jsonl")
    aipo_ids = aipo_token_ids(records, model, args.max_length)
    all_tokens = pair_tokens(aipo_ids)
    lens = [len(p["prompt"]) + len(p[k]) for p in aipo_ids for k in ("chosen", "rejected")]
    print(f"model: LlamaForCausalLM {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, {args.heads} heads, "
          f"vocab {args.vocab}: {params / 1e6:.1f} M parameters, fp32 on disk")
    print(f"data: {len(records)} pairs, {all_tokens / len(records):.0f} real tokens per pair (sequences "
          f"{min(lens)}-{max(lens)} tokens), {args.batch_pairs} pairs per step, {args.steps} steps; "
          f"built in {time.perf_counter() - t0:.0f} s")
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; commit "
          f"{git_commit()}", flush=True)

    ids_sha = ids_digest(aipo_ids)
    results = reused(args, ids_sha, configs)
    if any(n.startswith("trl") for n, _ in configs):
        spec = trl_spec(args, work, "tokenize", "fp32", data, model, steps=0)
        res, _, _ = run_trl_worker(args, work, spec)
        check_same_ids(aipo_ids, res["ids"], args.max_length)
        print(f"token ids: identical in TRL {res['trl']} and aipo_mp for all {len(aipo_ids)} pairs "
              f"({sum(len(p[k]) for p in aipo_ids for k in ('prompt', 'chosen', 'rejected'))} ids)", flush=True)
    for name, precision in configs:
        print(f"{name}/{precision}: {LABELS[name]}", flush=True)
        before = os.getloadavg()
        try:
            if name.startswith("trl"):
                r = trl_result(args, work, name, precision, data, model)
                if r["ids_sha"] != ids_sha:
                    raise SystemExit(f"error: TRL's {name} run tokenized differently from the checked ids")
            else:
                r = aipo_result(args, work, name, precision, data, model, all_tokens)
        except RunFailed as e:
            r = {"error": str(e)}
            print(f"  failed: {e}", flush=True)
        else:
            print(f"  {r['s_per_step']:.2f} s/step (steps: {' '.join(f'{t:.1f}' for t in r['step_times'])}), "
                  f"{r['real_tokens_per_s']:,.0f} real tokens/s, peak RSS {fmt_gb(r['peak_rss_per_process'])} per "
                  f"process, wall {r['wall_s']:.0f} s", flush=True)
        r["load_average"] = [before, os.getloadavg()]
        results[(name, precision)] = r
        if args.json:  # after every configuration, so a run stopped early keeps what it measured
            write_summary(args, params, records, all_tokens, load, results, ids_sha)

    trl_cfg = next((r for (n, _), r in results.items() if n.startswith("trl") and "error" not in r), None)
    if trl_cfg:
        print(f"\nTRL {trl_cfg['trl']}: {trl_cfg['threads']} torch threads, gradient checkpointing "
              f"{'on' if trl_cfg['gradient_checkpointing'] else 'off'} (TRL's default: on); bf16 = TRL's autocast "
              "over fp32 weights. aipo_mp bf16 = bf16 weights, fp32 main weights and Adam moments.")
    for precision in PRECISIONS:
        if any(p == precision for _, p in results):
            print_table(precision, results)
    agree = ref_agreement(results)
    if agree is not None:
        print(f"\nreference log-probs, fp32, TRL precomputed vs aipo_mp: max |difference| {agree:.2e} over "
              f"{len(records)} pairs")
    lines = verdicts(results)
    print("\nverdict (targets of issue 25):")
    for v in lines:
        print(f"  {'MET   ' if v['met'] else 'MISSED'} {v['target']:15s} {v['config']:14s} {v['text']}")
    if not lines:
        print("  nothing to judge: run trl-ref and an aipo-mp configuration at the same precision")
    readme = readme_line(results)
    if readme:
        print(f"\nREADME line: {readme}")
    if args.json:
        write_summary(args, params, records, all_tokens, load, results, ids_sha)
    return 1 if any("error" in r for r in results.values()) else 0


SAME_JOB = ("steps", "pairs", "batch_pairs", "max_length", "prompt_tokens", "response_tokens", "hidden", "ffn",
            "layers", "heads", "vocab", "seed", "trl_gradient_checkpointing")


def reused(args, ids_sha: str, configs: list) -> dict:
    """Results of --reuse for the configurations not run now; refuses another job's file."""
    if not args.reuse:
        return {}
    try:
        old = json.loads(Path(args.reuse).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --reuse {args.reuse}: cannot read it ({e}); give a --json file of this benchmark")
    differ = [k for k in SAME_JOB if old.get("args", {}).get(k) != getattr(args, k)]
    if differ or old.get("ids_sha") != ids_sha:
        raise SystemExit(f"error: --reuse {args.reuse} measured another job ({', '.join(differ) or 'token ids'} "
                         "differ); rerun those configurations or use the same flags")
    out = {}
    for key, r in old.get("results", {}).items():
        name, precision = key.split("/")
        if (name, precision) not in configs:
            out[(name, precision)] = dict(r, reused_from=f"{args.reuse} ({old.get('date_utc')}, {old.get('commit')})")
    print(f"reused from {args.reuse}: {', '.join(f'{n}/{p}' for n, p in out) or 'nothing'}")
    return out


def write_summary(args, params: int, records: list, all_tokens: int, load, results: dict, ids_sha: str) -> None:
    summary = {"args": vars(args), "params": params, "ids_sha": ids_sha, "pairs": len(records), "tokens_per_pair": all_tokens / len(records),
               "commit": git_commit(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
               "load_average_start": load, "load_average_end": os.getloadavg(),
               "results": {f"{n}/{p}": r for (n, p), r in results.items()},
               "verdicts": verdicts(results), "ref_logps_max_abs_diff": ref_agreement(results),
               "readme_line": readme_line(results)}
    tmp = Path(args.json).with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(args.json)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=30)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        return "unknown"
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_trl_worker":
        sys.exit(trl_worker(sys.argv[2]))
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
