"""Generators as policies: a thin layer over diffusers pipelines that trainers share."""
