"""Fusing files and whole folders: read a task's input files with engine.io, fuse them with the
task's engine function, write each result with its metadata. Used by the command line
(``cscfusion fuse`` and ``cscfusion batch``) and the napari batch widget.

Pairing of folders (plan_batch):

* ivf, mmf, medical: one folder per source (ivf: infrared, visible; mmf: low-res, guide;
  medical: two or more modalities); files are paired by their name without the extension
  (``IR/scene1.png`` with ``VIS/scene1.jpg``). A name missing from a folder is a failure of
  that item, not of the batch.
* mef: one folder holding one sub-folder per bracket (its exposures in natural sort order:
  ``e2`` before ``e10``) or one multi-page TIFF per bracket.

run_batch yields one BatchOutcome per item (written, skipped because the output exists, or
failed with the reason) and goes on past failures; the caller lists them.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# the engine's public names (this module is not imported by engine/__init__, so the package is
# complete when it loads)
from . import Cancelled, FusionResult, fuse_exposures, fuse_guided, fuse_infrared_visible
from .io import (
    EIGHT_BIT_SUFFIXES,
    TIFF_SUFFIXES,
    read_image,
    to_grey,
    write_image8,
    write_tiff,
)
from .medical import MEDICAL_CODE_GAIN, fuse_multimodal
from .registry import FusionModel, resolve_model

TASKS = ("ivf", "mef", "mmf", "medical")
FOLDER_ROLES = {"ivf": ("infrared", "visible"), "mmf": ("low-res", "guide"),
                "mef": ("brackets",)}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp") + TIFF_SUFFIXES
FORMATS = ("tiff", "png", "jpeg")
OUTPUT_SUFFIX = {"tiff": ".tif", **EIGHT_BIT_SUFFIXES}


class WrongInputs(ValueError):
    """The files do not make one input set of the task (how many, or exposure shapes)."""


def natural_key(path: Path) -> list:
    """Sort key: digits compared as numbers (``e2`` before ``e10``), letters case-insensitively."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def image_files(folder: str | Path) -> list[Path]:
    """The image files of a folder (not hidden ones), in natural sort order."""
    return sorted((p for p in Path(folder).iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith(".")), key=natural_key)


# --- one input set ----------------------------------------------------------------------------

def exposure_frames(paths: Sequence[str | Path]) -> list[np.ndarray]:
    """The exposures of a bracket: several images, or one multi-page TIFF ((K, H, W) or
    (K, H, W, 3)); alpha dropped. WrongInputs for fewer than two or different shapes."""
    frames = [read_image(p) for p in paths]
    f0 = frames[0] if frames else None
    if len(frames) == 1 and (f0.ndim == 4 or (f0.ndim == 3 and f0.shape[-1] not in (3, 4))):
        frames = list(f0)  # one multi-page TIFF: (K, H, W) or (K, H, W, 3)
    if len(frames) < 2:
        raise WrongInputs("needs at least two exposures (or one multi-page TIFF)")
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        listing = ", ".join(f"{Path(p).name} {f.shape}"
                            for p, f in zip(paths, frames, strict=True))
        raise WrongInputs(f"exposures differ in shape: {listing}")
    return [f[..., :3] if f.ndim == 3 and f.shape[-1] == 4 else f for f in frames]


def _unique_names(names: Sequence[str]) -> list[str]:
    names = [str(n) for n in names]
    if len(set(names)) == len(names):
        return names
    return [f"{n}_{i}" for i, n in enumerate(names)]


