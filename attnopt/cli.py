"""`attnopt` command line: `attnopt demo` and `attnopt inspect TARGET`.

`attnopt --options-help` lists every option key (default, allowed values, meaning), from the same
schema that validates `--options` (attnopt/config.py); `demo --help` and `inspect --help` list the keys too.

Exit codes: 0 success, 2 bad usage / TARGET / options, 1 the model failed to compile or run.
Every error is one line on stderr naming what to fix; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


class UsageError(Exception):
    """A bad command line (TARGET, --options, ...): one line, exit 2."""


def _looks_like_path(text: str) -> bool:
    t = text.strip()
    return not t.startswith(("{", "[")) and (t.endswith(".json") or os.sep in t or "/" in t)


def _options(text: str | None):
    if text is None:
        return None
    if os.path.isfile(text):
        with open(text) as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                raise UsageError(f"--options file {text} is not valid JSON: {e}") from e
    if _looks_like_path(text):
        raise UsageError(f"--options: file not found: {text}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--options is neither a file nor valid JSON ({e}): pass a JSON file or text like "
                         """'{"attention": {"quant": "int8"}}'""") from e


def _error(msg: str, debug: bool = False, code: int = 2, offer_traceback: bool = False) -> int:
    """One line on stderr (the traceback too under --debug); returns the exit status."""
    if debug:
        import traceback

        traceback.print_exc()
    hint = " (--debug shows the traceback)" if offer_traceback and not debug else ""
    print(f"attnopt: error: {msg}{hint}", file=sys.stderr)
    return code


def _emit(report, args) -> None:
    print(report)
    if args.json:
        report.save_json(args.json)
        print(f"wrote {args.json}")
    if getattr(args, "html", None):
        from .inspection.html import save_html

        save_html(report, args.html)
        print(f"wrote {args.html}")


def _checked_options(args):
    """--options read and validated before any model is built: a typo costs no model load."""
    from .config import ConfigError, normalize_options

    opts = _options(args.options)
    try:
        normalize_options(opts)
    except ConfigError as e:
        raise UsageError(f"--options: {e}") from e
    return opts


def _run_inspect(model, inputs, kwargs, args, opts) -> int:
    import attnopt

    try:
        report = attnopt.inspect(model, *inputs, example_kwargs=kwargs, options=opts, progress=not args.quiet,
                                 grad=args.grad)
    except attnopt.ConfigError as e:
        return _error(f"--options: {e}", args.debug)
    except Exception as e:  # the model failed to compile or run: one line, exit 2 like every error
        first = (str(e).strip().splitlines() or [""])[0]
        return _error(f"the model failed to compile or run: {type(e).__name__}: {first}", args.debug,
                      offer_traceback=True)
    try:
        _emit(report, args)
    except OSError as e:
        return _error(f"cannot write the report: {e}", args.debug)
    return 0


def cmd_demo(args) -> int:
    import torch

    from .demo_model import build

    opts = _checked_options(args)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        model, inputs = build(args.size, args.device, dtype)
    except (RuntimeError, AssertionError, ValueError) as e:  # e.g. --device cuda with no GPU
        first = (str(e).strip().splitlines() or [""])[0]
        return _error(f"--device {args.device}: cannot build the demo model there ({type(e).__name__}: {first})",
                      args.debug)
    print(f"attnopt demo: Llama-style model ({args.size}), random weights, input {list(inputs[0].shape)} "
          f"on {args.device}", file=sys.stderr)
    return _run_inspect(model, inputs, {}, args, opts)


def cmd_inspect(args) -> int:
    from .inspection.target import TargetError, load_target

    opts = _checked_options(args)
    try:
        model, inputs, kwargs = load_target(args.target)
    except TargetError as e:
        return _error(str(e), args.debug)
    return _run_inspect(model, inputs, kwargs, args, opts)


def _options_epilog() -> str:
    from .config import schema_text

    return ("--options keys, each with its default and what it allows (in JSON they nest: "
            "'{\"attention\": {\"quant\": \"fp8\"}}');\n`attnopt --options-help` also says what each means "
            "and lists the sparse methods' parameters:\n" + schema_text(meanings=False))


class _OptionsHelp(argparse.Action):
    """--options-help: print every option key and exit, like --help."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        from .config import schema_text

        print("attnopt options (--options JSON; nested tables: {\"attention\": {\"quant\": \"fp8\"}}):")
        print(schema_text(meanings=True))
        parser.exit(0)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--options", help="pass options as JSON text or a JSON file (keys listed below)")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON")
    p.add_argument("--html", metavar="OUT", help="write a self-contained HTML view")
    p.add_argument("--quiet", action="store_true", help="no progress bar (drawn on a terminal only anyway)")
    p.add_argument("--debug", action="store_true", help="on an error, print the traceback too")
    p.add_argument("--grad", action="store_true",
                   help="also measure each attention site's gradient error under attention.backward (training)")


class _Parser(argparse.ArgumentParser):
    """argparse's errors in one line (what is wrong, where the help is), exit status 2."""

    def error(self, message):
        self.exit(2, f"attnopt: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="attnopt", description=__doc__.splitlines()[0])
    ap.add_argument("--options-help", action=_OptionsHelp,
                    help="list every option key: default, allowed values, meaning; then exit")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    keys = dict(epilog=_options_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    d = sub.add_parser("demo", help="compile the bundled demo model and print the report", **keys)
    d.add_argument("--size", choices=["tiny", "large"], default="tiny")
    d.add_argument("--device", default="cpu")
    d.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    _common(d)
    d.set_defaults(fn=cmd_demo)
    i = sub.add_parser("inspect", help="compile a model from TARGET and report every candidate site", **keys)
    i.add_argument("target", help="path/to/file.py:factory or pkg.module:factory; factory() -> (model, inputs)")
    _common(i)
    i.set_defaults(fn=cmd_inspect)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UsageError as e:
        return _error(str(e), args.debug)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
