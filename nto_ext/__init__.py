"""nto_ext: fine-tune under a hard training-state memory budget."""

from . import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
