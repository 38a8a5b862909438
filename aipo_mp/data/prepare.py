"""The training pairs of a config: read (any accepted format and schema), tokenize, filter,
truncate, and report what happened to every pair (`data_stats.json`, one summary line, a warning
line when many pairs were cut). `aipo-mp check` and the trainer call the same function, so the
counts check prints are the ones training uses."""

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
    pairs = tokenize_pairs(records, tokenizer, max_len, cfg.data.max_prompt_length, stats)
    if not pairs and stats.dropped_too_long:
        raise ConfigError(
            f"data.train={cfg.data.train}: all {stats.dropped_too_long} pairs are longer than data.max_length={max_len} "
            f"tokens per sequence (train.seq_length={cfg.train.seq_length}), and cutting them erases the difference "
            "between chosen and rejected; raise train.seq_length (and data.max_length)")
    if not pairs:
        raise ConfigError(f"data.train={cfg.data.train}: no usable pairs after filtering; {stats.summary()}")
    return pairs, stats, records


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
