"""The round engine every runtime shares, and the embedded runtime.

* ``config.py``: the experiment config (one file, validated before anything loads).
* ``setup.py``: what every process builds the same way from it (data, partition, model + LoRA,
  client ranks, local data, the seeded client sample).
* ``client.py`` + ``train.py``: one client's round (method start, local optimisation, upload).
* ``trainer.py``: the seam: a runtime's :class:`~fedlora.engine.trainer.ClientTrainer`.
* ``rounds.py``: :class:`~fedlora.engine.rounds.RoundEngine`, the loop every runtime runs.
* ``local.py``: the embedded runtime (``fedlora run``): clients one after another in-process.
* ``checkpoint.py``, ``faults.py``: atomic checkpoints; kill points for the resume tests.
* ``personal.py``: evaluation of clients' own models; ``evaluate.py``: ``fedlora eval``.
"""
