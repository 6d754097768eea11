"""Make weights look like weights: Constant nodes become initializers.

(Initializers that old-IR exporters also list as graph inputs are already constants once
onnx-graphsurgeon imports the model; the report notes them.)

Many exporters (Paddle, older TensorFlow converters) keep every weight in a Constant node;
later passes see initializers and Constant outputs alike through `constant_value`, but a single
representation keeps the output model conventional and deduplicable.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxslim_opt.graph import constant_node_value, is_graph_output, is_standard, walk_graphs
from onnxslim_opt.pass_api import Pass, PassContext, PassResult


class InlineConstantNodes(Pass):
    name = "inline_constant_nodes"
    description = "turn Constant nodes (weights held as nodes, e.g. Paddle exports) into initializers"
    stage = "prepare"
    order = 10
    transactional = True  # each Constant node is replaced whole

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for g in walk_graphs(graph):
            for node in list(g.nodes):
                if node.op != "Constant" or not is_standard(node) or len(node.outputs) != 1:
                    continue
                out = node.outputs[0]
                if is_graph_output(g, out):
                    result.reject(node, "its output is a graph output")
                    continue
                value = constant_node_value(node)
                if value is None:
                    result.reject(node, f"attribute form {sorted(node.attrs)} is not a dense tensor")
                    continue
                node.outputs.clear()
                out.to_constant(value)
                g.nodes.remove(node)
                result.rewrites += 1
        result.changed = result.rewrites > 0
        return result
