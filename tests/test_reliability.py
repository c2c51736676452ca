"""Reliability (issue 7), engine and CLI rows: bad input, faults and interruptions give clear
errors and lose nothing.

One section per row of the issue's table, then property-based tests (hypothesis) over dtypes,
shapes, numbers of sources and value ranges. Network runs stay small (at most 40x40 px, a few
examples each): the engine's checks are what is under test, not the networks' speed. What
test_engine_api.py / test_cli.py already cover is not repeated here.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import stat
import warnings

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_cscfusion import fuse_exposures, fuse_guided, fuse_infrared_visible, load_model
from napari_cscfusion.cli import main
from napari_cscfusion.engine import available_devices
from napari_cscfusion.engine.inputs import normalise
from napari_cscfusion.engine.io import read_image, read_tiff_metadata, write_tiff
from napari_cscfusion.engine.registry import packaged_weights_path
from napari_cscfusion.models.checkpoints import CheckpointError, save_checkpoint

from ._shared import CKPT, MMF_AUTHORS_GEOMETRY, missing

# A few examples per dtype in CI (the dtypes are parametrised so that every one is tried:
# hypothesis alone draws the rarer combinations seldom); CSCFUSION_PROPERTY_EXAMPLES=100 for a
# long bug hunt.
EXAMPLES = int(os.environ.get("CSCFUSION_PROPERTY_EXAMPLES", 3))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
PROPERTY_CHEAP = settings(PROPERTY, max_examples=2 * EXAMPLES)


def model(task: str):
    """The authors' weights (../shared), else the packaged ones; skip when neither exists."""
    if CKPT.is_dir():
        from ._shared import authors_model

        return authors_model(task)
    if packaged_weights_path(task).is_file():
        return load_model(task)
    pytest.skip(f"no weights for {task!r} (neither {CKPT} nor packaged {task}.pt)")


def frozen(a):
    """A read-only copy of ``a`` (any in-place write raises) and a second copy to compare."""
    a = np.array(a, copy=True)
    before = a.copy()
    a.flags.writeable = False
    return a, before


def assert_unchanged(pairs):
    for a, before in pairs:
        assert a.dtype == before.dtype and a.shape == before.shape
        np.testing.assert_array_equal(a, before)


def check_image(img, shape):
    assert isinstance(img, np.ndarray) and img.dtype == np.float32
    assert img.shape == shape
    assert np.isfinite(img).all()
    assert img.min() >= 0.0 and img.max() <= 1.0


def png(path, array):
    import imageio.v3 as iio

    iio.imwrite(path, array)
    return str(path)


RNG = np.random.default_rng(7)


# --- sources of different shapes ----------------------------------------------------------

@pytest.mark.parametrize("ir_shape,vis_shape", [
    ((7, 9), (9, 7)),  # odd sizes, transposed
    ((2, 12, 12), (12, 12)),  # a stack and one plane
    ((12, 12), (12, 12, 3)),  # one grey, one RGB
])
def test_ivf_mismatched_shapes_are_refused_before_loading_weights(ir_shape, vis_shape):
    ir, ir0 = frozen(RNG.random(ir_shape))
    vis, vis0 = frozen(RNG.random(vis_shape))
    # model=None: the check comes before the (packaged) weights are looked for
    with pytest.raises(ValueError) as info:
        fuse_infrared_visible(ir, vis, device="cpu")
    msg = str(info.value)
    if len(vis_shape) == 3 and vis_shape[-1] == 3:
        # a colour source is named as such (CSC-IVFN fuses grey images)
        assert msg.startswith("vis:") and str(vis_shape) in msg and "grey" in msg
    else:
        assert str(ir_shape) in msg and str(vis_shape) in msg
    assert_unchanged([(ir, ir0), (vis, vis0)])


def test_mef_list_of_frames_of_different_shapes_names_them():
    frames = [RNG.random((10, 12)), RNG.random((10, 13)), RNG.random((10, 12))]
    with pytest.raises(ValueError, match=r"stack\[0\] \(10, 12\), stack\[1\] \(10, 13\)"):
        fuse_exposures(frames, device="cpu")  # refused before any weights are loaded


