package ai.odlora

/**
 * The odlora native runtime from Kotlin: one app bundle's base loaded once, adapters chosen per
 * request. A thin wrapper over the JNI bridge (runtime/native/src/jni.cpp, library `odlora_jni`).
 *
 *     OdloraRuntime.open(bundleDir).use { rt ->
 *         rt.addAdapterBundle(downloadedDir)          // checked against the installed base
 *         val answer = rt.generate("Normalise: March 5th, 2021", adapter = "dates")
 *     }
 *
 * Errors in a bundle or a request (a checksum, an unknown adapter, a prompt too long) arrive as
 * IllegalArgumentException with the runtime's message. One instance serves one request at a time.
 */
class OdloraRuntime private constructor(private var handle: Long) : java.io.Closeable {

    /** Ids of the registered adapters (from the base bundle and every added adapter bundle). */
    val adapterIds: List<String>
        get() = nativeAdapterIds(checkOpen()).toList()

    /** The ExecuTorch delegate the base runs on (bundle.json's `delegate`: "xnnpack", "openvino", "vulkan",
     *  "qnn", ...). Its backend must be linked into the app's `odlora_jni`; opening fails otherwise. */
    val delegate: String
        get() = nativeDelegate(checkOpen())

    /** Verifies an adapter bundle (downloaded later) against the base and registers its adapters. */
    fun addAdapterBundle(path: String) = nativeAddAdapterBundle(checkOpen(), path)

    /** Greedy answer to [prompt] with [adapter] (null is the base), asked as the adapter was trained:
     *  inside the base's chat template, or as raw text for a "raw" adapter (bundle.json's prompt_format). */
    fun generate(prompt: String, adapter: String? = null, maxNewTokens: Int = 128): Generation =
        nativeGenerate(checkOpen(), prompt, adapter ?: "", maxNewTokens)

    override fun close() {
        if (handle != 0L) nativeClose(handle)
        handle = 0L
    }

    private fun checkOpen(): Long {
        check(handle != 0L) { "OdloraRuntime is closed" }
        return handle
    }

    companion object {
        init {
            System.loadLibrary("odlora_jni")
        }

        /** Verifies the bundle at [bundleDir] (a directory on local storage) and loads its base. */
        fun open(bundleDir: String): OdloraRuntime = OdloraRuntime(nativeOpen(bundleDir))

        @JvmStatic private external fun nativeOpen(bundle: String): Long
        @JvmStatic private external fun nativeAddAdapterBundle(handle: Long, path: String)
        @JvmStatic private external fun nativeAdapterIds(handle: Long): Array<String>
        @JvmStatic private external fun nativeDelegate(handle: Long): String
        @JvmStatic private external fun nativeGenerate(handle: Long, prompt: String, adapter: String, maxNewTokens: Int): Generation
        @JvmStatic private external fun nativeClose(handle: Long)
    }
}

/** One answer; constructed by the JNI bridge (keep the constructor's signature in step with it). */
class Generation(
    val text: String,
    val adapter: String,
    val tokenIds: LongArray,
    val finishReason: String,
    val totalMs: Double
)
