"""builder plugin adding Qwen2ForCausalLM (entry point ``qwen2`` in the ``builder`` group)."""

from builder import hookimpl

from builder_qwen2.qwen2 import Qwen2Builder

__all__ = ["Qwen2Builder"]


@hookimpl
def register_architectures(register):
    register(Qwen2Builder)
