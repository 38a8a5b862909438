"""Self-instruct prompts for a round (Wang et al. 2023, as in the AIPO authors' pipeline): the
`synthesize` stage of `aipo-mp run` and `aipo-mp synthesize`.

1. Cluster the seed prompts (and optionally earlier rounds' new prompts): TF-IDF vectors and
   k-means (scikit-learn, `num_clusters`, deterministic for `seed`).
2. Generation prompts: a numbered list of `examples_per_prompt` instructions drawn from one
   cluster, "Come up with a series of tasks:\\n\\n1. ...\\n8. ...\\n9.", completed by the current
   policy with vLLM (`temperature`, `top_p`; on the sampling layout: tensor parallel, replicas).
3. Parse each completion on its numbering ("10.", "11.", ...) and filter every instruction, each
   drop counted by reason (DROP_REASONS): the last item of a completion cut by the length limit
   (`truncated`), `empty`, fewer than `min_tokens` or more than `max_tokens` policy tokens
   (`too_short`, `too_long`), a keyword the model cannot serve such as image/graph/file/draw/plot
   (`unservable`), a leading "Write a program" (`write_a_program`), a leading punctuation mark
   (`leading_punctuation`) or non-ASCII character (`non_ascii`); a trailing "Answer:" / "Output:"
   part is cut off first (counted as `cut_answer_parts`, not dropped). At most `new_per_prompt`
   instructions are kept per completion (`over_per_prompt`), and one is dropped as an
   `exact_duplicate` or a `near_duplicate` when its ROUGE-L F to a seed or an already kept
   instruction is >= `max_similarity` (`NearDuplicateIndex`: exact ROUGE-L with a prefix filter,
   so it stays fast at 100k prompts).
4. Until `total` instructions are kept (or `max_batches` generation batches ran), another batch.
5. `OUT_DIR/prompts.jsonl`: a `seed_share` of the seed prompts (the same seeds every round: chosen
   by a hash of the id, so rounds share them and can be compared) followed by the new instructions
   (ids "r{round}-n{k}", in the form of the seed prompts: chat messages or strings);
   `OUT_DIR/synthesize/new_prompts.jsonl` (the new ones) and `synthesize_stats.json`.

Resumable: each batch's completions are written atomically to `OUT_DIR/synthesize/batch_NNN.jsonl`
before the next starts; a rerun reuses the finished batches. A batch's prompts and seeds depend
only on (seed, round, batch index) and on the batches before it, and parsing and filtering is one
deterministic pass over the batches in order, so a stage killed midway and rerun writes the same
prompts as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
import string
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Sequence

from aipo_mp.config import SynthesizeConfig, check_section
from aipo_mp.data.records import read_jsonl, read_prompts, write_jsonl
from aipo_mp.errors import ConfigError
from aipo_mp.runtime.files import atomic_write_json
from aipo_mp.validate import synthesize_errors

DROP_REASONS = ("truncated", "empty", "too_short", "too_long", "unservable", "write_a_program",
                "leading_punctuation", "non_ascii", "over_per_prompt", "exact_duplicate", "near_duplicate")
# Tasks a text-only model cannot serve (Self-Instruct's list).
UNSERVABLE_KEYWORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                       "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
HEADER = "Come up with a series of tasks:\n\n"
ITEM_SPLIT = re.compile(r"(?:^|\n)\s*\d+\s*\.\s*")
ANSWER_PART = re.compile(r"\s*\b(?:Answer|Output)\s*:", re.IGNORECASE)
UNSERVABLE = re.compile(r"\b(?:" + "|".join(re.escape(k) for k in UNSERVABLE_KEYWORDS) + r")\b", re.IGNORECASE)
MAX_BATCH_PROMPTS = 4096


# ---------------------------------------------------------------------------------------------
# Clustering and generation prompts
# ---------------------------------------------------------------------------------------------


def prompt_text(prompt) -> str:
    """The instruction of a prompt record: a string, or the last user message of a chat."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


