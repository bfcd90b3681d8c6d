"""Test-stream orders: the realistic-stream protocols of the TTA literature.

- ``"iid"``: a seeded random permutation;
- ``"sorted"``: grouped by label (ascending; within a class, the original order);
- ``"dirichlet"``: class-imbalanced chunks: the stream is cut into chunks of ``chunk_size``
  samples and each chunk draws its classes from its own proportions ``pi ~ Dirichlet(alpha)``
  over the classes (classes already used up drop out and the rest are renormalised). Small
  ``alpha`` (0.1) gives chunks dominated by one or two classes; large alpha tends to i.i.d.

Orders are permutations of positions: samples keep their dataset ``index``, so per-sample
seeds (and so episodic methods' predictions) do not depend on the stream.
"""

from __future__ import annotations

import torch

STREAMS = ("iid", "sorted", "dirichlet")


def check_stream(kind: str, alpha: float) -> None:
    if kind not in STREAMS:
        raise ValueError(f"unknown stream {kind!r}; choose from {STREAMS}")
    if alpha <= 0:
        raise ValueError(f"dirichlet_alpha must be > 0, got {alpha}")


def stream_order(labels: torch.Tensor, kind: str = "iid", seed: int = 0, alpha: float = 0.1,
                 chunk_size: int = 64) -> torch.Tensor:
    """A permutation of ``range(len(labels))`` in the order the stream presents the samples."""
    check_stream(kind, alpha)
    n = len(labels)
    g = torch.Generator().manual_seed(seed)
    if kind == "iid":
        return torch.randperm(n, generator=g)
    if kind == "sorted":
        return torch.sort(labels, stable=True).indices
    classes = labels.unique()
    pools = [(labels == c).nonzero().squeeze(1) for c in classes]
    pools = [pool[torch.randperm(len(pool), generator=g)].tolist() for pool in pools]
    concentration = torch.full((len(classes),), float(alpha))
    order: list[int] = []
    while len(order) < n:
        proportions = torch._sample_dirichlet(concentration, generator=g)
        for _ in range(min(chunk_size, n - len(order))):
            left = torch.tensor([float(bool(pool)) for pool in pools])
            weights = proportions * left
            if weights.sum() <= 0:  # the chunk's classes are used up: fall back to what is left
                weights = left
            pick = int(torch.multinomial(weights, 1, generator=g))
            order.append(pools[pick].pop())
    return torch.tensor(order)


def order_within_domains(labels: torch.Tensor, domain_of: list[str], domains: list[str], kind: str = "iid",
                         seed: int = 0, alpha: float = 0.1, chunk_size: int = 64) -> torch.Tensor:
    """Positions of all samples in stream order: each domain's samples ordered by
    :func:`stream_order` (domain ``k`` with seed ``seed + k``), domains one after the other in
    ``domains`` order. ``domain_of[i]`` is sample ``i``'s domain."""
    check_stream(kind, alpha)
    order = []
    for k, domain in enumerate(domains):
        positions = torch.tensor([i for i, d in enumerate(domain_of) if d == domain], dtype=torch.long)
        order.append(positions[stream_order(labels[positions], kind, seed + k, alpha, chunk_size)])
    return torch.cat(order) if order else torch.zeros(0, dtype=torch.long)
