// Decoders: the chain that turns token strings back into text (ByteLevel, Replace, ByteFallback, Fuse,
// Strip, Metaspace), as the tokenizers crate runs it.
#include <cctype>

#include "tokenizer/tokenizer_impl.h"

namespace antkv {

using namespace tok;  // the stage types of tokenizer_impl.h

void Tokenizer::Impl::load_decoder(const json& d) {
  const std::string type = jstr(d, "type");
  DecStep st;
  if (type == "Sequence") {
    for (const auto& s : d.at("decoders")) load_decoder(s);
    return;
  } else if (type == "ByteLevel") {
    st.kind = DecStep::ByteLevel;
  } else if (type == "Replace") {
    st.kind = DecStep::Replace;
    st.b = jstr(d, "content");
    const json& pat = d.at("pattern");
    if (pat.contains("String")) st.a = pat["String"].get<std::string>();
    else if (pat.contains("Regex")) st.regex = std::make_unique<Regex>(pat["Regex"].get<std::string>(), src);
    else fail("{}: decoder Replace without String/Regex pattern", src);
  } else if (type == "ByteFallback") {
    st.kind = DecStep::ByteFallback;
  } else if (type == "Fuse") {
    st.kind = DecStep::Fuse;
  } else if (type == "Strip") {
    st.kind = DecStep::Strip;
    st.a = jstr(d, "content", " ");
    st.start = d.value("start", size_t{0});
    st.stop = d.value("stop", size_t{0});
  } else if (type == "Metaspace") {
    st.kind = DecStep::Metaspace;
    st.a = jstr(d, "replacement", "\xE2\x96\x81");
    const std::string scheme = jstr(d, "prepend_scheme");
    st.prepend = scheme.empty() ? jbool(d, "add_prefix_space", true) : scheme != "never";
  } else {
    fail("{}: unsupported decoder type \"{}\"", src, type);
  }
  decoder.push_back(std::move(st));
}

std::string Tokenizer::Impl::run_decoders(std::vector<std::string> toks) const {
  const ByteMap& bm = byte_map();
  std::vector<std::string> next;
  for (const auto& st : decoder) {
    next.clear();
    switch (st.kind) {
      case DecStep::ByteLevel: {
        std::string bytes, raw;
        for (const auto& t : toks) {
          if (bm.to_bytes(t, &raw))
            bytes += raw;
          else
            bytes += t;
        }
        next.push_back(utf8_lossy(bytes));
        break;
      }
      case DecStep::Replace:
        for (const auto& t : toks) {
          std::string o;
          size_t prev = 0;
          auto repl = [&](size_t b, size_t e) {
            o.append(t, prev, b - prev);
            o += st.b;
            prev = e;
          };
          if (st.regex) {
            st.regex->for_each_match(t, repl);
          } else if (!st.a.empty()) {
            size_t pos;
            while ((pos = t.find(st.a, prev)) != std::string::npos) repl(pos, pos + st.a.size());
          }
          o.append(t, prev, std::string::npos);
          next.push_back(std::move(o));
        }
        break;
      case DecStep::ByteFallback: {
        std::string pending;
        auto flush = [&] {
          if (pending.empty()) return;
          if (is_valid_utf8(pending)) {
            next.push_back(pending);
          } else {
            for (size_t i = 0; i < pending.size(); ++i) next.push_back("\xEF\xBF\xBD");
          }
          pending.clear();
        };
        for (const auto& t : toks) {
          if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' && std::isxdigit(static_cast<unsigned char>(t[3])) &&
              std::isxdigit(static_cast<unsigned char>(t[4]))) {
            pending.push_back(static_cast<char>(std::stoi(t.substr(3, 2), nullptr, 16)));
          } else {
            flush();
            next.push_back(t);
          }
        }
        flush();
        break;
      }
      case DecStep::Fuse: {
        std::string all;
        for (const auto& t : toks) all += t;
        next.push_back(std::move(all));
        break;
      }
      case DecStep::Strip:
        for (const auto& t : toks) {
          size_t b = 0, e = t.size();
          for (size_t k = 0; k < st.start && b < e && t.compare(b, st.a.size(), st.a) == 0; ++k) b += st.a.size();
          for (size_t k = 0; k < st.stop && e >= b + st.a.size() && t.compare(e - st.a.size(), st.a.size(), st.a) == 0; ++k)
            e -= st.a.size();
          next.push_back(t.substr(b, e - b));
        }
        break;
      case DecStep::Metaspace:
        for (size_t i = 0; i < toks.size(); ++i) {
          std::string o;
          const std::string& t = toks[i];
          size_t prev = 0, pos;
          while ((pos = t.find(st.a, prev)) != std::string::npos) {
            o.append(t, prev, pos - prev);
            o += ' ';
            prev = pos + st.a.size();
          }
          o.append(t, prev, std::string::npos);
          if (i == 0 && st.prepend && !o.empty() && o[0] == ' ') o.erase(0, 1);
          next.push_back(std::move(o));
        }
        break;
    }
    toks.swap(next);
  }
  std::string out;
  for (const auto& t : toks) out += t;
  return out;
}

}  // namespace antkv
