"""Loading a saved directory never runs code from it, and every corruption is a ZQError (issue 12).

The crafted directories below would run code under the version 1 format (a pickled payload in the
torch.export archive, a module name in the manifest's output type) or try to under format 2 (a graph naming
``os.system`` or ``builtins.exec``, an attribute that shadows the GraphModule's ``forward``); each payload writes
a marker file if it ever runs. The manifest hash would hide a tampered field from a naive check, so the tests
that tamper re-seal the manifest the way an attacker would (``reseal``): what stops them is the format's
checks, not the hash.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import zipfile

import pytest
import torch

import zqcompile
from helpers import token_batch
from zqcompile.serialize import FORWARD, MANIFEST, _content_hash, graph_file, sha256_of

GRAPH = graph_file(FORWARD)


class _Payload:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, compiled_tiny):
    _, qmodel = compiled_tiny("bert", "w8a8")
    directory = tmp_path_factory.mktemp("safe") / "bert"
    qmodel.save(directory)
    return qmodel, directory


def copy_of(src, dst):
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def reseal(directory, manifest=None, graph=None):
    """Write a changed manifest / graph with valid hashes, as someone crafting the directory would."""
    manifest = manifest or json.loads((directory / MANIFEST).read_text())
    if graph is not None:
        (directory / GRAPH).write_text(json.dumps(graph))
    manifest["files"] = {name: sha256_of(directory / name) for name in manifest["files"]}
    manifest["manifest_sha256"] = _content_hash(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def manifest_of(directory):
    return json.loads((directory / MANIFEST).read_text())


def graph_of(directory):
    return json.loads((directory / GRAPH).read_text())


@pytest.fixture
def payload_module(tmp_path, monkeypatch):
    """An importable module ``zq_payload`` whose import writes a marker; returns the marker path."""
    marker = tmp_path / "imported"
    (tmp_path / "zq_payload.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Out(dict):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("zq_payload", None)


def test_crafted_version_1_directory_runs_nothing(saved, tmp_path, payload_module):
    # the directory: a torch.export archive with a pickled payload, and a module name as output type
    _, directory = saved
    crafted = copy_of(directory, tmp_path / "crafted")
    marker = tmp_path / "unpickled"
    with zipfile.ZipFile(crafted / "graph.pt2", "w") as archive:
        archive.writestr("archive/data/weights/weight_0", pickle.dumps(_Payload(marker)))
        archive.writestr("archive/data/weights/model_weights_config.json",
                         json.dumps({"config": {"w": {"path_name": "weight_0", "use_pickle": True}}}))
    manifest = manifest_of(crafted)
    manifest.update(format_version=1, output_type="zq_payload:Out")
    manifest["files"]["graph.pt2"] = sha256_of(crafted / "graph.pt2")
    (crafted / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(zqcompile.ZQError, match="version 1"):
        zqcompile.load(crafted)
    from zqcompile.cli import main
    assert main(["inspect", str(crafted)]) == 2
    assert not marker.exists() and not payload_module.exists() and "zq_payload" not in sys.modules


def test_output_type_is_looked_up_never_imported(saved, tmp_path, payload_module):
    _, directory = saved
    for name in ("zq_payload:Out", "transformers.modeling_outputs:ModelOutputX", "os:system",
                 "transformers.modeling_outputs:torch"):
        crafted = copy_of(directory, tmp_path / name.replace(":", "_"))
        reseal(crafted, {**manifest_of(crafted), "output_type": name})
        with pytest.raises(zqcompile.ZQError, match="not a ModelOutput class of transformers.modeling_outputs"):
            zqcompile.load(crafted)
    assert not payload_module.exists() and "zq_payload" not in sys.modules


@pytest.mark.parametrize("target, message", [
    ("os.system", "not one a saved graph may call"),
    ("builtins.exec", "not one a saved graph may call"),
    ("zq_payload.run.default", "not one a saved graph may call"),
    ("aten.from_file.default", "reads files"),
    ("aten.no_such_op.default", "does not exist"),
])
def test_graph_ops_outside_the_allowlist_are_refused(saved, tmp_path, payload_module, target, message):
    _, directory = saved
    crafted = copy_of(directory, tmp_path / "crafted")
    graph = graph_of(crafted)
    call = next(n for n in graph["nodes"] if n["op"] == "call_function")
    call["target"] = target
    reseal(crafted, graph=graph)
    with pytest.raises(zqcompile.ZQError, match=message):
        zqcompile.load(crafted)
    assert not payload_module.exists()


@pytest.mark.parametrize("edit, message", [
    (lambda g: g["attrs"].update({"forward": next(iter(g["attrs"].values()))}), "malformed attr name"),
    (lambda g: g["nodes"][5].update(op="call_module"), "malformed 'call_module' node"),
    (lambda g: g["nodes"][5].update(args=[{"eval": "1"}]), "malformed value"),
    (lambda g: g["nodes"][5].update(args=[{"node": "not_a_node"}]), "unknown node reference"),
    (lambda g: g["guards"].append("__import__('os').system('true')"), "not an expression zqcompile can check"),
    (lambda g: g.update(out_spec={"OrderedDict": []}), "malformed calling convention"),
    (lambda g: next(a for a in g["attrs"].values()).update(shape=[1, 2, 3]), "but the graph declares"),
    (lambda g: g["nodes"].pop(), "does not end with its output"),
])
def test_malformed_graphs_are_refused(saved, tmp_path, edit, message):
    _, directory = saved
    crafted = copy_of(directory, tmp_path / "crafted")
    graph = graph_of(crafted)
    edit(graph)
    reseal(crafted, graph=graph)
    with pytest.raises(zqcompile.ZQError, match=message):
        zqcompile.load(crafted)


def test_swapped_input_names_or_output_keys_are_caught(saved, tmp_path):
    _, directory = saved
    manifest = manifest_of(directory)
    for field in ("input_names", "output_keys"):
        crafted = copy_of(directory, tmp_path / field)
        names = list(manifest[field])
        names[0], names[1] = names[1], names[0]
        reseal(crafted, {**manifest, field: names})
        with pytest.raises(zqcompile.ZQError):
            zqcompile.load(crafted)


def test_graph_that_does_not_fit_its_tensors_is_refused(saved, tmp_path):
    # two weights swapped consistently in the graph file: the declared shapes match, the computation does not
    _, directory = saved
    crafted = copy_of(directory, tmp_path / "crafted")
    graph = graph_of(crafted)
    names = [k for k, a in graph["attrs"].items() if a["dtype"] == "int8"]
    embedding = next(k for k, a in graph["attrs"].items() if "word_embeddings" in k)
    graph["attrs"][names[0]], graph["attrs"][embedding] = graph["attrs"][embedding], graph["attrs"][names[0]]
    reseal(crafted, graph=graph)
    with pytest.raises(zqcompile.ZQError, match="does not run on its example inputs"):
        zqcompile.load(crafted)


@pytest.mark.parametrize("field, value", [
    ("max_seq_len", "32"), ("dtype", "float8"), ("device", "cuda; rm -rf"), ("input_names", ["labels"]),
    ("recipe", {"weight_bits": 8.0}), ("recipe", {"keep_fp": 5}), ("context", {}),
    ("graphs", {"forward": "../../etc/passwd"}),
])
def test_manifest_fields_are_checked(saved, tmp_path, field, value):
    _, directory = saved
    crafted = copy_of(directory, tmp_path / "crafted")
    reseal(crafted, {**manifest_of(crafted), field: value})
    with pytest.raises(zqcompile.ZQError):
        zqcompile.load(crafted)


def test_unsealed_manifest_edit_is_caught(saved, tmp_path):
    # a corrupted manifest (not re-sealed) that would still be valid: its own hash catches it
    _, directory = saved
    crafted = copy_of(directory, tmp_path / "crafted")
    manifest = manifest_of(crafted)
    manifest["max_seq_len"] = 31
    (crafted / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(zqcompile.ZQError, match="does not match the hash recorded in it"):
        zqcompile.load(crafted)


def test_loaded_model_is_independent_and_loads_on_another_device_name(saved, tmp_path):
    qmodel, directory = saved
    loaded = zqcompile.load(directory, device="cpu")
    ids = token_batch(2, 5)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, qmodel(input_ids=ids).last_hidden_state)
    with pytest.raises(zqcompile.ZQError, match="keeps the dtype and device it was compiled for"):
        loaded.half()