def cluster_prompts(texts: Sequence[str], num_clusters: int, seed: int) -> list[int]:
    """k-means cluster of every text on TF-IDF vectors (fewer clusters than texts asked for:
    one per distinct text). Deterministic for a seed."""
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not texts:
        return []
    k = min(num_clusters, len(set(texts)))
    if k <= 1:
        return [0] * len(texts)
    vectors = TfidfVectorizer(lowercase=True, token_pattern=r"(?u)\b\w+\b").fit_transform(texts)
    return [int(x) for x in KMeans(n_clusters=k, random_state=seed, n_init=1).fit_predict(vectors)]


def generation_prompt(instructions: Sequence[str]) -> str:
    """'Come up with a series of tasks:\\n\\n1. ...\\nN. ...\\nN+1.' (the policy continues it)."""
    lines = "".join(f"{i}. {' '.join(t.split())}\n" for i, t in enumerate(instructions, 1))
    return f"{HEADER}{lines}{len(instructions) + 1}."


def batch_prompts(texts: Sequence[str], labels: Sequence[int], count: int, examples: int, seed: int, round_idx: int,
                  batch: int) -> list[str]:
    """`count` generation prompts, each from one cluster (uniform over clusters, then examples
    without replacement inside it). Depends only on its arguments."""
    rng = random.Random(f"aipo-synthesize:{seed}:{round_idx}:{batch}")
    members: dict[int, list[int]] = {}
    for k, label in enumerate(labels):
        members.setdefault(label, []).append(k)
    clusters = sorted(members)
    out = []
    for _ in range(count):
        pool = members[rng.choice(clusters)]
        chosen = rng.sample(pool, min(examples, len(pool)))
        out.append(generation_prompt([texts[k] for k in chosen]))
    return out


# ---------------------------------------------------------------------------------------------
# Parsing and filters
# ---------------------------------------------------------------------------------------------


def parse_completion(completion: str, finish_reason: str = "stop") -> tuple[list[str], int, int]:
    """(instructions, truncated items dropped, answer parts cut) of a completion that continues a
    numbered list right after "N.". Whitespace is collapsed to single spaces."""
    items = ITEM_SPLIT.split(completion)
    truncated = 0
    if finish_reason == "length" and items:
        items, truncated = items[:-1], 1  # the last item was cut mid-way
    out, cut = [], 0
    for item in items:
        parts = ANSWER_PART.split(item, maxsplit=1)
        if len(parts) > 1:
            cut += 1
        out.append(" ".join(parts[0].split()))
    return out, truncated, cut


def drop_reason(instruction: str, count_tokens: Callable[[str], int], min_tokens: int,
                max_tokens: int) -> Optional[str]:
    """Why a parsed instruction is dropped (a DROP_REASONS entry), or None to keep it."""
    if not instruction:
        return "empty"
    n = count_tokens(instruction)
    if n < min_tokens:
        return "too_short"
    if n > max_tokens:
        return "too_long"
    if UNSERVABLE.search(instruction):
        return "unservable"
    if instruction.lower().startswith("write a program"):
        return "write_a_program"
    if instruction[0] in string.punctuation:
        return "leading_punctuation"
    if not instruction[0].isascii():
        return "non_ascii"
    return None


def word_count(text: str) -> int:
    return len(text.split())


