"""`fna eval` and the pipeline on splits that cannot define the metric or whose classes differ from the model's."""

import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fna.cli import app, class_mismatch
from fna.data.demo import write_demo
from fna.errors import FnaError
from fna.pipeline import load_config, run

TINY = ["finetune.iters=2", "finetune.batch_size=2", "size=[64,64]"]


def _edit_val(root, edit) -> None:
    path = root / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The demo dataset (5 classes) and variants: val without boxes, renamed classes, 3 classes."""
    base = tmp_path_factory.mktemp("demo")
    write_demo(base, n_train=4, n_val=2, size=64, seed=2)
    roots = {"demo": base}
    for name, edit in [
        ("no_boxes", lambda d: d.update(annotations=[])),
        ("renamed", lambda d: d["categories"][1].update(name="square")),
        ("three", lambda d: d.update(categories=d["categories"][:3],
                                     annotations=[a for a in d["annotations"] if a["category_id"] <= 3])),
    ]:
        roots[name] = tmp_path_factory.mktemp(name) / "data"
        shutil.copytree(base, roots[name])
        _edit_val(roots[name], edit)
    return roots


@pytest.fixture(scope="module")
def no_boxes_run(data, tmp_path_factory):
    """An ssdlite run (random init, 2 steps) trained on the demo and evaluated on a val split without boxes."""
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = load_config(None, TINY, task="ssdlite", data={"root": str(data["no_boxes"]), "format": "coco"},
                      arch="mobilenet_v2", init="random")
    return out, run(cfg, out)


def fna(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fna", *map(str, args)], capture_output=True, text=True)


def test_run_on_a_val_split_without_boxes_records_an_undefined_metric(no_boxes_run):
    out, summary = no_boxes_run
    assert summary["metric"] is None and summary["metric_name"] == "AP"
    assert json.loads((out / "metrics.json").read_text())["AP"] is None
    assert json.loads((out / "summary.json").read_text())["metric"] is None
    assert "AP" in (out / "report.html").read_text()


def test_eval_prints_undefined_ap_for_a_split_without_boxes(no_boxes_run, data):
    out, _ = no_boxes_run
    shown = CliRunner().invoke(app, ["eval", str(out / "model.fna.pt"), "--data", str(data["no_boxes"]),
                                     "--format", "coco"])
    assert shown.exit_code == 0, shown.output
    assert "AP: undefined: the split has no annotated boxes" in shown.stdout.splitlines()


def test_eval_warns_on_stderr_when_class_names_differ(no_boxes_run, data):
    renamed = CliRunner().invoke(app, ["eval", str(no_boxes_run[0] / "model.fna.pt"), "--data",
                                       str(data["renamed"]), "--format", "coco", "--json"])
    assert renamed.exit_code == 0, renamed.output
    assert "warning: class names differ" in renamed.stderr
    assert "1: model 'rectangle', dataset 'square'" in renamed.stderr.replace("\n", "")
    assert json.loads(renamed.stdout)["AP"] is not None  # stdout stays pure JSON


def test_eval_on_a_dataset_with_another_class_count_is_one_line_error(no_boxes_run, data):
    fewer = fna("eval", no_boxes_run[0] / "model.fna.pt", "--data", data["three"], "--format", "coco")
    assert fewer.returncode == 1 and "Traceback" not in fewer.stderr
    assert "the dataset has 3 classes (circle, rectangle, triangle) but the model" in fewer.stderr
    assert "trained on 5" in fewer.stderr and len(fewer.stderr.strip().splitlines()) == 1


def test_class_mismatch_rules():
    assert class_mismatch(("a", "b"), ("a", "b"), "m.pt", "d") == []
    (line,) = class_mismatch(("a", "b", "c"), ("a", "B", "x"), "m.pt", "d")
    assert "1: model 'b', dataset 'B'; 2: model 'c', dataset 'x'" in line
    with pytest.raises(FnaError, match=r"d: the dataset has 1 classes \(a\) but the model m\.pt was trained on 2"):
        class_mismatch(("a", "b"), ("a",), "m.pt", "d")


def test_pareto_set_on_a_val_split_without_boxes_is_refused_before_the_search(data, tmp_path):
    from fna.pareto import pareto_search
    from fna.pipeline import eval_dataset
    from fna.search import SearchConfig, SearchError

    val = eval_dataset("ssdlite", data["no_boxes"], "coco", "val")
    with pytest.raises(SearchError, match="no annotated boxes: a Pareto set cannot be scored"):
        pareto_search(SearchConfig.for_task("ssdlite"), ["0.5x", "1x"], val, None, val, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_ssdlite_size_must_be_square():
    with pytest.raises(FnaError, match=r"SSDLite runs at S×S: give size=\[S,S\], got \[64, 96\]"):
        load_config(None, ["size=[64,96]"], task="ssdlite", data={"root": "x", "format": "coco"})
