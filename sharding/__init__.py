"""Shards: the sample schema, the writers and the streaming reader; no torch.distributed, no Ray."""
