"""What tests, benchmarks and CPU smoke runs share: the tiny Qwen2.5-VL fixture and a few helpers.

* :mod:`opsvlm.testing.tiny`: a tiny but real Qwen2.5-VL checkpoint, built once per cache (model name ``"tiny"``).
* :mod:`opsvlm.testing.checkpoints`: a real adapter checkpoint of the tiny model, registered in an MLflow store.
* :mod:`opsvlm.testing.processes`: free local ports, health polls and stopping a server's process group.
* :mod:`opsvlm.testing.cluster`: a benchmark's own local Ray instance (imports Ray: an edge module).

Tests and benchmarks import these from here, never from ``tests/``. Nothing is imported at package import, so
``opsvlm.model.build`` (which resolves ``"tiny"`` through :mod:`opsvlm.testing.tiny`) pulls in no test helper.
"""
