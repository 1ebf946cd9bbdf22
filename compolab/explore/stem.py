"""The stem cache of the explorer: a backbone split into what no module touches and the rest.

For a timm ViT the stem is everything before the first transformer block (the tiny ViT's conv
stem, the position embedding); the modules live in the blocks (``attn.qkv``, ``attn.proj``,
``mlp.fc1``, ``mlp.fc2``). The trunk keeps the ViT's own parameter names, so task vectors, θ0 and
:mod:`compolab.probes` apply to it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["split_stem"]


class _Trunk(nn.Module):
    """The blocks of a timm ViT and what follows them, with the ViT's own parameter names."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.blocks, self.norm = vit.blocks, vit.norm
        self._vit = [vit]  # a list: not a submodule, so the names stay "blocks.*" / "norm.*"

    def forward(self, tokens: Tensor) -> Tensor:
        vit = self._vit[0]
        return vit.forward_head(self.norm(self.blocks(tokens)))


def split_stem(backbone: nn.Module, names: Sequence[str], probe: Tensor) -> tuple[nn.Module, object]:
    """``(trunk, stem)`` with ``trunk(stem(x)) == backbone(x)`` and every tuned name in the trunk.

    For a timm ViT the stem is everything before the first block; for any other backbone, or when
    the check on ``probe`` images fails, the trunk is the backbone and the stem the identity.
    """

    def identity(x: Tensor) -> Tensor:
        return x

    needed = ("blocks", "norm", "patch_embed", "_pos_embed", "patch_drop", "norm_pre", "forward_head")
    if not all(hasattr(backbone, a) for a in needed):
        return backbone, identity
    trunk = _Trunk(backbone)

    def stem(x: Tensor) -> Tensor:
        b = backbone
        return b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(x))))

    own = dict(trunk.named_parameters())
    with torch.no_grad():
        same = torch.allclose(trunk(stem(probe)), backbone(probe), rtol=1e-4, atol=1e-5)
    if not same or any(n not in own for n in names):
        return backbone, identity
    return trunk, stem
