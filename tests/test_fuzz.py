"""Every generated architecture file, net_config text, COCO split and segmentation folder either works,
consistently, or stops with one clear FnaError line, never another exception. Derandomized, so each run
draws the same inputs; ``bench/soak.py`` draws many more with a random seed. The inputs the soak found
breaking that rule are kept below as plain cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from fna.arch import Arch
from fna.data import open_segmentation
from fna.errors import FnaError
from fuzz_inputs import (KINDS, CocoCase, SegCase, check_arch_file, check_arch_object, check_coco, check_net_config,
                         check_seg, crafted_png, encode, outcome)

FAST = settings(derandomize=True, max_examples=80, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_generated_input_works_or_is_one_clear_error(kind):
    strategy, check = KINDS[kind]

    @FAST
    @given(strategy)
    def run(value):
        outcome(check, value)

    run()


STAGE = {"c_in": 32, "c_out": 16, "stride": 1, "ops": ["k3_e1"]}
HUGE = "9" * 5000


@pytest.mark.parametrize("data", [
    b"[3]\xc3",  # not UTF-8
    b'{"stages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # deeper than json.loads recurses
    b'{"stages": [{"c_in": ' + HUGE.encode() + b', "c_out": 16, "stride": 1, "ops": ["k3_e1"]}]}',  # > 4300 digits
    f"[[32, 16], ['k{HUGE}_e1'], 1]".encode(),  # an op whose kernel has > 4300 digits
])
def test_unreadable_architecture_files_are_one_arch_error(data):
    assert outcome(check_arch_file, data) == "error"


@pytest.mark.parametrize("arch", [
    {"stages": [{**STAGE, "c_in": HUGE}], "stem_channels": 32},
    {"stages": [STAGE], "name": {"x": 1}},  # loaded, but not a name
])
def test_architecture_values_python_cannot_use_are_one_arch_error(arch):
    assert outcome(check_arch_object, arch) == "error"


def test_a_null_architecture_name_is_no_name():
    assert Arch.from_dict({"stages": [STAGE], "name": None}).name == ""
    assert outcome(check_net_config, b"[[32, 16], ['k3_e1'], 1]|[[16, 24], ['k3_e6', 'skip'], 2]") == "ok"


def _coco(images: list, annotations: object = (), categories: list | None = None, files: dict | None = None,
          skip_bad: bool = False) -> CocoCase:
    doc = {"images": images, "categories": [{"id": 1, "name": "cat"}] if categories is None else categories}
    if annotations != ():
        doc["annotations"] = annotations
    return CocoCase(json.dumps(doc).encode(), files or {}, skip_bad)


PNG_4x4 = encode(np.zeros((4, 4), np.uint8), "L", "PNG")
IMAGE = {"id": 1, "file_name": "a.png", "width": 4, "height": 4}


@pytest.mark.parametrize("case", [
    _coco([{**IMAGE, "file_name": "x" * 300}]),  # longer than a file name may be
    _coco([{**IMAGE, "file_name": "x" * 300}], skip_bad=True),
    _coco([IMAGE], None, files={"a.png": PNG_4x4}),  # "annotations": null
    _coco([IMAGE], [5], files={"a.png": PNG_4x4}),  # an annotation that is not an object
    _coco([IMAGE], [5], files={"a.png": PNG_4x4}, skip_bad=True),
    _coco([{**IMAGE, "width": float("inf")}], files={"a.png": PNG_4x4}),  # 1e400 in the file
    _coco([IMAGE], [{"image_id": float("inf"), "category_id": 1, "bbox": [0, 0, 1, 1]}], files={"a.png": PNG_4x4}),
    _coco([IMAGE], categories=[{"id": float("inf"), "name": "cat"}], files={"a.png": PNG_4x4}),
    _coco([IMAGE], categories=[{"id": 1, "name": "cat"}, {"id": 1, "name": "dog"}], files={"a.png": PNG_4x4}),
    _coco([IMAGE, {**IMAGE, "file_name": "b.png"}], files={"a.png": PNG_4x4, "b.png": PNG_4x4}),  # one id twice
    _coco([{**IMAGE, "file_name": "a\nb\x0c.png"}]),  # the message names it on one line
    _coco([{**IMAGE, "file_name": "a\nb\x0c.png"}, {**IMAGE, "id": 2}], files={"a.png": PNG_4x4}, skip_bad=True),
    CocoCase(b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    CocoCase(b'{"images": [], "categories": [], "annotations": [{"id": ' + HUGE.encode() + b"}]}"),
])
def test_coco_files_python_cannot_read_are_one_data_error(case):
    assert outcome(check_coco, case) in ("error", "ok")  # ok: --skip-bad left the bad entry out
    if not case.skip_bad:
        assert outcome(check_coco, case) == "error"


def _folder(image: bytes, mask: bytes, classes: bytes = b"bg\nfg\n", **kw) -> SegCase:
    return SegCase({"classes.txt": classes, "images/train/a.png": image, "masks/train/a.png": mask}, num_classes=2,
                   **kw)


BOMB = crafted_png(65535, 65535, 8, 0, b"")  # a 26-byte file claiming 4.3 G pixels


@pytest.mark.parametrize("case", [
    _folder(PNG_4x4, PNG_4x4, classes=b"\xa8\xee\n"),  # classes.txt not UTF-8
    _folder(BOMB, PNG_4x4),
    _folder(PNG_4x4, BOMB),
    _folder(PNG_4x4, encode(np.full((4, 4), 1.5), "F", "TIFF")),  # float ids that are not whole numbers
    _folder(PNG_4x4, encode(np.full((4, 4), np.nan), "F", "TIFF")),
])
def test_folders_python_cannot_read_are_one_data_error(case):
    assert outcome(check_seg, case) == "error"


def test_a_float_mask_of_whole_numbers_loads_its_ids():
    ids = np.array([[0, 1, 255, 1]] * 4)
    case = _folder(PNG_4x4, encode(ids.astype(np.float32), "F", "TIFF"), expected={"a": ids})
    assert outcome(check_seg, case) == "ok"


def test_a_split_file_that_is_not_utf8_is_one_data_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "classes.txt").write_text("bg\nfg\n")
    (tmp_path / "val.txt").write_bytes(b"a\xff\n")
    with pytest.raises(FnaError, match=r"val\.txt: split file is not UTF-8 text"):
        open_segmentation(tmp_path, "folder", "val")


def test_a_run_killed_while_writing_its_first_config_resumes(tmp_path, mbv2_seed, one_thread):
    from fna.data.demo import write_demo
    from fna.pipeline import load_config, run

    write_demo(tmp_path / "data", n_train=4, n_val=2, size=64, seed=1)
    cfg = load_config(None, ["size=[48,48]", "finetune.iters=1", "finetune.batch_size=2"], task="seg",
                      arch="mobilenet_v2", data={"root": str(tmp_path / "data"), "format": "folder"})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".config.yaml.0123abcd.tmp").write_text("task: se")  # what the killed write left
    assert run(cfg, tmp_path / "run", resume=True)["phases"]["eval"]["done"]
