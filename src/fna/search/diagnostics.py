"""Whether a search decided anything: ``diagnostics.json`` and the report's sentence about it.

Per searched layer: ``alpha_entropy`` (of softmax(α), as a fraction of its maximum ``ln K``),
``decision_margin`` (top-1 minus top-2 probability) and ``significant``: whether the chosen candidate's
architecture-loss gradient was lower than every other candidate's by more than ``Z`` standard errors
of the paired step-to-step differences (``None`` with fewer than 3 architecture steps) — i.e. whether
the choice is signal or noise; ``task_significant`` asks the same of the task loss's part of the
gradient alone (the cost term's part is exact, so a choice it alone made is still "significant").
``decided_fraction`` and ``task_decided_fraction`` are the shares of tested layers. Also the super network's state when architecture steps began: its last warm-up epoch's
training loss and its score on architecture-half batches next to the trivial predictor's (the most
frequent class for segmentation; no detections for detection), with a warning when it is no better.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from fna.checkpoint import rng_state, set_rng_state
from fna.supernet import alpha_logits

if TYPE_CHECKING:
    from fna.search.loop import Search

Z = 2.0  # standard errors a choice must stand out by
SCORE_BATCHES = 4  # architecture-half batches the super network is scored on when architecture steps begin


class AlphaGradients:
    """Running first and second moments of the α gradient of every searched layer over the architecture
    steps: enough for paired tests between candidates, and small enough to checkpoint."""

    def __init__(self, sizes: list[int]) -> None:
        self.n = 0
        self.sums = [[0.0] * k for k in sizes]
        self.products = [[[0.0] * k for _ in range(k)] for k in sizes]

    def add(self, grads: list[torch.Tensor]) -> None:
        """One architecture step's gradient rows, one per searched layer (in layer order)."""
        self.n += 1
        for g, s, pp in zip(grads, self.sums, self.products):
            v = g.detach().double().cpu().tolist()
            for a, va in enumerate(v):
                s[a] += va
                for b, vb in enumerate(v):
                    pp[a][b] += va * vb

    def significant(self, layer: int, choice: int) -> bool | None:
        """Whether ``choice``'s gradient is below every other candidate's by more than :data:`Z` standard
        errors of the paired differences; ``None`` when there are too few steps to tell."""
        n, s, pp = self.n, self.sums[layer], self.products[layer]
        if n < 3 or len(s) < 2:
            return None
        for k in range(len(s)):
            if k == choice:
                continue
            mean = (s[choice] - s[k]) / n
            second = (pp[choice][choice] + pp[k][k] - 2 * pp[choice][k]) / n
            var = max(second - mean * mean, 0.0) * n / (n - 1)
            if mean + Z * math.sqrt(var / n) >= 0:
                return False
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "sums": self.sums, "products": self.products}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n, self.sums, self.products = state["n"], state["sums"], state["products"]


class ArchGradients:
    """:class:`AlphaGradients` of the whole architecture loss and of its task part alone."""

    def __init__(self, sizes: list[int]) -> None:
        self.total, self.task = AlphaGradients(sizes), AlphaGradients(sizes)

    @property
    def n(self) -> int:
        return self.total.n

    def add(self, total: list[torch.Tensor], task: list[torch.Tensor]) -> None:
        self.total.add(total)
        self.task.add(task)

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total.state_dict(), "task": self.task.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total.load_state_dict(state["total"])
        self.task.load_state_dict(state["task"])


def layer_gradients(search: Search, cost_grads: tuple[torch.Tensor | None, ...]) -> tuple[list[torch.Tensor],
                                                                                           list[torch.Tensor]]:
    """The α gradient row of every searched layer (in layer order) of the whole architecture loss, and
    of its task part (the whole minus the cost term's ``cost_grads``)."""
    def rows(grads: dict[str, torch.Tensor | None]) -> list[torch.Tensor]:
        full = {k: g if g is not None else torch.zeros_like(search.backbone.alpha[k]) for k, g in grads.items()}
        return [row for stage in alpha_logits(full) for row in stage]

    names = list(search.backbone.alpha.keys())
    total = rows({k: search.backbone.alpha[k].grad for k in names})
    cost = rows(dict(zip(names, cost_grads)))
    return total, [t - c for t, c in zip(total, cost)]


