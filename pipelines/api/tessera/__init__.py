"""tessera's Python API: ``tessera.open(root)`` over a job's outputs (see :mod:`pipelines.results`).

Installed as the top-level package ``tessera`` (pyproject's package search includes
``pipelines/api``), so notebooks write ``import tessera``.
"""

from pipelines.results import Results, open

__all__ = ["Results", "open"]