# ---------------------------------------------------------------------------------------------
# Near duplicates: exact ROUGE-L with a prefix filter
# ---------------------------------------------------------------------------------------------


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenization: lowercase, alphanumeric runs."""
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(a: str | Sequence[str], b: str | Sequence[str]) -> float:
    """ROUGE-L F-measure = 2 * LCS / (|a| + |b|) on rouge tokens."""
    a = rouge_tokens(a) if isinstance(a, str) else a
    b = rouge_tokens(b) if isinstance(b, str) else b
    return 2.0 * lcs_length(a, b) / (len(a) + len(b)) if a and b else 0.0


class NearDuplicateIndex:
    """Texts added so far; `max_similarity(text)` >= threshold finds every text whose ROUGE-L F to
    `text` reaches the threshold, exactly, without comparing against all of them (a PPJoin-style
    prefix and positional filter, then the exact LCS on the few candidates left).

    Why it is exact: LCS <= I = |a ∩ b| (multiset overlap), so ROUGE-L F = 2 LCS / (|a| + |b|)
    >= t needs I >= t(|a| + |b|)/2; with I <= |b| that gives I >= o(a) = ceil(t|a| / (2 - t)), and
    |b| within [t|a|/(2-t), (2-t)|a|/t]. Token occurrences (token, k-th occurrence) sorted in one
    fixed global order (rare tokens first) obey the prefix-filter lemma: two texts sharing >= o
    elements share one among their first len - o + 1, so only texts whose indexed prefix meets the
    query's prefix can qualify. Walking the query's prefix in that order, the matches counted so far
    plus the elements left after the current positions bound the overlap (positional filter)."""

    def __init__(self, threshold: float, frequencies: Optional[Counter] = None):
        self.threshold = threshold
        self.frequencies = frequencies or Counter()
        self.texts: list[list[str]] = []
        self.counts: list[Counter] = []
        self.sizes: list[int] = []
        self.postings: dict[tuple[str, int], list[tuple[int, int]]] = {}

    def elements(self, tokens: list[str]) -> list[tuple[str, int]]:
        seen: Counter = Counter()
        out = []
        for t in tokens:
            out.append((t, seen[t]))
            seen[t] += 1
        return sorted(out, key=lambda e: (self.frequencies.get(e[0], 0), e[0], e[1]))

    def min_overlap(self, n: int) -> int:
        return max(1, math.ceil(self.threshold * n / (2 - self.threshold) - 1e-9))

    def needed_overlap(self, m: int, n: int) -> int:
        return math.ceil(self.threshold * (m + n) / 2 - 1e-9)

    def max_similarity(self, text: str) -> float:
        tokens = rouge_tokens(text)
        if not tokens:
            return 0.0
        m, t = len(tokens), self.threshold
        lo, hi = t * m / (2 - t) - 1e-9, (2 - t) * m / t + 1e-9
        elements = self.elements(tokens)
        overlap: dict[int, int] = {}  # candidate -> matches so far (-1: pruned)
        half, sizes = t / 2, self.sizes
        for i, element in enumerate(elements[:m - self.min_overlap(m) + 1]):
            for k, j in self.postings.get(element, ()):
                n = sizes[k]
                if not lo <= n <= hi:
                    continue
                c = overlap.get(k, 0)
                if c < 0:
                    continue
                left = m - i - 1 if m - i < n - j else n - j - 1
                overlap[k] = c + 1 if c + 1 + left >= math.ceil(half * (m + n) - 1e-9) else -1
        best = 0.0
        counts = Counter(tokens)
        for k, c in overlap.items():
            if c <= 0:
                continue
            other = self.texts[k]
            if sum((counts & self.counts[k]).values()) < self.needed_overlap(m, len(other)):
                continue
            best = max(best, rouge_l(tokens, other))
        return best

    def add(self, text: str) -> None:
        tokens = rouge_tokens(text)
        if not tokens:
            return
        k = len(self.texts)
        self.texts.append(tokens)
        self.counts.append(Counter(tokens))
        self.sizes.append(len(tokens))
        elements = self.elements(tokens)
        for j, element in enumerate(elements[:len(elements) - self.min_overlap(len(elements)) + 1]):
            self.postings.setdefault(element, []).append((k, j))


def remove_near_duplicates(texts: Sequence[str], threshold: float, existing: Sequence[str] = ()) -> list[int]:
    """Indices of `texts` kept in order: each kept text has ROUGE-L F < threshold to every
    `existing` text and every earlier kept one."""
    frequencies = Counter(t for text in [*existing, *texts] for t in set(rouge_tokens(text)))
    index = NearDuplicateIndex(threshold, frequencies)
    for text in existing:
        index.add(text)
    kept = []
    for k, text in enumerate(texts):
        if index.max_similarity(text) < threshold:
            index.add(text)
            kept.append(k)
    return kept


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

# (generation prompts, batch index) -> [(completion text, finish_reason)] in the same order
Generator = Callable[[list[str], int], list[tuple[str, str]]]


def seed_kept(prompt_id, share: float) -> bool:
    """The same seeds every round: a hash of the id, not a per-round draw."""
    if share >= 1:
        return True
    digest = hashlib.sha256(f"aipo-seed:{json.dumps(prompt_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < share


class Filter:
    """The deterministic pass over completions: parse, filter, deduplicate, count."""

    def __init__(self, settings: SynthesizeConfig, seeds: Sequence[str], count_tokens: Callable[[str], int]):
        self.settings = settings
        self.count_tokens = count_tokens
        self.index = NearDuplicateIndex(settings.max_similarity, Counter(t for s in seeds for t in set(rouge_tokens(s))))
        self.seen = set()
        for text in seeds:
            self.index.add(text)
            self.seen.add(" ".join(text.split()).lower())
        self.kept: list[str] = []
        self.dropped: Counter = Counter()
        self.parsed = 0
        self.cut_answer_parts = 0

    def feed(self, completion: str, finish_reason: str) -> None:
        items, truncated, cut = parse_completion(completion, finish_reason)
        self.dropped["truncated"] += truncated
        self.cut_answer_parts += cut
        self.parsed += len(items) + truncated
        from_this = 0
        for item in items:
            s = self.settings
            reason = drop_reason(item, self.count_tokens, s.min_tokens, s.max_tokens)
            if reason is None and from_this >= s.new_per_prompt:
                reason = "over_per_prompt"
            if reason is None and (item.lower() in self.seen):
                reason = "exact_duplicate"
            if reason is None and self.index.max_similarity(item) >= s.max_similarity:
                reason = "near_duplicate"
            if reason is not None:
                self.dropped[reason] += 1
                continue
            from_this += 1
            self.kept.append(item)
            self.seen.add(item.lower())
            self.index.add(item)


def synthesize(seed_records: list[dict], generate: Generator, count_tokens: Callable[[str], int],
               settings: SynthesizeConfig, out_dir: str | Path, round_idx: int = 0,
               extra_seeds: Sequence[str] = (), writes: bool = True) -> tuple[list[dict], dict]:
    """Run the stage into `out_dir` (see the module docstring); returns (prompt records, stats).
    `writes` false: the same pass without writing anything (the engines of a placed stage but
    engine 0, which writes the batches and the prompts)."""
    check_section(settings, "rounds.synthesize.")
    errors = synthesize_errors(settings)
    if errors:
        raise ConfigError(errors)
    out_dir = Path(out_dir)
    work = out_dir / "synthesize"
    if writes:
        work.mkdir(parents=True, exist_ok=True)
    seed_texts = [prompt_text(r["prompt"]) for r in seed_records] + list(extra_seeds)
    labels = cluster_prompts(seed_texts, settings.num_clusters, settings.seed)
    flt = Filter(settings, seed_texts, count_tokens)
    batches = completions = 0
    while len(flt.kept) < settings.total and batches < settings.max_batches:
        path = work / f"batch_{batches:03d}.jsonl"
        if path.exists():  # finished before a kill: reuse it
            rows = read_jsonl(path)
        else:
            need = math.ceil((settings.total - len(flt.kept)) / settings.new_per_prompt)
            prompts = batch_prompts(seed_texts, labels, min(need, MAX_BATCH_PROMPTS), settings.examples_per_prompt,
                                    settings.seed, round_idx, batches)
            outputs = generate(prompts, batches)
            if len(outputs) != len(prompts):
                raise RuntimeError(f"the generator returned {len(outputs)} completions for {len(prompts)} prompts")
            rows = [{"prompt": p, "text": t, "finish_reason": f} for p, (t, f) in zip(prompts, outputs)]
            if writes:
                write_jsonl(path, rows)
        for row in rows:
            flt.feed(row["text"], row["finish_reason"])
        completions += len(rows)
        batches += 1
    new = flt.kept[:settings.total]
    chat = bool(seed_records) and isinstance(seed_records[0]["prompt"], list)
    new_records = [{"id": f"r{round_idx}-n{k}", "prompt": [{"role": "user", "content": t}] if chat else t}
                   for k, t in enumerate(new)]
    taken = {json.dumps(r["id"]) for r in seed_records}
    clash = [r["id"] for r in new_records if json.dumps(r["id"]) in taken]
    if clash:
        raise ConfigError(f"seed prompt id {clash[0]!r} clashes with the ids of synthesized prompts (r<round>-n<k>); "
                          "rename that seed prompt")
    kept_seeds = [r for r in seed_records if seed_kept(r["id"], settings.seed_share)]
    records = kept_seeds + new_records
    stats = {"round": round_idx, "seed_prompts": len(seed_records), "extra_seeds": len(extra_seeds),
             "clusters": len(set(labels)), "batches": batches, "completions": completions,
             "parsed_instructions": flt.parsed, "kept": len(new), "over_total": len(flt.kept) - len(new), "dropped": {r: flt.dropped.get(r, 0) for r in DROP_REASONS},
             "cut_answer_parts": flt.cut_answer_parts, "seed_prompts_kept": len(kept_seeds),
             "prompts_written": len(records), "reached_total": len(new) >= settings.total}
    if writes:
        write_jsonl(work / "new_prompts.jsonl", new_records)
        atomic_write_json(out_dir / "synthesize_stats.json", stats)
        write_jsonl(out_dir / "prompts.jsonl", records)  # last: its presence means the stage finished
    return records, stats


def batch_spec(synth, sampling, round_idx: int, batch: int):
    """The sampling settings of generation batch `batch`: one completion per prompt, seeded per batch."""
    return dataclasses.replace(sampling, n=1, temperature=synth.temperature, top_p=synth.top_p,
                               max_tokens=synth.generation_max_tokens, stop=[], chat_template=False,
                               seed=synth.seed + 1000 * round_idx + batch)


def vllm_generator(model, synth, sampling, round_idx: int) -> Generator:
    """Completions by the policy with vLLM on the sampling layout. `model` is an HF directory or
    a live engine."""
    from aipo_mp.rounds.sampling import sample

    def generate(prompts: list[str], batch: int) -> list[tuple[str, str]]:
        spec = batch_spec(synth, sampling, round_idx, batch)
        records = sample(model, [{"id": k, "prompt": p} for k, p in enumerate(prompts)], spec)
        by_id = {r["prompt_id"]: r for r in records}
        return [(by_id[k]["text"], by_id[k]["finish_reason"]) for k in range(len(prompts))]

    return generate


def token_counter(model_dir) -> Callable[[str], int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


def previous_new_prompts(run_dir: Path, round_idx: int) -> list[str]:
    """Instructions synthesized by rounds before `round_idx` (rounds.synthesize.include_previous)."""
    out = []
    for q in range(round_idx):
        path = run_dir / f"round_{q}" / "synthesize" / "new_prompts.jsonl"
        if path.exists():
            out += [prompt_text(r["prompt"]) for r in read_jsonl(path)]
    return out


def run_stage(cfg, model_dir: str, seeds_path: str, out_dir: str | Path, round_idx: int,
              extra_seeds: Sequence[str] = ()) -> tuple[list[dict], dict]:
    """`aipo-mp synthesize` / the run's stage, from a Config."""
    synth = cfg.rounds.synthesize
    seeds = read_prompts(seeds_path)
    return synthesize(seeds, vllm_generator(model_dir, synth, cfg.sampling, round_idx), token_counter(model_dir),
                      synth, out_dir, round_idx, extra_seeds)


