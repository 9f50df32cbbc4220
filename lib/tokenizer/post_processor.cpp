// Post-processors: TemplateProcessing (which decides whether BOS is prepended), Roberta/Bert processing
// as a template, ByteLevel as a no-op.
#include "tokenizer/tokenizer_impl.h"

namespace antkv {

using namespace tok;  // the stage types of tokenizer_impl.h

void Tokenizer::Impl::load_post(const json& p) {
  const std::string type = jstr(p, "type");
  if (type == "Sequence") {
    for (const auto& s : p.at("processors")) load_post(s);
  } else if (type == "ByteLevel") {
    post.push_back({PostStep::NoOp, {}});
  } else if (type == "TemplateProcessing") {
    PostStep st{PostStep::Template, {}};
    const json& specials = p.contains("special_tokens") ? p["special_tokens"] : json::object();
    for (const auto& item : p.at("single")) {
      if (item.contains("Sequence")) {
        st.items.push_back({true, {}});
      } else if (item.contains("SpecialToken")) {
        const std::string name = item["SpecialToken"].at("id").get<std::string>();
        if (!specials.contains(name))
          fail("{}: post_processor template uses special token \"{}\" missing from special_tokens", src, name);
        std::vector<int32_t> ids;
        for (const auto& x : specials[name].at("ids")) ids.push_back(x.get<int32_t>());
        st.items.push_back({false, std::move(ids)});
      } else {
        fail("{}: unsupported post_processor template item {}", src, item.dump());
      }
    }
    post.push_back(std::move(st));
  } else if (type == "RobertaProcessing" || type == "BertProcessing") {
    PostStep st{PostStep::Template, {}};
    st.items.push_back({false, {p.at("cls").at(1).get<int32_t>()}});
    st.items.push_back({true, {}});
    st.items.push_back({false, {p.at("sep").at(1).get<int32_t>()}});
    post.push_back(std::move(st));
  } else {
    fail("{}: unsupported post_processor type \"{}\"", src, type);
  }
}

void Tokenizer::Impl::apply_post(std::vector<int32_t>& ids) const {
  for (const auto& st : post) {
    if (st.kind != PostStep::Template) continue;
    std::vector<int32_t> out;
    out.reserve(ids.size() + 4);
    for (const auto& item : st.items) {
      if (item.is_seq)
        out.insert(out.end(), ids.begin(), ids.end());
      else
        out.insert(out.end(), item.ids.begin(), item.ids.end());
    }
    ids.swap(out);
  }
}

}  // namespace antkv
