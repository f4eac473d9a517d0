"""Clustering used by data-aware methods: balanced k-means (equal-size clusters) and streaming k-means."""

from __future__ import annotations

from typing import Optional

import torch


def balanced_assign(dist: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each row of ``dist`` [n, k] to a cluster, at most ``capacity`` rows per cluster.

    Rounds of proposals: every unassigned row proposes its nearest cluster that still has room, and
    each cluster keeps its closest proposers. At most k rounds, each vectorised.
    """
    n, k = dist.shape
    assign = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), capacity, dtype=torch.long)
    while True:
        free = (assign < 0).nonzero().flatten()
        if free.numel() == 0:
            return assign
        d = dist[free].clone()
        d[:, room == 0] = float("inf")
        best = d.argmin(1)
        for c in best.unique().tolist():
            proposers = free[best == c]
            order = torch.argsort(dist[proposers, c], stable=True)[: int(room[c])]
            assign[proposers[order]] = c
            room[c] -= order.numel()


def balanced_kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 30) -> torch.Tensor:
    """Cluster the rows of ``x`` [n, d] into ``k`` clusters of exactly n/k rows; returns the labels [n]."""
    n = x.shape[0]
    if n % k:
        raise ValueError(f"{n} rows cannot form {k} equal clusters")
    x = x.float()
    centroids = x[torch.randperm(n, generator=generator)[:k]].clone()
    labels: Optional[torch.Tensor] = None
    norms = (x * x).sum(1, keepdim=True)
    for _ in range(iterations):
        new = balanced_assign(norms - 2 * x @ centroids.t() + (centroids * centroids).sum(1), n // k)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centroids = torch.zeros_like(centroids).index_add_(0, labels, x) / (n // k)
    return labels


class StreamingKMeans:
    """Mini-batch k-means (Sculley, 2010) over a stream of vectors, holding only k centroids and counts.

    The first batch seeds the centroids (k-means++); every later batch moves each centroid towards the
    mean of its assigned vectors with a per-centroid learning rate 1/count.
    """

    def __init__(self, k: int, generator: torch.Generator):
        self.k, self.generator = k, generator
        self.centroids: Optional[torch.Tensor] = None
        self.counts = torch.zeros(k, dtype=torch.float64)
        self.pending: list[torch.Tensor] = []
        self.seen = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        self.seen += x.shape[0]
        if self.centroids is None:
            self.pending.append(x)  # wait until k vectors arrived to seed
            if sum(p.shape[0] for p in self.pending) < self.k:
                return
            x = torch.cat(self.pending)
            self.pending = []
            self.centroids = _kmeans_pp(x, self.k, self.generator)
        labels = torch.cdist(x, self.centroids).argmin(1)
        sums = torch.zeros_like(self.centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=self.k).double()
        self.counts += counts
        hit = counts > 0
        rate = (counts[hit] / self.counts[hit]).unsqueeze(1)
        self.centroids[hit] += rate * (sums[hit] / counts[hit].unsqueeze(1) - self.centroids[hit])

    def result(self) -> torch.Tensor:
        if self.centroids is None:
            raise ValueError(f"k-means saw {self.seen} vectors, fewer than its {self.k} clusters")
        return self.centroids.float()


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to squared distance."""
    first = int(torch.randint(x.shape[0], (1,), generator=generator))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        weights = d2 if float(d2.sum()) > 0 else torch.ones_like(d2)
        pick = int(torch.multinomial(weights.float(), 1, generator=generator))
        centres.append(x[pick])
        d2 = torch.minimum(d2, ((x - x[pick]) ** 2).sum(1))
    return torch.stack(centres).clone()
