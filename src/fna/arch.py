"""Architecture description of an MBConv network or a ResNet (the seed, the target and the search space).

An architecture is data: a stem width, a list of stages (the first one being the fixed e1 block),
and the width of the final 1x1 conv. Each stage lists one op name per layer::

    k{K}_e{E}[_se][_{act}]   MBConv with a KxK depthwise conv and expansion E (odd K >= 1, E >= 1, a
                             decimal such as 2.5 where the expanded width is no multiple of the input's:
                             round(E * c_in) channels); ``_se`` adds squeeze-excitation after the
                             depthwise conv (how it squeezes is the architecture's ``se``); ``_{act}``
                             (relu6, relu, hswish, silu) overrides the architecture's activation
    basic_k{K}_g{G}          ResNet basic block (ours): two KxK convs with G groups, each → BN, ReLU after the
                             first; + identity (or a 1x1 conv + BN where the layer changes shape); ReLU
    bottle_k{K}_g{G}         ResNet bottleneck (v1.5, torchvision's): 1x1 to a quarter of the output width →
                             KxK with G groups, carrying the stride → 1x1 to the output width, each → BN
                             (ReLU after the first two); + identity or 1x1 conv + BN; ReLU
    skip                     identity; only where the layer keeps its shape (not the first layer of a stage)

So MobileNetV2 reads ``k3_e6``, MobileNetV3 ``k5_e3_se_relu`` (SE, ReLU in a hard-swish network) and
EfficientNet-B0 ``k5_e6_se``. ``head_channels`` is MobileNetV3's pre-logits layer (a linear layer with
bias and the activation after global pooling, before the classifier); it only exists in classifiers.
torchvision's ResNets read ``basic_k3_g1`` (resnet18, resnet34) and ``bottle_k3_g1`` (resnet50, resnet101),
with a 7x7 stem (``stem_kernel``) followed by a 3x3 stride-2 max-pool (``stem_pool``) and no final 1x1 conv;
their block widths are fixed by the stage widths, so a grouped ``_g2`` / ``_g4`` block has the width of the
``_g1`` block (not ResNeXt's wider groups).

The first layer of a stage carries the stage's stride and channel change; later layers are stride 1,
``c_out -> c_out``. The description reads and writes JSON and the reference ``net_config`` text of
the original FNA code (``[[c_in, c_out], [ops...], stride]`` entries joined by ``|``).
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from dataclasses import fields as dataclass_fields
from fractions import Fraction
from pathlib import Path
from typing import Any

from fna.checkpoint import write_text_atomic
from fna.errors import FnaError
SKIP = "skip"
_OP_RE = re.compile(r"^k(\d+)_e(\d+(?:\.\d+)?)(_se)?(?:_([a-z0-9]+))?$")
_RES_RE = re.compile(r"^(basic|bottle)_k(\d+)_g(\d+)$")
RESIDUAL_KINDS = ("basic", "bottle")
ACTIVATIONS = ("relu6", "relu", "hswish", "silu")
GATES = ("sigmoid", "hardsigmoid")


class ArchError(FnaError, ValueError):
    """An architecture description is malformed or inconsistent."""


INT_FIELDS = ("c_in", "c_out", "stride")


def _whole(value: Any, what: str) -> int:
    """``value`` as an int: ints, integral floats (``24.0``) and integer strings; :class:`ArchError` otherwise."""
    if isinstance(value, bool):
        raise ArchError(f"{what} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        try:
            return int(value)
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            raise ArchError(f"{what} must be a whole number, got a {len(value.strip())}-digit string") from None
    raise ArchError(f"{what} must be a whole number, got {value!r}")


def _int(value: Any, what: str) -> int:
    """``value`` itself when it is an int (not a bool, not a float like 24.5); :class:`ArchError` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArchError(f"{what} must be a whole number, got {value!r}")
    return value


def _at_least(value: Any, minimum: int, what: str) -> None:
    """:class:`ArchError` unless ``value`` is an int of at least ``minimum``."""
    if _int(value, what) < minimum:
        raise ArchError(f"{what} must be >= {minimum}, got {value}")


def _decimal(value: int | float) -> str:
    """``6`` for whole numbers, else the shortest decimal (``2.5``)."""
    if isinstance(value, int):
        return str(value)
    return str(int(value)) if value.is_integer() else repr(value)


