"""A kernel jitted as exactly two specialisations on alignment, so that what runs is what ``AOT_SPECS`` lists.

At launch, Triton's JIT marks every pointer argument whose address is 16-byte aligned and every integer
argument that is a multiple of 16 with ``tt.divisibility=16`` (and turns an integer equal to 1 into the
constexpr 1). The hints decide vectorisation and software pipelining, hence registers, spills and the tile a
kernel can afford: a tile tuned with them may spill without them. :class:`AlignedPair` pins the choice down:

* ``aligned``: only the ``hinted`` arguments may get the hint; the launcher takes it when :meth:`holds` says
  all of them have it (then the compiled variant is exactly the spec with ``attrs=hinted``);
* ``unaligned``: no argument gets the hint (the spec without ``attrs``), whatever the values.

``no_spec`` arguments (row counts, loop counts, hash keys) are never specialised, not even on the value 1.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Iterable, Sequence

import torch
import triton

from forgetkern.triton import AotSpec


def runtime_args(fn) -> tuple:
    """Names of the non-constexpr parameters of a Python kernel function, in order."""
    return tuple(n for n, p in inspect.signature(fn).parameters.items() if "constexpr" not in str(p.annotation))


def _divisible(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.data_ptr() % 16 == 0
    return v == 1 or v % 16 == 0  # 1 becomes a constexpr: more than the hint


class AlignedPair:
    def __init__(self, fn, hinted: Sequence[str], no_spec: Sequence[str] = ()):
        self.args = runtime_args(fn)
        unknown = (set(hinted) | set(no_spec)) - set(self.args)
        if unknown:
            raise ValueError(f"{fn.__name__}: no runtime arguments {sorted(unknown)}")
        self.hinted, self.no_spec = tuple(hinted), tuple(no_spec)
        free = [a for a in self.args if a not in self.no_spec]
        self.aligned = triton.jit(fn, do_not_specialize=self.no_spec,
                                  do_not_specialize_on_alignment=[a for a in free if a not in self.hinted])
        self.unaligned = triton.jit(fn, do_not_specialize=self.no_spec, do_not_specialize_on_alignment=free)
        self.__name__ = fn.__name__

    def holds(self, **values) -> bool:
        """Whether every hinted argument (``values``: name -> the value passed) is 16-divisible."""
        missing = set(self.hinted) - set(values)
        if missing:
            raise ValueError(f"{self.__name__}: values of the hinted arguments {sorted(missing)} not given")
        return all(_divisible(values[name]) for name in self.hinted)

    def pick(self, aligned: bool):
        return self.aligned if aligned else self.unaligned

    def spec(self, types: Dict[str, str], constexprs: Dict[str, Any], description: str, options: Dict[str, Any],
             aligned: bool, ones: Iterable[str] = ()) -> AotSpec:
        """The :class:`AotSpec` of one launch: ``types`` of the runtime arguments (default ``"i32"``; ``ones``:
        those the launcher passes as 1, constexprs then), ``aligned``: which of the two specialisations."""
        ones = tuple(ones)
        if set(ones) & set(self.no_spec):
            raise ValueError(f"{self.__name__}: {sorted(set(ones) & set(self.no_spec))} are never specialised")
        sig = {a: "constexpr" if a in ones else types.get(a, "i32") for a in self.args}
        sig.update({k: "constexpr" for k in constexprs})
        attrs = tuple(a for a in self.hinted if a not in ones) if aligned else ()
        kind = "aligned" if aligned else "unaligned"
        return AotSpec(self.pick(aligned), sig, {**{a: 1 for a in ones}, **constexprs}, f"{description} {kind}",
                       dict(options), attrs)
