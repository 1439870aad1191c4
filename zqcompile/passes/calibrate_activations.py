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

from torch.fx import GraphModule

from zqcompile.errors import ZQError
from zqcompile.passes.calibration import channel_absmax
from zqcompile.passes.infra import META_PLAN, CompileContext, PassResult, linear_nodes


def calibrate_activations(gm: GraphModule, ctx: CompileContext) -> PassResult:
    if ctx.recipe.smooth_alpha is None:
        return PassResult(gm, False)
    if not ctx.calibration_inputs:
        raise ZQError(f"recipe {ctx.recipe.name!r} sets smooth_alpha, which needs calibration inputs; pass "
                      f"calibration_data= to zqcompile.compile (token ids), or set smooth_alpha to null")
    watched = {n.args[0].name for n in linear_nodes(gm) if n.meta[META_PLAN].act_bits == 8}
    ctx.calibration_outputs = channel_absmax(gm, watched, ctx.calibration_inputs, ctx.activation_absmax)
    return PassResult(gm, False, Counter({"calibrate_activations": len(ctx.activation_absmax)}))
