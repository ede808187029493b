"""A soak anyone can rerun: random kill -9s across `fna adapt` runs, and many fuzzed inputs.

1. Kills. Each trial runs ``python -m fna adapt`` on the demo data (seg on its ``folder`` layout and
   ssdlite on its COCO json, in turn; tiny settings, one thread), SIGKILLs it from outside 1–3 times,
   then ``--resume``s it until it completes. Each kill aims at a random segment the run still has ahead
   (startup, data checks, search, remap, fine-tuning, evaluation, report; watched from outside through
   ``ledger.json`` and the output) and lands at a random moment within that segment's length in the
   uninterrupted run, so kills also hit checkpoint and ledger writes (counted by the ``*.tmp`` they leave).
   The finished run is compared with the uninterrupted run of the same command: architecture, metric and
   weights must be bit-identical, ``search_log.jsonl`` the same lines (no epoch twice), every ledger
   phase done, and no ``*.tmp`` left anywhere in the run directory.
2. Fuzz. The strategies of ``tests/fuzz_inputs.py`` (architecture JSON, net_config text, COCO json with
   images, segmentation folders with masks) with many more examples than ``tests/test_fuzz.py``; every
   input must work consistently or raise one clear ``FnaError`` line.

    python bench/soak.py [--trials 20] [--examples 1000] [--seed S] [--work DIR]

Prints the figures and exits 1 if anything was not exact or raised another exception. The seed fixes the
fuzzed inputs and the kill schedule; where a kill lands still depends on the machine's speed.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]  # this checkout's fna and the shared strategies

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402

from fna.data.demo import write_demo  # noqa: E402
from fuzz_inputs import KINDS, Inconsistent, Unclear, outcome  # noqa: E402

SPACE = ("search.space.stages=[" + ",".join(["{max_depth: 2, kernels: [3, 5], expansions: [3, 6]}"] * 5)
         + ",{max_depth: 1, kernels: [3, 5], expansions: [3, 6]}]")
TINY = ["finetune.iters=4", "finetune.batch_size=2", "finetune.checkpoint_every=2", "finetune.log_every=1",
        "search.epochs=2", "search.arch_start_epoch=1", "search.batch_size=2", "search.warmup_iters=0",
        "search.progress=false", "search.space.name=tiny", SPACE]
TASKS = {"seg": ("folder", "size=[48,48]"), "ssdlite": ("coco", "size=[64,64]")}
PHASES = ("search", "remap", "finetune", "eval")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "FNA_PROGRESS_INTERVAL": "3600", "PYTHONPATH": os.pathsep.join([str(REPO / "src"),
                                                                        os.environ.get("PYTHONPATH", "")])}
PROCESS_TIMEOUT = 900


SEGMENTS = ("startup", "checks", *PHASES, "report")  # what a run goes through, in order
CHECKING = "checking the "  # printed once the settings and the seed are loaded, before the data checks
SUMMARY_LINE = re.compile(r"^(mIoU|AP) .* · ", re.MULTILINE)  # printed once metrics and summary.json are there
POLL = 0.02


def read_ledger(run_dir: Path) -> dict | None:
    """``ledger.json``'s phases, ``None`` before it exists (it is replaced atomically, so never half-written)."""
    try:
        return json.loads((run_dir / "ledger.json").read_text())
    except (OSError, ValueError):
        return None


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


class Watch:
    """The segments a running ``fna adapt`` has entered, seen from outside: ``startup`` (imports, settings,
    the seed) at once, ``checks`` (the data checks, the model set-up) once it prints that it checks the
    data, a phase when the ledger shows it (for the phase a resumed run continues: when the ledger file is
    first replaced), ``report`` once the summary line is printed."""

    def __init__(self, run_dir: Path, log: Path) -> None:
        self.run_dir, self.log = run_dir, log
        self.at_start = read_ledger(run_dir) or {}
        self.inode = inode(run_dir / "ledger.json")

    def entered(self) -> set[str]:
        phases = read_ledger(self.run_dir) or {}
        rewritten = inode(self.run_dir / "ledger.json") not in (None, self.inode)
        out = {"startup", *(p for p in PHASES if p in phases and (p not in self.at_start or rewritten))}
        output = self.log.read_text(errors="replace")
        if CHECKING in output:
            out.add("checks")
        if SUMMARY_LINE.search(output):
            out.add("report")
        return out


