"""What an evaluation keeps on disk and how it recognises its own configuration: hashes of the
model parameters and data, the seeds of the units, the finished units under
``out_dir/partial/`` and the completed report.

Each finished (eps, attack unit) is written atomically to ``out_dir/partial/`` (tensors with
``torch.save``, read back with ``weights_only=True``, plus a JSON sidecar written last); a later
evaluation of the same configuration (hash of model parameters, data, threat, eps, suite, steps,
seed, batch size) skips the finished units and reloads their flags.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .._tensor import model_sha256, tensors_sha256
from ..errors import ConfigError
from .report import SCHEMA_VERSION, EvalReport, _json_safe, atomic_write_text

logger = logging.getLogger(__name__)


hash_model = model_sha256  # SHA-256 of the model's class name and state dict


def hash_data(x: Tensor, y: Tensor) -> str:
    """SHA-256 of the inputs and labels (dtypes, shapes, bytes)."""
    return tensors_sha256(x, y)


def derive_seed(seed: int, *parts: Any) -> int:
    """A 32-bit seed hashed from ``seed`` and ``parts`` (a check's name, a unit's key, ...)."""
    h = hashlib.sha256(("/".join([str(seed)] + [str(p) for p in parts])).encode()).hexdigest()
    return int(h[:8], 16)


def unit_seed(seed: int, eps: float, key: str) -> int:
    """The seed an attack unit gets: a hash of the base seed, the eps value and the unit key (the
    same for a given eps whatever else the sweep holds)."""
    return derive_seed(seed, repr(float(eps)), key)



def completed_report(out_dir: Path, config_hash: str) -> Optional[EvalReport]:
    """The report of a finished evaluation of the same configuration in ``out_dir`` (every unit
    marked resumed), or None."""
    path = out_dir / "report.json"
    if not path.is_file() or (out_dir / "partial" / "manifest.json").is_file():
        return None
    try:
        rep = EvalReport.load(out_dir)
    except Exception as e:  # unreadable: recompute (the store below refuses a foreign one)
        logger.warning("cannot read the finished report %s (%s); recomputing", path, e)
        return None
    if rep.config_hash != config_hash:
        return None
    for r in rep.results:
        for a in r.attacks:
            a.resumed = True
    logger.info("%s holds the finished evaluation of this configuration: returning it", path)
    return rep


class PartialStore:
    """Finished units under ``out_dir/partial``: ``e{i}_u{j}.pt`` (tensors) + ``.json`` (meta);
    the JSON is written last and marks the unit as finished."""

    def __init__(self, out_dir: Path, config_hash: str, config: dict, resume: bool):
        self.dir = Path(out_dir) / "partial"
        self.manifest = self.dir / "manifest.json"
        done = Path(out_dir) / "report.json"  # a completed evaluation (its partial/ was removed)
        if resume and done.is_file() and not self.manifest.is_file():
            try:
                old_hash = json.loads(done.read_text(encoding="utf-8")).get("config_hash")
            except (json.JSONDecodeError, AttributeError, OSError):
                old_hash = None
            if old_hash and old_hash != config_hash:
                raise ConfigError(
                    f"{done} is the report of a different configuration (hash {old_hash[:12]} vs "
                    f"{config_hash[:12]}: model parameters or defense settings, data, threat, eps, suite, "
                    "steps, seed or batch size changed); use another out_dir or resume=False to overwrite it")
        self.config_hash = config_hash
        if self.manifest.is_file():
            try:
                old = json.loads(self.manifest.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                old = None
            if not isinstance(old, dict) or not isinstance(old.get("config_hash"), str):
                logger.warning("%s is malformed (not a manifest of a partial evaluation); its partial "
                               "units are recomputed", self.manifest)
                old = {}
            same = old.get("config_hash") == config_hash
            if resume and not same and old:
                raise ConfigError(
                    f"{self.dir} holds a partial evaluation of a different configuration (hash "
                    f"{str(old.get('config_hash'))[:12]} vs {config_hash[:12]}: model parameters or defense "
                    "settings, data, threat, eps, suite, steps, seed or batch size changed); use another "
                    "out_dir or resume=False to overwrite it")
            if not resume or not same:
                self.clear()
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.manifest, json.dumps(
            {"schema_version": SCHEMA_VERSION, "config_hash": config_hash, "config": config}, indent=2))

    def clear(self) -> None:
        """Delete every stored unit and the manifest (the folder itself stays)."""
        for p in list(self.dir.glob("e*_u*.pt")) + list(self.dir.glob("e*_u*.json")) + [self.manifest]:
            if p.is_file():
                p.unlink()

    def remove(self) -> None:
        """Delete the folder once the evaluation is complete (its report holds the results)."""
        self.clear()
        try:
            self.dir.rmdir()
        except OSError:  # something else was put there: leave it
            logger.debug("kept %s: it holds other files", self.dir)

    @staticmethod
    def stem(ei: int, ui: int) -> str:
        """The file name stem of unit ``(ei, ui)``: ``e{ei:03d}_u{ui:03d}``."""
        return f"e{ei:03d}_u{ui:03d}"

    def load(self, ei: int, ui: int, key: str, *, eps: Optional[float] = None,
             n: Optional[int] = None) -> Optional[Tuple[dict, Dict[str, Tensor]]]:
        """The unit ``(ei, ui)`` if its files are whole and belong to it: the tensor file carries
        the unit's key, eps and configuration hash (written by :meth:`save`), which must match
        ``key``, ``eps`` and this store's hash, as must the JSON's; the tensors must have their
        names, dtypes and sizes (``n`` samples). Anything else (a swapped, stale, foreign or
        malformed unit) is recomputed with a warning, never trusted."""
        meta_p = self.dir / (self.stem(ei, ui) + ".json")
        pt_p = self.dir / (self.stem(ei, ui) + ".pt")
        if not (meta_p.is_file() and pt_p.is_file()):
            return None
        try:
            meta = json.loads(meta_p.read_text(encoding="utf-8"))
            from ..checkpoint import safe_torch_load  # says what is wrong, never advises unsafe loading
            tensors = safe_torch_load(pt_p, map_location="cpu")
        except Exception as e:  # a corrupted unit is recomputed
            logger.warning("cannot read partial unit %s (%s); recomputing it", meta_p.name, e)
            return None
        problem = self._invalid(meta, tensors, key, eps, n)
        if problem is not None:
            logger.warning("partial unit %s is not this unit's (%s); recomputing it", meta_p.name, problem)
            return None
        return meta, {k: v for k, v in tensors.items() if not k.startswith("__")}

    def _invalid(self, meta: Any, tensors: Any, key: str, eps: Optional[float],
                 n: Optional[int]) -> Optional[str]:
        if not isinstance(meta, dict):
            return "its JSON is not an object"
        for f, kinds in (("key", str), ("eps", (int, float)), ("seconds", (int, float)),
                         ("describe", (str, dict, list)), ("violations", int)):
            if not isinstance(meta.get(f), kinds) or isinstance(meta.get(f), bool):
                return f"its JSON lacks a valid {f!r}"
        if not isinstance(tensors, dict):
            return "its tensor file does not hold a dict"
        ident = {"__key__": key, "__config_hash__": self.config_hash}
        for f, want in ident.items():
            if tensors.get(f) != want:
                return f"its tensor file says {f.strip('_')} {tensors.get(f)!r}, expected {want!r}"
        if meta["key"] != key:
            return f"its JSON says key {meta['key']!r}, expected {key!r}"
        if eps is not None:
            for where, got in (("tensor file", tensors.get("__eps__")), ("JSON", meta["eps"])):
                if not isinstance(got, (int, float)) or float(got) != float(eps):
                    return f"its {where} says eps {got!r}, expected {float(eps)!r}"
        need = {"adv_correct": None, "margin": None, "upd_idx": None, "upd_x": None}
        for f in need:
            if not isinstance(tensors.get(f), Tensor):
                return f"its tensor {f!r} is missing"
        if n is not None and (tensors["adv_correct"].shape != (n,) or tensors["margin"].shape != (n,)):
            return f"its per-sample tensors are not of {n} samples"
        idx = tensors["upd_idx"]
        if idx.dim() != 1 or idx.is_floating_point() or tensors["upd_x"].shape[:1] != idx.shape or \
                (idx.numel() and (int(idx.min()) < 0 or (n is not None and int(idx.max()) >= n))):
            return "its updated examples do not match their indices"
        return None

    def save(self, ei: int, ui: int, meta: dict, tensors: Dict[str, Tensor]) -> None:
        """Store the finished unit ``(ei, ui)``: its tensors (with the unit's key, eps and the
        configuration hash, which :meth:`load` checks) atomically, then its JSON ``meta``, whose
        presence marks the unit finished."""
        pt_p = self.dir / (self.stem(ei, ui) + ".pt")
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=pt_p.name + ".", suffix=".tmp")
        os.close(fd)
        payload: Dict[str, Any] = {k: v.detach().cpu() for k, v in tensors.items()}
        # the unit's identity inside the tensor file: a file moved to another unit's name is refused
        payload.update({"__key__": str(meta["key"]), "__eps__": float(meta["eps"]),
                        "__config_hash__": self.config_hash})
        try:
            torch.save(payload, tmp)
            os.replace(tmp, pt_p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        atomic_write_text(self.dir / (self.stem(ei, ui) + ".json"),
                          json.dumps(_json_safe(meta), indent=2, allow_nan=False))


__all__ = ["hash_model", "hash_data", "derive_seed", "unit_seed", "completed_report", "PartialStore"]
