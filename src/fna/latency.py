"""Per-device latency tables, the additive latency predictor and end-to-end latency checks (issue 8).

A latency table measures, for one task at one input size on one device/backend/thread count:

* every candidate op of every searched position (``s{i}.l{j}.{op}``), as a standalone layer (MBConv or
  ResNet block) with its real input shape there (stride and, for segmentation at OS16, dilation as in
  the super network);
* the fixed parts once: ``stem`` (stem conv + first block), ``final`` (the final 1x1 conv, when the task
  taps it) and ``head`` (the task's neck and head on the backbone's tap maps);
* ``overhead``: one call of an (almost) empty graph. Every part's median includes this per-call cost of
  the framework, but a whole network pays it once, so it is subtracted from each part and added once to
  the fixed cost.

Every entry is the median of ``repeats`` timed calls after ``warmup`` calls, with its interquartile
range; entries are measured a few at a time with their calls interleaved, so load that changes during
the build (a shared machine) shifts neighbouring entries alike. The file is a :class:`~fna.cost.CostTable` (unit ``ms``: ``fixed``, ``layers``, ``candidates``,
``key``) plus ``settings``, ``environment`` and the raw ``entries``. It is written atomically after every
entry, so an interrupted build continues where it stopped; a partial table has ``complete: false``.

The predictor is the table's sum: ``fixed + Σ_layers cost(chosen op)`` (skip costs 0).
"""

from __future__ import annotations

import io
import json
import platform
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fna.arch import SKIP, Arch, get_arch
from fna.backbone import Backbone, make_layer
from fna.checkpoint import write_text_atomic
from fna.cost import CostTable
from fna.errors import FnaError
from fna.rundir import RunDir, read_json, write_json
from fna.seeds import SEEDS
from fna.seeds.discover import discover_arch
from fna.supernet import SearchSpace, SearchSpaceError, SuperBackbone, arch_path
from fna.tasks import build_model, get_task

FORMAT = "fna-latency-table"
DEVICES = ("cpu", "cuda")
BACKENDS = ("torch", "onnxruntime")


class LatencyError(FnaError):
    """A latency table cannot be built, resumed or applied (bad settings, mismatch, missing backend)."""


