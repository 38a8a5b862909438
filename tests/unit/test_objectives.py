"""Preference objectives against numbers worked out by hand (the arithmetic is in the comments)
or with the math module, never by calling the code under test a second way."""

from __future__ import annotations

import math

import pytest
import torch

from aipo_mp.objectives import (
    OBJECTIVES,
    ObjectiveError,
    PairLogps,
    all_hyperparameter_names,
    compute,
    get_objective,
    register,
    resolve_params,
    summarize,
)

METRIC_KEYS = {
    "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "agreement",
    "logps/chosen", "logps/rejected", "nll/chosen", "lengths/chosen", "lengths/rejected",
}


def pairs(pw, pl, rw=None, rl=None, nw=None, nl=None, dtype=torch.float64) -> PairLogps:
    """PairLogps from plain lists; lengths default to 1 (then averages equal sums)."""
    t = lambda xs: None if xs is None else torch.tensor(xs, dtype=dtype)
    ones = [1] * len(pw)
    return PairLogps(t(pw), t(pl), t(rw), t(rl), torch.tensor(nw or ones), torch.tensor(nl or ones))


def neg_log_sigmoid(z: float) -> float:
    return math.log1p(math.exp(-z))


def random_pairs(seed: int, n: int = 8) -> PairLogps:
    g = torch.Generator().manual_seed(seed)
    logps = lambda: -torch.rand(n, generator=g, dtype=torch.float64) * 40 - 1
    lengths = lambda: torch.randint(1, 50, (n,), generator=g)
    return PairLogps(logps(), logps(), logps(), logps(), lengths(), lengths())


def losses_of(name: str, batch: PairLogps, **params) -> list[float]:
    return compute(name, batch, params)[0].tolist()


# ---------------------------------------------------------------------------------------------
# Registry and hyperparameters
# ---------------------------------------------------------------------------------------------


def test_registry_defaults_are_the_documented_ones():
    assert {name: obj.defaults for name, obj in OBJECTIVES.items()} == {
        "aipo": {"beta": 0.1, "alpha": 0.0, "lam": 0.0, "gamma": 0.0, "label_smoothing": 0.0},
        "dpo": {"beta": 0.1, "label_smoothing": 0.0},
        "ipo": {"beta": 0.1, "average_log_probs": True},
        "simpo": {"beta": 2.0, "gamma": 0.5},
        "ln_dpo": {"beta": 0.1},
        "rdpo": {"beta": 0.1, "alpha": 0.0},
        "rpo": {"beta": 0.1, "nll_weight": 1.0, "nll_average": True},
        "hinge": {"beta": 0.1},
    }
    assert [n for n, o in OBJECTIVES.items() if not o.needs_reference] == ["simpo"]
    assert all(o.summary and "\n" not in o.summary for o in OBJECTIVES.values())
    assert all_hyperparameter_names() == {"beta", "alpha", "lam", "gamma", "label_smoothing",
                                          "average_log_probs", "nll_weight", "nll_average"}


def test_unknown_objective_lists_valid_names():
    with pytest.raises(ObjectiveError) as e:
        get_objective("dpoo")
    assert str(e.value) == "unknown objective 'dpoo'; valid: aipo, dpo, hinge, ipo, ln_dpo, rdpo, rpo, simpo"
    with pytest.raises(ObjectiveError, match="unknown objective 'x'"):
        compute("x", pairs([-1.0], [-2.0], [-1.0], [-2.0]), {})


def test_unknown_hyperparameter_names_objective_and_valid_keys():
    with pytest.raises(ObjectiveError) as e:
        resolve_params("dpo", {"alpha": 0.1})
    assert str(e.value) == "objective 'dpo' has no hyperparameter 'alpha'; valid: beta, label_smoothing"
    with pytest.raises(ObjectiveError, match=r"no hyperparameters 'lam', 'zeta'; valid: beta, label_smoothing"):
        resolve_params("dpo", {"zeta": 1.0, "lam": 1.0, "beta": 0.2})


