"""Preference pairs: read and validate a JSONL file, tokenize, truncate, and pack into rows.

A pair is a prompt with a chosen and a rejected response. It becomes two sequences,
[prompt + chosen] and [prompt + rejected], which are packed next to each other into a row of
exactly `seq_length` tokens together with other pairs. Attention never crosses a sequence
boundary (the row's `cu_seqlens` tell the kernel where they are), and the loss mask selects
the response tokens, so the per-sequence sum of masked token log-probs is
log pi(response | prompt), EOS included.

Tokenization contract:
  * chat prompt (list of {role, content}): the tokenizer's chat template with
    `add_generation_prompt=True`;
  * string prompt: `tokenizer(prompt).input_ids` (the tokenizer's own special tokens, e.g. BOS);
  * response: `tokenizer(response, add_special_tokens=False).input_ids + [eos_token_id]`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PAIR_FIELDS = ("prompt", "chosen", "rejected")
ON_ERROR_MODES = ("error", "skip")


class DataError(ValueError):
    """A problem with the user's data or data settings. The message is one line that names the
    file (and line) and says how to fix it."""


@dataclass
class TokenizedPair:
    index: int  # position in the kept dataset (0..N-1), stable
    prompt: list[int]
    chosen: list[int]  # response ids incl. EOS
    rejected: list[int]

    @property
    def num_tokens(self) -> int:
        """Tokens the pair occupies in a packed row: the prompt appears in both sequences."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


@dataclass
class DataStats:
    read: int = 0  # non-blank lines
    kept: int = 0  # pairs left after every filter (after read_pairs_jsonl: well-formed records)
    skipped_malformed: int = 0  # on_error=skip only
    dropped_identical: int = 0  # chosen and rejected are the same text or the same tokens
    dropped_empty: int = 0  # a whitespace-only response, or a prompt with no tokens
    truncated: int = 0  # pairs shortened to fit data.max_length
    dropped_too_long: int = 0  # truncation cut away every difference between chosen and rejected

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PackedRow:
    tokens: torch.Tensor  # [seq_length] long, pad_id after the real tokens
    labels: torch.Tensor  # [seq_length] long, next token of the same sequence, else 0
    loss_mask: torch.Tensor  # [seq_length] bool, True where labels[t] is a response token
    segment_ids: torch.Tensor  # [seq_length] long, sequence index in the row; padding -1
    cu_seqlens: torch.Tensor  # [n_seq + 1 (+1 if padded)] int32, cu_seqlens[-1] == seq_length
    max_seqlen: int  # longest segment of cu_seqlens, padding segment included
    pair_indices: torch.Tensor  # [n_pairs] long; sequence 2k is pair k's chosen, 2k+1 its rejected
    chosen_lengths: torch.Tensor  # [n_pairs] long, response tokens incl. EOS
    rejected_lengths: torch.Tensor  # [n_pairs] long
    num_real_tokens: int


# ---------------------------------------------------------------------------------------------
# Reading and validation
# ---------------------------------------------------------------------------------------------


class MalformedLine(ValueError):
    """What is wrong with one line; read_pairs_jsonl adds the file, line number and fix."""


def read_pairs_jsonl(path: str | Path, on_error: str = "error") -> tuple[list[dict], DataStats]:
    """Well-formed records of a pairs JSONL file. Blank lines are ignored. A malformed line raises
    DataError, or with on_error="skip" is skipped and counted. A file with no usable pair raises."""
    if on_error not in ON_ERROR_MODES:
        raise DataError(f"data.on_error={on_error!r}: expected one of {', '.join(ON_ERROR_MODES)}")
    path = Path(path)
    check_readable_file(path)
    records, stats = [], DataStats()
    with open(path, "rb") as f:  # bytes, so bad UTF-8 is reported with its line number
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            stats.read += 1
            try:
                records.append(parse_pair_line(raw))
            except MalformedLine as problem:
                if on_error == "error":
                    raise DataError(f"{path}:{line_number}: {problem}; fix the line or set data.on_error=skip") from None
                stats.skipped_malformed += 1
    if not records:
        raise DataError(f"{path}: contains no usable pairs ({stats.read} non-blank lines, {stats.skipped_malformed} "
                        "malformed); each line needs a JSON object with prompt, chosen and rejected")
    stats.kept = len(records)
    return records, stats


