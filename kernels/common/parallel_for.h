// A host loop spread over the machine's cores with std::thread (the host stages of the GPU k-means).
#pragma once
#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace antkv::cuda {

// Runs f(i) for i in [0, n) on the machine's cores (static partition: thread t takes i = t, t + nt, ...); an
// exception thrown by f is rethrown here once every thread has finished.
template <typename F>
void parallel_for(int64_t n, F f) {
  const int nt = static_cast<int>(std::min<int64_t>(n, std::max(1u, std::thread::hardware_concurrency())));
  if (nt <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  std::vector<std::thread> th;
  std::vector<std::exception_ptr> errs(nt);
  for (int t = 0; t < nt; ++t)
    th.emplace_back([&, t] {
      try {
        for (int64_t i = t; i < n; i += nt) f(i);
      } catch (...) {
        errs[t] = std::current_exception();
      }
    });
  for (auto& x : th) x.join();
  for (auto& e : errs)
    if (e) std::rethrow_exception(e);
}

}  // namespace antkv::cuda
