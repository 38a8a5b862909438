"""Random-weight Hugging Face checkpoints of any supported architecture, built locally with
`transformers` (no hub): the numerical reference for tests, and the demo's starting point."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from aipo_mp.config import ModelArch
from aipo_mp.models import hf_config_for
from aipo_mp.runtime.files import atomic_directory


def hf_model_from_arch(arch: ModelArch, seed: int = 0, noise: float = 0.02, dtype=torch.float32):
    """A transformers model of `arch` whose every weight (norms included) is random, so that a
    mapping mistake anywhere changes the logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = hf_config_for(arch)
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **{k: v for k, v in cfg_dict.items() if k != "architectures"})
    config.architectures = cfg_dict["architectures"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(".gate.weight") or name.endswith(".router.weight"):
                # An MoE router: scores far apart, so no near-tie of the top-k flips between
                # implementations that round differently.
                p.normal_(0.0, 0.5)
            elif "q_proj" in name or "k_proj" in name or "kv_a_proj" in name or "kv_b_proj" in name:
                # Large enough attention scores that soft-capping and masking visibly matter.
                p.normal_(0.0, 0.15)
            elif name.endswith(".sinks"):
                # gpt-oss's attention sinks: logits of the order of the scores, so they matter.
                p.normal_(0.0, 1.0)
            elif arch.family == "gpt_oss" and name.endswith("experts.gate_up_proj"):
                # gpt-oss: gate/up pre-activations of a few units, so the SwiGLU clamp (7) is hit.
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # DeepSeek-V3's expert bias (selection only): non-zero, so losing it changes routing;
                # fp32 whatever the model's dtype, as transformers loads it and the releases store it.
                b.data = b.data.float().normal_(0.0, 0.1)
    return model.eval()


def save_hf_model(arch: ModelArch, out_dir: str | Path, seed: int = 0, tokenizer_dir: Optional[str | Path] = None,
                  overwrite: bool = True) -> Path:
    """Write a random-weight HF directory (safetensors) for `arch`; cached by a stamp file."""
    out_dir = Path(out_dir)
    stamp = {"arch": arch.__dict__, "seed": seed, "tokenizer": str(tokenizer_dir or "")}
    stamp_file = out_dir / "aipo_build.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == json.loads(json.dumps(stamp)):
        return out_dir
    model = hf_model_from_arch(arch, seed)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer_dir:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(tmp)
        (tmp / "aipo_build.json").write_text(json.dumps(stamp))
    return out_dir
