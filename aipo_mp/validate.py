"""Every check of a loaded config that spans fields or needs a file: the training layout, the
objective, the training settings, the recipe of `aipo-mp run`, the reward and synthesize sections,
and where each stage runs on the allocation. `aipo-mp check`, `aipo-mp run --dry-run`, `aipo-mp run`
and `aipo-mp train` call `validate` and nothing else validates; a value's own range is checked when
the config loads (aipo_mp/config.py). No torch, no process group, no weights: arithmetic on the
config and the model's config.json only.

    arch = validate(cfg, world_size=8, stages=("train", "recipe", "placement"))
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence

from aipo_mp.config import (
    RANKER_KINDS,
    STAGE_KINDS,
    Config,
    ModelArch,
    ParallelConfig,
    RewardConfig,
    SynthesizeConfig,
    reward_kind,
)
from aipo_mp.errors import ConfigError, UserError
from aipo_mp.models import arch_from_dir, arch_problems

TRAIN, RECIPE, PLACEMENT = "train", "recipe", "placement"


def validate(cfg: Config, world_size: Optional[int] = None, stages: Sequence[str] = (TRAIN,),
             arch: Optional[ModelArch] = None, plan: bool = False) -> ModelArch:
    """Raise one ConfigError listing every problem of the chosen stages; return the architecture.

    stages: "train" (layout, objective, training), "recipe" (what `aipo-mp run` needs: policy,
    prompts, reward, pairs, synthesize), "placement" (every stage fits `cluster.nodes` x
    world_size / nodes GPUs). `plan`: a dry run may name a model.path that exists only on the
    cluster; then the recipe's model.arch stands in for it."""
    errors: list[str] = []
    if RECIPE in stages:
        errors += recipe_errors(cfg, plan)
    if arch is None:
        if plan and cfg.model.arch and not Path(cfg.model.path or "").exists():
            arch = cfg.model.arch
        else:
            try:
                arch = resolve_arch(cfg)
            except UserError as e:
                raise type(e)(errors + e.errors) from None
    if PLACEMENT in stages:
        errors += allocation_errors(cfg, world_size, arch)
    if TRAIN in stages or PLACEMENT in stages:
        errors += layout_errors(arch, cfg.parallel, world_size)
        errors += arch_problems(arch)
        errors += training_errors(cfg, world_size)
        errors += objective_errors(cfg)
    if errors:
        raise ConfigError(errors)
    return arch


def resolve_arch(cfg: Config) -> ModelArch:
    """The model architecture: from model.path's config.json when given, else model.arch."""
    if cfg.model.path:
        return arch_from_dir(cfg.model.path)
    if cfg.model.arch is None:
        raise ConfigError("model: set model.path (an HF or aipo_mp checkpoint directory) or model.arch")
    return cfg.model.arch


# ---------------------------------------------------------------------------------------------
# Training: layout, settings, objective
# ---------------------------------------------------------------------------------------------


def divisors(*ns: int) -> list[int]:
    g = 0
    for n in ns:
        g = _gcd(g, n)
    return [d for d in range(1, g + 1) if g % d == 0] if g else [1]


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


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
        errors.append(f"{what} does not divide the {arch.num_layers} layers; choose pp (x vpp) from "
                      f"{divisors(arch.num_layers)}")
    if vpp > 1 and pp < 2:
        errors.append(f"parallel.vpp={vpp} needs parallel.pp > 1 (interleaving splits pipeline stages)")
    if par.sequence_parallel and tp < 2:
        errors.append("parallel.sequence_parallel needs parallel.tp > 1; set parallel.sequence_parallel=false or "
                      "raise tp")
    if world_size is not None and world_size % (tp * pp * cp):
        errors.append(
            f"world size {world_size} is not a multiple of tp x pp x cp = {tp * pp * cp}; "
            f"launch a multiple of {tp * pp * cp} processes or change the layout"
        )
    return errors + expert_layout_errors(arch, par, world_size) + latent_attention_errors(arch, par)


