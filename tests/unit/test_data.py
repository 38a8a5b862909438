"""Preference-pair data: the tiny tokenizer, reading/validation, the tokenization contract,
filtering, truncation and packing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from aipo_mp.data.pairs import (
    DataError,
    DataStats,
    TokenizedPair,
    pack_pairs,
    packed_utilization,
    padded_utilization,
    read_pairs_jsonl,
    synthetic_chat_lengths,
    synthetic_chat_pairs,
    tokenize_pairs,
)
from aipo_mp.testing.tiny import STAMP_NAME, build_tiny_tokenizer
from aipo_mp.tokenization import as_token_list

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
LONG_TEXT = " ".join(f"word{i} of the long answer" for i in range(60))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer") / "tok", vocab_size=512, seed=0)


@pytest.fixture(scope="session")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def write_lines(path: Path, lines: list) -> Path:
    """Objects become JSON lines; str and bytes are written verbatim (for malformed lines)."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return path


def pair(prompt="Say hi.", chosen="Hi there!", rejected="Go away.", **extra) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def tokenize(records, tok, max_length=1024, max_prompt_length=512):
    stats = DataStats()
    return tokenize_pairs(records, tok, max_length, max_prompt_length, stats), stats


# ---------------------------------------------------------------------------------------------
# Tiny tokenizer
# ---------------------------------------------------------------------------------------------


def test_tiny_tokenizer_loads_with_exact_vocab_and_chat_template(tok):
    assert len(tok) == 512
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    text = "Ünïcode, digits 12345 and emoji 😀\ttab"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text  # byte fallback: nothing lost
    rendered = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered == "<s><|system|>\nBe brief.\n<|user|>\nWhat is 2 + 2?\n<|assistant|>\n"
    assert not tok.apply_chat_template(CHAT, tokenize=False).endswith("<|assistant|>\n")


def test_tiny_tokenizer_is_cached_and_deterministic(tokenizer_dir, tmp_path):
    before = (tokenizer_dir / "tokenizer.json").stat().st_mtime_ns
    assert build_tiny_tokenizer(tokenizer_dir, vocab_size=512, seed=0) == tokenizer_dir
    assert (tokenizer_dir / "tokenizer.json").stat().st_mtime_ns == before  # stamp matched: no rebuild
    again = build_tiny_tokenizer(tmp_path / "again", vocab_size=512, seed=0)
    assert (again / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    other = build_tiny_tokenizer(tmp_path / "again", vocab_size=600, seed=0)  # new arguments: rebuilt in place
    assert json.loads((other / STAMP_NAME).read_text())["vocab_size"] == 600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temporary directories left


# ---------------------------------------------------------------------------------------------
# Tokenization contract
# ---------------------------------------------------------------------------------------------


def test_string_prompt_keeps_tokenizer_specials_and_responses_end_with_eos(tok):
    (p,), stats = tokenize([pair()], tok)
    assert p.prompt == tok("Say hi.").input_ids and p.prompt[0] == tok.bos_token_id
    assert p.chosen == tok("Hi there!", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert p.rejected == tok("Go away.", add_special_tokens=False).input_ids + [tok.eos_token_id]
    for response in (p.chosen, p.rejected):
        assert response[-1] == tok.eos_token_id and tok.bos_token_id not in response
    assert (p.index, stats.kept) == (0, 1)


def test_chat_prompt_equals_chat_template_output(tok):
    (p,), _ = tokenize([pair(prompt=CHAT)], tok)
    assert p.prompt == as_token_list(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True))
    assert p.prompt.count(tok.bos_token_id) == 1 and p.prompt[0] == tok.bos_token_id
    assert p.prompt[-len(tok("<|assistant|>\n", add_special_tokens=False).input_ids):] == \
        tok("<|assistant|>\n", add_special_tokens=False).input_ids


def test_as_token_list_normalises_every_return_shape():
    assert as_token_list({"input_ids": [1, 2]}) == [1, 2]
    assert as_token_list([[1, 2]]) == [1, 2]
    assert as_token_list(torch.tensor([[1, 2]])) == [1, 2]
    assert as_token_list([1, 2]) == [1, 2]


# ---------------------------------------------------------------------------------------------
# Reading and validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_line, expected", [
    ('{"prompt": "a", "chosen": "b" "rejected": "c"}', "not valid JSON"),
    ('{"prompt": "a", "chosen": "b"}', "missing field 'rejected'"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', "field 'chosen' must be a string or a list of messages, got number"),
    ('["a", "b", "c"]', "expected a JSON object"),
    ('{"prompt": [{"role": "user"}], "chosen": "b", "rejected": "c"}', "prompt message 0"),
    ('{"prompt": [], "chosen": "b", "rejected": "c"}', "empty message list"),
    (b'{"prompt": "\xff", "chosen": "b", "rejected": "c"}', "not valid UTF-8"),
])
def test_malformed_line_error_names_file_line_and_fix(tmp_path, bad_line, expected):
    path = write_lines(tmp_path / "pairs.jsonl", [pair(), "", bad_line, pair()])
    with pytest.raises(DataError) as info:
        read_pairs_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ") and expected in message
    assert "data.on_error=skip" in message and "\n" not in message


