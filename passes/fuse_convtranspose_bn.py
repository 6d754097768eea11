"""Fold an inference-mode BatchNormalization into the ConvTranspose that feeds it.

Decoder and upsampling blocks use ConvTranspose -> BN; the weight layout is [C_in, C_out/group,
k...], so output channel g*(C_out/group)+j is scaled in the g-th block of input channels.
"""
from __future__ import annotations

from typing import Optional

import onnx_graphsurgeon as gs

from onnxslim_opt.graph import Edit, Node
from onnxslim_opt.pass_api import PassContext, RewritePass

from .fuse_conv_bn import fold_bn_into


class FuseConvTransposeBatchNorm(RewritePass):
    name = "fuse_convtranspose_bn"
    description = "fold inference-mode BatchNormalization into the preceding ConvTranspose"
    stage = "simplify"
    order = 510
    anchors = ("BatchNormalization",)

    def plan(self, node: Node, graph: gs.Graph, ctx: PassContext) -> Optional[Edit | str]:
        return fold_bn_into("ConvTranspose", node, graph, ctx)