def latent_attention_errors(arch: ModelArch, par: ParallelConfig) -> list[str]:
    """Multi-latent attention (DeepSeek-V3): its family's own checks, and TP must divide the
    latents (megatron's local spec splits the down projections' outputs over TP)."""
    from aipo_mp.models import FAMILIES

    family = FAMILIES.get(arch.family)
    errors = family.arch_errors(arch) if family is not None and family.arch_errors else []
    if not arch.kv_lora_rank:
        return errors
    for what, size in (("q_lora_rank", arch.q_lora_rank), ("kv_lora_rank + qk_rope_head_dim",
                                                           arch.kv_lora_rank + arch.qk_rope_head_dim)):
        if size % par.tp:
            errors.append(f"parallel.tp={par.tp} does not divide the latent attention's {what} ({size}); choose tp "
                          f"from {divisors(size)}")
    return errors


def expert_layout_errors(arch: ModelArch, par: ParallelConfig, world_size: Optional[int]) -> list[str]:
    """The expert mesh (etp x ep x expert-DP per pipeline stage) must divide like the dense one."""
    ep, etp = par.ep, par.etp
    if not arch.num_experts:
        return [f"parallel.ep={ep}, parallel.etp={etp}: expert parallelism needs a mixture-of-experts model; "
                "set both to 1"] if ep * etp > 1 else []
    errors = []
    if arch.num_experts % ep:
        errors.append(f"parallel.ep={ep} does not divide the {arch.num_experts} experts; choose ep from "
                      f"{divisors(arch.num_experts)}")
    if arch.moe_intermediate_size % etp:
        errors.append(f"parallel.etp={etp} does not divide the experts' FFN width {arch.moe_intermediate_size}; "
                      f"choose etp from {divisors(arch.moe_intermediate_size)}")
    mesh = etp * ep * par.pp
    if world_size is not None and world_size % mesh:
        errors.append(f"world size {world_size} is not a multiple of etp x ep x pp = {mesh}; launch a multiple "
                      f"of {mesh} processes or change parallel.ep / parallel.etp")
    if ep == 1 and par.tp > 1 and etp != par.tp:
        # megatron gives experts their own gradient reduction only when ep > 1; at ep = 1 a copy
        # of an expert on each TP rank (etp < tp) would never have its gradients summed over TP.
        errors.append(f"parallel.ep=1 with parallel.tp={par.tp} needs parallel.etp={par.tp} (experts split like the "
                      f"dense layers); or use expert parallelism (parallel.ep > 1)")
    if etp > 1 and arch.family == "gpt_oss":  # megatron 0.16.1 asserts: expert biases need ETP 1
        errors.append(f"parallel.etp={etp}: gpt-oss's experts have biases, which megatron supports only unsplit; "
                      "set parallel.etp=1 (with parallel.tp > 1 use parallel.ep > 1)")
    if par.tp > 1 and not par.sequence_parallel:
        errors.append(f"a mixture-of-experts model with parallel.tp={par.tp} needs sequence parallelism "
                      "(megatron dispatches tokens per TP rank); set parallel.sequence_parallel=true")
    return errors


def training_errors(cfg: Config, world_size: Optional[int]) -> list[str]:
    errors = []
    t, par = cfg.train, cfg.parallel
    if par.cp > 1 and cfg.precision.backend == "local":
        errors.append("parallel.cp > 1 needs the Transformer Engine backend (precision.backend=te)")
    if cfg.precision.fp8 and cfg.precision.backend == "local":
        errors.append("precision.fp8 needs the Transformer Engine backend (precision.backend=te or auto on a GPU)")
    if cfg.precision.fp8 and cfg.precision.dtype != "bf16":
        errors.append("precision.fp8 needs precision.dtype=bf16")
    if par.sequence_parallel and t.seq_length % par.tp:
        errors.append(f"train.seq_length={t.seq_length} must be a multiple of parallel.tp={par.tp} with sequence "
                      "parallel")
    model_parallel = par.tp * par.pp * par.cp
    if world_size is not None and model_parallel and world_size % model_parallel == 0:
        dp = world_size // model_parallel
        if t.global_batch_pairs % dp:
            errors.append(
                f"train.global_batch_pairs={t.global_batch_pairs} is not divisible by the data-parallel size {dp}; "
                f"use a multiple of {dp}"
            )
    if t.min_lr > t.lr:
        errors.append(f"train.lr={t.lr}, train.min_lr={t.min_lr}: need 0 <= min_lr <= lr")
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
    tolerated with a warning, so `objective.name=dpo` can override a recipe written for aipo.
    The registry (aipo_mp/objectives.py) declares each objective's hyperparameters and ranges."""
    from aipo_mp import objectives  # the registry holds the losses (torch); only `train` needs them

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


