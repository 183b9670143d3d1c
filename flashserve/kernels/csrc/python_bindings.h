// What the two sources with Python bindings need: pybind11 and torch's casters between at::Tensor
// and torch.Tensor. Not <torch/extension.h>, which adds the whole C++ frontend: parsing it took
// ~30 s per source of a build's ~65 s (g++ -O3, measured), for names these sources never use.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

namespace py = pybind11;
