"""The decode core: load a model, sample P prompts x N candidates in one batched loop,
optionally with Exploratory Sampling (an online Distiller whose error steers sampling).

``engine`` (the loop), ``distiller`` (the tiny online predictor), ``sampling`` (HF-exact
filters), ``params`` (validated settings and the one table of their names), ``results``
(candidates and stats), ``observers`` (the hook that reads hidden states during a decode),
``text_tracking`` (stop strings, streamed text), ``loading`` (models, incl. the embedded one).
"""
