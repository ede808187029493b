"""`fna demo` (what `make demo` runs), at a tiny scale: every step, the summary and a resume."""

from __future__ import annotations

import json

import pytest

from fna.demo import DEMO_DATA, DEMO_TASKS, VARIANTS, run_demo, run_overrides
from fna.pipeline import load_config

SCALE = 0.01  # 20 train / 1 val image(s), 8 fine-tuning steps per variant, the demo's search epochs


def test_run_overrides_are_valid_settings_of_every_task(tmp_path):
    for task, spec in DEMO_TASKS.items():
        cfg = load_config(None, run_overrides(task, 1.0, search=True, budget=1e8), task=task,
                          data={"root": str(tmp_path), "format": spec["format"]})
        assert cfg.data.augment is False
        assert cfg.train_config().iters == spec["finetune"]["iters"]
        search = cfg.search_config(3, tuple(spec["size"]))
        assert (search.epochs, search.arch_start_epoch, search.budget_madds) == (
            spec["search"]["epochs"], spec["search"]["arch_start_epoch"], 1e8)


def test_scale_multiplies_fine_tuning_steps_but_not_search_epochs(tmp_path):
    cfg = load_config(None, run_overrides("seg", 0.5, search=True), task="seg",
                      data={"root": str(tmp_path), "format": "folder"})
    assert cfg.train_config().iters == round(DEMO_TASKS["seg"]["finetune"]["iters"] * 0.5)
    assert cfg.search_config(3, (96, 96)).epochs == DEMO_TASKS["seg"]["search"]["epochs"]


@pytest.mark.usefixtures("one_thread")
def test_demo_runs_every_task_and_variant_and_resumes(tmp_path, mbv2_seed):
    summary = run_demo(tmp_path, scale=SCALE)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["rows"] == summary["rows"]
    assert [(r["task"], r["variant"]) for r in summary["rows"]] == [
        (task, variant) for task in DEMO_TASKS for variant in VARIANTS]
    assert summary["seed_check"]["top3"][0]["name"] == "Egyptian cat"
    exact = [r for r in summary["madds"] if r["task"] != "ssdlite"]  # SSDLite's head differs (tasks/ssdlite.py)
    assert exact and all((r["madds"], r["params"]) == (r["paper_madds"], r["paper_params"]) for r in exact)
    data_images = sorted((tmp_path / "data" / "images" / "train").glob("*.png"))
    assert len(data_images) == round(DEMO_DATA["n_train"] * SCALE)
    for row in summary["rows"]:
        run_dir = tmp_path / row["task"] / row["variant"]
        assert (run_dir / "report.html").exists()
        run_summary = json.loads((run_dir / "summary.json").read_text())
        assert row["metric"] == run_summary["metric"]
        assert (row["search_over_finetune"] is None) == (row["variant"] != "fna")
    for task in DEMO_TASKS:  # (c) is (b)'s architecture from random weights; (a) is the seed
        found = json.loads((tmp_path / task / "fna" / "summary.json").read_text())["arch"]
        assert json.loads((tmp_path / task / "random" / "summary.json").read_text())["arch"] == found
        assert json.loads((tmp_path / task / "random" / "summary.json").read_text())["init"] == "random"
    # a resumed demo reuses every finished run: same rows, same metrics
    again = run_demo(tmp_path, scale=SCALE, resume=True)
    assert [(r["task"], r["variant"], r["metric"]) for r in again["rows"]] == [
        (r["task"], r["variant"], r["metric"]) for r in summary["rows"]]
