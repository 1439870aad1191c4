"""calibrate_activations + smooth_activations on tiny hand-built modules: what is folded, what is refused.

Smoothing must leave the floating-point function unchanged (checked against the original module in float64)
and must lower the INT8 error on activations with an outlier channel, the case it exists for.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import zqcompile
from zqcompile.capture import capture
from zqcompile.passes.infra import get_attr_tensor
from zqcompile.pipeline import run_pipeline
from zqcompile.recipe import Recipe

SMOOTH = Recipe(name="smooth", smooth_alpha=0.5, keep_fp=[])
NO_SMOOTH = Recipe(name="plain", keep_fp=[])
K = 16


class PreNormAttentionInput(nn.Module):
    """LayerNorm read only by two linears (pre-LN: the residual reads the norm's input, not its output)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(K)
        self.q = nn.Linear(K, 8)
        self.k = nn.Linear(K, 8)
        with torch.no_grad():
            self.norm.weight.copy_(torch.linspace(0.5, 1.5, K))
            self.norm.weight[3] = 40.0  # an outlier channel, as in real transformers
            self.norm.bias.uniform_(-0.1, 0.1)

    def forward(self, x):
        h = self.norm(x)
        return x + self.q(h).sum(-1, keepdim=True) * self.k(h)[..., :1]


class PostNormResidual(nn.Module):
    """BERT-style: the LayerNorm output feeds a linear AND the residual, so folding would change the residual."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(K)
        self.proj = nn.Linear(K, K)

    def forward(self, x):
        h = self.norm(x)
        return h + self.proj(h)


class RMSNormSwiGLU(nn.Module):
    """Llama's MLP behind its RMSNorm (or Gemma's GeGLU, ``activation="gelu"``): smoothing folds into the norm weight
    and into up_proj's rows."""

    def __init__(self, activation: str = "silu"):
        super().__init__()
        self.activation = getattr(nn.functional, activation)
        self.weight = nn.Parameter(torch.linspace(0.5, 2.0, K))
        self.gate_proj = nn.Linear(K, 32, bias=False)
        self.up_proj = nn.Linear(K, 32, bias=False)
        self.down_proj = nn.Linear(32, K, bias=False)
        with torch.no_grad():
            self.up_proj.weight[5] *= 30.0  # an outlier channel of silu(gate) * up

    def forward(self, x):
        normed = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        h = self.weight * normed
        return x + self.down_proj(self.activation(self.gate_proj(h)) * self.up_proj(h))


def _smoothed_graph(module: nn.Module, recipe: Recipe, calibration: torch.Tensor):
    captured = capture(module, (calibration,))
    result = run_pipeline(captured.graph_module, recipe, stop_after="smooth", calibration_inputs=[(calibration,)])
    return result.compiled, result.context


def test_layernorm_fold_matches_hand_computed_factors_and_keeps_the_function():
    torch.manual_seed(0)
    module = PreNormAttentionInput().eval()
    calibration = torch.randn(4, 6, K)
    gm, ctx = _smoothed_graph(module, SMOOTH, calibration)
    assert ctx.counters["smooth.layernorm"] == 1 and not ctx.smooth_skipped

    # factors by hand: absmax of the norm's output per channel, max |W| per input column over q and k
    with torch.no_grad():
        absmax = module.norm(calibration).abs().flatten(0, -2).amax(0)
    w_max = torch.maximum(module.q.weight.abs().amax(0), module.k.weight.abs().amax(0))
    factors = absmax.sqrt() / w_max.sqrt()
    smoothed_norm_weight = next(get_attr_tensor(gm, n) for n in gm.graph.nodes
                                if n.op == "get_attr" and n.target.startswith("model.norm.weight_smoothed"))
    torch.testing.assert_close(smoothed_norm_weight, module.norm.weight.detach() / factors, rtol=1e-5, atol=0)

    test_input = torch.randn(3, 6, K)
    with torch.no_grad():
        torch.testing.assert_close(gm(test_input).double(), module(test_input).double(), rtol=1e-4, atol=1e-5)
    assert module.norm.weight[3].item() == 40.0  # the user's module is not modified


