"""The engine: one image under a plan on the ranks of a process group (the data path).

Bottom to top: ``runtime`` (process group, idle waits, teardown), ``comm`` (band layout, exchange buffers, the
one comm manager), ``layers`` (one band wrapper per layer type), ``graphs`` (CUDA graphs of steps),
``sampling`` (per-rank schedulers on strided sub-grids), ``bands`` (a rank's share of a plan and the workspace
kept across images), ``replan`` (measured speeds and the re-plan after warmup), the strategies (``serial``,
``banded``, ``hybrid``) and ``generate``, the entry that picks one.
"""
