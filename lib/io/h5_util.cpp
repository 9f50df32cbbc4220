#include "io/h5_util.h"

#include <algorithm>

#include "core/error.h"

namespace antkv::h5 {

H5::FloatType half_type() {
  H5::FloatType t(H5::PredType::IEEE_F32LE);
  t.setFields(15, 10, 5, 0, 10);  // sign pos, exponent pos, exponent size, mantissa pos, mantissa size
  t.setSize(2);
  t.setEbias(15);
  return t;
}

void quiet_errors() { install_error_handler(); }

void set_attr(H5::H5Object& obj, const std::string& name, const std::string& value) {
  ObjectContext ctx("attribute " + name);
  H5::StrType t(H5::PredType::C_S1, value.empty() ? 1 : value.size());
  t.setCset(H5T_CSET_UTF8);
  H5::Attribute a = obj.createAttribute(name, t, H5::DataSpace(H5S_SCALAR));
  a.write(t, value.empty() ? std::string(1, '\0') : value);
}

void set_attr(H5::H5Object& obj, const std::string& name, int64_t value) {
  H5::Attribute a = obj.createAttribute(name, H5::PredType::STD_I64LE, H5::DataSpace(H5S_SCALAR));
  a.write(H5::PredType::NATIVE_INT64, &value);
}

void set_attr(H5::H5Object& obj, const std::string& name, double value) {
  H5::Attribute a = obj.createAttribute(name, H5::PredType::IEEE_F64LE, H5::DataSpace(H5S_SCALAR));
  a.write(H5::PredType::NATIVE_DOUBLE, &value);
}

void set_attr(H5::H5Object& obj, const std::string& name, const std::vector<double>& values) {
  hsize_t n = values.size();
  H5::Attribute a = obj.createAttribute(name, H5::PredType::IEEE_F64LE, H5::DataSpace(1, &n));
  if (n) a.write(H5::PredType::NATIVE_DOUBLE, values.data());
}

namespace {
// Object creation properties shared by every dataset and group we write: no access/modification/change times
// (they would make two writes of the same content differ).
void untimed(H5::PropList& props) {
  ANTKV_CHECK(H5Pset_obj_track_times(props.getId(), false) >= 0, "HDF5: cannot turn object time tracking off");
}

// Chunked, with shuffle + deflate at `deflate_level` (0: none), then the Fletcher32 checksum of each stored chunk.
H5::DSetCreatPropList chunked_props(const std::vector<hsize_t>& chunk, int deflate_level) {
  H5::DSetCreatPropList props;
  untimed(props);
  props.setChunk(static_cast<int>(chunk.size()), chunk.data());
  if (deflate_level > 0) {
    props.setShuffle();
    props.setDeflate(deflate_level);
  }
  props.setFletcher32();
  return props;
}
}  // namespace

H5::Group create_group(H5::Group& parent, const std::string& name) {
  ObjectContext ctx("group " + name);
  H5::PropList gcpl(H5P_GROUP_CREATE);  // a class id: a new list of that class
  untimed(gcpl);
  const hid_t id = H5Gcreate2(parent.getId(), name.c_str(), H5P_DEFAULT, gcpl.getId(), H5P_DEFAULT);
  if (id < 0) throw H5::GroupIException("H5Gcreate2", "cannot create group " + name);
  H5::Group g(id);
  if (H5Iget_ref(id) > 1) H5Idec_ref(id);  // the C++ object holds its own reference
  return g;
}

H5::DataSet create_growing(H5::Group& parent, const std::string& name, const H5::DataType& type,
                           const std::vector<hsize_t>& inner, hsize_t chunk_rows, int deflate_level) {
  std::vector<hsize_t> dims{0}, maxdims{H5S_UNLIMITED}, chunk{chunk_rows};
  for (auto d : inner) {
    dims.push_back(d);
    maxdims.push_back(d);
    chunk.push_back(d);
  }
  ObjectContext ctx("dataset " + name);
  H5::DataSpace space(static_cast<int>(dims.size()), dims.data(), maxdims.data());
  return parent.createDataSet(name, type, space, chunked_props(chunk, deflate_level));
}

H5::DataSet write_dataset(H5::Group& parent, const std::string& name, const H5::DataType& file_type,
                          const H5::DataType& mem_type, const std::vector<hsize_t>& dims, const void* data) {
  ObjectContext ctx("dataset " + name);
  H5::DataSpace space(static_cast<int>(dims.size()), dims.data());
  hsize_t total = 1;
  for (auto d : dims) total *= d;
  H5::DSetCreatPropList props;
  untimed(props);
  if (total > 0 && !dims.empty()) {  // chunked for the checksum; chunks of at most ~1 MiB
    std::vector<hsize_t> chunk(dims);
    chunk[0] = std::max<hsize_t>(1, std::min<hsize_t>(dims[0], (1 << 20) / std::max<hsize_t>(1, total / dims[0] * 4)));
    props = chunked_props(chunk, total >= 4096 ? 1 : 0);  // compressed when large enough to matter
  }
  H5::DataSet ds = parent.createDataSet(name, file_type, space, props);
  if (total) ds.write(data, mem_type);
  return ds;
}

std::vector<hsize_t> dims_of(const H5::DataSet& ds) {
  H5::DataSpace s = ds.getSpace();
  const int rank = s.getSimpleExtentNdims();
  std::vector<hsize_t> d(static_cast<size_t>(std::max(rank, 0)));
  if (rank > 0) s.getSimpleExtentDims(d.data());
  return d;
}

void append_rows(H5::DataSet& ds, const H5::DataType& mem_type, hsize_t rows, const void* data) {
  if (rows == 0) return;
  ObjectContext ctx("dataset " + ds.getObjName());
  std::vector<hsize_t> dims = dims_of(ds);
  std::vector<hsize_t> start(dims.size(), 0), count(dims);
  start[0] = dims[0];
  count[0] = rows;
  dims[0] += rows;
  ds.extend(dims.data());
  H5::DataSpace file_space = ds.getSpace();
  file_space.selectHyperslab(H5S_SELECT_SET, count.data(), start.data());
  H5::DataSpace mem_space(static_cast<int>(count.size()), count.data());
  ds.write(data, mem_type, mem_space, file_space);
}

// ---- reading ----

namespace {
constexpr size_t kMaxStringAttr = size_t{1} << 20;  // our longest is the recipe's YAML, a few KiB

// "/meta" for an object of `file` (for messages; "?" when even its name cannot be read).
std::string name_of(const H5::H5Location& obj) {
  char buf[512];
  const ssize_t n = H5Iget_name(obj.getId(), buf, sizeof(buf));
  return n > 0 ? std::string(buf, static_cast<size_t>(std::min<ssize_t>(n, sizeof(buf) - 1))) : std::string("?");
}

std::string attr_object(const H5::H5Object& obj, const std::string& name) { return name_of(obj) + " " + name; }

// Opens attribute `name` of obj (which must exist) holding one element of `type_class`.
H5::Attribute open_attr(const H5::H5Object& obj, const std::string& name, const std::string& file, H5T_class_t type_class,
                        const char* what) {
  const std::string object = attr_object(obj, name);
  if (!has_attr(obj, name, file)) damaged(file, object, "missing");
  return read_guard(file, object, [&] {
    H5::Attribute a = obj.openAttribute(name);
    if (a.getTypeClass() != type_class) damaged(file, object, fmt::format("not {}", what));
    if (a.getSpace().getSimpleExtentNpoints() != 1) damaged(file, object, "not a single value");
    return a;
  });
}
}  // namespace

void damaged(const std::string& file, const std::string& object, const std::string& what) {
  fail("{}: {}: damaged or not an antkv file ({})", file, object, what);
}

std::string hdf5_reason(const H5::Exception& e) {
  const std::string stack = error_stack_summary();
  return "HDF5: " + (!stack.empty() ? stack : e.getFuncName() + ": " + e.getDetailMsg());
}

std::string shape_text(const std::vector<hsize_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

bool has_attr(const H5::H5Object& obj, const std::string& name, const std::string& file) {
  // a failure here is in the object's attribute storage (one checksummed block for all), not in `name` itself
  return read_guard(file, name_of(obj) + " attributes", [&] { return obj.attrExists(name); });
}

std::string get_attr_string(const H5::H5Object& obj, const std::string& name, const std::string& file) {
  H5::Attribute a = open_attr(obj, name, file, H5T_STRING, "a string");
  const std::string object = attr_object(obj, name);
  std::string s = read_guard(file, object, [&] {
    H5::StrType t = a.getStrType();
    if (!t.isVariableStr() && t.getSize() > kMaxStringAttr)
      damaged(file, object, fmt::format("a string of {} bytes", t.getSize()));
    std::string v;
    a.read(t, v);
    return v;
  });
  if (s.size() > kMaxStringAttr) damaged(file, object, fmt::format("a string of {} bytes", s.size()));
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

std::string get_attr_choice(const H5::H5Object& obj, const std::string& name, const std::string& file,
                            const std::vector<std::string>& allowed) {
  const std::string v = get_attr_string(obj, name, file);
  if (std::find(allowed.begin(), allowed.end(), v) != allowed.end()) return v;
  std::string list;
  for (size_t i = 0; i < allowed.size(); ++i) list += (i ? "|" : "") + (allowed[i].empty() ? "\"\"" : allowed[i]);
  damaged(file, attr_object(obj, name), fmt::format("reads \"{}\", expected {}", v.substr(0, 40), list));
}

int64_t get_attr_int(const H5::H5Object& obj, const std::string& name, const std::string& file, int64_t lo, int64_t hi) {
  H5::Attribute a = open_attr(obj, name, file, H5T_INTEGER, "an integer");
  const std::string object = attr_object(obj, name);
  int64_t v = 0;
  read_guard(file, object, [&] {
    a.read(H5::PredType::NATIVE_INT64, &v);
    return 0;
  });
  if (v < lo || v > hi) damaged(file, object, fmt::format("reads {}, expected {} to {}", v, lo, hi));
  return v;
}

bool has_object(const H5::Group& parent, const std::string& name, const std::string& file) {
  return read_guard(file, name_of(parent), [&] { return parent.nameExists(name); });
}

std::vector<std::string> member_names(const H5::Group& group, const std::string& file) {
  return read_guard(file, name_of(group), [&] {
    std::vector<std::string> names;
    const hsize_t n = group.getNumObjs();
    if (n > 100000) damaged(file, name_of(group), fmt::format("{} members", n));
    for (hsize_t i = 0; i < n; ++i) names.push_back(group.getObjnameByIdx(i));
    return names;
  });
}

H5::DataSet open_checked_dataset(const H5::Group& parent, const std::string& name, const std::string& file,
                                 H5T_class_t type_class, size_t type_size, const std::vector<hsize_t>& dims) {
  std::string object = name_of(parent);
  object = (object == "/" ? "/" : object + "/") + name;
  return read_guard(file, object, [&] {
    if (!parent.nameExists(name)) damaged(file, object, "missing");
    H5::DataSet ds = parent.openDataSet(name);
    if (ds.getTypeClass() != type_class || ds.getDataType().getSize() != type_size)
      damaged(file, object, fmt::format("elements of {} bytes, class {}, expected {} bytes, class {}",
                                        ds.getDataType().getSize(), static_cast<int>(ds.getTypeClass()), type_size,
                                        static_cast<int>(type_class)));
    const auto got = dims_of(ds);
    if (got != dims) damaged(file, object, fmt::format("shape {}, expected {}", shape_text(got), shape_text(dims)));
    return ds;
  });
}

void read_rows(const H5::DataSet& ds, const H5::DataType& mem_type, hsize_t row0, hsize_t rows, void* data,
               const std::string& file) {
  const std::string object = name_of(ds);
  read_guard(file, object, [&] {
    std::vector<hsize_t> dims = dims_of(ds);
    ANTKV_CHECK(!dims.empty() && row0 <= dims[0] && rows <= dims[0] - row0, "{}: {}: rows {}..{} asked of {}", file, object,
                row0, row0 + rows, dims[0]);
    if (rows == 0) return 0;
    std::vector<hsize_t> start(dims.size(), 0), count(dims);
    start[0] = row0;
    count[0] = rows;
    H5::DataSpace file_space = ds.getSpace();
    file_space.selectHyperslab(H5S_SELECT_SET, count.data(), start.data());
    H5::DataSpace mem_space(static_cast<int>(count.size()), count.data());
    ds.read(data, mem_type, mem_space, file_space);
    return 0;
  });
}

void read_all(const H5::DataSet& ds, const H5::DataType& mem_type, void* data, const std::string& file) {
  read_guard(file, name_of(ds), [&] {
    ds.read(data, mem_type);
    return 0;
  });
}

}  // namespace antkv::h5
