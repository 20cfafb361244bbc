"""The attention ops' schemas come from one shared argument list (ops/schema.py); their Python
bodies and fake impls take the same arguments in the same order."""

import ast
import inspect

import pytest
import torch

import attnopt  # noqa: F401 - registers the ops
from attnopt.ops import attention as A, probe as P, sparse as S
from attnopt.ops.schema import ATTENTION_ARGS

SHARED = [a.split()[-1] for a in ATTENTION_ARGS.split(", ")]
OPS = {
    # op: (module, the op's Python name, its body's function name, the op's own arguments)
    "attention": (A, "attention_op", "_attention_body", ["smooth_q", "arch", "impl", "softcap", "gate", "gate_id"]),
    "sparse_attention": (S, "sparse_attention_op", "_sparse_attention_body",
                         ["arch", "impl", "sparsity", "softcap", "gate", "gate_id"]),
    "attention_probe": (P, "attention_probe", "attention_probe",
                        ["smooth_q", "arch", "impl", "sparsity", "probe_key", "softcap"]),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_schema_is_the_shared_prefix_then_its_own(name):
    module, py_name, body, own = OPS[name]
    schema = getattr(torch.ops.attnopt, name).default._schema
    names = [a.name for a in schema.arguments]
    assert names == SHARED + own
    assert str(schema).startswith(f"attnopt::{name}({ATTENTION_ARGS}, ")
    # softcap=0., and on the scheduled ops gate=None, gate_id=0 (ops/schema.py GATE_ARGS)
    defaults = [0.0, None, 0] if "gate" in own else [0.0]
    assert [a.default_value for a in schema.arguments if a.has_default_value()] == defaults
    # the Python body and the fake take exactly the schema's arguments, with the same defaults
    defs = _defs(module, py_name, body)
    assert len(defs) == 2, [d.name for d in defs]  # the body, then its register_fake
    for d in defs:
        assert [a.arg for a in d.args.args] == names, d.name
        assert [ast.literal_eval(x) for x in d.args.defaults] == defaults, d.name


def _defs(module, op_name, body):
    """The functions in `module` defining op `op_name`: its body, and the one decorated by
    `<op_name>.register_fake`."""
    out = []
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.FunctionDef):
            src = ast.unparse(node.decorator_list[0]) if node.decorator_list else ""
            if node.name == body or src == f"{op_name}.register_fake":
                out.append(node)
    return out


def test_shared_prefix_is_what_the_passes_pass():
    assert SHARED == ["q", "k", "v", "attn_bias", "keep_mask", "masked_value", "is_causal", "causal_offset",
                      "scale", "quant", "pv", "smooth_k"]
