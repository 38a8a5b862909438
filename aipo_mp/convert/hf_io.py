"""Hugging Face weight directories: lazy safetensors reading (only the tensors asked for) and
sharded writing with an index, as transformers and vLLM expect.

Mixture-of-experts weights come in two layouts, both read here: per-expert tensors (every released
checkpoint: Qwen3-MoE `mlp.experts.{e}.{gate,up,down}_proj.weight`, Mixtral
`block_sparse_moe.experts.{e}.{w1,w3,w2}.weight`) and transformers 5's fused 3-D tensors
(`save_pretrained(..., save_original_format=False)`: `mlp.experts.gate_up_proj` [E, 2I, H], gate
rows then up rows, `mlp.experts.down_proj` [E, H, I], and Mixtral's router as `mlp.gate.weight`).
A fused tensor is presented as the family's per-expert names, each a row range of it (`Virtual`),
so everything downstream sees one layout.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from aipo_mp.convert import quantized
from aipo_mp.errors import CheckpointError

INDEX = "model.safetensors.index.json"

# transformers 5's fused experts of one layer, and the name its Mixtral gives the router.
FUSED_EXPERTS = re.compile(r"^model\.layers\.(?P<i>\d+)\.mlp\.experts\.(?P<part>gate_up_proj|down_proj)$")
FUSED_ROUTER = "model.layers.{i}.mlp.gate.weight"


@dataclass(frozen=True)
class Virtual:
    """A per-expert tensor that is part of a fused one: expert `expert`, rows [lo, hi) of its
    [rows, cols] slice of the fused tensor `real` (a contiguous run of its bytes)."""

    real: str
    expert: int
    lo: int
    hi: int
    shape: tuple[int, ...]

    def elem_offset(self, fused_shape: tuple[int, ...]) -> int:
        """Elements before this tensor's first one, inside the fused tensor."""
        rows, cols = fused_shape[1], math.prod(fused_shape[2:])  # a fused bias [E, n]: cols 1
        return (self.expert * rows + self.lo) * cols


