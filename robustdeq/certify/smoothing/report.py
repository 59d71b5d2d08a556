"""Results of randomized-smoothing certification: one :class:`SmoothingResult` per input,
:func:`summarize` (certified accuracy at radii, abstain rate, timing) and :class:`SmoothingReport`
(JSON, Markdown, plot)."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ...errors import InputError
from .config import ABSTAIN, DEFAULT_RADII, PLOT_FILE, SCHEMA


@dataclass
class SmoothingResult:
    """The smoothed certificate of one input.

    prediction: the certified class, or ABSTAIN (-1); radius: certified L2 radius (0 when
    abstaining); p_lower: the lower bound on p_A used; count / n: estimation count of the
    selected class; selected: the class chosen on the selection samples; correct: prediction ==
    label (None without labels); seconds: wall time for this input; f_evals: evaluations of the
    cell per noise sample (DEQs: the solver's per-sample steps); srs: for SRS, the correction's
    ingredients (checked, disagree, agree, gained, d_upper, p_lower_uncorrected,
    radius_uncorrected, warm_fraction); cell_evals: rows passed through the cell per noise sample
    (DEQs: what was computed -- a batched solve evaluates every row of the batch until its last
    row stops, and the read-out may evaluate the cell once more); decisions: sequential mode, per
    requested radius "certified", "not certified" or "undecided" (budget spent); proof: proven warm
    starts, the rows whose warm-started iteration was proven (proven_warm), proven from the model's
    initial state or after being solved on (proven_cold), solved on to a strict tolerance after
    ``srs_steps`` iterations without a proof (tightened), and without a proven class (unproven);
    samples: noise samples drawn (selection and estimation).
    """

    index: int
    label: Optional[int]
    prediction: int
    radius: float
    p_lower: float
    count: int
    n: int
    selected: int
    correct: Optional[bool]
    seconds: float
    f_evals: Optional[float] = None
    srs: Optional[Dict[str, Any]] = None
    cell_evals: Optional[float] = None
    decisions: Optional[Dict[str, str]] = None
    proof: Optional[Dict[str, int]] = None
    samples: Optional[int] = None

    @property
    def abstained(self) -> bool:
        """Whether the smoothed classifier abstained on this input."""
        return self.prediction == ABSTAIN

    def certified_at(self, r: float) -> bool:
        """Certified (and correct when labelled) on the open L2 ball of radius ``r``; at a radius
        decided by the sequential test, its decision."""
        ok = self.correct if self.correct is not None else True
        if not ok or self.abstained:
            return False
        decided = (self.decisions or {}).get(f"{float(r):g}")
        if decided is not None:
            return decided == "certified"
        return self.radius > r


def _frac(vals) -> Optional[float]:
    vals = list(vals)
    return float(sum(bool(v) for v in vals)) / len(vals) if vals else None


def summarize(results: Sequence[SmoothingResult], radii: Sequence[float]) -> Dict[str, Any]:
    """Certified accuracy (fraction certified when unlabelled) at ``radii``, abstain rate, timing."""
    n = len(results)
    if not n:
        return {"n": 0}
    labelled = all(r.correct is not None for r in results)
    key = "certified_accuracy" if labelled else "certified_fraction"
    out: Dict[str, Any] = {
        "n": n, "labelled": labelled,
        key: {f"{float(r):g}": _frac(s.certified_at(r) for s in results) for r in radii},
        "abstain_rate": _frac(s.abstained for s in results),
        "smoothed_accuracy": _frac(s.correct and not s.abstained for s in results) if labelled else None,
        "mean_radius": sum(s.radius for s in results) / n,
        "time_per_image_s": sum(s.seconds for s in results) / n,
    }
    fe = [s.f_evals for s in results if s.f_evals is not None]
    out["f_evals_per_noise_sample"] = sum(fe) / len(fe) if fe else None
    ce = [s.cell_evals for s in results if s.cell_evals is not None]
    out["cell_evals_per_noise_sample"] = sum(ce) / len(ce) if ce else None
    sp = [s.samples for s in results if s.samples is not None]
    out["samples_per_image"] = sum(sp) / len(sp) if sp else None
    pr = [s.proof for s in results if s.proof]
    if pr:
        tot = {k: sum(p.get(k, 0) for p in pr) for k in pr[0]}
        rows = sum(tot.get(k, 0) for k in ("proven_warm", "proven_cold", "unproven"))   # every row once
        out["proof"] = {**tot, "proven_warm_fraction": tot.get("proven_warm", 0) / max(rows, 1)}
    srs = [s.srs for s in results if s.srs]
    if srs:
        chk = sum(s["checked"] for s in srs)
        out["srs"] = {
            "checked": chk,
            "checked_per_input": chk / len(srs),
            "disagreement_rate": sum(s["disagree"] for s in srs) / max(chk, 1),
            "gained_rate": sum(s.get("gained", 0) for s in srs) / max(chk, 1),
            "certified_accuracy_uncorrected" if labelled else "certified_fraction_uncorrected": {
                f"{float(r):g}": _frac((s.selected == s.label if s.label is not None else True)
                                       and s.srs["radius_uncorrected"] > r for s in results) for r in radii},
            "mean_radius_uncorrected": sum(s["radius_uncorrected"] for s in srs) / len(srs),
            "warm_fraction": sum(s["warm_fraction"] for s in srs) / len(srs),
        }
    return out


def _json_safe(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, Mapping):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o


@dataclass
class SmoothingReport:
    """Smoothed certificates of one model on a batch of inputs (JSON, Markdown, plot)."""

    config: Dict[str, Any]
    results: List[SmoothingResult]
    summary: Dict[str, Any]
    model: Dict[str, Any] = field(default_factory=dict)
    provenance: Dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA

    @property
    def radii(self) -> List[float]:
        """The radii the report was asked about (the config's, else the default radii)."""
        return [float(r) for r in self.config.get("radii", DEFAULT_RADII)]

    def radius(self) -> Tensor:
        """(N,) certified radii (0 where abstaining or wrong is NOT applied: the raw radius)."""
        return torch.tensor([r.radius for r in self.results], dtype=torch.float64)

    def prediction(self) -> Tensor:
        """(N,) int64 predictions of the smoothed classifier (-1 where it abstained)."""
        return torch.tensor([r.prediction for r in self.results], dtype=torch.long)

    def certified_accuracy(self, r: float) -> float:
        """Fraction of inputs certified (and correct when labelled) at L2 radius ``r``
        (:meth:`SmoothingResult.certified_at`); 0.0 for an empty report."""
        return _frac(s.certified_at(r) for s in self.results) or 0.0

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The report as a JSON-ready dict (non-finite floats as None)."""
        return _json_safe({"schema": self.schema, "kind": "randomized_smoothing", "model": self.model,
                           "config": self.config, "summary": self.summary, "provenance": self.provenance,
                           "results": [dataclasses.asdict(r) for r in self.results]})

    def to_json(self, indent: Optional[int] = 2) -> str:
        """The report as strict JSON text (:meth:`to_dict`), indented by ``indent``."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "SmoothingReport":
        """The report of a dict written by :meth:`to_dict`.

        Raises:
            InputError: ``d`` is not a mapping of this schema, has an unknown field, or holds
                malformed per-input results.
        """
        if not isinstance(d, Mapping) or d.get("schema") != SCHEMA:
            raise InputError(f"not a robustdeq smoothing certificate (schema "
                             f"{d.get('schema') if isinstance(d, Mapping) else None!r}, expected {SCHEMA!r})")
        known = {"schema", "kind", "model", "config", "summary", "provenance", "results"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown smoothing-report field(s): {unknown}")
        try:
            results = [SmoothingResult(**r) for r in d["results"]]
        except TypeError as e:
            raise InputError(f"malformed smoothing results: {e}") from None
        return SmoothingReport(config=dict(d["config"]), results=results, summary=dict(d["summary"]),
                               model=dict(d.get("model") or {}), provenance=dict(d.get("provenance") or {}))

    @staticmethod
    def load(path) -> "SmoothingReport":
        """The report saved at ``path``: a ``certificate.json`` file, or a directory holding one
        (:meth:`save`); an ``InputError`` if there is none."""
        p = Path(path)
        if p.is_dir():
            p = p / "certificate.json"
        if not p.is_file():
            raise InputError(f"no smoothing certificate at {p}")
        return SmoothingReport.from_dict(json.loads(p.read_text()))

    def save(self, out_dir, *, plot: bool = True) -> Dict[str, str]:
        """Write ``certificate.json``, ``certificate.md`` and (``plot``) ``certified_accuracy.png``."""
        from ..report import write_certificate_files
        paths = write_certificate_files(out_dir, self.to_json(), self.to_markdown())
        if plot:
            paths["plot"] = self.plot(Path(out_dir) / PLOT_FILE)
        return paths

    # -- people -----------------------------------------------------------------------------------
    def _acc_key(self) -> str:
        return "certified_accuracy" if "certified_accuracy" in self.summary else "certified_fraction"

    def brief(self) -> str:
        """A few lines for a terminal: the settings, certified accuracy at the radii, the abstain
        rate and the time per image."""
        s, c = self.summary, self.config
        mode = f"SRS, {c['srs_steps']} solver steps per warm batch" if c.get("srs_steps") else "independent solves"
        if c.get("mode", "fixed") != "fixed":
            mode += f"; {c['mode']} mode, budget n"
        acc = s.get(self._acc_key(), {})
        lines = [f"randomized smoothing (sigma {c['sigma']:g}, n0 {c['n0']}, n {c['n']}, alpha {c['alpha']:g}; "
                 f"{mode}) on {s.get('n')} inputs:",
                 "  " + ", ".join(f"{self._acc_key().replace('_', ' ')}@{r} {_pct(v)}" for r, v in acc.items()),
                 f"  abstain rate {_pct(s.get('abstain_rate'))}; {s.get('time_per_image_s', 0.0):.3f} s per image"
                 + (f", {s['samples_per_image']:.0f} noise samples per image" if s.get("samples_per_image") else "")]
        if s.get("srs"):
            lines.append(f"  SRS check: {s['srs']['checked']} samples re-solved, disagreement rate "
                         f"{s['srs']['disagreement_rate']:.4f}")
        return "\n".join(lines)

    def to_markdown(self, max_rows: int = 20) -> str:
        """The report in Markdown: the method and its settings, the summary table and the first
        ``max_rows`` per-input results."""
        s, c = self.summary, self.config
        name = self.model.get("name") or self.model.get("class", "model")
        acc = s.get(self._acc_key(), {})
        L = [f"# Randomized-smoothing certificate: {name}", ""]
        L.append(f"Gaussian smoothing (Cohen, Rosenfeld, Kolter 2019), sigma = {c['sigma']:g}, "
                 f"n0 = {c['n0']}, n = {c['n']}, alpha = {c['alpha']:g}, batch {c['batch_size']}"
                 + (", inputs clipped to [0, 1]" if c.get("clip") else "") + ".")
        mode = c.get("mode", "fixed")
        if mode != "fixed":
            L.append(("Anytime-valid sequential decisions at the radii" if mode == "sequential" else
                      f"Anytime-valid largest radius (tolerance {c.get('tolerance', 0):g})")
                     + f" from a confidence sequence (beta-binomial mixture, Robbins 1970), n = {c['n']} "
                     f"the sample budget per input, futility level {c.get('futility_alpha', 0):g}"
                     + (f" (rule: {c['futility']})" if mode == "sequential" and c.get("futility") else "")
                     + "; alpha "
                     "holds for the whole sequential procedure.")
        if c.get("srs_steps") and c.get("srs_check") in ("proof", "auto") and s.get("proof"):
            L.append(f"Warm-started fixed-point iterations (at most {c['srs_steps']} steps, the proof checked after "
                     "each) proven per sample to have the exact equilibrium's class (contraction certificate); "
                     "the rest solved on to a strict tolerance and proven again: "
                     f"{s['proof']['proven_warm']} proven warm, {s['proof'].get('tightened', 0)} solved on, "
                     f"{s['proof']['unproven']} without a proven class.")
        elif c.get("srs_steps"):
            start = ("every noise sample from the clean input's fixed point" if c.get("srs_start") == "clean"
                     else "each batch from the previous batch's fixed points")
            checks = (f"{c['check_samples']} to {c['check_max']} random estimation samples (per input, from the "
                      f"warm-started count)" if c.get("check_max") else
                      f"{c['check_samples']} random estimation samples")
            L.append(f"Serialized randomized smoothing (Gao, Hou, Xu, Liu 2024): warm-started solves with "
                     f"{c['srs_steps']} solver steps, {start}; {checks} re-solved "
                     f"from scratch; failure probability split {c['check_alpha_fraction']:g} / "
                     f"{1 - c['check_alpha_fraction']:g} between the agreement and the binomial bound.")
        L += ["", "The radii certify the smoothed classifier g(x) = argmax_c P(f(x + e) = c), not the base model; "
              f"each holds with probability >= {1 - c['alpha']:g} over the noise.", "",
              "| inputs | " + " | ".join(f"{'cert acc' if 'accuracy' in self._acc_key() else 'cert frac'} L2@{r}"
                                         for r in acc) + " | abstain | time / image (s) | samples / image"
              " | f evals / noise sample |",
              "|" + "---|" * (len(acc) + 5),
              f"| {s.get('n')} | " + " | ".join(_pct(v) for v in acc.values())
              + f" | {_pct(s.get('abstain_rate'))} | {s.get('time_per_image_s', 0.0):.4f} | "
              + (f"{s['samples_per_image']:.0f}" if s.get("samples_per_image") is not None else "n/a") + " | "
              + (f"{s['f_evals_per_noise_sample']:.2f}" if s.get("f_evals_per_noise_sample") is not None else "n/a")
              + " |", ""]
        srs = s.get("srs")
        if srs:
            unc = srs.get("certified_accuracy_uncorrected") or srs.get("certified_fraction_uncorrected") or {}
            L += ["Without the correlation correction (not a valid certificate, for comparison): "
                  + ", ".join(f"L2@{r} {_pct(v)}" for r, v in unc.items())
                  + f"; disagreement rate on the checked samples {srs['disagreement_rate']:.4f}; "
                  f"warm-started share {srs['warm_fraction']:.3f}.", ""]
        if self.results:
            L += ["## Inputs", "", "| # | label | prediction | radius | p_lower | count / n | seconds | decisions |",
                  "|---|---|---|---|---|---|---|---|"]
            for r in self.results[:max_rows]:
                pred = "abstain" if r.abstained else str(r.prediction)
                dec = ", ".join(f"{k}: {v}" for k, v in sorted((r.decisions or {}).items(), key=lambda kv: float(kv[0])))
                L.append(f"| {r.index} | {r.label} | {pred} | {r.radius:.4f} | {r.p_lower:.4f} | "
                         f"{r.count} / {r.n} | {r.seconds:.3f} | {dec} |")
            if len(self.results) > max_rows:
                L.append(f"| ... | {len(self.results) - max_rows} more in certificate.json | | | | | | |")
            L.append("")
        return "\n".join(L)

    def plot(self, path) -> str:
        """Certified accuracy against the L2 radius (PNG, matplotlib's Agg canvas)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        radii = [r.radius for r in self.results]
        top = max(max(radii, default=0.0), max(self.radii, default=0.0), 1e-3) * 1.05
        grid = [top * i / 400 for i in range(401)]
        acc = [self.certified_accuracy(g) for g in grid]
        fig = Figure(figsize=(5, 3.5), tight_layout=True)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        label = f"sigma={self.config['sigma']:g}" + (f", SRS S={self.config['srs_steps']}"
                                                      if self.config.get("srs_steps") else "")
        ax.plot(grid, acc, lw=2, label=label)
        ax.set_xlabel("L2 radius")
        ax.set_ylabel("certified accuracy" if "accuracy" in self._acc_key() else "certified fraction")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=100)
        return str(p)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f}%"
