"""Recipes: presets, dict/YAML/JSON loading, overrides by role or module glob, keep_fp, and every ZQError."""

from __future__ import annotations

import json

import pytest

from zqcompile import PRESETS, Recipe, ZQError, load_recipe
from zqcompile.recipe import LinearPlan, LinearSite

# the linears of one BERT layer and its pooler (module, role, out_features, in_features)
BERT_SITES = [LinearSite(*site) for site in (
    ("encoder.layer.0.attention.self.query", "attn_qkv", 768, 768),
    ("encoder.layer.0.attention.output.dense", "attn_out", 768, 768),
    ("encoder.layer.0.intermediate.dense", "mlp_in", 3072, 768),
    ("encoder.layer.0.output.dense", "mlp_out", 768, 3072),
    ("pooler.dense", "classifier", 768, 768),
)]


def plans(recipe) -> dict[str, LinearPlan]:
    """The plan of each BERT_SITES linear, keyed by its role (one linear per role)."""
    resolved = load_recipe(recipe).resolve(BERT_SITES)
    return {site.role: resolved[site.module] for site in BERT_SITES}


def kinds(recipe) -> list[str]:
    return [plan.kind for plan in plans(recipe).values()]


# ---- presets ---------------------------------------------------------------------------------------------

def test_presets():
    assert {"w8a8", "w4a8", "w8a16", "w4a16"} <= set(PRESETS)
    assert kinds("w8a8") == ["W8A8", "W8A8", "W8A8", "W8A8", "FP"]
    assert kinds("w4a8") == ["W8A8", "W8A8", "W4A8", "W4A8", "FP"]
    assert kinds("w8a16") == ["W8A16", "W8A16", "W8A16", "W8A16", "FP"]
    assert kinds("w4a16") == ["W4A16"] * 4 + ["FP"]
    w4a8 = plans("w4a8")
    assert w4a8["mlp_in"] == LinearPlan(4, 8, None, 64, "override role:mlp_*")
    assert w4a8["attn_qkv"] == LinearPlan(8, 8, None, None, "recipe w4a8")
    assert w4a8["classifier"] == LinearPlan(None, None, None, None, "keep_fp role:classifier")
    assert plans("w4a16")["mlp_out"].input_group_size == 64


def test_asymmetric_int4_presets_and_key():
    assert plans("w4a16-asym")["mlp_out"] == LinearPlan(4, None, None, 32, "recipe w4a16-asym", weight_symmetric=False)
    w4a8 = plans("w4a8-asym")
    assert w4a8["mlp_in"] == LinearPlan(4, 8, None, 32, "override role:mlp_*", weight_symmetric=False)
    assert w4a8["attn_qkv"].weight_symmetric  # the INT8 attention weights stay symmetric
    custom = plans({"base": "w4a16", "weight_symmetric": False, "input_group_size": 32})
    assert all(not p.weight_symmetric and p.input_group_size == 32 for p in custom.values() if p.quantized)
    assert all(p.weight_symmetric for p in plans("w4a16").values())


def test_recipe_object_dict_and_preset_name_give_the_same_plans():
    recipe = Recipe(name="mine", weight_bits=4, group_size=64, keep_fp=[])
    assert load_recipe(recipe) is recipe
    from_dict = load_recipe({"name": "mine", "weight_bits": 4, "group_size": 64, "keep_fp": []})
    assert from_dict.resolve(BERT_SITES) == recipe.resolve(BERT_SITES)
    assert all(p == LinearPlan(4, 8, 64, None, "recipe mine") for p in recipe.resolve(BERT_SITES).values())
    assert load_recipe("w8a8").resolve(BERT_SITES) == Recipe(name="w8a8").resolve(BERT_SITES)


def test_base_preset_with_overrides_appended_and_named():
    recipe = load_recipe({"base": "w4a8", "overrides": [{"module": "*output.dense", "weight_bits": 8}]})
    assert recipe.name == "w4a8+custom"
    assert [o.describe() for o in recipe.overrides] == ["role:mlp_*", "module:*output.dense"]
    resolved = plans(recipe)
    assert resolved["mlp_out"] == LinearPlan(8, 8, None, 64, "override module:*output.dense")  # later wins
    assert resolved["mlp_in"].weight_bits == 4
    assert load_recipe({"base": "w8a16"}).name == "w8a16"