@dataclass
class Attempt:
    """One ``fna adapt`` process: its exit code, whether we killed it, where the run was, its output."""

    rc: int
    killed: bool
    where: str = ""
    left_tmp: list[str] = field(default_factory=list)  # temporaries a killed write left
    output: str = ""
    entered: dict[str, float] = field(default_factory=dict)  # segment -> seconds after the start
    seconds: float = 0.0


def adapt(task: str, data: Path, run_dir: Path, resume: bool, kill: tuple[str, float] | None = None) -> Attempt:
    """Run ``fna adapt`` once, watching it (:class:`Watch`). ``kill=(segment, delay)``: SIGKILL its process
    group ``delay`` seconds after it enters ``segment``, if it still runs."""
    fmt, size = TASKS[task]
    cmd = [sys.executable, "-m", "fna", "adapt", "--task", task, "--data", str(data), "--format", fmt,
           "--out", str(run_dir), *(["--resume"] if resume else []), size, *TINY]
    entered: dict[str, float] = {}
    hung = False
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "output.txt"
        with open(log, "wb") as out:
            watch = Watch(run_dir, log)
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
            while proc.poll() is None:
                now = time.perf_counter() - t0
                for segment in watch.entered() - entered.keys():
                    entered[segment] = now
                due = kill is not None and kill[0] in entered and now >= entered[kill[0]] + kill[1]
                hung = now > PROCESS_TIMEOUT
                if due or hung:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:  # it ended just now
                        pass
                    break
                time.sleep(POLL)
            rc = proc.wait()
            seconds = time.perf_counter() - t0
        for segment in watch.entered() - entered.keys():  # what it did after the last look
            entered[segment] = seconds
        output = log.read_text(errors="replace")
    killed = rc == -signal.SIGKILL and not hung
    attempt = Attempt(rc, killed, output=output + (f"\n(killed: still running after {PROCESS_TIMEOUT} s)"
                                                   if hung else ""), entered=entered, seconds=seconds)
    if killed:
        attempt.where = landed(entered)
        attempt.left_tmp = [str(p.relative_to(run_dir)) for p in stale_tmp(run_dir)]
    return attempt


def durations(attempt: Attempt) -> dict[str, float]:
    """Seconds an uninterrupted run spent in each segment (from when it entered it to when it entered the next)."""
    times = [attempt.entered.get(s) for s in SEGMENTS] + [attempt.seconds]
    out = {}
    for i, segment in enumerate(SEGMENTS):
        later = next(t for t in times[i + 1:] if t is not None)
        out[segment] = max(later - (times[i] if times[i] is not None else later), POLL)
    return out


def landed(entered: dict[str, float]) -> str:
    """Where a killed run was: the last segment it entered."""
    return max(entered, key=SEGMENTS.index)


def stale_tmp(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("*.tmp")) if run_dir.exists() else []


def written_file(tmp: str) -> str:
    """``finetune/.checkpoint.pt.1a2b3c4d.tmp`` → ``finetune/checkpoint.pt``: the file a temporary was for."""
    path = Path(tmp)
    return str(path.with_name(re.sub(r"^[.](.*?)([.][0-9a-z_]{8})?[.]tmp$", r"\1", path.name)))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.fna.pt", weights_only=True)["state_dict"]


@dataclass
class Trial:
    """One killed-and-resumed run and what its comparison with the uninterrupted run found."""

    task: str
    attempts: list[Attempt] = field(default_factory=list)
    same: dict[str, bool] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def kills(self) -> int:
        return sum(a.killed for a in self.attempts)

    @property
    def landed(self) -> list[str]:
        """Where each kill landed, in order."""
        return [a.where for a in self.attempts if a.killed]


def compare(run_dir: Path, ref: Path, trial: Trial) -> None:
    """Fill ``trial.same`` (arch, metric, weights, search log) and ``trial.problems`` (everything else)."""
    try:
        trial.same["arch"] = json.loads((run_dir / "arch.json").read_text()) == json.loads(
            (ref / "arch.json").read_text())
        trial.same["metric"] = json.loads((run_dir / "metrics.json").read_text()) == json.loads(
            (ref / "metrics.json").read_text())
        mine, theirs = weights(run_dir), weights(ref)
        trial.same["weights"] = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        log = (run_dir / "search" / "search_log.jsonl").read_text()
        trial.same["search log"] = log == (ref / "search" / "search_log.jsonl").read_text()
        epochs = [json.loads(line)["epoch"] for line in log.splitlines()]
        if len(epochs) != len(set(epochs)):
            trial.problems.append(f"search_log.jsonl repeats epochs: {epochs}")
        ledger = json.loads((run_dir / "ledger.json").read_text())
        if not all(ledger.get(p, {}).get("done") for p in PHASES):
            trial.problems.append(f"ledger phases not all done: {ledger}")
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        trial.problems.append(f"cannot compare: {type(e).__name__}: {e}")
    if tmp := stale_tmp(run_dir):
        trial.problems.append(f"stale temporary files: {[str(p.relative_to(run_dir)) for p in tmp]}")
    trial.problems += [f"{name} differs from the uninterrupted run" for name, same in trial.same.items() if not same]


