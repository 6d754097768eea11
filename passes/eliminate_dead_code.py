"""Remove nodes and initializers no graph output depends on (graph inputs are kept)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxslim_opt.graph import node_count
from onnxslim_opt.pass_api import Pass, PassContext, PassResult


class EliminateDeadCode(Pass):
    name = "eliminate_dead_code"
    description = "remove nodes and initializers that no graph output depends on"
    stage = "simplify"
    order = 900
    transactional = True  # gs cleanup only detaches unreachable nodes; any prefix of it is valid

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        nodes_before = node_count(graph)
        tensors_before = len(graph.tensors())
        graph.cleanup(remove_unused_node_outputs=False, recurse_subgraphs=True, remove_unused_graph_inputs=False)
        removed = nodes_before - node_count(graph)
        changed = removed > 0 or len(graph.tensors()) != tensors_before
        return PassResult(changed=changed, rewrites=removed)
