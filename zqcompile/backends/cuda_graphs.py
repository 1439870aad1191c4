"""CUDAGraphRunner: replay a compiled forward as one CUDA graph per input shape.

A zqcompile forward is hundreds of small launches (a Numba launch costs 40-140 us of CPU, a torch op
~10 us), so at small batch the CPU, not the GPU, sets the latency. The runner captures the whole forward
into a ``torch.cuda.CUDAGraph`` the first time it sees an input signature (shapes, dtypes, devices), keeps
at most ``max_graphs`` of them (least recently used dropped first), and afterwards only copies the inputs
into the graph's static buffers and replays it.

Before a capture the forward runs ``warmup_runs`` times eagerly on a side stream, so that Numba's JIT
compilation and the Triton GEMMs' autotuning (which synchronise the device and cannot be captured) happen
outside the graph. Outputs are copied out of the graph's static buffers, so a result stays valid after the
next call. The runner is for inference: it runs under ``torch.no_grad()``, and outside inference mode even
when called inside it (a graph captured from an inference-mode call would otherwise hold inference tensors
as its static inputs, which a later call outside inference mode may not write).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from zqcompile.errors import ZQError


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_inputs: list[Any]
    static_outputs: Any


def _signature(inputs: tuple[Any, ...]) -> tuple:
    return tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else ("const", x) for x in inputs)


class CUDAGraphRunner:
    """Calls ``forward(*inputs)`` through CUDA graphs captured per input signature (a bounded LRU cache)."""

    def __init__(self, forward: Callable[..., Any], max_graphs: int = 16, warmup_runs: int = 2):
        if max_graphs < 1:
            raise ZQError(f"max_graphs must be at least 1, got {max_graphs}")
        self.forward = forward
        self.max_graphs = max_graphs
        self.warmup_runs = warmup_runs
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.captures = 0  # graphs captured so far (tests and benchmarks read it)

    @property
    def cached_signatures(self) -> list[tuple]:
        return list(self._graphs)

    @torch.no_grad()
    @torch.inference_mode(False)  # static buffers stay normal tensors, so any later call may copy into them
    def __call__(self, *inputs: Any) -> Any:
        tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
        if not tensors or any(not t.is_cuda for t in tensors):
            raise ZQError("the CUDA-graph runner needs CUDA tensor inputs; move the inputs to the model's device "
                          "or compile with cuda_graphs=False")
        key = _signature(inputs)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(inputs)
            self._graphs[key] = entry
            if len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        for static, new in zip(entry.static_inputs, inputs):
            if isinstance(static, torch.Tensor):
                static.copy_(new)
        entry.graph.replay()
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, entry.static_outputs)

    def _capture(self, inputs: tuple[Any, ...]) -> _Captured:
        static_inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):
                self.forward(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_outputs = self.forward(*static_inputs)
        self.captures += 1
        return _Captured(graph, static_inputs, static_outputs)
