"""Personalised evaluation: every client's own model on a test set with its data's mix.

For methods with client-local parts (``Method.personal_factors`` returns factors, e.g.
FedSA-LoRA: the global A with the client's own B) the global model is not the model any client
uses. At every evaluation the runtime then also evaluates, for each client that has trained at
least once, the LoRA the method says that client uses, on the client's matched test set
(:func:`fedlora.data.partition.matched_test_sets`: drawn from the held-out split, which no
client trains on, with the client's own group mix). Reported separately from the global
metrics, under ``personal`` in ``metrics.jsonl``:

* ``weighted``: ``sum_c n_c m_c / sum_c n_c`` with ``n_c`` the client's test examples (for
  metrics that are means over examples this is the pooled value over all clients' examples);
* ``unweighted``: ``mean_c m_c``, every client counting once (the usual personalised-FL number);
* ``clients`` (how many were evaluated) and ``per_client`` (each client's metrics).

Clients that have not trained yet have no personal model and are not evaluated.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping, Sequence

import torch

from fedlora.engine.client import ClientRecord
from fedlora.methods import GlobalState, Method
from fedlora.model.binding import LoRABinding


def has_personal_models(method: Method) -> bool:
    """Whether ``method`` gives clients a model of their own (:attr:`Method.has_personal_models`)."""
    return method.has_personal_models


def personal_enabled(mode: Literal["auto", "on", "off"], method: Method) -> bool:
    """``rounds.personal_eval``: ``auto`` evaluates personal models where the method has them;
    ``on`` asks for them and is an error for a method without client-local parts."""
    if mode == "off":
        return False
    if mode == "on" and not has_personal_models(method):
        raise ValueError(
            f"rounds.personal_eval=on but {method.name} keeps no client-local parts: every client "
            "uses the global model (use auto or off)"
        )
    return has_personal_models(method)


def summarise(per_client: Mapping[str, Mapping[str, float]], sizes: Mapping[str, int]) -> dict[str, Any]:
    """Weighted (by test examples) and unweighted means over clients of every metric all
    clients report (``n`` excluded; clients with an empty test set left out)."""
    clients = [c for c in per_client if sizes.get(c, 0) > 0]
    keys = [
        k
        for k in (per_client[clients[0]] if clients else {})
        if k != "n" and all(isinstance(per_client[c].get(k), (int, float)) for c in clients)
    ]
    total = sum(sizes[c] for c in clients)
    weighted = {k: math.fsum(sizes[c] * float(per_client[c][k]) for c in clients) / total for k in keys}
    unweighted = {k: math.fsum(float(per_client[c][k]) for c in clients) / len(clients) for k in keys}
    return {
        "weighted": weighted,
        "unweighted": unweighted,
        "clients": len(clients),
        "examples": total,
        "per_client": {c: dict(per_client[c]) for c in clients},
    }


def evaluate_personal(
    binding: LoRABinding,
    method: Method,
    state: GlobalState,
    records: Mapping[str, ClientRecord],
    task: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    test_sets: Mapping[str, Sequence[int]],
    extras: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Evaluate each client in ``records`` with its own model on ``examples[test_sets[c]]``.

    Leaves the client's LoRA loaded in ``binding``: callers set the factors they need next."""
    per_client: dict[str, dict[str, float]] = {}
    sizes: dict[str, int] = {}
    for cid in sorted(records, key=_client_order):
        idx = list(test_sets.get(cid, ()))
        factors = method.personal_factors(state, records[cid].memory)
        if factors is None or not idx:
            continue
        binding.set_factors(factors)
        if extras:
            binding.set_extras(dict(extras))
        binding.model.eval()
        with torch.no_grad():
            per_client[cid] = task.evaluate(binding.model, tokenizer, [examples[i] for i in idx])
        sizes[cid] = len(idx)
    return summarise(per_client, sizes) if per_client else {}


def _client_order(cid: str) -> tuple[int, str]:
    return (int(cid), "") if cid.isdigit() else (1 << 62, cid)
