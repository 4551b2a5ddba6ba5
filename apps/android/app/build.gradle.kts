plugins {
    id("com.android.application") version "8.5.0"
    kotlin("android") version "1.9.24"
}

android {
    namespace = "ai.odlora.sample"
    compileSdk = 34
    defaultConfig {
        applicationId = "ai.odlora.sample"
        minSdk = 26
        targetSdk = 34
    }
    // The app bundle (`odlora bundle --export <executorch export> ... --out app/src/main/assets/bundle`);
    // not compressed, so that copying it out of the APK is a plain copy.
    androidResources { noCompress += listOf("pte", "ptd", "slots", "json") }
}

dependencies {
    implementation(project(":odlora"))
}
