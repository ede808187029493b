import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fna.arch import BUILTIN_ARCHS
from fna.backbone import Backbone, Classifier
from fna.cost import conv_madds, count, model_cost

# (task, arch, paper MAdds, paper params): SPEC §6's exact integers for the paper's counted models.
# SSDLite keeps torchvision's predictor convs (bias instead of BN, see fna.tasks.detection.SSDLite):
# +206,040 MAdds and -2,550 params against the paper, the SPEC's measured torchvision figures.
SSDLITE_HEAD_DELTA = (206_040, -2_550)
PAPER_ROWS = [
    ("cls", "mobilenet_v2", 300_774_272, 3_504_872),
    ("seg", "mobilenet_v2", 24_521_711_616, 2_567_507),
    ("seg", "fna_deeplabv3", 24_174_895_104, 2_466_419),
    ("retinanet", "mobilenet_v2", 133_053_449_976, 11_488_244),
    ("retinanet", "fna_retinanet", 133_029_704_376, 11_732_244),
    ("ssdlite", "mobilenet_v2", 808_218_304, 4_322_988),
    ("ssdlite", "fna_ssdlite", 880_333_504, 4_630_316),
]


def _fna_madds(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "fna", "madds", *args, "--json"], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("task,arch,madds,params", PAPER_ROWS, ids=[f"{t}-{a}" for t, a, *_ in PAPER_ROWS])
def test_fna_madds_reproduces_the_paper_table(task, arch, madds, params):
    got = _fna_madds("--task", task, "--arch", arch)
    # The issue asks for 0.5% (2% for SSDLite); our models are the paper's counted models, so exact,
    # but for SSDLite's predictor convs, which differ by a known amount (0.03% / 0.06%).
    if task == "ssdlite":
        madds, params = madds + SSDLITE_HEAD_DELTA[0], params + SSDLITE_HEAD_DELTA[1]
    assert (got["madds"], got["params"]) == (madds, params)


def test_conv_madds_formula_by_hand():
    conv = torch.nn.Conv2d(8, 16, 3, groups=2, bias=True)
    assert conv_madds(conv, (5, 7)) == 3 * 3 * 4 * 16 * 35 + 16 * 35


def test_madds_agree_with_torch_flop_counter():
    model = Classifier(Backbone(BUILTIN_ARCHS["fna_ssdlite"]), 10).eval()
    x = torch.zeros(1, 3, 96, 128)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    # flop_counter counts 2 FLOPs per multiply-add and ignores biases; the model's only bias is the
    # linear layer's, which our convention does not count either.
    assert fc.get_total_flops() == 2 * count(model, x).madds


def test_breakdown_sums_to_total():
    cost = model_cost("retinanet", BUILTIN_ARCHS["mobilenet_v2"], (256, 320), 3)
    assert sum(p["madds"] for p in cost.parts.values()) == cost.madds
    assert sum(p["params"] for p in cost.parts.values()) == cost.params
    assert set(cost.parts) == {"backbone", "neck", "head"}


def test_size_and_classes_change_the_count():
    base = model_cost("seg", BUILTIN_ARCHS["mobilenet_v2"], (512, 1024), 19)
    assert model_cost("seg", BUILTIN_ARCHS["mobilenet_v2"], (512, 1024), 21).params == base.params + 2 * 257
