"""fuse_quant_into_elementwise: one test per rule, the cases it must refuse, and numerics vs the unfused graph.

Each tiny module puts one elementwise producer in front of a quantized linear. The graph is taken to just
before the fusion pass (simulated quantization), copied, fused, and both copies are run on the same input:
fusion moves the quantization into the producer's kernel, so the outputs agree to float rounding.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import NewGELUActivation
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from helpers import apply_pass, count_ops, export_graph, op_targets, prepare_for
from zqcompile.passes import fuse_quant_into_elementwise
from zqcompile.passes.infra import META_FUSED_INTO, get_attr_tensor

zq = torch.ops.zq
QUANT = zq.quantize_per_token.default
K = 32


def _fuse(model: nn.Module, recipe="w8a8", example: torch.Tensor | None = None):
    """(graph before fusion, fused graph, PassResult, context, example input)."""
    x = example if example is not None else torch.randn(2, 5, K)
    gm, ctx = prepare_for(fuse_quant_into_elementwise, export_graph(model, x), recipe)
    unfused = copy.deepcopy(gm)
    result = apply_pass(fuse_quant_into_elementwise, gm, ctx)
    return unfused, gm, result, ctx, x


def assert_same_outputs(unfused, fused, x, exact: bool = True, bitwise: bool = False):
    torch.manual_seed(1)
    x = torch.randn(3, *x.shape[1:]) * 3
    with torch.no_grad():
        expected, out = unfused(x), fused(x)
    if bitwise:  # the fused op's reference is the unfused ops' composition
        assert torch.equal(out, expected)
    elif exact:
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    else:  # a different float path may move a value across a rounding tie: at most one step of a few tokens
        assert (out - expected).abs().max() <= 2e-2 * expected.abs().max()
        assert F.cosine_similarity(out.flatten(), expected.flatten(), dim=0) > 0.9999


def fused_node(gm, op):
    nodes = [n for n in gm.graph.nodes if n.target is op]
    assert len(nodes) == 1
    return nodes[0]


def unfused_reasons(ctx) -> list[str]:
    return sorted(ctx.unfused_reasons.values())


PLACEHOLDER_REASON = "input comes from a placeholder node, which no fusion rule covers"


# ---- one test per rule ------------------------------------------------------------------------------------

class PostLN(nn.Module):
    """BERT's residual block: LayerNorm(dense(x) + x), read by the next linear and the next residual."""

    def __init__(self):
        super().__init__()
        self.dense, self.norm, self.fc = nn.Linear(K, K), nn.LayerNorm(K), nn.Linear(K, K)

    def forward(self, x):
        y = self.norm(self.dense(x) + x)
        return self.fc(y) + y


def test_add_layernorm_rule_and_fp_output_feeds_the_residual():
    unfused, gm, result, ctx, x = _fuse(PostLN(), {"keep_fp": ["dense"]})
    assert result.modified and result.counters == {"fuse.add_layernorm": 1}
    node = fused_node(gm, zq.add_layernorm_quant.default)
    assert node.meta[META_FUSED_INTO] == "add_layernorm"
    assert count_ops(gm, QUANT, torch.ops.aten.layer_norm.default, torch.ops.aten.add.Tensor) == 1  # fc(y) + y
    fp_readers = [u for u in node.users if u.args[1] == 0]
    assert len(fp_readers) == 1 and fp_readers[0].users  # getitem(fused, 0) -> the residual add
    assert ctx.unfused_reasons == {}
    assert_same_outputs(unfused, gm, x)


class PreLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(K), nn.Linear(K, 16)

    def forward(self, x):
        return self.fc(self.norm(x))


def test_layernorm_rule():
    unfused, gm, result, ctx, x = _fuse(PreLN())
    assert result.counters == {"fuse.layernorm": 1}
    node = fused_node(gm, zq.layernorm_quant.default)
    assert node.args[0].op == "placeholder" and node.args[3] == 1e-5
    assert count_ops(gm, QUANT, torch.ops.aten.layer_norm.default) == 0
    assert_same_outputs(unfused, gm, x)


class RMSBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.norm, self.fc = nn.Linear(K, K), LlamaRMSNorm(K, eps=1e-6), nn.Linear(K, 16)

    def forward(self, x):
        return self.fc(self.norm(self.up(x)))


def test_rmsnorm_rule():
    model = RMSBlock()
    nn.init.uniform_(model.norm.weight, 0.5, 1.5)
    unfused, gm, result, ctx, x = _fuse(model)
    assert result.counters == {"fuse.rmsnorm": 1}
    node = fused_node(gm, zq.rmsnorm_quant.default)
    assert node.args[2] == 1e-6 and node.args[1].target == "model.norm.weight"
    assert count_ops(gm, torch.ops.aten.rsqrt.default, torch.ops.aten.pow.Tensor_Scalar) == 0
    assert unfused_reasons(ctx) == [PLACEHOLDER_REASON]  # up reads the graph input
    assert_same_outputs(unfused, gm, x)


class GeluMLP(nn.Module):
    def __init__(self, approximate: str = "none", separate_bias: bool = False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(K, 64, bias=not separate_bias), nn.Linear(64, K)
        self.bias = nn.Parameter(torch.randn(64)) if separate_bias else None
        self.approximate = approximate

    def forward(self, x):
        h = self.fc1(x)
        if self.bias is not None:
            h = h + self.bias
        return self.fc2(F.gelu(h, approximate=self.approximate))


def test_gelu_rule_without_bias():
    unfused, gm, result, ctx, x = _fuse(GeluMLP())
    assert result.counters == {"fuse.gelu": 1}
    node = fused_node(gm, zq.gelu_quant.default)
    assert node.args[0].target is torch.ops.aten.linear.default  # fc1's output
    assert node.args[1:] == (None, "none")
    assert count_ops(gm, torch.ops.aten.gelu.default) == 0
    assert_same_outputs(unfused, gm, x)


def test_gelu_rule_with_bias_and_tanh_approximation():
    unfused, gm, result, ctx, x = _fuse(GeluMLP("tanh", separate_bias=True))
    assert result.counters == {"fuse.gelu": 1}
    node = fused_node(gm, zq.gelu_quant.default)
    assert node.args[1].op == "get_attr" and node.args[1].target == "model.bias" and node.args[2] == "tanh"
    assert count_ops(gm, torch.ops.aten.gelu.default, torch.ops.aten.add.Tensor) == 0  # bias folded in
    assert_same_outputs(unfused, gm, x)


class NewGeluMLP(nn.Module):
    """GPT-2's MLP: c_fc -> gelu_new (written out in aten ops) -> c_proj."""

    def __init__(self):
        super().__init__()
        self.c_fc, self.act, self.c_proj = nn.Linear(K, 64), NewGELUActivation(), nn.Linear(64, K)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


def test_gelu_tanh_decomp_rule():
    unfused, gm, result, ctx, x = _fuse(NewGeluMLP())
    assert result.counters == {"fuse.gelu_tanh_decomp": 1}
    node = fused_node(gm, zq.gelu_quant.default)
    assert node.args[1:] == (None, "tanh")
    assert count_ops(gm, torch.ops.aten.tanh.default, torch.ops.aten.pow.Tensor_Scalar) == 0
    assert_same_outputs(unfused, gm, x, exact=False)  # fused tanh-GELU vs the aten decomposition


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(K, 64), nn.Linear(K, 64), nn.Linear(64, K)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def test_silu_mul_rule():
    unfused, gm, result, ctx, x = _fuse(SwiGLU())
    assert result.counters == {"fuse.silu_mul": 1}
    node = fused_node(gm, zq.silu_mul_quant.default)
    assert [a.meta["zq_module"] for a in node.args] == ["gate_proj", "up_proj"]
    assert count_ops(gm, torch.ops.aten.silu.default, torch.ops.aten.mul.Tensor) == 0
    assert unfused_reasons(ctx) == [PLACEHOLDER_REASON]  # gate/up share one quant of x
    assert_same_outputs(unfused, gm, x)


class GemmaNormBlock(nn.Module):
    """Gemma's RMSNorm: float32 statistics, times (1 + w) in float32, cast back to the input's dtype."""

    def __init__(self):
        super().__init__()
        self.up, self.norm, self.fc = nn.Linear(K, K), Gemma3RMSNorm(K, eps=1e-6), nn.Linear(K, 16)
        nn.init.uniform_(self.norm.weight, -0.5, 0.5)

    def forward(self, x):
        return self.fc(self.norm(self.up(x)))


def test_offset_rmsnorm_rule_stores_one_plus_w_and_drops_w():
    model = GemmaNormBlock()
    unfused, gm, result, ctx, x = _fuse(model)
    assert result.counters == {"fuse.offset_rmsnorm": 1}
    node = fused_node(gm, zq.rmsnorm_quant.default)
    assert node.args[2:] == (1e-6, True) and node.args[1].target == "model.norm.weight_plus_offset"
    torch.testing.assert_close(getattr(gm.model.norm, "weight_plus_offset"), 1.0 + model.norm.weight.detach(),
                               rtol=0, atol=0)
    assert count_ops(gm, torch.ops.aten.rsqrt.default, torch.ops.aten.type_as.default) == 0
    assert not any(n.op == "get_attr" and n.target == "model.norm.weight" for n in gm.graph.nodes)
    assert_same_outputs(unfused, gm, x)


def test_offset_rmsnorm_rule_in_bfloat16_matches_gemma():
    """The cast back comes after the (1 + w) product, in float32: the op's weight_first path."""
    model = GemmaNormBlock().to(torch.bfloat16)
    x = torch.randn(2, 5, K, dtype=torch.bfloat16)
    unfused, gm, result, ctx, _ = _fuse(model, example=x)
    assert result.counters == {"fuse.offset_rmsnorm": 1}
    node = fused_node(gm, zq.rmsnorm_quant.default)
    with torch.no_grad():
        h = model.up(x)
        y, q, scale = zq.rmsnorm_quant(h, get_attr_tensor(gm, node.args[1]), 1e-6, True)
        expected = model.norm(h)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)
    torch.testing.assert_close((q.float() * scale).to(torch.bfloat16), expected, rtol=0, atol=float(scale.max()))


