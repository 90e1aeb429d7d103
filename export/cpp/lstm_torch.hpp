// What the two LibTorch programs (lstm_torchscript, lstm_aoti) share: .npy arrays in as tensors,
// LibTorch errors as one line, the signature's outputs written back as .npy files.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "bundle.hpp"
#include "lstm_cli.hpp"

namespace lstm_torch {

// The signature's dtypes (npy::dtypes) as LibTorch's scalar types.
inline const std::vector<std::pair<std::string, at::ScalarType>>& scalar_types() {
  static const std::vector<std::pair<std::string, at::ScalarType>> table = {
      {"float32", at::kFloat}, {"float64", at::kDouble}, {"float16", at::kHalf},
      {"int64", at::kLong},    {"int32", at::kInt},      {"int8", at::kChar},
      {"uint8", at::kByte},    {"bool", at::kBool}};
  return table;
}

inline at::Tensor to_tensor(npy::Array& a) {  // no copy
  for (const auto& [name, type] : scalar_types())
    if (name == a.dtype->name)
      return at::from_blob(a.data.data(), a.shape, at::TensorOptions().dtype(type));
  throw std::logic_error(std::string("no LibTorch type for ") + a.dtype->name);
}

inline std::vector<at::Tensor> to_tensors(std::vector<npy::Array>& arrays) {
  std::vector<at::Tensor> tensors;
  for (auto& a : arrays) tensors.push_back(to_tensor(a));
  return tensors;
}

// A LibTorch error in one line. A TorchScript interpreter error (torch::jit::JITException, a
// std::runtime_error) is two tracebacks whose last line is the cause:
// "builtins.RuntimeError: LSTM: input.size(-1) must be equal to input_size. Expected 5, got 6".
inline std::string describe(const std::exception& e) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
  std::string m = c10_error ? c10_error->what_without_backtrace() : e.what();
  while (!m.empty() && m.back() == '\n') m.pop_back();
  if (m.find("Traceback of TorchScript") != std::string::npos) {
    m = m.substr(m.rfind('\n') + 1);
    if (m.rfind("builtins.", 0) == 0) m = m.substr(std::string("builtins.").size());
  }
  return lstm_cli::one_line(m);
}

// Writes the model's results as the signature's outputs, in order: as many tensors as outputs,
// each of its declared dtype.
inline void save_outputs(const lstm_cli::Args& args, const bundle::Signature& signature,
                         const std::vector<at::Tensor>& outputs) {
  if (outputs.size() != signature.outputs.size())
    throw std::runtime_error(args.model + ": the model returned " +
                             std::to_string(outputs.size()) + " tensors, its signature (" +
                             args.manifest + ") has " + std::to_string(signature.outputs.size()) +
                             " outputs: " + bundle::names(signature.outputs));
  for (size_t i = 0; i < outputs.size(); ++i) {
    const at::Tensor t = outputs[i].to(at::kCPU).contiguous();
    std::string dtype = c10::toString(t.scalar_type());  // LibTorch's name, if numpy has none
    for (const auto& [name, type] : scalar_types())
      if (type == t.scalar_type()) dtype = name;
    bundle::save_output(args.outputs, args.model, signature.outputs[i], dtype, t.sizes().vec(),
                        t.const_data_ptr());
  }
}

}  // namespace lstm_torch
