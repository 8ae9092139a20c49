"""cpp-backend ops composed in Python around the C++ CPU kernels (one op per module, mirroring
``forgetkern/reference``).

Most ops of the cpp backend are one C++ op each (``torch.ops.forgetkern_cpu.<fn>``). An op here keeps its
reference's torch GEMMs and moves only its elementwise work into C++ kernels of ``forgetkern._C``;
``forgetkern._backend`` lists these ops (``CPP_COMPOSED``) with the C++ kernels each one needs.
"""
