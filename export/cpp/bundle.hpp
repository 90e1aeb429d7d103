// The bundle contract as the programs read it: the signature that manifest.json declares
// (lstm_deploy/bundle.py's Signature, TensorSpec, ModelInfo), the inputs loaded and checked
// against it, the outputs checked and written. Names are never built in: an LSTM bundle
// (input, lengths, h0, c0 -> output, hn, cn) and a whole-model bundle (tokens, lengths -> logits)
// take the same path. Errors are std::runtime_error with one line naming the file or field.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "npy.hpp"

namespace bundle {

inline const std::string kManifest = "manifest.json";
constexpr int kFormatVersion = 1;              // lstm_deploy.bundle.FORMAT_VERSION
inline const std::string kSequence = "sequence";  // the axis whose steps `lengths` counts
inline const std::string kLstmLengths = "lengths";  // an LSTM bundle's lengths input

struct Dim {
  int64_t size = -1;  // a fixed size, or -1 for a dynamic axis
  std::string axis;   // the dynamic axis's name ("batch")
};

struct TensorSpec {
  std::string name;
  const npy::DType* dtype = nullptr;
  std::vector<Dim> shape;

  std::string shape_str() const {  // "(batch, sequence, 5)", as npy::shape_str writes sizes
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i)
      s += (i ? ", " : "") + (shape[i].size < 0 ? shape[i].axis : std::to_string(shape[i].size));
    return s + (shape.size() == 1 ? ",)" : ")");
  }
};

struct Signature {
  std::vector<TensorSpec> inputs, outputs;
  std::string lengths;  // the input holding each sequence's length in [1, sequence], or ""
  std::map<std::string, std::pair<int64_t, int64_t>> ranges;  // integer inputs' [low, high)
};

namespace detail {

using nlohmann::json;

struct Reader {
  std::string path;

  [[noreturn]] void fail(const std::string& where, const std::string& what) const {
    throw std::runtime_error(path + ": " + where + " " + what);
  }
  const json& field(const json& object, const std::string& key, const std::string& where) const {
    if (!object.is_object()) fail(where, "must be a JSON object");
    const auto found = object.find(key);
    if (found == object.end()) fail(where, "has no \"" + key + "\"");
    return *found;
  }

  TensorSpec tensor(const json& entry, const std::string& where) const {
    TensorSpec t;
    const json& name = field(entry, "name", where);
    if (!name.is_string() || name.get<std::string>().empty())
      fail(where + ".name", "must be a non-empty string");
    t.name = name.get<std::string>();
    // Each tensor is a file, <name>.npy, in --inputs or --outputs: it must stay in that folder.
    if (t.name.find('/') != std::string::npos || t.name == "." || t.name == "..")
      fail(where + ".name", "\"" + t.name + "\" cannot be a file name (it names <name>.npy)");
    const json& dtype = field(entry, "dtype", where);
    t.dtype = dtype.is_string() ? npy::find_dtype(dtype.get<std::string>()) : nullptr;
    if (!t.dtype) fail(where + ".dtype", "is " + dtype.dump() + "; expected one of " +
                                             npy::dtype_names());
    const json& shape = field(entry, "shape", where);
    if (!shape.is_array()) fail(where + ".shape", "must be a list of sizes and axis names");
    for (const json& d : shape) {
      if (d.is_number_integer() && d.get<int64_t>() >= 0)
        t.shape.push_back({d.get<int64_t>(), ""});
      else if (d.is_string() && !d.get<std::string>().empty())
        t.shape.push_back({-1, d.get<std::string>()});
      else
        fail(where + ".shape", "holds " + d.dump() + "; expected a size >= 0 or an axis name");
    }
    return t;
  }

  std::vector<TensorSpec> tensors(const json& signature, const std::string& side) const {
    const json& list = field(signature, side, "signature");
    if (!list.is_array() || list.empty()) fail("signature." + side, "must be a non-empty list");
    std::vector<TensorSpec> out;
    for (size_t i = 0; i < list.size(); ++i)
      out.push_back(tensor(list[i], "signature." + side + "[" + std::to_string(i) + "]"));
    return out;
  }

  bool has_input(const Signature& s, const std::string& name) const {
    for (const auto& t : s.inputs)
      if (t.name == name) return true;
    return false;
  }