def medical_sources(paths: Sequence[str | Path],
                    names: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """name -> array for fuse_multimodal (names: the file names without extension unless
    given), and notes. An RGB file whose channels are all equal (grey stored as RGB, as many
    PNG exporters do) is read as grey; any other RGB file is the colour (functional) source."""
    if len(paths) < 2:
        raise WrongInputs(f"needs two or more images (anatomical and functional), got "
                          f"{len(paths)}")
    names = _unique_names(names if names is not None else [Path(p).stem for p in paths])
    sources, notes = {}, []
    for name, path in zip(names, paths, strict=True):
        a = read_image(path)
        if a.ndim == 3 and a.shape[-1] in (3, 4) and \
                all(np.array_equal(a[..., 0], a[..., c]) for c in (1, 2)):
            a = a[..., 0]
            notes.append(f"{Path(path).name}: RGB with equal channels, read as grey")
        sources[name] = a
    return sources, notes


def read_inputs(task: str, paths: Sequence[str | Path], names: Sequence[str] | None = None):
    """Read one input set of ``task`` -> (sources, notes): ivf [IR, VIS] (colour converted to
    luminance: CSC-IVFN fuses grey images), mef [stack (K, H, W[, 3])], mmf [low-res, guide],
    medical {name: array} (see medical_sources). WrongInputs for the wrong number of files."""
    paths = [Path(p) for p in paths]
    if task == "mef":
        return [np.stack(exposure_frames(paths))], []
    if task == "medical":
        return medical_sources(paths, names)
    if task not in TASKS:
        raise ValueError(f"task: must be one of {TASKS}, got {task!r}")
    if len(paths) != 2:
        what = "IR then VIS" if task == "ivf" else "LOWRES then GUIDE"
        raise WrongInputs(f"needs exactly two images, {what}; got {len(paths)}")
    images = [read_image(p) for p in paths]
    notes = []
    if task == "ivf" and any(a.ndim == 3 and a.shape[-1] in (3, 4) for a in images):
        notes.append("colour input converted to luminance (CSC-IVFN fuses grey images)")
        images = [to_grey(a) for a in images]
    return images, notes


def default_code_gain(task: str) -> float | None:
    """The task's fusion function's default code_gain (ivf 2, medical 1; None for mef/mmf,
    which have none)."""
    fuse = {"ivf": fuse_infrared_visible, "medical": fuse_multimodal}.get(task)
    return None if fuse is None else inspect.signature(fuse).parameters["code_gain"].default


def default_rules(task: str) -> tuple[str, str] | None:
    """The task's fusion function's default (base_rule, detail_rule) (ivf saliency / l1,
    medical choose-max / l1-black; None for mef/mmf, which have none)."""
    fuse = {"ivf": fuse_infrared_visible, "medical": fuse_multimodal}.get(task)
    if fuse is None:
        return None
    params = inspect.signature(fuse).parameters
    return params["base_rule"].default, params["detail_rule"].default


def fuse_sources(task: str, sources, model: FusionModel | str | None = None, *,
                 device="auto", base_rule: str | None = None, detail_rule: str | None = None,
                 code_gain: float | None = None, tile=None, scheduler=None,
                 codes: bool = False, progress=None, exact: bool | None = None
                 ) -> FusionResult:
    """Fuse what read_inputs returned with the task's engine function, without weight maps
    (nothing here shows them; for IVF they are 16 B per pixel). Options a task does not have
    (rules and code_gain for mef/mmf, tile for medical) are ignored; rules or code_gain None:
    the function's default (ivf saliency / l1, gain 2; medical choose-max / l1-black, gain 1);
    exact None: the function's default path."""
    path = {} if exact is None else {"exact": exact}
    given = {k: v for k, v in (("base_rule", base_rule), ("detail_rule", detail_rule))
             if v is not None}
    if task == "ivf":
        gain = {} if code_gain is None else {"code_gain": code_gain}
        return fuse_infrared_visible(*sources, model=model, device=device, codes=codes,
                                     progress=progress, tile=tile, scheduler=scheduler,
                                     weights=False, **given, **gain, **path)
    if task == "mef":
        return fuse_exposures(sources[0], model=model, device=device, codes=codes,
                              progress=progress, tile=tile, scheduler=scheduler, weights=False,
                              **path)
    if task == "mmf":
        return fuse_guided(*sources, model=model, device=device, codes=codes, progress=progress,
                           tile=tile, **path)
    if task == "medical":
        return fuse_multimodal(sources, model=model, device=device, codes=codes, **given,
                               progress=progress,
                               code_gain=MEDICAL_CODE_GAIN if code_gain is None else code_gain,
                               **path)
    raise ValueError(f"task: must be one of {TASKS}, got {task!r}")


# --- whole folders ----------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchItem:
    """One input set: its name (the output's file name without extension), its files, where
    the result goes, and why it cannot be fused (a pairing problem), if so."""

    name: str
    inputs: tuple[Path, ...]
    output: Path
    problem: str | None = None


@dataclass
class BatchPlan:
    task: str
    in_dirs: tuple[Path, ...]
    out_dir: Path
    fmt: str
    items: list[BatchItem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class BatchOutcome:
    """What happened to one item: status 'written', 'skipped' (the output exists) or 'failed'
    (error says why); seconds spent; the result's metadata when written."""

    item: BatchItem
    status: str
    error: str | None = None
    seconds: float = 0.0
    metadata: dict = field(default_factory=dict)


def _check_folders(task: str, in_dirs: Sequence[Path], out_dir: Path) -> None:
    if task not in TASKS:
        raise ValueError(f"task: must be one of {TASKS}, got {task!r}")
    roles = FOLDER_ROLES.get(task)
    if roles is not None and len(in_dirs) != len(roles):
        raise ValueError(f"{task}: needs {len(roles)} input folder(s) ({', '.join(roles)}), "
                         f"got {len(in_dirs)}")
    if task == "medical" and len(in_dirs) < 2:
        raise ValueError(f"medical: needs two or more input folders (one per modality), got "
                         f"{len(in_dirs)}")
    for d in in_dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"input folder {str(d)!r} does not exist")
    if len({d.resolve() for d in in_dirs}) != len(in_dirs):
        raise ValueError("input folders: the same folder is given twice")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {str(out_dir)!r} is a file")
    if out_dir.resolve() in {d.resolve() for d in in_dirs}:
        raise ValueError(f"output folder {str(out_dir)!r} is an input folder: choose another "
                         f"one (results would be paired as inputs next time)")
    if task == "mef" and out_dir.resolve().parent == in_dirs[0].resolve():
        raise ValueError(f"output folder {str(out_dir)!r} is inside the brackets folder: "
                         f"choose another one (it would be read as a bracket next time)")


def _paired_items(in_dirs: Sequence[Path], out_dir: Path, suffix: str) -> list[BatchItem]:
    by_dir = []
    for d in in_dirs:
        stems: dict[str, list[Path]] = {}
        for p in image_files(d):
            stems.setdefault(p.stem, []).append(p)
        by_dir.append(stems)
    items = []
    for stem in sorted(set().union(*by_dir), key=lambda s: natural_key(Path(s))):
        found = [stems.get(stem, []) for stems in by_dir]
        missing = [str(d) for d, f in zip(in_dirs, found, strict=True) if not f]
        double = [", ".join(p.name for p in f) for f in found if len(f) > 1]
        problem = None
        if missing:
            problem = f"no file named {stem!r} (any extension) in {', '.join(missing)}"
        elif double:
            problem = f"more than one file named {stem!r}: {'; '.join(double)}"
        inputs = tuple(f[0] for f in found if f)
        items.append(BatchItem(stem, inputs, out_dir / f"{stem}{suffix}", problem))
    return items


def _bracket_items(folder: Path, out_dir: Path, suffix: str) -> list[BatchItem]:
    items = []
    for p in sorted(folder.iterdir(), key=natural_key):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            frames = tuple(image_files(p))
            problem = None if frames else f"sub-folder {p.name!r} holds no image files"
            items.append(BatchItem(p.name, frames, out_dir / f"{p.name}{suffix}", problem))
        elif p.suffix.lower() in TIFF_SUFFIXES:
            items.append(BatchItem(p.stem, (p,), out_dir / f"{p.stem}{suffix}"))
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            items.append(BatchItem(p.stem, (p,), out_dir / f"{p.stem}{suffix}",
                                   f"{p.name}: one image is not a bracket (put each "
                                   f"bracket's exposures in a sub-folder, or use a "
                                   f"multi-page TIFF)"))
    names = [i.name for i in items]
    return [i if names.count(i.name) == 1 or i.problem else
            BatchItem(i.name, i.inputs, i.output,
                      f"two brackets named {i.name!r} (a sub-folder and a TIFF)")
            for i in items]


def plan_batch(task: str, in_dirs: Sequence[str | Path], out_dir: str | Path,
               fmt: str = "tiff") -> BatchPlan:
    """The items of a batch (see the module's docstring for the pairing), in natural order of
    their names. Errors (ValueError, FileNotFoundError) only for a batch that cannot start:
    the wrong number of folders, a missing folder, the output folder among the inputs."""
    if fmt not in FORMATS:
        raise ValueError(f"format: must be one of {FORMATS}, got {fmt!r}")
    dirs = tuple(Path(d) for d in in_dirs)
    out = Path(out_dir)
    _check_folders(task, dirs, out)
    suffix = OUTPUT_SUFFIX[fmt]
    if task == "mef":
        items = _bracket_items(dirs[0], out, suffix)
    else:
        items = _paired_items(dirs, out, suffix)
    return BatchPlan(task, dirs, out, fmt, items)


def write_result(path: Path, result: FusionResult, metadata: dict) -> None:
    """The fused image with the run's metadata: TIFF (float32) or 8-bit PNG/JPEG by suffix."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        write_tiff(path, result.image, metadata)
    else:
        write_image8(path, result.image, metadata)


def run_batch(plan: BatchPlan, model: FusionModel | str | None = None, *,
              overwrite: bool = False, progress: Callable[[int, int], None] | None = None,
              **options) -> Iterator[BatchOutcome]:
    """Fuse every item of ``plan`` and write its result; yields one BatchOutcome per item, in
    order. An item that fails (unreadable file, wrong sizes, out of memory, ...) is reported
    and the batch goes on. Outputs that exist are skipped unless ``overwrite``.

    model: loaded once for the whole batch (None: the packaged weights; a path; a
    FusionModel). progress(done, total) is the engine's per-item callback (it may raise
    Cancelled, which stops the batch: it is raised, not reported as a failure). options:
    device, base_rule, detail_rule, code_gain, tile, scheduler (see fuse_sources)."""
    model = resolve_model(model, plan.task)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    names = None
    if plan.task == "medical":
        names = _unique_names([d.name for d in plan.in_dirs])
    for item in plan.items:
        t0 = time.perf_counter()
        if item.problem:
            yield BatchOutcome(item, "failed", item.problem)
            continue
        if item.output.exists() and not overwrite:
            yield BatchOutcome(item, "skipped")
            continue
        try:
            sources, notes = read_inputs(plan.task, item.inputs, names)
            result = fuse_sources(plan.task, sources, model, progress=progress, **options)
            meta = dict(result.metadata)
            meta.update(inputs=[str(p) for p in item.inputs], batch_item=item.name)
            if notes:
                meta["input_notes"] = notes
            write_result(item.output, result, meta)
        except Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 — reported per item; the batch goes on
            yield BatchOutcome(item, "failed", str(exc) or type(exc).__name__,
                               time.perf_counter() - t0)
            continue
        yield BatchOutcome(item, "written", None, time.perf_counter() - t0, meta)