def check_readable_file(path: Path) -> None:
    if path.is_dir():
        raise DataError(f"data.train: {path} is a directory; point data.train at a pairs JSONL file")
    if not path.exists():
        raise DataError(f"data.train: file not found: {path}; check the path (relative paths start at the "
                        "working directory)")


def parse_pair_line(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedLine(f"not valid UTF-8 (byte {e.start})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise MalformedLine(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise MalformedLine(f"expected a JSON object with prompt, chosen and rejected, got {json_type(record)}")
    for field in PAIR_FIELDS:
        if field not in record:
            raise MalformedLine(f"missing field '{field}' (every line needs prompt, chosen and rejected)")
    for field in ("chosen", "rejected"):
        if not isinstance(record[field], str):
            raise MalformedLine(f"field '{field}' must be a string, got {json_type(record[field])}")
    check_prompt(record["prompt"])
    return record


def check_prompt(prompt) -> None:
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, list):
        raise MalformedLine(f"field 'prompt' must be a string or a list of {{role, content}} messages, "
                            f"got {json_type(prompt)}")
    if not prompt:
        raise MalformedLine("field 'prompt' is an empty message list")
    for i, message in enumerate(prompt):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise MalformedLine(f"prompt message {i} must be an object with string 'role' and 'content'")


def json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------
# Tokenization, filtering and truncation
# ---------------------------------------------------------------------------------------------


def tokenize_pairs(records: list[dict], tokenizer, max_length: int, max_prompt_length: int,
                   stats: DataStats) -> list[TokenizedPair]:
    """Tokenize records into pairs of at most `max_length` tokens per sequence, dropping (and
    counting in `stats`) pairs that carry no preference signal. `stats.kept` becomes the number
    of pairs returned."""
    check_length_settings(max_length, max_prompt_length)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos_token; responses must end with EOS (set eos_token in the "
                        "model's tokenizer_config.json)")
    usable = [r for r in records if keep_by_text(r, stats)]
    prompts = encode_prompts([r["prompt"] for r in usable], tokenizer)
    chosen = encode_responses([r["chosen"] for r in usable], tokenizer, eos_id)
    rejected = encode_responses([r["rejected"] for r in usable], tokenizer, eos_id)
    pairs = []
    for position, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        pair = fit_pair(position, p, c, r, max_length, max_prompt_length, tokenizer.bos_token_id, stats)
        if pair is not None:
            pairs.append(TokenizedPair(len(pairs), *pair))
    stats.kept = len(pairs)
    return pairs


def check_length_settings(max_length: int, max_prompt_length: int) -> None:
    if max_length < 2:
        raise DataError(f"data.max_length={max_length}: a sequence needs room for a prompt and a response; "
                        "set it to at least 2 (0 means train.seq_length // 2)")
    if max_prompt_length < 1:
        raise DataError(f"data.max_prompt_length={max_prompt_length}: must be at least 1")


def keep_by_text(record: dict, stats: DataStats) -> bool:
    if not record["chosen"].strip() or not record["rejected"].strip():
        stats.dropped_empty += 1
        return False
    if record["chosen"] == record["rejected"]:
        stats.dropped_identical += 1
        return False
    return True


def encode_prompts(prompts: list, tokenizer) -> list[list[int]]:
    """Chat prompts through the chat template, string prompts in one batched call."""
    encoded: list = [None] * len(prompts)
    string_positions = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    if string_positions:
        batch = tokenizer([prompts[i] for i in string_positions])["input_ids"]
        for i, ids in zip(string_positions, batch):
            encoded[i] = list(ids)
    for i, prompt in enumerate(prompts):
        if encoded[i] is None:
            encoded[i] = encode_chat_prompt(prompt, tokenizer, i)
    return encoded


def encode_chat_prompt(messages: list[dict], tokenizer, position: int) -> list[int]:
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # a missing template or a template that rejects the roles
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"data.train pair {position}: the tokenizer's chat template failed on a message prompt "
                        f"({reason}); use string prompts or a tokenizer with a suitable chat_template") from None
    return as_token_list(encoded)


def as_token_list(encoded) -> list[int]:
    """apply_chat_template returns a BatchEncoding in transformers 5 and a list in 4.x."""
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], Sequence):  # a batch of one
        encoded = encoded[0]
    return [int(t) for t in encoded]


