"""zqcompile.compile on tiny random-weight models of every supported family, and on a plain MLP.

Bounds on the output error were measured on these seeded models (cosine vs the FP model over all logits /
hidden states of a 3x11 batch) and are asserted with a margin: w8a8/w8a16 >= 0.9999 measured (asserted
0.9995), w4a8 >= 0.998 (0.996), w4a16 >= 0.9898 (0.98: INT4 everywhere, including attention).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.fx import Interpreter

import zqcompile
from helpers import (
    TINY_MAX_POSITIONS, TINY_MODELS, cosine, make_tiny_bert, make_tiny_llama, make_tiny_mlp, token_batch,
)
from zqcompile import ZQError
from zqcompile.passes.annotate_roles import role_of
from zqcompile.passes.infra import LINEAR, META_MODULE

zq = torch.ops.zq
RECIPES = ("w8a8", "w4a8", "w8a16", "w4a16")
MIN_COSINE = {"w8a8": 0.9995, "w8a16": 0.9995, "w4a8": 0.996, "w4a16": 0.98}
FP_ROLES = {"lm_head", "classifier"}  # what the presets keep in floating point
INTEGER_OPS = {"w8a8": {zq.int8_linear.default}, "w4a8": {zq.int8_linear.default, zq.int4_linear.default},
               "w8a16": {zq.weight_only_linear.default}, "w4a16": {zq.weight_only_linear.default}}


def _main_output(output) -> torch.Tensor:
    return output[0]  # logits / last_hidden_state


def _run_both(fp_model, qmodel, batch: int, seq: int, seed: int = 0):
    ids = token_batch(batch, seq, seed)
    with torch.no_grad():
        return fp_model(input_ids=ids), qmodel(input_ids=ids)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("family", list(TINY_MODELS))
def test_compiled_model_keeps_hf_outputs_and_stays_close_to_fp(compiled_tiny, family, recipe):
    fp_model, qmodel = compiled_tiny(family, recipe)
    expected, out = _run_both(fp_model, qmodel, 3, 11)
    assert type(out) is type(expected) and list(out.keys()) == list(expected.keys())
    for key in expected.keys():
        assert out[key].shape == expected[key].shape and out[key].dtype == expected[key].dtype
    similarity = cosine(_main_output(out), _main_output(expected))
    print(f"{family} {recipe}: cosine {similarity:.6f}")
    assert similarity >= MIN_COSINE[recipe]
    assert not torch.equal(_main_output(out), _main_output(expected))  # it is really quantized


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "qwen2"])
def test_quantized_linears_run_integer_ops(compiled_tiny, family, recipe):
    fp_model, qmodel = compiled_tiny(family, recipe)
    gm = qmodel.graph_module
    from transformers.pytorch_utils import Conv1D
    plans = qmodel.context.plans
    assert set(plans) == {name for name, m in fp_model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    quantized = {name for name, plan in plans.items() if plan.quantized}
    assert quantized and all(plans[name].kind == "FP" for name in set(plans) - quantized)
    assert {role_of(name) for name in set(plans) - quantized} <= FP_ROLES
    by_op = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and META_MODULE in node.meta:
            by_op.setdefault(node.target, set()).add(node.meta[META_MODULE])
    assert set().union(*(by_op.get(op, set()) for op in INTEGER_OPS[recipe])) == quantized
    assert by_op.get(LINEAR, set()) == set(plans) - quantized  # no aten.linear left for a quantized module
    # no FP copy of a quantized weight is stored
    stored = {name for name, _ in gm.named_buffers()} | {name for name, _ in gm.named_parameters()}
    for module in quantized:
        assert not {f"model.{module}.weight", f"model.{module}.weight_t"} & stored


class _GemmOperandDtypes(Interpreter):
    """Runs the graph and records the dtypes that reach the integer GEMMs."""

    def __init__(self, gm):
        super().__init__(gm)
        self.seen: list[tuple[torch.dtype, torch.dtype]] = []

    def call_function(self, target, args, kwargs):
        if target in (zq.int8_linear.default, zq.int4_linear.default):
            self.seen.append((args[0].dtype, args[2].dtype))
        return super().call_function(target, args, kwargs)


def test_gemms_receive_integer_tensors_at_run_time(compiled_tiny):
    _, qmodel = compiled_tiny("llama", "w4a8")
    interpreter = _GemmOperandDtypes(qmodel.graph_module)
    with torch.no_grad():
        interpreter.run(*qmodel.graph_inputs(input_ids=token_batch(2, 5)))
    assert len(interpreter.seen) == 14  # 2 layers x 7 linears
    assert set(interpreter.seen) == {(torch.int8, torch.int8), (torch.int8, torch.uint8)}  # INT8 and packed INT4


def _expected_weight_bytes(fp_model, qmodel) -> tuple[int, int]:
    """(FP16 bytes, integer + scale bytes) of the quantized linears, from the FP modules' shapes and plans."""
    fp16, quantized = 0, 0
    modules = dict(fp_model.named_modules())
    for name, plan in qmodel.context.plans.items():
        if not plan.quantized:
            continue
        n, k = modules[name].weight.shape
        groups_in = k // (plan.input_group_size or k)
        fp16 += 2 * n * k
        quantized += n * k * plan.weight_bits // 8 + 4 * (n // (plan.group_size or 1)) * groups_in
    return fp16, quantized


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_weight_memory_vs_fp16(compiled_tiny, family):
    ratios = {}
    for recipe in ("w8a8", "w4a8", "w4a16"):
        fp_model, qmodel = compiled_tiny(family, recipe)
        memory = qmodel.weight_memory()
        fp16, quantized = _expected_weight_bytes(fp_model, qmodel)
        assert memory.quantized_fp16 == fp16 and memory.quantized_before == 2 * fp16  # captured in FP32
        assert memory.quantized_after == quantized
        ratios[recipe] = memory.ratio_vs_fp16
    # INT8 + one float32 scale per output row: 0.5 + 2 / K of FP16 (K = 64 or 128 here, 768 for BERT-base)
    assert 0.5 < ratios["w8a8"] <= 0.5 + 2 / 64
    assert ratios["w4a8"] < ratios["w8a8"] - 0.1
    assert ratios["w4a16"] < ratios["w4a8"]
    assert f"({ratios['w8a8']:.3f}x of FP16)" in str(compiled_tiny(family, "w8a8")[1].weight_memory())


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("batch, seq", [(1, 1), (1, 7), (4, 3), (2, TINY_MAX_POSITIONS)])
def test_other_batch_and_sequence_sizes(compiled_tiny, family, batch, seq):
    fp_model, qmodel = compiled_tiny(family, "w8a8")
    expected, out = _run_both(fp_model, qmodel, batch, seq, seed=batch * 100 + seq)
    assert _main_output(out).shape == _main_output(expected).shape
    assert cosine(_main_output(out), _main_output(expected)) >= MIN_COSINE["w8a8"]


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_padded_batch_with_attention_mask_matches_each_sequence_alone(compiled_tiny, family):
    """Token-wise quantization and masked attention: padding must not change the real tokens' outputs."""
    fp_model, qmodel = compiled_tiny(family, "w8a8")
    lengths = [7, 3, 5]
    ids = token_batch(3, 7, seed=3)
    mask = (torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        padded = _main_output(qmodel(input_ids=ids, attention_mask=mask))
        fp_padded = _main_output(fp_model(input_ids=ids, attention_mask=mask))
        for row, length in enumerate(lengths):
            alone = _main_output(qmodel(input_ids=ids[row:row + 1, :length]))[0]
            torch.testing.assert_close(padded[row, :length], alone, rtol=1e-5, atol=1e-5)
            assert cosine(padded[row, :length], fp_padded[row, :length]) >= MIN_COSINE["w8a8"]


def test_bert_classifier_keeps_head_fp_and_predicts_like_fp(compiled_tiny):
    fp_model, qmodel = compiled_tiny("bert_classifier", "w8a8")
    ids = token_batch(16, 9, seed=5)
    with torch.no_grad():
        expected, out = fp_model(input_ids=ids).logits, qmodel(input_ids=ids).logits
    assert out.shape == (16, 3)
    assert qmodel.context.plans["classifier"].kind == "FP"
    assert torch.equal(out.argmax(-1), expected.argmax(-1))
    torch.testing.assert_close(out, expected, rtol=0, atol=0.02 * expected.abs().max().item())


def test_plain_mlp_compiles_for_every_recipe():
    model = make_tiny_mlp()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    for recipe in RECIPES:
        qmodel = zqcompile.compile(model, recipe)
        with torch.no_grad():
            out = qmodel(x)
        assert isinstance(out, torch.Tensor) and out.shape == (5, 16)
        assert cosine(out, expected) >= MIN_COSINE[recipe]
        assert count_lowered(qmodel) == 3 and not any(n.target is LINEAR for n in qmodel.graph_module.graph.nodes)
        if recipe == "w8a8":  # fc2 reads gelu(fc1), head reads LayerNorm(fc2): both quantizations fused
            assert {k: v for k, v in qmodel.context.counters.items() if k.startswith("fuse.")} == {
                "fuse.gelu": 1, "fuse.layernorm": 1}


def count_lowered(qmodel) -> int:
    return sum(1 for n in qmodel.graph_module.graph.nodes if n.target in zqcompile.ops.QUANTIZED_LINEAR_OPS)


def test_fp16_and_bf16_models_compile_and_keep_their_dtype():
    for dtype in (torch.float16, torch.bfloat16):
        model = make_tiny_llama().to(dtype)
        qmodel = zqcompile.compile(model, "w8a8", generation=False)
        ids = token_batch(2, 5)
        with torch.no_grad():
            out, expected = qmodel(input_ids=ids).logits, model(input_ids=ids).logits
        assert out.dtype == dtype and qmodel.dtype == dtype
        assert cosine(out, expected) >= 0.999


# ---- errors -----------------------------------------------------------------------------------------------

def test_sequence_longer_than_max_positions(compiled_tiny):
    _, qmodel = compiled_tiny("gpt2", "w8a8")
    with pytest.raises(ZQError, match=rf"sequence length {TINY_MAX_POSITIONS + 1} exceeds GPT2LMHeadModel's maximum "
                                      rf"of {TINY_MAX_POSITIONS} positions; split the input into chunks of at most"):
        qmodel(input_ids=token_batch(1, TINY_MAX_POSITIONS + 1))


def test_bad_call_arguments(compiled_tiny):
    _, qmodel = compiled_tiny("bert", "w8a8")
    ids = token_batch(2, 3)
    with pytest.raises(ZQError, match=r"inputs are on meta but the model was compiled for cpu; move them with "
                                      r"\.to\('cpu'\)"):
        qmodel(input_ids=ids.to("meta"))
    with pytest.raises(ZQError, match=r"compiled BertModel accepts \['input_ids', 'attention_mask', "
                                      r"'token_type_ids'\]; it was captured without \['labels'\]"):
        qmodel(input_ids=ids, labels=torch.zeros(2))
    with pytest.raises(ZQError, match=r"input_ids must be a \[batch, seq\] tensor"):
        qmodel(input_ids=ids[0])
    with pytest.raises(ZQError, match=r"attention_mask has shape \(2, 4\), input_ids has \(2, 3\)"):
        qmodel(input_ids=ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ZQError, match=r"got \['input_ids'\] both positionally and by keyword"):
        qmodel(ids, input_ids=ids)
    with torch.no_grad():  # positional, and None for an optional input, work like the HF model
        assert qmodel(ids, None).last_hidden_state.shape == (2, 3, 64)
    plain = zqcompile.compile(make_tiny_mlp())
    with pytest.raises(ZQError, match=r"compiled TinyMLP takes positional inputs only, got \['x'\]"):
        plain(x=torch.randn(2, 64))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


class ConvFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(4, 4, 3), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.conv(x))


