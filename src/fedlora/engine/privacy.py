"""Differential privacy in a run (``privacy.mode``): what is clipped and noised, per method, and
what the guarantee covers. The pieces (Opacus's accountants, clipping that holds after rounding,
seeded Gaussian noise, per-example gradients) are :mod:`fedlora.privacy`'s; this module plans the
noise before a model loads, clips on the client, noises on the server and keeps the spend.

**client** (DP-FedAvg, McMahan et al. 2018; central DP: the server is trusted and adds the noise).
Client ``i`` clips its round update jointly to ``C = privacy.clip``: ``u_i`` = what it uploads
minus where the method started it (the uploaded factors: FedIT's A and B, FFA-LoRA's B, RoLoRA's
active factor, FedSA-LoRA's A, FLoRA's fresh LoRA, ...) together with its classifier head's
change (``modules_to_save``), and sends ``start_i + clip_C(u_i)`` (:func:`clip_upload`). The
server, with ``m`` accepted uploads aggregated with uniform weights (a sample-count weight would
be data-dependent), noises by the method's kind:

* methods whose aggregate depends on the uploads only through their mean
  (:meth:`~fedlora.methods.base.Method.sum_only`: fedit, ffa_lora, rolora, fedsa_lora, frlora):
  ``mean_i(upload_i) + N(0, (sigma C / m)^2)`` per coordinate, and the method aggregates that one
  noised mean (FRLoRA's merge of its product into the backbone is post-processing of it);
* the methods that combine individual factors (fedrot_lora's per-client rotation, fedex_lora,
  flora, flexlora, fedmomentum, fedsmooth_lora): every upload gets ``N(0, (sigma C)^2)`` per
  coordinate before the method's aggregate, which is then post-processing. One client's data
  changes only its own upload, so each round is the same subsampled Gaussian mechanism
  ``(sigma, q)`` as the central one and spends the same epsilon, but the noise left in the
  combined update is ``sqrt(m)`` times a mean's: the price of a nonlinear server step.

Each round is one step of the mechanism at ``q = k / N`` (``k`` clients sampled of ``N``); the
accountant treats the fixed-size sample as Poisson sampling at that rate, as Flower's DP
wrappers and TensorFlow Federated's DP-FedAvg do (an approximation for sampling without
replacement). The guarantee, for adding or removing one client's entire data: everything
derived from the noised aggregates (global factors, backbone deltas, heads, checkpoints,
evaluations on the public test set). Not covered: the per-client training statistics the
clients report (losses, step counts in ``metrics.jsonl``: operator diagnostics; publish the
model, not that file); SCAFFOLD (its server variate uses each raw upload) is refused.

**sample** (DP-SGD, Abadi et al. 2016, inside each client): every local optimizer step's
gradient of the trainable parameters is ``(1/B) (sum_j clip_C(g_j) + N(0, sigma_i^2 C^2))`` over
the step's ``B`` examples (``train.batch_size x train.grad_accum``; per-example gradients from
:mod:`fedlora.privacy.dpsgd`), so a client's uploads, and everything the server derives from
them, are post-processing. Client ``i`` is its own party: its examples are sampled at
``q_i = B / n_i`` per step (shuffled fixed-size batches, accounted as Poisson sampling at that
rate, as Opacus's default accounting of such loaders does), ``K_i`` steps per round it takes
part in (``train.max_steps``, or its epochs over its ``n_i`` examples); its epsilon comes from its
own participation, and the run reports the largest. The noise multiplier is per client too: from
``privacy.epsilon``, ``sigma_i`` is calibrated (before the model loads) for client ``i``'s own
worst case, ``K_i`` steps at ``q_i`` in every round, as Opacus's ``make_private_with_epsilon``
calibrates per dataset; so every client is planned to spend (just under) the budget, and a
larger client gets there with less noise than the smallest one (whose ``sigma_i`` is what one
worst-case calibration for all would give everyone). A given ``privacy.noise_multiplier`` is
every client's, and the budget check covers the client that spends the most. Reports give
``noise_multiplier`` (the largest ``sigma_i``) and ``noise_multiplier_min``. Refused:
fedsmooth_lora (its full-weight gradient estimate reads the client's data outside DP-SGD) and
packed batches (per-example gradients need one example per row: packing ``auto`` pads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from fedlora.engine.config import Config, PrivacyConfig, clients_per_round
from fedlora.engine.train import steps_for
from fedlora.methods import ClientUpload, GlobalState, Method, RoundResult
from fedlora.methods.base import Factors, ModuleFactors, weighted_mean
from fedlora.privacy import (
    PrivacyLedger,
    check_budget,
    clip_to_norm,
    gaussian_noise,
    noise_multiplier_for,
    seeded_generator,
    validate,
)

CLIENT_PARTY = "clients"  # client-level DP: every client is protected by the same (sigma, q) steps


@dataclass(frozen=True)
class NoisePlan:
    """The run's DP settings, resolved: the noise multiplier (from ``privacy.epsilon`` or given),
    and per step the sample rate (client mode: ``k / N``; sample mode: per client, ``B / n_i``).

    ``sigma``: client mode, the server's noise multiplier; sample mode, the largest of the
    clients' own (``sample_sigmas``, read with :meth:`sigma_of`), for reports and logs only: each
    client's DP-SGD steps and its spend use its own."""

    mode: str
    sigma: float
    clip: float
    delta: float
    accountant: str
    planned_epsilon: float  # what the configured run spends in the worst case (the budget's check)
    target_epsilon: float | None = None  # privacy.epsilon, if given
    sample_rate: float = 0.0  # client mode
    sample_rates: tuple[tuple[str, float], ...] = ()  # sample mode: (client id, B / n_i)
    sample_steps: tuple[tuple[str, int], ...] = ()  # sample mode: (client id, its local optimizer steps per round)
    sample_sigmas: tuple[tuple[str, float], ...] = ()  # sample mode: (client id, its noise multiplier)

    def rate_of(self, client_id: str) -> float:
        return dict(self.sample_rates)[client_id]

    def steps_of(self, client_id: str) -> int:
        return dict(self.sample_steps)[client_id]

    def sigma_of(self, client_id: str) -> float:
        """Sample mode: client ``client_id``'s noise multiplier; ``KeyError`` for a client the plan
        does not know (never a silent fallback to another client's noise)."""
        return dict(self.sample_sigmas)[client_id]

    @property
    def sigma_min(self) -> float:
        """The smallest noise multiplier (sample mode: over the clients; client mode: ``sigma``)."""
        return min((s for _, s in self.sample_sigmas), default=self.sigma)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode,
            "noise_multiplier": self.sigma,
            "clip": self.clip,
            "delta": self.delta,
            "accountant": self.accountant,
            "planned_epsilon": self.planned_epsilon,
        }
        if self.mode == "sample":  # the clients' range; noise_multiplier is the largest
            out["noise_multiplier_min"] = self.sigma_min
        return out