class GemmaNormReadTwice(GemmaNormBlock):
    def forward(self, x):
        normed = self.norm._norm(self.up(x).float())  # the statistic also read by the output
        return self.fc((normed * (1.0 + self.norm.weight.float())).type_as(x)) + normed.sum()


def test_offset_rmsnorm_miss_when_an_intermediate_is_read_elsewhere():
    reasons = _assert_unchanged(GemmaNormReadTwice(), {"keep_fp": ["up"]})
    assert reasons == ["offset_rmsnorm: an intermediate of the (offset + w) RMSNorm is read elsewhere"]


class ReluMLP(nn.Module):
    """OPT's MLP: fc1 -> ReLU -> fc2."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(K, K), nn.Linear(K, K)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_relu_rule():
    unfused, gm, result, ctx, x = _fuse(ReluMLP())
    assert result.counters == {"fuse.relu": 1}
    node = fused_node(gm, zq.relu_quant.default)
    assert node.args[0].target is torch.ops.aten.linear.default
    assert count_ops(gm, torch.ops.aten.relu.default) == 0
    assert_same_outputs(unfused, gm, x)


class GeGLU(SwiGLU):
    """Gemma's MLP: down(gelu_tanh(gate(x)) * up(x))."""

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


def test_gelu_mul_rule():
    unfused, gm, result, ctx, x = _fuse(GeGLU())
    assert result.counters == {"fuse.gelu_mul": 1}
    node = fused_node(gm, zq.gelu_mul_quant.default)
    assert [a.meta["zq_module"] for a in node.args[:2]] == ["gate_proj", "up_proj"] and node.args[2] == "tanh"
    assert count_ops(gm, torch.ops.aten.gelu.default, torch.ops.aten.mul.Tensor) == 0
    assert_same_outputs(unfused, gm, x)


class GeGLUReadTwice(GeGLU):
    def forward(self, x):
        act = F.gelu(self.gate_proj(x))
        return self.down_proj(act * self.up_proj(x)) + act.mean()


def test_gelu_mul_miss_when_gelu_is_read_elsewhere():
    reasons = _assert_unchanged(GeGLUReadTwice(), {"keep_fp": ["gate_proj", "up_proj"]})
    assert reasons == ["gelu_mul: gelu(gate) is read elsewhere or broadcasts against up"]


