#include "io/calib_dump.h"

#include <Eigen/Core>

#include <algorithm>

#include "core/error.h"
#include "io/h5_util.h"

namespace antkv {

namespace {
std::string layer_group(int l) { return "layer_" + std::to_string(l); }
// Rows per chunk: ~256 KiB of K (or V) per chunk. An uncompressed dataset stores its last, partial chunk
// whole, so small chunks keep a short dump small; 256 KiB chunks still read and write at memory speed.
hsize_t chunk_rows_for(int num_kv_heads, int head_dim) {
  const hsize_t row_bytes = static_cast<hsize_t>(std::max(1, num_kv_heads * head_dim)) * 2;
  hsize_t rows = 16;
  while (rows < 4096 && (rows * 2) * row_bytes <= (hsize_t{256} << 10)) rows *= 2;
  return rows;
}

// HDF5 converts float <-> our half type itself, but slowly; convert with Eigen and write raw halves.
std::vector<Eigen::half> to_half(const float* x, size_t n) {
  std::vector<Eigen::half> h(n);
  for (size_t i = 0; i < n; ++i) h[i] = Eigen::half(x[i]);
  return h;
}

// A dataset [0 (growing), inner...], chunked along the first axis; shuffle + deflate when level > 0.
H5::DataSet create_growing(H5::Group& parent, const std::string& name, const H5::DataType& type,
                           const std::vector<hsize_t>& inner, hsize_t chunk_rows, int deflate_level) {
  std::vector<hsize_t> dims{0}, maxdims{H5S_UNLIMITED}, chunk{chunk_rows};
  for (auto d : inner) dims.push_back(d), maxdims.push_back(d), chunk.push_back(d);
  H5::DataSpace space(static_cast<int>(dims.size()), dims.data(), maxdims.data());
  H5::DSetCreatPropList props;
  props.setChunk(static_cast<int>(chunk.size()), chunk.data());
  if (deflate_level > 0) {
    props.setShuffle();
    props.setDeflate(deflate_level);
  }
  return parent.createDataSet(name, type, space, props);
}

}  // namespace

struct CalibDumpWriter::Impl {
  std::string path;
  H5::H5File file;
  H5::DataSet tokens, positions, windows;
  struct Layer { H5::Group group; H5::DataSet keys, values, s_k, s_v, score; };
  std::vector<Layer> layers;
  int kv_heads = 0, head_dim = 0, deflate_level = 0;
  int64_t bytes = 0;
  std::vector<std::vector<float>> query_moment, oproj_gram;  // [layer] -> [kv_heads, d, d] or empty
  H5::FloatType half = h5::half_type();
};

CalibDumpWriter::CalibDumpWriter(const std::string& path, int num_layers, int num_kv_heads, int head_dim,
                                 int deflate_level)
    : impl_(new Impl) {
  h5::quiet_errors();
  ANTKV_CHECK(deflate_level >= 0 && deflate_level <= 9, "{}: deflate level {} outside 0..9", path, deflate_level);
  impl_->path = path;
  impl_->kv_heads = num_kv_heads;
  impl_->head_dim = head_dim;
  impl_->deflate_level = deflate_level;
  h5::guard(path, [&] {
    impl_->file = h5::create_file(path);
    H5::Group root = impl_->file.openGroup("/");
    impl_->tokens = create_growing(root, "tokens", H5::PredType::STD_I32LE, {}, 4096, 1);
    impl_->positions = create_growing(root, "positions", H5::PredType::STD_I32LE, {}, 4096, 1);
    impl_->windows = create_growing(root, "window", H5::PredType::STD_I32LE, {}, 4096, 1);
    const hsize_t kv = static_cast<hsize_t>(num_kv_heads), d = static_cast<hsize_t>(head_dim);
    const hsize_t rows = chunk_rows_for(num_kv_heads, head_dim);
    for (int l = 0; l < num_layers; ++l) {
      Impl::Layer L;
      L.group = impl_->file.createGroup(layer_group(l));
      L.keys = create_growing(L.group, "keys", impl_->half, {kv, d}, rows, deflate_level);
      L.values = create_growing(L.group, "values", impl_->half, {kv, d}, rows, deflate_level);
      L.s_k = create_growing(L.group, "S_K", H5::PredType::IEEE_F32LE, {kv}, rows, deflate_level);
      L.s_v = create_growing(L.group, "S_V", H5::PredType::IEEE_F32LE, {kv}, rows, deflate_level);
      L.score = create_growing(L.group, "anchor_score", H5::PredType::IEEE_F32LE, {kv}, rows, deflate_level);
      impl_->layers.push_back(std::move(L));
    }
    return 0;
  });
}

int64_t CalibDumpWriter::bytes_appended() const { return impl_->bytes; }

namespace {
void set_square(std::vector<std::vector<float>>& dst, size_t layers, int layer, const std::vector<float>& m, int kv, int d,
                const char* what) {
  ANTKV_CHECK(layer >= 0 && static_cast<size_t>(layer) < layers, "calibration dump: bad layer {}", layer);
  ANTKV_CHECK(m.size() == static_cast<size_t>(kv) * d * d, "calibration dump: layer {} {} has {} values, expected {}", layer,
              what, m.size(), static_cast<size_t>(kv) * d * d);
  dst.resize(layers);
  dst[static_cast<size_t>(layer)] = m;
}
}  // namespace

void CalibDumpWriter::set_query_moment(int layer, const std::vector<float>& m) {
  set_square(impl_->query_moment, impl_->layers.size(), layer, m, impl_->kv_heads, impl_->head_dim, "query_moment");
}
void CalibDumpWriter::set_oproj_gram(int layer, const std::vector<float>& m) {
  set_square(impl_->oproj_gram, impl_->layers.size(), layer, m, impl_->kv_heads, impl_->head_dim, "oproj_gram");
}

CalibDumpWriter::~CalibDumpWriter() = default;

void CalibDumpWriter::append_tokens(int n, const int32_t* tokens, const int32_t* positions, const int32_t* windows) {
  h5::guard(impl_->path, [&] {
    h5::append_rows(impl_->tokens, H5::PredType::NATIVE_INT32, n, tokens);
    h5::append_rows(impl_->positions, H5::PredType::NATIVE_INT32, n, positions);
    h5::append_rows(impl_->windows, H5::PredType::NATIVE_INT32, n, windows);
    return 0;
  });
}

void CalibDumpWriter::append_layer(int layer, int n, const float* keys, const float* values, const float* s_k,
                                   const float* s_v, const float* anchor_score) {
  const size_t row = static_cast<size_t>(impl_->kv_heads) * impl_->head_dim;
  const auto kh = to_half(keys, n * row), vh = to_half(values, n * row);
  append_layer_f16(layer, n, reinterpret_cast<const uint16_t*>(kh.data()), reinterpret_cast<const uint16_t*>(vh.data()),
                   s_k, s_v, anchor_score);
}

void CalibDumpWriter::append_layer_f16(int layer, int n, const uint16_t* keys, const uint16_t* values,
                                       const float* s_k, const float* s_v, const float* anchor_score) {
  ANTKV_CHECK(layer >= 0 && layer < static_cast<int>(impl_->layers.size()), "calibration dump: bad layer {}", layer);
  auto& L = impl_->layers[layer];
  const int64_t kv = impl_->kv_heads, row = kv * impl_->head_dim;
  h5::guard(impl_->path, [&] {
    h5::append_rows(L.keys, impl_->half, n, keys);
    h5::append_rows(L.values, impl_->half, n, values);
    h5::append_rows(L.s_k, H5::PredType::NATIVE_FLOAT, n, s_k);
    h5::append_rows(L.s_v, H5::PredType::NATIVE_FLOAT, n, s_v);
    h5::append_rows(L.score, H5::PredType::NATIVE_FLOAT, n, anchor_score);
    return 0;
  });
  impl_->bytes += n * (2 * row * 2 + 3 * kv * 4);
}

void CalibDumpWriter::finish(const CalibMeta& m) {
  h5::guard(impl_->path, [&] {
    const hsize_t kv = static_cast<hsize_t>(impl_->kv_heads), d = static_cast<hsize_t>(impl_->head_dim);
    for (size_t l = 0; l < impl_->layers.size(); ++l)
      for (auto [name, src] : {std::pair<const char*, const std::vector<std::vector<float>>*>{"query_moment", &impl_->query_moment},
                               {"oproj_gram", &impl_->oproj_gram}})
        if (l < src->size() && !(*src)[l].empty())
          h5::write_dataset(impl_->layers[l].group, name, H5::PredType::IEEE_F32LE, H5::PredType::NATIVE_FLOAT, {kv, d, d},
                            (*src)[l].data());
    H5::Group g = impl_->file.createGroup("meta");
    h5::set_attr(g, "kind", std::string("antkv-calibration"));
    h5::set_attr(g, "model", m.model);
    h5::set_attr(g, "config_hash", m.config_hash);
    h5::set_attr(g, "recipe", m.recipe);
    h5::set_attr(g, "key_rope", m.key_rope);
    h5::set_attr(g, "anchor_score", m.anchor_score);
    h5::set_attr(g, "text", m.text);
    h5::set_attr(g, "text_hash", m.text_hash);
    h5::set_attr(g, "version", m.version);
    h5::set_attr(g, "created", m.created);
    h5::set_attr(g, "fingerprint", m.fingerprint);
    h5::set_attr(g, "tokens", m.tokens);
    h5::set_attr(g, "seq_len", m.seq_len);
    h5::set_attr(g, "windows", m.windows);
    h5::set_attr(g, "seed", m.seed);
    h5::set_attr(g, "num_layers", m.num_layers);
    h5::set_attr(g, "num_kv_heads", m.num_kv_heads);
    h5::set_attr(g, "head_dim", m.head_dim);
    h5::set_attr(g, "sample_per_window", m.sample_per_window);
    h5::set_attr(g, "kv_compression", impl_->deflate_level > 0
                                          ? "shuffle+deflate-" + std::to_string(impl_->deflate_level)
                                          : std::string("none"));
    impl_->layers.clear();
    impl_->tokens.close();
    impl_->positions.close();
    impl_->windows.close();
    h5::close_file(impl_->file, impl_->path);
    return 0;
  });
}

struct CalibDumpReader::Impl {
  std::string path;
  H5::H5File file;
  CalibMeta meta;
  int64_t n = 0;
  bool query_moment = false, oproj_gram = false;  // every layer holds it
};

CalibDumpReader::CalibDumpReader(const std::string& path) : impl_(new Impl) {
  h5::quiet_errors();
  impl_->path = path;
  h5::guard(path, [&] {
    ANTKV_CHECK(H5::H5File::isHdf5(path.c_str()), "{}: not an HDF5 file", path);
    impl_->file = h5::open_file_read(path);
    ANTKV_CHECK(impl_->file.nameExists("meta"), "{}: no /meta group: not a complete antkv calibration dump", path);
    H5::Group g = impl_->file.openGroup("meta");
    ANTKV_CHECK(h5::has_attr(g, "kind") && h5::get_attr_string(g, "kind", path) == "antkv-calibration",
                "{}: not an antkv calibration dump (/meta kind is not antkv-calibration)", path);
    CalibMeta& m = impl_->meta;
    m.model = h5::get_attr_string(g, "model", path);
    m.config_hash = h5::get_attr_string(g, "config_hash", path);
    m.recipe = h5::get_attr_string(g, "recipe", path);
    m.key_rope = h5::get_attr_string(g, "key_rope", path);
    m.anchor_score = h5::get_attr_string(g, "anchor_score", path);
    m.text = h5::get_attr_string(g, "text", path);
    m.text_hash = h5::get_attr_string(g, "text_hash", path);
    m.version = h5::get_attr_string(g, "version", path);
    m.created = h5::get_attr_string(g, "created", path);
    if (h5::has_attr(g, "fingerprint")) m.fingerprint = h5::get_attr_string(g, "fingerprint", path);
    m.tokens = h5::get_attr_int(g, "tokens", path);
    m.seq_len = h5::get_attr_int(g, "seq_len", path);
    m.windows = h5::get_attr_int(g, "windows", path);
    m.seed = h5::get_attr_int(g, "seed", path);
    m.num_layers = h5::get_attr_int(g, "num_layers", path);
    m.num_kv_heads = h5::get_attr_int(g, "num_kv_heads", path);
    m.head_dim = h5::get_attr_int(g, "head_dim", path);
    if (h5::has_attr(g, "sample_per_window")) m.sample_per_window = h5::get_attr_int(g, "sample_per_window", path);
    m.kv_compression = h5::has_attr(g, "kv_compression") ? h5::get_attr_string(g, "kv_compression", path)
                                                         : std::string("shuffle+deflate-1");  // files before it
    const auto td = h5::dims_of(h5::open_dataset(impl_->file, "tokens"));
    ANTKV_CHECK(td.size() == 1, "{}: /tokens must be one-dimensional", path);
    impl_->n = static_cast<int64_t>(td[0]);
    ANTKV_CHECK(impl_->n == m.tokens, "{}: /tokens holds {} tokens but /meta says {}", path, impl_->n, m.tokens);
    for (int64_t l = 0; l < m.num_layers; ++l) {
      const std::string gname = layer_group(static_cast<int>(l));
      ANTKV_CHECK(impl_->file.nameExists(gname), "{}: missing group /{}", path, gname);
      for (const char* ds : {"keys", "values"}) {
        const auto d = h5::dims_of(h5::open_dataset(impl_->file, gname + "/" + ds));
        ANTKV_CHECK(d.size() == 3 && static_cast<int64_t>(d[0]) == impl_->n &&
                        static_cast<int64_t>(d[1]) == m.num_kv_heads && static_cast<int64_t>(d[2]) == m.head_dim,
                    "{}: /{}/{} has the wrong shape", path, gname, ds);
      }
      for (const char* ds : {"S_K", "S_V", "anchor_score"}) {
        const auto d = h5::dims_of(h5::open_dataset(impl_->file, gname + "/" + ds));
        ANTKV_CHECK(d.size() == 2 && static_cast<int64_t>(d[0]) == impl_->n &&
                        static_cast<int64_t>(d[1]) == m.num_kv_heads,
                    "{}: /{}/{} has the wrong shape", path, gname, ds);
      }
    }
    for (auto [ds, flag] : {std::pair<const char*, bool*>{"query_moment", &impl_->query_moment}, {"oproj_gram", &impl_->oproj_gram}}) {
      *flag = m.num_layers > 0;
      for (int64_t l = 0; l < m.num_layers; ++l) {
        const std::string name = layer_group(static_cast<int>(l)) + "/" + ds;
        if (!impl_->file.nameExists(name)) {
          *flag = false;
          continue;
        }
        const auto d = h5::dims_of(h5::open_dataset(impl_->file, name));
        ANTKV_CHECK(d == (std::vector<hsize_t>{static_cast<hsize_t>(m.num_kv_heads), static_cast<hsize_t>(m.head_dim),
                                               static_cast<hsize_t>(m.head_dim)}),
                    "{}: /{} has the wrong shape", path, name);
      }
    }
    return 0;
  });
}

CalibDumpReader::~CalibDumpReader() = default;
const CalibMeta& CalibDumpReader::meta() const { return impl_->meta; }
const std::string& CalibDumpReader::path() const { return impl_->path; }
int64_t CalibDumpReader::n_tokens() const { return impl_->n; }

namespace {
std::vector<int32_t> read_ints(const H5::H5File& f, const char* name, int64_t n, const std::string& path) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  h5::guard(path, [&] {
    if (n) h5::read_rows(h5::open_dataset(f, name), H5::PredType::NATIVE_INT32, 0, n, v.data());
    return 0;
  });
  return v;
}
}  // namespace

