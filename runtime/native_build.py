"""Build the native runtime (`runtime/native`, C++ and CMake) against the executorch wheel.

    python -m ondevice_lora.runtime.native_build [BUILD_DIR]                  # for this machine
    python -m ondevice_lora.runtime.native_build --arch aarch64 [BUILD_DIR]   # for 64-bit ARM (phones)

Each prints the path of `odlora-native`. It needs a source checkout (the C++ is not in the wheel),
CMake >= 3.28 (`pip install cmake`), a C++17 compiler and, from the system: pkg-config, RE2, PCRE2,
nlohmann-json and OpenSSL (Debian: `apt-get install g++ pkg-config libre2-dev libpcre2-dev
nlohmann-json3-dev libssl-dev`). The tokenizer library's source comes from PyPI on the first build
(CMake checks its sha256).

For ARM64 it cross-compiles with Debian's toolchain and arm64 multiarch libraries
(`runtime/native/cmake/aarch64-linux-gnu.cmake` says which) against the same executorch release's
`manylinux_2_28_aarch64` wheel, which it downloads from PyPI once (`pip download`) and unpacks into
the build directory. `runner("aarch64")` is how this machine runs the result: under qemu-user
unless it is an ARM64 machine itself.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from ..errors import OdloraError

SOURCE = Path(__file__).resolve().parent / "native"
DEFAULT_BUILD_DIR = SOURCE.parents[1] / "build" / "native"
SYSTEM_PACKAGES = "g++ pkg-config libre2-dev libpcre2-dev nlohmann-json3-dev libssl-dev"
# What `--arch` can build besides this machine's own, with Debian's packages for it.
CROSS = {"aarch64": {"toolchain": SOURCE / "cmake" / "aarch64-linux-gnu.cmake", "wheel": "manylinux_2_28_aarch64",
                     "qemu": "qemu-aarch64",
                     "packages": "g++-aarch64-linux-gnu libre2-dev:arm64 libpcre2-dev:arm64 libssl-dev:arm64 "
                                 "nlohmann-json3-dev qemu-user (after dpkg --add-architecture arm64)"}}


def find_cmake() -> str:
    """The cmake beside this Python (pip's) first, then the one on PATH."""
    beside = Path(sys.executable).parent / "cmake"
    cmake = str(beside) if beside.exists() else shutil.which("cmake")
    if cmake is None:
        raise OdloraError("cmake not found: `pip install 'cmake>=3.28'`")
    return cmake


def build(build_dir: Path = DEFAULT_BUILD_DIR, jobs: int = os.cpu_count() or 2, say=print,
          arch: str | None = None) -> Path:
    """Configure (once) and build for this machine, or cross-compile for `arch` (a key of CROSS);
    returns the `odlora-native` executable. Incremental on a rerun."""
    if not (SOURCE / "CMakeLists.txt").is_file():
        raise OdloraError(f"{SOURCE}: the native runtime's sources are not here (build from a source checkout)")
    if arch is not None and arch not in CROSS:
        raise OdloraError(f"--arch: {arch!r} is not one this build knows (choose from {', '.join(CROSS)})")
    cmake, build_dir = find_cmake(), Path(build_dir)
    packages = SYSTEM_PACKAGES
    if arch is None:
        import executorch

        options = [f"-DCMAKE_PREFIX_PATH={executorch.__path__[0]}"]
    else:
        cross = CROSS[arch]
        packages = cross["packages"]
        options = [f"-DCMAKE_TOOLCHAIN_FILE={cross['toolchain']}",
                   f"-DCMAKE_PREFIX_PATH={executorch_for(arch, build_dir, say)}"]
    configure = [cmake, "-S", str(SOURCE), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", *options]
    say(f"building the native runtime{f' for {arch}' if arch else ''} in {build_dir} ...")
    for step in (configure, [cmake, "--build", str(build_dir), "-j", str(jobs)]):
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise OdloraError(f"`{' '.join(step)}` failed (system packages needed: {packages}):\n{tail}")
    return build_dir / "odlora-native"


def executorch_for(arch: str, build_dir: Path, say=print) -> Path:
    """The C++ part (headers, libraries, CMake package) of the installed executorch release's wheel
    for `arch`, downloaded from PyPI and unpacked into `build_dir` once; returns its package directory."""
    from importlib.metadata import version

    target = build_dir / f"executorch-{arch}"
    if (target / "executorch" / "lib" / "cmake").is_dir():
        return target / "executorch"
    release = version("executorch")
    say(f"downloading the executorch {release} wheel for {arch} ...")
    wheels = build_dir / "wheels"
    done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                           "--platform", CROSS[arch]["wheel"], "--python-version", f"{sys.version_info[0]}{sys.version_info[1]}",
                           "-d", str(wheels), f"executorch=={release}"], capture_output=True, text=True)
    found = sorted(wheels.glob(f"executorch-{release}-*{CROSS[arch]['wheel']}*.whl")) if done.returncode == 0 else []
    if not found:
        raise OdloraError(f"could not download the executorch {release} wheel for {arch}: "
                          f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    with zipfile.ZipFile(found[-1]) as wheel:
        wheel.extractall(target, [n for n in wheel.namelist() if n.startswith(("executorch/include/", "executorch/lib/",
                                                                                   "executorch/share/"))])
    return target / "executorch"


def runner(arch: str | None) -> list[str]:
    """The command prefix that runs a program built for `arch` on this machine: nothing for this
    machine's own, qemu-user for another; OdloraError if there is none. qemu finds the target's
    loader and libraries in Debian's multiarch directories (/lib/aarch64-linux-gnu): pointing it
    at the cross toolchain's own glibc instead (-L /usr/aarch64-linux-gnu) mixed two glibc builds,
    and the first pthread_create hung."""
    if arch is None or platform.machine() == arch:
        return []
    qemu = shutil.which(CROSS[arch]["qemu"])
    if qemu is None:
        raise OdloraError(f"{CROSS[arch]['qemu']} not found: install qemu-user to run {arch} programs here")
    return [qemu]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build the native runtime; prints the path of odlora-native.")
    parser.add_argument("build_dir", nargs="?", type=Path, help="default: build/native (build/native-ARCH for --arch)")
    parser.add_argument("--arch", choices=sorted(CROSS), help="cross-compile for this architecture")
    args = parser.parse_args()
    build_dir = args.build_dir or (DEFAULT_BUILD_DIR.with_name(f"native-{args.arch}") if args.arch else DEFAULT_BUILD_DIR)
    try:
        print(build(build_dir, say=lambda m: print(m, file=sys.stderr), arch=args.arch))
    except OdloraError as e:
        print(f"odlora: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
