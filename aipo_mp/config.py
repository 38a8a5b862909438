"""Typed run configuration: the schema (one dataclass per section), YAML files with `defaults:`
includes, and `key.sub=value` overrides. Schema and loading only, no torch: every cross-field check
(layout, objective, recipe, placement) is in aipo_mp/validate.py.

Each field declares its own constraint next to it (`setting(default, ge=..., choices=...)`); the
loader refuses a wrong value with one line naming the key and the allowed range, for every section
alike. A config file is a mapping of sections; it may start with `defaults: [other.yaml, ...]`
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
# Per-field constraints
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """The values a field accepts: a numeric range (open or closed ends) or a set of choices."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    choices: Optional[tuple] = None
    items: Optional[str] = None  # "nonempty_str": a list of non-empty strings

    def problem(self, value) -> Optional[str]:
        """None when `value` is allowed, else what is allowed (for the one error line)."""
        if value is None:
            return None  # Optional fields: None means "not set"
        if self.choices is not None:
            return None if value in self.choices else "choose one of " + ", ".join(str(c) for c in self.choices)
        if self.items == "nonempty_str":
            ok = isinstance(value, list) and all(isinstance(s, str) and s for s in value)
            return None if ok else "must be a list of non-empty strings"
        ok = ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
              and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))
        return None if ok else self.describe()

    def describe(self) -> str:
        lo, hi = (self.ge, "[") if self.ge is not None else (self.gt, "(")
        up, close = (self.le, "]") if self.le is not None else (self.lt, ")")
        if lo is not None and up is not None:
            return f"must be in {hi}{lo:g}, {up:g}{close}"
        if lo is not None:
            return f"must be {'>=' if hi == '[' else '>'} {lo:g}"
        return f"must be {'<=' if close == ']' else '<'} {up:g}"


def setting(default=None, *, factory=None, **check) -> Any:
    """A config field with its default and its constraint (see Check)."""
    meta = {"check": Check(**{k: tuple(v) if k == "choices" else v for k, v in check.items()})} if check else {}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def count(default: int, at_least: int = 1) -> Any:
    """An integer setting >= `at_least`."""
    return setting(default, ge=at_least)


def share(default: float) -> Any:
    """A fraction in [0, 1]."""
    return setting(default, ge=0, le=1)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelArch:
    """Architecture values of a supported family (the fields of its HF config.json we use)."""

    family: str = "llama"
    hidden_size: int = count(0, 0)
    intermediate_size: int = count(0, 0)
    num_layers: int = count(0, 0)
    num_attention_heads: int = count(0, 0)
    num_key_value_heads: int = count(0, 0)
    head_dim: int = count(0, 0)
    vocab_size: int = count(0, 0)
    rope_theta: float = setting(10000.0, gt=0)
    rms_norm_eps: float = setting(1e-5, gt=0)
    tie_embeddings: bool = False
    max_position_embeddings: int = count(4096)
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
    # Mixture of experts (qwen3_moe, mixtral); num_experts 0 is a dense model.
    num_experts: int = count(0, 0)
    num_experts_per_tok: int = count(0, 0)  # top-k experts per token
    moe_intermediate_size: int = count(0, 0)  # one expert's FFN width
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1 (Mixtral: always)
    dense_layers: list = field(default_factory=list)  # 0-based layers with a dense MLP (Qwen3-MoE mlp_only_layers)
    # DeepSeek-V3 (deepseek_v3) only: multi-head latent attention (kv_lora_rank > 0), grouped sigmoid
    # routing with an expert bias, a shared expert, yarn RoPE (see aipo_mp/models/deepseek_v3.py).
    q_lora_rank: int = count(0, 0)  # 0: queries projected directly (no low-rank query)
    kv_lora_rank: int = count(0, 0)
    qk_nope_head_dim: int = count(0, 0)
    qk_rope_head_dim: int = count(0, 0)
    v_head_dim: int = count(0, 0)
    n_group: int = count(0, 0)  # expert groups of group-limited routing
    topk_group: int = count(0, 0)  # groups each token may use
    routed_scaling_factor: float = setting(1.0, gt=0)
    shared_expert_intermediate_size: int = count(0, 0)  # 0: no shared expert
    yarn: Optional[dict] = None  # {factor, original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim}


@dataclass
class ModelConfig:
    path: Optional[str] = None  # HF directory or a Megatron checkpoint written by aipo_mp
    arch: Optional[ModelArch] = None  # from configs/models/*.yaml when no path is given
    trust_remote_code: bool = False


