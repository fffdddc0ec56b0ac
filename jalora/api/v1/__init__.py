"""jalora.v1: jalora.proto and the code protoc generated from it (see ../generate.sh)."""
