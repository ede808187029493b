"""Tasks: what the backbone is adapted to. Each task is one module with a :class:`~fna.tasks.base.Task`
(model, taps, sizes, search defaults, recipe, data, loss, evaluation, export), registered by name.

``seg`` (:mod:`~fna.tasks.seg`, DeepLabv3), ``retinanet`` (:mod:`~fna.tasks.retinanet`), ``ssdlite``
(:mod:`~fna.tasks.ssdlite`) — the two detectors share :mod:`~fna.tasks.detection` — and ``cls``
(:mod:`~fna.tasks.cls`, the seed's classifier, for costs only).
"""

from fna.tasks import cls, retinanet, seg, ssdlite  # noqa: F401  (each registers its task)
from fna.tasks.base import TASKS, Task, build_model, get_task, register_task

__all__ = ["TASKS", "Task", "build_model", "get_task", "register_task"]
