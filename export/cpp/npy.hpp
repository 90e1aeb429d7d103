// The .npy format (numpy.save / numpy.load), for the dtypes a bundle's signature may declare
// (lstm_deploy/bundle.py's DTYPES), little-endian, C order. Reading checks the header and the file
// size and throws std::runtime_error with a one-line message that names the file.
// Format: https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace npy {

struct DType {
  const char* name;   // numpy's name, as the manifest writes it: "float32"
  const char* descr;  // what numpy.save writes for it on a little-endian host: "<f4"
  size_t size;        // bytes per item
  const char* numpy;  // the numpy attribute that makes it: .astype(numpy.<numpy>)
};

inline const std::vector<DType>& dtypes() {
  static const std::vector<DType> table = {
      {"float32", "<f4", 4, "float32"}, {"float64", "<f8", 8, "float64"},
      {"float16", "<f2", 2, "float16"}, {"int64", "<i8", 8, "int64"},
      {"int32", "<i4", 4, "int32"},     {"int8", "|i1", 1, "int8"},
      {"uint8", "|u1", 1, "uint8"},     {"bool", "|b1", 1, "bool_"}};
  return table;
}

// The dtype named `name` ("float32"), or nullptr.
inline const DType* find_dtype(const std::string& name) {
  for (const auto& d : dtypes())
    if (name == d.name) return &d;
  return nullptr;
}

inline std::string dtype_names() {  // "float32, float64, ..." for messages
  std::string s;
  for (const auto& d : dtypes()) s += (s.empty() ? "" : ", ") + std::string(d.name);
  return s;
}

struct Array {
  const DType* dtype = nullptr;
  std::vector<int64_t> shape;
  std::vector<unsigned char> data;  // C order; operator new's alignment suits every dtype

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  template <typename T>
  const T* as() const {
    return reinterpret_cast<const T*>(data.data());
  }
};

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

namespace detail {

inline bool host_is_little_endian() {
  const uint16_t one = 1;
  unsigned char first;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

inline std::string trim(std::string s) {
  s.erase(0, s.find_first_not_of(' '));
  s.erase(s.find_last_not_of(' ') + 1);
  return s;
}

// The value of `'key': ...` in the header's dict literal, up to the next top-level ',' or '}'.
inline std::string dict_value(const std::string& header, const std::string& key) {
  size_t pos = header.find("'" + key + "'");
  if (pos == std::string::npos) throw std::runtime_error("the header has no '" + key + "'");
  pos = header.find(':', pos);
  if (pos == std::string::npos) throw std::runtime_error("malformed header at '" + key + "'");
  size_t end = pos + 1;
  for (int depth = 0; end < header.size(); ++end) {
    const char c = header[end];
    depth += (c == '(') - (c == ')');
    if (depth == 0 && (c == ',' || c == '}')) break;
  }
  return trim(header.substr(pos + 1, end - pos - 1));
}

inline std::vector<int64_t> parse_shape(const std::string& v) {
  const std::runtime_error malformed("malformed shape " + v + " in the header");
  if (v.size() < 2 || v.front() != '(' || v.back() != ')') throw malformed;
  std::vector<int64_t> shape;
  std::stringstream items(v.substr(1, v.size() - 2));
  for (std::string item; std::getline(items, item, ',');) {
    item = trim(item);
    if (item.empty()) continue;  // after the trailing comma of a 1-tuple
    size_t used = 0;
    long long d = -1;
    try {
      d = std::stoll(item, &used);
    } catch (const std::exception&) {
    }
    if (used != item.size() || d < 0) throw malformed;
    shape.push_back(d);
  }
  return shape;
}

// The header's dict, {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }: its descr.
inline std::string parse_header(const std::string& header, std::vector<int64_t>& shape) {
  const std::string descr = dict_value(header, "descr");
  if (descr.size() < 2 || (descr.front() != '\'' && descr.front() != '"'))
    throw std::runtime_error("malformed descr " + descr + " in the header");
  if (dict_value(header, "fortran_order") != "False")
    throw std::runtime_error("Fortran order; save a C-order array (numpy.ascontiguousarray)");
  shape = parse_shape(dict_value(header, "shape"));
  return descr.substr(1, descr.size() - 2);
}

}  // namespace detail

// Read `path`, which must hold an array of dtype `want`.
inline Array load(const std::string& path, const DType& want) {
  auto fail = [&](const std::string& why) { return std::runtime_error(path + ": " + why); };
  if (!detail::host_is_little_endian()) throw fail("this program needs a little-endian host");
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw fail("cannot open the file (missing or unreadable)");
  const size_t file_size = size_t(f.tellg());
  f.seekg(0);

  unsigned char pre[12] = {};  // magic (6), version (2), header length (2 in v1, 4 in v2 and v3)
  f.read(reinterpret_cast<char*>(pre), 10);
  if (!f || std::memcmp(pre, "\x93NUMPY", 6) != 0) throw fail("not a .npy file");
  size_t header_len = pre[8] | size_t(pre[9]) << 8;
  if (pre[6] == 2 || pre[6] == 3) {
    f.read(reinterpret_cast<char*>(pre + 10), 2);
    header_len |= size_t(pre[10]) << 16 | size_t(pre[11]) << 24;
  } else if (pre[6] != 1) {
    throw fail(".npy format version " + std::to_string(pre[6]) + " is not supported");
  }
  if (header_len > file_size) throw fail("truncated .npy header");
  std::string header(header_len, '\0');
  f.read(header.data(), std::streamsize(header_len));
  if (!f) throw fail("truncated .npy header");

  Array a;
  std::string descr;
  try {
    descr = detail::parse_header(header, a.shape);
  } catch (const std::runtime_error& e) {
    throw fail(e.what());
  }
  if (descr != want.descr) {
    std::string found = descr;
    for (const auto& d : dtypes())
      if (descr == d.descr) found += " (" + std::string(d.name) + ")";
    throw fail("dtype " + found + ", expected " + want.descr + " (" + want.name +
               "): save it with .astype(numpy." + want.numpy + ")");
  }
  a.dtype = &want;
  const size_t expected = size_t(a.numel()) * want.size;
  const size_t have = file_size - size_t(f.tellg());
  if (have != expected)
    throw fail("holds " + std::to_string(have) + " data bytes, shape " + shape_str(a.shape) +
               " needs " + std::to_string(expected));
  a.data.resize(expected);
  f.read(reinterpret_cast<char*>(a.data.data()), std::streamsize(expected));
  if (!f) throw fail("read failed");
  return a;
}

// Write a C-order array as .npy version 1.0, as numpy.save does.
inline void save(const std::string& path, const DType& dtype, const std::vector<int64_t>& shape,
                 const void* data) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  std::string header = "{'descr': '" + std::string(dtype.descr) +
                       "', 'fortran_order': False, 'shape': " + shape_str(shape) + ", }";
  // Spaces and a final '\n' so that the data starts at a multiple of 64 bytes.
  header.append((64 - (10 + header.size() + 1) % 64) % 64, ' ');
  header += '\n';
  const unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0,
                                 static_cast<unsigned char>(header.size() & 0xff),
                                 static_cast<unsigned char>(header.size() >> 8)};
  std::ofstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot open the file for writing");
  f.write(reinterpret_cast<const char*>(pre), sizeof pre);
  f.write(header.data(), std::streamsize(header.size()));
  f.write(static_cast<const char*>(data), std::streamsize(numel * int64_t(dtype.size)));
  if (!f) throw std::runtime_error(path + ": write failed");
}

}  // namespace npy
