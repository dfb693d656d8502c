"""Integrations with other libraries: `moe_offload.integrations.transformers.offload(hf_model)`."""
