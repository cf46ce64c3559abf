"""Generated gRPC stubs (shallowmark). Do not edit: run ``python protos/generate.py``."""
