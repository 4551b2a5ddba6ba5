// The odlora Kotlin wrapper and its JNI bridge, as an Android library. The native code is
// runtime/native, built by CMake for each ABI against an Android build of ExecuTorch (see README).
plugins {
    id("com.android.library") version "8.5.0"
    kotlin("android") version "1.9.24"
}

android {
    namespace = "ai.odlora"
    compileSdk = 34
    defaultConfig {
        minSdk = 26
        ndk { abiFilters += listOf("arm64-v8a") }
        externalNativeBuild {
            cmake {
                // Where an Android install of ExecuTorch (headers + libs + executorch-config.cmake) lives.
                arguments += listOf("-DCMAKE_PREFIX_PATH=${property("executorch.android.prefix")}")
            }
        }
    }
    externalNativeBuild {
        cmake { path = file("../../../runtime/native/CMakeLists.txt") }
    }
}
