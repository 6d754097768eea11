"""Fold an inference-mode BatchNormalization into the Conv that feeds it.

Conv -> BatchNormalization is the most common pattern left in exported CNNs; the BN is a
per-output-channel affine, so scaling the Conv weight and bias removes it exactly.
"""
from __future__ import annotations

from typing import Optional

import onnx_graphsurgeon as gs

from onnxslim_opt.graph import Edit, Node
from onnxslim_opt.pass_api import PassContext, RewritePass

from ._batchnorm import bn_affine, bn_producer, fold_into_conv


def fold_bn_into(op: str, bn: Node, graph: gs.Graph, ctx: PassContext) -> Optional[Edit | str]:
    """Plan folding `bn` into its producer of type `op` (Conv or ConvTranspose)."""
    conv = bn_producer(bn, graph, (op,))
    if conv is None or isinstance(conv, str):
        return conv
    affine = bn_affine(bn, graph, ctx)
    if isinstance(affine, str):
        return affine
    return fold_into_conv(graph, conv, affine[0], affine[1], bn)


class FuseConvBatchNorm(RewritePass):
    name = "fuse_conv_bn"
    description = "fold inference-mode BatchNormalization into the preceding Conv's weight and bias"
    stage = "simplify"
    order = 500
    anchors = ("BatchNormalization",)

    def plan(self, node: Node, graph: gs.Graph, ctx: PassContext) -> Optional[Edit | str]:
        return fold_bn_into("Conv", node, graph, ctx)
