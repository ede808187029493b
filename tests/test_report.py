"""The run report: plots and both pages from a real tiny search plus the files the pipeline writes."""

import base64
import json
import re
import shutil

import pytest
import torch
from PIL import Image
from search_helpers import SegData, seg_collate, tiny_seed, tiny_seed_arch, tiny_space
from typer.testing import CliRunner

from fna.arch import save_arch
from fna.cli import app
from fna.data.demo import write_demo
from fna.pipeline import load_config, run
from fna.remap import remap_seed
from fna.report import PLOTS, write_report
from fna.search import SearchConfig, search

pytestmark = pytest.mark.usefixtures("one_thread")
LEDGER = {"search": {"seconds": 123.456, "device": "cpu (2 threads)", "done": True},
          "remap": {"seconds": 0.812, "device": "cpu (2 threads)", "done": True},
          "finetune": {"seconds": 456.789, "device": "cpu (2 threads)", "done": True},
          "eval": {"seconds": 7.25, "device": "cpu (2 threads)", "done": True}}
METRICS = {"mIoU": 0.4321, "pixel_accuracy": 0.8765, "per_class_iou": {"background": 0.9, "disc": None}}


def _finish_run(root, arch, with_search: bool) -> None:
    """The files the pipeline writes after the search, in its formats (summary as in ``pipeline._summary``)."""
    save_arch(arch, root / "arch.json")
    (root / "config.yaml").write_text("task: seg\nseed: mobilenet_v2\ninit: remap\n")
    _, remap = remap_seed(tiny_seed(), arch)
    (root / "remap_report.json").write_text(json.dumps(remap.to_dict()))
    (root / "remap_report.md").write_text(remap.to_markdown())
    (root / "metrics.json").write_text(json.dumps(METRICS, indent=2))
    ledger = LEDGER if with_search else {k: v for k, v in LEDGER.items() if k != "search"}
    (root / "ledger.json").write_text(json.dumps(ledger, indent=2))
    (root / "summary.json").write_text(json.dumps({
        "task": "seg", "arch": arch.to_dict(), "net_config": arch.to_net_config(), "metric_name": "mIoU",
        "metric": METRICS["mIoU"], "metrics": METRICS, "madds_paper_size": 1_234_567_890, "paper_size": [1024, 2048],
        "madds_data": 45_678_901, "data_size": [64, 64], "params": 2_345_678, "init": "remap", "phases": ledger,
        "latency_ms": 3.21}, indent=2))


@pytest.fixture(scope="module")
def adapt_dir(tmp_path_factory):
    """A run directory of `fna adapt`: a real tiny budgeted search (so λ moves) and the later phases' files."""
    root = tmp_path_factory.mktemp("adapt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the autouse one-thread fixture does not reach module fixtures
    cfg = SearchConfig.for_task("seg", space=tiny_space().to_dict(), num_classes=3, cost_size=(64, 64), epochs=3,
                                arch_start_epoch=1, batch_size=2, lr=0.01, warmup_iters=0, progress=False,
                                tensorboard=False, device="cpu", arch_lr=0.05, budget_madds=6.6e6)
    result = search(cfg, SegData(8), seg_collate, root / "search", seed=tiny_seed())
    _finish_run(root, result.arch, with_search=True)
    torch.set_num_threads(threads)
    write_report(root, tiny_seed_arch())
    return root


def test_report_embeds_every_plot_and_shows_metrics_and_ledger(adapt_dir):
    page = (adapt_dir / "report.html").read_text()
    for name in PLOTS:
        data = base64.b64encode((adapt_dir / "report" / name).read_bytes()).decode()
        assert f'src="data:image/png;base64,{data}"' in page
    assert not re.search(r'(src|href)="https?://|<link|<script', page)  # nothing external
    for text in ("0.4321", "0.8765", "1.235 G", "0.046 G", "2.346 M", "3.21 ms", "1024×2048"):
        assert text in page
    for text in ("123.5", "456.8", "7.2", "cpu (2 threads)", "search ÷ fine-tune = 0.27"):
        assert text in page
    assert "inherited" in page.lower() and 'href="remap_report.md"' in page


def test_markdown_links_the_plots_and_holds_the_same_tables(adapt_dir):
    md = (adapt_dir / "report.md").read_text()
    assert all(f"](report/{name})" in md for name in PLOTS)
    assert "| mIoU | 0.4321 |" in md and "| search | 123.5 | cpu (2 threads) | yes |" in md
    assert "| disc | — |" in md
    assert "[Full per-layer remap report: remap_report.md](remap_report.md)" in md


@pytest.mark.parametrize("name", PLOTS)
def test_plots_are_real_images(adapt_dir, name):
    with Image.open(adapt_dir / "report" / name) as im:
        im.verify()
    with Image.open(adapt_dir / "report" / name) as im:
        assert im.format == "PNG" and im.width >= 400 and im.height >= 200
        lo, hi = im.convert("L").getextrema()
        assert lo != hi  # something is drawn


def test_run_without_search_still_reports(adapt_dir, tmp_path):
    root = tmp_path / "train"
    root.mkdir()
    _finish_run(root, tiny_seed_arch(), with_search=False)
    md_path, html_path = write_report(root)
    assert {p.name for p in (root / "report").iterdir()} == {"arch.png"}
    page, md = html_path.read_text(), md_path.read_text()
    assert "Architecture search" not in md and "search ÷ fine-tune" not in md
    assert "0.4321" in page and "456.8" in page and page.count("data:image/png;base64,") == 1


def test_missing_or_broken_files_never_fail_the_report(tmp_path):
    (tmp_path / "metrics.json").write_text("{ truncated")
    md_path, html_path = write_report(tmp_path)
    md = md_path.read_text()
    assert "Could not read metrics.json" in md and "No metrics yet" in md and "No architecture recorded" in md
    assert html_path.is_file() and not any((tmp_path / "report").iterdir())


def test_rewriting_a_report_drops_plots_of_phases_that_are_gone(adapt_dir, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(adapt_dir, root)
    shutil.rmtree(root / "search")
    write_report(root)
    assert {p.name for p in (root / "report").iterdir()} == {"arch.png"}


def test_cli_report_writes_both_pages(adapt_dir, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(adapt_dir, root)
    (root / "report.html").unlink()
    result = CliRunner().invoke(app, ["report", str(root)])
    assert result.exit_code == 0, result.output
    assert (root / "report.html").is_file() and "report.html" in result.output


def test_pipeline_run_ends_with_the_report(tmp_path, mbv2_seed):
    write_demo(tmp_path / "data", n_train=4, n_val=2, size=48, seed=1)
    cfg = load_config(None, ["finetune.iters=1", "finetune.batch_size=2", "size=[48,48]"], task="seg",
                      arch="mobilenet_v2", data={"root": str(tmp_path / "data"), "format": "folder"})
    summary = run(cfg, tmp_path / "run")
    page = (tmp_path / "run" / "report.html").read_text()
    assert f"{summary['metric']:.4f}" in page and "finetune" in page
    assert (tmp_path / "run" / "report" / "arch.png").is_file()


def test_report_says_whether_the_search_decided_anything(adapt_dir):
    d = json.loads((adapt_dir / "search" / "diagnostics.json").read_text())
    html = (adapt_dir / "report.html").read_text()
    assert "Did the search decide?" in html and d["summary"].split(";")[0] in html
    assert html.count("<tr>") >= len(d["layers"])  # one row per searched layer
