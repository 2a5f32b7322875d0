"""Auxiliary denoiser calls: forwards a guidance runs for itself (A-STAR's gradient pass).

Other guidances attached to the same model pass such calls straight through: they count no step
and add no branch, so that several methods compose in one pipeline call.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

_AUXILIARY = ContextVar("attnsteer_auxiliary_call", default=False)


@contextmanager
def auxiliary_call():
    """Mark the denoiser calls of a ``with`` block as auxiliary."""
    token = _AUXILIARY.set(True)
    try:
        yield
    finally:
        _AUXILIARY.reset(token)


def in_auxiliary_call() -> bool:
    return _AUXILIARY.get()
