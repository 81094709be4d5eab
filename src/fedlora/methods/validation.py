"""Checking client uploads before they reach a method: every problem is named precisely.

An upload is rejected (``InvalidUpdate``, naming the client, the module and the problem) when
a module is missing or unexpected, a factor the method needs is absent, a shape does not fit
the module, the rank differs from the global rank (for methods without heterogeneous ranks),
or a value is NaN/Inf. Runtimes drop rejected clients and go on; offline aggregation stops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from fedlora.methods.base import ClientUpload, GlobalState, Method


class InvalidUpdate(ValueError):
    """A client update that cannot be aggregated."""

    def __init__(self, client_id: str, module: str | None, problem: str) -> None:
        self.client_id, self.module, self.problem = client_id, module, problem
        where = f"client {client_id}" + (f", module {module}" if module else "")
        super().__init__(f"{where}: {problem}")


@dataclass
class Screening:
    """Uploads that passed, and the rejections with their reasons."""

    accepted: list[ClientUpload]
    rejected: list[InvalidUpdate]


def check_upload(upload: ClientUpload, state: GlobalState, method: Method, rank: int | None = None) -> None:
    """Raise :class:`InvalidUpdate` for the first problem of ``upload``; ``rank`` is the client's
    own rank where the method allows heterogeneous ranks (default: the global rank)."""
    cid = upload.client_id
    if upload.num_examples is None or upload.num_examples < 0:
        raise InvalidUpdate(cid, None, f"num_examples must be a non-negative count, got {upload.num_examples}")
    if not math.isfinite(upload.step_size) or upload.step_size < 0:
        raise InvalidUpdate(cid, None, f"step_size must be a finite non-negative number, got {upload.step_size}")
    expected = state.shapes()
    missing = sorted(set(expected) - set(upload.factors))
    extra = sorted(set(upload.factors) - set(expected))
    if missing:
        raise InvalidUpdate(cid, missing[0], f"module missing from the update ({len(missing)} missing in all)")
    if extra:
        raise InvalidUpdate(cid, extra[0], f"unexpected module, not adapted in the global model ({len(extra)} in all)")
    needed = method.uploaded_factors(state)
    want_rank = rank if rank is not None else state.spec.rank
    for m, (d_out, d_in) in expected.items():
        f = upload.factors[m]
        seen_rank = None
        for name in sorted(needed):
            t = f.get(name)
            if t is None:
                raise InvalidUpdate(
                    cid, m, f"factor {name} is missing ({method.name} needs {', '.join(sorted(needed))})"
                )
            if t.ndim != 2:
                raise InvalidUpdate(cid, m, f"factor {name} has {t.ndim} dimensions, expected 2")
            r = int(t.shape[0] if name == "A" else t.shape[1])
            fixed = int(t.shape[1] if name == "A" else t.shape[0])
            want_fixed = d_in if name == "A" else d_out
            if fixed != want_fixed:
                shape = f"({r}, {want_fixed})" if name == "A" else f"({want_fixed}, {r})"
                raise InvalidUpdate(cid, m, f"factor {name} has shape {tuple(t.shape)}, expected {shape}")
            if seen_rank is not None and r != seen_rank:
                raise InvalidUpdate(cid, m, f"factor {name} has rank {r}, the other factor rank {seen_rank}")
            if (rank is not None or not method.heterogeneous_ranks) and r != want_rank:
                raise InvalidUpdate(cid, m, f"factor {name} has rank {r}, expected rank {want_rank}")
            if method.heterogeneous_ranks and not method.ranks_above_global and r > state.spec.rank:
                raise InvalidUpdate(cid, m, f"rank {r} exceeds the global rank {state.spec.rank}")
            seen_rank = r
            if not t.is_floating_point():
                raise InvalidUpdate(cid, m, f"factor {name} has dtype {t.dtype}, expected a float type")
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise InvalidUpdate(cid, m, f"factor {name} has {bad} non-finite values (NaN/Inf)")


def screen_uploads(
    uploads: Sequence[ClientUpload], state: GlobalState, method: Method, ranks: dict[str, int] | None = None
) -> Screening:
    """Split uploads into accepted and rejected (with reasons); never raises for bad uploads."""
    accepted, rejected = [], []
    for u in uploads:
        try:
            check_upload(u, state, method, (ranks or {}).get(u.client_id))
        except InvalidUpdate as err:
            rejected.append(err)
        else:
            accepted.append(u)
    return Screening(accepted, rejected)