def run_trial(task: str, data: Path, run_dir: Path, ref: Path, spans: dict[str, float], rng: random.Random) -> Trial:
    """Kill a run 1–3 times, each at a random moment of a random segment it still has to go through (the
    moment drawn within that segment's length in the uninterrupted run), resume it until it completes, compare."""
    trial = Trial(task)
    planned = rng.randint(1, 3)
    while True:
        kill = None
        if trial.kills < planned:
            phases = read_ledger(run_dir) or {}
            ahead = [s for s in SEGMENTS if s not in PHASES or not phases.get(s, {}).get("done")]
            segment = rng.choice(ahead)
            kill = (segment, rng.uniform(0, spans[segment]))
        attempt = adapt(task, data, run_dir, resume=bool(trial.attempts), kill=kill)
        trial.attempts.append(attempt)
        if attempt.killed:
            continue
        if attempt.rc != 0:
            tail = [line for line in attempt.output.splitlines() if line.strip()][-3:]
            trial.problems.append(f"resume failed (exit {attempt.rc}) after kills at {trial.landed}: "
                                  + " | ".join(tail))
            return trial
        break
    compare(run_dir, ref, trial)
    return trial


def soak_kills(trials: int, work: Path, rng: random.Random) -> tuple[list[Trial], dict[str, dict[str, float]]]:
    """The uninterrupted reference run per task, then ``trials`` killed-and-resumed runs, tasks in turn."""
    data = work / "demo"
    write_demo(data, n_train=8, n_val=2, size=64, seed=1)
    refs, spans = {}, {}
    for task in TASKS:
        refs[task] = work / f"uninterrupted-{task}"
        attempt = adapt(task, data, refs[task], resume=False)
        if attempt.rc != 0:
            raise SystemExit(f"the uninterrupted {task} run failed:\n{attempt.output[-3000:]}")
        spans[task] = durations(attempt)
        print(f"  uninterrupted {task} run: {attempt.seconds:.1f} s ("
              + ", ".join(f"{k} {v:.2f}" for k, v in spans[task].items()) + ")", flush=True)
    results = []
    for i in range(trials):
        task = list(TASKS)[i % len(TASKS)]
        run_dir = work / f"trial-{i:03d}-{task}"
        trial = run_trial(task, data, run_dir, refs[task], spans[task], rng)
        results.append(trial)
        print(f"  trial {i + 1}/{trials} {task}: {trial.kills} kill(s) at {trial.landed} → "
              + ("; ".join(trial.problems) or "exact"), flush=True)
        if not trial.problems:
            shutil.rmtree(run_dir)  # keep only what needs a look
    return results, spans


@dataclass
class Found:
    """An input that broke the rule: its kind, what was raised, and the input (shortened)."""

    kind: str
    what: str
    message: str
    value: str


def soak_fuzz(examples: int, seed: int) -> tuple[dict[str, collections.Counter], list[Found]]:
    """Every kind of :data:`KINDS` with ``examples`` inputs drawn from ``seed``; outcome counts and what broke."""
    counts: dict[str, collections.Counter] = {}
    found: list[Found] = []
    for kind, (strategy, check) in KINDS.items():
        counts[kind] = collections.Counter()
        fuzz_kind(kind, strategy, check, examples, seed, counts[kind], found)
    return counts, found


def fuzz_kind(kind: str, strategy: st.SearchStrategy, check: Callable, examples: int, seed: int,
              tally: collections.Counter, found: list[Found]) -> None:
    """Draw ``examples`` inputs of one kind; count outcomes in ``tally`` and append what broke to ``found``."""

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(value: object) -> None:
        try:
            tally[outcome(check, value)] += 1
        except (Unclear, Inconsistent) as e:
            tally["unclear" if isinstance(e, Unclear) else "inconsistent"] += 1
            found.append(Found(kind, type(e).__name__, str(e)[:300], repr(value)[:300]))
        except Exception as e:  # noqa: BLE001 - exactly what the soak counts
            tally["traceback"] += 1
            frame = traceback.extract_tb(e.__traceback__)[-1]
            found.append(Found(kind, f"{type(e).__name__} at {Path(frame.filename).name}:{frame.lineno}",
                               str(e)[:300], repr(value)[:300]))

    run()


