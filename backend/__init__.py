"""samlight's Label Studio ML backend: HTTP only (Flask app served by gunicorn).

It imports ``serving`` (the product core) and never ``workers``.

- ``app``       ``create_app()``: /health, /setup, /predict, /webhook, /train, /versions, basic auth
- ``adapter``   ``LabelStudioAdapter``: the Label Studio protocol, ``predict(tasks, context)`` / ``fit(event)``
- ``labels``    the labeling config (label_studio_sdk): smart prompts and the targets (brush, polygon, box)
- ``prompts``   Label Studio context results (percent) -> the objects of a click, in pixels, with limits
- ``failures``  recent failed requests, for /health
- ``settings``  ``BackendSettings.from_env()``: the HTTP server's own options around ``serving.config.Settings``;
                ``gunicorn_conf`` and ``serve`` start the server
"""
