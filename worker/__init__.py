"""The worker, in three parts beside the built-in handlers (`handlers/`):

- `engine/`: one worker's machinery, from a delivery to its outcome: the runtime (`runtime.py`),
  one job's lifecycle (`jobs.py`), intake validation (`intake.py`), slots, what a handler sees
  (`context.py`), shared checkpoints (`checkpoints.py`), settings, metrics, plugins;
- `services/`: the stand-alone services: the edge agent (`edge.py`, torch-free), the LLM service
  (`llm_serve.py`), streaming inference (`infer_serve.py`);
- `cli/`: the `forseti` command (`commands.py`), the embedded stack of `forseti up`
  (`embedded.py`), following a job to its end (`follow.py`).
"""
