"""RQ glue for samlight: inference workers, corrections stream, DLD training, cron schedule, model registry.

Imports of torch happen only in the modules that run models (``workers.runtime``, the training job body),
so the backend (``workers.client``) and the cron / training-worker parents stay CUDA-free.
"""
