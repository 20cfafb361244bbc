"""Load `path/to/file.py:factory` or `pkg.module:factory` -> (model, args, kwargs).

Every way a TARGET can be wrong (bad form, missing file, import failure, factory raising or
returning the wrong thing) becomes a TargetError naming the target and the cause, so the CLI
prints one clear line and exits 2 instead of a traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import os
import pkgutil
import sys
from typing import Any


class TargetError(Exception):
    """A TARGET that cannot be loaded; the message says why (the CLI exits with 2)."""


def _why(e: BaseException) -> str:
    """'ValueError: message', the exception's type and text in one line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


@contextlib.contextmanager
def _on_path(folder: str | None):
    """`folder` first on sys.path while importing and calling the factory (which may import
    lazily), as `python path/to/file.py` or `python -m` would have it."""
    if folder is None or folder in sys.path:
        yield
        return
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def _load_file(where: str):
    if not os.path.isfile(where):
        folder = os.path.dirname(where) or "."
        near = difflib.get_close_matches(os.path.basename(where), os.listdir(folder), n=1, cutoff=0.6) \
            if os.path.isdir(folder) else []
        hint = f"; did you mean {os.path.join(os.path.dirname(where), near[0])!r}?" if near else ""
        raise TargetError(f"TARGET file {where!r} does not exist{hint}")
    spec = importlib.util.spec_from_file_location(f"attnopt_target_{abs(hash(where))}", where)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # SystemExit from a script's argparse too
        raise TargetError(f"importing {where!r} failed: {_why(e)}") from e
    return module


def _load_module(where: str):
    """Import `pkg.module` (the caller has put the current directory on sys.path)."""
    try:
        return importlib.import_module(where)
    except KeyboardInterrupt:
        raise
    except ModuleNotFoundError as e:
        raise TargetError(f"cannot import module {where!r}: {e} (searched the current directory "
                          f"{os.getcwd()!r} and the installed packages){_near_module(e.name)}") from e
    except BaseException as e:
        raise TargetError(f"importing module {where!r} failed: {_why(e)}") from e


def _did_you_mean(module, name: str) -> str:
    """'; did you mean 'build'?' from the module's own public functions (or what it has)."""
    own = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
           and getattr(v, "__module__", None) == module.__name__ and not isinstance(v, type)]
    close = difflib.get_close_matches(name, own, n=3, cutoff=0.6) or difflib.get_close_matches(
        name.lower(), [n.lower() for n in own], n=1, cutoff=0.6)
    if close:
        close = [n for n in own if n in close or n.lower() in close][:3]
        return "; did you mean " + " or ".join(repr(n) for n in close) + "?"
    if own:
        shown = ", ".join(sorted(own)[:8]) + (", ..." if len(own) > 8 else "")
        return f" (its functions: {shown})"
    return ""


def _near_module(missing: str | None) -> str:
    """'; did you mean 'pkg.models'?' for a misspelled last part of a module path."""
    if not missing:
        return ""
    parent, _, leaf = missing.rpartition(".")
    try:
        path = importlib.import_module(parent).__path__ if parent else [os.getcwd()]
    except (ImportError, AttributeError):
        return ""
    names = [m.name for m in pkgutil.iter_modules(path)]
    close = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
    return f"; did you mean {(parent + '.' if parent else '') + close[0]!r}?" if close else ""


def _call_factory(target: str, factory) -> tuple:
    try:
        result = factory()
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        raise TargetError(f"TARGET {target!r}: the factory raised {_why(e)}") from e
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TargetError(f"TARGET {target!r}: the factory must return (model, example_inputs); "
                          f"got {type(result).__name__}")
    return result


def load_target(target: str) -> tuple[Any, tuple, dict]:
    if ":" not in target:
        raise TargetError(f"TARGET {target!r} must look like path/to/file.py:factory or pkg.module:factory")
    where, _, name = target.rpartition(":")
    if not where or not name.isidentifier():
        raise TargetError(f"TARGET {target!r}: expected '<file or module>:<factory function>'")
    is_file = where.endswith(".py") or os.sep in where or bool(os.altsep and os.altsep in where)
    # a file's own folder, or for pkg.module the current directory (the `attnopt` console
    # script's sys.path starts at its bin folder, unlike `python -m`)
    folder = os.path.dirname(os.path.abspath(where)) if is_file else ("" if "" in sys.path else os.getcwd())
    with _on_path(folder or None):
        module = _load_file(where) if is_file else _load_module(where)
        factory = getattr(module, name, None)
        if not callable(factory):
            raise TargetError(f"{where!r} has no callable {name!r}{_did_you_mean(module, name)}")
        model, inputs = _call_factory(target, factory)
    if isinstance(inputs, dict):
        return model, (), dict(inputs)
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    return model, tuple(inputs), {}
