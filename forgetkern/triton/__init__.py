"""Triton kernels and their host launchers (one op per module, mirroring ``forgetkern/reference``).

Importing this package does not import triton; the op modules do. Each kernel module exposes ``AOT_SPECS``:
a list of :class:`AotSpec` (or plain ``(kernel, signature, constexprs, description[, options[, attrs]])``
tuples) covering every specialisation its launcher can produce. ``forgetkern.testing.aot`` discovers them in
every module of this package, compiles them ahead of time for sm_80/sm_90 (no GPU needed) and checks for spills.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple


class AotSpec(NamedTuple):
    """One ahead-of-time compile of a ``@triton.jit`` kernel.

    ``signature`` maps every argument name to a Triton type string (``"*fp32"``, ``"i32"``, ``"fp32"``,
    ``"constexpr"``); ``constexprs`` gives the constexpr values; ``options`` the compile options the launcher
    uses (e.g. ``{"num_warps": 4}``).

    ``attrs`` names the arguments the launcher guarantees 16-divisible (pointers 16-byte aligned, integers
    multiples of 16): the JIT, which looks at the actual values, gives those ``tt.divisibility=16``, which lets
    the compiler vectorise and pipeline; without ``attrs`` the spec is the specialisation for arguments none
    of which is 16-divisible. The JIT also turns an integer argument equal to 1 into the constexpr 1: a spec
    lists such arguments as constexprs. A dict ``{name or (index,): [[attr, value], ...]}`` is passed to
    ``ASTSource`` as is. (``forgetkern.triton._jit.AlignedPair`` makes launchers whose launches are exactly
    such specs.)
    """

    kernel: Callable
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    description: str
    options: Dict[str, Any] = {}
    attrs: Any = ()

