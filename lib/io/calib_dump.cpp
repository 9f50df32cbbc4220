#include "io/calib_dump.h"

#include <Eigen/Core>

#include <algorithm>

#include "core/error.h"
#include "io/h5_util.h"
#include "quant/method_options.h"

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
    impl_->tokens = h5::create_growing(root, "tokens", H5::PredType::STD_I32LE, {}, 4096, 1);
    impl_->positions = h5::create_growing(root, "positions", H5::PredType::STD_I32LE, {}, 4096, 1);
    impl_->windows = h5::create_growing(root, "window", H5::PredType::STD_I32LE, {}, 4096, 1);
    const hsize_t kv = static_cast<hsize_t>(num_kv_heads), d = static_cast<hsize_t>(head_dim);
    const hsize_t rows = chunk_rows_for(num_kv_heads, head_dim);
    for (int l = 0; l < num_layers; ++l) {
      Impl::Layer L;
      L.group = h5::create_group(root, layer_group(l));
      L.keys = h5::create_growing(L.group, "keys", impl_->half, {kv, d}, rows, deflate_level);
      L.values = h5::create_growing(L.group, "values", impl_->half, {kv, d}, rows, deflate_level);
      L.s_k = h5::create_growing(L.group, "S_K", H5::PredType::IEEE_F32LE, {kv}, rows, deflate_level);
      L.s_v = h5::create_growing(L.group, "S_V", H5::PredType::IEEE_F32LE, {kv}, rows, deflate_level);
      L.score = h5::create_growing(L.group, "anchor_score", H5::PredType::IEEE_F32LE, {kv}, rows, deflate_level);
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
    H5::Group root = impl_->file.openGroup("/");
    H5::Group g = h5::create_group(root, "meta");
    h5::set_attr(g, "kind", std::string("antkv-calibration"));
    h5::set_attr(g, "model", m.model);
    h5::set_attr(g, "config_hash", m.config_hash);
    h5::set_attr(g, "recipe", m.recipe);
    h5::set_attr(g, "key_rope", m.key_rope);
    h5::set_attr(g, "anchor_score", m.anchor_score);
    h5::set_attr(g, "text", m.text);
    h5::set_attr(g, "text_hash", m.text_hash);
    h5::set_attr(g, "version", m.version);
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

// What a dump's /meta may say: counts beyond these are damage, refused before anything is allocated from them.
constexpr int64_t kMaxLayers = 1024, kMaxKvHeads = 1024, kMaxHeadDim = 1024;
constexpr int64_t kMaxCount = int64_t{1} << 40;  // tokens, windows, seq_len

struct CalibDumpReader::Impl {
  std::string path;
  H5::H5File file;
  CalibMeta meta;
  int64_t n = 0;
  bool query_moment = false, oproj_gram = false;  // every layer holds it

  std::vector<hsize_t> rows_shape(bool per_channel) const {
    std::vector<hsize_t> d{static_cast<hsize_t>(n), static_cast<hsize_t>(meta.num_kv_heads)};
    if (per_channel) d.push_back(static_cast<hsize_t>(meta.head_dim));
    return d;
  }
  std::vector<hsize_t> square_shape() const {
    const auto kv = static_cast<hsize_t>(meta.num_kv_heads), d = static_cast<hsize_t>(meta.head_dim);
    return {kv, d, d};
  }
  H5::DataSet open(const std::string& name, H5T_class_t cls, size_t size, const std::vector<hsize_t>& dims) const {
    return h5::open_checked_dataset(file, name, path, cls, size, dims);
  }
  // keys/values ([n, kv, d] fp16) or a score ([n, kv] fp32) of one layer
  H5::DataSet layer_rows(int layer, const std::string& name) const {
    ANTKV_CHECK(layer >= 0 && layer < meta.num_layers, "{}: layer {} asked of a dump of {} layers", path, layer,
                meta.num_layers);
    const bool kv = name == "keys" || name == "values";
    ANTKV_CHECK(kv || name == "S_K" || name == "S_V" || name == "anchor_score", "{}: no per-token array \"{}\"", path, name);
    return open(layer_group(layer) + "/" + name, H5T_FLOAT, kv ? 2 : 4, rows_shape(kv));
  }
};

CalibDumpReader::CalibDumpReader(const std::string& path) : impl_(new Impl) {
  h5::quiet_errors();
  impl_->path = path;
  impl_->file = h5::open_file_read(path);
  const H5::H5File& f = impl_->file;
  if (!h5::has_object(f, "meta", path))
    h5::damaged(path, "/meta", "missing: not a complete antkv calibration dump");
  const H5::Group g = h5::read_guard(path, "/meta", [&] { return f.openGroup("meta"); });
  const std::string kind = h5::get_attr_string(g, "kind", path);
  ANTKV_CHECK(kind != "antkv-codebooks", "{}: not an antkv calibration dump (a codebook file)", path);
  if (kind != "antkv-calibration") h5::damaged(path, "/meta kind", fmt::format("reads \"{}\"", kind.substr(0, 40)));
  CalibMeta& m = impl_->meta;
  m.model = h5::get_attr_string(g, "model", path);
  m.config_hash = h5::get_attr_string(g, "config_hash", path);
  m.recipe = h5::get_attr_string(g, "recipe", path);
  // the keys a dump holds: post or pre (key_rope=commute trains on the pre dump, quant/method_options.h dump_key_rope)
  m.key_rope = h5::get_attr_choice(g, "key_rope", path,
                                   {option_name(KeyRope::kPost), option_name(KeyRope::kPre)});
  std::vector<std::string> scores = option_names<AnchorScoreKind>();
  scores.insert(scores.begin(), "");  // dumps written before the attribute
  m.anchor_score = h5::get_attr_choice(g, "anchor_score", path, scores);
  m.text = h5::get_attr_string(g, "text", path);
  m.text_hash = h5::get_attr_string(g, "text_hash", path);
  m.version = h5::get_attr_string(g, "version", path);
  if (h5::has_attr(g, "fingerprint", path)) m.fingerprint = h5::get_attr_string(g, "fingerprint", path);
  m.tokens = h5::get_attr_int(g, "tokens", path, 0, kMaxCount);
  m.seq_len = h5::get_attr_int(g, "seq_len", path, 0, kMaxCount);
  m.windows = h5::get_attr_int(g, "windows", path, 0, kMaxCount);
  m.seed = h5::get_attr_int(g, "seed", path, INT64_MIN, INT64_MAX);
  m.num_layers = h5::get_attr_int(g, "num_layers", path, 1, kMaxLayers);
  m.num_kv_heads = h5::get_attr_int(g, "num_kv_heads", path, 1, kMaxKvHeads);
  m.head_dim = h5::get_attr_int(g, "head_dim", path, 1, kMaxHeadDim);
  if (h5::has_attr(g, "sample_per_window", path))
    m.sample_per_window = h5::get_attr_int(g, "sample_per_window", path, 0, kMaxCount);
  std::vector<std::string> compressions{"none"};
  for (int level = 1; level <= 9; ++level) compressions.push_back("shuffle+deflate-" + std::to_string(level));
  m.kv_compression = h5::has_attr(g, "kv_compression", path) ? h5::get_attr_choice(g, "kv_compression", path, compressions)
                                                              : std::string("shuffle+deflate-1");  // files before it

  // the groups present must be the layers /meta counts, every array the shape /meta gives it
  int64_t layer_groups = 0;
  for (const auto& name : h5::member_names(f, path)) layer_groups += name.rfind("layer_", 0) == 0;
  if (layer_groups != m.num_layers)
    h5::damaged(path, "/meta num_layers", fmt::format("reads {}, but the file holds {} layer groups", m.num_layers, layer_groups));
  impl_->n = m.tokens;
  for (const char* name : {"tokens", "positions", "window"})
    impl_->open(name, H5T_INTEGER, 4, {static_cast<hsize_t>(m.tokens)});
  for (int l = 0; l < m.num_layers; ++l)
    for (const char* name : {"keys", "values", "S_K", "S_V", "anchor_score"}) impl_->layer_rows(l, name);
  for (auto [ds, flag] : {std::pair<const char*, bool*>{"query_moment", &impl_->query_moment}, {"oproj_gram", &impl_->oproj_gram}}) {
    *flag = true;
    for (int l = 0; l < m.num_layers; ++l) {
      const std::string name = layer_group(l) + "/" + ds;
      if (!h5::has_object(f, name, path)) {
        *flag = false;
        continue;
      }
      impl_->open(name, H5T_FLOAT, 4, impl_->square_shape());
    }
  }
}

CalibDumpReader::~CalibDumpReader() = default;
const CalibMeta& CalibDumpReader::meta() const { return impl_->meta; }
const std::string& CalibDumpReader::path() const { return impl_->path; }
int64_t CalibDumpReader::n_tokens() const { return impl_->n; }

namespace {
std::vector<int32_t> read_ints(const CalibDumpReader::Impl& d, const char* name) {
  const H5::DataSet ds = d.open(name, H5T_INTEGER, 4, {static_cast<hsize_t>(d.n)});
  std::vector<int32_t> v(static_cast<size_t>(d.n));
  h5::read_rows(ds, H5::PredType::NATIVE_INT32, 0, static_cast<hsize_t>(d.n), v.data(), d.path);
  return v;
}
}  // namespace

std::vector<int32_t> CalibDumpReader::tokens() const { return read_ints(*impl_, "tokens"); }
std::vector<int32_t> CalibDumpReader::positions() const { return read_ints(*impl_, "positions"); }
std::vector<int32_t> CalibDumpReader::windows() const { return read_ints(*impl_, "window"); }

namespace {
// HDF5's own half -> float conversion is a slow soft conversion (~10M values/s); read the raw halves and
// convert them here.
void read_halves(const CalibDumpReader::Impl& d, int layer, const char* name, int64_t row0, int64_t rows, float* out) {
  const H5::DataSet ds = d.layer_rows(layer, name);
  ANTKV_CHECK(row0 >= 0 && rows >= 0 && row0 + rows <= d.n, "{}: rows {}..{} asked of {}", d.path, row0, row0 + rows, d.n);
  const size_t n = static_cast<size_t>(rows) * static_cast<size_t>(d.meta.num_kv_heads * d.meta.head_dim);
  std::vector<Eigen::half> raw(n);
  h5::read_rows(ds, h5::half_type(), static_cast<hsize_t>(row0), static_cast<hsize_t>(rows), raw.data(), d.path);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < static_cast<int64_t>(n); ++i) out[i] = static_cast<float>(raw[i]);
}

void read_layer_rows(const CalibDumpReader::Impl& d, int layer, const char* name, const H5::DataType& mem_type,
                     int64_t row0, int64_t rows, void* out) {
  const H5::DataSet ds = d.layer_rows(layer, name);
  ANTKV_CHECK(row0 >= 0 && rows >= 0 && row0 + rows <= d.n, "{}: rows {}..{} asked of {}", d.path, row0, row0 + rows, d.n);
  h5::read_rows(ds, mem_type, static_cast<hsize_t>(row0), static_cast<hsize_t>(rows), out, d.path);
}
}  // namespace

