"""attnopt as a diffusers attention backend (attnopt/integrations/diffusers_backend.py): tiny Flux,
Wan and QwenImage built from their configs, offline, on the CPU (the reference arithmetic)."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import rel_l1

diffusers = pytest.importorskip("diffusers")
dispatch = pytest.importorskip("diffusers.models.attention_dispatch")

import attnopt  # noqa: E402
from attnopt.integrations import diffusers_backend as db  # noqa: E402
from attnopt.integrations.diffusers import decisions, register_backend, track_sites, use_backend  # noqa: E402

BOUND = 0.05  # the bound against the default backend (here: that backend in float64)
ANY_LENGTH = {"min_seq_len": 0, "allow_fp32": True}


@pytest.fixture(autouse=True)
def restore_active_backend():
    """set_attention_backend also sets diffusers' process-wide active backend: put it back."""
    before = dispatch._AttentionBackendRegistry._active_backend
    yield
    dispatch._AttentionBackendRegistry.set_active_backend(before)


class CountFormats(TorchDispatchMode):
    """attnopt op calls seen, as (op name, QK^T format, P.V format)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.attnopt.attention.default, torch.ops.attnopt.sparse_attention.default):
            self.calls.append((func.__name__.split(".")[0], args[9], args[10]))
        return func(*args, **(kwargs or {}))


def _flux():
    m = diffusers.FluxTransformer2DModel.from_config(dict(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)))
    img, txt = 160, 32
    kw = dict(hidden_states=torch.randn(1, img, 8), encoder_hidden_states=torch.randn(1, txt, 32),
              pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
              img_ids=torch.randn(img, 3), txt_ids=torch.zeros(txt, 3))
    return m, kw


def _wan():
    m = diffusers.WanTransformer3DModel.from_config(dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32))
    kw = dict(hidden_states=torch.randn(1, 4, 2, 16, 16), timestep=torch.tensor([500]),
              encoder_hidden_states=torch.randn(1, 16, 32))
    return m, kw


def _qwen():
    m = diffusers.QwenImageTransformer2DModel.from_config(dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(8, 4, 4)))
    h = w = 12
    text_mask = torch.ones(2, 16)
    text_mask[1, 11:] = 0  # padded prompt: the joint attention gets a boolean key mask
    kw = dict(hidden_states=torch.randn(2, h * w, 16), encoder_hidden_states=torch.randn(2, 16, 32),
              encoder_hidden_states_mask=text_mask, timestep=torch.tensor([0.5, 0.5]), img_shapes=[(1, h, w)] * 2)
    return m, kw


MODELS = {"flux": _flux, "wan": _wan, "qwenimage": _qwen}


def _run(m, kw, dtype=None):
    if dtype is not None:
        kw = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
    with torch.no_grad():
        return m(**kw, return_dict=False)[0]


def _attention_paths(m) -> list[str]:
    from attnopt.integrations.diffusers_sites import attention_classes

    return [p for p, mod in m.named_modules() if isinstance(mod, attention_classes())]


@pytest.mark.parametrize("model", list(MODELS))
def test_models_match_default_backend(model):
    """Every attention module runs attnopt's op; the output stays within BOUND of diffusers'
    default backend run in float64."""
    torch.manual_seed(0)
    m, kw = MODELS[model]()
    m.eval()
    ref = _run(copy.deepcopy(m).to(torch.float64), kw, torch.float64)
    register_backend({"attention": ANY_LENGTH}, name="attnopt_models")
    track_sites(m)
    m.set_attention_backend("attnopt_models")
    with CountFormats() as seen:
        out = _run(m, kw)
    d = decisions("attnopt_models")
    assert sorted(k.split("#")[0] for k in d) == sorted(_attention_paths(m))
    assert all(v.startswith("reference/int8qk") for v in d.values()), d
    assert len(seen.calls) == len(d)
    err = rel_l1(out, ref)
    assert 0 < err <= BOUND, f"{model}: rel-L1 {err:.4g}"


def test_registration_extends_the_enum_once():
    E = dispatch.AttentionBackendName
    before = list(E)
    assert register_backend(name="attnopt_enum") == "attnopt_enum"
    member = E("attnopt_enum")
    assert member is E.ATTNOPT_ENUM and member == "attnopt_enum" and isinstance(member, E)
    assert list(E) == before + [member] and E.__members__["ATTNOPT_ENUM"] is member
    assert E("native") is E.NATIVE  # diffusers' own members untouched
    register_backend({"attention": {"quant": "fp8"}}, name="attnopt_enum")  # again: new options, same member
    assert list(E) == before + [member] and E("attnopt_enum") is member
    assert db._REGISTERED["attnopt_enum"].opts.attention.quant == "fp8"
    assert member in dispatch._AttentionBackendRegistry.list_backends()
    with pytest.raises(ValueError, match="diffusers' own"):
        register_backend(name="native")
    with pytest.raises(ValueError, match="lower case"):
        register_backend(name="AttnOpt")


def test_set_attention_backend_and_context_select_it():
    torch.manual_seed(0)
    m, kw = _wan()
    m.eval()
    register_backend({"attention": ANY_LENGTH}, name="attnopt_select")
    track_sites(m)
    with CountFormats() as seen:
        with dispatch.attention_backend("attnopt_select"):
            _run(m, kw)
    assert len(seen.calls) == 4  # 2 blocks x (self, cross)
    m.set_attention_backend("attnopt_select")
    with CountFormats() as seen:
        _run(m, kw)
    assert len(seen.calls) == 4
    m.set_attention_backend("native")
    with CountFormats() as seen:
        _run(m, kw)
    assert seen.calls == []


def _qkv(b=1, n=64, h=2, d=16, hkv=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, n, h, d, generator=g, dtype=dtype), torch.randn(b, n, hkv or h, d, generator=g, dtype=dtype),
            torch.randn(b, n, hkv or h, d, generator=g, dtype=dtype))


def test_backend_names_every_dispatcher_argument():
    """diffusers drops the arguments a backend's signature lacks: ours names all the native one does."""
    register_backend(name="attnopt_args")
    names = dispatch._AttentionBackendRegistry._supported_arg_names
    assert names[dispatch.AttentionBackendName.NATIVE] <= names[dispatch.AttentionBackendName("attnopt_args")]
    assert {"window_size", "return_lse", "_parallel_config"} <= names[dispatch.AttentionBackendName("attnopt_args")]