def check_privacy(cfg: Config, method: Method) -> None:
    """The config's privacy rules (no data needed); ``ValueError`` naming the key."""
    p = cfg.privacy
    validate(p.mode, p.epsilon, p.delta, p.clip, p.noise_multiplier)
    if p.mode == "none":
        return
    if cfg.train.scaffold:
        raise ValueError(
            f"train.scaffold with privacy.mode={p.mode}: SCAFFOLD's server variate is computed from every client's "
            "raw upload and sent to all clients, outside what the DP guarantee covers"
        )
    if p.mode == "sample":
        if method.needs_gradient:
            raise ValueError(
                f"privacy.mode=sample with method {method.name}: its full-weight gradient estimate "
                "(train.grad_batches) reads the client's data outside DP-SGD and cannot be privatised"
            )
        if cfg.train.gradient_checkpointing:
            raise ValueError(
                "privacy.mode=sample with train.gradient_checkpointing=true: the recomputed forward breaks the "
                "per-example gradients' hooks (silently wrong gradients); turn checkpointing off"
            )
        if cfg.train.precision == "float16":
            raise ValueError(
                "privacy.mode=sample with train.precision=float16: DP-SGD does no loss scaling; use bfloat16"
            )
        if cfg.train.packing == "flatten":
            raise ValueError(
                "privacy.mode=sample needs one example per row (per-example gradients): train.packing=flatten "
                "packs several into one; use auto or pad"
            )


def plan_noise(cfg: Config, sizes: Mapping[str, int]) -> NoisePlan | None:
    """The run's noise plan from the config and the clients' example counts (``None`` without DP);
    refuses (``ValueError`` naming the keys) a setting that would spend more than ``privacy.epsilon``
    over ``rounds.num_rounds``. Called before the model loads."""
    return _plan(
        _privacy_key(cfg.privacy),
        cfg.rounds.num_rounds,
        clients_per_round(cfg, len(sizes)),
        tuple(sorted(sizes.items())),
        _step_examples(cfg),
        tuple(sorted((cid, steps_for(cfg.train, n)) for cid, n in sizes.items())),
    )


