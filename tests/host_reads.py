"""Guards for the tests that ``step()`` reads nothing back from the device (see
``tests/optim/test_host_sync.py``), shared by the suites of every optimizer."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def no_host_reads(host_resident=()):
    """Raise on every conversion of a tensor to a Python value (a device sync on accelerators).

    ``host_resident``: tensors kept on the CPU whatever the device (step counters, as in torch's
    own Adam); reading those is allowed.
    """
    allowed = {id(t) for t in host_resident}
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def guarded(name):
        def convert(self, *args, **kwargs):
            if id(self) not in allowed:
                raise AssertionError(f"step() read a tensor value back to the host ({name})")
            return saved[name](self, *args, **kwargs)

        return convert

    try:
        for name in names:
            setattr(torch.Tensor, name, guarded(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def step_counters(optimizer):
    """The tensors a CPU step may read: torch-style step counters, and the count of skipped
    pairs, which the optimizer reads at once on the CPU only (on CUDA it is copied to the host
    asynchronously, and ``cuda_sync_is_an_error`` checks that)."""
    counters = [v for state in optimizer.state.values() for k, v in state.items() if k == "step"]
    return counters + [t for d, t in optimizer._skip_counts.items() if d.type == "cpu"]


@contextlib.contextmanager
def cuda_sync_is_an_error(_optimizer):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def cuda_sync_is_an_error_outside_eigh(_optimizer, calls=None):
    """As :func:`cuda_sync_is_an_error`, except inside ``torch.linalg.eigh``.

    On CUDA ``eigh`` reads its convergence flags back to the host before it returns (torch has
    no ``eigh_ex`` that would leave them on the device), so a step that needs an eigenbasis
    synchronises there; this guard checks that it synchronises nowhere else. ``calls``: a list
    that gets one entry per ``eigh`` call, to show that the exemption was needed.
    """
    eigh = torch.linalg.eigh

    def eigh_allowed_to_synchronise(*args, **kwargs):
        if calls is not None:
            calls.append(args[0].shape)
        torch.cuda.set_sync_debug_mode("default")
        try:
            return eigh(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    torch.linalg.eigh = eigh_allowed_to_synchronise
    try:
        with cuda_sync_is_an_error(_optimizer):
            yield
    finally:
        torch.linalg.eigh = eigh
