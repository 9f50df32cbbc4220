// Reading tokenizer.json: the model, added tokens, normalizer, pre-tokenizer, decoder and post-processor
// sections in the order the tokenizers crate applies them, BOS/EOS, and the unsupported-feature errors.
#include <algorithm>
#include <fstream>
#include <sstream>

#include "tokenizer/tokenizer_impl.h"

namespace antkv {

using namespace tok;  // the stage types of tokenizer_impl.h

namespace tok {
std::string jstr(const json& j, const char* key, const std::string& def) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  return it->get<std::string>();
}
bool jbool(const json& j, const char* key, bool def) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  return it->get<bool>();
}
}  // namespace tok

void Tokenizer::Impl::load(const json& j) {
  if (!j.is_object()) fail("{}: tokenizer.json must be a JSON object", src);
  auto mit = j.find("model");
  if (mit == j.end() || !mit->is_object()) fail("{}: missing \"model\" object", src);
  load_model(*mit);
  if (auto it = j.find("added_tokens"); it != j.end() && !it->is_null()) load_added(*it);
  if (auto it = j.find("normalizer"); it != j.end() && !it->is_null()) load_normalizer(*it);
  // Normalized added tokens are matched against normalized text, with normalized content.
  for (auto& t : added) t.pattern = t.normalized && !normalizer.empty() ? normalize(t.content) : t.content;
  for (const auto& t : added) {
    if (t.normalized && !normalizer.empty())
      match_norm.add(&t);
    else
      match_raw.add(&t);
  }
  if (auto it = j.find("pre_tokenizer"); it != j.end() && !it->is_null()) load_pre(*it, true);
  for (size_t i = 0; i < pre.size(); ++i) {
    if (pre[i].kind == PreStep::ByteLevel) {
      byte_level = true;
      if (i + 1 != pre.size())
        fail("{}: unsupported pre_tokenizer: steps after ByteLevel in a Sequence", src);
    }
  }
  if (auto it = j.find("decoder"); it != j.end() && !it->is_null()) {
    has_decoder = true;
    load_decoder(*it);
  }
  if (auto it = j.find("post_processor"); it != j.end() && !it->is_null()) load_post(*it);

  build_model_keys();
  merge_list.clear();
  merge_list.shrink_to_fit();

  // BOS from the post-processor template; EOS by convention.
  for (const auto& p : post) {
    if (p.kind != PostStep::Template) continue;
    for (const auto& item : p.items) {
      if (item.is_seq) break;
      if (!item.ids.empty() && bos < 0) bos = item.ids[0];
    }
  }
  for (const char* name : {"</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>"}) {
    auto it = added_by_content.find(name);
    int32_t id = it != added_by_content.end() ? it->second : lookup_token(name);
    if (id >= 0) {
      eos = id;
      break;
    }
  }
  vocab_n = static_cast<int32_t>(id_to_tok.size());
  for (const auto& t : added) vocab_n = std::max(vocab_n, t.id + 1);
}

Tokenizer Tokenizer::from_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("{}: cannot open tokenizer file", path);
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) fail("{}: cannot read tokenizer file", path);
  return from_json_string(ss.str(), path);
}

Tokenizer Tokenizer::from_json_string(const std::string& text, const std::string& source_name) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    std::string msg = e.what();
    std::replace(msg.begin(), msg.end(), '\n', ' ');
    fail("{}: invalid JSON: {}", source_name, msg);
  }
  auto impl = std::make_unique<Impl>();
  impl->src = source_name;
  try {
    impl->load(j);
  } catch (const json::exception& e) {
    std::string msg = e.what();
    std::replace(msg.begin(), msg.end(), '\n', ' ');
    fail("{}: malformed tokenizer.json: {}", source_name, msg);
  }
  return Tokenizer(std::move(impl));
}

}  // namespace antkv
