import json

import pytest
import torch

from compolab.errors import CompolabError, ConfigError
from compolab.models import (
    TINY_VIT,
    BackboneSpec,
    fingerprint,
    load_backbone,
    make_backbone,
    shipped_checkpoint,
    tuned_weight_names,
)
from compolab.pretrain import save_backbone

SMALL = BackboneSpec(embed_dim=16, depth=2, num_heads=2)


def test_tiny_vit_contract():
    model = make_backbone(SMALL)
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    assert out.shape == (4, 16) and torch.isfinite(out).all()
    assert model.patch_embed.num_patches == 16
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_tuned_weight_names_follow_the_depth():
    for depth in (1, 3):
        names = tuned_weight_names(make_backbone(BackboneSpec(embed_dim=16, depth=depth, num_heads=2)))
        assert len(names) == 4 * depth
        assert names[:4] == [f"blocks.0.{n}.weight" for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def test_blocks_are_timms_own():
    from timm.models.vision_transformer import Block, VisionTransformer

    model = make_backbone(SMALL)
    assert isinstance(model, VisionTransformer)
    assert all(isinstance(b, Block) for b in model.blocks)


def test_bad_spec_names_the_field():
    with pytest.raises(ConfigError, match="depth"):
        BackboneSpec(depth=0)
    with pytest.raises(ConfigError, match="power of two"):
        make_backbone(BackboneSpec(patch_size=6, embed_dim=16, num_heads=2))


def test_save_load_roundtrip_and_fingerprint(tmp_path):
    model = make_backbone(SMALL)
    card = save_backbone(model, tmp_path / "b.safetensors", {"backbone": SMALL.__dict__})
    loaded, card2 = load_backbone(tmp_path / "b.safetensors")
    assert card2["sha256"] == card["sha256"] == fingerprint(model) == fingerprint(loaded)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_tampered_checkpoint_is_refused(tmp_path):
    model = make_backbone(SMALL)
    save_backbone(model, tmp_path / "b.safetensors", {"backbone": SMALL.__dict__})
    card = json.loads((tmp_path / "b.json").read_text())
    card["sha256"] = "0" * 64
    (tmp_path / "b.json").write_text(json.dumps(card))
    with pytest.raises(CompolabError, match="sha256"):
        load_backbone(tmp_path / "b.safetensors")
    (tmp_path / "b.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CompolabError, match="cannot read"):
        load_backbone(tmp_path / "b.safetensors")
    with pytest.raises(CompolabError, match="compolab pretrain"):
        load_backbone(tmp_path / "missing.safetensors")


def test_shipped_checkpoint_is_small_and_matches_its_card():
    path = shipped_checkpoint()
    assert path.exists(), "the tiny ViT must ship inside the package"
    assert path.stat().st_size <= 10 * 2**20
    model, card = load_backbone()
    assert card["backbone"] == TINY_VIT.__dict__
    assert card["sha256"] == fingerprint(model)
    for key in ("data_seed", "pretrain_val_accuracy", "probe_accuracy", "pretrain"):
        assert key in card
