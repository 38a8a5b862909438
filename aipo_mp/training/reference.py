"""Reference log-probs: one forward-only pass over every pair before training (from the initial
policy, or from reference.path), cached beside the run and keyed by what it was computed from."""

from __future__ import annotations

from pathlib import Path

import torch

from aipo_mp.config import Config
from aipo_mp.errors import ConfigError
from aipo_mp.models import get_family
from aipo_mp.models.build import BuiltModel, build_model
from aipo_mp.runtime import platform
from aipo_mp.training import guards
from aipo_mp.training import identity as run_identity
from aipo_mp.training.batches import (
    attention_cost_coefficient,
    balanced_partition,
    pack_share,
    pair_cost,
    row_batch,
    schedule_rows,
)
from aipo_mp.training.forward import forward_only
from aipo_mp.training.logprobs import sequence_logprobs, token_logprobs
from aipo_mp.training.state import Layout, RunState, load_policy_weights, world_sum


def row_sequence_logps(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed response log-probs of the pairs in a row; logits [1, T, V/tp]."""
    tok = token_logprobs(logits[0], batch["labels"])
    seq = sequence_logprobs(tok, batch["loss_mask"], batch["segment_ids"], 2 * len(batch["row"].pair_indices))
    return seq[0::2], seq[1::2]


def reference_logps(built: BuiltModel, pairs, cfg: Config, lay: Layout) -> torch.Tensor:
    """[num_pairs, 2] (chosen, rejected) log-probs under `built`, one forward-only pass over all
    pairs split across data-parallel ranks by estimated cost, as the training steps are; every
    rank receives the full table."""
    coeff = attention_cost_coefficient(built.arch)
    share = balanced_partition([pair_cost(p, coeff) for p in pairs], lay.dp_size)[lay.dp_rank]
    rows = schedule_rows(pack_share([pairs[i] for i in share], cfg), cfg)
    table = torch.zeros(len(pairs), 2, dtype=torch.float32, device=platform.device())

    def collect(logits, batch):
        if len(batch["row"].pair_indices):  # every TP rank joins the vocab-parallel collectives
            c, r = row_sequence_logps(logits, batch)
            if lay.tp_rank == 0:
                table[batch["pair_indices"], 0] = c.float()
                table[batch["pair_indices"], 1] = r.float()

    for chunk in built.chunks:
        chunk.eval()
    if rows:
        batches = [row_batch(r, padding_mask=bool(built.arch.num_experts)) for r in rows]
        forward_only(built.chunks, batches, collect, cfg.train.seq_length, built.arch.hidden_size)
    for chunk in built.chunks:
        chunk.train()
    return world_sum(table).cpu()


def compute_reference(state: RunState) -> torch.Tensor:
    """Reference log-probs of every pair, saved beside the run (keyed by the data and weights they
    come from) so a resumed run reuses them. Called before a checkpoint is loaded, so in mode
    initial they always come from the initial weights."""
    cfg = state.cfg
    path = Path(cfg.output.dir) / "reference_logps.pt"
    key = run_identity.reference_key(state.stats["identity"])
    if path.exists():  # keyed by what it was computed from; another key is recomputed
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(saved, dict) and saved.get("key") == key and saved["table"].shape == (len(state.pairs), 2):
            return saved["table"]
        if isinstance(saved, torch.Tensor) and saved.shape == (len(state.pairs), 2):
            return saved  # written before tables were keyed; the run identity check guards its data
    if cfg.reference.mode == "model":
        from aipo_mp.models import arch_from_dir

        ref_arch = arch_from_dir(cfg.reference.path)
        if ref_arch != state.arch:
            raise ConfigError(f"reference.path={cfg.reference.path} has a different architecture from the policy; "
                              "the reference must be the same model family and size")
        ref = build_model(get_family(ref_arch.family), ref_arch, cfg.parallel, cfg.precision, initialize=False,
                          moe=cfg.moe)
        for p in (p for c in ref.chunks for p in c.parameters()):
            p.requires_grad_(False)
        load_policy_weights(ref, cfg.reference.path)
        table = reference_logps(ref, state.pairs, cfg, state.layout)
        del ref  # frees the reference before training
    else:
        table = reference_logps(state.built, state.pairs, cfg, state.layout)
    guards.check_reference(table)  # NaN weights: stop before training on them
    if torch.distributed.get_rank() == 0:
        tmp = path.with_suffix(".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "table": table}, tmp)
        tmp.replace(path)
    torch.distributed.barrier()
    return table
