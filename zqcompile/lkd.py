"""LKD: ZeroQuant's layer-by-layer knowledge distillation, without the original training data.

For every transformer block k (the repeated layers of the model's block ``nn.ModuleList``), in order:

1. the teacher is the floating-point block k and the student a copy of it that runs *simulated
   quantization* exactly as the compiled graph will: each quantized linear's weight goes through the
   compiler's group-wise quantizer (:func:`zqcompile.quant.quantize_weight`) and the inputs of W*A8 linears
   through token-wise INT8 (:func:`zqcompile.quant.quantize_rows`), both with a straight-through estimator
   (rounding is the identity in the backward pass);
2. both see the same input h^{k-1}; by default (``inputs_from="student"``) it is the output of the already
   distilled, quantized blocks 1..k-1, i.e. what the compiled model will feed block k, so later blocks learn
   to correct the error of earlier ones. ``inputs_from="teacher"`` feeds the floating-point chain instead
   (ZeroQuant's paper setting; each block then learns in isolation);
3. Adam minimises the MSE between the teacher's and the student's block outputs, updating only block k's
   quantized linears (weights and biases; LayerNorm/RMSNorm parameters too with ``train_norms=True``).
   Weight scales are not learned separately: they follow the weights (absmax / qmax), as in the compiler.

Memory: only block k's teacher, its student, the student's optimizer state and the cached block inputs /
targets of the distillation set are alive; the user's model is never modified (teacher blocks run under
``no_grad``; students are copies). The distilled tensors are returned as ``{parameter name: tensor}`` and
the pipeline's ``distill`` phase (passes/distill_blocks.py) puts them into the captured graph before the
compiler quantizes its weights, so the distilled model goes through exactly the same passes and backends as a
PTQ model. The plans LKD simulates are the ones the compiler resolved (its ``plan`` phase).

Distillation data (``LKDConfig.data``, zqcompile/distillation_data.py) needs no training set: text sampled
from the model itself (decoders), random token ids (encoders), or the user's token ids or text.

What is distilled: blocks with INT4 weights or INT8 activations (W4A8, W8A8, W4A16). A recipe whose
blocks are all INT8 weight-only (W8A16, already near-exact) makes LKD a documented no-op with a warning;
a recipe that quantizes nothing inside the blocks, an empty data source or zero steps raise ZQError.
``logits_kl > 0`` adds, for the last block, the KL divergence between the FP model's and the student's
next-token distributions (the block output through the final norm and the LM head, both floating point) to the
MSE. Not done: learned weight scales.

Block inputs are captured with a forward pre-hook on the first block (positional args *and* keyword
arguments: attention masks, rotary cos/sin, ...), after which blocks are called directly.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from zqcompile.capture import is_hf_model
from zqcompile.distillation_data import distillation_data
from zqcompile.errors import ZQError
from zqcompile.quant import dequantize_weight_values, quantize_rows, quantize_weight
from zqcompile.recipe import LKDConfig, LinearPlan


@dataclass(frozen=True)
class BlockReport:
    """What distilling one block did. MSEs are over the whole distillation set, student vs teacher."""

    index: int
    name: str
    mse_ptq: float  # quantized block with the original weights (plain PTQ)
    mse_lkd: float  # after distillation
    steps: int
    seconds: float
    trained: tuple[str, ...]  # parameter names updated


@dataclass
class LKDResult:
    """Distilled tensors (``{parameter name of the original model: tensor}``) and a per-block log."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    blocks: list[BlockReport] = field(default_factory=list)
    data_source: str = ""
    inputs_from: str = "student"
    tokens: int = 0  # tokens in the distillation set
    seconds: float = 0.0
    # peak RSS growth during LKD (CPU; includes making the data: self-generation runs the FP model with a KV
    # cache, ~0.5 GB of the ~0.64 GB measured for SmolLM2-135M) or peak CUDA allocation growth (GPU)
    peak_memory_mb: float = 0.0
    held_memory_mb: float = 0.0  # largest (teacher + student + optimizer state + cached activations) of a block
    note: str = ""

    def __str__(self) -> str:
        if not self.blocks:
            return f"LKD: nothing distilled ({self.note})"
        lines = [f"LKD over {len(self.blocks)} blocks, {self.tokens} tokens of {self.data_source} data, inputs from "
                 f"the {self.inputs_from} chain, {self.seconds:.1f} s; peak memory +{self.peak_memory_mb:.0f} MB "
                 f"(teacher + student + optimizer + activations: {self.held_memory_mb:.0f} MB)",
                 f"{'block':<32} {'MSE PTQ':>11} {'MSE LKD':>11} {'ratio':>6}"]
        for b in self.blocks:
            ratio = b.mse_lkd / b.mse_ptq if b.mse_ptq else 1.0
            lines.append(f"{b.name:<32} {b.mse_ptq:>11.4g} {b.mse_lkd:>11.4g} {ratio:>6.3f}")
        return "\n".join(lines)


