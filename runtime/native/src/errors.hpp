// One exception type for everything a caller can get wrong (a bad bundle, an unknown adapter, a
// prompt too long): its message names what is wrong and where, and the front ends print it as is.
#pragma once

#include <stdexcept>
#include <string>

namespace odlora {

struct Error : std::runtime_error {
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace odlora
