"""Training data: folder scan, captions, image checks, buckets, latent cache, Dataset."""
