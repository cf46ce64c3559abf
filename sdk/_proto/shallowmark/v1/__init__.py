"""Generated gRPC stubs (shallowmark.v1). Do not edit: run ``python protos/generate.py``."""