std::vector<int32_t> CalibDumpReader::tokens() const { return read_ints(impl_->file, "tokens", impl_->n, impl_->path); }
std::vector<int32_t> CalibDumpReader::positions() const { return read_ints(impl_->file, "positions", impl_->n, impl_->path); }
std::vector<int32_t> CalibDumpReader::windows() const { return read_ints(impl_->file, "window", impl_->n, impl_->path); }

namespace {
// HDF5's own half -> float conversion is a slow soft conversion (~10M values/s); read the raw halves and
// convert them here.
void read_halves(const H5::H5File& f, const std::string& name, int64_t row0, int64_t rows, float* out,
                 const std::string& path) {
  h5::guard(path, [&] {
    H5::DataSet ds = h5::open_dataset(f, name);
    const auto dims = h5::dims_of(ds);
    size_t n = static_cast<size_t>(rows);
    for (size_t i = 1; i < dims.size(); ++i) n *= dims[i];
    std::vector<Eigen::half> raw(n);
    h5::read_rows(ds, h5::half_type(), row0, rows, raw.data());
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < static_cast<int64_t>(n); ++i) out[i] = static_cast<float>(raw[i]);
    return 0;
  });
}
}  // namespace

void CalibDumpReader::read_keys(int layer, int64_t row0, int64_t rows, float* out) const {
  read_halves(impl_->file, layer_group(layer) + "/keys", row0, rows, out, impl_->path);
}
void CalibDumpReader::read_values(int layer, int64_t row0, int64_t rows, float* out) const {
  read_halves(impl_->file, layer_group(layer) + "/values", row0, rows, out, impl_->path);
}
void CalibDumpReader::read_keys_half(int layer, int64_t row0, int64_t rows, uint16_t* out) const {
  h5::guard(impl_->path, [&] {
    h5::read_rows(impl_->file.openDataSet(layer_group(layer) + "/keys"), h5::half_type(), row0, rows, out);
    return 0;
  });
}
void CalibDumpReader::read_values_half(int layer, int64_t row0, int64_t rows, uint16_t* out) const {
  h5::guard(impl_->path, [&] {
    h5::read_rows(impl_->file.openDataSet(layer_group(layer) + "/values"), h5::half_type(), row0, rows, out);
    return 0;
  });
}
bool CalibDumpReader::has_query_moment() const { return impl_->query_moment; }
bool CalibDumpReader::has_oproj_gram() const { return impl_->oproj_gram; }

