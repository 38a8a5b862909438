"""vLLM (CPU) on mixture-of-experts checkpoints: the trainer's handoff of the tiny Qwen3-MoE (one
dense layer) and Mixtral (4 experts, top-2), written at TP2 x EP2 x ETP2 with sequence parallelism
(tests/handoff_worker.py, as the trainer writes it), loads in vLLM; its teacher-forced log-probs
equal transformers' on the same directory (fp32, <= 1e-4); it samples (fields, seeded
determinism); the KL stage's sums (aipo_mp.rounds.report.kl_sums, vLLM log-probs of the policy and
of an initial MoE policy) equal transformers'; and a one-label MoE reward classifier of each
family scores through the reward stage (vLLM pooling) as transformers does. Tiny DeepSeek-V3
(latent attention at the only latent size vLLM's CPU kernel takes, 512 + 64; yarn RoPE; grouped
sigmoid routing with an expert bias; a shared expert), handed off by the trainer from a
config.json without vLLM's routing keys (as transformers writes it), and a transformers-built tiny
gpt-oss (attention sinks, biases, a sliding-window layer, yarn RoPE) handed off by the trainer at
TP2 x EP2 + SP in its fused expert layout: `aipo-mp sample` samples with each, and vLLM's
teacher-forced log-probs equal transformers'. Real vLLM and transformers, tiny
models built here; no mocks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.conftest import MOE_MODELS, tiny_arch
from tests.launch import run_ranks

TOL = 1e-4  # fp32, vLLM vs transformers
LAYOUT = dict(tp=2, sp=True, ep=2, etp=2)
PROMPTS = [
    {"id": "a", "prompt": "Explain why the sky is blue."},
    {"id": "b", "prompt": [{"role": "user", "content": "Name some colors."}]},
    {"id": "c", "prompt": "Step 1:"},
]
SPEC = dict(n=3, temperature=1.0, max_tokens=16, seed=7, kv_cache_gib=0.125, max_model_len=256)
LARGE_MOE = ("deepseek_v3", "gpt_oss")  # the issue-20 families


@pytest.fixture(scope="module")
def moe(tiny_hf_dirs, tmp_path_factory) -> dict:
    """{family: {"policy": handoff dir, "initial": another MoE policy, "reward": MoE classifier}}."""
    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    base = tmp_path_factory.mktemp("moe_vllm")
    tok = build_tiny_tokenizer(base / "tokenizer", vocab_size=512)  # BPE: Qwen families need it
    cases, dirs = [], {}
    for fam in MOE_MODELS:
        out = base / f"{fam}_handoff"
        cases.append(dict(hf_dir=str(tiny_hf_dirs[fam]), out=str(out), extra=str(tok), **LAYOUT))
        dirs[fam] = {"policy": out,
                     "initial": save_hf_model(tiny_arch(fam), base / f"{fam}_initial", seed=12, tokenizer_dir=tok),
                     "reward": save_reward_model(fam, base / f"{fam}_reward", tok)}
    # DeepSeek-V3 from a config.json without topk_method/scoring_func (transformers does not write
    # them): the handoff must add them, or vLLM routes without the groups and the expert bias.
    source = save_hf_model(tiny_arch("deepseek_v3"), base / "deepseek_v3_source", seed=11, tokenizer_dir=tok)
    cfg = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({k: v for k, v in cfg.items()
                                                    if k not in ("topk_method", "scoring_func")}))
    cases.append(dict(hf_dir=str(source), out=str(base / "deepseek_v3_handoff"), extra=str(tok), **LAYOUT))
    dirs["deepseek_v3"] = {"policy": base / "deepseek_v3_handoff", "source": source}
    # gpt-oss built and saved by transformers (fused, gate/up-interleaved experts), handed off by the
    # trainer at TP2 x EP2 + SP (expert-TP 1: megatron's expert biases), which writes that layout back.
    gpt_oss = save_tiny_gpt_oss(base / "gpt_oss_source", tok)
    cases.append(dict(hf_dir=str(gpt_oss), out=str(base / "gpt_oss_handoff"), extra=str(tok), tp=2, sp=True, ep=2,
                      etp=1))
    dirs["gpt_oss"] = {"policy": base / "gpt_oss_handoff", "source": gpt_oss}
    spec = base / "handoff.json"
    spec.write_text(json.dumps({"cases": cases}))
    run_ranks(4, "tests.handoff_worker", [str(spec)])
    for fam in MOE_MODELS:  # vLLM reads the tokenizer from the model directory
        assert (dirs[fam]["policy"] / "tokenizer.json").exists() or (dirs[fam]["policy"] / "tokenizer.model").exists()
    return dirs


def assert_same_tensors(source: Path, copy: Path) -> None:
    """Every tensor of `source` in `copy`, bit for bit and in its dtype, and nothing else."""
    import torch

    from aipo_mp.convert.hf_io import HFWeights

    a, b = HFWeights(source), HFWeights(copy)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        x, y = a.get(name), b.get(name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


def save_tiny_gpt_oss(out: Path, tok_dir: Path) -> Path:
    """A tiny GptOssForCausalLM built and saved by transformers (fp32): head_dim 64 (vLLM's CPU
    attention needs >= 32), layer 0 sliding (window 8, shorter than most test rows), layer 1 full,
    yarn RoPE; sinks, routers and every bias drawn away from 0."""
    import torch
    from transformers import AutoTokenizer, GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(vocab_size=512, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=4,
                       num_experts_per_tok=2, sliding_window=8, max_position_embeddings=256,
                       layer_types=["sliding_attention", "full_attention"],
                       rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                        "beta_slow": 1.0, "original_max_position_embeddings": 64, "truncate": False})
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if ("sinks" in name or "router" in name) else 0.05)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tok_dir)).save_pretrained(out)
    return out


def save_reward_model(fam: str, out: Path, tok_dir: Path) -> Path:
    """A one-label *ForSequenceClassification of the family's tiny MoE architecture."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from aipo_mp.models import hf_config_for

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    cfg = hf_config_for(tiny_arch(fam))
    model_type = cfg.pop("model_type")
    cfg.pop("architectures", None)
    config = AutoConfig.for_model(model_type, **cfg, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # scores of order 1; routers far from ties
            p.normal_(0.0, 0.5 if ("score" in name or name.endswith("gate.weight")) else 0.05)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def hf_logprobs(model_dir, token_lists) -> list[list[float]]:
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                       attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), f"{model_dir}: loading problems {info}"
    out = []
    with torch.no_grad():
        for ids in token_lists:
            x = torch.tensor([ids])
            logp = torch.log_softmax(model.eval()(x).logits.float(), dim=-1)[0, :-1]
            out.append(logp.gather(-1, x[0, 1:, None])[:, 0].tolist())
    return out


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def token_lists(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(4, 512) for _ in range(length)] for length in (4, 17, 40, 90)]