@dataclass(frozen=True)
class Op:
    """One MBConv layer: depthwise kernel size, expansion ratio, squeeze-excitation and its own activation
    (``None``: the architecture's)."""

    kernel: int
    expansion: int | float
    se: bool = False
    activation: str | None = None

    @property
    def name(self) -> str:
        return (f"k{self.kernel}_e{_decimal(self.expansion)}" + "_se" * self.se
                + (f"_{self.activation}" if self.activation else ""))

    def hidden(self, c_in: int) -> int:
        """The expanded width on ``c_in`` input channels: ``E * c_in`` rounded half up."""
        return math.floor(Fraction(_decimal(self.expansion)) * c_in + Fraction(1, 2))

    def like(self, kernel: int, expansion: int | float) -> Op:
        """An op of another kernel and expansion with this one's squeeze-excitation and activation."""
        return replace(self, kernel=kernel, expansion=expansion)

    @property
    def tag(self) -> str:
        """What besides the kernel tells it apart, for plots: ``e6``."""
        return f"e{_decimal(self.expansion)}"

    @property
    def scale(self) -> float:
        """How big it is besides the kernel, for plots: the expansion."""
        return float(self.expansion)


@dataclass(frozen=True)
class ResOp:
    """One ResNet layer: a ``basic`` block or a ``bottle`` (bottleneck) block whose KxK convs have
    ``groups`` groups (widths fixed by the stage: a bottleneck's middle width is ``c_out // 4``)."""

    kind: str
    kernel: int
    groups: int = 1

    @property
    def name(self) -> str:
        return f"{self.kind}_k{self.kernel}_g{self.groups}"

    def like(self, kernel: int, groups: int) -> ResOp:
        """A block of the same kind with another kernel and number of groups."""
        return replace(self, kernel=kernel, groups=groups)

    def width(self, c_out: int) -> int:
        """The width of its KxK convs' output in a layer of ``c_out`` output channels."""
        return c_out // 4 if self.kind == "bottle" else c_out

    def __post_init__(self) -> None:
        if self.kind not in RESIDUAL_KINDS:
            raise ArchError(f"ResNet block kind {self.kind!r}: expected one of {RESIDUAL_KINDS}")
        if isinstance(self.kernel, bool) or not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ArchError(f"kernel size must be odd and >= 1, got {self.kernel!r}")
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ArchError(f"the number of groups must be >= 1, got {self.groups!r}")

    def grouped_widths(self, c_in: int, c_out: int) -> tuple[int, ...]:
        """The channel counts its grouped convs split into ``groups`` (each must divide by it)."""
        w = self.width(c_out)
        return (c_in, w) if self.kind == "basic" else (w,)

    def split_error(self, c_in: int, c_out: int) -> str | None:
        """Why it cannot be built on ``c_in`` → ``c_out`` channels (``18 channels do not split into 4 groups``),
        or ``None`` when it can."""
        bad = [c for c in self.grouped_widths(c_in, c_out) if c % self.groups]
        return f"{bad[0]} channels do not split into {self.groups} groups" if bad else None

    @property
    def tag(self) -> str:
        """What besides the kernel tells it apart, for plots: ``g2``."""
        return f"g{self.groups}"

    @property
    def scale(self) -> float:
        """How big it is besides the kernel, for plots: one over the number of groups."""
        return 1.0 / self.groups


AnyOp = Op | ResOp


def op_family(op: AnyOp) -> str:
    """``MBConv``, ``basic`` or ``bottle``: layers of one family can take each other's weights."""
    return op.kind if isinstance(op, ResOp) else "MBConv"


