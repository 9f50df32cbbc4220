// Small helpers over the HDF5 C++ API: the IEEE half type (as h5py writes float16), string and numeric
// attributes, extensible chunked+compressed datasets, and error translation to antkv::Error.
#pragma once
#include <H5Cpp.h>

#include "core/atomic_file.h"
#include "core/error.h"
#include "io/h5_file.h"

#include <cstdint>
#include <string>
#include <vector>

namespace antkv::h5 {

// 16-bit IEEE float (1 sign, 5 exponent, 10 mantissa bits, bias 15): h5py/numpy read it as float16.
H5::FloatType half_type();

void set_attr(H5::H5Object& obj, const std::string& name, const std::string& value);
void set_attr(H5::H5Object& obj, const std::string& name, int64_t value);
void set_attr(H5::H5Object& obj, const std::string& name, double value);
void set_attr(H5::H5Object& obj, const std::string& name, const std::vector<double>& values);
std::string get_attr_string(const H5::H5Object& obj, const std::string& name, const std::string& file);
int64_t get_attr_int(const H5::H5Object& obj, const std::string& name, const std::string& file);
double get_attr_double(const H5::H5Object& obj, const std::string& name, const std::string& file);
std::vector<double> get_attr_doubles(const H5::H5Object& obj, const std::string& name, const std::string& file);
bool has_attr(const H5::H5Object& obj, const std::string& name);

// A dataset [0 (growing), dims...] of `type`, chunked along the first axis with shuffle + deflate.
H5::DataSet create_growing(H5::Group& parent, const std::string& name, const H5::DataType& type,
                           const std::vector<hsize_t>& inner_dims, hsize_t chunk_rows);
// A fixed-shape dataset written whole, compressed when large enough to matter.
H5::DataSet write_dataset(H5::Group& parent, const std::string& name, const H5::DataType& file_type,
                          const H5::DataType& mem_type, const std::vector<hsize_t>& dims, const void* data);
// Appends `rows` rows (memory type mem_type, contiguous) to a growing dataset.
void append_rows(H5::DataSet& ds, const H5::DataType& mem_type, hsize_t rows, const void* data);
// Reads rows [row0, row0 + rows) of a dataset into data (mem_type).
void read_rows(const H5::DataSet& ds, const H5::DataType& mem_type, hsize_t row0, hsize_t rows, void* data);
std::vector<hsize_t> dims_of(const H5::DataSet& ds);
// Opens a dataset; a failure names it ("dataset layer_0/keys: H5Dopen2: ...").
H5::DataSet open_dataset(const H5::Group& parent, const std::string& name);

// Silences HDF5's own error printing (we report through antkv::Error) — call once per process.
void quiet_errors();

// Runs f(), turning an H5::Exception into one antkv::Error line that names the file, the object and the
// cause (the OS reason when a read or write of the file failed); also raises a write failure that the
// checked driver recorded during f() (writes after it are dropped, so HDF5 itself saw no error).
template <typename F>
auto guard(const std::string& path, F&& f) {
  reset_error_stack_summary();
  try {
    auto r = f();
    check_write_error(path);
    return r;
  } catch (const H5::Exception& e) {
    const std::string os = recorded_failure(path);
    if (!os.empty()) fail("{}: {}", output_name(path), os);
    const std::string stack = error_stack_summary();
    fail("{}: HDF5 error: {}", output_name(path), !stack.empty() ? stack : e.getFuncName() + ": " + e.getDetailMsg());
  }
}

}  // namespace antkv::h5