@pytest.mark.slow
@pytest.mark.parametrize("fam", MOE_MODELS)
def test_moe_handoff_in_vllm(moe, fam, tmp_path):
    from transformers import AutoTokenizer

    from aipo_mp.config import SamplingConfig
    from aipo_mp.rounds.engines import close_engine, logprobs_of, start_engine
    from aipo_mp.rounds.report import kl_sums, sample_token_lists
    from aipo_mp.rounds.sampling import sample

    policy, initial = moe[fam]["policy"], moe[fam]["initial"]
    spec = SamplingConfig(**SPEC)

    # Teacher-forced log-probs and sampling on one engine.
    llm = start_engine(policy, kv_cache_gib=spec.kv_cache_gib, max_model_len=spec.max_model_len)
    try:
        ids = token_lists()
        diff = max_diff(logprobs_of(llm, ids), hf_logprobs(policy, ids))
        print(f"\n{fam} handoff ({LAYOUT}): vLLM vs transformers teacher-forced log-probs, max |diff| = {diff:.2e}")
        assert diff <= TOL
        samples = sample(llm, PROMPTS, spec, tmp_path / "samples.jsonl")
        again = sample(llm, PROMPTS, spec)
    finally:
        close_engine(llm)
    assert len(samples) == len(PROMPTS) * spec.n and again == samples
    for k, s in enumerate(samples):
        assert s["prompt_id"] == PROMPTS[k // spec.n]["id"] and s["sample_index"] == k % spec.n
        assert s["finish_reason"] in ("stop", "length") and 1 <= s["num_tokens"] <= spec.max_tokens
    assert len({s["text"] for s in samples}) > len(samples) // 2, samples  # temperature 1: diverse

    # The KL stage's sums (vLLM log-probs of the policy and the initial policy) vs transformers.
    run_dir = tmp_path / "run"
    (run_dir / "round_1").mkdir(parents=True)
    (tmp_path / "samples.jsonl").rename(run_dir / "round_1" / "samples.jsonl")
    [row] = kl_sums(run_dir, [f"1={policy}"], str(initial))
    kept = [s for s in samples if s.get("text")]
    lists = sample_token_lists(kept, AutoTokenizer.from_pretrained(str(policy)))
    lp_pol, lp_init = hf_logprobs(policy, [x for x, _ in lists]), hf_logprobs(initial, [x for x, _ in lists])
    want = sum(sum(a[n - 1:]) - sum(b[n - 1:]) for a, b, (_, n) in zip(lp_pol, lp_init, lists))
    tokens = sum(len(x) - n for x, n in lists)
    print(f"{fam} KL sum over {row['count']} samples ({tokens} response tokens): vLLM {row['sum']:.6f}, "
          f"transformers {want:.6f}")
    tol = TOL * 2 * tokens
    assert row["count"] == len(kept) and abs(row["sum"] - want) <= tol
    assert abs(want) > 10 * tol  # the two policies really differ: a sum of 0 would not pass


@pytest.mark.slow
@pytest.mark.parametrize("fam", MOE_MODELS)
def test_moe_reward_model_in_vllm(moe, fam):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from aipo_mp.rounds.rewards import reward_input_ids, score_with_model

    rm = moe[fam]["reward"]
    records = [{"prompt_id": p["id"], "prompt": p["prompt"], "sample_index": k, "text": text, "num_tokens": 3,
                "finish_reason": "stop", "chat_format": True}
               for p in PROMPTS for k, text in enumerate([" blue and red", " I do not know the answer"])]
    scored = score_with_model(records, rm, kv_cache_gib=0.125, max_model_len=256)
    tokenizer = AutoTokenizer.from_pretrained(str(rm))
    model = AutoModelForSequenceClassification.from_pretrained(str(rm), dtype=torch.float32).eval()
    with torch.no_grad():
        want = [model(torch.tensor([reward_input_ids(r, tokenizer)])).logits[0, 0].item() for r in records]
    diff = max(abs(s["score"] - w) for s, w in zip(scored, want))
    print(f"\n{fam} MoE reward model: vLLM vs transformers scores, max |diff| = {diff:.2e} "
          f"(scores span {min(want):.3f}..{max(want):.3f})")
    assert diff <= TOL and max(want) - min(want) > 0.01


@pytest.mark.slow
@pytest.mark.parametrize("fam", LARGE_MOE)
def test_deepseek_v3_and_gpt_oss_sample_in_vllm(moe, fam, tmp_path):
    """`aipo-mp sample` on the policy directory (its own engine, in this process), then vLLM's
    teacher-forced log-probs equal transformers' on the same directory."""
    from aipo_mp.cli import main
    from aipo_mp.rounds.engines import logprobs_of

    policy = moe[fam]["policy"]
    if fam == "deepseek_v3":
        assert "topk_method" not in json.loads((moe[fam]["source"] / "config.json").read_text())
        cfg = json.loads((policy / "config.json").read_text())
        assert (cfg["topk_method"], cfg["scoring_func"]) == ("noaux_tc", "sigmoid")
        assert_same_tensors(moe[fam]["source"], policy)  # the expert bias (a buffer) included, fp32
    if fam == "gpt_oss":
        from aipo_mp.convert.hf_io import HFWeights

        assert_same_tensors(moe[fam]["source"], policy)  # sinks, biases, every expert's slice
        stored = set(HFWeights(policy).files)  # as stored: one fused tensor per layer, as transformers wrote it
        assert stored == set(HFWeights(moe[fam]["source"]).files) and "model.layers.1.mlp.experts.down_proj" in stored
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "samples.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    with pytest.raises(SystemExit) as done:
        main(["sample", "--model", str(policy), "--prompts", str(prompts), "--out", str(out),
              *(f"sampling.{k}={v}" for k, v in SPEC.items())])
    assert done.value.code == 0
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(samples) == len(PROMPTS) * SPEC["n"]
    assert all(1 <= s["num_tokens"] <= SPEC["max_tokens"] and s["finish_reason"] in ("stop", "length")
               for s in samples), samples
    assert len({s["text"] for s in samples}) > len(samples) // 2, samples  # temperature 1: diverse

    ids = token_lists()
    got = logprobs_of(str(policy), ids, kv_cache_gib=SPEC["kv_cache_gib"], max_model_len=SPEC["max_model_len"])
    diff = max_diff(got, hf_logprobs(policy, ids))
    print(f"\n{fam}: vLLM vs transformers teacher-forced log-probs over {sum(map(len, ids))} tokens, "
          f"max |diff| = {diff:.2e}")
    assert diff <= TOL
