"""`attnopt.calibrate`: per-site, per-head choices under an error budget (calibrate.py), from
each attention site's parameter search (site_search.py) and each linear's measured format
sensitivity (linear_formats.py)."""

from .calibrate import calibrate

__all__ = ["calibrate"]
