"""LoKr modules that kohya's LyCORIS loader cannot rebuild, and the form every tool reads exactly.

PEFT and LyCORIS split a layer's width alike but for one thing: LyCORIS always puts the smaller number first
(``lokr_w1``), PEFT puts ``decompose_factor`` first even when it is the larger one. A 640-wide layer with factor
32 is ``w1`` 32x32 ⊗ ``w2`` 20x20 in PEFT and 20x20 ⊗ 32x32 in LyCORIS. ComfyUI and AUTOMATIC1111 multiply the
tensors they find and read PEFT's order right; kohya sd-scripts' LyCORIS loader
(``lycoris.kohya.create_network_from_weights``) guesses the factor from the tensors' shapes, builds the module
its own way and fails to copy them in. The Kronecker product does not commute, so no LoKr of LyCORIS' order
holds the same delta; the one LoKr form that every tool builds as written is ``lokr_w1`` = [[1]] ⊗ ``lokr_w2`` =
the whole scaled delta (out x in numbers). ``lycoris_builds`` says which modules need it, ``whole_form`` writes
it and ``peft_form`` turns a module back into PEFT's factor shapes where its delta is a Kronecker product of
them (the nearest Kronecker product, exact to float rounding).
"""

from __future__ import annotations

from typing import Mapping

import torch

KRONECKER_TOLERANCE = 1e-4  # a float32 Kronecker product leaves a second singular value near 1e-7 of the first


def lycoris_factorization(dimension: int, factor: int) -> tuple[int, int]:
    """LyCORIS' split of a width: PEFT's, with the smaller number always first."""
    from peft.tuners.lokr.layer import factorization

    return tuple(sorted(factorization(dimension, factor)))  # type: ignore[return-value]


def _factor_shapes(weights: Mapping[str, torch.Tensor]) -> tuple[tuple[int, int], tuple[int, ...]]:
    """(w1 rows, cols) and w2's shape as LyCORIS reads them (``w2_b``'s columns for a decomposed w2)."""
    w1 = (tuple(weights["lokr_w1"].shape) if "lokr_w1" in weights
          else (int(weights["lokr_w1_a"].shape[0]), int(weights["lokr_w1_b"].shape[1])))
    w2 = (tuple(weights["lokr_w2"].shape) if "lokr_w2" in weights
          else (int(weights["lokr_w2_a"].shape[0]), int(weights["lokr_w2_b"].shape[1])))
    return w1, w2


def _guessed_factor(w1: tuple[int, int], w2: tuple[int, ...]) -> int:
    """The factor LyCORIS' ``LokrModule.make_module_from_state_dict`` infers from the factors' shapes."""
    out_dim, in_dim = w1[0] * w2[0], w1[1] * w2[1]
    if w1[0] == lycoris_factorization(out_dim, -1)[0] and w1[1] == lycoris_factorization(in_dim, -1)[0]:
        return -1
    for factor in (max(w1), max(w2)):
        if out_dim % factor == 0 and in_dim % factor == 0 and factor in (w1[0], w2[0]) and factor in (w1[1], w2[1]):
            return factor
    return min(max(w1), max(w2))


def lycoris_builds(weights: Mapping[str, torch.Tensor], layer_shape: tuple[int, ...]) -> bool:
    """Whether kohya's LyCORIS loader builds this LoKr module with the shapes of its tensors (the rules of its
    ``LokrModule``); ``layer_shape`` is the layer's (out, in) or (out, in, kh, kw)."""
    out_dim, in_dim, *kernel = layer_shape
    w1, w2 = _factor_shapes(weights)
    factor = _guessed_factor(w1, w2)
    a, b = lycoris_factorization(out_dim, factor)
    c, d = lycoris_factorization(in_dim, factor)
    rank = next((int(weights[r].shape[1]) for r in ("lokr_w1_a", "lokr_w2_a") if r in weights), 0)
    full = rank == 0  # LyCORIS' full_matrix: no decomposed factor in the file
    built: dict[str, tuple[int, ...]] = {}
    if "lokr_w1" not in weights and "lokr_w2" not in weights and rank < max(a, c) / 2 and not full:
        built.update(lokr_w1_a=(a, rank), lokr_w1_b=(rank, c))
    else:
        built["lokr_w1"] = (a, c)
    if full or rank >= max(b, d) / 2:
        built["lokr_w2"] = (b, d, *kernel)
    else:
        built.update(lokr_w2_a=(b, rank), lokr_w2_b=(rank, d * int(torch.Size(kernel).numel())))
    return built == {role: tuple(t.shape) for role, t in weights.items()}


def flat_delta(weights: Mapping[str, torch.Tensor], scale: float) -> torch.Tensor:
    """The module's weight delta, (out, in x kernel size), as PEFT and LyCORIS compute it."""
    w1 = weights["lokr_w1"] if "lokr_w1" in weights else weights["lokr_w1_a"] @ weights["lokr_w1_b"]
    w2 = weights["lokr_w2"] if "lokr_w2" in weights else weights["lokr_w2_a"] @ weights["lokr_w2_b"]
    return torch.kron(w1, w2.reshape(w2.shape[0], -1)) * scale


def whole_form(weights: Mapping[str, torch.Tensor], scale: float,
               layer_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The LoKr form every loader builds as written: ``lokr_w1`` [[1]] and ``lokr_w2`` the scaled delta in the
    layer's shape (no decomposed factor, so LyCORIS' loaders apply scale 1)."""
    delta = flat_delta(weights, scale).reshape(layer_shape)
    return {"lokr_w1": torch.ones(1, 1, dtype=delta.dtype), "lokr_w2": delta.contiguous()}


def peft_form(weights: Mapping[str, torch.Tensor], scale: float, layer_shape: tuple[int, ...],
              factor: int) -> dict[str, torch.Tensor] | None:
    """Two full factors in PEFT's shapes for ``factor`` with the same delta (scale 1), or None when the delta is
    no Kronecker product of those shapes (LyCORIS' smaller-first factors are not, in general). The nearest
    Kronecker product (Van Loan and Pitsianis), computed in float64; exact to float rounding when it is one."""
    from peft.tuners.lokr.layer import factorization

    out_dim, in_dim, *kernel = layer_shape
    a, b = factorization(out_dim, factor)
    c, d = factorization(in_dim, factor)
    d_flat = d * int(torch.Size(kernel).numel())
    delta = flat_delta(weights, scale).to(torch.float64)
    blocks = delta.reshape(a, b, c, d_flat).permute(0, 2, 1, 3).reshape(a * c, b * d_flat)
    u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
    if len(s) > 1 and s[1] > KRONECKER_TOLERANCE * s[0]:
        return None
    w1 = (u[:, 0] * s[0].sqrt()).reshape(a, c)
    w2 = (vh[0] * s[0].sqrt()).reshape(b, d, *kernel)
    dtype = next(iter(weights.values())).dtype
    return {"lokr_w1": w1.to(dtype).contiguous(), "lokr_w2": w2.to(dtype).contiguous()}
