"""Running a graph on calibration inputs, for the passes that need activation statistics.

- :func:`channel_absmax`: per-channel absmax of chosen nodes over all inputs (batch by batch);
- :func:`run_node_major`: the graph evaluated one node at a time over *all* calibration batches, with a callback
  after each node. Values are freed after their last reader, so only the activations that are live at a node
  are held; a callback sees every batch's value of a node at once (GPTQ builds a layer's Hessian there and
  rounds its weights before the layer runs, so later layers see the rounded ones: GPTQ's sequential mode,
  with one Hessian in memory at a time).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node

Batches = list[dict[Node, Any]]  # one environment (node -> value) per calibration input tuple


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


def channel_absmax(gm: GraphModule, watched: set[str], inputs: Sequence[tuple[torch.Tensor, ...]],
                   absmax: dict[str, torch.Tensor]) -> list[Any]:
    """Fold the per-channel absmax of the ``watched`` nodes (by name) into ``absmax``; returns the outputs."""
    interpreter = _ChannelAbsmax(gm, watched, absmax)
    with torch.no_grad():
        return [interpreter.run(*args) for args in inputs]


def run_node_major(gm: GraphModule, inputs: Sequence[tuple[torch.Tensor, ...]],
                   visit: Callable[[Node, Batches], None]) -> None:
    """Evaluate ``gm`` node by node on every input tuple; call ``visit(node, envs)`` after each node.

    ``visit`` may rewrite the graph ahead of the current node (give a reader a new stored tensor: it then sets
    that get_attr node's value in every environment itself); nodes it adds are not evaluated here.
    """
    interpreter = Interpreter(gm)
    envs: Batches = [{} for _ in inputs]
    nodes = list(gm.graph.nodes)
    last_reader = {arg: node for node in nodes for arg in node.all_input_nodes}
    placeholders = iter(range(len(nodes)))
    with torch.no_grad():
        for node in nodes:
            if getattr(node, "_erased", False) or node.op == "output":
                continue
            if node.op == "placeholder":
                index = next(placeholders)
                for env, args in zip(envs, inputs):
                    env[node] = args[index]
            else:
                for env in envs:
                    interpreter.env = env
                    env[node] = interpreter.run_node(node)
            visit(node, envs)
            for arg in node.all_input_nodes:
                if last_reader.get(arg) is node:
                    for env in envs:
                        env.pop(arg, None)