# ---------------------------------------------------------------------------------------------
# The recipe of `aipo-mp run`: policy, prompts, reward, pairs, synthesize
# ---------------------------------------------------------------------------------------------


def recipe_errors(cfg: Config, plan: bool = False) -> list[str]:
    errors = []
    if not cfg.model.path:
        errors.append("model.path: set the starting policy (an HF directory or an aipo_mp checkpoint)")
    if not cfg.rounds.prompts:
        errors.append("rounds.prompts: set the prompts JSONL the policy samples from each round")
    elif not plan or Path(cfg.rounds.prompts).exists():
        from aipo_mp.data.records import read_prompts

        try:
            read_prompts(cfg.rounds.prompts)  # empty or malformed files fail here, before any stage
        except UserError as e:
            errors += [f"rounds.prompts: {line}" for line in e.errors]
    errors += reward_errors(cfg.reward)
    if cfg.reward.rule and not errors and not plan:
        from aipo_mp.rounds.rewards import check_rule

        errors += check_rule(cfg.reward.rule)  # import and signature, before any stage runs
    if cfg.pairs.min_rank_gap and reward_kind(cfg.reward) not in RANKER_KINDS:
        errors.append("pairs.min_rank_gap needs ranks: set reward.kind to pairwise or judge, or pairs.min_rank_gap=0")
    if cfg.rounds.synthesize.enabled:
        errors += synthesize_errors(cfg.rounds.synthesize)
    return errors


def reward_errors(reward: RewardConfig) -> list[str]:
    """The reward section: one source of scores, a usable ranker template."""
    kind = reward_kind(reward)
    if not reward.kind and bool(reward.rule) == bool(reward.model):
        return ["reward: set exactly one of reward.rule (module:function) or reward.model (a classifier dir)"]
    errors = []
    if kind == "rule":
        if not reward.rule or reward.model:
            errors.append("reward.kind=rule: set reward.rule (module:function) and not reward.model")
    elif not reward.model or reward.rule:
        what = {"model": "a one-label classifier dir", "pairwise": "a one-label pairwise classifier dir (P(A > B))",
                "judge": "an instruction model dir served by vLLM"}[kind]
        errors.append(f"reward.kind={kind}: set reward.model ({what}) and not reward.rule")
    if reward.template is not None:
        try:
            check_template(reward.template, kind)
        except ConfigError as e:
            errors += e.errors
    if len(reward.judge_answers) != 2 or reward.judge_answers[0] == reward.judge_answers[1]:
        errors.append(f"reward.judge_answers={reward.judge_answers!r}: give two different non-empty strings "
                      '(e.g. [" A", " B"])')
    return errors


def check_template(template: str, what: str) -> None:
    try:
        filled = template.format(prompt="\0p", a="\0a", b="\0b")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"reward.template for the {what}: {type(e).__name__} {e}; use only the fields "
                          "{prompt}, {a} and {b} (write {{ and }} for literal braces)") from None
    missing = [f for f in ("\0p", "\0a", "\0b") if f not in filled]
    if missing:
        raise ConfigError(f"reward.template for the {what} must contain {{prompt}}, {{a}} and {{b}}")


