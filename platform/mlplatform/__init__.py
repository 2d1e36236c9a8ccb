"""mlplatform: training, tuning, serving and residency policy on Ray.

Public entry points live in the capability packages (`mlplatform.cluster`, ...);
this top level stays import-light so `mlplatform --help` answers fast.
"""

__version__ = "0.1.0"
