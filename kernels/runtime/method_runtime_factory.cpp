#include "kernels/runtime/method_runtime_factory.h"

#include <fmt/format.h>

#include <memory>
#include <utility>

#include "core/error.h"
#include "kernels/quant/compressed_cache.h"
#include "kernels/quant/simulated_quantizer.h"
#include "kernels/quant/uniform_cache.h"
#include "model/checkpoint.h"

namespace antkv {

MethodRuntimeFactory gpu_method_runtime_factory(const Checkpoint& ckpt, const GpuRuntimeOptions& opt, bool real_cache) {
  return [&ckpt, opt, real_cache](const MethodSpec& m, std::shared_ptr<const CodebookSet> cb) -> std::unique_ptr<Runtime> {
    GpuRuntimeOptions o = opt;
    o.compressed_kv = real_cache && m.needs_codebooks();
    o.uniform_kv = real_cache && m.kind == MethodKind::kUniform;
    if (o.uniform_kv)  // the packed cache's closed set, refused before the weights are loaded
      cuda::check_uniform_shape(fmt::format("method {} under eval.kv_cache: real (the packed uniform cache)", m.text),
                                ckpt.config().head_dim, m.bits, m.group, m.window);
    auto rt = std::make_unique<GpuRuntime>(ckpt, o);  // selects opt.device: the codebooks go there
    if (o.compressed_kv) {
      ANTKV_CHECK(cb, "method {}: needs codebooks", m.text);
      rt->set_compressed_cache(std::make_unique<GpuCompressedKvCache>(ckpt.config(), m, *cb, o.max_batch,
                                                                     rt->capacity(), m.decode_window));  // recipe anchor.window
    }
    if (o.uniform_kv)  // the quantizer below gives its prefill the simulated K/V
      rt->set_uniform_cache(std::make_unique<GpuUniformKvCache>(ckpt.config(), m.bits, m.group, m.window, o.max_batch,
                                                                rt->capacity()));
    rt->set_kv_quantizer(make_gpu_kv_quantizer(ckpt.config(), m, std::move(cb), m.decode_window));
    return rt;
  };
}

}  // namespace antkv