class StageStopped(Exception):
    """A stop signal (preemption) came while an engine task of the stage waited or generated."""


class ShardedGenerator:
    """One engine task's generator of a placed synthesize stage: every batch's generation prompts
    are split into one contiguous shard per engine (SHARD_ROOT/batch_NNN/ofN/); this engine
    generates its unfinished shards with its own engine (started at its first shard, kept across
    batches), waits for the other engines' shards and returns the whole batch merged in order. A
    prompt's seed depends on its position in the batch only, so the batch equals one engine's."""

    def __init__(self, model_dir, synth, sampling, round_idx: int, shard_root: str | Path, stop,
                 engine: int, engines: int, task=None):
        self.model_dir, self.synth, self.sampling, self.round_idx = model_dir, synth, sampling, round_idx
        self.shard_root, self.stop, self.engine, self.engines = Path(shard_root), stop, engine, engines
        self.task = task  # engine_task() of a placed stage (None: a test's preset engine)
        self.llm = None

    def __call__(self, prompts: list[str], batch: int) -> list[tuple[str, str]]:
        from aipo_mp.rounds.shards import ShardDir, run_shard_task, shard_bounds, shard_count, wait_for_shards

        spec = batch_spec(self.synth, self.sampling, self.round_idx, batch)
        records = [{"id": k, "prompt": p} for k, p in enumerate(prompts)]
        shards = ShardDir(self.shard_root / f"batch_{batch:03d}", shard_count(len(prompts), self.engines))

        def work(start: int, end: int) -> list[dict]:
            from aipo_mp.rounds.sampling import generate_records

            return generate_records(self.engine_for(spec), records[start:end], spec, index_offset=start)

        code = run_shard_task(shards, shard_bounds(len(prompts), shards.count), work, self.stop, self.engine,
                              self.engines, fixed=True)  # no driver plan: the same split in every task
        if code or not wait_for_shards(shards, self.stop):
            raise StageStopped(f"batch {batch}")
        by_id = {r["prompt_id"]: r for r in shards.merge()}
        return [(by_id[k]["text"], by_id[k]["finish_reason"]) for k in range(len(prompts))]

    def engine_for(self, spec):
        if self.llm is None:
            from aipo_mp.rounds.engines import engine_kwargs, start_engine
            from aipo_mp.rounds.shards import claim_head_devices

            claim_head_devices(self.task, spec.tensor_parallel * spec.pipeline_parallel * spec.data_parallel)
            self.llm = start_engine(self.model_dir, **engine_kwargs(spec), what="policy model", task=self.task)
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            from aipo_mp.rounds.engines import close_engine

            close_engine(self.llm)
            self.llm = None


