"""Shape buckets (zqcompile/buckets.py) on the CPU: bucket policy, padding and slicing, equality with the unpadded
call, models that must not be padded, warm-up shapes, and compile / call inside inference_mode and no_grad.

Tolerances. The padded call runs the same graph on a larger tensor; masked key positions get softmax weight 0
exactly, so the results differ from the unpadded call only by summation order (attention over more keys, GEMM
tiles chosen per row count): float32 rounding, a few ulps of the output's scale (``FP32_RTOL``). In W8A8 an ulp
change of an activation may flip one INT8 rounding decision, which moves that token's GEMM output by at most one
quantization step (absmax/127) times a weight column: far below the recipe's own error, which is every
element's rounding. So W8A8 asserts the padded-vs-unpadded difference at most ``W8A8_SHARE`` of the recipe's
error against the FP32 model (measured: ~1e-7 vs ~1e-3 on the tiny models).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import zqcompile
from zqcompile.buckets import (
    Buckets, ShapeBuckets, default_seq_lens, output_dims, resolve_buckets, round_up, validate_sizes, warmup_shapes,
)
from zqcompile.backends.cuda_graphs import CUDAGraphRunner
from zqcompile.errors import ZQError
from zqcompile.passes.infra import embedding_rows

from helpers import TINY_MAX_POSITIONS, TinyMLP, make_tiny_bert, make_tiny_gpt2, token_batch

FP32_RTOL = 1e-5  # of the output's absmax: float32 summation-order differences
W8A8_SHARE = 0.1  # of the recipe's max error against FP32
BUCKETS = Buckets(batch_sizes=(4, 8), seq_lens=(16, 32))
LKD = {"steps": 1, "num_samples": 4, "seq_len": 16, "progress": False}  # one small step: LKD needs gradients


# ---- policy ----------------------------------------------------------------------------------------------------

def test_default_sequence_buckets_follow_the_maximum_positions():
    assert default_seq_lens(512) == (16, 32, 48, 64, 80, 96, 112, 128, 256, 512)
    assert default_seq_lens(1024)[-3:] == (256, 512, 1024)
    assert default_seq_lens(514)[-3:] == (256, 512, 514)  # the maximum itself is always a bucket
    assert default_seq_lens(40) == (16, 32, 40)


def test_round_up_to_the_smallest_bucket_that_holds_the_size():
    assert [round_up(n, (4, 8)) for n in (1, 4, 5, 8, 9)] == [4, 4, 8, 8, 9]  # past the top: the size itself
    assert round_up(7, ()) == 7


@pytest.mark.parametrize("sizes, match", [((0, 4), "positive integers"), ((4.0,), "positive integers"),
                                          ((True,), "positive integers"), ((16, 64), "maximum of 32 positions")])
def test_bad_bucket_sizes_are_named(sizes, match):
    with pytest.raises(ZQError, match=match):
        validate_sizes(sizes, "seq_lens buckets", limit=TINY_MAX_POSITIONS)
    assert validate_sizes((8, 2, 8), "x") == (2, 8)


def test_bucket_values_accepted_and_refused():
    assert Buckets.from_value(True) == Buckets()
    assert Buckets.from_value({"batch_sizes": [1, 2]}) == Buckets(batch_sizes=(1, 2))
    with pytest.raises(ZQError, match="unknown bucket keys"):
        Buckets.from_value({"batch": [1]})
    with pytest.raises(ZQError, match="buckets must be"):
        Buckets.from_value("yes")


# ---- padding: results equal the unpadded call -----------------------------------------------------------------

class _Spy:
    """Records the input shapes the compiled graph is called with."""

    def __init__(self, graph):
        self.graph, self.shapes = graph, []

    def __call__(self, *inputs):
        self.shapes.append(tuple(inputs[0].shape))
        return self.graph(*inputs)


def _bucketed(model, recipe):
    qmodel = zqcompile.compile(model, recipe, buckets=BUCKETS, generation=False)  # the forward only
    spy = _Spy(qmodel.graph_module)
    object.__setattr__(qmodel, "runner", spy)
    return qmodel, spy


def _user_batch(batch, seq, seed):
    """Token ids with the user's own right padding in some rows (as a tokenizer returns them)."""
    ids = token_batch(batch, seq, seed=seed)
    mask = torch.ones_like(ids)
    for row in range(1, batch, 2):
        mask[row, seq // 2 + row % 3:] = 0
    return ids, mask


@pytest.mark.parametrize("family, recipe", [("bert", "w8a16"), ("bert", "w8a8"), ("gpt2", "w8a8")])
def test_padded_results_match_the_unpadded_call(family, recipe):
    model = {"bert": make_tiny_bert, "gpt2": make_tiny_gpt2}[family]()
    qmodel, spy = _bucketed(model, recipe)
    for (batch, seq), padded in [((3, 11), (4, 16)), ((9, 20), None), ((8, 32), (8, 32))]:
        ids, mask = _user_batch(batch, seq, seed=batch)
        spy.shapes.clear()
        got = qmodel(input_ids=ids, attention_mask=mask)
        if padded is not None:
            assert spy.shapes == [padded]
        else:  # 9 rows > the top batch bucket: chunks of 8 and 1, each padded
            assert spy.shapes == [(8, 32), (4, 32)]
        unpadded = qmodel.graph_module(*qmodel.graph_inputs(input_ids=ids, attention_mask=mask))
        with torch.no_grad():
            fp32 = model(input_ids=ids, attention_mask=mask)
        for key, value, reference in zip(qmodel.output_keys, got.values(), unpadded):
            assert value.shape == reference.shape and value.is_contiguous()
            diff = (value - reference).abs().max().item()
            if recipe == "w8a16":  # no activation quantization: float rounding only
                assert diff <= FP32_RTOL * reference.abs().max().item(), (key, diff)
            else:
                recipe_error = (reference - fp32[key]).abs().max().item()
                assert diff <= W8A8_SHARE * recipe_error, (key, diff, recipe_error)


class _OpLog(TorchDispatchMode):
    """The tensor ops run under it (each a kernel launch on the GPU), in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


class _Replay:
    """Stands in for a CUDAGraphRunner's replay (not counted): returns fixed outputs; its index guard (whose ops run
    inside the graph) keeps its flag."""

    def __init__(self, outputs, index_rows):
        self.outputs, self.index_guard = outputs, CUDAGraphRunner(None, index_rows=index_rows).index_guard
        self.index_guard.prepare(torch.device("cpu"))

    def __call__(self, *inputs):
        return self.outputs


def test_a_call_of_a_bucket_shape_runs_no_tensor_op_before_the_graph():
    """Host work before the replay is on the latency path (the GPU idles meanwhile): at a bucket's exact shape the
    wrapper neither pads nor slices nor copies, and leaves the token-id check to the graph's index guard: after the
    replay it reads the guard's flag back (one op), made defaults aside."""
    qmodel, spy = _bucketed(make_tiny_bert(), "w8a8")
    ids, mask = _user_batch(8, 32, seed=0)
    outputs = spy.graph(*qmodel.graph_inputs(input_ids=ids, attention_mask=mask))
    object.__setattr__(qmodel, "runner", _Replay(outputs, embedding_rows(qmodel.graph_module)))
    for given, ops in (({"token_type_ids": torch.zeros_like(ids)}, ["_local_scalar_dense"]),
                       ({}, ["zeros_like", "_local_scalar_dense"])):  # the default token types made here
        with _OpLog() as log:
            got = qmodel(input_ids=ids, attention_mask=mask, **given)
        assert log.ops == ops
        assert all(a is b for a, b in zip(got.values(), outputs))


