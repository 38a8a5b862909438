"""The vLLM-served parts of ranking and synthesis, on one in-process CPU engine of a tiny
locally built Llama: the LLM judge's verdicts against transformers' log-probs, its ranking and
invariance to the answer order, and the self-instruct stage generating with vLLM, stopped in its
second batch and rerun (same prompts as an uninterrupted run). Placed over the allocation: the
judge's reward stage of `aipo-mp run` on the two-node Slurm cluster on localhost (one srun task and
engine per node) ranks as the one engine does, and the synthesize stage split over two engine
tasks writes the one engine's prompts."""

from __future__ import annotations

import json
import math
import threading
import time

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

    # Split over two engine tasks (each generating its half of every batch): the one engine's prompts.
    t0 = time.time()
    two = synthesize_on_two_engine_tasks(judge, seeds, settings, synth, sampling, tmp_path / "two",
                                         tmp_path / "shards")
    print(f"\nsynthesize split over two engine tasks: {time.time() - t0:.0f} s")
    assert two[0] == two[1] == (straight, stats)
    assert (tmp_path / "two" / "prompts.jsonl").read_text() == (tmp_path / "straight" / "prompts.jsonl").read_text()
    markers = [json.loads((tmp_path / "shards" / "batch_000" / "of2" / f"shard_{k:05d}.json").read_text())
               for k in range(2)]  # batch 0's 20 generation prompts: 10 per engine
    assert [(m["rank"], m["start"], m["end"]) for m in markers] == [(0, 0, 10), (1, 10, 20)]

    with pytest.raises(KeyboardInterrupt):
        synthesize(seeds, stopped_in_batch_1, count, settings, tmp_path / "resumed", 2)
    resumed, again = synthesize(seeds, generate, count, settings, tmp_path / "resumed", 2)
    assert resumed == straight and again == stats
    assert (tmp_path / "resumed" / "prompts.jsonl").read_text() == (tmp_path / "straight" / "prompts.jsonl").read_text()



JUDGE_STAGE = """
import sys
from pathlib import Path
from aipo_mp.config import load_config
from aipo_mp.rounds.launchers import SlurmLauncher
from aipo_mp.rounds.run import RoundRunner
path = Path(sys.argv[1])
RoundRunner(load_config(str(path)), path, SlurmLauncher(handle_signals=False), world_size=2).reward(0)
"""


@pytest.mark.slow
def test_judge_stage_on_two_slurm_nodes_ranks_as_one_engine(judge, tmp_path, slurm_cluster, slurm_env):
    """The judge's reward stage of `aipo-mp run` inside an sbatch job on the two-node cluster on
    localhost (reward.replicas=2, one GPU slot per node): one srun task per node, each with its
    own judge engine on its own shard of whole prompts; the merged ranking equals one engine's."""
    import sys

    from aipo_mp.config import config_from_dict, dump_config
    from aipo_mp.rounds.shards import ShardDir
    from tests.e2e.test_slurm import read, submit_and_wait, write_script

    texts = ["green silver orange", "the a of", "purple yellow", "one two three four", "yes", "red red"]
    samples = [{"prompt_id": p, "prompt": f"Name some colors, {p}.", "sample_index": s, "text": texts[(p + s) % 6]}
               for s in range(3) for p in range(4)]  # interleaved prompts: merged back in this order
    want = rank_samples(samples, JudgeComparator(judge["llm"], TEMPLATE), "bradley_terry", kind="judge")

    run = tmp_path / "run"
    cfg = config_from_dict({"model": {"path": "x"}, "output": {"dir": str(run)},
                            "reward": {"kind": "judge", "model": str(judge["dir"]), "replicas": 2, "template": TEMPLATE,
                                       "kv_cache_gib": 0.25, "max_model_len": 512},
                            "cluster": {"launcher": "slurm", "nodes": 2, "nproc_per_node": 1}})
    (run / "round_0").mkdir(parents=True)
    dump_config(cfg, run / "config.yaml")
    (run / "round_0" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    (tmp_path / "driver.py").write_text(JUDGE_STAGE)
    t0 = time.time()
    info = submit_and_wait(slurm_cluster, slurm_env, write_script(
        tmp_path / "judge.sh", ["-N 2", "-n 2", f"-o {tmp_path}/judge.out"],
        f"{sys.executable} {tmp_path}/driver.py {run / 'config.yaml'}"), tmp_path / "judge.out", timeout=900)
    print(f"\njudge stage on two Slurm nodes: {time.time() - t0:.0f} s")
    logs = read(tmp_path / "judge.out")[-3000:] + read(run / "logs" / "round0-reward.log")[-3000:]
    assert info["JobState"] == "COMPLETED", logs
    rank_logs = sorted((run / "logs" / "round0-reward").glob("rank*.log"))
    got = [json.loads(line) for line in (run / "round_0" / "scored.jsonl").read_text().splitlines()]
    assert [(g["prompt_id"], g["sample_index"]) for g in got] == [(w["prompt_id"], w["sample_index"]) for w in want]
    assert [g["rank"] for g in got] == [w["rank"] for w in want]
    assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-6)
    markers = ShardDir(run / "round_0" / "shards" / "reward", 2).markers()
    assert [(m["rank"], m["start"], m["end"]) for m in markers] == [(0, 0, 6), (1, 6, 12)]  # 2 prompts each
    assert sorted(m["node"] for m in markers) == ["n1", "n2"] and len(rank_logs) == 2, logs  # one engine per node


class SharedEngine:
    """TEST-ONLY: the module's one live engine shared by two engine tasks running as threads, so
    that the sharded synthesize stage can be compared without two more engine starts. vLLM's
    in-process engine runs only in the main thread: a task's `generate` is queued and served
    there (`serve`), one request at a time. What each task generates, with which seeds, is the
    stage's own code."""

    def __init__(self, llm):
        import queue

        self.llm, self.requests = llm, queue.Queue()

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def generate(self, *args, **kwargs):
        import queue

        reply: queue.Queue = queue.Queue()
        self.requests.put((args, kwargs, reply))
        ok, value = reply.get()
        if not ok:
            raise value
        return value

    def serve(self, threads) -> None:
        import queue

        while any(t.is_alive() for t in threads):
            try:
                args, kwargs, reply = self.requests.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                reply.put((True, self.llm.generate(*args, **kwargs)))
            except BaseException as e:  # noqa: BLE001 - handed back to the task that asked
                reply.put((False, e))


class NoStop:
    def __init__(self):
        self.requested = False


def synthesize_on_two_engine_tasks(judge, seeds, settings, synth, sampling, out_dir, shard_root):
    from aipo_mp.rounds.synthesize import ShardedGenerator

    count, results, errors = token_counter(judge["dir"]), {}, []
    shared = SharedEngine(judge["llm"])

    def task(engine):
        generate = ShardedGenerator(judge["dir"], synth, sampling, 2, shard_root, stop, engine, 2)
        generate.llm = shared  # never closed here: the fixture closes it
        try:
            results[engine] = synthesize(seeds, generate, count, settings, out_dir, 2, writes=engine == 0)
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)
            stop.requested = True  # the other task stops waiting for this one's shards

    stop = NoStop()
    threads = [threading.Thread(target=task, args=(e,)) for e in (0, 1)]
    for t in threads:
        t.start()
    shared.serve(threads)
    assert not errors, errors
    return results
