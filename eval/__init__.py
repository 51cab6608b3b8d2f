"""Evaluation: metrics, generation loops, long-context evaluation, reports and plots.

Generation (``eval.generate``) writes official-format predictions files; scoring
(``eval.scoring`` and the per-task modules) reads them. This package never imports
``structlora`` or ``pipeline`` (a test enforces it); it only shares ``data.prompts``.
Submodules are imported on demand so that ``import eval`` stays cheap.
"""
