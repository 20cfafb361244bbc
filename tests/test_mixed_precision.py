"""Mixed-precision linears: formats chosen from each linear's measured effect on the model's
output, under a model-output budget that the compiled model then meets."""

import pytest
import torch

import attnopt

transformers = pytest.importorskip("transformers")


def _llama_with_a_sensitive_layer():
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = transformers.LlamaForCausalLM(cfg).eval().to(torch.bfloat16)
    with torch.no_grad():  # outlier input channels: its per-output-channel 8-bit scales turn coarse
        model.model.layers[1].mlp.down_proj.weight[:, :3] *= 40
    return model


@pytest.mark.slow
def test_formats_follow_sensitivity_and_the_compiled_model_meets_the_budget():
    model = _llama_with_a_sensitive_layer()
    batches = [(torch.randint(0, 128, (2, 48)),)]
    plan = attnopt.calibrate(model, batches, options={"arch": "sm80"}, mixed_precision=True,
                             budget={"model_rel_l1": 0.025})
    lin = {k: v for k, v in plan.sites.items() if v["kind"] == "linear"}
    assert len(lin) == 14  # lm_head is excluded by default
    sens = {k: v["sensitivity"]["model_rel_l1"]["w8a8"] for k, v in lin.items()}
    planted = "model.layers.1.mlp.down_proj"
    assert max(sens, key=sens.get) == planted  # measured, not assumed
    assert lin[planted]["quant"] == "none"  # alone it would spend the whole budget
    quantized = [k for k, v in lin.items() if v["quant"] != "none"]
    assert len(quantized) >= 7, {k: v["quant"] for k, v in lin.items()}
    meta = plan.meta["model_error"]
    assert meta["upper"] <= 0.025
    ids = torch.randint(0, 128, (2, 48))
    report = attnopt.inspect(model, ids, options={"arch": "sm80", "plan": plan.to_dict()})
    done = {s.module: s.details.get("format") for s in report.sites if s.kind == "linear" and s.status == "rewritten"}
    assert done == {k: lin[k]["quant"] for k in quantized}
    assert report.summary["e2e"]["rel_l1"] <= 0.025


def test_allocation_is_greedy_in_saving_per_squared_error():
    from attnopt.calibration.planner import Candidate, Site, allocate

    def site(key, time, s8, s4):  # w8a8 saves 45% of the time, w4a16 20%
        return Site(key, "linear", [Candidate("none", "none", time), Candidate("w8a8", "w8a8", 0.55 * time, 0.01, s8),
                                    Candidate("w4a16", "w4a16", 0.8 * time, 0.05, s4)])

    sites = [site("big", 100.0, 0.03, 0.2), site("small", 1.0, 0.001, 0.01), site("fragile", 10.0, 0.05, 0.3)]
    names = ["none", "w8a8", "w4a16"]
    pick = allocate(sites, target=0.04)
    assert {k: names[i] for k, i in pick.items()} == {"big": "w8a8", "small": "w8a8", "fragile": "none"}
    assert {k: names[i] for k, i in allocate(sites, target=1.0).items()} == {s.key: "w8a8" for s in sites}
    assert allocate(sites, target=0.0005) == {s.key: 0 for s in sites}
