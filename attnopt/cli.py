"""`attnopt` command line: `attnopt demo` and `attnopt inspect TARGET`.

Exit codes: 0 success, 2 bad usage / TARGET / options, 1 the model failed to compile or run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _options(text: str | None):
    if text is None:
        return None
    if os.path.isfile(text):
        with open(text) as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                raise SystemExit(_usage_error(f"--options file {text} is not valid JSON: {e}"))
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(_usage_error(f"--options is neither a file nor valid JSON: {e}"))


def _usage_error(msg: str) -> int:
    print(f"attnopt: error: {msg}", file=sys.stderr)
    return 2


def _emit(report, args) -> None:
    print(report)
    if args.json:
        report.save_json(args.json)
        print(f"wrote {args.json}")
    if getattr(args, "html", None):
        from .inspection.html import save_html

        save_html(report, args.html)
        print(f"wrote {args.html}")


def _run_inspect(model, inputs, kwargs, args) -> int:
    import attnopt

    try:
        opts = _options(args.options)
        report = attnopt.inspect(model, *inputs, example_kwargs=kwargs, options=opts, progress=not args.quiet)
    except attnopt.ConfigError as e:
        return _usage_error(str(e))
    except SystemExit as e:
        return int(e.code or 2)
    _emit(report, args)
    return 0


def cmd_demo(args) -> int:
    import torch

    from .demo_model import build

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model, inputs = build(args.size, args.device, dtype)
    print(f"attnopt demo: Llama-style model ({args.size}), random weights, input {list(inputs[0].shape)} "
          f"on {args.device}", file=sys.stderr)
    return _run_inspect(model, inputs, {}, args)


def cmd_inspect(args) -> int:
    from .inspection.target import TargetError, load_target

    try:
        model, inputs, kwargs = load_target(args.target)
    except TargetError as e:
        return _usage_error(str(e))
    return _run_inspect(model, inputs, kwargs, args)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--options", help="pass options as JSON text or a JSON file")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON")
    p.add_argument("--html", metavar="OUT", help="write a self-contained HTML view")
    p.add_argument("--quiet", action="store_true", help="no progress messages")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="attnopt", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="compile the bundled demo model and print the report")
    d.add_argument("--size", choices=["tiny", "large"], default="tiny")
    d.add_argument("--device", default="cpu")
    d.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    _common(d)
    d.set_defaults(fn=cmd_demo)
    i = sub.add_parser("inspect", help="compile a model from TARGET and report every candidate site")
    i.add_argument("target", help="path/to/file.py:factory or pkg.module:factory; factory() -> (model, inputs)")
    _common(i)
    i.set_defaults(fn=cmd_inspect)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