@dataclass(frozen=True)
class LatencySettings:
    """What a table's numbers depend on; resuming a table with other settings is an error."""

    task: str
    size: tuple[int, int]
    device: str = "cpu"
    backend: str = "torch"
    threads: int = 1
    space: str | dict[str, Any] | None = None  # default: the task's search space
    seed: str = "mobilenet_v2"  # seed network (its architecture) or an architecture name/file
    num_classes: int | None = None  # default: the paper's

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        if self.device not in DEVICES:
            raise LatencyError(f"device {self.device!r}: expected one of {', '.join(DEVICES)}")
        if self.backend not in BACKENDS:
            raise LatencyError(f"backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.threads < 1 or min(self.size) < 1:
            raise LatencyError("threads and both sides of size must be >= 1")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise LatencyError("device cuda asked for, but torch sees no CUDA device")
        get_task(self.task)

    @property
    def classes(self) -> int:
        return self.num_classes or get_task(self.task).num_classes

    def search_space(self) -> SearchSpace:
        spec = self.space if self.space is not None else (get_task(self.task).search_defaults or {}).get(
            "space", "detection")
        return SearchSpace.get(spec, self.seed_arch())

    def seed_arch(self) -> Arch:
        """The seed's architecture (read from the reference model's module tree when not listed)."""
        spec = SEEDS.get(self.seed)
        if spec is None:
            return get_arch(self.seed)
        return spec.arch or discover_arch(spec.reference(), spec.name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: the space resolved to its dict, the seed's architecture included."""
        d = asdict(self)
        d.update(size=list(self.size), space=self.search_space().to_dict(), num_classes=self.classes,
                 seed_arch=self.seed_arch().to_dict())
        return json.loads(json.dumps(d))


def environment(settings: LatencySettings) -> dict[str, Any]:
    """Device name and library versions the numbers were measured with."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    if settings.device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
    else:
        env["device_name"] = _cpu_name()
    if settings.backend == "onnxruntime":
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


# -- the parts that get timed ----------------------------------------------------------------------

class _FedTaps(nn.Module):
    """Stands in for the backbone inside a task model: returns the tap maps given to :class:`_HeadPart`."""

    def __init__(self, out_channels: OrderedDict[str, int]) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.feats: OrderedDict[str, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(self.feats)


class _HeadPart(nn.Module):
    """A task model's neck and head alone: ``(image, *tap maps)`` → the dense outputs."""

    def __init__(self, task: str, out_channels: OrderedDict[str, int], num_classes: int) -> None:
        super().__init__()
        self.taps = _FedTaps(out_channels)
        self.model = get_task(task).head(self.taps, num_classes)

    def forward(self, image: torch.Tensor, *feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.taps.feats = OrderedDict(zip(self.taps.out_channels, feats))
        return _flat(self.model.dense_forward(image))


class DenseModel(nn.Module):
    """A task model's ``dense_forward`` with its outputs as a tuple (for tracing and ONNX)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _flat(self.model.dense_forward(x))


class _Overhead(nn.Module):
    """The cheapest call a backend can make: one tiny elementwise op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def _flat(out: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, dict):
        out = list(out.values())
    return tuple(t for o in out for t in _flat(o))


@dataclass
class Part:
    """One entry to time: a module and the shapes of its inputs."""

    name: str
    build: Callable[[], nn.Module]
    shapes: list[tuple[int, ...]]


def table_parts(settings: LatencySettings) -> tuple[list[Part], list[list[list[str]]]]:
    """Every entry of ``settings``' table (overhead first, then fixed parts, then candidates) and the
    candidate names per searched stage and layer.

    Input shapes come from the layer and tap info the task's super network records while building
    (built on the ``meta`` device: no weights, no forward).
    """
    spec = get_task(settings.task)
    seed_arch, space = settings.seed_arch(), settings.search_space()
    with torch.device("meta"):
        backbone = SuperBackbone(seed_arch, space, spec.taps(seed_arch), spec.output_stride)
    size, a = settings.size, seed_arch
    image = (1, 3, *size)
    parts = [Part("overhead", _Overhead, [(1,)]),
             Part("stem", lambda: _seed_fixed(settings, "stem"), [image])]
    if backbone.final is not None:
        final = backbone.layer_info[-1]
        parts.append(Part("final", lambda: _seed_fixed(settings, "final"), [final.input_shape(size)]))
    out_channels = OrderedDict(backbone.out_channels)
    parts.append(Part("head", lambda: _HeadPart(settings.task, out_channels, settings.classes),
                      [image, *(f.shape(size) for f in backbone.feature_info)]))
    for info in backbone.layer_info:
        if info.position is None or info.position[0] == 0:  # stem, first block, final conv
            continue
        for name in (n for n in info.ops if n != SKIP):
            parts.append(Part(entry_name(*info.position, name),
                              lambda info=info, name=name: make_layer(info, name, a),
                              [info.input_shape(size)]))
    return parts, [[list(n) for n in layers] for layers in backbone.candidates]


def _seed_fixed(settings: LatencySettings, which: str) -> nn.Module:
    """The seed backbone's stem + first block (``stem``) or its final 1x1 conv (``final``)."""
    spec = get_task(settings.task)
    arch = settings.seed_arch()
    net = Backbone(arch, taps=spec.taps(arch), output_stride=spec.output_stride)
    return nn.Sequential(net.stem, *net.stages[0]) if which == "stem" else net.final


def entry_name(stage: int, layer: int, op: str) -> str:
    """Table key of candidate ``op`` at layer ``layer`` of searched stage ``stage`` (1-based, as modules)."""
    return f"s{stage}.l{layer}.{op}"


# -- timing --------------------------------------------------------------------------------------

def make_runner(module: nn.Module, shapes: Sequence[tuple[int, ...]], settings: LatencySettings) -> Callable[[], None]:
    """One inference call of ``module`` on random inputs of ``shapes`` with ``settings``' backend."""
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(s, generator=gen) for s in shapes]
    module = module.eval()
    if settings.backend == "torch":
        device = torch.device(settings.device)
        module = module.to(device)
        inputs = [t.to(device) for t in inputs]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def run() -> None:
            with torch.inference_mode():
                module(*inputs)
            sync()
        return run
    session = _ort_session(module, inputs, settings)
    names = [i.name for i in session.get_inputs()]
    by_name = {f"in{n}": t.numpy() for n, t in enumerate(inputs)}
    feed = {n: by_name[n] for n in names}
    return lambda: session.run(None, feed)


def _ort_session(module: nn.Module, inputs: list[torch.Tensor], settings: LatencySettings) -> Any:
    import onnxruntime as ort

    provider = "CUDAExecutionProvider" if settings.device == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        raise LatencyError(f"onnxruntime here has no {provider} (it has {', '.join(ort.get_available_providers())})")
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, tuple(inputs), buf, input_names=[f"in{n}" for n in range(len(inputs))],
                          opset_version=17, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = settings.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(buf.getvalue(), opts, providers=[provider])


def time_runners(runs: Sequence[Callable[[], None]], warmup: int, repeats: int,
                 rounds: int = 5) -> list[dict[str, float]]:
    """Median and interquartile range (ms) of ``repeats`` timed calls of each runner, after ``warmup``
    untimed ones.

    The calls are interleaved in ``rounds`` rounds over all runners, so a change of background load
    during the measurement shifts every runner alike instead of a few of them.
    """
    for run in runs:
        for _ in range(warmup):
            run()
    times: list[list[float]] = [[] for _ in runs]
    for r in range(rounds):
        calls = repeats * (r + 1) // rounds - repeats * r // rounds
        for run, t_run in zip(runs, times):
            for _ in range(calls):
                t = time.perf_counter()
                run()
                t_run.append((time.perf_counter() - t) * 1e3)
    out = []
    for t_run in times:
        q1, q3 = np.percentile(t_run, [25, 75])
        out.append({"median_ms": statistics.median(t_run), "iqr_ms": float(q3 - q1), "repeats": repeats})
    return out


class TorchThreads:
    """Run with ``n`` torch threads, restoring the previous number afterwards."""

    def __init__(self, n: int) -> None:
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


# -- the table -----------------------------------------------------------------------------------

@dataclass
class LatencyTable:
    """A (possibly partial) latency table: settings, environment and the measured entries."""

    settings: dict[str, Any]
    environment: dict[str, Any]
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    candidates: list[list[list[str]]] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)  # every entry name a complete table has

    @property
    def complete(self) -> bool:
        return all(name in self.entries for name in self.expected)

    def cost_table(self) -> CostTable:
        """The search's view: per-candidate ms (overhead removed) and the fixed ms (overhead once)."""
        if not self.complete:
            raise LatencyError(f"the table has {len(self.entries)} of {len(self.expected)} entries; finish it "
                               "with `fna latency build ... --resume`")
        overhead = self.entries["overhead"]["median_ms"]

        def net(name: str) -> float:
            return max(self.entries[name]["median_ms"] - overhead, 0.0)

        fixed = overhead + sum(net(n) for n in ("stem", "final", "head") if n in self.entries)
        layers = [[[0.0 if op == SKIP else net(entry_name(i, j, op)) for op in names]
                   for j, names in enumerate(stage)] for i, stage in enumerate(self.candidates, start=1)]
        return CostTable("ms", fixed, layers, self.candidates, key=self.settings)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, "version": 1, "unit": "ms", "complete": self.complete,
                             "settings": self.settings, "environment": self.environment,
                             "entries": self.entries, "expected": self.expected, "candidates": self.candidates}
        if self.complete:
            table = self.cost_table()
            d.update(fixed=table.fixed, layers=table.layers, key=table.key)
        return d

    def save(self, path: str | Path) -> None:
        """Write atomically (a temporary file renamed over ``path``)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        try:
            d = json.loads(Path(path).read_text())
        except OSError as e:
            raise LatencyError(f"{path}: cannot read ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise LatencyError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise LatencyError(f"{path}: not a latency table written by `fna latency build`")
        return cls(d["settings"], d["environment"], d["entries"], d["candidates"], d["expected"])


def build_table(settings: LatencySettings, out: str | Path, warmup: int = 10, repeats: int = 50,
                resume: bool = False, limit: int | None = None,
                on_entry: Callable[[str, dict[str, Any]], None] | None = None, chunk: int = 8) -> LatencyTable:
    """Measure every entry of ``settings``' table into ``out``, ``chunk`` entries at a time (interleaved,
    see :func:`time_runners`), saving after each chunk.

    An existing ``out`` with the same settings and environment is continued (its entries are kept);
    other settings are a :class:`LatencyError`. ``resume`` insists that ``out`` exists. ``limit`` stops
    after that many new entries (the table stays partial); ``on_entry(name, entry)`` follows each one.
    """
    out = Path(out)
    parts, candidates = table_parts(settings)
    wanted, env = settings.to_dict(), environment(settings)
    if out.exists():
        table = LatencyTable.load(out)
        for what, mine, theirs in (("settings", wanted, table.settings), ("environment", env, table.environment)):
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if diff:
                raise LatencyError(f"{out} was measured with other {what} ({', '.join(diff)} differ: "
                                   f"{', '.join(f'{k}={_short(theirs.get(k))}' for k in diff)}); use another --out")
    elif resume:
        raise LatencyError(f"{out}: no table to resume")
    else:
        table = LatencyTable(wanted, env)
    table.candidates, table.expected = candidates, [p.name for p in parts]
    todo = [p for p in parts if p.name not in table.entries][:limit]
    with TorchThreads(settings.threads):
        for start in range(0, len(todo), chunk):
            group = todo[start:start + chunk]
            results = time_runners([make_runner(p.build(), p.shapes, settings) for p in group], warmup, repeats)
            for part, entry in zip(group, results):
                entry["input_shapes"] = [list(s) for s in part.shapes]
                table.entries[part.name] = entry
            table.save(out)
            if on_entry is not None:
                for part in group:
                    on_entry(part.name, table.entries[part.name])
    table.save(out)
    return table


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- predictor and end-to-end check ---------------------------------------------------------------

def predict(table: CostTable, arch: Arch) -> float:
    """Predicted latency (ms) of ``arch``: the table's fixed part plus its ops' entries."""
    try:
        path = arch_path(arch, Arch.from_dict(table.key["seed_arch"]), table.candidates)
    except SearchSpaceError as e:
        raise LatencyError(f"the latency table does not hold this architecture: {e}") from None
    return table.path_cost(path)


def measure_arch(arch: Arch, settings: LatencySettings, warmup: int = 10, repeats: int = 50,
                 model: nn.Module | None = None) -> dict[str, float]:
    """End-to-end latency of the task model on ``arch`` (``dense_forward``) with ``settings``' backend."""
    h, w = settings.size
    model = model if model is not None else build_model(settings.task, arch, settings.classes)
    with TorchThreads(settings.threads):
        return time_runners([make_runner(DenseModel(model), [(1, 3, h, w)], settings)], warmup, repeats)[0]


