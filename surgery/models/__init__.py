"""Models: resolving a spec, the config-only index, built-ins, and the decoder graph passes edit."""
