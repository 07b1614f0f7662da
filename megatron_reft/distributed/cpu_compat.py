"""Let megatron-core run on a machine without CUDA.

megatron-core assumes CUDA in a few dozen places (see ../shared/reference/megatron_on_cpu.md):
`torch.cuda.current_device()` used as a device, tensors created with `device="cuda"` or moved
with `.cuda()`, the CUDA RNG tracker, `torch.cuda.synchronize()`, and optimizer asserts on
`param.type() == "torch.cuda.FloatTensor"`. This module redirects exactly those to the CPU.

`install()` is a no-op when CUDA is available: the GPU path runs megatron-core untouched.
Everything lives here so an upgrade of the pinned megatron-core has one place to re-check.
"""
from __future__ import annotations

import functools

import torch

_installed = False

# Factory functions megatron-core calls with an explicit CUDA device.
_FACTORIES = (
    "empty", "zeros", "ones", "full", "arange", "tensor", "rand", "randn", "randint",
    "empty_like", "zeros_like", "ones_like", "full_like", "as_tensor", "eye", "linspace",
)


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):  # torch.cuda.current_device() style index
        return True
    return torch.device(device).type == "cuda"


def _cpu_device_kwarg(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


def _tensor_to(original):
    @functools.wraps(original)
    def to(self, *args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        args = tuple("cpu" if (isinstance(a, (str, torch.device, int)) and not isinstance(a, bool)
                               and _is_cuda_device_arg(a)) else a for a in args)
        kwargs.pop("non_blocking", None)
        return original(self, *args, **kwargs)

    return to


def _is_cuda_device_arg(a) -> bool:
    if isinstance(a, int):
        return True  # .to(0) means a CUDA device index
    try:
        return torch.device(a).type == "cuda"
    except (RuntimeError, TypeError):
        return False


def _tensor_type(original):
    @functools.wraps(original)
    def type_(self, *args, **kwargs):
        if args or kwargs:
            return original(self, *args, **kwargs)
        # megatron's optimizer asserts CUDA type names; report the CUDA-style name on CPU.
        return original(self).replace("torch.", "torch.cuda.", 1)

    return type_


def _redirect_cuda_module() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.device_count = lambda: 0
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: that one must stay a no-op.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None


def _redirect_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device=None, clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state


def install() -> bool:
    """Install the CPU redirections once. Returns True when active (no CUDA)."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    # `with torch.device("meta")` recognises factories from a cached list: fill it with the
    # originals before they are wrapped (transformers builds models under that context).
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _cpu_device_kwarg(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.pin_memory = lambda self, *a, **k: self
    torch.Tensor.to = _tensor_to(torch.Tensor.to)
    torch.Tensor.type = _tensor_type(torch.Tensor.type)
    torch.nn.Module.cuda = lambda self, *a, **k: self
    _redirect_cuda_module()
    _redirect_rng_tracker()
    _installed = True
    return True


def is_active() -> bool:
    return _installed
