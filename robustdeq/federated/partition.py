"""Split a labelled dataset over clients: IID or non-IID with Dirichlet label proportions.

``dirichlet:ALPHA`` follows the usual construction for label skew: for every class c, the
proportions ``p_c ~ Dirichlet(ALPHA * 1_K)`` over the K clients decide which share of class c each
client gets. Small ALPHA concentrates each class on few clients (strongly non-IID); large ALPHA
approaches an IID split. Draws are repeated (new proportions from the same seeded generator)
until every client holds at least ``min_size`` samples.
"""
from __future__ import annotations

import logging
from typing import List, Optional

import numpy as np

from ..errors import ConfigError
from .config import parse_partition

logger = logging.getLogger(__name__)

__all__ = ["partition_indices", "split_validation"]

_MAX_DRAWS = 1000


def partition_indices(labels, num_clients: int, partition: str = "iid", *, seed: int = 0,
                      min_size: int = 1) -> List[np.ndarray]:
    """Indices of the samples of every client (disjoint, covering all samples, each sorted).

    Raises:
        ConfigError: an unknown partition, fewer samples than ``num_clients * min_size``, or a
            Dirichlet split that cannot give every client ``min_size`` samples.
    """
    y = np.asarray(labels).reshape(-1)
    n = y.shape[0]
    kind, alpha = parse_partition(partition)
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    if n < num_clients * min_size:
        raise ConfigError(f"{n} samples cannot give {num_clients} clients {min_size} samples each")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        perm = rng.permutation(n)
        return [np.sort(part) for part in np.array_split(perm, num_clients)]
    classes = np.unique(y)
    for attempt in range(_MAX_DRAWS):
        shards: List[list] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].extend(part.tolist())
        sizes = [len(s) for s in shards]
        if min(sizes) >= min_size:
            logger.debug("dirichlet(%g) split after %d draw(s): sizes %s", alpha, attempt + 1, sizes)
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
    raise ConfigError(f"dirichlet:{alpha:g} gave some of the {num_clients} clients fewer than "
                      f"{min_size} samples in {_MAX_DRAWS} draws; use a larger alpha, fewer clients "
                      "or a smaller min_client_samples")


def split_validation(indices: np.ndarray, val_fraction: float, *, seed: int = 0,
                     ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Split one client's indices into (train, validation); at least one training sample stays.

    With ``val_fraction == 0`` (or a shard of one sample) the validation part is ``None``.
    """
    idx = np.asarray(indices)
    n_val = int(round(len(idx) * float(val_fraction)))
    n_val = min(n_val, len(idx) - 1)
    if n_val <= 0:
        return np.sort(idx), None
    perm = np.random.default_rng(seed).permutation(len(idx))
    return np.sort(idx[perm[n_val:]]), np.sort(idx[perm[:n_val]])
