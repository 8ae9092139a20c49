"""Each op is defined once (``forgetkern::<op>`` in ``forgetkern/ops/<op>.py``); the C++ kernels registered
by the extensions must take exactly the arguments the op hands them.

The extensions' kernels live in their own namespaces (``forgetkern_cpu``, ``forgetkern_cuda``) and are reached
only through the op's :class:`forgetkern._backend.Kernels`. Their schemas are written in C++, so this test pins
them to the Python side: argument names in order equal those of the reference implementation (the kernel
interface every backend implements; its parameters with defaults are its own knobs), and every argument's type (and its mutability) equals the type of the
same-named argument of the ``forgetkern::`` op that calls the kernel. Both extensions load on a machine without
a GPU, so a drifted CUDA schema fails here too, not only where a GPU runs it.
"""

import inspect
import re

import pytest
import torch

import forgetkern  # noqa: F401  (defines the ops)
from forgetkern import _backend, _ext
from forgetkern.ops import adamw_ewc, ewc_delta_w, ewc_penalty, merge_task_vectors, fisher_accumulate, linear_persample_sq_grad, lora_linear
from forgetkern.ops import olora_loss, project_out

# (Kernels, the forgetkern:: op whose body calls it)
CASES = {
    "fisher_accumulate_": (fisher_accumulate.KERNELS, "fisher_accumulate_"),
    "ewc_fused": (ewc_penalty.KERNELS, "ewc_fused"),
    "ewc_delta_w": (ewc_delta_w.KERNELS, "ewc_delta_w_fused"),
    "linear_persample_sq_grad_": (linear_persample_sq_grad.KERNELS, "linear_persample_sq_grad_"),
    "lora_linear_fwd": (lora_linear.FWD_KERNELS, "lora_linear_fwd"),
    "lora_linear_bwd": (lora_linear.BWD_KERNELS, "lora_linear_bwd"),
    "adamw_ewc_": (adamw_ewc.KERNELS, "adamw_ewc_"),
    "merge_task_vectors": (merge_task_vectors.KERNELS, "merge_task_vectors"),
    "project_out_": (project_out.KERNELS, "project_out_"),
    "olora_loss": (olora_loss.FWD_KERNELS, "olora_loss"),
    "olora_loss_backward": (olora_loss.BWD_KERNELS, "olora_loss_backward"),
}


def _type(arg) -> str:
    t = str(arg.type).replace("SymInt", "int")  # the Python op's int lists are symbolic; the kernel's are not
    return t + ("!" if arg.alias_info is not None and arg.alias_info.is_write else "")


def _extension_kernels():
    for name, (kernels, op) in CASES.items():
        for backend, ns in (("cpp", _ext.cpu_ops()), ("cuda", _ext.cuda_ops())):
            if backend not in kernels.backends:
                continue
            try:
                impl = kernels.get(backend) if ns is not None else None
            except AttributeError as e:  # the loaded extension predates the kernel: fail, naming the fix
                yield pytest.param(kernels, op, str(e), id=f"{name}-{backend}")
                continue
            if isinstance(impl, (torch._ops.OpOverloadPacket, str)):
                yield pytest.param(kernels, op, impl, id=f"{name}-{backend}")


KERNEL_CASES = list(_extension_kernels())


def test_the_extensions_are_checked():
    if _ext.cpu_ops() is None:
        pytest.skip(f"CPU extension not loaded: {_ext.cpu_ext_error()}")
    assert {"fisher_accumulate_-cpp", "ewc_fused-cpp", "ewc_delta_w-cpp"} <= {p.id for p in KERNEL_CASES}


@pytest.mark.parametrize("kernels, op, impl", KERNEL_CASES)
def test_kernel_schema_matches_the_op(kernels, op, impl):
    if isinstance(impl, str):
        pytest.fail(f"the loaded extension lacks the kernel ({impl}): it was built from older sources; rebuild "
                    f"with {_ext.REBUILD}")
    kernel = impl.default._schema
    # the reference's required parameters (its defaulted ones are the reference's own tuning knobs)
    ref = [n for n, p in inspect.signature(kernels.get("torch")).parameters.items() if p.default is p.empty]
    assert [a.name for a in kernel.arguments] == ref, (
        f"{kernel.name}: arguments {[a.name for a in kernel.arguments]} differ from the reference's {ref}")
    defined = {a.name: a for a in getattr(torch.ops.forgetkern, op).default._schema.arguments}
    for a in kernel.arguments:
        if a.name in defined:
            assert _type(a) == _type(defined[a.name]), f"{kernel.name}: argument {a.name} is {_type(a)}, the op's " \
                                                        f"is {_type(defined[a.name])}"
    want = [str(r.type) for r in getattr(torch.ops.forgetkern, op).default._schema.returns]
    if op != "ewc_delta_w_fused":  # the kernel's return is the op's penalty (the gradients are written in place)
        assert [str(r.type) for r in kernel.returns] == want


def test_every_op_names_its_backends():
    """use_backend(op=...) names, SUPPORTED_BY_OP and the Kernels tables agree."""
    for name in set(_backend._OP_NAMES.values()):
        assert name in _backend.SUPPORTED_BY_OP, f"op {name} has no Kernels table"
        assert _backend.SUPPORTED_BY_OP[name][0] == "torch"


def test_unknown_backend_of_an_op_is_refused():
    with pytest.raises(forgetkern.BackendError, match="does not implement"):
        lora_linear.FWD_KERNELS.get("nope")
    with forgetkern.use_backend("cuda", op="lwf_loss"):
        with pytest.raises(forgetkern.BackendError, match="implemented: torch"):
            forgetkern.ops.lwf_loss.KERNELS(torch.device("cpu"))
