"""Architecture adaptation (SPEC §4): search a task's super network on task data, then derive.

:mod:`~fna.search.loop` holds the loop and its two steps, :mod:`~fna.search.config` every number of a
search, :mod:`~fna.search.budget` the cost table and the hard budget, :mod:`~fna.search.state` the
checkpoint and :mod:`~fna.search.outputs` what a search writes.
"""

from fna.search.config import SearchConfig, SearchError
from fna.search.loop import Search, search
from fna.search.outputs import SearchResult

__all__ = ["Search", "SearchConfig", "SearchError", "SearchResult", "search"]
