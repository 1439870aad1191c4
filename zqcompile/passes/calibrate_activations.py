"""calibrate_activations: per-channel absmax of each activation that W*A8 linears read, on calibration inputs.

Matches the input node of every linear planned with ``act_bits == 8``; runs the (still floating-point) graph
on ``ctx.calibration_inputs`` and stores the absmax over all tokens, per channel, in
``ctx.activation_absmax[node.name]``, and the graph's outputs in ``ctx.calibration_outputs`` (smoothing
checks that it keeps them). Only ``smooth_activations`` reads these statistics: the token-wise
activation scales stay dynamic (computed per token at run time), as ZeroQuant prescribes. Does nothing when
the recipe's ``smooth_alpha`` is None (the default); refuses with a ZQError when smoothing is asked for but
there are no calibration inputs.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node

from zqcompile.errors import ZQError
from zqcompile.passes.infra import META_PLAN, CompileContext, PassResult, linear_nodes


class _ChannelAbsmax(Interpreter):
    """Runs the graph and folds the per-channel absmax of the watched nodes' outputs into ``absmax``."""

    def __init__(self, gm: GraphModule, watched: set[str], absmax: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.watched = watched
        self.absmax = absmax

    def run_node(self, node: Node) -> Any:
        result = super().run_node(node)
        if node.name in self.watched:
            channel_max = result.detach().abs().flatten(0, -2).amax(0).float()
            previous = self.absmax.get(node.name)
            self.absmax[node.name] = channel_max if previous is None else torch.maximum(previous, channel_max)
        return result


def calibrate_activations(gm: GraphModule, ctx: CompileContext) -> PassResult:
    if ctx.recipe.smooth_alpha is None:
        return PassResult(gm, False)
    if not ctx.calibration_inputs:
        raise ZQError(f"recipe {ctx.recipe.name!r} sets smooth_alpha, which needs calibration inputs; pass "
                      f"calibration_data= to zqcompile.compile (token ids), or set smooth_alpha to null")
    watched = {n.args[0].name for n in linear_nodes(gm) if n.meta[META_PLAN].act_bits == 8}
    interpreter = _ChannelAbsmax(gm, watched, ctx.activation_absmax)
    with torch.no_grad():
        ctx.calibration_outputs = [interpreter.run(*inputs) for inputs in ctx.calibration_inputs]
    return PassResult(gm, False, Counter({"calibrate_activations": len(ctx.activation_absmax)}))
