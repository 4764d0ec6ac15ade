"""Inference runtimes: one interface, one adapter per runtime, and the factory that picks one.

``base`` is the ``Runtime`` protocol and its value types; ``onnx`` and ``litert`` are the adapters
(each the only importer of its runtime, loaded lazily); ``loader`` chooses the adapter for an
artifact format (``load_runtime``). ``quantization`` converts float feeds for quantized TFLite
models, ``golden`` checks a loaded model against its bundle's golden samples, ``device`` reads this
device's profile. Import each name from its module; this package re-exports nothing.
"""
