"""What a benchmark ran on: versions, source, machine, accelerator, settings, load.

Everything a reader needs to judge whether two ``bench.json`` files can be compared:
funnn, jax, jaxlib and peer versions; the git commit and whether the checkout had local
changes; when and where; the CPU model and core count; the GPU, its driver, CUDA and cuDNN
where present; ``XLA_FLAGS`` and the options funnn's ``jit`` adds; ``OMP_*``/``MKL_*``
variables and the thread count PyTorch uses; the load average at start and end.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys

import jax

from funnn import core

__all__ = ["environment", "finish", "COMPARED"]

COMPARED = ("backend", "device", "device_count", "cpu_model", "cpu_count", "jax", "jaxlib",
            "funnn", "torch", "xla_flags", "xla_compiler_options", "threads_env",
            "torch_threads", "gpu_driver", "cuda", "cudnn", "x64", "default_matmul_precision")
"""The fields ``funnn bench compare`` checks: a difference in any is warned about."""


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git() -> dict:
    here = os.path.dirname(os.path.dirname(os.path.abspath(core.__file__)))
    commit = _run(["git", "rev-parse", "HEAD"], here)
    if commit is None:
        return {"git_commit": None, "git_dirty": None}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], here)
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> dict:
    info: dict = {"gpu_driver": None, "cuda": None, "cudnn": None}
    if jax.default_backend() != "gpu":
        return info
    smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    info["gpu_driver"] = smi.splitlines()[0] if smi else None
    try:
        from jax._src.lib import cuda_versions  # private: absent on some jaxlib builds
        if cuda_versions is not None:
            info["cuda"] = str(cuda_versions.cuda_runtime_get_version())
            info["cudnn"] = str(cuda_versions.cudnn_get_version())
    except (ImportError, AttributeError, RuntimeError):
        pass
    return info


def _versions() -> dict:
    import funnn
    out = {"funnn": getattr(funnn, "__version__", None), "jax": jax.__version__,
           "python": platform.python_version()}
    try:
        import jaxlib
        out["jaxlib"] = jaxlib.__version__
    except (ImportError, AttributeError):
        out["jaxlib"] = None
    from importlib import metadata

    for mod in ("numpy", "optax", "flax", "equinox", "torch"):
        try:        # the installed version, without importing the library (torch: seconds)
            out[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            out[mod] = None
    return out


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict:
    """The versions, source, machine, device and settings a run is measured on."""
    try:
        d = jax.devices()[0]
        device = f"{d.device_kind} ({d.platform})"
    except RuntimeError as err:
        device = f"unavailable ({err})"
    env = {"timestamp": datetime.datetime.now(datetime.UTC).isoformat(
               timespec="seconds"),
           "hostname": socket.gethostname(), "backend": jax.default_backend(),
           "device": device, "device_count": jax.device_count(),
           "platform": platform.platform(), "cpu_model": _cpu_model(),
           "cpu_count": os.cpu_count(), "x64": bool(getattr(jax.config, "jax_enable_x64", False)),
           "default_matmul_precision": str(getattr(jax.config, "jax_default_matmul_precision",
                                                   None)),
           "xla_flags": os.environ.get("XLA_FLAGS", ""),
           # what funnn.jit adds for this backend (the steps and the JAX baselines use it)
           "xla_compiler_options": core.compiler_options(),
           "threads_env": {k: v for k, v in sorted(os.environ.items())
                           if k.startswith(("OMP_", "MKL_", "OPENBLAS_", "KMP_"))},
           "load_average_start": _load()}
    return env | _versions() | _git() | _gpu()


def finish(env: dict) -> dict:
    """Add what is known only at the end: the load average, PyTorch's thread count."""
    env["load_average_end"] = _load()
    torch = sys.modules.get("torch")
    env["torch_threads"] = torch.get_num_threads() if torch is not None else None
    env["threads_env"] = {k: v for k, v in sorted(os.environ.items())
                          if k.startswith(("OMP_", "MKL_", "OPENBLAS_", "KMP_"))}
    return env
