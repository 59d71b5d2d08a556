"""``CertResult`` (one per sample) and ``CertReport`` (JSON, Markdown, save/load).

JSON is versioned (``schema``); non-finite floats are written as the strings ``"inf"``,
``"-inf"``, ``"nan"`` so the file is strict JSON, and read back as floats.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..errors import ConfigError

SCHEMA = "robustdeq.certify/1"


def _enc(o: Any) -> Any:
    if isinstance(o, float):
        if math.isnan(o):
            return "nan"
        if math.isinf(o):
            return "inf" if o > 0 else "-inf"
        return o
    if isinstance(o, dict):
        return {str(k): _enc(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_enc(v) for v in o]
    if hasattr(o, "item") and callable(o.item):  # numpy / torch scalars
        return _enc(o.item())
    return o


def _dec(o: Any) -> Any:
    if isinstance(o, str) and o in ("inf", "-inf", "nan"):
        return float(o)
    if isinstance(o, dict):
        return {k: _dec(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_dec(v) for v in o]
    return o


@dataclass
class CertResult:
    """The certificate of one sample.

    stable: a stability certificate holds for this sample (``details["stability_basis"]`` says
        which: global contraction, local spectral radius < 1 at z*, Lyapunov decrease);
    bound: the upper bound on the L2 Lipschitz constant of ``x -> logits`` used (None if none);
    radius: certified L2 radius w.r.t. the label (0: not certified);
    method: how stability and the radius were obtained;
    details: everything else (label, prediction, margins, residual, rho, sigma, Linf/IBP, ...).
    """

    stable: bool
    bound: Optional[float]
    radius: float
    method: str
    details: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The result as a JSON-ready dict (non-finite floats as strings)."""
        return _enc({"stable": bool(self.stable), "bound": self.bound, "radius": float(self.radius),
                     "method": self.method, "details": self.details})

    @staticmethod
    def from_dict(d: dict) -> "CertResult":
        """The result of a dict written by :meth:`to_dict`; a ``ConfigError`` for an unknown
        field."""
        d = _dec(d)
        unknown = set(d) - {"stable", "bound", "radius", "method", "details"}
        if unknown:
            raise ConfigError(f"unknown CertResult field(s): {sorted(unknown)}")
        return CertResult(stable=bool(d["stable"]), bound=d.get("bound"), radius=float(d["radius"]),
                          method=str(d["method"]), details=dict(d.get("details") or {}))


def _eps_key(e: float) -> str:
    return f"{float(e):g}"


