"""Evaluation: the ``evaluate`` stage, the metrics registry (``metrics/``), the built-in
sets' attribute oracles (``oracle``), and the report's figures (``figures``)."""