@pytest.mark.parametrize("name,params,message", [
    ("dpo", {"beta": "0.1"}, "objective 'dpo': beta must be a number, got str '0.1'"),
    ("dpo", {"beta": True}, "objective 'dpo': beta must be a number, got bool True"),
    ("ipo", {"average_log_probs": 1}, "objective 'ipo': average_log_probs must be true or false, got int 1"),
    ("rpo", {"nll_average": "yes"}, "objective 'rpo': nll_average must be true or false, got str 'yes'"),
    ("dpo", {"beta": 0.0}, "objective 'dpo': beta must be > 0, got 0.0"),
    ("simpo", {"beta": -2}, "objective 'simpo': beta must be > 0, got -2.0"),
    ("aipo", {"label_smoothing": 0.6}, "objective 'aipo': label_smoothing must be in [0, 0.5], got 0.6"),
    ("aipo", {"alpha": float("nan")}, "objective 'aipo': alpha must be finite, got nan"),
])
def test_wrong_type_or_range_is_an_objective_error(name, params, message):
    with pytest.raises(ObjectiveError) as e:
        resolve_params(name, params)
    assert str(e.value) == message


def test_resolve_fills_defaults_and_accepts_ints_for_floats():
    resolved = resolve_params("aipo", {"beta": 1, "alpha": 0.5})
    assert resolved == {"beta": 1.0, "alpha": 0.5, "lam": 0.0, "gamma": 0.0, "label_smoothing": 0.0}
    assert type(resolved["beta"]) is float
    assert resolve_params("ipo", {"average_log_probs": False})["average_log_probs"] is False


def test_register_rejects_a_function_whose_keywords_differ_from_defaults():
    def wrong(batch, *, gamma):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="fn takes"):
        register("test_only_wrong", {"beta": 0.1})(wrong)
    assert "test_only_wrong" not in OBJECTIVES
    with pytest.raises(ValueError, match="registered twice"):
        register("dpo", {"beta": 0.1})(lambda batch, *, beta: None)


def test_missing_reference_or_ragged_batch_is_a_programming_error():
    no_ref = pairs([-1.0], [-2.0])
    with pytest.raises(ValueError, match="needs reference log-probs"):
        compute("dpo", no_ref, {})
    compute("simpo", no_ref, {})  # reference-free: fine
    ragged = PairLogps(torch.zeros(2), torch.zeros(3), None, None, torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="policy_rejected has shape"):
        compute("simpo", ragged, {})


# ---------------------------------------------------------------------------------------------
# DPO and AIPO
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 3.0])
def test_dpo_with_policy_equal_to_reference_is_ln2(beta):
    b = random_pairs(seed=1)
    same = PairLogps(b.policy_chosen, b.policy_rejected, b.policy_chosen.clone(), b.policy_rejected.clone(),
                     b.chosen_lengths, b.rejected_lengths)
    # z = beta * 0 = 0 and -log sigmoid(0) = log 2, whatever beta and the log-probs are.
    assert losses_of("dpo", same, beta=beta) == pytest.approx([math.log(2)] * 8, abs=1e-12)


def test_dpo_matches_the_formula_pair_by_pair():
    b = random_pairs(seed=2)
    got = losses_of("dpo", b, beta=0.3)
    for i, loss in enumerate(got):
        z = 0.3 * ((b.policy_chosen[i].item() - b.reference_chosen[i].item())
                   - (b.policy_rejected[i].item() - b.reference_rejected[i].item()))
        assert loss == pytest.approx(neg_log_sigmoid(z), rel=1e-12)


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_aipo_with_zero_alpha_lam_gamma_is_dpo(beta):
    b = random_pairs(seed=3)
    assert losses_of("aipo", b, beta=beta) == pytest.approx(losses_of("dpo", b, beta=beta), rel=1e-12)


@pytest.mark.parametrize("alpha,lam,gamma", [(0.5, 0.0, 0.0), (1.0, 0.7, 0.3), (0.2, 0.05, -0.4)])
def test_aipo_with_policy_equal_to_reference(alpha, lam, gamma):
    """z = beta*dpi - (1+alpha)*beta*dref - gamma with dpi = dref gives z = -alpha*beta*dref - gamma."""
    beta = 0.2
    pw, pl, nw = [-12.0, -30.0, -7.5], [-20.0, -25.0, -7.5], [4, 10, 3]
    b = pairs(pw, pl, list(pw), list(pl), nw=nw)
    expected = [neg_log_sigmoid(-alpha * beta * (w - l) - gamma) - lam * w / n for w, l, n in zip(pw, pl, nw)]
    assert losses_of("aipo", b, beta=beta, alpha=alpha, lam=lam, gamma=gamma) == pytest.approx(expected, rel=1e-12)