def test_overrides_by_role_and_module_glob_and_keep_fp():
    resolved = plans({
        "group_size": 32,
        "keep_fp": ["role:classifier", "encoder.layer.0.attention.*"],
        "overrides": [{"role": "attn_*", "weight_bits": 4}, {"role": "mlp_out", "act_bits": None}],
    })
    assert resolved["attn_qkv"] == LinearPlan(None, None, None, None, "keep_fp encoder.layer.0.attention.*")
    assert resolved["mlp_out"] == LinearPlan(8, None, 32, None, "override role:mlp_out")
    assert resolved["mlp_in"] == LinearPlan(8, 8, 32, None, "recipe custom")
    assert resolved["classifier"].kind == "FP"
    assert Recipe(overrides=[{"role": "mlp_*", "weight_bits": 4}]).overrides[0].role == "mlp_*"  # mapping accepted


def test_yaml_and_json_files(tmp_path):
    yaml_file = tmp_path / "int4_mlp.yaml"
    yaml_file.write_text("base: w8a8\nkeep_fp: [role:classifier]\noverrides:\n"
                         "  - role: 'mlp_*'\n    weight_bits: 4\n    input_group_size: 128\n")
    recipe = load_recipe(yaml_file)
    assert recipe.name == "int4_mlp.yaml"
    assert plans(recipe)["mlp_in"] == LinearPlan(4, 8, None, 128, "override role:mlp_*")
    json_file = tmp_path / "named.json"
    json_file.write_text(json.dumps({"name": "weights-only", "act_bits": None}))
    assert load_recipe(str(json_file)).name == "weights-only"
    assert kinds(str(json_file))[0] == "W8A16"


# ---- every ZQError path -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ({"weight_bit": 4}, r"unknown recipe key\(s\) \['weight_bit'\]; valid keys are \['act_bits', 'base', "),
    ({"weight_bits": 3}, r"custom: weight_bits must be 4 or 8, got 3 \(keep a layer in floating point with keep_fp"),
    ({"weight_bits": 16}, r"weight_bits must be 4 or 8, got 16"),
    ({"weight_bits": 8.0}, r"weight_bits must be 4 or 8, got 8\.0"),  # a float, though 8.0 == 8
    ({"weight_bits": True}, r"weight_bits must be 4 or 8, got True"),
    ({"act_bits": 8.0}, r"act_bits must be 8 \(token-wise INT8\) or null \(weight-only\), got 8\.0"),
    ({"act_bits": 4}, r"custom: act_bits must be 8 \(token-wise INT8\) or null \(weight-only\), got 4"),
    ({"group_size": 0}, r"custom: group_size must be a positive integer or null, got 0"),
    ({"input_group_size": "64"}, r"input_group_size must be a positive integer or null, got '64'"),
    ({"group_size": True}, r"group_size must be a positive integer or null, got True"),
    ({"overrides": [{"role": "mlp_*", "weight_bits": 2}]}, r"override role:mlp_\*: weight_bits must be 4 or 8, got 2"),
    ({"overrides": [{"role": "mlp", "weight_bits": 4}]},
     r"override role:mlp: no role matches 'mlp'; roles are \['attn_qkv', 'attn_out', 'mlp_in', "),
    ({"keep_fp": ["role:head"]}, r"keep_fp entry 'role:head': no role matches 'head'"),
    ({"keep_fp": "role:lm_head"},
     r"keep_fp must be a list of module globs or 'role:<glob>' entries, got 'role:lm_head'"),
    ({"overrides": ["mlp_*"]},
     r"overrides\[0\] must be a mapping like \{role: 'mlp_\*', weight_bits: 4\}, got 'mlp_\*'"),
    ({"overrides": [{"weight_bits": 4}]},
     r"overrides\[0\] needs exactly one of 'module' \(glob on module name\) or 'role' \(glob on role\), got "
     r"\['weight_bits'\]"),
    ({"overrides": [{"role": "mlp_*", "module": "x"}]}, r"overrides\[0\] needs exactly one of 'module'"),
    ({"overrides": [{"role": "mlp_*", "bits": 4}]},
     r"overrides\[0\]: unknown key\(s\) \['bits'\]; valid keys are \['module' or 'role', weight_bits, act_bits, "),
    ({"weight_symmetric": "no"}, r"custom: weight_symmetric must be true \(q in -7\.\.7, one scale per group\) or "
                                 r"false \(asymmetric INT4: q in 0\.\.15, a scale and a min per group\), got 'no'"),
    ({"overrides": [{"role": "mlp_*", "weight_symmetric": 0}]}, r"override role:mlp_\*: weight_symmetric must be"),
    ({"base": "w4a8-asym", "outlier_threshold": 6.0},
     r"outlier_threshold stores symmetric weights beside its FP16 columns; drop weight_symmetric: false"),
    ({"base": "w3a8"}, r"unknown recipe preset 'w3a8'; presets are \['w8a8', .*'w4a8', 'w8a16', 'w4a16'.*\]"),
    ("int8", r"unknown recipe preset 'int8'; presets are \[.*\], or pass a Recipe, a dict or a path to a "
             r"\.yaml/\.json file"),
    (None, r"recipe must be a preset name \[.*\], a Recipe, a dict or a path to a \.yaml/\.json file, got NoneType"),
    ("missing/recipe.yaml", r"recipe file 'missing/recipe\.yaml' does not exist"),
])
def test_bad_recipes_raise_zqerror_saying_what_is_wrong(spec, message):
    with pytest.raises(ZQError, match=message):
        load_recipe(spec)


