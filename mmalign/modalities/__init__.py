"""Decoding media into mmalign's canonical tensors (see DESIGN.md, "Canonical media tensors")."""
