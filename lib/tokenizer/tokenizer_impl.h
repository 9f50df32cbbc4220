// Internals of antkv::Tokenizer shared by its stage files (not a public header):
//   tokenizer_json.cpp   reading tokenizer.json: the order of the stages, BOS/EOS, from_file/from_json_string
//   added_tokens.cpp     added/special tokens: loading and splitting the text on them (leftmost-longest)
//   normalizers.cpp      Prepend, Replace, NFC/NFD (utf8proc)
//   pre_tokenizers.cpp   Split, ByteLevel (GPT-2 regex), Metaspace
//   bpe_model.cpp        the BPE model: vocabulary, merges, byte fallback, the merge loop and its cache
//   decoders.cpp         ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace decoders
//   post_processor.cpp   TemplateProcessing (BOS), Roberta/Bert processing
//   tokenizer.cpp        encode/decode: the pipeline over those stages
#pragma once
#include <xxhash.h>

#include <array>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/error.h"
#include "tokenizer/regex.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/utf8.h"

namespace antkv::tok {

using json = nlohmann::json;

struct SvHash {
  size_t operator()(std::string_view s) const noexcept { return XXH3_64bits(s.data(), s.size()); }
};

// ------------------------------------------------------------------------------------------------
// GPT-2 byte <-> unicode mapping.

struct ByteMap {
  std::array<uint32_t, 256> byte_to_cp{};
  std::array<int16_t, 324> cp_to_byte{};  // all mapped code points are < 324
  ByteMap() {
    cp_to_byte.fill(-1);
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      byte_to_cp[b] = keep ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
      cp_to_byte[byte_to_cp[b]] = static_cast<int16_t>(b);
    }
  }
  // Raw bytes of a byte-level token; false when a character is outside the mapping.
  bool to_bytes(std::string_view tok, std::string* out) const {
    out->clear();
    for (size_t i = 0; i < tok.size();) {
      uint32_t cp;
      i += decode_utf8(tok, i, &cp);
      if (cp >= cp_to_byte.size() || cp_to_byte[cp] < 0) return false;
      out->push_back(static_cast<char>(cp_to_byte[cp]));
    }
    return true;
  }
};

const ByteMap& byte_map();

// ------------------------------------------------------------------------------------------------
// Merge table: (left id, right id) -> (rank, merged id). Open addressing, linear probing.

struct MergeVal {
  int32_t rank;
  int32_t new_id;
};

class PairMap {
 public:
  void init(size_t n) {
    size_t cap = 16;
    while (cap < n * 2 + 2) cap <<= 1;
    keys_.assign(cap, kEmpty);
    vals_.assign(cap, MergeVal{0, 0});
    mask_ = cap - 1;
    shift_ = 64 - __builtin_ctzll(cap);
  }
  // Keeps the first insertion of a key (lowest rank), as the tokenizers crate does.
  void insert(int32_t a, int32_t b, MergeVal v) {
    const uint64_t k = key(a, b);
    size_t i = slot(k);
    while (keys_[i] != kEmpty) {
      if (keys_[i] == k) return;
      i = (i + 1) & mask_;
    }
    keys_[i] = k;
    vals_[i] = v;
  }
  const MergeVal* find(int32_t a, int32_t b) const {
    if (keys_.empty()) return nullptr;
    const uint64_t k = key(a, b);
    size_t i = slot(k);
    while (true) {
      const uint64_t kk = keys_[i];
      if (kk == k) return &vals_[i];
      if (kk == kEmpty) return nullptr;
      i = (i + 1) & mask_;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~0ull;
  static uint64_t key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  size_t slot(uint64_t k) const { return static_cast<size_t>((k * 0x9E3779B97F4A7C15ull) >> shift_); }
  std::vector<uint64_t> keys_;
  std::vector<MergeVal> vals_;
  size_t mask_ = 0;
  int shift_ = 60;
};

// ------------------------------------------------------------------------------------------------
// Pipeline pieces.

struct Piece {
  std::string_view text;
  bool at_origin;  // starts at offset 0 of the original input (Metaspace prepend_scheme "first")
};

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

struct SplitPattern {
  std::string literal;           // when !regex
  std::unique_ptr<Regex> regex;  // when set
  template <class F>
  void for_each_match(std::string_view s, F&& f) const {
    if (regex) {
      regex->for_each_match(s, f);
      return;
    }
    if (literal.empty()) return;
    size_t pos = 0;
    while ((pos = s.find(literal, pos)) != std::string_view::npos) {
      f(pos, pos + literal.size());
      pos += literal.size();
    }
  }
};

struct NormStep {
  enum Kind { Prepend, Replace, NFC, NFD } kind;
  std::string a;  // Prepend: the prefix; Replace: the literal pattern
  std::string b;  // Replace: the content
  std::unique_ptr<Regex> regex;
};

enum class PrependScheme { Always, First, Never };

struct PreStep {
  enum Kind { Split, ByteLevel, Metaspace } kind;
  SplitPattern pattern;
  SplitBehavior behavior = SplitBehavior::Isolated;
  bool invert = false;
  bool add_prefix_space = false;  // ByteLevel
  bool use_regex = false;         // ByteLevel
  std::string replacement;        // Metaspace
  PrependScheme scheme = PrependScheme::Always;
  bool split = true;
};

struct DecStep {
  enum Kind { ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace } kind;
  std::string a, b;  // Replace: pattern, content; Strip: content; Metaspace: replacement
  std::unique_ptr<Regex> regex;
  size_t start = 0, stop = 0;  // Strip
  bool prepend = true;         // Metaspace: strip the leading space of the first token
};

struct PostStep {
  enum Kind { Template, NoOp } kind;
  // Template: each item is either the sequence (is_seq) or a special token's ids.
  struct Item {
    bool is_seq;
    std::vector<int32_t> ids;
  };
  std::vector<Item> items;
};

struct AddedToken {
  int32_t id;
  std::string content;  // the token's text
  std::string pattern;  // what is matched (the normalized content for normalized tokens)
  bool single_word, lstrip, rstrip, normalized, special;
};

// Leftmost-longest matcher over a small set of literal strings.
class AddedMatcher {
 public:
  void add(const AddedToken* t) {
    if (t->pattern.empty()) return;
    auto& v = by_first_[static_cast<unsigned char>(t->pattern[0])];
    v.push_back(t);
    std::stable_sort(v.begin(), v.end(), [](const AddedToken* x, const AddedToken* y) {
      return x->pattern.size() > y->pattern.size();
    });
    any_ = true;
  }
  bool empty() const { return !any_; }
  // Finds the leftmost-longest match at or after pos; returns the token or nullptr.
  const AddedToken* find(std::string_view s, size_t pos, size_t* where) const {
    for (size_t i = pos; i < s.size(); ++i) {
      const auto& v = by_first_[static_cast<unsigned char>(s[i])];
      if (v.empty()) continue;
      for (const AddedToken* t : v) {
        if (s.compare(i, t->pattern.size(), t->pattern) == 0) {
          *where = i;
          return t;
        }
      }
    }
    return nullptr;
  }

 private:
  std::array<std::vector<const AddedToken*>, 256> by_first_;
  bool any_ = false;
};

struct Segment {
  int32_t added_id;  // >= 0: an added token
  std::string_view text;
  bool at_origin;
};

// Splits text on added tokens (tokenizers' AddedVocabulary::split_with_indices).
void split_on_added(std::string_view text, bool at_origin, const AddedMatcher& m, std::vector<Segment>& out);

// tokenizer.json field access with defaults (a missing or null field gives the default).
std::string jstr(const json& j, const char* key, const std::string& def = "");
bool jbool(const json& j, const char* key, bool def);

}  // namespace antkv::tok

namespace antkv {

struct Tokenizer::Impl {
  std::string src;  // file name for messages

