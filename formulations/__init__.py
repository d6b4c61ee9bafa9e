"""Solver-neutral formulations of lloptim's optimization problems.

* :mod:`~lloptim.formulations.model`: :class:`LinearModel`, the one matrix-form model object, and
  :class:`ModelBuilder`;
* :mod:`~lloptim.formulations.binpacking`: the offline makespan bin packing;
* :mod:`~lloptim.formulations.lp_bound`: its LP relaxation (prices of client time) and the
  ``P||Cmax`` decode-step bound fed into :func:`lloptim.bounds.lower_bound`;
* :mod:`~lloptim.formulations.full_mip`: the time-indexed full serving MIP for small instances.
"""

from lloptim.formulations.model import LinearModel, ModelBuilder
from lloptim.formulations.binpacking import BinPackingData, binpacking_data, binpacking_lower_bound, build_binpacking
from lloptim.formulations.full_mip import build_full_mip, decode_schedule
from lloptim.formulations.lp_bound import decode_steps_bound, lp_prices, price_lp, tightened_lower_bound

__all__ = ["LinearModel", "ModelBuilder", "BinPackingData", "binpacking_data", "binpacking_lower_bound",
           "build_binpacking", "build_full_mip", "decode_schedule", "decode_steps_bound", "lp_prices", "price_lp",
           "tightened_lower_bound"]
