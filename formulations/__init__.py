"""The modeling layer and lloptim's own formulations, written with it.

* :mod:`~lloptim.formulations.model`: :class:`Model`, the modeling layer (variable arrays in
  :mod:`~lloptim.formulations.variables`, linear expressions in
  :mod:`~lloptim.formulations.expressions`, constraint families in
  :mod:`~lloptim.formulations.constraints`, named axes in :mod:`~lloptim.formulations.indexing`);
* :mod:`~lloptim.formulations.compiled`: :class:`LinearModel`, the matrix form every backend
  consumes, and the low-level :class:`ModelBuilder`; :mod:`~lloptim.formulations.io` writes it as
  LP or MPS;
* :mod:`~lloptim.formulations.binpacking`: the offline makespan bin packing;
* :mod:`~lloptim.formulations.lp_bound`: its LP relaxation (prices of client time) and the
  ``P||Cmax`` decode-step bound fed into :func:`lloptim.bounds.lower_bound`;
* :mod:`~lloptim.formulations.full_mip`: the time-indexed full serving MIP for small instances;
* :mod:`~lloptim.formulations.binpacking_kv`: the bin packing with KV memory (its LP's
  ``dual("kv")`` prices memory online);
* :mod:`~lloptim.formulations.precedence`: schedules with precedence and releases (the
  client-chain MIP), makespan or weighted completion;
* :mod:`~lloptim.formulations.weighted_completion`: total weighted completion time (Smith's rule,
  its bound, the time-indexed model).
"""

from lloptim.formulations.compiled import LinearModel, ModelBuilder
from lloptim.formulations.constraints import Constraint, ConstraintFamily
from lloptim.formulations.expressions import LinearExpression
from lloptim.formulations.variables import Variable
from lloptim.formulations.model import Model
from lloptim.formulations.binpacking import BinPackingData, binpacking_data, binpacking_lower_bound, build_binpacking
from lloptim.formulations.full_mip import build_full_mip, decode_schedule
from lloptim.formulations.lp_bound import decode_steps_bound, lp_prices, price_lp, tightened_lower_bound

__all__ = ["Model", "Variable", "LinearExpression", "Constraint", "ConstraintFamily", "LinearModel", "ModelBuilder",
           "BinPackingData", "binpacking_data", "binpacking_lower_bound", "build_binpacking", "build_full_mip",
           "decode_schedule", "decode_steps_bound", "lp_prices", "price_lp", "tightened_lower_bound"]
