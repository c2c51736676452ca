"""The fused DCU-chain kernel (engine/dcu_kernel.py) against the PyTorch fast form of the
same encoders (models/fastpath.FastEncoder) and, through it, the reference DCUs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_cscfusion.engine import dcu_kernel, load_model
from napari_cscfusion.models import fastpath
from napari_cscfusion.models.csc import CSCEncoder
from napari_cscfusion.models.ivfn import box_blur

from ._shared import DATA, grey, needs_shared, read

pytestmark = pytest.mark.skipif(not dcu_kernel.available(),
                                reason=f"DCU kernel: {dcu_kernel.unavailable_reason()}")


def torch_codes(enc, x: np.ndarray, first: np.ndarray | None = None) -> np.ndarray:
    with torch.inference_mode():
        xt = torch.from_numpy(x)[:, None]
        ft = None if first is None else torch.from_numpy(first)[:, None]
        return enc(xt, first_input=ft).numpy()


def scaled_close(got: np.ndarray, ref: np.ndarray, rel: float = 1e-5) -> None:
    """float32 rounding of reordered sums: the error relative to the codes' magnitude."""
    d = np.abs(got - ref).max()
    assert d <= rel * max(1.0, np.abs(ref).max()), (d, np.abs(ref).max())


def random_encoder(q: int, dcus: int, stem: bool, seed: int) -> CSCEncoder:
    """A CSC encoder (c = 1) with random weights, batch-norm statistics and thresholds >= 0."""
    torch.manual_seed(seed)
    enc = CSCEncoder(1, q, dcus, activation="sst", stem=stem,
                     stem_threshold_channels=1 if stem else None)
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, 0.3)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        for m in enc.modules():
            if hasattr(m, "theta"):
                m.theta.uniform_(0.0, 0.05)
    return enc.eval()


@pytest.mark.parametrize("shape,tile", [((2, 37, 45), 8), ((1, 19, 64), 64), ((3, 5, 7), 4)])
def test_chain_of_24_channels_with_a_stem_matches_the_torch_encoder(shape, tile):
    # CSC-MEFN's shape: stem conv 1 -> 24 (one threshold) and two DCUs
    enc = random_encoder(24, 2, stem=True, seed=1)
    fast = fastpath.FastEncoder(enc).eval()
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    ref = torch_codes(enc, x)
    scaled_close(torch_codes(fast, x), ref)  # the folding itself
    chain = dcu_kernel.DCUChain.from_fast_encoder(fast)
    assert (chain.q, chain.layers, chain.halo) == (24, 3, 4)
    got = dcu_kernel.encode_chain(chain, x, tile=tile)
    assert got.shape == (shape[0], 24, *shape[1:]) and got.dtype == np.float32
    scaled_close(got, ref)
    # the head projection: the codes' weighted channel sum, without the codes
    head = np.random.default_rng(1).normal(size=24).astype(np.float32)
    proj = dcu_kernel.encode_chain(chain, x, head=head, tile=tile)
    assert proj.shape == shape
    scaled_close(proj, np.einsum("c,nchw->nhw", head, ref))


