"""One package per paper (``miss``, ``m2i2``, ``cmdpi``, ``paligemma``), each with its config and
per-profile plans, model, losses, data and pipeline; ``comparison`` puts the four side by side.
A paper package imports only the shared core, never another paper."""
