"""Choosing among candidates: the reward protocol and its implementations (``rewards``),
score fusion across rewards (``fusion``) and the :class:`BestOfN` runnable (``best_of_n``)."""