@pytest.mark.parametrize("call, error", [
    (dict(dropout_p=0.1), NotImplementedError),
    (dict(attention_kwargs={"return_lse": True}), NotImplementedError),
    (dict(attention_kwargs={"window_size": (8, 8)}), NotImplementedError),
    (dict(parallel_config=object()), NotImplementedError),
    (dict(is_causal=True, attn_mask=torch.ones(64, 64, dtype=torch.bool)), ValueError),
    (dict(hkv=1), ValueError),  # fewer key heads without enable_gqa
])
def test_backend_refuses_what_it_does_not_implement(call, error):
    register_backend({"attention": ANY_LENGTH}, name="attnopt_refuse")
    call = dict(call)
    q, k, v = _qkv(hkv=call.pop("hkv", None))
    with pytest.raises(error):
        dispatch.dispatch_attention_fn(q, k, v, backend=dispatch.AttentionBackendName("attnopt_refuse"), **call)


def test_gqa_runs_when_enabled():
    register_backend({"attention": ANY_LENGTH}, name="attnopt_gqa")
    q, k, v = _qkv(h=4, hkv=2)
    out = dispatch.dispatch_attention_fn(q, k, v, enable_gqa=True, backend=dispatch.AttentionBackendName("attnopt_gqa"))
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v)),
                                                           enable_gqa=True).transpose(1, 2)
    assert out.shape == q.shape and rel_l1(out, ref) < 0.02


def test_short_sites_run_the_native_backend_exactly():
    """A site the options leave alone runs what diffusers' native backend runs, bit for bit."""
    torch.manual_seed(0)
    m, kw = _flux()
    m.eval()
    ref = _run(m, kw)
    register_backend({"attention": {"min_seq_len": 4096, "allow_fp32": True}}, name="attnopt_short")
    track_sites(m)
    with dispatch.attention_backend("attnopt_short"):
        out = _run(m, kw)
    assert torch.equal(out, ref)
    assert all(v.startswith("sdpa: key length") for v in decisions("attnopt_short").values())


