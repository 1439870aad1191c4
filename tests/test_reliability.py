"""Every bad input is a ZQError naming the problem and the fix, and the compiled model owns its tensors (issue 12)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import zqcompile
from helpers import TINY_HIDDEN, TINY_VOCAB, make_tiny_bert, make_tiny_mlp, token_batch
from zqcompile.backends.cuda_graphs import CUDAGraphRunner
from zqcompile.errors import ZQError
from zqcompile.passes.infra import embedding_rows


@pytest.mark.parametrize("make_ids, message", [
    (lambda ids: ids.float(), r"input_ids must be an integer tensor, got torch.float32"),
    (lambda ids: ids + TINY_VOCAB, rf"embedding has {TINY_VOCAB} rows \(valid values 0..{TINY_VOCAB - 1}\)"),
    (lambda ids: ids - TINY_VOCAB, r"holds values in \[-"),
    (lambda ids: ids[:0], r"batch and sequence length must be at least 1"),
    (lambda ids: ids[:, :0], r"batch and sequence length must be at least 1"),
])
def test_bad_token_ids(compiled_tiny, make_ids, message):
    _, qmodel = compiled_tiny("bert", "w8a8")
    with pytest.raises(ZQError, match=message):
        qmodel(input_ids=make_ids(token_batch(2, 5)))


class _GuardedReplay:
    """A CUDAGraphRunner whose captured function (the index guard, then the graph) runs directly instead of from a
    CUDA graph: the guard's tensor ops are those a replay runs."""

    def __init__(self, graph, index_rows):
        self.runner = CUDAGraphRunner(graph, index_rows=index_rows)
        self.index_guard = self.runner.index_guard

    def __call__(self, *inputs):
        return self.runner._guarded_forward(*inputs)  # noqa: SLF001 - what a replay runs


@pytest.mark.parametrize("bad", [
    {"input_ids": token_batch(2, 5) + TINY_VOCAB}, {"input_ids": token_batch(2, 5) - TINY_VOCAB},
    {"input_ids": token_batch(2, 5), "token_type_ids": torch.full((2, 5), 5)},
])
def test_token_ids_checked_inside_the_graph_raise_as_the_host_check_does(compiled_tiny, bad):
    """With CUDA graphs the ids are clamped and flagged inside the graph and the error raised after the replay: the
    same ZQError as the host check's; in-range ids give the graph's outputs; the flag is reset for the next call."""
    _, host_checked = compiled_tiny("bert", "w8a8")
    qmodel = copy.copy(host_checked)
    object.__setattr__(qmodel, "runner", _GuardedReplay(qmodel.graph_module, embedding_rows(qmodel.graph_module)))
    with pytest.raises(ZQError) as expected:
        host_checked(**bad)
    with pytest.raises(ZQError) as got:
        qmodel(**bad)
    assert str(got.value) == str(expected.value) and "use the model's own tokenizer" in str(got.value)
    ids = token_batch(3, 7, seed=1)
    good = {"input_ids": ids, "token_type_ids": torch.ones_like(ids)}
    for out, reference in zip(qmodel(**good).values(), qmodel.graph_module(*qmodel.graph_inputs(**good))):
        assert torch.equal(out, reference)
    assert not qmodel.runner.index_guard.flag.item()


class EmbedThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.fc = nn.Embedding(10, 8), nn.Linear(8, 8)

    def forward(self, ids):
        return self.fc(self.embed(ids))


@pytest.mark.parametrize("guarded", [False, True])
def test_plain_module_indices_are_checked(guarded):
    """A plain module's input that indexes an embedding is checked like a text model's token ids, by the host or
    by the graph's index guard."""
    qmodel = zqcompile.compile(EmbedThenLinear(), "w8a8", example_inputs=(torch.zeros(2, 3, dtype=torch.long),))
    if guarded:
        object.__setattr__(qmodel, "runner", _GuardedReplay(qmodel.graph_module, embedding_rows(qmodel.graph_module)))
    with pytest.raises(ZQError, match=r"input 0 holds values in \[0, 10\], .* has 10 rows \(valid values 0..9\)"):
        qmodel(torch.tensor([[0, 10, 3], [1, 2, 3]]))
    ids = torch.tensor([[0, 9, 3]])
    assert torch.equal(qmodel(ids), qmodel.graph_module(ids))


def test_bad_token_type_ids_and_masks(compiled_tiny):
    _, qmodel = compiled_tiny("bert", "w8a8")
    ids = token_batch(2, 5)
    with pytest.raises(ZQError, match=r"token_type_ids holds values in \[5, 5\], .* has 2 rows \(valid values 0..1\)"):
        qmodel(input_ids=ids, token_type_ids=torch.full_like(ids, 5))
    with pytest.raises(ZQError, match="attention_mask must be an integer tensor"):
        qmodel(input_ids=ids, attention_mask=torch.ones(2, 5))
    with torch.no_grad():  # a bool mask is an integer mask
        assert torch.equal(qmodel(input_ids=ids, attention_mask=torch.ones(2, 5, dtype=torch.bool)).last_hidden_state,
                           qmodel(input_ids=ids).last_hidden_state)


