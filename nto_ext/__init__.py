"""nto_ext: fine-tune under a hard training-state memory budget."""

from . import ops
from .optimizer import NTO
from .planner import Plan, plan

__version__ = "0.1.0"
__all__ = ["NTO", "Plan", "plan", "ops", "__version__"]
