"""A round's data stages on a real vLLM CPU engine with tiny locally built models (no mocks):
sampling (fields, determinism, chat templates, data-parallel replicas), teacher-forced log-probs
and weight reloading against transformers, reward-model scores against transformers, rule
rewards, and the pairs builder.

One policy engine and one reward engine serve the whole module (in-process, small KV cache)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from aipo_mp.config import SamplingConfig, build_section, check_section
from aipo_mp.data.records import read_prompts
from aipo_mp.errors import CheckpointError, ConfigError, DataError
from aipo_mp.rounds.engines import close_engine, logprobs_of, reload_weights, start_engine
from aipo_mp.rounds.pairs import build_pairs
from aipo_mp.rounds.rewards import check_reward_model, score_with_model, score_with_rule
from aipo_mp.rounds.sampling import generate_records, prompt_seed, sample, shard_bounds
from aipo_mp.tokenization import encode_prompt
from tests.conftest import tiny_arch

TOL = 1e-4  # fp32 vLLM vs transformers


# ---------------------------------------------------------------------------------------------
# Rules used by the rule-reward tests (imported by name, as a user's rule would be)
# ---------------------------------------------------------------------------------------------


def length_rule(prompt, response):
    return float(len(response))


def raising_rule(prompt, response):
    if "prompt" in str(prompt):
        raise ValueError("cannot grade this")
    return 1.0


def nan_rule(prompt, response):
    return float("nan")


def reference_rule(prompt, response, meta):
    return 1.0 if response == meta.get("answer") else 0.0


# ---------------------------------------------------------------------------------------------
# Prompts and settings (no engine)
# ---------------------------------------------------------------------------------------------


def test_read_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "prompt": "Hello"}\n\n{"prompt": [{"role": "user", "content": "Hi"}], "answer": 4}\n')
    records = read_prompts(path)
    assert records == [{"id": "a", "prompt": "Hello"},
                       {"id": 2, "prompt": [{"role": "user", "content": "Hi"}], "meta": {"answer": 4}}]

    bad = tmp_path / "bad.jsonl"
    for line, needle in [('{"prompt": 3}', "must be a string or a list"), ("{oops", "not valid JSON"),
                         ('{"prompt": [{"role": "user"}]}', "message 0"), ('{"text": "x"}', "missing field 'prompt'"),
                         ('{"id": 1.5, "prompt": "x"}', "field 'id'")]:
        bad.write_text('{"prompt": "fine"}\n' + line + "\n")
        with pytest.raises(DataError, match=f"{bad}:2: .*{needle}"):
            read_prompts(bad)
    bad.write_text('{"id": 1, "prompt": "x"}\n{"id": 1, "prompt": "y"}\n')
    with pytest.raises(DataError, match="already used on line 1"):
        read_prompts(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="contains no prompts"):
        read_prompts(empty)


def test_sampling_spec_and_seeds():
    with pytest.raises(ConfigError) as e:
        check_section(SamplingConfig(n=0, top_p=0.0, temperature=-1), "sampling.")
    assert len(e.value.errors) == 3
    with pytest.raises(ConfigError, match="unknown config key sampling.temprature; did you mean sampling.temperature"):
        build_section(SamplingConfig, {"n": 2, "temprature": 1.0}, "sampling.")
    assert shard_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    seeds = {prompt_seed(s, i, 5) for s in range(3) for i in range(100)}
    assert len(seeds) == 300 and max(seeds) < 2**31 - 5


# ---------------------------------------------------------------------------------------------
# Rule rewards and the pairs builder (no engine)
# ---------------------------------------------------------------------------------------------


def fake_samples():
    return [{"prompt_id": p, "prompt": f"prompt {p}", "sample_index": k, "text": f"answer {p}-{k}" + "!" * k,
             "num_tokens": 3 + k, "finish_reason": "stop", "chat_format": False}
            for p in range(2) for k in range(3)]


def test_rule_rewards(tmp_path):
    samples = fake_samples()
    scored = score_with_rule(samples, "tests.e2e.test_rounds_stages:length_rule", tmp_path / "scored.jsonl")
    assert [s["score"] for s in scored] == [float(len(s["text"])) for s in samples]
    assert [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()] == scored

    with pytest.raises(ConfigError, match=r"raised ValueError: cannot grade this on prompt_id=0 sample_index=0; make"):
        score_with_rule(samples, "tests.e2e.test_rounds_stages:raising_rule")
    with pytest.raises(ConfigError, match=r"non-finite score \(nan\) for prompt_id=0 sample_index=0"):
        score_with_rule(samples, "tests.e2e.test_rounds_stages:nan_rule")
    with pytest.raises(ConfigError, match="has no function missing"):
        score_with_rule(samples, "tests.e2e.test_rounds_stages:missing")
    with pytest.raises(ConfigError, match="cannot import"):
        score_with_rule(samples, "no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="must look like"):
        score_with_rule(samples, "length_rule")
    assert not (tmp_path / "scored2.jsonl").exists()

    with_meta = [{**s, "meta": {"answer": "answer 0-1!"}} for s in samples[:3]]
    assert [s["score"] for s in score_with_rule(with_meta, "tests.e2e.test_rounds_stages:reference_rule")] == [0, 1, 0]


def scored_record(pid, k, text, score, finish="stop", tokens=10):
    return {"prompt_id": pid, "prompt": f"q{pid}", "sample_index": k, "text": text, "score": score,
            "num_tokens": tokens, "finish_reason": finish, "chat_format": pid == "chat"}


def hand_scored():
    return [
        # kept: best c (0.9), worst a (0.1); duplicate text of a counted once
        *[scored_record("ok", k, t, s, tokens=n) for k, (t, s, n) in
          enumerate([("a", 0.1, 4), ("b", 0.5, 6), ("c", 0.9, 8), ("a", 0.1, 4)])],
        scored_record("one", 0, "only", 1.0),  # too_few_samples
        scored_record("cut", 0, "x", 1.0, "length"), scored_record("cut", 1, "y", 0.0),  # truncated
        scored_record("same", 0, "z", 1.0), scored_record("same", 1, "z", 1.0),  # identical_texts
        scored_record("tie", 0, "u", 0.5), scored_record("tie", 1, "v", 0.5),  # small_gap (0)
        scored_record("near", 0, "u", 0.5), scored_record("near", 1, "v", 0.45),  # small_gap (< min_gap)
        # chat_format string prompt: the pair's prompt becomes one user message
        scored_record("chat", 0, "p", 2.0, tokens=3), scored_record("chat", 1, "q", -1.0, tokens=5),
    ]


def test_build_pairs_best_worst(tmp_path):
    pairs, stats = build_pairs(hand_scored(), min_gap=0.1, out_dir=tmp_path)
    assert [(p["prompt_id"], p["chosen"], p["rejected"]) for p in pairs] == [("ok", "c", "a"), ("chat", "p", "q")]
    assert pairs[0]["prompt"] == "q" + "ok" and pairs[1]["prompt"] == [{"role": "user", "content": "qchat"}]
    assert pairs[0]["chosen_score"] == 0.9 and pairs[0]["rejected_score"] == 0.1
    assert stats["prompts"] == 7 and stats["kept"] == 2 and stats["kept_prompts"] == 2
    assert stats["dropped"] == {"too_few_samples": 1, "truncated": 1, "identical_texts": 1, "small_gap": 2,
                              "small_rank_gap": 0}
    assert stats["truncated_samples_left_out"] == 1
    assert stats["mean_chosen_tokens"] == (8 + 3) / 2 and stats["mean_rejected_tokens"] == (4 + 5) / 2
    assert math.isclose(stats["mean_gap"], (0.8 + 3.0) / 2)
    on_disk = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert on_disk == pairs and json.loads((tmp_path / "pairs_stats.json").read_text()) == stats

    # allow_truncated keeps the cut answer; min_gap 0 still drops exact ties
    pairs, stats = build_pairs(hand_scored(), allow_truncated=True)
    assert {p["prompt_id"] for p in pairs} == {"ok", "cut", "near", "chat"}
    assert stats["dropped"] == {"too_few_samples": 1, "truncated": 0, "identical_texts": 1, "small_gap": 1,
                              "small_rank_gap": 0}

    with pytest.raises(ConfigError, match="mode"):
        build_pairs(hand_scored(), mode="best")
    with pytest.raises(ConfigError, match="needs mode 'ranked'"):
        build_pairs(hand_scored(), max_pairs_per_prompt=2)
    with pytest.raises(ConfigError, match="scores must be finite"):
        build_pairs([scored_record("x", 0, "a", float("inf"))])


def test_build_pairs_ranked():
    scored = [scored_record("p", k, t, s) for k, (t, s) in enumerate([("a", 0.0), ("b", 1.0), ("c", 3.0), ("d", 6.0)])]
    scored += [scored_record("q", k, t, s) for k, (t, s) in enumerate([("e", 0.0), ("f", 10.0)])]
    pairs, stats = build_pairs(scored, mode="ranked", min_gap=1.5)
    # p: d>a 6, d>b 5, d>c 3, c>a 3 (ties: better chosen first), c>b 2, (b>a 1 < min_gap); q: f>e 10.
    # Largest gap first over the whole file.
    assert [(p["chosen"], p["rejected"], p["gap"]) for p in pairs] == [
        ("f", "e", 10.0), ("d", "a", 6.0), ("d", "b", 5.0), ("d", "c", 3.0), ("c", "a", 3.0), ("c", "b", 2.0)]
    assert stats["kept"] == 6 and stats["kept_prompts"] == 2
    pairs, _ = build_pairs(scored, mode="ranked", min_gap=1.5, max_pairs_per_prompt=2)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("f", "e"), ("d", "a"), ("d", "b")]


# ---------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    base = tmp_path_factory.mktemp("rounds")
    tok_dir = build_tiny_tokenizer(base / "tokenizer")
    arch = tiny_arch("llama")
    dirs = {"tokenizer": tok_dir,
            "policy": save_hf_model(arch, base / "policy", seed=3, tokenizer_dir=tok_dir),
            "policy2": save_hf_model(arch, base / "policy2", seed=4, tokenizer_dir=tok_dir)}

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                         num_labels=1, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    reward = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        for name, p in reward.named_parameters():
            p.normal_(0.0, 0.5 if "score" in name else 0.05)  # scores of order 1
    dirs["reward"] = base / "reward"
    reward.save_pretrained(dirs["reward"], safe_serialization=True)
    tokenizer.save_pretrained(dirs["reward"])

    config.num_labels = 2
    dirs["two_labels"] = base / "two_labels"
    config.save_pretrained(dirs["two_labels"])
    return dirs


@pytest.fixture(scope="module")
def policy_llm(tiny):
    llm = start_engine(tiny["policy"], kv_cache_gib=0.25, max_model_len=512)
    yield llm
    close_engine(llm)


@pytest.fixture(scope="module")
def reward_llm(tiny, policy_llm):  # after the policy engine: it is closed first
    llm = start_engine(tiny["reward"], runner="pooling", kv_cache_gib=0.125)
    yield llm
    close_engine(llm)


PROMPTS = [
    {"id": "s0", "prompt": "Explain why the sky is blue."},
    {"id": "s1", "prompt": "Write a list of two numbers:", "meta": {"answer": "1 2"}},
    {"id": "c0", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]},
    {"id": 7, "prompt": "Step 1:"},
    {"id": "s4", "prompt": "Thanks, here is the code"},
]
SPEC = dict(n=4, temperature=1.0, max_tokens=24, seed=7)


@pytest.fixture(scope="module")
def samples(policy_llm, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples") / "samples.jsonl"
    start = time.perf_counter()
    records = sample(policy_llm, PROMPTS, SamplingConfig(**SPEC), out)
    print(f"\nsampling {len(PROMPTS)} prompts x {SPEC['n']}: {time.perf_counter() - start:.2f} s")
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    return records


# ---------------------------------------------------------------------------------------------
# Reward-model checks that need no engine
# ---------------------------------------------------------------------------------------------


def test_reward_model_must_be_one_label_classifier(tiny):
    check_reward_model(tiny["reward"])
    with pytest.raises(ConfigError, match=r"not a one-label sequence classifier \(architectures=\['LlamaForCausalLM'\]"):
        score_with_model(fake_samples(), tiny["policy"])
    with pytest.raises(ConfigError, match=r"architectures=\['LlamaForSequenceClassification'\], num_labels=2"):
        score_with_model(fake_samples(), tiny["two_labels"])
    with pytest.raises(ConfigError, match="has no readable config.json"):
        check_reward_model(tiny["tokenizer"])


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


DIRECTORY_RUN: dict = {}  # sampled from a model directory before any module engine exists


@pytest.mark.slow
def test_sample_from_directory_in_process(tiny, tmp_path):
    """A directory and no live engine: the engine starts here and is shut down on return (this
    test runs before the module's engines start, in file order)."""
    from aipo_mp.rounds.engines import engine_in_use

    if engine_in_use():
        pytest.skip("an engine of this module is already alive (tests reordered)")
    start = time.perf_counter()
    records = sample(tiny["policy"], PROMPTS, SamplingConfig(**SPEC), tmp_path / "samples.jsonl")
    print(f"\nsample() from a directory (engine start, sampling, shutdown): {time.perf_counter() - start:.1f} s")
    assert len(records) == len(PROMPTS) * SPEC["n"] and not engine_in_use()
    DIRECTORY_RUN["samples"] = records


@pytest.mark.slow
def test_sampling_fields_and_determinism(policy_llm, samples):
    spec = SamplingConfig(**SPEC)
    assert len(samples) == len(PROMPTS) * spec.n
    for k, record in enumerate(samples):
        prompt = PROMPTS[k // spec.n]
        assert record["prompt_id"] == prompt["id"] and record["prompt"] == prompt["prompt"]
        assert record["sample_index"] == k % spec.n
        assert isinstance(record["text"], str) and 1 <= record["num_tokens"] <= spec.max_tokens
        assert record["finish_reason"] in ("stop", "length")
        assert record["finish_reason"] == "stop" or record["num_tokens"] == spec.max_tokens
        assert record["chat_format"] is True  # the tiny tokenizer has a template; chat_template defaults on
    assert samples[spec.n]["meta"] == {"answer": "1 2"}
    assert len({r["text"] for r in samples}) > len(samples) // 2  # temperature 1 on a random model: diverse

    assert sample(policy_llm, PROMPTS, spec) == samples  # same seed, same samples
    assert sample(policy_llm, PROMPTS, SamplingConfig(**{**SPEC, "seed": 8})) != samples
    # A prompt's samples depend on its position only, not on the batch it is in.
    assert generate_records(policy_llm, PROMPTS[3:], spec, index_offset=3) == samples[3 * spec.n:]


@pytest.mark.slow
def test_chat_prompts_use_the_template(policy_llm, samples):
    tokenizer = policy_llm.get_tokenizer()
    chat = PROMPTS[2]["prompt"]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered == "<s><|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\n"
    ids, is_chat = encode_prompt(tokenizer, chat)
    assert is_chat and ids == tokenizer(rendered, add_special_tokens=False).input_ids
    assert samples[2 * 4]["num_prompt_tokens"] == len(ids)

    text = PROMPTS[0]["prompt"]
    ids, is_chat = encode_prompt(tokenizer, text, chat_template=True)
    one_message = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=False)
    assert is_chat and ids == tokenizer(one_message, add_special_tokens=False).input_ids
    assert encode_prompt(tokenizer, text, chat_template=False) == (tokenizer(text).input_ids, False)
    plain = sample(policy_llm, PROMPTS[:1], SamplingConfig(**{**SPEC, "chat_template": False}))
    assert {r["chat_format"] for r in plain} == {False}
    assert plain[0]["num_prompt_tokens"] == len(tokenizer(text).input_ids)

    # The pairs file carries the prompt so that the trainer's tokenization reproduces these ids.
    from aipo_mp.tokenization import encode_prompts

    scored = score_with_rule(samples, "tests.e2e.test_rounds_stages:length_rule")
    pairs, _ = build_pairs(scored, allow_truncated=True)
    by_id = {r["prompt_id"]: r["num_prompt_tokens"] for r in samples}
    assert [len(ids) for ids in encode_prompts([p["prompt"] for p in pairs], tokenizer)] == \
           [by_id[p["prompt_id"]] for p in pairs]

    template = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        with pytest.raises(ConfigError, match="has no chat template"):
            encode_prompt(tokenizer, chat)
        assert encode_prompt(tokenizer, text)[1] is False  # string prompts fall back to plain text
    finally:
        tokenizer.chat_template = template


@pytest.mark.slow
def test_replicas_match_one_engine(tiny, samples, tmp_path):
    """Two replicas, each its own engine in its own process, on contiguous shards: the merged
    file equals the single-engine samples (per-prompt seeds)."""
    start = time.perf_counter()
    out = tmp_path / "samples.jsonl"
    merged = sample(tiny["policy"], PROMPTS, SamplingConfig(**SPEC, replicas=2), out)
    print(f"\n2 replicas (2 processes): {time.perf_counter() - start:.1f} s")
    assert merged == samples
    if "samples" in DIRECTORY_RUN:  # the in-process run from a directory gave the same samples
        assert DIRECTORY_RUN["samples"] == samples
    assert [json.loads(line) for line in out.read_text().splitlines()] == samples
    assert not [p for p in tmp_path.iterdir() if p.name != "samples.jsonl"]  # shard files cleaned up


# ---------------------------------------------------------------------------------------------
# Teacher-forced log-probs and weight reloading
# ---------------------------------------------------------------------------------------------


def hf_logprobs(model_dir, token_lists) -> list[list[float]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    out = []
    with torch.no_grad():
        for ids in token_lists:
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(x).logits.float(), dim=-1)[0, :-1]
            out.append(logp.gather(-1, x[0, 1:, None])[:, 0].tolist())
    return out


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def token_lists(seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[1] + [rng.randrange(4, 512) for _ in range(length)] for length in (4, 17, 40, 90)]


@pytest.mark.slow
def test_logprobs_match_transformers(policy_llm, tiny):
    ids = token_lists()
    ours = logprobs_of(policy_llm, ids)
    assert [len(x) for x in ours] == [len(x) - 1 for x in ids]
    diff = max_diff(ours, hf_logprobs(tiny["policy"], ids))
    print(f"\nteacher-forced log-probs, vLLM vs transformers: max |diff| = {diff:.2e}")
    assert diff < TOL
    with pytest.raises(ConfigError, match="another vLLM engine is alive"):
        logprobs_of(tiny["policy"], ids)


@pytest.mark.slow
def test_reload_weights_on_live_engine(policy_llm, tiny, samples):
    ids = token_lists(1)
    before = logprobs_of(policy_llm, ids)
    expected = hf_logprobs(tiny["policy2"], ids)
    try:
        start = time.perf_counter()
        reload_weights(policy_llm, tiny["policy2"])
        print(f"\nreload_weights: {time.perf_counter() - start:.2f} s")
        after = logprobs_of(policy_llm, ids)
        diff = max_diff(after, expected)
        print(f"log-probs after reload vs transformers on the new weights: max |diff| = {diff:.2e}; "
              f"vs the old weights: {max_diff(after, before):.2f}")
        assert diff < TOL and max_diff(after, before) > 0.1
        assert sample(policy_llm, PROMPTS, SamplingConfig(**SPEC)) != samples  # new weights, new answers
    finally:
        reload_weights(policy_llm, tiny["policy"])
    assert max_diff(logprobs_of(policy_llm, ids), before) < 1e-6
    assert sample(policy_llm, PROMPTS, SamplingConfig(**SPEC)) == samples
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        reload_weights(policy_llm, tiny["tokenizer"])


# ---------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reward_model_matches_transformers(reward_llm, policy_llm, tiny, samples, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from aipo_mp.rounds.rewards import reward_input_ids

    plain = [{**s, "chat_format": False} for s in samples if isinstance(s["prompt"], str)][:6]
    records = samples + plain
    start = time.perf_counter()
    scored = score_with_model(records, reward_llm, tmp_path / "scored.jsonl")
    print(f"\nreward model on {len(records)} samples: {time.perf_counter() - start:.2f} s")
    assert [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()] == scored
    assert [{k: v for k, v in s.items() if k != "score"} for s in scored] == records

    tokenizer = AutoTokenizer.from_pretrained(str(tiny["reward"]))
    ids = [reward_input_ids(r, tokenizer) for r in records]
    # chat samples: the reward template with the answer as the assistant turn; plain: prompt + answer
    chat = records[2 * 4]
    assert tokenizer.decode(ids[2 * 4]) == tokenizer.apply_chat_template(
        chat["prompt"] + [{"role": "assistant", "content": chat["text"]}], tokenize=False)
    assert ids[-1] == tokenizer(plain[-1]["prompt"] + plain[-1]["text"]).input_ids

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny["reward"]), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = [model(torch.tensor([x])).logits[0, 0].item() for x in ids]
    diff = max(abs(s["score"] - e) for s, e in zip(scored, expected))
    print(f"reward scores, vLLM vs transformers: max |diff| = {diff:.2e} (scores span "
          f"{min(expected):.3f}..{max(expected):.3f})")
    assert diff < TOL and max(expected) - min(expected) > 0.01

    # A directory while engines are alive here: scored by a child process, same numbers.
    start = time.perf_counter()
    again = score_with_model(records[:4], tiny["reward"])
    print(f"reward model directory in a child process: {time.perf_counter() - start:.1f} s")
    assert max(abs(a["score"] - s["score"]) for a, s in zip(again, scored)) < 1e-6

    with pytest.raises(ConfigError, match="runner='pooling'"):
        score_with_model(records, policy_llm)
