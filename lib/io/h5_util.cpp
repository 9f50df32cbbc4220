#include "io/h5_util.h"

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

bool has_attr(const H5::H5Object& obj, const std::string& name) { return obj.attrExists(name); }

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

std::string get_attr_string(const H5::H5Object& obj, const std::string& name, const std::string& file) {
  ANTKV_CHECK(obj.attrExists(name), "{}: missing attribute \"{}\"", file, name);
  H5::Attribute a = obj.openAttribute(name);
  ANTKV_CHECK(a.getTypeClass() == H5T_STRING, "{}: attribute \"{}\" is not a string", file, name);
  std::string s;
  a.read(a.getStrType(), s);
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

int64_t get_attr_int(const H5::H5Object& obj, const std::string& name, const std::string& file) {
  ANTKV_CHECK(obj.attrExists(name), "{}: missing attribute \"{}\"", file, name);
  H5::Attribute a = obj.openAttribute(name);
  ANTKV_CHECK(a.getTypeClass() == H5T_INTEGER, "{}: attribute \"{}\" is not an integer", file, name);
  int64_t v = 0;
  a.read(H5::PredType::NATIVE_INT64, &v);
  return v;
}

double get_attr_double(const H5::H5Object& obj, const std::string& name, const std::string& file) {
  ANTKV_CHECK(obj.attrExists(name), "{}: missing attribute \"{}\"", file, name);
  H5::Attribute a = obj.openAttribute(name);
  double v = 0;
  a.read(H5::PredType::NATIVE_DOUBLE, &v);
  return v;
}

std::vector<double> get_attr_doubles(const H5::H5Object& obj, const std::string& name, const std::string& file) {
  ANTKV_CHECK(obj.attrExists(name), "{}: missing attribute \"{}\"", file, name);
  H5::Attribute a = obj.openAttribute(name);
  const hssize_t n = a.getSpace().getSimpleExtentNpoints();
  std::vector<double> v(static_cast<size_t>(n));
  if (n) a.read(H5::PredType::NATIVE_DOUBLE, v.data());
  return v;
}

H5::DataSet create_growing(H5::Group& parent, const std::string& name, const H5::DataType& type,
                           const std::vector<hsize_t>& inner, hsize_t chunk_rows) {
  std::vector<hsize_t> dims{0}, maxdims{H5S_UNLIMITED}, chunk{chunk_rows};
  for (auto d : inner) {
    dims.push_back(d);
    maxdims.push_back(d);
    chunk.push_back(d);
  }
  ObjectContext ctx("dataset " + name);
  H5::DataSpace space(static_cast<int>(dims.size()), dims.data(), maxdims.data());
  H5::DSetCreatPropList props;
  props.setChunk(static_cast<int>(chunk.size()), chunk.data());
  props.setShuffle();
  props.setDeflate(1);  // level 1: most of the gain, little CPU
  return parent.createDataSet(name, type, space, props);
}

H5::DataSet write_dataset(H5::Group& parent, const std::string& name, const H5::DataType& file_type,
                          const H5::DataType& mem_type, const std::vector<hsize_t>& dims, const void* data) {
  ObjectContext ctx("dataset " + name);
  H5::DataSpace space(static_cast<int>(dims.size()), dims.data());
  H5::DSetCreatPropList props;
  hsize_t total = 1;
  for (auto d : dims) total *= d;
  if (total >= 4096 && !dims.empty() && dims[0] > 0) {
    std::vector<hsize_t> chunk(dims);
    chunk[0] = std::max<hsize_t>(1, std::min<hsize_t>(dims[0], (1 << 20) / std::max<hsize_t>(1, total / dims[0] * 4)));
    props.setChunk(static_cast<int>(chunk.size()), chunk.data());
    props.setShuffle();
    props.setDeflate(1);
  }
  H5::DataSet ds = parent.createDataSet(name, file_type, space, props);
  if (total) ds.write(data, mem_type);
  return ds;
}

H5::DataSet open_dataset(const H5::Group& parent, const std::string& name) {
  ObjectContext ctx("dataset " + name);
  return parent.openDataSet(name);
}

std::vector<hsize_t> dims_of(const H5::DataSet& ds) {
  H5::DataSpace s = ds.getSpace();
  std::vector<hsize_t> d(static_cast<size_t>(s.getSimpleExtentNdims()));
  s.getSimpleExtentDims(d.data());
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

void read_rows(const H5::DataSet& ds, const H5::DataType& mem_type, hsize_t row0, hsize_t rows, void* data) {
  ObjectContext ctx("dataset " + ds.getObjName());
  std::vector<hsize_t> dims = dims_of(ds);
  std::vector<hsize_t> start(dims.size(), 0), count(dims);
  start[0] = row0;
  count[0] = rows;
  H5::DataSpace file_space = ds.getSpace();
  file_space.selectHyperslab(H5S_SELECT_SET, count.data(), start.data());
  H5::DataSpace mem_space(static_cast<int>(count.size()), count.data());
  ds.read(data, mem_type, mem_space, file_space);
}

}  // namespace antkv::h5
