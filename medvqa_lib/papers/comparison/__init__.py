"""The four methods side by side: ``config`` (the plan and its sizes per profile), ``study``
(stored runs, main table, paired bootstrap, error analysis, cost), ``efficiency`` (accuracy
against the amount of pre-training data) and ``throughput`` (training and answering speed).
This is the only package that imports all four paper packages."""
