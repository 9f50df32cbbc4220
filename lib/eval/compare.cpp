#include "eval/compare.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/hash.h"
#include "core/system_info.h"
#include "core/text_file.h"
#include "eval/fingerprint.h"
#include "io/calib_dump.h"
#include "quant/method_support.h"
#include "quant/quantized_cache.h"
#include "runtime/cpu_runtime.h"
#include "tokenizer/tokenizer.h"

namespace fs = std::filesystem;

namespace antkv {

MethodRuntimeFactory cpu_method_runtime_factory(const Checkpoint& ckpt, int threads) {
  return [&ckpt, threads](const MethodSpec& m, std::shared_ptr<const CodebookSet> cb) -> std::unique_ptr<Runtime> {
    CpuRuntimeOptions o;
    o.threads = threads;
    auto rt = std::make_unique<CpuRuntime>(ckpt, o);
    rt->set_kv_cache(std::make_unique<QuantizedKvCache>(ckpt.config(), m, std::move(cb)));
    return rt;
  };
}

std::map<std::string, std::shared_ptr<const CodebookSet>> load_method_codebooks(const std::vector<MethodSpec>& methods,
                                                                               const std::string& dir,
                                                                               const Checkpoint* ckpt, bool allow_other_weights) {
  std::map<std::string, std::shared_ptr<const CodebookSet>> books;
  std::vector<MethodSpec> files;  // one spec per codebook file (per-layer widths: one per width pair)
  for (const auto& m : methods)
    if (m.needs_codebooks())
      for (const auto& s : m.codebook_specs()) files.push_back(s);
  for (const auto& m : files) {
    if (books.count(m.codebook_file())) continue;
    const std::string p = (fs::path(dir) / m.codebook_file()).string();
    ANTKV_CHECK(fs::exists(p), "method {}: codebook file {} not found (train it with antkv-train-codebook, or run "
                "the whole pipeline with `antkv-eval run`)", m.text, p);
    auto set = std::make_shared<const CodebookSet>(read_codebooks(p));
    const CodebookMeta& cm = set->meta;
    if (ckpt) check_same_weights(p, cm.fingerprint, ckpt->content_hash(), ckpt->dir(), allow_other_weights);
    ANTKV_CHECK(cm.key_c == m.keys.c && cm.key_b == m.keys.b && cm.value_c == m.values.c && cm.value_b == m.values.b &&
                    cm.weighting == option_name(m.weighting) && cm.exclude_anchors == m.exclude_anchors &&
                    cm.key_rope == option_name(m.key_rope) && cm.gain == option_name(m.gain) &&
                    cm.rotate == option_name(m.rotate) && cm.metric == option_name(m.metric),
                "{}: codebooks for keys c{}b{}, values c{}b{}, weighting {}, anchors {} in training, key_rope {}, gain {}, "
                "rotate {}, metric {}; method {} needs c{}b{}, c{}b{}, {}, {}, {}, gain {}, rotate {}, metric {}", p, cm.key_c,
                cm.key_b, cm.value_c, cm.value_b, cm.weighting, cm.exclude_anchors ? "excluded" : "included", cm.key_rope,
                cm.gain, cm.rotate, cm.metric, m.text, m.keys.c, m.keys.b, m.values.c, m.values.b, option_name(m.weighting),
                m.exclude_anchors ? "excluded" : "included", option_name(m.key_rope), option_name(m.gain),
                option_name(m.rotate), option_name(m.metric));
    books[m.codebook_file()] = std::move(set);
  }
  // per-layer widths: one set whose layer l holds the codebooks of layer l's configuration (meta of layer 0's file)
  for (const auto& m : methods) {
    if (!m.needs_codebooks() || !m.layered() || books.count(m.codebook_key())) continue;
    auto merged = std::make_shared<CodebookSet>();
    for (int l = 0; l < m.listed_layers(); ++l) {
      MethodSpec s = m.codebook_specs().front();
      s.keys = m.key_config(l), s.values = m.value_config(l);
      const auto& src = books.at(s.codebook_file());
      ANTKV_CHECK(l < static_cast<int>(src->keys.size()), "method {}: lists {} layers, the codebooks have {}", m.text,
                  m.listed_layers(), src->keys.size());
      if (l == 0) merged->meta = src->meta;
      merged->keys.push_back(src->keys[l]);
      merged->values.push_back(src->values[l]);
    }
    books[m.codebook_key()] = std::move(merged);
  }
  return books;
}

std::vector<MethodResult> compare_methods(const Tokenizer& tok, const CompareOptions& o) {
  ANTKV_CHECK(o.recipe && o.make_runtime, "compare_methods: recipe and runtime factory needed");
  const Recipe& r = *o.recipe;
  ANTKV_CHECK(!r.eval.texts.empty(), "{}: key \"eval.texts\" lists no text", r.source.empty() ? "recipe" : r.source);
  std::vector<MethodSpec> methods;
  for (const auto& s : r.eval.methods) methods.push_back(parse_method(s, r));
  auto books = load_method_codebooks(methods, o.codebook_dir, o.ckpt, o.allow_other_weights);
  std::vector<MethodResult> out;
  for (const auto& text : r.eval.texts) {
    ANTKV_CHECK(fs::is_regular_file(text), "{}: evaluation text not found", text);
    const auto ids = tok.encode(read_text_file(text), true);
    if (o.ckpt) check_token_ids(ids, *o.ckpt, text);
    if (o.progress)
      std::fprintf(stderr, "%s\n", windows_line(fs::path(text).filename().string(), static_cast<int64_t>(ids.size()),
                                                r.eval.seq_len, parse_window_protocol(r.eval.protocol), 0,
                                                r.eval.max_windows).c_str());
    double fp16_ppl = NAN;
    const size_t text_begin = out.size();
    for (const auto& m : methods) {
      std::shared_ptr<const CodebookSet> cb = m.needs_codebooks() ? books[m.codebook_key()] : nullptr;
      auto rt = o.make_runtime(m, cb);
      PerplexityOptions po;
      po.seq_len = r.eval.seq_len;
      po.protocol = parse_window_protocol(r.eval.protocol);
      po.max_windows = r.eval.max_windows;
      po.seq_len_name = "eval.seq_len";
      po.text_name = text;
      po.decode_from = r.eval.decode_from;
      if (r.eval.kv_cache == "real") po.prefill_chunk = 0;  // the real caches take one prefill chunk
      po.progress = o.progress;
      po.progress_label = fmt::format("{} on {}", m.text, fs::path(text).filename().string());
      MethodResult res;
      res.method = m;
      res.text = text;
      res.ppl = evaluate_perplexity(*rt, ids, tok.bos_id(), po);
      // gpu_method_runtime_factory keeps vq/antkv and uniform in real caches; fp16 and rsq stay simulated
      res.kv_cache = eval_kv_cache(m, r.eval.device, r.eval.kv_cache);
      // Effective bits: what the cache stored for the last window where the runtime's cache counts it (the CPU
      // caches); otherwise the formula, which assumes each window is prefilled in one chunk.
      res.effective_bits = effective_bits(m, r.eval.seq_len, rt->config().head_dim, true);
      res.effective_bits_no_codebooks = effective_bits(m, r.eval.seq_len, rt->config().head_dim, false);
      if (auto* cpu = dynamic_cast<CpuRuntime*>(rt.get()))
        if (auto* stored = dynamic_cast<const QuantizedKvCache*>(&cpu->kv_cache()); stored && stored->length(0) > 0) {
          res.effective_bits = stored->effective_bits(true);
          res.effective_bits_no_codebooks = stored->effective_bits(false);
        }
      if (m.kind == MethodKind::kFp16) fp16_ppl = res.ppl.ppl;
      out.push_back(res);
    }
    // against the fp16 row wherever it is listed; NaN (printed n/a) when fp16 is not among the methods
    for (size_t i = text_begin; i < out.size(); ++i) out[i].delta_ppl = out[i].ppl.ppl - fp16_ppl;
  }
  return out;
}

std::string results_table(const std::vector<MethodResult>& rs) {
  std::vector<std::string> texts, methods;
  std::map<std::pair<std::string, std::string>, const MethodResult*> cell;
  for (const auto& r : rs) {
    if (std::find(texts.begin(), texts.end(), r.text) == texts.end()) texts.push_back(r.text);
    if (std::find(methods.begin(), methods.end(), r.method.text) == methods.end()) methods.push_back(r.method.text);
    cell[{r.method.text, r.text}] = &r;
  }
  std::string s = fmt::format("{:<40} {:>6} {:>9} {:>9}", "method", "bits", "eff.bits", "(no cb)");
  for (const auto& t : texts) s += fmt::format(" {:>14} {:>8}", fs::path(t).filename().string().substr(0, 14), "dPPL");
  s += "\n";
  for (const auto& m : methods) {
    const MethodResult* any = nullptr;
    for (const auto& t : texts)
      if (cell.count({m, t})) any = cell[{m, t}];
    s += fmt::format("{:<40} {:>6.3f} {:>9.3f} {:>9.3f}", m.substr(0, 40), any->method.nominal_bits(), any->effective_bits,
                     any->effective_bits_no_codebooks);
    for (const auto& t : texts) {
      auto it = cell.find({m, t});
      if (it == cell.end()) s += fmt::format(" {:>14} {:>8}", "-", "-");
      else if (std::isfinite(it->second->delta_ppl))
        s += fmt::format(" {:>14.3f} {:>+8.3f}", it->second->ppl.ppl, it->second->delta_ppl);
      else
        s += fmt::format(" {:>14.3f} {:>8}", it->second->ppl.ppl, "n/a");
    }
    s += "\n";
  }
  bool has_fp16 = false;
  for (const auto& r : rs) has_fp16 |= r.method.kind == MethodKind::kFp16;
  if (!rs.empty() && !has_fp16) s += "(dPPL n/a: fp16 is not among the methods)\n";
  if (!rs.empty()) {
    bool real = false;
    for (const auto& r : rs) real |= r.kv_cache == "real";
    const std::string decode =
        rs[0].ppl.decode_from > 0 ? fmt::format(", tokens from {} on decoded one per step", rs[0].ppl.decode_from) : "";
    s += fmt::format("(protocol {}, seq_len {}, {} windows per text{}{}; eff.bits at context {} with codebooks "
                     "amortized)\n",
                     window_protocol_name(rs[0].ppl.protocol), rs[0].ppl.seq_len, rs[0].ppl.windows, decode,
                     real ? ", vq/antkv/uniform through the real GPU caches" : "", rs[0].ppl.seq_len);
  }
  return s;
}

nlohmann::json recipe_results_header(const std::string& tool, const Recipe& recipe, const std::string& device) {
  nlohmann::json j;
  j["tool"] = tool;
  j["version"] = ANTKV_VERSION;
  j["timestamp"] = utc_timestamp();
  j["recipe"] = recipe.to_yaml();
  j["model"] = recipe.model;
  j["hardware"] = {{"device", device}, {"cpu", cpu_model_name()}};
  return j;
}

std::string results_json(const std::vector<MethodResult>& rs, const Recipe& recipe, const std::string& device) {
  using json = nlohmann::json;
  json j = recipe_results_header("antkv-eval", recipe, device);
  json arr = json::array();
  for (const auto& r : rs) {
    arr.push_back({{"method", r.method.text}, {"kind", r.method.kind_name()}, {"text", r.text},
                   {"nominal_bits", r.method.nominal_bits()}, {"effective_bits", r.effective_bits},
                   {"effective_bits_without_codebooks", r.effective_bits_no_codebooks},
                   {"protocol", window_protocol_name(r.ppl.protocol)}, {"seq_len", r.ppl.seq_len},
                   {"windows", r.ppl.windows}, {"decode_from", r.ppl.decode_from}, {"kv_cache", r.kv_cache},
                   {"ppl", r.ppl.ppl},
                   {"delta_ppl", std::isfinite(r.delta_ppl) ? json(r.delta_ppl) : json(nullptr)},
                   {"nll_per_window", r.ppl.nll_per_window}, {"seconds", r.ppl.seconds},
                   {"tokens_per_second", r.ppl.tokens_per_second}});
  }
  j["results"] = arr;
  return j.dump(1);
}

std::string results_csv(const std::vector<MethodResult>& rs) {
  std::string s = "method,kind,text,nominal_bits,effective_bits,effective_bits_without_codebooks,protocol,seq_len,windows,ppl,delta_ppl\n";
  for (const auto& r : rs)
    s += fmt::format("\"{}\",{},{},{:.4f},{:.4f},{:.4f},{},{},{},{:.6f},{}\n", r.method.text, r.method.kind_name(),
                     fs::path(r.text).filename().string(), r.method.nominal_bits(), r.effective_bits,
                     r.effective_bits_no_codebooks, window_protocol_name(r.ppl.protocol), r.ppl.seq_len, r.ppl.windows,
                     r.ppl.ppl, std::isfinite(r.delta_ppl) ? fmt::format("{:.6f}", r.delta_ppl) : std::string());
  return s;
}

std::string calibration_fingerprint(const Recipe& r, const std::string& model_hash, KeyRope key_rope) {
  const auto& c = r.calibration;
  return make_fingerprint({{"stage", "calibration"},
                           {kModelContentField, model_hash},
                           {"calibration.text (content)", c.text.empty() ? "" : hash_file(c.text)},
                           {"calibration.tokens", std::to_string(c.tokens)},
                           {"calibration.seq_len", std::to_string(c.seq_len)},
                           {"calibration.stride", std::to_string(c.stride)},
                           {"calibration.sample_per_window", std::to_string(c.sample_per_window)},
                           {"calibration.seed", std::to_string(c.seed)},
                           {"calibration.device", c.device},
                           {"key_rope", option_name(key_rope)},
                           {"anchor.score", option_name(r.anchor.score)},
                           {"anchor.ratio", fmt::format("{}", r.anchor.ratio)}});
}

std::string codebook_fingerprint(const Recipe& r, const MethodSpec& m, const std::string& calib_hash,
                                 const std::string& model_hash) {
  const auto& k = r.kmeans;
  std::vector<std::pair<std::string, std::string>> fields = {{"stage", "codebooks"},
                           {"calibration dump (content)", calib_hash},
                           {"key_rope", option_name(m.key_rope)},
                           {"quant.keys", fmt::format("c{}b{}", m.keys.c, m.keys.b)},
                           {"quant.values", fmt::format("c{}b{}", m.values.c, m.values.b)},
                           {"kmeans.weighting", option_name(m.weighting)},
                           {"kmeans.exclude_anchors", m.exclude_anchors ? "true" : "false"},
                           {"kmeans.iters", std::to_string(k.iters)},
                           {"kmeans.tol", fmt::format("{}", k.tol)},
                           {"kmeans.seed", std::to_string(k.seed)},
                           {"kmeans.max_points", std::to_string(k.max_points)},
                           {"kmeans.holdout", fmt::format("{}", k.holdout)},
                           {"kmeans.device", k.device},
                           {"anchor.ratio", fmt::format("{}", m.ratio)}};
  // gain-shape codebooks only: the fingerprints of earlier codebook files stay valid
  if (m.gain != Gain::kOff) fields.emplace_back("kmeans.gain", option_name(m.gain));
  if (m.rotate != Rotate::kOff) fields.emplace_back("kmeans.rotate", option_name(m.rotate));
  if (m.metric != Metric::kPlain) fields.emplace_back("kmeans.metric", option_name(m.metric));
  // the weights the dump came from, so that commands without the dump (ppl --recipe, diagnose) can check them
  if (!model_hash.empty()) fields.emplace_back(kModelContentField, model_hash);
  return make_fingerprint(fields);
}

std::vector<MethodResult> run_pipeline(const PipelineOptions& o) {
  ANTKV_CHECK(o.recipe && o.ckpt && o.tok, "run_pipeline: recipe, checkpoint and tokenizer needed");
  const Recipe& r = *o.recipe;
  // fail before hours of work, not after
  ANTKV_CHECK(!r.eval.texts.empty(), "{}: key \"eval.texts\" lists no text", r.source.empty() ? "recipe" : r.source);
  for (const auto& t : r.eval.texts) ANTKV_CHECK(fs::is_regular_file(t), "{}: evaluation text not found (eval.texts)", t);
  prepare_codebooks(o);

  // 3. perplexity of every method
  CompareOptions co;
  co.recipe = &r;
  co.codebook_dir = (fs::path(r.out_dir) / "codebooks").string();
  co.make_runtime = o.make_method_runtime;
  co.ckpt = o.ckpt;
  co.progress = o.progress;
  return compare_methods(*o.tok, co);
}

void prepare_codebooks(const PipelineOptions& o) {
  ANTKV_CHECK(o.recipe && o.ckpt && o.tok, "prepare_codebooks: recipe, checkpoint and tokenizer needed");
  const Recipe& r = *o.recipe;
  const ModelConfig& cfg = o.ckpt->config();
  fs::create_directories(fs::path(r.out_dir) / "codebooks");
  std::vector<MethodSpec> methods;
  for (const auto& s : r.eval.methods) methods.push_back(parse_method(s, r));

  // 1. calibration dumps, one per key placement the methods' dumps hold (pre and commute share the pre-RoPE one)
  std::map<KeyRope, std::string> dumps;  // dump_key_rope -> path
  for (const auto& m : methods) {
    const KeyRope dk = dump_key_rope(m.key_rope);
    if (!m.needs_codebooks() || dumps.count(dk)) continue;
    const std::string path = (fs::path(r.out_dir) / ("calib-" + std::string(option_name(dk)) + ".h5")).string();
    const std::string fp = calibration_fingerprint(r, o.ckpt->content_hash(), dk);
    bool task = false;  // metric=task codebooks need the dump's query moments and o_proj Grams (dumps before them lack them)
    for (const auto& x : methods) task |= x.needs_codebooks() && dump_key_rope(x.key_rope) == dk && x.metric != Metric::kPlain;
    const ReuseDecision d = decide_reuse(path, fp, o.force, [task](const std::string& p) {
      CalibDumpReader dump(p);
      if (task && !(dump.has_query_moment() && dump.has_oproj_gram()))
        throw Error("it has no metric=task statistics (query_moment, oproj_gram)");
      return dump.meta().fingerprint;
    });
    std::fprintf(stderr, "%s\n", d.message.c_str());
    if (!d.reuse) {
      ANTKV_CHECK(!r.calibration.text.empty(), "{}: key \"calibration.text\" is not set", r.source);
      Recipe rc = r;
      rc.key_rope = dk;
      auto rt = o.make_calibration_runtime();
      int max_b = 1;  // the largest codebooks trained on this dump: 2^b centroids need 2^b calibration tokens
      for (const auto& x : methods)
        for (const auto& spec : x.needs_codebooks() && dump_key_rope(x.key_rope) == dk ? x.codebook_specs() : std::vector<MethodSpec>{})
          max_b = std::max({max_b, spec.keys.b, spec.values.b});
      std::vector<int32_t> ids = o.tok->encode(read_text_file(r.calibration.text), true);
      check_token_ids(ids, *o.ckpt, r.calibration.text);
      const auto plan = plan_calibration(std::move(ids), r.calibration.tokens,
                                         r.calibration.seq_len, r.calibration.stride, r.calibration.text,
                                         int64_t{1} << max_b);
      if (o.progress) std::fprintf(stderr, "%s\n", calibration_plan_line(plan).c_str());
      AtomicFile f(path);
      CalibrationOptions co;
      co.recipe = &rc;
      co.out_path = f.temp_path();
      co.model_dir = r.model;
      co.text_path = r.calibration.text;
      co.version = ANTKV_VERSION;
      co.anchor_fn = o.anchor_fn;
      co.device_stage = o.calib_device_stage;
      co.fingerprint = fp;
      co.progress = o.progress;
      const auto res = run_calibration(*rt, *o.tok, plan, co);
      AtomicFile summary(path + ".summary.json");  // both complete before either gets its final name
      summary.write(calibration_summary_json(res, *o.tok) + "\n");
      f.commit();
      summary.commit();
    }
    dumps[dk] = path;
  }

  // 2. codebooks, one file per configuration the methods need
  std::set<std::string> done;
  std::map<KeyRope, std::string> dump_hashes;  // dump_key_rope -> content hash: each dump read once, not per codebook set
  std::vector<MethodSpec> files;  // one spec per codebook file (per-layer widths: one per width pair)
  for (const auto& m : methods)
    if (m.needs_codebooks())
      for (const auto& s : m.codebook_specs()) files.push_back(s);
  for (const auto& m : files) {
    if (done.count(m.codebook_file())) continue;
    done.insert(m.codebook_file());
    const std::string path = (fs::path(r.out_dir) / "codebooks" / m.codebook_file()).string();
    const KeyRope dk = dump_key_rope(m.key_rope);
    auto h = dump_hashes.find(dk);
    if (h == dump_hashes.end()) h = dump_hashes.emplace(dk, hash_file(dumps[dk])).first;
    const std::string fp = codebook_fingerprint(r, m, h->second, o.ckpt->content_hash());
    const ReuseDecision d = decide_reuse(path, fp, o.force, [](const std::string& p) {
      return read_codebooks(p).meta.fingerprint;
    });
    std::fprintf(stderr, "%s\n", d.message.c_str());
    if (d.reuse) continue;
    Recipe rc = r;
    rc.quant.keys = m.keys;
    rc.quant.values = m.values;
    rc.kmeans.weighting = m.weighting;
    rc.kmeans.exclude_anchors = m.exclude_anchors;
    rc.kmeans.gain = m.gain;
    rc.kmeans.rotate = m.rotate;
    rc.kmeans.metric = m.metric;
    rc.key_rope = m.key_rope;
    rc.anchor.ratio = m.ratio;
    TrainCodebooksOptions to;
    to.recipe = &rc;
    to.calib_path = dumps[dk];
    to.expected_config_hash = cfg.config_hash;
    to.make_trainer = o.make_trainer;
    to.trainer_name = o.trainer_name;
    to.version = ANTKV_VERSION;
    to.fingerprint = fp;
    to.progress = o.progress;
    const auto res = train_codebooks(to);
    AtomicFile f(path);
    write_codebooks(f.temp_path(), res.codebooks);
    AtomicFile report(path + ".report.json");  // both complete before either gets its final name
    report.write(train_report_json(res) + "\n");
    f.commit();
    report.commit();
  }
}

}  // namespace antkv
