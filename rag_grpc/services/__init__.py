"""Thin gRPC servicers: validate and convert, call the core, map the result."""
