"""The protocol's protobuf message classes, built at import from the committed descriptor.

Owns loading ``FILE_DESCRIPTOR`` (generated from ``grpc_predict_v2.proto``) into a descriptor
pool of its own and the message classes and RPC method names taken from it. The pool is private
so a process that also imports Triton's or KServe's generated modules (the same ``inference.*``
names in protobuf's default pool) loads both without a duplicate-symbol error. Does not own
decoding tensors (``edge_agent.api.grpc_v2.codec``) or serving (``edge_agent.api.grpc_v2.service``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from edge_agent.api.grpc_v2._descriptor import FILE_DESCRIPTOR

__all__ = ["METHODS", "SERVICE", "UNPARSABLE", "Message", "message_class", "parser"]

SERVICE = "inference.GRPCInferenceService"
_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(descriptor_pb2.FileDescriptorProto.FromString(FILE_DESCRIPTOR))

#: A protobuf message of this protocol (fields are dynamic, hence ``Any``).
Message = Any
#: What ``parser`` returns for bytes that are not the message.
UNPARSABLE = object()


def message_class(name: str) -> type[Any]:
    """The class of message ``inference.<name>`` (e.g. ``ModelInferRequest``).

    Raises:
        KeyError: no such message in the protocol.
    """
    found: type[Any] = message_factory.GetMessageClass(
        _POOL.FindMessageTypeByName(f"inference.{name}")
    )
    return found


def parser(cls: type[Any]) -> Callable[[bytes], Any]:
    """A deserializer for ``cls`` that returns ``UNPARSABLE`` for bytes that are not such a
    message (grpc answers INTERNAL when a deserializer raises or returns ``None``; the handler
    answers INVALID_ARGUMENT instead).
    """

    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError:
            return UNPARSABLE

    return parse


def _methods() -> dict[str, tuple[type[Any], type[Any]]]:
    service = _POOL.FindServiceByName(SERVICE)
    return {
        method.name: (
            message_factory.GetMessageClass(method.input_type),
            message_factory.GetMessageClass(method.output_type),
        )
        for method in service.methods
    }


#: RPC name -> (request class, response class), for every RPC of the service.
METHODS = _methods()
