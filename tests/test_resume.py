"""A stopped run can always be fixed and continued: settings and data are checked before the first phase,
a kill -9 at any phase boundary resumes to exactly the uninterrupted result, and a resume may change
what has not run yet (or the learning rate after a divergence) but nothing a finished phase used."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fna.data.demo import write_demo
from fna.errors import FnaError
from fna.pipeline import check_resume, load_config, run

TESTS = Path(__file__).parent
TINY = ["size=[48,48]", "finetune.iters=4", "finetune.batch_size=2", "finetune.checkpoint_every=2",
        "finetune.log_every=1"]
TINY_SEARCH = ["search.epochs=2", "search.arch_start_epoch=1", "search.batch_size=2", "search.warmup_iters=0",
               "search.progress=false", "search.space.name=tiny",
               "search.space.stages=" + "[" + ",".join(["{max_depth: 2, kernels: [3, 5], expansions: [3, 6]}"] * 5)
               + ",{max_depth: 1, kernels: [3, 5], expansions: [3, 6]}]"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo(root, n_train=8, n_val=2, size=64, seed=1)  # 4 + 4 images: 2 search steps per epoch
    return root


def _config(root, *overrides, **fields):
    return load_config(None, [*TINY, *overrides], task="seg", data={"root": str(root), "format": "folder"}, **fields)


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "model.fna.pt", weights_only=True)["state_dict"]


def _same_result(a: Path, b: Path) -> None:
    assert json.loads((a / "arch.json").read_text()) == json.loads((b / "arch.json").read_text())
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory, mbv2_seed):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("straight") / "run"
    run(_config(data, *TINY_SEARCH), out)
    torch.set_num_threads(threads)
    return out


def _kill(cfg, run_dir: Path, point: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(TESTS / "kill_worker.py"), cfg.model_dump_json(), str(run_dir), point],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == -9, out.stderr[-2000:]


@pytest.mark.parametrize("point,phase", [("search:1", "search"), ("search:3", "search"), ("phase:remap", "remap"),
                                         ("fine-tune:1", "finetune"), ("fine-tune:3", "finetune"),
                                         ("phase:eval", "eval")])
def test_a_run_killed_at_any_point_resumes_to_the_uninterrupted_result(point, phase, data, straight, tmp_path,
                                                                        one_thread):
    cfg = _config(data, *TINY_SEARCH)
    _kill(cfg, tmp_path / "run", point)
    killed = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert killed[phase]["done"] is False
    run(cfg, tmp_path / "run", resume=True)
    _same_result(straight, tmp_path / "run")
    search_log = (tmp_path / "run" / "search" / "search_log.jsonl").read_text()
    assert search_log == (straight / "search" / "search_log.jsonl").read_text()  # no line twice
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert all(ledger[p]["done"] for p in ("search", "remap", "finetune", "eval"))
    assert all(ledger[p]["seconds"] >= killed[p]["seconds"] for p in killed)  # time spent before the kill is kept
    if point.startswith("fine-tune:3"):
        assert killed["finetune"]["seconds"] > 0  # recorded while it ran


def test_fna_train_with_a_fixed_random_seed_gives_the_same_weights_and_metric_on_a_rerun(data, tmp_path, mbv2_seed,
                                                                                        one_thread):
    for name in ("a", "b"):
        run(_config(data, arch="mobilenet_v2"), tmp_path / name)
    _same_result(tmp_path / "a", tmp_path / "b")
    run(_config(data, "random_seed=1", arch="mobilenet_v2"), tmp_path / "other")
    assert not torch.equal(_weights(tmp_path / "a")["classifier.weight"], _weights(tmp_path / "other")["classifier.weight"])


def test_random_init_baseline_is_reproducible_too(data, tmp_path, one_thread):
    for name in ("a", "b"):
        run(_config(data, "finetune.iters=2", arch="fna_deeplabv3", init="random"), tmp_path / name)
    _same_result(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("override,match", [
    ("finetune.itres=3", "finetune config: itres: Extra inputs are not permitted"),
    ("finetune.iters=abc", "finetune config: iters: Input should be a valid integer"),
    ("finetune.iters=0", "finetune config: iters: Input should be greater than or equal to 1"),
    ("finetune.lr=-0.01", "finetune config: lr: Input should be greater than 0"),
    ("finetune.batch_size=0", "finetune config: batch_size: Input should be greater than or equal to 1"),
    ("finetune.checkpoint_every=-1", "finetune config: checkpoint_every"),
    ("search.epochs=0", "search config: epochs"),
    ("search.lam=-0.1", "search config: lam"),
    ("eval.batch_size=0", "run config: eval.batch_size"),
    ("size=[0,48]", "run config: size"),
    ("scale=[2.0,1.0]", "run config: scale"),
])
def test_bad_settings_stop_the_run_before_anything_is_written(override, match, data, tmp_path):
    with pytest.raises(FnaError, match=re.escape(match)):
        run(_config(data, *TINY_SEARCH, override), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_corrupt_image_of_either_split_is_found_before_the_first_phase(split, data, tmp_path, mbv2_seed):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data, root)
    bad = sorted((root / "images" / split).iterdir())[-1]
    bad.write_bytes(b"not an image")
    with pytest.raises(FnaError, match=re.escape(str(bad)) + ": unreadable image"):
        run(_config(root, arch="mobilenet_v2"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    summary = run(_config(root, "finetune.iters=1", "data.skip_bad=true", arch="mobilenet_v2"), tmp_path / "run")
    assert summary["phases"]["eval"]["done"]  # --skip-bad leaves the bad image out


def test_a_finished_run_refuses_changes_its_phases_used_and_names_them(data, tmp_path, mbv2_seed, one_thread):
    run(_config(data, arch="mobilenet_v2"), tmp_path / "run")
    with pytest.raises(FnaError, match="already holds a run; pass --resume"):
        run(_config(data, arch="mobilenet_v2"), tmp_path / "run")
    with pytest.raises(FnaError, match=r"eval.flip \(eval is done\); finetune.iters \(finetune is done\)"):
        run(_config(data, "finetune.iters=5", "eval.flip=true", arch="mobilenet_v2"), tmp_path / "run", resume=True)
    again = run(_config(data, "finetune.log_every=3", "device=cpu", arch="mobilenet_v2"), tmp_path / "run",
                resume=True)  # how it runs may change
    assert again["phases"]["finetune"]["done"]


def test_resume_rules_by_phase_state():
    old = {"task": "seg", "device": "auto", "search": {"epochs": 2, "lr": 0.1}, "finetune": {"iters": 4, "lr": 0.1},
           "eval": {"flip": False}}

    def changed(phases, **new):
        cfg = json.loads(json.dumps(old))
        for key, value in new.items():
            section, _, field = key.partition("__")
            cfg[section][field] = value
        return check_resume(old, cfg, phases)

    searching = {"search": {"done": False}}
    assert changed(searching, search__lr=0.01) == {"search.lr": (0.1, 0.01)}  # lower lr after a divergence
    assert changed(searching, finetune__iters=8) == {"finetune.iters": (4, 8)}  # not started yet
    with pytest.raises(FnaError, match=r"search.epochs \(search has started; of its settings only search.lr"):
        changed(searching, search__epochs=3)
    tuning = {"search": {"done": True}, "remap": {"done": True}, "finetune": {"done": False}}
    assert changed(tuning, finetune__lr=0.01) == {"finetune.lr": (0.1, 0.01)}
    assert changed(tuning, eval__flip=True) == {"eval.flip": (False, True)}
    with pytest.raises(FnaError, match=r"search.lr \(search is done\)"):
        changed(tuning, search__lr=0.01)
    assert check_resume(old, {**old, "device": "cpu"}, tuning) == {"device": ("auto", "cpu")}


def test_resume_after_a_kill_may_lower_the_fine_tune_lr_and_records_the_change(data, tmp_path, mbv2_seed, one_thread):
    cfg = _config(data, arch="mobilenet_v2")
    _kill(cfg, tmp_path / "run", "fine-tune:3")
    summary = run(_config(data, "finetune.lr=0.0001", arch="mobilenet_v2"), tmp_path / "run", resume=True)
    assert summary["phases"]["finetune"]["done"]
    change = json.loads((tmp_path / "run" / "config_changes.jsonl").read_text().splitlines()[-1])
    assert change["changed"] == {"finetune.lr": [None, 0.0001]} and change["done"] == ["remap"]  # None: the recipe's
    assert "lr: 0.0001" in (tmp_path / "run" / "config.yaml").read_text()


def test_out_naming_a_file_or_a_foreign_folder_is_a_clear_error(data, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FnaError, match="--out names a file"):
        run(_config(data, arch="mobilenet_v2"), tmp_path / "file")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    with pytest.raises(FnaError, match="exists and is not a run directory"):
        run(_config(data, arch="mobilenet_v2"), tmp_path / "folder")


def test_progress_is_printed_as_plain_lines_when_stdout_is_not_a_terminal(data, tmp_path, mbv2_seed):
    env = {**os.environ, "FNA_PROGRESS_INTERVAL": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "fna", "train", "--task", "seg", "--data", str(data), "--format",
                          "folder", "--arch", "mobilenet_v2", "--out", str(tmp_path / "run"), *TINY],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("fine-tune ") and "it/s" in line]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert re.fullmatch(r"fine-tune 1/4 loss \d+\.\d{4} \d+\.\d\d it/s ETA \d+m?\d*s", lines[0]), lines[0]


def test_a_run_written_before_a_setting_existed_resumes_with_that_settings_default(data, tmp_path, mbv2_seed,
                                                                                    one_thread):
    cfg = _config(data, arch="mobilenet_v2")
    _kill(cfg, tmp_path / "run", "fine-tune:3")
    config = tmp_path / "run" / "config.yaml"
    written = OmegaConf.to_container(OmegaConf.load(config))
    del written["data"]["augment"]  # as an earlier fna version wrote it
    OmegaConf.save(OmegaConf.create(written), config)
    assert run(_config(data, arch="mobilenet_v2"), tmp_path / "run", resume=True)["phases"]["finetune"]["done"]
    with pytest.raises(FnaError, match=r"data.augment \(finetune is done\)"):  # a real change still is one
        run(_config(data, "data.augment=false", arch="mobilenet_v2"), tmp_path / "run", resume=True)
