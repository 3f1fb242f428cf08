"""Data the harness builds and reads: target sets (``targets``, ``dataset``), text corpora
(``text_corpus``) and injection-card target folders (``injection_targets``)."""
