"""voxlane benchmarks: ``python -m bench NAME [--json]`` from the repository root.

Each benchmark is a module ``bench/NAME.py`` with ``add_arguments(parser)``
(optional) and ``run(args) -> dict``. Results compare ratios measured in the
same run against a baseline: this machine is shared and noisy, so absolute
numbers only orient.
"""