def test_aipo_worked_example():
    # pi_w - pi_l = -10 - (-14) = 4; ref_w - ref_l = -12 - (-13) = 1
    # z = 0.1*4 - (1+1)*0.1*1 - 0 = 0.4 - 0.2 = 0.2
    # NLL term: -lam*pi_w/n_w = -0.5*(-10)/5 = +1.0
    b = pairs([-10.0], [-14.0], [-12.0], [-13.0], nw=[5], nl=[7])
    assert losses_of("aipo", b, beta=0.1, alpha=1.0) == pytest.approx([math.log1p(math.exp(-0.2))])
    assert losses_of("aipo", b, beta=0.1, alpha=1.0, lam=0.5) == pytest.approx([math.log1p(math.exp(-0.2)) + 1.0])
    # gamma = 0.2 cancels the margin: z = 0 -> log 2 (+1.0)
    assert losses_of("aipo", b, beta=0.1, alpha=1.0, lam=0.5, gamma=0.2) == pytest.approx([math.log(2) + 1.0])


@pytest.mark.parametrize("name,params", [("dpo", {}), ("aipo", {"alpha": 0.3})])
def test_label_smoothing_half_is_symmetric_in_chosen_and_rejected(name, params):
    b = random_pairs(seed=4)
    swapped = PairLogps(b.policy_rejected, b.policy_chosen, b.reference_rejected, b.reference_chosen,
                        b.rejected_lengths, b.chosen_lengths)
    half = dict(params, label_smoothing=0.5)
    assert losses_of(name, b, **half) == pytest.approx(losses_of(name, swapped, **half), rel=1e-12)
    # Without smoothing the loss does care which one was preferred.
    assert losses_of(name, b, **params) != pytest.approx(losses_of(name, swapped, **params), rel=1e-3)


def test_label_smoothing_worked_example():
    # z = 0.5*((-2 - -4) - (-6 - -5)) = 0.5*3 = 1.5
    # loss = 0.9*log(1+e^-1.5) + 0.1*log(1+e^1.5)
    b = pairs([-2.0], [-6.0], [-4.0], [-5.0])
    expected = 0.9 * math.log1p(math.exp(-1.5)) + 0.1 * math.log1p(math.exp(1.5))
    assert losses_of("dpo", b, beta=0.5, label_smoothing=0.1) == pytest.approx([expected], rel=1e-12)


# ---------------------------------------------------------------------------------------------
# The others, on one worked example: pi_w=-6 pi_l=-12 ref_w=-8 ref_l=-10 n_w=2 n_l=4
# so d_w = 2, d_l = -2, d_w - d_l = 4; per token d_w/n_w = 1, d_l/n_l = -0.5.
# ---------------------------------------------------------------------------------------------

EXAMPLE = dict(pw=[-6.0], pl=[-12.0], rw=[-8.0], rl=[-10.0], nw=[2], nl=[4])


def test_ipo_worked_example():
    b = pairs(**EXAMPLE)
    # averaged: h = 1 - (-0.5) = 1.5; beta = 0.5 -> target 1/(2*0.5) = 1; (1.5 - 1)^2 = 0.25
    assert losses_of("ipo", b, beta=0.5) == pytest.approx([0.25], rel=1e-12)
    # summed: h = 4; (4 - 1)^2 = 9
    assert losses_of("ipo", b, beta=0.5, average_log_probs=False) == pytest.approx([9.0], rel=1e-12)