def test_unsupported_models_wrong_dtype_and_device():
    with pytest.raises(ZQError, match=r"BertModel is in torch\.float64; zqcompile compiles float32, float16 or "
                                      r"bfloat16 models: call model\.float\(\) first"):
        zqcompile.compile(make_tiny_bert().double())
    mixed = make_tiny_mlp()
    mixed.head.half()
    with pytest.raises(ZQError, match=r"TinyMLP mixes dtypes \['torch\.float16', 'torch\.float32'\]"):
        zqcompile.compile(mixed)
    if not torch.cuda.is_available():
        with pytest.raises(ZQError, match=r"backend='cuda' needs a CUDA GPU, and torch sees none"):
            zqcompile.compile(make_tiny_mlp(), backend="cuda")
    with pytest.raises(ZQError, match=r"unknown backend 'tpu'; choose one of \['auto', 'cpu', 'cuda'\]"):
        zqcompile.compile(make_tiny_mlp(), backend="tpu")
    with pytest.raises(ZQError, match=r"zqcompile\.compile expects a torch\.nn\.Module, got function"):
        zqcompile.compile(lambda x: x)
    with pytest.raises(ZQError, match=r"torch\.export could not capture DataDependent: .*\nzqcompile supports encoder-only and "
                                      r"decoder-only text models \(the README's model matrix: BERT"):
        zqcompile.compile(DataDependent())
    with pytest.raises(ZQError, match=r"cannot guess example inputs for ConvFirst; pass example_inputs="):
        zqcompile.compile(ConvFirst())
    with pytest.raises(ZQError, match=r"Identity has no floating-point parameters: nothing to quantize"):
        zqcompile.compile(nn.Identity())
    from transformers import ViTConfig, ViTModel
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=8, patch_size=4))
    with pytest.raises(ZQError, match=r"ViTModel does not take input_ids; zqcompile captures text models"):
        zqcompile.compile(vit)


