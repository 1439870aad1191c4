"""qmodel.save(dir) / zqcompile.load(dir): bit-identical round trip, and clear errors for bad directories."""

from __future__ import annotations

import json

import pytest
import torch

import zqcompile
from helpers import token_batch
from zqcompile.serialize import FORWARD, MANIFEST, WEIGHTS, graph_file

GRAPH = graph_file(FORWARD)


def outputs(model, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    ids = token_batch(batch, seq, seed)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        return list(model(input_ids=ids, attention_mask=mask).values())


@pytest.fixture(scope="module")
def saved_bert(tmp_path_factory, compiled_tiny):
    _, qmodel = compiled_tiny("bert", "w8a8")
    directory = tmp_path_factory.mktemp("saved") / "bert"
    qmodel.save(directory, source_model="some/where")
    return qmodel, directory


@pytest.mark.parametrize("family, recipe", [("bert", "w8a8"), ("llama", "w4a8"), ("llama", "w4a8-asym")])
def test_round_trip_is_bit_identical(compiled_tiny, tmp_path, family, recipe):
    fp_model, qmodel = compiled_tiny(family, recipe)
    qmodel.save(tmp_path / "model")
    loaded = zqcompile.load(tmp_path / "model")
    assert type(loaded) is zqcompile.QuantizedModel
    for seed, (batch, seq) in enumerate(((2, 8), (3, 13))):  # dynamic shapes survive
        for before, after in zip(outputs(qmodel, batch, seq, seed), outputs(loaded, batch, seq, seed)):
            assert torch.equal(before, after)
    assert type(loaded(input_ids=token_batch(1, 4)))  is qmodel.output_type
    # what inspect() reads came back too: the table, counters and weight memory
    assert zqcompile.inspect(loaded, code=False) == zqcompile.inspect(qmodel, code=False)
    assert loaded.recipe.name == recipe and loaded.weight_memory() == qmodel.weight_memory()


def test_weights_file_holds_integer_weights_once(saved_bert):
    from safetensors.torch import load_file

    qmodel, directory = saved_bert
    tensors = load_file(str(directory / WEIGHTS))
    int8 = {k: v for k, v in tensors.items() if v.dtype == torch.int8}
    assert len(int8) == 12  # every quantized linear of the tiny BERT
    expected = {k: v for k, v in qmodel.graph_module.state_dict().items() if v.dtype == torch.int8}
    assert {k: v.shape for k, v in int8.items()} == {k: v.shape for k, v in expected.items()}
    assert all(torch.equal(int8[k], expected[k]) for k in int8)
    # the graph file holds no tensors
    assert all(len(json.dumps(node)) < 2000 for node in json.loads((directory / GRAPH).read_text())["nodes"])
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["source_model"] == "some/where" and manifest["recipe"]["name"] == "w8a8"


def _copy(src, dst):
    dst.mkdir()
    for name in (MANIFEST, WEIGHTS, GRAPH):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.mark.parametrize("name", [WEIGHTS, GRAPH])
def test_corrupted_file_is_refused(saved_bert, tmp_path, name):
    _, directory = saved_bert
    broken = _copy(directory, tmp_path / "broken")
    data = bytearray((broken / name).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle
    (broken / name).write_bytes(bytes(data))
    with pytest.raises(zqcompile.ZQError, match=f"{name} is corrupted"):
        zqcompile.load(broken)


def test_other_format_version_is_refused(saved_bert, tmp_path):
    _, directory = saved_bert
    other = _copy(directory, tmp_path / "other")
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["format_version"] = 99
    (other / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(zqcompile.ZQError, match="format version 99"):
        zqcompile.load(other)
    manifest["format_version"] = 1  # the torch.export archive format: refused, with the fix
    (other / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(zqcompile.ZQError, match="version 1 .*unpickle.*compile the model again and save it"):
        zqcompile.load(other)
    manifest["format_version"] = 2  # before asymmetric INT4: refused, with the reason and the fix
    (other / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(zqcompile.ZQError, match="version 2 .*asymmetric INT4.*compile the model again and save it"):
        zqcompile.load(other)


def test_missing_or_foreign_directories(saved_bert, tmp_path):
    with pytest.raises(zqcompile.ZQError, match="is not a directory"):
        zqcompile.load(tmp_path / "does-not-exist")
    with pytest.raises(zqcompile.ZQError, match="no manifest.json"):
        zqcompile.load(tmp_path)
    _, directory = saved_bert
    partial = _copy(directory, tmp_path / "partial")
    (partial / GRAPH).unlink()
    with pytest.raises(zqcompile.ZQError, match=f"{GRAPH} is missing"):
        zqcompile.load(partial)
    (partial / MANIFEST).write_text("{not json")
    with pytest.raises(zqcompile.ZQError, match="not valid JSON"):
        zqcompile.load(partial)