def test_ipo_minimum_is_at_half_inverse_beta():
    beta = 0.25  # target margin 1/(2*0.25) = 2
    pw = torch.tensor([-4.0], dtype=torch.float64, requires_grad=True)
    # h = (-4 - -5) - (-6 - -5) = 1 + 1 = 2: exactly the target
    b = PairLogps(pw, torch.tensor([-6.0], dtype=torch.float64), torch.tensor([-5.0], dtype=torch.float64),
                  torch.tensor([-5.0], dtype=torch.float64), torch.tensor([1]), torch.tensor([1]))
    loss = compute("ipo", b, {"beta": beta, "average_log_probs": False})[0].sum()
    loss.backward()
    assert loss.item() == 0.0 and pw.grad.item() == 0.0
    for shift in (-0.5, 0.5):  # h = 2 -/+ 0.5 -> loss 0.25 either side
        moved = pairs([-4.0 + shift], [-6.0], [-5.0], [-5.0])
        assert losses_of("ipo", moved, beta=beta, average_log_probs=False) == pytest.approx([0.25])


def test_simpo_worked_example():
    # beta = 2, gamma = 0.5; pi_w/n_w = -6/3 = -2, pi_l/n_l = -10/2 = -5
    # z = 2*(-2) - 2*(-5) - 0.5 = -4 + 10 - 0.5 = 5.5
    expected = [math.log1p(math.exp(-5.5))]
    assert losses_of("simpo", pairs([-6.0], [-10.0], nw=[3], nl=[2])) == pytest.approx(expected, rel=1e-12)
    # Reference-free: reference log-probs change nothing.
    with_ref = pairs([-6.0], [-10.0], [-1.0], [-50.0], nw=[3], nl=[2])
    assert losses_of("simpo", with_ref) == pytest.approx(expected, rel=1e-12)
    # gamma = 0, beta = 1: z = -2 + 5 = 3
    assert losses_of("simpo", with_ref, beta=1.0, gamma=0.0) == pytest.approx([math.log1p(math.exp(-3))])


def test_ln_dpo_worked_example():
    # z = 0.5*(1 - (-0.5)) = 0.75
    assert losses_of("ln_dpo", pairs(**EXAMPLE), beta=0.5) == pytest.approx([math.log1p(math.exp(-0.75))])


def test_rdpo_worked_example():
    # z = 0.5*4 + 0.1*(2 - 4) = 2 - 0.2 = 1.8; alpha = 0 is DPO: z = 2
    assert losses_of("rdpo", pairs(**EXAMPLE), beta=0.5, alpha=0.1) == pytest.approx([math.log1p(math.exp(-1.8))])
    assert losses_of("rdpo", pairs(**EXAMPLE), beta=0.5) == pytest.approx([math.log1p(math.exp(-2.0))])


def test_rpo_worked_example():
    # DPO part: z = 0.5*4 = 2; NLL per token = 6/2 = 3, summed = 6
    dpo_part = math.log1p(math.exp(-2.0))
    assert losses_of("rpo", pairs(**EXAMPLE), beta=0.5) == pytest.approx([dpo_part + 3.0])
    assert losses_of("rpo", pairs(**EXAMPLE), beta=0.5, nll_weight=0.5, nll_average=False) == \
        pytest.approx([dpo_part + 0.5 * 6.0])


def test_hinge_worked_example():
    # 1 - 0.1*4 = 0.6; 1 - 0.5*4 = -1 -> 0
    assert losses_of("hinge", pairs(**EXAMPLE), beta=0.1) == pytest.approx([0.6])
    assert losses_of("hinge", pairs(**EXAMPLE), beta=0.5) == [0.0]


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------

# Non-default values so every term of every objective is exercised.
GRADCHECK_PARAMS = {
    "aipo": {"alpha": 0.5, "lam": 0.3, "gamma": 0.2, "label_smoothing": 0.1},
    "dpo": {"label_smoothing": 0.1},
    "simpo": {},
    "ipo": {},
    "ln_dpo": {},
    "rdpo": {"alpha": 0.05},
    "rpo": {"nll_weight": 0.5},
    "hinge": {},
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_gradcheck_wrt_policy_logps(name):
    f64 = lambda xs: torch.tensor(xs, dtype=torch.float64)
    pw = f64([-5.0, -9.0, -3.0, -12.0]).requires_grad_()
    pl = f64([-7.0, -4.0, -8.0, -10.0]).requires_grad_()
    rw, rl = f64([-6.0, -8.0, -6.0, -11.0]), f64([-6.0, -5.0, -4.0, -13.0])
    nw, nl = torch.tensor([3, 5, 2, 7]), torch.tensor([4, 2, 6, 3])
    params = dict(GRADCHECK_PARAMS.get(name, {}), beta=0.3)
    # d_w - d_l = [2, -2, 7, -4]; beta*(d_w - d_l) = [0.6, -0.6, 2.1, -1.2]: every pair is at
    # least 0.4 from the hinge's kink at 1, and both sides of it are covered.
    fn = lambda a, c: compute(name, PairLogps(a, c, rw, rl, nw, nl), params)[0]
    assert fn(pw, pl).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (pw, pl))


