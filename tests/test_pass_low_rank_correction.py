"""low_rank_correction: LoRC's FP16 factors are the truncated SVD of the stored weight's error, applied to the
input the integer GEMM reads; the model saves and loads with them."""

from __future__ import annotations

import torch

import zqcompile
from helpers import make_tiny_llama, token_batch
from zqcompile.passes.infra import META_MODULE, get_attr_tensor
from zqcompile.quant import dequantize_weight_values, unpack_weight

zq = torch.ops.zq


def test_factors_are_the_truncated_svd_of_the_stored_error_and_read_the_gemms_input(tmp_path):
    model = make_tiny_llama()
    qmodel = zqcompile.compile(model, {"base": "w4a8", "lorc_rank": 4})
    gm = qmodel.graph_module
    corrections = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is zq.low_rank_correction.default]
    assert len(corrections) == 14 and qmodel.context.counters["lorc.corrected"] == 14
    for node in corrections:
        linear, x, a_node, b_node = node.args
        a, b = get_attr_tensor(gm, a_node), get_attr_tensor(gm, b_node)
        assert a.dtype == b.dtype == torch.float16 and a.shape[1] == b.shape[0] == 4
        # the correction reads the linear's own dequantized INT8 input
        assert x.target is zq.dequantize_per_token.default and x.args[:2] == linear.args[:2]
        w_q, w_scale = get_attr_tensor(gm, linear.args[2]), get_attr_tensor(gm, linear.args[3])
        stored = dequantize_weight_values(unpack_weight(w_q, w_scale), w_scale)
        weight = model.get_submodule(linear.meta[META_MODULE]).weight.detach()
        u, s, vh = torch.linalg.svd((weight - stored).double())
        truncated = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        assert (a.double() @ b.double() - truncated).abs().max() < 2e-3 * truncated.abs().max()
    # the correction brings the compiled model closer to the FP model
    plain = zqcompile.compile(model, "w4a8")
    ids = token_batch(2, 12)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        error = (qmodel(input_ids=ids).logits - reference).pow(2).mean()
        assert error < (plain(input_ids=ids).logits - reference).pow(2).mean()
    # memory: the factors are counted in the layers' weight bytes
    assert qmodel.weight_memory().quantized_after > plain.weight_memory().quantized_after
    assert "lorc rank 4: weight error" in zqcompile.inspect(qmodel, code=False)
    qmodel.save(tmp_path / "lorc")
    loaded = zqcompile.load(tmp_path / "lorc")
    with torch.no_grad():
        assert torch.equal(qmodel(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert loaded.recipe.lorc_rank == 4
