"""Router rows from k-means centroids of the hidden states that enter the layer's FFN (``--calibration``).

One centroid per virtual group (per expert when experts are not grouped), so the split stays exact;
tokens near a centroid go to its experts first. Row norm: that of a N(0, router_std^2) row.
"""

import torch

from .base import RouterContext, RouterInit, expand_groups, scale_rows


def build(ctx: RouterContext) -> torch.Tensor:
    centroids = ctx.data.hidden_centroids if ctx.data is not None else None
    groups = max(ctx.groups) + 1
    if centroids is None or centroids.shape[0] != groups:
        raise ValueError(f"layer {ctx.layer}: hidden-state centroids for {groups} router rows were not collected")
    return expand_groups(scale_rows(centroids.float(), ctx.std), ctx.groups)


ROUTER = RouterInit(name="kmeans", build=build, needs_calibration=True,
                    description="k-means centroids of calibration hidden states, one per virtual group")