@torch.no_grad()
def supernet_state(search: Search) -> dict[str, Any]:
    """The super network's state now (when architecture steps begin): last epoch's training loss, and
    its score on a few architecture-half batches beside the trivial predictor's. The global RNG is
    restored afterwards, so scoring does not change the search."""
    state: dict[str, Any] = {"epoch": search.epoch,
                             "train_loss": search.log[-1]["weight_loss"] if search.log else None}
    saved = rng_state()
    search.backbone.set_path(None)
    search.model.eval()
    scores, trivials, name = [], [], None
    try:
        batches = search.batches_of(search.arch_set, 0)
        for _ in range(SCORE_BATCHES):
            result = search.spec.batch_score(search.model, search.to_device(next(batches)))
            if result is None:
                break
            name, score, trivial = result
            scores.append(score)
            trivials.append(trivial)
    finally:
        search.model.train()
        set_rng_state(saved)
    if scores:
        score, trivial = (search.dist.mean(sum(v) / len(v)) for v in (scores, trivials))
        state.update(score_name=name, score=score, trivial_score=trivial, trivial=score <= trivial + 1e-9)
    return state


def diagnostics(search: Search) -> dict[str, Any]:
    """``diagnostics.json``'s content for ``search`` as it stands."""
    layers, flat = [], 0
    probs = search.backbone.layer_probs()
    for i, (stage_names, stage_probs) in enumerate(zip(search.backbone.candidates, probs), start=1):
        for j, (names, p) in enumerate(zip(stage_names, stage_probs)):
            p = p.detach().double().cpu()
            top = torch.topk(p, min(2, len(p))).values.tolist()
            choice = int(p.argmax())
            entropy = float(-(p * p.clamp_min(1e-12).log()).sum()) / math.log(len(p)) if len(p) > 1 else 0.0
            layers.append({"stage": i, "layer": j, "chosen": names[choice], "prob": round(top[0], 6),
                           "alpha_entropy": round(entropy, 6),
                           "decision_margin": round(top[0] - (top[1] if len(top) > 1 else 0.0), 6),
                           "significant": search.grad_stats.total.significant(flat, choice),
                           "task_significant": search.grad_stats.task.significant(flat, choice)})
            flat += 1
    tested = [layer for layer in layers if layer["significant"] is not None]
    decided = sum(bool(layer["significant"]) for layer in tested)
    by_task = sum(bool(layer["task_significant"]) for layer in tested)
    out = {"arch_steps": search.grad_stats.n, "decided_fraction": decided / len(tested) if tested else None,
           "task_decided_fraction": by_task / len(tested) if tested else None,
           "mean_alpha_entropy": sum(layer["alpha_entropy"] for layer in layers) / len(layers),
           "supernet_at_arch_start": search.supernet_at_arch_start, "layers": layers}
    out["summary"], out["warnings"] = _sentence(out, decided, by_task, len(tested), len(layers))
    return out


def _sentence(d: dict[str, Any], decided: int, by_task: int, tested: int, total: int) -> tuple[str, list[str]]:
    if tested:
        text = (f"The search decided {decided} of {tested} searched layers beyond step-to-step noise "
                f"({decided / tested:.0%}) over {d['arch_steps']} architecture steps; the task loss alone "
                f"decided {by_task}, the cost term the rest")
    else:
        text = f"Too few architecture steps ({d['arch_steps']}) to tell whether the search decided any of its {total} layers"
    text += f"; softmax(α) kept {d['mean_alpha_entropy']:.0%} of its maximum entropy on average."
    warnings = []
    state = d["supernet_at_arch_start"] or {}
    if state.get("trivial"):
        warnings.append(f"When architecture steps began (epoch {state['epoch']}) the super network scored "
                        f"{state['score']:.3f} {state['score_name']} on architecture-half batches, no better than "
                        f"the trivial predictor ({state['trivial_score']:.3f}): the α gradient then carries "
                        "little task signal; warm up longer or with a higher learning rate.")
    if tested and decided == 0:
        warnings.append("No layer's choice stands out from the noise: the derived architecture is close to "
                        "a random draw from the space.")
    elif tested and by_task == 0:
        warnings.append("The task loss decided no layer: the choices follow the cost term alone.")
    return text, warnings