def machine() -> str:
    """``nproc``, the CPU model, torch and the date, as docs/benchmarks.md records them."""
    model = platform.processor() or "unknown CPU"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {model}, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {datetime.date.today().isoformat()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20, help="killed-and-resumed runs (tasks in turn; 0: fuzz only)")
    ap.add_argument("--examples", type=int, default=1000, help="fuzzed inputs per kind")
    ap.add_argument("--seed", type=int, default=None,
                    help="fixes the fuzzed inputs and the kill schedule (default: random, printed)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 32)
    logging.getLogger("fna").setLevel(logging.ERROR)  # --skip-bad's per-item warnings
    warnings.simplefilter("ignore")
    print(f"soak seed {seed} (rerun: python bench/soak.py --trials {args.trials} --examples {args.examples} "
          f"--seed {seed})\nmachine: {machine()}", flush=True)
    start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="fna-soak-"))
    work.mkdir(parents=True, exist_ok=True)

    trials, spans = [], {}
    if args.trials:
        print(f"kill -9 soak in {work}", flush=True)
        trials, spans = soak_kills(args.trials, work, random.Random(seed))
    kill_seconds = time.perf_counter() - start
    print(f"fuzz: {args.examples} inputs per kind", flush=True)
    counts, found = soak_fuzz(args.examples, seed)
    total = time.perf_counter() - start

    report(trials, spans, counts, found)
    print(f"wall time {total / 60:.1f} min (kills {kill_seconds / 60:.1f}, fuzz {(total - kill_seconds) / 60:.1f})")
    bad = [t for t in trials if t.problems]
    if not bad and args.work is None:
        shutil.rmtree(work)
    return 1 if bad or found else 0


def report(trials: list[Trial], spans: dict[str, dict[str, float]], counts: dict[str, collections.Counter],
           found: list[Found]) -> None:
    """Print the soak's figures."""
    tasks = collections.Counter(t.task for t in trials)
    where = collections.Counter(w for t in trials for w in t.landed)
    mid_write = [written_file(name) for t in trials for a in t.attempts for name in a.left_tmp]
    print("\n== figures ==")
    print(f"trials {len(trials)} ({', '.join(f'{n} {k}' for k, n in tasks.items())}), "
          f"kills {sum(t.kills for t in trials)}, processes {sum(len(t.attempts) for t in trials)}; "
          "uninterrupted runs took " + ", ".join(f"{k} {sum(s.values()):.1f} s" for k, s in spans.items()))
    print("kills landed in: " + ", ".join(f"{p} {where[p]}" for p in SEGMENTS if where[p]))
    print(f"kills mid-write (a *.tmp left behind): {len(mid_write)}"
          + (f" (writing {', '.join(mid_write)})" if mid_write else ""))
    for name in ("arch", "metric", "weights", "search log"):
        print(f"  {name} identical: {sum(t.same.get(name, False) for t in trials)}/{len(trials)}")
    exact = sum(not t.problems for t in trials)
    print(f"exact resumes (arch, metric, weights, search log identical; ledger done; no *.tmp): {exact}/{len(trials)}")
    for t in trials:
        if t.problems:
            print(f"  not exact ({t.task}, kills at {t.landed}): {'; '.join(t.problems)}")
    print("inputs tried per kind:")
    for kind, tally in counts.items():
        print(f"  {kind:<11} {sum(tally.values()):>6}: {tally['ok']} ok, {tally['error']} one-line FnaError, "
              f"{tally['unclear']} unclear FnaError, {tally['inconsistent']} inconsistent, "
              f"{tally['traceback']} tracebacks")
    tracebacks = [f for f in found if f.what not in ("Unclear", "Inconsistent")]
    print(f"tracebacks (non-FnaError exceptions): {len(tracebacks)}; unclear or inconsistent: "
          f"{len(found) - len(tracebacks)}")
    for f in found[:5]:
        print(f"  [{f.kind}] {f.what}: {f.message}\n      input: {f.value}")


if __name__ == "__main__":
    sys.exit(main())
