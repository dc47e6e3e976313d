"""The worker's command line: ``stadi worker`` (one rank), ``stadi run`` (a local gang), and what launching ranks
needs (``inputs``, ``ranks``: the one launcher of local ranks, ``progress``, ``emulate``: slowdown for tests)."""
