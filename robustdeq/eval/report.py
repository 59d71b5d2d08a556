"""The evaluation report: dataclasses, versioned JSON, Markdown, plots and TensorBoard scalars.

JSON layout (``"schema_version": 1``)::

    {"schema_version": 1, "clean_accuracy": float, "n_samples": int, "threat": "Linf"|"L2",
     "eps": [float], "suite": str | [str], "config_hash": str,
     "clean": {"per_state": {"steps": [int], "accuracy": [float]} | null,
               "solver": {mean_steps, converged_fraction, diverged_fraction, mean_residual,
                          max_residual} | null,
               "residual_curve": [float] | null,
               "residual_running_fraction": [float] (solver models: samples still iterating),
               "residual_tolerance": {"tol", "stop_mode"} (solver models)},
     "results": [{"eps", "robust_accuracy", "seconds",
                  "attacks": [{"key", "spec", "view", "kind", "accuracy", "cumulative_accuracy",
                               "new_successes", "seconds", "describe", "resumed", "violations"}],
                  "robust": [bool] (per sample), "first_success": [str | null] (per sample;
                  "clean" for samples misclassified without attack),
                  "per_state": {"steps", "clean", "adversarial"} | null,
                  "solver": {"clean", "adversarial"} | null,
                  "residual_curve": {"clean", "adversarial"} | null}],
     "checks": [{"name", "fired", "message", "value", "threshold", "skipped", "details"}],
     "timings": {str: float}, "provenance": {...}, "notes": [str]}

Non-finite floats are written as ``null`` (strict JSON). Plots use matplotlib's Agg canvas
directly (no pyplot state); TensorBoard uses ``SummaryWriter.add_scalar`` only.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from .._support import tidy_float
from ..errors import ConfigError, InputError
from .checks import CheckResult

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
REPORT_FILE = "report.json"
MARKDOWN_FILE = "report.md"
PLOT_FILES = ("accuracy_vs_eps.png", "accuracy_vs_step.png", "residuals.png")


def _json_safe(o: Any) -> Any:
    """Plain JSON values: non-finite floats -> None, float32 noise dropped, tuples -> lists, other
    objects -> repr."""
    if isinstance(o, bool) or o is None or isinstance(o, str):
        return o
    if isinstance(o, int):
        return int(o)
    if isinstance(o, float):  # float32 values lose their noise (0.9800000190734863 -> 0.98)
        return tidy_float(o) if math.isfinite(o) else None
    if isinstance(o, Mapping):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    try:  # numpy / torch scalars
        import numbers
        if isinstance(o, numbers.Integral):
            return int(o)
        if isinstance(o, numbers.Real):
            return _json_safe(float(o))
    except Exception:  # pragma: no cover - defensive
        pass
    if hasattr(o, "item") and getattr(o, "numel", lambda: 2)() == 1:
        return _json_safe(o.item())
    if hasattr(o, "value") and isinstance(getattr(o, "value"), (str, int, float)):  # enums
        return o.value
    return repr(o)


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class AttackResult:
    """One attack unit (an attack on one target view) at one eps.

    ``accuracy``: robust accuracy under this attack alone (None in cascade mode, where the attack
    only ran on the samples earlier attacks left robust); ``cumulative_accuracy``: the worst case
    over this attack and every earlier one; ``new_successes``: samples this attack was the first
    to break; ``violations``: samples whose returned example left the threat model (they were
    projected back before judging).
    """

    key: str
    spec: str
    view: str
    kind: str
    accuracy: Optional[float]
    cumulative_accuracy: float
    new_successes: int
    seconds: float
    describe: Dict[str, Any] = field(default_factory=dict)
    resumed: bool = False
    violations: int = 0


@dataclass
class EpsResult:
    """Everything measured at one radius.

    After a fresh :func:`~robustdeq.eval.evaluate` (not on a report read back or resumed from
    disk) the attribute ``x_adv`` holds each sample's worst-case input found (the clean input
    where no attack lowered its margin); it is not serialised."""

    eps: float
    robust_accuracy: float
    attacks: List[AttackResult]
    robust: List[bool]
    first_success: List[Optional[str]]
    per_state: Optional[Dict[str, Any]] = None
    solver: Optional[Dict[str, Any]] = None
    residual_curve: Optional[Dict[str, Any]] = None
    seconds: float = 0.0

    def attack(self, key: str) -> AttackResult:
        """The result of the attack ``key`` at this radius; a ``ConfigError`` naming the
        attacks run if there is none."""
        for a in self.attacks:
            if a.key == key:
                return a
        raise ConfigError(f"no attack {key!r} at eps {self.eps:g}; have {[a.key for a in self.attacks]}")


@dataclass
class EvalReport:
    """The result of :func:`robustdeq.eval.evaluate`.

    Attributes:
        clean_accuracy: accuracy on the unperturbed inputs.
        results: one :class:`EpsResult` per eps, in the order evaluated.
        clean: clean per-state accuracy, solver statistics and residual curve (None entries for
            models without a trajectory / solver).
        checks: :class:`CheckResult` of every check run.
        timings: seconds per phase (``clean``, ``attacks``, ``trajectory``, ``checks``, ``total``).
        provenance: versions, seed, threat, suite, model configuration, attack descriptions.
        notes: what the harness decided (skipped attacks, defaults used).
    """

    clean_accuracy: float
    n_samples: int
    threat: str
    eps: List[float]
    suite: Union[str, List[str]]
    results: List[EpsResult]
    clean: Dict[str, Any] = field(default_factory=dict)
    checks: List[CheckResult] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    provenance: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    config_hash: str = ""
    schema_version: int = SCHEMA_VERSION

    # -- access ------------------------------------------------------------------------------------
    def result(self, eps: Optional[float] = None) -> EpsResult:
        """The :class:`EpsResult` at ``eps`` (may be omitted when a single eps was evaluated)."""
        if eps is None:
            if len(self.results) != 1:
                raise ConfigError(f"the report holds {len(self.results)} eps values "
                                  f"{[r.eps for r in self.results]}; pass eps=")
            return self.results[0]
        for r in self.results:
            if math.isclose(r.eps, float(eps), rel_tol=1e-9, abs_tol=1e-12):
                return r
        raise ConfigError(f"eps {eps!r} was not evaluated; evaluated: {[r.eps for r in self.results]}")

    def robust_accuracy(self, eps: Optional[float] = None) -> float:
        """Per-sample worst-case robust accuracy at ``eps``."""
        return self.result(eps).robust_accuracy

    @property
    def fired(self) -> List[str]:
        """Names of the checks that fired."""
        return [c.name for c in self.checks if c.fired]

    def check(self, name: str) -> CheckResult:
        """The result of the check ``name`` (``ConfigError`` if the report has none)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise ConfigError(f"no check {name!r} in the report; have {[c.name for c in self.checks]}")

    @property
    def bound_statement(self) -> str:
        """What the robust accuracy of this report is: an upper bound, from which attacks."""
        keys = sorted({a.key for r in self.results for a in r.attacks})
        if self._randomized():
            # every unit's examples are judged with a fresh draw of the model's randomness and a
            # sample counts as broken when any judgement misclassifies it: the worst of several
            # draws, which the model's own (single-draw or expected) accuracy can exceed even
            # with no perturbation at all
            text = (f"The model's output is random: robust accuracy is the share of samples classified "
                    f"correctly by every judgement (one random draw each) of the per-sample worst case "
                    f"over the attacks of suite {self._suite_name()} ({', '.join(keys)}). That is the "
                    "worst of several draws, not an upper bound on the model's expected robust "
                    "accuracy (it can lie below it even at a tiny radius), and judging the stored "
                    "examples again gives other numbers.")
        else:
            text = (f"Robust accuracy is an upper bound on the true robust accuracy: the per-sample worst "
                    f"case over the attacks of suite {self._suite_name()} ({', '.join(keys)}); a stronger "
                    "attack can only lower it.")
        if self.suite == "quick":
            text += (" 'quick' is the cheapest suite (gradient attacks only: PGD and APGD; "
                     "no score-based attack, so it can be optimistic at large radii): run "
                     "'standard' (adds the 5,000-query Square attack and intermediate-state "
                     "attacks) before reporting a number.")
        return text

    # -- JSON --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The report as a JSON-ready dict (versioned by ``schema_version``; non-finite floats as
        None), including the :attr:`bound_statement`."""
        d = {
            "schema_version": self.schema_version,
            "clean_accuracy": self.clean_accuracy, "n_samples": self.n_samples,
            "threat": self.threat, "eps": list(self.eps), "suite": self.suite,
            "bound": self.bound_statement,
            "config_hash": self.config_hash, "clean": self.clean,
            "results": [asdict(r) for r in self.results],
            "checks": [c.to_dict() for c in self.checks],
            "timings": self.timings, "provenance": self.provenance, "notes": list(self.notes),
        }
        return _json_safe(d)

    def to_json(self, indent: Optional[int] = 2) -> str:
        """The report as strict JSON text (:meth:`to_dict`), indented by ``indent``."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "EvalReport":
        """The report of a dict written by :meth:`to_dict`.

        Raises:
            InputError: ``d`` is not a mapping, has another ``schema_version``, lacks a required
                key or holds malformed results or checks.
        """
        if not isinstance(d, Mapping):
            raise InputError(f"a report must be a JSON object, got {type(d).__name__}")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(f"unsupported report schema_version {version!r}; this robustdeq reads "
                             f"version {SCHEMA_VERSION}")
        required = ("clean_accuracy", "n_samples", "threat", "eps", "suite", "results")
        missing = [k for k in required if k not in d]
        if missing:
            raise InputError(f"report is missing key(s): {', '.join(missing)}")
        results = []
        try:
            for r in d["results"]:
                r = dict(r)
                r["attacks"] = [AttackResult(**a) for a in r.get("attacks", [])]
                results.append(EpsResult(**r))
        except TypeError as e:
            raise InputError(f"malformed report results: {e}") from None
        try:
            checks = [CheckResult.from_dict(c) for c in d.get("checks", [])]
        except (ConfigError, KeyError, TypeError, ValueError) as e:
            raise InputError(f"malformed report checks: {e}") from None
        return EvalReport(
            clean_accuracy=d["clean_accuracy"], n_samples=d["n_samples"], threat=d["threat"],
            eps=list(d["eps"]), suite=d["suite"], results=results, clean=dict(d.get("clean") or {}),
            checks=checks, timings=dict(d.get("timings") or {}), provenance=dict(d.get("provenance") or {}),
            notes=list(d.get("notes") or []), config_hash=d.get("config_hash", ""),
            schema_version=version)

    @staticmethod
    def load(path: Union[str, Path]) -> "EvalReport":
        """Read a report from ``report.json`` or from a folder holding it."""
        p = Path(path)
        if p.is_dir():
            p = p / REPORT_FILE
        if not p.is_file():
            raise InputError(f"no report at {p}")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{p} is not valid JSON: {e}") from None
        return EvalReport.from_dict(data)

    def save(self, out_dir: Union[str, Path], *, plots: bool = True) -> Dict[str, str]:
        """Write ``report.json``, ``report.md`` and (``plots``) the PNG plots into ``out_dir``.
        Returns {what: path}."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": str(out / REPORT_FILE), "markdown": str(out / MARKDOWN_FILE)}
        atomic_write_text(out / REPORT_FILE, self.to_json())
        atomic_write_text(out / MARKDOWN_FILE, self.to_markdown())
        if plots:
            paths.update(self.plot(out))
        return paths

    # -- Markdown ----------------------------------------------------------------------------------
    def to_markdown(self) -> str:
        """A human-readable summary: one table per eps (attack | accuracy alone | cumulative
        worst case), the worst-case row, the solver statistics and the checks."""
        lines = [f"# Robustness evaluation ({self.threat}, suite {self._suite_name()})", "",
                 self.bound_statement, ""]
        lines.append(f"- samples: {self.n_samples}")
        lines.append(f"- clean accuracy: {_pct(self.clean_accuracy)}")
        seed = self.provenance.get("seed")
        if seed is not None:
            lines.append(f"- seed: {seed}")
        if self.config_hash:
            lines.append(f"- config hash: `{self.config_hash[:16]}`")
        lines.append("")
        lines.append("| eps | robust accuracy (worst case) |")
        lines.append("| --- | --- |")
        for r in self.results:
            lines.append(f"| {r.eps:g} | {_pct(r.robust_accuracy)} |")
        lines.append("")
        for r in self.results:
            lines.append(f"## eps = {r.eps:g}")
            lines.append("")
            lines.append("| attack | kind | accuracy (alone) | cumulative worst case | newly broken | seconds |")
            lines.append("| --- | --- | --- | --- | --- | --- |")
            lines.append(f"| clean | - | {_pct(self.clean_accuracy)} | {_pct(self.clean_accuracy)} | - | - |")
            cascaded = any(a.accuracy is None for a in r.attacks)
            for a in r.attacks:
                name = a.key + (" (resumed)" if a.resumed else "")
                alone = "not measured (cascade)" if a.accuracy is None else _pct(a.accuracy)
                lines.append(f"| {name} | {a.kind} | {alone} | {_pct(a.cumulative_accuracy)} "
                             f"| {a.new_successes} | {a.seconds:.2f} |")
            lines.append(f"| **worst case** | | | **{_pct(r.robust_accuracy)}** | | {r.seconds:.2f} |")
            lines.append("")
            if cascaded:
                lines.append("In a cascade each attack runs only on the samples every earlier attack "
                             "left robust, so its accuracy alone is not measured; the cumulative worst "
                             "case is.")
                lines.append("")
            lines.extend(_broken_by(r))
            if r.solver and r.solver.get("clean") and r.solver.get("adversarial"):
                c, a = r.solver["clean"], r.solver["adversarial"]
                lines.append("| solver | mean steps | converged | mean residual |")
                lines.append("| --- | --- | --- | --- |")
                for label, s in (("clean", c), ("adversarial", a)):
                    lines.append(f"| {label} | {s['mean_steps']:.1f} | {_pct(s['converged_fraction'])} "
                                 f"| {_sci(s['mean_residual'])} |")
                lines.append("")
        lines.append("## Checks")
        lines.append("")
        if not self.checks:
            lines.append("No checks were run.")
        else:
            lines.append("| check | status | value | threshold | message |")
            lines.append("| --- | --- | --- | --- | --- |")
            for c in self.checks:
                status = "skipped" if c.skipped else ("**FIRED**" if c.fired else "ok")
                msg = c.message.replace("|", "\\|")
                lines.append(f"| {c.name} | {status} | {_num(c.value)} | {_num(c.threshold)} | {msg} |")
        lines.append("")
        if self.notes:
            lines.append("## Notes")
            lines.append("")
            lines.extend(f"- {n}" for n in self.notes)
            lines.append("")
        return "\n".join(lines)

    def _randomized(self) -> bool:
        """Whether the evaluated model declares ``randomized`` or was found randomised (the check
        ``randomized_output`` fired)."""
        model = self.provenance.get("model") or {}
        defense = model.get("defense") or {}
        return bool(model.get("randomized") or defense.get("randomized")) or "randomized_output" in self.fired

    def _suite_name(self) -> str:
        return self.suite if isinstance(self.suite, str) else "custom [" + ", ".join(self.suite) + "]"

    # -- plots -------------------------------------------------------------------------------------
    def plot(self, out_dir: Union[str, Path]) -> Dict[str, str]:
        """PNG plots: accuracy vs eps, accuracy vs solver step, residual curves. Plots without data
        (e.g. per-state accuracy of a feed-forward model) are not written."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written: Dict[str, str] = {}

        def save(fig, name):
            FigureCanvasAgg(fig)
            path = out / name
            fig.savefig(path, dpi=100)
            written[name.rsplit(".", 1)[0]] = str(path)

        # accuracy vs eps
        fig = Figure(figsize=(5, 3.5), tight_layout=True)
        ax = fig.add_subplot(1, 1, 1)
        eps = [0.0] + [r.eps for r in self.results]
        ax.plot(eps, [self.clean_accuracy] + [r.robust_accuracy for r in self.results], "o-",
                lw=2, color="black", label="worst case")
        keys = []
        for r in self.results:
            for a in r.attacks:
                if a.key not in keys:
                    keys.append(a.key)
        for k in keys:
            pts = [(r.eps, a.accuracy) for r in self.results for a in r.attacks
                   if a.key == k and a.accuracy is not None]
            if not pts:
                continue
            ax.plot([0.0] + [p[0] for p in pts], [self.clean_accuracy] + [p[1] for p in pts],
                    ".--", lw=1, label=k)
        ax.set_xlabel(f"eps ({self.threat})")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=6)
        save(fig, PLOT_FILES[0])

        # accuracy vs solver step
        per_state = [r for r in self.results if r.per_state]
        clean_ps = (self.clean or {}).get("per_state")
        if clean_ps:
            fig = Figure(figsize=(5, 3.5), tight_layout=True)
            ax = fig.add_subplot(1, 1, 1)
            ax.plot(clean_ps["steps"], clean_ps["accuracy"], "o-", color="black", label="clean")
            for r in per_state:
                ax.plot(r.per_state["steps"], r.per_state["adversarial"], ".-", label=f"adv eps={r.eps:g}")
            ax.set_xlabel("solver step (state index)")
            ax.set_ylabel("accuracy of readout(z_k)")
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize=6)
            save(fig, PLOT_FILES[1])

        # residual curves
        clean_rc = (self.clean or {}).get("residual_curve")
        if clean_rc:
            fig = Figure(figsize=(5, 3.5), tight_layout=True)
            ax = fig.add_subplot(1, 1, 1)
            ax.semilogy(range(len(clean_rc)), _positive(clean_rc), "o-", color="black", label="clean")
            for r in self.results:
                rc = (r.residual_curve or {}).get("adversarial")
                if rc:
                    ax.semilogy(range(len(rc)), _positive(rc), ".-", label=f"adv eps={r.eps:g}")
            tol = (self.clean or {}).get("residual_tolerance") or {}
            if tol.get("tol"):
                ax.axhline(tol["tol"], color="grey", linestyle=":", linewidth=1,
                           label=f"tolerance ({tol.get('stop_mode', '')}) {tol['tol']:g}")
            ax.set_xlabel("solver step")
            ax.set_ylabel("mean residual")
            ax.set_title("a stopped sample keeps its last residual", fontsize=7)
            running = (self.clean or {}).get("residual_running_fraction")
            if running:
                ax2 = ax.twinx()
                ax2.plot(range(len(running)), running, "--", color="tab:grey", linewidth=1,
                         label="clean samples still iterating")
                ax2.set_ylim(-0.02, 1.02)
                ax2.set_ylabel("fraction still iterating")
                ax2.legend(fontsize=6, loc="center right")
            ax.legend(fontsize=6, loc="upper right")
            save(fig, PLOT_FILES[2])
        return written

    # -- TensorBoard -------------------------------------------------------------------------------
    def write_tensorboard(self, log_dir: Union[str, Path], *, global_step: int = 0) -> List[str]:
        """Scalars (``add_scalar`` only) under ``log_dir``; returns the tags written.

        Tags: ``eval/clean_accuracy``; ``eval/robust_accuracy`` with step = index of the eps (and
        ``eval/eps``); ``eps_<eps>/attack/<key>`` (alone) and ``.../cumulative/<key>``; per-state
        accuracy (``state_accuracy/clean`` and ``eps_<eps>/state_accuracy``) and residual curves
        with step = solver step; ``checks/<name>`` = 1 when fired.
        """
        from torch.utils.tensorboard import SummaryWriter

        tags: List[str] = []
        w = SummaryWriter(log_dir=str(log_dir))

        def add(tag, value, step):
            if value is None or not math.isfinite(float(value)):
                return
            w.add_scalar(tag, float(value), step)
            tags.append(tag)

        try:
            add("eval/clean_accuracy", self.clean_accuracy, global_step)
            for i, r in enumerate(self.results):
                add("eval/eps", r.eps, i)
                add("eval/robust_accuracy", r.robust_accuracy, i)
                base = f"eps_{r.eps:g}"
                for a in r.attacks:
                    key = a.key.replace(" ", "_")
                    add(f"{base}/attack/{key}", a.accuracy, global_step)
                    add(f"{base}/cumulative/{key}", a.cumulative_accuracy, global_step)
                    add(f"{base}/seconds/{key}", a.seconds, global_step)
                if r.per_state:
                    for s, v in zip(r.per_state["steps"], r.per_state["adversarial"]):
                        add(f"{base}/state_accuracy", v, s)
                if r.residual_curve and r.residual_curve.get("adversarial"):
                    for s, v in enumerate(r.residual_curve["adversarial"]):
                        add(f"{base}/residual", v, s)
            ps = (self.clean or {}).get("per_state")
            if ps:
                for s, v in zip(ps["steps"], ps["accuracy"]):
                    add("state_accuracy/clean", v, s)
            rc = (self.clean or {}).get("residual_curve")
            if rc:
                for s, v in enumerate(rc):
                    add("residual/clean", v, s)
            for c in self.checks:
                if not c.skipped:
                    add(f"checks/{c.name}", 1.0 if c.fired else 0.0, global_step)
            w.flush()
        finally:
            w.close()
        return tags


