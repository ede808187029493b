import json
import os
import subprocess
import sys

import pytest

from fna.arch import BUILTIN_ARCHS
from fna.errors import FnaError


def fna(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fna", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args,message", [
    (("madds", "--arch", "resnet_9000"), "unknown architecture 'resnet_9000'"),
    (("madds", "--task", "pose"), "unknown task 'pose'"),
    (("import-fna", "no_such.pth", "--task", "seg", "--out", "m.pt"), "no_such.pth: checkpoint not found"),
])
def test_bad_input_is_one_line_without_traceback(args, message):
    out = fna(*args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_malformed_arch_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{ not json")
    out = fna("madds", "--arch", str(bad))
    assert out.returncode == 1 and "broken.json: malformed JSON" in out.stderr and "Traceback" not in out.stderr


def test_madds_reads_a_net_config_file(tmp_path):
    path = tmp_path / "net.txt"
    path.write_text("[[32, 16], ['k3_e1'], 1]|[[16, 24], ['k3_e6', 'k3_e6'], 2]|[[24, 32], ['k5_e3'], 2]")
    out = fna("madds", "--arch", str(path), "--task", "cls", "--size", "32", "32", "--classes", "10", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["classes"] == 10 and result["size"] == [32, 32] and result["params"] > 0


@pytest.mark.parametrize("arch,message", [
    ({"stages": [{"c_in": 32, "c_out": 16, "stride": 1, "ops": ["k3_e1"]},
                 {"c_in": 16, "c_out": 0, "stride": 2, "ops": ["k3_e6"]}]},
     "stage 1 (16->0): c_out must be >= 1, got 0"),
    ({"stem_stride": 0, "stages": [{"c_in": 32, "c_out": 16, "stride": 1, "ops": ["k3_e1"]}]},
     "stem_stride must be 1 or 2, got 0"),
    ({"in_channels": 1, "stages": [{"c_in": 32, "c_out": 16, "stride": 1, "ops": ["k3_e1"]}]},
     "in_channels 1: only 3 (RGB) is supported"),
    ({"final_channels": -5, "stages": [{"c_in": 32, "c_out": 16, "stride": 1, "ops": ["k3_e1"]}]},
     "final_channels (0: no final 1x1 conv) must be >= 0, got -5"),
])
def test_madds_on_an_arch_with_invalid_numbers_is_one_line_naming_the_file(tmp_path, arch, message):
    path = tmp_path / "bad_arch.json"
    path.write_text(json.dumps(arch))
    out = fna("madds", "--arch", str(path), "--size", "64", "64")
    assert out.returncode == 1
    assert f"bad_arch.json: {message}" in out.stderr.replace("\n", "")
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_madds_on_a_net_config_with_fractional_channels_is_one_line(tmp_path):
    path = tmp_path / "net.txt"
    path.write_text("[[32, 16], ['k3_e1'], 1]|[[16, 24.5], ['k3_e6'], 2]")
    out = fna("madds", "--arch", str(path), "--size", "64", "64")
    assert out.returncode == 1 and "net.txt: net_config entry 1 c_out must be a whole number, got 24.5" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("folder", ["ds[v2]", "odd[/]name", "x[bold]y"])
def test_error_messages_print_paths_with_brackets_literally(tmp_path, folder):
    path = tmp_path / folder / "arch.json"
    out = fna("madds", "--arch", str(path))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"error: unknown architecture '{path}': not a built-in " \
                                 f"({', '.join(BUILTIN_ARCHS)}) and no such file"


def test_net_config_hint_keeps_its_brackets(tmp_path):
    path = tmp_path / "net.txt"
    path.write_text("[[32, 16], ['k3_e1']]")
    out = fna("madds", "--arch", str(path))
    assert out.returncode == 1 and "is not '[[c_in, c_out], [ops...], stride]'" in out.stderr


def test_success_output_prints_paths_with_brackets_literally(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fna", "data", "make-demo", str(tmp_path / "ds[v2]" / "a[/]b"),
                          "--train", "1", "--val", "1", "--size", "32"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "1000"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(f"to {tmp_path / 'ds[v2]' / 'a[/]b'}")


TINY_SEARCH = ["epochs=2", "arch_start_epoch=1", "batch_size=2", "warmup_iters=0", "progress=false",
               "tensorboard=false", "space.name=tiny", "space.stages=[" + ",".join(
                   ["{max_depth: 2, kernels: [3], expansions: [3, 6]}"] * 5) + ",{max_depth: 1, kernels: [3], "
                                                                               "expansions: [3]}]"]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from fna.data.demo import write_demo

    root = tmp_path_factory.mktemp("demo")
    write_demo(root, n_train=4, n_val=1, size=64, seed=1)
    return root


def _search(*args: str):
    from typer.testing import CliRunner

    from fna.cli import app

    result = CliRunner().invoke(app, ["search", *map(str, args)])
    return result, " ".join(result.output.split())  # rich wraps at 80 columns


def test_search_size_sets_the_size_costs_and_budget_are_counted_at(demo_data, tmp_path, mbv2_seed):
    result, text = _search("--task", "ssdlite", "--data", demo_data, "--format", "coco", "--out", tmp_path / "s",
                           "--size", "64", "64", *TINY_SEARCH)
    assert result.exit_code == 0, result.output
    assert "costs and budget counted at 64×64 (val split, the network's input for its first image at --size 64 64" \
        in text
    assert "params at 64×64; wrote" in text


def test_search_cost_size_override_wins_over_size(demo_data, tmp_path, mbv2_seed):
    result, text = _search("--task", "retinanet", "--data", demo_data, "--format", "coco", "--out", tmp_path / "s",
                           "--size", "64", "96", "--budget-madds", "1", *TINY_SEARCH, "cost_size=[80,80]")
    assert "costs and budget counted at 80×80 (cost_size)" in text
    assert "budget 1 MAdds is below the smallest network" in str(result.exception)  # stops before any step


def test_search_without_size_says_it_counts_at_the_paper_size(demo_data, tmp_path, mbv2_seed):
    result, text = _search("--task", "ssdlite", "--data", demo_data, "--format", "coco", "--out", tmp_path / "s",
                           "--budget-madds", "1", *TINY_SEARCH)
    assert "costs and budget counted at 320×320 (the paper's size; --size or cost_size=[H,W] counts them" in text


def test_search_size_for_retinanet_counts_at_the_resized_data(demo_data, tmp_path, mbv2_seed):
    result, text = _search("--task", "retinanet", "--data", demo_data, "--format", "coco", "--out", tmp_path / "s",
                           "--size", "32", "200", "--budget-madds", "1", *TINY_SEARCH)
    assert "costs and budget counted at 32×32 (val split" in text  # 64×64 images, short side to 32


def test_search_finds_a_corrupt_training_image_before_the_first_step(tmp_path, mbv2_seed):
    from fna.data.demo import write_demo

    write_demo(tmp_path / "d", n_train=4, n_val=1, size=64, seed=1)
    bad = sorted((tmp_path / "d" / "images" / "train").glob("*.png"))[2]
    bad.write_bytes(b"not a png")
    result, text = _search("--task", "seg", "--data", tmp_path / "d", "--format", "folder", "--out", tmp_path / "s",
                           "--size", "64", "64", *TINY_SEARCH)
    assert isinstance(result.exception, FnaError)  # fna's main prints it as one line
    assert f"{bad}: unreadable image" in str(result.exception)
    assert not (tmp_path / "s" / "checkpoint.pt").exists()
