// Per-thread PCRE2 match resources (see regex.h).
#include "tokenizer/regex.h"

namespace antkv::tok {

MatchResources::MatchResources() {
  md = pcre2_match_data_create(1, nullptr);
  ctx = pcre2_match_context_create(nullptr);
  stack = pcre2_jit_stack_create(32 * 1024, 16 * 1024 * 1024, nullptr);
  if (ctx && stack) pcre2_jit_stack_assign(ctx, nullptr, stack);
}

MatchResources::~MatchResources() {
  if (md) pcre2_match_data_free(md);
  if (ctx) pcre2_match_context_free(ctx);
  if (stack) pcre2_jit_stack_free(stack);
}

MatchResources& match_resources() {
  thread_local MatchResources r;
  if (!r.md || !r.ctx) throw Error("tokenizer: out of memory creating PCRE2 match data");
  return r;
}

}  // namespace antkv::tok
