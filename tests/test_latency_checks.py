"""A latency table measured with other settings than the search's is rejected, naming what differs.

Tiny seed and space at tiny sizes with few repeats: the tests check the table's recorded settings,
never how long anything takes.
"""

import pytest
from search_helpers import SegData, seg_collate, tiny_seed, tiny_seed_arch, tiny_space

from fna.arch import Arch, save_arch
from fna.latency import LatencySettings, build_table
from fna.search import Search, SearchConfig, SearchError

FAST = dict(warmup=1, repeats=3)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions on a shared 2-core machine


@pytest.fixture
def seed_file(tmp_path):
    save_arch(tiny_seed_arch(), tmp_path / "tiny.json")
    return str(tmp_path / "tiny.json")


def _table(tmp_path, seed: str, size=(32, 32), classes=3, space=None) -> str:
    settings = LatencySettings("seg", size, "cpu", "torch", 1, (space or tiny_space()).to_dict(), seed, classes)
    out = tmp_path / f"lut_{size[0]}x{size[1]}_{classes}.json"
    build_table(settings, out, **FAST)
    return str(out)


def _search(tmp_path, lut: str, **overrides) -> Search:
    base = dict(space=tiny_space().to_dict(), num_classes=3, cost_size=(32, 32), epochs=2, arch_start_epoch=1,
                batch_size=2, warmup_iters=0, progress=False, tensorboard=False, device="cpu", latency_table=lut)
    return Search(SearchConfig.for_task("seg", **{**base, **overrides}), SegData(8, 32), seg_collate,
                  tmp_path / "run", seed=tiny_seed())


def test_table_of_another_input_size_and_class_count_names_both(tmp_path, seed_file):
    lut = _table(tmp_path, seed_file, size=(48, 48), classes=5)
    with pytest.raises(SearchError) as e:
        _search(tmp_path, lut)
    message = str(e.value)
    assert "does not fit this search" in message and lut in message
    assert "input size 48×48 in the table, 32×32 in the search (cost_size)" in message
    assert "5 classes in the table, 3 in the search" in message


def test_search_with_the_table_settings_accepts_it(tmp_path, seed_file):
    lut = _table(tmp_path, seed_file, size=(48, 48), classes=5)
    search = _search(tmp_path, lut, cost_size=(48, 48), num_classes=5)
    assert search.table.unit == "ms"


def test_search_without_cost_size_compares_against_the_paper_size(tmp_path, seed_file):
    lut = _table(tmp_path, seed_file)
    with pytest.raises(SearchError, match=r"input size 32×32 in the table, 1024×2048 in the search"):
        _search(tmp_path, lut, cost_size=None)


def test_table_of_another_seed_architecture_is_rejected(tmp_path):
    other = tiny_seed_arch().to_dict()
    other["final_channels"] = 40
    other["name"] = "wider_tiny"
    save_arch(Arch.from_dict(other), tmp_path / "wider.json")
    lut = _table(tmp_path, str(tmp_path / "wider.json"))
    with pytest.raises(SearchError, match=r"another seed architecture in the table than the search's \(tiny\)"):
        _search(tmp_path, lut)


def test_table_of_another_search_space_is_rejected(tmp_path, seed_file):
    lut = _table(tmp_path, seed_file, space=tiny_space(allow_skip=False))
    with pytest.raises(SearchError, match=r"search space 'tiny' has other stages than the search's 'tiny'"):
        _search(tmp_path, lut)