def test_plain_module_with_example_inputs():
    torch.manual_seed(0)
    model = ConvFirst().eval()
    qmodel = zqcompile.compile(model, "w8a8", example_inputs=(torch.randn(2, 4, 8),))
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        assert cosine(qmodel(x), model(x)) >= MIN_COSINE["w8a8"]
    assert qmodel.context.counters["lower.int8_linear"] == 1


def test_gpt2_lm_head_tied_to_the_embedding_can_be_quantized():
    model = TINY_MODELS["gpt2"]()
    qmodel = zqcompile.compile(model, {"keep_fp": []}, generation=False)
    assert qmodel.context.plans["lm_head"].kind == "W8A8"
    assert qmodel.context.counters["lower.int8_linear"] == 9
    ids = token_batch(2, 9)
    with torch.no_grad():
        assert cosine(qmodel(input_ids=ids).logits, model(input_ids=ids).logits) >= MIN_COSINE["w8a8"]
    # the embedding lookup still reads the FP matrix the head was tied to
    embedding = next(n for n in qmodel.graph_module.graph.nodes if n.target is torch.ops.aten.embedding.default)
    assert torch.equal(getattr(qmodel.graph_module, "model").get_parameter(
        embedding.args[0].target.removeprefix("model.")), model.transformer.wte.weight)


@pytest.mark.parametrize("recipe", zqcompile.PRESETS)
def test_compile_leaves_the_original_model_untouched(compiled_tiny, recipe):
    fp_model, _ = compiled_tiny("llama", recipe)
    fresh = TINY_MODELS["llama"]()  # the same seeded weights, never compiled
    fresh_state = fresh.state_dict()
    for name, tensor in fp_model.state_dict().items():
        assert torch.equal(tensor, fresh_state[name]), name
