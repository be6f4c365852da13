"""Objectives: values and gradients against slow float64 loops written from the formulas, and the collapse case."""

from __future__ import annotations

import math

import pytest
import torch

from adamerge.errors import MergeInputError
from adamerge.objectives import Objective, StepOutputs


def _probs(row):
    e = [math.exp(v) for v in row]
    s = sum(e)
    return [v / s for v in e]


def ref_entropy(z):
    return sum(-sum(p * math.log(p) for p in _probs(row)) for row in z) / len(z)


def ref_infomax(z, w):
    ps = [_probs(row) for row in z]
    mean = [sum(p[c] for p in ps) / len(ps) for c in range(len(ps[0]))]
    return ref_entropy(z) - w * -sum(m * math.log(m) for m in mean)


def ref_kl(z, ze, tau):
    total = 0.0
    for row, erow in zip(z, ze):
        q, p = _probs([v / tau for v in row]), _probs([v / tau for v in erow])
        total += tau**2 * sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    return total / len(z)


def ref_pseudo_label(z, ze, confidence):
    losses = []
    for row, erow in zip(z, ze):
        pe = _probs(erow)
        if max(pe) >= confidence:
            losses.append(-math.log(_probs(row)[pe.index(max(pe))]))
    return sum(losses) / len(losses) if losses else 0.0


def ref_features(f, fe):
    return sum(abs(a - b) for ra, rb in zip(f, fe) for a, b in zip(ra, rb)) / (len(f) * len(f[0]))


def numeric_grad(fn, x, eps=1e-6):
    """Central differences of a float64 reference in every entry of ``x`` (a nested list)."""
    grad = []
    for i, row in enumerate(x):
        g = []
        for j in range(len(row)):
            hi = [r[:] for r in x]
            lo = [r[:] for r in x]
            hi[i][j] += eps
            lo[i][j] -= eps
            g.append((fn(hi) - fn(lo)) / (2 * eps))
        grad.append(g)
    return torch.tensor(grad, dtype=torch.float64)


CASES = {
    "entropy": (Objective("entropy"), lambda z, ze, f, fe: ref_entropy(z)),
    "infomax": (Objective("infomax", diversity_weight=0.7), lambda z, ze, f, fe: ref_infomax(z, 0.7)),
    "kl": (Objective("kl", temperature=2.0), lambda z, ze, f, fe: ref_kl(z, ze, 2.0)),
    "pseudo_label": (Objective("pseudo_label", confidence=0.4), lambda z, ze, f, fe: ref_pseudo_label(z, ze, 0.4)),
    "features": (Objective("features"), lambda z, ze, f, fe: ref_features(f, fe)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_objective_value_and_gradient_match_slow_reference(name):
    objective, ref = CASES[name]
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64)
    ze = 2 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    f = torch.randn(6, 5, generator=g, dtype=torch.float64)
    fe = torch.randn(6, 5, generator=g, dtype=torch.float64)
    leaf = (f if name == "features" else z).clone().requires_grad_(True)
    out = StepOutputs(
        {"a": leaf if name != "features" else z},
        features={"a": leaf} if name == "features" else None,
        expert_logits={"a": ze},
        expert_features={"a": fe},
    )
    loss, per_task = objective(out)
    expected = ref(z.tolist(), ze.tolist(), f.tolist(), fe.tolist())
    assert abs(float(per_task["a"]) - expected) < 1e-5 and abs(float(loss) - expected) < 1e-5
    (grad,) = torch.autograd.grad(loss, leaf)
    if name == "features":
        want = numeric_grad(lambda x: ref_features(x, fe.tolist()), f.tolist())
    else:
        want = numeric_grad(lambda x: ref(x, ze.tolist(), f.tolist(), fe.tolist()), z.tolist())
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(grad.double(), want, atol=1e-4, rtol=1e-3)


def test_pseudo_label_confidence_drops_unsure_rows():
    z = torch.zeros(2, 2)
    expert = torch.tensor([[4.0, 0.0], [0.1, 0.0]])  # sure of class 0; unsure
    loss, _ = Objective("pseudo_label", confidence=0.9)(StepOutputs({"a": z}, expert_logits={"a": expert}))
    assert abs(float(loss) - math.log(2)) < 1e-6  # only the first row: CE of uniform logits = ln 2
    loss, _ = Objective("pseudo_label", confidence=0.99)(StepOutputs({"a": z}, expert_logits={"a": expert}))
    assert float(loss) == 0.0  # no confident row: the task contributes nothing


def test_token_objectives_count_only_masked_positions():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    kept = z[mask]  # the three non-pad positions as rows
    masked, _ = Objective("infomax")(StepOutputs({"a": z}, masks={"a": mask}))
    flat, _ = Objective("infomax")(StepOutputs({"a": kept}))
    assert abs(float(masked) - float(flat)) < 1e-6


def _collapse_fit(name: str, steps: int = 300) -> tuple[float, float]:
    """A tiny 2-class case where entropy minimisation collapses: logits [a_i + b, 0] with symmetric a_i and a
    learned bias b started slightly off 0. Returns (fraction of rows predicted class 0, final mean entropy)."""
    a = torch.linspace(-1.0, 1.0, 64)
    b = torch.tensor(0.1, requires_grad=True)
    opt = torch.optim.SGD([b], lr=0.5)
    objective = Objective(name)
    for _ in range(steps):
        logits = torch.stack([a + b, torch.zeros_like(a)], dim=1)
        loss, _ = objective(StepOutputs({"t": logits}))
        opt.zero_grad()
        loss.backward()
        opt.step()
    logits = torch.stack([a + b.detach(), torch.zeros_like(a)], dim=1)
    p = torch.softmax(logits, -1)
    return float((logits.argmax(-1) == 0).float().mean()), float(-(p * p.log()).sum(-1).mean())


def test_entropy_collapses_where_infomax_does_not():
    share, ent = _collapse_fit("entropy")
    assert share == 1.0 and ent < 0.1  # every row predicted as class 0, confidently
    share, _ = _collapse_fit("infomax")
    assert 0.4 <= share <= 0.6  # the batch stays split between the classes


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"name": "nope"}, "objective"),
        ({"temperature": 0.0}, "temperature"),
        ({"diversity_weight": -1.0}, "diversity_weight"),
        ({"confidence": 1.0}, "confidence"),
    ],
)
def test_objective_options_are_checked(kwargs, field):
    with pytest.raises(MergeInputError, match=field):
        Objective(**kwargs)
