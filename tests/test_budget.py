"""The hard-budget controller on a synthetic problem with a known answer (issue 12): a fixed task-loss
landscape over a small space, α trained by the search's own Adam settings on ``L_task + λ·log10(C)``.

Every layer's bigger candidates lower the task loss, so without a cost term the search would take the
most expensive net; the budget asks for one in between. The controller must bring the derived
architecture into the band and keep it there (no oscillation, λ ≥ 0 and bounded); without a budget
λ must stay the paper's fixed value.
"""

import math

import pytest
import torch

from fna.cost import CostTable
from fna.search.budget import Budget

LAYERS, CANDIDATES = 8, 4
LAM0, TOL = 0.15, 0.05


def _problem():
    gen = torch.Generator().manual_seed(0)
    costs = [sorted((1e6 * (0.5 + torch.rand(CANDIDATES, generator=gen))).tolist()) for _ in range(LAYERS)]
    # the task loss of each candidate: lower for the more expensive ones, by a layer-specific amount
    gains = 0.05 + 0.1 * torch.rand(LAYERS, generator=gen)
    task = [[-float(g) * c / max(cs) for c in cs] for g, cs in zip(gains, costs)]
    table = CostTable("madds", 5e6, [costs], [[[f"op{k}" for k in range(CANDIDATES)] for _ in range(LAYERS)]])
    return table, task


def _run(budget: float | None, steps: int = 600):
    """α per layer trained with Adam (the search's arch settings), λ steered as in Search.arch_step."""
    table, task = _problem()
    alpha = torch.nn.Parameter(1e-3 * torch.randn(LAYERS, CANDIDATES, generator=torch.Generator().manual_seed(1)))
    opt = torch.optim.Adam([alpha], lr=0.05, betas=(0.5, 0.999), weight_decay=1e-3)
    controller = Budget(table, budget, TOL, gain=1.0, lam0=LAM0, lam_max=10.0) if budget is not None else None
    lam, lams, derived, expected = LAM0, [], [], []
    task_t = torch.tensor(task, dtype=torch.float64)
    for _ in range(steps):
        probs = torch.softmax(alpha.double(), 1)
        cost = table.expected([list(probs.unbind(0))])
        loss = (probs * task_t).sum() + lam * torch.log10(cost)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            probs = torch.softmax(alpha.double(), 1)
            whole = float(table.expected([list(probs.unbind(0))], whole=True)) * 1e9
        if controller is not None:
            lam = controller.update(lam, whole)
        lams.append(lam)
        expected.append(whole)
        derived.append(table.path_cost([alpha.argmax(1).tolist()]))
    return table, lams, derived, expected


def test_without_a_budget_lambda_stays_the_papers_fixed_value():
    _, lams, derived, _ = _run(None)
    assert set(lams) == {LAM0}
    table, _ = _problem()
    assert derived[-1] > 0.9 * table.bounds()[1]  # the cost term at λ = 0.15 cannot hold this landscape back


def test_budget_controller_lands_in_the_band_and_stays_there_without_oscillating():
    table, _ = _problem()
    lo, hi = table.bounds()
    budget = lo + 0.4 * (hi - lo)
    _, lams, derived, expected = _run(budget)
    tail = slice(len(lams) // 2, None)
    assert all(abs(c / budget - 1) <= TOL for c in derived[tail])  # the derived net sits in the band
    assert all(abs(c / budget - 1) <= TOL for c in expected[tail])
    assert all(0 <= lam <= 10.0 for lam in lams)
    moves = [b - a for a, b in zip(lams[tail], lams[tail][1:]) if b != a]
    reversals = sum(1 for a, b in zip(moves, moves[1:]) if (a > 0) != (b > 0))
    assert reversals <= 2  # once in the band λ holds still instead of swinging around it
    assert max(lams) > LAM0  # it had to raise λ to get there


@pytest.mark.parametrize("expected_over_budget,sign", [(3.0, 1), (1 / 3, -1), (1.01, 0)])
def test_one_controller_step_is_bounded_signed_and_held_in_the_dead_band(expected_over_budget, sign):
    table, _ = _problem()
    lo, hi = table.bounds()
    b = Budget(table, (lo + hi) / 2, TOL, gain=1.0, lam0=LAM0, lam_max=10.0)
    step = b.update(LAM0, expected_over_budget * b.budget) - LAM0
    assert math.copysign(1, step) == sign if sign else step == 0
    assert abs(step) <= 1.0 * LAM0 * Budget.STEP + 1e-12  # gain · scale · 0.1 at most
    assert b.update(0.0, b.budget / 3) == 0.0  # never negative


def test_a_choice_is_significant_only_when_it_stands_out_from_the_step_to_step_noise():
    from fna.search.diagnostics import AlphaGradients

    gen = torch.Generator().manual_seed(0)
    planted, noise = AlphaGradients([3]), AlphaGradients([3])
    for _ in range(30):
        g = torch.randn(3, generator=gen)
        planted.add([g + torch.tensor([-1.0, 0.0, 0.0])])  # candidate 0 consistently lower by 1 (σ ≈ 1.4)
        noise.add([g])
    assert planted.significant(0, 0) is True and planted.significant(0, 1) is False
    assert noise.significant(0, int(torch.tensor(noise.sums[0]).argmin())) is False
    few = AlphaGradients([3])
    few.add([torch.zeros(3)])
    assert few.significant(0, 0) is None
