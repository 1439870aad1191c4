"""Bounded, seeded fuzzing (issue 12): every case ends in a correct result or a ZQError, never another exception
and never a silent change. Random recipes, random calls (batch 1-8, seq 1-64, padded rows, id dtypes and
ranges) against the FP model, and random bit flips / truncations of saved files. A few seconds in all."""

from __future__ import annotations

import random

import pytest
import torch

import zqcompile
from helpers import TINY_HIDDEN, TINY_MAX_POSITIONS, TINY_VOCAB, cosine, make_tiny_mlp
from zqcompile.errors import ZQError
from zqcompile.recipe import ROLES, load_recipe

BITS = [4, 8, 8.0, True, None, "8", 16, 0, -4]
GROUPS = [None, 1, 2, 16, 32, 64, 0, -8, 32.0, "64", False]


def _random_recipe(rng: random.Random) -> dict:
    recipe = {key: rng.choice(values) for key, values in (
        ("weight_bits", BITS), ("act_bits", BITS), ("group_size", GROUPS), ("input_group_size", GROUPS))
        if rng.random() < 0.6}
    if rng.random() < 0.3:
        recipe["overrides"] = [{"role": rng.choice([*ROLES, "mlp_*", "nope"]), "weight_bits": rng.choice(BITS)}]
    if rng.random() < 0.3:
        recipe["keep_fp"] = rng.choice([["role:lm_head"], [], ["model.fc1"], "role:lm_head", ["fc*"]])
    return recipe


def test_fuzz_recipes():
    rng = random.Random(0)
    compiled = 0
    for _ in range(200):
        spec = _random_recipe(rng)
        try:
            recipe = load_recipe(spec)
        except ZQError:
            continue
        override_bits = [o.settings.get("weight_bits", 8) for o in recipe.overrides]
        for bits in [recipe.weight_bits, recipe.act_bits, *override_bits]:
            assert bits is None or (type(bits) is int and bits in (4, 8)), spec
        if compiled >= 2:
            continue
        model = make_tiny_mlp()
        try:
            qmodel = zqcompile.compile(model, recipe)
        except ZQError:  # e.g. a group size that does not divide a layer, or a glob that matches nothing
            continue
        compiled += 1
        x = torch.randn(rng.randint(1, 8), TINY_HIDDEN)
        with torch.no_grad():
            assert cosine(qmodel(x), model(x)) > (0.99 if recipe.weight_bits == 8 else 0.95), spec
    assert compiled >= 2


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_fuzz_calls(compiled_tiny, family):
    fp_model, qmodel = compiled_tiny(family, "w8a8")
    rng = random.Random(1)
    generator = torch.Generator().manual_seed(1)
    outcomes = {"ok": 0, "ZQError": 0}
    key = "last_hidden_state" if family == "bert" else "logits"
    for _ in range(30):
        batch = rng.randint(1, 8)
        seq = rng.randint(1, TINY_MAX_POSITIONS) if rng.random() < 0.8 else rng.randint(TINY_MAX_POSITIONS + 1, 64)
        ids = torch.randint(0, TINY_VOCAB, (batch, seq), generator=generator)
        dtype = rng.choice([torch.int64] * 5 + [torch.int32, torch.float32, torch.bool])
        if rng.random() < 0.1:
            ids[rng.randrange(batch), rng.randrange(seq)] = rng.choice([-1, TINY_VOCAB, 10 ** 6])
        mask = torch.ones(batch, seq, dtype=torch.long)
        for row in range(batch):  # padded rows: a random number of trailing zeros, at least one token kept
            mask[row, rng.randint(1, seq):] = 0
        ids = ids.to(dtype)
        valid = (seq <= TINY_MAX_POSITIONS and dtype in (torch.int64, torch.int32)
                 and bool(((ids >= 0) & (ids < TINY_VOCAB)).all()))
        try:
            got = qmodel(input_ids=ids, attention_mask=mask)[key]
        except ZQError:
            assert not valid, (batch, seq, dtype)
            outcomes["ZQError"] += 1
            continue
        assert valid, (batch, seq, dtype)
        with torch.no_grad():
            expected = fp_model(input_ids=ids.long(), attention_mask=mask)[key]
        kept = mask.bool()
        assert got.shape == expected.shape and torch.isfinite(got).all()
        assert cosine(got[kept], expected[kept]) > 0.99, (batch, seq)
        outcomes["ok"] += 1
    assert outcomes["ok"] >= 10 and outcomes["ZQError"] >= 5, outcomes


def test_fuzz_corrupted_files(compiled_tiny, tmp_path):
    _, qmodel = compiled_tiny("llama", "w8a8")
    original = tmp_path / "original"
    qmodel.save(original)
    files = {path.name: path.read_bytes() for path in original.iterdir()}
    ids = torch.randint(0, TINY_VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = qmodel(input_ids=ids).logits
    rng = random.Random(3)
    loaded_identical = refused = 0
    for case in range(40):
        broken = tmp_path / f"broken{case}"
        broken.mkdir()
        victim = rng.choice(sorted(files))
        for name, data in files.items():
            if name == victim:
                data = bytearray(data)
                if rng.random() < 0.8:
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                else:
                    data = data[:rng.randrange(len(data))]
            (broken / name).write_bytes(bytes(data))
        try:
            loaded = zqcompile.load(broken)
        except ZQError:
            refused += 1
            continue
        with torch.no_grad():  # a load that succeeds must be the same model
            assert torch.equal(loaded(input_ids=ids).logits, expected), (victim, case)
        loaded_identical += 1
    assert refused + loaded_identical == 40 and refused >= 35
