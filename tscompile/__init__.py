"""tscompile: a declarative model-conversion compiler for activation-sparse LLMs.

Kept import-light: `import tscompile` must not import torch (the CLI's --help/schema/passes stay fast).
"""
__version__ = "0.1.0"
