"""The ExecuTorch delegates a program can be lowered to: one partitioner each, named as ExecuTorch names them.

    odlora export --target executorch --backend openvino out/

A delegate takes the parts of the graph its partitioner claims and compiles them for its device;
whatever it leaves runs on ExecuTorch's portable CPU kernels. `lowering_report` says how much each
one took. The slots stay runtime inputs on every delegate: they are method inputs, not weights, so
an adapter swap never recompiles anything.

What runs where (the executorch 1.5.1 wheel, Linux x86-64):

- xnnpack: CPU kernels on every phone and laptop; its runtime is in the wheel and in the native build.
- openvino: Intel CPUs, GPUs and NPUs through OpenVINO (`pip install 'ondevice-lora[openvino]'`);
  the wheel's Python runtime includes its backend, so it runs here on the CPU plugin.
- vulkan: Android GPUs. Lowering is pure Python; its runtime is not in the wheel (built with the
  Android NDK and a Vulkan driver).
- coreml: Apple's Neural Engine, GPU and CPU via Core ML. Lowering converts with coremltools to an
  .mlpackage inside the program (compiling it to .mlmodelc needs macOS, so it is left to the device);
  its runtime exists only on Apple platforms.
- qnn: Qualcomm's Hexagon NPU. Lowering needs Qualcomm's QNN SDK (its libraries), which is not
  on PyPI; the wheel has the Python side only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import OdloraError


@dataclass(frozen=True)
class Delegate:
    name: str  # ExecuTorch's name for it (its backend registers as <Name>Backend), and the manifest's "backend"
    partitioner: Callable[[], object]  # makes the partitioner (imports its backend's package)
    device: str  # what it runs on (bench/bench_delegates.py's table)
    needs: str = ""  # what lowering needs beyond the export extra, said when it is missing


def xnnpack():
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return XnnpackPartitioner()


def openvino():
    try:
        from executorch.backends.openvino.partitioner import OpenvinoPartitioner
    except ImportError as e:  # the openvino and nncf packages, imported by the backend's package
        raise OdloraError(f"the openvino backend needs OpenVINO: pip install 'ondevice-lora[openvino]' ({e})")
    from executorch.exir.backend.backend_details import CompileSpec

    return OpenvinoPartitioner([CompileSpec("device", b"CPU")])  # the plugin compiled for at load time


def vulkan():
    from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner

    return VulkanPartitioner()


def coreml():
    import coremltools as ct
    from executorch.backends.apple.coreml.compiler import CoreMLBackend
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner

    # An .mlpackage in the program (compiled on the device: compiling needs macOS's coremlcompiler);
    # iOS 18 is the first with stateful models, which the in-program KV cache is. coremltools'
    # fuse_linear_bias fails on the norm's mean-of-squares matmul + eps (a scalar bias): skipped.
    passes = [p for p in ct.PassPipeline.DEFAULT.passes if p != "common::fuse_linear_bias"]
    specs = CoreMLBackend.generate_compile_specs(model_type=CoreMLBackend.MODEL_TYPE.MODEL,
                                                 minimum_deployment_target=ct.target.iOS18, pass_names=passes)
    # coremltools cannot convert the cache write (index_put at a runtime position): it stays on the
    # CPU, and with it the cache (a mutable buffer Core ML would otherwise own).
    return CoreMLPartitioner(compile_specs=specs, skip_ops_for_coreml_delegation=["aten.index_put.default"],
                             take_over_mutable_buffer=False)


def qnn():
    import os

    # Checked first: without it, ExecuTorch's QNN setup downloads the SDK (no network at run time here).
    if not os.environ.get("QNN_SDK_ROOT"):
        raise OdloraError("the qnn backend needs Qualcomm's QNN SDK: set QNN_SDK_ROOT to an installed SDK "
                          "(it is not on PyPI; ExecuTorch's wheel has only its Python side)", param="backend")
    from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner
    from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset
    from executorch.backends.qualcomm.utils.utils import (generate_htp_compiler_spec,
                                                          generate_qnn_executorch_compiler_spec)

    # fp16 on the HTP of a Snapdragon 8 Gen 3; other chips are one QcomChipset away.
    specs = generate_qnn_executorch_compiler_spec(soc_model=QcomChipset.SM8650,
                                                  backend_options=generate_htp_compiler_spec(use_fp16=True))
    return QnnPartitioner(specs)


DELEGATES = {d.name: d for d in (
    Delegate("xnnpack", xnnpack, "CPU (ARM and x86)"),
    Delegate("openvino", openvino, "Intel CPU, GPU, NPU", "pip install 'ondevice-lora[openvino]'"),
    Delegate("vulkan", vulkan, "Android GPUs (Vulkan)"),
    Delegate("coreml", coreml, "Apple Neural Engine, GPU, CPU"),
    Delegate("qnn", qnn, "Qualcomm Hexagon NPU", "Qualcomm's QNN SDK (QNN_SDK_ROOT)"),
)}


def delegate(name: str) -> Delegate:
    if name not in DELEGATES:
        raise OdloraError(f"unknown ExecuTorch backend {name!r} (choose from {', '.join(DELEGATES)})", param="backend")
    return DELEGATES[name]


def partitioner(name: str):
    """A new partitioner for delegate `name`; a clear error when its tooling is missing here."""
    entry = delegate(name)
    try:
        return entry.partitioner()
    except (ImportError, RuntimeError) as e:
        raise OdloraError(f"the {name} backend cannot lower here: {e}" + (f" (needs {entry.needs})" if entry.needs else ""))


# -- what the delegate took -------------------------------------------------------------------

def lowering_report(graph_module) -> dict:
    """Partitions, the ops inside them, and the ops left to the portable CPU kernels (by name)."""
    partitions, delegated, fallback = 0, 0, {}
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or is_bookkeeping(node):
            continue
        if "call_delegate" in str(node.target):
            partitions += 1
            lowered = getattr(graph_module, node.args[0].target)
            delegated += sum(1 for n in lowered.original_module.graph.nodes
                             if n.op == "call_function" and not is_bookkeeping(n))
        else:
            op = op_name(node)
            fallback[op] = fallback.get(op, 0) + 1
    total = delegated + sum(fallback.values())
    return {"partitions": partitions, "delegated_ops": delegated, "cpu_ops": dict(sorted(fallback.items())),
            "delegated_share": round(delegated / total, 4) if total else 0.0}


def is_bookkeeping(node) -> bool:
    """A tuple's getitem: no kernel runs for it."""
    return "getitem" in str(node.target)


def op_name(node) -> str:
    name = getattr(node.target, "__name__", str(node.target))
    return name.removeprefix("aten.").removesuffix(".default")