def _privacy_key(p: PrivacyConfig) -> tuple[Any, ...]:
    return (p.mode, p.epsilon, p.delta, p.noise_multiplier, p.clip, p.accountant)


def _step_examples(cfg: Config) -> int:
    return cfg.train.batch_size * cfg.train.grad_accum


@lru_cache(maxsize=16)
def _plan(
    key: tuple[Any, ...],
    rounds: int,
    k: int,
    sizes: tuple[tuple[str, int], ...],
    batch: int,
    local_steps: tuple[tuple[str, int], ...],
) -> NoisePlan | None:
    mode, eps, delta, sigma, clip, accountant = key
    if mode == "none":
        return None
    target = eps if eps is not None else math.inf
    if mode == "client":
        q = k / len(sizes)
        if sigma is None:
            sigma = noise_multiplier_for(eps, delta, q, rounds, accountant)
        planned = check_budget(target, delta, sigma, q, rounds, accountant)
        return NoisePlan(mode, float(sigma), float(clip), float(delta), accountant, planned, eps, q)
    if min(n for _, n in sizes) <= 0:
        raise ValueError("privacy.mode=sample: a client has no training examples")
    rates = tuple((cid, min(1.0, batch / n)) for cid, n in sizes)
    steps = dict(local_steps)
    sigmas: list[tuple[str, float]] = []
    planned = 0.0
    for cid, q in rates:  # each client its own party, taking part in every round: its worst case
        total = rounds * steps[cid]
        s = float(sigma) if sigma is not None else _calibrate(eps, delta, q, total, accountant)
        planned = max(planned, _spend(target, delta, s, q, total, accountant))
        sigmas.append((cid, s))
    return NoisePlan(
        mode,
        max(s for _, s in sigmas),
        float(clip),
        float(delta),
        accountant,
        planned,
        eps,
        sample_rates=rates,
        sample_steps=local_steps,
        sample_sigmas=tuple(sigmas),
    )


@lru_cache(maxsize=4096)  # clients of equal size share (q_i, steps): one search for them all
def _calibrate(eps: float, delta: float, q: float, steps: int, accountant: str) -> float:
    return float(noise_multiplier_for(eps, delta, q, steps, accountant))


@lru_cache(maxsize=4096)
def _spend(target: float, delta: float, sigma: float, q: float, steps: int, accountant: str) -> float:
    return check_budget(target, delta, sigma, q, steps, accountant)


# ---- client side ---------------------------------------------------------------------------------
def clip_upload(
    start: Factors,
    upload: Factors,
    start_extras: Mapping[str, Tensor],
    extras: Mapping[str, Tensor],
    bound: float,
) -> tuple[Factors, dict[str, Tensor]]:
    """``start + clip_C(upload - start)`` jointly over the uploaded factors and the extras (a
    classifier head: its change from ``start_extras``), computed in float32 (the upload itself
    where it is within the bound). Factors not uploaded stay ``None``."""
    sent, origin = _flat(upload, extras), _flat(start, start_extras)
    deltas = {k: t.to(torch.float32) - origin[k].to(t.device, torch.float32) for k, t in sent.items()}
    clipped, _, scale = clip_to_norm(deltas, bound)
    if scale == 1.0:  # within the bound: sent as trained, bit for bit
        return dict(upload), dict(extras)
    out = {k: (origin[k].to(t.device, torch.float32) + clipped[k]).to(t.dtype) for k, t in sent.items()}
    return _unflat(out, upload)