def encode_responses(responses: list[str], tokenizer, eos_id: int) -> list[list[int]]:
    if not responses:
        return []
    batch = tokenizer(responses, add_special_tokens=False)["input_ids"]
    return [list(ids) + [eos_id] for ids in batch]


def fit_pair(position: int, prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
             max_prompt_length: int, bos_id: int | None, stats: DataStats):
    """(prompt, chosen, rejected) cut to `max_length` per sequence, or None if the pair is dropped."""
    if not prompt:  # the first response token would have nothing to be predicted from
        stats.dropped_empty += 1
        return None
    if chosen == rejected:
        stats.dropped_identical += 1
        return None
    cut = truncate_pair(position, prompt, chosen, rejected, max_length, max_prompt_length, bos_id)
    if cut == (prompt, chosen, rejected):
        return cut
    stats.truncated += 1
    if cut[1] == cut[2]:  # they only differed beyond max_length: no signal left
        stats.dropped_too_long += 1
        return None
    return cut


def truncate_pair(position: int, prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
                  max_prompt_length: int, bos_id: int | None):
    """Make prompt + each response <= max_length. The prompt is cut first, from the left (its end
    is what the response answers), only as far as needed but never below max_prompt_length;
    then the responses are cut from the right."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return prompt, chosen, rejected
    prompt = keep_prompt_tail(prompt, max(max_prompt_length, max_length - longest), bos_id)
    response_budget = max_length - len(prompt)
    if response_budget < 1:
        raise DataError(f"data.train pair {position}: a {len(prompt)}-token prompt (after data.max_prompt_length="
                        f"{max_prompt_length}) leaves no room for a response in data.max_length={max_length}; "
                        f"set data.max_prompt_length below data.max_length, e.g. {max_length // 2}")
    return prompt, chosen[:response_budget], rejected[:response_budget]


def keep_prompt_tail(prompt: list[int], budget: int, bos_id: int | None) -> list[int]:
    """The last `budget` tokens; a leading BOS survives the cut since models expect it first."""
    if len(prompt) <= budget:
        return prompt
    if bos_id is not None and prompt[0] == bos_id and budget >= 2:
        return [bos_id] + prompt[len(prompt) - budget + 1:]
    return prompt[len(prompt) - budget:]


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def pack_pairs(pairs: list[TokenizedPair], seq_length: int, max_pairs_per_row: int = 0,
               pad_id: int = 0) -> list[PackedRow]:
    """Whole pairs packed into rows of exactly `seq_length` tokens by first-fit-decreasing on pair
    length (ties broken by pair index, so the result is deterministic). A pair's two sequences
    are adjacent in one row. `max_pairs_per_row` > 0 caps the pairs in a row."""
    for pair in pairs:
        if pair.num_tokens > seq_length:
            raise DataError(f"pair {pair.index} needs {pair.num_tokens} tokens but train.seq_length is {seq_length}; "
                            "raise train.seq_length or lower data.max_length")
    order = sorted(range(len(pairs)), key=lambda i: (-pairs[i].num_tokens, pairs[i].index, i))
    bins = FirstFitBins(len(pairs), seq_length, max_pairs_per_row)
    groups: list[list[TokenizedPair]] = []
    for i in order:
        row = bins.place(pairs[i].num_tokens)
        if row == len(groups):
            groups.append([])
        groups[row].append(pairs[i])
    return [build_row(group, seq_length, pad_id) for group in groups]


class FirstFitBins:
    """First-fit in O(log n) per item: a max-segment-tree over the rows' free space. Rows not yet
    opened hold the full capacity, and they all lie right of the open ones, so the leftmost leaf
    with room is exactly the first-fit choice (an open row, else a new one)."""

    def __init__(self, max_rows: int, capacity: int, max_items_per_row: int = 0):
        self.leaves = 1 << max(0, max_rows - 1).bit_length()
        self.free = [capacity] * (2 * self.leaves)
        self.items = [0] * self.leaves
        self.max_items_per_row = max_items_per_row

    def place(self, size: int) -> int:
        node = 1
        while node < self.leaves:
            node = 2 * node if self.free[2 * node] >= size else 2 * node + 1
        row = node - self.leaves
        self.items[row] += 1
        full = self.items[row] == self.max_items_per_row
        self.set_free(row, -1 if full else self.free[node] - size)
        return row

    def set_free(self, row: int, value: int) -> None:
        node = row + self.leaves
        self.free[node] = value
        while node > 1:
            node //= 2
            self.free[node] = max(self.free[2 * node], self.free[2 * node + 1])


def build_row(pairs: list[TokenizedPair], seq_length: int, pad_id: int) -> PackedRow:
    sequences = [(p.prompt, response) for p in pairs for response in (p.chosen, p.rejected)]
    flat = [t for prompt, response in sequences for t in (*prompt, *response)]
    n = len(flat)
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    tokens[:n] = torch.tensor(flat, dtype=torch.long)
    labels = torch.zeros(seq_length, dtype=torch.long)
    labels[:n - 1] = tokens[1:n]
    loss_mask = torch.zeros(seq_length, dtype=torch.bool)
    segment_ids = torch.full((seq_length,), -1, dtype=torch.long)
    bounds = [0]
    for s, (prompt, response) in enumerate(sequences):
        start, end = bounds[-1], bounds[-1] + len(prompt) + len(response)
        labels[end - 1] = 0  # the last token predicts nothing inside its own sequence
        # Position t predicts t+1: the positions predicting response tokens (EOS included).
        loss_mask[start + len(prompt) - 1:end - 1] = True
        segment_ids[start:end] = s
        bounds.append(end)
    if n < seq_length:
        bounds.append(seq_length)  # the padding is one more segment, so cu_seqlens covers the row
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    return PackedRow(
        tokens=tokens, labels=labels, loss_mask=loss_mask, segment_ids=segment_ids, cu_seqlens=cu_seqlens,
        max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
        pair_indices=torch.tensor([p.index for p in pairs], dtype=torch.long),
        chosen_lengths=torch.tensor([len(p.chosen) for p in pairs], dtype=torch.long),
        rejected_lengths=torch.tensor([len(p.rejected) for p in pairs], dtype=torch.long),
        num_real_tokens=n,
    )


def padded_utilization(pairs: list[TokenizedPair], seq_length: int) -> float:
    """Baseline without packing: every sequence padded to seq_length."""
    if not pairs:
        return 0.0
    return sum(p.num_tokens for p in pairs) / (2 * len(pairs) * seq_length)


def packed_utilization(rows: list[PackedRow]) -> float:
    if not rows:
        return 0.0
    return sum(r.num_real_tokens for r in rows) / (len(rows) * rows[0].tokens.numel())


# ---------------------------------------------------------------------------------------------
# Synthetic length distribution (tests and benchmarks)
# ---------------------------------------------------------------------------------------------


def synthetic_chat_lengths(n: int, seed: int, prompt_median: float = 60, response_median: float = 150,
                           prompt_sigma: float = 0.8, response_sigma: float = 0.7, max_prompt: int = 512,
                           max_response: int = 512) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts shaped like chat preference data: lognormal
    prompts (median 60 tokens) and responses (median 150, chosen and rejected drawn
    independently), clipped to [4, max_prompt] and [2, max_response], so that one sequence
    fits in 1024 tokens (data.max_length = seq_length // 2 for seq_length 2048)."""
    rng = random.Random(seed)

    def draw(median: float, sigma: float, low: int, high: int) -> int:
        return min(high, max(low, round(rng.lognormvariate(0.0, sigma) * median)))

    return [(draw(prompt_median, prompt_sigma, 4, max_prompt),
             draw(response_median, response_sigma, 2, max_response),
             draw(response_median, response_sigma, 2, max_response)) for _ in range(n)]


def synthetic_chat_pairs(n: int, seed: int, vocab_size: int = 512) -> list[TokenizedPair]:
    """Pairs with the lengths of `synthetic_chat_lengths` and arbitrary token ids in [4, vocab_size)."""
    rng = random.Random(seed + 1)
    token_ids = range(4, vocab_size)  # above the usual unk/bos/eos/pad ids

    def ids(count: int) -> list[int]:
        return rng.choices(token_ids, k=count)

    return [TokenizedPair(i, ids(p), ids(c), ids(r)) for i, (p, c, r) in enumerate(synthetic_chat_lengths(n, seed))]
