"""rotate_hadamard on tiny models: the Hadamard op, exactness in floating point, what is refused, and the point
of it all: a lower quantization error when activations have outlier channels.

References: a dense matrix product with scipy's Hadamard matrix, and the Hugging Face model itself.
"""

from __future__ import annotations

import pytest
import torch

import zqcompile
from helpers import TINY_MODELS, cosine, token_batch
from zqcompile.capture import capture
from zqcompile.ops import hadamard_matrix
from zqcompile.passes.rotate_hadamard import power_of_two_block, rotation_matrix
from zqcompile.pipeline import run_pipeline
from zqcompile.recipe import Recipe, preset

ROTATE = Recipe(name="rot", rotate=True)


@pytest.mark.parametrize("block,width", [(2, 6), (8, 24), (64, 64), (128, 384)])
def test_hadamard_op_against_a_dense_matrix_product(block, width):
    linalg = pytest.importorskip("scipy.linalg")
    x = torch.randn(3, 5, width, dtype=torch.float64)
    dense = torch.tensor(linalg.hadamard(block), dtype=torch.float64) / block ** 0.5
    expected = (x.view(3, 5, width // block, block) @ dense).view(3, 5, width)
    assert torch.allclose(torch.ops.zq.hadamard(x, block), expected, atol=1e-12)
    half = torch.ops.zq.hadamard(x.half(), block)  # computed in float32, returned in the input's dtype
    assert half.dtype == torch.float16 and torch.allclose(half.double(), expected, atol=2e-2)
    assert torch.allclose(hadamard_matrix(block), dense, atol=1e-15)


@pytest.mark.parametrize("n", [64, 48, 576])
def test_rotation_matrix_is_orthogonal_and_mixes_every_channel(n):
    q = rotation_matrix(n)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert (q != 0).float().mean() > 0.95  # an outlier channel is spread over (nearly) all of them
    assert torch.equal(q, rotation_matrix(n))  # a fixed seed: nothing is tuned
    assert power_of_two_block(n) == {64: 64, 48: 16, 576: 64}[n]


def rotated_graph(model, recipe: Recipe = ROTATE):
    captured = capture(model, None)
    return run_pipeline(captured.graph_module, recipe, stop_after="rotate", source_model=model)


def logits_or_hidden(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def graph_output(gm, ids: torch.Tensor) -> torch.Tensor:
    output = gm(ids, torch.ones_like(ids)) if len([n for n in gm.graph.nodes if n.op == "placeholder"]) == 2 \
        else gm(ids, torch.ones_like(ids), torch.zeros_like(ids))
    return output[0] if isinstance(output, (tuple, list)) else logits_or_hidden(output)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "bert"])
def test_rotated_fp_graph_equals_the_original(family):
    model = TINY_MODELS[family]()
    with torch.no_grad():  # norm weights far from 1, so folding them into the linears is exercised
        for name, parameter in model.named_parameters():
            if "norm" in name and parameter.dim() == 1 and name.endswith("weight"):
                parameter.uniform_(0.3, 3.0)
    result = rotated_graph(model)
    ids = token_batch(2, 12, seed=1)
    with torch.no_grad():
        expected = logits_or_hidden(model(input_ids=ids))
        got = graph_output(result.compiled, ids)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    counters, skipped = result.context.counters, result.context.rotate_skipped
    assert counters["rotate.online_hadamard"] == 4  # the MLP and attention output projections of 2 layers
    if family in ("llama", "qwen2"):
        # 2 norms and 2 writers (o_proj, down_proj) a layer, and the final norm into the (untied) LM head
        assert counters["rotate.norm_folded"] == 5 and counters["rotate.writer"] == 4
        assert counters["rotate.embedding"] == 1 and "rotate.online_entry" not in counters
        assert "residual stream" not in skipped
    else:  # LayerNorm models: only the projections are rotated, and inspect says why
        assert "rotate.norm_folded" not in counters
        assert "LayerNorm" in skipped["residual stream"] or "layer_norm" in skipped["residual stream"]


def test_tied_embedding_is_rotated_online_and_left_shared():
    model = TINY_MODELS["llama"]()
    model.lm_head.weight = model.model.embed_tokens.weight  # SmolLM2 ties them
    result = rotated_graph(model)
    counters = result.context.counters
    # the table stays one tensor: rows rotated after the lookup, the final norm reads the stream un-rotated
    assert counters["rotate.online_entry"] == 1 and counters["rotate.online_exit"] == 1
    assert counters["rotate.norm_folded"] == 4  # the final norm keeps its weight (its reader is the tied head)
    ids = token_batch(2, 9, seed=2)
    with torch.no_grad():
        assert torch.allclose(graph_output(result.compiled, ids), model(input_ids=ids).logits, atol=1e-5)


def plant_outliers(model) -> None:
    """Massive channels, as trained Llama models have: in the residual stream (the embeddings) and in the norm
    weights, so every q/k/v and gate/up input has outlier channels."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, [3, 17]] *= 30.0
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] = 40.0
            layer.post_attention_layernorm.weight[[5]] = 30.0


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8"])
def test_rotation_lowers_the_quantized_error_with_outlier_channels(recipe):
    model = TINY_MODELS["llama"]()
    plant_outliers(model)
    ids = token_batch(4, 16, seed=3)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    errors = {}
    for name in (recipe, f"{recipe}-rot"):
        with torch.no_grad():
            got = zqcompile.compile(model, name, generation=False)(input_ids=ids).logits
        errors[name] = ((got - expected).norm() / expected.norm()).item()
    assert errors[f"{recipe}-rot"] < 0.6 * errors[recipe], errors


def test_online_hadamard_flattens_outlier_channels_before_token_wise_int8():
    """The down projection's input (SwiGLU output) with two outlier channels: INT8 of H x, mapped back, is
    closer to x than INT8 of x itself."""
    x = torch.randn(32, 128, dtype=torch.float64)
    x[:, [7, 90]] *= 25.0

    def int8_error(values: torch.Tensor) -> float:
        q, scale = torch.ops.zq.quantize_per_token(values)
        return (q.double() * scale - values).norm().item()

    rotated = torch.ops.zq.hadamard(x, 128)
    assert int8_error(rotated) < 0.3 * int8_error(x)  # H is orthogonal: errors compare in the same norm


def test_presets_and_recipe_field():
    assert preset("w8a8-rot").rotate and preset("w4a8-rot").rotate and not preset("w8a8").rotate
    assert preset("w4a8-rot").overrides[0].settings == preset("w4a8").overrides[0].settings
    with pytest.raises(zqcompile.ZQError, match="rotate must be true or false"):
        Recipe(rotate="yes")


def test_inspect_lists_what_was_not_rotated():
    model = TINY_MODELS["gpt2"]()
    qmodel = zqcompile.compile(model, "w8a8-rot", generation=False)
    assert "not rotated:\n  residual stream: " in zqcompile.inspect(qmodel, code=False)
    ids = token_batch(2, 8, seed=4)
    with torch.no_grad():
        assert cosine(qmodel(input_ids=ids).logits, model(input_ids=ids).logits) > 0.999


def test_rotated_model_saves_and_loads(tmp_path):
    qmodel = zqcompile.compile(TINY_MODELS["llama"](), "w8a8-rot", generation=False)
    qmodel.save(tmp_path / "llama")
    loaded = zqcompile.load(tmp_path / "llama")
    ids = token_batch(2, 8, seed=4)
    assert torch.equal(loaded(input_ids=ids).logits, qmodel(input_ids=ids).logits)


def test_onnx_export_of_a_rotated_llama(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    qmodel = zqcompile.compile(TINY_MODELS["llama"](), "w8a8-rot", generation=False)
    info = zqcompile.export_onnx(qmodel, None, tmp_path / "rot.onnx", progress=False)
    ids = token_batch(2, 10, seed=5)
    session = ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()})[0]
    assert cosine(torch.from_numpy(got), qmodel(input_ids=ids).logits) > 0.9999


def test_rotation_keeps_no_unrotated_copy_of_the_weights():
    model = TINY_MODELS["llama"]()
    plain, rotated = zqcompile.compile(model, "w8a8"), zqcompile.compile(model, "w8a8-rot")
    # the same tensors: the norms' weights (now ones) and the rotated integer weights, nothing unrotated
    assert rotated.weight_memory().total == plain.weight_memory().total


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_smoothing_after_rotation_keeps_the_function(family):
    """w8a8-smooth-rot: the rotation, then smoothing of what it leaves (BERT's LayerNorm outputs, which it cannot
    rotate; a rotated Llama's norms), both folds exact: the FP graph still equals the Hugging Face model."""
    model = TINY_MODELS[family]()
    ids = token_batch(2, 12, seed=1)
    inputs = (ids, torch.ones_like(ids)) + ((torch.zeros_like(ids),) if family == "bert" else ())
    captured = capture(model, None)
    result = run_pipeline(captured.graph_module, preset("w8a8-smooth-rot"), stop_after="smooth",
                          calibration_inputs=[inputs], source_model=model)
    counters = result.context.counters
    assert counters["rotate.online_hadamard"] == 4
    assert counters["smooth.layernorm" if family == "bert" else "smooth.rmsnorm"] >= 4, counters
    with torch.no_grad():
        expected = logits_or_hidden(model(input_ids=ids))
        got = graph_output(result.compiled, ids)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_smoothed_rotated_decoder_generates_from_the_forward_graphs_tensors():
    model = TINY_MODELS["llama"](use_cache=True)
    plant_outliers(model)
    qmodel = zqcompile.compile(model, "w8a8-smooth-rot")
    assert qmodel.context.counters["smooth.rmsnorm"] > 0 and qmodel.context.counters["rotate.norm_folded"] > 0
    ids = token_batch(2, 8, seed=6)
    with torch.no_grad():
        first = qmodel.generate(ids, max_new_tokens=1)[:, -1]
        assert torch.equal(first, qmodel(input_ids=ids).logits[:, -1].argmax(-1))
