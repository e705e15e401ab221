"""The Open Inference Protocol (KServe v2), as tensorline serves it: see ``tensorline.oip.v2``."""