  // What a whole-model bundle's "model" adds (ModelInfo): its lengths input and integer ranges.
  void model(const json& model, Signature& s) const {
    if (!model.is_object()) fail("model", "must be a JSON object");
    const auto lengths = model.find("lengths");
    if (lengths != model.end() && !lengths->is_null()) {
      if (!lengths->is_string() || !has_input(s, lengths->get<std::string>()))
        fail("model.lengths", "is " + lengths->dump() + "; it must name an input");
      s.lengths = lengths->get<std::string>();
    }
    const auto ranges = model.find("ranges");
    if (ranges == model.end()) return;
    if (!ranges->is_object()) fail("model.ranges", "must be a JSON object");
    for (const auto& [name, pair] : ranges->items()) {
      const bool ok = has_input(s, name) && pair.is_array() && pair.size() == 2 &&
                      pair[0].is_number_integer() && pair[1].is_number_integer() &&
                      pair[0].get<int64_t>() < pair[1].get<int64_t>();
      if (!ok) fail("model.ranges[\"" + name + "\"]", "must be [low, high) of one of the inputs");
      s.ranges[name] = {pair[0].get<int64_t>(), pair[1].get<int64_t>()};
    }
  }
};

}  // namespace detail

// The signature that the manifest at `path` declares.
inline Signature read_signature(const std::string& path) {
  using nlohmann::json;
  const detail::Reader r{path};
  std::ifstream f(path);
  if (!f)
    throw std::runtime_error(path + ": cannot open the bundle's manifest (missing or unreadable); "
                             "pass --manifest PATH if it is not beside --model");
  json manifest;
  try {
    manifest = json::parse(f);
  } catch (const json::exception& e) {
    throw std::runtime_error(path + ": not valid JSON (" + e.what() + ")");
  }
  const json& version = r.field(manifest, "format_version", "the manifest");
  if (version != kFormatVersion)
    r.fail("format_version", "is " + version.dump() + ", this program reads " +
                                 std::to_string(kFormatVersion) +
                                 "; re-export the bundle with this version of lstm-deploy");
  const json& signature = r.field(manifest, "signature", "the manifest");
  Signature s;
  s.inputs = r.tensors(signature, "inputs");
  s.outputs = r.tensors(signature, "outputs");
  if (manifest.contains("model"))
    r.model(manifest["model"], s);
  else if (r.has_input(s, kLstmLengths))  // an LSTM bundle
    s.lengths = kLstmLengths;
  return s;
}

namespace detail {

// Element i of an integer (or bool) array, as int64.
inline int64_t integer_at(const npy::Array& a, int64_t i) {
  const std::string name = a.dtype->name;
  if (name == "int64") return a.as<int64_t>()[i];
  if (name == "int32") return a.as<int32_t>()[i];
  if (name == "int8") return a.as<int8_t>()[i];
  return a.as<uint8_t>()[i];  // uint8, bool
}

inline bool is_integer(const npy::DType& d) {
  const std::string name = d.name;
  return name == "int64" || name == "int32" || name == "int8" || name == "uint8";
}

inline std::string index_str(const std::vector<int64_t>& shape, int64_t flat) {  // "[1, 3]"
  std::vector<int64_t> index(shape.size());
  for (size_t d = shape.size(); d-- > 0;) {
    index[d] = flat % shape[d];
    flat /= shape[d];
  }
  std::string s = "[";
  for (size_t d = 0; d < index.size(); ++d) s += (d ? ", " : "") + std::to_string(index[d]);
  return s + "]";
}

// The first element outside [low, high], as "name[i, j] = v", or "".
inline std::string first_outside(const npy::Array& a, const std::string& name, int64_t low,
                                 int64_t high) {
  for (int64_t i = 0; i < a.numel(); ++i) {
    const int64_t v = integer_at(a, i);
    if (v < low || v > high) return name + index_str(a.shape, i) + " = " + std::to_string(v);
  }
  return "";
}

struct Bound {  // a named axis's size, and the first input that gave it
  int64_t size;
  std::string file;
  size_t dim;
};
using Axes = std::map<std::string, Bound>;

// Rank and fixed sizes as declared; each named axis at least 1 and one size across the inputs.
inline void check_shape(const TensorSpec& spec, const npy::Array& a, const std::string& path,
                        const std::string& model, Axes& axes) {
  bool ok = a.shape.size() == spec.shape.size();
  for (size_t d = 0; ok && d < a.shape.size(); ++d)
    ok = spec.shape[d].size < 0 || spec.shape[d].size == a.shape[d];
  if (!ok)
    throw std::runtime_error(path + ": shape " + npy::shape_str(a.shape) + ", " + model +
                             " takes " + spec.shape_str());
  for (size_t d = 0; d < a.shape.size(); ++d) {
    const std::string& axis = spec.shape[d].axis;
    if (axis.empty()) continue;
    if (a.shape[d] < 1)
      throw std::runtime_error(path + ": shape " + npy::shape_str(a.shape) + ", its " + axis +
                               " must be at least 1");
    const auto [bound, first] = axes.try_emplace(axis, Bound{a.shape[d], spec.name + ".npy", d});
    if (!first && bound->second.size != a.shape[d])
      throw std::runtime_error(path + ": " + axis + " " + std::to_string(a.shape[d]) + ", " +
                               bound->second.file + " has " + axis + " " +
                               std::to_string(bound->second.size));
  }
}

// Integer values within the manifest's declared range, lengths within [1, sequence].
inline void check_values(const Signature& s, const TensorSpec& spec, const npy::Array& a,
                         const std::string& path, const Axes& axes) {
  if (!is_integer(*spec.dtype)) return;
  const auto range = s.ranges.find(spec.name);
  if (range != s.ranges.end()) {
    const auto [low, high] = range->second;
    const std::string bad = first_outside(a, spec.name, low, high - 1);
    if (!bad.empty())
      throw std::runtime_error(path + ": " + bad + " is outside [" + std::to_string(low) + ", " +
                               std::to_string(high) + "), the range the manifest declares");
  }
  if (spec.name != s.lengths) return;
  const auto sequence = axes.find(kSequence);  // where an input has that axis
  if (sequence == axes.end()) {
    const std::string bad = first_outside(a, spec.name, 1, INT64_MAX);
    if (!bad.empty()) throw std::runtime_error(path + ": " + bad + " is outside [1, sequence]");
    return;
  }
  const Bound& steps = sequence->second;
  const std::string bad = first_outside(a, spec.name, 1, steps.size);
  if (!bad.empty())
    throw std::runtime_error(path + ": " + bad + " is outside [1, " + std::to_string(steps.size) +
                             "] (sequence = " + steps.file + "'s dimension " +
                             std::to_string(steps.dim) + ")");
}

}  // namespace detail