# ---- finding the blocks and their plans ---------------------------------------------------------------

def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's transformer blocks: the nn.ModuleList of same-class layers holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(layer) for layer in module}) != 1 or not any(_linear_modules(module[0])):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ZQError(f"LKD found no transformer blocks in {type(model).__name__}: it distils the layers of an "
                      f"nn.ModuleList of repeated blocks that contain linear layers (BERT encoder.layer, Llama "
                      f"model.layers, GPT-2 transformer.h); compile without lkd= for plain PTQ")
    return best[1], best[2]


def lm_head_of(model: nn.Module, blocks_name: str) -> tuple[nn.Module, nn.Module]:
    """The final norm (the one norm among the blocks' siblings) and the LM head, for ``logits_kl``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    parent = model.get_submodule(blocks_name.rpartition(".")[0])
    norms = [m for _, m in parent.named_children() if "norm" in type(m).__name__.lower()]
    if head is None or len(norms) != 1:
        raise ZQError(f"LKDConfig.logits_kl needs a decoder with an LM head and one final norm beside its blocks; "
                      f"{type(model).__name__} has {'no LM head' if head is None else f'{len(norms)} norms there'}; "
                      f"set logits_kl: 0")
    return norms[0], head


def _logits_kl(head: tuple[nn.Module, nn.Module], student: torch.Tensor, teacher_log_probs: torch.Tensor
               ) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, mean over tokens."""
    log_probs = torch.log_softmax(head[1](head[0](student)).float(), -1)
    return nn.functional.kl_div(log_probs.flatten(0, -2), teacher_log_probs.flatten(0, -2), log_target=True,
                                reduction="batchmean")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer with its weight stored as [in, out]."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def needs_distillation(plan: LinearPlan) -> bool:
    """INT4 weights or INT8 activations lose accuracy that LKD recovers; INT8 weight-only (W8A16) is near-exact."""
    return plan.quantized and (plan.weight_bits == 4 or plan.act_bits == 8)


def _linear_modules(module: nn.Module, prefix: str = ""):
    for name, child in module.named_modules(prefix=prefix):
        if isinstance(child, nn.Linear) or is_conv1d(child):
            yield name, child


# ---- simulated quantization with straight-through estimators ---------------------------------------------

