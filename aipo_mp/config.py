"""Typed run configuration: YAML files with `defaults:` includes, `key.sub=value` overrides, and
validation that runs before any process group or weight exists.

A config file is a mapping of sections (model, parallel, precision, objective, train, data,
reference, output, rounds, cluster). A file may start with `defaults: [other.yaml, ...]`
(paths relative to the file); later entries and the file itself override earlier ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from aipo_mp.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelArch:
    """Architecture values of a supported family (the fields of its HF config.json we use)."""

    family: str = "llama"
    hidden_size: int = 0
    intermediate_size: int = 0
    num_layers: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    # Gemma-2 only (None elsewhere).
    query_pre_attn_scalar: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    sliding_window: Optional[int] = None
    layer_types: Optional[list] = None  # per layer: "sliding_attention" | "full_attention"
    # Llama-3.1+ RoPE scaling: {rope_type: llama3, factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings}; None is plain RoPE (see aipo_mp/models/rope.py).
    rope_scaling: Optional[dict] = None
    qkv_bias: bool = False  # Qwen2: bias on the q, k and v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on every query and key head, before RoPE

    def num_params(self) -> int:
        """Parameter count of the whole model (embeddings, layers, final norm, output layer)."""
        h, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        qkv_features = (self.num_attention_heads + 2 * self.num_key_value_heads) * hd
        attn = h * qkv_features + self.num_attention_heads * hd * h
        attn += qkv_features if self.qkv_bias else 0
        attn += 2 * hd if self.qk_norm else 0
        norms = (4 if self.family == "gemma2" else 2) * h
        layer = attn + 3 * h * f + norms
        emb = self.vocab_size * h
        return self.num_layers * layer + emb + h + (0 if self.tie_embeddings else emb)


@dataclass
class ModelConfig:
    path: Optional[str] = None  # HF directory or a Megatron checkpoint written by aipo_mp
    arch: Optional[ModelArch] = None  # from configs/models/*.yaml when no path is given
    trust_remote_code: bool = False


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline stages per pipeline rank (interleaved schedule when > 1)
    cp: int = 1
    sequence_parallel: bool = False


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"  # fp32 | bf16
    fp8: Optional[str] = None  # None | e4m3 | hybrid (Transformer Engine only)
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8 (handed to Transformer Engine)
    backend: str = "auto"  # auto | local | te


@dataclass
class ObjectiveConfig:
    name: str = "aipo"
    params: dict = field(default_factory=dict)  # hyperparameters, validated by the registry


@dataclass
class TrainConfig:
    steps: int = 0  # 0: one epoch over the pairs
    global_batch_pairs: int = 32
    micro_batch_pairs: int = 0  # max pairs packed in one micro-batch row; 0: as many as fit
    seq_length: int = 2560
    lr: float = 5e-7
    min_lr: float = 0.0
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.1
    warmup_steps: int = -1  # >= 0 overrides warmup_ratio
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2  # step checkpoints kept per train dir (the newest; 0: all); each round's final stays
    log_every: int = 1
    recompute: str = "none"  # none | selective | full
    use_distributed_optimizer: bool = True  # megatron's: fp32 main weights + Adam moments sharded over DP
    overlap_comm: Optional[bool] = None  # overlap DP grad reduce-scatter / param all-gather; None: with CUDA
    threads: int = 0  # CPU threads per rank (0: torch default)


@dataclass
class DataConfig:
    train: Optional[str] = None  # pairs: JSONL, .jsonl.gz, Parquet, or a datasets.save_to_disk directory
    fields: dict = field(default_factory=dict)  # other key names: {prompt: KEY, chosen: KEY, rejected: KEY}
    max_length: int = 0  # per sequence (prompt + response); 0: train.seq_length // 2
    max_prompt_length: int = 512
    on_error: str = "error"  # error | skip
    shuffle: bool = True
    warn_truncated_share: float = 0.05  # a warning line when more than this share of pairs is truncated


@dataclass
class ReferenceConfig:
    mode: str = "initial"  # initial | model
    path: Optional[str] = None
    precompute: bool = True


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    tensorboard: bool = True
    # Write the final policy here as an HF directory for vLLM (the round handoff; aipo-mp run sets it).
    hf_dir: Optional[str] = None


@dataclass
class SynthesizeConfig:
    """Self-instruct prompts each round (aipo_mp/rounds/synthesize.py; defaults: the AIPO authors'
    pipeline and Self-Instruct's filters)."""

    enabled: bool = False
    num_clusters: int = 256  # TF-IDF + k-means clusters of the seed prompts
    examples_per_prompt: int = 8  # instructions of one cluster shown in each generation prompt
    new_per_prompt: int = 2  # at most this many new instructions kept from one completion
    total: int = 1000  # new instructions to collect per round
    temperature: float = 0.5
    top_p: float = 0.9
    min_tokens: int = 4  # an instruction's length bounds (policy tokens)
    max_tokens: int = 512
    max_similarity: float = 0.7  # drop a new instruction whose ROUGE-L to a kept one is >= this
    generation_max_tokens: int = 1024  # tokens generated per completion
    seed_share: float = 1.0  # share of the seed prompts kept in each round's prompt file
    include_previous: bool = False  # previous rounds' new prompts join the seeds
    max_batches: int = 8  # generation batches per round before giving up on reaching `total`
    seed: int = 0


@dataclass
class RoundsConfig:
    num_rounds: int = 3
    prompts: Optional[str] = None  # prompts JSONL: {"id"?: ..., "prompt": str or chat messages}
    reference: str = "previous"  # previous (AIPO: the policy the round starts from) | initial
    evaluate_final: bool = True  # sample and score the final policy too (round R, no training)
    kl_estimate: bool = True  # sampled KL(policy_r || initial policy) in the report
    synthesize: SynthesizeConfig = field(default_factory=SynthesizeConfig)
    baseline_answers: Optional[str] = None  # JSONL {"prompt_id", "text"}: a fixed baseline of the report's win rates


@dataclass
class SamplingConfig:
    """vLLM sampling of each round (defaults: the AIPO authors' recipe)."""

    n: int = 5
    temperature: float = 0.4
    top_p: float = 1.0
    max_tokens: int = 2048
    stop: list = field(default_factory=list)
    seed: int = 0
    tensor_parallel: int = 1
    replicas: int = 1
    kv_cache_gib: float = 1.0  # CPU only
    max_model_len: Optional[int] = None
    shard_prompts: int = 0  # prompts per resumable shard of the sample stage (0: one shard per replica)


@dataclass
class RewardConfig:
    kind: str = ""  # model | rule | pairwise | judge; empty: rule when reward.rule is set, else model
    rule: Optional[str] = None  # "module:function(prompt, response) -> float"
    model: Optional[str] = None  # model: a one-label classifier; pairwise: a P(A > B) classifier; judge: an LLM
    # Rankers (pairwise, judge; aipo_mp/rounds/rankers.py)
    template: Optional[str] = None  # with {prompt}, {a}, {b}; None: the ranker's default
    aggregate: str = "bradley_terry"  # bradley_terry | copeland
    judge_answers: list = field(default_factory=lambda: [" A", " B"])  # verdict strings read from log-probs
    chat_template: bool = False  # judge: wrap the judge prompt in the judge's chat template
    batch_size: int = 16  # pairwise classifier batch
    tensor_parallel: int = 1  # GPUs per reward engine (reward.model, the judge)
    # model, rule: reward tasks, each scoring its shard of the samples; judge: engines in child
    # processes of the one ranking task (data parallel, like sampling.replicas)
    replicas: int = 1
    kv_cache_gib: float = 1.0  # judge engine, CPU only
    max_model_len: Optional[int] = None  # judge engine


@dataclass
class PairsConfig:
    min_gap: float = 0.0
    allow_truncated: bool = False
    mode: str = "best_worst"  # best_worst | ranked
    max_pairs_per_prompt: int = 0  # ranked mode; 0: all
    min_rank_gap: int = 0  # rankers: rejected rank - chosen rank must be >= this (0: no check)


@dataclass
class ClusterConfig:
    launcher: str = "local"  # local | slurm
    nproc_per_node: int = 1
    nodes: int = 1
    master_port: int = 0  # 0: torchrun's or a Slurm-job-derived default
    stage_minutes: dict = field(default_factory=dict)  # wall-clock limit per stage kind, e.g. {sample: 120}
    task_wait_s: int = 900  # srun --wait: end a step this long after its first task exited


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["objective"] = {"name": self.objective.name, **self.objective.params}
        return out


# ---------------------------------------------------------------------------------------------
# Loading: YAML with includes, dotted overrides, dict -> dataclasses with type checks
# ---------------------------------------------------------------------------------------------


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections")
    return data


def load_yaml_with_defaults(path: Path, _seen: tuple = ()) -> dict:
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: circular `defaults` include")
    data = read_yaml(path)
    includes = data.pop("defaults", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        merged = deep_merge(merged, load_yaml_with_defaults(path.parent / inc, _seen + (path,)))
    return deep_merge(merged, data)


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
        node[parts[-1]] = value
    return data


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, key: str, errors: list[str]) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, errors)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping of {_type_name(tp)} fields, got {value!r}")
            return tp()
        return _build(tp, value, key + ".", errors)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return finite(float(value), key, errors)
    if tp is float and isinstance(value, str):
        try:
            return finite(float(value), key, errors)  # YAML reads 5e-7 (no dot) as a string
        except ValueError:
            pass
    check = origin or tp
    if check is typing.Any or (isinstance(value, check) and not (check is int and isinstance(value, bool))):
        return value
    errors.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return None


