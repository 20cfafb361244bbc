"""The graph passes: which run where and in which order is PASS_ORDER in manager.py (docs/design.md#how-a-graph-flows)."""
