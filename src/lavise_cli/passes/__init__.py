"""Every pass of the frozen backbone over images, on one runner (:mod:`.runner`; a stored pass's
work folder and its pieces: :mod:`.pieces`).

- :mod:`.features`: the reference feature pass (pooled masked features of every pair, cached);
- :mod:`.target`: the target pass over an :class:`~.target.ImageSet` (its :class:`~.target.LayerMaps`);
- :mod:`.image_masking`: the backbone re-run on images masked outside a filter's region;
- :mod:`.stats`: streaming, mergeable statistics (:class:`~.stats.RunningTopK`, ...).
"""
