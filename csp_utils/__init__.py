"""CSP: Confidence Calibration through Semantic Perturbation, as a small study toolkit.

Modules are imported on demand (``from csp_utils.world import scenes``); importing the package
itself is cheap and pulls in no torch or trl.
"""

__version__ = "0.1.0"
