package ai.odlora.sample

import ai.odlora.OdloraRuntime
import android.app.Activity
import android.os.Bundle
import android.widget.ArrayAdapter
import android.widget.Button
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.Spinner
import android.widget.TextView
import java.io.File
import java.util.concurrent.Executors

/**
 * One screen: pick an adapter (or the base), type a prompt, read the answer. The base ships in the
 * APK's assets as an `odlora bundle` directory and is copied to local storage once (the runtime
 * memory-maps its weights from a file); adapter bundles downloaded later go to files/adapters/.
 */
class MainActivity : Activity() {
    private val worker = Executors.newSingleThreadExecutor()  // one request at a time, off the UI thread
    private var runtime: OdloraRuntime? = null

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val adapters = Spinner(this)
        val prompt = EditText(this).apply { hint = "Ask something" }
        val answer = TextView(this)
        val send = Button(this).apply { text = "Send"; isEnabled = false }
        setContentView(LinearLayout(this).apply {
            orientation = LinearLayout.VERTICAL
            listOf(adapters, prompt, send, answer).forEach { addView(it) }
        })
        worker.execute {
            val opened = runCatching { openRuntime() }
            runOnUiThread {
                opened.onSuccess { rt ->
                    runtime = rt
                    adapters.adapter = ArrayAdapter(this, android.R.layout.simple_spinner_item, listOf("base") + rt.adapterIds)
                    send.isEnabled = true
                }.onFailure { answer.text = "Cannot open the bundle: ${it.message}" }
            }
        }
        send.setOnClickListener {
            val adapter = adapters.selectedItem as String
            val text = prompt.text.toString()
            send.isEnabled = false
            worker.execute {
                val result = runCatching { runtime!!.generate(text, if (adapter == "base") null else adapter) }
                runOnUiThread {
                    answer.text = result.fold({ "${it.text}\n(${it.adapter}, ${"%.0f".format(it.totalMs)} ms)" }, { "Error: ${it.message}" })
                    send.isEnabled = true
                }
            }
        }
    }

    private fun openRuntime(): OdloraRuntime {
        val bundle = File(filesDir, "bundle")
        if (!File(bundle, "bundle.json").exists()) copyAssets("bundle", bundle)
        val rt = OdloraRuntime.open(bundle.path)  // verifies every file's sha256 against bundle.json
        File(filesDir, "adapters").listFiles()?.filter { it.isDirectory }?.forEach { rt.addAdapterBundle(it.path) }
        return rt
    }

    private fun copyAssets(path: String, to: File) {
        val children = assets.list(path).orEmpty()
        if (children.isEmpty()) {
            to.parentFile?.mkdirs()
            assets.open(path).use { input -> to.outputStream().use { input.copyTo(it) } }
        } else {
            children.forEach { copyAssets("$path/$it", File(to, it)) }
        }
    }

    override fun onDestroy() {
        worker.execute { runtime?.close() }
        worker.shutdown()
        super.onDestroy()
    }
}
