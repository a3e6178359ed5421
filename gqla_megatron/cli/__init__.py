"""Command-line tools of gqla-megatron (``python -m gqla_megatron.cli.<tool>``)."""
