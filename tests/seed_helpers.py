"""Library models made into useful seed stand-ins for the seed tests (no weights are downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fna.arch import Arch
from fna.backbone import Classifier
from fna.remap import remap_seed
from fna.seeds import Seed


def calibrated(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """``model`` with random BN affine parameters and statistics from one random batch, and a scaled-up
    classifier, so its logits on ``x`` are far from zero (a random init alone gives ~1e-10)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.momentum = None  # cumulative average: one batch sets the statistics
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
        model.train()(torch.randn(8, 3, 64, 64))
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        linears[-1].weight.mul_(1000 / linears[-1].weight.abs().max())
    assert model.eval()(x).abs().max() > 1
    return model


def assert_self_remap_exact(seed: Seed, x: torch.Tensor) -> None:
    """Remapping ``seed`` onto its own architecture inherits every parameter and, with the seed's head, gives
    exactly the seed's logits on ``x``."""
    target, report = remap_seed(seed, seed.arch)
    remapped = Classifier(target)
    head = {k: v for k, v in seed.state_dict.items() if not k.startswith("backbone.")}
    assert remapped.load_state_dict(head, strict=False).unexpected_keys == []
    with torch.no_grad():
        assert torch.equal(remapped.eval()(x), seed.classifier()(x))
    assert report.fraction == 1.0


def tiny_adapt(tmp_path: Path, seed: str, weights: Path, stage_space: str, n_stages: int) -> Arch:
    """``fna adapt --task retinanet`` with ``seed`` and its ``weights`` file on a 6-image demo dataset at 64×64,
    over a space of ``n_stages`` searched stages each given by ``stage_space``; asserts every phase ran and
    returns the adapted architecture."""
    from typer.testing import CliRunner

    from fna.cli import app
    from fna.data.demo import write_demo

    write_demo(tmp_path / "data", n_train=6, n_val=2, size=64, seed=3)
    space = ",".join([stage_space] * n_stages)
    result = CliRunner().invoke(app, [
        "adapt", "--task", "retinanet", "--data", str(tmp_path / "data"), "--format", "coco",
        "--out", str(tmp_path / "run"), "--seed", seed, "--seed-weights", str(weights),
        "size=[64,64]", "finetune.iters=2", "finetune.batch_size=2", "search.epochs=2", "search.arch_start_epoch=1",
        "search.batch_size=2", "search.warmup_iters=0", "search.progress=false", "search.space.name=tiny",
        f"search.space.stages=[{space}]"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["phases"]) == {"search", "remap", "finetune", "eval"}
    return Arch.from_dict(summary["arch"])
