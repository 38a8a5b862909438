"""The training pairs of a config: read (any accepted format and schema), tokenize, filter,
truncate, and report what happened to every pair (`data_stats.json`, one summary line, a warning
line when many pairs were cut). `aipo-mp check` and the trainer call the same function, so the
counts check prints are the ones training uses.

Over-long text is cut by characters before it is tokenized (`cut_records`), so tokenizing costs
memory bounded by the length settings, not by the longest row: a prompt keeps its last `limit`
characters (truncation keeps a prompt's tail), a response its first `limit` (truncation keeps a
response's head). `limit` = 2 x (the longest token budget + 16) x the longest vocabulary entry in
characters: the tokens that survive truncation lie within the first (last) budget x longest-entry
characters, and the factor 2 leaves as much again so the cut never touches the word those tokens
come from. This assumes a tokenizer that does not delete input characters (byte-level BPE and
SentencePiece as shipped with decoder models do not). The stats' counts of tokens cut then count
tokens of the cut text."""

from __future__ import annotations

from pathlib import Path

from aipo_mp.data.pairs import DataStats, TokenizedPair, read_pairs, tokenize_pairs

STATS_FILE = "data_stats.json"


def effective_max_length(cfg) -> int:
    return cfg.data.max_length or cfg.train.seq_length // 2


def prepare_pairs(cfg, tokenizer, vocab_size: int | None = None) -> tuple[list[TokenizedPair], DataStats, list[dict]]:
    """(tokenized pairs, stats, the normalized records) of cfg.data.train; DataError/ConfigError
    when nothing usable is left, or when the tokenizer does not fit the model's vocabulary."""
    from aipo_mp.errors import ConfigError

    if vocab_size is not None:
        check_vocabulary(tokenizer, vocab_size, cfg.model.path)
    if not cfg.data.train:
        raise ConfigError("data.train is not set; point it at a pairs file (JSONL, .jsonl.gz, Parquet) or a "
                          "datasets.save_to_disk directory")
    records, stats = read_pairs(cfg.data.train, on_error=cfg.data.on_error, fields=cfg.data.fields)
    max_len = effective_max_length(cfg)
    short = cut_records(records, char_limit(cfg, tokenizer), stats)
    pairs = tokenize_pairs(short, tokenizer, max_len, cfg.data.max_prompt_length, stats)
    del short
    if not pairs and stats.dropped_too_long:
        raise ConfigError(
            f"data.train={cfg.data.train}: all {stats.dropped_too_long} pairs are longer than data.max_length={max_len} "
            f"tokens per sequence (train.seq_length={cfg.train.seq_length}), and cutting them erases the difference "
            "between chosen and rejected; raise train.seq_length (and data.max_length)")
    if not pairs:
        raise ConfigError(f"data.train={cfg.data.train}: no usable pairs after filtering; {stats.summary()}")
    return pairs, stats, records


def max_chars_per_token(tokenizer) -> int:
    """The longest vocabulary entry in characters (special tokens included): no token covers more
    input characters (a byte-level entry has one character per byte, a byte-fallback entry such
    as <0x0A> more characters than the byte it stands for)."""
    vocab = tokenizer.get_vocab()
    return max(1, max((len(t) for t in vocab), default=1))


def char_limit(cfg, tokenizer) -> int:
    """Characters of a prompt (its tail) or a response (its head) that can matter after truncation,
    doubled for safety (see the module docstring)."""
    budget = max(cfg.train.seq_length, effective_max_length(cfg), cfg.data.max_prompt_length)
    return 2 * (budget + 16) * max_chars_per_token(tokenizer)


def cut_records(records: list[dict], limit: int, stats) -> list[dict]:
    """Records with every text longer than `limit` characters cut (prompt: keep the tail; chosen
    and rejected: keep the head); the caller's records are left as they are (the run identity
    fingerprints the data as read). A pair whose responses become the same text only differed
    past what truncation keeps: dropped here and counted as truncation would count it."""
    out = []
    for r in records:
        if not needs_cut(r, limit):
            out.append(r)
            continue
        chosen, rejected = r["chosen"][:limit], r["rejected"][:limit]
        if chosen == rejected and r["chosen"] != r["rejected"]:
            stats.truncated += 1
            stats.truncated_response += 1
            stats.dropped_too_long += 1
            continue
        out.append({**r, "prompt": prompt_tail(r["prompt"], limit), "chosen": chosen, "rejected": rejected})
    return out


def needs_cut(record: dict, limit: int) -> bool:
    p = record["prompt"]
    prompt_chars = len(p) if isinstance(p, str) else sum(len(m["content"]) for m in p)
    return max(prompt_chars, len(record["chosen"]), len(record["rejected"])) > limit


def prompt_tail(prompt, limit: int):
    """A string prompt's last `limit` characters; for chat messages, each message keeps what lies
    within the last `limit` content characters (earlier ones become empty; roles and the template
    around them stay, so the tokens near the end, all that truncation keeps, are unchanged)."""
    if isinstance(prompt, str):
        return prompt[-limit:] if len(prompt) > limit else prompt
    left, kept = limit, []
    for message in reversed(prompt):
        content = message["content"]
        keep = content[len(content) - left:] if len(content) > left else content
        left -= len(keep)
        kept.append({**message, "content": keep})
    return kept[::-1]


