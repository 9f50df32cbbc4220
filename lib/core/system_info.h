// What a result file records about where it was measured.
#pragma once
#include <string>

namespace antkv {

std::string cpu_model_name();  // from /proc/cpuinfo, "" if unknown
std::string utc_timestamp();    // "2026-11-29T01:23:45Z"

}  // namespace antkv