@needs_shared
def test_ivf_encoders_match_on_a_tno_crop_for_any_tile():
    net = fastpath.with_clamped_thresholds(load_model("ivf").network)
    ir = grey(read(DATA / "ivf" / "tno" / "IR1.png"))[100:171, 200:283]
    vis = grey(read(DATA / "ivf" / "tno" / "VIS1.png"))[100:171, 200:283]
    x = np.stack([ir, vis]).astype(np.float32)
    low = box_blur(torch.from_numpy(x)[:, None])[:, 0].numpy()
    for which, first in (("base", low), ("detail", x - low)):
        ref = torch_codes(getattr(net, which), x, first)  # the reference encoder (CSCEncoder)
        fast = fastpath.FastEncoder(getattr(net, which))
        chain = dcu_kernel.DCUChain.from_fast_encoder(fast)
        assert (chain.q, chain.layers, bool(chain.prelu.all())) == (64, 8, which == "base")
        tiles = [dcu_kernel.encode_chain(chain, x, first, tile=t) for t in (16, 32, 128)]
        for got in tiles:
            scaled_close(got, ref)
        # tiles see their whole context: tile sizes agree to rounding
        np.testing.assert_allclose(tiles[0], tiles[2], atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("shape,tile,threads", [((2, 37, 45), 8, 1), ((3, 19, 64), 64, 2)])
def test_blocked_codes_are_the_codes_in_blocks_of_lanes(shape, tile, threads):
    # encode_chain(blocked=True) writes the codes channel-blocked for the saliency kernel:
    # the same values, 16 channels per block, the lanes past q (20 here) zero
    enc = fastpath.FastEncoder(random_encoder(20, 3, stem=False, seed=6))
    chain = dcu_kernel.DCUChain.from_fast_encoder(enc)
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    ref = dcu_kernel.encode_chain(chain, x, tile=tile, threads=threads)
    got = dcu_kernel.encode_chain(chain, x, tile=tile, threads=threads, blocked=True)
    lanes = dcu_kernel.SALIENCY_LANES
    assert got.shape == (shape[0], 2, *shape[1:], lanes)
    np.testing.assert_array_equal(got, dcu_kernel.to_blocks(ref))
    np.testing.assert_array_equal(got[:, 1, ..., 20 - lanes:], 0.0)
    np.testing.assert_array_equal(got[:, 0].transpose(0, 3, 1, 2), ref[:, :lanes])


@needs_shared
@pytest.mark.parametrize("crop,threads", [((slice(100, 197), slice(200, 323)), 1),
                                          ((slice(0, 64), slice(0, 768)), 2),
                                          ((slice(520, 576), slice(700, 768)), 2)])
def test_saliency_kernel_matches_the_rule_on_real_codes(crop, threads):
    # the saliency rule's kernel (blocks of 16 channels in the SIMD lanes, streamed rows)
    # against rules.saliency_rule (float32 numpy, and the float64 reference) on the
    # packaged network's base codes of TNO crops: odd sizes, the image's borders and corners
    from napari_cscfusion.engine.rules import saliency_rule

    net = fastpath.FastIVFN(load_model("ivf").network)
    x = np.stack([grey(read(DATA / "ivf" / "tno" / f"{n}1.png"))[crop]
                  for n in ("IR", "VIS")]).astype(np.float32)
    chain = dcu_kernel.DCUChain.from_fast_encoder(net.base)
    low = dcu_kernel.box_mean(x, 5)
    z = dcu_kernel.encode_chain(chain, x, low)
    zb = dcu_kernel.encode_chain(chain, x, low, blocked=True)
    scale = np.abs(z).max()
    ref_f, ref_w = saliency_rule(torch.from_numpy(z), mean_weights=True)
    ex_f, ex_w = saliency_rule(torch.from_numpy(z), mean_weights=True, exact=True)
    lo, hi = z.min(axis=(2, 3)), z.max(axis=(2, 3))
    for got_f, got_w in (dcu_kernel.saliency_fuse(z, lo, hi, None, 45, 0.01, threads),
                         dcu_kernel.saliency_fuse(zb, None, None, None, 45, 0.01, threads,
                                                  q=64)):
        assert got_f.shape == z.shape[1:] and got_w.shape == (2, 1, *z.shape[2:])
        np.testing.assert_allclose(got_w, ref_w.numpy(), atol=1e-5)
        np.testing.assert_allclose(got_f, ref_f.numpy(), atol=1e-5 * scale)
        np.testing.assert_allclose(got_w, ex_w.numpy(), atol=1e-4)
        np.testing.assert_allclose(got_f, ex_f.numpy(), atol=1e-4 * scale)


def test_saliency_kernel_pads_a_last_block_and_takes_tile_statistics():
    # q = 20: a second block of 4 channels and 12 padding lanes; constant channels; a tile's
    # statistics (wider extremes, given histograms); one and two threads agree
    from napari_cscfusion.engine.rules import SaliencyStats, saliency_rule

    rng = np.random.default_rng(7)
    z = rng.normal(size=(2, 20, 51, 73)).astype(np.float32)
    z[0, 3] = 0.25
    z[1, 17] = -1.0
    hist = rng.random((2, 20, 256))
    stats = SaliencyStats(torch.from_numpy(z.min(axis=(2, 3)) - 0.5),
                          torch.from_numpy(z.max(axis=(2, 3)) + 0.5),
                          torch.from_numpy(hist / hist.sum(-1, keepdims=True)))
    for st in (None, stats):
        ref_f, ref_w = saliency_rule(torch.from_numpy(z), stats=st, mean_weights=True)
        lo, hi = (z.min(axis=(2, 3)), z.max(axis=(2, 3))) if st is None else (
            st.lo.numpy(), st.hi.numpy())
        h = None if st is None else st.hist.numpy()
        outs = [dcu_kernel.saliency_fuse(z, lo, hi, h, 45, 0.01, threads=t) for t in (1, 2)]
        for f, w in outs:
            np.testing.assert_allclose(w, ref_w.numpy(), atol=1e-5)
            np.testing.assert_allclose(f, ref_f.numpy(), atol=1e-4)
        np.testing.assert_array_equal(outs[0][0], outs[1][0])
    with pytest.raises(ValueError, match="both sides > 45"):
        dcu_kernel.saliency_fuse(z[..., :45], None, None, None, 45, 0.01)


def test_bad_shapes_are_refused():
    enc = fastpath.FastEncoder(random_encoder(4, 2, stem=False, seed=2))
    chain = dcu_kernel.DCUChain.from_fast_encoder(enc)
    with pytest.raises(ValueError, match="x, x_first"):
        dcu_kernel.encode_chain(chain, np.zeros((1, 1, 8), np.float32))
    with pytest.raises(ValueError, match="head"):
        dcu_kernel.encode_chain(chain, np.zeros((1, 8, 8), np.float32), head=np.ones(3))


def test_ivf_steps_around_the_kernel_match_the_torch_rules():
    # the 11x11 low-pass, the l1 rule (activity from the kernel) and the saliency rule
    from napari_cscfusion.engine.rules import SaliencyStats, l1_rule, saliency_rule

    rng = np.random.default_rng(3)
    x = rng.random((2, 53, 61), dtype=np.float32)
    low = box_blur(torch.from_numpy(x)[:, None])[:, 0].numpy()
    np.testing.assert_allclose(dcu_kernel.box_mean(x, 5), low, atol=1e-6)
    enc = fastpath.FastEncoder(random_encoder(6, 3, stem=False, seed=4))
    z, absum = dcu_kernel.encode_chain(dcu_kernel.DCUChain.from_fast_encoder(enc), x, l1=True)
    scaled_close(absum, np.abs(z).sum(1))
    fused, w = l1_rule(torch.from_numpy(z))
    got = dcu_kernel.l1_fuse(z, absum)
    scaled_close(got[:6], fused.numpy())
    np.testing.assert_allclose(got[6:], w[:, 0].numpy(), atol=1e-6)
    # saliency: whole-image statistics from the codes, and given ones (a tile's)
    z = rng.normal(size=(2, 3, 60, 70)).astype(np.float32)
    ref_f, ref_w = saliency_rule(torch.from_numpy(z), mean_weights=True)
    f, w = dcu_kernel.saliency_fuse(z, z.min(axis=(2, 3)), z.max(axis=(2, 3)), None, 45, 0.01)
    assert w.shape == (2, 1, 60, 70)
    np.testing.assert_allclose(w, ref_w.numpy(), atol=1e-5)
    np.testing.assert_allclose(f, ref_f.numpy(), atol=1e-4)
    hist = rng.random((2, 3, 256))
    stats = SaliencyStats(torch.from_numpy(z.min(axis=(2, 3)) - 0.5),
                          torch.from_numpy(z.max(axis=(2, 3)) + 0.5),
                          torch.from_numpy(hist / hist.sum(-1, keepdims=True)))
    ref_f, ref_w = saliency_rule(torch.from_numpy(z), stats=stats, mean_weights=True)
    f, w = dcu_kernel.saliency_fuse(z, stats.lo.numpy(), stats.hi.numpy(),
                                    stats.hist.numpy(), 45, 0.01)
    np.testing.assert_allclose(w, ref_w.numpy(), atol=1e-5)
    np.testing.assert_allclose(f, ref_f.numpy(), atol=1e-4)


@pytest.mark.parametrize("shape", [(37, 45), (18, 80), (12, 30)])
def test_composite_decoder_matches_the_decoder_layers(shape):
    # CSC-IVFN's affine decoder as one 7x7 convolution inside, its layers on the edge strips
    # (engine/fast.py): the layers' values everywhere, borders included; a code gain too
    from napari_cscfusion.engine.fast import _composite_decode

    net = fastpath.FastIVFN(load_model("ivf").network).eval()
    decode = _composite_decode(net)
    rng = np.random.default_rng(5)
    z = torch.from_numpy(rng.normal(0, 0.3, (1, 64, *shape)).astype(np.float32))
    with torch.inference_mode():
        for scale in (None, 0.5):
            ref = net.decode_sum(z.clone(), scale)
            got = decode(z.clone(), scale)
            assert got.shape == ref.shape
            np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=2e-6)
