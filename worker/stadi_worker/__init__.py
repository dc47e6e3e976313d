"""Data plane: step-patch parallel diffusion on the torch.distributed ranks of a gang.

Layers, bottom to top (imports point down only): ``models`` (one module per family behind ``ModelOps``),
``engine`` (one image under a plan on a process group), ``job`` (a rank's share of a DiffusionJob: loading,
storage, manifest, progress, status), ``settings`` (the ``STADI_*`` environment, read once) and ``cli``
(``stadi worker``, ``stadi run`` and the one launcher of local ranks). docs/architecture.md describes them.
"""
