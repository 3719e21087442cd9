"""LoHa and LoKr, the LyCORIS family beside LoRA: PEFT's adapter weights and their kohya/LyCORIS form.

PEFT (``LoHaConfig``/``LoKrConfig``) and LyCORIS name the factors alike; the files differ in the scale:

    LoHa  delta = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * scale
    LoKr  delta = kron(w1, w2) * scale, w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b, w2 likewise

PEFT's scale is always ``alpha / r``. LyCORIS' loaders (kohya, ComfyUI, AUTOMATIC1111) use ``alpha / dim``
where ``dim`` is the inner size of a decomposed factor, and 1 when neither LoKr factor is decomposed (the
``alpha`` key is then ignored). So a LoKr module with two full factors carries PEFT's scale inside
``lokr_w1``. A ``LycorisModule`` holds a module in the LyCORIS convention.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from utils.lora.kohya_names import LoraConversionError, most_common

LORA_TYPES = ("lora", "loha", "lokr")
PEFT_TYPES = {"LOHA": "loha", "LOKR": "lokr"}
ROLES = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
         "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}
TUCKER_ROLES = ("hada_t1", "hada_t2", "lokr_t2")
TUCKER_MESSAGE = "Tucker-decomposed conv factors (hada_t1/hada_t2/lokr_t2, use_tucker) are not supported"


def adapter_type(config: Mapping[str, Any]) -> str:
    """'lora', 'loha' or 'lokr' from a PEFT config dict (its ``peft_type``)."""
    peft_type = str(config.get("peft_type") or "LORA").rsplit(".", 1)[-1].upper()
    return PEFT_TYPES.get(peft_type, "lora")


def kind_of_roles(roles: set[str]) -> str | None:
    """'loha' or 'lokr' when the weight roles of a file are LyCORIS ones, else None."""
    for kind, names in ROLES.items():
        if roles & set(names):
            return kind
    return None


@dataclass
class LycorisModule:
    """One LoHa/LoKr layer in the LyCORIS convention: the factors by role and the kohya ``alpha``."""

    component: str
    module: str
    kind: str  # "loha" or "lokr"
    weights: dict[str, torch.Tensor]
    alpha: float

    @property
    def rank(self) -> int:
        """LyCORIS' ``dim``: the inner size of the (last) decomposed factor; 0 when none is decomposed."""
        for role in ("hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
            if role in self.weights:
                return int(self.weights[role].shape[0])
        return 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 1.0

    def flat_shape(self) -> tuple[int, int]:
        """(out_features, in_features x kernel size) of the layer the delta belongs to."""
        w = self.weights
        if self.kind == "loha":
            return int(w["hada_w1_a"].shape[0]), int(w["hada_w1_b"][0].numel())
        w1 = w.get("lokr_w1", w.get("lokr_w1_a"))
        rows1 = int(w1.shape[0])
        cols1 = int(w["lokr_w1"].shape[1]) if "lokr_w1" in w else int(w["lokr_w1_b"].shape[1])
        if "lokr_w2" in w:
            rows2, cols2 = int(w["lokr_w2"].shape[0]), int(w["lokr_w2"][0].numel())
        else:
            rows2, cols2 = int(w["lokr_w2_a"].shape[0]), int(w["lokr_w2_b"].shape[1])
        return rows1 * rows2, cols1 * cols2


def pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup for one module path."""
    from peft.utils.other import get_pattern_key

    if not pattern:
        return default
    key = get_pattern_key(list(pattern), module)
    return pattern.get(key, default)


def _missing_roles(kind: str, weights: Mapping[str, torch.Tensor]) -> list[str]:
    if kind == "loha":
        return [role for role in ROLES["loha"] if role not in weights]
    missing = []
    for factor in ("lokr_w1", "lokr_w2"):
        if factor not in weights and not {f"{factor}_a", f"{factor}_b"} <= set(weights):
            missing.append(f"{factor} or {factor}_a/{factor}_b")
    return missing


def group_roles(source: str | os.PathLike, kind: str, tensors: Mapping[str, torch.Tensor],
                problems: list[str], label: str = "") -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {role: tensor}}`` from ``module.role`` keys; keys of other roles are listed in ``problems``."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, role = key.rpartition(".")
        if role in TUCKER_ROLES:
            problems.append(f"{label}{key}: {TUCKER_MESSAGE}")
        elif role in ROLES[kind] or role == "alpha":
            grouped.setdefault(module, {})[role] = tensor
        else:
            problems.append(f"{label}{key}: not a {kind} weight")
    for module, weights in grouped.items():
        for missing in _missing_roles(kind, weights):
            problems.append(f"{label}{module}: has no {missing} weight")
    return grouped


def module_from_peft(component: str, module: str, kind: str, weights: dict[str, torch.Tensor],
                     config: Mapping[str, Any]) -> LycorisModule:
    """A PEFT LoHa/LoKr layer (its weights and its config) in the LyCORIS convention."""
    rank = int(pattern_value(config.get("rank_pattern"), module, config["r"]))
    alpha = float(pattern_value(config.get("alpha_pattern"), module, config["alpha"]))
    weights = {role: tensor.detach().to(torch.float32).clone() for role, tensor in weights.items()}
    lycoris = LycorisModule(component, module, kind, weights, alpha)
    if not lycoris.rank:  # two full LoKr factors: LyCORIS applies no scale, so it goes into lokr_w1
        weights["lokr_w1"] = weights["lokr_w1"] * (alpha / rank)
        lycoris.alpha = float(rank)
    return lycoris


def modules_from_peft(source: str | os.PathLike, weights: Mapping[str, Mapping[str, torch.Tensor]],
                      configs: Mapping[str, Mapping[str, Any]]) -> tuple[list[LycorisModule], list[str]]:
    """LoHa/LoKr modules of per-component PEFT weights (``module.role`` keys) and configs, and any problems."""
    modules, problems = [], []
    for component, tensors in weights.items():
        config = configs[component]
        kind = adapter_type(config)
        grouped = group_roles(source, kind, tensors, problems, f"{component}.")
        for module, part in sorted(grouped.items()):
            if not _missing_roles(kind, part):
                part.pop("alpha", None)
                modules.append(module_from_peft(component, module, kind, part, config))
    return modules, problems


def lokr_factor_options(modules: list[LycorisModule], factor: int) -> tuple[int, bool]:
    """(decompose_factor, decompose_both) under which PEFT builds these LoKr factors; PEFT has one factor
    for every module, so a file whose modules follow different factors is refused."""
    from peft.tuners.lokr.layer import factorization

    for m in modules:
        w1 = m.weights.get("lokr_w1", m.weights.get("lokr_w1_a"))
        if factorization(m.flat_shape()[0], factor)[0] != int(w1.shape[0]):
            raise LoraConversionError(f"{m.component}.{m.module}", f"LoKr factor shapes do not follow "
                                      f"factor={factor}, and PEFT uses one factor for every module")
    return factor, any("lokr_w1_a" in m.weights for m in modules)


def peft_config_dict(modules: list[LycorisModule], factor: int = -1) -> dict[str, Any]:
    """A PEFT LoHaConfig/LoKrConfig dict that rebuilds these modules with the same delta."""
    from peft import LoHaConfig, LoKrConfig

    def name(m: LycorisModule) -> str:
        return m.module.removeprefix("text_model.")

    ranks, alphas = {}, {}
    for m in modules:
        if m.rank:
            ranks[name(m)], alphas[name(m)] = m.rank, m.alpha
        else:  # two full LoKr factors: any rank that keeps them full, and scale 1
            full = max(max(t.shape[:2]) for t in m.weights.values())
            ranks[name(m)] = alphas[name(m)] = full
    rank, alpha = int(most_common(ranks.values())), most_common(alphas.values())
    kwargs: dict[str, Any] = dict(
        r=rank, alpha=alpha, target_modules=sorted(ranks),
        rank_pattern={k: v for k, v in ranks.items() if v != rank},
        alpha_pattern={k: v for k, v in alphas.items() if v != alpha})
    if modules[0].kind == "loha":
        return LoHaConfig(**kwargs).to_dict()
    factor, decompose_both = lokr_factor_options(modules, factor)
    return LoKrConfig(decompose_factor=factor, decompose_both=decompose_both, **kwargs).to_dict()


def match_module_names(state: Mapping[str, torch.Tensor], module_names: set[str]) -> dict[str, torch.Tensor]:
    """``module.role`` keys renamed to the model's own module paths: a CLIP text encoder names its layers with or
    without transformers' ``text_model.`` prefix (the flattened CLIPTextModel of transformers 5 has none), and a
    file written with the other naming, or read from kohya names, must still find them."""
    renamed = {}
    for key, tensor in state.items():
        module, _, role = key.rpartition(".")
        if module not in module_names:
            other = module.removeprefix("text_model.") if module.startswith("text_model.") else f"text_model.{module}"
            module = other if other in module_names else module
        renamed[f"{module}.{role}"] = tensor
    return renamed
