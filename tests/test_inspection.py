"""inspect (the per-layer table), to_networkx (+ DOT) and report_error (per-layer SQNR / cosine vs FP)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import zqcompile
from helpers import make_tiny_bert, make_tiny_gpt2, token_batch
from zqcompile.inspection import stored_tensors

MIXED_RECIPE = {"base": "w4a8", "keep_fp": ["role:classifier", "encoder.layer.0.attention.self.*"]}


@pytest.fixture(scope="module")
def mixed_bert():
    """Tiny BERT with INT4 MLPs, INT8 attention, and layer 0's q/k/v and the pooler kept FP."""
    model = make_tiny_bert()
    return model, zqcompile.compile(model, MIXED_RECIPE)


def _row(table: str, module: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(module + " "))
    return [cell for cell in line.split("  ") if cell.strip()]


def test_inspect_table_rows(mixed_bert):
    _, qmodel = mixed_bert
    text = zqcompile.inspect(qmodel)
    assert text.startswith("zqcompile: BertModel, recipe w4a8+custom, backend cpu, torch.float32 on cpu")
    assert [c.strip() for c in _row(text, "encoder.layer.0.attention.self.query")] == [
        "encoder.layer.0.attention.self.query", "attn_qkv", "FP", "FP", "FP", "-", "16.0", "16.0",
        "keep_fp encoder.layer.0.attention.self.*", "-"]  # rounding: none (FP)
    assert [c.strip() for c in _row(text, "encoder.layer.1.attention.self.key")] == [
        "encoder.layer.1.attention.self.key", "attn_qkv", "W8A8", "INT8 per-channel", "INT8 per-token",
        "add_layernorm_quant (add_layernorm)", "16.0", "4.2", "recipe w4a8+custom", "rtn"]  # 64*64 + 64*4 bytes
    assert [c.strip() for c in _row(text, "encoder.layer.1.output.dense")] == [
        "encoder.layer.1.output.dense", "mlp_out", "W4A8", "INT4 per-channel, 64 cols/group", "INT8 per-token",
        "gelu_quant (gelu)", "32.0", "4.5", "override role:mlp_*", "rtn"]  # 64*128/2 + 64*2*4 bytes
    assert "standalone quantize_per_token: input comes from aten.reshape" in " ".join(
        _row(text, "encoder.layer.1.attention.output.dense"))
    assert [c.strip() for c in _row(text, "pooler.dense")][2:] == ["FP", "FP", "FP", "-", "16.0", "16.0",
                                                                   "keep_fp role:classifier", "-"]
    counters = next(line for line in text.splitlines() if line.startswith("pass counters: "))
    for counter in ("annotate_roles=13", "fuse.add_layernorm=3", "fuse.gelu=2", "insert_activation_quant=7",
                    "lower.int4_linear=4", "lower.int8_linear=5", "plan_linears.quantized=9"):
        assert counter in counters.removeprefix("pass counters: ").split(", ")
    assert f"weights: {qmodel.weight_memory()}" in text
    assert "graph:" in text and "torch.ops.zq.int4_linear.default(" in text
    assert "graph:" not in zqcompile.inspect(qmodel, code=False)


def test_tied_embedding_and_lm_head_are_counted_once(compiled_tiny):
    """GPT-2 ties wte and lm_head: the compiled model stores that tensor once, and the total counts it once."""
    fp_model, qmodel = compiled_tiny("gpt2", "w8a8")
    assert fp_model.lm_head.weight is fp_model.transformer.wte.weight
    memory = qmodel.weight_memory()
    by_name = qmodel.graph_module.state_dict(keep_vars=True)
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in by_name.values()}  # one entry per tensor
    assert memory.total == sum(unique.values())
    embedding = fp_model.lm_head.weight.numel() * 4
    fp_tensors = {t.data_ptr(): t.numel() * 4 for t in fp_model.state_dict(keep_vars=True).values()}
    # what the compiled model holds besides the embedding is what the FP model holds besides it, quantized
    assert memory.total - embedding == (sum(fp_tensors.values()) - embedding - memory.quantized_before
                                        + memory.quantized_after)
    names = [n for n, t in by_name.items() if t.data_ptr() == fp_model.lm_head.weight.data_ptr()]
    assert memory.shared == ((tuple(sorted(names)),) if len(names) > 1 else ())


def test_stored_tensors_counts_views_of_one_storage_by_the_bytes_they_cover():
    module = nn.Module()
    base = torch.zeros(10, 4)
    module.register_buffer("top", base[:6])  # rows 0-5
    module.register_buffer("bottom", base[4:8])  # rows 4-7: overlaps the top by two rows
    module.register_buffer("other", torch.zeros(3))
    module.register_buffer("alias", module.other)  # the same tensor under a second name
    stored = stored_tensors(module)
    assert stored.bytes == 8 * 4 * 4 + 3 * 4  # rows 0-7 of base once, `other` once
    assert stored.shared == (("alias", "other"),)


