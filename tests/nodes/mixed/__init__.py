"""A trusted package with an untrusted submodule (``evil``), for the registry's tests."""
