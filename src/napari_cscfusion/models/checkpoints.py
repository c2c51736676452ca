"""Reading and writing weights: the authors' published state dicts (their key names mapped to
ours) and the package's own format (weights plus a small header).

Everything is loaded with ``torch.load(weights_only=True)``: a checkpoint can never run code.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from .ivfn import CSCIVFN
from .mefn import CSCMEFN
from .mmfn import CSCMMFN
from .mmfn import GEOMETRIES as MMF_GEOMETRIES

FORMAT_NAME = "napari-cscfusion"
FORMAT_VERSION = 1
TASKS = ("ivf", "mef", "mmf")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".model", ".ckpt")


class CheckpointError(ValueError):
    """A weights file that cannot serve the requested network (names the file and why)."""


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True and an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with code, random bytes ...
        raise CheckpointError(
            f"{str(path)!r} is not a readable PyTorch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); expected a state dict "
            f"saved with torch.save"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{str(path)!r} holds a {type(obj).__name__}, expected a state dict (a mapping of "
            f"parameter names to tensors)"
        )
    return dict(obj)


# --- the authors' key names -> ours -------------------------------------------------------

def _dcu_key(rest: str) -> str:
    """Map the inside of one of the authors' DCU blocks."""
    rest = rest.replace("conv.conv_decoder.de_conv0.conv2d.", "dictionary.")
    rest = rest.replace("conv.conv_encoder.en_conv0.conv2d.", "adjoint.")
    rest = rest.replace("activation.", "shrink.")
    return rest


def _map_mefn(key: str) -> str:
    m = re.fullmatch(r"main\.(\d+)\.(.*)", key)
    if not m:
        return key
    idx, rest = int(m.group(1)), m.group(2)
    if idx == 0:
        return "encoder.stem.conv." + rest.replace("conv2d.", "")
    if idx == 1:
        return "encoder.stem.norm." + rest
    if idx == 2:
        return "encoder.stem.shrink." + rest
    return key  # DCUs and head are resolved below, once the block count is known


def map_authors_mefn(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # the same pattern as below: a damaged key ("main.3/norm...") is left to the key check
    indices = sorted({int(m.group(1)) for k in sd if (m := re.fullmatch(r"main\.(\d+)\..*", k))})
    head = indices[-1] if indices else 5
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"main\.(\d+)\.(.*)", k)
        if m and 3 <= int(m.group(1)) < head:
            out[f"encoder.dcus.{int(m.group(1)) - 3}.{_dcu_key(m.group(2))}"] = v
        elif m and int(m.group(1)) == head:
            out["head." + m.group(2).replace("conv2d.", "")] = v
        else:
            out[_map_mefn(k)] = v
    return out


def map_authors_ivfn_encoder(sd: Mapping[str, torch.Tensor], prefix: str) -> dict:
    out = {}
    for k, v in sd.items():
        if k.startswith("convLayer0."):
            out[f"{prefix}.dcus.0.{_dcu_key(k[len('convLayer0.'):])}"] = v
        elif m := re.fullmatch(r"convLayer\.(\d+)\.(.*)", k):
            out[f"{prefix}.dcus.{int(m.group(1)) + 1}.{_dcu_key(m.group(2))}"] = v
        else:
            out[f"{prefix}.{k}"] = v  # unknown: reported by the strict load
    return out


def map_authors_ivfn_decoder(sd: Mapping[str, torch.Tensor]) -> dict:
    return {("decoder.layers." + k[len("decode_last."):] if k.startswith("decode_last.")
             else "decoder." + k): v for k, v in sd.items()}


def map_authors_mmfn(sd: Mapping[str, torch.Tensor]) -> dict:
    out = {}
    for k, v in sd.items():
        if m := re.fullmatch(r"backbone_(lr|guide)\.(.*)", k):
            enc = "lr_encoder" if m.group(1) == "lr" else "guide_encoder"
            rest = m.group(2)
            if rest.startswith("conv0."):
                out[f"{enc}.stem.conv.{rest[len('conv0.'):]}"] = v
            elif rest.startswith("relu0."):
                out[f"{enc}.stem.shrink.{rest[len('relu0.'):]}"] = v
            elif mm := re.fullmatch(r"csc(\d+)\.(.*)", rest):
                out[f"{enc}.dcus.{int(mm.group(1)) - 1}.{_dcu_key(mm.group(2))}"] = v
            else:
                out[f"{enc}.{rest}"] = v
        elif k.startswith("decoder.conv0."):
            out["decoder." + k[len("decoder.conv0."):]] = v
        else:
            out[k] = v
    return out