class HFWeights:
    """name -> tensor over the safetensors files of an HF directory, opened lazily."""

    def __init__(self, directory: str | Path, allow_pickle: bool = False, pickle_flag: Optional[str] = "--allow-pickle"):
        self.dir = Path(directory)
        self._handles: dict[str, object] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self.files = self._index()
        if not self.files:
            bins = sorted(self.dir.glob("*.bin"))
            if not bins:
                raise CheckpointError(f"{self.dir}: no *.safetensors weights found")
            if not allow_pickle:
                how = f" or pass {pickle_flag} if you trust the source" if pickle_flag else ""
                raise CheckpointError(
                    f"{self.dir}: holds only pickled .bin weights, which can run code when loaded; "
                    f"convert them to safetensors (e.g. save_pretrained(safe_serialization=True)){how}"
                )
            self._pickled = {}
            for b in bins:
                self._pickled.update(load_pickled_weights(b))
            self.files = {n: "" for n in self._pickled}
        # Presented name -> where it lives, for the names that are not stored as such.
        self.virtual: dict[str, Virtual] = {}
        self.aliases: dict[str, str] = {}  # presented name -> stored name (Mixtral's fused-layout router)
        # MXFP4 experts (gpt-oss releases): X -> (X_blocks, X_scales), presented as the bf16 tensor X
        # (also to the fused-expert presentation below), dequantized expert by expert when read.
        self.mxfp4 = quantized.mxfp4_pairs(self.files, self.dir, self._stored_shape, self._stored_dtype) \
            if self._pickled is None and quantized.mxfp4_of(self.dir) else {}
        self._present_fused_experts()
        # Block-scaled FP8 weights (DeepSeek releases): weight name -> its scale's; read as bf16.
        self.fp8_block = quantized.fp8_block_of(self.dir)
        self.fp8_scales = quantized.scaled_weights(self.files, self.dir, self._stored_dtype) if self.fp8_block else {}

    def _index(self) -> dict[str, str]:
        index = self.dir / INDEX
        if index.exists():
            return check_index_files(self.dir)
        files = sorted(self.dir.glob("*.safetensors"))
        out = {}

        for f in files:
            with open_safetensors(f) as h:
                out.update({k: f.name for k in h.keys()})
        return out

    # -- the fused mixture-of-experts layout --------------------------------------------------

    def _present_fused_experts(self) -> None:
        """Replace transformers 5's fused expert tensors by the family's per-expert names (row
        ranges of them; nothing is read). The family and its sizes come from config.json; a fused
        tensor whose shape config.json does not imply is one error line naming it."""
        if self._present_expert_slices():
            return
        fused = {n: m for n in self.files if (m := FUSED_EXPERTS.match(n))}
        if not fused:
            return
        names = fused_expert_names(self.dir)
        if names is None:  # not a mixture-of-experts family: the names stay, and are unexpected there
            return
        arch, gate, up, down, router = names
        self._fused_names = ((re.compile(_template_regex(gate)), "gate_up_proj"),
                             (re.compile(_template_regex(up)), "gate_up_proj"),
                             (re.compile(_template_regex(down)), "down_proj"),
                             (re.compile(_template_regex(router)), None))
        e, inter, h = arch.num_experts, arch.moe_intermediate_size, arch.hidden_size
        stored = set(self.files)
        for name, m in fused.items():
            i, part = int(m.group("i")), m.group("part")
            want = (e, 2 * inter, h) if part == "gate_up_proj" else (e, h, inter)
            got = self._stored_shape(name)
            if got != want:
                what = "[experts, 2 x moe_intermediate_size, hidden]" if part == "gate_up_proj" else \
                    "[experts, hidden, moe_intermediate_size]"
                raise CheckpointError(f"{self.dir}: tensor {name} has shape {got} but config.json implies {want} "
                                      f"(fused experts {what}); the weights do not match config.json")
            rows = [(gate, 0, inter), (up, inter, 2 * inter)] if part == "gate_up_proj" else [(down, 0, h)]
            for j in range(e):
                for template, lo, hi in rows:
                    per_expert = template.format(i=i, e=j)
                    if per_expert in stored:
                        raise CheckpointError(f"{self.dir}: holds both {name} (fused experts) and {per_expert}; keep "
                                              "one layout: re-save the model")
                    self.virtual[per_expert] = Virtual(name, j, lo, hi, (hi - lo, got[2]))
            fused_router = FUSED_ROUTER.format(i=i)
            if router.format(i=i) != fused_router and fused_router in stored:
                if router.format(i=i) in stored:
                    raise CheckpointError(f"{self.dir}: holds both {fused_router} and {router.format(i=i)}; keep one "
                                          "layout: re-save the model")
                self.aliases[router.format(i=i)] = fused_router

    def _present_expert_slices(self) -> bool:
        """gpt-oss stores every expert tensor fused over a layer's experts ([E, ...]): present
        expert e's slice [e] under the family's per-expert name (Family.expert_slices). True when
        config.json names such a family."""
        found = expert_slice_names(self.dir)
        if found is None:
            return False
        arch, slices = found
        self._slice_names = tuple((re.compile(_template_regex(per_expert)), fused) for fused, per_expert in slices)
        for i in range(arch.num_layers):
            for fused_template, per_expert in slices:
                name = fused_template.format(i=i)
                if name not in self.files and name not in self.mxfp4:  # MXFP4: presented as dequantized
                    continue  # the name check then names the expert tensors that are missing
                shape = self._stored_shape(name)
                if len(shape) < 2 or shape[0] != arch.num_experts:
                    raise CheckpointError(f"{self.dir}: tensor {name} has shape {shape} but config.json implies "
                                          f"{arch.num_experts} experts on its first dimension; the weights do not "
                                          "match config.json")
                for e in range(arch.num_experts):
                    self.virtual[per_expert.format(i=i, e=e)] = Virtual(name, e, 0, shape[1], tuple(shape[1:]))
        return True

    def stored_name(self, name: str) -> str:
        """The tensor that would hold `name` in this directory's layout: with fused experts, the
        fused tensor of its layer (Mixtral's router: mlp.gate.weight); otherwise `name`."""
        for pattern, part in getattr(self, "_fused_names", ()):
            m = pattern.match(name)
            if m:
                return f"model.layers.{m['i']}.mlp.experts.{part}" if part else FUSED_ROUTER.format(i=m["i"])
        for pattern, fused in getattr(self, "_slice_names", ()):  # gpt-oss: expert e's slice of a fused tensor
            m = pattern.match(name)
            if m:
                return fused.format(i=m["i"])
        return name

    def _stored_dtype(self, name: str) -> str:
        return "" if self._pickled is not None else self._handle(self.files[name]).get_slice(name).get_dtype()

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        if name in getattr(self, "mxfp4", {}) and name not in self.files:  # as dequantized
            return quantized.mxfp4_shape(self._stored_shape(self.mxfp4[name][0]))
        if self._pickled is not None:
            return tuple(self._pickled[name].shape)
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

    def names(self) -> list[str]:
        """The tensor names, fused experts presented per expert (in the stored order)."""
        hidden = {v.real for v in self.virtual.values()} | set(self.aliases.values())
        by_real: dict[str, list[str]] = {}
        for name, v in self.virtual.items():
            by_real.setdefault(v.real, []).append(name)
        renamed = {stored: shown for shown, stored in self.aliases.items()}
        out = []
        # An MXFP4 pair is shown as the tensor it stands for, where its blocks are stored.
        shown = {blocks: name for name, (blocks, _) in self.mxfp4.items()}
        mx_scales = {sc for _, sc in self.mxfp4.values()}
        for name in (shown.get(n, n) for n in self.files if n not in mx_scales):
            if name in renamed:
                out.append(renamed[name])
            elif name in hidden:
                out += by_real.get(name, [])
            else:
                out.append(name)
        scales = set(self.fp8_scales.values())
        return [n for n in out if n not in scales] if scales else out

    def locate(self, name: str) -> tuple[str, str, int, tuple[int, ...]]:
        """(file, stored tensor, elements before `name`'s first one in it, `name`'s shape)."""
        real, v = self.mxfp4_part(name)
        if real is not None:  # MXFP4: the blocks' file; the shape is the dequantized one (read only by mxfp4_rows)
            blocks = self.mxfp4[real][0]
            return self.files[blocks], blocks, 0, v.shape if v else self._stored_shape(real)
        if name in self.virtual:
            v = self.virtual[name]
            return self.files[v.real], v.real, v.elem_offset(self._stored_shape(v.real)), v.shape
        stored = self.aliases.get(name, name)
        if stored not in self.files:
            raise CheckpointError(f"{self.dir}: tensor {name} is missing from the checkpoint")
        return self.files[stored], stored, 0, self._stored_shape(stored)

    def _handle(self, fname: str):
        if fname not in self._handles:
            self._handles[fname] = open_safetensors(self.dir / fname)
        return self._handles[fname]

    def get(self, name: str) -> torch.Tensor:
        fname, stored, _, _ = self.locate(name)
        v = self.virtual.get(name)
        if self._pickled is not None:
            t = self._pickled[stored]
            return t[v.expert, v.lo:v.hi] if v else t
        try:
            if self.mxfp4_part(name)[0] is not None:
                return self.mxfp4_rows(name, 0, self.shape(name)[0])
            if v:  # only the expert's rows are read
                return self._handle(fname).get_slice(stored)[v.expert:v.expert + 1, v.lo:v.hi][0]
            if name in self.fp8_scales:
                scale = self.fp8_scales[name]
                return quantized.dequantize(self._handle(fname).get_tensor(stored),
                                            self._handle(self.files[scale]).get_tensor(scale), self.fp8_block, name)
            return self._handle(fname).get_tensor(stored)
        except Exception as e:  # safetensors raises its own error type for bytes past the end
            raise CheckpointError(f"{self.dir / fname}: cannot read tensor {stored} ({first_line(e)}); the file "
                              "is truncated or damaged: copy or convert it again") from None

    def mxfp4_part(self, name: str) -> tuple[Optional[str], Optional[Virtual]]:
        """(the MXFP4 tensor `name` is or is a per-expert slice of, that slice), or (None, None)."""
        if name in self.mxfp4:
            return name, None
        v = self.virtual.get(name)
        return (v.real, v) if v is not None and v.real in self.mxfp4 else (None, None)

    def mxfp4_rows(self, name: str, start: int, n: int, out: Optional[torch.Tensor] = None,
                   cols: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Rows start .. start + n (columns `cols` of them when given) of an MXFP4 tensor (rows are
        experts) or of a per-expert slice of one, dequantized into `out` (cast to its dtype) or a
        new bf16 tensor. One expert's blocks and scales are read and dequantized at a time."""
        real, v = self.mxfp4_part(name)
        blocks, scales = self.mxfp4[real]
        bh, sh = self._handle(self.files[blocks]).get_slice(blocks), self._handle(self.files[scales]).get_slice(scales)

        def expert(j: int) -> torch.Tensor:
            return quantized.dequantize_mxfp4(bh[j:j + 1], sh[j:j + 1], real)[0]

        def pick(t: torch.Tensor, dim: int) -> torch.Tensor:  # the columns of rows: dim 1 of the tensor read
            return t if cols is None else t.narrow(dim, cols[0], cols[1] - cols[0])

        if v is not None:  # rows of one expert's slice: that expert dequantized once
            rows = pick(expert(v.expert)[v.lo + start:v.lo + start + n], 1)
            return rows.clone() if out is None else out.copy_(rows)
        if out is None:
            row = list(self.shape(name)[1:])
            if cols is not None:
                row[0] = cols[1] - cols[0]
            out = torch.empty(n, *row, dtype=torch.bfloat16)
        for j in range(start, start + n):
            out[j - start].copy_(pick(expert(j), 0))
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        return self.locate(name)[3]

    def dtype(self, name: str) -> str:
        """bf16 | fp32 | fp16 | fp64 (or the safetensors name of another dtype)."""
        fname, stored, _, _ = self.locate(name)
        if name in self.fp8_scales or self.mxfp4_part(name)[0] is not None:
            return "bf16"  # presented dequantized
        if self._pickled is not None:
            return TORCH_DTYPE_NAMES.get(self._pickled[stored].dtype, str(self._pickled[stored].dtype))
        raw = self._handle(fname).get_slice(stored).get_dtype()
        return SAFETENSORS_DTYPE_NAMES.get(raw, raw.lower())


SAFETENSORS_DTYPE_NAMES = {"BF16": "bf16", "F32": "fp32", "F16": "fp16", "F64": "fp64"}
TORCH_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16", torch.float64: "fp64"}


def _template_regex(template: str) -> str:
    return "^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)") + "$"


