# Generated modules (common_pb2, generation_pb2, generation_pb2_grpc) land here: run ../../generate_stubs.sh.
