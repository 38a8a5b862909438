"""The trainer's optimizer: megatron-core's own stack, configured from `train.*`.

- megatron DDP holds the gradients in fp32 buffers (`grad_reduce_in_fp32`); with the distributed
  optimizer (default, `train.use_distributed_optimizer`) it reduce-scatters them over the
  data-parallel ranks and all-gathers the updated weights after the step.
- `get_megatron_optimizer`: bf16 parameters get fp32 main weights and fp32 Adam moments (a bf16
  step of a 5e-7 update would round to nothing); with the distributed optimizer the main weights
  and moments are sharded over data-parallel ranks (ZeRO-1). Gradient clipping and the global
  gradient norm are megatron's (each TP-replicated and each tied copy counted once).
- `train.overlap_comm` (unset: on with CUDA) overlaps the grad reduce-scatter with the backward
  and the param all-gather with the next forward. The weights are then stale after a step until
  `sync_weights` (called before every save, reference pass and the end of training).
"""

from __future__ import annotations

import torch

from aipo_mp.config import Config
from aipo_mp.runtime import platform


def overlap_enabled(cfg: Config) -> bool:
    mode = cfg.train.overlap_comm
    return platform.has_cuda() if mode is None else bool(mode)


def wrap_ddp(built, cfg: Config) -> list:
    """megatron DDP around each model chunk; the schedule's hooks for grad sync and the
    tied-embedding / sequence-parallel norm all-reduces (finalize_model_grads)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    distributed = cfg.train.use_distributed_optimizer
    overlap = overlap_enabled(cfg)
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=distributed,
        overlap_grad_reduce=overlap,
        overlap_param_gather=overlap and distributed,
    )
    config = built.config
    config.finalize_model_grads_func = finalize_model_grads
    chunks = [DistributedDataParallel(config=config, ddp_config=ddp_cfg, module=c) for c in built.chunks]
    one = len(chunks) == 1
    if overlap:  # as megatron's training loop wires them
        config.no_sync_func = chunks[0].no_sync if one else [c.no_sync for c in chunks]
        config.grad_sync_func = chunks[0].start_grad_sync if one else [c.start_grad_sync for c in chunks]
        if distributed:
            config.param_sync_func = chunks[0].start_param_sync if one else [c.start_param_sync for c in chunks]
    return chunks


def optimizer_config(cfg: Config):
    from megatron.core.optimizer import OptimizerConfig

    t, bf16 = cfg.train, cfg.precision.dtype == "bf16"
    return OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        main_params_dtype=torch.float32,
        main_grads_dtype=torch.float32,
        use_distributed_optimizer=t.use_distributed_optimizer,
        overlap_param_gather=overlap_enabled(cfg) and t.use_distributed_optimizer,
    )


def build_optimizer(chunks: list, cfg: Config):
    """megatron's optimizer over the DDP-wrapped chunks (norm weights get no weight decay)."""
    from megatron.core.optimizer import get_megatron_optimizer

    platform.apply_torch_adamw_fixes()
    return get_megatron_optimizer(optimizer_config(cfg), chunks)


def set_lr(optimizer, lr: float, weight_decay: float) -> None:
    """This step's learning rate and weight decay into every param group (megatron's groups
    carry lr_mult / wd_mult: 1-D parameters have wd_mult 0)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


def zero_grads(chunks: list, optimizer) -> None:
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()


def step(optimizer) -> tuple[bool, float]:
    """(updated, grad norm before clipping). With bf16 and no loss scale an update never skips."""
    updated, grad_norm, _ = optimizer.step()
    return bool(updated), float(grad_norm if grad_norm is not None else float("nan"))


def sync_weights(chunks: list) -> None:
    """With overlapped param all-gather the model weights lag the optimizer's main weights until
    the next forward; gather them now (a no-op otherwise)."""
    for c in chunks:
        if c.ddp_config.use_distributed_optimizer and c.ddp_config.overlap_param_gather:
            c.start_param_sync(force_sync=True)


def optimizer_state_bytes(optimizer, chunks: list) -> int:
    """Bytes this rank's optimizer holds beyond the model: fp32 main weights that are not views of
    the model's parameters, and the Adam moments (used by the planner-vs-trainer check)."""
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        model_storages = {p.untyped_storage().data_ptr() for c in chunks for p in c.parameters()}
        for group in inner.param_groups:
            for p in group["params"]:
                if p.untyped_storage().data_ptr() not in model_storages and p.numel():
                    total += p.numel() * p.element_size()
        for s in inner.state.values():
            total += sum(t.numel() * t.element_size() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    return total
