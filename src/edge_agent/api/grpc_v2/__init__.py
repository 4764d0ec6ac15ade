"""The Open Inference Protocol's gRPC half: ``inference.GRPCInferenceService`` on the device.

``GrpcInference(service, metrics, limiter)`` answers the six core RPCs over the same
``InferenceService``, metrics and rate limiter as the REST API; ``GrpcListener(servicer, config)``
serves it on TCP and a Unix socket and drains with the HTTP API (``serve(..., listeners=[...])``).
The messages are built at import from the committed descriptor of ``grpc_predict_v2.proto``
(``messages``); ``codec`` turns them into arrays and back. This is the one place grpc is imported.
``GrpcInference`` is in ``service``, ``GrpcListener`` in ``server``; this package re-exports
nothing, so importing ``codec`` or ``messages`` does not load grpc.
"""