# ---------------------------------------------------------------------------------------------
# Metrics and dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_metrics_same_keys_detached_float32_per_pair(name):
    b = random_pairs(seed=5)
    b = PairLogps(b.policy_chosen.requires_grad_(), b.policy_rejected.requires_grad_(), b.reference_chosen,
                  b.reference_rejected, b.chosen_lengths, b.rejected_lengths)
    losses, metrics = compute(name, b, {})
    assert losses.shape == (8,) and losses.requires_grad
    assert set(metrics) == METRIC_KEYS
    for key, value in metrics.items():
        assert value.shape == (8,) and value.dtype == torch.float32 and not value.requires_grad, key


def test_metrics_on_a_crafted_example():
    # pair 0: d_w = -4 - -5 = 1, d_l = -9 - -7 = -2 -> rewards 0.1, -0.2: accurate; ref -5 > -7: agrees
    # pair 1: d_w = -8 - -6 = -2, d_l = -6 - -5 = -1 -> rewards -0.2, -0.1: wrong; ref -6 < -5: disagrees
    b = pairs([-4.0, -8.0], [-9.0, -6.0], [-5.0, -6.0], [-7.0, -5.0], nw=[2, 4], nl=[3, 3])
    _, m = compute("dpo", b, {"beta": 0.1})
    assert m["rewards/chosen"].tolist() == pytest.approx([0.1, -0.2])
    assert m["rewards/rejected"].tolist() == pytest.approx([-0.2, -0.1])
    assert m["rewards/margin"].tolist() == pytest.approx([0.3, -0.1])
    assert m["rewards/accuracy"].tolist() == [1.0, 0.0]
    assert m["agreement"].tolist() == [1.0, 0.0]
    assert m["logps/chosen"].tolist() == [-4.0, -8.0] and m["logps/rejected"].tolist() == [-9.0, -6.0]
    assert m["nll/chosen"].tolist() == [2.0, 2.0]  # 4/2, 8/4
    assert m["lengths/chosen"].tolist() == [2.0, 4.0] and m["lengths/rejected"].tolist() == [3.0, 3.0]
    means = summarize(m)
    assert means["rewards/accuracy"] == 0.5 and means["agreement"] == 0.5
    assert means["rewards/margin"] == pytest.approx(0.1)


def test_reference_free_metrics_use_the_policy():
    # simpo, beta 2: rewards 2*pi/n = [2*-4/2, 2*-8/4] = [-4, -4] vs [2*-9/3, 2*-6/3] = [-6, -4]
    # accuracy [1, 0] (-4 > -4 is false); agreement from pi_w - pi_l = [5, -2] -> [1, 0]
    b = pairs([-4.0, -8.0], [-9.0, -6.0], nw=[2, 4], nl=[3, 3])
    _, m = compute("simpo", b, {})
    assert m["rewards/chosen"].tolist() == [-4.0, -4.0] and m["rewards/rejected"].tolist() == [-6.0, -4.0]
    assert m["rewards/accuracy"].tolist() == [1.0, 0.0]
    assert m["agreement"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("dtype,loss_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                              (torch.float64, torch.float64)])
def test_computes_in_at_least_float32(dtype, loss_dtype):
    b = pairs([-300.5], [-301.0], [-300.0], [-302.0], nw=[3], nl=[5], dtype=dtype)
    losses, metrics = compute("aipo", b, {"lam": 0.1})
    assert losses.dtype == loss_dtype
    assert all(v.dtype == torch.float32 for v in metrics.values())
