"""The pipeline's stages, one file each: when and whether things happen (the how lives in mechanisms)."""
