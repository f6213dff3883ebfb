"""samlight's RQ processes: inference workers, the training worker, the cron process.

Thin over ``serving`` (the product core), which they import; they never import ``backend``. Torch is
imported only where a model runs (the inference runtime, the training job body), so the cron process and the
training worker's parent stay CUDA-free.
"""
