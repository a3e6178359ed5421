"""Decode engine for GQLA models: preallocated caches for either path, ragged batches,
sampling, a backend registry chosen once at load, and a live path switch."""
