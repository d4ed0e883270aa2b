"""The nightly continual-learning update: per-user LoRA training with avalanche-lib, gating, promotion.

- `night`: one night: take the lease, plan the users' jobs, run them, collect the results;
- `jobs`: the plain data a night hands out and gets back; `lease`: one night at a time;
- `update`: one user's update, as its stages (select examples -> hold back -> select replay ->
  train candidate -> measure forgetting -> write candidate -> gate);
- `gate`: the candidate against the active adapter; promote or reject;
- `experiences`, `regularizers`: the glue to avalanche (datasets of examples, the FAISS replay
  plugin, EWC and LwF anchored at the starting model).

The store's reads and writes for the night are in `nightowl.memory.night_queries`.
"""
