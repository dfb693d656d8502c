"""Count the device->host reads a model's forward pass makes (the CPU-measurable stand-in for CUDA
host syncs): the torch.Tensor methods that read a value back to the host (.cpu, .item, .tolist, .numpy,
bool/int/float conversion) and torch.bincount (which reads its input's max back on CUDA), counted on
the calling thread inside `net.forward` only. `.numpy()` of a tensor that `.cpu()` just returned is part
of that one read, not a second one."""

from __future__ import annotations

import collections
import threading
import weakref
from typing import Callable

import torch

READS = ("cpu", "item", "tolist", "numpy", "__bool__", "__int__", "__float__")


def count_reads(net: torch.nn.Module, fn: Callable[[], object]) -> collections.Counter:
    """Reads made on this thread inside net.forward while fn() runs: {method name: calls}."""
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    orig_bincount, orig_forward = torch.bincount, net.forward
    main, inside = threading.get_ident(), [False]
    just_read: dict[int, weakref.ref] = {}  # results of .cpu(): their .numpy() is the same read

    def counting() -> bool:
        return inside[0] and threading.get_ident() == main

    def wrap(name, f):
        def inner(self, *a, **kw):
            out = f(self, *a, **kw)
            same_read = name == "numpy" and just_read.get(id(self), lambda: None)() is self
            if counting() and not same_read:
                counts[name] += 1
            if name == "cpu" and isinstance(out, torch.Tensor):
                just_read[id(out)] = weakref.ref(out)
            return out
        return inner

    def bincount(*a, **kw):
        if counting():
            counts["bincount"] += 1
        return orig_bincount(*a, **kw)

    def forward(*a, **kw):
        inside[0] = True
        try:
            return orig_forward(*a, **kw)
        finally:
            inside[0] = False

    try:
        for name, f in originals.items():
            setattr(torch.Tensor, name, wrap(name, f))
        torch.bincount = bincount
        net.forward = forward
        fn()
    finally:
        for name, f in originals.items():
            setattr(torch.Tensor, name, f)
        torch.bincount = orig_bincount
        del net.forward
    return counts
