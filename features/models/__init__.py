"""Stage one's networks: backbones and their preprocessing by name, forward engines, batched embedding."""
