"""Per-request sampling state, between the scheduler and the sampler kernels.

- `batch_info.py`: a batch's sampler inputs from its requests' parameters
  (and, for penalties, their token histories), built from scratch: what
  offline callers and the row state's joins use;
- `row_state.py`: the running requests' sampling state kept on the device,
  one row per `req_to_token` row: written once when a request joins, its
  penalty counts updated with each step's tokens, gathered per batch;
- `logits_processors.py`: per-request logits processors (a bias, a banned
  token set, later grammars) and the registry that builds them from a
  request's sampling parameters;
- `planner.py`: the scheduler-side half: which rows join, which rows a batch
  samples from, and the processors' output, filled on the CPU while the
  previous batch runs.

`layers/sampler.py` holds only the kernels that read a `SamplingBatchInfo`.
"""
