// Memory-mapped safetensors files: an 8-byte little-endian header length, a JSON header mapping tensor
// names to {dtype, shape, data_offsets}, then the raw data. Every inconsistency (truncated file, offsets
// outside the data, overlapping tensors, size not matching shape x dtype, bad JSON, unknown dtype) is an
// antkv::Error naming the file and the tensor.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace antkv {

enum class DType { kF32, kF16, kBF16, kI32, kI64, kU8, kI8, kF64, kBool };
const char* dtype_name(DType t);
size_t dtype_size(DType t);

struct TensorView {
  std::string name;
  std::string file;              // the file it lives in (for error messages)
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;    // points into the mapping
  size_t nbytes = 0;

  int64_t numel() const;
  std::string shape_str() const;  // "[4096, 128]"
  // Converts (bf16/fp16/fp32 -> fp32) into out[numel()]; other dtypes are an error.
  void to_float(float* out) const;
  std::vector<float> to_float() const;
};

class SafetensorsFile {
 public:
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  const std::string& path() const { return path_; }
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorView& get(const std::string& name) const;  // throws naming the file

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace antkv
