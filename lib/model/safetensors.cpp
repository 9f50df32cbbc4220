#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <Eigen/Core>
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace antkv {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
    case DType::kI32: return "I32";
    case DType::kI64: return "I64";
    case DType::kU8: return "U8";
    case DType::kI8: return "I8";
    case DType::kF64: return "F64";
    case DType::kBool: return "BOOL";
  }
  return "?";
}

size_t dtype_size(DType t) {
  switch (t) {
    case DType::kF64: case DType::kI64: return 8;
    case DType::kF32: case DType::kI32: return 4;
    case DType::kF16: case DType::kBF16: return 2;
    case DType::kU8: case DType::kI8: case DType::kBool: return 1;
  }
  return 0;
}

namespace {
bool parse_dtype(const std::string& s, DType* out) {
  static const std::pair<const char*, DType> table[] = {
      {"F32", DType::kF32}, {"F16", DType::kF16}, {"BF16", DType::kBF16}, {"I32", DType::kI32},
      {"I64", DType::kI64}, {"U8", DType::kU8},   {"I8", DType::kI8},     {"F64", DType::kF64},
      {"BOOL", DType::kBool}};
  for (auto& [name, t] : table)
    if (s == name) {
      *out = t;
      return true;
    }
  return false;
}
}  // namespace

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

std::string TensorView::shape_str() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

void TensorView::to_float(float* out) const {
  const int64_t n = numel();
  switch (dtype) {
    case DType::kF32:
      std::memcpy(out, data, static_cast<size_t>(n) * 4);
      break;
    case DType::kBF16: {
      const auto* p = static_cast<const Eigen::bfloat16*>(data);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
      break;
    }
    case DType::kF16: {
      const auto* p = static_cast<const Eigen::half*>(data);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
      break;
    }
    default:
      fail("{}: tensor \"{}\" has dtype {}, expected a floating type (BF16, F16, F32)", file, name,
           dtype_name(dtype));
  }
}

std::vector<float> TensorView::to_float() const {
  std::vector<float> v(static_cast<size_t>(numel()));
  to_float(v.data());
  return v;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY);
  ANTKV_CHECK(fd >= 0, "{}: cannot open: {}", path, std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    fail("{}: cannot stat: {}", path, std::strerror(errno));
  }
  const auto file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    fail("{}: truncated safetensors file ({} bytes, the header length alone needs 8)", path, file_size);
  }
  void* m = mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  ANTKV_CHECK(m != MAP_FAILED, "{}: mmap failed: {}", path, std::strerror(errno));
  f->map_ = m;
  f->map_size_ = file_size;
  const auto* bytes = static_cast<const unsigned char*>(m);

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];  // little-endian
  ANTKV_CHECK(header_len > 0 && header_len <= file_size - 8,
              "{}: truncated or corrupt safetensors file: header length {} but the file has {} bytes", path,
              header_len, file_size);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes + 8, bytes + 8 + header_len);
  } catch (const nlohmann::json::parse_error& e) {
    fail("{}: bad safetensors header (not valid JSON): {}", path, e.what());
  }
  ANTKV_CHECK(header.is_object(), "{}: bad safetensors header: expected a JSON object", path);

  const unsigned char* data_start = bytes + 8 + header_len;
  const uint64_t data_size = file_size - 8 - header_len;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") {
      if (it->is_object())
        for (auto m2 = it->begin(); m2 != it->end(); ++m2)
          if (m2->is_string()) f->metadata_[m2.key()] = m2->get<std::string>();
      continue;
    }
    const auto& e = *it;
    ANTKV_CHECK(e.is_object() && e.contains("dtype") && e.contains("shape") && e.contains("data_offsets"),
                "{}: tensor \"{}\": header entry needs dtype, shape and data_offsets", path, name);
    TensorView t;
    t.name = name;
    t.file = path;
    ANTKV_CHECK(e["dtype"].is_string() && parse_dtype(e["dtype"].get<std::string>(), &t.dtype),
                "{}: tensor \"{}\": unknown dtype {}", path, name, e["dtype"].dump());
    ANTKV_CHECK(e["shape"].is_array(), "{}: tensor \"{}\": shape must be an array", path, name);
    for (const auto& d : e["shape"]) {
      ANTKV_CHECK(d.is_number_integer() && d.get<int64_t>() >= 0, "{}: tensor \"{}\": bad shape {}", path,
                  name, e["shape"].dump());
      t.shape.push_back(d.get<int64_t>());
    }
    const auto& off = e["data_offsets"];
    ANTKV_CHECK(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(),
                "{}: tensor \"{}\": data_offsets must be two non-negative integers", path, name);
    const auto begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    ANTKV_CHECK(begin <= end && end <= data_size,
                "{}: tensor \"{}\": data_offsets [{}, {}] lie outside the {} data bytes (truncated file or "
                "corrupt header)",
                path, name, begin, end, data_size);
    const uint64_t expect = static_cast<uint64_t>(t.numel()) * dtype_size(t.dtype);
    ANTKV_CHECK(end - begin == expect,
                "{}: tensor \"{}\": {} bytes in data_offsets but shape {} of {} needs {}", path, name,
                end - begin, t.shape_str(), dtype_name(t.dtype), expect);
    t.data = data_start + begin;
    t.nbytes = end - begin;
    ranges.emplace_back(begin, end);
    f->tensors_.emplace(name, std::move(t));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    ANTKV_CHECK(ranges[i].first >= ranges[i - 1].second,
                "{}: corrupt header: tensor data ranges overlap at byte {}", path, ranges[i].first);
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) munmap(map_, map_size_);
}

const TensorView& SafetensorsFile::get(const std::string& name) const {
  auto it = tensors_.find(name);
  ANTKV_CHECK(it != tensors_.end(), "{}: missing tensor \"{}\"", path_, name);
  return it->second;
}

}  // namespace antkv
