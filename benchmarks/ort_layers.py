"""Where an exported generator's ONNX Runtime call spends its time, node by node, and what one rewrite buys.

    python -m benchmarks.ort_layers exported/mnist/cdcgan --n 1024
    python -m benchmarks.ort_layers exported/breastmnist_64/dcgan --n 256 --threads 2

Prints a Markdown table per model: each node's median kernel time (ORT's own profiler,
`SessionOptions.enable_profiling`), its share of the call, and for the convolution-like nodes their multiply-adds
and GFLOP/s against a dense 2048x2048 MatMul in ORT at the same threads. It then times, in turn with the file as shipped, one rewrite of the graph that keeps its function:
the DCGAN generators' first layer, a stride-1 `ConvTranspose` of the (N, C, 1, 1) latent, which ORT's CPU kernel
runs as one matrix-vector product per image, as a single `Gemm` over the batch (bias repeated per pixel) and a
`Reshape`. The output difference against the shipped graph is printed with the speed-up. A diagnostic: the
shipped files are not rewritten (their cards' metrics were measured on their exact bytes).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np

from service.backends import session_options
from service.config import Settings

from .common import fmt, interleaved, median, table

ONNX_FILE = "generator.onnx"


def _session(model_bytes: bytes, threads: int, profile_dir: str | None = None):
    import onnxruntime as ort

    defaults = Settings()
    options = session_options(threads, defaults.ort_spinning, defaults.ort_arena)  # the service's, by default
    options.log_severity_level = 3
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(profile_dir) / "ort")
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def feeds_for(session, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = {i.name: i for i in session.get_inputs()}
    feeds = {"z": rng.standard_normal((n, inputs["z"].shape[1]), np.float32)}
    if "labels" in inputs:
        feeds["labels"] = rng.integers(0, 2, n).astype(np.int64)  # every conditional model has >= 2 classes
    return feeds


def macs_per_image(model) -> dict[str, int]:
    """Multiply-adds per image of each ConvTranspose / Gemm node, from the weights' shapes and inferred input sizes."""
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    spatial = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
               for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    weights = {i.name: numpy_helper.to_array(i).shape for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "ConvTranspose" and node.input[1] in weights:
            cin, cout, kh, kw = weights[node.input[1]]
            h, w = spatial.get(node.input[0], [0, 0, 1, 1])[2:]
            out[node.name] = cin * cout * kh * kw * max(h, 1) * max(w, 1)
        elif node.op_type == "Gemm" and node.input[1] in weights:
            out[node.name] = int(np.prod(weights[node.input[1]]))
    return out


def matmul_peak(threads: int, size: int = 2048) -> float:
    """GFLOP/s of one dense size x size fp32 MatMul in ONNX Runtime at `threads`: the ceiling of this CPU here."""
    import onnx
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [size, size])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "peak", [a, b], [c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    session = _session(model.SerializeToString(), threads)
    feeds = {"a": np.ones((size, size), np.float32), "b": np.ones((size, size), np.float32)}
    seconds = median(interleaved({"matmul": lambda: session.run(None, feeds)}, min_rounds=5, min_s=1.0)["matmul"])
    return 2 * size**3 / seconds / 1e9


def profile(model_bytes: bytes, feeds: dict, threads: int, calls: int = 6) -> dict[str, tuple[str, float]]:
    """node name -> (op type, median kernel seconds per call) over `calls` profiled calls after a warm-up."""
    with tempfile.TemporaryDirectory() as tmp:
        session = _session(model_bytes, threads, tmp)
        session.run(None, feeds)
        for _ in range(calls):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[str, list[float]] = collections.defaultdict(list)
    ops = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            name = event["name"].removesuffix("_kernel_time")
            per_node[name].append(event["dur"] / 1e6)
            ops[name] = event["args"].get("op_name", "")
    return {name: (ops[name], median(times[1:] if len(times) > calls else times)) for name, times in per_node.items()}


def projection_as_gemm(model):
    """The same graph with its first ConvTranspose (stride 1, no padding, on the 1x1 latent) as Gemm + Reshape."""
    import onnx
    from onnx import helper, numpy_helper

    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    weights = {i.name: i for i in graph.initializer}
    nodes = list(graph.node)
    for i, node in enumerate(nodes):
        if node.op_type != "ConvTranspose":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("strides", [1, 1]) != [1, 1] or any(attrs.get("pads", [0, 0, 0, 0])):
            return None
        w = numpy_helper.to_array(weights[node.input[1]])
        cin, cout, kh, kw = w.shape
        bias = (numpy_helper.to_array(weights[node.input[2]]) if len(node.input) > 2 and node.input[2]
                else np.zeros(cout, np.float32))
        graph.initializer.extend([
            numpy_helper.from_array(w.reshape(cin, cout * kh * kw), "projection_weight"),
            numpy_helper.from_array(np.repeat(bias, kh * kw).astype(np.float32), "projection_bias"),
            numpy_helper.from_array(np.array([0, cin], np.int64), "projection_in_shape"),
            numpy_helper.from_array(np.array([0, cout, kh, kw], np.int64), "projection_out_shape"),
        ])
        replacement = [
            helper.make_node("Reshape", [node.input[0], "projection_in_shape"], ["projection_flat"], name="projection_flatten"),
            helper.make_node("Gemm", ["projection_flat", "projection_weight", "projection_bias"], ["projection_out"],
                             name="projection_gemm"),
            helper.make_node("Reshape", ["projection_out", "projection_out_shape"], [node.output[0]], name="projection_reshape"),
        ]
        del graph.node[:]
        graph.node.extend(nodes[:i] + replacement + nodes[i + 1:])
        for name in node.input[1:]:
            if name in weights and sum(name in n.input for n in graph.node) == 0:
                graph.initializer.remove(weights[name])
        onnx.checker.check_model(rewritten)
        return rewritten
    return None


def report(model_dir: Path, n: int, threads: int) -> str:
    import onnx

    model = onnx.load(str(model_dir / ONNX_FILE))
    shipped = model.SerializeToString()
    session = _session(shipped, threads)
    feeds = feeds_for(session, n)
    macs = macs_per_image(model)
    nodes = profile(shipped, feeds, threads)
    total = sum(t for _, t in nodes.values())
    peak = matmul_peak(threads)
    rows = []
    for name, (op, seconds) in sorted(nodes.items(), key=lambda kv: -kv[1][1]):
        node_macs = macs.get(name.removeprefix("fused "))  # ORT names the nodes it fuses "fused <name>"
        gflops = 2 * node_macs * n / seconds / 1e9 if node_macs else None
        rows.append([name, op, fmt(seconds * 1e3, 2), f"{100 * seconds / total:.1f}%",
                     fmt(node_macs / 1e6, 2) if node_macs else "-",
                     f"{fmt(gflops)} ({100 * gflops / peak:.0f}%)" if gflops else "-"])
    lines = [f"### {model_dir} (n={n}, {threads} threads; kernel time {fmt(total * 1e3, 1)} ms, "
             f"{fmt(n / total)} img/s; fp32 MatMul peak {fmt(peak)} GFLOP/s)", "",
             table(["node", "op", "ms", "share", "MMAC/img", "GFLOP/s (of peak)"], rows), ""]

    rewritten = projection_as_gemm(model)
    if rewritten is None:
        lines.append("No stride-1 ConvTranspose on the latent: no rewrite to compare.")
        return "\n".join(lines)
    candidate = _session(rewritten.SerializeToString(), threads)
    diff = float(np.abs(session.run(None, feeds)[0] - candidate.run(None, feeds)[0]).max())
    times = interleaved({"shipped": lambda: session.run(None, feeds), "gemm": lambda: candidate.run(None, feeds)},
                        min_rounds=7, min_s=3.0)
    shipped_s, gemm_s = median(times["shipped"]), median(times["gemm"])
    lines.append(table(["graph", "img/s (median call)", "vs shipped", "max abs diff"], [
        ["as shipped", fmt(n / shipped_s), "1.00x", "-"],
        ["first layer as Gemm + Reshape", fmt(n / gemm_s), f"{shipped_s / gemm_s:.2f}x", f"{diff:.1e}"],
    ]))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dirs", nargs="+", type=Path, help="exported model folders (holding generator.onnx)")
    parser.add_argument("--n", type=int, default=1024, help="batch size of the timed calls (default 1024)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    args = parser.parse_args(argv)
    for model_dir in args.model_dirs:
        print(report(model_dir, args.n, args.threads) + "\n")


if __name__ == "__main__":
    main()