def finite(value: float, key: str, errors: list[str]) -> float:
    """NaN compares false with every bound, so a range check alone lets it through (and e.g. a
    NaN clip_grad silently disables clipping): refuse non-finite numbers everywhere."""
    if not math.isfinite(value):
        errors.append(f"{key}={value}: must be a finite number")
    return value


def _build(cls, data: dict, prefix: str, errors: list[str]):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if cls is ObjectiveConfig and key != "name":
            kwargs.setdefault("params", {})[key] = value
            continue
        if key not in names:
            errors.append(unknown_key_message(prefix + key, [prefix + n for n in names]))
            continue
        kwargs[key] = _coerce(value, hints[key], prefix + key, errors)
    return cls(**{k: v for k, v in kwargs.items() if v is not None or k in data})


def unknown_key_message(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(valid)}"
    return f"unknown config key {key}{hint}"


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read, merge and type-check a config. Raises ConfigError listing every problem."""
    data = load_yaml_with_defaults(Path(path)) if path else {}
    data = apply_overrides(data, list(overrides or []))
    return config_from_dict(data)


def config_from_dict(data: dict) -> Config:
    errors: list[str] = []
    cfg = _build(Config, data, "", errors)
    if errors:
        raise ConfigError(errors)
    cfg.notes = fit_defaults(cfg, explicit=set(dotted_keys(data)))
    return cfg


def dotted_keys(data: dict, prefix: str = ""):
    for k, v in data.items():
        yield prefix + str(k)
        if isinstance(v, dict):
            yield from dotted_keys(v, prefix + str(k) + ".")


def fit_defaults(cfg: Config, explicit: set[str]) -> list[str]:
    """A default the user never set must not make the config invalid: shrink it to fit what the
    user did set, and say so (a note line). Values the user set are left to validation."""
    notes = []
    max_len = cfg.data.max_length or cfg.train.seq_length // 2
    if "data.max_prompt_length" not in explicit and cfg.data.max_prompt_length >= max_len >= 2:
        default, cfg.data.max_prompt_length = cfg.data.max_prompt_length, max_len // 2
        notes.append(f"note: data.max_prompt_length (default {default}) leaves no room for a response in "
                     f"data.max_length={max_len}; using {cfg.data.max_prompt_length} (set it to choose)")
    return notes


# ---------------------------------------------------------------------------------------------
# Validation (no process group, no weights: only arithmetic on the config and the model's config.json)
# ---------------------------------------------------------------------------------------------

CHOICES = {
    "precision.dtype": ("fp32", "bf16"),
    "precision.backend": ("auto", "local", "te"),
    "precision.fp8": (None, "e4m3", "hybrid"),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.recompute": ("none", "selective", "full"),
    "data.on_error": ("error", "skip"),
    "reference.mode": ("initial", "model"),
    "rounds.reference": ("previous", "initial"),
    "cluster.launcher": ("local", "slurm"),
    "pairs.mode": ("best_worst", "ranked"),
}


def _get(cfg: Config, dotted: str):
    node = cfg
    for p in dotted.split("."):
        node = getattr(node, p)
    return node


def resolve_arch(cfg: Config) -> ModelArch:
    """The model architecture: from model.path's config.json when given, else model.arch."""
    if cfg.model.path:
        from aipo_mp.models import arch_from_dir

        return arch_from_dir(cfg.model.path)
    if cfg.model.arch is None:
        raise ConfigError("model: set model.path (an HF or aipo_mp checkpoint directory) or model.arch")
    return cfg.model.arch


