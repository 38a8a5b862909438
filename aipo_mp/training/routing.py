"""Mixture-of-experts routing while training: per-layer expert load, tokens dropped by the
capacity limit, and how far the policy's routing has moved from the initial policy's.

A `RouterTap` hooks every router of this rank's chunks. The training forward passes feed the
load counters (padding excluded); `routing_changed_share` runs one fixed probe row per rank
through the model and compares each token's top-k experts, layer by layer, with those the
initial weights chose (recorded before any checkpoint is loaded, so a resumed run compares with
the same initial routing). With the default reference (the initial policy, or the round's start
in `aipo-mp run`) that is the policy-vs-reference routing disagreement.
"""

from __future__ import annotations

from typing import Optional

import torch

from aipo_mp.runtime import platform
from aipo_mp.training.batches import row_batch, schedule_rows, step_rows
from aipo_mp.training.forward import forward_only
from aipo_mp.training.state import RunState, world_sum


def in_backward() -> bool:
    """True while autograd runs a backward pass (activation recomputation re-runs the router)."""
    return torch._C._current_graph_task_id() != -1


class RouterTap:
    def __init__(self, chunks: list, num_layers: int, num_experts: int, top_k: int):
        self.top_k = top_k
        dev = platform.device()
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=dev)
        self.kept = torch.zeros(num_layers, dtype=torch.float64, device=dev)  # routed (token, expert) slots
        self.tokens = torch.zeros(num_layers, dtype=torch.float64, device=dev)  # non-padding tokens
        self.recording: Optional[dict[int, torch.Tensor]] = None
        self.handles = []
        for chunk in chunks:
            for layer in chunk.decoder.layers:
                router = getattr(layer.mlp, "router", None)
                if router is not None:
                    self.handles.append(router.register_forward_hook(self.hook(layer.layer_number - 1),
                                                                     with_kwargs=True))

    def hook(self, layer: int):
        def record(_module, args, kwargs, output):
            if in_backward():
                return
            routing_map = output[1]
            padding = kwargs.get("padding_mask", args[1] if len(args) > 1 else None)
            if padding is not None:
                routing_map = routing_map[~padding.reshape(-1)]
            if self.recording is not None:
                self.recording[layer] = routing_map.detach().clone()
                return
            with torch.no_grad():
                self.counts[layer] += routing_map.sum(0).double()
                self.kept[layer] += routing_map.sum().double()
                self.tokens[layer] += routing_map.shape[0]

        return record

    def reset(self) -> None:
        for t in (self.counts, self.kept, self.tokens):
            t.zero_()

    def step_metrics(self, moe_layers: list[int]) -> dict:
        """Expert load of the step over every rank: per MoE layer the most and the mean tokens
        per expert, their worst ratio, and the share of top-k slots the capacity limit dropped."""
        counts, kept, tokens = (world_sum(t.clone()) for t in (self.counts, self.kept, self.tokens))
        self.reset()
        per_layer = counts[moe_layers]
        most, mean = per_layer.max(1).values, per_layer.mean(1)
        slots = (tokens[moe_layers] * self.top_k).sum()
        return {
            "moe/load_max": [float(x) for x in most.tolist()],
            "moe/load_mean": [float(x) for x in mean.tolist()],
            "moe/load_imbalance": float((most / mean.clamp_min(1e-9)).max()),
            "moe/dropped_share": float(1 - kept[moe_layers].sum() / slots.clamp_min(1)),
        }

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class MoEMonitor:
    """Everything the training loop asks about routing: start it before a checkpoint is loaded
    (the probe records the initial routing), then `step_metrics` after every step."""

    def __init__(self, state: RunState):
        arch = state.arch
        self.moe_layers = [i for i in range(arch.num_layers) if i not in arch.dense_layers]
        self.tap = RouterTap(state.built.chunks, arch.num_layers, arch.num_experts, arch.num_experts_per_tok)
        self.probe = RoutingProbe(state, self.tap)

    def step_metrics(self, num_microbatches: int) -> dict:
        record = self.tap.step_metrics(self.moe_layers)
        record["moe/aux_loss"] = aux_loss_per_microbatch(num_microbatches)
        record["moe/routing_changed_share"] = self.probe.changed_share()
        return record


def aux_loss_per_microbatch(num_microbatches: int) -> float:
    """megatron's load-balancing loss of the step (summed over MoE layers, coefficient applied,
    mean per micro-batch); 0 when it is off (moe.aux_loss_coeff = 0, the default)."""
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if "load_balancing_loss" not in tracker:
        return 0.0
    moe_utils.reduce_aux_losses_tracker_across_ranks(["load_balancing_loss"])
    value = float(tracker["load_balancing_loss"]["values"].sum()) / max(num_microbatches, 1)
    moe_utils.clear_aux_losses_tracker()
    return value


class RoutingProbe:
    """One row per rank (the first of its rows at step 1), its routing under the initial weights,
    and the share of (token, layer) whose top-k experts differ now."""

    def __init__(self, state: RunState, tap: RouterTap):
        cfg = state.cfg
        self.state, self.tap = state, tap
        rows = step_rows(state, 0)[:1]
        self.rows = schedule_rows(rows, cfg)
        self.initial = self.route()

    def route(self) -> dict[int, torch.Tensor]:
        self.tap.recording = {}
        try:
            if self.rows:
                chunks = self.state.chunks
                for c in chunks:
                    c.eval()
                forward_only(chunks, [row_batch(r, padding_mask=True) for r in self.rows], lambda *_: None,
                             self.state.cfg.train.seq_length, self.state.arch.hidden_size)
                for c in chunks:
                    c.train()
            return self.tap.recording
        finally:
            self.tap.recording = None

    def changed_share(self) -> float:
        now = self.route()
        dev = platform.device()
        changed = torch.zeros((), dtype=torch.float64, device=dev)
        total = torch.zeros((), dtype=torch.float64, device=dev)
        for layer, before in self.initial.items():
            changed += (now[layer] != before).any(1).sum().double()
            total += before.shape[0]
        changed, total = world_sum(changed), world_sum(total)
        return float(changed / total.clamp_min(1))

