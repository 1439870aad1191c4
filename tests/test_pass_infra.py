"""The pass manager: lint + recompile after each pass, counters, and errors that name the failing pass."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from helpers import count_ops, export_graph
from zqcompile import ZQError
from zqcompile.passes import CompileContext, PassResult, remove_dropout, remove_tensor_asserts, run_passes
from zqcompile.pipeline import PHASE_NAMES, run_pipeline
from zqcompile.recipe import load_recipe

RELU = torch.ops.aten.relu.default


class ReluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(16, 16), nn.Linear(16, 4), nn.Dropout(0.1)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def _graph():
    return export_graph(ReluNet(), torch.randn(2, 16))


def _context() -> CompileContext:
    return CompileContext(load_recipe("w8a8"))


def exploding_pass(gm, ctx):
    raise RuntimeError("boom")


def test_failure_names_the_pass_and_the_passes_before_it():
    with pytest.raises(ZQError) as info:
        run_passes(_graph(), _context(), [remove_dropout, remove_tensor_asserts, exploding_pass])
    assert str(info.value) == ("an error occurred when running the 'exploding_pass' pass after the following "
                               "passes: ['remove_dropout', 'remove_tensor_asserts']: RuntimeError: boom")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_user_errors_from_a_pass_pass_through_unwrapped():
    def refusing_pass(gm, ctx):
        raise ZQError("this recipe cannot be applied")

    with pytest.raises(ZQError, match="^this recipe cannot be applied$"):
        run_passes(_graph(), _context(), [remove_dropout, refusing_pass])


def test_lint_catches_a_pass_that_breaks_the_graph():
    def use_before_definition(gm, ctx):
        """Insert a node at the top of the graph that reads the relu further down."""
        relu = next(n for n in gm.graph.nodes if n.target is RELU)
        with gm.graph.inserting_before(next(iter(gm.graph.nodes))):
            gm.graph.call_function(torch.ops.aten.neg.default, (relu,))
        return PassResult(gm, True)

    with pytest.raises(ZQError, match=r"running the 'use_before_definition' pass after the following passes: "
                                      r"\['remove_dropout'\]: RuntimeError: .*used before it has been defined"):
        run_passes(_graph(), _context(), [remove_dropout, use_before_definition])


def test_recompiles_after_each_pass_and_merges_counters():
    def relu_to_neg(gm, ctx):
        """Changes the graph without recompiling: the manager must make the change take effect."""
        for node in [n for n in gm.graph.nodes if n.target is RELU]:
            node.target = torch.ops.aten.neg.default
        return PassResult(gm, True, {"relu_to_neg": 1})

    gm = _graph()
    x = torch.randn(3, 16)
    model = ReluNet()
    ctx = _context()
    gm = run_passes(gm, ctx, [remove_dropout, relu_to_neg])
    assert ctx.passes_run == ["remove_dropout", "relu_to_neg"]
    assert ctx.counters == {"remove_dropout": 1, "relu_to_neg": 1}
    assert "aten.neg.default" in gm.code
    gm_params = dict(gm.named_parameters())
    model.load_state_dict({k.removeprefix("model."): v for k, v in gm_params.items()})
    with torch.no_grad():
        expected = model.fc2(-model.fc1(x))
        torch.testing.assert_close(gm(x), expected)


def test_only_a_modified_graph_is_linted_and_recompiled(monkeypatch):
    """A pass reports ``modified``; the manager recompiles after the passes that changed the graph, only."""
    gm = _graph()
    passes_done_at_recompile = []
    original = gm.recompile
    monkeypatch.setattr(gm, "recompile", lambda: passes_done_at_recompile.append(len(ctx.passes_run)) or original())
    ctx = _context()
    run_passes(gm, ctx, [remove_tensor_asserts, remove_dropout, remove_tensor_asserts])
    assert ctx.passes_run == ["remove_tensor_asserts", "remove_dropout", "remove_tensor_asserts"]
    assert passes_done_at_recompile == [1]  # once, right after the second pass (remove_dropout)
    assert ctx.counters == {"remove_dropout": 1}  # nothing to remove: no zero counter for the other pass


def test_pass_result_keeps_only_positive_counts():
    result = PassResult(_graph(), False, Counter({"a.hits": 2, "a.none": 0}))
    assert result.counters == {"a.hits": 2} and "a.none" not in result.counters


def test_pipeline_stops_after_a_phase_and_dumps_code(tmp_path):
    result = run_pipeline(_graph(), load_recipe("w8a8"), stop_after="quantize_weights", dump_dir=tmp_path)
    gm, ctx = result.compiled, result.context
    phases = PHASE_NAMES[:PHASE_NAMES.index("quantize_weights") + 1]
    dumps = [f"{index:02d}_{phase}.py" for index, phase in enumerate(phases)]
    assert dumps[:2] == ["00_canonicalize.py", "01_plan.py"]
    assert sorted(p.name for p in tmp_path.iterdir()) == dumps
    assert "zq.dequantize_weight" in (tmp_path / dumps[-1]).read_text()
    assert "zq.dequantize_weight" not in (tmp_path / dumps[-2]).read_text()
    assert count_ops(gm, torch.ops.zq.dequantize_weight.default) == 2
    assert count_ops(gm, torch.ops.zq.quantize_per_token.default) == 0
    assert ctx.passes_run[-1] == "quantize_weights"
    with pytest.raises(ZQError, match=r"unknown phase 'fusion'; phases are \['canonicalize', 'plan', "):
        run_pipeline(_graph(), load_recipe("w8a8"), stop_after="fusion")
    assert PHASE_NAMES[-1] == "cleanup"