  // Model vocabulary.
  std::vector<std::string> id_to_tok;  // model tokens (index = id); "" for gaps
  std::vector<bool> has_tok;
  std::unordered_map<std::string_view, int32_t, tok::SvHash> tok_to_id;  // keys point into id_to_tok
  // Lookup keys used by the BPE model: raw bytes for byte-level, token strings otherwise.
  std::deque<std::string> key_store;
  std::unordered_map<std::string_view, int32_t, tok::SvHash> key_to_id;
  std::array<int32_t, 256> byte_id{};      // byte-level: id of each single byte; else ASCII chars
  std::array<int32_t, 256> fallback_id{};  // id of "<0xNN>" or -1
  tok::PairMap merges;
  int32_t unk_id = -1;
  bool fuse_unk = false, byte_fallback = false, ignore_merges = false;
  bool byte_level = false;

  // Added tokens.
  std::vector<tok::AddedToken> added;
  std::unordered_map<int32_t, size_t> added_by_id;
  std::unordered_map<std::string, int32_t> added_by_content;
  tok::AddedMatcher match_raw, match_norm;

  std::vector<tok::NormStep> normalizer;
  std::vector<tok::PreStep> pre;
  std::vector<tok::DecStep> decoder;
  bool has_decoder = false;
  std::vector<tok::PostStep> post;

  int32_t bos = -1, eos = -1, vocab_n = 0;

  // Per-word result cache (pre-tokens repeat a lot).
  static constexpr size_t kCacheMaxWord = 64, kCacheMaxEntries = 1 << 18;
  struct CacheEntry {
    uint32_t off, len;  // into cache_ids
  };
  mutable std::mutex cache_mu;
  mutable std::unordered_map<std::string_view, CacheEntry, tok::SvHash> cache;  // keys in cache_keys
  mutable std::deque<std::string> cache_keys;
  mutable std::vector<int32_t> cache_ids;
  // Characters before which BPE never merges (see find_cut_chars); long words are cut there.
  std::vector<std::string> cut_chars;

  void load(const tok::json& j);
  void load_model(const tok::json& m);
  void load_added(const tok::json& a);
  void load_normalizer(const tok::json& n);
  void load_pre(const tok::json& p, bool top);
  void load_decoder(const tok::json& d);
  void load_post(const tok::json& p);

  void build_model_keys();  // bpe_model.cpp

  std::string normalize(std::string_view s) const;
  // Pre-tokenizes one piece and runs the BPE model on each pre-token, appending the ids.
  void pre_tokenize_and_encode(const tok::Piece& p, std::vector<int32_t>& ids) const;
  template <class Sink>
  void run_pre(size_t k, const tok::Piece& p, Sink& sink) const;  // pre_tokenizers.cpp only
  std::string run_decoders(std::vector<std::string> toks) const;
  void apply_post(std::vector<int32_t>& ids) const;
  void bpe_word(std::string_view w, std::vector<int32_t>& out) const;
  void encode_word(std::string_view w, std::vector<int32_t>& out) const;
  void bpe_cached(std::string_view w, std::vector<int32_t>& out) const;
  void find_cut_chars();
  std::vector<std::array<int32_t, 3>> merge_list;  // (a, b, merged), only used while loading
  int32_t lookup_token(std::string_view tok) const {
    auto it = tok_to_id.find(tok);
    return it == tok_to_id.end() ? -1 : it->second;
  }
};

}  // namespace antkv
