"""Built-in passes, one module per rewrite. Each is registered through the
`onnxslim_opt.passes` entry-point group in pyproject.toml; the module name is the pass name."""
