"""onnxslim-opt: a framework-agnostic ONNX graph optimizer validated with ONNX Runtime.

    import onnxslim_opt
    model = onnxslim_opt.optimize("model.onnx")                 # returns the optimized ModelProto
    outcome = onnxslim_opt.run("model.onnx", "out.onnx")        # also gives the report
"""
__version__ = "0.1.0"

from .api import OptimizeOptions, Outcome, optimize, run  # noqa: E402
from .errors import OptimizeError, ValidationFailed  # noqa: E402
from .graph import Edit, NewNode, constant_value  # noqa: E402
from .pass_api import NoOptions, Pass, PassContext, PassResult, RewritePass  # noqa: E402
from .registry import register_pass, registry  # noqa: E402

__all__ = [
    "optimize", "run", "OptimizeOptions", "Outcome", "OptimizeError", "ValidationFailed",
    "Pass", "RewritePass", "PassResult", "PassContext", "NoOptions", "Edit", "NewNode",
    "constant_value", "register_pass", "registry",
]
