"""cpp-backend ops composed in Python around the C++ CPU kernels (one op per module, mirroring
``forgetkern/reference``).

Most ops of the cpp backend are one C++ op each (``torch.ops.forgetkern_cpu.<fn>``). An op here keeps its
reference's torch GEMMs and moves only its elementwise work into C++ kernels of ``forgetkern._C``;
the op's ``Kernels`` (``forgetkern/ops/<op>.py``) names the module, and ``forgetkern._backend.CPP_KERNELS`` the C++
kernels it needs.
"""