def fused_expert_names(directory: Path):
    """(arch, gate, up, down, router name templates) of the mixture-of-experts family config.json
    names, from its mapping table; None for a dense family or a directory without config.json."""
    from aipo_mp.errors import UserError
    from aipo_mp.models import arch_from_hf_config, family_for_hf_config
    from aipo_mp.models.family import GLU

    cfg = Path(directory) / "config.json"
    if not cfg.is_file():
        return None
    try:
        hf = read_hf_config_file(cfg)
    except UserError:
        return None  # the caller's config check names the problem
    family = family_for_hf_config(hf)
    if not family.moe:
        return None
    arch = arch_from_hf_config(hf)
    gate = up = down = router = None
    for rule in family.rules(arch):
        if rule.te_alias:
            continue
        if rule.expert and rule.transform == GLU:
            gate, up = rule.hf
        elif rule.expert:
            (down,) = rule.hf
        elif rule.megatron.endswith(".mlp.router.weight"):
            (router,) = rule.hf
    return arch, gate, up, down, router


def expert_slice_names(directory: Path):
    """(arch, ((fused, per-expert) name templates)) when config.json names a family whose experts
    are stored fused and sliced per expert (gpt-oss); None otherwise."""
    from aipo_mp.errors import UserError
    from aipo_mp.models import arch_from_hf_config, family_for_hf_config

    cfg = Path(directory) / "config.json"
    if not cfg.is_file():
        return None
    try:
        hf = read_hf_config_file(cfg)
        family = family_for_hf_config(hf)
    except UserError:
        return None  # the caller's config check names the problem
    if not family.expert_slices:
        return None
    return arch_from_hf_config(hf), family.expert_slices


