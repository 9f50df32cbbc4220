// The BPE model: vocabulary and merges from model (tokenizer.json), lookup keys (raw bytes for
// byte-level BPE), byte fallback and unk handling, and the merge loop.
//
// BPE merging uses the same algorithm as the tokenizers crate (Word::merge_all): a binary heap of
// candidate merges ordered by (rank, position) over a doubly linked list of symbols, O(n log n) per
// word, so a whole document as a single word (SentencePiece style without pre-tokenizer) is fine.
// Byte-level BPE works directly on the raw bytes: the GPT-2 byte-to-unicode mapping is a bijection,
// so the vocabulary is re-keyed by raw bytes at load time and the input is never re-encoded.
#include <algorithm>
#include <cstdio>

#include "tokenizer/tokenizer_impl.h"

namespace antkv {

using namespace tok;  // the stage types of tokenizer_impl.h

namespace tok {
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}
}  // namespace tok

void Tokenizer::Impl::load_model(const json& m) {
  const std::string type = jstr(m, "type");
  if (type.empty()) {
    if (!m.contains("merges"))
      fail("{}: unsupported model: no \"type\" and no \"merges\" (only BPE is supported)", src);
  } else if (type != "BPE") {
    fail("{}: unsupported model type \"{}\" (only BPE is supported)", src, type);
  }
  auto vit = m.find("vocab");
  if (vit == m.end() || !vit->is_object()) fail("{}: model.vocab missing or not an object", src);
  auto mit = m.find("merges");
  if (mit == m.end() || !mit->is_array()) fail("{}: model.merges missing or not an array", src);
  if (auto d = m.find("dropout"); d != m.end() && !d->is_null() && d->get<double>() > 0.0)
    fail("{}: unsupported model.dropout {} (only null/0)", src, d->get<double>());
  if (!jstr(m, "continuing_subword_prefix").empty())
    fail("{}: unsupported model.continuing_subword_prefix", src);
  if (!jstr(m, "end_of_word_suffix").empty()) fail("{}: unsupported model.end_of_word_suffix", src);
  fuse_unk = jbool(m, "fuse_unk", false);
  byte_fallback = jbool(m, "byte_fallback", false);
  ignore_merges = jbool(m, "ignore_merges", false);

  int64_t max_id = -1;
  for (auto it = vit->begin(); it != vit->end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() > (1 << 30))
      fail("{}: model.vocab[\"{}\"] is not a valid id", src, it.key());
    max_id = std::max(max_id, it.value().get<int64_t>());
  }
  if (max_id < 0) fail("{}: model.vocab is empty", src);
  id_to_tok.assign(static_cast<size_t>(max_id + 1), std::string());
  has_tok.assign(static_cast<size_t>(max_id + 1), false);
  for (auto it = vit->begin(); it != vit->end(); ++it) {
    const auto id = static_cast<size_t>(it.value().get<int64_t>());
    id_to_tok[id] = it.key();
    has_tok[id] = true;
  }
  tok_to_id.reserve(id_to_tok.size() * 2);
  for (size_t id = 0; id < id_to_tok.size(); ++id)
    if (has_tok[id]) tok_to_id.emplace(id_to_tok[id], static_cast<int32_t>(id));

  if (auto u = m.find("unk_token"); u != m.end() && !u->is_null()) {
    unk_id = lookup_token(u->get<std::string>());
    if (unk_id < 0) fail("{}: model.unk_token \"{}\" is not in the vocab", src, u->get<std::string>());
  }

  merges.init(mit->size());
  int32_t rank = 0;
  std::string a, b;
  for (const auto& e : *mit) {
    if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else if (e.is_string()) {
      const std::string& s = e.get_ref<const std::string&>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        fail("{}: model.merges[{}] \"{}\" is not two tokens separated by one space", src, rank, s);
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else {
      fail("{}: model.merges[{}] is neither [\"a\", \"b\"] nor \"a b\"", src, rank);
    }
    const int32_t ia = lookup_token(a), ib = lookup_token(b), inew = lookup_token(a + b);
    if (ia < 0 || ib < 0 || inew < 0)
      fail("{}: model.merges[{}] (\"{}\" \"{}\") uses a token missing from the vocab", src, rank, a, b);
    merges.insert(ia, ib, MergeVal{rank, inew});
    merge_list.push_back({ia, ib, inew});
    ++rank;
  }
}

