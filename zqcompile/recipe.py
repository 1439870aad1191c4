"""Recipes: what to quantize, to how many bits, with which groups; presets and a dict/YAML loader.

A recipe is resolved once per model into a :class:`LinearPlan` for every linear layer. Rules apply in
order: recipe defaults, then ``overrides`` (later entries win), then ``keep_fp``.

YAML example::

    base: w8a8                 # start from a preset (optional)
    group_size: null           # output rows per weight scale; null = per-channel
    keep_fp: [role:lm_head, role:classifier, "encoder.layer.0.*"]
    overrides:
      - role: "mlp_*"          # glob on the role, or `module:` glob on the module name
        weight_bits: 4
        input_group_size: 64   # INT4 groups along the input dim
        weight_symmetric: true # false: asymmetric INT4 groups, w = scale * q + min with q in 0..15 (llama.cpp's
                               # Q4_1, the asymmetric groups of GPTQ / AWQ deployments); INT4 weights only
    smooth_alpha: 0.5          # optional: SmoothQuant-style outlier migration for norm outputs (null = off)
    rotate: false              # optional: QuaRot-style Hadamard rotation of the residual stream and projections
    weight_rounding: gptq      # rtn (round to nearest, default) | gptq | awq: how the integers are chosen
    lorc_rank: 8               # optional: FP16 rank-8 correction of each quantized weight's error (LoRC)
    outlier_threshold: 6.0     # optional: LLM.int8() input columns above 6.0 stay in floating point
    lkd:                       # optional: layer-by-layer distillation (LKDConfig fields, below)
      steps: 40
      data: self
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from zqcompile.errors import ZQError
from zqcompile.quant import weight_groups

DATA_SOURCES = ("auto", "self", "random")
INPUT_SOURCES = ("student", "teacher")
WEIGHT_ROUNDINGS = ("rtn", "gptq", "awq")


@dataclass
class LKDConfig:
    """Settings of layer-by-layer distillation; the defaults distil SmolLM2-135M (30 blocks) in < 8 min on CPU."""

    data: Any = "auto"  # "auto" | "self" | "random" | LongTensor [N, T] | text | list of texts | path of a .txt
    tokenizer: Any = None  # for text data: a tokenizer, or a model directory / shipped model name
    num_samples: int = 32  # sequences in the distillation set
    seq_len: int = 128  # tokens per sequence (generated / random / cut from text)
    batch_size: int = 4  # sequences per optimizer step
    steps: int = 40  # optimizer steps per block
    lr: float = 1e-4  # Adam learning rate
    inputs_from: str = "student"  # "student": h^{k-1} from the quantized blocks 1..k-1; "teacher": FP chain
    train_norms: bool = False  # also update the block's LayerNorm / RMSNorm parameters
    device: str | None = None  # where to distil ("cuda" on a GPU machine); default: the model's device
    seed: int = 0
    progress: bool = True  # a tqdm bar per block (steps, loss)
    # weight of KL(FP || student) of the LM head's next-token distributions, added to the last block's MSE (decoders
    # with an LM head; the final norm and LM head stay in floating point); 0 = MSE only (ZeroQuant's loss)
    logits_kl: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_samples", "seq_len", "batch_size", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                hint = " (to skip LKD, pass lkd=None)" if name == "steps" else ""
                raise ZQError(f"LKDConfig.{name} must be a positive integer, got {value!r}{hint}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ZQError(f"LKDConfig.lr must be a positive number, got {self.lr!r}")
        if isinstance(self.logits_kl, bool) or not isinstance(self.logits_kl, (int, float)) or not (
                0 <= self.logits_kl < float("inf")):
            raise ZQError(f"LKDConfig.logits_kl must be a number >= 0 (the weight of the LM-head KL loss; 0 = off, "
                          f"1.0 is typical), got {self.logits_kl!r}")
        if self.inputs_from not in INPUT_SOURCES:
            raise ZQError(f"LKDConfig.inputs_from must be one of {list(INPUT_SOURCES)}, got {self.inputs_from!r}")
        if self.data is None or (isinstance(self.data, (str, list, tuple)) and len(self.data) == 0):
            raise ZQError("LKDConfig.data is empty: LKD needs a data source: 'auto', 'self' (text sampled from the "
                          "model), 'random' (random token ids), a tensor of token ids, or text with tokenizer=")

    @classmethod
    def from_value(cls, value: "LKDConfig | Mapping[str, Any] | bool | None") -> "LKDConfig | None":
        """From a recipe's ``lkd:`` section: a mapping of LKDConfig fields, ``true`` (defaults), ``null``/``false``."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ZQError(f"unknown lkd key(s) {unknown}; valid keys are {sorted(known)}")
            return cls(**value)
        raise ZQError(f"lkd must be an LKDConfig, a mapping of its fields, true or null, got {type(value).__name__}")