def test_skip_mode_skips_and_counts_malformed_lines(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [pair(), "{oops", pair(id=7), "", '{"prompt": 1}', pair()])
    records, stats = read_pairs_jsonl(path, on_error="skip")
    assert len(records) == 3 and records[1]["id"] == 7  # other fields are kept
    assert (stats.read, stats.skipped_malformed, stats.kept) == (5, 2, 3)


def test_missing_empty_and_unusable_files_raise(tmp_path):
    with pytest.raises(DataError, match="data.train: file not found: .*nope.jsonl"):
        read_pairs_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="contains no usable pairs"):
        read_pairs_jsonl(write_lines(tmp_path / "empty.jsonl", []))
    with pytest.raises(DataError, match="contains no usable pairs"):
        read_pairs_jsonl(write_lines(tmp_path / "bad.jsonl", ["{", "[]"]), on_error="skip")
    with pytest.raises(DataError, match="data.on_error"):
        read_pairs_jsonl(write_lines(tmp_path / "ok.jsonl", [pair()]), on_error="ignore")


def test_identical_and_empty_responses_are_dropped_and_counted(tok):
    records = [pair(), pair(chosen="Same.", rejected="Same."), pair(chosen="  \n"), pair(rejected=""),
               pair(prompt=CHAT, chosen="Four.", rejected="Five.")]
    pairs, stats = tokenize(records, tok)
    assert [p.index for p in pairs] == [0, 1]  # indices are positions in the kept dataset
    assert (stats.dropped_identical, stats.dropped_empty, stats.kept) == (1, 2, 2)


# ---------------------------------------------------------------------------------------------
# Truncation
# ---------------------------------------------------------------------------------------------


