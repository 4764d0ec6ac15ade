"""GENERATED from grpc_predict_v2.proto: do not edit (see tests/unit/test_grpc_descriptor.py).

The serialized ``FileDescriptorProto`` of the protocol's gRPC service, so the device
needs neither protoc nor grpcio-tools.
"""

FILE_DESCRIPTOR = (
    b'\n,edge_agent/api/grpc_v2/grpc_predict_v2.proto\x12\tinference"\x13\n\x11ServerLiveRequ'
    b'est"(\n\x12ServerLiveResponse\x12\x12\n\x04live\x18\x01 \x01(\x08R\x04live"\x14\n\x12Se'
    b'rverReadyRequest"+\n\x13ServerReadyResponse\x12\x14\n\x05ready\x18\x01 \x01(\x08R\x05re'
    b'ady"A\n\x11ModelReadyRequest\x12\x12\n\x04name\x18\x01 \x01(\tR\x04name\x12\x18\n\x07ve'
    b'rsion\x18\x02 \x01(\tR\x07version"*\n\x12ModelReadyResponse\x12\x14\n\x05ready\x18\x01 '
    b'\x01(\x08R\x05ready"\x17\n\x15ServerMetadataRequest"f\n\x16ServerMetadataResponse\x12'
    b"\x12\n\x04name\x18\x01 \x01(\tR\x04name\x12\x18\n\x07version\x18\x02 \x01(\tR\x07versio"
    b'n\x12\x1e\n\nextensions\x18\x03 \x03(\tR\nextensions"D\n\x14ModelMetadataRequest\x12'
    b"\x12\n\x04name\x18\x01 \x01(\tR\x04name\x12\x18\n\x07version\x18\x02 \x01(\tR\x07versio"
    b'n"\xcf\x02\n\x15ModelMetadataResponse\x12\x12\n\x04name\x18\x01 \x01(\tR\x04name\x12'
    b"\x1a\n\x08versions\x18\x02 \x03(\tR\x08versions\x12\x1a\n\x08platform\x18\x03 \x01(\tR"
    b"\x08platform\x12G\n\x06inputs\x18\x04 \x03(\x0b2/.inference.ModelMetadataResponse.Tenso"
    b"rMetadataR\x06inputs\x12I\n\x07outputs\x18\x05 \x03(\x0b2/.inference.ModelMetadataRespo"
    b"nse.TensorMetadataR\x07outputs\x1aV\n\x0eTensorMetadata\x12\x12\n\x04name\x18\x01 \x01("
    b"\tR\x04name\x12\x1a\n\x08datatype\x18\x02 \x01(\tR\x08datatype\x12\x14\n\x05shape\x18"
    b'\x03 \x03(\x03R\x05shape"\x9d\x08\n\x11ModelInferRequest\x12\x1d\n\nmodel_name\x18\x01 '
    b"\x01(\tR\tmodelName\x12#\n\rmodel_version\x18\x02 \x01(\tR\x0cmodelVersion\x12\x0e\n"
    b"\x02id\x18\x03 \x01(\tR\x02id\x12L\n\nparameters\x18\x04 \x03(\x0b2,.inference.ModelInf"
    b"erRequest.ParametersEntryR\nparameters\x12E\n\x06inputs\x18\x05 \x03(\x0b2-.inference.M"
    b"odelInferRequest.InferInputTensorR\x06inputs\x12Q\n\x07outputs\x18\x06 \x03(\x0b27.infe"
    b"rence.ModelInferRequest.InferRequestedOutputTensorR\x07outputs\x12,\n\x12raw_input_cont"
    b"ents\x18\x07 \x03(\x0cR\x10rawInputContents\x1a\xcd\x02\n\x10InferInputTensor\x12\x12\n"
    b"\x04name\x18\x01 \x01(\tR\x04name\x12\x1a\n\x08datatype\x18\x02 \x01(\tR\x08datatype"
    b"\x12\x14\n\x05shape\x18\x03 \x03(\x03R\x05shape\x12]\n\nparameters\x18\x04 \x03(\x0b2=."
    b"inference.ModelInferRequest.InferInputTensor.ParametersEntryR\nparameters\x12:\n\x08con"
    b"tents\x18\x05 \x01(\x0b2\x1e.inference.InferTensorContentsR\x08contents\x1aX\n\x0fParam"
    b"etersEntry\x12\x10\n\x03key\x18\x01 \x01(\tR\x03key\x12/\n\x05value\x18\x02 \x01(\x0b2"
    b"\x19.inference.InferParameterR\x05value:\x028\x01\x1a\xf3\x01\n\x1aInferRequestedOutput"
    b"Tensor\x12\x12\n\x04name\x18\x01 \x01(\tR\x04name\x12g\n\nparameters\x18\x02 \x03(\x0b2"
    b"G.inference.ModelInferRequest.InferRequestedOutputTensor.ParametersEntryR\nparameters"
    b"\x1aX\n\x0fParametersEntry\x12\x10\n\x03key\x18\x01 \x01(\tR\x03key\x12/\n\x05value\x18"
    b"\x02 \x01(\x0b2\x19.inference.InferParameterR\x05value:\x028\x01\x1aX\n\x0fParametersEn"
    b"try\x12\x10\n\x03key\x18\x01 \x01(\tR\x03key\x12/\n\x05value\x18\x02 \x01(\x0b2\x19.inf"
    b'erence.InferParameterR\x05value:\x028\x01"\xdf\x05\n\x12ModelInferResponse\x12\x1d\n\nm'
    b"odel_name\x18\x01 \x01(\tR\tmodelName\x12#\n\rmodel_version\x18\x02 \x01(\tR\x0cmodelVe"
    b"rsion\x12\x0e\n\x02id\x18\x03 \x01(\tR\x02id\x12M\n\nparameters\x18\x04 \x03(\x0b2-.inf"
    b"erence.ModelInferResponse.ParametersEntryR\nparameters\x12I\n\x07outputs\x18\x05 \x03("
    b"\x0b2/.inference.ModelInferResponse.InferOutputTensorR\x07outputs\x12.\n\x13raw_output_"
    b"contents\x18\x06 \x03(\x0cR\x11rawOutputContents\x1a\xd0\x02\n\x11InferOutputTensor\x12"
    b"\x12\n\x04name\x18\x01 \x01(\tR\x04name\x12\x1a\n\x08datatype\x18\x02 \x01(\tR\x08datat"
    b"ype\x12\x14\n\x05shape\x18\x03 \x03(\x03R\x05shape\x12_\n\nparameters\x18\x04 \x03(\x0b"
    b"2?.inference.ModelInferResponse.InferOutputTensor.ParametersEntryR\nparameters\x12:\n"
    b"\x08contents\x18\x05 \x01(\x0b2\x1e.inference.InferTensorContentsR\x08contents\x1aX\n"
    b"\x0fParametersEntry\x12\x10\n\x03key\x18\x01 \x01(\tR\x03key\x12/\n\x05value\x18\x02 "
    b"\x01(\x0b2\x19.inference.InferParameterR\x05value:\x028\x01\x1aX\n\x0fParametersEntry"
    b"\x12\x10\n\x03key\x18\x01 \x01(\tR\x03key\x12/\n\x05value\x18\x02 \x01(\x0b2\x19.infere"
    b'nce.InferParameterR\x05value:\x028\x01"\xd7\x01\n\x0eInferParameter\x12\x1f\n\nbool_par'
    b"am\x18\x01 \x01(\x08H\x00R\tboolParam\x12!\n\x0bint64_param\x18\x02 \x01(\x03H\x00R\nin"
    b"t64Param\x12#\n\x0cstring_param\x18\x03 \x01(\tH\x00R\x0bstringParam\x12#\n\x0cdouble_p"
    b"aram\x18\x04 \x01(\x01H\x00R\x0bdoubleParam\x12#\n\x0cuint64_param\x18\x05 \x01(\x04H"
    b'\x00R\x0buint64ParamB\x12\n\x10parameter_choice"\xc3\x02\n\x13InferTensorContents\x12#'
    b"\n\rbool_contents\x18\x01 \x03(\x08R\x0cboolContents\x12!\n\x0cint_contents\x18\x02 "
    b"\x03(\x05R\x0bintContents\x12%\n\x0eint64_contents\x18\x03 \x03(\x03R\rint64Contents"
    b"\x12#\n\ruint_contents\x18\x04 \x03(\rR\x0cuintContents\x12'\n\x0fuint64_contents\x18"
    b"\x05 \x03(\x04R\x0euint64Contents\x12#\n\rfp32_contents\x18\x06 \x03(\x02R\x0cfp32Conte"
    b"nts\x12#\n\rfp64_contents\x18\x07 \x03(\x01R\x0cfp64Contents\x12%\n\x0ebytes_contents"
    b'\x18\x08 \x03(\x0cR\rbytesContents"\xba\x01\n\x18ModelRepositoryParameter\x12\x1f\n\nbo'
    b"ol_param\x18\x01 \x01(\x08H\x00R\tboolParam\x12!\n\x0bint64_param\x18\x02 \x01(\x03H"
    b"\x00R\nint64Param\x12#\n\x0cstring_param\x18\x03 \x01(\tH\x00R\x0bstringParam\x12!\n"
    b'\x0bbytes_param\x18\x04 \x01(\x0cH\x00R\nbytesParamB\x12\n\x10parameter_choice"W\n\x16R'
    b"epositoryIndexRequest\x12'\n\x0frepository_name\x18\x01 \x01(\tR\x0erepositoryName\x12"
    b'\x14\n\x05ready\x18\x02 \x01(\x08R\x05ready"\xca\x01\n\x17RepositoryIndexResponse\x12E'
    b"\n\x06models\x18\x01 \x03(\x0b2-.inference.RepositoryIndexResponse.ModelIndexR\x06model"
    b"s\x1ah\n\nModelIndex\x12\x12\n\x04name\x18\x01 \x01(\tR\x04name\x12\x18\n\x07version"
    b"\x18\x02 \x01(\tR\x07version\x12\x14\n\x05state\x18\x03 \x01(\tR\x05state\x12\x16\n\x06"
    b"reason\x18\x04 \x01(\tR\x06reason\"\x9f\x02\n\x1aRepositoryModelLoadRequest\x12'\n\x0fr"
    b"epository_name\x18\x01 \x01(\tR\x0erepositoryName\x12\x1d\n\nmodel_name\x18\x02 \x01(\t"
    b"R\tmodelName\x12U\n\nparameters\x18\x03 \x03(\x0b25.inference.RepositoryModelLoadReques"
    b"t.ParametersEntryR\nparameters\x1ab\n\x0fParametersEntry\x12\x10\n\x03key\x18\x01 \x01("
    b"\tR\x03key\x129\n\x05value\x18\x02 \x01(\x0b2#.inference.ModelRepositoryParameterR\x05v"
    b'alue:\x028\x01"\x1d\n\x1bRepositoryModelLoadResponse"\xa3\x02\n\x1cRepositoryModelUnloa'
    b"dRequest\x12'\n\x0frepository_name\x18\x01 \x01(\tR\x0erepositoryName\x12\x1d\n\nmodel_"
    b"name\x18\x02 \x01(\tR\tmodelName\x12W\n\nparameters\x18\x03 \x03(\x0b27.inference.Repos"
    b"itoryModelUnloadRequest.ParametersEntryR\nparameters\x1ab\n\x0fParametersEntry\x12\x10"
    b"\n\x03key\x18\x01 \x01(\tR\x03key\x129\n\x05value\x18\x02 \x01(\x0b2#.inference.ModelRe"
    b'positoryParameterR\x05value:\x028\x01"\x1f\n\x1dRepositoryModelUnloadResponse2\xae\x06'
    b"\n\x14GRPCInferenceService\x12K\n\nServerLive\x12\x1c.inference.ServerLiveRequest\x1a"
    b'\x1d.inference.ServerLiveResponse"\x00\x12N\n\x0bServerReady\x12\x1d.inference.ServerRe'
    b'adyRequest\x1a\x1e.inference.ServerReadyResponse"\x00\x12K\n\nModelReady\x12\x1c.infere'
    b'nce.ModelReadyRequest\x1a\x1d.inference.ModelReadyResponse"\x00\x12W\n\x0eServerMetadat'
    b'a\x12 .inference.ServerMetadataRequest\x1a!.inference.ServerMetadataResponse"\x00\x12T'
    b"\n\rModelMetadata\x12\x1f.inference.ModelMetadataRequest\x1a .inference.ModelMetadataRe"
    b'sponse"\x00\x12K\n\nModelInfer\x12\x1c.inference.ModelInferRequest\x1a\x1d.inference.Mo'
    b'delInferResponse"\x00\x12Z\n\x0fRepositoryIndex\x12!.inference.RepositoryIndexRequest'
    b'\x1a".inference.RepositoryIndexResponse"\x00\x12f\n\x13RepositoryModelLoad\x12%.inferen'
    b'ce.RepositoryModelLoadRequest\x1a&.inference.RepositoryModelLoadResponse"\x00\x12l\n'
    b"\x15RepositoryModelUnload\x12'.inference.RepositoryModelUnloadRequest\x1a(.inference.Re"
    b'positoryModelUnloadResponse"\x00b\x06proto3'
)
