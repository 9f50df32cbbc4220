// Pre-tokenizers: Split (literal or regex, the five split behaviors, invert), ByteLevel (the GPT-2 regex,
// add_prefix_space) and Metaspace (spaces -> "▁", prepend scheme, split). Each step cuts the pieces of
// the previous one; the final pieces go to the BPE model one by one.
#include "tokenizer/tokenizer_impl.h"

namespace antkv {

using namespace tok;  // the stage types of tokenizer_impl.h
namespace {

const char* kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

// The tokenizers crate's NormalizedString::split, streamed: the pattern's matches cut the piece into
// spans (match / non-match), which are folded per behavior and handed to emit(piece) in order.
template <class Emit>
void split_piece(const Piece& p, const SplitPattern& pat, SplitBehavior behavior, bool invert, Emit&& emit) {
  const std::string_view s = p.text;
  struct Pending {
    size_t b, e;
    bool match, set;
  } pend{0, 0, false, false};
  auto out = [&](size_t b, size_t e) {
    if (e > b) emit(Piece{s.substr(b, e - b), p.at_origin && b == 0});
  };
  auto span = [&](size_t b, size_t e, bool match) {
    if (invert) match = !match;
    switch (behavior) {
      case SplitBehavior::Isolated:
        out(b, e);
        break;
      case SplitBehavior::Removed:
        if (!match) out(b, e);
        break;
      case SplitBehavior::MergedWithPrevious:  // a match joins the non-match before it
        if (match && pend.set && !pend.match) {
          pend.e = e;
          pend.match = true;
        } else {
          if (pend.set) out(pend.b, pend.e);
          pend = {b, e, match, true};
        }
        break;
      case SplitBehavior::MergedWithNext:  // a match joins the non-match after it
        if (!match && pend.set && pend.match) {
          out(pend.b, e);
          pend.set = false;
        } else {
          if (pend.set) out(pend.b, pend.e);
          if (match)
            pend = {b, e, true, true};
          else
            out(b, e), pend.set = false;
        }
        break;
      case SplitBehavior::Contiguous:  // runs of the same kind join
        if (pend.set && pend.match == match) {
          pend.e = e;
        } else {
          if (pend.set) out(pend.b, pend.e);
          pend = {b, e, match, true};
        }
        break;
    }
  };
  size_t prev = 0;
  pat.for_each_match(s, [&](size_t b, size_t e) {
    if (b > prev) span(prev, b, false);
    span(b, e, true);
    prev = e;
  });
  if (prev < s.size()) span(prev, s.size(), false);
  if (pend.set) out(pend.b, pend.e);
}

}  // namespace

void Tokenizer::Impl::load_pre(const json& p, bool top) {
  const std::string type = jstr(p, "type");
  if (type == "Sequence") {
    if (!top) fail("{}: unsupported nested pre_tokenizer Sequence", src);
    for (const auto& s : p.at("pretokenizers")) load_pre(s, false);
  } else if (type == "Split") {
    PreStep st;
    st.kind = PreStep::Split;
    const json& pat = p.at("pattern");
    if (pat.contains("Regex")) {
      st.pattern.regex = std::make_unique<Regex>(pat["Regex"].get<std::string>(), src);
    } else if (pat.contains("String")) {
      st.pattern.literal = pat["String"].get<std::string>();
    } else {
      fail("{}: pre_tokenizer Split without String/Regex pattern", src);
    }
    const std::string b = jstr(p, "behavior", "Isolated");
    if (b == "Isolated") st.behavior = SplitBehavior::Isolated;
    else if (b == "Removed") st.behavior = SplitBehavior::Removed;
    else if (b == "MergedWithPrevious") st.behavior = SplitBehavior::MergedWithPrevious;
    else if (b == "MergedWithNext") st.behavior = SplitBehavior::MergedWithNext;
    else if (b == "Contiguous") st.behavior = SplitBehavior::Contiguous;
    else fail("{}: unsupported Split behavior \"{}\"", src, b);
    st.invert = jbool(p, "invert", false);
    pre.push_back(std::move(st));
  } else if (type == "ByteLevel") {
    PreStep st;
    st.kind = PreStep::ByteLevel;
    st.add_prefix_space = jbool(p, "add_prefix_space", true);
    st.use_regex = jbool(p, "use_regex", true);
    if (st.use_regex) st.pattern.regex = std::make_unique<Regex>(kGpt2Pattern, src);
    pre.push_back(std::move(st));
  } else if (type == "Metaspace") {
    PreStep st;
    st.kind = PreStep::Metaspace;
    st.replacement = jstr(p, "replacement", "\xE2\x96\x81");
    if (st.replacement.empty() || utf8_char_len(st.replacement, 0) != st.replacement.size())
      fail("{}: Metaspace replacement must be one character", src);
    const std::string scheme = jstr(p, "prepend_scheme");
    if (scheme.empty()) st.scheme = jbool(p, "add_prefix_space", true) ? PrependScheme::Always : PrependScheme::Never;
    else if (scheme == "always") st.scheme = PrependScheme::Always;
    else if (scheme == "first") st.scheme = PrependScheme::First;
    else if (scheme == "never") st.scheme = PrependScheme::Never;
    else fail("{}: unsupported Metaspace prepend_scheme \"{}\"", src, scheme);
    st.split = jbool(p, "split", true);
    st.pattern.literal = st.replacement;
    pre.push_back(std::move(st));
  } else {
    fail("{}: unsupported pre_tokenizer type \"{}\"", src, type);
  }
}

// Runs pre-tokenizer steps k.. on one piece, depth first, handing the final pieces to sink.
template <class Sink>
void Tokenizer::Impl::run_pre(size_t k, const Piece& p, Sink& sink) const {
  if (p.text.empty()) return;
  if (k == pre.size()) {
    sink(p);
    return;
  }
  const PreStep& st = pre[k];
  auto next = [&](const Piece& q) { run_pre(k + 1, q, sink); };
  switch (st.kind) {
    case PreStep::Split:
      split_piece(p, st.pattern, st.behavior, st.invert, next);
      break;
    case PreStep::ByteLevel: {
      std::string tmp;
      Piece q = p;
      if (st.add_prefix_space && q.text[0] != ' ') {
        tmp.reserve(q.text.size() + 1);
        tmp += ' ';
        tmp += q.text;
        q.text = tmp;
      }
      if (st.use_regex)
        split_piece(q, st.pattern, SplitBehavior::Isolated, false, next);
      else
        next(q);
      break;
    }
    case PreStep::Metaspace: {
      std::string s;
      s.reserve(p.text.size() + 8);
      for (char c : p.text) {
        if (c == ' ')
          s += st.replacement;
        else
          s += c;
      }
      const bool prepend =
          st.scheme == PrependScheme::Always || (st.scheme == PrependScheme::First && p.at_origin);
      if (prepend && s.compare(0, st.replacement.size(), st.replacement) != 0) s.insert(0, st.replacement);
      const Piece q{s, p.at_origin};
      if (st.split)
        split_piece(q, st.pattern, SplitBehavior::MergedWithNext, false, next);
      else
        next(q);
      break;
    }
  }
}

void Tokenizer::Impl::pre_tokenize_and_encode(const Piece& p, std::vector<int32_t>& ids) const {
  auto sink = [&](const Piece& q) { encode_word(q.text, ids); };
  run_pre(0, p, sink);
}

}  // namespace antkv
