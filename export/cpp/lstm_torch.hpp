// What the two LibTorch programs (lstm_torchscript, lstm_aoti) share: .npy arrays in as tensors,
// LibTorch errors as one line, the three outputs written back as .npy files.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "lstm_cli.hpp"

namespace lstm_torch {

inline at::Tensor to_tensor(npy::Array& a, at::ScalarType dtype) {  // no copy
  return at::from_blob(a.data.data(), a.shape, at::TensorOptions().dtype(dtype));
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

// Writes output, hn, cn (in that order) to args.outputs; each must be float32.
inline void save_outputs(const lstm_cli::Args& args, const std::vector<at::Tensor>& outputs) {
  for (size_t i = 0; i < outputs.size(); ++i) {
    const std::string& name = lstm_cli::kOutputNames[i];
    const at::Tensor t = outputs[i].to(at::kCPU).contiguous();
    if (t.scalar_type() != at::kFloat)
      throw std::runtime_error(args.model + ": output " + name + " is " +
                               c10::toString(t.scalar_type()) + ", expected float32");
    lstm_cli::save_output(args.outputs, name, t.sizes().vec(), t.const_data_ptr<float>());
  }
}

}  // namespace lstm_torch
