#include "core/limits.h"

#include "core/error.h"

namespace antkv {

void check_count(int64_t value, const CountLimit& limit, const std::string& where) {
  const bool special = limit.special_means != nullptr && value == limit.special;
  if (special || (value >= limit.min && value <= limit.max)) return;
  fail("{} = {} is out of range: give {}..{}{}", where, value, limit.min, limit.max,
       limit.special_means ? fmt::format(", or {} for {}", limit.special, limit.special_means) : std::string());
}

}  // namespace antkv
