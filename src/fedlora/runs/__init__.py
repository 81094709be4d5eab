"""Reading, tabulating and drawing run folders (``metrics.jsonl``, ``summary.json``,
``config.yaml``): one run's curves, ``fedlora compare``, and the record readers ``fedlora.study``
builds its reports on. Plain JSON in, tables and figures out: no model, torch or GPU."""