// The signature's inputs, DIR/<name>.npy in signature order, checked: dtype, rank and fixed
// sizes; one size per named axis across all inputs (each at least 1); lengths within the sequence;
// integer inputs within their declared ranges. The checks come before any run because compiled
// code (model.pt2's) trusts its inputs: a wrong size or an out-of-range index (an embedding's
// token id, a length) would read past a buffer rather than fail.
inline std::vector<npy::Array> load_inputs(const Signature& s, const std::string& dir,
                                           const std::string& model) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir)) throw std::runtime_error(dir + ": not a directory (--inputs)");
  const auto path = [&](const TensorSpec& spec) {
    return (fs::path(dir) / (spec.name + ".npy")).string();
  };
  detail::Axes axes;
  std::vector<npy::Array> arrays;
  for (const TensorSpec& spec : s.inputs) {
    if (!fs::exists(path(spec)))
      throw std::runtime_error(path(spec) + ": missing; " + model + " takes input " + spec.name +
                               " " + spec.dtype->name + " " + spec.shape_str() + " (see --help)");
    arrays.push_back(npy::load(path(spec), *spec.dtype));
    detail::check_shape(spec, arrays.back(), path(spec), model, axes);
  }
  for (size_t i = 0; i < s.inputs.size(); ++i)  // once every named axis has its size
    detail::check_values(s, s.inputs[i], arrays[i], path(s.inputs[i]), axes);
  return arrays;
}

// Writes output `spec` as DIR/<name>.npy (DIR created if missing), after checking what the runtime
// returned against the signature (`dtype`: numpy's name for it, or the runtime's own).
inline void save_output(const std::string& dir, const std::string& model, const TensorSpec& spec,
                        const std::string& dtype, const std::vector<int64_t>& shape,
                        const void* data) {
  if (dtype != spec.dtype->name)
    throw std::runtime_error(model + ": output " + spec.name + " is " + dtype +
                             ", the signature declares " + spec.dtype->name);
  bool ok = shape.size() == spec.shape.size();
  for (size_t d = 0; ok && d < shape.size(); ++d)
    ok = spec.shape[d].size < 0 || spec.shape[d].size == shape[d];
  if (!ok)
    throw std::runtime_error(model + ": output " + spec.name + " has shape " +
                             npy::shape_str(shape) + ", the signature declares " +
                             spec.shape_str());
  std::filesystem::create_directories(dir);
  npy::save((std::filesystem::path(dir) / (spec.name + ".npy")).string(), *spec.dtype, shape,
            data);
}

inline std::string names(const std::vector<TensorSpec>& specs) {  // "output, hn, cn"
  std::string s;
  for (const auto& t : specs) s += (s.empty() ? "" : ", ") + t.name;
  return s;
}

}  // namespace bundle