# ---- server side ---------------------------------------------------------------------------------
def _flat(factors: Factors, extras: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {f"factor/{m}/{w}": t for m, f in factors.items() for w in ("A", "B") if (t := f.get(w)) is not None}
    out.update({f"extra/{k}": t for k, t in extras.items()})
    return out


def _unflat(flat: Mapping[str, Tensor], like: Factors) -> tuple[Factors, dict[str, Tensor]]:
    factors = {
        m: ModuleFactors(
            A=flat.get(f"factor/{m}/A") if f.A is not None else None,
            B=flat.get(f"factor/{m}/B") if f.B is not None else None,
        )
        for m, f in like.items()
    }
    extras = {k[len("extra/") :]: t for k, t in flat.items() if k.startswith("extra/")}
    return factors, extras


def private_aggregate(
    method: Method,
    state: GlobalState,
    uploads: Sequence[ClientUpload],
    extras: Sequence[Mapping[str, Tensor]],
    plan: NoisePlan,
    seed: int,
) -> tuple[RoundResult, dict[str, Tensor]]:
    """Client-level DP's server step (the module docstring): the round's result and the noised
    mean of the clients' extras (``{}`` without extras). Uniform weights; noise from
    ``(seed, "client-dp", round)`` (central) or ``(seed, "client-dp", round, client)`` (per upload)."""
    m = len(uploads)
    t = state.round
    flats = [_flat(u.factors, e) for u, e in zip(uploads, extras)]
    if method.sum_only(t):
        mean = {k: weighted_mean([f[k] for f in flats], [1.0 / m] * m) for k in flats[0]}
        noise = gaussian_noise(mean, plan.sigma * plan.clip / m, seeded_generator(seed, "client-dp", t))
        noised = {k: (mean[k] + noise[k]).to(flats[0][k].dtype) for k in mean}
        factors, mean_extras = _unflat(noised, uploads[0].factors)
        result = method.aggregate(state, [ClientUpload("noised-mean", factors, 1)], [1.0])
    else:
        noised_uploads, noised_extras = [], []
        for u, f in zip(uploads, flats):
            noise = gaussian_noise(f, plan.sigma * plan.clip, seeded_generator(seed, "client-dp", t, u.client_id))
            noised = {k: (v.to(torch.float32) + noise[k].to(torch.float32)).to(v.dtype) for k, v in f.items()}
            factors, ex = _unflat(noised, u.factors)
            noised_uploads.append(replace(u, factors=factors))
            noised_extras.append(ex)
        result = method.aggregate(state, noised_uploads, [1.0] * m)
        first = noised_extras[0]
        mean_extras = {k: weighted_mean([e[k] for e in noised_extras], [1.0 / m] * m).to(first[k].dtype) for k in first}
    return replace(result, bytes_up=sum(u.nbytes() for u in uploads)), mean_extras


def record_round(ledger: PrivacyLedger, plan: NoisePlan, trained: Mapping[str, Mapping[str, Any]]) -> None:
    """Add one round's DP steps: client mode, one step at ``q = k/N``; sample mode, each client that
    trained (``trained``: its stats, ``steps`` taken) its steps at its own ``B / n_i`` and its own
    noise multiplier."""
    if plan.mode == "client":
        ledger.record(CLIENT_PARTY, plan.sigma, plan.sample_rate, 1)
        return
    for cid, stats in trained.items():
        ledger.record(cid, plan.sigma_of(cid), plan.rate_of(cid), int(stats.get("steps", 0)))


def check_resumed_budget(ledger: PrivacyLedger, plan: NoisePlan, rounds_done: int, num_rounds: int) -> None:
    """At a resume: what was spent plus the remaining rounds at today's plan must stay within
    ``privacy.epsilon`` (a run resumed with more rounds recalibrates sigma, each client's in
    sample mode, for the new total,
    but its first rounds ran at the old one). ``ValueError`` naming the keys."""
    target = plan.target_epsilon
    if target is None or rounds_done >= num_rounds:
        return
    left = num_rounds - rounds_done
    projected = PrivacyLedger.from_dict(ledger.to_dict())
    if plan.mode == "client":
        projected.record(CLIENT_PARTY, plan.sigma, plan.sample_rate, left)
    else:
        for cid, q in plan.sample_rates:  # every client, in every remaining round, at its own sigma
            projected.record(cid, plan.sigma_of(cid), q, left * plan.steps_of(cid))
    spent = projected.epsilon(plan.delta)
    if spent > target:
        raise ValueError(
            f"resuming to rounds.num_rounds={num_rounds} would spend epsilon={spent:.4g} > privacy.epsilon={target}: "
            f"the {rounds_done} rounds done ran at the noise planned for their run; keep rounds.num_rounds, raise "
            "privacy.epsilon, or set privacy.noise_multiplier for the remaining rounds"
        )


def spend_report(ledger: PrivacyLedger, plan: NoisePlan) -> dict[str, Any]:
    """What metrics.jsonl and the summary say about the spend so far: the run's epsilon (the
    largest party's) and, in sample mode, each client's that has trained (``epsilon_per_client``)."""
    per_party = ledger.epsilons(plan.delta)
    out = {"epsilon": max(per_party.values(), default=0.0), **plan.report()}
    if plan.mode == "sample":
        out["epsilon_per_client"] = dict(sorted(per_party.items()))
    return out