def parse_op(name: str) -> AnyOp | None:
    """Decode ``k{K}_e{E}[_se][_{act}]`` into an :class:`Op`, ``basic|bottle_k{K}_g{G}`` into a
    :class:`ResOp`; ``skip`` gives ``None``."""
    if name == SKIP:
        return None
    r = _RES_RE.match(name)
    if r:
        if any(len(g) > 6 for g in r.group(2, 3)):
            raise ArchError(f"op {name[:24]}...: kernel size and groups must have at most 6 digits")
        try:
            return ResOp(r.group(1), int(r.group(2)), int(r.group(3)))
        except ArchError as e:
            raise ArchError(f"op {name!r}: {e}") from None
    m = _OP_RE.match(name)
    if not m:
        raise ArchError(f"unknown op {name!r}: expected 'k<K>_e<E>[_se][_<activation>]' (e.g. 'k3_e6', "
                        "'k5_e3_se_relu'), '<basic|bottle>_k<K>_g<G>' (e.g. 'bottle_k3_g1') or 'skip'")
    try:
        kernel = int(m.group(1))
        expansion = int(m.group(2)) if "." not in m.group(2) else float(m.group(2))
    except ValueError:  # more digits than Python converts
        raise ArchError(f"op {name[:24]}...: kernel size and expansion must be numbers of at most 4300 digits") \
            from None
    if kernel < 1 or kernel % 2 == 0:
        raise ArchError(f"op {name!r}: kernel size must be odd and >= 1")
    if not 1 <= expansion < float("inf"):
        raise ArchError(f"op {name!r}: expansion must be >= 1")
    if m.group(4) is not None and m.group(4) not in ACTIVATIONS:
        raise ArchError(f"op {name!r}: unknown activation {m.group(4)!r}, expected one of {ACTIVATIONS}")
    return Op(kernel, expansion, m.group(3) is not None, m.group(4))