// Lookup keys for the model (raw bytes in byte-level mode), single-byte ids and byte-fallback ids.
void Tokenizer::Impl::build_model_keys() {
  const ByteMap& bm = byte_map();
  byte_id.fill(-1);
  std::string raw;
  for (size_t id = 0; id < id_to_tok.size(); ++id) {
    if (!has_tok[id]) continue;
    const std::string& tok = id_to_tok[id];
    std::string_view key;
    if (byte_level) {
      if (!bm.to_bytes(tok, &raw)) continue;  // unreachable from byte-level text
      key_store.push_back(raw);
      key = key_store.back();
    } else {
      key = tok;
    }
    key_to_id.emplace(key, static_cast<int32_t>(id));
    if (key.size() == 1) byte_id[static_cast<unsigned char>(key[0])] = static_cast<int32_t>(id);
  }
  if (!byte_level) {
    for (int b = 0x80; b < 256; ++b) byte_id[b] = -1;  // only ASCII chars are single bytes
  }
  for (int b = 0; b < 256; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    fallback_id[b] = lookup_token(buf);
  }
  if (!byte_level) find_cut_chars();
}

// A character c is a cut character when it is a vocab token, no merge involves the unk or byte
// fallback tokens (whose strings differ from their text), and in every merged token each c after the
// first character follows another c. Then no symbol ever spans "x c" with x != c, so a word can be
// cut before such a c and the parts merged independently with the same result.
void Tokenizer::Impl::find_cut_chars() {
  std::vector<bool> special(id_to_tok.size(), false);
  if (unk_id >= 0) special[unk_id] = true;
  for (int32_t f : fallback_id)
    if (f >= 0) special[f] = true;
  for (const auto& mg : merge_list)
    if (special[mg[0]] || special[mg[1]]) return;
  for (const std::string& c : {std::string("\xE2\x96\x81"), std::string(" ")}) {
    if (key_to_id.find(c) == key_to_id.end()) continue;
    bool safe = true;
    for (size_t k = 0; k < merge_list.size() && safe; ++k) {
      const std::string& t = id_to_tok[merge_list[k][2]];
      for (size_t pos = t.find(c, 1); pos != std::string::npos && safe; pos = t.find(c, pos + 1))
        safe = pos >= c.size() && t.compare(pos - c.size(), c.size(), c) == 0;
    }
    if (safe) cut_chars.push_back(c);
  }
}

// One word through the BPE model (tokenizers' BPE::merge_word + Word::merge_all).
void Tokenizer::Impl::bpe_word(std::string_view w, std::vector<int32_t>& out) const {
  struct Sym {
    int32_t id, prev, next, len;
  };
  struct Cand {
    int32_t rank, pos, new_id;
  };
  thread_local std::vector<Sym> syms;
  thread_local std::vector<Cand> heap;
  syms.clear();
  heap.clear();

  auto add = [&](int32_t id, int32_t len) {
    const int32_t n = static_cast<int32_t>(syms.size());
    syms.push_back({id, n - 1, -1, len});
    if (n > 0) syms[n - 1].next = n;
  };
  // Unknown characters: byte fallback, else the unk token (fused if asked), else dropped.
  int32_t unk_len = 0;  // pending unk, 0 = none
  auto unknown = [&](std::string_view s) {
    if (byte_fallback) {
      bool ok = true;
      for (char c : s) ok = ok && fallback_id[static_cast<unsigned char>(c)] >= 0;
      if (ok) {
        for (char c : s) add(fallback_id[static_cast<unsigned char>(c)], 1);
        return;
      }
    }
    if (unk_id >= 0) {
      if (unk_len > 0 && !fuse_unk) add(unk_id, unk_len), unk_len = 0;
      unk_len += static_cast<int32_t>(s.size());
    }
  };
  auto known = [&](int32_t id, int32_t len) {
    if (unk_len > 0) add(unk_id, unk_len), unk_len = 0;
    add(id, len);
  };

  if (byte_level) {
    const ByteMap& bm = byte_map();
    for (size_t i = 0; i < w.size(); ++i) {
      const auto c = static_cast<unsigned char>(w[i]);
      if (byte_id[c] >= 0) {
        known(byte_id[c], 1);
      } else {
        std::string ch;
        append_utf8(ch, bm.byte_to_cp[c]);
        unknown(ch);  // the tokenizers crate sees the mapped character here
      }
    }
  } else {
    for (size_t i = 0; i < w.size();) {
      const auto c = static_cast<unsigned char>(w[i]);
      if (c < 0x80) {
        if (byte_id[c] >= 0)
          known(byte_id[c], 1);
        else
          unknown(w.substr(i, 1));
        ++i;
        continue;
      }
      const size_t l = utf8_char_len(w, i);
      auto it = key_to_id.find(w.substr(i, l));
      if (it != key_to_id.end())
        known(it->second, static_cast<int32_t>(l));
      else
        unknown(w.substr(i, l));
      i += l;
    }
  }
  if (unk_len > 0) add(unk_id, unk_len);

  auto worse = [](const Cand& a, const Cand& b) {  // heap top = lowest rank, then leftmost
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  };
  const int32_t n = static_cast<int32_t>(syms.size());
  for (int32_t i = 0; i + 1 < n; ++i) {
    if (const MergeVal* m = merges.find(syms[i].id, syms[i + 1].id)) heap.push_back({m->rank, i, m->new_id});
  }
  std::make_heap(heap.begin(), heap.end(), worse);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), worse);
    const Cand top = heap.back();
    heap.pop_back();
    Sym& cur = syms[top.pos];
    if (cur.len == 0 || cur.next < 0) continue;
    const int32_t next_pos = cur.next;
    const Sym right = syms[next_pos];
    const MergeVal* m = merges.find(cur.id, right.id);
    if (!m || m->new_id != top.new_id) continue;  // stale entry
    cur.id = top.new_id;
    cur.len += right.len;
    cur.next = right.next;
    syms[next_pos].len = 0;
    if (right.next >= 0) syms[right.next].prev = top.pos;
    if (cur.prev >= 0) {
      if (const MergeVal* mp = merges.find(syms[cur.prev].id, cur.id)) {
        heap.push_back({mp->rank, cur.prev, mp->new_id});
        std::push_heap(heap.begin(), heap.end(), worse);
      }
    }
    if (cur.next >= 0) {
      if (const MergeVal* mn = merges.find(cur.id, syms[cur.next].id)) {
        heap.push_back({mn->rank, top.pos, mn->new_id});
        std::push_heap(heap.begin(), heap.end(), worse);
      }
    }
  }
  for (int32_t i = n > 0 ? 0 : -1; i >= 0; i = syms[i].next) out.push_back(syms[i].id);
}