def check_index_files(directory: str | Path) -> dict[str, str]:
    """The index's tensor -> file map, once every file it names exists (one line naming the
    missing ones otherwise). {} when the directory has no index."""
    directory = Path(directory)
    index = directory / INDEX
    if not index.exists():
        return {}
    from aipo_mp.runtime.json_files import read_json_object

    fix = "re-save the model (save_pretrained) or copy the index again"
    weight_map = read_json_object(index, "the safetensors index", {"weight_map": dict}, fix)["weight_map"]
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or "/" in v or v in ("", ".", "..")), None)
    if bad is not None:
        raise CheckpointError(f"{index}: the safetensors index maps {bad!r} to {weight_map[bad]!r}, not a file name "
                              f"in the directory; {fix}")
    missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
    if missing:
        raise CheckpointError(f"{index} names {len(missing)} missing file(s): {', '.join(missing[:3])}"
                          f"{' ...' if len(missing) > 3 else ''}; the model directory is incomplete: copy every shard")
    return weight_map


def open_safetensors(path: Path):
    """safe_open with one clear line for a truncated or damaged file (its header promises more
    bytes than the file holds, or it is not safetensors at all)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        handle = safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found (named by {INDEX}); the checkpoint is incomplete") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(e)}); the file is truncated or "
                          "damaged: copy or convert it again") from None
    check_safetensors_size(path, handle)
    return handle


def check_safetensors_size(path: Path, handle) -> None:
    """safetensors maps the file lazily, so a file cut in the middle opens fine and fails (or
    reads garbage) at the first tensor past the cut: compare the header's end offset with the size."""
    import struct

    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    expected = 8 + header_len + end
    actual = path.stat().st_size
    if actual < expected:
        raise CheckpointError(f"{path}: truncated ({actual} bytes, its header describes {expected}); copy or convert "
                          "it again")