def layout_errors(arch: ModelArch, par: ParallelConfig, world_size: Optional[int] = None) -> list[str]:
    errors = []
    tp, pp, vpp, cp = par.tp, par.pp, par.vpp, par.cp
    for name, val in (("parallel.tp", tp), ("parallel.pp", pp), ("parallel.vpp", vpp), ("parallel.cp", cp)):
        if val < 1:
            errors.append(f"{name}={val}: must be >= 1")
    if errors:
        return errors
    choices = divisors(arch.num_attention_heads, arch.num_key_value_heads)
    heads, groups = arch.num_attention_heads, arch.num_key_value_heads
    if heads % tp:
        also = f" nor the {groups} query groups" if groups % tp else ""
        errors.append(f"parallel.tp={tp} does not divide the {heads} attention heads{also}; choose tp from {choices}")
    elif groups % tp:
        errors.append(f"parallel.tp={tp} does not divide the {groups} query groups (key/value heads); "
                      f"choose tp from {choices}")
    elif arch.vocab_size % tp:
        errors.append(f"parallel.tp={tp} does not divide the vocabulary ({arch.vocab_size}); choose another tp")
    if arch.num_layers % (pp * vpp):
        what = f"pp x vpp = {pp} x {vpp}" if vpp > 1 else f"parallel.pp={pp}"
        errors.append(f"{what} does not divide the {arch.num_layers} layers; choose pp (x vpp) from {divisors(arch.num_layers)}")
    if vpp > 1 and pp < 2:
        errors.append(f"parallel.vpp={vpp} needs parallel.pp > 1 (interleaving splits pipeline stages)")
    if par.sequence_parallel and tp < 2:
        errors.append("parallel.sequence_parallel needs parallel.tp > 1; set parallel.sequence_parallel=false or raise tp")
    if world_size is not None and world_size % (tp * pp * cp):
        errors.append(
            f"world size {world_size} is not a multiple of tp x pp x cp = {tp * pp * cp}; "
            f"launch a multiple of {tp * pp * cp} processes or change the layout"
        )
    return errors