def synthesize_errors(synth: SynthesizeConfig) -> list[str]:
    if synth.max_tokens < synth.min_tokens:
        return [f"rounds.synthesize.max_tokens={synth.max_tokens!r}: must be >= min_tokens ({synth.min_tokens})"]
    return []


# ---------------------------------------------------------------------------------------------
# Placement: every stage fits the allocation
# ---------------------------------------------------------------------------------------------


def allocation_errors(cfg: Config, world_size: Optional[int], arch: Optional[ModelArch] = None) -> list[str]:
    """The training ranks split over cluster.nodes, and every engine stage fits the nodes."""
    nodes = cfg.cluster.nodes
    world = world_size if world_size is not None else nodes * cfg.cluster.nproc_per_node
    if world % nodes:
        return [f"{world} training ranks do not split evenly over cluster.nodes={nodes}; "
                "use a multiple of the node count"]
    return placement_errors(cfg, nodes, world // nodes, arch)


def engine_shape_errors(section: str, tp: int, pp: int, shape: Optional[dict], what: str) -> list[str]:
    """vLLM's own limits on one engine of a model `shape` {heads, kv_heads, layers}: TP divides
    the attention heads, and the key/value heads (or is a multiple of them: vLLM then replicates
    them); PP divides the layers (so every pipeline stage holds the same layers, as planned)."""
    if not shape:
        return []
    heads, kv, layers = shape["heads"], shape["kv_heads"] or shape["heads"], shape["layers"]
    if heads % tp:
        return [f"{section}.tensor_parallel={tp} does not divide the {heads} attention heads of {what}; choose "
                f"{section}.tensor_parallel from {divisors(heads)}"]
    if (tp % kv if tp >= kv else kv % tp):
        return [f"{section}.tensor_parallel={tp} neither divides nor is a multiple of the {kv} key/value heads of "
                f"{what}; choose {section}.tensor_parallel from {divisors(heads, kv)} or a multiple of {kv}"]
    if layers and layers % pp:
        return [f"{section}.pipeline_parallel={pp} does not divide the {layers} layers of {what}; choose "
                f"{section}.pipeline_parallel from {divisors(layers)}"]
    return []


def sampling_shape_errors(cfg: Config, arch: Optional[ModelArch]) -> list[str]:
    """The sampling engine's layout against the policy: heads, layers, and DP x EP for MoE only."""
    s = cfg.sampling
    if arch is None:
        return []
    moe = bool(arch.num_experts)
    if s.expert_parallel and not moe:
        return ["sampling.expert_parallel=true needs a mixture-of-experts policy (this one is dense); set "
                "sampling.expert_parallel=false"]
    if s.data_parallel > 1 and not moe:
        return [f"sampling.data_parallel={s.data_parallel} (data-parallel ranks inside one engine, with expert "
                "parallelism) is for mixture-of-experts policies; for a dense policy set sampling.data_parallel=1 "
                "and use sampling.replicas"]
    shape = {"heads": arch.num_attention_heads, "kv_heads": arch.num_key_value_heads, "layers": arch.num_layers}
    return engine_shape_errors("sampling", s.tensor_parallel, s.pipeline_parallel, shape, "the policy")


def reward_model_shape(reward: RewardConfig) -> Optional[dict]:
    """{heads, kv_heads, layers} from reward.model's config.json when it is on this machine (a
    dry run may name a directory that exists only on the cluster: then nothing is checked)."""
    from aipo_mp.runtime.json_files import read_json_object

    path = Path(reward.model or "") / "config.json"
    if not reward.model or not path.is_file():
        return None
    hf = read_json_object(path, "the reward model's config.json")
    hf = hf.get("text_config", hf)
    heads = hf.get("num_attention_heads")
    if not isinstance(heads, int) or heads < 1:
        return None
    kv = hf.get("num_key_value_heads") or heads
    return {"heads": heads, "kv_heads": kv if isinstance(kv, int) else heads,
            "layers": hf.get("num_hidden_layers") if isinstance(hf.get("num_hidden_layers"), int) else 0}


def engine_fit_errors(section: str, replicas: int, gpus: int, width: str, nodes: int, gpus_per_node: int) -> list[str]:
    """`replicas` engines of `gpus` GPUs (`width` names the keys that multiply to it) on `nodes` x
    `gpus_per_node`: an engine wider than a node fills whole nodes, and spanning engines need
    `replicas` x nodes-per-engine nodes (they never share a node)."""
    total = nodes * gpus_per_node
    if gpus > gpus_per_node:
        if gpus % gpus_per_node:
            return [f"{width} ({gpus} GPUs per engine) does not fill whole nodes of {gpus_per_node} GPUs (an engine "
                    f"wider than a node spans whole nodes); make it a multiple of {gpus_per_node}"]
        span = gpus // gpus_per_node
        if replicas * span > nodes:
            return [f"{section}.replicas={replicas} engines x {span} nodes each ({width}) need "
                    f"{replicas * span} nodes; the allocation has {nodes}: use {section}.replicas <= "
                    f"{nodes // span} or more nodes" if nodes >= span else
                    f"{width} ({gpus} GPUs per engine) spans {span} nodes; the allocation has {nodes} node(s) x "
                    f"{gpus_per_node} GPUs: use a smaller engine or at least {span} nodes"]
        return []
    if replicas * gpus > total:
        return [f"{section}.replicas={replicas} x {width} needs {replicas * gpus} GPUs; the allocation has {nodes} "
                f"node(s) x {gpus_per_node} GPUs = {total}: use {section}.replicas <= {total // gpus} or more nodes"]
    return []


def placement_errors(cfg: Config, nodes: int, gpus_per_node: int, arch: Optional[ModelArch] = None) -> list[str]:
    """Every stage must fit `nodes` x `gpus_per_node`, and every engine must suit its model
    (`arch`: the policy; reward.model's config.json when present): checked before any stage starts.
    One line per engine section: its shape first, then whether it fits."""
    if nodes < 1 or gpus_per_node < 1:
        return [f"allocation of {nodes} node(s) x {gpus_per_node} GPUs: need at least 1 x 1 "
                "(cluster.nodes, cluster.nproc_per_node)"]
    s, r = cfg.sampling, cfg.reward
    errors = sampling_shape_errors(cfg, arch)
    if not errors:
        width = (f"sampling.tensor_parallel x pipeline_parallel x data_parallel = {s.tensor_parallel} x "
                 f"{s.pipeline_parallel} x {s.data_parallel}" if s.pipeline_parallel * s.data_parallel > 1
                 else f"sampling.tensor_parallel={s.tensor_parallel}")
        errors = engine_fit_errors("sampling", s.replicas, s.tensor_parallel * s.pipeline_parallel * s.data_parallel,
                                   width, nodes, gpus_per_node)
    reward_errors_ = engine_shape_errors("reward", r.tensor_parallel, r.pipeline_parallel,
                                         reward_model_shape(r), f"reward.model ({r.model})") if r.model else []
    if not reward_errors_:
        gpus = r.tensor_parallel * r.pipeline_parallel if r.model else 1
        width = (f"reward.tensor_parallel x pipeline_parallel = {r.tensor_parallel} x {r.pipeline_parallel}"
                 if r.pipeline_parallel > 1 else f"reward.tensor_parallel={r.tensor_parallel}")
        reward_errors_ = engine_fit_errors("reward", r.replicas, gpus, width, nodes, gpus_per_node)
    errors += reward_errors_
    for kind, minutes in (cfg.cluster.stage_minutes or {}).items():
        if kind not in STAGE_KINDS:
            errors.append(f"cluster.stage_minutes.{kind}: unknown stage; use {', '.join(STAGE_KINDS)}")
        elif not isinstance(minutes, (int, float)) or isinstance(minutes, bool) or minutes <= 0:
            errors.append(f"cluster.stage_minutes.{kind}={minutes!r}: must be a number of minutes > 0")
    return errors