namespace {
std::vector<float> read_square(const H5::H5File& f, const CalibMeta& m, int layer, const char* name, bool present,
                               const std::string& path, const char* why) {
  ANTKV_CHECK(present, "{}: the calibration dump has no /layer_{{l}}/{} ({}); recalibrate with this version{}", path, name,
              why, std::string(name) == "query_moment" ? " (the GPU calibration stage computes it for head_dim a multiple "
                                                         "of 16 up to 256; otherwise calibration.device: cpu)"
                                                       : " (antkv-calibrate, which knows the model directory)");
  std::vector<float> v(static_cast<size_t>(m.num_kv_heads * m.head_dim * m.head_dim));
  h5::guard(path, [&] {
    h5::open_dataset(f, layer_group(layer) + "/" + name).read(v.data(), H5::PredType::NATIVE_FLOAT);
    return 0;
  });
  return v;
}
}  // namespace

std::vector<float> CalibDumpReader::read_query_moment(int layer) const {
  return read_square(impl_->file, impl_->meta, layer, "query_moment", impl_->query_moment, impl_->path,
                     "metric=task keys need the queries' second moment");
}
std::vector<float> CalibDumpReader::read_oproj_gram(int layer) const {
  return read_square(impl_->file, impl_->meta, layer, "oproj_gram", impl_->oproj_gram, impl_->path,
                     "metric=task values need the o_proj Gram matrices");
}

void CalibDumpReader::read_scores(int layer, const char* name, int64_t row0, int64_t rows, float* out) const {
  h5::guard(impl_->path, [&] {
    h5::read_rows(h5::open_dataset(impl_->file, layer_group(layer) + "/" + name), H5::PredType::NATIVE_FLOAT, row0, rows, out);
    return 0;
  });
}

}  // namespace antkv