class ParallelBlock(nn.Module):
    """GPT-J's block: attention and MLP both read one LayerNorm output (here as two linears)."""

    def __init__(self):
        super().__init__()
        self.norm, self.q, self.fc_in = nn.LayerNorm(K), nn.Linear(K, K), nn.Linear(K, 64)

    def forward(self, x):
        h = self.norm(x)
        return self.q(h).sum(-1) + self.fc_in(h).sum(-1) + x.sum(-1)


def test_parallel_attention_and_mlp_share_one_fused_quantize():
    unfused, gm, result, ctx, x = _fuse(ParallelBlock())
    assert result.counters == {"fuse.layernorm": 1}
    node = fused_node(gm, zq.layernorm_quant.default)
    readers = {lin.meta["zq_module"] for g in node.users for d in g.users for lin in d.users}
    assert readers == {"q", "fc_in"}
    assert_same_outputs(unfused, gm, x)


class MaskedLayerNorm(nn.Module):
    """DeBERTa's embeddings: LayerNorm(x + positions) (a broadcast add: add_layernorm misses, layernorm takes it)
    times one factor per token (its padding mask; here zero, negative and positive), read by a linear and by the
    residual."""

    def __init__(self, per_token: bool = True):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(K), nn.Linear(K, K)
        self.positions = nn.Parameter(torch.randn(5, K))
        self.per_token = per_token

    def forward(self, x):
        factor = x[..., :1] * (x[..., 1:2] > 0) if self.per_token else x[0, 0]
        y = self.norm(x + self.positions) * factor
        return self.fc(y) + y


def test_token_scaled_rule_fuses_into_the_norm_and_scales_the_scale():
    unfused, gm, result, ctx, x = _fuse(MaskedLayerNorm())
    assert result.counters == {"fuse.token_scaled": 1}
    node = fused_node(gm, zq.layernorm_quant.default)
    assert node.meta[META_FUSED_INTO] == "token_scaled"
    assert count_ops(gm, QUANT) == 0 and count_ops(gm, torch.ops.aten.layer_norm.default) == 0
    assert count_ops(gm, torch.ops.aten.mul.Tensor) == 3  # the factor's own, y * m for the residual, scale * m
    assert_same_outputs(unfused, gm, x, exact=False)


class StoredTable(nn.Module):
    """DeBERTa's relative-position embeddings: a stored table, re-viewed, read by two linears (its layers)."""

    def __init__(self, runtime_size: bool = False):
        super().__init__()
        self.table = nn.Parameter(torch.randn(8, K))
        self.fc, self.first, self.second = nn.Linear(K, K), nn.Linear(K, K), nn.Linear(K, K)
        self.runtime_size = runtime_size

    def rows(self, x):
        return self.table.expand(x.shape[0], 8, K) if self.runtime_size else self.table.unsqueeze(0)

    def forward(self, x):  # each layer re-views the table itself
        return self.fc(x) + (self.first(self.rows(x)) + self.second(self.rows(x))).mean(1, keepdim=True)


def test_stored_rule_quantizes_a_constant_once_ahead_of_time():
    model = StoredTable()
    unfused, gm, result, ctx, x = _fuse(model, {"keep_fp": ["fc"]})
    assert result.counters == {"fuse.stored": 2}
    assert count_ops(gm, QUANT) == 0
    stored = [n for n in gm.graph.nodes if n.meta.get(META_FUSED_INTO) == "stored"]
    assert len(stored) == 2  # one (q, scale) pair for both readers
    q, scale = sorted((get_attr_tensor(gm, n) for n in stored), key=lambda t: t.dtype != torch.int8)
    table = model.table.detach().double()[None]  # per row: scale = absmax / 127, q = round(row / scale)
    expected_scale = table.abs().amax(-1, keepdim=True) / 127
    assert torch.equal(q.double(), torch.round(table / expected_scale))
    torch.testing.assert_close(scale.double(), expected_scale, rtol=1e-6, atol=0)
    assert_same_outputs(unfused, gm, x)


# ---- cases the pass must leave alone (and say why) ------------------------------------------------------

