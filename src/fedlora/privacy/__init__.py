"""Differential privacy's pieces: accounting (:mod:`.accounting`), clipping and noise (:mod:`.clipping`),
per-example gradients and the DP-SGD step (:mod:`.dpsgd`, imported by name: it needs Opacus).

A low-level package: it imports torch and the standard library, and Opacus (the optional
``privacy`` extra) only inside :mod:`.accounting`'s functions that compute ε or σ, so importing
:mod:`fedlora` or :mod:`fedlora.privacy` never needs Opacus (and :mod:`fedlora` does not import
this package). The engine wires these pieces into rounds;
nothing here knows about clients, methods or configs beyond the key names its errors cite.

The two DP-FedAvg granularities (McMahan et al. 2018) they serve:

* ``client``: each sampled client's round update is clipped to ``privacy.clip`` (L2, jointly over
  all its tensors), the server adds ``N(0, (noise_multiplier * clip)^2)`` per coordinate to the
  sum; one mechanism per round, sample rate = clients per round / clients.
* ``sample``: DP-SGD (Abadi et al. 2016) inside each client; each client is its own party with
  its own spend (:class:`~fedlora.privacy.accounting.PrivacyLedger` reports the largest).
"""

from __future__ import annotations

from fedlora.privacy.accounting import (
    PrivacyLedger,
    PrivacySpend,
    check_budget,
    epsilon,
    noise_multiplier_for,
    rdp_epsilon_floor,
    validate,
)
from fedlora.privacy.clipping import clip_to_norm, gaussian_noise, global_norm, seeded_generator

__all__ = [
    "PrivacyLedger",
    "PrivacySpend",
    "check_budget",
    "clip_to_norm",
    "epsilon",
    "gaussian_noise",
    "global_norm",
    "noise_multiplier_for",
    "rdp_epsilon_floor",
    "seeded_generator",
    "validate",
]