def test_per_layer_plan_is_honoured():
    """Plan entries (keys as attnopt.calibrate writes them) pick each layer's formats."""
    torch.manual_seed(0)
    m, kw = _wan()
    m.eval()
    plan = {"schema_version": attnopt.Plan().to_dict()["schema_version"], "sites": {
        "blocks.0.attn1#0": {"kind": "attention", "quant": "int8", "pv": "fp16"},
        "blocks.1.attn1#0": {"kind": "attention", "quant": "fp8", "pv": "fp8"},
        "blocks.1.attn2#0": {"kind": "attention", "original": True}}}
    register_backend({"attention": ANY_LENGTH, "plan": plan}, name="attnopt_plan")
    track_sites(m)
    with dispatch.attention_backend("attnopt_plan"), CountFormats() as seen:
        _run(m, kw)
    d = decisions("attnopt_plan")
    assert "int8qk-f16pv" in d["blocks.0.attn1#0"] and "fp8qk-fp8pv" in d["blocks.1.attn1#0"]
    assert d["blocks.1.attn2#0"].startswith("sdpa: the calibrated plan keeps")
    assert "int8qk" in d["blocks.0.attn2#0"]  # no entry: the section's options
    assert sorted(seen.calls) == sorted([("attention", "int8", "fp16")] * 2 + [("attention", "fp8", "fp8")])


@pytest.mark.parametrize("extra", [
    {"plan": {"schema_version": attnopt.Plan().to_dict()["schema_version"],
              "sites": {"blocks.0.attn1#0": {"kind": "attention", "quant": "fp8"}}}},
    {"attention": {**ANY_LENGTH, "exclude": ["blocks.0.*"]}},
    {"attention": {**ANY_LENGTH, "schedule": [{"steps": [0, 1], "include": ["blocks.0.*"], "use": {"quant": "fp8"}}]}},
], ids=["plan", "exclude", "schedule"])
def test_options_naming_modules_need_tracked_sites(extra):
    """Options that name modules cannot run a call whose module is unknown: they raise."""
    register_backend({"attention": ANY_LENGTH, **extra}, name="attnopt_nosite")
    with pytest.raises(db.SiteUnknown, match="track_sites"):
        dispatch.dispatch_attention_fn(*_qkv(), backend=dispatch.AttentionBackendName("attnopt_nosite"))


def test_untracked_call_uses_the_section_options():
    register_backend({"attention": {**ANY_LENGTH, "quant": "fp8"}}, name="attnopt_plain")
    with CountFormats() as seen:
        dispatch.dispatch_attention_fn(*_qkv(), backend=dispatch.AttentionBackendName("attnopt_plain"))
    assert seen.calls == [("attention", "fp8", "fp16")]
    assert decisions("attnopt_plain") == {"#0": "reference/fp8qk-f16pv"}


def test_sparsity_reaches_the_sparse_op():
    register_backend({"attention": {**ANY_LENGTH, "sparsity": {"method": "window", "window": 64, "sinks": 0}}},
                     name="attnopt_sparse")
    q, k, v = _qkv(n=256)
    with CountFormats() as seen:
        out = dispatch.dispatch_attention_fn(q, k, v, backend=dispatch.AttentionBackendName("attnopt_sparse"))
    assert seen.calls == [("sparse_attention", "int8", "fp16")]
    dense = torch.nn.functional.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v)))
    assert rel_l1(out, dense.transpose(1, 2)) > 0.05  # a 64-token window drops real attention mass


def test_bad_options_raise_config_error():
    with pytest.raises(attnopt.ConfigError, match="attention.quant"):
        register_backend({"attention": {"quant": "int4"}}, name="attnopt_bad")
    with pytest.raises(attnopt.ConfigError):
        register_backend({"attention": {"quantt": "int8"}}, name="attnopt_bad")
    assert "attnopt_bad" not in db._REGISTERED


def test_track_sites_is_idempotent_and_removable():
    m, _ = _wan()
    hooks = track_sites(m)
    assert track_sites(m) is hooks and sorted(hooks.paths) == sorted(_attention_paths(m))
    hooks.remove()
    assert all(not mod._forward_pre_hooks for mod in m.modules())
    assert track_sites(m) is not hooks


def test_step_schedule_switches_formats():
    torch.manual_seed(0)
    m, kw = _wan()
    m.eval()
    register_backend({"attention": {**ANY_LENGTH, "schedule": [
        {"steps": [0, 1], "use": {"quant": "fp8", "pv": "fp8"}},
        {"steps": [1, 2], "include": ["blocks.1.*"], "use": {"quant": "none", "sparsity": {"method": "window",
                                                                                             "window": 32}}}]}},
        name="attnopt_sched")
    track_sites(m)
    seen = {}
    with dispatch.attention_backend("attnopt_sched"):
        for i in range(3):
            with attnopt.step(i, 3), CountFormats() as count:
                _run(m, kw)
            seen[i] = sorted(count.calls)
    assert seen[0] == [("attention", "fp8", "fp8")] * 4
    assert seen[1] == [("attention", "int8", "fp16")] * 2 + [("sparse_attention", "none", "fp16")] * 2
    assert seen[2] == [("attention", "int8", "fp16")] * 4