def _assert_unchanged(model, recipe="w8a8"):
    x = torch.randn(2, 5, K)
    gm, ctx = prepare_for(fuse_quant_into_elementwise, export_graph(model, x), recipe)
    before = op_targets(gm)
    result = apply_pass(fuse_quant_into_elementwise, gm, ctx)
    assert not result.modified and result.counters == {}
    assert op_targets(gm) == before
    return unfused_reasons(ctx)


class GeluReadTwice(GeluMLP):
    def forward(self, x):
        g = F.gelu(self.fc1(x))
        return self.fc2(g) + g.mean(-1, keepdim=True)


def test_gelu_output_read_elsewhere_is_not_fused():
    reasons = _assert_unchanged(GeluReadTwice(), {"keep_fp": ["fc1"]})
    assert reasons == ["gelu: aten.gelu.default output is also read by ['mean', 'quantize_per_token_default']"]


class NewGeluTanhReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(K, K)

    def forward(self, x):
        t = torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))
        return self.fc(0.5 * x * (1.0 + t)) + t


def test_tanh_gelu_with_an_intermediate_read_elsewhere_is_not_fused():
    reasons = _assert_unchanged(NewGeluTanhReadTwice())
    assert reasons == ["gelu_tanh_decomp: an intermediate of the tanh-GELU is read elsewhere"]


class SiluReadTwice(SwiGLU):
    def forward(self, x):
        gate = F.silu(self.gate_proj(x))
        return self.down_proj(gate * self.up_proj(x)) + gate.sum(-1, keepdim=True)


def test_silu_read_elsewhere_is_not_fused():
    reasons = _assert_unchanged(SiluReadTwice(), {"keep_fp": ["gate_proj", "up_proj"]})
    assert reasons == ["silu_mul: silu(gate) is read elsewhere or broadcasts against up"]


class RMSNormVarianceReadTwice(nn.Module):
    """Llama's RMSNorm written out, with its variance also returned."""

    def __init__(self):
        super().__init__()
        self.weight, self.fc = nn.Parameter(torch.ones(K)), nn.Linear(K, K)

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        normed = self.weight * (x * torch.rsqrt(variance + 1e-6)).to(x.dtype)
        return self.fc(normed) + variance


def test_rmsnorm_with_an_intermediate_read_elsewhere_is_not_fused():
    assert _assert_unchanged(RMSNormVarianceReadTwice()) == [
        "rmsnorm: an intermediate of the RMSNorm is read elsewhere"]


class LayerNorm2D(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(K, K)

    def forward(self, x):
        return self.fc(F.layer_norm(x, x.shape[-2:]))


def test_layernorm_over_two_dims_is_not_fused():
    assert _assert_unchanged(LayerNorm2D()) == ["layernorm: LayerNorm over 2 dims (only the last dim is supported)"]


class SigmoidMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(K, K), nn.Linear(K, K)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x)).reshape(x.shape))


def test_producer_no_rule_covers_is_recorded_through_layout_ops():
    assert _assert_unchanged(SigmoidMLP()) == [
        "input comes from a placeholder node, which no fusion rule covers",
        "input comes from aten.reshape.default of aten.sigmoid.default, which no fusion rule covers"]


def test_a_per_channel_factor_is_not_token_scaled():
    """``y * m`` with m one number per channel: the row absmax of y * m is not |m| times y's; nothing changes."""
    assert _assert_unchanged(MaskedLayerNorm(per_token=False)) == [
        "input comes from aten.mul.Tensor, which no fusion rule covers"]


def test_a_constant_re_viewed_with_run_time_sizes_is_not_stored():
    reasons = _assert_unchanged(StoredTable(runtime_size=True), {"keep_fp": ["fc"]})
    assert set(reasons) == {"stored: the stored tensor is re-viewed with sizes known only at run time"}


def test_weight_only_recipe_has_nothing_to_fuse():
    assert _assert_unchanged(PreLN(), "w8a16") == []


class BroadcastAddLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.shift, self.norm, self.fc = nn.Parameter(torch.randn(K)), nn.LayerNorm(K), nn.Linear(K, K)

    def forward(self, x):
        return self.fc(self.norm(x + self.shift))


