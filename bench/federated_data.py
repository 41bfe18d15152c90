"""The data of bench/federated.py, shared with its Flower baseline (which runs in Flower's own virtual
environment, so this imports nothing of Forseti): scikit-learn's digits, a stratified 80/20 split, and
the training rows dealt to clients by a Dirichlet(alpha) partition over labels (the usual non-IID split
of federated-learning papers: per class, the share each client gets is drawn from Dir(alpha))."""

from __future__ import annotations

import numpy as np

PIXELS = 64
CLASSES = 10
HIDDEN = 32
SCALE = 16.0
"""Digits' pixels run 0-16: inputs are divided by this, on both sides."""


def load(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and test inputs (raw pixels) and labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.2, stratify=data.target, random_state=seed
    )
    return x_train, x_test, y_train, y_test


def dirichlet_partition(labels: np.ndarray, clients: int, alpha: float, seed: int = 0) -> list[np.ndarray]:
    """Row indices per client; every client gets at least 10 rows (drawn again until so)."""
    rng = np.random.default_rng(seed)
    while True:
        parts: list[list[int]] = [[] for _ in range(clients)]
        for label in range(CLASSES):
            rows = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet([alpha] * clients)
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for client, chunk in enumerate(np.split(rows, cuts)):
                parts[client] += chunk.tolist()
        if min(len(p) for p in parts) >= 10:
            return [np.array(sorted(p)) for p in parts]