def classify_authors_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    """'mef', 'mmf', 'ivf-base', 'ivf-detail', 'ivf-decoder' or 'unknown'."""
    keys = set(sd)
    if "main.0.conv2d.weight" in keys:
        return "mef"
    if "backbone_lr.conv0.weight" in keys:
        return "mmf"
    if "convLayer0.activation.weight" in keys:
        return "ivf-base"
    if "convLayer0.activation.theta" in keys:
        return "ivf-detail"
    if "decode_last.1.weight" in keys:
        return "ivf-decoder"
    return "unknown"


# --- building a network that fits a state dict -----------------------------------------

def _count(keys, pattern: str) -> int:
    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def build_network(task: str, hparams: Mapping | None = None) -> nn.Module:
    hp = dict(hparams or {})
    if task == "mef":
        return CSCMEFN(**hp)
    if task == "ivf":
        return CSCIVFN(**hp)
    if task == "mmf":
        return CSCMMFN(**hp)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def infer_hparams(task: str, sd: Mapping[str, torch.Tensor]) -> dict:
    """Architecture hyper-parameters read off a state dict in our key names."""
    keys = list(sd)
    if task == "mef":
        return {"code_channels": sd["encoder.stem.conv.weight"].shape[0],
                "num_dcus": _count(keys, r"encoder\.dcus\.(\d+)\.")}
    if task == "ivf":
        return {"code_channels": sd["base.dcus.0.adjoint.weight"].shape[0],
                "num_dcus": _count(keys, r"base\.dcus\.(\d+)\.")}
    if task == "mmf":
        w = sd["lr_encoder.stem.conv.weight"]
        hp = {"lr_channels": w.shape[1],
              "guide_channels": sd["guide_encoder.stem.conv.weight"].shape[1],
              "code_channels": w.shape[0],
              "num_dcus": _count(keys, r"lr_encoder\.dcus\.(\d+)\.")}
        guide_dcus = _count(keys, r"guide_encoder\.dcus\.(\d+)\.")
        if guide_dcus != hp["num_dcus"]:  # a deeper guide backbone
            hp["guide_num_dcus"] = guide_dcus
        return hp
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def load_state_strict(net: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True) with a message that lists what does not fit."""
    own = net.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs network {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(sd)) if tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:6]}"
                         f"{' ...' if len(unexpected) > 6 else ''}")
        if shapes:
            parts.append("shape mismatches " + "; ".join(shapes[:6]))
        raise CheckpointError(f"{source} does not fit the network: " + ", ".join(parts))
    net.load_state_dict(sd, strict=True)


def _ivf_parts_from_folder(folder: Path) -> dict[str, tuple[Path, dict]]:
    parts: dict[str, tuple[Path, dict]] = {}
    unreadable: list[str] = []
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES)
    for p in files:
        try:
            sd = read_checkpoint(p)
        except CheckpointError:
            unreadable.append(p.name)
            continue
        kind = classify_authors_state_dict(sd)
        if kind.startswith("ivf-"):
            if kind in parts:
                raise CheckpointError(
                    f"folder {str(folder)!r} holds two {kind} checkpoints: "
                    f"{parts[kind][0].name} and {p.name}")
            parts[kind] = (p, sd)
    need = ("ivf-base", "ivf-detail", "ivf-decoder")
    if not all(k in parts for k in need):
        raise CheckpointError(
            f"folder {str(folder)!r} must hold the three CSC-IVFN checkpoints (base encoder, "
            f"detail encoder, decoder); found {sorted(parts) or 'none'} among "
            f"{[p.name for p in files] or 'no .pth/.pt/.model files'}"
            + (f" (unreadable: {unreadable})" if unreadable else ""))
    return parts


def load_network(task: str, path: str | Path) -> tuple[nn.Module, dict]:
    """Load weights for ``task`` from ``path`` (our format, an authors' file, or for 'ivf' a
    folder with the authors' three files). Returns (network in eval mode, info dict)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    path = Path(path)
    info: dict = {"task": task, "weights": str(path)}
    if path.is_dir():
        if task != "ivf":
            raise CheckpointError(
                f"{str(path)!r} is a folder; a folder is only accepted for 'ivf' (the authors' "
                f"base/detail/decoder files). For {task!r} pass one checkpoint file")
        parts = _ivf_parts_from_folder(path)
        sd = {}
        sd.update(map_authors_ivfn_encoder(parts["ivf-base"][1], "base"))
        sd.update(map_authors_ivfn_encoder(parts["ivf-detail"][1], "detail"))
        sd.update(map_authors_ivfn_decoder(parts["ivf-decoder"][1]))
        info.update(format="authors",
                    sha256={k: sha256_of(p) for k, (p, _) in parts.items()},
                    files={k: str(p) for k, (p, _) in parts.items()})
        source = f"the CSC-IVFN checkpoints in {str(path)!r}"
    else:
        raw = read_checkpoint(path)
        info["sha256"] = sha256_of(path)
        source = repr(str(path))
        if raw.get("format") == FORMAT_NAME:
            if raw.get("task") != task:
                raise CheckpointError(
                    f"{source} holds weights for task {raw.get('task')!r}, expected {task!r}")
            sd = raw.get("state_dict")
            info.update(format=FORMAT_NAME, header={k: v for k, v in raw.items()
                                                     if k != "state_dict"})
        else:
            kind = classify_authors_state_dict(raw)
            if kind == "unknown":
                raise CheckpointError(
                    f"{source} is neither a napari-cscfusion checkpoint nor one of the authors' "
                    f"CSC-MEFN / CSC-MMFN / CSC-IVFN state dicts (first keys: {list(raw)[:4]})")
            if not kind.startswith(task):
                what = {"ivf": "a folder with the three CSC-IVFN files", "mef": "CSC-MEFN",
                        "mmf": "CSC-MMFN"}[task]
                raise CheckpointError(
                    f"{source} holds authors' weights for {kind!r}, expected {what} for task "
                    f"{task!r}")
            if task == "ivf":
                raise CheckpointError(
                    f"{source} is only the {kind} part of CSC-IVFN: pass the folder that holds "
                    f"the base, detail and decoder checkpoints")
            sd = map_authors_mefn(raw) if task == "mef" else map_authors_mmfn(raw)
            info["format"] = "authors"
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{source} holds no usable state dict (expected a mapping of "
                              f"parameter names to tensors, got {type(sd).__name__})")
    try:
        hparams = infer_hparams(task, sd)
    except KeyError as exc:
        raise CheckpointError(f"{source} lacks the key {exc.args[0]!r} needed for {task!r}") \
            from None
    except IndexError:  # e.g. a 0-d tensor where a convolution weight belongs
        raise CheckpointError(f"{source} holds tensors of the wrong rank for {task!r}") from None
    if task == "mmf":  # the geometry is no tensor: from the header (absent: the authors')
        geometry = ((info.get("header") or {}).get("hparams") or {}).get("geometry")
        if geometry is not None:
            if geometry not in MMF_GEOMETRIES:
                raise CheckpointError(f"{source} records the CSC-MMFN geometry {geometry!r}; "
                                      f"expected one of {MMF_GEOMETRIES}")
            if geometry != "authors":
                hparams["geometry"] = geometry
    net = build_network(task, hparams)
    load_state_strict(net, sd, source)
    if task == "mef":  # a fusion-rule setting of our weights, not a tensor: from the header
        sigma = ((info.get("header") or {}).get("training") or {}).get("exposure_prior_sigma")
        if sigma is not None and not (isinstance(sigma, (int, float)) and sigma > 0):
            raise CheckpointError(f"{source} records exposure_prior_sigma {sigma!r}; expected "
                                  f"a positive number")
        net.prior_sigma = None if sigma is None else float(sigma)
    info["hparams"] = hparams
    return net.eval(), info


def save_checkpoint(net: nn.Module, path: str | Path, task: str, training: Mapping | None = None,
                    version: str | None = None) -> Path:
    """Write our format: {'format', 'format_version', 'task', 'hparams', 'training',
    'package_version', 'state_dict'} (plain types and tensors only)."""
    if version is None:
        version = __version__
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "task": task,
        "hparams": dict(getattr(net, "hparams", {})), "training": dict(training or {}),
        "package_version": version,
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
    }
    tmp = path.with_name(path.name + ".part")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path
