"""Outputs of a federated run: ``summary.json``, ``report.md`` and ``accuracy.png``."""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

logger = logging.getLogger(__name__)

__all__ = ["write_outputs", "markdown", "plot", "one_line"]

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning|Fault)\b")


def one_line(reason: str, limit: int = 300) -> str:
    """A one-line reason from an error text (a traceback, possibly with ANSI colour codes): the
    last line that names an exception (``Type: message``), else the last non-empty line."""
    lines = [ln.strip() for ln in ANSI.sub("", str(reason)).splitlines() if ln.strip()]
    if not lines:
        return "unknown error"
    exc = [ln for ln in lines if EXC_LINE.match(ln)]
    out = (exc or lines)[-1].replace("|", "/")
    return out if len(out) <= limit else out[:limit - 3] + "..."


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _who(rows: List[Dict[str, Any]]) -> str:
    if not rows:
        return "-"
    parts = []
    for r in rows:
        c = r.get("client")
        parts.append((f"client {c}" if c is not None else f"node {r.get('node')}")
                     + f" ({one_line(r.get('reason', ''))})")
    return "; ".join(parts)


def markdown(summary: Dict[str, Any]) -> str:
    """The run's ``report.md``: the settings, one row per round (accuracy, robust accuracy,
    traffic, clients fused, dropped and rejected) and the clients of the last round."""
    cfg = summary["config"]
    rounds = summary["rounds"]
    lines = [
        "# Federated DEQ training report", "",
        f"- clients: {cfg['clients']}, partition: `{cfg['partition']}`, solver budgets: "
        f"{', '.join(str(b) for b in cfg['budgets'])} ({cfg['solver']}, tol {cfg['tol']:g})",
        f"- local objective: `{cfg['defense']}` {json.dumps(cfg['defense_options']) if cfg['defense_options'] else ''}, "
        f"{cfg['local_epochs']} local epoch(s) per round",
        f"- fusion: `{cfg['fusion']}`; model: `{summary['model']['name']}` "
        f"({summary['model_parameters']:,} parameters, {summary['model_bytes']:,} bytes per copy)",
        f"- evaluation of the global model: clean accuracy on the test split "
        f"({summary['test_samples']} samples); robust accuracy: suite `{cfg['eval_suite']}`, "
        f"{cfg['eval_threat']} eps {cfg['eval_eps']:g}, {cfg['eval_steps']} steps, "
        f"{summary.get('robust_samples', 0)} samples",
        f"- rounds completed: {sum(1 for r in rounds if r.get('fused', True))} of {cfg['rounds']}"
        + (f" (round {summary['failed_round']} failed: no client update fused; the run stopped)"
           if summary.get("failed_round") else "")
        + (f" (resumed at round {summary['resumed_from'] + 1})" if summary.get("resumed_from") else ""),
        "",
        "| round | accuracy | robust accuracy | bytes up | bytes down | fused | dropped | rejected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rounds:
        lines.append(f"| {r['round']} | {_pct(r['accuracy'])} | {_pct(r.get('robust_accuracy'))} | "
                     f"{r['bytes_up']:,} | {r['bytes_down']:,} | {r['clients_fused']} | "
                     f"{_who(r['clients_dropped'])} | {_who(r['clients_rejected'])} |")
    if rounds:
        last = rounds[-1]
        lines += ["", f"## Clients in round {last['round']}", "",
                  "| client | n_k | budget | mean iterations | converged | final residual | est. state error "
                  "| val accuracy | q_k | w_k |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in last["clients"]:
            lines.append(f"| {c['client']} | {c['num_examples']} | {c.get('budget', float('nan')):.0f} | "
                         f"{c.get('mean_steps', float('nan')):.1f} | {_pct(c.get('converged_fraction'))} | "
                         f"{c.get('mean_residual', float('nan')):.2e} | "
                         f"{c.get('state_error', float('nan')):.2e} | "
                         f"{_pct(c.get('val_accuracy'))} | "
                         f"{c['quality']:.3f} | {c['weight']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(summary: Dict[str, Any], path: Path) -> Optional[Path]:
    """Accuracy and robust accuracy of the global model against rounds (matplotlib, Agg)."""
    rounds = summary["rounds"]
    if not rounds:
        return None
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    xs = [r["round"] for r in rounds]
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        ax.plot(xs, [r["accuracy"] for r in rounds], marker="o", label="clean accuracy")
        rob = [r.get("robust_accuracy") for r in rounds]
        if any(v is not None for v in rob):
            ax.plot(xs, [float("nan") if v is None else v for v in rob], marker="s",
                    label=f"robust accuracy ({summary['config']['eval_threat']} eps {summary['config']['eval_eps']:g})")
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy of the global model")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        ax.set_title(f"federated {summary['model']['name']}, fusion {summary['config']['fusion']}")
        fig.tight_layout()
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path


def write_outputs(out_dir: Path, summary: Dict[str, Any]) -> None:
    """Write ``summary.json``, ``report.md`` and ``accuracy.png`` into ``out_dir`` (created if
    needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / "summary.json", json.dumps(summary, indent=1, default=float))
    _atomic_write(out_dir / "report.md", markdown(summary))
    plot(summary, out_dir / "accuracy.png")
