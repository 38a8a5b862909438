"""Preference objectives: pure functions of per-pair summed log-probs (no model, no
torch.distributed), kept in a registry so the config can validate names and hyperparameters
before any process starts.

Notation in the formulas: pi_w, pi_l = summed policy log-probs of the chosen / rejected response;
ref_w, ref_l = the reference model's; d_w = pi_w - ref_w, d_l = pi_l - ref_l; n_w, n_l =
response token counts (EOS included). Label smoothing eps turns -log sigmoid(z) into
(1-eps)*(-log sigmoid(z)) + eps*(-log sigmoid(-z)).

Every objective returns per-pair losses [P] and per-pair metrics [P] (not means): the trainer sums
both over micro-batches and data-parallel ranks and divides by the global pair count itself.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields
from numbers import Real
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from aipo_mp.errors import ConfigError


class ObjectiveError(ConfigError):
    """A user mistake in the objective section of a config (unknown name, key or type)."""


@dataclass(frozen=True)
class PairLogps:
    policy_chosen: Tensor  # [P] summed log-probs over response tokens (EOS included)
    policy_rejected: Tensor  # [P]
    reference_chosen: Optional[Tensor]  # [P]; None for reference-free objectives
    reference_rejected: Optional[Tensor]
    chosen_lengths: Tensor  # [P] response token counts (int or float)
    rejected_lengths: Tensor


@dataclass(frozen=True)
class Objective:
    name: str
    fn: Callable[..., tuple[Tensor, dict[str, Tensor]]]  # fn(batch, **params) -> (losses, metrics)
    defaults: dict[str, float | bool | str]  # every hyperparameter with its default
    needs_reference: bool
    summary: str  # one line: the formula


OBJECTIVES: dict[str, Objective] = {}


def register(name: str, defaults: dict, needs_reference: bool = True):
    """Add `fn` to OBJECTIVES. Its keyword-only parameters must be exactly the keys of `defaults`
    (checked here, so a hyperparameter cannot be documented but silently ignored). The first
    line of its docstring becomes the summary."""

    def add(fn):
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} registered twice")
        takes = {p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}
        if takes != set(defaults):
            raise ValueError(f"objective {name!r}: fn takes {sorted(takes)} but defaults name {sorted(defaults)}")
        summary = (inspect.getdoc(fn) or "").splitlines()[0] if fn.__doc__ else ""
        OBJECTIVES[name] = Objective(name, fn, dict(defaults), needs_reference, summary)
        return fn

    return add


# ---------------------------------------------------------------------------------------------
# Lookup and hyperparameter validation
# ---------------------------------------------------------------------------------------------


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ObjectiveError(f"unknown objective {name!r}; valid: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def all_hyperparameter_names() -> set[str]:
    """Union over objectives: lets the config tell "belongs to another objective" from a typo."""
    return {key for obj in OBJECTIVES.values() for key in obj.defaults}


def resolve_params(name: str, params: dict) -> dict:
    """The objective's full hyperparameters: defaults overridden by `params`, type- and
    range-checked. Ints are accepted (and converted) for floats; nothing else is coerced, so a
    quoted number in a YAML file is an error rather than a silent string."""
    defaults = get_objective(name).defaults
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        noun = "hyperparameter" if len(unknown) == 1 else "hyperparameters"
        raise ObjectiveError(f"objective {name!r} has no {noun} {', '.join(map(repr, unknown))}; "
                             f"valid: {', '.join(sorted(defaults))}")
    resolved = dict(defaults)
    for key, value in params.items():
        resolved[key] = _checked_value(name, key, value, defaults[key])
    return resolved


def _checked_value(name: str, key: str, value, default):
    where = f"objective {name!r}: {key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ObjectiveError(f"{where} must be true or false, got {type(value).__name__} {value!r}")
        return value
    if isinstance(default, float):
        # bool is a subclass of int: `beta: true` is a mistake, not 1.0.
        if isinstance(value, bool) or not isinstance(value, Real):
            raise ObjectiveError(f"{where} must be a number, got {type(value).__name__} {value!r}")
        value = float(value)
        _check_range(where, key, value)
        return value
    if not isinstance(value, type(default)):
        raise ObjectiveError(f"{where} must be a {type(default).__name__}, got {type(value).__name__} {value!r}")
    return value


def _check_range(where: str, key: str, value: float) -> None:
    if not math.isfinite(value):
        raise ObjectiveError(f"{where} must be finite, got {value}")
    # beta <= 0 inverts or removes the preference (and IPO divides by it).
    if key == "beta" and value <= 0:
        raise ObjectiveError(f"{where} must be > 0, got {value}")
    # Beyond 0.5 the smoothed loss prefers the rejected response.
    if key == "label_smoothing" and not 0.0 <= value <= 0.5:
        raise ObjectiveError(f"{where} must be in [0, 0.5], got {value}")


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def compute(name: str, batch: PairLogps, params: dict) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair losses [P] and per-pair, detached, float32 metrics [P]."""
    objective = get_objective(name)
    resolved = resolve_params(name, params)
    _check_batch(objective, batch)
    return objective.fn(batch, **resolved)


