"""The contract layer."""
