"""What a run directory records is what was built and run, so `fna load` rebuilds the same network."""

import json

import torch
import torchvision
from torch import nn

import fna
from fna.data.demo import write_demo
from fna.pipeline import load_config, run


def test_model_file_records_the_architecture_as_built_with_the_seeds_activation(tmp_path, one_thread):
    # MNASNet's layers use ReLU; the architecture file says relu6. The remapped target takes the seed's
    # activation, and the model file must say so, or `fna load` rebuilds another network.
    write_demo(tmp_path / "data", n_train=4, n_val=2, size=64, seed=1)
    torch.save(torchvision.models.mnasnet1_0().state_dict(), tmp_path / "mnasnet.pth")
    cfg = load_config(None, ["size=[48,48]", "finetune.iters=2", "finetune.batch_size=2"], task="seg",
                      data={"root": str(tmp_path / "data"), "format": "folder"}, arch="mobilenet_v2",
                      seed="mnasnet1_0", seed_weights=str(tmp_path / "mnasnet.pth"))
    summary = run(cfg, tmp_path / "run")
    model, info = fna.load(tmp_path / "run" / "model.fna.pt")
    assert info.arch.activation == "relu" and summary["arch"]["activation"] == "relu"
    acts = {type(m) for m in model.backbone.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))}
    assert acts == {nn.ReLU}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["mIoU"] == summary["metric"]
    from fna.evaluate import evaluate_segmentation
    from fna.pipeline import eval_dataset

    val = eval_dataset("seg", tmp_path / "data", "folder", "val")
    again = evaluate_segmentation(model, val, info.num_classes, tuple(info.class_names))
    assert abs(again["mIoU"] - summary["metric"]) < 1e-9
