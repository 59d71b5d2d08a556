"""Bridges to DEQ models built with other libraries.

:func:`robustdeq.interop.torchdeq.adopt` (also ``robustdeq.adopt``) moves a model built with
TorchDEQ (Geng & Kolter 2023) onto robustdeq's solvers, gradients and statistics. TorchDEQ is an
optional dependency (``pip install 'robustdeq[torchdeq]'``) imported only when ``adopt`` is called.
"""
from __future__ import annotations

__all__ = ["torchdeq"]
