"""Data: CT layouts on disk, slice and noise caches, the CT and RGB datasets, the training stream, phantoms.

Modules: ``layouts`` (finding slices, volumes and pairs; the patient split), ``caches`` (decoded slices and
simulated noise on disk), ``ct_dataset`` (CT training stream and validation pairs), ``images`` (the RGB
tasks' datasets), ``stream`` (the seeded training stream and its sampler), ``phantom`` (synthetic CT).
Import from the modules: this package imports none of them, so ``ldct_clip.simulation`` can use the
phantoms while the caches use the simulation.
"""