ROLES = ("attn_qkv", "attn_out", "mlp_in", "mlp_out", "lm_head", "classifier", "other")
QUANT_SETTINGS = ("weight_bits", "act_bits", "group_size", "input_group_size", "weight_symmetric")
ROLE_PREFIX = "role:"


@dataclass(frozen=True)
class LinearPlan:
    """How one linear layer is compiled. ``weight_bits=None`` keeps it in floating point."""

    weight_bits: int | None
    act_bits: int | None
    group_size: int | None
    input_group_size: int | None
    reason: str
    weight_symmetric: bool = True  # False: asymmetric INT4 (a float min per group, values in 0..15)

    @property
    def quantized(self) -> bool:
        return self.weight_bits is not None

    @property
    def kind(self) -> str:
        """'W8A8', 'W4A16', ... or 'FP'."""
        if not self.quantized:
            return "FP"
        return f"W{self.weight_bits}A{self.act_bits or 16}"


@dataclass(frozen=True)
class LinearSite:
    """A linear layer as the planner sees it."""

    module: str
    role: str
    out_features: int
    in_features: int


@dataclass
class Override:
    """Settings for the linears whose module name matches ``module`` or whose role matches ``role`` (globs)."""

    settings: dict[str, Any]
    module: str | None = None
    role: str | None = None

    def matches(self, site: LinearSite) -> bool:
        if self.module is not None:
            return fnmatch.fnmatchcase(site.module, self.module)
        return fnmatch.fnmatchcase(site.role, self.role)

    def describe(self) -> str:
        return f"module:{self.module}" if self.module is not None else f"role:{self.role}"


