// Fingerprints of stage outputs (calibration dumps, codebooks): every input the output depends on, as
// readable "field=value" pairs (hashes for file contents), stored in the output's /meta. `antkv-eval run`
// reuses an output only when every field matches, and otherwise says which fields differ.
#pragma once
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace antkv {

// "antkv-fingerprint-2\nfield=value\n..." (fields in the given order; '\n' and '=' are not allowed in fields).
std::string make_fingerprint(const std::vector<std::pair<std::string, std::string>>& fields);
// "" when equal; else what differs, e.g. "model content (...) differs (4f2a.. in the file,
// 9c1e.. now)"; a fingerprint of an older antkv (not of this format) is described as such.
std::string fingerprint_difference(const std::string& stored, const std::string& wanted);

// The field of a dump's or codebook file's fingerprint that holds the content hash of the model it was made
// from (Checkpoint::content_hash(): config, every safetensors byte, tokenizer.json).
extern const char* const kModelContentField;
// The value of `field` in a fingerprint; "" when the fingerprint does not record it.
std::string fingerprint_field(const std::string& fingerprint, const std::string& field);
// Provenance: whether `file` (a calibration dump or codebook file whose /meta fingerprint is `stored`) was made from
// the weights of the checkpoint model_dir, whose content hash is model_hash. Used by every command that reads such
// a file (`run` through its fingerprints). When not, throws antkv::Error "<file>: made from other weights than
// <model_dir>: <what differs>"; with allow_other (--allow-other-weights) prints it to stderr as a warning instead.
void check_same_weights(const std::string& file, const std::string& stored, const std::string& model_hash,
                        const std::string& model_dir, bool allow_other);

struct ReuseDecision {
  bool reuse = false;
  std::string message;  // one line: "reusing X (...)" or "computing X: <why>"
};
// Whether the existing output `path` can be reused: it exists, reads (read_fingerprint throws antkv::Error
// otherwise), and its fingerprint equals `wanted`; force = never.
ReuseDecision decide_reuse(const std::string& path, const std::string& wanted, bool force,
                           const std::function<std::string(const std::string&)>& read_fingerprint);

}  // namespace antkv
