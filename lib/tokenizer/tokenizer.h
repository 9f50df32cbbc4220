// Tokenizer loaded from a Hugging Face tokenizer.json. Two families are supported:
//   - byte-level BPE with a regex pre-tokenizer (LLaMA-3, Qwen2 style; PCRE2 for the Unicode classes);
//   - SentencePiece-style BPE with byte fallback (LLaMA-2, Mistral style; "▁" for spaces).
// Added/special tokens are matched before the model runs; the post-processor (TemplateProcessing)
// decides whether BOS is prepended. Anything else in tokenizer.json is a clear antkv::Error.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace antkv {

class Tokenizer {
 public:
  // Throws antkv::Error naming the file and what is unsupported or malformed.
  static Tokenizer from_file(const std::string& tokenizer_json_path);
  static Tokenizer from_json_string(const std::string& json, const std::string& source_name);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // add_special = true applies the post-processor template (e.g. prepends BOS), as transformers'
  // tokenizer(text) does.
  std::vector<int32_t> encode(std::string_view text, bool add_special = true) const;
  // skip_special = true drops special tokens (BOS/EOS) from the text.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const;

  int32_t vocab_size() const;          // model vocab + added tokens (max id + 1)
  int32_t bos_id() const;              // -1 when the tokenizer has none
  int32_t eos_id() const;              // -1 when unknown
  int32_t token_to_id(std::string_view token) const;  // -1 when absent
  std::string id_to_token(int32_t id) const;          // "" when out of range

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace antkv
