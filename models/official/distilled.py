"""DeiT's distillation-token layout on :class:`~visionpe.models.VisionPEViT` (additive: a subclass).

DeiT's ``DistilledVisionTransformer`` (and iRPE's, built from it with an ``rpe_config``) runs
``[cls, dist, patches]`` through the blocks and, in eval mode, returns ``(head(cls) + head_dist(dist)) / 2``.
timm's ViT places register tokens exactly there (right after the class token), so the distillation token is
kept in timm's ``reg_token`` slot (one register token): the position encoders then see two prefix tokens
(iRPE's shared prefix bucket, an APE with two prefix rows), as the official model does. What the subclass
adds is the second head and DeiT's head rule, the same as timm's ``VisionTransformerDistilled``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..vit import VisionPEViT

__all__ = ["VisionPEViTDistilled"]


class VisionPEViTDistilled(VisionPEViT):
    """``VisionPEViT`` with a distillation token (``reg_token``, shape ``(1, 1, dim)``) and ``head_dist``.

    ``forward_head``: eval (and training unless :meth:`set_distilled_training`) ->
    ``(head(x[:, 0]) + head_dist(x[:, 1])) / 2``, ``(B, num_classes)``; distilled training -> the pair.
    """

    def __init__(self, *args, **kwargs):
        if kwargs.get("reg_tokens"):
            raise ValueError("VisionPEViTDistilled uses the register slot for its distillation token; "
                             "reg_tokens cannot be set")
        if kwargs.get("class_token", True) is False:
            raise ValueError("a distilled model needs its class token (class_token=True)")
        if kwargs.get("global_pool", "token") not in ("token", None):
            raise ValueError(f"a distilled model reads the class and distillation tokens (global_pool='token'); got "
                             f"{kwargs['global_pool']!r}")
        kwargs["reg_tokens"] = 1
        super().__init__(*args, **kwargs)
        self.head_dist = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.distilled_training = False

    @property
    def dist_token(self) -> nn.Parameter:
        """DeiT's distillation token (stored as ``reg_token``)."""
        return self.reg_token

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self.head_dist = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """x: ``(B, 2 + N, dim)`` normed tokens -> ``(B, num_classes)`` (or ``(B, dim)`` with ``pre_logits``)."""
        x, x_dist = x[:, 0], x[:, 1]
        if pre_logits:
            return (x + x_dist) / 2
        x, x_dist = self.head(self.head_drop(x)), self.head_dist(self.head_drop(x_dist))
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return x, x_dist
        return (x + x_dist) / 2