@dataclass
class Recipe:
    """A quantization recipe. See the module docstring for the YAML form."""

    name: str = "custom"
    weight_bits: int = 8
    act_bits: int | None = 8
    group_size: int | None = None
    input_group_size: int | None = None
    weight_symmetric: bool = True
    keep_fp: list[str] = field(default_factory=lambda: ["role:lm_head", "role:classifier"])
    overrides: list[Override] = field(default_factory=list)
    # SmoothQuant-style migration of activation outliers into the weights (passes/smooth_activations.py);
    # None = off, as in ZeroQuant. Needs calibration inputs (random token ids unless calibration_data is given).
    smooth_alpha: float | None = None
    # QuaRot-style rotation (passes/rotate_hadamard.py): exact in floating point, no calibration, no constant
    rotate: bool = False
    lkd: Any = None  # an LKDConfig, from a mapping of its fields or `true`; None = plain PTQ
    # recipe="auto": the budget, calibration and per-linear errors the plan was chosen with (auto_recipe.py)
    auto: dict | None = None
    # how the stored integers are chosen (passes/gptq_round_weights.py, passes/awq_scale_weights.py): "rtn"
    # round to nearest (ZeroQuant), "gptq" second-order error feedback, "awq" activation-aware channel scales;
    # both calibrate on data the compiler makes itself (as LKD's data="auto") unless calibration_data is given
    weight_rounding: str = "rtn"
    lorc_rank: int | None = None  # LoRC: FP16 rank-r correction of each quantized weight's rounding error
    outlier_threshold: float | None = None  # LLM.int8(): input columns whose calibrated absmax exceeds it stay FP

    def __post_init__(self) -> None:
        _check_settings(self.name, {k: getattr(self, k) for k in QUANT_SETTINGS})
        if self.smooth_alpha is not None and (isinstance(self.smooth_alpha, bool)
                                              or not isinstance(self.smooth_alpha, (int, float))
                                              or not 0 < self.smooth_alpha < 1):
            raise ZQError(f"{self.name}: smooth_alpha must be a number in (0, 1) (0.5 is typical) or null, "
                          f"got {self.smooth_alpha!r}")
        if not isinstance(self.rotate, bool):
            raise ZQError(f"{self.name}: rotate must be true or false, got {self.rotate!r}")
        self.lkd = LKDConfig.from_value(self.lkd)
        # Recipe(overrides=[{"role": "mlp_*", ...}]) in Python reads like the YAML form, so accept mappings too
        self.overrides = [o if isinstance(o, Override) else _parse_override(o, i) for i, o in enumerate(self.overrides)]
        if isinstance(self.keep_fp, str) or not all(isinstance(entry, str) for entry in self.keep_fp):
            raise ZQError(f"{self.name}: keep_fp must be a list of module globs or 'role:<glob>' entries, "
                          f"got {self.keep_fp!r}")
        self._check_survey_methods()
        for override in self.overrides:
            _check_settings(f"override {override.describe()}", override.settings)
            if override.role is not None:
                _check_role_glob(override.role, f"override role:{override.role}")
        for entry in self.keep_fp:
            if entry.startswith(ROLE_PREFIX):
                _check_role_glob(entry[len(ROLE_PREFIX):], f"keep_fp entry {entry!r}")

    def _check_survey_methods(self) -> None:
        """weight_rounding, lorc_rank, outlier_threshold: their values and the combinations whose maths fails."""
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise ZQError(f"{self.name}: weight_rounding must be one of {list(WEIGHT_ROUNDINGS)}, got "
                          f"{self.weight_rounding!r}")
        if self.lorc_rank is not None and (not isinstance(self.lorc_rank, int) or isinstance(self.lorc_rank, bool)
                                           or self.lorc_rank <= 0):
            raise ZQError(f"{self.name}: lorc_rank must be a positive integer (8 is typical) or null, got "
                          f"{self.lorc_rank!r}")
        if self.outlier_threshold is not None and (isinstance(self.outlier_threshold, bool) or not isinstance(
                self.outlier_threshold, (int, float)) or self.outlier_threshold <= 0):
            raise ZQError(f"{self.name}: outlier_threshold must be a positive number (LLM.int8() uses 6.0) or null, "
                          f"got {self.outlier_threshold!r}")
        if self.weight_rounding == "awq" and self.smooth_alpha is not None:
            raise ZQError(f"{self.name}: weight_rounding 'awq' and smooth_alpha both choose the per-channel scale of "
                          f"the same activations (the last would undo the first); use one of them")
        if self.outlier_threshold is not None and self.lorc_rank is not None:
            raise ZQError(f"{self.name}: outlier_threshold and lorc_rank: the outlier-decomposed linear has no "
                          f"low-rank correction input; use one of them")
        if self.outlier_threshold is not None and (self.weight_symmetric is False or any(
                o.settings.get("weight_symmetric") is False for o in self.overrides)):
            raise ZQError(f"{self.name}: outlier_threshold stores symmetric weights beside its FP16 columns; drop "
                          f"weight_symmetric: false or outlier_threshold")
        if self.outlier_threshold is not None and self.act_bits is None and not any(
                o.settings.get("act_bits") == 8 for o in self.overrides):
            raise ZQError(f"{self.name}: outlier_threshold splits INT8 activations, but this recipe is weight-only "
                          f"(act_bits null); set act_bits: 8 or drop outlier_threshold")

    # -- resolution ------------------------------------------------------------------------------
    def resolve(self, sites: Iterable[LinearSite]) -> dict[str, LinearPlan]:
        """A plan per module name; raises ZQError for module globs that match nothing or bad group sizes."""
        sites = list(sites)
        for pattern in self._module_globs():
            if not any(fnmatch.fnmatchcase(s.module, pattern) for s in sites):
                examples = ", ".join(repr(s.module) for s in sites[:3]) or "none"
                raise ZQError(f"recipe {self.name!r}: module glob {pattern!r} matches no linear layer "
                              f"(linear layers are named like {examples})")
        return {site.module: self._plan(site) for site in sites}

    def _module_globs(self) -> list[str]:
        globs = [e for e in self.keep_fp if not e.startswith(ROLE_PREFIX)]
        return globs + [o.module for o in self.overrides if o.module is not None]

    def _plan(self, site: LinearSite) -> LinearPlan:
        settings = {k: getattr(self, k) for k in QUANT_SETTINGS}
        reason = f"recipe {self.name}"
        for override in self.overrides:
            if override.matches(site):
                settings.update(override.settings)
                reason = f"override {override.describe()}"
        for entry in self.keep_fp:
            pattern, target = ((entry[len(ROLE_PREFIX):], site.role) if entry.startswith(ROLE_PREFIX)
                               else (entry, site.module))
            if fnmatch.fnmatchcase(target, pattern):
                return LinearPlan(None, None, None, None, f"keep_fp {entry}")
        try:
            weight_groups(site.out_features, site.in_features, settings["group_size"],
                          settings["input_group_size"])
        except ZQError as err:
            raise ZQError(f"recipe {self.name!r} for {site.module} ({site.out_features}x{site.in_features}, "
                          f"{reason}): {err}") from None
        if not settings["weight_symmetric"] and settings["weight_bits"] != 4:
            raise ZQError(f"recipe {self.name!r} for {site.module} ({reason}): asymmetric weights "
                          f"(weight_symmetric: false) are INT4 only, but this layer has {settings['weight_bits']}-bit "
                          f"weights; set weight_symmetric: false in the INT4 override only (e.g. role: 'mlp_*')")
        if settings["weight_bits"] == 4 and (settings["input_group_size"] or site.in_features) % 2:
            raise ZQError(f"{site.module}: INT4 weights need an even in_features and input_group_size (two values "
                          f"per byte), got {site.in_features} / {settings['input_group_size']}; keep it at 8 bits "
                          f"with an override")
        return LinearPlan(reason=reason, **settings)

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        """Build from a mapping; ``base`` names a preset to start from. Unknown keys raise ZQError."""
        data = dict(data)
        known = ({f.name for f in dataclasses.fields(cls)} - {"auto"}) | {"base"}  # auto: a record, set by "auto"
        unknown = sorted(set(data) - known)
        if unknown:
            raise ZQError(f"unknown recipe key(s) {unknown}; valid keys are {sorted(known)}")
        base_name = data.pop("base", None)
        base = preset(base_name) if base_name is not None else cls()
        if "overrides" in data:
            data["overrides"] = base.overrides + [_parse_override(o, i) for i, o in enumerate(data["overrides"])]
        if base_name is not None:
            data.setdefault("name", f"{base_name}+custom" if data else base_name)
        return dataclasses.replace(base, **data)


