"""Privacy options of a federation: central differential privacy and secure aggregation by pairwise masks.

**Differential privacy** (DP-FedAvg, McMahan et al. 2018): every update is clipped to `clip_norm`, the
round's clipped updates are summed, Gaussian noise of std `noise_multiplier * clip_norm` is added to the
sum, and the mean is taken over the round's participants with equal weights (so one agent's influence,
the sensitivity, is `clip_norm`). The accountant is Rényi DP (Mironov 2017) of the Gaussian mechanism,
composed over rounds, from Opacus (`opacus.accountants.analysis.rdp`). A round is accounted with
sampling rate 1: an open federation has no fixed population to sample from, so no amplification by
sampling is claimed. The guarantee is per agent (user-level), at the configured delta.

**Secure aggregation** (after Bonawitz et al. 2017, without its secret sharing): each participant of a
round has an X25519 key pair; every pair of participants derives a shared seed (X25519, then HKDF-SHA256
bound to the federation, round and attempt) and expands it with ChaCha20 into a mask; the lower agent
id adds it, the higher subtracts it. Updates travel as fixed-point numbers in the ring of 2^64 integers,
so the masks cancel exactly in the round's sum and each masked update alone is uniformly random to the
coordinator. When a participant drops out, the masks of the others no longer cancel: the coordinator
runs the round again (a new attempt, new masks) with those who reported, instead of recovering the
dropped agent's masks from secret shares. What this does not protect against: a coordinator that lies
about who dropped out to isolate one agent (the protocol's secret sharing and a minimum round size are
what the full design adds); see docs/federated.md.
"""

from __future__ import annotations

import base64
import warnings
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from forseti.schemas.errors import ErrorCode, ForsetiError

FIXED_POINT = 2.0**24
"""Scale of the fixed-point numbers secure aggregation sums: 2^-24 resolution, and room for sums up to
2^39 in magnitude before the ring wraps."""
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [2.0**k for k in range(6, 13)]
"""The Rényi orders the accountant tries: Opacus' defaults, and larger ones for large epsilons (whose best
order lies beyond 63)."""


def clip(vector: np.ndarray, bound: float) -> np.ndarray:
    """`vector` scaled down to L2 norm `bound` when it is longer."""
    norm = float(np.linalg.norm(vector))
    return vector * (bound / norm) if norm > bound else vector


@dataclass(frozen=True)
class Accountant:
    """The epsilon a federation has spent: Rényi DP of the Gaussian mechanism over its noisy rounds."""

    noise_multiplier: float
    """Noise std over the sensitivity (clip_norm)."""
    delta: float
    """The delta epsilon is given at."""

    def epsilon(self, rounds: int) -> float:
        """Epsilon spent after `rounds` noisy rounds (infinite without noise, 0 before any)."""
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

        if rounds == 0:
            return 0.0
        if self.noise_multiplier <= 0:
            return float("inf")
        rdp = compute_rdp(q=1.0, noise_multiplier=self.noise_multiplier, steps=rounds, orders=ORDERS)
        with warnings.catch_warnings():
            # Opacus warns when the best order is the first or last one tried (a tiny or a huge epsilon):
            # the epsilon it returns is still an upper bound, only not the tightest one
            warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
            eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=self.delta)
        return float(eps)

    @staticmethod
    def multiplier_for(target_epsilon: float, delta: float, rounds: int) -> float:
        """The noise multiplier that spends `target_epsilon` over `rounds` rounds."""
        from opacus.accountants.utils import get_noise_multiplier

        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=1.0, steps=rounds, accountant="rdp"
            )
        )


# -- secure aggregation ----------------------------------------------------------------------------


class MaskingKey:
    """An agent's X25519 key pair for one session's pairwise masks."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()

    @property
    def public(self) -> str:
        """The public key as the wire carries it (base64 of 32 bytes)."""
        raw = self._private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode()

    def shared_seed(self, peer_public: str, context: bytes) -> bytes:
        """The 32-byte seed this agent and a peer both derive for `context` (federation, round, attempt)."""
        try:
            peer = X25519PublicKey.from_public_bytes(base64.b64decode(peer_public, validate=True))
        except ValueError as exc:
            raise ForsetiError(f"a peer's public key is not an X25519 key: {exc}", code=ErrorCode.INVALID_DATA) from exc
        shared = self._private.exchange(peer)
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"forseti-secagg|" + context).derive(shared)


def mask_context(federation: str, round_: int, attempt: int) -> bytes:
    """What binds a mask to one attempt of one round (fresh masks for every attempt)."""
    return f"{federation}|{round_}|{attempt}".encode()


def _stream(seed: bytes, size: int) -> np.ndarray:
    """`size` pseudo-random uint64 values from a 32-byte seed (ChaCha20 keystream)."""
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(b"\0" * (8 * size)), dtype="<u8")


def to_ring(vector: np.ndarray) -> np.ndarray:
    """Real values as fixed-point integers in the ring of 2^64 (two's complement)."""
    return np.round(vector * FIXED_POINT).astype(np.int64).view(np.uint64)


def from_ring(summed: np.ndarray) -> np.ndarray:
    """A ring sum back to real values."""
    return summed.view(np.int64).astype(np.float64) / FIXED_POINT


def masked(vector: np.ndarray, key: MaskingKey, me: str, peers: dict[str, str], context: bytes) -> np.ndarray:
    """`vector` in the ring plus this agent's pairwise masks with every other peer (agent id -> public
    key): added for peers above `me` in id order, subtracted for those below, so they cancel in a sum."""
    out = to_ring(vector)
    with np.errstate(over="ignore"):  # the ring wraps by design
        for other, public in peers.items():
            if other == me:
                continue
            mask = _stream(key.shared_seed(public, context), out.size)
            out = out + mask if me < other else out - mask
    return out


def ring_sum(parts: list[np.ndarray]) -> np.ndarray:
    """The sum of masked updates in the ring (the masks cancel when every peer's part is in)."""
    total = np.zeros_like(parts[0])
    with np.errstate(over="ignore"):
        for part in parts:
            total = total + part
    return total