def test_padded_batch_rows_attend_to_their_first_position():
    buckets = ShapeBuckets((4,), (16,), mask_index=1, seq_outputs=(True,))
    ids, mask = _user_batch(3, 5, seed=0)
    padded_ids, padded_mask = buckets.pad([ids, mask], 4, 16)
    assert torch.equal(padded_ids[:3, :5], ids) and padded_ids[:, 5:].eq(0).all() and padded_ids[3].eq(0).all()
    assert torch.equal(padded_mask[:3, :5], mask) and padded_mask[:3, 5:].eq(0).all()
    assert padded_mask[3].tolist() == [1] + [0] * 15


def test_output_dims_come_from_the_graph(compiled_tiny):
    _, qmodel = compiled_tiny("bert")
    assert output_dims(qmodel.graph_module) == [(True, True), (True, False)]  # last_hidden_state, pooler_output


# ---- what is (not) padded ------------------------------------------------------------------------------------

def _resolve(qmodel, value, backend="cpu"):
    return resolve_buckets(value, backend=backend, input_names=qmodel.input_names, max_seq_len=qmodel.max_seq_len,
                           graph_module=qmodel.graph_module)


def test_cpu_backend_pads_only_when_asked(compiled_tiny):
    _, qmodel = compiled_tiny("bert")
    assert qmodel.buckets is None
    assert _resolve(qmodel, True) == _resolve(qmodel, None, backend="cuda") == ShapeBuckets(
        batch_sizes=(1, 2, 4, 8, 16, 32, 64), seq_lens=default_seq_lens(TINY_MAX_POSITIONS), mask_index=1,
        seq_outputs=(True, False))
    assert _resolve(qmodel, False, backend="cuda") is None


