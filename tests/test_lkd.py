"""LKD (layer-by-layer distillation) on tiny random-weight models, checked against a float64 reference.

The reference here re-implements ZeroQuant's simulated quantization independently (per-row INT8 attention
weights, INT4 MLP weights in groups of 64 along the input dim, token-wise INT8 inputs of every quantized
linear) and measures each block's output error against the floating-point block on held-out inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import zqcompile
from zqcompile import LKDConfig, ZQError
from zqcompile.capture import capture
from zqcompile.distillation_data import distillation_data
from zqcompile.lkd import find_blocks
from zqcompile.passes.infra import attr_tensor
from zqcompile.pipeline import run_pipeline
from zqcompile.recipe import Recipe, load_recipe

MLP_NAMES = ("gate_proj", "up_proj", "down_proj", "c_fc", "mlp.c_proj", "intermediate.dense")


def distill(model: nn.Module, recipe: Recipe, config: LKDConfig):
    """zqcompile.lkd.distill with the plans the compiler resolves for ``model`` (its plan phase)."""
    plans = run_pipeline(capture(model).graph_module, recipe, stop_after="plan").context.plans
    return zqcompile.lkd.distill(model, plans, config, recipe_name=recipe.name)


def tiny_llama(layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(1)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_inner=128,
                                      n_positions=64)).eval()


def tiny_bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(2)
    return BertModel(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=64)).eval()


FAST = dict(num_samples=8, seq_len=16, batch_size=4, steps=30, lr=1e-4, progress=False)


# ---- an independent float64 reference of the quantized block ------------------------------------------------

def reference_fake_quant_weight(weight: torch.Tensor, bits: int, input_group: int | None) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    n, k = weight.shape
    group = input_group or k
    blocks = weight.double().reshape(n, k // group, group)
    scale = blocks.abs().amax(-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(blocks / scale).clamp(-qmax, qmax) * scale).reshape(n, k)


def reference_fake_quant_rows(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x / scale).clamp(-127, 127) * scale


def reference_w4a8_block(block: nn.Module, weights: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """float64 copy of ``block`` with (distilled) weights, w4a8-quantized by hand (all nn.Linear are quantized)."""
    quantized = copy.deepcopy(block).double()
    with torch.no_grad():
        for name, param in quantized.named_parameters():
            if f"{prefix}.{name}" in weights:
                param.copy_(weights[f"{prefix}.{name}"])
        for name, module in quantized.named_modules():
            if isinstance(module, nn.Linear):
                mlp = any(name.endswith(m) for m in MLP_NAMES)
                module.weight.copy_(reference_fake_quant_weight(module.weight, 4 if mlp else 8, 64 if mlp else None))
                module.register_forward_pre_hook(lambda mod, args: (reference_fake_quant_rows(args[0]), *args[1:]))
    return quantized


def block_calls(model: nn.Module, ids: torch.Tensor) -> list[tuple[tuple, dict, torch.Tensor]]:
    """(args, kwargs, output) of every block call of the floating-point model."""
    _, blocks = find_blocks(model)
    calls, handles = [], []
    for block in blocks:
        handles.append(block.register_forward_hook(
            lambda mod, args, kwargs, out: calls.append((args, kwargs, out if torch.is_tensor(out) else out[0])),
            with_kwargs=True))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return calls


def to_double(value):
    if torch.is_tensor(value):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(to_double(v) for v in value)
    return {k: to_double(v) for k, v in value.items()} if isinstance(value, dict) else value


def reference_block_errors(model: nn.Module, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> list[float]:
    """Per block: MSE between the FP block and its w4a8-quantized reference, both fed the FP block input."""
    name, blocks = find_blocks(model)
    errors = []
    for index, (args, kwargs, fp_out) in enumerate(block_calls(model, ids)):
        student = reference_w4a8_block(blocks[index], weights, f"{name}.{index}")
        with torch.no_grad():
            out = student(*to_double(args), **to_double(kwargs))
        out = out if torch.is_tensor(out) else out[0]
        errors.append(torch.mean((out - fp_out.double()) ** 2).item())
    return errors


# ---- tests ----------------------------------------------------------------------------------------------------

def test_lkd_reduces_every_blocks_error_on_held_out_inputs():
    model = tiny_llama()
    config = LKDConfig(data="random", inputs_from="teacher", **{**FAST, "num_samples": 16, "seq_len": 32, "lr": 5e-5})
    result = distill(model, load_recipe("w4a8"), config)
    held_out = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(5))
    ptq = reference_block_errors(model, {}, held_out)
    lkd = reference_block_errors(model, result.weights, held_out)
    assert len(result.blocks) == 3
    for block, before, after in zip(result.blocks, ptq, lkd):
        assert after < 0.95 * before, (block.name, before, after)
        assert block.mse_lkd < block.mse_ptq  # the log says the same on the distillation set


def test_compile_with_lkd_is_closer_to_fp_and_leaves_the_model_unchanged():
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    distilled = zqcompile.compile(model, "w4a8", lkd=LKDConfig(data="self", **FAST))
    ptq = zqcompile.compile(model, "w4a8")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}
    error_lkd = torch.mean((distilled(input_ids=ids).logits - reference) ** 2)
    error_ptq = torch.mean((ptq(input_ids=ids).logits - reference) ** 2)
    assert error_lkd < error_ptq
    assert distilled.lkd_result.data_source == "self-generated" and ptq.lkd_result is None
    # the distilled weights are what the compiled graph stores (quantized the same way as PTQ weights)
    assert distilled.weight_memory() == ptq.weight_memory()


def test_only_one_blocks_copy_is_trained_at_a_time(monkeypatch):
    model = tiny_llama()
    user_params = {id(p) for p in model.parameters()}
    optimizers = []

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, params, **kwargs):
            params = list(params)
            optimizers.append(params)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    result = distill(model, load_recipe("w4a8"), LKDConfig(data="random", **{**FAST, "steps": 2}))
    assert len(optimizers) == 3
    for index, (params, block) in enumerate(zip(optimizers, result.blocks)):
        assert not {id(p) for p in params} & user_params  # copies, never the user's tensors
        assert all(p.requires_grad for p in params)
        # the 7 linears of a Llama block, weights only (no biases); nothing outside block `index`
        assert len(params) == len(block.trained) == 7
        assert all(name.startswith(f"model.layers.{index}.") for name in block.trained)
    assert set(result.weights) == {name for block in result.blocks for name in block.trained}


def test_w8a8_blocks_are_distilled_too():
    # INT8 rounding steps are 16x finer than INT4 ones, so the weights need a smaller learning rate
    config = LKDConfig(data="random", **{**FAST, "lr": 1e-5})
    result = distill(tiny_llama(layers=2), load_recipe("w8a8"), config)
    assert len(result.blocks) == 2 and all(b.mse_lkd < b.mse_ptq for b in result.blocks)


def test_train_norms_adds_norm_parameters():
    model = tiny_llama(layers=2)
    result = distill(model, load_recipe("w4a8"),
                                   LKDConfig(data="random", train_norms=True, **{**FAST, "steps": 3}))
    assert "model.layers.1.input_layernorm.weight" in result.blocks[1].trained
    assert "model.layers.1.post_attention_layernorm.weight" in result.weights


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_bert], ids=["gpt2-conv1d", "bert"])
def test_lkd_on_other_families(make_model):
    model = make_model()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))
    key = "logits" if hasattr(model, "lm_head") else "last_hidden_state"
    with torch.no_grad():
        reference = getattr(model(input_ids=ids), key)
    # forward only: compiling the generation graph would distil every block a second time (that path is covered by
    # test_compile_with_lkd_is_closer_to_fp_and_leaves_the_model_unchanged's weight_memory check)
    distilled = zqcompile.compile(model, "w4a8", lkd=LKDConfig(**FAST), generation=False)
    ptq = zqcompile.compile(model, "w4a8", generation=False)
    assert distilled.lkd_result.data_source == ("self-generated" if key == "logits" else "random-token")
    assert all(b.mse_lkd < b.mse_ptq for b in distilled.lkd_result.blocks)
    error_lkd = torch.mean((getattr(distilled(input_ids=ids), key) - reference) ** 2)
    error_ptq = torch.mean((getattr(ptq(input_ids=ids), key) - reference) ** 2)
    assert error_lkd < error_ptq


def test_recipe_lkd_section():
    recipe = Recipe.from_dict({"base": "w4a8", "lkd": {"steps": 2, "data": "random", "progress": False}})
    assert isinstance(recipe.lkd, LKDConfig) and recipe.lkd.steps == 2
    assert Recipe.from_dict({"base": "w4a8", "lkd": True}).lkd == LKDConfig()
    assert load_recipe("w4a8").lkd is None
    with pytest.raises(ZQError, match="unknown lkd key"):
        Recipe.from_dict({"base": "w4a8", "lkd": {"step": 2}})
    compiled = zqcompile.compile(tiny_llama(layers=1), recipe, generation=False)  # (the forward's LKD only)
    assert [b.steps for b in compiled.lkd_result.blocks] == [2]
    assert zqcompile.compile(tiny_llama(layers=1), recipe, lkd=False, generation=False).lkd_result is None  # lkd= wins


def test_text_data_with_a_tokenizer():
    class CharTokenizer:
        def __call__(self, text):
            return type("Encoding", (), {"input_ids": [ord(c) % 128 for c in text]})()

    config = LKDConfig(data=["some distillation text " * 4, "more text " * 8], tokenizer=CharTokenizer(),
                       **{**FAST, "steps": 2, "num_samples": 100})
    result = distill(tiny_llama(layers=2), load_recipe("w4a8"), config)
    assert result.data_source == "user text" and result.tokens == (92 + 80) // 16 * 16


@pytest.mark.parametrize("kwargs,message", [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"data": None}, "needs a data source"),
    ({"data": ""}, "needs a data source"),
    ({"lr": 0.0}, "lr must be a positive"),
    ({"inputs_from": "fp"}, "inputs_from must be one of"),
])
def test_bad_configs_raise(kwargs, message):
    with pytest.raises(ZQError, match=message):
        LKDConfig(**kwargs)


def test_bad_inputs_raise_or_are_documented_no_ops():
    model = tiny_llama(layers=2)
    with pytest.raises(ZQError, match="no tokenizer"):
        distill(model, load_recipe("w4a8"), LKDConfig(data="some text", **FAST))
    two_tokens = lambda text: type("Encoding", (), {"input_ids": [1, 2]})()  # noqa: E731
    with pytest.raises(ZQError, match="fewer than seq_len"):
        distill(model, load_recipe("w4a8"), LKDConfig(data="ab", tokenizer=two_tokens, **FAST))
    all_fp = Recipe.from_dict({"base": "w4a8", "keep_fp": ["model.layers.*", "role:lm_head"]})
    with pytest.raises(ZQError, match="nothing to\\s+distil"):
        distill(model, all_fp, LKDConfig(**FAST))
    with pytest.warns(UserWarning, match="only has INT8 weight-only"):
        compiled = zqcompile.compile(model, "w8a16", lkd=LKDConfig(**FAST), generation=False)
    assert compiled.lkd_result.weights == {} and not compiled.lkd_result.blocks
    with pytest.raises(ZQError, match="no transformer blocks"):
        zqcompile.compile(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), "w4a8", lkd=True)


def test_plain_module_needs_its_inputs_as_data():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 64)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(x)))

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(3)
    model = Stack().eval()
    with pytest.raises(ZQError, match="needs its inputs"):
        zqcompile.compile(model, "w4a16", lkd=LKDConfig(**FAST))
    inputs = torch.randn(8, 16, 64, generator=torch.Generator().manual_seed(8))
    result = distill(model, load_recipe("w4a16"), LKDConfig(data=inputs, **FAST))
    assert [b.name for b in result.blocks] == ["layers.0", "layers.1"]
    assert all(b.mse_lkd < b.mse_ptq for b in result.blocks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lkd_on_cuda_returns_weights_on_the_models_device():
    model = tiny_llama(layers=2)
    result = distill(model, load_recipe("w4a8"), LKDConfig(data="random", device="cuda", **FAST))
    assert all(t.device.type == "cpu" for t in result.weights.values())
    assert all(b.mse_lkd < b.mse_ptq for b in result.blocks)


# ---- LKD after rotation / smoothing (the graph is distilled) and the LM-head KL loss ------------------------

def _logits_error(compiled, model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return torch.mean((compiled(input_ids=ids).logits - model(input_ids=ids).logits) ** 2).item()


@pytest.mark.parametrize("recipe", [{"base": "w4a8-rot"}, {"base": "w4a8", "smooth_alpha": 0.5}])
def test_lkd_after_rotation_or_smoothing_lowers_the_error_of_the_transformed_blocks(recipe):
    model = tiny_llama()
    held_out = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(5))
    alone = zqcompile.compile(model, recipe)
    config = LKDConfig(data="random", **{**FAST, "num_samples": 16, "seq_len": 32, "lr": 5e-5})
    distilled = zqcompile.compile(model, recipe, lkd=config)
    report = distilled.lkd_result
    assert [b.name for b in report.blocks] == [f"model.layers.{i}" for i in range(3)]
    # student = the rotated/smoothed quantized block, teacher = the FP block: PTQ MSE is rotation/smoothing alone
    assert all(b.mse_lkd < 0.9 * b.mse_ptq for b in report.blocks), str(report)
    assert all(any("rotated" in t or "smooth" in t for t in b.trained) for b in report.blocks)  # the folded weights
    # against the Hugging Face FP model on held-out tokens: the whole model is closer than rotation/smoothing alone
    assert _logits_error(distilled, model, held_out) < _logits_error(alone, model, held_out)
    assert distilled.weight_memory() == alone.weight_memory()


def test_lkd_after_rotation_gives_the_generation_graph_the_same_tensors():
    model = tiny_llama(layers=2)
    compiled = zqcompile.compile(model, "w4a8-rot", lkd=LKDConfig(data="random", **{**FAST, "steps": 4}))
    forward = {n.target: attr_tensor(compiled.graph_module, n.target) for n in compiled.graph_module.graph.nodes
               if n.op == "get_attr" and "rotated" in n.target}
    generation = compiled.generation.graph_module
    shared = [t for t, tensor in forward.items() if attr_tensor(generation, t) is tensor]
    assert len(shared) >= 7 * 2  # every distilled (rotated) weight of both blocks, one copy in memory
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    expected = compiled(input_ids=ids).logits[:, -1].argmax(-1)
    assert torch.equal(compiled.generate(ids, max_new_tokens=1)[:, -1], expected)


def test_logits_kl_lowers_the_logit_divergence_it_is_trained_on():
    model = tiny_llama(layers=2)
    config = dict(data="random", **{**FAST, "steps": 60, "lr": 3e-4})
    ids, _ = distillation_data(model, LKDConfig(**config))  # the distillation set (seeded)

    def divergence(compiled) -> float:
        with torch.no_grad():
            fp = torch.log_softmax(model(input_ids=ids).logits, -1)
            q = torch.log_softmax(compiled(input_ids=ids).logits, -1)
        return torch.nn.functional.kl_div(q.flatten(0, 1), fp.flatten(0, 1), log_target=True,
                                          reduction="batchmean").item()

    mse_only = zqcompile.compile(model, "w4a8", lkd=LKDConfig(**config), generation=False)
    with_kl = zqcompile.compile(model, "w4a8", lkd=LKDConfig(logits_kl=10.0, **config), generation=False)
    assert divergence(with_kl) < divergence(mse_only)
    assert all(p.grad is None for p in model.parameters())  # the LM head the loss ran through was a copy
    # the first block's loss is unchanged: the same seeded distillation gives the same tensors
    assert torch.equal(with_kl.lkd_result.weights["model.layers.0.mlp.up_proj.weight"],
                       mse_only.lkd_result.weights["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("value", [-1.0, float("nan"), True, "1"])
def test_logits_kl_must_be_a_non_negative_number(value):
    with pytest.raises(ZQError, match="logits_kl must be a number >= 0"):
        LKDConfig(logits_kl=value)


def test_logits_kl_refusals():
    with pytest.raises(ZQError, match="needs a decoder with an LM head"):
        distill(tiny_bert(), load_recipe("w4a8"), LKDConfig(data="random", logits_kl=1.0, **FAST))
    with pytest.raises(ZQError, match="logits_kl is not implemented after rotation"):
        zqcompile.compile(tiny_llama(layers=1), "w4a8-rot", lkd=LKDConfig(data="random", logits_kl=1.0, **FAST))