def summarize(results: Sequence[CertResult], eps_l2: Sequence[float], eps_linf: Sequence[float]) -> dict:
    """Aggregate per-sample certificates (fractions over all samples)."""
    n = len(results)
    if n == 0:
        return {"n": 0}
    labeled = [r for r in results if r.details.get("correct") is not None]
    correct = [bool(r.details.get("correct")) for r in labeled]

    def frac(vals):
        vals = list(vals)
        return float(sum(vals)) / len(vals) if vals else None

    out = {
        "n": n,
        "labeled": len(labeled) == n,
        "clean_accuracy": frac(correct) if labeled else None,
        "stable_fraction": frac(r.stable for r in results),
        "mean_radius": sum(r.radius for r in results) / n,
        "median_radius": sorted(r.radius for r in results)[n // 2],
    }
    cr = [r.radius for r in labeled if r.details.get("correct")]
    out["mean_radius_correct"] = sum(cr) / len(cr) if cr else None
    for key in ("contraction", "local", "local_contractive", "lyapunov"):
        vals = [r.details.get("stability", {}).get(key) for r in results]
        vals = [v for v in vals if v is not None]
        out[f"{key}_fraction"] = frac(vals) if vals else None
    ok = (lambda r: bool(r.details.get("correct"))) if len(labeled) == n else (lambda r: True)
    out["certified_accuracy_l2" if len(labeled) == n else "certified_fraction_l2"] = {
        _eps_key(e): frac(ok(r) and r.radius > e for r in results) for e in eps_l2}
    if eps_linf:
        lin = {}
        for e in eps_linf:
            k = _eps_key(e)
            vals = [r.details.get("linf", {}).get(k, {}).get("certified") for r in results]
            lin[k] = None if any(v is None for v in vals) else frac(ok(r) and v for r, v in zip(results, vals))
        out["certified_accuracy_linf" if len(labeled) == n else "certified_fraction_linf"] = lin
        out["ibp_certified_linf"] = {  # by the interval bounds alone (not via the L2 radius)
            _eps_key(e): frac(ok(r) and bool(r.details.get("linf", {}).get(_eps_key(e), {}).get("ibp"))
                              for r in results) for e in eps_linf}
    return out


def write_certificate_files(out_dir, json_text: str, markdown: str) -> Dict[str, str]:
    """``certificate.json`` (written atomically) and ``certificate.md`` in ``out_dir``."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    pj, pm = d / "certificate.json", d / "certificate.md"
    tmp = d / ".certificate.json.tmp"
    tmp.write_text(json_text)
    os.replace(tmp, pj)
    pm.write_text(markdown)
    return {"json": str(pj), "markdown": str(pm)}


@dataclass
class CertReport:
    """All certificates of one model on one batch of inputs."""

    model: Dict[str, Any]
    settings: Dict[str, Any]
    global_certificates: Dict[str, Any]
    results: List[CertResult]
    summary: Dict[str, Any]
    timing: Dict[str, Any] = field(default_factory=dict)
    provenance: Dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The report as a JSON-ready dict (non-finite floats as strings, see the module)."""
        return _enc({"schema": self.schema, "model": self.model, "settings": self.settings,
                     "global_certificates": self.global_certificates, "summary": self.summary,
                     "timing": self.timing, "provenance": self.provenance,
                     "results": [r.to_dict() for r in self.results]})

    def to_json(self, indent: Optional[int] = 2) -> str:
        """The report as strict JSON text (:meth:`to_dict`), indented by ``indent``."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @staticmethod
    def from_dict(d: dict) -> "CertReport":
        """The report of a dict written by :meth:`to_dict`.

        Raises:
            ConfigError: ``d`` is not a dict of this schema (``robustdeq.certify/1``) or has an
                unknown field.
        """
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise ConfigError(f"not a robustdeq certificate report (schema {d.get('schema') if isinstance(d, dict) else None!r}, "
                              f"expected {SCHEMA!r})")
        known = {"schema", "model", "settings", "global_certificates", "summary", "timing", "provenance", "results"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown CertReport field(s): {sorted(unknown)}")
        d = _dec(d)
        return CertReport(model=d["model"], settings=d["settings"],
                          global_certificates=d["global_certificates"],
                          results=[CertResult.from_dict(r) for r in d["results"]],
                          summary=d["summary"], timing=d.get("timing", {}),
                          provenance=d.get("provenance", {}), schema=d["schema"])

    @staticmethod
    def from_json(text: str) -> "CertReport":
        """The report of JSON text written by :meth:`to_json` (see :meth:`from_dict`)."""
        return CertReport.from_dict(json.loads(text))

    @staticmethod
    def load(path) -> "CertReport":
        """The report saved at ``path``: a ``certificate.json`` file, or a directory holding one
        (:meth:`save`)."""
        p = Path(path)
        if p.is_dir():
            p = p / "certificate.json"
        return CertReport.from_json(p.read_text())

    def save(self, out_dir) -> Dict[str, str]:
        """Write ``certificate.json`` and ``certificate.md`` into ``out_dir``; returns the paths."""
        return write_certificate_files(out_dir, self.to_json(), self.to_markdown())

    # -- people -----------------------------------------------------------------------------------
    def brief(self) -> str:
        """A few lines for a terminal (``robustdeq demo`` / ``robustdeq certify``)."""
        s, g = self.summary, self.global_certificates
        c = g.get("contraction", {})
        lp = g.get("lipschitz") or {}
        lines = [f"certificate of {self.model.get('name') or self.model.get('class')} "
                 f"({self.model.get('cell')}) on {s.get('n')} samples:"]
        lines.append("  contraction: " + ("certified, " if c.get("certified") else "not certified, ")
                     + str(c.get("reason")))
        if lp:
            lines.append(f"  Lipschitz(x -> logits) <= {lp['lip_logits']:.4g} ({lp.get('method')})"
                         if lp.get("available") else f"  no certified radius: {lp.get('reason')}")
        lines.append(f"  stable: {_fmt(s.get('stable_fraction'))}"
                     + "".join(f", {k.replace('_fraction', '')} {_fmt(s[k])}" for k in
                               ("contraction_fraction", "local_fraction", "lyapunov_fraction")
                               if s.get(k) is not None))
        acc_key = "certified_accuracy_l2" if "certified_accuracy_l2" in s else "certified_fraction_l2"
        if s.get("clean_accuracy") is not None:
            lines.append(f"  clean accuracy {_fmt(s['clean_accuracy'])}")
        lines.append(f"  mean certified L2 radius {_fmt(s.get('mean_radius'), 4)}; "
                     + ", ".join(f"{acc_key.replace('_', ' ')}@{e} {_fmt(v)}" for e, v in s.get(acc_key, {}).items()))
        lin_key = "certified_accuracy_linf" if "certified_accuracy_linf" in s else "certified_fraction_linf"
        if s.get(lin_key):
            lines.append("  " + ", ".join(f"{lin_key.replace('_', ' ')}@{e} {_fmt(v)}" for e, v in s[lin_key].items()))
        lines.append(f"  {1000 * float(self.timing.get('per_sample_s', 0.0)):.2f} ms per sample")
        return "\n".join(lines)

    def to_markdown(self, max_rows: int = 20) -> str:
        """The report in Markdown: the global certificates, the summary table, what is a bound
        and what an estimate, and the first ``max_rows`` per-sample results."""
        s, g = self.summary, self.global_certificates
        name = self.model.get("name") or self.model.get("class", "model")
        L = [f"# Certificate report: {name}", ""]
        L.append(f"Cell `{self.model.get('cell')}`, {s.get('n', 0)} samples, "
                 f"certification in {self.settings.get('dtype', 'float64')}.")
        L += ["", "## Global certificates", ""]
        c = g.get("contraction")
        if c:
            status = "**certified**" if c.get("certified") else "not certified"
            L.append(f"- Contraction (existence, uniqueness, convergence): {status} — {c.get('reason')}")
            if c.get("lip_z") is not None:
                L.append(f"  - Lip_z(f) <= {c['lip_z']:.6g} ({c.get('method')}"
                         f"{', exact' if c.get('exact') else ''})")
            if c.get("monotone_m") is not None:
                L.append(f"  - monotone: I - W >= {c['monotone_m']:.6g} I")
            for sname, claim in (c.get("solvers") or {}).items():
                L.append(f"  - `{sname}`: {claim}")
            ms = (c.get("details") or {}).get("model_solver")
            if ms:
                L.append(f"  - this model's solver: {ms}")
        lp = g.get("lipschitz")
        if lp:
            if lp.get("available"):
                L.append(f"- Lipschitz ({lp.get('method')}): Lip(x -> z*) <= {lp['lip_x_z']:.6g}, "
                         f"Lip(x -> logits) <= {lp['lip_logits']:.6g}"
                         f"{' (exact)' if lp.get('exact') else ''}")
                L.append("  - certified L2 radius per sample: min over classes j of the margin lower "
                         "bound divided by a bound on Lip(logit_y - logit_j) (per-pair bound)")
            else:
                L.append(f"- Lipschitz: not available — {lp.get('reason')}")
        lo = g.get("local")
        if lo:
            L.append(f"- Local stability at z*: {lo.get('note')}")
        ib = g.get("ibp")
        if ib:
            L.append(f"- IBP (Linf): {ib}")
        hk = g.get("hooks")
        if hk:
            where = [f"`{k or self.model.get('class', 'model')}`" for k in (hk.get("modules") or {})]
            where += list(hk.get("global") or [])
            L.append(f"- Forward hooks ({', '.join(where)}): {hk.get('note')}")
        L += ["", "## Summary", ""]
        acc_key = "certified_accuracy_l2" if "certified_accuracy_l2" in s else "certified_fraction_l2"
        l2 = s.get(acc_key, {})
        lin_key = "certified_accuracy_linf" if "certified_accuracy_linf" in s else "certified_fraction_linf"
        linf = s.get(lin_key, {}) or {}
        head = ["samples", "clean acc", "stable", "mean L2 radius"] + \
               [f"{'cert acc' if 'accuracy' in acc_key else 'cert frac'} L2@{e}" for e in l2] + \
               [f"cert acc Linf@{e}" for e in linf] + ["time / sample (s)"]
        row = [str(s.get("n")), _fmt(s.get("clean_accuracy")), _fmt(s.get("stable_fraction")),
               _fmt(s.get("mean_radius"), 4)] + [_fmt(v) for v in l2.values()] + \
              [_fmt(v) for v in linf.values()] + [_fmt(self.timing.get("per_sample_s"), 4)]
        L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |", ""]
        parts = [f"{k.replace('_fraction', '')}: {_fmt(s.get(k))}" for k in
                 ("contraction_fraction", "local_fraction", "local_contractive_fraction", "lyapunov_fraction")
                 if s.get(k) is not None]
        if parts:
            L += ["Stability by basis (fraction of samples): " + ", ".join(parts) + ".", ""]
        notes = self.settings.get("notes") or []
        if notes:
            L += ["## What is a bound and what is an estimate", ""] + [f"- {n}" for n in notes] + [""]
        if self.results:
            L += ["## Samples", "", "| # | label | pred | stable | radius | rho(J) | ‖J‖₂ | residual | method |",
                  "|---|---|---|---|---|---|---|---|---|"]
            for i, r in enumerate(self.results[:max_rows]):
                d = r.details
                loc = d.get("local") or {}
                L.append(f"| {i} | {d.get('label')} | {d.get('pred')} | {'yes' if r.stable else 'no'} | "
                         f"{_fmt(r.radius, 4)} | {_fmt(loc.get('rho'), 4)} | {_fmt(loc.get('sigma'), 4)} | "
                         f"{_fmt(d.get('residual'), 2, sci=True)} | {_cell(r.method)} |")
            if len(self.results) > max_rows:
                L.append(f"| ... | {len(self.results) - max_rows} more in certificate.json | | | | | | | |")
            L.append("")
        return "\n".join(L)


def _cell(text: str) -> str:
    """Escape a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt(v, nd: int = 3, sci: bool = False) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        if sci:
            return f"{v:.{nd}e}"
        return f"{v:.{nd}f}" if math.isfinite(v) else str(v)
    return str(v)


__all__ = ["CertResult", "CertReport", "summarize", "SCHEMA"]