void CalibDumpReader::read_keys(int layer, int64_t row0, int64_t rows, float* out) const {
  read_halves(*impl_, layer, "keys", row0, rows, out);
}
void CalibDumpReader::read_values(int layer, int64_t row0, int64_t rows, float* out) const {
  read_halves(*impl_, layer, "values", row0, rows, out);
}
void CalibDumpReader::read_keys_half(int layer, int64_t row0, int64_t rows, uint16_t* out) const {
  read_layer_rows(*impl_, layer, "keys", h5::half_type(), row0, rows, out);
}
void CalibDumpReader::read_values_half(int layer, int64_t row0, int64_t rows, uint16_t* out) const {
  read_layer_rows(*impl_, layer, "values", h5::half_type(), row0, rows, out);
}
bool CalibDumpReader::has_query_moment() const { return impl_->query_moment; }
bool CalibDumpReader::has_oproj_gram() const { return impl_->oproj_gram; }

namespace {
std::vector<float> read_square(const CalibDumpReader::Impl& d, int layer, const char* name, bool present, const char* why) {
  ANTKV_CHECK(present, "{}: the calibration dump has no /layer_{{l}}/{} ({}); recalibrate with this version{}", d.path, name,
              why, std::string(name) == "query_moment" ? " (the GPU calibration stage computes it for head_dim a multiple "
                                                         "of 16 up to 256; otherwise calibration.device: cpu)"
                                                       : " (antkv-calibrate, which knows the model directory)");
  ANTKV_CHECK(layer >= 0 && layer < d.meta.num_layers, "{}: layer {} asked of a dump of {} layers", d.path, layer,
              d.meta.num_layers);
  const H5::DataSet ds = d.open(layer_group(layer) + "/" + name, H5T_FLOAT, 4, d.square_shape());
  std::vector<float> v(static_cast<size_t>(d.meta.num_kv_heads * d.meta.head_dim * d.meta.head_dim));
  h5::read_all(ds, H5::PredType::NATIVE_FLOAT, v.data(), d.path);
  return v;
}
}  // namespace

std::vector<float> CalibDumpReader::read_query_moment(int layer) const {
  return read_square(*impl_, layer, "query_moment", impl_->query_moment, "metric=task keys need the queries' second moment");
}
std::vector<float> CalibDumpReader::read_oproj_gram(int layer) const {
  return read_square(*impl_, layer, "oproj_gram", impl_->oproj_gram, "metric=task values need the o_proj Gram matrices");
}

void CalibDumpReader::read_scores(int layer, const char* name, int64_t row0, int64_t rows, float* out) const {
  read_layer_rows(*impl_, layer, name, H5::PredType::NATIVE_FLOAT, row0, rows, out);
}

}  // namespace antkv