def test_truncation_cuts_prompt_from_left_first_then_responses(tok):
    full_prompt = tok(LONG_TEXT).input_ids
    full_long = tok(LONG_TEXT, add_special_tokens=False).input_ids + [tok.eos_token_id]
    short = tok("Ok.", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert len(full_prompt) > 200 and len(full_long) > 200

    # Short responses: the prompt loses only what is needed, from the left; BOS stays first.
    (p,), stats = tokenize([pair(prompt=LONG_TEXT, chosen="Ok.", rejected="No.")], tok, 100, 20)
    assert len(p.prompt) + max(len(p.chosen), len(p.rejected)) == 100
    assert p.prompt[0] == tok.bos_token_id and p.prompt[1:] == full_prompt[-(len(p.prompt) - 1):]
    assert p.chosen == short and stats.truncated == 1

    # Long responses: the prompt goes down to max_prompt_length, then responses are cut from the right.
    (p,), stats = tokenize([pair(prompt=LONG_TEXT, chosen=LONG_TEXT, rejected="No.")], tok, 100, 20)
    assert len(p.prompt) == 20 and p.prompt[1:] == full_prompt[-19:]
    assert p.chosen == full_long[:80] and len(p.prompt) + len(p.chosen) == 100
    assert p.rejected == tok("No.", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert stats.truncated == 1

    # A pair that fits is untouched and not counted.
    _, stats = tokenize([pair()], tok, 100, 20)
    assert stats.truncated == 0


def test_truncation_that_erases_the_difference_drops_the_pair(tok):
    records = [pair(chosen=LONG_TEXT + " yes", rejected=LONG_TEXT + " no"), pair()]
    pairs, stats = tokenize(records, tok, 64, 16)
    assert len(pairs) == 1 and pairs[0].index == 0
    assert (stats.truncated, stats.dropped_too_long, stats.kept) == (1, 1, 1)


def test_prompt_limit_that_leaves_no_room_raises_with_fix(tok):
    with pytest.raises(DataError, match="set data.max_prompt_length below data.max_length"):
        tokenize([pair(prompt=LONG_TEXT)], tok, 64, 64)


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def test_packed_row_layout_on_a_hand_built_example():
    pairs = [TokenizedPair(0, [1, 10, 11], [20, 21, 2], [30, 2]),
             TokenizedPair(1, [1, 12], [22, 2], [31, 32, 33, 2])]
    (row,) = pack_pairs(pairs, 24, pad_id=3)
    # FFD puts the longer pair (14 tokens) before the shorter (10); chosen before rejected.
    assert row.tokens.tolist() == [1, 10, 11, 20, 21, 2, 1, 10, 11, 30, 2,
                                   1, 12, 22, 2, 1, 12, 31, 32, 33, 2, 3, 3, 3]
    assert row.labels.tolist() == [10, 11, 20, 21, 2, 0, 10, 11, 30, 2, 0,
                                   12, 22, 2, 0, 12, 31, 32, 33, 2, 0, 0, 0, 0]
    assert row.loss_mask.nonzero().flatten().tolist() == [2, 3, 4, 8, 9, 12, 13, 16, 17, 18, 19]
    assert row.segment_ids.tolist() == [0] * 6 + [1] * 5 + [2] * 4 + [3] * 6 + [-1] * 3
    assert row.cu_seqlens.tolist() == [0, 6, 11, 15, 21, 24] and row.cu_seqlens.dtype == torch.int32
    assert row.max_seqlen == 6 and row.num_real_tokens == 21
    assert row.pair_indices.tolist() == [0, 1]
    assert row.chosen_lengths.tolist() == [3, 2] and row.rejected_lengths.tolist() == [2, 4]
    responses = [[20, 21, 2], [30, 2], [22, 2], [31, 32, 33, 2]]
    for s, response in enumerate(responses):  # masked labels are exactly the response, EOS included
        assert row.labels[row.loss_mask & (row.segment_ids == s)].tolist() == response


def test_exactly_full_row_has_no_padding_segment():
    (row,) = pack_pairs([TokenizedPair(0, [1, 5], [6, 2], [7, 2])], 8)
    assert row.cu_seqlens.tolist() == [0, 4, 8] and (row.segment_ids >= 0).all()


def check_row_invariants(row, by_index: dict[int, TokenizedPair], seq_length: int) -> None:
    cu = row.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == seq_length and all(a < b for a, b in zip(cu, cu[1:]))
    assert row.max_seqlen == max(b - a for a, b in zip(cu, cu[1:]))
    n_seq = 2 * len(row.pair_indices)
    assert len(cu) - 1 == n_seq + (row.num_real_tokens < seq_length)
    for k, index in enumerate(row.pair_indices.tolist()):
        p = by_index[index]
        for s, response in ((2 * k, p.chosen), (2 * k + 1, p.rejected)):
            start, end = cu[s], cu[s + 1]
            assert (row.segment_ids[start:end] == s).all()
            assert row.tokens[start:end].tolist() == p.prompt + response
            assert row.labels[end - 1] == 0 and not row.loss_mask[end - 1]  # nothing crosses the boundary
            assert row.labels[row.loss_mask & (row.segment_ids == s)].tolist() == response
    assert (row.segment_ids[row.num_real_tokens:] == -1).all() and not row.loss_mask[row.num_real_tokens:].any()
    masked = row.loss_mask.nonzero().flatten()
    assert (row.segment_ids[masked] == row.segment_ids[masked + 1]).all()


def test_packing_invariants_cap_and_determinism():
    seq_length = 512
    pairs = synthetic_chat_pairs(300, seed=3)
    pairs = [TokenizedPair(p.index, p.prompt[:60], p.chosen[:98], p.rejected[:98]) for p in pairs]  # <= 512
    by_index = {p.index: p for p in pairs}
    rows = pack_pairs(pairs, seq_length)
    packed = sorted(i for r in rows for i in r.pair_indices.tolist())
    assert packed == list(range(300))  # every pair exactly once, whole
    for row in rows:
        check_row_invariants(row, by_index, seq_length)

    shuffled = pairs[:]
    random.Random(0).shuffle(shuffled)
    again = pack_pairs(shuffled, seq_length)  # same pairs in another order: the same rows
    assert [r.pair_indices.tolist() for r in again] == [r.pair_indices.tolist() for r in rows]
    assert all(torch.equal(a.tokens, b.tokens) and torch.equal(a.cu_seqlens, b.cu_seqlens)
               for a, b in zip(again, rows))

    capped = pack_pairs(pairs, seq_length, max_pairs_per_row=2)
    assert max(len(r.pair_indices) for r in capped) == 2
    assert sorted(i for r in capped for i in r.pair_indices.tolist()) == list(range(300))


def test_pair_longer_than_a_row_raises_with_fix():
    with pytest.raises(DataError, match="pair 4 needs 10 tokens but train.seq_length is 8; raise train.seq_length"):
        pack_pairs([TokenizedPair(4, [1, 5, 5], [6, 2], [7, 2])], 8)
    assert pack_pairs([], 8) == []


def test_read_tokenize_pack_end_to_end(tmp_path, tok):
    records = [pair(prompt=CHAT, chosen="Four.", rejected="Five, I think."), pair(), pair(prompt=LONG_TEXT)]
    path = write_lines(tmp_path / "pairs.jsonl", records)
    read, stats = read_pairs_jsonl(path)
    pairs = tokenize_pairs(read, tok, 128, 32, stats)
    rows = pack_pairs(pairs, 256, pad_id=tok.pad_token_id)
    counts = {k: v for k, v in stats.to_dict().items() if k not in ("prompt_tokens_cut", "first_skip_reason")}
    assert counts == {"read": 3, "kept": 3, "skipped_malformed": 0, "dropped_identical": 0, "dropped_empty": 0,
                      "truncated": 1, "dropped_too_long": 0, "truncated_prompt": 1, "truncated_response": 0,
                      "response_tokens_cut": 0, "format": "jsonl"}
    long_prompt = len(tok(LONG_TEXT).input_ids)
    kept_prompt = max(32, 128 - max(len(pairs[2].chosen), len(pairs[2].rejected)))
    assert len(pairs[2].prompt) == kept_prompt and stats.prompt_tokens_cut == long_prompt - kept_prompt
    for row in rows:
        check_row_invariants(row, {p.index: p for p in pairs}, 256)
    row = next(r for r in rows if 0 in r.pair_indices.tolist())
    k = row.pair_indices.tolist().index(0)
    chosen_ids = row.labels[row.loss_mask & (row.segment_ids == 2 * k)].tolist()
    assert tok.decode(chosen_ids) == "Four.</s>"


def test_packing_utilization_on_chat_like_lengths():
    """Chat-like lengths (`synthetic_chat_lengths`): prompts lognormal with median 60 tokens,
    responses lognormal with median 150, clipped to 512 each; 3000 pairs into rows of 2048.
    Padding every sequence to 2048 wastes most of the compute; packing should waste < 5%."""
    seq_length = 2048
    pairs = synthetic_chat_pairs(3000, seed=0)
    lengths = synthetic_chat_lengths(3000, seed=0)
    assert [(len(p.prompt), len(p.chosen), len(p.rejected)) for p in pairs] == lengths
    rows = pack_pairs(pairs, seq_length)
    packed, padded = packed_utilization(rows), padded_utilization(pairs, seq_length)
    print(f"\nutilization, 3000 chat-like pairs, seq_length {seq_length}: packed {packed:.4f} "
          f"({len(rows)} rows), padded {padded:.4f} ({2 * len(pairs)} rows)")
    assert packed >= 0.95 and packed > padded


# ---------------------------------------------------------------------------------------------
# Formats and schemas users have (aipo_mp.data.readers, normalize_pair)
# ---------------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "What is 2 + 2?"}]
OURS = {"prompt": USER, "chosen": "Four.", "rejected": "Five."}


def answer(text):
    return [{"role": "assistant", "content": text}]


SCHEMAS = [  # (name, row, data.fields) -> all normalize to OURS
    ("ours", OURS, None),
    ("trl conversational explicit prompt", {"prompt": USER, "chosen": answer("Four."), "rejected": answer("Five.")}, None),
    ("trl conversational implicit prompt", {"chosen": USER + answer("Four."), "rejected": USER + answer("Five.")}, None),
    ("explicit prompt repeated in the conversations",
     {"prompt": USER, "chosen": USER + answer("Four."), "rejected": USER + answer("Five.")}, None),
    ("ultrafeedback-binarized style", {"prompt": "What is 2 + 2?", "chosen": USER + answer("Four."),
                                       "rejected": USER + answer("Five."), "score_chosen": 9.0}, None),
    ("data.fields mapping", {"question": USER, "response_j": "Four.", "response_k": "Five."},
     {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}),
]


@pytest.mark.parametrize("name,row,fields", SCHEMAS, ids=[s[0] for s in SCHEMAS])
def test_every_schema_gives_the_same_pair(name, row, fields):
    from aipo_mp.data.pairs import field_names, normalize_pair

    got = normalize_pair(row, field_names(fields))
    assert {k: got[k] for k in ("prompt", "chosen", "rejected")} == OURS


def test_trl_standard_implicit_prompt_splits_like_trl():
    from aipo_mp.data.pairs import normalize_pair

    got = normalize_pair({"chosen": "The sky is blue.", "rejected": "The sky is green."})
    assert got == {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}


BAD_ROWS = [
    ({"prompt": "Something else", "chosen": USER + answer("a"), "rejected": USER + answer("b")},
     "'chosen' is a list of messages but 'prompt' is a string that is not their shared user turn"),
    ({"prompt": "x", "chosen": answer("a"), "rejected": "b"}, "'chosen' is a list of messages but 'rejected' is string"),
    ({"chosen": [{"role": "user", "content": "p"}] + answer("a"), "rejected": [{"role": "user", "content": "q"}]
      + answer("b")}, "share no leading messages"),
    ({"chosen": USER + answer("a") + USER, "rejected": USER + answer("b")}, "expected exactly one assistant message"),
    ({"chosen": "abc", "rejected": "xyz"}, "share no leading text"),
    ({"chosen": USER + [{"role": "assistant"}], "rejected": USER + answer("b")}, "'chosen' message 1 must be"),
    ({"question": "q", "chosen": "a"}, "missing field 'rejected' (keys present: chosen, question)"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS, ids=[m[:30] for _, m in BAD_ROWS])
def test_schema_problems_are_named(tmp_path, row, message):
    path = write_lines(tmp_path / "pairs.jsonl", [OURS, row])
    with pytest.raises(DataError) as info:
        read_pairs_jsonl(path)
    text = str(info.value)
    assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text, text
    assert "data.fields" in text  # the fix for other key names is named


def test_unknown_data_fields_key_is_refused(tmp_path):
    from aipo_mp.data.pairs import read_pairs

    with pytest.raises(DataError, match="data.fields: unknown field"):
        read_pairs(write_lines(tmp_path / "p.jsonl", [OURS]), fields={"answer": "x"})


def test_file_formats_read_the_same_pairs(tmp_path):
    """JSONL, .jsonl.gz, Parquet (also misnamed .jsonl), a directory of Parquet files and a
    datasets.save_to_disk directory all give the same records; stats name the format."""
    import gzip

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aipo_mp.data.pairs import read_pairs

    rows = [dict(OURS, id=i, chosen=f"Four {i}.") for i in range(5)]
    jsonl = write_lines(tmp_path / "p.jsonl", rows)
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    misnamed = tmp_path / "really_parquet.jsonl"
    misnamed.write_bytes(parquet.read_bytes())
    pdir = tmp_path / "pdir"
    pdir.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2]), pdir / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:]), pdir / "part-1.parquet")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    expected, _ = read_pairs(jsonl)
    for path, fmt in ((gz, "jsonl.gz"), (parquet, "parquet"), (misnamed, "parquet"), (pdir, "parquet-dir"),
                      (saved, "save_to_disk")):
        got, stats = read_pairs(path)
        assert got == expected and stats.format == fmt, path


