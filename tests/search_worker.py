"""Run by ``torchrun --nproc_per_node=2`` in tests/test_search.py: a tiny search, every rank writing its α."""

import sys

from search_helpers import SegData, seg_collate, tiny_seed, tiny_space

from fna.search import SearchConfig, search

if __name__ == "__main__":
    config = SearchConfig.for_task("seg", space=tiny_space().to_dict(), num_classes=3, cost_size=(64, 64), epochs=2,
                                   arch_start_epoch=1, batch_size=4, lr=0.01, warmup_iters=0, progress=False,
                                   tensorboard=False, device="cpu", debug_rank_files=True)
    search(config, SegData(16), seg_collate, sys.argv[1], seed=tiny_seed())
