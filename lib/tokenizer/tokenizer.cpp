// Hugging Face tokenizer.json tokenizer (byte-level and SentencePiece-style BPE): encode and decode.
//
// Pipeline (mirrors the tokenizers crate):
//   added tokens (leftmost-longest) -> normalizer -> added tokens marked normalized -> pre-tokenizer
//   -> BPE model per pre-token -> post-processor.
// Decoding maps ids to token strings (added tokens first) and runs the decoder chain.
// Each stage lives in the file named for it (tokenizer_impl.h lists them).
#include "tokenizer/tokenizer.h"

#include <deque>

#include "tokenizer/tokenizer_impl.h"

namespace antkv {

using namespace tok;  // the stage types of tokenizer_impl.h

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::vector<int32_t> Tokenizer::encode(std::string_view input, bool add_special) const {
  const Impl& m = *impl_;
  std::string sanitized;
  std::string_view text = input;
  if (!is_valid_utf8(input)) {
    sanitized = utf8_lossy(input);
    text = sanitized;
  }
  std::vector<Segment> segs, segs2;
  split_on_added(text, true, m.match_raw, segs);
  std::deque<std::string> arena;
  if (!m.normalizer.empty()) {
    for (const auto& s : segs) {
      if (s.added_id >= 0) {
        segs2.push_back(s);
        continue;
      }
      arena.push_back(m.normalize(s.text));
      split_on_added(arena.back(), s.at_origin, m.match_norm, segs2);
    }
    segs.swap(segs2);
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 8);
  for (const auto& s : segs) {
    if (s.added_id >= 0)
      ids.push_back(s.added_id);
    else
      m.pre_tokenize_and_encode(Piece{s.text, s.at_origin}, ids);
  }
  if (add_special) m.apply_post(ids);
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  const Impl& m = *impl_;
  std::vector<std::string> toks;
  toks.reserve(ids.size());
  for (int32_t id : ids) {
    auto it = m.added_by_id.find(id);
    if (it != m.added_by_id.end()) {
      const AddedToken& t = m.added[it->second];
      if (skip_special && t.special) continue;
      toks.push_back(t.pattern);  // normalized tokens decode as their normalized content (as HF does)
      continue;
    }
    if (id < 0 || static_cast<size_t>(id) >= m.id_to_tok.size() || !m.has_tok[id]) continue;
    toks.push_back(m.id_to_tok[id]);
  }
  if (!m.has_decoder) {
    std::string out;
    for (size_t i = 0; i < toks.size(); ++i) {
      if (i) out += ' ';
      out += toks[i];
    }
    return out;
  }
  return m.run_decoders(std::move(toks));
}

int32_t Tokenizer::vocab_size() const { return impl_->vocab_n; }
int32_t Tokenizer::bos_id() const { return impl_->bos; }
int32_t Tokenizer::eos_id() const { return impl_->eos; }

int32_t Tokenizer::token_to_id(std::string_view token) const {
  auto it = impl_->added_by_content.find(std::string(token));
  if (it != impl_->added_by_content.end()) return it->second;
  return impl_->lookup_token(token);
}

std::string Tokenizer::id_to_token(int32_t id) const {
  auto it = impl_->added_by_id.find(id);
  if (it != impl_->added_by_id.end()) return impl_->added[it->second].content;
  if (id < 0 || static_cast<size_t>(id) >= impl_->id_to_tok.size() || !impl_->has_tok[id]) return "";
  return impl_->id_to_tok[id];
}

}  // namespace antkv
