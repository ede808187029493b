"""``make demo``: what the pipeline can do today, on the real MobileNetV2 seed, in about a minute on a CPU.

1. Load the ImageNet seed offline and classify scikit-image's ``chelsea`` photo.
2. Count MAdds/params of the seed and the published FNA architectures for the paper's three tasks and
   compare them with the paper's table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fna.arch import BUILTIN_ARCHS
from fna.cost import model_cost
from fna.seeds import load_seed

PAPER = {  # (task, arch): (MAdds, params) — the paper's counted models (SPEC §6)
    ("cls", "mobilenet_v2"): (300_774_272, 3_504_872),
    ("seg", "mobilenet_v2"): (24_521_711_616, 2_567_507),
    ("seg", "fna_deeplabv3"): (24_174_895_104, 2_466_419),
    ("retinanet", "mobilenet_v2"): (133_053_449_976, 11_488_244),
    ("retinanet", "fna_retinanet"): (133_029_704_376, 11_732_244),
    ("ssdlite", "mobilenet_v2"): (808_218_304, 4_322_988),
    ("ssdlite", "fna_ssdlite"): (880_333_504, 4_630_316),
}


def classify_chelsea(console: Console, seed_weights: str | None = None) -> dict:
    """Top-3 ImageNet classes of the seed on scikit-image's cat photo."""
    import torchvision
    from skimage.data import chelsea

    seed = load_seed("mobilenet_v2", seed_weights)
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    image = torch.from_numpy(np.ascontiguousarray(chelsea())).permute(2, 0, 1)
    with torch.no_grad():
        probs = seed.classifier()(weights.transforms()(image)[None]).softmax(1)[0]
    top = probs.topk(3)
    names = weights.meta["categories"]
    rows = [{"class": int(i), "name": names[i], "prob": round(float(p), 4)} for p, i in zip(top.values, top.indices)]
    console.print(f"seed [bold]mobilenet_v2[/] (sha256 {seed.sha256[:12]}…) on chelsea.png: "
                  + ", ".join(f"{r['name']} {r['prob']:.1%}" for r in rows))
    return {"seed": seed.provenance, "top3": rows}


def madds_table(console: Console) -> list[dict]:
    """Our counts of the paper's models next to the paper's numbers."""
    table = Table(title="MAdds / params at the paper's input sizes")
    for col in ("task", "arch", "MAdds", "paper", "params", "paper "):
        table.add_column(col, justify="left" if col in ("task", "arch") else "right")
    rows = []
    for (task, arch), (p_madds, p_params) in PAPER.items():
        cost = model_cost(task, BUILTIN_ARCHS[arch])
        rows.append({"task": task, "arch": arch, "madds": cost.madds, "params": cost.params,
                     "paper_madds": p_madds, "paper_params": p_params})
        ok = "green" if (cost.madds, cost.params) == (p_madds, p_params) else "red"
        table.add_row(task, arch, f"[{ok}]{cost.madds / 1e9:.3f}G", f"{p_madds / 1e9:.3f}G",
                      f"[{ok}]{cost.params / 1e6:.3f}M", f"{p_params / 1e6:.3f}M")
    console.print(table)
    return rows


def run_demo(out: Path, seed_weights: str | None = None) -> dict:
    """Run every demo step and write ``summary.json`` into ``out``."""
    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    summary = {"seed_check": classify_chelsea(console, seed_weights), "madds": madds_table(console)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"summary written to [bold]{out / 'summary.json'}[/]")
    return summary
