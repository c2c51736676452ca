"""Device choice: 'auto' takes CUDA, then Apple MPS, then the CPU."""

from __future__ import annotations

import torch


def available_devices() -> list[str]:
    out = ["cpu"]
    if torch.cuda.is_available():
        out = [f"cuda:{i}" for i in range(torch.cuda.device_count())] + out
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.insert(0, "mps")
    return out


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if isinstance(device, str):
        device = device.strip().lower()  # 'CPU', 'Cuda:0 ' are meant as the usual names
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {device!r} is not a device name ({exc}); use 'auto', 'cpu', "
                         f"'cuda', 'cuda:N' or 'mps'") from None
    ok = True
    if dev.type == "cuda":
        ok = torch.cuda.is_available() and (dev.index is None
                                             or dev.index < torch.cuda.device_count())
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        ok = mps is not None and mps.is_available()
    elif dev.type != "cpu":
        ok = False
    if not ok:
        raise ValueError(f"device: {str(device)!r} is not available on this machine; available: "
                         f"{', '.join(available_devices())} (or 'auto')")
    return dev


def module_on_cpu(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``net`` on the CPU, its parameters and buffers copied straight there (a
    deepcopy first would allocate them again on a GPU that has just run out of memory)."""
    import copy

    cpu = torch.device("cpu")
    memo = {id(t): (torch.nn.Parameter(t.detach().to(cpu), t.requires_grad)
                    if isinstance(t, torch.nn.Parameter) else t.to(cpu))
            for t in (*net.parameters(), *net.buffers())}
    return copy.deepcopy(net, memo)
