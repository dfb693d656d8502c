"""Package discovery for pyproject.toml: moe_offload and every subpackage of it, found on disk (a hand
list once left two subpackages out of the wheel). All other metadata lives in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=["moe_offload"] + [f"moe_offload.{p}" for p in find_packages("moe_offload")])
