"""People (contract §12): the person registry (:mod:`gateway.people.store`, the one owner
of the ``persons`` table) and the Person model (:mod:`gateway.people.model`). How a job
reaches a person through their devices is the pipeline's (:mod:`gateway.pipeline.reach`),
which owns the deliveries."""
