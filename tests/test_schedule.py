"""attention.schedule and attnopt.step: validation, matching, the runtime step tensor."""

import pytest
import torch

import attnopt
from attnopt import schedule as S
from attnopt.config import ConfigError, normalize_options

SCHEDULE = [
    {"steps": [0.0, 0.25], "include": ["*blocks.0.*"], "use": {"sparsity": None, "quant": "int8"}},
    {"steps": [0.25, 1.0], "use": {"quant": "fp8", "sparsity": {"method": "radial", "frame_tokens": 64}}},
    {"steps": [0, 3], "use": {"quant": "none"}},
]


def _opts(schedule=SCHEDULE, **attention):
    return normalize_options({"attention": {"schedule": schedule, **attention}}).attention


def test_first_matching_entry_wins_and_section_holds_elsewhere():
    a = _opts(quant="int8", sparsity={"method": "window", "window": 128})
    assert S.options_at(a, "blocks.0.attn", (0, 50)).sparsity is None        # entry 0
    assert S.options_at(a, "blocks.1.attn", (0, 50)).quant == "none"         # entry 0 misses the glob: entry 2
    at20 = S.options_at(a, "blocks.1.attn", (20, 50))
    assert at20.quant == "fp8" and at20.sparsity.method == "radial"           # entry 1 (fraction 0.4)
    assert S.options_at(a, "blocks.1.attn", (12, 50)) is a                   # 0.24 < 0.25 and 12 >= 3: none
    assert S.options_at(a, "x", None) is a                                   # no step: the section
    assert S.options_at(a, "blocks.1.attn", (2, 50)).quant == "none"
    assert S.entry_index(a.schedule, "blocks.1.attn", (13, 50)) == 1
    assert S.site_entries(a.schedule, "blocks.0.attn") == [0, 1, 2]
    assert S.site_entries(a.schedule, "blocks.1.attn") == [1, 2]


def test_half_open_ranges():
    assert S.step_in([0.0, 0.25], 24, 100) and not S.step_in([0.0, 0.25], 25, 100)
    assert S.step_in([0.75, 1.0], 99, 100)
    assert S.step_in([2, 5], 2, 10) and not S.step_in([2, 5], 5, 10)


@pytest.mark.parametrize("entry, path", [
    ({"steps": [0.5, 0.2], "use": {}}, "attention.schedule[0].steps"),
    ({"steps": [0.5, 1.5], "use": {}}, "attention.schedule[0].steps"),
    ({"steps": [3, 3], "use": {}}, "attention.schedule[0].steps"),
    ({"steps": [0, 1]}, "attention.schedule[0].use"),
    ({"use": {}}, "attention.schedule[0].steps"),
    ({"steps": [0, 1], "use": {"quantt": "int8"}}, "attention.schedule[0].use.quantt"),
    ({"steps": [0, 1], "use": {"quant": "int4"}}, "attention.schedule[0].use.quant"),
    ({"steps": [0, 1], "use": {"min_seq_len": 3}}, "attention.schedule[0].use.min_seq_len"),
    ({"steps": [0, 1], "use": {"sparsity": {"method": "nope"}}}, "attention.schedule[0].use.sparsity.method"),
    ({"steps": [0, 1], "use": {"smooth_q": True, "sparsity": {"method": "window"}}},
     "attention.schedule[0].use.smooth_q"),
    ({"steps": [0, 1], "use": {}, "when": 1}, "attention.schedule[0].when"),
])
def test_bad_entries_name_their_path(entry, path):
    with pytest.raises(ConfigError) as e:
        normalize_options({"attention": {"schedule": [entry]}})
    assert e.value.path.startswith(path), e.value.path


def test_schedule_round_trips_through_json():
    o = normalize_options({"attention": {"schedule": SCHEDULE}})
    again = normalize_options(o.to_dict())
    assert again == o and again.attention.schedule == o.attention.schedule


def test_step_block_sets_restores_and_writes_tensor_in_place():
    t = S.step_tensor("cpu")
    ptr = t.data_ptr()
    assert S.current_step() is None and t.tolist() == list(S.NO_STEP)
    with attnopt.step(3, 50):
        assert S.current_step() == (3, 50) and t.tolist() == [3.0, 50.0]
        with attnopt.step(4, 50):
            assert t.tolist() == [4.0, 50.0]
        assert t.tolist() == [3.0, 50.0]
    assert S.current_step() is None and t.tolist() == list(S.NO_STEP)
    assert S.step_tensor("cpu") is t and t.data_ptr() == ptr and t.dtype == torch.float64


def test_step_checks_its_arguments_and_calls_listeners():
    seen = []
    remove = S.add_step_listener(lambda i, n: seen.append((i, n)))
    try:
        for bad in [(5, 5), (-1, 5), (1.0, 5), (True, 5)]:
            with pytest.raises((TypeError, ValueError)):
                with attnopt.step(*bad):
                    pass
        with attnopt.step(0, 2):
            pass
    finally:
        remove()
    with attnopt.step(1, 2):
        pass
    assert seen == [(0, 2)]


def test_a_schedule_setting_quant_drops_the_planned_pv():
    """A planned pv was chosen for the planned quant: an entry that sets quant resolves pv afresh
    (a plan's fp8 P.V with a schedule's quant 'none' would otherwise refuse the whole site)."""
    from attnopt.codegen.arch import ARCHS
    from attnopt.passes.attention_rewrite import choose_formats, overridden

    entry = {"kind": "attention", "quant": "int8", "pv": "fp8", "sparsity": {"method": "window"}}
    assert overridden(entry, {"quant": "none"}) == {"kind": "attention", "sparsity": {"method": "window"}}
    assert overridden(entry, {"pv": "fp16"}) == {"kind": "attention", "quant": "int8",
                                                 "sparsity": {"method": "window"}}
    assert overridden(entry, {"sparsity": None}) == {"kind": "attention", "quant": "int8", "pv": "fp8"}
    plan = {"schema_version": attnopt.Plan().to_dict()["schema_version"], "sites": {"s#0": entry}}
    opts = normalize_options({"plan": plan, "attention": {"min_seq_len": 0}})
    use = {"quant": "none", "sparsity": {"method": "window", "window": 64}}
    a = S.apply_use(opts.attention, use)
    quant, pv, sparsity, _ = choose_formats(opts, "s#0", ARCHS["sm90"], 2, 256, 256, "cuda", attention=a, use=use)
    assert (quant, pv, sparsity["method"]) == ("none", "fp16", "window")