def synthesize_task(cfg, model_dir: str, seeds_path: str, out_dir: str | Path, round_idx: int,
                    extra_seeds: Sequence[str], shard_root: str | Path, stop) -> int:
    """One engine task of a placed synthesize stage (`aipo-mp synthesize --shard-dir`): every
    engine runs the same deterministic pass over the batches, generating its shard of each; engine
    0 writes the merged batches and the prompts. 0, or 75 when a stop signal came first (a rerun
    reuses the finished batches and shards)."""
    from aipo_mp.rounds.engines import engine_task, serve_headless

    task = engine_task()
    if not task.is_head:  # a spanning engine's other nodes: its headless part until the prompts exist
        return serve_headless(task, finished=lambda: (Path(out_dir) / "prompts.jsonl").exists())
    generate = ShardedGenerator(model_dir, cfg.rounds.synthesize, cfg.sampling, round_idx, shard_root, stop,
                                task.engine, task.engines, task)
    try:
        synthesize(read_prompts(seeds_path), generate, token_counter(model_dir), cfg.rounds.synthesize, out_dir,
                   round_idx, extra_seeds, writes=task.engine == 0)
    except StageStopped as e:
        print(f"[synthesize] stopped by a signal in {e}", flush=True)
        return 75
    finally:
        generate.close()
    return 0