def summarize(metrics: dict[str, Tensor]) -> dict[str, float]:
    """Batch means of per-pair metrics (for logging one micro-batch or one process's view)."""
    return {key: float(value.detach().float().mean()) for key, value in metrics.items()}


def _check_batch(objective: Objective, batch: PairLogps) -> None:
    """Programming errors (the trainer builds batches), so plain ValueError with a traceback.
    Only shapes are compared: checking values would force a device sync per micro-batch."""
    if objective.needs_reference and (batch.reference_chosen is None or batch.reference_rejected is None):
        raise ValueError(f"objective {objective.name!r} needs reference log-probs; the batch has none")
    shape = batch.policy_chosen.shape
    for f in fields(PairLogps):
        t = getattr(batch, f.name)
        if t is not None and t.shape != shape:
            raise ValueError(f"PairLogps.{f.name} has shape {tuple(t.shape)}, policy_chosen {tuple(shape)}")
    if len(shape) != 1:
        raise ValueError(f"PairLogps tensors must be 1-D [P], got shape {tuple(shape)}")


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


def _promoted(batch: PairLogps) -> PairLogps:
    """Every tensor in float32, or float64 when the log-probs are float64 (so gradcheck works):
    bf16 log-probs of long responses lose whole nats, and the lengths arrive as ints."""
    dtype = torch.promote_types(batch.policy_chosen.dtype, torch.float32)
    cast = lambda t: None if t is None else t.to(dtype)
    return PairLogps(*(cast(getattr(batch, f.name)) for f in fields(PairLogps)))