def test_a_model_without_attention_mask_is_never_padded_along_the_sequence():
    module = TinyMLP()
    example = (torch.randn(2, 64),)
    with pytest.raises(ZQError, match="need an attention_mask input"):
        zqcompile.compile(module, "w8a8", example_inputs=example, buckets=Buckets(seq_lens=(16,)))
    qmodel = zqcompile.compile(module, "w8a8", example_inputs=example, buckets=Buckets(batch_sizes=(4,)))
    assert _resolve(qmodel, None, backend="cuda") is None  # a plain module's rows are padded only when asked
    x = torch.randn(3, 64)
    assert torch.allclose(qmodel(x), qmodel.graph_module(x), rtol=0, atol=FP32_RTOL * qmodel(x).abs().max().item())


# ---- warm-up ---------------------------------------------------------------------------------------------------

class _FakeGraphRunner:
    """Stands in for CUDAGraphRunner.warmup on the CPU: records the signatures it would capture."""

    def __init__(self):
        self.signatures = []

    def warmup(self, input_tuples, progress=True):
        new = [tuple(tuple(x.shape) for x in inputs) for inputs in input_tuples]
        new = [s for s in new if s not in self.signatures]
        self.signatures += new
        return len(new)


def test_warmup_captures_each_bucket_shape_once(compiled_tiny):
    qmodel = copy.copy(compiled_tiny("bert")[1])  # its own runner and buckets, the same graph
    qmodel.buckets = _resolve(qmodel, BUCKETS)
    assert warmup_shapes(qmodel.buckets, (1, 3, 4, 20), (5, 16, 17), text_model=True) == [
        (4, 16), (4, 32), (8, 16), (8, 32)]  # 20 rows run as chunks of 8 (and the rest)
    fake = _FakeGraphRunner()
    object.__setattr__(qmodel, "runner", fake)
    assert qmodel.warmup(progress=False) == 4  # every bucket: 2 batch x 2 sequence sizes
    assert qmodel.warmup(batch_sizes=[2], seq_lens=[30], progress=False) == 0  # (4, 32) is warm already
    assert all(len(sig) == 3 for sig in fake.signatures)  # input_ids, attention_mask, token_type_ids
    with pytest.raises(ZQError, match="positive integers"):
        qmodel.warmup(batch_sizes=[0], progress=False)


def test_warmup_without_buckets_needs_sizes(compiled_tiny):
    _, qmodel = compiled_tiny("bert")
    with pytest.raises(ZQError, match="warmup needs batch_sizes"):
        qmodel.warmup(progress=False)
    assert qmodel.warmup(batch_sizes=[2], seq_lens=[8], progress=False) == 0  # CPU: runs once, nothing to capture
    assert qmodel.memory_report().graphs == 0


# ---- inference mode ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_compile_and_call_inside_inference_mode_and_no_grad(context, compiled_tiny):
    model, plain = compiled_tiny("bert")
    ids, mask = _user_batch(3, 9, seed=3)
    reference = plain(input_ids=ids, attention_mask=mask)
    with context():
        qmodel = zqcompile.compile(model, "w8a8", buckets=BUCKETS, lkd=LKD)
        inside = qmodel(input_ids=ids, attention_mask=mask)
    outside = qmodel(input_ids=ids, attention_mask=mask)
    assert qmodel.lkd_result is not None and not torch.is_inference(outside.last_hidden_state)
    assert torch.equal(inside.last_hidden_state, outside.last_hidden_state)
    lkd_moved = (outside.last_hidden_state - reference.last_hidden_state).abs().max().item()
    assert 0 < lkd_moved < 0.5  # one LKD step changed the weights a little: it ran with gradients