def make_divisible(value: float, divisor: int) -> int:
    """``value`` rounded to a multiple of ``divisor``, never below 90% of it (torchvision's / timm's rule)."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


@dataclass(frozen=True)
class SqueezeExcite:
    """How an architecture's ``_se`` layers squeeze-excite: global average pool → linear to R → activation →
    linear back → gate, scaling the depthwise output per channel.

    R = ``make_divisible(W // 4, divisor)`` with W the layer's input width (``from_input``, EfficientNet:
    ``c_in / 4``) or its expanded width (MobileNetV3: ``make_divisible(hidden / 4, 8)``).
    """

    from_input: bool = False
    divisor: int = 8
    activation: str = "relu"
    gate: str = "hardsigmoid"

    def __post_init__(self) -> None:
        if not isinstance(self.from_input, bool):
            raise ArchError(f"se.from_input must be true or false, got {self.from_input!r}")
        _at_least(self.divisor, 1, "se.divisor")
        if self.activation not in ACTIVATIONS:
            raise ArchError(f"se.activation {self.activation!r}: expected one of {ACTIVATIONS}")
        if self.gate not in GATES:
            raise ArchError(f"se.gate {self.gate!r}: expected one of {GATES}")

    def reduced(self, c_in: int, hidden: int) -> int:
        """The squeezed width of a layer with ``c_in`` input and ``hidden`` expanded channels."""
        return make_divisible((c_in if self.from_input else hidden) // 4, self.divisor)


@dataclass(frozen=True)
class Stage:
    """A run of layers at one width. Layer 0 applies ``stride`` and ``c_in -> c_out``."""

    c_in: int
    c_out: int
    stride: int
    ops: tuple[str, ...]
    dilation: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))

    @property
    def depth(self) -> int:
        """Number of non-skip layers."""
        return sum(op != SKIP for op in self.ops)

    def layer_shapes(self) -> list[tuple[int, int, int]]:
        """``(c_in, c_out, stride)`` of every layer position."""
        return [(self.c_in, self.c_out, self.stride)] + [(self.c_out, self.c_out, 1)] * (len(self.ops) - 1)


@dataclass(frozen=True)
class Arch:
    """An MBConv network or a ResNet: stem conv, stages (``stages[0]`` is the fixed first block), final 1x1 conv.

    ``final_channels == 0`` means the network has no final 1x1 conv. ``stem_kernel`` is the stem conv's
    kernel, ``stem_pool`` a 3x3 stride-2 max-pool after it (ResNet's).
    """

    stages: tuple[Stage, ...]
    stem_channels: int = 32
    stem_stride: int = 2
    final_channels: int = 1280
    activation: str = "relu6"
    bn_eps: float = 1e-5
    in_channels: int = 3
    se: SqueezeExcite | None = None  # how the ``_se`` layers squeeze; None: no layer has SE
    head_channels: int = 0  # pre-logits linear layer of a classifier (MobileNetV3's 1280); 0: none
    stem_kernel: int = 3
    stem_pool: bool = False  # a 3x3 stride-2 max-pool after the stem conv (ResNet)
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ArchError` (one line naming the field) unless the description can be built."""
        if self.activation not in ACTIVATIONS:
            raise ArchError(f"activation {self.activation!r}: expected one of {ACTIVATIONS}")
        if _int(self.in_channels, "in_channels") != 3:
            raise ArchError(f"in_channels {self.in_channels}: only 3 (RGB) is supported; the seeds' weights and "
                            "the datasets are RGB")
        _at_least(self.stem_channels, 1, "stem_channels")
        if _int(self.stem_stride, "stem_stride") not in (1, 2):
            raise ArchError(f"stem_stride must be 1 or 2, got {self.stem_stride}")
        _at_least(self.final_channels, 0, "final_channels (0: no final 1x1 conv)")
        _at_least(self.head_channels, 0, "head_channels (0: no pre-logits layer)")
        if _int(self.stem_kernel, "stem_kernel") < 1 or self.stem_kernel % 2 == 0:
            raise ArchError(f"stem_kernel must be odd and >= 1, got {self.stem_kernel}")
        if not isinstance(self.stem_pool, bool):
            raise ArchError(f"stem_pool must be true or false, got {self.stem_pool!r}")
        if self.se is not None and not isinstance(self.se, SqueezeExcite):
            raise ArchError(f"se must describe the squeeze-excitation, got {self.se!r}")
        if isinstance(self.bn_eps, bool) or not isinstance(self.bn_eps, (int, float)) \
                or not 0 < self.bn_eps < float("inf"):
            raise ArchError(f"bn_eps must be a number > 0, got {self.bn_eps!r}")
        if not isinstance(self.name, str):
            raise ArchError(f"name must be a string, got {self.name!r}")
        if not self.stages:
            raise ArchError("an architecture needs at least one stage")
        prev = self.stem_channels
        for i, stage in enumerate(self.stages):
            where = f"stage {i} ({stage.c_in}->{stage.c_out})"
            _at_least(stage.c_in, 1, f"{where}: c_in")
            _at_least(stage.c_out, 1, f"{where}: c_out")
            if stage.c_in != prev:
                raise ArchError(f"{where}: input channels {stage.c_in} do not chain with the previous output {prev}")
            if _int(stage.stride, f"{where}: stride") not in (1, 2):
                raise ArchError(f"{where}: stride must be 1 or 2, got {stage.stride}")
            _at_least(stage.dilation, 1, f"{where}: dilation")
            if not stage.ops:
                raise ArchError(f"{where}: a stage needs at least one layer")
            for j, (op, (c_in, c_out, stride)) in enumerate(zip(stage.ops, stage.layer_shapes())):
                try:
                    parsed = parse_op(op)
                except ArchError as e:
                    raise ArchError(f"{where} layer {j}: {e}") from None
                if parsed is None and (c_in != c_out or stride != 1):
                    raise ArchError(f"{where} layer {j}: 'skip' is only allowed where the layer keeps its shape")
                if isinstance(parsed, ResOp):
                    bad = parsed.split_error(c_in, c_out)
                    if bad:
                        raise ArchError(f"{where} layer {j}: op {op!r}: {bad}")
                    if parsed.kind == "bottle" and c_out < 4:
                        raise ArchError(f"{where} layer {j}: op {op!r}: a bottleneck needs >= 4 output channels")
                elif parsed is not None and parsed.se and self.se is None:
                    raise ArchError(f"{where} layer {j}: op {op!r} has squeeze-excitation, but the architecture "
                                    "gives no 'se' (how its layers squeeze)")
            prev = stage.c_out

    # -- views ----------------------------------------------------------------------------------
    @property
    def out_channels(self) -> int:
        return self.final_channels or self.stages[-1].c_out

    @property
    def input_stride(self) -> int:
        """Cumulative stride at the input of the first stage: the stem conv's, times 2 with the max-pool."""
        return self.stem_stride * (2 if self.stem_pool else 1)

    def stage_strides(self) -> list[int]:
        """Cumulative stride at the output of each stage."""
        out, s = [], self.input_stride
        for stage in self.stages:
            s *= stage.stride
            out.append(s)
        return out

    def canonical(self) -> Arch:
        """The same network with every stage's skips moved to the stage end (SPEC §3)."""
        stages = [replace(s, ops=tuple([o for o in s.ops if o != SKIP] + [o for o in s.ops if o == SKIP]))
                  for s in self.stages]
        return replace(self, stages=tuple(stages))

    def without_skips(self) -> Arch:
        """The same network with skip entries dropped (what actually gets built)."""
        return replace(self, stages=tuple(replace(s, ops=tuple(o for o in s.ops if o != SKIP))
                                          for s in self.stages))

    def with_ops(self, stage_ops: list[list[str]], first: int = 1) -> Arch:
        """Replace the ops of ``stages[first:]`` (the searched stages) by ``stage_ops``."""
        if len(stage_ops) != len(self.stages) - first:
            raise ArchError(f"expected ops for {len(self.stages) - first} stages, got {len(stage_ops)}")
        stages = list(self.stages[:first]) + [replace(s, ops=tuple(o)) for s, o in zip(self.stages[first:], stage_ops)]
        return replace(self, stages=tuple(stages))

    def describe(self) -> str:
        """One line per stage, e.g. ``24: k3_e6 k3_e6 skip skip``."""
        return "\n".join(f"{s.c_out:>4} s{s.stride}: {' '.join(s.ops)}" for s in self.stages)

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; ``se``, ``head_channels``, ``stem_kernel`` and ``stem_pool`` only when set, so
        MBConv files without them read as they always did."""
        d = asdict(self)
        d["stages"] = [{**asdict(s), "ops": list(s.ops)} for s in self.stages]
        for key, unset in (("se", None), ("head_channels", 0), ("stem_kernel", 3), ("stem_pool", False)):
            if d[key] == unset:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Arch:
        try:
            entries = [(s["c_in"], s["c_out"], s["stride"], tuple(str(o) for o in s["ops"]), s.get("dilation", 1))
                       for s in d["stages"]]
        except (KeyError, TypeError, AttributeError) as e:
            raise ArchError(f"malformed stage entry ({type(e).__name__}: {e}); each stage needs "
                            "c_in, c_out, stride and ops") from None
        stages = [Stage(*(_whole(v, f"stage {i} {name}") for v, name in zip((c_in, c_out, stride), INT_FIELDS)),
                        ops, _whole(dilation, f"stage {i} dilation"))
                  for i, (c_in, c_out, stride, ops, dilation) in enumerate(entries)]
        known = {"stem_channels", "stem_stride", "final_channels", "activation", "bn_eps", "in_channels", "se",
                 "head_channels", "stem_kernel", "stem_pool", "name"}
        unknown = set(d) - known - {"stages"}
        if unknown:
            raise ArchError(f"unknown architecture fields: {sorted(unknown)}")
        fields = {k: d[k] for k in known if k in d and not (k in ("name", "se") and d[k] is None)}
        for k in ("stem_channels", "stem_stride", "final_channels", "in_channels", "head_channels", "stem_kernel"):
            if k in fields:
                fields[k] = _whole(fields[k], k)
        if isinstance(fields.get("se"), dict):
            try:
                fields["se"] = SqueezeExcite(**fields["se"])
            except TypeError as e:
                raise ArchError(f"malformed se entry ({e}); it may give from_input, divisor, activation, gate") \
                    from None
        return cls(stages=tuple(stages), **fields)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_net_config(self) -> str:
        """The reference text format: ``[[c_in, c_out], [ops], stride]`` entries joined by ``|``.

        Fields the format has no place for and that differ from their defaults (MobileNetV3's
        ``final_channels``, ``activation``, ``se``, ...) follow as one last ``{field: value}`` entry
        (ours), so every architecture round-trips; MobileNetV2-family text stays the reference's.
        """
        text = "|\n".join(str([[s.c_in, s.c_out], list(s.ops), s.stride]) for s in self.stages)
        defaults = {f.name: f.default for f in dataclass_fields(self) if f.name not in ("stages", "stem_channels", "name")}
        settings = {k: v for k, v in self.to_dict().items() if k in defaults and v != defaults[k]}
        return text + f"|\n{settings}" if settings else text

    @classmethod
    def from_net_config(cls, text: str, **kwargs: Any) -> Arch:
        """Parse the reference text format. A trailing ``[[320, C], ['conv_2d_1x1'], 1]`` sets the final conv;
        a last ``{field: value}`` entry (see :meth:`to_net_config`) the other fields."""
        stages: list[Stage] = []
        entries = [e.strip() for e in text.strip().split("|") if e.strip()]
        if not entries:
            raise ArchError("empty net_config")
        settings: dict[str, Any] = {}
        if entries[-1].startswith("{"):
            try:
                settings = ast.literal_eval(entries.pop())
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
                raise ArchError(f"net_config: the last entry is not a '{{field: value}}' dict ({type(e).__name__})") \
                    from None
            if not isinstance(settings, dict) or not entries:
                raise ArchError("net_config: the last entry must be a '{field: value}' dict after the stages")
        final = kwargs.pop("final_channels", 1280)
        for i, entry in enumerate(entries):
            try:
                (c_in, c_out), ops, stride = ast.literal_eval(entry)
                ops = [str(o) for o in ops]
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
                raise ArchError(f"net_config entry {i} is not '[[c_in, c_out], [ops...], stride]': {entry[:60]!r}"
                                f" ({type(e).__name__})") from None
            c_in, c_out, stride = (_whole(v, f"net_config entry {i} {name}")
                                   for v, name in zip((c_in, c_out, stride), INT_FIELDS))
            if ops == ["conv_2d_1x1"]:
                if i != len(entries) - 1:
                    raise ArchError("net_config: 'conv_2d_1x1' is only allowed as the last entry")
                final = c_out
                continue
            stages.append(Stage(c_in, c_out, stride, tuple(ops)))
        if not stages:
            raise ArchError("net_config has no stages, only the final 'conv_2d_1x1'")
        if not settings:
            return cls(stages=tuple(stages), final_channels=final, stem_channels=stages[0].c_in, **kwargs)
        return cls.from_dict({"final_channels": final, **kwargs, **settings, "stem_channels": stages[0].c_in,
                              "stages": [{**asdict(s), "ops": list(s.ops)} for s in stages]})


# -- built-in architectures ---------------------------------------------------------------------

def _chain(c_in: int, stages: list[tuple[int, int, list[str]]]) -> tuple[Stage, ...]:
    """Stages from ``(c_out, stride, ops)`` entries, each taking the previous one's output width."""
    out = []
    for c_out, stride, ops in stages:
        out.append(Stage(c_in, c_out, stride, tuple(ops)))
        c_in = c_out
    return tuple(out)


def _mbv2_like(stage_ops: list[list[str]], name: str) -> Arch:
    widths = [16, 24, 32, 64, 96, 160, 320]
    strides = [1, 2, 2, 2, 1, 2, 1]
    return Arch(stages=_chain(32, list(zip(widths, strides, [["k3_e1"]] + stage_ops))), name=name)


def _mobilenet_v3_large(bn_eps: float, name: str) -> Arch:
    """MobileNetV3-Large: hard-swish network whose first stages use ReLU, SE from the expanded width."""
    return Arch(stages=_chain(16, [
        (16, 1, ["k3_e1_relu"]),
        (24, 2, ["k3_e4_relu", "k3_e3_relu"]),
        (40, 2, ["k5_e3_se_relu"] * 3),
        (80, 2, ["k3_e6", "k3_e2.5", "k3_e2.3", "k3_e2.3"]),
        (112, 1, ["k3_e6_se"] * 2),
        (160, 2, ["k5_e6_se"] * 3)]), stem_channels=16, final_channels=960, head_channels=1280,
        activation="hswish", bn_eps=bn_eps, se=SqueezeExcite(), name=name)


def _efficientnet_b0() -> Arch:
    """EfficientNet-B0: SiLU everywhere, SE in every layer, squeezed to a quarter of the layer's input."""
    return Arch(stages=_chain(32, [
        (16, 1, ["k3_e1_se"]),
        (24, 2, ["k3_e6_se"] * 2),
        (40, 2, ["k5_e6_se"] * 2),
        (80, 2, ["k3_e6_se"] * 3),
        (112, 1, ["k5_e6_se"] * 3),
        (192, 2, ["k5_e6_se"] * 4),
        (320, 1, ["k3_e6_se"])]), activation="silu",
        se=SqueezeExcite(from_input=True, divisor=1, activation="silu", gate="sigmoid"), name="efficientnet_b0")


def _resnet(block: str, depths: tuple[int, ...], name: str) -> Arch:
    """torchvision's ResNet: 7x7 stride-2 stem → BN → ReLU → 3x3 stride-2 max-pool, four stages of ``block``
    (``basic``: widths 64..512, ``bottle``: 256..2048), no final 1x1 conv."""
    widths = (64, 128, 256, 512) if block == "basic" else (256, 512, 1024, 2048)
    return Arch(stages=_chain(64, [(w, 1 if i == 0 else 2, [f"{block}_k3_g1"] * n)
                                   for i, (w, n) in enumerate(zip(widths, depths))]),
                stem_channels=64, stem_kernel=7, stem_pool=True, final_channels=0, activation="relu", name=name)


BUILTIN_ARCHS: dict[str, Arch] = {
    "mobilenet_v2": _mbv2_like([["k3_e6"] * n for n in (2, 3, 4, 3, 3, 1)], "mobilenet_v2"),
    "fna_deeplabv3": _mbv2_like([
        ["k3_e6", "k3_e6", "skip", "skip"],
        ["k7_e6", "k3_e6", "k3_e6", "k3_e6"],
        ["k7_e6", "k7_e6", "k5_e6", "k7_e6", "k7_e6", "k5_e6"],
        ["k7_e6", "k7_e6", "k7_e6", "k7_e6", "skip", "skip"],
        ["k7_e6", "k5_e6", "skip", "skip"],
        ["k7_e3"]], "fna_deeplabv3"),
    "fna_retinanet": _mbv2_like([
        ["k3_e6", "k3_e6", "skip", "skip"],
        ["k7_e6", "k5_e6", "skip", "skip"],
        ["k3_e6", "k5_e6", "k7_e6", "k3_e6"],
        ["k5_e6", "k7_e6", "skip", "skip"],
        ["k7_e6", "k7_e6", "k7_e3", "k7_e6"],
        ["k7_e6"]], "fna_retinanet"),
    "fna_ssdlite": _mbv2_like([
        ["k5_e6", "skip", "skip", "skip"],
        ["k5_e6", "k5_e6", "k3_e6", "k5_e6"],
        ["k5_e6", "k7_e6", "k3_e6", "skip"],
        ["k7_e6", "k7_e6", "k7_e6", "k7_e6"],
        ["k5_e6", "k7_e6", "k7_e6", "skip"],
        ["k7_e6"]], "fna_ssdlite"),
    "mobilenet_v3_large": _mobilenet_v3_large(1e-3, "mobilenet_v3_large"),  # torchvision (BN eps 1e-3)
    "mobilenetv3_large_100": _mobilenet_v3_large(1e-5, "mobilenetv3_large_100"),  # timm (BN eps 1e-5)
    "efficientnet_b0": _efficientnet_b0(),  # timm's and torchvision's
    "resnet18": _resnet("basic", (2, 2, 2, 2), "resnet18"),  # torchvision's
    "resnet34": _resnet("basic", (3, 4, 6, 3), "resnet34"),
    "resnet50": _resnet("bottle", (3, 4, 6, 3), "resnet50"),
    "resnet101": _resnet("bottle", (3, 4, 23, 3), "resnet101"),
}


def get_arch(name_or_path: str | Path) -> Arch:
    """A built-in architecture by name, or one read from a JSON or net_config text file."""
    key = str(name_or_path)
    if key in BUILTIN_ARCHS:
        return BUILTIN_ARCHS[key]
    path = Path(key)
    if not path.exists():
        raise ArchError(f"unknown architecture {key!r}: not a built-in ({', '.join(BUILTIN_ARCHS)}) "
                        "and no such file")
    return load_arch(path)


def load_arch(path: str | Path) -> Arch:
    """Read an architecture from JSON (``{"stages": [...]}``) or reference net_config text."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ArchError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ArchError(f"{path}: not UTF-8 text (byte {e.start}); an architecture is JSON or net_config text") \
            from None
    stripped = text.lstrip()
    try:
        if stripped.startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ArchError(f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
            except (ValueError, RecursionError) as e:  # json.loads raises these for what it cannot convert
                raise ArchError("malformed JSON: " + ("nested too deeply" if isinstance(e, RecursionError)
                                                      else "a number too long to read")) from None
            data = data.get("arch", data)  # run files may wrap the arch with metadata
            if not isinstance(data, dict) or "stages" not in data:
                raise ArchError("JSON has no 'stages' list")
            arch = Arch.from_dict(data)
        else:
            arch = Arch.from_net_config(text)
    except ArchError as e:
        raise ArchError(f"{path}: {e}") from None
    return arch if arch.name else replace(arch, name=path.stem)


def save_arch(arch: Arch, path: str | Path, /, **meta: Any) -> None:
    """Write ``arch`` atomically: reference net_config text, or for ``*.json`` paths the one JSON format
    of architecture files, ``{"arch": {...}, **meta}`` (``meta``: where it came from, its cost, ...).

    :func:`load_arch` reads both, and plain ``{"stages": [...]}`` JSON too.
    """
    path = Path(path)
    text = (json.dumps({"arch": arch.to_dict(), **meta}, indent=2) if path.suffix == ".json"
            else arch.to_net_config() + "\n")
    write_text_atomic(path, text)
