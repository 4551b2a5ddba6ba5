// The Kotlin wrapper on the desktop JVM, for tests/test_native.py: opens a bundle (and adapter
// bundles), names its delegate, answers one prompt with each adapter and the base, one line each:
// adapter<TAB>token ids.
import ai.odlora.OdloraRuntime

fun main(args: Array<String>) {
    val prompt = args[0]
    OdloraRuntime.open(args[1]).use { rt ->
        args.drop(2).forEach { rt.addAdapterBundle(it) }
        println("delegate\t${rt.delegate}")
        for (adapter in listOf(null) + rt.adapterIds) {
            val g = rt.generate(prompt, adapter, maxNewTokens = 12)
            println("${g.adapter}\t${g.tokenIds.joinToString(",")}\t${g.finishReason}")
        }
        try {
            rt.generate(prompt, "missing")
        } catch (e: IllegalArgumentException) {
            println("error\t${e.message}")
        }
    }
}