def test_plain_module_inputs():
    model = make_tiny_mlp()
    qmodel = zqcompile.compile(model)
    with pytest.raises(ZQError, match="input 0 is torch.int64 .* captured with torch.float32"):
        qmodel(torch.ones(2, TINY_HIDDEN, dtype=torch.long))
    with pytest.raises(ZQError, match="empty batch"):
        qmodel(torch.randn(0, TINY_HIDDEN))
    with pytest.raises(ZQError, match="takes 1 input"):
        qmodel(torch.randn(2, TINY_HIDDEN), torch.randn(2, TINY_HIDDEN))


class PairRows(nn.Module):
    """reshape(2, -1, 8): export guards the batch to be even (and not 2)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x.reshape(2, -1, 8)).sum(0)


def test_export_guard_is_a_zqerror_and_survives_saving(tmp_path):
    model = PairRows().eval()
    qmodel = zqcompile.compile(model, example_inputs=(torch.randn(4, 8),))
    with pytest.raises(ZQError, match=r"inputs of shapes \[3, 8\] violate .*args\[0\]\.size\(\)\[0\]"):
        qmodel(torch.randn(3, 8))
    qmodel.save(tmp_path / "m")
    loaded = zqcompile.load(tmp_path / "m")
    with pytest.raises(ZQError, match=r"inputs of shapes \[3, 8\] violate"):
        loaded(torch.randn(3, 8))
    x = torch.randn(6, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
        assert torch.allclose(loaded(x), model(x), atol=0.05)


def test_meta_device_model_is_refused():
    with torch.device("meta"):
        model = make_tiny_mlp()
    with pytest.raises(ZQError, match="meta device"):
        zqcompile.compile(model)


def test_compiled_model_owns_its_tensors():
    model = make_tiny_bert()
    qmodel = zqcompile.compile(model)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not any(t.untyped_storage().data_ptr() in storages for t in qmodel.graph_module.state_dict().values())
    ids = token_batch(2, 6)
    with torch.no_grad():
        before = qmodel(input_ids=ids).last_hidden_state
        for p in model.parameters():
            p.mul_(1.5)  # an in-place edit of the user's model, then a cast of it
        model.half()
        assert torch.equal(qmodel(input_ids=ids).last_hidden_state, before)


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.bfloat16(), lambda m: m.double(),
                                  lambda m: m.to(torch.float16), lambda m: m.to("meta"),
                                  lambda m: m.to_empty(device="cpu")])
def test_casting_a_compiled_model_says_to_recompile(compiled_tiny, cast):
    model, qmodel = compiled_tiny("bert", "w8a8")
    ids = token_batch(2, 4)
    with torch.no_grad():
        before = qmodel(input_ids=ids).last_hidden_state
    with pytest.raises(ZQError, match=r"keeps the dtype and device it was compiled for .* Compile the FP model again"):
        cast(qmodel)
    assert qmodel.float() is qmodel and qmodel.to("cpu", torch.float32) is qmodel
    with torch.no_grad():
        assert torch.equal(qmodel(input_ids=ids).last_hidden_state, before)
    assert next(model.parameters()).dtype == torch.float32


def test_guard_interpreter_reads_torch_printed_guards_and_nothing_else():
    from zqcompile.guards import check_guards, parse_guard

    x = torch.zeros(2, 8)
    # the forms torch's Python printer writes (fp16 Llama on CUDA guards min(16*seq, 32*seq) == 16*seq)
    check_guards(["min(16*args[0].size()[1], 32*args[0].size()[1]) == 16*args[0].size()[1]",
                  "Max(1, args[0].size()[0]) >= 1 and not args[0].size()[0] == 3",
                  "math.floor(args[0].size()[1] / 3) == 2", "(args[0].size()[1] % 8) == 0",
                  "args[0].size()[1] ** 2 <= 1024"], [x], "M")
    with pytest.raises(ZQError, match=r"violate 'args\[1\].size\(\)\[0\] == 2'"):
        check_guards(["args[1].size()[0] == 2"], [x], "M")  # an input the call does not have
    for hostile in ['__import__("os").system("true")', "args[0].__class__", "open('f')", "(lambda: 1)()",
                    "args[0].size()[0] if True else 0", "[1][0]"]:
        with pytest.raises(ZQError, match="not an expression zqcompile can check"):
            parse_guard(hostile)
    with pytest.raises(ZQError, match="cannot be evaluated"):
        check_guards(["args[0].size()[0] ** 10000000 > 0"], [x], "M")


def test_guards_remember_passing_shapes_only():
    """check_guards skips shapes that passed the same guards before (host time per call), and nothing else."""
    from zqcompile.guards import check_guards

    even = ["args[0].size()[0] % 2 == 0"]
    for _ in range(2):
        check_guards(even, [torch.zeros(2, 8)], "M")
    with pytest.raises(ZQError, match=r"shapes \[3, 8\] violate"):
        check_guards(even, [torch.zeros(3, 8)], "M")
    with pytest.raises(ZQError, match=r"shapes \[2, 8\] violate"):  # other guards, shapes that passed the first
        check_guards(["args[0].size()[0] == 4"], [torch.zeros(2, 8)], "M")
