"""Training machinery around Lightning: callbacks, tracking, strategies, cross-device gathers, GradCache, caches."""
