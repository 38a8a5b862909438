"""data.train is tokenized once per job: with a shared output directory only global rank 0
tokenizes (also when every rank is the first of its node), with node-local output directories
the first rank of each node does, a rerun reads the cache, and every rank gets the same pairs as
tokenizing directly; a data error reaches every rank as the same line. Two gloo ranks, one
launch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_arch
from tests.launch import run_ranks

TINY = str(ROOT / "configs" / "models" / "tiny_llama.yaml")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.synthetic import marker_pairs, write_jsonl
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    base = tmp_path_factory.mktemp("token_cache")
    tok = build_tiny_tokenizer(base / "tok", vocab_size=512)
    model = save_hf_model(tiny_arch("llama"), base / "llama", seed=3, tokenizer_dir=tok)
    pairs = write_jsonl(marker_pairs(12, seed=1), base / "pairs.jsonl")
    bad = base / "bad.jsonl"
    bad.write_text(pairs.read_text() + '{"prompt": "q", "chosen": 3}\n')
    scenarios = [
        {"name": "one_node", "data": str(pairs), "out": str(base / "shared"), "local_rank": "rank"},
        {"name": "rerun", "data": str(pairs), "out": str(base / "shared"), "local_rank": "rank"},
        {"name": "nodes_shared_disk", "data": str(pairs), "out": str(base / "shared2"), "local_rank": 0},
        {"name": "nodes_local_disks", "data": str(pairs), "out": str(base / "local{rank}"), "local_rank": 0},
        {"name": "bad_data", "data": str(bad), "out": str(base / "bad"), "local_rank": "rank"},
    ]
    spec = base / "spec.json"
    spec.write_text(json.dumps({"config": TINY, "model": str(model), "scenarios": scenarios}))
    run_ranks(2, "tests.token_cache_worker", [str(spec), str(base)])
    from aipo_mp.config import load_config
    from aipo_mp.convert.hf_io import load_tokenizer
    from aipo_mp.data.prepare import prepare_pairs

    direct, _, _ = prepare_pairs(load_config(TINY, [f"model.path={model}", f"data.train={pairs}",
                                                    "train.seq_length=128"]), load_tokenizer(str(model), False))
    out = {s["name"]: [json.loads((base / f"{s['name']}.rank{r}.json").read_text()) for r in (0, 1)]
           for s in scenarios}
    out["_direct"] = [[p.index, p.prompt, p.chosen, p.rejected] for p in direct]
    out["_base"] = str(base)
    return out


@pytest.mark.dist
@pytest.mark.parametrize("name,tokenized", [("one_node", [1, 0]), ("rerun", [0, 0]), ("nodes_shared_disk", [1, 0]),
                                            ("nodes_local_disks", [1, 1])])
def test_tokenized_once_per_job_and_read_by_the_others(results, name, tokenized):
    got = results[name]
    assert [r["tokenized"] for r in got] == tokenized
    assert len(results["_direct"]) == 12
    for r in got:
        assert r["pairs"] == results["_direct"] and r["kept"] == 12
    assert got[0]["fingerprint"] == got[1]["fingerprint"]


@pytest.mark.dist
def test_cache_files_and_a_data_error_on_every_rank(results):
    base = Path(results["_base"])
    assert len(list((base / "shared" / "token_cache").glob("pairs-*.npz"))) == 1
    assert list((base / "local1" / "token_cache").glob("pairs-*.npz"))  # the second node wrote its own
    errors = [r.get("error") for r in results["bad_data"]]
    assert errors[0] and errors[0] == errors[1] and "bad.jsonl:13" in errors[0][0], errors
    assert not list(base.glob("bad/token_cache/*.npz"))
