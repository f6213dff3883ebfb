"""samlight's RQ processes: inference workers, the training worker, the cron process.

Thin over ``serving`` (the product core), which they import; they never import ``backend``. Torch is
imported only where a model runs (the inference runtime, the training job body), so the cron process and the
training worker's parent stay CUDA-free.

- ``process``          what every worker process does first: settings, ``--redis-url``, logging
- ``inference``        the inference worker (RQ ``SimpleWorker``, one per GPU) over ``serving.engine``
- ``tasks``            the job functions RQ calls by name
- ``training``         the DLD fine-tuning job body; ``training_worker`` the forking worker that runs it
- ``cron``             the schedule: enqueues the training job
"""
