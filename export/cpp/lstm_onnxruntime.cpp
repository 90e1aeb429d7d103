// Runs a bundle's model.onnx with the ONNX Runtime C++ API on the CPU execution provider.
// Usage: lstm_onnxruntime --model model.onnx --inputs DIR --outputs DIR [--repeat N] (see --help).
#include <cpu_provider_factory.h>
#include <onnxruntime_cxx_api.h>

#include <array>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "lstm_cli.hpp"

namespace {

template <typename T>
Ort::Value to_value(const Ort::MemoryInfo& cpu, npy::Array& a) {  // no copy
  T* data = reinterpret_cast<T*>(a.data.data());
  return Ort::Value::CreateTensor<T>(cpu, data, size_t(a.numel()), a.shape.data(), a.shape.size());
}

void run(const lstm_cli::Args& args) {
  lstm_cli::Inputs in = lstm_cli::load_inputs(args.inputs);

  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "lstm_onnxruntime");
  // The session options of Python's sessions (check/ort_session.py), so that bench compares the
  // same session from both languages: every graph optimization, one inter-op thread.
  Ort::SessionOptions options;
  options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
  options.SetExecutionMode(ExecutionMode::ORT_SEQUENTIAL);
  options.SetInterOpNumThreads(1);
  if (args.threads > 0) options.SetIntraOpNumThreads(args.threads);
  // The runtime is an explicit choice: the CPU execution provider, with its arena.
  Ort::ThrowOnError(OrtSessionOptionsAppendExecutionProvider_CPU(options, /*use_arena=*/1));
  std::unique_ptr<Ort::Session> session;
  try {
    session = std::make_unique<Ort::Session>(env, args.model.c_str(), options);
  } catch (const Ort::Exception& e) {
    throw std::runtime_error(args.model + ": cannot load the ONNX model (" + e.what() + ")");
  }

  const auto cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::array<Ort::Value, 4> values = {to_value<float>(cpu, in.input),
                                      to_value<int64_t>(cpu, in.lengths),
                                      to_value<float>(cpu, in.h0), to_value<float>(cpu, in.c0)};
  std::vector<const char*> input_names, output_names;
  for (const auto& n : lstm_cli::kInputNames) input_names.push_back(n.c_str());
  for (const auto& n : lstm_cli::kOutputNames) output_names.push_back(n.c_str());
  const auto forward = [&] {
    try {
      return session->Run(Ort::RunOptions{nullptr}, input_names.data(), values.data(),
                          values.size(), output_names.data(), output_names.size());
    } catch (const Ort::Exception& e) {
      throw std::runtime_error(args.model + ": run failed: " + e.what());
    }
  };
  const auto write = [&](const std::vector<Ort::Value>& outputs) {
    for (size_t i = 0; i < outputs.size(); ++i) {
      const std::string& name = lstm_cli::kOutputNames[i];
      const auto info = outputs[i].GetTensorTypeAndShapeInfo();
      if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        throw std::runtime_error(args.model + ": output " + name + " is not float32");
      lstm_cli::save_output(args.outputs, name, info.GetShape(), outputs[i].GetTensorData<float>());
    }
  };
  lstm_cli::run_forward(args, forward, write);
}

}  // namespace

int main(int argc, char** argv) {
  // Headers older than the library are fine (the C API only grows); newer ones are not.
  if (OrtGetApiBase()->GetApi(ORT_API_VERSION) == nullptr) {
    std::cerr << "lstm_onnxruntime: error: the ONNX Runtime library "
              << OrtGetApiBase()->GetVersionString() << " does not provide API version "
              << ORT_API_VERSION << " that this program was built with\n";
    return 1;
  }
  const lstm_cli::Program program{"lstm_onnxruntime", "ONNX Runtime", "model.onnx",
                                  [] { return std::string(OrtGetApiBase()->GetVersionString()); }};
  return lstm_cli::run_main(argc, argv, program, run);
}
