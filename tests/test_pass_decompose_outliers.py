"""decompose_outliers: LLM.int8()'s outlier columns are FP16 copies of the weight's, the rest INT8; the op
against a float64 reference; save/load; ONNX export refuses it."""

from __future__ import annotations

import pytest
import torch

import zqcompile
from helpers import make_tiny_llama, token_batch
from zqcompile.passes.infra import META_MODULE, get_attr_tensor
from zqcompile.quant import dequantize_weight_values, quantize_rows, quantize_weight, unpack_weight

zq = torch.ops.zq


def test_outlier_op_against_a_float64_reference():
    torch.manual_seed(0)
    x = torch.randn(5, 32)
    x[:, [3, 17]] *= 40  # two outlier channels
    weight = torch.randn(16, 32)
    columns = torch.tensor([3, 17])
    q, scale, _ = quantize_weight(weight.index_fill(1, columns, 0), 8)
    w_outlier = weight[:, columns].half()
    got = zq.outlier_int8_linear(x, q, scale, columns, w_outlier, None, torch.float32)
    rest = x.clone()
    rest[:, columns] = 0
    xq, xs = quantize_rows(rest)
    expected = ((xq.double() * xs.double()) @ dequantize_weight_values(q, scale).double().T
                + x[:, columns].double() @ weight[:, columns].half().double().T)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.all(q[:, columns] == 0)


def test_compiled_outlier_columns_are_bit_exact_fp16_copies(tmp_path):
    model = make_tiny_llama()
    qmodel = zqcompile.compile(model, {"base": "w8a8", "outlier_threshold": 2.0}, generation=False)
    gm = qmodel.graph_module
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is zq.outlier_int8_linear.default]
    assert nodes and qmodel.context.counters["llm_int8.decomposed"] == len(nodes)
    for node in nodes:
        weight = model.get_submodule(node.meta[META_MODULE]).weight.detach()
        columns = get_attr_tensor(gm, node.args[3])
        w_outlier = get_attr_tensor(gm, node.args[4])
        assert w_outlier.dtype == torch.float16
        assert torch.equal(w_outlier, weight[:, columns].half())  # bit-exact FP16 copies
        stored = unpack_weight(get_attr_tensor(gm, node.args[1]), get_attr_tensor(gm, node.args[2]))
        assert torch.all(stored[:, columns] == 0)
    assert "FP16 outlier columns" in zqcompile.inspect(qmodel, code=False)
    qmodel.save(tmp_path / "int8")
    loaded = zqcompile.load(tmp_path / "int8")
    ids = token_batch(2, 9)
    with torch.no_grad():
        assert torch.equal(qmodel(input_ids=ids).logits, loaded(input_ids=ids).logits)
    with pytest.raises(zqcompile.ZQError, match="ONNX export does not translate zq.outlier_int8_linear"):
        zqcompile.export_onnx(qmodel, None, tmp_path / "m.onnx")
