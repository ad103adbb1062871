"""Inference frees what it no longer needs: the channel mix of large maps runs in slices of rows, the
Cross-Channel Mix adds its residual in place, and the segmenter drops each feature map once the decoder has
used it. None of it may change a value: each is compared here with the training-mode computation."""
from __future__ import annotations

import pytest
import torch

from rwkvunet import RWKVUNetConfig, RWKVUNetForSemanticSegmentation
from rwkvunet.layers import ChannelMix, CrossChannelMix


def _randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.5, 1.0)


@pytest.mark.parametrize("batch", [1, 2])
def test_channel_mix_in_slices_of_rows_equals_the_whole(batch):
    torch.manual_seed(0)
    mix = ChannelMix(12).eval()
    _randomise(mix)
    grid = (9, 7)
    x = torch.randn(batch, 63, 12)
    with torch.enable_grad():
        want = mix(x, grid)  # the training-mode form, all tokens at once
    mix.hidden_chunk_elements = 2 * 7 * 24  # two rows of hidden values per slice
    with torch.no_grad():
        sliced = mix(x, grid)
        transposed = mix(x.transpose(1, 2).contiguous().transpose(1, 2), grid)  # tokens not contiguous
    assert torch.allclose(sliced, want, rtol=1e-5, atol=1e-5) and torch.equal(sliced, transposed)


def test_cross_channel_mix_in_inference_equals_training_form():
    torch.manual_seed(0)
    ccm = CrossChannelMix([8, 16, 24]).eval()
    _randomise(ccm)
    skips = [torch.randn(2, 8, 16, 12), torch.randn(2, 16, 8, 6), torch.randn(2, 24, 4, 3)]
    with torch.enable_grad():
        want = ccm(skips)
    with torch.no_grad():
        got = ccm(skips)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.allclose(g, w, rtol=1e-5, atol=1e-5)  # float32 rounding of other kernels


def test_segmenter_hidden_states_survive_the_freeing():
    torch.manual_seed(0)
    model = RWKVUNetForSemanticSegmentation(RWKVUNetConfig(variant="t", num_labels=2)).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
        plain = model(pixel_values=x).logits
        features = model.encoder.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
    assert torch.equal(out.logits, plain)
    assert all(torch.equal(h, f) for h, f in zip(out.hidden_states, features))
