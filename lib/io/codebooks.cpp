#include "io/codebooks.h"

#include "core/error.h"
#include "io/h5_util.h"
#include "quant/method_options.h"

namespace antkv {

void write_codebooks(const std::string& path, const CodebookSet& s) {
  h5::quiet_errors();
  const CodebookMeta& m = s.meta;
  h5::guard(path, [&] {
    H5::H5File f = h5::create_file(path);
    H5::Group root = f.openGroup("/");
    for (int l = 0; l < m.num_layers; ++l) {
      H5::Group g = h5::create_group(root, "layer_" + std::to_string(l));
      for (int kind = 0; kind < 2; ++kind) {
        const LayerCodebooks& cb = kind == 0 ? s.keys[l] : s.values[l];
        const std::string p = kind == 0 ? "key_" : "value_";
        const hsize_t c = kind == 0 ? m.key_c : m.value_c, b = kind == 0 ? m.key_b : m.value_b;
        const hsize_t kv = m.num_kv_heads, groups = m.head_dim / c, k = hsize_t{1} << b;
        ANTKV_CHECK(cb.centroids.size() == kv * groups * k * c, "{}: layer {} {}centroids have {} values, expected {}",
                    path, l, p, cb.centroids.size(), kv * groups * k * c);
        h5::write_dataset(g, p + "centroids", H5::PredType::IEEE_F32LE, H5::PredType::NATIVE_FLOAT, {kv, groups, k, c},
                          cb.centroids.data());
        h5::write_dataset(g, p + "objective", H5::PredType::IEEE_F64LE, H5::PredType::NATIVE_DOUBLE, {kv, groups},
                          cb.objective.data());
        h5::write_dataset(g, p + "iterations", H5::PredType::STD_I32LE, H5::PredType::NATIVE_INT32, {kv, groups},
                          cb.iterations.data());
        h5::write_dataset(g, p + "reseeded", H5::PredType::STD_I64LE, H5::PredType::NATIVE_INT64, {kv, groups},
                          cb.reseeded.data());
        h5::write_dataset(g, p + "error_norm", H5::PredType::IEEE_F32LE, H5::PredType::NATIVE_FLOAT, {kv},
                          cb.error_norm.data());
        if (m.rotate != "off") {
          const hsize_t d = m.head_dim;
          ANTKV_CHECK(cb.rotation.size() == kv * d * d && cb.mean.size() == kv * d,
                      "{}: layer {} {}rotation/mean have the wrong size", path, l, p);
          h5::write_dataset(g, p + "rotation", H5::PredType::IEEE_F32LE, H5::PredType::NATIVE_FLOAT, {kv, d, d},
                            cb.rotation.data());
          h5::write_dataset(g, p + "mean", H5::PredType::IEEE_F32LE, H5::PredType::NATIVE_FLOAT, {kv, d}, cb.mean.data());
        }
        if (m.metric != "plain") {
          ANTKV_CHECK(cb.metric.size() == kv * groups * c * c, "{}: layer {} {}metric has {} values, expected {}", path, l, p,
                      cb.metric.size(), kv * groups * c * c);
          h5::write_dataset(g, p + "metric", H5::PredType::IEEE_F32LE, H5::PredType::NATIVE_FLOAT, {kv, groups, c, c},
                            cb.metric.data());
        }
      }
    }
    H5::Group g = h5::create_group(root, "meta");
    h5::set_attr(g, "kind", std::string("antkv-codebooks"));
    h5::set_attr(g, "config_hash", m.config_hash);
    h5::set_attr(g, "calib_hash", m.calib_hash);
    h5::set_attr(g, "recipe", m.recipe);
    h5::set_attr(g, "key_rope", m.key_rope);
    h5::set_attr(g, "weighting", m.weighting);
    h5::set_attr(g, "exclude_anchors", int64_t{m.exclude_anchors ? 1 : 0});
    h5::set_attr(g, "gain", m.gain);
    h5::set_attr(g, "rotate", m.rotate);
    if (m.metric != "plain") h5::set_attr(g, "metric", m.metric);
    h5::set_attr(g, "trainer", m.trainer);
    h5::set_attr(g, "version", m.version);
    h5::set_attr(g, "fingerprint", m.fingerprint);
    h5::set_attr(g, "key_c", int64_t{m.key_c});
    h5::set_attr(g, "key_b", int64_t{m.key_b});
    h5::set_attr(g, "value_c", int64_t{m.value_c});
    h5::set_attr(g, "value_b", int64_t{m.value_b});
    h5::set_attr(g, "key_bits", static_cast<double>(m.key_b) / m.key_c);
    h5::set_attr(g, "value_bits", static_cast<double>(m.value_b) / m.value_c);
    h5::set_attr(g, "num_layers", int64_t{m.num_layers});
    h5::set_attr(g, "num_kv_heads", int64_t{m.num_kv_heads});
    h5::set_attr(g, "head_dim", int64_t{m.head_dim});
    h5::close_file(f, path);
    return 0;
  });
}

namespace {
// What a codebook file's /meta may say: beyond these is damage, refused before anything is allocated from it.
constexpr int64_t kMaxLayers = 1024, kMaxKvHeads = 1024, kMaxHeadDim = 1024, kMaxBits = 16;

// One dataset of `p` ("layer_3/key_"), checked against the shape /meta gives it, read whole into v.
template <typename T>
void read_checked(const H5::H5File& f, const std::string& path, const std::string& name, H5T_class_t cls,
                  const H5::PredType& mem_type, const std::vector<hsize_t>& dims, std::vector<T>& v) {
  const H5::DataSet ds = h5::open_checked_dataset(f, name, path, cls, sizeof(T), dims);
  size_t n = 1;
  for (auto d : dims) n *= static_cast<size_t>(d);
  v.resize(n);
  h5::read_all(ds, mem_type, v.data(), path);
}
}  // namespace

CodebookSet read_codebooks(const std::string& path) {
  h5::quiet_errors();
  CodebookSet s;
  const H5::H5File f = h5::open_file_read(path);
  if (!h5::has_object(f, "meta", path)) h5::damaged(path, "/meta", "missing: not a complete antkv codebook file");
  const H5::Group g = h5::read_guard(path, "/meta", [&] { return f.openGroup("meta"); });
  const std::string kind = h5::get_attr_string(g, "kind", path);
  ANTKV_CHECK(kind != "antkv-calibration", "{}: not an antkv codebook file (a calibration dump)", path);
  if (kind != "antkv-codebooks") h5::damaged(path, "/meta kind", fmt::format("reads \"{}\"", kind.substr(0, 40)));
  CodebookMeta& m = s.meta;
  m.config_hash = h5::get_attr_string(g, "config_hash", path);
  m.calib_hash = h5::get_attr_string(g, "calib_hash", path);
  m.recipe = h5::get_attr_string(g, "recipe", path);
  m.key_rope = h5::get_attr_choice(g, "key_rope", path, option_names<KeyRope>());
  m.weighting = h5::get_attr_choice(g, "weighting", path, option_names<Weighting>());
  if (h5::has_attr(g, "exclude_anchors", path))
    m.exclude_anchors = h5::get_attr_int(g, "exclude_anchors", path, 0, 1) != 0;
  if (h5::has_attr(g, "gain", path)) m.gain = h5::get_attr_choice(g, "gain", path, option_names<Gain>());
  if (h5::has_attr(g, "rotate", path)) m.rotate = h5::get_attr_choice(g, "rotate", path, option_names<Rotate>());
  if (h5::has_attr(g, "metric", path)) m.metric = h5::get_attr_choice(g, "metric", path, option_names<Metric>());
  m.trainer = h5::get_attr_string(g, "trainer", path);
  m.version = h5::get_attr_string(g, "version", path);
  if (h5::has_attr(g, "fingerprint", path)) m.fingerprint = h5::get_attr_string(g, "fingerprint", path);
  m.num_layers = static_cast<int>(h5::get_attr_int(g, "num_layers", path, 1, kMaxLayers));
  m.num_kv_heads = static_cast<int>(h5::get_attr_int(g, "num_kv_heads", path, 1, kMaxKvHeads));
  m.head_dim = static_cast<int>(h5::get_attr_int(g, "head_dim", path, 1, kMaxHeadDim));
  m.key_c = static_cast<int>(h5::get_attr_int(g, "key_c", path, 1, m.head_dim));
  m.key_b = static_cast<int>(h5::get_attr_int(g, "key_b", path, 1, kMaxBits));
  m.value_c = static_cast<int>(h5::get_attr_int(g, "value_c", path, 1, m.head_dim));
  m.value_b = static_cast<int>(h5::get_attr_int(g, "value_b", path, 1, kMaxBits));
  for (auto [name, c] : {std::pair<const char*, int>{"/meta key_c", m.key_c}, {"/meta value_c", m.value_c}})
    if (m.head_dim % c != 0)
      h5::damaged(path, name, fmt::format("reads {}, which does not divide /meta head_dim {}", c, m.head_dim));

  // the groups present must be the layers /meta counts, every array the shape /meta gives it
  int layer_groups = 0;
  for (const auto& name : h5::member_names(f, path)) layer_groups += name.rfind("layer_", 0) == 0;
  if (layer_groups != m.num_layers)
    h5::damaged(path, "/meta num_layers", fmt::format("reads {}, but the file holds {} layer groups", m.num_layers, layer_groups));
  s.keys.resize(m.num_layers);
  s.values.resize(m.num_layers);
  const hsize_t kv = static_cast<hsize_t>(m.num_kv_heads), d = static_cast<hsize_t>(m.head_dim);
  for (int l = 0; l < m.num_layers; ++l) {
    const std::string gname = "layer_" + std::to_string(l);
    if (!h5::has_object(f, gname, path)) h5::damaged(path, "/" + gname, "missing");
    for (int kind_i = 0; kind_i < 2; ++kind_i) {
      LayerCodebooks& cb = kind_i == 0 ? s.keys[l] : s.values[l];
      const std::string p = gname + "/" + (kind_i == 0 ? "key_" : "value_");
      const hsize_t c = kind_i == 0 ? m.key_c : m.value_c, b = kind_i == 0 ? m.key_b : m.value_b;
      const hsize_t groups = d / c;
      read_checked(f, path, p + "centroids", H5T_FLOAT, H5::PredType::NATIVE_FLOAT, {kv, groups, hsize_t{1} << b, c},
                   cb.centroids);
      read_checked(f, path, p + "objective", H5T_FLOAT, H5::PredType::NATIVE_DOUBLE, {kv, groups}, cb.objective);
      read_checked(f, path, p + "iterations", H5T_INTEGER, H5::PredType::NATIVE_INT32, {kv, groups}, cb.iterations);
      read_checked(f, path, p + "reseeded", H5T_INTEGER, H5::PredType::NATIVE_INT64, {kv, groups}, cb.reseeded);
      read_checked(f, path, p + "error_norm", H5T_FLOAT, H5::PredType::NATIVE_FLOAT, {kv}, cb.error_norm);
      if (m.rotate != "off") {
        read_checked(f, path, p + "rotation", H5T_FLOAT, H5::PredType::NATIVE_FLOAT, {kv, d, d}, cb.rotation);
        read_checked(f, path, p + "mean", H5T_FLOAT, H5::PredType::NATIVE_FLOAT, {kv, d}, cb.mean);
      }
      if (m.metric != "plain")
        read_checked(f, path, p + "metric", H5T_FLOAT, H5::PredType::NATIVE_FLOAT, {kv, groups, c, c}, cb.metric);
    }
  }
  return s;
}

}  // namespace antkv
