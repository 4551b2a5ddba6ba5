"""Build the native runtime (`runtime/native`, C++ and CMake) against the installed executorch wheel.

    python -m ondevice_lora.runtime.native_build [BUILD_DIR]     # prints the path of odlora-native

It needs a source checkout (the C++ is not in the wheel), CMake >= 3.28 (`pip install cmake`), a
C++17 compiler and, from the system: pkg-config, RE2, PCRE2, nlohmann-json and OpenSSL
(Debian: `apt-get install g++ pkg-config libre2-dev libpcre2-dev nlohmann-json3-dev libssl-dev`).
The tokenizer library's source comes from PyPI on the first build (CMake checks its sha256).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import OdloraError

SOURCE = Path(__file__).resolve().parent / "native"
DEFAULT_BUILD_DIR = SOURCE.parents[1] / "build" / "native"
SYSTEM_PACKAGES = "g++ pkg-config libre2-dev libpcre2-dev nlohmann-json3-dev libssl-dev"


def find_cmake() -> str:
    """The cmake beside this Python (pip's) first, then the one on PATH."""
    beside = Path(sys.executable).parent / "cmake"
    cmake = str(beside) if beside.exists() else shutil.which("cmake")
    if cmake is None:
        raise OdloraError("cmake not found: `pip install 'cmake>=3.28'`")
    return cmake


def build(build_dir: Path = DEFAULT_BUILD_DIR, jobs: int = os.cpu_count() or 2, say=print) -> Path:
    """Configure (once) and build; returns the `odlora-native` executable. Incremental on a rerun."""
    import executorch

    if not (SOURCE / "CMakeLists.txt").is_file():
        raise OdloraError(f"{SOURCE}: the native runtime's sources are not here (build from a source checkout)")
    cmake, build_dir = find_cmake(), Path(build_dir)
    configure = [cmake, "-S", str(SOURCE), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={executorch.__path__[0]}"]
    say(f"building the native runtime in {build_dir} ...")
    for step in (configure, [cmake, "--build", str(build_dir), "-j", str(jobs)]):
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise OdloraError(f"`{' '.join(step)}` failed (system packages needed: {SYSTEM_PACKAGES}):\n{tail}")
    return build_dir / "odlora-native"


if __name__ == "__main__":
    try:
        print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_BUILD_DIR, say=lambda m: print(m, file=sys.stderr)))
    except OdloraError as e:
        print(f"odlora: error: {e}", file=sys.stderr)
        sys.exit(2)
