// The named model shapes: the config.json architecture of real 7-8B checkpoints, in one table. antkv-eval bench
// and max-context build random-weight models of them (--shape), and scripts/scale_run.py writes random-weight
// checkpoints of them, reading this table through `antkv-eval shapes --format json`.
#pragma once
#include <string>
#include <vector>

#include "model/model_config.h"

namespace antkv {

struct ModelShape {
  std::string name;              // the --shape name, e.g. "llama3-8b"
  std::string checkpoint;        // the checkpoint whose architecture it is, e.g. "LLaMA-3.1-8B"
  std::string tokenizer_family;  // "bytelevel" (byte-level BPE) or "sentencepiece" (SentencePiece BPE)
  std::string config_json;       // its config.json fields (architecture only: no token ids, no dtype)
  ModelConfig config() const;    // config_json parsed as a checkpoint's config.json
};

// Every shape, in a fixed order.
const std::vector<ModelShape>& model_shapes();
// "llama3-8b, llama2-7b, mistral-7b, qwen2-7b"
std::string model_shape_names();
// The shape called `name`; else an error naming `option` (e.g. "--shape") and the shapes there are.
const ModelShape& find_model_shape(const std::string& name, const std::string& option = "shape");
// The table as JSON text: [{"name", "checkpoint", "tokenizer_family", "config": {config.json fields}}, ...].
std::string model_shapes_json();
// The table as aligned text, one shape per line with a header.
std::string model_shapes_table();

}  // namespace antkv