def _broken_by(r: "EpsResult", show: int = 40) -> List[str]:
    """Markdown lines: per attack, the samples (indices into the evaluated batch) it was the
    first to break (``first_success``; the per-sample worst case keeps that attack's example)."""
    by: Dict[str, List[int]] = {}
    for i, who in enumerate(r.first_success):
        if who is not None and who != "clean":
            by.setdefault(who, []).append(i)
    if not by:
        return []
    lines = ["| attack | samples it broke first (index in the batch) |", "| --- | --- |"]
    for a in r.attacks:
        idx = by.get(a.key)
        if idx:
            text = ", ".join(str(i) for i in idx[:show]) + (f", ... ({len(idx)} in all)" if len(idx) > show else "")
            lines.append(f"| {a.key} | {text} |")
    return lines + [""]


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f}%"


def _num(v) -> str:
    if v is None:
        return "-"
    return f"{float(v):.3g}"


def _sci(v) -> str:
    return "-" if v is None else f"{float(v):.2e}"


def _positive(vals):
    return [v if (v is not None and v > 0) else float("nan") for v in vals]


__all__ = ["SCHEMA_VERSION", "AttackResult", "EpsResult", "EvalReport", "atomic_write_text",
           "REPORT_FILE", "MARKDOWN_FILE", "PLOT_FILES"]
