"""Live-traffic proof for lockstep: the recipes as data, an application query loop, the harness
that runs a recipe under that loop (with and without lockstep) and the `make bench-traffic`
entry point (`tests.bench.traffic`).

The same harness drives `tests/system/test_recipes.py` (2 agents, every recipe, in CI) and the
benchmark (8 agents, figures in `docs/benchmarks.md`), so what the docs claim is what CI runs.
"""
