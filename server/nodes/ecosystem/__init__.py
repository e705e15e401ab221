"""Ecosystem nodes: the libraries users actually run, in either runtime.

Registered under the ``tensorline.nodes`` entry point group as ``ecosystem``. Each submodule
declares the optional libraries it needs in ``TENSORLINE_REQUIRES``; the registry skips (with a
warning) a submodule whose library is not installed, so the catalogue still loads without torch
or pandas. Heavy libraries are imported inside the node methods, never at module import: the
server process lists these nodes without importing torch, and pays for it only if a node
actually runs in-process.

- ``scipy_nodes``: ``ButterLowpass`` (Butterworth low-pass, second-order sections).
- ``pandas_nodes``: ``DataFrameAggregate`` (tensor + column names -> group-by aggregation).
- ``torch_nodes``: ``TorchMLP`` (seeded ``torch.nn`` MLP), ``TorchSpectrogram`` (STFT
  magnitude / log-mel features) and ``TorchScriptModel`` (a ``torch.jit.save`` file).
- ``onnx_nodes``: ``OnnxModel`` (an ONNX file run by onnxruntime on the CPU).
- ``python_nodes``: ``PyHashChain`` (pure-Python CPU-bound loop, for GIL measurements).

Install the libraries with the ``ecosystem`` extra (pandas, onnxruntime; torch from a CPU
wheel, e.g. ``pip install torch==2.13.0`` where a local CPU wheel is available). The model
nodes' files come from the server's model roots (``nodes.ModelPath``).
"""