def test_smoothing_lowers_the_int8_error_on_an_outlier_channel():
    torch.manual_seed(0)
    module = PreNormAttentionInput().eval()
    calibration = torch.randn(4, 6, K)
    test_input = torch.randn(8, 6, K)
    with torch.no_grad():
        reference = module(test_input).double()
        errors = {}
        for recipe in (NO_SMOOTH, SMOOTH):
            qmodel = zqcompile.compile(module, recipe, example_inputs=(calibration,))
            errors[recipe.name] = (qmodel(test_input).double() - reference).norm().item()
    assert errors["smooth"] < 0.5 * errors["plain"], errors


@pytest.mark.parametrize("activation, rule", [("silu", "swiglu"), ("gelu", "geglu")])
def test_rmsnorm_and_gated_activation_folds_keep_the_function(activation, rule):
    torch.manual_seed(0)
    module = RMSNormSwiGLU(activation).eval()
    calibration = torch.randn(4, 6, K)
    gm, ctx = _smoothed_graph(module, SMOOTH, calibration)
    assert ctx.counters["smooth.rmsnorm"] == 1
    assert ctx.counters[f"smooth.{rule}"] == 1 and not ctx.smooth_skipped
    smoothed_up = next(get_attr_tensor(gm, n) for n in gm.graph.nodes
                       if n.op == "get_attr" and n.target.startswith("model.up_proj.weight_smoothed"))
    assert not torch.equal(smoothed_up, module.up_proj.weight.detach())  # its rows divided
    test_input = torch.randn(2, 6, K)
    with torch.no_grad():
        torch.testing.assert_close(gm(test_input).double(), module(test_input).double(), rtol=1e-4, atol=1e-5)


def test_post_norm_residual_gets_the_unsmoothed_value_back():
    torch.manual_seed(0)
    module = PostNormResidual().eval()
    calibration = torch.randn(2, 4, K)
    gm, ctx = _smoothed_graph(module, SMOOTH, calibration)
    assert ctx.counters["smooth.layernorm"] == 1 and ctx.counters["smooth.residual_restored"] == 1
    # the residual add now reads norm * s, the linear the smoothed norm itself
    add = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.add.Tensor)
    assert any(isinstance(a, torch.fx.Node) and a.target is torch.ops.aten.mul.Tensor for a in add.args)
    test_input = torch.randn(3, 4, K)
    with torch.no_grad():
        torch.testing.assert_close(gm(test_input).double(), module(test_input).double(), rtol=1e-4, atol=1e-5)


def test_activation_without_a_rule_is_left_alone_with_a_reason():
    module = nn.Sequential(nn.Linear(K, K), nn.GELU(), nn.Linear(K, K)).eval()
    gm, ctx = _smoothed_graph(module, SMOOTH, torch.randn(2, K))
    assert not any(key.startswith("smooth.") for key in ctx.counters)
    assert any("no smoothing rule covers" in reason for reason in ctx.smooth_skipped.values())
    assert not any("smoothed" in str(n.target) for n in gm.graph.nodes if n.op == "get_attr")


def test_no_smooth_alpha_changes_nothing():
    module = PreNormAttentionInput().eval()
    calibration = torch.randn(2, 4, K)
    captured = capture(module, (calibration,))
    before = captured.graph_module.code
    result = run_pipeline(captured.graph_module, NO_SMOOTH, stop_after="smooth")
    gm, ctx = result.compiled, result.context
    assert gm.code == before
    assert "calibrate_activations" not in ctx.counters and not ctx.activation_absmax


def test_bad_smoothing_inputs_raise_clear_errors():
    with pytest.raises(zqcompile.ZQError, match="smooth_alpha must be a number in"):
        Recipe(smooth_alpha=1.5)
    module = PreNormAttentionInput().eval()
    captured = capture(module, (torch.randn(2, 4, K),))
    with pytest.raises(zqcompile.ZQError, match="needs calibration inputs"):
        run_pipeline(captured.graph_module, SMOOTH, stop_after="smooth")