def _check_settings(where: str, settings: Mapping[str, Any]) -> None:
    for key, value in settings.items():
        is_int = isinstance(value, int) and not isinstance(value, bool)  # 8.0 or True would pass `in (4, 8)`
        if key == "weight_bits" and not (is_int and value in (4, 8)):
            raise ZQError(f"{where}: weight_bits must be 4 or 8, got {value!r} (keep a layer in floating point "
                          f"with keep_fp instead)")
        if key == "act_bits" and not (value is None or (is_int and value == 8)):
            raise ZQError(f"{where}: act_bits must be 8 (token-wise INT8) or null (weight-only), got {value!r}")
        if key == "weight_symmetric" and not isinstance(value, bool):
            raise ZQError(f"{where}: weight_symmetric must be true (q in -7..7, one scale per group) or false "
                          f"(asymmetric INT4: q in 0..15, a scale and a min per group), got {value!r}")
        if key in ("group_size", "input_group_size") and value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ZQError(f"{where}: {key} must be a positive integer or null, got {value!r}")


def _check_role_glob(pattern: str, where: str) -> None:
    if not fnmatch.filter(ROLES, pattern):
        raise ZQError(f"{where}: no role matches {pattern!r}; roles are {list(ROLES)}")


def _parse_override(entry: Any, index: int) -> Override:
    if not isinstance(entry, Mapping):
        raise ZQError(f"overrides[{index}] must be a mapping like {{role: 'mlp_*', weight_bits: 4}}, got {entry!r}")
    entry = dict(entry)
    selectors = [k for k in ("module", "role") if k in entry]
    if len(selectors) != 1:
        raise ZQError(f"overrides[{index}] needs exactly one of 'module' (glob on module name) or 'role' "
                      f"(glob on role), got {sorted(entry)}")
    selector = {k: entry.pop(k) for k in selectors}
    unknown = sorted(set(entry) - set(QUANT_SETTINGS))
    if unknown:
        raise ZQError(f"overrides[{index}]: unknown key(s) {unknown}; valid keys are "
                      f"['module' or 'role', {', '.join(QUANT_SETTINGS)}]")
    return Override(settings=entry, **selector)


