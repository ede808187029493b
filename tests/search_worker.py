"""Run by ``torchrun --nproc_per_node=2`` in tests/test_search.py: a tiny search, every rank writing its α."""

import json
import sys

from search_helpers import SegData, seg_collate, tiny_seed, two_process_config

from fna.search import search

if __name__ == "__main__":
    overrides = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    search(two_process_config(**overrides), SegData(16), seg_collate, sys.argv[1], seed=tiny_seed())
