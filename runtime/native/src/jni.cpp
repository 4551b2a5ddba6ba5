// JNI bridge for ai.odlora.OdloraRuntime (apps/android/.../OdloraRuntime.kt): a handle to one
// Engine, requests answered as JSON, and odlora::Error raised as IllegalArgumentException.
#include <jni.h>

#include <string>
#include <vector>

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

// A Java string from UTF-8 bytes that may end inside a character. NewStringUTF wants "modified"
// UTF-8 (no 4-byte sequences, no bad bytes), so: bad bytes -> U+FFFD (the JSON encoder's
// replacement), then UTF-16 by hand, surrogate pairs for characters beyond the BMP.
jstring utf8_string(JNIEnv* env, const std::string& bytes) {
  const std::string valid = odlora::Json::parse(odlora::dump(bytes)).get<std::string>();
  std::u16string out;
  for (size_t i = 0; i < valid.size();) {
    const unsigned char lead = valid[i];
    const int extra = lead < 0x80 ? 0 : lead < 0xE0 ? 1 : lead < 0xF0 ? 2 : 3;
    char32_t c = extra == 0 ? lead : lead & (0x3F >> extra);
    for (int k = 1; k <= extra; ++k) c = (c << 6) | (valid[i + k] & 0x3F);
    i += extra + 1;
    if (c >= 0x10000) {
      out += char16_t(0xD800 + ((c - 0x10000) >> 10));
      out += char16_t(0xDC00 + ((c - 0x10000) & 0x3FF));
    } else {
      out += char16_t(c);
    }
  }
  return env->NewString(reinterpret_cast<const jchar*>(out.data()), jsize(out.size()));
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

JNIEXPORT jstring JNICALL Java_ai_odlora_OdloraRuntime_nativeDelegate(JNIEnv* env, jclass, jlong handle) {
  return env->NewStringUTF(engine(handle)->delegate().c_str());
}

JNIEXPORT jobject JNICALL Java_ai_odlora_OdloraRuntime_nativeGenerate(JNIEnv* env, jclass, jlong handle, jstring prompt,
                                                                      jstring adapter, jint max_new_tokens) {
  return guarded<jobject>(env, nullptr, [&] {
    const std::string id = to_string(env, adapter);
    const auto g = engine(handle)->generate(to_string(env, prompt), id, max_new_tokens);
    jlongArray tokens = env->NewLongArray(jsize(g.tokens.size()));
    std::vector<jlong> values(g.tokens.begin(), g.tokens.end());
    env->SetLongArrayRegion(tokens, 0, jsize(values.size()), values.data());
    // ai.odlora.Generation(text, adapter, tokenIds, finishReason, totalMs); text as JSON would need a
    // parser on the Kotlin side, so the fields go over one by one.
    jclass cls = env->FindClass("ai/odlora/Generation");
    jmethodID init = env->GetMethodID(cls, "<init>", "(Ljava/lang/String;Ljava/lang/String;[JLjava/lang/String;D)V");
    return env->NewObject(cls, init, utf8_string(env, g.text), env->NewStringUTF(id.empty() ? "base" : id.c_str()), tokens,
                          env->NewStringUTF(g.finish_reason.c_str()), jdouble(g.total_ms));
  });
}

JNIEXPORT void JNICALL Java_ai_odlora_OdloraRuntime_nativeClose(JNIEnv*, jclass, jlong handle) { delete engine(handle); }

}  // extern "C"
