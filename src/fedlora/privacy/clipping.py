r"""Clipping and Gaussian noise: the two operations of the subsampled Gaussian mechanism.

For an update ``u`` (a mapping of named tensors, e.g. a client's LoRA delta for one round) and a
bound ``C`` (``privacy.clip``):

    ||u||    = sqrt(sum_k sum_j u_k[j]^2)                     (one L2 norm over all tensors jointly)
    clip(u)  = u * min(1, C / ||u||)                          so ||clip(u)|| <= C
    noise    = N(0, std^2 I),  std = noise_multiplier * C     (per coordinate; Abadi et al. 2016,
                                                               McMahan et al. 2018)

The sensitivity the accountant (:mod:`.accounting`) assumes is ``C``, so the clipped tensors
*as stored* must satisfy the bound; choices made for that where the sources are silent:

* The norm is accumulated in float64 whatever the tensors' dtype (bf16 included):
  ``vector_norm(t, dtype=float64)`` per tensor (rescaled by ``max|t|`` where float64 squares
  would overflow or underflow), combined with ``math.hypot``.
* The scaled copy is computed in float64 and rounded to each tensor's dtype. Rounding to nearest
  can grow each entry by a factor ``1 + r`` (``r`` = the dtype's unit roundoff: ``2^-8`` for
  bf16, ``2^-11`` float16, ``2^-24`` float32, ``2^-53`` float64), so a bf16 update scaled by
  exactly ``C / ||u||`` can come out up to 0.4 % above ``C`` (half the time, in the tests). The
  factor used is therefore ``C / ||u|| / (1 + r_max) * (1 - 2^-50)`` (``r_max``: the coarsest
  dtype present; the last term covers float64's own rounding in the norm), which bounds the
  *rounded* result; the norm of the result is then measured (float64, as above) and, should
  rounding to subnormals ever break the bound, the factor shrinks again (at most 8 times, else
  ``RuntimeError``). The price: a clipped bf16 update lands up to ~0.8 % below ``C`` (float32
  ~1e-7, float64 ~1e-15); nothing ever lands above it.
* An update already within the bound is returned unchanged (a bit-exact copy; factor ``1.0``).
* A non-finite norm (NaN/inf entries) raises ``ValueError``: such an update cannot be clipped
  into a bounded one (``inf * 0`` is NaN), and letting it through would break the sensitivity.

Noise is drawn on the CPU in float64 from a ``torch.Generator``, one tensor at a time in sorted
key order, then cast to each tensor's dtype and device: the same seed gives the same noise on any
device and for any dict insertion order. :func:`seeded_generator` derives a generator from the
run's seed and labels (sha256), e.g. ``("client-dp", round)``, so each round's noise is
reproducible and independent of every other stream. Casting the noise to a low-precision dtype
rounds it (bf16 keeps 8 significant bits); floating-point rounding of noise is a known gap
between DP's analysis and its implementations (Mironov 2012, "On Significance of the Least
Significant Bits for Differential Privacy"): add noise in float32 or wider where it matters.

References: Abadi et al. 2016, "Deep Learning with Differential Privacy"; McMahan et al. 2018,
"Learning Differentially Private Recurrent Language Models"; Mironov 2012 (above).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

_FLOAT64_MARGIN = 2.0**-50  # float64 rounding in the norm, the factor and the scaling (a few ulps)
_MAX_SHRINKS = 8


def _unit_roundoff(dtype: torch.dtype) -> float:
    """Half the dtype's machine epsilon (the relative error of rounding to nearest); 0 for integers."""
    return torch.finfo(dtype).eps / 2 if dtype.is_floating_point else 0.0


def _norm64(t: Tensor) -> float:
    """``||t||_2`` accumulated in float64; rescaled by ``max|t|`` where the squares over- or underflow."""
    t = t.detach()
    n = torch.linalg.vector_norm(t, dtype=torch.float64).item()
    if n == 0.0 or math.isinf(n):  # float64 entries beyond ~1e154 (or below ~1e-154): squares leave the range
        m = t.abs().max().to(torch.float64).item() if t.numel() else 0.0
        if 0.0 < m < math.inf:
            n = m * torch.linalg.vector_norm(t.to(torch.float64) / m).item()
    return n


def global_norm(tensors: Mapping[str, Tensor]) -> float:
    """The joint L2 norm of all ``tensors``, accumulated in float64 (``0.0`` for an empty mapping)."""
    return math.hypot(*(_norm64(t) for t in tensors.values()))


def clip_to_norm(tensors: Mapping[str, Tensor], bound: float) -> tuple[dict[str, Tensor], float, float]:
    """``(clipped copy, original norm, factor)``: each tensor times ``factor <= 1``, jointly within ``bound``.

    ``factor`` is ``1.0`` (and the copy bit-exact) when the norm is already ``<= bound``, else
    slightly below ``bound / norm`` so the copy *rounded to its dtypes* has norm ``<= bound``
    (see the module docstring). The inputs are never modified.
    """
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"privacy.clip={bound!r} must be finite and > 0")
    norm = global_norm(tensors)
    if not math.isfinite(norm):
        raise ValueError(f"cannot clip an update whose norm is {norm} (non-finite entries)")
    if norm <= bound:
        return {k: t.detach().clone() for k, t in tensors.items()}, norm, 1.0
    u = max((_unit_roundoff(t.dtype) for t in tensors.values()), default=0.0)
    factor = bound / norm / (1.0 + u) * (1.0 - _FLOAT64_MARGIN)
    for _ in range(_MAX_SHRINKS + 1):
        out = {k: (t.detach().to(torch.float64) * factor).to(t.dtype) for k, t in tensors.items()}
        if global_norm(out) <= bound:
            return out, norm, factor
        factor *= 1.0 - 2.0 * max(u, _FLOAT64_MARGIN)
    raise RuntimeError(f"could not clip an update of norm {norm} to {bound} in its dtypes")


def gaussian_noise(like: Mapping[str, Tensor], std: float, generator: torch.Generator) -> dict[str, Tensor]:
    """``N(0, std^2)`` per coordinate, shaped, typed and placed like ``like``'s tensors.

    Drawn in float64 on the CPU from ``generator`` (a CPU generator) in sorted key order, then
    cast; ``std = 0`` gives zeros but still advances the generator as a positive ``std`` would.
    """
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std={std!r} must be finite and >= 0")
    if generator.device.type != "cpu":
        raise ValueError(f"the noise generator must be a CPU generator, not {generator.device}")
    out: dict[str, Tensor] = {}
    for key in sorted(like):
        t = like[key]
        out[key] = gaussian_tensor(t.shape, std, generator).to(dtype=t.dtype, device=t.device)
    return {k: out[k] for k in like}  # the caller's key order


def gaussian_tensor(shape: Sequence[int], std: float, generator: torch.Generator) -> Tensor:
    """``N(0, std^2)`` of ``shape``, drawn in float64 on the CPU from ``generator`` (the one draw
    both client-level noise and DP-SGD's use)."""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float64, device="cpu") * std


def seeded_generator(seed: int, *labels: str | int) -> torch.Generator:
    """A CPU generator seeded with 63 bits of ``sha256(json([seed, *labels]))``.

    E.g. ``seeded_generator(cfg.seed, "client-dp", round_)``: reproducible from the run's seed,
    independent across labels (``("client-dp", 1)`` and ``("client-dp", "1")`` differ too).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, not {type(seed).__name__}")
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise TypeError(f"labels must be str or int, not {type(label).__name__}")
    digest = hashlib.sha256(json.dumps([seed, *labels]).encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
