"""The vLLM-served parts of ranking and synthesis, on one in-process CPU engine of a tiny
locally built Llama: the LLM judge's verdicts against transformers' log-probs, its ranking and
invariance to the answer order, and the self-instruct stage generating with vLLM, stopped in its
second batch and rerun (same prompts as an uninterrupted run)."""

from __future__ import annotations

import math

import pytest

from aipo_mp.config import SamplingConfig, SynthesizeConfig
from aipo_mp.rounds.engines import close_engine, start_engine
from aipo_mp.rounds.rankers import JudgeComparator, rank_samples
from aipo_mp.rounds.synthesize import synthesize, token_counter, vllm_generator
from tests.conftest import tiny_arch

TEMPLATE = "Question: {prompt}\nAnswer A: {a}\nAnswer B: {b}\nThe better answer is"


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    base = tmp_path_factory.mktemp("judge")
    model_dir = save_hf_model(tiny_arch("llama"), base / "judge", seed=7, tokenizer_dir=build_tiny_tokenizer(base / "tok"))
    llm = start_engine(model_dir, kv_cache_gib=0.25, max_model_len=512)
    yield {"dir": model_dir, "llm": llm}
    close_engine(llm)


def candidates(texts):
    return [{"prompt_id": "p", "prompt": "Name some colors.", "sample_index": k, "text": t} for k, t in enumerate(texts)]


def test_judge_verdicts_match_transformers_and_rank(judge):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    comparator = JudgeComparator(judge["llm"], TEMPLATE, answers=(" A", " B"))
    items = [("Name some colors.", "green silver orange", "the a of"), ("Hi", "yes", "no thanks")]
    got = comparator(items)

    tok = AutoTokenizer.from_pretrained(str(judge["dir"]))
    model = AutoModelForCausalLM.from_pretrained(str(judge["dir"]), dtype=torch.float32).eval()

    def answer_logprob(prompt_ids, answer):
        ids = prompt_ids + tok(answer, add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        return sum(logp[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids)))

    for (prompt, a, b), p in zip(items, got):
        prompt_ids = tok(TEMPLATE.format(prompt=prompt, a=a, b=b)).input_ids
        want = 1 / (1 + math.exp(answer_logprob(prompt_ids, " B") - answer_logprob(prompt_ids, " A")))
        assert p == pytest.approx(want, abs=1e-4)

    texts = ["green silver orange", "the a of", "purple yellow", "one two three four"]
    ranked = rank_samples(candidates(texts), comparator, "bradley_terry", kind="judge")
    assert sorted(r["rank"] for r in ranked) == [1, 2, 3, 4] and {r["ranker"] for r in ranked} == {"judge"}
    # The same judge shown B first (the template with the answers exchanged): the same ranking.
    swapped = JudgeComparator(judge["llm"], "Question: {prompt}\nAnswer A: {b}\nAnswer B: {a}\nThe better answer is")
    flip = rank_samples(candidates(texts), lambda items: [1 - p for p in swapped(items)], "bradley_terry", kind="judge")
    assert [r["rank"] for r in flip] == [r["rank"] for r in ranked]
    assert [r["score"] for r in flip] == pytest.approx([r["score"] for r in ranked], abs=1e-4)
    copeland = rank_samples(candidates(texts), comparator, "copeland", kind="judge")
    assert sorted(r["rank"] for r in copeland) == [1, 2, 3, 4]


def test_synthesize_with_vllm_stopped_and_rerun(judge, tmp_path):
    seeds = [{"id": k, "prompt": t} for k, t in enumerate([
        "Name three colors.", "List some fruits you like.", "Describe the sea in one line.",
        "Give a word that rhymes with cat.", "Say hello in French.", "Count from one to five."])]
    synth = SynthesizeConfig(enabled=True, temperature=1.0, top_p=0.9, generation_max_tokens=16)
    sampling = SamplingConfig(kv_cache_gib=0.25)
    settings = SynthesizeConfig(num_clusters=2, examples_per_prompt=3, new_per_prompt=2, total=40, min_tokens=1,
                                 max_tokens=64, max_batches=2, seed=5)
    generate = vllm_generator(judge["llm"], synth, sampling, round_idx=2)
    count = token_counter(judge["dir"])
    straight, stats = synthesize(seeds, generate, count, settings, tmp_path / "straight", 2)
    assert stats["batches"] == 2 and stats["completions"] > 0
    assert stats["parsed_instructions"] == stats["kept"] + stats["over_total"] + sum(stats["dropped"].values())

    def stopped_in_batch_1(prompts, batch):
        if batch == 1:
            raise KeyboardInterrupt("stopped")
        return generate(prompts, batch)

    with pytest.raises(KeyboardInterrupt):
        synthesize(seeds, stopped_in_batch_1, count, settings, tmp_path / "resumed", 2)
    resumed, again = synthesize(seeds, generate, count, settings, tmp_path / "resumed", 2)
    assert resumed == straight and again == stats
    assert (tmp_path / "resumed" / "prompts.jsonl").read_text() == (tmp_path / "straight" / "prompts.jsonl").read_text()

