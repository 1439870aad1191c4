"""awq_scale_weights: AWQ's activation-aware per-channel weight scaling (recipe ``weight_rounding: awq``).

AWQ (Lin et al., 2024): multiplying the input channels of a weight that meet large activations by ``s > 1``
before rounding (and dividing the activation by ``s``) protects them from rounding error. Matches an activation
``x`` read by linears with a quantized plan and a stored weight, produced by one of smoothing's producers
(LayerNorm, Llama's RMSNorm, SwiGLU's ``silu(gate) * up``, attention through V's rows: the same rules,
``smooth_activations.MATCHERS``, with every quantized linear as a reader). Runs the graph node by node on
``ctx.calibration_inputs`` (calibration.run_node_major); at each such ``x`` searches ``s = mean|x|**alpha`` over
AWQ's grid of alpha (rounding.awq_scales) on up to ``AWQ_ROWS`` calibration tokens, minimising the readers' summed
output error after round-to-nearest; channels that must share a factor (query heads sharing a KV head) get the
same one. Then folds the factors with smoothing's own fold (``smooth_activations.fold``): the producer divided,
the readers' weight columns multiplied, other readers of a norm given ``x * s`` back; ``quantize_weights`` then
rounds the scaled weights. Exact in floating point: the graph's calibration outputs are checked after folding.

The search measures each reader's own output (AWQ's reference measures some groups at the attention or MLP
output instead). A reader's ``zq_rounding`` meta records the relative output error on the calibration tokens
with alpha 0 (round to nearest) and with the chosen alpha. Refuses (leaves to round-to-nearest, with the rule's
reason in ``zq_rounding``) an activation no rule folds. Does nothing unless the recipe says ``awq``; raises
ZQError without calibration inputs.
"""

from __future__ import annotations

from collections import Counter
from functools import partial

import torch
from torch.fx import GraphModule, Node

from zqcompile.errors import ZQError
from zqcompile.passes.calibration import Batches, run_node_major
from zqcompile.passes.gptq_round_weights import layout_of, quantized_readers
from zqcompile.passes.infra import META_PLAN, META_ROUNDING, CompileContext, PassResult, get_attr_tensor
from zqcompile.passes.patterns import Miss, Rule, apply_rules
from zqcompile.passes.smooth_activations import MATCHERS, Source, check_same_function, fold, restore_for
from zqcompile.rounding import awq_scales

AWQ_ROWS = 512  # calibration tokens the grid search evaluates (spread over the whole calibration set)


def _quantized(linear: Node) -> bool:
    return linear.meta[META_PLAN].quantized


def _match(x: Node) -> tuple[Source | None, list[str]]:
    """The first rule's Source for ``x``, or None and the rules' reasons."""
    reasons = []
    for match in MATCHERS:
        found = match(x, takes_factors=_quantized)
        if isinstance(found, Miss):
            reasons.append(f"{match.__name__}: {found.reason}")
        elif found is not None:
            return found, reasons
    return None, reasons or [f"it comes from {x.target}, which no folding rule covers"]


def awq_scale_weights(gm: GraphModule, ctx: CompileContext) -> PassResult:
    if ctx.recipe.weight_rounding != "awq":
        return PassResult(gm, False)
    if not ctx.calibration_inputs:
        raise ZQError(f"recipe {ctx.recipe.name!r} sets weight_rounding: awq, which needs calibration inputs; "
                      f"zqcompile.compile makes them (or pass calibration_data=)")
    searched: dict[str, torch.Tensor] = {}  # activation name -> factors per channel of it

    def visit(x: Node, envs: Batches) -> None:
        if not quantized_readers(gm, x):
            return
        source, reasons = _match(x)
        if source is None or not source.readers:
            for linear in quantized_readers(gm, x):
                linear.meta[META_ROUNDING] = f"rtn (awq: {'; '.join(reasons)})"
            return
        values = torch.cat([env[x].detach().reshape(-1, env[x].shape[-1]) for env in envs])
        mean_abs = source.expand(source.reduce(values.abs().mean(0).float()))
        rows = values[torch.linspace(0, values.shape[0] - 1, min(AWQ_ROWS, values.shape[0])).long()]
        weights = [get_attr_tensor(gm, r.args[1]).detach() for r in source.readers]
        factors, plain, best = awq_scales(rows.float(), mean_abs, weights, [layout_of(r) for r in source.readers])
        searched[x.name] = factors
        for linear in source.readers:
            linear.meta[META_ROUNDING] = f"awq: output error {plain:.2e} (rtn) -> {best:.2e}"

    run_node_major(gm, ctx.calibration_inputs, visit)
    with torch.no_grad():
        expected = [gm(*inputs) for inputs in ctx.calibration_inputs]

    def scale(gm: GraphModule, ctx: CompileContext, x: Node, source: Source) -> None:
        factors = fold(gm, source, source.reduce(searched[x.name]), "awq")
        if source.others:
            restore_for(gm, x, source.others, factors, "awq")

    rules = [Rule(match.__name__, partial(match, takes_factors=_quantized), scale) for match in MATCHERS]
    applied = apply_rules(gm, ctx, [n for n in gm.graph.nodes if n.name in searched], rules, "awq",
                          lambda x: f"it comes from {x.target}, which no folding rule covers")
    counters = applied.counters
    if counters:
        gm.recompile()
        check_same_function(gm, ctx.calibration_inputs, expected, "AWQ's scaling", "set weight_rounding: gptq")
    return PassResult(gm, bool(counters), Counter(counters))