_PRESETS: dict[str, dict[str, Any]] = {
    # INT8 weights everywhere, INT8 token-wise activations.
    "w8a8": {},
    # W8A8 with SmoothQuant-style smoothing (norm, SwiGLU and attention outputs, calibrated on random token ids);
    # beyond the paper. alpha 0.7 was best for SmolLM2-135M on Austen and on held-out WSJ (ACCURACY.md).
    "w8a8-smooth": {"smooth_alpha": 0.7},
    # ZeroQuant W4/8-A8: INT4 MLP weights (groups of 64 along the input dim), INT8 attention weights.
    "w4a8": {"overrides": [{"role": "mlp_*", "weight_bits": 4, "input_group_size": 64}]},
    # Weight-only: activations stay in floating point.
    "w8a16": {"act_bits": None},
    "w4a16": {"act_bits": None, "weight_bits": 4, "input_group_size": 64},
    # Asymmetric INT4 in groups of 32 (a float32 scale and min per group: llama.cpp's Q4_1 layout), weight-only
    # everywhere / for the MLP of W4/8-A8.
    "w4a16-asym": {"act_bits": None, "weight_bits": 4, "input_group_size": 32, "weight_symmetric": False},
    "w4a8-asym": {"overrides": [{"role": "mlp_*", "weight_bits": 4, "input_group_size": 32,
                                 "weight_symmetric": False}]},
    # W8A8 / W4A8 after a Hadamard rotation of the residual stream and of the output projections' inputs (QuaRot);
    # beyond the paper; no constant to choose (the rotation's seed is fixed, never tuned).
    "w8a8-rot": {"rotate": True},
    "w4a8-rot": {"rotate": True, "overrides": [{"role": "mlp_*", "weight_bits": 4, "input_group_size": 64}]},
    # both: the rotation first, then smoothing of what it leaves (a post-LN encoder's LayerNorm outputs, which
    # rotation cannot reach); w8a8-smooth's alpha, nothing chosen anew. ACCURACY.md: MiniLM's cosine >= 0.999.
    "w8a8-smooth-rot": {"smooth_alpha": 0.7, "rotate": True},
}
PRESETS = tuple(_PRESETS)


def preset(name: str) -> Recipe:
    if name not in _PRESETS:
        raise ZQError(f"unknown recipe preset {name!r}; presets are {list(_PRESETS)}, or pass a Recipe, a dict "
                      f"or a path to a .yaml/.json file")
    spec = dict(_PRESETS[name])
    overrides = [_parse_override(o, i) for i, o in enumerate(spec.pop("overrides", []))]
    return Recipe(name=name, overrides=overrides, **spec)


def load_recipe(spec: "Recipe | str | os.PathLike | Mapping[str, Any]") -> Recipe:
    """A Recipe from a Recipe, a preset name, a dict, or a path to a YAML/JSON file."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, Mapping):
        return Recipe.from_dict(spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise ZQError(f"recipe must be a preset name {list(_PRESETS)}, a Recipe, a dict or a path to a .yaml/.json "
                      f"file, got {type(spec).__name__}")
    text = os.fspath(spec)
    if text in _PRESETS:
        return preset(text)
    if text.endswith((".yaml", ".yml", ".json")):
        if not os.path.isfile(text):
            raise ZQError(f"recipe file {text!r} does not exist")
        import yaml
        with open(text) as f:
            try:
                data = json.load(f) if text.endswith(".json") else yaml.safe_load(f)
            except (ValueError, yaml.YAMLError) as err:
                raise ZQError(f"recipe file {text!r} is not valid {'JSON' if text.endswith('.json') else 'YAML'}: "
                              f"{str(err).splitlines()[0]}") from err
        if not isinstance(data, Mapping):
            raise ZQError(f"recipe file {text!r} must hold a mapping at the top level")
        recipe = Recipe.from_dict(data)
        return recipe if "name" in data else dataclasses.replace(recipe, name=os.path.basename(text))
    return preset(text)