def _sigmoid_loss(z: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """(1-eps)*(-log sigmoid(z)) + eps*(-log sigmoid(-z)): conservative DPO's label noise
    (Mitchell 2023). logsigmoid stays finite for any z, unlike log(sigmoid(z))."""
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _log_ratios(b: PairLogps) -> tuple[Tensor, Tensor]:
    """d_w = pi_w - ref_w, d_l = pi_l - ref_l."""
    return b.policy_chosen - b.reference_chosen, b.policy_rejected - b.reference_rejected


def _pair_metrics(b: PairLogps, beta: float, reference_free: bool = False) -> dict[str, Tensor]:
    """The same keys for every objective, so runs with different objectives plot side by side.

    rewards/*: beta*d (DPO's implicit reward), or beta*pi/n (SimPO's) without a reference.
    agreement: whether the reference already ranks chosen above rejected (ref_w > ref_l), the
    quantity AIPO is named after; without a reference, the policy's own pi_w > pi_l."""
    with torch.no_grad():
        if reference_free:
            reward_w = beta * b.policy_chosen / b.chosen_lengths
            reward_l = beta * b.policy_rejected / b.rejected_lengths
            prior_margin = b.policy_chosen - b.policy_rejected
        else:
            d_w, d_l = _log_ratios(b)
            reward_w, reward_l = beta * d_w, beta * d_l
            prior_margin = b.reference_chosen - b.reference_rejected
        metrics = {
            "rewards/chosen": reward_w,
            "rewards/rejected": reward_l,
            "rewards/margin": reward_w - reward_l,
            "rewards/accuracy": (reward_w > reward_l),
            "agreement": (prior_margin > 0),
            "logps/chosen": b.policy_chosen,
            "logps/rejected": b.policy_rejected,
            "nll/chosen": -b.policy_chosen / b.chosen_lengths,
            "lengths/chosen": b.chosen_lengths,
            "lengths/rejected": b.rejected_lengths,
        }
    return {key: value.detach().to(torch.float32) for key, value in metrics.items()}


# ---------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------


@register("aipo", {"beta": 0.1, "alpha": 0.0, "lam": 0.0, "gamma": 0.0, "label_smoothing": 0.0})
def aipo(batch: PairLogps, *, beta: float, alpha: float, lam: float, gamma: float, label_smoothing: float):
    """-log sigmoid(beta*(pi_w - pi_l) - (1+alpha)*beta*(ref_w - ref_l) - gamma) - lam*pi_w/n_w (sigmoid term label-smoothed)

    AIPO, Shen et al. 2024, "AIPO: Improving Training Objective for Iterative Preference
    Optimization" (arXiv 2409.08845). alpha > 0 weights the reference's own preference more, so
    pairs the reference already agrees with push the policy less; lam adds a per-token NLL on the
    chosen response. With alpha = lam = gamma = 0 this is exactly DPO: set alpha and lam per run
    (the authors' recipe uses beta = 0.1; their per-model alpha/lam are not published).
    Label smoothing applies to the sigmoid term only."""
    b = _promoted(batch)
    z = beta * (b.policy_chosen - b.policy_rejected) \
        - (1.0 + alpha) * beta * (b.reference_chosen - b.reference_rejected) - gamma
    losses = _sigmoid_loss(z, label_smoothing) - lam * b.policy_chosen / b.chosen_lengths
    return losses, _pair_metrics(b, beta)


@register("dpo", {"beta": 0.1, "label_smoothing": 0.0})
def dpo(batch: PairLogps, *, beta: float, label_smoothing: float):
    """-log sigmoid(beta*(d_w - d_l)) (label-smoothed: cDPO)

    DPO, Rafailov et al. 2023 (arXiv 2305.18290); label_smoothing > 0 gives conservative DPO
    (cDPO, Mitchell 2023)."""
    b = _promoted(batch)
    d_w, d_l = _log_ratios(b)
    return _sigmoid_loss(beta * (d_w - d_l), label_smoothing), _pair_metrics(b, beta)


@register("ipo", {"beta": 0.1, "average_log_probs": True})
def ipo(batch: PairLogps, *, beta: float, average_log_probs: bool):
    """(h - 1/(2*beta))^2, h = d_w/n_w - d_l/n_l (or d_w - d_l with average_log_probs=false)

    IPO, Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences" (arXiv 2310.12036); beta is the paper's tau. Per-token averages by default:
    with sums the target margin 1/(2*beta) would mean different things for short and long
    responses."""
    b = _promoted(batch)
    d_w, d_l = _log_ratios(b)
    h = d_w / b.chosen_lengths - d_l / b.rejected_lengths if average_log_probs else d_w - d_l
    return (h - 1.0 / (2.0 * beta)) ** 2, _pair_metrics(b, beta)


@register("simpo", {"beta": 2.0, "gamma": 0.5}, needs_reference=False)
def simpo(batch: PairLogps, *, beta: float, gamma: float):
    """-log sigmoid(beta*pi_w/n_w - beta*pi_l/n_l - gamma)

    SimPO, Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward" (arXiv 2405.14734). gamma is the absolute target margin of the paper's formula (not
    the gamma/beta ratio some released configs use). Reference-free: reference log-probs, if
    given, are ignored."""
    b = _promoted(batch)
    z = beta * b.policy_chosen / b.chosen_lengths - beta * b.policy_rejected / b.rejected_lengths - gamma
    return _sigmoid_loss(z), _pair_metrics(b, beta, reference_free=True)


@register("ln_dpo", {"beta": 0.1})
def ln_dpo(batch: PairLogps, *, beta: float):
    """-log sigmoid(beta*(d_w/n_w - d_l/n_l))

    Length-normalised DPO: DPO on per-token average log-ratios, so a longer response does not
    earn a larger implicit reward just by having more tokens."""
    b = _promoted(batch)
    d_w, d_l = _log_ratios(b)
    z = beta * (d_w / b.chosen_lengths - d_l / b.rejected_lengths)
    return _sigmoid_loss(z), _pair_metrics(b, beta)


@register("rdpo", {"beta": 0.1, "alpha": 0.0})
def rdpo(batch: PairLogps, *, beta: float, alpha: float):
    """-log sigmoid(beta*(d_w - d_l) + alpha*(n_w - n_l))

    R-DPO, Park et al. 2024, "Disentangling Length from Quality in Direct Preference
    Optimization" (arXiv 2403.19159). The length term is the paper's sign: it credits part of a
    longer chosen response's preference to its length, which shrinks the gradient on such pairs
    so the policy is not pushed towards verbosity."""
    b = _promoted(batch)
    d_w, d_l = _log_ratios(b)
    z = beta * (d_w - d_l) + alpha * (b.chosen_lengths - b.rejected_lengths)
    return _sigmoid_loss(z), _pair_metrics(b, beta)


@register("rpo", {"beta": 0.1, "nll_weight": 1.0, "nll_average": True})
def rpo(batch: PairLogps, *, beta: float, nll_weight: float, nll_average: bool):
    """-log sigmoid(beta*(d_w - d_l)) + nll_weight*(-pi_w/n_w) (-pi_w with nll_average=false)

    DPO plus an NLL term on the chosen response: Iterative RPO, Pang et al. 2024, "Iterative
    Reasoning Preference Optimization" (arXiv 2404.19733; per-token NLL); RPO, Liu et al. 2024,
    "Provably Mitigating Overoptimization in RLHF" (arXiv 2405.16436)."""
    b = _promoted(batch)
    d_w, d_l = _log_ratios(b)
    nll = -b.policy_chosen / b.chosen_lengths if nll_average else -b.policy_chosen
    return _sigmoid_loss(beta * (d_w - d_l)) + nll_weight * nll, _pair_metrics(b, beta)


@register("hinge", {"beta": 0.1})
def hinge(batch: PairLogps, *, beta: float):
    """max(0, 1 - beta*(d_w - d_l))

    Hinge loss of SLiC-HF, Zhao et al. 2023 (arXiv 2305.10425), on DPO's log-ratio margin (as
    in TRL's `hinge` loss type); 1/beta is the margin in nats."""
    b = _promoted(batch)
    d_w, d_l = _log_ratios(b)
    return torch.relu(1.0 - beta * (d_w - d_l)), _pair_metrics(b, beta)
