"""passes/aten_capture.py: Dynamo's graph traced to the aten graph AOTAutograd would build, which
the attention pass rewrites and compile_fx then compiles (docs/design.md#capture-before-aotautograd)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import attnopt
from attnopt.passes.aten_capture import CaptureError, might_hold_attention, trace_to_aten
from helpers import randn, rel_l1


def _capture_with(fn, model, *inputs, dynamic=False):
    """Compile `model` with a backend that traces to aten, applies `fn(aten_gm)`, then compile_fx."""
    from torch._inductor.compile_fx import compile_fx

    seen = []

    def backend(gm, example_inputs):
        aten = trace_to_aten(gm, example_inputs)
        fn(aten)
        seen.append(aten)
        return compile_fx(aten, example_inputs, config_patches={"fx_graph_cache": False})

    torch._dynamo.reset()
    return torch.compile(model, backend=backend, dynamic=dynamic), seen


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Inner()

    def forward(self, x, counter):
        counter.add_(1)  # an input written in place: the traced graph must keep the write
        return self.attn(x)


class Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) / 4.0
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).tril() == 0, float("-inf"))
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, 32)


def test_traced_graph_computes_the_same_keeps_input_writes_and_module_paths():
    model = Block()
    f, seen = _capture_with(lambda g: None, model, dynamic=True)
    with torch.no_grad():
        for n in (77, 200, 333):  # one trace under dynamic shapes serves every length
            x = randn(2, n, 32, dtype=torch.float32)
            counter, want_counter = torch.zeros(3), torch.zeros(3)
            got, want = f(x, counter), model(x, want_counter)
            assert rel_l1(got, want) < 1e-6
            assert torch.equal(counter, want_counter) and counter[0] == 1
    assert len(seen) == 1, "a new length traced again"
    with torch.no_grad():  # length 1 is its own graph (Dynamo specializes sizes 0 and 1)
        x, counter = randn(2, 1, 32, dtype=torch.float32), torch.zeros(3)
        assert rel_l1(f(x, counter), model(x, torch.zeros(3))) < 1e-6 and counter[0] == 1
    g = seen[0].graph
    assert len(seen) == 2
    targets = {str(n.target) for n in g.nodes if n.op == "call_function"}
    assert "aten.bmm.default" in targets and "aten.amax.default" in targets  # Inductor's decompositions
    assert "aten.copy_.default" in targets  # the write into `counter`, applied once at the end
    assert not any(str(t).endswith("_.Tensor") or str(t).endswith("_.Scalar") for t in targets - {"aten.copy_.default"})
    bmm = next(n for n in g.nodes if str(n.target) == "aten.bmm.default")
    assert any("attn" in path for path, _ in bmm.meta["nn_module_stack"].values())
    assert "s.softmax" in bmm.meta.get("stack_trace", "") or "q @ k" in bmm.meta.get("stack_trace", "")


def test_only_graphs_with_a_softmax_or_sdpa_are_traced():
    seen = {}

    def backend(gm, example_inputs):
        seen["attention"] = might_hold_attention(gm)
        return gm

    for fn, want in ((lambda x: torch.relu(x @ x.T), False), (lambda x: F.softmax(x @ x.T, -1) @ x, True),
                     (lambda x: F.scaled_dot_product_attention(x[None], x[None], x[None]), True)):
        torch._dynamo.reset()
        torch.compile(fn, backend=backend)(randn(8, 8, dtype=torch.float32))
        assert seen["attention"] is want


def test_metadata_mutation_of_an_input_is_refused():
    """A graph that resizes an input cannot be handed on as a plain functional graph: CaptureError,
    which the backend turns into 'left to Inductor as it was' (the last test here)."""
    gm = torch.fx.symbolic_trace(lambda x: x.resize_(4).mul(2))
    try:
        trace_to_aten(gm, [torch.zeros(2)])
    except CaptureError:
        pass
    else:
        raise AssertionError("an input resized in place was traced")


# a custom op with its own backward: the capture point hands compile_fx a graph in which
# AOTAutograd differentiates through the op by the registered formula (what training needs)
BACKWARD_CALLS = []


@torch.library.custom_op("attnopt_test_capture::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@twice.register_fake
def _(x):
    return torch.empty_like(x)


def _twice_backward(ctx, grad):
    BACKWARD_CALLS.append(1)
    return grad * 2


twice.register_autograd(_twice_backward)


def test_a_rewrite_before_aotautograd_is_differentiated_by_the_ops_registered_backward():
    def replace_mul_by_op(aten):
        for n in list(aten.graph.nodes):
            if n.op == "call_function" and n.target is torch.ops.aten.mul.Tensor and n.args[1] == 2:
                with aten.graph.inserting_before(n):
                    new = aten.graph.call_function(torch.ops.attnopt_test_capture.twice.default, (n.args[0],))
                new.meta.update(n.meta)
                n.replace_all_uses_with(new)
                aten.graph.erase_node(n)
        aten.recompile()

    f, seen = _capture_with(replace_mul_by_op, lambda x: (x * 2).sin().sum())
    x = randn(5, dtype=torch.float32).requires_grad_()
    BACKWARD_CALLS.clear()
    f(x).backward()
    assert any(n.target is torch.ops.attnopt_test_capture.twice.default for n in seen[0].graph.nodes)
    assert BACKWARD_CALLS, "AOTAutograd did not consult the op's registered backward"
    assert torch.allclose(x.grad, 2 * torch.cos(2 * x.detach()))


def test_backend_leaves_an_untraceable_graph_to_inductor_and_says_why(monkeypatch):
    from attnopt.passes import manager

    def fail(gm, example_inputs, training=False):
        raise CaptureError("RuntimeError: something aten tracing cannot do")

    monkeypatch.setattr(manager, "trace_to_aten", fail)
    be = attnopt.backend({"attention": {"min_seq_len": 0}}, inductor_config={"fx_graph_cache": False})
    torch._dynamo.reset()
    q = randn(1, 2, 77, 32)
    with torch.no_grad():
        out = torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q), backend=be)(q)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, q, q))
    assert be.recorder.sites() == []
    (note,) = be.recorder.graphs[0]["notes"]
    assert "could not be traced to aten" in note and "something aten tracing cannot do" in note
