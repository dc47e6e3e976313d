"""The job: one rank's share of a DiffusionJob around the engine.

``loading`` (the model from its source), ``storage`` (images and manifests into a directory or any S3 API),
``manifest`` (the record written beside the images), ``progress`` (rank 0's events), ``status`` (those events
into the DiffusionJob's status) and ``runner``, which walks the job's prompts.
"""
