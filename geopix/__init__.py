"""GeoPix: a multimodal LLM for remote sensing that answers with text and pixel masks.

Sub-packages follow the pipeline's stages: ``data``, ``model``, ``train``, ``evaluate``,
``infer``. ``storage`` and ``tracking`` are the single places that talk to object storage and
MLflow; ``stack`` runs the embedded local services; ``config`` holds the typed configs.
"""

__version__ = "0.1.0"