void Tokenizer::Impl::encode_word(std::string_view w, std::vector<int32_t>& out) const {
  if (ignore_merges) {  // the whole pre-token is a token: no merging
    auto it = key_to_id.find(w);
    if (it != key_to_id.end()) {
      out.push_back(it->second);
      return;
    }
  }
  if (w.size() <= kCacheMaxWord || cut_chars.empty()) {
    bpe_cached(w, out);
    return;
  }
  // A long word (SentencePiece style: the whole text is one word) is cut before each cut character
  // that follows a different character; no merge crosses such a cut, so the result is the same as
  // merging the whole word, and the chunks are cached like pre-tokens.
  size_t start = 0;
  for (size_t i = 1; i < w.size(); ++i) {
    for (const auto& c : cut_chars) {
      if (w[i] == c[0] && w.compare(i, c.size(), c) == 0 &&
          (i < c.size() || w.compare(i - c.size(), c.size(), c) != 0)) {
        bpe_cached(w.substr(start, i - start), out);
        start = i;
        break;
      }
    }
  }
  bpe_cached(w.substr(start), out);
}

void Tokenizer::Impl::bpe_cached(std::string_view w, std::vector<int32_t>& out) const {
  if (w.size() > kCacheMaxWord) {
    bpe_word(w, out);
    return;
  }
  {
    std::lock_guard<std::mutex> lk(cache_mu);
    auto it = cache.find(w);
    if (it != cache.end()) {
      out.insert(out.end(), cache_ids.begin() + it->second.off,
                 cache_ids.begin() + it->second.off + it->second.len);
      return;
    }
  }
  const size_t before = out.size();
  bpe_word(w, out);
  std::lock_guard<std::mutex> lk(cache_mu);
  if (cache.size() >= kCacheMaxEntries || cache_ids.size() > (size_t{1} << 24)) {
    cache.clear();
    cache_keys.clear();
    cache_ids.clear();
  }
  if (cache.count(w)) return;
  cache_keys.emplace_back(w);
  const auto off = static_cast<uint32_t>(cache_ids.size());
  cache_ids.insert(cache_ids.end(), out.begin() + static_cast<std::ptrdiff_t>(before), out.end());
  cache.emplace(cache_keys.back(), CacheEntry{off, static_cast<uint32_t>(out.size() - before)});
}

}  // namespace antkv
