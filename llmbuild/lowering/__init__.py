"""Graph rewrites for ONNX Runtime on the CPU, in one place.

The standard decoder graph (llmbuild.graph, what TensorRT parses) is rewritten at load
time, in memory, into the graph ONNX Runtime's CPU kernels run fast; the artifact is not
changed. The passes find what they rewrite by the annotations the graph blocks leave
(llmbuild.graph.annotations), not by matching node sequences or tensor names.

    cpu.py        lower_for_cpu: fused GroupQueryAttention, float32 promotion, fused
                  sibling MatMuls, SkipSimplifiedLayerNormalization; the lowered graph
                  saved for runtimes that load a file (the C++ runtime's --graph)
    quantized.py  DequantizeLinear(int4|int8) → MatMul as com.microsoft.MatMulNBits,
                  siblings reading one activation fused
    rewrite.py    the graph surgery both use

The runtime (llmbuild.runtime.executors.onnxruntime) calls `cpu.lower_for_cpu`; this
package imports no executor, so it sits below engine and runtime in the layer order
(tests/test_layering.py).
"""
