"""The few-shot model: a backbone, the embedding normalization, and the metric.

``FewShotModel.forward(images, prototypes) -> (embeddings, logits)`` is exactly the
graph that is exported to ONNX, so the device computes what training computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgemeta.backbones import build_backbone
from edgemeta.runtime.errors import CheckpointError
from edgemeta.runtime.spec import Metric, Normalization, PreprocessSpec

__all__ = ["ModelSpec", "FewShotModel", "compute_logits", "normalize_embeddings"]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the model; travels in the checkpoint header."""

    backbone: str
    preprocess: PreprocessSpec
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    metric: Metric = Metric.SQEUCLIDEAN
    normalization: Normalization = Normalization.NONE

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "backbone_kwargs": dict(self.backbone_kwargs),
            "preprocess": self.preprocess.to_dict(),
            "metric": self.metric.value,
            "normalization": self.normalization.value,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        try:
            return cls(
                backbone=str(d["backbone"]),
                preprocess=PreprocessSpec.from_dict(d["preprocess"]),
                backbone_kwargs={
                    k: (tuple(v) if isinstance(v, list) else v) for k, v in d.get("backbone_kwargs", {}).items()
                },
                metric=Metric(d.get("metric", "sqeuclidean")),
                normalization=Normalization(d.get("normalization", "none")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint model spec is incomplete or invalid ({e}); re-save it with edgemeta"
            ) from None


def normalize_embeddings(z: torch.Tensor, normalization: Normalization, center: torch.Tensor) -> torch.Tensor:
    if normalization is Normalization.NONE:
        return z
    if normalization is Normalization.CENTERED_L2:
        z = z - center
    # eps keeps the graph finite for an all-zero embedding
    return z / torch.sqrt((z * z).sum(dim=1, keepdim=True) + 1e-12)


def compute_logits(z: torch.Tensor, prototypes: torch.Tensor, metric: Metric, scale: torch.Tensor) -> torch.Tensor:
    """Logits of queries ``z`` [B, D] against ``prototypes`` [N, D] as one matrix product.

    Squared euclidean: ``-(|z|^2 - 2 z.p + |p|^2)``; cosine: ``scale * cos(z, p)``.
    Written with matmul and reductions only, so N may be 0 and 10,000 classes cost one GEMM.
    """
    if metric is Metric.SQEUCLIDEAN:
        zz = (z * z).sum(dim=1, keepdim=True)
        pp = (prototypes * prototypes).sum(dim=1).unsqueeze(0)
        d = zz - 2.0 * (z @ prototypes.t()) + pp
        return -torch.clamp(d, min=0.0)
    zn = z / torch.sqrt((z * z).sum(dim=1, keepdim=True) + 1e-12)
    pn = prototypes / torch.sqrt((prototypes * prototypes).sum(dim=1, keepdim=True) + 1e-12)
    return scale * (zn @ pn.t())


class FewShotModel(nn.Module):
    """Backbone + embedding normalization + metric.

    Example:
        >>> spec = ModelSpec("conv4", PreprocessSpec.create(28, 1))
        >>> model = FewShotModel(spec)
        >>> emb, logits = model(torch.zeros(2, 1, 28, 28), torch.zeros(5, 64))
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = build_backbone(spec.backbone, spec.preprocess.channels, **spec.backbone_kwargs)
        self.embedding_dim = self._probe_dim()
        # centered-L2 subtracts the base-class mean (SimpleShot); set by training
        self.register_buffer("center", torch.zeros(self.embedding_dim))
        # cosine logits are scaled by a learned temperature
        self.log_scale = nn.Parameter(torch.tensor(2.302585), requires_grad=spec.metric is Metric.COSINE)

    @torch.no_grad()
    def _probe_dim(self) -> int:
        was = self.backbone.training
        self.backbone.eval()
        d = int(self.backbone(torch.zeros(1, self.spec.preprocess.channels, *self.spec.preprocess.size)).shape[1])
        self.backbone.train(was)
        return d

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_embeddings(self.backbone(images), self.spec.normalization, self.center)

    def logits(self, z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        return compute_logits(z, prototypes, self.spec.metric, torch.exp(self.log_scale))

    def forward(self, images: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.embed(images)
        return z, self.logits(z, prototypes)
