"""Real serving engines driven by lloptim policies.

* :mod:`lloptim.engines.common`: the engine-neutral run state (:class:`~lloptim.engines.common.EngineRun`),
  the driver loop and the trace; no engine is imported.
* :mod:`lloptim.engines.vllm`: :class:`~lloptim.engines.vllm.LloptimScheduler`, a vLLM v1 scheduler class,
  and :class:`~lloptim.engines.vllm.VllmEngine` (``pip install "lloptim[vllm]"``).
* :mod:`lloptim.engines.hf`: the same as a transformers continuous-batching scheduler, and
  :class:`~lloptim.engines.hf.HFEngine` (``pip install "lloptim[hf]"``).
* :mod:`lloptim.engines.serve`: :func:`~lloptim.engines.serve.serve_engine`, one call from a problem and a
  policy name to a :class:`~lloptim.runtime.engine.RunResult`, with the simulator's prediction.
"""

#: Engine names accepted by ``lloptim run --backend`` besides ``torch`` and ``simulated``.
ENGINES = ("vllm", "hf")
