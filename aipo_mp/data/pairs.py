"""Preference pairs: read and validate a JSONL file, tokenize, truncate, and pack into rows.

A pair is a prompt with a chosen and a rejected response. It becomes two sequences,
[prompt + chosen] and [prompt + rejected], which are packed next to each other into a row of at
most `seq_length` tokens together with other pairs (padded only to what the parallel layout needs
to divide it, or to exactly `seq_length` when asked). Attention never crosses a sequence
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

import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from aipo_mp.errors import DataError
from aipo_mp.tokenization import encode_prompts, encode_responses

PAIR_FIELDS = ("prompt", "chosen", "rejected")
ON_ERROR_MODES = ("error", "skip")


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
    read: int = 0  # rows (non-blank lines)
    kept: int = 0  # pairs left after every filter (after read_pairs: well-formed records)
    skipped_malformed: int = 0  # on_error=skip only
    dropped_identical: int = 0  # chosen and rejected are the same text or the same tokens
    dropped_empty: int = 0  # a whitespace-only response, or a prompt with no tokens
    truncated: int = 0  # pairs shortened to fit data.max_length
    dropped_too_long: int = 0  # truncation cut away every difference between chosen and rejected
    truncated_prompt: int = 0  # pairs whose prompt lost tokens (from the left)
    prompt_tokens_cut: int = 0
    truncated_response: int = 0  # pairs whose chosen or rejected lost tokens (from the right)
    response_tokens_cut: int = 0  # chosen and rejected together
    format: str = ""  # jsonl, jsonl.gz, parquet, parquet-dir, save_to_disk
    first_skip_reason: str = ""  # where and why the first malformed row was skipped

    def to_dict(self) -> dict:
        return asdict(self)

    def dropped(self) -> int:
        return self.skipped_malformed + self.dropped_identical + self.dropped_empty + self.dropped_too_long

    def summary(self) -> str:
        """One line for people: what was read, dropped (by reason) and cut."""
        return (f"data: {self.read} rows read ({self.format or 'records'}), {self.kept} pairs kept; dropped "
                f"{self.dropped()} (malformed {self.skipped_malformed}, identical {self.dropped_identical}, empty "
                f"{self.dropped_empty}, no difference left after truncation {self.dropped_too_long}); truncated "
                f"{self.truncated} (prompt {self.truncated_prompt} pairs, -{self.prompt_tokens_cut} tokens; "
                f"responses {self.truncated_response} pairs, -{self.response_tokens_cut} tokens)")

    def truncation_warning(self, max_share: float) -> str | None:
        """A warning line when more than `max_share` of the pairs read were cut or dropped for length."""
        if not self.read:
            return None
        share = (self.truncated) / self.read
        if share <= max_share:
            return None
        return (f"warning: {self.truncated} of {self.read} pairs ({share:.0%}) were truncated to fit data.max_length"
                f"/data.max_prompt_length ({self.dropped_too_long} of them dropped as no difference was left); "
                f"raise train.seq_length or data.max_length, or set data.warn_truncated_share to silence this")


@dataclass
class PackedRow:
    tokens: torch.Tensor  # [T] long (T <= seq_length: the row's length), pad_id after the real tokens
    labels: torch.Tensor  # [T] long, next token of the same sequence, else 0
    loss_mask: torch.Tensor  # [T] bool, True where labels[t] is a response token
    segment_ids: torch.Tensor  # [T] long, sequence index in the row; padding -1
    cu_seqlens: torch.Tensor  # [n_seq + 1 (+1 if padded)] int32, cu_seqlens[-1] == T
    max_seqlen: int  # longest segment of cu_seqlens, padding segment included
    pair_indices: torch.Tensor  # [n_pairs] long; sequence 2k is pair k's chosen, 2k+1 its rejected
    chosen_lengths: torch.Tensor  # [n_pairs] long, response tokens incl. EOS
    rejected_lengths: torch.Tensor  # [n_pairs] long
    num_real_tokens: int


# ---------------------------------------------------------------------------------------------
# Reading and validation
# ---------------------------------------------------------------------------------------------


class MalformedLine(ValueError):
    """What is wrong with one row; read_pairs adds the file, line number and fix."""


FORMATS_HINT = ("each row needs prompt + chosen + rejected (strings or chat messages), or TRL's conversational "
                "chosen/rejected message lists; other key names: set data.fields")


def read_pairs(path: str | Path, on_error: str = "error", fields: Mapping | None = None) -> tuple[list[dict], DataStats]:
    """Well-formed pairs {prompt, chosen, rejected} of a local dataset (JSONL, .jsonl.gz, Parquet,
    datasets.save_to_disk; see aipo_mp.data.readers) in any accepted schema (see normalize_pair).
    A malformed row raises DataError, or with on_error="skip" is skipped and counted. A file with
    no usable pair raises."""
    from aipo_mp.data.readers import BadRow, DataFormatError, read_rows

    if on_error not in ON_ERROR_MODES:
        raise DataError(f"data.on_error={on_error!r}: expected one of {', '.join(ON_ERROR_MODES)}")
    keys = field_names(fields)
    records, stats = [], DataStats()
    try:
        stats.format, rows = read_rows(path)
        for where, _, row in rows:
            stats.read += 1
            try:
                if isinstance(row, BadRow):
                    raise MalformedLine(row.problem)
                records.append(normalize_pair(row, keys))
            except MalformedLine as problem:
                if on_error == "error":
                    raise DataError(f"{where}: {problem}; fix the row, map other key names with data.fields, "
                                    "or set data.on_error=skip to drop such rows") from None
                stats.skipped_malformed += 1
                stats.first_skip_reason = stats.first_skip_reason or f"{where}: {problem}"
    except DataFormatError as e:
        raise DataError(str(e)) from None
    if not records:
        detail = f"; first problem: {stats.first_skip_reason}" if stats.first_skip_reason else ""
        raise DataError(f"{path}: contains no usable pairs ({stats.read} rows, {stats.skipped_malformed} "
                        f"malformed){detail}; {FORMATS_HINT}")
    stats.kept = len(records)
    return records, stats


def read_pairs_jsonl(path: str | Path, on_error: str = "error", fields: Mapping | None = None):
    """Kept for callers written before other formats were accepted (reads every format)."""
    return read_pairs(path, on_error, fields)


def field_names(fields: Mapping | None) -> dict:
    """data.fields: {prompt: KEY, chosen: KEY, rejected: KEY} (any subset) -> the key of each field."""
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(PAIR_FIELDS))
    if unknown:
        raise DataError(f"data.fields: unknown field(s) {', '.join(unknown)}; map prompt, chosen and rejected, "
                        "e.g. data.fields.chosen=response_j")
    for name, key in fields.items():
        if not isinstance(key, str) or not key:
            raise DataError(f"data.fields.{name}={key!r}: must be the name of a key in the rows")
    return {name: fields.get(name, name) for name in PAIR_FIELDS}


def normalize_pair(record, keys: Mapping = None) -> dict:
    """{prompt, chosen, rejected} from a row in one of the accepted schemas:

    * ours and TRL's standard format: prompt (string or chat messages), chosen and rejected strings;
    * TRL's standard implicit prompt: chosen and rejected strings only, the shared leading text is
      the prompt (as TRL's extract_prompt does);
    * TRL's conversational format: chosen and rejected are message lists ending in one assistant
      message; an explicit prompt is a message list, or absent (implicit prompt: the messages both
      share are the prompt). UltraFeedback-binarized rows (a string prompt repeated as the user
      turn of both conversations) are accepted too.
    Responses become the assistant message's text, so one pair gives the same tokens whatever its
    schema."""
    keys = keys or {f: f for f in PAIR_FIELDS}
    if not isinstance(record, dict):
        raise MalformedLine(f"expected a JSON object with prompt, chosen and rejected, got {json_type(record)}")
    other = {k: v for k, v in record.items() if k not in keys.values()}  # kept beside the pair (e.g. an id)
    return {**other, **pair_fields(record, keys)}


def pair_fields(record: dict, keys: Mapping) -> dict:
    for field in ("chosen", "rejected"):
        if keys[field] not in record or record[keys[field]] is None:
            have = ", ".join(sorted(record)[:8])
            raise MalformedLine(f"missing field '{keys[field]}' (keys present: {have})")
    chosen, rejected = record[keys["chosen"]], record[keys["rejected"]]
    prompt = record.get(keys["prompt"])
    if isinstance(chosen, list) or isinstance(rejected, list):
        return conversational_pair(prompt, chosen, rejected, keys)
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise MalformedLine(f"field '{keys[field]}' must be a string or a list of messages, got {json_type(value)}")
    if prompt is None:
        return implicit_text_pair(chosen, rejected, keys)
    check_prompt(prompt, keys["prompt"])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def implicit_text_pair(chosen: str, rejected: str, keys: Mapping) -> dict:
    """TRL's rule: the longest common prefix, a separating space left with the responses."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    if n and n < limit and chosen[n - 1] == " ":
        n -= 1
    if n == 0 or not chosen[:n].strip():
        raise MalformedLine(f"no field '{keys['prompt']}', and '{keys['chosen']}' and '{keys['rejected']}' share no "
                            "leading text to use as the prompt; add the prompt (or map its key with data.fields.prompt)")
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def conversational_pair(prompt, chosen, rejected, keys: Mapping) -> dict:
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, list):
            other = "rejected" if field == "chosen" else "chosen"
            raise MalformedLine(f"'{keys[other]}' is a list of messages but '{keys[field]}' is {json_type(value)}; "
                                "give both as message lists or both as strings")
        check_messages(value, keys[field])
    if isinstance(prompt, list):
        check_messages(prompt, keys["prompt"])
        prefix = prompt
        chosen, rejected = strip_prefix(prompt, chosen), strip_prefix(prompt, rejected)
    else:
        prefix = shared_prefix(chosen, rejected)
        if not prefix:
            raise MalformedLine(f"'{keys['chosen']}' and '{keys['rejected']}' are message lists that share no leading "
                                f"messages, and '{keys['prompt']}' is not a message list; give the prompt as a list of "
                                "{role, content} messages, or start both conversations with it")
        if isinstance(prompt, str) and not prompt_is_user_turn(prompt, prefix):
            raise MalformedLine(f"'{keys['chosen']}' is a list of messages but '{keys['prompt']}' is a string that is "
                                "not their shared user turn; give the prompt as a message list, or drop it so the "
                                "shared messages are the prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise MalformedLine(f"field '{keys['prompt']}' must be a list of messages (or absent), got {json_type(prompt)}")
        chosen, rejected = chosen[len(prefix):], rejected[len(prefix):]
    return {"prompt": prefix, "chosen": assistant_text(chosen, keys["chosen"]),
            "rejected": assistant_text(rejected, keys["rejected"])}


def check_messages(messages: list, field: str) -> None:
    if not messages:
        raise MalformedLine(f"field '{field}' is an empty message list")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise MalformedLine(f"'{field}' message {i} must be an object with string 'role' and 'content'")


def plain_messages(messages: list) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def shared_prefix(a: list, b: list) -> list[dict]:
    n = 0
    while n < min(len(a), len(b)) and plain_messages([a[n]]) == plain_messages([b[n]]):
        n += 1
    return plain_messages(a[:n])


def strip_prefix(prompt: list, conversation: list) -> list:
    """Explicit prompt: chosen holds only the answer, or repeats the prompt first (both occur)."""
    if plain_messages(conversation[:len(prompt)]) == plain_messages(prompt) and len(conversation) > len(prompt):
        return conversation[len(prompt):]
    return conversation


def prompt_is_user_turn(prompt: str, prefix: list[dict]) -> bool:
    users = [m["content"] for m in prefix if m["role"] == "user"]
    return bool(users) and users[-1].strip() == prompt.strip()


def assistant_text(rest: list, field: str) -> str:
    if len(rest) != 1 or rest[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in rest) or "nothing"
        raise MalformedLine(f"'{field}' continues after the prompt with {roles}; expected exactly one assistant "
                            "message (multi-turn answers are not supported)")
    return rest[0]["content"]


def check_prompt(prompt, field: str = "prompt") -> None:
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, list):
        raise MalformedLine(f"field '{field}' must be a string or a list of {{role, content}} messages, "
                            f"got {json_type(prompt)}")
    if not prompt:
        raise MalformedLine(f"field '{field}' is an empty message list")
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
    prompt_cut = len(prompt) - len(cut[0])
    response_cut = len(chosen) + len(rejected) - len(cut[1]) - len(cut[2])
    stats.truncated_prompt += prompt_cut > 0
    stats.prompt_tokens_cut += prompt_cut
    stats.truncated_response += response_cut > 0
    stats.response_tokens_cut += response_cut
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
               pad_id: int = 0, row_multiple: int = 0) -> list[PackedRow]:
    """Whole pairs packed into rows of at most `seq_length` tokens by first-fit-decreasing on pair
    length (ties broken by pair index, so the result is deterministic). A pair's two sequences
    are adjacent in one row. `max_pairs_per_row` > 0 caps the pairs in a row.
    row_multiple > 0: each row is padded only up to the next multiple of it (rows sized to their
    content); 0: every row is exactly `seq_length` long."""
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
    return [build_row(group, row_length(sum(p.num_tokens for p in group), seq_length, row_multiple), pad_id)
            for group in groups]