class ResidualSumReadTwice(PostLN):
    def forward(self, x):
        total = self.dense(x) + x
        return self.fc(self.norm(total)) + total


def test_add_layernorm_refusals_fall_back_to_the_layernorm_rule():
    """A broadcasting add, or a residual sum read elsewhere, keeps its add; the LayerNorm alone still fuses."""
    for model, recipe in ((BroadcastAddLN(), "w8a8"), (ResidualSumReadTwice(), {"keep_fp": ["dense"]})):
        unfused, gm, result, ctx, x = _fuse(model, recipe)
        assert result.counters == {"fuse.layernorm": 1}
        assert count_ops(gm, zq.add_layernorm_quant.default) == 0 and count_ops(gm, torch.ops.aten.add.Tensor) >= 1
        assert fused_node(gm, zq.layernorm_quant.default).args[0].target is torch.ops.aten.add.Tensor
        assert_same_outputs(unfused, gm, x)


# ---- online Hadamard (rotation presets: the transform before o_proj / down_proj) ---------------------------

ROTATED = "w8a8-rot"


def test_online_hadamard_rule_folds_the_swiglu_and_the_transform():
    unfused, gm, result, ctx, x = _fuse(SwiGLU(), ROTATED)
    assert count_ops(unfused, zq.hadamard.default) == 1
    assert result.counters == {"fuse.online_hadamard": 1}
    node = fused_node(gm, zq.silu_mul_hadamard_quant.default)
    assert [a.meta["zq_module"] for a in node.args[:2]] == ["gate_proj", "up_proj"] and node.args[2] == 64
    assert count_ops(gm, zq.hadamard.default, torch.ops.aten.silu.default, torch.ops.aten.mul.Tensor) == 0
    assert_same_outputs(unfused, gm, x, bitwise=True)


def test_online_hadamard_rule_folds_a_geglu():
    unfused, gm, result, ctx, x = _fuse(GeGLU(), ROTATED)
    assert result.counters == {"fuse.online_hadamard": 1}
    assert fused_node(gm, zq.gelu_mul_hadamard_quant.default).args[2:] == ("tanh", 64)
    assert count_ops(gm, zq.hadamard.default, torch.ops.aten.gelu.default) == 0
    assert_same_outputs(unfused, gm, x, bitwise=True)


def test_online_hadamard_alone_when_the_gated_product_cannot_fuse():
    unfused, gm, result, ctx, x = _fuse(SiluReadTwice(), {"base": ROTATED, "keep_fp": ["gate_proj", "up_proj"]})
    assert result.counters == {"fuse.online_hadamard": 1}
    node = fused_node(gm, zq.hadamard_quant.default)
    assert node.args[0].target is torch.ops.aten.mul.Tensor and node.args[1] == 64
    assert count_ops(gm, zq.hadamard.default) == 0 and count_ops(gm, torch.ops.aten.silu.default) == 1
    assert_same_outputs(unfused, gm, x, bitwise=True)


def test_rotated_llama_fused_is_bit_identical_to_the_unfused_sequence(monkeypatch):
    """On a whole model, against the same compile with the online_hadamard rule left out (today's standalone
    ``zq.hadamard`` + ``quantize_per_token``)."""
    import importlib

    import zqcompile
    from helpers import TINY_MODELS, token_batch

    fuse_module = importlib.import_module("zqcompile.passes.fuse_quant_into_elementwise")  # not the pass function

    model, ids = TINY_MODELS["llama"](), token_batch(3, 12, seed=2)
    fused = zqcompile.compile(model, ROTATED, generation=False)
    gm = fused.graph_module
    assert count_ops(gm, zq.silu_mul_hadamard_quant.default) == 2 and count_ops(gm, zq.hadamard_quant.default) == 2
    assert count_ops(gm, zq.hadamard.default) == 0
    monkeypatch.setattr(fuse_module, "RULES", tuple(r for r in fuse_module.RULES if r.name != "online_hadamard"))
    unfused = zqcompile.compile(model, ROTATED, generation=False)
    assert count_ops(unfused.graph_module, zq.hadamard.default) == 4
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, unfused(input_ids=ids).logits)
