"""gRPC Generate service of jalora."""
