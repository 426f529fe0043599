"""Backbones: pretrained speech recognisers that can be pruned and fine-tuned."""
