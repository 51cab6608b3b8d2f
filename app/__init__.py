"""Gradio demo of a merged model (``structlora demo``), served with plain transformers.

Modules: `demo` (the Blocks app and `launch`), `inference` (input checks and generation),
`host` (which model is in memory), `sources` (a model directory, its run and its metrics),
`registry` (the folder of published models the publish stage writes). This package imports
neither structlora/ nor accelerate nor pipeline/: serving a merged model needs none of them.
"""