def arch_errors(arch: ModelArch) -> list[str]:
    """Architecture values a family cannot build (RoPE scaling it does not implement, ...)."""
    from aipo_mp.models import arch_problems

    return arch_problems(arch)


def divisors(*ns: int) -> list[int]:
    g = 0
    for n in ns:
        g = _gcd(g, n)
    return [d for d in range(1, g + 1) if g % d == 0] if g else [1]


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def validate(cfg: Config, world_size: Optional[int] = None, arch: Optional[ModelArch] = None) -> ModelArch:
    """Every check that needs no process group. Returns the resolved architecture."""
    errors = []
    for key, allowed in CHOICES.items():
        val = _get(cfg, key)
        if val not in allowed:
            errors.append(f"{key}={val!r}: choose one of {', '.join(str(a) for a in allowed)}")
    if arch is None:
        try:
            arch = resolve_arch(cfg)
        except ConfigError as e:
            raise ConfigError(errors + e.errors)
    errors += layout_errors(arch, cfg.parallel, world_size)
    errors += arch_errors(arch)
    errors += training_errors(cfg, arch, world_size)
    errors += objective_errors(cfg)
    if errors:
        raise ConfigError(errors)
    return arch


def training_errors(cfg: Config, arch: ModelArch, world_size: Optional[int]) -> list[str]:
    errors = []
    t, par = cfg.train, cfg.parallel
    if par.cp > 1 and cfg.precision.backend == "local":
        errors.append("parallel.cp > 1 needs the Transformer Engine backend (precision.backend=te)")
    if cfg.precision.fp8 and cfg.precision.backend == "local":
        errors.append("precision.fp8 needs the Transformer Engine backend (precision.backend=te or auto on a GPU)")
    if cfg.precision.fp8 and cfg.precision.dtype != "bf16":
        errors.append("precision.fp8 needs precision.dtype=bf16")
    if t.seq_length < 8:
        errors.append(f"train.seq_length={t.seq_length}: must be >= 8")
    if par.sequence_parallel and t.seq_length % par.tp:
        errors.append(f"train.seq_length={t.seq_length} must be a multiple of parallel.tp={par.tp} with sequence parallel")
    if t.global_batch_pairs < 1:
        errors.append(f"train.global_batch_pairs={t.global_batch_pairs}: must be >= 1")
    if world_size is not None and par.tp * par.pp * par.cp and world_size % (par.tp * par.pp * par.cp) == 0:
        dp = world_size // (par.tp * par.pp * par.cp)
        if t.global_batch_pairs % dp:
            errors.append(
                f"train.global_batch_pairs={t.global_batch_pairs} is not divisible by the data-parallel size {dp}; "
                f"use a multiple of {dp}"
            )
    if t.micro_batch_pairs < 0:
        errors.append(f"train.micro_batch_pairs={t.micro_batch_pairs}: must be >= 0 (0 = as many as fit)")
    if t.lr < 0 or t.min_lr < 0 or t.min_lr > t.lr:
        errors.append(f"train.lr={t.lr}, train.min_lr={t.min_lr}: need 0 <= min_lr <= lr")
    if not 0 <= t.warmup_ratio <= 1:
        errors.append(f"train.warmup_ratio={t.warmup_ratio}: must be in [0, 1]")
    max_len = cfg.data.max_length or t.seq_length // 2
    if cfg.data.max_prompt_length >= max_len:
        errors.append(
            f"data.max_prompt_length={cfg.data.max_prompt_length} leaves no room for a response in "
            f"data.max_length={max_len}; lower it or raise train.seq_length"
        )
    if 2 * max_len > t.seq_length:
        errors.append(
            f"data.max_length={max_len}: a pair (two sequences) must fit in train.seq_length={t.seq_length}; "
            f"use data.max_length <= {t.seq_length // 2}"
        )
    if not cfg.reference.precompute:
        errors.append("reference.precompute=false (reference log-probs per global batch) is not supported yet; "
                      "set reference.precompute=true (one pass before training)")
    if cfg.reference.mode == "model" and not cfg.reference.path:
        errors.append("reference.mode=model needs reference.path (a checkpoint directory)")
    return errors


def objective_errors(cfg: Config) -> list[str]:
    """Hyperparameters must belong to the chosen objective. Keys of *other* objectives are
    tolerated with a warning, so `objective.name=dpo` can override a recipe written for aipo."""
    import warnings

    from aipo_mp import objectives

    try:
        valid = objectives.get_objective(cfg.objective.name).defaults
        others = objectives.all_hyperparameter_names() - set(valid)
        ignored = sorted(k for k in cfg.objective.params if k in others)
        if ignored:
            warnings.warn(f"objective '{cfg.objective.name}' ignores {', '.join(ignored)} (used by other objectives)")
        own = {k: v for k, v in cfg.objective.params.items() if k not in others}
        objectives.resolve_params(cfg.objective.name, own)
    except objectives.ObjectiveError as e:
        return [f"objective: {e}"]
    return []


def dump_config(cfg: Config, path: Path) -> None:
    """The resolved config, written atomically (YAML; readable by load_config)."""
    from aipo_mp.runtime.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def arch_to_json(arch: ModelArch) -> str:
    return json.dumps(dataclasses.asdict(arch), indent=2)
