#pragma once

#include <string>

namespace odlora {

// Hex sha256 of a file's bytes (OpenSSL), streamed so that a 500 MB weight file is not held twice.
std::string sha256_file(const std::string& path);

}  // namespace odlora
