"""`attnopt.calibrate`: per-site choices under one budget on the model's output.

calibrate.py (the entry: candidates per site) -> capture.py (site inputs, disk cache) ->
site_search.py (an attention site's per-head sparse search), linear_formats.py (a linear's own
error per format), cost_model.py (estimated time) -> evaluate.py (the model's error under any
choice, no recompile) -> planner.py (the budget spent across sites, checked end to end) ->
front.py (the speed-versus-error front).
"""

from .calibrate import calibrate

__all__ = ["calibrate"]
