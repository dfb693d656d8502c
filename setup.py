"""Package discovery for pyproject.toml: every subpackage of moe_offload/, found on disk, plus the
top-level kernels/ folder shipped as moe_offload.kernels (never as `kernels`: a PyPI package of that
name exists and transformers imports it). All other metadata lives in pyproject.toml."""

from setuptools import find_packages, setup

packages = ["moe_offload"] + [f"moe_offload.{p}" for p in find_packages("moe_offload")]
packages += ["moe_offload.kernels"] + [f"moe_offload.kernels.{p}" for p in find_packages("kernels")]
setup(packages=packages)
