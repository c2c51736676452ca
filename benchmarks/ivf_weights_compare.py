"""IVF fusion quality of several CSC-IVFN weights files on all pairs of TNO and FLIR-test (the
issue 17 no-regression check: MI, VIF, Qabf, SSIM within 1 % of the previous weights).

    .venv/bin/python benchmarks/ivf_weights_compare.py LABEL=PATH [LABEL=PATH ...] \
        [--limit N] [--cache runs/ivf_compare.json] [--max-baseline] [--average-baseline]

fuse_infrared_visible with its defaults (the engine's rules, code gain 2), grey sources read as
benchmarks/quality.py reads them. Per-pair scores are kept in ``--cache`` (keyed by the weights'
sha256), so a new candidate costs only its own fusions. Markdown to stdout: the mean per set and
the change against the first file in per cent. ``--max-baseline`` adds the row of the max of
the luminances (the pixel maximum of the two sources, ``baselines.max_abs_fusion`` in intensity
mode), which leads most deep methods on MI, VIF and Qabf; ``--average-baseline`` the row of the
pixel average of the two sources. Measured after the choice, never to choose.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from napari_cscfusion import baselines, fuse_infrared_visible, load_model
from napari_cscfusion import metrics as M
from napari_cscfusion.models.checkpoints import sha256_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import DEFAULT_DATA, ivf_pairs, read_grey  # noqa: E402

SETS = (("TNO", "tno"), ("FLIR-test", "flir_test"))
KEYS = ("MI", "VIF", "Qabf", "SSIM")


MAX_LABEL = "max of the luminances"
AVERAGE_LABEL = "average"


def score_pair(model, ir_path: Path, vis_path: Path) -> dict[str, float]:
    """Scores of the fusion by ``model``, of the max of the luminances for None, of the pixel
    average for ``AVERAGE_LABEL``."""
    ir, vis = read_grey(ir_path), read_grey(vis_path)
    if model is None:
        fused = np.asarray(baselines.max_abs_fusion([ir, vis], mode="intensity"), np.float64)
    elif isinstance(model, str) and model == AVERAGE_LABEL:
        fused = np.asarray(baselines.average_fusion([ir, vis]), np.float64)
    else:
        fused = np.asarray(fuse_infrared_visible(ir, vis, model=model, device="cpu").image,
                           np.float64)
    srcs = [ir, vis]
    return {"MI": M.mutual_information(srcs, fused), "VIF": M.vif(srcs, fused),
            "Qabf": M.qabf(srcs, fused), "SSIM": M.ssim_fusion(srcs, fused)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("weights", nargs="+", help="LABEL=PATH; the first is the reference")
    p.add_argument("--limit", type=int, default=0, help="first N pairs per set (0: all)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--cache", type=Path, default=Path("runs/ivf_compare.json"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-baseline", action="store_true",
                   help="add the max of the luminances as a last row")
    p.add_argument("--average-baseline", action="store_true",
                   help="add the pixel average of the two sources as a row")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    cache = json.loads(a.cache.read_text()) if a.cache.is_file() else {}
    files = ([w.split("=", 1) for w in a.weights]
             + ([[AVERAGE_LABEL, AVERAGE_LABEL]] if a.average_baseline else [])
             + ([[MAX_LABEL, None]] if a.max_baseline else []))
    means: dict[str, dict[str, dict[str, float]]] = {}
    for label, path in files:
        digest = ("max" if path is None else AVERAGE_LABEL if path == AVERAGE_LABEL
                  else sha256_of(path))
        model = None
        for name, sub in SETS:
            pairs = ivf_pairs(a.data / "ivf" / sub)
            pairs = pairs[:a.limit] if a.limit else pairs
            rows = []
            for ir_p, vis_p in pairs:
                key = f"{digest}:{sub}:{ir_p.name}"
                if key not in cache:
                    model = model or (path if path == AVERAGE_LABEL
                                      else path and load_model("ivf", path))
                    cache[key] = score_pair(model, ir_p, vis_p)
                    a.cache.parent.mkdir(parents=True, exist_ok=True)
                    a.cache.write_text(json.dumps(cache))
                rows.append(cache[key])
            means.setdefault(label, {})[name] = {k: float(np.mean([r[k] for r in rows]))
                                                 for k in KEYS}
            means[label][name]["n"] = len(rows)
        print(f"{label}: done", file=sys.stderr, flush=True)
    ref = files[0][0]
    for name, _ in SETS:
        print(f"\n#### {name} ({means[ref][name]['n']} pairs; change against {ref})\n")
        print("| weights | " + " | ".join(KEYS) + " |\n| --- |" + " ---: |" * len(KEYS))
        for label, _ in files:
            m, r = means[label][name], means[ref][name]
            cells = [f"{m[k]:.4f}" + ("" if label == ref else
                                      f" ({100 * (m[k] / r[k] - 1):+.1f} %)") for k in KEYS]
            print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