@dataclass
class ParallelConfig:
    tp: int = count(1)
    pp: int = count(1)
    vpp: int = count(1)  # virtual pipeline stages per pipeline rank (interleaved schedule when > 1)
    cp: int = count(1)
    ep: int = count(1)  # expert parallel: the experts of each MoE layer are split over this many ranks
    etp: int = count(1)  # expert tensor parallel: each expert's FFN split over this many ranks (<= tp)
    sequence_parallel: bool = False  # MoE with tp > 1 turns it on (megatron requires it)


@dataclass
class MoEConfig:
    """Router policy of mixture-of-experts policies, the same for the policy and its reference.

    The load-balancing loss is off by default for preference objectives: it pushes the router
    towards uniform expert load, a pressure unrelated to the preference signal that moves the
    policy away from its reference (docs/moe.md). Set aux_loss_coeff (e.g. 1e-3) to opt in."""

    aux_loss_coeff: float = setting(0.0, ge=0)
    freeze_router: bool = False  # keep the router weights fixed (they get no gradient, no optimizer state)
    capacity_factor: Optional[float] = setting(None, gt=0)  # None: no token dropping
    dispatcher: str = setting("alltoall", choices=("alltoall", "allgather"))
    # DeepSeek-V3's expert bias (selection only) is moved by megatron's aux-loss-free balancing after
    # each step, by this rate times the sign of each expert's load imbalance. 0 (the default for
    # preference training) keeps the checkpoint's bias; DeepSeek-V3 pre-training used 1e-3.
    expert_bias_update_rate: float = setting(0.0, ge=0)


@dataclass
class PrecisionConfig:
    dtype: str = setting("fp32", choices=("fp32", "bf16"))
    fp8: Optional[str] = setting(None, choices=(None, "e4m3", "hybrid"))  # Transformer Engine only
    fp8_recipe: str = setting("delayed", choices=("delayed", "tensorwise", "mxfp8"))  # handed to TE
    backend: str = setting("auto", choices=("auto", "local", "te"))


@dataclass
class ObjectiveConfig:
    name: str = "aipo"  # a name of the objectives registry (checked by aipo_mp/validate.py)
    params: dict = field(default_factory=dict)  # hyperparameters, validated by the registry


