"""Per-task heads: concatenation, global labels, class statistics and the pre-tuning."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from compolab.errors import ConfigError
from compolab.heads import ClassGaussians, IncrementalHead, new_head, pretune_heads


def test_new_head_is_a_clamped_small_normal_with_zero_bias():
    head = new_head(64, 10, generator=torch.Generator().manual_seed(0))
    assert head.weight.abs().max() <= 0.04 and torch.count_nonzero(head.bias) == 0
    assert 0.01 < float(head.weight.detach().std()) < 0.03  # std 0.02, clamped at two std


def test_incremental_head_concatenates_logits_and_predicts_global_labels():
    a, b = nn.Linear(2, 2), nn.Linear(2, 3)
    head = IncrementalHead([a, b], tasks=(0, 4), classes=[[10, 11], [40, 41, 42]])
    x = torch.randn(5, 2)
    assert_close(head(x), torch.cat([a(x), b(x)], dim=1))
    assert head.global_labels.tolist() == [10, 11, 40, 41, 42]
    columns = head(x).argmax(1)
    assert head.predict(x).tolist() == [[10, 11, 40, 41, 42][int(c)] for c in columns]


def test_incremental_head_refuses_classes_that_do_not_fit():
    with pytest.raises(ConfigError, match="2 outputs but 3 classes"):
        IncrementalHead([nn.Linear(2, 2)], classes=[[0, 1, 2]])
    with pytest.raises(ConfigError, match="one task id"):
        IncrementalHead([nn.Linear(2, 2)], tasks=(0, 1))


def test_class_gaussians_match_the_empirical_moments_and_sample_them():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 3, generator=gen) * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([5.0, 0.0, -1.0])
    labels = torch.tensor([7, 8] * 20)
    stats = ClassGaussians()
    stats.update(feats, labels)
    for c in (7, 8):
        f = feats[labels == c]
        assert_close(stats.means[c], f.mean(0))
        assert_close(stats.variances[c], f.var(0, unbiased=False) + 1e-6)
    synth, synth_labels = stats.sample([8], 4000, torch.Generator().manual_seed(1))
    assert synth.shape == (4000, 3) and set(synth_labels.tolist()) == {8}
    # 4000 draws: the sample mean is within 5 standard errors of the class mean
    stderr = float(stats.variances[8].max().sqrt()) / 4000**0.5
    assert (synth.mean(0) - stats.means[8]).abs().max() < 5 * stderr


def test_pretune_fits_the_new_head_and_leaves_its_input_alone():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(4)[:, :4] * 3  # four well separated classes, two tasks of two
    labels = torch.arange(4).repeat(30)
    feats = centres[labels] + 0.3 * torch.randn(len(labels), 4, generator=gen)
    stats = ClassGaussians()
    stats.update(feats, labels)
    before = IncrementalHead([new_head(4, 2, generator=gen), new_head(4, 2, generator=gen)])
    weights = [h.weight.clone() for h in before.heads]
    current = labels >= 2
    cpre = pretune_heads(before, stats, feats[current], labels[current], probe_epochs=20, probe_lr=0.5,
                         align_epochs=5, align_samples=32, seed=0)  # fmt: skip
    for h, w in zip(before.heads, weights, strict=True):
        assert torch.equal(h.weight, w)
    assert cpre is not before and not any(p.requires_grad for p in cpre.parameters())
    accuracy = float((cpre.predict(feats) == labels).float().mean())
    assert accuracy > 0.9  # chance is 0.25: probing and alignment separate every class