def load_pickled_weights(path: Path) -> dict:
    """A trusted (--allow-pickle) .bin state dict. weights_only refuses anything but tensors and
    plain containers, so a malicious or damaged pickle is refused: one line, not a traceback."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a plain tensor state dict, refused even with --allow-pickle "
                              f"({first_line(e)}); convert a trusted copy to safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: holds {type(state).__name__}, not a name -> tensor state dict; convert a "
                              "trusted copy to safetensors")
    return state


def read_hf_config_file(path: Path) -> dict:
    """An HF config.json through the one JSON reader (a list, null or cut file is one line)."""
    from aipo_mp.runtime.json_files import read_json_object

    return read_json_object(path, "config.json", fix="restore the model's config.json (copy it again with the weights)")


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


def load_tokenizer(directory: str | Path, trust_remote_code: bool = False, what: str = "model.path"):
    """AutoTokenizer of a local directory, with one clear line when it has none (transformers
    otherwise suggests installing sentencepiece, which is not the problem)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{what}={directory} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}); copy the "
                          "model's tokenizer into that directory")
    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise CheckpointError(f"{what}={directory}: the tokenizer does not load ({first_line(e)}); fix or replace its "
                          "tokenizer files") from None


def check_tensor_names(weights: HFWeights, expected: Iterable[str]) -> None:
    expected = list(expected)
    have = set(weights.names())
    # In a fused expert layout, the fused tensor that lacks them (once), not each expert's slice.
    missing = list(dict.fromkeys(weights.stored_name(n) for n in expected if n not in have))
    unexpected = sorted(have - set(expected))
    if missing:
        raise CheckpointError(f"{weights.dir}: missing tensors: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        raise CheckpointError(f"{weights.dir}: unexpected tensors: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
