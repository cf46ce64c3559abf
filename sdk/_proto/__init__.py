"""Generated gRPC stubs (root). Do not edit: run ``python protos/generate.py``."""
