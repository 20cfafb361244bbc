"""The one capture point: Dynamo's graph traced to a functional aten graph before AOTAutograd.

attnopt's attention pass matches aten ops (bmm, amax, SDPA variants, where, ...), which exist only
after tracing below Python. Tracing here, in the backend, with the decompositions and
functionalization AOTAutograd itself applies, gives the pass exactly the forward graph AOT would
build, and the rewritten graph then goes to `compile_fx`: AOTAutograd traces attnopt's ops like
any other op (decomposing a triton_op into its kernels, consulting `register_autograd` when the
graph needs grad). docs/design.md#capture-before-aotautograd has the decision and its evidence.
"""

from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from ..ops import aot_inline


class CaptureError(RuntimeError):
    """Dynamo's graph could not be traced to aten here: its attention sites stay as they were."""


# Names that every attention holds one of (a softmax, its hand-written exp, or SDPA /
# flex_attention): a graph with none of them has no site, and skips the trace.
_ATTENTION_WORDS = ("softmax", "exp", "attention")


def might_hold_attention(gm: fx.GraphModule) -> bool:
    """Cheap look at Dynamo's (torch-level) graph: could any node be part of an attention?"""
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method", "call_module"):
            name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
            if any(w in name.lower() for w in _ATTENTION_WORDS):
                return True
    return False


def needs_autograd(example_inputs) -> bool:
    """AOTAutograd's own test: a joint forward/backward graph is traced iff this holds."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def _fake_inputs(gm: fx.GraphModule, example_inputs, fake_mode) -> list:
    """Dynamo's fake inputs (same symbols, same ShapeEnv): from_tensor is memoized per tensor."""
    out = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, x in zip(placeholders, example_inputs):
        if isinstance(x, torch.Tensor):
            out.append(fake_mode.from_tensor(x))
        else:  # SymInt / int / float inputs: the symbol Dynamo gave the placeholder
            out.append(node.meta.get("example_value", x))
    return out


def _functionalized(fn):
    """`fn` under FunctionalTensorMode, as AOT runs it: views and in-place ops become functional
    ops; an input written in place gets one `copy_` at the end (AOT turns that into its own input
    mutation handling). A change of an input's metadata (resize_, as_strided_) is not supported."""

    def inner(*args):
        exclude = torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.Functionalize))
        writes = []
        with exclude, FunctionalTensorMode():
            fargs = [FunctionalTensor.to_functional(a) if isinstance(a, torch.Tensor) else a for a in args]
            outs = fn(*fargs)

            def unwrap(t):
                torch._sync(t)
                return torch._from_functional_tensor(t.elem)

            outs = pytree.tree_map_only(FunctionalTensor, unwrap, outs)
            for a, fa in zip(args, fargs):
                if not isinstance(fa, FunctionalTensor):
                    continue
                torch._sync(fa)
                if torch._functionalize_has_metadata_mutation(fa.elem):
                    raise CaptureError("the graph changes an input's metadata in place (resize_ / as_strided_)")
                if torch._functionalize_has_data_mutation(fa.elem):
                    writes.append((a, torch._from_functional_tensor(fa.elem)))
        for a, new in writes:
            a.copy_(new)
        return outs

    return inner


# Higher-order ops whose backward is their own (a custom autograd.Function, activation
# checkpointing's recomputation): a trace below autograd inlines them and loses that backward.
_OWN_BACKWARD_HOPS = ("autograd_function_apply", "tag_activation_checkpoint", "checkpoint")


def own_backward_region(gm: fx.GraphModule) -> str | None:
    """The name of a region in Dynamo's graph that brings its own backward, if any: a graph that
    needs grad and holds one is left as it was (its backward would be lost by the trace)."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator):
            if any(w in n.target.name() for w in _OWN_BACKWARD_HOPS):
                return n.target.name()
    return None


class _GradModeInterpreter(fx.Interpreter):
    """Runs Dynamo's graph for a trace below autograd, keeping its `torch.no_grad()` regions: the
    trace records no grad-mode switches, so a value computed with grad off is detached here (as
    autograd would have left it), or AOT would differentiate through it."""

    def run_node(self, n):
        out = super().run_node(n)
        if n.op.startswith("call_") and not torch.is_grad_enabled():
            out = pytree.tree_map_only(torch.Tensor, lambda t: t.detach() if t.is_floating_point() else t, out)
        return out


def trace_to_aten(gm: fx.GraphModule, example_inputs, training: bool = False) -> fx.GraphModule:
    """Dynamo's graph as the functional aten graph AOT would trace: node metadata (module path,
    stack trace) carried over, symbolic sizes kept in Dynamo's ShapeEnv. For inference, traced
    without grad with Inductor's decompositions applied (AOT's inference graph). For a graph
    that needs grad (`training`), traced with grad on and no decompositions beyond autograd's
    own: AOT then differentiates the very ops it would have, and decomposes after autograd as
    usual (decomposing first would change backward formulas, e.g. softmax's)."""
    from torch._inductor.decomposition import select_decomp_table

    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    fake_args = _fake_inputs(gm, example_inputs, fake_mode)

    def run(*args):
        return (_GradModeInterpreter(gm) if training else fx.Interpreter(gm)).run(*args)

    # Tensors the graph holds as attributes (the linear pass's quantized weights) are real: they
    # become constants of the traced graph, as AOT lifts a module's buffers.
    allow = fake_mode.allow_non_fake_inputs
    fake_mode.allow_non_fake_inputs = True
    # A graph AOT will differentiate keeps attnopt's ops whole here (linear_train's autograd must
    # be seen by AOT, which inlines their kernels itself); inference graphs inline as configured.
    keep_ops = aot_inline.inline_mode("never") if training else contextlib.nullcontext()
    try:
        with enable_python_dispatcher(), fx_traceback.preserve_node_meta(), fake_mode, \
                torch.set_grad_enabled(training), keep_ops:
            aten = make_fx(_functionalized(run), decomposition_table={} if training else select_decomp_table(),
                           record_module_stack=True)(*fake_args)
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure leaves the graph to Inductor unchanged
        raise CaptureError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        fake_mode.allow_non_fake_inputs = allow
    aten.graph.eliminate_dead_code()  # as AOT does after tracing: no dead users confuse the matcher
    aten.recompile()
    aten.meta.update(gm.meta)
    return aten
