"""Backbones through timm: the paper's ViT-B/16 and the tiny preset's conv-stem ViT.

The transformer blocks are always timm's own ``VisionTransformer`` blocks: that is where the
modules live (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` of every block). The tiny ViT
only swaps the linear patch projection for a small convolutional stem: on the tiny world a plain
patch embedding stays at chance for hundreds of CPU steps, while the conv stem learns at once.

A backbone maps images to features: the CLS token after the final LayerNorm (``num_classes=0``),
as in the paper's code. Classification heads are separate modules (``compolab.heads``).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.layers import PatchEmbed
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from compolab.errors import CompolabError, ConfigError
from compolab.io import write_json, write_safetensors

__all__ = [
    "BackboneSpec",
    "TINY_VIT",
    "PAPER_VIT",
    "conv_stem",
    "ConvStemEmbed",
    "make_backbone",
    "load_backbone",
    "save_backbone",
    "shipped_checkpoint",
    "fingerprint",
    "tuned_weight_names",
    "is_pointwise",
    "theta0_of",
    "math_attention",
]


@dataclass(frozen=True)
class BackboneSpec:
    """Shape of a backbone; a frozen value that is stored in every checkpoint card.

    Attributes:
        timm_name: A timm model name (``vit_base_patch16_224.augreg_in21k``) or ``"conv_stem_vit"``
            for the tiny preset's ViT, built from timm's ``VisionTransformer``.
        img_size: Input side in pixels.
        patch_size: Token stride in pixels (the conv stem's total stride for the tiny ViT).
        embed_dim: Token width.
        depth: Number of transformer blocks.
        num_heads: Attention heads per block.
    """

    timm_name: str = "conv_stem_vit"
    img_size: int = 32
    patch_size: int = 8
    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 4

    def __post_init__(self) -> None:
        for field in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"BackboneSpec.{field} must be > 0, got {getattr(self, field)}")
        if self.embed_dim % self.num_heads:
            raise ConfigError("BackboneSpec.embed_dim must be a multiple of num_heads")


#: The tiny preset's backbone: conv-stem ViT, d=128, 6 blocks, 4 heads, 16 tokens at 32 px.
TINY_VIT = BackboneSpec()
#: The paper's backbone: ViT-B/16 with supervised ImageNet-21k (AugReg) pre-training.
PAPER_VIT = BackboneSpec(
    timm_name="vit_base_patch16_224.augreg_in21k",
    img_size=224,
    patch_size=16,
    embed_dim=768,
    depth=12,
    num_heads=12,
)


def conv_stem(embed_dim: int, stride: int) -> nn.Sequential:
    """Convolutional replacement of a ViT's linear patch projection.

    3×3 convolutions: 3 → 32 (stride 1) then stride-2 layers up to ``embed_dim``, so the token grid
    is ``img_size / stride`` per side. All but the last layer are conv + BatchNorm + ReLU.

    Args:
        embed_dim: Output channels (the ViT width).
        stride: Total stride, a power of two ≥ 2.

    Returns:
        The stem, mapping ``(B, 3, H, W)`` to ``(B, embed_dim, H / stride, W / stride)``.
    """
    if stride < 2 or stride & (stride - 1):
        raise ConfigError(f"conv stem stride must be a power of two >= 2, got {stride}")
    n_down = stride.bit_length() - 1
    widths = [32, 64, 96, 128, 160][:n_down]
    layers: list[nn.Module] = []
    c_in = 3
    for i, w in enumerate(widths):
        layers += [
            nn.Conv2d(c_in, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
        ]
        c_in = w
    layers.append(nn.Conv2d(c_in, embed_dim, 3, stride=2, padding=1))
    return nn.Sequential(*layers)


class ConvStemEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` (its ``proj`` replaced by :func:`conv_stem`) that also takes its own
    output: a ``(B, N, D)`` input is already stem tokens (:func:`compolab.stem.cache_stem`) and
    passes through; images ``(B, 3, H, W)`` go through the stem."""

    accepts_tokens = True

    def forward(self, x: Tensor) -> Tensor:
        return x if x.dim() == 3 else super().forward(x)


def make_backbone(
    spec: BackboneSpec = TINY_VIT, *, pretrained: bool = False, num_classes: int = 0
) -> nn.Module:
    """Build a backbone (features only, ``num_classes=0``) from its spec.

    Args:
        spec: The shape.
        pretrained: For a timm name, ask timm for its pre-trained weights (this **downloads**; only
            the paper preset does it). For the tiny ViT it must be False: use :func:`load_backbone`
            for the shipped checkpoint; the real-small CNN's weights come from
            :func:`compolab.real.load_efficientnet_lite0`.
        num_classes: A timm model's classifier (0: none, the features).

    Returns:
        A timm model in eval mode whose ``forward`` returns features (a ViT's CLS token; a CNN's
        pooled features).
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if spec.timm_name == "conv_stem_vit":
        if pretrained:
            raise ConfigError("the tiny ViT has no timm weights: use load_backbone() instead")
        model = VisionTransformer(
            img_size=spec.img_size,
            patch_size=spec.patch_size,
            num_classes=0,
            embed_dim=spec.embed_dim,
            depth=spec.depth,
            num_heads=spec.num_heads,
            embed_layer=ConvStemEmbed,
        )
        model.patch_embed.proj = conv_stem(spec.embed_dim, spec.patch_size)
    else:
        size = {"img_size": spec.img_size} if spec.timm_name.startswith("vit") else {}  # CNNs take any size
        model = timm.create_model(spec.timm_name, pretrained=pretrained, num_classes=num_classes, **size)
    return model.eval()


def tuned_weight_names(model: nn.Module) -> list[str]:
    """Names of the weights a module tunes: ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``.

    Taken from the model itself (every block, whatever the depth), never from a layer count. A
    model without ViT blocks (a CNN) tunes its pointwise convolutions instead: every ``Conv2d``
    with a 1×1 kernel, stride 1, no grouping and no bias (:func:`is_pointwise`), in model order.
    """
    suffixes = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")
    names = [n for n, _ in model.named_parameters() if n.startswith("blocks.") and n.endswith(suffixes)]
    return names or [f"{m}.weight" for m, mod in model.named_modules() if is_pointwise(mod)]


def is_pointwise(module: nn.Module) -> bool:
    """A 1×1 ``Conv2d`` (stride 1, one group, no padding, no bias): a linear map at every pixel."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.groups == 1 and module.padding in ((0, 0), "valid") and module.bias is None)


def theta0_of(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Detached clones of a model's named parameters: the anchor :math:`\\theta_0`.

    Args:
        model: The pre-trained model.
        names: Parameters to keep; default: all of them.

    Returns:
        ``name -> tensor``, independent of later changes to ``model``.

    Raises:
        ConfigError: Listing the names that are not parameters of ``model``.
    """
    params = dict(model.named_parameters())
    names = list(params) if names is None else list(names)
    missing = [n for n in names if n not in params]
    if missing:
        raise ConfigError(f"names not among the model's parameters: {missing}")
    return {n: params[n].detach().clone() for n in names}


def fingerprint(model: nn.Module | dict[str, torch.Tensor]) -> str:
    """sha256 of a model's parameters and buffers (names, shapes, dtypes and bytes), in name order."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def shipped_checkpoint() -> Path:
    """Path of the tiny ViT checkpoint shipped inside the package."""
    return Path(str(resources.files("compolab") / "assets" / "tiny_vit.safetensors"))


def load_backbone(path: str | Path | None = None) -> tuple[nn.Module, dict]:
    """Load a backbone checkpoint: safetensors weights plus the JSON card beside it.

    Args:
        path: A ``.safetensors`` file written by ``compolab pretrain``; default: the shipped one.

    Returns:
        ``(model, card)``: the backbone in eval mode and its card (spec, data seed, accuracy,
        sha256).

    Raises:
        CompolabError: If the file or its card is missing or does not match.
    """
    path = Path(path) if path is not None else shipped_checkpoint()
    card_path = path.with_suffix(".json")
    if not path.exists() or not card_path.exists():
        raise CompolabError(
            f"backbone checkpoint {path} (and its card {card_path.name}) not found; "
            "rebuild it with `compolab pretrain`"
        )
    card = json.loads(card_path.read_text())
    spec = BackboneSpec(**card["backbone"])
    model = make_backbone(spec)
    try:
        state = load_file(path)
    except Exception as e:  # safetensors raises several types for damaged files
        raise CompolabError(f"cannot read backbone checkpoint {path}: {e}") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CompolabError(
            f"backbone checkpoint {path} does not match its card: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    if card.get("sha256") and fingerprint(model) != card["sha256"]:
        raise CompolabError(f"backbone checkpoint {path} does not match the sha256 of its card")
    return model.eval(), card


def save_backbone(model: nn.Module, path: str | Path, card: dict) -> dict:
    """Write ``model``'s weights as safetensors and ``card`` (plus its sha256) as JSON, atomically.

    Returns:
        The card as written (with ``sha256``, the :func:`fingerprint` of the weights).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    card = {**card, "sha256": fingerprint(state)}
    write_safetensors(path, state, metadata={"compolab_format": "1", "kind": "backbone"})
    write_json(path.with_suffix(".json"), card)
    return card


@contextmanager
def math_attention(*modules: nn.Module) -> Iterator[None]:
    """Attention through plain differentiable ops, for forward-mode AD and double backward.

    Selects the MATH backend of ``scaled_dot_product_attention`` and sets ``fused_attn = False`` on
    every submodule of ``modules`` that has it (timm's ``Attention``), restoring the flags on exit.

    Args:
        modules: Models whose timm attention layers should skip the fused kernel.

    Examples:
        >>> from torch import nn
        >>> layer = nn.Module(); layer.fused_attn = True
        >>> with math_attention(layer):
        ...     print(layer.fused_attn)
        False
        >>> layer.fused_attn
        True
    """
    saved = [(m, m.fused_attn) for root in modules for m in root.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in saved:
            m.fused_attn = False
        with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
            # torch's own FutureWarning, raised once by the first forward-mode pass
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
            yield
    finally:
        for m, flag in saved:
            m.fused_attn = flag


def spec_dict(spec: BackboneSpec) -> dict:
    """The spec as a JSON-ready dict."""
    return asdict(spec)
