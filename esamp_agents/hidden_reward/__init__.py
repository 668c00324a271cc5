"""The linear reward head (ELHSR) over a policy model's own states.

``head`` (the gated linear head and its checkpoints), ``features`` (hidden states read during
the decode or post hoc), ``logprob_features`` (the same head over API-style logprobs),
``training`` (fit), ``collect`` / ``collect_ray`` (labelled candidates on disk, locally or on
Ray), ``reward`` (:class:`HiddenStateReward`, the object BestOfN and users call).
"""