def test_cli_mismatched_shapes_name_both(tmp_path, capsys):
    a = png(tmp_path / "ir.png", (RNG.random((20, 24)) * 255).astype(np.uint8))
    b = png(tmp_path / "vis.png", (RNG.random((21, 24)) * 255).astype(np.uint8))
    out = tmp_path / "out.tif"
    assert main(["fuse", "ivf", a, b, "-o", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "(20, 24)" in err and "(21, 24)" in err
    assert not out.exists()
    with pytest.raises(SystemExit, match=r"ir.png \(20, 24\).*vis.png \(21, 24\)"):
        main(["fuse", "mef", a, b, "-o", str(out)])
    assert not out.exists()


# --- dtypes: the documented normalisation, end to end ---------------------------------------

def _as(dtype, values):
    return np.asarray(values).astype(dtype)


_GRID = np.linspace(0, 1, 144).reshape(12, 12)
NORMALISATION_CASES = [
    # (input, what the engine must turn it into, word in the metadata note)
    (_as(np.uint8, _GRID * 255), _as(np.uint8, _GRID * 255) / 255, "uint8 maximum"),
    (_as(np.uint16, _GRID * 60000), _as(np.uint16, _GRID * 60000) / 65535, "uint16 maximum"),
    (_as(np.int16, _GRID * 3000 - 1024), (_GRID * 3000 - 1024).astype(np.int16).astype(float),
     "min-max"),  # CT-like Hounsfield units: negatives -> min-max
    (_as(np.int16, _GRID * 3000), _as(np.int16, _GRID * 3000) / 32767, "int16 maximum"),
    (_as(np.int32, _GRID * 1e9), _as(np.int32, _GRID * 1e9) / 2147483647, "int32 maximum"),
    (_as(np.int32, _GRID * 1e9 - 5e8), (_GRID * 1e9 - 5e8).astype(np.int32).astype(float),
     "min-max"),
    (_as(np.float16, _GRID), _as(np.float16, _GRID).astype(float), "as is"),
    (_as(np.float32, _GRID * 7 - 2), (_GRID * 7 - 2).astype(np.float32).astype(float),
     "min-max"),
    (_as(np.float64, _GRID), _GRID, "as is"),
]


@pytest.mark.parametrize("array", [c[0] for c in NORMALISATION_CASES] + [
    np.array([[-1.7e308, 0.0], [1.0, 1.7e308]]),  # a span beyond float64: halved first
    np.full((3, 4), 7, np.int16) * -1,  # constant -> zeros
], ids=lambda v: str(v.dtype))
def test_crops_normalised_on_demand_equal_the_whole_image_normalisation(array):
    """fuse_infrared_visible converts the crops the tiles read (NormalisedStack) instead of
    copying the sources whole: every crop holds exactly normalise()'s values."""
    from napari_cscfusion.engine.inputs import NormalisedStack, normalise, normaliser

    whole = normalise(array, "ir").data
    stack = NormalisedStack([normaliser(array, "ir"), normaliser(array[::-1], "vis")])
    assert stack.shape == (2, *array.shape)
    np.testing.assert_array_equal(stack[:, 1:3, 0:2],
                                  np.stack([whole[1:3, 0:2], normalise(array[::-1], "v")
                                            .data[1:3, 0:2]]))
    np.testing.assert_array_equal(stack[0], whole)
    assert stack[:, :, :].dtype == np.float32 and np.isfinite(whole).all()
    plane = NormalisedStack([normaliser(np.stack([array, array]), "ir")]).plane((1,))
    np.testing.assert_array_equal(plane[0], whole)


@pytest.mark.parametrize("array,expected,note", NORMALISATION_CASES,
                         ids=lambda v: str(v.dtype) if isinstance(v, np.ndarray) else None)
def test_every_dtype_is_fused_as_its_documented_normalisation(array, expected, note):
    if "min-max" in note:
        expected = (expected - expected.min()) / (expected.max() - expected.min())
    vis = np.asarray(RNG.random((12, 12)), np.float32)
    m = model("ivf")
    ir, ir0 = frozen(array)
    got = fuse_infrared_visible(ir, vis, model=m, base_rule="l1", device="cpu")
    want = fuse_infrared_visible(expected.astype(np.float32), vis, model=m, base_rule="l1",
                                 device="cpu")
    check_image(got.image, (12, 12))
    np.testing.assert_allclose(got.image, want.image, atol=1e-6)
    assert note in got.metadata["normalisation"]["ir"]
    assert_unchanged([(ir, ir0)])


@pytest.mark.parametrize("dtype,word", [(bool, "boolean"), (np.complex64, "complex"),
                                        (object, "numeric"), ("U3", "numeric")])
def test_bool_complex_and_non_numbers_are_type_errors_naming_the_argument(dtype, word):
    bad = np.ones((12, 12), dtype)
    good = RNG.random((12, 12))
    calls = [
        ("vis", lambda: fuse_infrared_visible(good, bad, model=model("ivf"), device="cpu")),
        ("stack", lambda: fuse_exposures(np.stack([bad, bad]), model=model("mef"),
                                         device="cpu")),
        ("guide", lambda: fuse_guided(
            np.ones((model("mmf").network.lr_channels, 6, 6)), np.stack([bad] * 3, -1),
            model=model("mmf"), device="cpu")),
    ]
    for name, call in calls:
        with pytest.raises(TypeError, match=word) as info:
            call()
        assert str(info.value).startswith(f"{name}:")


# --- NaN / Inf --------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("target", ["ir", "vis", "stack", "low_res", "guide"])
def test_nan_and_inf_are_refused_naming_the_argument(bad, dtype, target):
    def img(shape, name):
        a = RNG.random(shape).astype(dtype)
        if name == target:
            a[(1,) * a.ndim] = bad
        return a

    with pytest.raises(ValueError, match="NaN or infinite") as info:
        if target in ("ir", "vis"):
            fuse_infrared_visible(img((12, 12), "ir"), img((12, 12), "vis"), model=model("ivf"),
                                  device="cpu")
        elif target == "stack":
            fuse_exposures(img((3, 12, 12, 3), "stack"), model=model("mef"), device="cpu")
        else:
            c = model("mmf").network.lr_channels  # 31 (authors'), 1 (packaged)
            fuse_guided(img((c, 6, 6) if c > 1 else (6, 6), "low_res"), img((12, 12, 3), "guide"),
                        model=model("mmf"), device="cpu")
    assert str(info.value).startswith(f"{target}:")


def test_cli_nan_tiff_is_a_clear_error(tmp_path, capsys):
    a = RNG.random((16, 16)).astype(np.float32)
    a[3, 4] = np.nan
    tifffile.imwrite(tmp_path / "ir.tif", a)
    tifffile.imwrite(tmp_path / "vis.tif", RNG.random((16, 16)).astype(np.float32))
    out = tmp_path / "out.tif"
    rc = main(["fuse", "ivf", str(tmp_path / "ir.tif"), str(tmp_path / "vis.tif"), "-o",
               str(out), "--device", "cpu"]
              + (["--weights", str(CKPT)] if CKPT.is_dir() else []))
    assert rc == 2
    assert "ir: contains 1 NaN or infinite pixel" in capsys.readouterr().err
    assert not out.exists()


# --- too small ----------------------------------------------------------------------------

@pytest.mark.parametrize("call,minimum", [
    (lambda: fuse_infrared_visible(np.ones((2, 2)), np.ones((2, 2)), model=model("ivf")),
     "ir: images must be at least 6x6 pixels"),
    (lambda: fuse_infrared_visible(np.ones((5, 40)), np.ones((5, 40)), model=model("ivf")),
     "at least 6x6.*got 5x40"),
    (lambda: fuse_exposures(np.ones((3, 2, 1)), model=model("mef")),
     "stack: images must be at least 2x2 pixels.*got 2x1"),
    (lambda: fuse_exposures(np.ones((3, 1, 1, 3)), model=model("mef")), "at least 2x2"),
    (lambda: fuse_guided(np.ones((model("mmf").network.lr_channels, 2, 2)), np.ones((8, 8)),
                         model=model("mmf")), "low_res: images must be at least 4x4.*got 2x2"),
])
def test_too_small_images_state_the_minimum(call, minimum):
    with pytest.raises(ValueError, match=minimum):
        call()


def test_the_minimum_sizes_themselves_work():
    for rule in ("saliency", "l1", "average"):
        r = fuse_infrared_visible(RNG.random((6, 7)), RNG.random((6, 7)), model=model("ivf"),
                                  base_rule=rule, detail_rule=rule, device="cpu")
        check_image(r.image, (6, 7))
    check_image(fuse_exposures(RNG.random((3, 2, 2)), model=model("mef"), device="cpu").image,
                (2, 2))
    check_image(fuse_exposures(RNG.random((2, 2, 3, 3)), model=model("mef"),
                               device="cpu").image, (2, 3, 3))
    c = model("mmf").network.lr_channels
    for guide in ((4, 4), (4, 4, 3), (9, 7, 3)):  # same size, and a non-integer scale
        r = fuse_guided(RNG.random((c, 4, 4)), RNG.random(guide), model=model("mmf"),
                        device="cpu")
        check_image(r.image, (c, *guide[:2]))


def test_cli_too_small_images(tmp_path, capsys):
    a = png(tmp_path / "a.png", np.full((2, 2), 9, np.uint8))
    b = png(tmp_path / "b.png", np.full((2, 2), 200, np.uint8))
    rc = main(["fuse", "ivf", a, b, "-o", str(tmp_path / "o.tif"), "--device", "cpu"])
    assert rc == 2 and "at least 6x6" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


# --- one exposure, many exposures -----------------------------------------------------------

@pytest.mark.parametrize("stack", [np.ones((1, 8, 8)), np.ones((1, 8, 8, 3)), [np.ones((8, 8))]],
                         ids=["grey", "rgb", "list"])
def test_a_single_exposure_is_refused(stack):
    with pytest.raises(ValueError, match="stack: at least 2 exposures are needed, got 1"):
        fuse_exposures(stack, model=model("mef"), device="cpu")


def test_cli_single_exposure(tmp_path):
    one = png(tmp_path / "e.png", np.full((8, 8, 3), 90, np.uint8))
    with pytest.raises(SystemExit, match="at least two exposures"):
        main(["fuse", "mef", one, "-o", str(tmp_path / "o.tif")])
    tifffile.imwrite(tmp_path / "one_page.tif", np.full((1, 8, 8), 9, np.uint8))
    with pytest.raises(SystemExit, match="at least two exposures"):
        main(["fuse", "mef", str(tmp_path / "one_page.tif"), "-o", str(tmp_path / "o.tif")])
    assert not (tmp_path / "o.tif").exists()
    # a multi-page TIFF is a whole bracket
    tifffile.imwrite(tmp_path / "bracket.tif", (RNG.random((3, 8, 8)) * 255).astype(np.uint8))
    args = ["fuse", "mef", str(tmp_path / "bracket.tif"), "-o", str(tmp_path / "o.tif"), "-q",
            "--device", "cpu"]
    if CKPT.is_dir():
        args += ["--weights", str(CKPT / "csc_mefn_authors.pth")]
    else:  # the packaged weights ship with the package (test_packaged_weights)
        assert packaged_weights_path("mef").is_file()
    assert main(args) == 0
    assert tifffile.imread(tmp_path / "o.tif").shape == (8, 8)


def _mef_reference(stack: np.ndarray, net) -> np.ndarray:
    """Softmax over exposures of the network's logits, computed one exposure at a time, plus
    the global exposure prior of weights trained with one (the packaged ones): a logit of
    -(m - 0.5)^2 / (2 sigma^2) from each exposure's mean m over the whole image."""
    with torch.inference_mode():
        y = torch.from_numpy(stack.astype(np.float32))[:, None]
        logits = torch.cat([net.logits(y[i:i + 1]) for i in range(len(y))])
        if net.prior_sigma:
            means = y.double().mean((1, 2, 3))
            prior = -(means - 0.5) ** 2 / (2 * net.prior_sigma ** 2)
            logits = logits + prior.float()[:, None, None, None]
        w = torch.softmax(logits[:, 0], 0)
        return (w * y[:, 0]).sum(0).clamp(0, 1).numpy()


def test_forty_exposures_match_a_one_exposure_at_a_time_reference():
    stack = RNG.random((40, 24, 20)).astype(np.float32) * np.linspace(0.05, 1, 40)[:, None, None]
    m = model("mef")
    r = fuse_exposures(stack, model=m, device="cpu")
    check_image(r.image, (24, 20))
    np.testing.assert_allclose(r.image, _mef_reference(stack, m.network), atol=2e-5)
    np.testing.assert_allclose(r.weights["exposures"].sum(0), 1, atol=1e-5)


def test_many_exposures_are_processed_in_chunks_that_fit_the_memory_budget(monkeypatch):
    """More exposures than fit the budget: the engine works on pieces whose network input stays
    within the budget, and the result equals the one-piece result."""
    from napari_cscfusion.engine import tiling

    stack = RNG.random((40, 72, 64)).astype(np.float32)
    m = model("mef")
    whole = fuse_exposures(stack, model=m, device="cpu", tile=0).image
    q = m.network.hparams["code_channels"]
    assert 40 * q * 72 * 64 * 4 > 12e6  # the whole stack's codes would not fit the budget
    budget = 8_000_000
    monkeypatch.setattr(tiling, "available_memory", lambda device: budget)
    biggest = []
    real = F.conv2d

    def conv2d(x, *args, **kwargs):
        biggest.append(x.numel() * x.element_size())
        return real(x, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", conv2d)
    chunked = fuse_exposures(stack, model=m, device="cpu")
    monkeypatch.undo()
    assert biggest and max(biggest) <= budget
    np.testing.assert_allclose(chunked.image, whole, atol=1e-6)


# --- checkpoints ----------------------------------------------------------------------------

def _our_checkpoint(tmp_path, task="mef"):
    return save_checkpoint(model(task).network, tmp_path / f"ours_{task}.pt", task)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("which", ["authors", "ours"])
def test_truncated_checkpoints_name_the_file(tmp_path, fraction, which):
    src = CKPT / "csc_mefn_authors.pth" if which == "authors" else _our_checkpoint(tmp_path)
    if not src.is_file():
        pytest.skip(missing("reference-checkpoints/csc_mefn_authors.pth"))
    data = src.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match=r"cut\.pth.*(not a readable|state dict)"):
        load_model("mef", cut)


@pytest.mark.parametrize("task,other", [("mef", "mmf"), ("mmf", "mef"), ("ivf", "mef"),
                                        ("ivf", "mmf"), ("mef", "ivf"), ("mmf", "ivf")])
def test_a_checkpoint_for_another_task_says_what_was_expected(tmp_path, task, other):
    """Every (file's task, requested task) pair, for the authors' files and our format."""
    authors = {"mef": CKPT / "csc_mefn_authors.pth", "mmf": CKPT / "csc_mmfn_authors.pth",
               "ivf": CKPT}
    if not CKPT.is_dir():
        pytest.skip(missing("reference-checkpoints/"))
    with pytest.raises(CheckpointError) as info:
        load_model(task, authors[other])
    msg = str(info.value)
    assert str(authors[other].name) in msg and repr(task) in msg
    ours = _our_checkpoint(tmp_path, other)
    with pytest.raises(CheckpointError, match=rf"{ours.name}.*task '{other}', expected "
                                              rf"'{task}'"):
        load_model(task, ours)


@pytest.mark.parametrize("content,words", [
    (b"", "not a readable PyTorch checkpoint"),
    (b"\x89PNG\r\n\x1a\n" + bytes(200), "not a readable PyTorch checkpoint"),
    (b"PK\x03\x04" + bytes(range(256)) * 4, "not a readable PyTorch checkpoint"),
    ("tensor", "holds a Tensor, expected a state dict"),
    ("list", "holds a list, expected a state dict"),
    ({"format": "napari-cscfusion", "task": "mef"}, "no usable state dict"),
    ({"format": "napari-cscfusion", "task": "mef", "state_dict": [1, 2]}, "no usable state"),
    ({"format": "napari-cscfusion", "task": "mef", "state_dict": {"a": 3}}, "no usable state"),
    ({"format": "napari-cscfusion", "task": "mef",
      "state_dict": {"encoder.stem.conv.weight": torch.zeros(())}}, "wrong rank"),
    ({"conv.weight": torch.zeros(3, 3)}, "neither a napari-cscfusion checkpoint"),
])
def test_files_that_are_not_checkpoints(tmp_path, content, words):
    p = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        torch.save({"tensor": torch.zeros(3), "list": [torch.zeros(3)]}.get(content, content)
                   if isinstance(content, str) else content, p)
    with pytest.raises(CheckpointError, match=words) as info:
        load_model("mef", p)
    assert "weights.pth" in str(info.value)


def test_a_folder_or_a_missing_file_for_a_single_file_task(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder.*one checkpoint file"):
        load_model("mmf", tmp_path)
    with pytest.raises(CheckpointError, match="nope.pth.*does not exist"):
        load_model("mef", tmp_path / "nope.pth")


class _Payload:
    """Unpickling this would create the marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch.save zip", "legacy pickle", "in our header"])
def test_pickled_code_in_a_checkpoint_never_runs(tmp_path, how):
    marker = tmp_path / "code_ran"
    p = tmp_path / "evil.pt"
    if how == "torch.save zip":
        torch.save({"weight": _Payload(marker)}, p)
    elif how == "legacy pickle":
        p.write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    else:  # a real checkpoint of ours whose header carries the payload
        path = _our_checkpoint(tmp_path)
        payload = torch.load(path, weights_only=True)
        payload["training"] = {"note": _Payload(marker)}
        torch.save(payload, p)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="evil.pt.*not a readable"):
        load_model("mef", p)
    assert not marker.exists()
    # the same through the CLI
    rc = main(["fuse", "mef", "x.png", "y.png", "-o", str(tmp_path / "o.tif"), "--weights",
               str(p)])
    assert rc == 2 and not marker.exists()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_byte_damage_gives_a_checkpoint_error_or_a_model(tmp_path, data):
    """Flipped bytes anywhere in a checkpoint: CheckpointError naming the file or (damage in
    the tensor data, which a zip does not checksum) a loaded model; never another exception."""
    src = CKPT / "csc_mefn_authors.pth"
    if not src.is_file():
        src = _our_checkpoint(tmp_path)
    raw = bytearray(src.read_bytes())
    n_flips = data.draw(st.integers(1, 8), label="n_flips")
    for _ in range(n_flips):
        i = data.draw(st.integers(0, len(raw) - 1), label="offset")
        raw[i] ^= data.draw(st.integers(1, 255), label="xor")
    p = tmp_path / "damaged.pth"
    p.write_bytes(bytes(raw))
    try:
        m = load_model("mef", p)
    except CheckpointError as exc:
        assert "damaged.pth" in str(exc)
    else:
        assert m.task == "mef"
        # the file's own network, not another one: same tensors, and a flipped byte changes
        # at most one value (not, say, the packaged weights loaded in its place)
        want = load_model("mef", src).network.state_dict()
        got = m.network.state_dict()
        assert list(got) == list(want)
        assert all(got[k].shape == want[k].shape for k in want)
        changed = sum(int((got[k] != want[k]).sum()) for k in want if want[k].numel())
        assert changed <= n_flips, changed


def test_cli_reports_a_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "half.pth"
    bad.write_bytes(b"PK\x03\x04 half a zip")
    a = png(tmp_path / "a.png", np.full((8, 8), 9, np.uint8))
    rc = main(["fuse", "mef", a, a, "-o", str(tmp_path / "o.tif"), "--weights", str(bad)])
    assert rc == 2
    assert "half.pth" in capsys.readouterr().err
    assert not (tmp_path / "o.tif").exists()


# --- devices ------------------------------------------------------------------------------

def _missing_devices():
    out = []
    if not torch.cuda.is_available():
        out += ["cuda", "cuda:0"]
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        out.append("mps")
    return out or ["cuda:99"]


@pytest.mark.parametrize("device", _missing_devices())
def test_a_missing_device_is_an_error_listing_the_available_ones(device):
    listing = ", ".join(available_devices())
    c = model("mmf").network.lr_channels
    calls = [
        lambda: fuse_infrared_visible(RNG.random((8, 8)), RNG.random((8, 8)),
                                      model=model("ivf"), device=device),
        lambda: fuse_exposures(RNG.random((2, 8, 8)), model=model("mef"), device=device),
        lambda: fuse_guided(RNG.random((c, 4, 4)), RNG.random((8, 8)), model=model("mmf"),
                            device=device),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="not available on this machine") as info:
            call()
        assert f"available: {listing}" in str(info.value)


def test_cli_missing_device(tmp_path, capsys):
    a = png(tmp_path / "a.png", np.full((8, 8), 9, np.uint8))
    args = ["fuse", "mef", a, a, "-o", str(tmp_path / "o.tif"), "--device",
            _missing_devices()[0]]
    if CKPT.is_dir():
        args += ["--weights", str(CKPT / "csc_mefn_authors.pth")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not available" in err and "cpu" in err
    assert not (tmp_path / "o.tif").exists()


# --- GPU out of memory ----------------------------------------------------------------------

def _oom_above(monkeypatch, pixels: int, device_type: str | None = None):
    """Make every convolution on more than ``pixels`` pixels (on ``device_type``, or anywhere)
    raise CUDA out-of-memory, as a too-large tile on a small GPU would.

    The encoders run on whole crops, as on a GPU: on the CPU they work on cache-sized pieces
    (``INNER_TILE``), whose convolutions would never reach the simulated limit."""
    from napari_cscfusion.engine import ivf, mef

    for module in (ivf, mef):
        monkeypatch.setitem(module.INNER_TILE, "cpu", None)
    real = F.conv2d
    calls = {"oom": 0}

    def conv2d(x, *args, **kwargs):
        on = device_type is None or x.device.type == device_type
        if on and x.shape[-2] * x.shape[-1] > pixels:
            calls["oom"] += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate (simulated)")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", conv2d)
    return calls


def _oom_cases():
    # (name, inputs, kwargs, side): the whole image is side x side; crops of half the image plus
    # the kernels' halo stay below the simulated limit
    ivf = (RNG.random((128, 128)), RNG.random((128, 128)))
    mef = (RNG.random((3, 160, 160)),)
    return [("ivf", ivf, {"base_rule": "l1"}, 128), ("mef", mef, {}, 160)]


@pytest.mark.parametrize("task,inputs,kwargs,side", _oom_cases(), ids=["ivf", "mef"])
def test_out_of_memory_is_retried_with_smaller_tiles(monkeypatch, task, inputs, kwargs, side):
    fuse = fuse_infrared_visible if task == "ivf" else fuse_exposures
    m = model(task)
    want = fuse(*inputs, model=m, device="cpu", tile=0, **kwargs).image
    calls = _oom_above(monkeypatch, side * side - 1)
    with pytest.warns(RuntimeWarning, match="out of memory on cpu"):
        got = fuse(*inputs, model=m, device="cpu", tile=0, **kwargs).image
    assert calls["oom"] >= 1  # the whole-image attempt did run out of memory
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("lazy", [False, True], ids=["in-memory", "dask"])
def test_out_of_memory_in_the_statistics_pass_is_measured_in_parts(monkeypatch, lazy):
    """Saliency rule, several tiles: a statistics tile (base codes of a tile, for the
    whole-image extremes and histograms; in memory, or a dask task) whose crop does not fit
    is measured in quarters instead of failing the run; the combined statistics, hence the
    image, are those of a run that fits."""
    import dask
    import dask.array as da

    from napari_cscfusion import OutOfMemoryRetry
    from napari_cscfusion.engine import ivf

    ir, vis = RNG.random((128, 128)), RNG.random((128, 128))
    want = fuse_infrared_visible(ir, vis, model=model("ivf"), device="cpu", tile=64).image
    real, too_big = ivf.IVFKernel.stats_codes, []

    def stats_codes(self, which, crop, core):  # only the statistics passes encode here
        if crop.shape[-2] * crop.shape[-1] > 80 * 80:  # 64 px cores + 20 px halo: 84 px
            too_big.append(crop.shape)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. (simulated)")
        return real(self, which, crop, core)

    monkeypatch.setattr(ivf.IVFKernel, "stats_codes", stats_codes)
    if lazy:
        ir, vis = da.from_array(ir, chunks=64), da.from_array(vis, chunks=64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with dask.config.set(scheduler="synchronous"):
            got = np.asarray(fuse_infrared_visible(ir, vis, model=model("ivf"), device="cpu",
                                                   tile=64).image)
    assert len(too_big) == 8  # 4 tiles, 2 passes
    assert any(issubclass(w.category, OutOfMemoryRetry) and "saliency statistics" in
               str(w.message) for w in record)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["ivf", "mef"])
def test_out_of_memory_in_a_lazy_tile_task_is_retried_with_smaller_tiles(monkeypatch, task):
    """dask in: a tile task whose crop does not fit is split inside the task (same values as
    the in-memory run, and the OutOfMemoryRetry warning from the task)."""
    import dask
    import dask.array as da

    from napari_cscfusion import OutOfMemoryRetry

    if task == "ivf":
        ir, vis = RNG.random((128, 128)), RNG.random((128, 128))
        want = fuse_infrared_visible(ir, vis, model=model("ivf"), base_rule="l1",
                                     device="cpu", tile=0).image
        # the 64 px tiles' crops (88 px: core + the 24 px halo, + 10 px padding of the 11x11
        # blur) do not fit, the 32 px tiles' (at most 80 + 10 px) do
        calls = _oom_above(monkeypatch, 9000)
        lazy = fuse_infrared_visible(da.from_array(ir, chunks=64), da.from_array(vis, chunks=64),
                                     model=model("ivf"), base_rule="l1", device="cpu", tile=64)
    else:
        stack = RNG.random((3, 128, 128))
        want = fuse_exposures(stack, model=model("mef"), device="cpu", tile=0).image
        calls = _oom_above(monkeypatch, 50 * 50)
        lazy = fuse_exposures(da.from_array(stack, chunks=(3, 64, 64)), model=model("mef"),
                              device="cpu", tile=64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with dask.config.set(scheduler="synchronous"):  # warnings are recorded per thread
            got = lazy.image.compute()
    assert calls["oom"] >= 4  # every 64 px tile task ran out of memory first
    assert any(issubclass(w.category, OutOfMemoryRetry) and "out of memory" in str(w.message)
               for w in record)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("weights", ["packaged", "bicubic input", "authors"])
def test_out_of_memory_in_a_lazy_guided_tile_task_is_fused_in_parts(monkeypatch, weights):
    """dask in, CSC-MMFN: a tile task whose low-res and guide crops do not fit is fused in
    quarters inside the task, each from its part of both crops (the values of the in-memory
    run with those tiles, and the OutOfMemoryRetry warning). Packaged weights (low_res_detail
    geometry): their own kernel; the previous packaged file: the low-res input is bicubically
    upsampled in the task first; the authors': it stays at low resolution."""
    import dask
    import dask.array as da

    from napari_cscfusion import OutOfMemoryRetry
    from napari_cscfusion.engine import mmf
    from napari_cscfusion.engine.mmf_lowres import LowResMMFKernel

    if weights == "authors" and not CKPT.is_dir():
        pytest.skip(missing("reference-checkpoints/"))
    m = {"packaged": lambda: load_model("mmf"),
         "bicubic input": lambda: load_model("mmf", MMF_AUTHORS_GEOMETRY),
         "authors": lambda: model("mmf")}[weights]()
    kernel = LowResMMFKernel if weights == "packaged" else mmf.MMFKernel
    c = m.network.lr_channels
    low = RNG.random((c, 32, 32)).astype(np.float32)
    guide = RNG.random((128, 128) if m.network.guide_channels == 1 else (128, 128, 3))
    # the parts are the 32 px tiles of an in-memory run
    want = fuse_guided(low, guide, model=m, device="cpu", tile=32).image
    real, too_big = kernel.__call__, []

    def call(self, crop, core, stats=None, tick=None):
        g = crop[1]
        if g.shape[-2] * g.shape[-1] > 70 * 70:  # 64 px cores + context: ~90 px; 32 px: ~58
            too_big.append(g.shape)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. (simulated)")
        return real(self, crop, core, stats, tick)

    monkeypatch.setattr(kernel, "__call__", call)
    lazy = fuse_guided(da.from_array(low, chunks=(c, 16, 16)), da.from_array(guide, chunks=64),
                       model=m, device="cpu", tile=64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with dask.config.set(scheduler="synchronous"):
            got = lazy.image.compute()
    assert len(too_big) == 4  # every 64 px tile task, once; their quarters fit
    assert any(issubclass(w.category, OutOfMemoryRetry) and "tile task of 64 px" in
               str(w.message) for w in record)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def _notices(record, result) -> str:
    return " ".join([str(w.message) for w in record] + [str(result.metadata)]).lower()


def test_out_of_memory_retry_gives_a_notice(monkeypatch):
    stack = RNG.random((3, 160, 160))
    _oom_above(monkeypatch, 160 * 160 - 1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        r = fuse_exposures(stack, model=model("mef"), device="cpu", tile=0)
    assert "out of memory" in _notices(record, r)
    # one warning of its own category, naming what was done; the same line in the metadata
    from napari_cscfusion import OutOfMemoryRetry

    ours = [w for w in record if issubclass(w.category, OutOfMemoryRetry)]
    assert len(ours) == 1
    msg = str(ours[0].message)
    assert msg == ("out of memory on cpu with the whole 160x160 image; retried with tiles of "
                   "80 px")
    assert r.metadata["notices"] == [msg] and r.metadata["device"] == "cpu"
    # the next run, without out of memory, carries no notice
    monkeypatch.undo()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        again = fuse_exposures(stack, model=model("mef"), device="cpu", tile=0)
    assert again.metadata["notices"] == [] and not record


def test_out_of_memory_retry_notice_in_multimodal_fusion(monkeypatch):
    """fuse_multimodal builds its metadata with the shared helper: the notice is there too."""
    from napari_cscfusion import fuse_multimodal

    images = [RNG.random((96, 96)) for _ in range(3)]
    _oom_above(monkeypatch, 96 * 96 - 1)
    with pytest.warns(RuntimeWarning, match="out of memory on cpu with the whole 96x96 image"):
        r = fuse_multimodal(images, model=model("ivf"), base_rule="l1", device="cpu")
    assert r.metadata["notices"] == ["out of memory on cpu with the whole 96x96 image; "
                                     "retried with tiles of 48 px"]


def _fake_gpu_without_memory(monkeypatch):
    """'cuda' resolves to PyTorch's meta device (tensors without data; the weights stay on
    the CPU) and every convolution on it runs out of memory."""
    from napari_cscfusion.engine import device, ivf, mef, mmf
    from napari_cscfusion.engine.registry import FusionModel

    fake = torch.device("meta")
    real_resolve, real_network_on = device.resolve_device, FusionModel.network_on
    for module in (ivf, mef, mmf):
        monkeypatch.setattr(module, "resolve_device",
                            lambda d: fake if d == "cuda" else real_resolve(d))
    monkeypatch.setattr(FusionModel, "network_on", lambda self, d: real_network_on(
        self, torch.device("cpu") if d == fake else d))
    return _oom_above(monkeypatch, 0, device_type="meta")  # nothing fits on the "GPU"


@pytest.mark.parametrize("task", ["ivf", "mef", "mmf"])
def test_out_of_memory_on_every_tile_of_a_gpu_falls_back_to_the_cpu(monkeypatch, task):
    """The fallback without a GPU: 'cuda' resolves to PyTorch's meta device (tensors without
    data; the weights stay on the CPU), and every convolution on it runs out of memory. The
    engine splits tiles down to the smallest, then reruns on the CPU: the plain CPU result,
    metadata device 'cpu', and a warning saying so."""
    from napari_cscfusion import OutOfMemoryRetry
    m = model(task)
    c = m.network.lr_channels if task == "mmf" else 0
    inputs, kwargs = {
        "ivf": ((RNG.random((80, 72)), RNG.random((80, 72))), {"base_rule": "saliency"}),
        "mef": ((RNG.random((3, 96, 80, 3)),), {}),
        "mmf": ((RNG.random((c, 24, 20)), RNG.random((96, 80, 3))), {}),
    }[task]
    fuse = {"ivf": fuse_infrared_visible, "mef": fuse_exposures, "mmf": fuse_guided}[task]
    want = fuse(*inputs, model=m, device="cpu", **kwargs)
    calls = _fake_gpu_without_memory(monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        r = fuse(*inputs, model=m, device="cuda", **kwargs)
    assert calls["oom"] > 1  # the whole image, then smaller tiles, were tried on the "GPU"
    assert r.metadata["device"] == "cpu"
    ours = [str(w.message) for w in record if issubclass(w.category, OutOfMemoryRetry)]
    assert ours == r.metadata["notices"] and len(ours) == 2
    shape = "80x72" if task == "ivf" else "96x80"
    assert re.fullmatch(rf"out of memory on meta with the whole {shape} image; retried with "
                        r"tiles of \d+ px", ours[0]), ours
    assert re.fullmatch(r"out of memory on meta even with \d+ px tiles; ran on the CPU "
                        r"instead \(slower\)", ours[1]), ours
    np.testing.assert_allclose(r.image, want.image, atol=1e-5)
    assert next(m.network.parameters()).device.type == "cpu"  # the user's network stays put


@pytest.mark.parametrize("task", ["ivf", "ivf-packaged", "mef", "mef-packaged", "mmf",
                                  "mmf-packaged"])
def test_out_of_memory_on_a_gpu_in_lazy_tasks_falls_back_to_the_cpu(monkeypatch, task):
    """Dask in, the GPU faked as above (nothing fits on it): every tile task, and the saliency
    rule's statistics tasks, split down to the smallest tiles and then run on a CPU copy of
    the kernel, with a notice; the image is the CPU's in-memory tiled one. '-packaged': the
    packaged weights (else the authors' where ../shared has them), whose IVF kernel holds tensors
    of its own on the device (the codes of black, the code gain's pivot at the plane's mean),
    which the CPU copy must hold on the CPU."""
    import dask
    import dask.array as da

    from napari_cscfusion import OutOfMemoryRetry
    task, packaged = task.split("-")[0], task.endswith("-packaged")
    m = load_model(task) if packaged else model(task)
    c = m.network.lr_channels if task == "mmf" else 0
    inputs, kwargs, chunks = {
        "ivf": ((RNG.random((96, 80)), RNG.random((96, 80))), {"base_rule": "saliency"}, 48),
        "mef": ((RNG.random((3, 96, 80, 3)),), {}, (3, 48, 48, 3)),
        "mmf": ((RNG.random((c, 24, 20)), RNG.random((96, 80, 3))), {}, None),
    }[task]
    fuse = {"ivf": fuse_infrared_visible, "mef": fuse_exposures, "mmf": fuse_guided}[task]
    want = fuse(*inputs, model=m, device="cpu", tile=48, **kwargs).image
    calls = _fake_gpu_without_memory(monkeypatch)
    lazy_inputs = [da.from_array(a, chunks=chunks or -1) for a in inputs]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        r = fuse(*lazy_inputs, model=m, device="cuda", tile=48, **kwargs)
        with dask.config.set(scheduler="synchronous"):
            got = r.image.compute()
    ours = [str(w.message) for w in record if issubclass(w.category, OutOfMemoryRetry)]
    assert calls["oom"] >= 4  # every tile task tried the "GPU" first
    fell_back = [n for n in ours if "ran that task on the CPU instead" in n]
    assert len(fell_back) == 4 + (8 if task == "ivf" else 0), ours  # 4 tiles (+ 2x4 statistics)
    assert all(n.startswith("out of memory on meta in a ") for n in fell_back)
    # 48 px tasks are not split: no tiles below the smallest side (MIN_TILE = 32)
    assert all(int(px) >= 32 for n in ours for px in re.findall(r"tiles of (\d+) px", n)), ours
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert next(m.network.parameters()).device.type == "cpu"  # the user's network stays put


def test_cpu_twin_of_a_kernel_is_made_once_with_the_same_weights():
    from napari_cscfusion.engine.lazy import _cpu_twin
    from napari_cscfusion.engine.mef import MEFKernel

    kernel = MEFKernel(model("mef").network, 3, True, torch.device("cpu"))
    twin = _cpu_twin(kernel)
    assert _cpu_twin(kernel) is twin and twin is not kernel and twin.device.type == "cpu"
    assert twin.net is not kernel.net and kernel.device.type == "cpu"
    ours, theirs = kernel.net.state_dict(), twin.net.state_dict()  # the folded weights
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for name, t in ours.items():  # (on the CPU already, so shared, not copied)
        assert torch.equal(t, theirs[name]) and theirs[name].device.type == "cpu", name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_out_of_memory_on_the_gpu_falls_back_to_the_cpu_with_a_notice(monkeypatch):
    stack = RNG.random((3, 96, 96))
    want = fuse_exposures(stack, model=model("mef"), device="cpu", tile=0).image
    _oom_above(monkeypatch, 0, device_type="cuda")  # nothing fits on the GPU
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        r = fuse_exposures(stack, model=model("mef"), device="cuda")
    assert r.metadata["device"] == "cpu"
    assert "out of memory" in _notices(record, r)
    np.testing.assert_allclose(r.image, want, atol=1e-5)


# --- the writer: unwritable path, full disk ----------------------------------------------------

def _folder_state(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def existing(tmp_path):
    """A folder holding an earlier result that a failed write must leave intact."""
    old = write_tiff(tmp_path / "result.tif", np.zeros((5, 5), np.float32), {"run": 1})
    return tmp_path, old


def test_disk_full_midway_leaves_no_partial_file(existing, monkeypatch):
    folder, target = existing
    before = _folder_state(folder)

    def imwrite(fh, data, **kwargs):
        fh.write(b"II*\x00" + bytes(4096))  # half a TIFF, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tifffile, "imwrite", imwrite)
    with pytest.raises(OSError) as info:
        write_tiff(target, np.ones((64, 64), np.float32), {"run": 2})
    assert info.value.errno == errno.ENOSPC
    assert "result.tif" in str(info.value) and "No space left" in str(info.value)
    assert _folder_state(folder) == before  # the old result intact, no .part file


def test_disk_full_at_flush_leaves_no_partial_file(existing, monkeypatch):
    from napari_cscfusion.engine import io

    folder, target = existing
    before = _folder_state(folder)

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", fsync)
    with pytest.raises(OSError, match="result.tif.*No space left"):
        write_tiff(target, np.ones((64, 64), np.float32))
    assert _folder_state(folder) == before


def test_interrupted_write_leaves_no_partial_file(existing, monkeypatch):
    folder, target = existing
    before = _folder_state(folder)

    def imwrite(fh, data, **kwargs):
        fh.write(bytes(100))
        raise KeyboardInterrupt

    monkeypatch.setattr(tifffile, "imwrite", imwrite)
    with pytest.raises(KeyboardInterrupt):
        write_tiff(target, np.ones((8, 8), np.float32))
    assert _folder_state(folder) == before


def test_unwritable_folder(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: refuse the temporary file as the OS would
        import tempfile

        def mkstemp(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    else:
        locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=r"locked/out.tif.*Permission denied"):
            write_tiff(locked / "out.tif", np.ones((4, 4), np.float32))
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_a_target_that_is_a_folder_or_inside_a_file(tmp_path):
    (tmp_path / "taken.tif").mkdir()
    with pytest.raises(IsADirectoryError, match="taken.tif"):
        write_tiff(tmp_path / "taken.tif", np.ones((4, 4), np.float32))
    (tmp_path / "plain").write_text("x")
    with pytest.raises(OSError, match="plain"):
        write_tiff(tmp_path / "plain" / "out.tif", np.ones((4, 4), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "taken.tif"]
    assert list((tmp_path / "taken.tif").iterdir()) == []


def test_written_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        p = write_tiff(tmp_path / "new.tif", np.ones((4, 4), np.float32))
        assert stat.S_IMODE(p.stat().st_mode) == 0o644  # not mkstemp's private 0o600
        p.chmod(0o640)
        write_tiff(p, np.zeros((4, 4), np.float32), {"again": True})
        assert stat.S_IMODE(p.stat().st_mode) == 0o640  # a replaced file keeps its mode
        assert read_tiff_metadata(p) == {"again": True}
    finally:
        os.umask(old)


def test_cli_disk_full_is_a_clear_error(tmp_path, capsys, monkeypatch):
    a = png(tmp_path / "a.png", (RNG.random((12, 12)) * 255).astype(np.uint8))
    b = png(tmp_path / "b.png", (RNG.random((12, 12)) * 255).astype(np.uint8))

    def imwrite(fh, data, **kwargs):
        fh.write(bytes(300))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tifffile, "imwrite", imwrite)
    args = ["fuse", "mef", a, b, "-o", str(tmp_path / "fused.tif"), "--device", "cpu"]
    if CKPT.is_dir():
        args += ["--weights", str(CKPT / "csc_mefn_authors.pth")]
    elif not packaged_weights_path("mef").is_file():
        pytest.skip("no MEF weights")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "fused.tif" in err and "No space left" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


@pytest.mark.parametrize("content", [b"", b"II*\x00garbage", b"\x89PNG\r\n\x1a\n"])
@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_broken_input_images_are_named(tmp_path, content, suffix):
    p = tmp_path / f"broken{suffix}"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=rf"cannot read '.*broken\{suffix}' as an image"):
        read_image(p)


# --- property-based tests ---------------------------------------------------------------------

INT_DTYPES = ["uint8", "uint16", "int16", "int32"]
FLOAT_DTYPES = ["float16", "float32", "float64"]
DTYPES = INT_DTYPES + FLOAT_DTYPES + ["bool", "complex64"]
KINDS = ["unit", "wide", "huge", "constant", "tiny"]
BAD = [None, None, None, "nan", "inf", "-inf"]


def make(shape, dtype, kind, bad, seed):
    """An array of ``shape`` and ``dtype`` whose values follow ``kind``, with one NaN/Inf pixel
    when ``bad`` (floats only)."""
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if dtype.startswith("complex"):
        return (rng.random(shape) + 1j * rng.random(shape)).astype(dtype)
    if dtype in INT_DTYPES:
        info = np.iinfo(dtype)
        lo, hi = {"unit": (0, info.max), "wide": (info.min, info.max),
                  "huge": (info.max - 3, info.max), "constant": (7, 7),
                  "tiny": (max(info.min, -2), 2)}[kind]
        return rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)
    top = float(np.finfo(dtype).max)
    a = {"unit": lambda: rng.random(shape),
         "wide": lambda: rng.uniform(-3e3, 3e4, shape),
         "huge": lambda: rng.uniform(-1, 1, shape) * top,
         "constant": lambda: np.full(shape, 2.5),
         "tiny": lambda: rng.random(shape) * float(np.finfo(dtype).tiny)}[kind]()
    a = a.astype(dtype)
    if bad and a.size:
        a.flat[int(rng.integers(a.size))] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[bad]
    return a


def faults(name, a):
    """The errors the engine must raise for array ``a`` given as argument ``name``."""
    out = []
    if a.dtype == bool or np.iscomplexobj(a):
        out.append((TypeError, f"{name}: "))
    elif a.dtype.kind == "f" and not np.isfinite(a).all():
        out.append((ValueError, f"{name}: contains"))
    return out


def expect(call, expected_faults, frozen_pairs):
    """Run ``call``: it must raise one of ``expected_faults`` (type, message start) when there is
    any, else return; never another exception, never a change to the inputs."""
    try:
        result = call()
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        assert expected_faults, f"unexpected {type(exc).__name__}: {msg}"
        assert "read-only" not in msg  # an in-place write on an input
        assert any(isinstance(exc, t) and re.search(p, msg) for t, p in expected_faults), \
            (type(exc).__name__, msg, expected_faults)
        result = None
    else:
        assert not expected_faults, f"expected {expected_faults}, got a result"
    assert_unchanged(frozen_pairs)
    return result


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@PROPERTY_CHEAP
@given(h=st.integers(1, 300), w=st.integers(1, 300), bad=st.sampled_from(BAD),
       seed=st.integers(0, 2**32 - 1))
def test_property_normalisation(dtype, kind, h, w, bad, seed):
    a, before = frozen(make((h, w), dtype, kind, bad, seed))
    n = expect(lambda: normalise(a, "img"), faults("img", a), [(a, before)])
    if n is None:
        return
    check_image(n.data, (h, w))
    assert not np.shares_memory(n.data, a)
    # monotone: the order of the pixel values is kept
    order = np.argsort(a.ravel().astype(np.float64), kind="stable")
    assert (np.diff(n.data.ravel()[order].astype(np.float64)) >= 0).all()
    if a.dtype.kind == "u" or (a.dtype.kind == "i" and a.min() >= 0):
        np.testing.assert_allclose(n.data, a / np.iinfo(a.dtype).max, rtol=1e-6, atol=1e-7)
    elif a.dtype.kind == "f" and a.min() >= 0 and a.max() <= 1:
        np.testing.assert_array_equal(n.data, a.astype(np.float32))


@PROPERTY_CHEAP
@given(shape_a=st.tuples(st.integers(1, 300), st.integers(1, 300)),
       shape_b=st.tuples(st.integers(1, 300), st.integers(1, 300)),
       dtype=st.sampled_from(INT_DTYPES + FLOAT_DTYPES))
def test_property_mismatched_pairs_are_refused_naming_both_shapes(shape_a, shape_b, dtype):
    if shape_a == shape_b:
        shape_b = (shape_b[0] + 1, shape_b[1])
    ir, ir0 = frozen(np.zeros(shape_a, dtype))
    vis, vis0 = frozen(np.ones(shape_b, dtype))
    with pytest.raises(ValueError) as info:
        fuse_infrared_visible(ir, vis, device="cpu")
    assert str(shape_a) in str(info.value) and str(shape_b) in str(info.value)
    assert_unchanged([(ir, ir0), (vis, vis0)])


SMALL = st.integers(1, 40)


@pytest.mark.parametrize("dtype", DTYPES)
@PROPERTY
@given(k=st.integers(1, 8), h=SMALL, w=SMALL, rgb=st.booleans(), kind=st.sampled_from(KINDS),
       bad=st.sampled_from(BAD), seed=st.integers(0, 2**32 - 1))
def test_property_exposures(dtype, k, h, w, rgb, kind, bad, seed):
    shape = (k, h, w, 3) if rgb else (k, h, w)
    stack, before = frozen(make(shape, dtype, kind, bad, seed))
    expected = faults("stack", stack)
    if k < 2:
        expected.append((ValueError, "stack: at least 2 exposures"))
    if min(h, w) < 2:
        expected.append((ValueError, "stack: images must be at least 2x2"))
    r = expect(lambda: fuse_exposures(stack, model=model("mef"), device="cpu"), expected,
               [(stack, before)])
    if r is not None:
        check_image(r.image, (h, w, 3) if rgb else (h, w))
        np.testing.assert_allclose(r.weights["exposures"].sum(0), 1, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@PROPERTY
@given(h=SMALL, w=SMALL, vis_dtype=st.sampled_from(DTYPES),
       kinds=st.tuples(st.sampled_from(KINDS), st.sampled_from(KINDS)),
       bads=st.tuples(st.sampled_from(BAD), st.sampled_from(BAD)),
       rule=st.sampled_from(["saliency", "l1", "average"]), seed=st.integers(0, 2**32 - 1))
def test_property_infrared_visible(dtype, h, w, vis_dtype, kinds, bads, rule, seed):
    ir, ir0 = frozen(make((h, w), dtype, kinds[0], bads[0], seed))
    vis, vis0 = frozen(make((h, w), vis_dtype, kinds[1], bads[1], seed + 1))
    expected = faults("ir", ir) + faults("vis", vis)
    if min(h, w) < 6:
        expected.append((ValueError, "ir: images must be at least 6x6"))
    r = expect(lambda: fuse_infrared_visible(ir, vis, model=model("ivf"), base_rule=rule,
                                             device="cpu"), expected, [(ir, ir0), (vis, vis0)])
    if r is not None:
        check_image(r.image, (h, w))


@pytest.mark.parametrize("dtype", DTYPES)
@PROPERTY
@given(s=st.integers(1, 8), h=st.integers(1, 24), w=st.integers(1, 24),
       kind=st.sampled_from(KINDS), bad=st.sampled_from(BAD), seed=st.integers(0, 2**32 - 1))
def test_property_n_sources(dtype, s, h, w, kind, bad, seed):
    from napari_cscfusion.engine.medical import fuse_multimodal

    pairs = [frozen(make((h, w), dtype, kind, bad if i == 0 else None, seed + i))
             for i in range(s)]
    images = [a for a, _ in pairs]
    expected = []
    if s < 2:
        expected.append((ValueError, "images: at least 2 sources"))
    for i, a in enumerate(images):
        expected += faults(re.escape(f"images['source_{i}']"), a)
        expected += faults(f"source_{i}", a)
    if min(h, w) < 6:
        expected.append((ValueError, "at least 6x6"))
    r = expect(lambda: fuse_multimodal(images, model=model("ivf"), base_rule="l1",
                                       device="cpu"), expected, pairs)
    if r is not None:
        check_image(r.image, (h, w))


@pytest.mark.parametrize("dtype", DTYPES)
@PROPERTY
@given(h=st.integers(1, 16), w=st.integers(1, 16), grow=st.tuples(st.integers(-2, 24),
                                                                  st.integers(-2, 24)),
       rgb_guide=st.booleans(), wrong_channels=st.booleans(),
       guide_dtype=st.sampled_from(DTYPES),
       kinds=st.tuples(st.sampled_from(KINDS), st.sampled_from(KINDS)),
       bad=st.sampled_from(BAD), seed=st.integers(0, 2**32 - 1))
def test_property_guided(dtype, h, w, grow, rgb_guide, wrong_channels, guide_dtype, kinds, bad,
                         seed):
    dtypes = (dtype, guide_dtype)
    m = model("mmf")
    c = m.network.lr_channels + (1 if wrong_channels else 0)
    H, W = max(1, h + grow[0]), max(1, w + grow[1])
    low, low0 = frozen(make((c, h, w) if c > 1 else (h, w), dtypes[0], kinds[0], bad, seed))
    guide, guide0 = frozen(make((H, W, 3) if rgb_guide else (H, W), dtypes[1], kinds[1], None,
                                seed + 1))
    expected = faults("low_res", low) + faults("guide", guide)
    if min(h, w) < 4:
        expected.append((ValueError, "low_res: images must be at least 4x4"))
    if H < h or W < w:
        expected.append((ValueError, "guide: must be at least as large"))
    if wrong_channels and c > 2:
        expected.append((ValueError, "low_res: this CSC-MMFN model expects"))
    elif wrong_channels:  # a 1-band model (packaged) reads (2, h, w) as two low-res planes
        expected.append((ValueError, "low_res and guide: the leading .* axes must be the same"))
    r = expect(lambda: fuse_guided(low, guide, model=m, device="cpu"), expected,
               [(low, low0), (guide, guide0)])
    if r is not None:
        check_image(r.image, (c, H, W) if c > 1 else (H, W))


# --- long sessions: oneDNN's per-shape kernel cache is bounded ------------------------------

def test_importing_the_package_bounds_onednn_s_kernel_cache_unless_the_user_set_it():
    """benchmarks/README.md, soak.py: oneDNN's default of 1024 cached kernels per process grew a
    long session by ~200 MiB; the package sets 64 unless the environment says otherwise."""
    import subprocess
    import sys

    code = ("import os, napari_cscfusion; "
            "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])")
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["64"]
    env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "512"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["512"]
