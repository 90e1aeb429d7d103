// Runs a bundle's model.onnx (or model.int8.onnx) with the ONNX Runtime C++ API on the CPU
// execution provider, its inputs and outputs named as the signature.
// Usage: lstm_onnxruntime --model model.onnx --inputs DIR --outputs DIR [--repeat N] (see --help).
#include <cpu_provider_factory.h>
#include <onnxruntime_cxx_api.h>

#include <iostream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "bundle.hpp"
#include "lstm_cli.hpp"

namespace {

// The signature's dtypes (npy::dtypes) as ONNX element types.
const std::vector<std::pair<std::string, ONNXTensorElementDataType>>& element_types() {
  static const std::vector<std::pair<std::string, ONNXTensorElementDataType>> table = {
      {"float32", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
      {"float64", ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE},
      {"float16", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16},
      {"int64", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64},
      {"int32", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32},
      {"int8", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8},
      {"uint8", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8},
      {"bool", ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL}};
  return table;
}

Ort::Value to_value(const Ort::MemoryInfo& cpu, npy::Array& a) {  // no copy
  for (const auto& [name, type] : element_types())
    if (name == a.dtype->name)
      return Ort::Value::CreateTensor(cpu, a.data.data(), a.data.size(), a.shape.data(),
                                      a.shape.size(), type);
  throw std::logic_error(std::string("no ONNX element type for ") + a.dtype->name);
}

// numpy's name for an output's element type, or ONNX's number for it.
std::string dtype_name(ONNXTensorElementDataType type) {
  for (const auto& [name, t] : element_types())
    if (t == type) return name;
  return "ONNX element type " + std::to_string(int(type));
}

void run(const lstm_cli::Args& args) {
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

  const bundle::Signature signature = bundle::read_signature(args.manifest);
  std::vector<npy::Array> arrays = bundle::load_inputs(signature, args.inputs, args.model);

  const auto cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<Ort::Value> values;
  for (auto& a : arrays) values.push_back(to_value(cpu, a));
  std::vector<const char*> input_names, output_names;
  for (const auto& t : signature.inputs) input_names.push_back(t.name.c_str());
  for (const auto& t : signature.outputs) output_names.push_back(t.name.c_str());
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
      const bundle::TensorSpec& spec = signature.outputs[i];
      if (!outputs[i].IsTensor())
        throw std::runtime_error(args.model + ": output " + spec.name + " is not a tensor");
      const auto info = outputs[i].GetTensorTypeAndShapeInfo();
      bundle::save_output(args.outputs, args.model, spec, dtype_name(info.GetElementType()),
                          info.GetShape(), outputs[i].GetTensorRawData());
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