def check_vocabulary(tokenizer, vocab_size: int, model_path) -> None:
    """A tokenizer with ids past the embedding table would fail deep inside the first forward
    (an index error), or on GPUs read garbage: refuse it up front."""
    from aipo_mp.errors import ConfigError

    size = len(tokenizer)
    if size > vocab_size:
        raise ConfigError(f"model.path={model_path}: the tokenizer has {size} tokens but the model's vocab_size is "
                          f"{vocab_size}; use the tokenizer that belongs to these weights")


def report_lines(stats: DataStats, cfg) -> list[str]:
    lines = [stats.summary()]
    warning = stats.truncation_warning(cfg.data.warn_truncated_share)
    if warning:
        lines.append(warning)
    return lines


def save_stats(stats: DataStats, out_dir: str | Path) -> Path:
    from aipo_mp.runtime.files import atomic_write_json

    path = Path(out_dir) / STATS_FILE
    atomic_write_json(path, stats.to_dict())
    return path


# ---------------------------------------------------------------------------------------------
# The token cache: data.train tokenized once per job (see aipo_mp.training.state.prepare_data)
# ---------------------------------------------------------------------------------------------

CACHE_DIR = "token_cache"
CACHE_VERSION = 1  # bump when tokenization, the cut or the file layout changes
TOKEN_FIELDS = ("prompt", "chosen", "rejected")


def source_fingerprint(path: str | Path) -> list:
    """Every file of data.train (a file or a directory) with its size and modification time: a
    rewritten file gets a new key without reading its bytes."""
    root = Path(path).resolve()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [str(root)] + [[str(f.relative_to(root)) if f != root else f.name, f.stat().st_size, f.stat().st_mtime_ns]
                          for f in files]


def code_fingerprint() -> str:
    """The source of the modules that read, cut and tokenize pairs: a code change (truncation,
    schemas) never reuses pairs tokenized by the old code."""
    import hashlib

    from aipo_mp import tokenization
    from aipo_mp.data import pairs, readers

    h = hashlib.sha256()
    for module in (pairs, readers, tokenization):
        h.update(Path(module.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def cache_path(cfg, tokenizer_dir: str, vocab_size: int | None) -> Path:
    """RUN_DIR/token_cache/pairs-KEY.npz, KEY covering the data files, the tokenizer's files and
    every setting tokenization depends on."""
    import hashlib
    import json

    from aipo_mp.training.identity import tree_fingerprint

    d = cfg.data
    key = {"version": CACHE_VERSION, "code": code_fingerprint(),
           "data": source_fingerprint(d.train), "tokenizer": tree_fingerprint(tokenizer_dir),
           "vocab_size": vocab_size, "seq_length": cfg.train.seq_length, "max_length": effective_max_length(cfg),
           "max_prompt_length": d.max_prompt_length, "fields": dict(d.fields or {}), "on_error": d.on_error}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cfg.output.dir) / CACHE_DIR / f"pairs-{digest}.npz"


def write_token_cache(path: Path, pairs: list[TokenizedPair], stats: DataStats, data_fingerprint: str) -> None:
    """numpy .npz (no pickle): per field the concatenated token ids and each pair's length, and the
    stats and data fingerprint as JSON bytes. Written under a temporary name, then renamed."""
    import json
    import os
    import tempfile

    import numpy as np

    arrays = {}
    for f in TOKEN_FIELDS:
        seqs = [getattr(p, f) for p in pairs]
        arrays[f"{f}_ids"] = np.fromiter((t for s in seqs for t in s), dtype=np.int64)
        arrays[f"{f}_lens"] = np.array([len(s) for s in seqs], dtype=np.int64)
    meta = {"stats": stats.to_dict(), "data_fingerprint": data_fingerprint, "version": CACHE_VERSION}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_token_cache(path: Path) -> tuple[list[TokenizedPair], DataStats, str] | None:
    """(pairs, stats, data fingerprint) from a cache file, or None when it is missing or unreadable
    (the caller tokenizes instead)."""
    import json

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            fields = {}
            for f in TOKEN_FIELDS:
                ids, lens = z[f"{f}_ids"].tolist(), z[f"{f}_lens"].tolist()
                if sum(lens) != len(ids):
                    return None
                starts = [0]
                for n in lens:
                    starts.append(starts[-1] + n)
                fields[f] = [ids[a:b] for a, b in zip(starts, starts[1:])]
        if meta.get("version") != CACHE_VERSION or len({len(v) for v in fields.values()}) != 1:
            return None
        stats = DataStats(**meta["stats"])
        pairs = [TokenizedPair(i, p, c, r) for i, (p, c, r) in
                 enumerate(zip(fields["prompt"], fields["chosen"], fields["rejected"]))]
        return pairs, stats, str(meta["data_fingerprint"])
    except Exception:  # noqa: BLE001 - any damage: tokenize again rather than trust it
        return None
