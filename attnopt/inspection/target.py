"""Load `path/to/file.py:factory` or `pkg.module:factory` -> (model, args, kwargs)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any


class TargetError(Exception):
    """A TARGET that cannot be loaded; the message says why (the CLI exits with 2)."""


def load_target(target: str) -> tuple[Any, tuple, dict]:
    if ":" not in target:
        raise TargetError(f"TARGET {target!r} must look like path/to/file.py:factory or pkg.module:factory")
    where, _, name = target.rpartition(":")
    if not where or not name.isidentifier():
        raise TargetError(f"TARGET {target!r}: expected '<file or module>:<factory function>'")
    if where.endswith(".py") or os.sep in where:
        if not os.path.isfile(where):
            raise TargetError(f"TARGET file {where!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"attnopt_target_{abs(hash(where))}", where)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, os.path.dirname(os.path.abspath(where)))
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise TargetError(f"importing {where!r} failed: {e!r}") from e
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise TargetError(f"cannot import module {where!r}: {e}") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise TargetError(f"{where!r} has no callable {name!r}")
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TargetError(f"{name}() must return (model, example_inputs); got {type(result).__name__}")
    model, inputs = result
    if isinstance(inputs, dict):
        return model, (), dict(inputs)
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    return model, tuple(inputs), {}