def load_cost_table(path: str | Path) -> tuple[CostTable, LatencySettings]:
    """A complete table file as the search's :class:`CostTable` and the settings it was measured with."""
    table = LatencyTable.load(path)
    s = table.settings
    settings = LatencySettings(s["task"], tuple(s["size"]), s["device"], s["backend"], s["threads"], s["space"],
                               s["seed"], s["num_classes"])
    return table.cost_table(), settings


@dataclass
class Check:
    """Predicted vs measured end-to-end latency of one architecture."""

    arch: Arch
    predicted_ms: float
    measured_ms: float
    iqr_ms: float

    @property
    def error(self) -> float:
        """Relative error of the prediction, ``predicted / measured − 1``."""
        return self.predicted_ms / self.measured_ms - 1


def check(lut: str | Path, arch: Arch, task: str, num_classes: int | None = None, model: nn.Module | None = None,
          warmup: int = 10, repeats: int = 50) -> Check:
    """Predict ``arch``'s latency from ``lut`` and measure it with the table's size, device, backend, threads."""
    table, settings = load_cost_table(lut)
    if task != settings.task:
        raise LatencyError(f"{lut} was measured for task {settings.task}, not {task}")
    if num_classes is not None and num_classes != settings.classes:
        raise LatencyError(f"{lut} was measured with {settings.classes} classes, the model has {num_classes}")
    predicted = predict(table, arch)
    measured = measure_arch(arch, settings, warmup, repeats, model)
    return Check(arch, predicted, measured["median_ms"], measured["iqr_ms"])


def write_to_summary(run_dir: str | Path, result: Check, lut: str | Path) -> Path:
    """Add ``latency_ms`` (measured) and ``latency_predicted_ms`` to ``run_dir/summary.json``."""
    path = RunDir(Path(run_dir)).summary
    if not path.is_file():
        raise LatencyError(f"{run_dir}: no {path.name} (not a finished run directory)")
    summary = read_json(path)
    _, settings = load_cost_table(lut)
    summary.update(latency_ms=round(result.measured_ms, 4), latency_predicted_ms=round(result.predicted_ms, 4),
                   latency_setting={"table": str(lut), "size": list(settings.size), "device": settings.device,
                                    "backend": settings.backend, "threads": settings.threads})
    write_json(path, summary)
    return path
