"""The method and one worker's training loop, without Ray (docs/design.md)."""
