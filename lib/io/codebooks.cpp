#include "io/codebooks.h"

#include "core/error.h"
#include "io/h5_util.h"

namespace antkv {

void write_codebooks(const std::string& path, const CodebookSet& s) {
  h5::quiet_errors();
  const CodebookMeta& m = s.meta;
  h5::guard(path, [&] {
    H5::H5File f = h5::create_file(path);
    for (int l = 0; l < m.num_layers; ++l) {
      H5::Group g = f.createGroup("layer_" + std::to_string(l));
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
    H5::Group g = f.createGroup("meta");
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
    h5::set_attr(g, "created", m.created);
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

CodebookSet read_codebooks(const std::string& path) {
  h5::quiet_errors();
  CodebookSet s;
  h5::guard(path, [&] {
    ANTKV_CHECK(H5::H5File::isHdf5(path.c_str()), "{}: not an HDF5 file", path);
    H5::H5File f = h5::open_file_read(path);
    ANTKV_CHECK(f.nameExists("meta"), "{}: no /meta group: not a complete antkv codebook file", path);
    H5::Group g = f.openGroup("meta");
    ANTKV_CHECK(h5::has_attr(g, "kind") && h5::get_attr_string(g, "kind", path) == "antkv-codebooks",
                "{}: not an antkv codebook file (/meta kind is not antkv-codebooks)", path);
    CodebookMeta& m = s.meta;
    m.config_hash = h5::get_attr_string(g, "config_hash", path);
    m.calib_hash = h5::get_attr_string(g, "calib_hash", path);
    m.recipe = h5::get_attr_string(g, "recipe", path);
    m.key_rope = h5::get_attr_string(g, "key_rope", path);
    m.weighting = h5::get_attr_string(g, "weighting", path);
    if (h5::has_attr(g, "exclude_anchors")) m.exclude_anchors = h5::get_attr_int(g, "exclude_anchors", path) != 0;
    if (h5::has_attr(g, "gain")) m.gain = h5::get_attr_string(g, "gain", path);
    ANTKV_CHECK(m.gain == "off" || m.gain == "k" || m.gain == "kv", "{}: /meta attribute gain is \"{}\" (off, k or kv)",
                path, m.gain);
    if (h5::has_attr(g, "rotate")) m.rotate = h5::get_attr_string(g, "rotate", path);
    ANTKV_CHECK(m.rotate == "off" || m.rotate == "pca", "{}: /meta attribute rotate is \"{}\" (off or pca)", path, m.rotate);
    if (h5::has_attr(g, "metric")) m.metric = h5::get_attr_string(g, "metric", path);
    ANTKV_CHECK(m.metric == "plain" || m.metric == "task", "{}: /meta attribute metric is \"{}\" (plain or task)", path,
                m.metric);
    m.trainer = h5::get_attr_string(g, "trainer", path);
    m.version = h5::get_attr_string(g, "version", path);
    m.created = h5::get_attr_string(g, "created", path);
    if (h5::has_attr(g, "fingerprint")) m.fingerprint = h5::get_attr_string(g, "fingerprint", path);
    m.key_c = static_cast<int>(h5::get_attr_int(g, "key_c", path));
    m.key_b = static_cast<int>(h5::get_attr_int(g, "key_b", path));
    m.value_c = static_cast<int>(h5::get_attr_int(g, "value_c", path));
    m.value_b = static_cast<int>(h5::get_attr_int(g, "value_b", path));
    m.num_layers = static_cast<int>(h5::get_attr_int(g, "num_layers", path));
    m.num_kv_heads = static_cast<int>(h5::get_attr_int(g, "num_kv_heads", path));
    m.head_dim = static_cast<int>(h5::get_attr_int(g, "head_dim", path));
    ANTKV_CHECK(m.key_c > 0 && m.value_c > 0 && m.head_dim % m.key_c == 0 && m.head_dim % m.value_c == 0 &&
                    m.key_b >= 1 && m.key_b <= 16 && m.value_b >= 1 && m.value_b <= 16,
                "{}: bad codebook configuration in /meta", path);
    s.keys.resize(m.num_layers);
    s.values.resize(m.num_layers);
    for (int l = 0; l < m.num_layers; ++l) {
      const std::string gname = "layer_" + std::to_string(l);
      ANTKV_CHECK(f.nameExists(gname), "{}: missing group /{}", path, gname);
      for (int kind = 0; kind < 2; ++kind) {
        LayerCodebooks& cb = kind == 0 ? s.keys[l] : s.values[l];
        const std::string p = gname + "/" + (kind == 0 ? "key_" : "value_");
        const hsize_t c = kind == 0 ? m.key_c : m.value_c, b = kind == 0 ? m.key_b : m.value_b;
        const std::vector<hsize_t> want{static_cast<hsize_t>(m.num_kv_heads), m.head_dim / c, hsize_t{1} << b, c};
        H5::DataSet ds = h5::open_dataset(f, p + "centroids");
        ANTKV_CHECK(h5::dims_of(ds) == want, "{}: /{}centroids has the wrong shape", path, p);
        cb.centroids.resize(want[0] * want[1] * want[2] * want[3]);
        ds.read(cb.centroids.data(), H5::PredType::NATIVE_FLOAT);
        const size_t ncb = want[0] * want[1];
        cb.objective.resize(ncb);
        h5::open_dataset(f, p + "objective").read(cb.objective.data(), H5::PredType::NATIVE_DOUBLE);
        cb.iterations.resize(ncb);
        h5::open_dataset(f, p + "iterations").read(cb.iterations.data(), H5::PredType::NATIVE_INT32);
        cb.reseeded.resize(ncb);
        h5::open_dataset(f, p + "reseeded").read(cb.reseeded.data(), H5::PredType::NATIVE_INT64);
        cb.error_norm.resize(want[0]);
        h5::open_dataset(f, p + "error_norm").read(cb.error_norm.data(), H5::PredType::NATIVE_FLOAT);
        if (m.rotate != "off") {
          const hsize_t d = m.head_dim;
          H5::DataSet rs = h5::open_dataset(f, p + "rotation");
          ANTKV_CHECK(h5::dims_of(rs) == (std::vector<hsize_t>{want[0], d, d}), "{}: /{}rotation has the wrong shape", path, p);
          cb.rotation.resize(want[0] * d * d);
          rs.read(cb.rotation.data(), H5::PredType::NATIVE_FLOAT);
          H5::DataSet ms = h5::open_dataset(f, p + "mean");
          ANTKV_CHECK(h5::dims_of(ms) == (std::vector<hsize_t>{want[0], d}), "{}: /{}mean has the wrong shape", path, p);
          cb.mean.resize(want[0] * d);
          ms.read(cb.mean.data(), H5::PredType::NATIVE_FLOAT);
        }
        if (m.metric != "plain") {
          ANTKV_CHECK(f.nameExists(p + "metric"), "{}: /meta says metric={} but /{}metric is missing", path, m.metric, p);
          H5::DataSet ms = h5::open_dataset(f, p + "metric");
          ANTKV_CHECK(h5::dims_of(ms) == (std::vector<hsize_t>{want[0], want[1], c, c}), "{}: /{}metric has the wrong shape",
                      path, p);
          cb.metric.resize(want[0] * want[1] * c * c);
          ms.read(cb.metric.data(), H5::PredType::NATIVE_FLOAT);
        }
      }
    }
    return 0;
  });
  return s;
}

}  // namespace antkv