def test_inspect_shows_group_sizes():
    qmodel = zqcompile.compile(make_tiny_bert(), {"group_size": 16, "overrides": [
        {"role": "mlp_out", "weight_bits": 4, "input_group_size": 32}]})
    text = zqcompile.inspect(qmodel, code=False)
    assert _row(text, "encoder.layer.0.attention.self.query")[3].strip() == "INT8 16 rows/group"
    assert _row(text, "encoder.layer.0.output.dense")[3].strip() == "INT4 16 rows/group, 32 cols/group"


def test_inspect_shows_asymmetric_int4_and_counts_its_mins(compiled_tiny):
    _, qmodel = compiled_tiny("llama", "w4a8-asym")
    text = zqcompile.inspect(qmodel, code=False)
    row = _row(text, "model.layers.0.mlp.down_proj")  # [64, 128]: 64 x 4 groups of 32
    assert row[3].strip() == "INT4 asym, per-channel, 32 cols/group"
    packed, scales_and_mins = 64 * 128 // 2, 2 * 64 * 4 * 4
    assert float(row[7]) == pytest.approx((packed + scales_and_mins) / 1024, abs=0.05)


def test_to_networkx_attributes_and_dot_file(mixed_bert, tmp_path):
    _, qmodel = mixed_bert
    dot = tmp_path / "graph.dot"
    graph = zqcompile.to_networkx(qmodel, dot_path=str(dot))
    gm_nodes = list(qmodel.graph_module.graph.nodes)
    assert graph.number_of_nodes() == len(gm_nodes)
    assert graph.number_of_edges() == sum(len(set(n.all_input_nodes)) for n in gm_nodes)
    key = next(n for n in gm_nodes if n.meta.get("zq_module") == "encoder.layer.1.attention.self.key")
    attrs = graph.nodes[key.name]
    batch, seq = qmodel.example_inputs[0].shape
    assert attrs == {"op": "zq.int8_linear.default", "kind": "call_function", "role": "attn_qkv",
                     "module": "encoder.layer.1.attention.self.key", "dtype": "torch.float32",
                     "shape": str((batch, seq, 64))}
    q_input, scale_input = key.args[0], key.args[1]
    assert graph.nodes[q_input.name]["dtype"] == "torch.int8"
    assert graph.nodes[scale_input.name]["shape"] == str((batch, seq, 1))
    assert graph.has_edge(q_input.name, key.name)
    assert graph.nodes[next(n.name for n in gm_nodes if n.op == "placeholder")]["dtype"] == "torch.int64"
    text = dot.read_text()
    assert text.startswith("digraph zqcompile {") and text.rstrip().endswith("}")
    assert text.count(" -> ") == graph.number_of_edges()
    assert f'"{q_input.name}" -> "{key.name}";' in text
    assert f"{key.name}\\nzq.int8_linear.default\\ntorch.float32 ({batch}, {seq}, 64)" in text


def test_report_error_per_layer(mixed_bert):
    model, qmodel = mixed_bert
    report = zqcompile.report_error(model, qmodel, {"input_ids": token_batch(2, 6)})
    assert [r.module for r in report] == list(qmodel.context.plans)
    by_module = {r.module: r for r in report}
    fp_query = by_module["encoder.layer.0.attention.self.query"]
    assert (fp_query.kind, fp_query.sqnr_db, fp_query.cosine) == ("FP", math.inf, pytest.approx(1.0))
    for row in report:
        print(f"{row.module:45s} {row.kind:5s} {row.sqnr_db:7.2f} dB cos {row.cosine:.5f}")
        if row.kind == "W8A8":
            assert row.sqnr_db > 35 and row.cosine > 0.999
        elif row.kind == "W4A8":
            assert 12 < row.sqnr_db < 30 and row.cosine > 0.98  # INT4 weights: measured 16-20 dB
    text = zqcompile.format_error_report(report)
    assert text.splitlines()[0].split() == ["module", "role", "kind", "SQNR", "dB", "cosine"]
    assert len(text.splitlines()) == len(report) + 1


def test_report_error_sqnr_matches_a_direct_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    qmodel = zqcompile.compile(model, "w4a8", example_inputs=(torch.randn(2, 64),))
    x = torch.randn(8, 64)
    (row,) = zqcompile.report_error(model, qmodel, (x,))
    with torch.no_grad():
        y, y_q = model(x).double(), qmodel(x).double()
    assert row.module == "0" and row.kind == "W8A8"  # role "other" keeps the preset's INT8
    assert row.sqnr_db == pytest.approx(10 * math.log10(y.pow(2).sum() / (y - y_q).pow(2).sum()), rel=1e-6)
    assert row.cosine == pytest.approx(torch.nn.functional.cosine_similarity(y.flatten(), y_q.flatten(), dim=0)
                                       .item(), rel=1e-9)
