// Small helpers over the HDF5 C++ API: the IEEE half type (as h5py writes float16), string and numeric
// attributes, extensible chunked+compressed datasets with checksums, checked reads of files that may be damaged,
// and error translation to antkv::Error.
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

// Writing. Every dataset and group is made without HDF5's object time stamps, so the same content gives the same
// bytes (a dump's content hash decides whether its codebooks are retrained). Every dataset with data is chunked with
// the Fletcher32 checksum filter: a damaged byte of data is a read error, not a wrong value.
H5::Group create_group(H5::Group& parent, const std::string& name);
// A dataset [0 (growing), dims...] of `type`, chunked along the first axis; shuffle + deflate at deflate_level
// (0: none).
H5::DataSet create_growing(H5::Group& parent, const std::string& name, const H5::DataType& type,
                           const std::vector<hsize_t>& inner_dims, hsize_t chunk_rows, int deflate_level);
// A fixed-shape dataset written whole, compressed when large enough to matter.
H5::DataSet write_dataset(H5::Group& parent, const std::string& name, const H5::DataType& file_type,
                          const H5::DataType& mem_type, const std::vector<hsize_t>& dims, const void* data);
// Appends `rows` rows (memory type mem_type, contiguous) to a growing dataset.
void append_rows(H5::DataSet& ds, const H5::DataType& mem_type, hsize_t rows, const void* data);

// Reading a file that may be damaged, or not ours. Every failure is one line
//   "<file>: <object>: damaged or not an antkv file (<what>)"
// e.g. "c.h5: /meta num_layers: damaged or not an antkv file (reads 0, expected 1 to 1024)": every attribute,
// dataset and shape read is checked here, before the caller allocates anything from it.
[[noreturn]] void damaged(const std::string& file, const std::string& object, const std::string& what);
// Runs f() on `object` of `file`: an HDF5 failure (a failed checksum, a broken header) becomes damaged(); a
// failed read of the file itself (EIO) is the OS reason instead.
template <typename F>
auto read_guard(const std::string& file, const std::string& object, F&& f);

bool has_attr(const H5::H5Object& obj, const std::string& name, const std::string& file);
std::string get_attr_string(const H5::H5Object& obj, const std::string& name, const std::string& file);
// A string attribute that must be one of `allowed`.
std::string get_attr_choice(const H5::H5Object& obj, const std::string& name, const std::string& file,
                            const std::vector<std::string>& allowed);
// An integer attribute within [lo, hi].
int64_t get_attr_int(const H5::H5Object& obj, const std::string& name, const std::string& file, int64_t lo, int64_t hi);
// Whether `parent` holds a link `name` (a damaged group is damaged(), not "no").
bool has_object(const H5::Group& parent, const std::string& name, const std::string& file);
// The names of the links in `group` (its members).
std::vector<std::string> member_names(const H5::Group& group, const std::string& file);
// Opens dataset `name` under `parent` and checks its element class (H5T_INTEGER or H5T_FLOAT), element size and
// shape against what the caller derived from /meta.
H5::DataSet open_checked_dataset(const H5::Group& parent, const std::string& name, const std::string& file,
                                 H5T_class_t type_class, size_t type_size, const std::vector<hsize_t>& dims);
// Reads rows [row0, row0 + rows) of a dataset opened by open_checked_dataset into data (mem_type).
void read_rows(const H5::DataSet& ds, const H5::DataType& mem_type, hsize_t row0, hsize_t rows, void* data,
               const std::string& file);
// Reads the whole dataset (opened by open_checked_dataset, so its size is known) into data.
void read_all(const H5::DataSet& ds, const H5::DataType& mem_type, void* data, const std::string& file);
std::vector<hsize_t> dims_of(const H5::DataSet& ds);
std::string shape_text(const std::vector<hsize_t>& dims);  // "[6, 2, 16]"

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

// The HDF5 error just raised as one phrase ("HDF5: <API call>: ... <innermost cause>"), for damaged().
std::string hdf5_reason(const H5::Exception& e);

template <typename F>
auto read_guard(const std::string& file, const std::string& object, F&& f) {
  reset_error_stack_summary();
  try {
    return f();
  } catch (const H5::Exception& e) {
    const std::string os = recorded_failure(file);
    if (!os.empty()) fail("{}: {} ({})", file, os, object);
    damaged(file, object, hdf5_reason(e));
  }
}

}  // namespace antkv::h5
