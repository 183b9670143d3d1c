"""The one seam between Python and native code: the C++ sources (csrc/), their build for this CPU's
instruction-set level (build.py), each op's choice between C++ and its torch twin (ops.py), and the
twins (reference.py)."""