@dataclass
class TrainConfig:
    steps: int = count(0, 0)  # 0: one epoch over the pairs
    global_batch_pairs: int = count(32)
    micro_batch_pairs: int = count(0, 0)  # max pairs packed in one micro-batch row; 0: as many as fit
    seq_length: int = count(2560, 8)
    lr: float = setting(5e-7, ge=0)
    min_lr: float = setting(0.0, ge=0)
    schedule: str = setting("cosine", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = share(0.1)
    warmup_steps: int = count(-1, -1)  # >= 0 overrides warmup_ratio
    weight_decay: float = setting(0.0, ge=0)
    adam_beta1: float = setting(0.9, ge=0, lt=1)
    adam_beta2: float = setting(0.95, ge=0, lt=1)
    adam_eps: float = setting(1e-8, gt=0)
    clip_grad: float = setting(1.0, ge=0)  # 0: no clipping
    seed: int = count(1234, 0)
    save_every: int = count(0, 0)  # 0: only at the end
    keep_checkpoints: int = count(2, 0)  # step checkpoints kept per train dir (the newest; 0: all); each round's final stays
    log_every: int = count(1)
    recompute: str = setting("none", choices=("none", "selective", "full"))
    use_distributed_optimizer: bool = True  # megatron's: fp32 main weights + Adam moments sharded over DP
    overlap_comm: Optional[bool] = None  # overlap DP grad reduce-scatter / param all-gather; None: with CUDA
    threads: int = count(0, 0)  # CPU threads per rank (0: torch default)


@dataclass
class DataConfig:
    train: Optional[str] = None  # pairs: JSONL, .jsonl.gz, Parquet, or a datasets.save_to_disk directory
    fields: dict = field(default_factory=dict)  # other key names: {prompt: KEY, chosen: KEY, rejected: KEY}
    max_length: int = count(0, 0)  # per sequence (prompt + response); 0: train.seq_length // 2
    max_prompt_length: int = count(512)
    on_error: str = setting("error", choices=("error", "skip"))
    shuffle: bool = True
    warn_truncated_share: float = share(0.05)  # a warning line when more than this share of pairs is truncated


@dataclass
class ReferenceConfig:
    mode: str = setting("initial", choices=("initial", "model"))
    path: Optional[str] = None
    precompute: bool = True


@dataclass
class WandbConfig:
    """Weights & Biases logging, off unless `project` is set (wandb is imported only then): the
    trainer's step metrics, and from `aipo-mp run` each round's report row and the plots
    (aipo_mp/runtime/tracking.py). mode offline writes the run under the output directory's
    wandb/ without network (`wandb sync` uploads it later)."""

    project: Optional[str] = None
    entity: Optional[str] = None
    mode: str = setting("online", choices=("online", "offline", "disabled"))
    group: Optional[str] = None  # W&B group of the runs; `aipo-mp run` uses the run directory's name


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    tensorboard: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Write the final policy here as an HF directory for vLLM (the round handoff; aipo-mp run sets it).
    hf_dir: Optional[str] = None
    # Resume the checkpoints of a directory from an older version (no run_identity.json) even when
    # its recorded data and starting weights cannot be shown to be these (aipo_mp/training/identity.py).
    resume_unrecorded: bool = False


@dataclass
class SynthesizeConfig:
    """Self-instruct prompts each round (aipo_mp/rounds/synthesize.py; defaults: the AIPO authors'
    pipeline and Self-Instruct's filters)."""

    enabled: bool = False
    num_clusters: int = count(256)  # TF-IDF + k-means clusters of the seed prompts
    examples_per_prompt: int = count(8)  # instructions of one cluster shown in each generation prompt
    new_per_prompt: int = count(2)  # at most this many new instructions kept from one completion
    total: int = count(1000)  # new instructions to collect per round
    temperature: float = setting(0.5, ge=0)
    top_p: float = setting(0.9, gt=0, le=1)
    min_tokens: int = count(4)  # an instruction's length bounds (policy tokens)
    max_tokens: int = count(512)
    max_similarity: float = setting(0.7, gt=0, le=1)  # drop a new instruction whose ROUGE-L to a kept one is >= this
    generation_max_tokens: int = count(1024)  # tokens generated per completion
    seed_share: float = share(1.0)  # share of the seed prompts kept in each round's prompt file
    include_previous: bool = False  # previous rounds' new prompts join the seeds
    max_batches: int = count(8)  # generation batches per round before giving up on reaching `total`
    seed: int = count(0, 0)


@dataclass
class RoundsConfig:
    num_rounds: int = count(3)
    prompts: Optional[str] = None  # prompts JSONL: {"id"?: ..., "prompt": str or chat messages}
    reference: str = setting("previous", choices=("previous", "initial"))  # previous: AIPO (the round's start)
    evaluate_final: bool = True  # sample and score the final policy too (round R, no training)
    kl_estimate: bool = True  # sampled KL(policy_r || initial policy) in the report
    synthesize: SynthesizeConfig = field(default_factory=SynthesizeConfig)
    baseline_answers: Optional[str] = None  # JSONL {"prompt_id", "text"}: a fixed baseline of the report's win rates


@dataclass
class SamplingConfig:
    """vLLM sampling of each round (defaults: the AIPO authors' recipe). Also the settings of any
    sampling call (`aipo_mp.rounds.sampling.sample`)."""

    n: int = count(5)  # samples per prompt
    temperature: float = setting(0.4, ge=0)  # 0 is greedy
    top_p: float = setting(1.0, gt=0, le=1)
    max_tokens: int = count(2048)
    stop: list = setting(factory=list, items="nonempty_str")  # stop strings (EOS always stops)
    seed: int = count(0, 0)
    chat_template: bool = True  # wrap string prompts as one user message (chat prompts always use it)
    tensor_parallel: int = count(1)  # GPUs (or CPU core groups) per engine
    pipeline_parallel: int = count(1)  # pipeline stages per engine (engine = TP x PP x DP GPUs)
    data_parallel: int = count(1)  # vLLM data-parallel ranks inside ONE engine (MoE: with expert_parallel)
    expert_parallel: bool = False  # vLLM --enable-expert-parallel: EP size = DP x TP; MoE policies only
    replicas: int = count(1)  # engines, each in its own task(s); an engine wider than a node spans whole nodes
    kv_cache_gib: float = setting(1.0, gt=0)  # CPU only (on GPUs vLLM sizes it from gpu_memory_utilization)
    max_model_len: Optional[int] = setting(None, ge=2)  # None: the model's max_position_embeddings
    dtype: Optional[str] = setting(None, choices=(None, "auto", "float32", "bfloat16", "float16"))  # None: fp32 on CPU, "auto" on GPUs
    gpu_memory_utilization: float = setting(0.9, gt=0, le=1)  # GPUs only
    shard_prompts: int = count(0, 0)  # prompts per resumable shard of the sample stage (0: one shard per replica)


REWARD_KINDS = ("model", "rule", "pairwise", "judge")
RANKER_KINDS = ("pairwise", "judge")


@dataclass
class RewardConfig:
    kind: str = setting("", choices=("", *REWARD_KINDS))  # empty: rule when reward.rule is set, else model
    rule: Optional[str] = None  # "module:function(prompt, response) -> float"
    model: Optional[str] = None  # model: a one-label classifier; pairwise: a P(A > B) classifier; judge: an LLM
    # Rankers (pairwise, judge; aipo_mp/rounds/rankers.py)
    template: Optional[str] = None  # with {prompt}, {a}, {b}; None: the ranker's default
    aggregate: str = setting("bradley_terry", choices=("bradley_terry", "copeland"))
    judge_answers: list = setting(factory=lambda: [" A", " B"], items="nonempty_str")  # verdicts read from log-probs
    chat_template: bool = False  # judge: wrap the judge prompt in the judge's chat template
    batch_size: int = count(16)  # pairwise classifier batch
    tensor_parallel: int = count(1)  # GPUs per reward engine (reward.model, the judge)
    pipeline_parallel: int = count(1)  # pipeline stages per reward engine (engine = TP x PP GPUs)
    # engines of the reward layout (reward.model, the pairwise and judge rankers, compare; a rule:
    # CPU tasks), one task each over the allocation, each on its shards (a ranker's: whole prompts)
    replicas: int = count(1)
    kv_cache_gib: float = setting(1.0, gt=0)  # judge engine, CPU only
    max_model_len: Optional[int] = setting(None, ge=2)  # judge engine


def reward_kind(reward: RewardConfig) -> str:
    """reward.kind, or (unset) rule when reward.rule is given, else model."""
    return reward.kind or ("rule" if reward.rule else "model")


@dataclass
class PairsConfig:
    min_gap: float = setting(0.0, ge=0)
    allow_truncated: bool = False
    mode: str = setting("best_worst", choices=("best_worst", "ranked"))
    max_pairs_per_prompt: int = count(0, 0)  # ranked mode; 0: all
    min_rank_gap: int = count(0, 0)  # rankers: rejected rank - chosen rank must be >= this (0: no check)


STAGE_KINDS = ("export", "synthesize", "sample", "reward", "compare", "pairs", "train", "kl")


@dataclass
class ClusterConfig:
    launcher: str = setting("local", choices=("local", "slurm"))
    nproc_per_node: int = count(1)
    nodes: int = count(1)
    master_port: int = setting(0, ge=0, le=65535)  # 0: torchrun's or a Slurm-job-derived default
    stage_minutes: dict = field(default_factory=dict)  # wall-clock limit per stage kind, e.g. {sample: 120}
    task_wait_s: int = count(900, 0)  # srun --wait: end a step this long after its first task exited (0: no limit)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
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
    checks = {f.name: f.metadata["check"] for f in dataclasses.fields(cls) if "check" in f.metadata}
    kwargs = {}
    for key, value in data.items():
        if cls is ObjectiveConfig and key != "name":
            kwargs.setdefault("params", {})[key] = value
            continue
        if key not in names:
            errors.append(unknown_key_message(prefix + key, [prefix + n for n in names]))
            continue
        n_errors = len(errors)
        kwargs[key] = _coerce(value, hints[key], prefix + key, errors)
        check = checks.get(key)
        problem = check.problem(kwargs[key]) if check is not None and len(errors) == n_errors else None
        if problem:
            shown = value if isinstance(value, (int, float)) and not isinstance(value, bool) else kwargs[key]
            errors.append(f"{prefix}{key}={shown!r}: {problem}")
    return cls(**{k: v for k, v in kwargs.items() if v is not None or k in data})


def build_section(cls, data: dict, prefix: str):
    """One section (e.g. SamplingConfig) from a mapping, with the same type and range checks as a
    whole config; raises ConfigError listing every problem."""
    errors: list[str] = []
    section = _build(cls, data, prefix, errors)
    if errors:
        raise ConfigError(errors)
    return section


def check_section(section, prefix: str) -> None:
    """Check a section built in code (not loaded) by the same rules as a loaded one."""
    build_section(type(section), dataclasses.asdict(section), prefix)


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


def dump_config(cfg: Config, path: Path) -> None:
    """The resolved config, written atomically (YAML; readable by load_config)."""
    from aipo_mp.runtime.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def arch_to_json(arch: ModelArch) -> str:
    return json.dumps(dataclasses.asdict(arch), indent=2)
