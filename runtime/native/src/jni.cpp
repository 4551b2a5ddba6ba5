// JNI bridge for ai.odlora.OdloraRuntime (apps/android/.../OdloraRuntime.kt): a handle to one
// Engine, requests answered as JSON, and odlora::Error raised as IllegalArgumentException.
#include <jni.h>

#include <string>

#include "engine.hpp"
#include "errors.hpp"

namespace {

std::string to_string(JNIEnv* env, jstring s) {
  if (s == nullptr) return "";
  const char* chars = env->GetStringUTFChars(s, nullptr);
  std::string out(chars);
  env->ReleaseStringUTFChars(s, chars);
  return out;
}

odlora::Engine* engine(jlong handle) { return reinterpret_cast<odlora::Engine*>(handle); }

// Runs `body`; a C++ exception becomes a Java exception (the return value is then ignored by Java).
template <typename T, typename F>
T guarded(JNIEnv* env, T fallback, F body) {
  try {
    return body();
  } catch (const odlora::Error& e) {
    env->ThrowNew(env->FindClass("java/lang/IllegalArgumentException"), e.what());
  } catch (const std::exception& e) {
    env->ThrowNew(env->FindClass("java/lang/RuntimeException"), e.what());
  }
  return fallback;
}

}  // namespace

extern "C" {

JNIEXPORT jlong JNICALL Java_ai_odlora_OdloraRuntime_nativeOpen(JNIEnv* env, jclass, jstring bundle) {
  return guarded<jlong>(env, 0, [&] { return reinterpret_cast<jlong>(new odlora::Engine(to_string(env, bundle))); });
}

JNIEXPORT void JNICALL Java_ai_odlora_OdloraRuntime_nativeAddAdapterBundle(JNIEnv* env, jclass, jlong handle, jstring path) {
  guarded<int>(env, 0, [&] {
    engine(handle)->add_adapter_bundle(to_string(env, path));
    return 0;
  });
}

JNIEXPORT jobjectArray JNICALL Java_ai_odlora_OdloraRuntime_nativeAdapterIds(JNIEnv* env, jclass, jlong handle) {
  const auto ids = engine(handle)->adapter_ids();
  jobjectArray out = env->NewObjectArray(jsize(ids.size()), env->FindClass("java/lang/String"), nullptr);
  for (size_t i = 0; i < ids.size(); ++i) env->SetObjectArrayElement(out, jsize(i), env->NewStringUTF(ids[i].c_str()));
  return out;
}

JNIEXPORT jstring JNICALL Java_ai_odlora_OdloraRuntime_nativeGenerate(JNIEnv* env, jclass, jlong handle, jstring prompt,
                                                                      jstring adapter, jint max_new_tokens) {
  return guarded<jstring>(env, nullptr, [&] {
    const std::string id = to_string(env, adapter);
    const auto g = engine(handle)->generate(to_string(env, prompt), id, max_new_tokens);
    const odlora::Json result = {{"adapter", id.empty() ? "base" : id}, {"text", g.text}, {"token_ids", g.tokens},
                                 {"finish_reason", g.finish_reason}, {"total_ms", g.total_ms}};
    return env->NewStringUTF(odlora::dump(result).c_str());
  });
}

JNIEXPORT void JNICALL Java_ai_odlora_OdloraRuntime_nativeClose(JNIEnv*, jclass, jlong handle) { delete engine(handle); }

}  // extern "C"
