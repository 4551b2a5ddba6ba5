# Cross-compiling the native runtime for 64-bit ARM Linux (what a phone's CPU runs) with Debian's
# cross toolchain and its arm64 multiarch packages:
#
#   dpkg --add-architecture arm64 && apt-get update
#   apt-get install g++-aarch64-linux-gnu libre2-dev:arm64 libpcre2-dev:arm64 libssl-dev:arm64 qemu-user
#   python -m ondevice_lora.runtime.native_build --arch aarch64     # runs the result under qemu-aarch64
#
# ExecuTorch's headers and libraries come from its manylinux_2_28_aarch64 wheel (native_build.py
# downloads and unpacks it); nlohmann-json is headers only, the host's copy serves.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
# Libraries and packages from the target's multiarch directories (and the prefixes given on the
# command line); programs from the host.
set(CMAKE_LIBRARY_ARCHITECTURE aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(ENV{PKG_CONFIG_LIBDIR} "/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig")
