"""``training fit``: one engine (:mod:`training.fit.engine`) and a module per task
(:mod:`training.fit.classification`, :mod:`training.fit.detection`) that fills its hooks."""