def _straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward pass, identity gradient to ``x`` in the backward pass."""
    return x + (quantized.to(x.dtype) - x).detach()


class FakeQuantWeight(nn.Module):
    """Parametrization: the weight as the compiler will store it (group-wise INT8/INT4, dequantized)."""

    def __init__(self, plan: LinearPlan, stored_transposed: bool):
        super().__init__()
        self.plan = plan
        self.stored_transposed = stored_transposed

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.t() if self.stored_transposed else weight
        dequantized = dequantize_weight_values(*quantize_weight(
            w, self.plan.weight_bits, self.plan.group_size, self.plan.input_group_size, self.plan.weight_symmetric))
        return _straight_through(weight, dequantized.t() if self.stored_transposed else dequantized)


def fake_quant_rows(x: torch.Tensor) -> torch.Tensor:
    """Token-wise INT8 quantize + dequantize (the compiler's activation quantization), straight-through."""
    q, scale = quantize_rows(x)
    return _straight_through(x, q.float() * scale)


def _fake_quant_input_hook(module: nn.Module, args: tuple) -> tuple:
    return (fake_quant_rows(args[0]), *args[1:])


def make_student(block: nn.Module, prefix: str, plans: Mapping[str, LinearPlan],
                 train_norms: bool) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """A copy of ``block`` that computes what the compiled graph computes; returns it and its trainable params."""
    student = copy.deepcopy(block)
    student.requires_grad_(False)
    trainable: dict[str, nn.Parameter] = {}
    for local_name, linear in list(_linear_modules(student)):
        full_name = f"{prefix}.{local_name}" if local_name else prefix
        plan = plans.get(full_name)
        if plan is None or not plan.quantized:
            continue
        for param_name in ("weight", "bias"):
            param = getattr(linear, param_name, None)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(True)
                trainable[f"{full_name}.{param_name}"] = param
        parametrize.register_parametrization(linear, "weight", FakeQuantWeight(plan, is_conv1d(linear)),
                                             unsafe=True)
        if plan.act_bits == 8:
            linear.register_forward_pre_hook(_fake_quant_input_hook)
    if train_norms:
        for local_name, module in student.named_modules():
            if "norm" in type(module).__name__.lower():
                for param_name, param in module.named_parameters(recurse=False):
                    param.requires_grad_(True)
                    trainable[f"{prefix}.{local_name}.{param_name}"] = param
    return student, trainable


# ---- block inputs ---------------------------------------------------------------------------------------

class _StopForward(Exception):
    """Raised by the input-capturing hook: nothing after the first block needs to run."""


def _call_model(model: nn.Module, batch: torch.Tensor) -> None:
    if is_hf_model(model) and not batch.is_floating_point():
        kwargs = {"input_ids": batch, "attention_mask": torch.ones_like(batch)}
        if getattr(model.config, "use_cache", None) is not None:
            kwargs["use_cache"] = False
        model(**kwargs)
    else:
        model(batch)


def capture_block_inputs(model: nn.Module, first_block: nn.Module,
                         batches: Sequence[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) of the first block's call for each batch, via a forward pre-hook."""
    calls: list[tuple[tuple, dict]] = []

    def record(module: nn.Module, args: tuple, kwargs: dict):
        calls.append((args, kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    _call_model(model, batch)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if len(calls) != len(batches):
        raise ZQError(f"LKD: the model's forward did not call its first block ({len(calls)} calls for "
                      f"{len(batches)} batches)")
    return calls


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _block_output(output: Any) -> torch.Tensor:
    """The hidden states a block returns (blocks return a tensor, or a tuple / ModelOutput starting with it)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _move(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Tensors inside (nested) args to ``device``; floating ones to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device, dtype) for k, v in value.items()}
    return value


# ---- memory accounting ------------------------------------------------------------------------------------------

class _PeakMemory:
    """Peak growth of resident memory (CPU: /proc/self/statm, sampled) or of CUDA allocations."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self.device = device
        self.start = self._now()
        self.peak = self.start

    def _now(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return 0

    def sample(self) -> None:
        now = torch.cuda.max_memory_allocated(self.device) if self.cuda else self._now()
        self.peak = max(self.peak, now)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2 ** 20


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# ---- the distillation loop ---------------------------------------------------------------------------------------

def _mse(student: nn.Module, calls: Sequence[tuple[tuple, dict]], targets: Sequence[torch.Tensor]) -> tuple[
        float, list[torch.Tensor]]:
    """Mean squared error of ``student`` over the whole set, and its outputs."""
    outputs, total, count = [], 0.0, 0
    with torch.no_grad():
        for (args, kwargs), target in zip(calls, targets):
            out = _block_output(student(*args, **kwargs))
            total += torch.sum((out - target) ** 2).item()
            count += target.numel()
            outputs.append(out)
    return total / count, outputs


@torch.enable_grad()  # LKD trains; the caller may be inside no_grad()
def distill(model: nn.Module, plans: Mapping[str, LinearPlan], config: LKDConfig, recipe_name: str = "") -> LKDResult:
    """Distil every block of ``model`` towards its quantized form; the model itself is left unchanged.

    ``plans`` are the compiler's resolved plans (``CompileContext.plans``: module name -> LinearPlan), so LKD
    simulates exactly the quantization the compiler will apply; ``recipe_name`` only labels messages.
    """
    started = time.perf_counter()
    blocks_name, blocks = find_blocks(model)
    in_blocks = {name: plan for name, plan in plans.items() if name.startswith(f"{blocks_name}.")}
    if not any(plan.quantized for plan in in_blocks.values()):
        raise ZQError(f"recipe {recipe_name!r} quantizes no linear layer inside {blocks_name}: LKD has nothing to "
                      f"distil; compile without lkd=")
    if not any(needs_distillation(plan) for plan in in_blocks.values()):
        note = (f"recipe {recipe_name!r} only has INT8 weight-only (W8A16) linears in {blocks_name}; they are "
                f"accurate with PTQ and LKD distils only blocks with INT4 weights or INT8 activations: it does nothing")
        warnings.warn(note, stacklevel=3)
        return LKDResult(note=note, inputs_from=config.inputs_from)

    model.eval()
    model_dtype = next(model.parameters()).dtype
    device = torch.device(config.device) if config.device else next(model.parameters()).device
    memory = _PeakMemory(device)
    # copies: the student's loss must not leave gradients on (or depend on the dtype of) the user's modules
    head = tuple(copy.deepcopy(m).to(device, torch.float32).requires_grad_(False)
                 for m in lm_head_of(model, blocks_name)) if config.logits_kl else None
    data, source = distillation_data(model, config)
    batches = list(data.split(config.batch_size))
    calls = [_move(call, device, torch.float32) for call in capture_block_inputs(model, blocks[0], batches)]
    memory.sample()

    result = LKDResult(data_source=source, inputs_from=config.inputs_from,
                       tokens=int(data.shape[0] * data.shape[1]) if not data.is_floating_point() else 0)
    for index, block in enumerate(blocks):
        prefix = f"{blocks_name}.{index}"
        block_started = time.perf_counter()
        teacher = copy.deepcopy(block).to(device, torch.float32) if (
            device != next(block.parameters()).device or model_dtype != torch.float32) else block
        with torch.no_grad():
            targets = [_block_output(teacher(*args, **kwargs)) for args, kwargs in calls]
        block_plans = {n: p for n, p in in_blocks.items() if n.startswith(f"{prefix}.")}
        if not any(needs_distillation(p) for p in block_plans.values()):
            # nothing to distil here; the next block's input is this block's PTQ output (or the FP output)
            student, _ = make_student(teacher, prefix, block_plans, train_norms=False)
            student_outputs = _mse(student, calls, targets)[1] if config.inputs_from == "student" else targets
            calls = [_with_hidden(a, kw, h) for (a, kw), h in zip(calls, student_outputs)]
            continue
        student, trainable = make_student(teacher, prefix, block_plans, config.train_norms)
        mse_ptq, _ = _mse(student, calls, targets)
        kl_targets = None
        if head is not None and index == len(blocks) - 1:  # the last block: also the FP next-token distribution
            with torch.no_grad():
                kl_targets = [torch.log_softmax(head[1](head[0](t)).float(), -1) for t in targets]

        def loss_of(step: int) -> torch.Tensor:
            args, kwargs = calls[step % len(calls)]
            output = _block_output(student(*args, **kwargs))
            loss = nn.functional.mse_loss(output, targets[step % len(calls)])
            if kl_targets is not None:
                loss = loss + config.logits_kl * _logits_kl(head, output, kl_targets[step % len(calls)])
            return loss

        optimizer = optimize(list(trainable.values()), loss_of, config, f"LKD {prefix}", memory)
        held = (_bytes(teacher.parameters()) + _bytes(student.parameters())
                + _bytes(t for state in optimizer.state.values() for t in state.values())
                + _bytes(_hidden_of(a, kw) for a, kw in calls) + _bytes(targets))
        result.held_memory_mb = max(result.held_memory_mb, held / 2 ** 20)
        mse_lkd, student_outputs = _mse(student, calls, targets)
        for name, param in trainable.items():
            result.weights[name] = param.detach().to(model_dtype).to(next(model.parameters()).device).clone()
        result.blocks.append(BlockReport(index, prefix, mse_ptq, mse_lkd, config.steps,
                                         time.perf_counter() - block_started, tuple(trainable)))
        next_inputs = student_outputs if config.inputs_from == "student" else targets
        calls = [_with_hidden(a, kw, h) for (a, kw), h in zip(calls, next_inputs)]
        del teacher, student, optimizer, trainable, targets, student_outputs
        memory.sample()
    result.seconds = time.perf_counter() - started
    result.peak_memory_mb = memory.growth_mb
    return result


def optimize(params: list[nn.Parameter], loss_of: Callable[[int], torch.Tensor], config: LKDConfig,
             description: str, memory: _PeakMemory) -> torch.optim.Optimizer:
    """``config.steps`` Adam steps on ``params`` minimising ``loss_of(step)``; returns the optimizer (its state)."""
    optimizer = torch.optim.Adam(params, lr=config.lr)
    bar = _progress(config, description)
    for step in range(config.steps):
        loss = loss_of(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        memory.sample()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4g}")
    if bar is not None:
        bar.close()
    return optimizer


def _progress(config: LKDConfig, description: str):
    if not config.progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=config.steps, desc=description, leave=False)