def test_bad_recipe_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- w8a8\n")
    (tmp_path / "broken.yaml").write_text("weight_bits: [4\n")
    (tmp_path / "broken.json").write_text("{weight_bits: 4}")
    with pytest.raises(ZQError, match=r"list\.yaml' must hold a mapping at the top level"):
        load_recipe(tmp_path / "list.yaml")
    with pytest.raises(ZQError, match=r"broken\.yaml' is not valid YAML"):
        load_recipe(tmp_path / "broken.yaml")
    with pytest.raises(ZQError, match=r"broken\.json' is not valid JSON: Expecting property name"):
        load_recipe(tmp_path / "broken.json")


def test_resolution_errors_name_the_layer():
    with pytest.raises(ZQError, match=r"recipe 'custom': module glob 'decoder\.\*' matches no linear layer \(linear "
                                      r"layers are named like 'encoder\.layer\.0\.attention\.self\.query', "):
        load_recipe({"keep_fp": ["decoder.*"]}).resolve(BERT_SITES)
    with pytest.raises(ZQError, match=r"module glob 'lm_head' matches no linear layer"):
        load_recipe({"overrides": [{"module": "lm_head", "weight_bits": 4}]}).resolve(BERT_SITES)
    with pytest.raises(ZQError, match=r"recipe 'custom' for encoder\.layer\.0\.attention\.self\.query \(768x768, "
                                      r"recipe custom\): group_size=100 does not divide out_features=768; choose a "
                                      r"divisor of 768 or None \(per-channel\)"):
        load_recipe({"group_size": 100}).resolve(BERT_SITES)
    with pytest.raises(ZQError, match=r"for encoder\.layer\.0\.output\.dense \(768x3072, override role:mlp_out\): "
                                      r"input_group_size=1000 does not divide in_features=3072"):
        load_recipe({"overrides": [{"role": "mlp_out", "input_group_size": 1000}]}).resolve(BERT_SITES)
    with pytest.raises(ZQError, match=r"recipe 'w4a8\+custom' for encoder\.layer\.0\.attention\.self\.query \(recipe "
                                      r"w4a8\+custom\): asymmetric weights \(weight_symmetric: false\) are INT4 only, "
                                      r"but this layer has 8-bit weights; set weight_symmetric: false in the INT4 "
                                      r"override only"):
        load_recipe({"base": "w4a8", "weight_symmetric": False}).resolve(BERT_SITES)
    odd = [LinearSite("proj", "other", 8, 7)]
    with pytest.raises(ZQError, match=r"proj: INT4 weights need an even in_features and input_group_size \(two values "
                                      r"per byte\), got 7 / None; keep it at 8 bits"):
        load_recipe({"weight_bits": 4}).resolve(odd)
    with pytest.raises(ZQError, match=r"got 12 / 3; keep it at 8 bits"):
        load_recipe({"weight_bits": 4, "input_group_size": 3}).resolve([LinearSite("proj", "other", 8, 12)])
    assert load_recipe({"weight_bits": 4, "keep_fp": ["proj"]}).resolve(odd)["proj"].kind == "FP"
