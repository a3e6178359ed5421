"""Fused GPU kernels. Importing this package needs only torch; the Triton kernels live in
``gqla_megatron.kernels.triton_decode`` (imports triton)."""