@pytest.mark.slow
def test_site_keys_match_the_compiled_pass():
    """The backend's keys are the report's (and so a calibrated plan's) for the same model."""
    torch.manual_seed(0)
    m, kw = _wan()
    m.eval()
    rep = attnopt.inspect(m, kw["hidden_states"], kw["timestep"], kw["encoder_hidden_states"],
                          options={"attention": ANY_LENGTH})
    compiled = sorted(s.key for s in rep.sites if s.kind == "attention")
    register_backend({"attention": ANY_LENGTH}, name="attnopt_keys")
    track_sites(m)
    with dispatch.attention_backend("attnopt_keys"):
        _run(m, kw)
    assert sorted(decisions("attnopt_keys")) == compiled


def test_use_backend_registers_tracks_and_selects():
    torch.manual_seed(0)
    m, kw = _flux()
    m.eval()
    assert use_backend(m, {"attention": {**ANY_LENGTH, "exclude": ["single_*"]}}, name="attnopt_use") == "attnopt_use"
    _run(m, kw)
    d = decisions("attnopt_use")
    assert "int8qk" in d["transformer_blocks.0.attn#0"]
    assert d["single_transformer_blocks.0.attn#0"].startswith("sdpa: module 'single_transformer_blocks.0.attn' "
                                                              "excluded")


def _plan(sites):
    return {"schema_version": attnopt.Plan().to_dict()["schema_version"], "sites": sites}


def test_schedule_entry_wins_over_the_plan_entry_and_plan_schedules_apply():
    """As in the compile pass: a schedule entry's `use` beats the site's plan entry for the keys
    it sets, and a plan entry's own schedule is tried before attention.schedule."""
    plan = _plan({"blk#0": {"kind": "attention", "quant": "int8", "pv": "fp8",
                            "sparsity": {"method": "window", "window": 32, "sinks": 0},
                            "schedule": [{"steps": [1, 2], "use": {"quant": "fp8"}}]}})
    b = db._Backend(attnopt.normalize_options({"plan": plan, "attention": {**ANY_LENGTH, "schedule": [
        {"steps": [0.0, 0.5], "use": {"sparsity": None}}]}}))
    q = torch.randn(1, 2, 128, 16)
    runs = {}
    for i in range(3):
        with attnopt.step(i, 4):
            runs[i] = b.decide(q, q, q, ("blk", 0))[1]
    assert runs[0].sparsity == "" and runs[0].quant == "int8"          # section schedule: dense
    assert runs[1].quant == "fp8" and "window" in runs[1].sparsity     # the plan's own schedule first
    assert runs[2].quant == "int8" and "window" in runs[2].sparsity    # no entry: the plan entry


def test_decisions_follow_grad_mode():
    """A call with inputs that need grad runs SDPA; a later no-grad call is not pinned to that."""
    register_backend({"attention": ANY_LENGTH}, name="attnopt_grad")
    q, k, v = _qkv()
    backend = dispatch.AttentionBackendName("attnopt_grad")
    dispatch.dispatch_attention_fn(q.requires_grad_(), k, v, backend=backend)
    assert decisions("attnopt_grad")["#0"].startswith("sdpa: q/k/v require grad")
    with torch.no_grad(), CountFormats() as seen:
        dispatch.dispatch_attention_fn(q, k, v, backend=backend)
    assert seen.calls == [("attention", "int8", "fp16")]


def test_svg2_needs_tracked_sites_and_causal_calls_stay_dense():
    """SVG2 keeps centroids per site: an untracked call cannot have one; a causal call runs dense."""
    register_backend({"attention": {**ANY_LENGTH, "sparsity": {"method": "svg2", "q_clusters": 4,
                                                               "k_clusters": 8}}}, name="attnopt_svg2")
    with pytest.raises(db.SiteUnknown, match="svg2"):
        dispatch.dispatch_attention_fn(*_qkv(), backend=dispatch.AttentionBackendName("attnopt_svg2"))
    b = db._Backend(attnopt.normalize_options({"attention": {**ANY_LENGTH, "sparsity": {
        "method": "svg2", "q_clusters": 4, "k_clusters": 8}}}))
    q = torch.randn(1, 2, 128, 16)
    assert "svg2" in b.decide(q, q, q, ("blk", 0))[1].sparsity
    causal = b.decide(q, q, q, ("blk", 0), is_causal=True)[1]
    assert causal.sparsity == "" and "no causal form" in causal.kernel