def test_damaged_files_are_one_line(tmp_path):
    from aipo_mp.data.pairs import read_pairs

    gz = tmp_path / "cut.jsonl.gz"
    import gzip

    gz.write_bytes(gzip.compress(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 50)[:40])
    cut_parquet = tmp_path / "cut.parquet"
    cut_parquet.write_bytes(b"PAR1" + b"\0" * 20)
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    for path, needle in ((gz, "cannot be read as gzip-compressed JSONL"), (cut_parquet, "not a readable Parquet file"),
                         (empty_dir, "directory without Parquet files"), (tmp_path / "missing.jsonl", "file not found")):
        with pytest.raises(DataError) as info:
            read_pairs(path)
        assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_skip_mode_names_the_first_problem_when_nothing_is_left(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(DataError) as info:
        read_pairs_jsonl(path, on_error="skip")
    assert "first problem" in str(info.value) and "missing field 'chosen'" in str(info.value)
    assert "data.fields" in str(info.value)


def test_prompts_read_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aipo_mp.data.records import read_prompts

    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "Hello", "answer": "4"}, {"prompt": "Bye", "answer": "5"}]), path)
    assert read_prompts(path) == [{"id": 0, "prompt": "Hello", "meta": {"answer": "4"}},
                                  {"id": 1, "prompt": "Bye", "meta": {"answer": "5"}}]


def test_truncation_is_counted_and_warned(tok):
    records = [pair(prompt=LONG_TEXT), pair(chosen=LONG_TEXT, rejected=LONG_TEXT + " no"), pair()]
    pairs, stats = tokenize(records, tok, max_length=48, max_prompt_length=16)
    stats.read = 3
    assert stats.truncated == 2 and stats.truncated_prompt == 1 and stats.truncated_response == 1
    assert stats.dropped_too_long == 1  # the second pair differed only past the cut
    assert stats.prompt_tokens_cut > 0 and stats.response_tokens_cut > 0
    assert "truncated 2 (prompt 1 pairs" in stats.summary()
    assert stats.truncation_warning(0.5) and "2 of 3 pairs (67%)" in stats.truncation_warning(0.5)
    assert stats.truncation_warning(0.7) is None