def _tiny_hf_smoothed(make_model):
    model = make_model()
    captured = capture(model)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = tuple(torch.ones_like(ids) if name == "attention_mask" else torch.zeros_like(ids) if
                   name == "token_type_ids" else ids for name in captured.input_names)
    result = run_pipeline(captured.graph_module, SMOOTH, stop_after="smooth", calibration_inputs=[inputs])
    gm, ctx = result.compiled, result.context
    return model, gm, ctx, ids


def test_attention_fold_with_grouped_query_heads_keeps_the_function():
    from helpers import make_tiny_llama  # 4 query heads sharing 2 KV heads

    model, gm, ctx, ids = _tiny_hf_smoothed(make_tiny_llama)
    assert ctx.counters["smooth.attention"] == 2  # one o_proj input per block
    assert ctx.counters["smooth.rmsnorm"] == 4 and ctx.counters["smooth.swiglu"] == 2
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(gm(ids, torch.ones_like(ids))[0], expected, rtol=1e-4, atol=1e-4)
    v_proj = model.model.layers[0].self_attn.v_proj.weight.detach()
    smoothed = next(get_attr_tensor(gm, n) for n in gm.graph.nodes
                    if n.op == "get_attr" and "layers.0.self_attn.v_proj.weight_smoothed" in n.target)
    ratios = (v_proj / smoothed)[:, 0]  # each V row divided by its channel's factor
    assert not torch.allclose(ratios, torch.ones_like(ratios))


def test_fused_qkv_attention_is_refused_with_a_reason():
    from helpers import make_tiny_gpt2  # GPT-2 splits one c_attn output into q, k and v

    _, _, ctx, _ = _tiny_hf_smoothed(make_tiny_gpt2)
    assert "smooth.attention" not in ctx.counters
    assert any("value projection is not a linear" in reason for reason in ctx.smooth_skipped.values())


def test_a_fold_that_changes_the_function_is_caught(monkeypatch):
    from helpers import make_tiny_llama
    smoothing = importlib.import_module("zqcompile.passes.smooth_activations")  # the module, not the pass

    # a wrong channel mapping for grouped heads (tile instead of repeat) must not pass silently
    monkeypatch.setattr(smoothing.Source, "expand",
                        lambda self, f: f.view(-1, self.head_dim).repeat(self.shared_by, 1).reshape(-1))
    with pytest.raises(zqcompile.ZQError, match="smoothing changed the model's outputs"):
        _tiny_hf_smoothed(make_tiny_llama)


class PlainLayerNormLinear(nn.Module):
    """A LayerNorm without affine parameters: nothing stored to divide."""

    def __init__(self):
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(K, elementwise_affine=False), nn.Linear(K, K)

    def forward(self, x):
        return self.proj(self.norm(x))


class SwiGLUReadTwice(RMSNormSwiGLU):
    """silu(gate) * up also feeds the output: dividing up_proj would change that reader."""

    def forward(self, x):
        mixed = nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(mixed) + mixed.sum(-1, keepdim=True)


def test_rule_misses_leave_the_graph_unchanged_with_their_reasons():
    for module, reason in (
            (PlainLayerNormLinear(), "layernorm: the LayerNorm has no stored affine weight to fold the smoothing into"),
            (SwiGLUReadTwice(), "swiglu: its output is also read by ['sum_1']")):
        calibration = torch.randn(2, 4, K)
        # the graph as the smooth phase receives it (the phases before it drop dead nodes such as unread weights)
        before = run_pipeline(capture(module.eval(), (calibration,)).graph_module, SMOOTH, stop_after="distill",
                              calibration_inputs=[(calibration,)]).compiled.code
        gm, ctx = _smoothed_graph(module, SMOOTH, calibration)
        assert reason in ctx.smooth_skipped.values(), ctx.smooth_skipped
        assert not any(key.startswith("smooth.") for key in ctx.counters)
        assert gm.code == before
