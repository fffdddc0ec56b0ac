"""jalora's gRPC server (jalora.v1.Jalora in front of an engine thread) and the `jalora` command line."""
