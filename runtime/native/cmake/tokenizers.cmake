# ExecuTorch's tokenizer library (github.com/pytorch/tokenizers), from its source release on PyPI,
# checked against its sha256. Only the Hugging Face tokenizer.json path is built (byte-level BPE
# with its pre-tokenizers, normalizers and decoders), against the system's RE2 and PCRE2 (the
# lookahead regexes of GPT-2 style pre-tokenizers); its sentencepiece and tiktoken parts are not
# needed. Offline: -DFETCHCONTENT_SOURCE_DIR_PYTORCH_TOKENIZERS=<unpacked sdist>.
include(FetchContent)
FetchContent_Declare(
  pytorch_tokenizers
  URL https://files.pythonhosted.org/packages/0c/a7/d07ebde1011d704e4ab5c8fcb46fc71cb72fdf2c393f85202f7dfb8fd669/pytorch_tokenizers-1.0.1.tar.gz
  URL_HASH SHA256=19938c0efd5348fb0589610094c1c6bf6e055b20889f6250068d2b552a0b137b
  DOWNLOAD_EXTRACT_TIMESTAMP TRUE
  SOURCE_SUBDIR do-not-build-its-own-cmake-project
)
FetchContent_MakeAvailable(pytorch_tokenizers)
set(_tk ${pytorch_tokenizers_SOURCE_DIR})

find_package(PkgConfig REQUIRED)
pkg_check_modules(RE2 REQUIRED IMPORTED_TARGET re2)
pkg_check_modules(PCRE2 REQUIRED IMPORTED_TARGET libpcre2-8)

file(GLOB _tk_unicode ${_tk}/third-party/llama.cpp-unicode/src/*.cpp)
add_library(odlora_hf_tokenizer STATIC
  ${_tk}/src/hf_tokenizer.cpp ${_tk}/src/bpe_tokenizer_base.cpp ${_tk}/src/pre_tokenizer.cpp
  ${_tk}/src/normalizer.cpp ${_tk}/src/token_decoder.cpp ${_tk}/src/regex.cpp ${_tk}/src/re2_regex.cpp
  ${_tk}/src/regex_lookahead.cpp ${_tk}/src/pcre2_regex.cpp ${_tk}/src/std_regex.cpp ${_tk_unicode})
target_include_directories(odlora_hf_tokenizer SYSTEM PUBLIC ${_tk}/include
                           PRIVATE ${_tk}/third-party/llama.cpp-unicode/include)
# Its headers use std::function without <functional> (newer GCCs no longer include it transitively);
# its logging goes to stderr on every load, which a runtime in an app does not want.
target_compile_options(odlora_hf_tokenizer PUBLIC -include functional)
target_compile_definitions(odlora_hf_tokenizer PUBLIC TK_LOG_ENABLED=0)
set_target_properties(odlora_hf_tokenizer PROPERTIES POSITION_INDEPENDENT_CODE ON)
target_link_libraries(odlora_hf_tokenizer PUBLIC PkgConfig::RE2 PkgConfig::PCRE2 nlohmann_json::nlohmann_json)
