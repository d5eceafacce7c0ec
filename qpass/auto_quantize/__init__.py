"""Per-layer format search (ModelOpt's ``auto_quantize``); see :mod:`.search`."""

from qpass.auto_quantize.report import auto_quantize_report, auto_quantize_resolve, auto_quantize_sweep, format_table
from qpass.auto_quantize.search import AutoQuantizeSearcher, auto_quantize
from qpass.auto_quantize.solver import AutoQuantizeError

__all__ = ["AutoQuantizeError", "AutoQuantizeSearcher", "auto_quantize", "auto_quantize_report",
           "auto_quantize_resolve", "auto_quantize_sweep", "format_table"]
