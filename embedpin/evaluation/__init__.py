"""Evaluation: the model in the loop. A session renders and scores candidates (``session``), the
run's fixed inputs are prepared once (``setup``), evaluators render in this process or on Ray
workers (``evaluate``, ``ray_workers``), ``batch`` holds what travels between them, ``seeds`` where
render seeds come from, and ``inversion`` fits token vectors by the model's own gradient."""
