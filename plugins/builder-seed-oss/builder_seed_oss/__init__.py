"""builder plugin adding SeedOssForCausalLM (entry point ``seed_oss`` in the ``builder``
group)."""

from builder import hookimpl

from builder_seed_oss.seed_oss import SeedOssBuilder

__all__ = ["SeedOssBuilder"]


@hookimpl
def register_architectures(register):
    register(SeedOssBuilder)
