import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from fna.seeds import SEEDS, SeedError, find_weights, load_seed


def test_our_mobilenet_v2_gives_torchvision_logits(mbv2_seed):
    ours = mbv2_seed.classifier()
    ref = torchvision.models.mobilenet_v2()
    ref.load_state_dict(torch.load(mbv2_seed.weights_path, weights_only=True))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - ref.eval()(x)).abs().max() <= 1e-4


def test_seed_classifies_chelsea_as_a_cat(mbv2_seed):
    from skimage.data import chelsea

    preprocess = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    image = torch.from_numpy(np.ascontiguousarray(chelsea())).permute(2, 0, 1)
    with torch.no_grad():
        top = mbv2_seed.classifier()(preprocess(image)[None]).argmax(1).item()
    assert 281 <= top <= 285


def _file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_seed_provenance_names_the_seed_its_weights_file_and_that_files_sha256(mbv2_seed):
    path = find_weights(SEEDS["mobilenet_v2"])
    digest = _file_sha256(path)
    assert digest == SEEDS["mobilenet_v2"].sha256  # the shipped file is the published one
    assert mbv2_seed.provenance == {"seed": "mobilenet_v2", "weights": str(path), "sha256": digest}


def test_provenance_of_a_user_weights_file_is_that_files_own_hash(tmp_path):
    own = tmp_path / "my_mbv2.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), own)
    seed = load_seed("mobilenet_v2", own)
    assert seed.provenance == {"seed": "mobilenet_v2", "weights": str(own), "sha256": _file_sha256(own)}
    assert seed.provenance["sha256"] != SEEDS["mobilenet_v2"].sha256


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(SeedError, match="not found"):
        load_seed("mobilenet_v2", tmp_path / "nope.pth")


def test_truncated_weights_file_is_a_clear_error(mbv2_seed, tmp_path):
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(open(mbv2_seed.weights_path, "rb").read()[:100_000])
    with pytest.raises(SeedError, match="truncated.pth: not a readable PyTorch weights file"):
        load_seed("mobilenet_v2", bad)


def test_file_whose_name_claims_another_hash_is_rejected(mbv2_seed, tmp_path):
    fake = tmp_path / "mobilenet_v2-deadbeef.pth"
    fake.write_bytes(open(mbv2_seed.weights_path, "rb").read())
    with pytest.raises(SeedError, match="does not match the prefix deadbeef"):
        load_seed("mobilenet_v2", fake)


def test_weights_of_another_network_are_rejected(tmp_path):
    other = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    with pytest.raises(SeedError, match="do not fit seed 'mobilenet_v2'"):
        load_seed("mobilenet_v2", other)


def test_user_file_with_the_seed_layout_is_accepted(tmp_path):
    own = tmp_path / "my_mbv2.pth"
    model = torchvision.models.mobilenet_v2()
    torch.save(model.state_dict(), own)
    seed = load_seed("mobilenet_v2", own)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(seed.classifier()(x), model.eval()(x))


def test_unknown_seed_name_is_rejected():
    with pytest.raises(SeedError, match="unknown seed"):
        load_seed("vgg16")