def row_length(real_tokens: int, seq_length: int, row_multiple: int) -> int:
    """Length of a row holding `real_tokens`: the next multiple of row_multiple (at least one
    multiple, so an empty row still divides over the layout), or seq_length when 0."""
    if row_multiple <= 0:
        return seq_length
    return max(row_multiple, -(-real_tokens // row_multiple) * row_multiple)


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


def build_row(pairs: list[TokenizedPair], length: int, pad_id: int) -> PackedRow:
    """One row of `length` tokens: the pairs' sequences in order, then padding."""
    sequences = [(p.prompt, response) for p in pairs for response in (p.chosen, p.rejected)]
    flat = [t for prompt, response in sequences for t in (*prompt, *response)]
    n = len(flat)
    tokens = torch.full((length,), pad_id, dtype=torch.long)
    tokens[:n] = torch.tensor(flat, dtype=torch.long)
    labels = torch.zeros(length, dtype=torch.long)
    labels[:n - 1] = tokens[1:n]
    loss_mask = torch.zeros(length, dtype=torch.bool)
    segment_ids = torch.full((length,), -1, dtype=torch.long)
    bounds = [0]
    for s, (prompt, response) in enumerate(sequences):
        start, end = bounds[-1], bounds[-1] + len(prompt) + len(response)
        labels[end - 1] = 0  # the last token predicts nothing inside its own sequence
        # Position t predicts t+1: the positions predicting response tokens (EOS included).
        loss_mask[start + len(prompt) - 1:end - 1] = True
        segment_ids[start:end] = s
        bounds.append(end)
    if n < length:
        bounds.append(length)  # the padding is one more segment, so cu_seqlens covers the row
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
    return sum(r.num_real_tokens for r in rows) / sum(r.tokens.numel() for r in rows)


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
